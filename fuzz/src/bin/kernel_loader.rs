//! Fuzz target: the kernel loader on kernels a guest's disk supplies (disk boot hands the
//! loader whatever the disk's kernel file holds): format sniffing, linux-loader's ELF (with
//! its PVH note) and bzImage parsers, Keel's checks of the 64-bit entry and of `init_size`,
//! and the initrd's placement. Guest memory is exactly as large as the VM's, as in the VMM.
//! Besides "no panic, no hang": a loaded kernel ends within guest memory, and an initrd lies
//! above the kernel, page-aligned, below the 32-bit gap.
//!
//! Input: `flags: u8` (bits 0-1: guest memory of 8, 16, 32 or 64 MiB; bit 2: an initrd),
//! `kernel_len: u32` (at most 1 MiB), the kernel's bytes, the initrd's bytes (the rest).

#![no_main]

use std::sync::OnceLock;

use arch::GuestMemoryMmap;
use keel_fuzz::{Encoder, Input, Seed};
use vm_memory::GuestAddress;

libfuzzer_sys::fuzz_target!(
    init: keel_fuzz::write_seeds("kernel_loader", seeds, run),
    |data: &[u8]| {
        run(data);
    }
);

const SIZES_MIB: [u64; 4] = [8, 16, 32, 64];
/// Where the 32-bit gap starts (arch::layout::MMIO_GAP_START).
const GAP: u64 = 3 << 30;

fn memory(index: usize) -> &'static GuestMemoryMmap {
    static MEMS: [OnceLock<GuestMemoryMmap>; 4] = [const { OnceLock::new() }; 4];
    MEMS[index].get_or_init(|| {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (SIZES_MIB[index] << 20) as usize)])
            .expect("guest memory")
    })
}

/// What the loader made of the input: the kernel's end and the initrd's (address, size), or
/// that it refused.
#[derive(Debug, PartialEq)]
enum Outcome {
    Loaded {
        end: u64,
        initrd: Option<(u64, u64)>,
    },
    Refused,
}

fn run(data: &[u8]) -> Outcome {
    let mut input = Input::new(data);
    let flags = input.u8();
    let index = usize::from(flags & 3);
    let mem_size = SIZES_MIB[index] << 20;
    let kernel_len = (input.u32() as usize).min(1 << 20);
    let kernel = input.bytes(kernel_len);
    let initrd = (flags & 4 != 0).then(|| input.rest());
    match vmm::loader::fuzz_load(memory(index), mem_size, kernel, initrd) {
        Ok((end, placed)) => {
            assert!(
                end <= mem_size,
                "kernel ends at {end:#x}, memory {mem_size:#x}"
            );
            if let Some((addr, size)) = placed {
                assert!(
                    addr >= end,
                    "initrd {addr:#x} under the kernel's end {end:#x}"
                );
                assert_eq!(addr & 0xfff, 0, "initrd not page-aligned");
                assert!(addr + size <= mem_size.min(GAP), "initrd past memory");
            }
            Outcome::Loaded {
                end,
                initrd: placed,
            }
        }
        Err(_) => Outcome::Refused,
    }
}

/// A 64-bit ELF executable with one loadable segment of `code` at 1 MiB, entered there,
/// `memsz` bytes long in memory.
fn tiny_elf(code: &[u8], memsz: u64) -> Vec<u8> {
    let mut e = Encoder::new();
    // e_ident: magic, 64-bit, little-endian, version 1, System V.
    e.bytes(b"\x7fELF").u8(2).u8(1).u8(1).u8(0).bytes(&[0; 8]);
    // e_type EXEC, e_machine x86-64, e_version, e_entry, e_phoff, e_shoff, e_flags.
    e.u16(2)
        .u16(0x3e)
        .u32(1)
        .u64(0x10_0000)
        .u64(64)
        .u64(0)
        .u32(0);
    // e_ehsize, e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx.
    e.u16(64).u16(56).u16(1).u16(0).u16(0).u16(0);
    // PT_LOAD, flags R+X, offset, vaddr, paddr, filesz, memsz, align.
    let len = code.len() as u64;
    e.u32(1)
        .u32(5)
        .u64(0x1000)
        .u64(0x10_0000)
        .u64(0x10_0000)
        .u64(len)
        .u64(memsz)
        .u64(0x1000);
    let mut bytes = e.finish();
    bytes.resize(0x1000, 0);
    bytes.extend_from_slice(code);
    bytes
}

fn input(flags: u8, kernel: &[u8], initrd: &[u8]) -> Vec<u8> {
    let mut e = Encoder::new();
    e.u8(flags)
        .u32(kernel.len() as u32)
        .bytes(kernel)
        .bytes(initrd);
    e.finish()
}

fn seeds() -> Vec<Seed<Outcome>> {
    let elf = tiny_elf(&[0xf4; 16], 16);
    // Found by this target: a segment whose size in memory runs far past guest memory (the
    // loader reported an end it never wrote); refused as too large.
    let past = tiny_elf(&[0xf4; 16], 0xffff_ffff_0000_0000);
    let mut bz = vec![0u8; 0x400];
    bz[0x202..0x206].copy_from_slice(b"HdrS");
    vec![
        Seed {
            name: "tiny_elf",
            input: input(0, &elf, &[]),
            expect: Outcome::Loaded {
                end: 0x10_0010,
                initrd: None,
            },
        },
        Seed {
            name: "tiny_elf_and_initrd",
            input: input(4 | 1, &elf, &[0xaa; 5000]),
            expect: Outcome::Loaded {
                end: 0x10_0010,
                initrd: Some(((16 << 20) - 0x2000, 5000)),
            },
        },
        Seed {
            name: "elf_memsz_past_memory",
            input: input(0, &past, &[]),
            expect: Outcome::Refused,
        },
        Seed {
            name: "bzimage_header_only",
            input: input(2, &bz, &[]),
            expect: Outcome::Refused,
        },
        Seed {
            name: "neither",
            input: input(3, b"MZ not a kernel", &[]),
            expect: Outcome::Refused,
        },
    ]
}
