//! cloud-init's NoCloud seed: a small FAT filesystem labelled `CIDATA` holding `user-data`,
//! `meta-data` and (when given) `network-config`, made by the `fatfs` crate from a VM's
//! definition at every start, so it always says what the definition says. It is written to
//! a hidden file beside the VM's other daemon-made disks, synced and renamed into place, and
//! given to the VM as its last disk, read-only.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use api::vm::{CloudInit, DiskSpec, RateLimits, VmSpec};

/// The seed's size: a FAT12 filesystem with room for 1 MiB of data and its tables.
const SEED_BYTES: u64 = 2 << 20;

/// The file name of a VM's seed, in its directory of daemon-made disks.
pub const SEED_FILE: &str = "cidata.img";

/// `meta-data` when the definition gives none: the VM's name as its instance id (cloud-init
/// runs its per-instance modules again when the id changes) and host name.
fn default_meta_data(vm: &str) -> String {
    format!("instance-id: {vm}\nlocal-hostname: {vm}\n")
}

/// Writes the seed of `data` for VM `vm` at `path`.
pub fn write_seed(path: &Path, vm: &str, data: &CloudInit) -> std::io::Result<()> {
    let partial = path.with_extension("partial");
    let _ = std::fs::remove_file(&partial);
    let mut file = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&partial)?;
    let result = (|| {
        file.set_len(SEED_BYTES)?;
        fatfs::format_volume(
            &mut file,
            fatfs::FormatVolumeOptions::new()
                .fat_type(fatfs::FatType::Fat12)
                .volume_label(*b"CIDATA     "),
        )?;
        {
            let fs = fatfs::FileSystem::new(&mut file, fatfs::FsOptions::new())?;
            let meta = data
                .meta_data
                .clone()
                .unwrap_or_else(|| default_meta_data(vm));
            let files = [
                ("user-data", Some(data.user_data.as_str())),
                ("meta-data", Some(meta.as_str())),
                ("network-config", data.network_config.as_deref()),
            ];
            for (name, text) in files {
                if let Some(text) = text {
                    fs.root_dir()
                        .create_file(name)?
                        .write_all(text.as_bytes())?;
                }
            }
            fs.unmount()?;
        }
        file.sync_all()?;
        std::fs::rename(&partial, path)?;
        if let Some(dir) = path.parent() {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result
}

/// `spec` as the VMM gets it: with cloud-init data, the seed (made now in `dir`) as a last,
/// read-only disk. Without, `spec` as it is.
pub fn with_seed(spec: &VmSpec, dir: &Path) -> std::io::Result<VmSpec> {
    let Some(data) = &spec.cloud_init else {
        return Ok(spec.clone());
    };
    std::fs::create_dir_all(dir)?;
    let path: PathBuf = dir.join(SEED_FILE);
    write_seed(&path, &spec.name, data)?;
    let mut spec = spec.clone();
    spec.disks.push(DiskSpec {
        path: path.display().to_string(),
        format: api::vm::DiskFormat::Raw,
        image: None,
        size: None,
        readonly: true,
        direct: false,
        serial: Some("cidata".into()),
        limits: RateLimits::default(),
    });
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seed_holds_the_files_under_the_cidata_label() {
        let dir = std::env::temp_dir().join(format!("keel-cidata-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(SEED_FILE);
        let data = CloudInit {
            user_data: "#cloud-config\nhostname: web\n".into(),
            meta_data: None,
            network_config: Some("version: 2\n".into()),
        };
        write_seed(&path, "web", &data).unwrap();
        let mut file = File::open(&path).unwrap();
        let fs = fatfs::FileSystem::new(&mut file, fatfs::FsOptions::new()).unwrap();
        assert_eq!(fs.volume_label(), "CIDATA");
        let read = |name: &str| {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut fs.root_dir().open_file(name).unwrap(), &mut text)
                .unwrap();
            text
        };
        assert_eq!(read("user-data"), data.user_data);
        assert_eq!(read("meta-data"), "instance-id: web\nlocal-hostname: web\n");
        assert_eq!(read("network-config"), "version: 2\n");
        // Made again from a changed definition: replaced, never appended to.
        let changed = CloudInit {
            user_data: "#cloud-config\nhostname: db\n".into(),
            meta_data: Some("instance-id: db-2\n".into()),
            network_config: None,
        };
        drop(fs);
        write_seed(&path, "web", &changed).unwrap();
        let mut file = File::open(&path).unwrap();
        let fs = fatfs::FileSystem::new(&mut file, fatfs::FsOptions::new()).unwrap();
        assert!(fs.root_dir().open_file("network-config").is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
