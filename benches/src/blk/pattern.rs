//! Where requests go: random block-aligned offsets from a fixed-seed generator, and
//! sequential offsets that wrap at the end of the file. The same seed gives the same offsets
//! in every run.

/// xorshift64*: fast, deterministic, good enough to spread requests over a file.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        // The all-zero state would stay zero.
        Self(if seed == 0 {
            0x9e37_79b9_7f4a_7c15
        } else {
            seed
        })
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (`n` > 0), by multiply-high: no modulo bias worth the name.
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Fills `buf` with pseudo-random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let bytes = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

/// Random offsets of `block`-byte blocks inside a file of `size` bytes.
#[derive(Debug, Clone)]
pub struct RandomBlocks {
    rng: Rng,
    block: u64,
    blocks: u64,
}

impl RandomBlocks {
    /// `None` when the file holds no whole block.
    pub fn new(seed: u64, block: u64, size: u64) -> Option<Self> {
        let blocks = size.checked_div(block)?;
        (blocks > 0).then(|| Self {
            rng: Rng::new(seed),
            block,
            blocks,
        })
    }

    /// The next offset, in bytes: a multiple of the block size, the block inside the file.
    pub fn next_offset(&mut self) -> u64 {
        self.rng.below(self.blocks) * self.block
    }
}

/// Offsets of consecutive `block`-byte blocks, back to 0 after the last whole block.
#[derive(Debug, Clone)]
pub struct Sequential {
    next: u64,
    block: u64,
    blocks: u64,
}

impl Sequential {
    /// `None` when the file holds no whole block.
    pub fn new(block: u64, size: u64) -> Option<Self> {
        let blocks = size.checked_div(block)?;
        (blocks > 0).then_some(Self {
            next: 0,
            block,
            blocks,
        })
    }

    pub fn next_offset(&mut self) -> u64 {
        let offset = self.next * self.block;
        self.next = (self.next + 1) % self.blocks;
        offset
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_sequence_and_zero_is_not_stuck() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        let first: Vec<u64> = (0..8).map(|_| a.next_u64()).collect();
        assert!(first.iter().zip(first.iter().skip(1)).all(|(x, y)| x != y));
        assert_eq!(first, (0..8).map(|_| b.next_u64()).collect::<Vec<_>>());
        let mut zero = Rng::new(0);
        assert!((0..4).all(|_| zero.next_u64() != 0));
    }

    #[test]
    fn below_stays_under_its_bound_and_reaches_every_value() {
        let mut rng = Rng::new(1);
        let mut seen = [false; 5];
        for _ in 0..1000 {
            let v = rng.below(5);
            assert!(v < 5);
            seen[v as usize] = true;
        }
        assert!(seen.iter().all(|&s| s));
        assert_eq!(rng.below(1), 0);
    }

    #[test]
    fn random_offsets_are_aligned_and_inside_the_file() {
        // 10 whole 4 KiB blocks and a partial one, which is never chosen.
        let size = 10 * 4096 + 100;
        let mut blocks = RandomBlocks::new(3, 4096, size).expect("blocks");
        let mut seen = [false; 10];
        for _ in 0..2000 {
            let offset = blocks.next_offset();
            assert_eq!(offset % 4096, 0);
            assert!(offset + 4096 <= size);
            seen[(offset / 4096) as usize] = true;
        }
        assert!(seen.iter().all(|&s| s));
        assert!(RandomBlocks::new(3, 4096, 4095).is_none());
        assert!(RandomBlocks::new(3, 0, 4096).is_none());
    }

    #[test]
    fn sequential_offsets_wrap_after_the_last_whole_block() {
        let mut seq = Sequential::new(1 << 20, (3 << 20) + 512).expect("blocks");
        let offsets: Vec<u64> = (0..5).map(|_| seq.next_offset()).collect();
        assert_eq!(offsets, [0, 1 << 20, 2 << 20, 0, 1 << 20]);
        assert!(Sequential::new(1 << 20, 1000).is_none());
    }

    #[test]
    fn fill_covers_odd_lengths() {
        let mut buf = [0u8; 13];
        Rng::new(5).fill(&mut buf);
        assert!(buf[8..].iter().any(|&b| b != 0));
    }
}
