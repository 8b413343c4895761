//! The jailed process's identity: the VM's uid and gid, no supplementary groups, no
//! capabilities in any set (bounding and ambient included), and `no_new_privs`, so that no
//! exec can give any back.

use crate::{check, step, Error, Result};

/// The highest capability number this kernel knows; read before the root file system goes.
pub(crate) fn last_capability() -> Result<u32> {
    let text = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .map_err(step("reading /proc/sys/kernel/cap_last_cap"))?;
    text.trim().parse().map_err(|_| Error::Step {
        what: "reading /proc/sys/kernel/cap_last_cap".into(),
        source: std::io::Error::other(format!("not a number: {text:?}")),
    })
}

/// `struct __user_cap_header_struct` of capset(2).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

/// `struct __user_cap_data_struct`; version 3 takes two of them (64 capability bits).
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

pub(crate) fn drop_to(uid: u32, gid: u32, last_cap: u32) -> Result<()> {
    if uid == 0 || gid == 0 {
        return Err(Error::Step {
            what: "choosing the jail's identity".into(),
            source: std::io::Error::other("uid and gid must not be 0"),
        });
    }
    // The bounding set first: dropping from it needs CAP_SETPCAP, which goes with the uid.
    for cap in 0..=last_cap {
        // SAFETY: prctl with plain integer arguments.
        check(unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) })
            .map_err(step(format!(
                "dropping capability {cap} from the bounding set"
            )))?;
    }
    // SAFETY: prctl with plain integer arguments.
    check(unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    })
    .map_err(step("clearing the ambient capabilities"))?;
    // SAFETY: an empty group list (null pointer, length 0).
    check(unsafe { libc::setgroups(0, std::ptr::null()) })
        .map_err(step("dropping the supplementary groups"))?;
    // SAFETY: setresgid/setresuid take plain ids.
    check(unsafe { libc::setresgid(gid, gid, gid) }).map_err(step(format!("setresgid({gid})")))?;
    // SAFETY: as above.
    check(unsafe { libc::setresuid(uid, uid, uid) }).map_err(step(format!("setresuid({uid})")))?;
    // Leaving uid 0 cleared the permitted and effective sets; the inheritable set is
    // cleared here, so no capability is left anywhere.
    let header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: capset reads one header and two data structs, which live across the call.
    check(unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) } as libc::c_int)
        .map_err(step("clearing every capability set"))?;
    // SAFETY: prctl with plain integer arguments.
    check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })
        .map_err(step("setting no_new_privs"))?;
    Ok(())
}
