//! Where Keel puts things in guest physical memory. Everything the VMM writes for booting
//! lives below 1 MiB, in RAM the e820 map marks as usable except the ACPI area, so a guest
//! may reuse it once it has read its boot data.

/// Boot GDT (used by the 64-bit Linux entry).
pub const BOOT_GDT_START: u64 = 0x500;
/// An empty IDT: interrupts stay off until the guest loads its own.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`, followed by its memory map.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH memory map entries (24 bytes each), after the start_info.
pub const PVH_MEMMAP_START: u64 = 0x6040;
/// Most e820 entries Keel ever builds.
pub const MAX_E820_ENTRIES: usize = 8;
/// PVH module list (the initrd, when there is one).
pub const PVH_MODLIST_START: u64 = 0x6100;
/// Linux `boot_params` ("zero page").
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Stack for the 64-bit Linux entry, below the page tables.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables for the 64-bit Linux entry: PML4, PDPT, PD.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line Keel passes (Linux's own limit on x86 is 2048 by default).
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Start of the extended BIOS data area: conventional RAM ends here.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables: RSDP first, where guests scan for it, then the rest.
pub const ACPI_START: u64 = 0xe0000;
pub const ACPI_END: u64 = 0x10_0000;
/// Kernels are loaded from here on.
pub const HIGH_MEMORY_START: u64 = 0x10_0000;
/// The 32-bit hole for devices, IO APIC and LAPIC: RAM beyond 3 GiB moves above 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// The ACPI generic event device (GED): one byte of pending events, read-to-clear, and the
/// IO APIC pin it interrupts on (the last; virtio devices use 5..=22).
pub const GED_MMIO_START: u64 = 0xcfff_f000;
pub const GED_MMIO_SIZE: u64 = 0x1000;
pub const GED_IRQ: u32 = 23;
/// GED event bit: the power button was pressed.
pub const GED_EVENT_POWER_BUTTON: u8 = 1;
/// virtio-mmio devices: one 4 KiB window each from here, in the 32-bit gap.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// Device i interrupts on IO APIC pin VIRTIO_IRQ_BASE + i.
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Pins 5..=22 of the IO APIC's 24 serve virtio devices.
pub const MAX_VIRTIO_DEVICES: usize = 18;
/// The in-kernel IO APIC and the local APICs.
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const LAPIC_START: u64 = 0xfee0_0000;
/// KVM needs three pages for the TSS (VMX real-mode emulation), just below the BIOS area.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;

/// ACPI fixed-hardware registers (I/O ports), described in the FADT.
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x3c0;
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x3c1;
pub const ACPI_RESET_PORT: u16 = 0x3c2;
/// Value the guest writes to the reset register to reboot.
pub const ACPI_RESET_VALUE: u8 = 0x1;
/// SLP_TYP the DSDT's `\_S5_` package announces for soft-off.
pub const ACPI_S5_SLEEP_TYPE: u8 = 5;

/// Where virtio-mmio device `index` lives and which interrupt it raises.
pub fn virtio_mmio_slot(index: usize) -> (u64, u32) {
    (
        VIRTIO_MMIO_START + index as u64 * VIRTIO_MMIO_SIZE,
        VIRTIO_IRQ_BASE + index as u32,
    )
}

/// Guest memory regions (start, size) for `mem_size` bytes of RAM: one below the 32-bit gap
/// and, past 3 GiB, the rest above 4 GiB.
pub fn ram_regions(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, mem_size - MMIO_GAP_START),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_below_the_gap_is_one_region() {
        assert_eq!(ram_regions(512 << 20), vec![(0, 512 << 20)]);
        assert_eq!(ram_regions(MMIO_GAP_START), vec![(0, MMIO_GAP_START)]);
    }

    #[test]
    fn ram_past_three_gib_moves_above_four_gib() {
        let r = ram_regions(5 << 30);
        assert_eq!(r, vec![(0, 3 << 30), (4 << 30, 2 << 30)]);
        assert_eq!(r.iter().map(|x| x.1).sum::<u64>(), 5 << 30);
    }

    #[test]
    fn boot_data_fits_below_the_ebda_and_does_not_overlap() {
        let spans = [
            (BOOT_GDT_START, 4 * 8),
            (BOOT_IDT_START, 8),
            (PVH_INFO_START, 0x40),
            (PVH_MEMMAP_START, 24 * MAX_E820_ENTRIES as u64),
            (PVH_MODLIST_START, 32),
            (ZERO_PAGE_START, 0x1000),
            (PML4_START, 0x3000),
            (CMDLINE_START, CMDLINE_MAX_SIZE as u64),
        ];
        for (i, a) in spans.iter().enumerate() {
            assert!(a.0 + a.1 <= EBDA_START);
            for b in &spans[i + 1..] {
                assert!(
                    a.0 + a.1 <= b.0 || b.0 + b.1 <= a.0,
                    "{a:x?} overlaps {b:x?}"
                );
            }
        }
    }
}
