//! Disk images under the daemon: a VM runs on a qcow2 overlay whose backing file lies in the
//! image directories; a backing file anywhere else keeps the VM from starting, and is never
//! opened.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use common::{qemu_img, s, tool as mtools};

const STATE_TIMEOUT: Duration = Duration::from_secs(30);

/// Waits until the console log holds `text`; the log's contents.
fn wait_console(d: &Daemon, vm: &str, text: &str) -> String {
    let log = d.json(&["vm", "show", vm])["console_log"]
        .as_str()
        .unwrap()
        .to_string();
    let deadline = Instant::now() + STATE_TIMEOUT;
    loop {
        let out = std::fs::read_to_string(&log).unwrap_or_default();
        if out.contains(text) {
            return out;
        }
        assert!(Instant::now() < deadline, "no '{text}' in {log}:\n{out}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_vm_runs_on_a_qcow2_overlay_and_backing_files_stay_in_the_image_directories() {
    if !common::kvm_available("a_vm_runs_on_a_qcow2_overlay") {
        return;
    }
    let d = Daemon::start("images-qcow2");
    let images = d.images();
    let base = images.join("base.raw");
    let overlay = images.join("overlay.qcow2");
    qemu_img(&["create", "-q", "-f", "raw", s(&base), "8M"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        s(&overlay),
    ]);
    let base_before = std::fs::read(&base).unwrap();
    let kernel = common::probe_elf();
    let disk = format!("path={},format=qcow2", overlay.display());
    d.ok(&[
        "vm",
        "create",
        "thin",
        "--kernel",
        s(&kernel),
        "--memory",
        "64",
        "--disk",
        &disk,
        "--cmdline",
        "probe.blk_records=256 probe.poweroff",
    ]);
    assert_eq!(
        d.json(&["vm", "show", "thin"])["spec"]["disks"][0]["format"],
        "qcow2"
    );
    d.ok(&["vm", "start", "thin"]);
    let out = wait_console(&d, "thin", "PROBE blk_done");
    assert!(out.contains("PROBE blk_verify ok 256"), "{out}");
    assert!(out.contains("PROBE blk_discard ok"), "{out}");
    d.wait_state("thin", "stopped", STATE_TIMEOUT);
    let check = qemu_img(&["check", "-f", "qcow2", s(&overlay)]);
    assert!(check.contains("No errors were found"), "{check}");
    assert!(
        std::fs::read(&base).unwrap() == base_before,
        "the backing file was written"
    );

    // A backing file outside the image directories: defined, refused at start with the rule,
    // and not opened (its access time would not tell; the rule is checked before the open).
    let outside = std::env::temp_dir().join(format!("keel-outside-{}.raw", std::process::id()));
    std::fs::write(&outside, vec![0u8; 1 << 20]).unwrap();
    let escaping = images.join("escaping.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        s(&outside),
        "-F",
        "raw",
        s(&escaping),
    ]);
    let disk = format!("path={},format=qcow2", escaping.display());
    d.ok(&[
        "vm",
        "create",
        "escape",
        "--kernel",
        s(&kernel),
        "--memory",
        "64",
        "--disk",
        &disk,
    ]);
    let refused = d.fails(&["vm", "start", "escape"]);
    assert!(
        refused.contains("backing file") && refused.contains("only under its image directories"),
        "{refused}"
    );
    println!("start refused: {refused}");
    assert_eq!(d.state("escape"), "stopped");
    let _ = std::fs::remove_file(&outside);
}

fn sha256_of(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn the_library_imports_clones_and_keeps_what_is_used() {
    if !common::kvm_available("the_library_imports_clones_and_keeps_what_is_used") {
        return;
    }
    let d = Daemon::start("images-library");
    let incoming = d.images().join("incoming");
    std::fs::create_dir_all(&incoming).unwrap();
    let raw = incoming.join("base.raw");
    qemu_img(&["create", "-q", "-f", "raw", s(&raw), "64M"]);
    let io = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 1M 2M",
            "-c",
            "write -P 0xc3 40M 64k",
        ])
        .arg(&raw)
        .output()
        .unwrap();
    assert!(io.status.success(), "{io:?}");
    let vmdk = incoming.join("vmware.vmdk");
    qemu_img(&[
        "convert",
        "-q",
        "-f",
        "raw",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        s(&raw),
        s(&vmdk),
    ]);
    let qcow2 = incoming.join("q.qcow2");
    qemu_img(&[
        "convert",
        "-q",
        "-f",
        "raw",
        "-O",
        "qcow2",
        s(&raw),
        s(&qcow2),
    ]);

    // Imports: raw as it is, the VMDK converted (byte-identical to the raw it came from),
    // qcow2 as it is.
    let out = d.ok(&["image", "import", s(&raw)]);
    assert!(out.contains("base: imported, 64.0 MiB raw"), "{out}");
    d.ok(&["image", "import", s(&vmdk), "--name", "fromvmware"]);
    d.ok(&["image", "import", s(&qcow2)]);
    let list = d.json(&["image", "list"]);
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["base", "fromvmware", "q"]);
    let converted = list[1]["path"].as_str().unwrap();
    assert_eq!(sha256_of(Path::new(converted)), sha256_of(&raw));
    assert_eq!(list[1]["format"], "raw");
    assert_eq!(list[2]["format"], "qcow2");
    // Sparse where the source was: 2 MiB + 64 KiB of data in 64 MiB.
    assert!(
        list[1]["allocated_bytes"].as_u64().unwrap() < 8 << 20,
        "{}",
        list[1]
    );

    // Refused: a source outside the image directories, a name in use, no format.
    let outside = std::env::temp_dir().join(format!("keel-lib-{}.raw", std::process::id()));
    std::fs::write(&outside, vec![0u8; 1 << 20]).unwrap();
    let e = d.fails(&["image", "import", s(&outside), "--name", "x"]);
    assert!(e.contains("only under its image directories"), "{e}");
    let _ = std::fs::remove_file(&outside);
    let e = d.fails(&["image", "import", s(&raw)]);
    assert!(e.contains("exists"), "{e}");
    let odd = incoming.join("disk.bin");
    std::fs::write(&odd, vec![0u8; 1 << 20]).unwrap();
    let e = d.fails(&["image", "import", s(&odd)]);
    assert!(e.contains("say its format"), "{e}");

    // Following an import without waiting: the operation, then the image.
    let op = d.json(&["image", "import", s(&raw), "--name", "later", "--no-wait"]);
    assert_eq!(op["kind"], "image-import");
    let deadline = Instant::now() + STATE_TIMEOUT;
    while d.keel(&["image", "show", "later"]).status.code() != Some(0) {
        assert!(Instant::now() < deadline, "the import never finished");
        std::thread::sleep(Duration::from_millis(20));
    }

    // A thin clone: defined in milliseconds, the probe writes and verifies records on it,
    // the image stays as it was.
    let image_before = sha256_of(Path::new(list[0]["path"].as_str().unwrap()));
    let kernel = common::probe_elf();
    let started = Instant::now();
    d.ok(&[
        "vm",
        "create",
        "thin",
        "--kernel",
        s(&kernel),
        "--memory",
        "64",
        "--disk",
        "image=base,size=128M",
        "--cmdline",
        "probe.blk_records=128 probe.poweroff",
    ]);
    println!(
        "vm create with a clone of a 64 MiB image: {:?}",
        started.elapsed()
    );
    let disk = &d.json(&["vm", "show", "thin"])["spec"]["disks"][0];
    assert_eq!(disk["image"], "base");
    assert_eq!(disk["format"], "qcow2");
    assert_eq!(disk["size"], 128 << 20);
    let clone = disk["path"].as_str().unwrap().to_string();
    assert!(clone.ends_with("/vms/thin/disk0.qcow2"), "{clone}");
    d.ok(&["vm", "start", "thin"]);
    let out = wait_console(&d, "thin", "PROBE blk_done");
    assert!(out.contains("PROBE blk_verify ok 128"), "{out}");
    d.wait_state("thin", "stopped", STATE_TIMEOUT);
    let check = qemu_img(&["check", "-f", "qcow2", &clone]);
    assert!(check.contains("No errors were found"), "{check}");
    assert_eq!(
        sha256_of(Path::new(list[0]["path"].as_str().unwrap())),
        image_before
    );

    // Used images stay; once the VM is gone, its clone goes and the image can be removed.
    let e = d.fails(&["image", "rm", "base"]);
    assert!(e.contains("used by VM(s) thin"), "{e}");
    d.ok(&["vm", "rm", "thin"]);
    assert!(!Path::new(&clone).exists(), "the VM's clone outlived it");
    d.ok(&["image", "rm", "base"]);
    assert!(!Path::new(list[0]["path"].as_str().unwrap()).exists());
    let e = d.fails(&["image", "show", "base"]);
    assert!(e.contains("no image named 'base'"), "{e}");
}

#[test]
fn cloud_init_data_reaches_the_vm_as_a_nocloud_seed() {
    if !common::kvm_available("cloud_init_data_reaches_the_vm_as_a_nocloud_seed") {
        return;
    }
    let d = Daemon::start("images-cidata");
    let work = d.state_dir.join("ci");
    std::fs::create_dir_all(&work).unwrap();
    let user = work.join("user-data");
    let network = work.join("network-config");
    std::fs::write(&user, "#cloud-config\nhostname: web\npackages: [nginx]\n").unwrap();
    std::fs::write(
        &network,
        "version: 2\nethernets:\n  eth0:\n    dhcp4: true\n",
    )
    .unwrap();
    let kernel = common::probe_elf();
    let option = format!(
        "user-data={},network-config={}",
        user.display(),
        network.display()
    );
    d.ok(&[
        "vm",
        "create",
        "web",
        "--kernel",
        s(&kernel),
        "--memory",
        "64",
        "--cloud-init",
        &option,
        "--cmdline",
        "probe.power_button",
    ]);
    let spec = &d.json(&["vm", "show", "web"])["spec"];
    assert_eq!(
        spec["cloud_init"]["user_data"],
        "#cloud-config\nhostname: web\npackages: [nginx]\n"
    );
    d.ok(&["vm", "start", "web"]);
    // The VMM got the seed as its last disk, read-only.
    let run_dir = d.state_dir.join("vms").join("web");
    let vm_json = std::fs::read_to_string(run_dir.join("vm.json")).unwrap_or_default();
    let seed = d.images().join("vms").join("web").join("cidata.img");
    assert!(vm_json.contains(s(&seed)), "{vm_json}");
    // Read back with Debian's own FAT tools.
    let image = format!("{}", seed.display());
    let label = mtools("mlabel", &["-s", "-i", &image, "::"]);
    assert!(label.contains("CIDATA"), "{label}");
    let listing = mtools("mdir", &["-b", "-i", &image, "::"]);
    for f in ["user-data", "meta-data", "network-config"] {
        assert!(
            listing.to_ascii_lowercase().contains(f),
            "{f} missing:\n{listing}"
        );
    }
    assert_eq!(
        mtools("mtype", &["-i", &image, "::user-data"]),
        std::fs::read_to_string(&user).unwrap()
    );
    assert_eq!(
        mtools("mtype", &["-i", &image, "::meta-data"]),
        "instance-id: web\nlocal-hostname: web\n"
    );
    d.ok(&["vm", "stop", "web"]);
    d.ok(&["vm", "rm", "web"]);
    assert!(!seed.exists(), "the seed outlived its VM");
    // Refused: user-data too large for a definition.
    std::fs::write(&user, "x".repeat(api::vm::MAX_CLOUD_INIT_BYTES + 1)).unwrap();
    let option = format!("user-data={}", user.display());
    let e = d.fails(&[
        "vm",
        "create",
        "big",
        "--kernel",
        s(&kernel),
        "--cloud-init",
        &option,
    ]);
    assert!(e.contains("at most 1 MiB"), "{e}");
}

#[test]
fn a_stopped_vm_is_cloned_with_its_disks() {
    if !common::kvm_available("a_stopped_vm_is_cloned_with_its_disks") {
        return;
    }
    let d = Daemon::start("images-clone");
    let incoming = d.images().join("incoming");
    std::fs::create_dir_all(&incoming).unwrap();
    let raw = incoming.join("base.raw");
    qemu_img(&["create", "-q", "-f", "raw", s(&raw), "32M"]);
    d.ok(&["image", "import", s(&raw)]);
    let data = d.images().join("data.raw");
    qemu_img(&["create", "-q", "-f", "raw", s(&data), "8M"]);
    let kernel = common::probe_elf();
    let data_disk = format!("path={}", data.display());
    d.ok(&[
        "vm",
        "create",
        "a",
        "--kernel",
        s(&kernel),
        "--memory",
        "64",
        "--disk",
        "image=base",
        "--disk",
        &data_disk,
        "--cmdline",
        "probe.blk_records=64 probe.poweroff",
    ]);
    d.ok(&["vm", "start", "a"]);
    d.wait_state("a", "stopped", STATE_TIMEOUT);
    // Running VMs are not cloned.
    d.ok(&[
        "vm",
        "create",
        "busy",
        "--kernel",
        s(&kernel),
        "--memory",
        "64",
        "--cmdline",
        "probe.power_button",
    ]);
    d.ok(&["vm", "start", "busy"]);
    let e = d.fails(&["vm", "clone", "busy", "busy2"]);
    assert!(e.contains("stop it first"), "{e}");
    d.ok(&["vm", "stop", "busy"]);

    d.ok(&["vm", "clone", "a", "b"]);
    let a = d.json(&["vm", "show", "a"]);
    let b = d.json(&["vm", "show", "b"]);
    assert_eq!(b["spec"]["disks"][0]["image"], "base");
    let (a0, b0) = (
        a["spec"]["disks"][0]["path"].as_str().unwrap().to_string(),
        b["spec"]["disks"][0]["path"].as_str().unwrap().to_string(),
    );
    let (a1, b1) = (
        a["spec"]["disks"][1]["path"].as_str().unwrap().to_string(),
        b["spec"]["disks"][1]["path"].as_str().unwrap().to_string(),
    );
    assert!(
        b0.ends_with("/vms/b/disk0.qcow2") && b1.ends_with("/vms/b/disk1.raw"),
        "{b0} {b1}"
    );
    // The copies hold what the VM wrote: the overlay as QEMU reads it, the raw disk byte for byte.
    let as_raw = |p: &str, out: &str| {
        let out = d.state_dir.join(out);
        qemu_img(&["convert", "-q", "-f", "qcow2", "-O", "raw", p, s(&out)]);
        sha256_of(&out)
    };
    assert_eq!(as_raw(&a0, "a0.raw"), as_raw(&b0, "b0.raw"));
    assert_eq!(sha256_of(Path::new(&a1)), sha256_of(Path::new(&b1)));
    let check = qemu_img(&["check", "-f", "qcow2", &b0]);
    assert!(check.contains("No errors were found"), "{check}");
    // Both are clones of the image now.
    let e = d.fails(&["image", "rm", "base"]);
    assert!(e.contains("a, b"), "{e}");
    // The copy runs.
    d.ok(&["vm", "start", "b"]);
    d.wait_state("b", "stopped", STATE_TIMEOUT);
    let e = d.fails(&["vm", "clone", "a", "b"]);
    assert!(e.contains("exists"), "{e}");
}
