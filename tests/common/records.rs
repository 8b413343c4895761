//! The probe's disk records (guest/probe/README.md): record i at sector i, "KEELREC1", the
//! index, a payload derived from i, and an FNV-1a hash of the first 504 bytes.

pub const RECORD_BYTES: usize = 512;

fn fnv1a64(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The record the probe writes at index `i`.
pub fn record(i: u64) -> Vec<u8> {
    let mut r = Vec::with_capacity(RECORD_BYTES);
    r.extend_from_slice(b"KEELREC1");
    r.extend_from_slice(&i.to_le_bytes());
    r.extend((0..488u64).map(|j| (i.wrapping_mul(31).wrapping_add(j * 7) & 0xff) as u8));
    let hash = fnv1a64(&r);
    r.extend_from_slice(&hash.to_le_bytes());
    r
}

/// Indices in `range` whose sector in `image` is not the expected record.
#[allow(dead_code)] // not every test that includes this module uses it
pub fn bad_records(image: &[u8], range: std::ops::Range<u64>) -> Vec<u64> {
    bad_spread_records(image, range, 1)
}

/// [`bad_records`] for records written `spread` sectors apart (`probe.blk_spread`).
pub fn bad_spread_records(image: &[u8], range: std::ops::Range<u64>, spread: u64) -> Vec<u64> {
    range
        .filter(|&i| {
            let start = (i * spread) as usize * RECORD_BYTES;
            image.get(start..start + RECORD_BYTES) != Some(record(i).as_slice())
        })
        .collect()
}

/// Indices of `PROBE acked N` lines, in order. A last line without its newline was cut by
/// the kill mid-print ("PROBE acked 1" of "PROBE acked 100"): it does not count.
pub fn acked(stdout: &str) -> Vec<u64> {
    let complete = match stdout.rfind('\n') {
        Some(end) => &stdout[..=end],
        None => "",
    };
    complete
        .lines()
        .filter_map(|l| l.strip_prefix("PROBE acked "))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}
