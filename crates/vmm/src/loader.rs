//! Loading the kernel (an ELF with or without a PVH note, or a bzImage) and the initrd into
//! guest memory, with `linux-loader`, and choosing the boot entry. They come from files, or
//! from the boot disk (disk boot: `disk::boot` finds them in the guest's filesystem).

use crate::host_files::NamedFile;
use std::io::{Cursor, Read, Seek, SeekFrom};

use arch::boot::{initrd_ceiling, InitrdPlacement};
use arch::layout::HIGH_MEMORY_START;
use arch::regs::BootEntry;
use arch::GuestMemoryMmap;
use linux_loader::bootparam::setup_header;
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use vm_memory::{GuestAddress, ReadVolatile};

use crate::config::VmConfig;
use disk::boot::BootFiles;

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
/// "HdrS" at 0x202 marks a Linux boot-protocol image.
const BZIMAGE_MAGIC_OFFSET: u64 = 0x202;
const BZIMAGE_MAGIC: &[u8; 4] = b"HdrS";
/// The 64-bit entry is 0x200 past the start of the protected-mode kernel.
const BZIMAGE_ENTRY64_OFFSET: u64 = 0x200;
/// `xloadflags`: the kernel has a 64-bit entry point.
const XLF_KERNEL_64: u16 = 1 << 0;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kernel {path}: reading it failed: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel {path} is not a kernel Keel can boot: it is neither an ELF (vmlinux, PVH) nor a bzImage")]
    UnknownFormat { path: String },
    #[error("kernel {path} is an invalid {format}: {reason}")]
    Invalid {
        path: String,
        format: &'static str,
        reason: String,
    },
    #[error("kernel {path} is a bzImage without a 64-bit entry point (xloadflags); Keel boots 64-bit kernels only")]
    No64BitEntry { path: String },
    #[error("kernel {path} does not fit in {mib} MiB of guest memory: it needs memory up to {needed:#x}; use a larger --memory")]
    KernelTooLarge { path: String, mib: u64, needed: u64 },
    #[error("initrd {path} ({size} bytes) does not fit in guest memory between the kernel (ends at {kernel_end:#x}) and {ceiling:#x}; use a larger --memory")]
    InitrdTooLarge {
        path: String,
        size: u64,
        kernel_end: u64,
        ceiling: u64,
    },
    #[error("initrd {path}: loading it failed: {reason}")]
    Initrd { path: String, reason: String },
    #[error("no kernel given and no disk to boot from: give a kernel file, or a disk that holds one (disk boot uses the first disk)")]
    NoBootDisk,
    #[error(transparent)]
    DiskBoot(#[from] crate::disk_boot::Error),
}

/// A kernel in guest memory and how to enter it.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    pub entry: BootEntry,
    pub setup_header: Option<setup_header>,
    pub end: u64,
}

enum Format {
    Elf,
    BzImage,
}

fn sniff<F: Read + Seek>(file: &mut F) -> std::io::Result<Option<Format>> {
    let mut magic = [0u8; 4];
    file.seek(SeekFrom::Start(0))?;
    if file.read_exact(&mut magic).is_ok() && &magic == ELF_MAGIC {
        return Ok(Some(Format::Elf));
    }
    file.seek(SeekFrom::Start(BZIMAGE_MAGIC_OFFSET))?;
    if file.read_exact(&mut magic).is_ok() && &magic == BZIMAGE_MAGIC {
        return Ok(Some(Format::BzImage));
    }
    Ok(None)
}

/// True when the loader failed writing into guest memory, i.e. the image runs past RAM.
fn ran_out_of_memory(e: &linux_loader::loader::Error) -> bool {
    use linux_loader::loader::{bzimage, elf, Error as L};
    matches!(
        e,
        L::Elf(elf::Error::ReadKernelImage)
            | L::Bzimage(bzimage::Error::ReadBzImageCompressedKernel)
            | L::MemoryOverflow
    )
}

/// What the guest boots: kernel and initrd in guest memory, and its command line.
pub struct Boot {
    pub kernel: LoadedKernel,
    pub initrd: Option<InitrdPlacement>,
    pub cmdline: String,
}

/// With no kernel file: what the VM's first disk boots, found by the sandboxed reader of
/// [`crate::disk_boot`]. Called before the VM is built (the reader forks, and must do so
/// while the VMM has one thread and little memory).
pub fn find_disk_boot(
    config: &VmConfig,
    image: Option<NamedFile>,
    disks: &[disk::ImageFiles],
) -> Result<Option<BootFiles>, Error> {
    if config.kernel.is_some() {
        return Ok(None);
    }
    let (found, name) = match (image, disks.first()) {
        // A raw disk: its own plain read-only view.
        (Some(image), _) => (
            crate::disk_boot::find(image.file, &image.name, config.memory_bytes())?,
            image.name,
        ),
        // Another format: read through it, on new descriptors of the VM's own files.
        (None, Some(files)) => {
            let name = files.path.display().to_string();
            let boot_err = |reason: String| crate::disk_boot::Error::Reader {
                path: name.clone(),
                reason,
            };
            let view = files
                .try_clone()
                .map_err(|e| boot_err(format!("duplicating its descriptors: {e}")))?;
            let fds: Vec<std::os::fd::RawFd> =
                view.files().map(std::os::fd::AsRawFd::as_raw_fd).collect();
            let image =
                disk::Image::reader(view).map_err(|e| boot_err(format!("opening it: {e}")))?;
            (
                crate::disk_boot::find_in(
                    std::rc::Rc::new(image),
                    fds,
                    &name,
                    config.memory_bytes(),
                )?,
                name,
            )
        }
        (None, None) => return Err(Error::NoBootDisk),
    };
    eprintln!("keel: booting from disk {name}: {}", found.source);
    Ok(Some(found))
}

/// Loads the VM's kernel file and initrd, or `from_disk`, what [`find_disk_boot`] found.
pub fn load(
    mem: &GuestMemoryMmap,
    config: &VmConfig,
    mem_size: u64,
    from_disk: Option<BootFiles>,
    kernel: Option<NamedFile>,
    initrd: Option<NamedFile>,
) -> Result<Boot, Error> {
    let Some(NamedFile {
        file: mut kernel_file,
        name,
    }) = kernel
    else {
        let found = from_disk.ok_or(Error::NoBootDisk)?;
        return load_from_disk(mem, config, mem_size, found);
    };
    let read_err = |source| Error::Read {
        path: name.clone(),
        source,
    };
    let size = kernel_file.metadata().map_err(read_err)?.len();
    let kernel = load_kernel(mem, &mut kernel_file, size, &name, mem_size)?;
    let initrd = match initrd {
        Some(NamedFile { mut file, name }) => {
            let initrd_err = |e: std::io::Error| Error::Initrd {
                path: name.clone(),
                reason: e.to_string(),
            };
            let size = file.metadata().map_err(initrd_err)?.len();
            Some(load_initrd(
                mem, &mut file, size, &name, mem_size, kernel.end,
            )?)
        }
        None => None,
    };
    Ok(Boot {
        kernel,
        initrd,
        cmdline: config.cmdline.clone(),
    })
}

fn load_from_disk(
    mem: &GuestMemoryMmap,
    config: &VmConfig,
    mem_size: u64,
    found: BootFiles,
) -> Result<Boot, Error> {
    let path = config
        .disks
        .first()
        .map(|d| d.path.display().to_string())
        .unwrap_or_default();
    let kernel_name = format!("{path} ({})", found.source);
    let size = found.kernel.len() as u64;
    let kernel = load_kernel(
        mem,
        &mut Cursor::new(found.kernel),
        size,
        &kernel_name,
        mem_size,
    )?;
    let initrd = match found.initrd {
        Some(bytes) => {
            let size = bytes.len() as u64;
            let name = format!("initrd of {kernel_name}");
            Some(load_initrd(
                mem,
                &mut Cursor::new(bytes),
                size,
                &name,
                mem_size,
                kernel.end,
            )?)
        }
        None => None,
    };
    Ok(Boot {
        kernel,
        initrd,
        cmdline: disk::boot::command_line(&found.cmdline, &config.cmdline),
    })
}

/// Loads a kernel image of `size` bytes; `name` says where it came from in errors.
fn load_kernel<F: Read + ReadVolatile + Seek>(
    mem: &GuestMemoryMmap,
    file: &mut F,
    size: u64,
    name: &str,
    mem_size: u64,
) -> Result<LoadedKernel, Error> {
    let name = name.to_string();
    let read_err = |source| Error::Read {
        path: name.clone(),
        source,
    };
    let format = sniff(file).map_err(read_err)?;
    let (format, format_name) = match format {
        Some(Format::Elf) => (Format::Elf, "ELF kernel"),
        Some(Format::BzImage) => (Format::BzImage, "bzImage"),
        None => return Err(Error::UnknownFormat { path: name }),
    };
    let high = Some(GuestAddress(HIGH_MEMORY_START));
    let result = match format {
        Format::Elf => Elf::load(mem, None, file, high),
        Format::BzImage => BzImage::load(mem, None, file, high),
    };
    let loaded = result.map_err(|e| {
        if ran_out_of_memory(&e) {
            let needed = size + HIGH_MEMORY_START;
            Error::KernelTooLarge {
                path: name.clone(),
                mib: mem_size >> 20,
                needed,
            }
        } else {
            Error::Invalid {
                path: name.clone(),
                format: format_name,
                reason: e.to_string(),
            }
        }
    })?;
    let entry = match (format, loaded.pvh_boot_cap) {
        (Format::Elf, PvhBootCapability::PvhEntryPresent(addr)) => BootEntry::Pvh { entry: addr.0 },
        (Format::Elf, _) => BootEntry::Linux64 {
            entry: loaded.kernel_load.0,
        },
        (Format::BzImage, _) => {
            let hdr = loaded.setup_header.unwrap_or_default();
            let xloadflags = hdr.xloadflags;
            if xloadflags & XLF_KERNEL_64 == 0 {
                return Err(Error::No64BitEntry { path: name });
            }
            // The kernel decompresses itself in place and needs `init_size` bytes there.
            let needed = loaded.kernel_load.0 + u64::from(hdr.init_size);
            if needed > mem_size.min(arch::layout::MMIO_GAP_START) {
                return Err(Error::KernelTooLarge {
                    path: name,
                    mib: mem_size >> 20,
                    needed,
                });
            }
            BootEntry::Linux64 {
                entry: loaded.kernel_load.0 + BZIMAGE_ENTRY64_OFFSET,
            }
        }
    };
    // A bzImage needs `init_size` bytes from its load address, beyond the file itself.
    let init_end = loaded.setup_header.map_or(0, |h| {
        loaded.kernel_load.0.saturating_add(u64::from(h.init_size))
    });
    let end = loaded.kernel_end.max(init_end);
    // An ELF may claim segments (empty ones, say) far past guest memory: the loader
    // then reports an end it never wrote. Such a kernel does not fit (found by fuzzing).
    if end > mem_size.min(arch::layout::MMIO_GAP_START) {
        return Err(Error::KernelTooLarge {
            path: name,
            mib: mem_size >> 20,
            needed: end,
        });
    }
    Ok(LoadedKernel {
        entry,
        setup_header: loaded.setup_header,
        end,
    })
}

/// Puts an initrd of `size` bytes at the top of RAM below the 32-bit gap, page-aligned.
fn load_initrd<F: ReadVolatile>(
    mem: &GuestMemoryMmap,
    file: &mut F,
    size: u64,
    name: &str,
    mem_size: u64,
    kernel_end: u64,
) -> Result<InitrdPlacement, Error> {
    let name = name.to_string();
    let ceiling = initrd_ceiling(mem_size);
    let addr = ceiling.checked_sub(size).map(|a| a & !0xfff);
    let addr = match addr {
        Some(a) if a >= kernel_end => a,
        _ => {
            return Err(Error::InitrdTooLarge {
                path: name,
                size,
                kernel_end,
                ceiling,
            })
        }
    };
    use vm_memory::Bytes;
    mem.read_exact_volatile_from(GuestAddress(addr), file, size as usize)
        .map_err(|e| Error::Initrd {
            path: name,
            reason: e.to_string(),
        })?;
    Ok(InitrdPlacement { addr, size })
}

/// The kernel loader as a disk hands it a kernel (bytes from the guest's own disk), for the
/// fuzz target `kernel_loader`: loads `kernel` (and `initrd`) into `mem` as a VM of
/// `mem_size` bytes would; returns the kernel's end and the initrd's placement.
pub fn fuzz_load(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &[u8],
    initrd: Option<&[u8]>,
) -> Result<(u64, Option<(u64, u64)>), String> {
    let k = load_kernel(
        mem,
        &mut Cursor::new(kernel.to_vec()),
        kernel.len() as u64,
        "fuzz",
        mem_size,
    )
    .map_err(|e| e.to_string())?;
    let placed = match initrd {
        Some(bytes) => {
            let p = load_initrd(
                mem,
                &mut Cursor::new(bytes.to_vec()),
                bytes.len() as u64,
                "fuzz",
                mem_size,
                k.end,
            )
            .map_err(|e| e.to_string())?;
            Some((p.addr, p.size))
        }
        None => None,
    };
    Ok((k.end, placed))
}
