//! A small file system that loses power on command (FUSE, through the `fuser` crate): it
//! keeps, per file, what was made durable by the last fsync/fdatasync and the writes since
//! then. Reads see everything written (as a page cache would); a power cut keeps the durable
//! state plus any subset of the writes since the last sync that the caller picks (a disk may
//! persist unsynced writes in any order), and drops the rest.
//!
//! Files are given at mount time (their bytes become durable) and live in the mount's root;
//! the file system serves lookups, attributes, reads, writes, size changes, fallocate's
//! punch-hole and zero-range, and fsync. Opened files bypass the kernel's page cache
//! (`FOPEN_DIRECT_IO`), so every read and write reaches it.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, LockOwner, OpenFlags,
    ReplyAttr, ReplyData, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request, WriteFlags,
};

/// Bytes of a file, sparse: 4 KiB blocks that were ever written, the rest zero.
#[derive(Debug, Clone, Default)]
pub struct Bytes {
    size: u64,
    blocks: HashMap<u64, Box<[u8]>>,
}

const BLOCK: u64 = 4096;

impl Bytes {
    /// `size` bytes of zeroes, taking no memory.
    pub fn zeroes(size: u64) -> Bytes {
        Bytes {
            size,
            ..Bytes::default()
        }
    }

    pub fn from_vec(bytes: &[u8]) -> Bytes {
        let mut b = Bytes {
            size: bytes.len() as u64,
            ..Bytes::default()
        };
        for (i, chunk) in bytes.chunks(BLOCK as usize).enumerate() {
            if chunk.iter().any(|x| *x != 0) {
                b.write(i as u64 * BLOCK, chunk);
            }
        }
        b
    }

    pub fn len(&self) -> u64 {
        self.size
    }

    fn block(&mut self, index: u64) -> &mut [u8] {
        self.blocks
            .entry(index)
            .or_insert_with(|| vec![0u8; BLOCK as usize].into_boxed_slice())
    }

    pub fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        let end = (offset + len as u64).min(self.size);
        let mut out = Vec::with_capacity(end.saturating_sub(offset) as usize);
        let mut at = offset;
        while at < end {
            let (index, within) = (at / BLOCK, (at % BLOCK) as usize);
            let n = ((BLOCK as usize - within) as u64).min(end - at) as usize;
            match self.blocks.get(&index) {
                Some(b) => out.extend_from_slice(&b[within..within + n]),
                None => out.resize(out.len() + n, 0),
            }
            at += n as u64;
        }
        out
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut done = 0;
        while done < data.len() {
            let at = offset + done as u64;
            let (index, within) = (at / BLOCK, (at % BLOCK) as usize);
            let n = (BLOCK as usize - within).min(data.len() - done);
            self.block(index)[within..within + n].copy_from_slice(&data[done..done + n]);
            done += n;
        }
        self.size = self.size.max(offset + data.len() as u64);
    }

    fn zero(&mut self, offset: u64, len: u64) {
        let end = (offset + len).min(self.size);
        let mut at = offset;
        while at < end {
            let (index, within) = (at / BLOCK, (at % BLOCK) as usize);
            let n = ((BLOCK as usize - within) as u64).min(end - at) as usize;
            if within == 0 && n == BLOCK as usize {
                self.blocks.remove(&index);
            } else if let Some(b) = self.blocks.get_mut(&index) {
                b[within..within + n].fill(0);
            }
            at += n as u64;
        }
    }

    fn set_size(&mut self, size: u64) {
        if size < self.size {
            self.zero(size, self.size - size);
            self.blocks.retain(|index, _| index * BLOCK < size);
        }
        self.size = size;
    }

    /// Writes the bytes to `path` as a sparse file.
    pub fn save(&self, path: &Path) {
        use std::os::unix::fs::FileExt;
        let file = std::fs::File::create(path).unwrap();
        file.set_len(self.size).unwrap();
        for (index, block) in &self.blocks {
            let at = index * BLOCK;
            let n = (self.size - at).min(BLOCK) as usize;
            file.write_all_at(&block[..n], at).unwrap();
        }
    }
}

/// A change not yet made durable.
#[derive(Debug, Clone)]
enum Pending {
    Write {
        offset: u64,
        data: Vec<u8>,
    },
    Zero {
        offset: u64,
        len: u64,
        keep_size: bool,
    },
    Size(u64),
}

impl Pending {
    fn apply(&self, bytes: &mut Bytes) {
        match self {
            Pending::Write { offset, data } => bytes.write(*offset, data),
            Pending::Zero {
                offset,
                len,
                keep_size,
            } => {
                if !keep_size && bytes.size < offset + len {
                    bytes.set_size(offset + len);
                }
                bytes.zero(*offset, *len);
            }
            Pending::Size(size) => bytes.set_size(*size),
        }
    }
}

#[derive(Debug)]
struct SimFile {
    name: String,
    durable: Bytes,
    current: Bytes,
    pending: Vec<Pending>,
}

/// One entry of the history: a change to a file, or a sync of it.
#[derive(Debug, Clone)]
enum Event {
    Change(Pending),
    Sync,
}

/// What the file system holds; shared between the FUSE session and the test.
#[derive(Debug, Default)]
pub struct State {
    files: Vec<SimFile>,
    /// Each file's bytes at mount time.
    initial: Vec<Bytes>,
    /// Every change and sync since the mount, in order: (file index, event).
    history: Vec<(usize, Event)>,
    /// fsync calls seen.
    pub syncs: u64,
}

impl State {
    fn file(&mut self, ino: INodeNo) -> Option<&mut SimFile> {
        let i = u64::from(ino).checked_sub(2)? as usize;
        self.files.get_mut(i)
    }

    /// Applies `change` to the file seen as `ino`, remembering it; false if no such file.
    fn change(&mut self, ino: INodeNo, change: Pending) -> bool {
        let Some(i) = (u64::from(ino).checked_sub(2)).map(|i| i as usize) else {
            return false;
        };
        let Some(f) = self.files.get_mut(i) else {
            return false;
        };
        change.apply(&mut f.current);
        f.pending.push(change.clone());
        self.history.push((i, Event::Change(change)));
        true
    }

    /// How many events the history holds, and where its syncs are.
    pub fn history(&self) -> (usize, Vec<usize>) {
        let syncs = self
            .history
            .iter()
            .enumerate()
            .filter(|(_, (_, e))| matches!(e, Event::Sync))
            .map(|(i, _)| i)
            .collect();
        (self.history.len(), syncs)
    }

    /// What the files would hold had the power been cut just before event `cut` of the
    /// history: per file, every change up to its last sync before `cut`, then those after it
    /// that `keep` picks (asked in order). (name, bytes) per file.
    pub fn replay(&self, cut: usize, keep: &mut dyn FnMut() -> bool) -> Vec<(String, Bytes)> {
        let mut durable = self.initial.clone();
        let mut pending: Vec<Vec<&Pending>> = vec![Vec::new(); self.files.len()];
        for (file, event) in &self.history[..cut.min(self.history.len())] {
            match event {
                Event::Change(p) => pending[*file].push(p),
                Event::Sync => {
                    for p in pending[*file].drain(..) {
                        p.apply(&mut durable[*file]);
                    }
                }
            }
        }
        for (file, changes) in pending.into_iter().enumerate() {
            for p in changes {
                if keep() {
                    p.apply(&mut durable[file]);
                }
            }
        }
        self.files
            .iter()
            .map(|f| f.name.clone())
            .zip(durable)
            .collect()
    }

    /// Power is cut: each file keeps its durable bytes and those writes since its last sync
    /// for which `keep` says yes (asked in order, per file), and loses the rest. Returns how
    /// many unsynced changes were dropped and kept.
    pub fn power_cut(&mut self, keep: &mut dyn FnMut() -> bool) -> (usize, usize) {
        let (mut dropped, mut kept) = (0, 0);
        for f in &mut self.files {
            for p in f.pending.drain(..) {
                if keep() {
                    p.apply(&mut f.durable);
                    kept += 1;
                } else {
                    dropped += 1;
                }
            }
            f.current = f.durable.clone();
        }
        (dropped, kept)
    }

    /// The durable bytes of `name`.
    pub fn durable(&self, name: &str) -> Option<&Bytes> {
        self.files
            .iter()
            .find(|f| f.name == name)
            .map(|f| &f.durable)
    }
}

const TTL: Duration = Duration::ZERO;

fn attr(ino: INodeNo, size: u64, kind: FileType) -> FileAttr {
    FileAttr {
        ino,
        size,
        blocks: size.div_ceil(512),
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind,
        perm: if kind == FileType::Directory {
            0o755
        } else {
            0o644
        },
        nlink: if kind == FileType::Directory { 2 } else { 1 },
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

struct PowerLossFs(Arc<Mutex<State>>);

impl PowerLossFs {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Filesystem for PowerLossFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let state = self.state();
        let found = (parent == INodeNo::ROOT)
            .then(|| state.files.iter().position(|f| OsStr::new(&f.name) == name))
            .flatten();
        match found {
            Some(i) => {
                let ino = INodeNo(i as u64 + 2);
                let size = state.files[i].current.len();
                reply.entry(
                    &TTL,
                    &attr(ino, size, FileType::RegularFile),
                    fuser::Generation(0),
                );
            }
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino == INodeNo::ROOT {
            return reply.attr(&TTL, &attr(ino, 0, FileType::Directory));
        }
        match self.state().file(ino) {
            Some(f) => reply.attr(&TTL, &attr(ino, f.current.len(), FileType::RegularFile)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut state = self.state();
        if let Some(size) = size {
            state.change(ino, Pending::Size(size));
        }
        match state.file(ino) {
            Some(f) => reply.attr(&TTL, &attr(ino, f.current.len(), FileType::RegularFile)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let mut state = self.state();
        let Some(f) = state.file(ino) else {
            return reply.error(Errno::ENOENT);
        };
        reply.data(&f.current.read(offset, size as usize));
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let change = Pending::Write {
            offset,
            data: data.to_vec(),
        };
        if self.state().change(ino, change) {
            reply.written(data.len() as u32);
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2): not a sync.
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut state = self.state();
        state.syncs += 1;
        let Some(f) = state.file(ino) else {
            return reply.error(Errno::ENOENT);
        };
        for p in f.pending.drain(..) {
            p.apply(&mut f.durable);
        }
        let i = u64::from(ino) as usize - 2;
        state.history.push((i, Event::Sync));
        reply.ok();
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let keep_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let zeroing = mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0;
        if !zeroing
            || mode
                & !(libc::FALLOC_FL_PUNCH_HOLE
                    | libc::FALLOC_FL_ZERO_RANGE
                    | libc::FALLOC_FL_KEEP_SIZE)
                != 0
        {
            return reply.error(Errno::EOPNOTSUPP);
        }
        let change = Pending::Zero {
            offset,
            len: length,
            keep_size,
        };
        if self.state().change(ino, change) {
            reply.ok();
        } else {
            reply.error(Errno::ENOENT);
        }
    }
}

/// A mounted power-loss file system; unmounted when dropped.
pub struct Mounted {
    pub state: Arc<Mutex<State>>,
    _session: fuser::BackgroundSession,
}

/// Mounts the file system at `mountpoint` (an empty directory) holding `files` (name, bytes),
/// all durable. Needs /dev/fuse and root (the mount is made by the kernel's mount(2)).
pub fn mount(mountpoint: &Path, files: Vec<(String, Bytes)>) -> Mounted {
    let initial = files.iter().map(|(_, b)| b.clone()).collect();
    let state = Arc::new(Mutex::new(State {
        initial,
        history: Vec::new(),
        files: files
            .into_iter()
            .map(|(name, bytes)| SimFile {
                name,
                durable: bytes.clone(),
                current: bytes,
                pending: Vec::new(),
            })
            .collect(),
        syncs: 0,
    }));
    let mut config = fuser::Config::default();
    // The VMM may run under another uid than the test (a jailed VMM does).
    config.acl = fuser::SessionACL::All;
    config.mount_options = vec![
        fuser::MountOption::FSName("keel-powerloss".into()),
        fuser::MountOption::DefaultPermissions,
    ];
    let session = fuser::spawn_mount(PowerLossFs(state.clone()), mountpoint, &config)
        .unwrap_or_else(|e| {
            panic!(
                "mounting the power-loss test file system at {} failed: {e}; it needs /dev/fuse \
                 and root",
                mountpoint.display()
            )
        });
    Mounted {
        state,
        _session: session,
    }
}
