//! Boot data for both x86 boot protocols: the e820 map, PVH `hvm_start_info` (32-bit PVH
//! entry) and Linux `boot_params` (64-bit Linux entry), and the command line.

use crate::GuestMemoryMmap;
use linux_loader::bootparam::{boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{Bytes, GuestAddress};

use crate::layout::*;
use crate::{Error, Result};

pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// PVH `hvm_start_info.magic`.
const PVH_START_MAGIC: u32 = 0x336e_c578;
/// `setup_header.boot_flag` and `.header` as a boot loader must leave them.
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
const HDRS_MAGIC: u32 = 0x5372_6448;
/// `type_of_loader`: "undefined" boot loader.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// `loadflags`: the kernel is loaded at 1 MiB.
const LOADED_HIGH: u8 = 0x1;

/// One e820 map entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The e820 map for `mem_size` bytes of guest RAM: conventional memory up to the EBDA, the
/// ACPI area reserved, RAM from 1 MiB to the 32-bit gap, and the rest above 4 GiB.
pub fn e820_map(mem_size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: ACPI_START,
            size: ACPI_END - ACPI_START,
            kind: E820_RESERVED,
        },
    ];
    for (start, size) in ram_regions(mem_size) {
        let (start, end) = (start.max(HIGH_MEMORY_START), start + size);
        if end > start {
            map.push(E820Entry {
                addr: start,
                size: end - start,
                kind: E820_RAM,
            });
        }
    }
    map
}

/// Where the initial ramdisk was placed.
#[derive(Debug, Clone, Copy)]
pub struct InitrdPlacement {
    pub addr: u64,
    pub size: u64,
}

fn write<T: vm_memory::ByteValued>(
    mem: &GuestMemoryMmap,
    what: &'static str,
    addr: u64,
    value: T,
) -> Result<()> {
    mem.write_obj(value, GuestAddress(addr))
        .map_err(|source| Error::GuestMemory { what, addr, source })
}

/// Writes the NUL-terminated command line at [`CMDLINE_START`].
pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<()> {
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    if bytes.len() > CMDLINE_MAX_SIZE {
        return Err(Error::CmdlineTooLong {
            len: cmdline.len(),
            max: CMDLINE_MAX_SIZE - 1,
        });
    }
    mem.write_slice(&bytes, GuestAddress(CMDLINE_START))
        .map_err(|source| Error::GuestMemory {
            what: "the command line",
            addr: CMDLINE_START,
            source,
        })
}

/// Writes `hvm_start_info`, its memory map and module list for the PVH entry.
pub fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    initrd: Option<InitrdPlacement>,
) -> Result<()> {
    let map = e820_map(mem_size);
    for (i, e) in map.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        };
        write(
            mem,
            "the PVH memory map",
            PVH_MEMMAP_START + 24 * i as u64,
            entry,
        )?;
    }
    let mut info = hvm_start_info {
        magic: PVH_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: ACPI_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    if let Some(rd) = initrd {
        let module = hvm_modlist_entry {
            paddr: rd.addr,
            size: rd.size,
            ..Default::default()
        };
        write(mem, "the PVH module list", PVH_MODLIST_START, module)?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START;
    }
    write(mem, "the PVH start_info", PVH_INFO_START, info)
}

/// Writes Linux `boot_params` for the 64-bit entry. `header` is the bzImage's setup header;
/// `None` for an ELF kernel entered at its 64-bit entry point.
pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    header: Option<setup_header>,
    cmdline_len: usize,
    initrd: Option<InitrdPlacement>,
) -> Result<()> {
    let mut params = boot_params::default();
    let mut hdr = header.unwrap_or_default();
    hdr.boot_flag = BOOT_FLAG_MAGIC;
    hdr.header = HDRS_MAGIC;
    hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    hdr.loadflags |= LOADED_HIGH;
    hdr.cmd_line_ptr = CMDLINE_START as u32;
    hdr.cmdline_size = cmdline_len as u32;
    if header.is_none() {
        hdr.kernel_alignment = 0x100_0000;
    }
    if let Some(rd) = initrd {
        hdr.ramdisk_image = rd.addr as u32;
        hdr.ramdisk_size = rd.size as u32;
    }
    params.hdr = hdr;
    params.acpi_rsdp_addr = ACPI_START;
    let map = e820_map(mem_size);
    for (slot, e) in params.e820_table.iter_mut().zip(map.iter()) {
        slot.addr = e.addr;
        slot.size = e.size;
        slot.r#type = e.kind;
    }
    params.e820_entries = map.len() as u8;
    write(mem, "Linux boot_params", ZERO_PAGE_START, params)
}

/// Highest address (exclusive) an initrd may end at: the top of RAM below the 32-bit gap,
/// since `ramdisk_image` is a 32-bit field.
pub fn initrd_ceiling(mem_size: u64) -> u64 {
    mem_size.min(MMIO_GAP_START)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GuestMemoryMmap;

    fn memory(size: u64) -> GuestMemoryMmap {
        let ranges: Vec<_> = ram_regions(size)
            .into_iter()
            .map(|(s, l)| (GuestAddress(s), l as usize))
            .collect();
        GuestMemoryMmap::from_ranges(&ranges).unwrap()
    }

    fn ram(map: &[E820Entry]) -> u64 {
        map.iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum()
    }

    #[test]
    fn e820_covers_all_ram_but_the_legacy_hole() {
        let legacy_hole = HIGH_MEMORY_START - EBDA_START;
        for mib in [16u64, 128, 3072, 4096, 6000] {
            let size = mib << 20;
            let map = e820_map(size);
            assert_eq!(ram(&map), size - legacy_hole, "{mib} MiB");
            assert!(map.len() <= MAX_E820_ENTRIES);
            for e in &map {
                let end = e.addr + e.size;
                assert!(
                    end <= MMIO_GAP_START || e.addr >= MMIO_GAP_END,
                    "{e:x?} crosses the gap"
                );
            }
        }
    }

    #[test]
    fn e820_reserves_the_acpi_area() {
        let map = e820_map(64 << 20);
        assert!(map.contains(&E820Entry {
            addr: ACPI_START,
            size: ACPI_END - ACPI_START,
            kind: E820_RESERVED
        }));
    }

    #[test]
    fn pvh_start_info_points_at_map_cmdline_and_rsdp() {
        let mem = memory(64 << 20);
        let rd = InitrdPlacement {
            addr: 0x300_0000,
            size: 0x1234,
        };
        write_pvh_start_info(&mem, 64 << 20, Some(rd)).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(info.magic, PVH_START_MAGIC);
        assert_eq!(info.cmdline_paddr, CMDLINE_START);
        assert_eq!(info.rsdp_paddr, ACPI_START);
        assert_eq!(info.memmap_entries as usize, e820_map(64 << 20).len());
        assert_eq!(info.nr_modules, 1);
        let first: hvm_memmap_table_entry = mem.read_obj(GuestAddress(PVH_MEMMAP_START)).unwrap();
        assert_eq!(
            (first.addr, first.size, first.type_),
            (0, EBDA_START, E820_RAM)
        );
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(PVH_MODLIST_START)).unwrap();
        assert_eq!((module.paddr, module.size), (rd.addr, rd.size));
    }

    #[test]
    fn boot_params_carry_header_cmdline_initrd_and_e820() {
        let mem = memory(256 << 20);
        let header = setup_header {
            setup_sects: 4,
            version: 0x20f,
            ..Default::default()
        };
        let rd = InitrdPlacement {
            addr: 0x800_0000,
            size: 4096,
        };
        write_boot_params(&mem, 256 << 20, Some(header), 13, Some(rd)).unwrap();
        let p: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        let hdr = p.hdr;
        let (boot_flag, magic, sects) = (hdr.boot_flag, hdr.header, hdr.setup_sects);
        assert_eq!((boot_flag, magic, sects), (BOOT_FLAG_MAGIC, HDRS_MAGIC, 4));
        let (cmd_ptr, cmd_size) = (hdr.cmd_line_ptr, hdr.cmdline_size);
        assert_eq!((cmd_ptr as u64, cmd_size), (CMDLINE_START, 13));
        let (rd_image, rd_size) = (hdr.ramdisk_image, hdr.ramdisk_size);
        assert_eq!((rd_image, rd_size), (0x800_0000, 4096));
        let acpi = p.acpi_rsdp_addr;
        assert_eq!(acpi, ACPI_START);
        let map = e820_map(256 << 20);
        assert_eq!(p.e820_entries as usize, map.len());
        let last = p.e820_table[map.len() - 1];
        let (addr, size) = (last.addr, last.size);
        assert_eq!(
            (addr, size),
            (HIGH_MEMORY_START, (256 << 20) - HIGH_MEMORY_START)
        );
    }

    #[test]
    fn overlong_cmdline_is_refused() {
        let mem = memory(16 << 20);
        let long = "x".repeat(CMDLINE_MAX_SIZE);
        assert!(matches!(
            write_cmdline(&mem, &long),
            Err(Error::CmdlineTooLong { .. })
        ));
        write_cmdline(&mem, "console=ttyS0").unwrap();
        let mut buf = [0u8; 14];
        mem.read_slice(&mut buf, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&buf, b"console=ttyS0\0");
    }
}
