use super::*;

fn limits() -> Limits {
    Limits {
        address_space: address_space_now() + (256 << 20),
        cpu_secs: 1,
        wall: Duration::from_secs(5),
    }
}

/// Runs `work` isolated with nothing kept but the pipe; the answer or the error.
fn run(work: impl FnOnce(&mut File) -> std::io::Result<()>) -> Result<Vec<u8>, String> {
    isolated(work, &[], &limits(), 100)
}

#[test]
fn the_child_answers_and_each_way_it_can_fail_is_named() {
    assert_eq!(run(|out| out.write_all(b"answer")).unwrap(), b"answer");
    let e = run(|out| out.write_all(&[0; 101])).unwrap_err();
    assert!(e.contains("larger than any"), "{e}");
    let e = run(|_| std::process::abort()).unwrap_err();
    assert!(e.contains("aborted"), "{e}");
    let e = run(|_| panic!("on purpose")).unwrap_err();
    assert!(e.contains("panicked"), "{e}");
    // An allocation beyond the address-space limit fails (and Rust aborts on it; its
    // message to stderr is refused with EPERM, not fatal).
    let e = run(|out| out.write_all(&vec![1u8; 1 << 30][..1])).unwrap_err();
    assert!(e.contains("aborted"), "{e}");
    // A loop is ended by the CPU limit; a child that sleeps, by the parent's deadline.
    #[allow(clippy::empty_loop)]
    let e = run(|_| loop {}).unwrap_err();
    assert!(e.contains("CPU time"), "{e}");
    let e = isolated(
        |_| {
            // Blocks in an allowed call (a futex wait nobody wakes), as a read of a stalled
            // file would.
            let word = 0u32;
            // SAFETY: FUTEX_WAIT on a valid, aligned word that holds the expected 0.
            unsafe {
                libc::syscall(
                    libc::SYS_futex,
                    &word as *const u32,
                    libc::FUTEX_WAIT,
                    0,
                    std::ptr::null::<libc::timespec>(),
                )
            };
            Ok(())
        },
        &[],
        &Limits {
            wall: Duration::from_millis(300),
            ..limits()
        },
        100,
    )
    .unwrap_err();
    assert!(e.contains("no answer within"), "{e}");
}

#[test]
fn the_sandbox_refuses_what_the_reader_does_not_need() {
    // Opening a file fails (EPERM), and so does writing anywhere but the pipe.
    let answer = run(|out| {
        let open = File::open("/etc/hostname").map_err(|e| e.raw_os_error());
        // SAFETY: writes one byte from a valid buffer to descriptor 2 (closed in the child).
        let stderr = unsafe { libc::write(2, b"x".as_ptr().cast(), 1) };
        out.write_all(format!("{open:?} {stderr}").as_bytes())
    })
    .unwrap();
    assert_eq!(
        String::from_utf8(answer).unwrap(),
        format!("Err(Some({})) -1", libc::EPERM)
    );
    // Signalling another process (here the parent) kills the child instead.
    let e = run(|_| {
        // SAFETY: getppid has no preconditions; tgkill with signal 0 only checks.
        unsafe {
            let parent = libc::getppid();
            libc::syscall(libc::SYS_tgkill, parent, parent, 0);
        }
        Ok(())
    })
    .unwrap_err();
    assert!(e.contains("forbids"), "{e}");
    // Mapping a file (the pipe here) rather than anonymous memory: killed.
    let e = run(|out| {
        // SAFETY: asks for a mapping of the pipe; the filter stops the call.
        unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ,
                libc::MAP_SHARED,
                out.as_raw_fd(),
                0,
            )
        };
        Ok(())
    })
    .unwrap_err();
    assert!(e.contains("forbids"), "{e}");
    // Inherited descriptors are closed: an open file of the parent is gone in the child.
    let inherited = File::open("/proc/self/status").unwrap();
    let fd = inherited.as_raw_fd();
    let answer = run(move |out| {
        // SAFETY: F_GETFD on a descriptor number; fails with EBADF if it is not open.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        out.write_all(flags.to_string().as_bytes())
    })
    .unwrap();
    assert_eq!(answer, b"-1");
}

#[test]
fn answers_round_trip_and_garbage_is_refused() {
    let found = BootFiles {
        kernel: vec![1; 100],
        initrd: Some(vec![2; 50]),
        cmdline: "root=/dev/vda1".into(),
        source: "partition 1: /vmlinuz".into(),
    };
    let bytes = run_send(Ok(found));
    let back = decode(bytes.clone(), 150).unwrap().unwrap();
    assert_eq!(back.kernel, vec![1; 100]);
    assert_eq!(back.initrd, Some(vec![2; 50]));
    assert_eq!(back.cmdline, "root=/dev/vda1");
    assert_eq!(back.source, "partition 1: /vmlinuz");
    // Kernel and initrd over the limit together, a cut answer, trailing bytes, a bad tag.
    assert!(decode(bytes.clone(), 149).is_none());
    for cut in 0..bytes.len() {
        assert!(decode(bytes[..cut].to_vec(), 150).is_none(), "cut at {cut}");
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(decode(longer, 150).is_none());
    assert!(decode(vec![7], 150).is_none());
    let not_found = run_send(Err(disk::boot::Error::NotFound {
        searched: "nothing here".into(),
    }));
    let reason = decode(not_found, 100).unwrap().unwrap_err();
    assert!(reason.contains("nothing here"), "{reason}");
}

/// What `send` writes, through a real pipe.
fn run_send(result: Result<BootFiles, disk::boot::Error>) -> Vec<u8> {
    let mut fds = [0; 2];
    // SAFETY: pipe fills the two-element array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: both descriptors are new and owned here.
    let (mut reader, mut writer) =
        unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
    send(&mut writer, result).unwrap();
    drop(writer);
    let mut out = Vec::new();
    reader.read_to_end(&mut out).unwrap();
    out
}
