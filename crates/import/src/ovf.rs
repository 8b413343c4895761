//! An OVF descriptor (`.ovf`, alone or inside an `.ova`), as VMware exports one: the virtual
//! system's name, its virtual hardware items (CPUs, memory, storage controllers and the disks
//! on them, NICs with their MACs, CD/DVD, USB, floppy), its firmware and guest OS, and the
//! disk files its references name. Read with `roxmltree` (no DTD: no entity expansion), the
//! text and node count bounded; every value is checked before it is used, and a disk file
//! must be a plain name beside the descriptor.

use crate::plan::{keel_name, Plan, PlannedDisk, PlannedNic, BUSES};

/// The largest descriptor read (VMware's are tens of KiB).
pub const MAX_BYTES: usize = 1 << 20;
/// The most XML nodes parsed.
const MAX_NODES: u32 = 200_000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OvfError {
    #[error("the OVF descriptor is {0} bytes, more than the 1 MiB one may have")]
    TooLong(usize),
    #[error("the OVF descriptor is not UTF-8 text")]
    NotText,
    #[error("the OVF descriptor is not well-formed XML: {0}")]
    Xml(String),
    #[error("the OVF descriptor has no VirtualSystem (a VirtualSystemCollection of several VMs is not imported: export each VM on its own)")]
    NoSystem,
}

/// The descriptor's virtual system, as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ovf {
    pub plan: Plan,
}

/// A node's local name, whatever its namespace prefix.
fn is(node: &roxmltree::Node, name: &str) -> bool {
    node.is_element() && node.tag_name().name() == name
}

/// The attribute `name` in any namespace (ovf:id, vmw:value, ...).
fn attr<'a>(node: &roxmltree::Node<'a, '_>, name: &str) -> Option<&'a str> {
    node.attributes()
        .find(|a| a.name() == name)
        .map(|a| a.value())
}

/// The text of the child element `name` (rasd:ResourceType, ...).
fn child_text<'a>(node: &roxmltree::Node<'a, '_>, name: &str) -> Option<&'a str> {
    node.children()
        .find(|c| is(c, name))
        .and_then(|c| c.text())
        .map(str::trim)
}

/// Bytes per unit of an `AllocationUnits` value: "byte * 2^20", "byte", "MegaBytes", ...
fn unit_bytes(units: &str) -> Option<u64> {
    let u = units.replace(' ', "").to_ascii_lowercase();
    if let Some(exp) = u.strip_prefix("byte*2^") {
        let exp: u32 = exp.parse().ok()?;
        return 1u64.checked_shl(exp).filter(|_| exp < 63);
    }
    match u.as_str() {
        "byte" | "bytes" => Some(1),
        "kilobytes" | "kb" => Some(1 << 10),
        "megabytes" | "mb" => Some(1 << 20),
        "gigabytes" | "gb" => Some(1 << 30),
        _ => None,
    }
}

/// A storage controller's bus (an index of [`BUSES`]) from its item.
fn controller_bus(item: &roxmltree::Node) -> Option<usize> {
    let kind = child_text(item, "ResourceType")?;
    let subtype = child_text(item, "ResourceSubType")
        .unwrap_or("")
        .to_ascii_lowercase();
    let bus = match kind {
        "6" => "scsi",
        "5" => "ide",
        "20" if subtype.contains("nvme") => "nvme",
        "20" => "sata",
        _ => return None,
    };
    BUSES.iter().position(|b| *b == bus)
}

impl Ovf {
    pub fn parse(bytes: &[u8]) -> Result<Ovf, OvfError> {
        if bytes.len() > MAX_BYTES {
            return Err(OvfError::TooLong(bytes.len()));
        }
        let text = std::str::from_utf8(bytes).map_err(|_| OvfError::NotText)?;
        let options = roxmltree::ParsingOptions {
            allow_dtd: false,
            nodes_limit: MAX_NODES,
            ..Default::default()
        };
        let doc = roxmltree::Document::parse_with_options(text, options)
            .map_err(|e| OvfError::Xml(e.to_string()))?;
        let root = doc.root_element();
        let system = root
            .descendants()
            .find(|n| is(n, "VirtualSystem"))
            .ok_or(OvfError::NoSystem)?;
        let mut not_carried = Vec::new();

        // References: file id -> href; DiskSection: disk id -> file id.
        let files: Vec<(&str, &str)> = root
            .descendants()
            .filter(|n| is(n, "File"))
            .filter_map(|f| Some((attr(&f, "id")?, attr(&f, "href")?)))
            .collect();
        let disks_by_id: Vec<(&str, Option<&str>)> = root
            .descendants()
            .filter(|n| is(n, "Disk"))
            .filter_map(|d| Some((attr(&d, "diskId")?, attr(&d, "fileRef"))))
            .collect();
        let file_of_disk = |host_resource: &str| -> Option<&str> {
            // "ovf:/disk/vmdisk1" (or "/disk/vmdisk1").
            let id = host_resource.rsplit('/').next()?;
            let file_ref = disks_by_id.iter().find(|(d, _)| *d == id)?.1?;
            files.iter().find(|(f, _)| *f == file_ref).map(|(_, h)| *h)
        };

        let name = child_text(&system, "Name")
            .or_else(|| attr(&system, "id"))
            .unwrap_or("imported");
        let hardware = system
            .descendants()
            .find(|n| is(n, "VirtualHardwareSection"));
        let items: Vec<roxmltree::Node> = hardware
            .iter()
            .flat_map(|h| {
                h.children()
                    .filter(|c| is(c, "Item") || is(c, "StorageItem") || is(c, "EthernetPortItem"))
            })
            .collect();

        let mut cpus: u32 = 1;
        let mut memory_mib: u64 = 256;
        // Controllers: InstanceID -> (bus, its address).
        let mut controllers: Vec<(&str, usize, u32)> = Vec::new();
        for item in &items {
            if let (Some(id), Some(bus)) = (child_text(item, "InstanceID"), controller_bus(item)) {
                let address = child_text(item, "Address")
                    .and_then(|a| a.parse().ok())
                    .unwrap_or(0);
                controllers.push((id, bus, address));
            }
        }
        let mut disks: Vec<((usize, u32, u32), PlannedDisk)> = Vec::new();
        let mut nics = Vec::new();
        for item in &items {
            let kind = child_text(item, "ResourceType").unwrap_or("");
            let label = child_text(item, "ElementName").unwrap_or("a device");
            let quantity = child_text(item, "VirtualQuantity").and_then(|q| q.parse::<u64>().ok());
            match kind {
                "3" => {
                    let asked = quantity.unwrap_or(1).max(1);
                    cpus = u32::try_from(asked)
                        .unwrap_or(u32::MAX)
                        .min(api::vm::MAX_CPUS);
                    if asked > u64::from(api::vm::MAX_CPUS) {
                        not_carried.push(format!(
                            "{asked} vCPUs: a Keel VM has at most {}; it gets {}",
                            api::vm::MAX_CPUS,
                            api::vm::MAX_CPUS
                        ));
                    }
                }
                "4" => {
                    let unit = child_text(item, "AllocationUnits")
                        .map(unit_bytes)
                        .unwrap_or(Some(1 << 20));
                    match (quantity, unit) {
                        (Some(q), Some(u)) => {
                            memory_mib = (q.saturating_mul(u) >> 20).max(api::vm::MIN_MEMORY_MIB)
                        }
                        _ => not_carried.push(format!(
                            "memory '{}': not a size Keel reads; the VM gets {memory_mib} MiB (change it after the import)",
                            quantity.map(|q| q.to_string()).unwrap_or_default()
                        )),
                    }
                }
                "17" => {
                    let resource = child_text(item, "HostResource").unwrap_or("");
                    let Some(file) = file_of_disk(resource) else {
                        not_carried.push(format!(
                            "disk '{label}' ({resource}): its file is not in the descriptor's references; it is left out"
                        ));
                        continue;
                    };
                    if file.contains('/') || file.contains('\\') || file.starts_with('.') {
                        not_carried.push(format!(
                            "disk '{label}' names '{file}', a path: only disks beside the descriptor are imported"
                        ));
                        continue;
                    }
                    if !file.to_ascii_lowercase().ends_with(".vmdk") {
                        not_carried.push(format!(
                            "disk '{label}' ('{file}'): not a VMDK; it is left out"
                        ));
                        continue;
                    }
                    let parent = child_text(item, "Parent").unwrap_or("");
                    let (bus, controller) = controllers
                        .iter()
                        .find(|(id, ..)| *id == parent)
                        .map(|(_, b, a)| (*b, *a))
                        .unwrap_or((BUSES.len(), 0));
                    let unit = child_text(item, "AddressOnParent")
                        .and_then(|a| a.parse().ok())
                        .unwrap_or(0);
                    let slot = format!(
                        "{}{controller}:{unit}",
                        BUSES.get(bus).copied().unwrap_or("disk")
                    );
                    disks.push((
                        (bus, controller, unit),
                        PlannedDisk {
                            slot,
                            file: file.to_string(),
                        },
                    ));
                }
                "10" => {
                    let mac = child_text(item, "Address")
                        .filter(|a| a.len() == 17 && a.bytes().filter(|b| *b == b':').count() == 5)
                        .map(str::to_ascii_lowercase);
                    let subtype = child_text(item, "ResourceSubType").unwrap_or("NIC of no named kind");
                    let label = child_text(item, "ElementName")
                        .map(str::to_string)
                        .unwrap_or_else(|| format!("ethernet{}", nics.len()));
                    if !subtype.eq_ignore_ascii_case("virtio") {
                        not_carried.push(format!(
                            "{label} was a {subtype}: it becomes a virtio-net NIC; the guest needs its virtio_net driver"
                        ));
                    }
                    nics.push(PlannedNic {
                        slot: format!("ethernet{}", nics.len()),
                        mac,
                    });
                }
                "15" | "16" => not_carried.push(format!(
                    "CD/DVD drive '{label}': Keel VMs have no CD-ROM; copy what the guest needs from it onto a disk"
                )),
                "14" => not_carried.push("floppy drive: Keel VMs have none; it is left out".into()),
                "23" => not_carried.push("USB controller: Keel VMs have none; it is left out".into()),
                _ => {}
            }
        }
        disks.sort_by_key(|(order, _)| *order);

        let config = |key: &str| {
            hardware.iter().flat_map(|h| h.descendants()).find_map(|n| {
                (is(&n, "Config") && attr(&n, "key") == Some(key))
                    .then(|| attr(&n, "value"))
                    .flatten()
            })
        };
        if config("firmware").is_some_and(|f| f.eq_ignore_ascii_case("efi")) {
            not_carried.push(
                "EFI firmware: Keel boots the guest's kernel itself (from its disk's /boot or a kernel file); a guest that needs UEFI does not start".into(),
            );
        }
        let os = system
            .descendants()
            .find(|n| is(n, "OperatingSystemSection"));
        let os_type = os
            .and_then(|o| attr(&o, "osType"))
            .unwrap_or("")
            .to_ascii_lowercase();
        let os_text = os
            .and_then(|o| child_text(&o, "Description"))
            .unwrap_or("")
            .to_ascii_lowercase();
        if os_type.starts_with("win") || os_text.contains("windows") {
            not_carried.push(
                "a Windows guest: Keel boots Linux kernels only; Windows does not start".into(),
            );
        }
        Ok(Ovf {
            plan: Plan {
                name: keel_name(name),
                cpus,
                memory_mib,
                disks: disks.into_iter().map(|(_, d)| d).collect(),
                nics,
                not_carried,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An OVF as VMware exports one (trimmed): two disks on two controllers, a NIC, a CD.
    pub(crate) const EXPORT: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<Envelope vmw:buildId="build-1" xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" xmlns:vmw="http://www.vmware.com/schema/ovf">
  <References>
    <File ovf:href="web-disk2.vmdk" ovf:id="file2"/>
    <File ovf:href="web-disk1.vmdk" ovf:id="file1"/>
  </References>
  <DiskSection>
    <Disk ovf:capacity="8" ovf:capacityAllocationUnits="byte * 2^30" ovf:diskId="vmdisk1" ovf:fileRef="file1"/>
    <Disk ovf:capacity="2" ovf:capacityAllocationUnits="byte * 2^30" ovf:diskId="vmdisk2" ovf:fileRef="file2"/>
  </DiskSection>
  <VirtualSystem ovf:id="Web Server 01">
    <Name>Web Server 01</Name>
    <OperatingSystemSection ovf:id="96" vmw:osType="debian11_64Guest"><Description>Debian GNU/Linux 11 (64-bit)</Description></OperatingSystemSection>
    <VirtualHardwareSection>
      <Item><rasd:ElementName>2 virtual CPU(s)</rasd:ElementName><rasd:InstanceID>1</rasd:InstanceID><rasd:ResourceType>3</rasd:ResourceType><rasd:VirtualQuantity>2</rasd:VirtualQuantity></Item>
      <Item><rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits><rasd:ElementName>2048MB of memory</rasd:ElementName><rasd:InstanceID>2</rasd:InstanceID><rasd:ResourceType>4</rasd:ResourceType><rasd:VirtualQuantity>2048</rasd:VirtualQuantity></Item>
      <Item><rasd:Address>0</rasd:Address><rasd:ElementName>SATA Controller 0</rasd:ElementName><rasd:InstanceID>3</rasd:InstanceID><rasd:ResourceSubType>vmware.sata.ahci</rasd:ResourceSubType><rasd:ResourceType>20</rasd:ResourceType></Item>
      <Item><rasd:Address>0</rasd:Address><rasd:ElementName>SCSI Controller 0</rasd:ElementName><rasd:InstanceID>4</rasd:InstanceID><rasd:ResourceSubType>lsilogic</rasd:ResourceSubType><rasd:ResourceType>6</rasd:ResourceType></Item>
      <Item><rasd:AddressOnParent>0</rasd:AddressOnParent><rasd:ElementName>Hard Disk 2</rasd:ElementName><rasd:HostResource>ovf:/disk/vmdisk2</rasd:HostResource><rasd:InstanceID>5</rasd:InstanceID><rasd:Parent>3</rasd:Parent><rasd:ResourceType>17</rasd:ResourceType></Item>
      <Item><rasd:AddressOnParent>0</rasd:AddressOnParent><rasd:ElementName>Hard Disk 1</rasd:ElementName><rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource><rasd:InstanceID>6</rasd:InstanceID><rasd:Parent>4</rasd:Parent><rasd:ResourceType>17</rasd:ResourceType></Item>
      <Item><rasd:AddressOnParent>1</rasd:AddressOnParent><rasd:ElementName>CD/DVD drive 1</rasd:ElementName><rasd:InstanceID>7</rasd:InstanceID><rasd:Parent>3</rasd:Parent><rasd:ResourceType>15</rasd:ResourceType></Item>
      <Item><rasd:Address>00:50:56:AB:CD:EF</rasd:Address><rasd:ElementName>Network adapter 1</rasd:ElementName><rasd:InstanceID>8</rasd:InstanceID><rasd:ResourceSubType>VmxNet3</rasd:ResourceSubType><rasd:ResourceType>10</rasd:ResourceType></Item>
      <vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="efi"/>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>"#;

    #[test]
    fn a_vmware_export_becomes_a_plan() {
        let plan = Ovf::parse(EXPORT.as_bytes()).unwrap().plan;
        assert_eq!(plan.name, "web-server-01");
        assert_eq!((plan.cpus, plan.memory_mib), (2, 2048));
        // SCSI before SATA, whatever the order of the items.
        let files: Vec<&str> = plan.disks.iter().map(|d| d.file.as_str()).collect();
        assert_eq!(files, ["web-disk1.vmdk", "web-disk2.vmdk"]);
        assert_eq!(plan.disks[0].slot, "scsi0:0");
        assert_eq!(plan.disks[1].slot, "sata0:0");
        assert_eq!(plan.nics[0].mac.as_deref(), Some("00:50:56:ab:cd:ef"));
        let left = plan.not_carried.join("\n");
        for what in ["CD/DVD", "EFI firmware", "VmxNet3"] {
            assert!(left.contains(what), "{what} not listed:\n{left}");
        }
        assert!(!left.contains("Windows"), "{left}");
    }

    #[test]
    fn hostile_descriptors_are_refused_or_bounded() {
        // Entities: no DTD, so no expansion.
        let bomb = r#"<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;">]><Envelope>&b;</Envelope>"#;
        assert!(matches!(Ovf::parse(bomb.as_bytes()), Err(OvfError::Xml(_))));
        assert_eq!(Ovf::parse(b"<Envelope/>").unwrap_err(), OvfError::NoSystem);
        assert!(matches!(
            Ovf::parse(&vec![b' '; MAX_BYTES + 1]),
            Err(OvfError::TooLong(_))
        ));
        // A disk named by a path, a Windows guest, absurd sizes.
        let evil = EXPORT
            .replace("web-disk1.vmdk", "../../etc/shadow.vmdk")
            .replace("debian11_64Guest", "windows9Server64Guest")
            .replace(
                "<rasd:VirtualQuantity>2</rasd:VirtualQuantity>",
                "<rasd:VirtualQuantity>100000</rasd:VirtualQuantity>",
            )
            .replace("byte * 2^20", "byte * 2^99");
        let plan = Ovf::parse(evil.as_bytes()).unwrap().plan;
        assert_eq!(plan.disks.len(), 1, "{plan:?}");
        assert_eq!(plan.cpus, api::vm::MAX_CPUS);
        let left = plan.not_carried.join("\n");
        assert!(left.contains("a path"), "{left}");
        assert!(left.contains("Windows"), "{left}");
        assert!(left.contains("memory"), "{left}");
    }
}
