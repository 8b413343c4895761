//! ACPI tables: RSDP, XSDT, FADT (hardware-reduced, with sleep control and reset registers),
//! MADT (one local APIC per vCPU and the IO APIC) and a DSDT with `\_S5_` (so `poweroff`
//! reaches the VMM), COM1 and the CMOS RTC. Built with the `acpi_tables` crate.

use crate::GuestMemoryMmap;
use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress};

use crate::layout::*;
use crate::{Error, Result};

const OEM_ID: [u8; 6] = *b"KEEL  ";
const OEM_TABLE_ID: [u8; 8] = *b"KEELVMM ";
const OEM_REVISION: u32 = 1;
/// FADT `IAPC_BOOT_ARCH`: an 8042 is present, no VGA.
const BOOT_ARCH_8042: u16 = 1 << 1;
const BOOT_ARCH_NO_VGA: u16 = 1 << 2;
/// ISA IRQ of COM1.
pub const COM1_IRQ: u32 = 4;

/// A table and where it goes.
struct Placed {
    addr: u64,
    bytes: Vec<u8>,
}

fn align16(addr: u64) -> u64 {
    (addr + 15) & !15
}

fn dsdt(virtio: &[VirtioSlot]) -> Vec<u8> {
    let s5_package = aml::Package::new(vec![&ACPI_S5_SLEEP_TYPE]);
    let s5 = aml::Name::new("_S5_".into(), &s5_package);

    let com1_hid = aml::EISAName::new("PNP0501");
    let com1_irq = aml::Interrupt::new(true, true, false, false, COM1_IRQ);
    let com1_io = aml::IO::new(0x3f8, 0x3f8, 0, 8);
    let com1_resources = aml::ResourceTemplate::new(vec![&com1_irq, &com1_io]);
    let com1_hid_name = aml::Name::new("_HID".into(), &com1_hid);
    let com1_uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let com1_crs = aml::Name::new("_CRS".into(), &com1_resources);
    let com1 = aml::Device::new(
        "_SB_.COM1".into(),
        vec![&com1_hid_name, &com1_uid, &com1_crs],
    );

    let rtc_hid = aml::EISAName::new("PNP0B00");
    let rtc_io = aml::IO::new(0x70, 0x70, 0, 2);
    let rtc_resources = aml::ResourceTemplate::new(vec![&rtc_io]);
    let rtc_hid_name = aml::Name::new("_HID".into(), &rtc_hid);
    let rtc_crs = aml::Name::new("_CRS".into(), &rtc_resources);
    let rtc = aml::Device::new("_SB_.RTC_".into(), vec![&rtc_hid_name, &rtc_crs]);

    let power_button = power_button_devices();
    let mut table = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    table.append_slice(&power_button);
    for object in [&s5 as &dyn Aml, &com1, &rtc] {
        object.to_aml_bytes(&mut table);
    }
    for (index, slot) in virtio.iter().enumerate() {
        table.append_slice(&virtio_device(index, slot));
    }
    table.update_checksum();
    table.as_slice().to_vec()
}

/// The power button (PNP0C0C) and the generic event device (ACPI0013) that signals it: on
/// the GED's interrupt the OS runs `_EVT`, which reads the pending events from the GED's
/// register (reading clears them) and notifies the button for a press.
fn power_button_devices() -> Vec<u8> {
    let button_hid = aml::EISAName::new("PNP0C0C");
    let button_hid_name = aml::Name::new("_HID".into(), &button_hid);
    let button_uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let button = aml::Device::new("_SB_.PWRB".into(), vec![&button_hid_name, &button_uid]);

    let ged_hid = aml::Name::new("_HID".into(), &"ACPI0013");
    let ged_uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let ged_irq = aml::Interrupt::new(true, true, false, false, GED_IRQ);
    let ged_resources = aml::ResourceTemplate::new(vec![&ged_irq]);
    let ged_crs = aml::Name::new("_CRS".into(), &ged_resources);
    let region_start = GED_MMIO_START as u32;
    let region_len = 1u8;
    let region = aml::OpRegion::new(
        "GDST".into(),
        aml::OpRegionSpace::SystemMemory,
        &region_start,
        &region_len,
    );
    let field = aml::Field::new(
        "GDST".into(),
        aml::FieldAccessType::Byte,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::WriteAsZeroes,
        vec![aml::FieldEntry::Named(*b"GDAT", 8)],
    );
    let events = aml::Local(0);
    let pressed = aml::Local(1);
    let register = aml::Path::new("GDAT");
    let read_events = aml::Store::new(&events, &register);
    let button_bit = GED_EVENT_POWER_BUTTON;
    let mask = aml::And::new(&pressed, &events, &button_bit);
    let was_pressed = aml::Equal::new(&pressed, &button_bit);
    let button_path = aml::Path::new("\\_SB_.PWRB");
    let notify_value = 0x80u8;
    let notify = aml::Notify::new(&button_path, &notify_value);
    let if_pressed = aml::If::new(&was_pressed, vec![&notify]);
    let evt = aml::Method::new(
        "_EVT".into(),
        1,
        true,
        vec![&read_events, &mask, &if_pressed],
    );
    let ged = aml::Device::new(
        "_SB_.GED0".into(),
        vec![&ged_hid, &ged_uid, &ged_crs, &region, &field, &evt],
    );
    let mut bytes = Vec::new();
    button.to_aml_bytes(&mut bytes);
    ged.to_aml_bytes(&mut bytes);
    bytes
}

/// A virtio-mmio device for the guest: its register window and interrupt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioSlot {
    pub base: u64,
    pub size: u64,
    pub irq: u32,
}

/// `Device (\_SB.VRnn)` with the virtio-mmio `_HID` Linux binds to, its window and IRQ.
fn virtio_device(index: usize, slot: &VirtioSlot) -> Vec<u8> {
    let name = format!("_SB_.VR{index:02}");
    let hid = aml::Name::new("_HID".into(), &"LNRO0005");
    let uid_value = index as u32;
    let uid = aml::Name::new("_UID".into(), &uid_value);
    let window = aml::Memory32Fixed::new(true, slot.base as u32, slot.size as u32);
    let irq = aml::Interrupt::new(true, true, false, false, slot.irq);
    let resources = aml::ResourceTemplate::new(vec![&window, &irq]);
    let crs = aml::Name::new("_CRS".into(), &resources);
    let device = aml::Device::new(name.as_str().into(), vec![&hid, &uid, &crs]);
    let mut bytes = Vec::new();
    device.to_aml_bytes(&mut bytes);
    bytes
}

fn io_register(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        port.into(),
    )
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton);
    fadt.sleep_control_reg = io_register(ACPI_SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = io_register(ACPI_SLEEP_STATUS_PORT);
    fadt.reset_reg = io_register(ACPI_RESET_PORT);
    fadt.reset_value = ACPI_RESET_VALUE;
    fadt.iapc_boot_arch = (BOOT_ARCH_8042 | BOOT_ARCH_NO_VGA).into();
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(*b"KEELVMM\0").into();
    let mut bytes = Vec::new();
    fadt.finalize().to_aml_bytes(&mut bytes);
    bytes
}

fn madt(cpus: u8) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_START as u32),
    );
    for id in 0..cpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, IOAPIC_START as u32, 0));
    let mut bytes = Vec::new();
    madt.to_aml_bytes(&mut bytes);
    bytes
}

/// Builds every table for a VM with `cpus` vCPUs, placed from [`ACPI_START`].
fn build(cpus: u8, virtio: &[VirtioSlot]) -> Vec<Placed> {
    let mut next = align16(ACPI_START + Rsdp::len() as u64);
    let mut place = |bytes: Vec<u8>| {
        let addr = next;
        next = align16(addr + bytes.len() as u64);
        Placed { addr, bytes }
    };
    let dsdt = place(dsdt(virtio));
    let fadt = place(fadt(dsdt.addr));
    let madt = place(madt(cpus));
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt.addr);
    xsdt.add_entry(madt.addr);
    let mut xsdt_bytes = Vec::new();
    xsdt.to_aml_bytes(&mut xsdt_bytes);
    let xsdt = place(xsdt_bytes);
    let mut rsdp = Vec::new();
    Rsdp::new(OEM_ID, xsdt.addr).to_aml_bytes(&mut rsdp);
    vec![
        Placed {
            addr: ACPI_START,
            bytes: rsdp,
        },
        xsdt,
        fadt,
        madt,
        dsdt,
    ]
}

/// Writes the ACPI tables for `cpus` vCPUs and the virtio devices into guest memory.
pub fn write_tables(mem: &GuestMemoryMmap, cpus: u8, virtio: &[VirtioSlot]) -> Result<()> {
    let tables = build(cpus, virtio);
    let end = tables
        .iter()
        .map(|t| t.addr + t.bytes.len() as u64)
        .max()
        .unwrap_or(ACPI_START);
    if end > ACPI_END {
        return Err(Error::AcpiTooLarge {
            needed: (end - ACPI_START) as usize,
            room: (ACPI_END - ACPI_START) as usize,
        });
    }
    for t in tables {
        mem.write_slice(&t.bytes, GuestAddress(t.addr))
            .map_err(|source| Error::GuestMemory {
                what: "ACPI tables",
                addr: t.addr,
                source,
            })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    fn by_sig<'a>(tables: &'a [Placed], sig: &[u8]) -> &'a Placed {
        tables
            .iter()
            .find(|t| &t.bytes[..sig.len()] == sig)
            .unwrap()
    }

    #[test]
    fn every_table_checksums_to_zero_and_has_its_length() {
        let tables = build(4, &[]);
        let rsdp = &tables[0];
        assert_eq!(&rsdp.bytes[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp.bytes[..20]), 0);
        assert_eq!(sum(&rsdp.bytes), 0);
        for t in &tables[1..] {
            assert_eq!(sum(&t.bytes), 0, "{:?}", std::str::from_utf8(&t.bytes[..4]));
            assert_eq!(u32_at(&t.bytes, 4) as usize, t.bytes.len());
        }
    }

    #[test]
    fn rsdp_xsdt_and_fadt_point_at_each_other() {
        let tables = build(2, &[]);
        let xsdt = by_sig(&tables, b"XSDT");
        assert_eq!(u64_at(&tables[0].bytes, 24), xsdt.addr);
        let entries: Vec<u64> = (36..xsdt.bytes.len())
            .step_by(8)
            .map(|o| u64_at(&xsdt.bytes, o))
            .collect();
        assert_eq!(
            entries,
            vec![by_sig(&tables, b"FACP").addr, by_sig(&tables, b"APIC").addr]
        );
        let fadt = &by_sig(&tables, b"FACP").bytes;
        assert_eq!(u64_at(fadt, 140), by_sig(&tables, b"DSDT").addr, "X_DSDT");
        assert_ne!(u32_at(fadt, 112) & Flags::HwReducedAcpi as u32, 0);
        // SLEEP_CONTROL_REG at 244: I/O space, 8 bits, at our port.
        assert_eq!(fadt[244], 1);
        assert_eq!(u64_at(fadt, 248), ACPI_SLEEP_CONTROL_PORT as u64);
        // RESET_REG at 116 and RESET_VALUE at 128.
        assert_eq!(u64_at(fadt, 120), ACPI_RESET_PORT as u64);
        assert_eq!(fadt[128], ACPI_RESET_VALUE);
    }

    #[test]
    fn madt_lists_every_cpu_and_the_ioapic() {
        for cpus in [1u8, 4, 32] {
            let tables = build(cpus, &[]);
            let madt = &by_sig(&tables, b"APIC").bytes;
            let mut ids = Vec::new();
            let mut ioapics = 0;
            let mut off = 44;
            while off < madt.len() {
                let (kind, len) = (madt[off], madt[off + 1] as usize);
                match kind {
                    0 => ids.push(madt[off + 3]),
                    1 => {
                        ioapics += 1;
                        assert_eq!(u32_at(madt, off + 4) as u64, IOAPIC_START);
                    }
                    _ => panic!("unexpected MADT entry {kind}"),
                }
                off += len;
            }
            assert_eq!(ids, (0..cpus).collect::<Vec<_>>());
            assert_eq!(ioapics, 1);
        }
    }

    #[test]
    fn dsdt_announces_s5() {
        let tables = build(1, &[]);
        let dsdt = &by_sig(&tables, b"DSDT").bytes;
        let at = dsdt.windows(4).position(|w| w == b"_S5_").unwrap();
        // PackageOp, length, one element, BytePrefix, the sleep type.
        assert_eq!(
            &dsdt[at + 4..at + 9],
            &[0x12, 0x04, 0x01, 0x0a, ACPI_S5_SLEEP_TYPE]
        );
    }

    #[test]
    fn dsdt_describes_each_virtio_device() {
        let slots: Vec<VirtioSlot> = (0..MAX_VIRTIO_DEVICES)
            .map(|i| {
                let (base, irq) = virtio_mmio_slot(i);
                VirtioSlot {
                    base,
                    size: VIRTIO_MMIO_SIZE,
                    irq,
                }
            })
            .collect();
        let tables = build(32, &slots);
        let dsdt = &by_sig(&tables, b"DSDT").bytes;
        assert_eq!(sum(dsdt), 0);
        let hids = dsdt.windows(8).filter(|w| w == b"LNRO0005").count();
        assert_eq!(hids, slots.len());
        assert_eq!(u32_at(dsdt, 4) as usize, dsdt.len());
        for slot in &slots {
            // Memory32Fixed: tag 0x86, length 9, read-write, base, size.
            let mut want = vec![0x86, 0x09, 0x00, 0x01];
            want.extend_from_slice(&(slot.base as u32).to_le_bytes());
            want.extend_from_slice(&(slot.size as u32).to_le_bytes());
            let at = dsdt
                .windows(want.len())
                .position(|w| w == want.as_slice())
                .unwrap();
            // Followed by the extended interrupt descriptor with the device's IRQ.
            let irq = &dsdt[at + want.len()..at + want.len() + 9];
            assert_eq!(irq[0], 0x89);
            assert_eq!(u32::from_le_bytes(irq[5..9].try_into().unwrap()), slot.irq);
        }
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        write_tables(&mem, 32, &slots).unwrap();
    }

    #[test]
    fn dsdt_has_the_power_button_and_its_event_device() {
        let tables = build(1, &[]);
        let dsdt = &by_sig(&tables, b"DSDT").bytes;
        let find = |needle: &[u8]| dsdt.windows(needle.len()).position(|w| w == needle);
        assert!(find(b"ACPI0013").is_some(), "GED _HID");
        assert!(find(b"PWRB").is_some() && find(b"GED0").is_some() && find(b"_EVT").is_some());
        // PNP0C0C as an EISA id: 0x0C0CD041 little-endian after DWordPrefix.
        assert!(find(&[0x0c, 0x41, 0xd0, 0x0c, 0x0c]).is_some(), "PWRB _HID");
        // The GED's register: OperationRegion GDST in SystemMemory at GED_MMIO_START.
        let mut region = b"GDST".to_vec();
        region.extend_from_slice(&[0x00, 0x0c]);
        region.extend_from_slice(&(GED_MMIO_START as u32).to_le_bytes());
        assert!(
            find(&region).is_some(),
            "OperationRegion at the GED register"
        );
        // The interrupt: Extended IRQ descriptor with GED_IRQ.
        let mut irq = vec![0x89, 0x06, 0x00, 0x03, 0x01];
        irq.extend_from_slice(&GED_IRQ.to_le_bytes());
        assert!(find(&irq).is_some(), "GED interrupt");
    }

    /// The ACPI reference disassembler reads our DSDT back: the AML is well-formed, and
    /// the power-button method says what we meant.
    #[test]
    fn dsdt_decompiles_cleanly_with_iasl() {
        if std::process::Command::new("iasl")
            .arg("-v")
            .output()
            .is_err()
        {
            eprintln!("SKIPPED dsdt_decompiles_cleanly_with_iasl: iasl (Debian acpica-tools) is not installed");
            return;
        }
        let slot = VirtioSlot {
            base: VIRTIO_MMIO_START,
            size: VIRTIO_MMIO_SIZE,
            irq: VIRTIO_IRQ_BASE,
        };
        let tables = build(2, &[slot]);
        let dir = std::env::temp_dir().join(format!("keel-iasl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let aml = dir.join("dsdt.aml");
        std::fs::write(&aml, &by_sig(&tables, b"DSDT").bytes).unwrap();
        let out = std::process::Command::new("iasl")
            .arg("-d")
            .arg(&aml)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "iasl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dsl = std::fs::read_to_string(dir.join("dsdt.dsl")).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        for expected in [
            "Notify (\\_SB.PWRB, 0x80)",
            "Name (_HID, \"ACPI0013\"",
            "Name (_HID, \"LNRO0005\")",
            "Local1 = (Local0 & One)",
            "Name (_S5, Package",
            "OperationRegion (GDST, SystemMemory, 0xCFFFF000, One)",
        ] {
            assert!(
                dsl.contains(expected),
                "{expected:?} not in the decompiled DSDT:\n{dsl}"
            );
        }
    }

    #[test]
    fn tables_fit_in_the_acpi_area_for_32_cpus() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        write_tables(&mem, 32, &[]).unwrap();
        let mut sig = [0u8; 8];
        mem.read_slice(&mut sig, GuestAddress(ACPI_START)).unwrap();
        assert_eq!(&sig, b"RSD PTR ");
    }
}
