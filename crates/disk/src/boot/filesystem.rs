//! The search for boot files inside one ext2/3/4 filesystem of the boot disk.
//!
//! Paths are resolved here, one component at a time, and `ext4-view` is only asked about
//! paths without symbolic links: it reads a link's whole target into memory at the size the
//! inode claims, so a forged link would have it allocate terabytes and abort the VMM (found by
//! the fuzz target). Each link's size is checked first.

use ext4_view::{Ext4, Metadata};

use super::partitions::Partition;
use super::{entries, shown, BootFiles, Error, KERNEL_CEILING, MAX_KERNEL_BYTES, MEMORY_CEILING};

/// Boot entry files read at most per directory.
pub const MAX_ENTRIES: usize = 256;
/// Largest boot entry file read.
pub const MAX_ENTRY_BYTES: u64 = 64 * 1024;
/// Longest symbolic link target followed (Linux's PATH_MAX).
pub const MAX_LINK_BYTES: u64 = 4096;
/// Most symbolic links followed in one path (Linux's limit).
pub const MAX_LINKS: usize = 40;
/// Most path components walked in one lookup, links included.
const MAX_COMPONENTS: usize = 1024;
const ENTRY_DIRS: [&str; 2] = ["/loader/entries", "/boot/loader/entries"];
const KERNEL_LINKS: [(&str, &str); 2] = [
    ("/vmlinuz", "/initrd.img"),
    ("/boot/vmlinuz", "/boot/initrd.img"),
];

/// A path resolved (without links) and what it names, or why it could not be.
type Lookup = Result<(String, Metadata), String>;

pub(super) struct Filesystem {
    fs: Ext4,
    partition: Partition,
    max_bytes: u64,
}

impl Filesystem {
    pub(super) fn new(fs: Ext4, partition: Partition, max_bytes: u64) -> Self {
        Self {
            fs,
            partition,
            max_bytes,
        }
    }

    /// The boot files this filesystem names, if any.
    pub(super) fn boot_files(&self) -> Result<Option<BootFiles>, Error> {
        for dir in ENTRY_DIRS {
            if let Some(entry) = entries::choose(self.entries(dir)) {
                return self.files_of_entry(dir, &entry).map(Some);
            }
        }
        for (kernel, initrd) in KERNEL_LINKS {
            let Some(kernel_file) = self.regular_file(kernel) else {
                continue;
            };
            let kernel_bytes = self.read(
                "kernel",
                kernel,
                Ok(kernel_file),
                self.kernel_limit(),
                KERNEL_CEILING,
            )?;
            let initrd = match self.regular_file(initrd) {
                Some(file) => Some(self.read(
                    "initrd",
                    initrd,
                    Ok(file),
                    self.initrd_limit(&kernel_bytes),
                    MEMORY_CEILING,
                )?),
                None => None,
            };
            let root = match self.partition.number {
                Some(n) => format!("root=/dev/vda{n} ro"),
                None => "root=/dev/vda ro".to_string(),
            };
            return Ok(Some(BootFiles {
                kernel: kernel_bytes,
                initrd,
                cmdline: root,
                source: format!("{}: {kernel}", self.partition),
            }));
        }
        Ok(None)
    }

    /// The largest kernel read: a fixed ceiling, and no more than guest memory.
    fn kernel_limit(&self) -> u64 {
        self.max_bytes.min(MAX_KERNEL_BYTES)
    }

    /// What the initrds together may take: guest memory less the kernel.
    fn initrd_limit(&self, kernel: &[u8]) -> u64 {
        self.max_bytes.saturating_sub(kernel.len() as u64)
    }

    /// `path` with every symbolic link replaced by its target, and what it names.
    fn lookup(&self, path: &str) -> Lookup {
        let mut todo: Vec<String> = components(path);
        todo.reverse();
        let mut resolved: Vec<String> = Vec::new();
        let (mut links, mut walked) = (0, 0);
        while let Some(name) = todo.pop() {
            walked += 1;
            if walked > MAX_COMPONENTS {
                return Err("the path is too long".into());
            }
            if name == ".." {
                resolved.pop();
                continue;
            }
            let candidate = resolved
                .iter()
                .chain(std::iter::once(&name))
                .fold(String::new(), |path, c| path + "/" + c);
            let meta = self
                .fs
                .symlink_metadata(candidate.as_str())
                .map_err(|e| e.to_string())?;
            if !meta.is_symlink() {
                resolved.push(name);
                continue;
            }
            links += 1;
            if links > MAX_LINKS {
                return Err(format!("more than {MAX_LINKS} symbolic links"));
            }
            if meta.len() > MAX_LINK_BYTES {
                return Err(format!(
                    "the symbolic link {} claims a {}-byte target",
                    shown(&candidate),
                    meta.len()
                ));
            }
            let target = self
                .fs
                .read_link(candidate.as_str())
                .map_err(|e| e.to_string())?;
            let target = target
                .to_str()
                .map_err(|_| format!("the symbolic link {} is not UTF-8", shown(&candidate)))?;
            if target.starts_with('/') {
                resolved.clear();
            }
            todo.extend(components(target).into_iter().rev());
        }
        let path = format!("/{}", resolved.join("/"));
        let meta = self
            .fs
            .symlink_metadata(path.as_str())
            .map_err(|e| e.to_string())?;
        Ok((path, meta))
    }

    /// The parsable entries of one directory (none when it does not exist).
    fn entries(&self, dir: &str) -> Vec<entries::Entry> {
        let Ok((dir_path, meta)) = self.lookup(dir) else {
            return Vec::new();
        };
        if !meta.is_dir() {
            return Vec::new();
        }
        let Ok(listing) = self.fs.read_dir(dir_path.as_str()) else {
            return Vec::new();
        };
        let mut found = Vec::new();
        for item in listing.take(MAX_ENTRIES).flatten() {
            let Ok(name) = item.file_name().as_str().map(str::to_string) else {
                continue;
            };
            if !name.ends_with(".conf") {
                continue;
            }
            let Ok((path, meta)) = self.lookup(&format!("{dir_path}/{name}")) else {
                continue;
            };
            if meta.is_dir() || meta.is_symlink() || meta.len() > MAX_ENTRY_BYTES {
                continue;
            }
            if let Some(entry) = self
                .fs
                .read(path.as_str())
                .ok()
                .and_then(|text| entries::parse(&name, &text))
            {
                found.push(entry);
            }
        }
        found
    }

    fn files_of_entry(&self, dir: &str, entry: &entries::Entry) -> Result<BootFiles, Error> {
        // Paths are relative to the root of the filesystem holding `loader/`: that is /boot
        // when the entries are in /boot/loader/entries of a root filesystem.
        let base = dir.strip_suffix("/loader/entries").unwrap_or("");
        // The path as named, and what it names.
        let resolve = |path: &str| -> (String, Lookup) {
            let path = format!("/{}", path.trim_start_matches('/'));
            let found = self.lookup(&path);
            let regular = matches!(&found, Ok((_, m)) if m.file_type().is_regular_file());
            if base.is_empty() || regular {
                return (path, found);
            }
            let inside = format!("{base}{path}");
            let found = self.lookup(&inside);
            (inside, found)
        };
        let (path, found) = resolve(&entry.linux);
        let kernel = self.read("kernel", &path, found, self.kernel_limit(), KERNEL_CEILING)?;
        let limit = self.initrd_limit(&kernel);
        let mut initrd: Option<Vec<u8>> = None;
        for path in &entry.initrds {
            let all = initrd.get_or_insert_with(Vec::new);
            let room = limit.saturating_sub(all.len() as u64);
            let (path, found) = resolve(path);
            let bytes = self
                .read("initrd", &path, found, room, MEMORY_CEILING)
                .map_err(|e| match e {
                    Error::TooLarge { size, .. } => Error::TooLarge {
                        what: "initrds",
                        path: shown(&entry.initrds.join(" + ")),
                        partition: self.partition.to_string(),
                        size: size + all.len() as u64,
                        limit,
                        why: MEMORY_CEILING,
                    },
                    other => other,
                })?;
            all.extend_from_slice(&bytes);
        }
        Ok(BootFiles {
            kernel,
            initrd,
            cmdline: entry.options.clone(),
            source: format!("{}: {dir}/{}", self.partition, shown(&entry.file)),
        })
    }

    /// What `path` names, when it is a regular file.
    fn regular_file(&self, path: &str) -> Option<(String, Metadata)> {
        self.lookup(path)
            .ok()
            .filter(|(_, m)| m.file_type().is_regular_file())
    }

    /// The whole regular file `path` names (`found`, from [`Self::lookup`]), of at most
    /// `limit` bytes (checked before it is read).
    fn read(
        &self,
        what: &'static str,
        path: &str,
        found: Lookup,
        limit: u64,
        why: &'static str,
    ) -> Result<Vec<u8>, Error> {
        let read_err = |reason: String| Error::Read {
            what,
            path: shown(path),
            partition: self.partition.to_string(),
            reason,
        };
        let (resolved, meta) = found.map_err(read_err)?;
        if !meta.file_type().is_regular_file() {
            return Err(read_err("it is not a regular file".into()));
        }
        if meta.len() > limit {
            return Err(Error::TooLarge {
                what,
                path: shown(path),
                partition: self.partition.to_string(),
                size: meta.len(),
                limit,
                why,
            });
        }
        self.fs
            .read(resolved.as_str())
            .map_err(|e| read_err(e.to_string()))
    }
}

/// The non-empty components of a path other than `.`.
fn components(path: &str) -> Vec<String> {
    path.split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .map(str::to_string)
        .collect()
}
