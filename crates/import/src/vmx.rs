//! A VMware `.vmx` file: `key = "value"` lines. Read into what a Keel VM needs (name, vCPUs,
//! memory, disks in controller order, NICs with their MAC addresses) and the list of what Keel
//! cannot carry over, each with what to do. The file is hostile input: its size and line
//! count are bounded and no value is trusted to name anything outside the VM's directory.

use std::collections::BTreeMap;

use crate::plan::{keel_name, BUSES};
pub use crate::plan::{Plan, PlannedDisk, PlannedNic};

/// The largest VMX read (VMware's are a few KiB).
pub const MAX_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VmxError {
    #[error("the VMX file is {0} bytes, more than the 1 MiB one may have")]
    TooLong(usize),
    #[error("VMX line {line}: '{text}' is not key = \"value\"")]
    Line { line: usize, text: String },
}

/// The file's keys (lower-case, as VMware compares them) and values.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Vmx(BTreeMap<String, String>);

impl Vmx {
    pub fn parse(bytes: &[u8]) -> Result<Vmx, VmxError> {
        if bytes.len() > MAX_BYTES {
            return Err(VmxError::TooLong(bytes.len()));
        }
        let text = String::from_utf8_lossy(bytes);
        let mut keys = BTreeMap::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                return Err(VmxError::Line {
                    line: i + 1,
                    text: line.chars().take(80).collect(),
                });
            };
            let value = value.trim();
            let value = value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(value);
            keys.insert(key.trim().to_ascii_lowercase(), value.to_string());
        }
        Ok(Vmx(keys))
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(&key.to_ascii_lowercase()).map(String::as_str)
    }

    fn is_true(&self, key: &str) -> bool {
        self.get(key)
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
    }
}

/// "scsi0:1" -> (bus order, controller 0, unit 1), for devices of a known bus.
fn slot_order(slot: &str) -> Option<(usize, u32, u32)> {
    let bus = BUSES.iter().position(|b| slot.starts_with(b))?;
    let (controller, unit) = slot[BUSES[bus].len()..].split_once(':')?;
    Some((bus, controller.parse().ok()?, unit.parse().ok()?))
}

/// A snapshot's delta disk: VMware names them `disk-000001.vmdk`.
fn is_snapshot_delta(file: &str) -> bool {
    let stem = file.strip_suffix(".vmdk").unwrap_or(file);
    stem.rsplit_once('-')
        .is_some_and(|(_, n)| n.len() == 6 && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Reads what Keel needs from `vmx`.
pub fn plan(vmx: &Vmx) -> Plan {
    let mut not_carried = Vec::new();
    let display = vmx.get("displayName").unwrap_or("imported");
    let mut cpus: u32 = vmx
        .get("numvcpus")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1);
    if cpus > api::vm::MAX_CPUS {
        not_carried.push(format!(
            "{cpus} vCPUs: a Keel VM has at most {}; it gets {}",
            api::vm::MAX_CPUS,
            api::vm::MAX_CPUS
        ));
        cpus = api::vm::MAX_CPUS;
    }
    let memory_mib = vmx
        .get("memsize")
        .and_then(|v| v.parse().ok())
        .unwrap_or(256u64)
        .max(api::vm::MIN_MEMORY_MIB);

    // Disks and CD-ROMs: every present device of a known bus.
    let mut disks: Vec<((usize, u32, u32), PlannedDisk)> = Vec::new();
    for (key, _) in vmx
        .0
        .iter()
        .filter(|(k, v)| k.ends_with(".present") && v.eq_ignore_ascii_case("true"))
    {
        let slot = key.trim_end_matches(".present");
        let Some(order) = slot_order(slot) else {
            continue;
        };
        if !slot.contains(':') {
            continue; // the controller itself
        }
        let device = vmx.get(&format!("{slot}.deviceType")).unwrap_or("disk");
        let file = vmx.get(&format!("{slot}.fileName")).unwrap_or("");
        if device.contains("cdrom") || file.ends_with(".iso") {
            not_carried.push(format!(
                "CD-ROM {slot} ({}): Keel VMs have no CD-ROM; copy what the guest needs from it onto a disk",
                if file.is_empty() { "empty" } else { file }
            ));
            continue;
        }
        if !file.ends_with(".vmdk") {
            not_carried.push(format!(
                "{slot} ({device}, '{file}'): not a VMDK disk; it is left out"
            ));
            continue;
        }
        if file.contains('/') || file.contains('\\') {
            not_carried.push(format!(
                "disk {slot} names '{file}', a path: only disks beside the VMX are imported; copy it there"
            ));
            continue;
        }
        if is_snapshot_delta(file) {
            not_carried.push(format!(
                "disk {slot} is the snapshot delta '{file}': consolidate (delete) the VM's snapshots in VMware first, then export again"
            ));
            continue;
        }
        disks.push((
            order,
            PlannedDisk {
                slot: slot.to_string(),
                file: file.to_string(),
            },
        ));
    }
    disks.sort_by_key(|(order, _)| *order);

    let mut nics = Vec::new();
    for n in 0..10 {
        let slot = format!("ethernet{n}");
        if !vmx.is_true(&format!("{slot}.present")) {
            continue;
        }
        let mac = vmx
            .get(&format!("{slot}.address"))
            .or_else(|| vmx.get(&format!("{slot}.generatedAddress")))
            .map(str::to_ascii_lowercase);
        if let Some(dev) = vmx.get(&format!("{slot}.virtualDev")) {
            if dev != "virtio" {
                not_carried.push(format!(
                    "{slot} was a {dev}: it becomes a virtio-net NIC; the guest needs its virtio_net driver"
                ));
            }
        }
        nics.push(PlannedNic { slot, mac });
    }

    if vmx
        .get("firmware")
        .is_some_and(|f| f.eq_ignore_ascii_case("efi"))
    {
        not_carried.push(
            "EFI firmware: Keel boots the guest's kernel itself (from its disk's /boot or a kernel file); a guest that needs UEFI does not start".into(),
        );
    }
    if vmx
        .get("guestOS")
        .is_some_and(|g| g.to_ascii_lowercase().starts_with("win"))
    {
        not_carried
            .push("a Windows guest: Keel boots Linux kernels only; Windows does not start".into());
    }
    for (key, what) in [
        ("usb.present", "USB controller"),
        ("sound.present", "sound card"),
        ("floppy0.present", "floppy drive"),
    ] {
        if vmx.is_true(key) {
            not_carried.push(format!("{what}: Keel VMs have none; it is left out"));
        }
    }
    Plan {
        name: keel_name(display),
        cpus,
        memory_mib,
        disks: disks.into_iter().map(|(_, d)| d).collect(),
        nics,
        not_carried,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VMX: &str = r#".encoding = "UTF-8"
config.version = "8"
virtualHW.version = "19"
displayName = "Web Server (prod)"
guestOS = "debian11-64"
firmware = "efi"
numvcpus = "4"
memSize = "4096"
scsi0.present = "TRUE"
scsi0.virtualDev = "pvscsi"
scsi0:1.present = "TRUE"
scsi0:1.fileName = "web-data.vmdk"
scsi0:0.present = "TRUE"
scsi0:0.fileName = "web.vmdk"
sata0.present = "TRUE"
sata0:0.present = "TRUE"
sata0:0.deviceType = "cdrom-image"
sata0:0.fileName = "/vmfs/volumes/ds/debian.iso"
ide0:0.present = "TRUE"
ide0:0.fileName = "web-000001.vmdk"
ethernet0.present = "TRUE"
ethernet0.virtualDev = "vmxnet3"
ethernet0.addressType = "generated"
ethernet0.generatedAddress = "00:0C:29:AB:CD:EF"
usb.present = "TRUE"
"#;

    #[test]
    fn a_vmx_becomes_a_plan_and_a_list_of_what_stays_behind() {
        let p = plan(&Vmx::parse(VMX.as_bytes()).unwrap());
        assert_eq!(p.name, "web-server--prod");
        assert_eq!((p.cpus, p.memory_mib), (4, 4096));
        let files: Vec<&str> = p.disks.iter().map(|d| d.file.as_str()).collect();
        assert_eq!(files, ["web.vmdk", "web-data.vmdk"], "controller order");
        assert_eq!(p.nics[0].mac.as_deref(), Some("00:0c:29:ab:cd:ef"));
        let left = p.not_carried.join("\n");
        for what in [
            "CD-ROM sata0:0",
            "snapshot delta 'web-000001.vmdk'",
            "EFI firmware",
            "USB controller",
            "was a vmxnet3",
        ] {
            assert!(left.contains(what), "{what} not listed:\n{left}");
        }
        assert_eq!(p.not_carried.len(), 5, "{left}");
    }

    #[test]
    fn hostile_vmx_files_are_bounded() {
        assert!(matches!(
            Vmx::parse(&vec![b'#'; MAX_BYTES + 1]),
            Err(VmxError::TooLong(_))
        ));
        assert!(matches!(
            Vmx::parse(b"no equals sign"),
            Err(VmxError::Line { line: 1, .. })
        ));
        let p = plan(&Vmx::parse(b"scsi0:0.present = \"TRUE\"\nscsi0:0.fileName = \"/etc/shadow.vmdk\"\nnumvcpus = \"999\"\ndisplayName = \"!!!\"\n").unwrap());
        assert!(p.disks.is_empty());
        assert_eq!(p.cpus, api::vm::MAX_CPUS);
        assert_eq!(p.name, "imported");
        assert!(p.not_carried.iter().any(|n| n.contains("a path")));
    }
}
