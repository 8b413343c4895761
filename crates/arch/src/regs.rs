//! Initial vCPU state: general and segment registers, the boot GDT and identity-mapping page
//! tables, FPU, MSRs and the local APIC's LINT pins.

use crate::GuestMemoryMmap;
use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use crate::layout::*;
use crate::{Error, Result};

/// How the guest is entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootEntry {
    /// PVH: 32-bit protected mode, paging off, EBX = `hvm_start_info`.
    Pvh { entry: u64 },
    /// Linux 64-bit boot protocol: long mode, identity-mapped, RSI = `boot_params`.
    Linux64 { entry: u64 },
}

const CR0_PE: u64 = 1 << 0;
const CR0_ET: u64 = 1 << 4;
const CR0_NW: u64 = 1 << 29;
const CR0_CD: u64 = 1 << 30;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Page-table entry bits.
const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_HUGE: u64 = 1 << 7;

const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// MTRRs enabled, default memory type write-back.
const MTRR_ENABLE_WRITE_BACK: u64 = (1 << 11) | 6;

const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Boot GDT selectors.
const GDT_CODE: u16 = 0x08;
const GDT_DATA: u16 = 0x10;
const GDT_TSS: u16 = 0x18;

/// A GDT descriptor from flags, base and limit (the layout of the x86 segment descriptor).
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
}

/// The four GDT entries: null, code, data, TSS. The code segment is 64-bit for the Linux
/// entry and 32-bit for PVH.
fn gdt_table(entry: BootEntry) -> [u64; 4] {
    let code_flags = match entry {
        BootEntry::Pvh { .. } => 0xc09b,
        BootEntry::Linux64 { .. } => 0xa09b,
    };
    [
        0,
        gdt_entry(code_flags, 0, 0xfffff),
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
    ]
}

/// The `kvm_segment` KVM needs for a GDT descriptor, as the CPU would have cached it.
fn segment_from_gdt(entry: u64, selector: u16) -> kvm_segment {
    let limit = ((entry & 0x000f_0000_0000_0000) >> 32) as u32 | (entry & 0xffff) as u32;
    let granular = (entry >> 55) & 1 == 1;
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if granular {
            (limit << 12) | 0xfff
        } else {
            limit
        },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granular as u8,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

fn write_u64s(mem: &GuestMemoryMmap, what: &'static str, addr: u64, values: &[u64]) -> Result<()> {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    mem.write_slice(&bytes, GuestAddress(addr))
        .map_err(|source| Error::GuestMemory { what, addr, source })
}

/// Writes the boot GDT, an empty IDT and, for the Linux entry, page tables that identity-map
/// the first GiB with 2 MiB pages. Done once per VM, before any vCPU runs.
pub fn write_boot_tables(mem: &GuestMemoryMmap, entry: BootEntry) -> Result<()> {
    write_u64s(mem, "the boot GDT", BOOT_GDT_START, &gdt_table(entry))?;
    write_u64s(mem, "the boot IDT", BOOT_IDT_START, &[0])?;
    if let BootEntry::Linux64 { .. } = entry {
        write_u64s(
            mem,
            "the PML4",
            PML4_START,
            &[PDPTE_START | PTE_PRESENT | PTE_WRITABLE],
        )?;
        write_u64s(
            mem,
            "the PDPT",
            PDPTE_START,
            &[PDE_START | PTE_PRESENT | PTE_WRITABLE],
        )?;
        let pd: Vec<u64> = (0..512u64)
            .map(|i| (i << 21) | PTE_PRESENT | PTE_WRITABLE | PTE_HUGE)
            .collect();
        write_u64s(mem, "the page directory", PDE_START, &pd)?;
    }
    Ok(())
}

fn kvm_err(what: &'static str, vcpu: u32) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, vcpu, source }
}

/// Special registers for the boot entry, starting from what KVM reset the vCPU to.
pub fn boot_sregs(mut sregs: kvm_sregs, entry: BootEntry) -> kvm_sregs {
    let gdt = gdt_table(entry);
    let code = segment_from_gdt(gdt[1], GDT_CODE);
    let data = segment_from_gdt(gdt[2], GDT_DATA);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(gdt[3], GDT_TSS);
    sregs.cr0 = (sregs.cr0 & !(CR0_CD | CR0_NW | CR0_PG)) | CR0_PE | CR0_ET;
    match entry {
        BootEntry::Pvh { .. } => {
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        BootEntry::Linux64 { .. } => {
            sregs.cr3 = PML4_START;
            sregs.cr4 |= CR4_PAE;
            sregs.cr0 |= CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
    }
    sregs
}

/// General registers for the boot entry.
pub fn boot_regs(entry: BootEntry) -> kvm_regs {
    match entry {
        BootEntry::Pvh { entry } => kvm_regs {
            rflags: 0x2,
            rip: entry,
            rbx: PVH_INFO_START,
            ..Default::default()
        },
        BootEntry::Linux64 { entry } => kvm_regs {
            rflags: 0x2,
            rip: entry,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: ZERO_PAGE_START,
            ..Default::default()
        },
    }
}

/// Puts the boot vCPU at the kernel's entry.
pub fn setup_boot_registers(vcpu: &VcpuFd, id: u32, entry: BootEntry) -> Result<()> {
    let sregs = vcpu.get_sregs().map_err(kvm_err("special registers", id))?;
    vcpu.set_sregs(&boot_sregs(sregs, entry))
        .map_err(kvm_err("special registers", id))?;
    vcpu.set_regs(&boot_regs(entry))
        .map_err(kvm_err("registers", id))
}

/// x87 control word and MXCSR at their architectural reset values.
pub fn setup_fpu(vcpu: &VcpuFd, id: u32) -> Result<()> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm_err("FPU state", id))
}

/// MSRs a firmware would have set: fast string operations on, MTRRs on with write-back.
pub fn setup_msrs(vcpu: &VcpuFd, id: u32) -> Result<()> {
    let entries = [
        kvm_msr_entry {
            index: MSR_IA32_MISC_ENABLE,
            data: MISC_ENABLE_FAST_STRING,
            ..Default::default()
        },
        kvm_msr_entry {
            index: MSR_MTRR_DEF_TYPE,
            data: MTRR_ENABLE_WRITE_BACK,
            ..Default::default()
        },
    ];
    let msrs = Msrs::from_entries(&entries).map_err(|e| Error::Cpuid(format!("{e:?}")))?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm_err("boot MSRs", id))?;
    if set != entries.len() {
        return Err(Error::MsrsPartial {
            vcpu: id,
            set,
            wanted: entries.len(),
        });
    }
    Ok(())
}

fn set_lvt_mode(regs: &mut [std::os::raw::c_char], offset: usize, mode: u32) {
    let mut bytes = [0u8; 4];
    for (b, r) in bytes.iter_mut().zip(&regs[offset..offset + 4]) {
        *b = *r as u8;
    }
    let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
    for (r, b) in regs[offset..offset + 4].iter_mut().zip(value.to_le_bytes()) {
        *r = b as std::os::raw::c_char;
    }
}

/// LINT0 delivers ExtINT (the legacy PIC) and LINT1 NMI, as on a PC.
pub fn setup_lapic(vcpu: &VcpuFd, id: u32) -> Result<()> {
    let mut lapic = vcpu.get_lapic().map_err(kvm_err("local APIC", id))?;
    set_lvt_mode(&mut lapic.regs, APIC_LVT_LINT0, APIC_MODE_EXTINT);
    set_lvt_mode(&mut lapic.regs, APIC_LVT_LINT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic).map_err(kvm_err("local APIC", id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        let gdt = gdt_table(BootEntry::Linux64 { entry: 0 });
        assert_eq!(gdt[1], 0x00af_9b00_0000_ffff);
        let code = segment_from_gdt(gdt[1], GDT_CODE);
        assert_eq!(
            (code.base, code.limit, code.l, code.db, code.type_),
            (0, 0xffff_ffff, 1, 0, 0xb)
        );
        let pvh = segment_from_gdt(gdt_table(BootEntry::Pvh { entry: 0 })[1], GDT_CODE);
        assert_eq!((pvh.l, pvh.db, pvh.present, pvh.s), (0, 1, 1, 1));
        let tss = segment_from_gdt(gdt[3], GDT_TSS);
        assert_eq!((tss.type_, tss.s), (0xb, 0));
    }

    #[test]
    fn pvh_starts_in_protected_mode_without_paging() {
        let s = boot_sregs(
            kvm_sregs {
                cr0: 0x6000_0010,
                ..Default::default()
            },
            BootEntry::Pvh { entry: 0 },
        );
        assert_eq!(s.cr0, CR0_PE | CR0_ET);
        assert_eq!((s.cr4, s.efer), (0, 0));
        let r = boot_regs(BootEntry::Pvh { entry: 0x10_0000 });
        assert_eq!((r.rip, r.rbx), (0x10_0000, PVH_INFO_START));
    }

    #[test]
    fn linux64_starts_in_long_mode_with_boot_params() {
        let s = boot_sregs(kvm_sregs::default(), BootEntry::Linux64 { entry: 0 });
        assert_ne!(s.cr0 & CR0_PG, 0);
        assert_ne!(s.cr4 & CR4_PAE, 0);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.cr3, PML4_START);
        let r = boot_regs(BootEntry::Linux64 { entry: 0x10_0200 });
        assert_eq!((r.rip, r.rsi), (0x10_0200, ZERO_PAGE_START));
    }

    #[test]
    fn page_tables_identity_map_the_first_gib() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        write_boot_tables(&mem, BootEntry::Linux64 { entry: 0 }).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4 & !0xfff, PDPTE_START);
        let last: u64 = mem.read_obj(GuestAddress(PDE_START + 511 * 8)).unwrap();
        assert_eq!(last & !0xfff, 511 << 21);
        assert_ne!(last & PTE_HUGE, 0);
    }

    #[test]
    fn lvt_mode_changes_only_the_delivery_mode() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        regs[APIC_LVT_LINT0] = 0x10u8 as std::os::raw::c_char;
        regs[APIC_LVT_LINT0 + 2] = 0x1;
        set_lvt_mode(&mut regs, APIC_LVT_LINT0, APIC_MODE_EXTINT);
        let bytes: Vec<u8> = regs[APIC_LVT_LINT0..APIC_LVT_LINT0 + 4]
            .iter()
            .map(|b| *b as u8)
            .collect();
        assert_eq!(u32::from_le_bytes(bytes.try_into().unwrap()), 0x0001_0710);
    }
}
