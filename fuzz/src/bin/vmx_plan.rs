//! Fuzz target: a VMware `.vmx` file (`import::vmx`), read when a VM is imported: its
//! `key = "value"` lines and the plan made of them.
//!
//! Nothing may panic; a plan's name is one Keel accepts, its vCPUs and memory are within
//! Keel's limits, and no planned disk names a path (only files beside the VMX).
//!
//! Input: the VMX's bytes. Seeds: a typical VM (two SCSI disks, a CD-ROM, a snapshot delta, a
//! NIC), one naming a path, and a line without `=`.

#![no_main]

use import::vmx::{plan, Vmx};
use keel_fuzz::PlanOutcome as Outcome;
use keel_fuzz::Seed;

libfuzzer_sys::fuzz_target!(
    init: keel_fuzz::write_seeds("vmx_plan", seeds, run),
    |data: &[u8]| {
        run(data);
    }
);

fn run(data: &[u8]) -> Outcome {
    let Ok(vmx) = Vmx::parse(data) else {
        return Outcome::Refused;
    };
    let p = plan(&vmx);
    for d in &p.disks {
        assert!(!d.file.contains('/') && d.file.ends_with(".vmdk"), "{d:?}");
    }
    Outcome::of(&p)
}

fn seeds() -> Vec<Seed<Outcome>> {
    let seed = Seed::text;
    vec![
        seed(
            "typical",
            "displayName = \"db 1\"\nnumvcpus = \"2\"\nmemSize = \"2048\"\nscsi0:0.present = \"TRUE\"\nscsi0:0.fileName = \"db.vmdk\"\nscsi0:1.present = \"TRUE\"\nscsi0:1.fileName = \"db-logs.vmdk\"\nide1:0.present = \"TRUE\"\nide1:0.deviceType = \"cdrom-image\"\nide1:0.fileName = \"x.iso\"\nsata0:0.present = \"TRUE\"\nsata0:0.fileName = \"db-000002.vmdk\"\nethernet0.present = \"TRUE\"\nethernet0.address = \"00:50:56:01:02:03\"\n",
            Outcome::Planned {
                disks: 2,
                nics: 1,
                left: 2,
            },
        ),
        seed(
            "path_disk",
            "scsi0:0.present = \"TRUE\"\nscsi0:0.fileName = \"../../etc/x.vmdk\"\n",
            Outcome::Planned {
                disks: 0,
                nics: 0,
                left: 1,
            },
        ),
        seed("not_key_value", "displayName\n", Outcome::Refused),
    ]
}
