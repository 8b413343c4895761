//! The QEMU machine the `moves` and `migrate` benchmarks run the probe in: microvm with KVM,
//! one vCPU, the serial port into `DIR/console.log`, QMP on `DIR/qmp.sock`.

use std::path::Path;
use std::process::Command;

/// Adds the machine's arguments to `cmd` (a QEMU, or a wrapper that runs one).
pub fn probe_machine(cmd: &mut Command, memory_mib: u64, dir: &Path, probe: &Path, cmdline: &str) {
    cmd.args(["-M", "microvm", "-accel", "kvm"])
        .args(["-cpu", "host,-arch-capabilities"])
        .args(["-m", &memory_mib.to_string(), "-smp", "1"])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .arg("-chardev")
        .arg(format!(
            "file,id=console,append=on,path={}",
            dir.join("console.log").display()
        ))
        .args(["-serial", "chardev:console"])
        .arg("-qmp")
        .arg(format!(
            "unix:{},server=on,wait=off",
            dir.join("qmp.sock").display()
        ))
        .arg("-kernel")
        .arg(probe)
        .args(["-append", cmdline]);
}
