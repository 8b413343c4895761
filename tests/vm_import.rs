//! `keel import`: VMware VMs become Keel VMs. The disks are real VMDKs made by `qemu-img
//! convert` from a GPT disk that holds the probe as its kernel (a Boot Loader Specification
//! entry); the VMX and OVF are written here, the OVA packed with `tar`. The imported VM boots
//! from its (converted, cloned) disk, and what could not be carried over is listed.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::daemon::Daemon;
use common::s;

fn run(program: &str, args: &[&str]) {
    common::tool(program, args);
}
use disk::boot::image::{ext4, partitioned, Node, Table};

const MIB: u64 = 1 << 20;
const STATE_TIMEOUT: Duration = Duration::from_secs(30);

/// A GPT disk whose second partition boots the probe (ELF, PVH) with power-off, as a raw
/// image at `path`.
fn boot_disk(scratch: &Path, path: &Path) {
    let root = ext4(
        &scratch.join("fs"),
        &[
            (
                "loader/entries/probe.conf",
                Node::File(
                    b"title Probe\nversion 1\nlinux /probe.elf\noptions root=/dev/vda2 probe.imported probe.poweroff\n"
                        .to_vec(),
                ),
            ),
            (
                "probe.elf",
                Node::File(std::fs::read(common::probe_elf()).unwrap()),
            ),
        ],
        4 * MIB,
    )
    .expect("building the root filesystem");
    let image = partitioned(&scratch.join("disk"), Table::Gpt, &[vec![0; 4096], root])
        .expect("partitioning the disk");
    std::fs::write(path, image).unwrap();
}

/// Waits for the VM to stop by itself; its console log.
fn stops_with_log(d: &Daemon, vm: &str) -> String {
    d.wait_state(vm, "stopped", STATE_TIMEOUT);
    let log = d.json(&["vm", "show", vm])["console_log"]
        .as_str()
        .unwrap()
        .to_string();
    std::fs::read_to_string(log).unwrap_or_default()
}

const VMX: &str = r#".encoding = "UTF-8"
config.version = "8"
virtualHW.version = "19"
displayName = "Web Server"
guestOS = "debian11-64"
firmware = "efi"
numvcpus = "2"
memsize = "128"
scsi0.present = "TRUE"
scsi0.virtualDev = "pvscsi"
scsi0:0.present = "TRUE"
scsi0:0.fileName = "web-boot.vmdk"
sata0.present = "TRUE"
sata0:0.present = "TRUE"
sata0:0.fileName = "web-data.vmdk"
ide1:0.present = "TRUE"
ide1:0.deviceType = "cdrom-image"
ide1:0.fileName = "debian.iso"
ethernet0.present = "TRUE"
ethernet0.virtualDev = "vmxnet3"
ethernet0.addressType = "static"
ethernet0.address = "00:50:56:AA:BB:CC"
usb.present = "TRUE"
"#;

#[test]
fn a_vmx_becomes_a_vm_that_boots_from_its_converted_disk() {
    if !common::kvm_available("a_vmx_becomes_a_vm_that_boots_from_its_converted_disk") {
        return;
    }
    let d = Daemon::start("import-vmx");
    let dir = d.images().join("export").join("web");
    std::fs::create_dir_all(&dir).unwrap();
    let raw = dir.join("boot.raw");
    boot_disk(&d.state_dir.join("scratch"), &raw);
    run(
        "qemu-img",
        &[
            "convert",
            "-q",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "-o",
            "subformat=monolithicSparse",
            s(&raw),
            s(&dir.join("web-boot.vmdk")),
        ],
    );
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            s(&dir.join("web-data.vmdk")),
            "16M",
        ],
    );
    std::fs::write(dir.join("web.vmx"), VMX).unwrap();

    let out = d.ok(&["import", s(&dir.join("web.vmx")), "--start"]);
    println!("{out}");
    assert!(out.contains("web-server: imported from"), "{out}");
    for what in [
        "CD-ROM ide1:0",
        "EFI firmware",
        "vmxnet3",
        "USB controller",
        "no tap was given",
    ] {
        assert!(out.contains(what), "'{what}' is not listed:\n{out}");
    }
    let vm = d.json(&["vm", "show", "web-server"]);
    assert_eq!(vm["spec"]["cpus"], 2);
    assert_eq!(vm["spec"]["memory_mib"], 128);
    let disks = vm["spec"]["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 2);
    assert_eq!(disks[0]["image"], "web-server-disk0", "SCSI before SATA");
    assert_eq!(disks[1]["image"], "web-server-disk1");
    assert_eq!(disks[0]["format"], "qcow2");
    // It boots from the converted, cloned disk (disk boot through qcow2 and raw).
    let log = stops_with_log(&d, "web-server");
    assert!(log.contains("probe.imported"), "{log}");
    // The import is in the ledger, with what was left behind.
    let events = d.ok(&["events", "--vm", "web-server", "--limit", "20"]);
    assert!(events.contains("imported from"), "{events}");
    assert!(events.contains("not carried over: CD-ROM"), "{events}");
    // The converted image equals the raw disk it came from.
    let images = d.json(&["image", "list"]);
    let boot_image = images
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "web-server-disk0")
        .unwrap();
    assert!(
        std::fs::read(boot_image["path"].as_str().unwrap()).unwrap()
            == std::fs::read(&raw).unwrap()
    );
    // Importing again under the same name is refused, and leaves no image behind.
    let e = d.fails(&["import", s(&dir.join("web.vmx"))]);
    assert!(e.contains("exists"), "{e}");
}

/// An OVF (as VMware exports one, trimmed) for the boot disk `disk`.
fn ovf(disk: &str) -> String {
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" xmlns:vmw="http://www.vmware.com/schema/ovf">
  <References><File ovf:href="{disk}" ovf:id="file1"/></References>
  <DiskSection><Disk ovf:capacity="8" ovf:capacityAllocationUnits="byte * 2^20" ovf:diskId="vmdisk1" ovf:fileRef="file1"/></DiskSection>
  <VirtualSystem ovf:id="appliance">
    <Name>Appliance</Name>
    <OperatingSystemSection ovf:id="96" vmw:osType="debian11_64Guest"/>
    <VirtualHardwareSection>
      <Item><rasd:InstanceID>1</rasd:InstanceID><rasd:ResourceType>3</rasd:ResourceType><rasd:VirtualQuantity>1</rasd:VirtualQuantity></Item>
      <Item><rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits><rasd:InstanceID>2</rasd:InstanceID><rasd:ResourceType>4</rasd:ResourceType><rasd:VirtualQuantity>96</rasd:VirtualQuantity></Item>
      <Item><rasd:Address>0</rasd:Address><rasd:InstanceID>3</rasd:InstanceID><rasd:ResourceSubType>lsilogic</rasd:ResourceSubType><rasd:ResourceType>6</rasd:ResourceType></Item>
      <Item><rasd:AddressOnParent>0</rasd:AddressOnParent><rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource><rasd:InstanceID>4</rasd:InstanceID><rasd:Parent>3</rasd:Parent><rasd:ResourceType>17</rasd:ResourceType></Item>
      <Item><rasd:Address>00:50:56:01:02:03</rasd:Address><rasd:InstanceID>5</rasd:InstanceID><rasd:ResourceSubType>VmxNet3</rasd:ResourceSubType><rasd:ResourceType>10</rasd:ResourceType></Item>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>"#
    )
}

#[test]
fn an_ova_becomes_a_vm_and_hostile_archives_are_refused() {
    if !common::kvm_available("an_ova_becomes_a_vm_and_hostile_archives_are_refused") {
        return;
    }
    let d = Daemon::start("import-ova");
    let work = d.state_dir.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let raw = work.join("boot.raw");
    boot_disk(&d.state_dir.join("scratch"), &raw);
    run(
        "qemu-img",
        &[
            "convert",
            "-q",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            s(&raw),
            s(&work.join("appliance-disk1.vmdk")),
        ],
    );
    std::fs::write(work.join("appliance.ovf"), ovf("appliance-disk1.vmdk")).unwrap();
    let incoming = d.images().join("incoming");
    std::fs::create_dir_all(&incoming).unwrap();
    let ova = incoming.join("appliance.ova");
    run(
        "tar",
        &[
            "-cf",
            s(&ova),
            "-C",
            s(&work),
            "appliance.ovf",
            "appliance-disk1.vmdk",
        ],
    );
    let out = d.ok(&["import", s(&ova), "--net", "tap=kimp0"]);
    println!("{out}");
    assert!(out.contains("appliance: imported"), "{out}");
    assert!(out.contains("VmxNet3"), "{out}");
    let vm = d.json(&["vm", "show", "appliance"]);
    assert_eq!(vm["spec"]["memory_mib"], 96);
    assert_eq!(vm["spec"]["nets"][0]["tap"], "kimp0");
    assert_eq!(vm["spec"]["nets"][0]["mac"], "00:50:56:01:02:03");
    // The OVA's unpacked files are gone; the image stays in the library.
    let library = d.images().join("library");
    let leftovers: Vec<PathBuf> = std::fs::read_dir(&library)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // Hostile archives: an entry with a path, a symbolic link, two descriptors.
    let evil = work.join("evil");
    std::fs::create_dir_all(evil.join("sub")).unwrap();
    std::fs::write(evil.join("sub/x.ovf"), "x").unwrap();
    std::os::unix::fs::symlink("/etc/shadow", evil.join("link.vmdk")).unwrap();
    std::fs::write(evil.join("a.ovf"), ovf("a.vmdk")).unwrap();
    std::fs::write(evil.join("b.ovf"), ovf("b.vmdk")).unwrap();
    for (name, members, expect) in [
        ("path.ova", vec!["sub/x.ovf"], "not a plain file name"),
        ("link.ova", vec!["a.ovf", "link.vmdk"], "symbolic link"),
        ("two.ova", vec!["a.ovf", "b.ovf"], "exactly one"),
    ] {
        let path = incoming.join(name);
        let mut args = vec!["-cf", s(&path), "-C", s(&evil)];
        args.extend(members);
        run("tar", &args);
        let e = d.fails(&["import", s(&path), "--name", "evil"]);
        assert!(e.contains(expect), "{name}: {e}");
    }
    assert!(d.json(&["vm", "list"]).as_array().unwrap().len() == 1);
}
