//! Fuzz target: an OVF descriptor (`import::ovf`), read when a VMware export (`.ovf` or the
//! descriptor inside an `.ova`) is imported: XML parsed with no DTD and a node limit, its
//! references, disks, hardware items and configuration read into a plan.
//!
//! Nothing may panic; a plan's name is one Keel accepts, its vCPUs and memory are within
//! Keel's limits, every planned disk is a plain `.vmdk` name (nothing outside the
//! descriptor's directory), and MAC addresses are well formed.
//!
//! Input: the descriptor's bytes. Seeds: a VMware export (two disks on SCSI and SATA, a NIC,
//! a CD, EFI), one naming a disk by a path, one with an entity-expansion DTD.

#![no_main]

use import::ovf::Ovf;
use keel_fuzz::PlanOutcome as Outcome;
use keel_fuzz::Seed;

libfuzzer_sys::fuzz_target!(
    init: keel_fuzz::write_seeds("ovf_plan", seeds, run),
    |data: &[u8]| {
        run(data);
    }
);

fn run(data: &[u8]) -> Outcome {
    let Ok(ovf) = Ovf::parse(data) else {
        return Outcome::Refused;
    };
    let p = ovf.plan;
    for d in &p.disks {
        assert!(
            !d.file.contains('/') && !d.file.contains('\\') && !d.file.starts_with('.'),
            "{d:?}"
        );
        assert!(d.file.to_ascii_lowercase().ends_with(".vmdk"), "{d:?}");
    }
    for n in &p.nics {
        if let Some(mac) = &n.mac {
            assert_eq!(mac.len(), 17, "{mac}");
        }
    }
    Outcome::of(&p)
}

const EXPORT: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" xmlns:vmw="http://www.vmware.com/schema/ovf">
  <References><File ovf:href="a-disk1.vmdk" ovf:id="file1"/><File ovf:href="a-disk2.vmdk" ovf:id="file2"/></References>
  <DiskSection><Disk ovf:diskId="vmdisk1" ovf:fileRef="file1"/><Disk ovf:diskId="vmdisk2" ovf:fileRef="file2"/></DiskSection>
  <VirtualSystem ovf:id="a">
    <Name>A</Name>
    <VirtualHardwareSection>
      <Item><rasd:InstanceID>1</rasd:InstanceID><rasd:ResourceType>3</rasd:ResourceType><rasd:VirtualQuantity>2</rasd:VirtualQuantity></Item>
      <Item><rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits><rasd:InstanceID>2</rasd:InstanceID><rasd:ResourceType>4</rasd:ResourceType><rasd:VirtualQuantity>512</rasd:VirtualQuantity></Item>
      <Item><rasd:Address>0</rasd:Address><rasd:InstanceID>3</rasd:InstanceID><rasd:ResourceSubType>vmware.sata.ahci</rasd:ResourceSubType><rasd:ResourceType>20</rasd:ResourceType></Item>
      <Item><rasd:Address>0</rasd:Address><rasd:InstanceID>4</rasd:InstanceID><rasd:ResourceSubType>lsilogic</rasd:ResourceSubType><rasd:ResourceType>6</rasd:ResourceType></Item>
      <Item><rasd:AddressOnParent>0</rasd:AddressOnParent><rasd:HostResource>ovf:/disk/vmdisk2</rasd:HostResource><rasd:InstanceID>5</rasd:InstanceID><rasd:Parent>3</rasd:Parent><rasd:ResourceType>17</rasd:ResourceType></Item>
      <Item><rasd:AddressOnParent>0</rasd:AddressOnParent><rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource><rasd:InstanceID>6</rasd:InstanceID><rasd:Parent>4</rasd:Parent><rasd:ResourceType>17</rasd:ResourceType></Item>
      <Item><rasd:InstanceID>7</rasd:InstanceID><rasd:ResourceType>15</rasd:ResourceType></Item>
      <Item><rasd:Address>00:50:56:AB:CD:EF</rasd:Address><rasd:InstanceID>8</rasd:InstanceID><rasd:ResourceSubType>VmxNet3</rasd:ResourceSubType><rasd:ResourceType>10</rasd:ResourceType></Item>
      <vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="efi"/>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>"#;

fn seeds() -> Vec<Seed<Outcome>> {
    vec![
        Seed::text(
            "vmware_export",
            EXPORT,
            Outcome::Planned {
                disks: 2,
                nics: 1,
                left: 3,
            },
        ),
        Seed::text(
            "disk_by_path",
            &EXPORT.replace("a-disk2.vmdk", "../../etc/shadow.vmdk"),
            Outcome::Planned {
                disks: 1,
                nics: 1,
                left: 4,
            },
        ),
        Seed::text(
            "entity_dtd",
            r#"<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><Envelope>&a;</Envelope>"#,
            Outcome::Refused,
        ),
    ]
}
