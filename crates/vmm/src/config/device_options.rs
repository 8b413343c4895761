//! The `--disk`, `--net` and `--vsock` options of `keel run` (and `keel vm create`): their
//! `key=value` lists, parsed and checked.

use std::path::PathBuf;

use devices::rate_limiter::RateLimitConfig;

/// `--disk path=PATH[,readonly=on][,direct=on][,serial=ID][,bw=..][,iops=..]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    pub path: PathBuf,
    /// The image's format, as named (raw when not): never guessed from the file.
    pub format: disk::Format,
    /// A library image this disk is to be a thin clone of (`keel vm create` only: the daemon
    /// makes the disk; `path` is then empty).
    pub image: Option<String>,
    /// The clone's size, bytes.
    pub size: Option<u64>,
    pub read_only: bool,
    /// Open the image with `O_DIRECT`: the host's page cache is bypassed (QEMU's
    /// `cache=none`).
    pub direct: bool,
    pub serial: Option<String>,
    pub rate_limit: RateLimitConfig,
}

/// Longest serial a virtio-blk device reports.
pub const MAX_SERIAL_BYTES: usize = 20;

pub(crate) fn on_off(key: &str, value: &str) -> Result<bool, String> {
    match value {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        other => Err(format!("{key}={other}: expected on or off")),
    }
}

/// A disk size: a whole number of bytes with an optional binary suffix, as qemu-img takes
/// it (K, M, G, T: 2^10.. 2^40; Ki, Mi, Gi, Ti the same).
pub fn parse_size(value: &str) -> Result<u64, String> {
    let digits = value.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit: u64 = match &value[digits.len()..] {
        "" => 1,
        "K" | "Ki" | "k" => 1 << 10,
        "M" | "Mi" => 1 << 20,
        "G" | "Gi" => 1 << 30,
        "T" | "Ti" => 1 << 40,
        other => {
            return Err(format!(
                "size={value}: unknown unit '{other}' (K, M, G or T)"
            ))
        }
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(unit))
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("size={value}: expected a positive size like 20G"))
}

impl DiskConfig {
    /// The format as a definition names it.
    pub fn spec_format(&self) -> api::vm::DiskFormat {
        match self.format {
            disk::Format::Raw => api::vm::DiskFormat::Raw,
            disk::Format::Qcow2 => api::vm::DiskFormat::Qcow2,
        }
    }
}

impl std::str::FromStr for DiskConfig {
    type Err = String;

    fn from_str(spec: &str) -> Result<Self, String> {
        let mut path = None;
        let mut image = None;
        let mut size = None;
        let mut format = disk::Format::Raw;
        let mut read_only = false;
        let mut direct = false;
        let mut serial = None;
        let mut rate_limit = RateLimitConfig::default();
        for part in spec.split(',') {
            let (key, value) = part.split_once('=').ok_or_else(|| {
                format!(
                    "'{part}': expected key=value (path=, image=, size=, format=, readonly=, direct=, serial=, bw=, iops=)"
                )
            })?;
            if rate_limit
                .parse_option(key, value)
                .map_err(|e| e.to_string())?
            {
                continue;
            }
            match key {
                "path" if !value.is_empty() => path = Some(PathBuf::from(value)),
                "path" => return Err("path= is empty".into()),
                "format" => format = value.parse()?,
                "image" => {
                    api::vm::check_name(value).map_err(|_| {
                        format!("image={value}: image names follow the rule of VM names")
                    })?;
                    image = Some(value.to_string())
                }
                "size" => size = Some(parse_size(value)?),
                "readonly" => read_only = on_off(key, value)?,
                "direct" => direct = on_off(key, value)?,
                "serial" if value.len() <= MAX_SERIAL_BYTES && value.is_ascii() => {
                    serial = Some(value.to_string())
                }
                "serial" => {
                    return Err(format!(
                        "serial={value}: at most {MAX_SERIAL_BYTES} ASCII characters"
                    ))
                }
                other => {
                    return Err(format!(
                        "unknown disk option '{other}' (known: path, image, size, format, readonly, direct, serial, {})",
                        RateLimitConfig::KEYS.join(", ")
                    ))
                }
            }
        }
        let path = match (path, &image) {
            (Some(_), Some(_)) => {
                return Err(
                    "path= and image= together: a disk is a file or a clone of an image".into(),
                )
            }
            (Some(p), None) => p,
            (None, Some(_)) => PathBuf::new(),
            (None, None) => return Err("path= (or image=, for keel vm create) is missing".into()),
        };
        if size.is_some() && image.is_none() {
            return Err("size= goes with image= (the size of a clone)".into());
        }
        rate_limit.validate().map_err(|e| e.to_string())?;
        Ok(DiskConfig {
            path,
            image,
            size,
            format,
            read_only,
            direct,
            serial,
            rate_limit,
        })
    }
}

/// Longest network interface name (IFNAMSIZ less the NUL).
pub const MAX_TAP_NAME_BYTES: usize = 15;

/// `--net tap=NAME[,mac=MAC][,bw=..][,iops=..]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    pub tap: String,
    pub mac: Option<[u8; 6]>,
    pub rate_limit: RateLimitConfig,
}

/// Parses a MAC like 52:54:00:12:34:56 (unicast only).
pub fn parse_mac(value: &str) -> Result<[u8; 6], String> {
    let bad = || format!("mac={value}: expected six hex bytes like 52:54:00:12:34:56");
    let parts: Vec<&str> = value.split(':').collect();
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(parts) {
        if part.len() != 2 {
            return Err(bad());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    if mac[0] & 1 != 0 {
        return Err(format!(
            "mac={value} is a multicast address; the lowest bit of the first byte must be 0"
        ));
    }
    Ok(mac)
}

impl std::str::FromStr for NetConfig {
    type Err = String;

    fn from_str(spec: &str) -> Result<Self, String> {
        let mut tap = None;
        let mut mac = None;
        let mut rate_limit = RateLimitConfig::default();
        for part in spec.split(',') {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| format!("'{part}': expected key=value (tap=, mac=, bw=, iops=)"))?;
            if rate_limit
                .parse_option(key, value)
                .map_err(|e| e.to_string())?
            {
                continue;
            }
            match key {
                "tap" if !value.is_empty() && value.len() <= MAX_TAP_NAME_BYTES => {
                    tap = Some(value.to_string())
                }
                "tap" => {
                    return Err(format!(
                        "tap={value}: a tap name is 1 to {MAX_TAP_NAME_BYTES} bytes"
                    ))
                }
                "mac" => mac = Some(parse_mac(value)?),
                other => {
                    return Err(format!(
                        "unknown net option '{other}' (known: tap, mac, {})",
                        RateLimitConfig::KEYS.join(", ")
                    ))
                }
            }
        }
        rate_limit.validate().map_err(|e| e.to_string())?;
        Ok(NetConfig {
            tap: tap.ok_or("tap= is missing")?,
            mac,
            rate_limit,
        })
    }
}

/// `--vsock cid=N,socket=PATH`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    pub cid: u64,
    pub socket: PathBuf,
}

/// CIDs 0-2 are reserved (hypervisor, local, host); u32::MAX is VMADDR_CID_ANY.
const FIRST_GUEST_CID: u64 = 3;
const LAST_GUEST_CID: u64 = u32::MAX as u64 - 1;

pub(crate) fn check_guest_cid(cid: u64) -> Result<u64, String> {
    if (FIRST_GUEST_CID..=LAST_GUEST_CID).contains(&cid) {
        Ok(cid)
    } else {
        Err(format!(
            "cid={cid}: guest CIDs run from {FIRST_GUEST_CID} to {LAST_GUEST_CID} (0-2 are reserved)"
        ))
    }
}

impl std::str::FromStr for VsockConfig {
    type Err = String;

    fn from_str(spec: &str) -> Result<Self, String> {
        let mut cid = None;
        let mut socket = None;
        for part in spec.split(',') {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| format!("'{part}': expected key=value (cid=, socket=)"))?;
            match key {
                "cid" => {
                    let n: u64 = value
                        .parse()
                        .map_err(|_| format!("cid={value}: expected a number"))?;
                    cid = Some(check_guest_cid(n)?);
                }
                "socket" if !value.is_empty() => socket = Some(PathBuf::from(value)),
                "socket" => return Err("socket= is empty".into()),
                other => {
                    return Err(format!(
                        "unknown vsock option '{other}' (known: cid, socket)"
                    ))
                }
            }
        }
        Ok(VsockConfig {
            cid: cid.ok_or("cid= is missing")?,
            socket: socket.ok_or("socket= is missing")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_options_parse_and_bad_ones_say_why() {
        let d: DiskConfig = "path=/tmp/a.img,readonly=on,serial=disk-0".parse().unwrap();
        assert_eq!(
            d,
            DiskConfig {
                path: "/tmp/a.img".into(),
                format: disk::Format::Raw,
                image: None,
                size: None,
                read_only: true,
                direct: false,
                serial: Some("disk-0".into()),
                rate_limit: RateLimitConfig::default(),
            }
        );
        let limited: DiskConfig = "path=/x,bw=50M,iops=1000".parse().unwrap();
        assert!(!limited.rate_limit.is_unlimited());
        let e = "path=/x,bw=abc".parse::<DiskConfig>().unwrap_err();
        assert!(e.contains("bw=abc"), "{e}");
        let d: DiskConfig = "path=/x".parse().unwrap();
        assert!(!d.read_only && !d.direct && d.serial.is_none());
        let d: DiskConfig = "path=/x,direct=on".parse().unwrap();
        assert!(d.direct && !d.read_only);
        assert!(!"path=/x,direct=off".parse::<DiskConfig>().unwrap().direct);
        assert!("path=/x,direct=always"
            .parse::<DiskConfig>()
            .unwrap_err()
            .contains("direct=always: expected on or off"));
        assert_eq!(
            "readonly=on".parse::<DiskConfig>().unwrap_err(),
            "path= (or image=, for keel vm create) is missing"
        );
        assert!("path=/x,cache=none"
            .parse::<DiskConfig>()
            .unwrap_err()
            .contains("unknown disk option 'cache'"));
        // Formats, and clones of library images with their size.
        let q: DiskConfig = "path=/x.qcow2,format=qcow2".parse().unwrap();
        assert_eq!(q.format, disk::Format::Qcow2);
        assert!("path=/x,format=vmdk"
            .parse::<DiskConfig>()
            .unwrap_err()
            .contains("expected raw or qcow2"));
        let c: DiskConfig = "image=debian,size=20G".parse().unwrap();
        assert_eq!(
            (c.image.as_deref(), c.size, c.path.as_os_str().is_empty()),
            (Some("debian"), Some(20 << 30), true)
        );
        assert!("image=a,path=/x"
            .parse::<DiskConfig>()
            .unwrap_err()
            .contains("together"));
        assert!("path=/x,size=1G"
            .parse::<DiskConfig>()
            .unwrap_err()
            .contains("size= goes with image="));
        assert!("image=a,size=12Q"
            .parse::<DiskConfig>()
            .unwrap_err()
            .contains("unknown unit"));
        assert!("image=../etc"
            .parse::<DiskConfig>()
            .unwrap_err()
            .contains("rule of VM names"));
        assert!("path=/x,readonly=maybe"
            .parse::<DiskConfig>()
            .unwrap_err()
            .contains("expected on or off"));
        assert!("path=/x,serial=123456789012345678901"
            .parse::<DiskConfig>()
            .unwrap_err()
            .contains("at most 20"));
        assert!("/x"
            .parse::<DiskConfig>()
            .unwrap_err()
            .contains("expected key=value"));
    }

    #[test]
    fn net_options_parse_and_bad_ones_say_why() {
        let n: NetConfig = "tap=tap0,mac=52:54:00:12:34:56".parse().unwrap();
        assert_eq!(
            n,
            NetConfig {
                tap: "tap0".into(),
                mac: Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
                rate_limit: RateLimitConfig::default(),
            }
        );
        let limited: NetConfig = "tap=t,bw=1Gi,iops_burst=10,iops=100".parse().unwrap();
        assert!(!limited.rate_limit.is_unlimited());
        assert_eq!(
            "mac=52:54:00:12:34:56".parse::<NetConfig>().unwrap_err(),
            "tap= is missing"
        );
        assert!("tap=t,mac=52:54:00:12:34"
            .parse::<NetConfig>()
            .unwrap_err()
            .contains("six hex bytes"));
        assert!("tap=t,mac=01:00:5e:00:00:01"
            .parse::<NetConfig>()
            .unwrap_err()
            .contains("multicast"));
        assert!("tap=a-name-far-too-long"
            .parse::<NetConfig>()
            .unwrap_err()
            .contains("1 to 15 bytes"));
    }

    #[test]
    fn vsock_options_parse_and_bad_ones_say_why() {
        let v: VsockConfig = "cid=3,socket=/tmp/v.sock".parse().unwrap();
        assert_eq!(
            v,
            VsockConfig {
                cid: 3,
                socket: "/tmp/v.sock".into()
            }
        );
        assert!("cid=2,socket=/x"
            .parse::<VsockConfig>()
            .unwrap_err()
            .contains("reserved"));
        assert!("cid=x,socket=/x"
            .parse::<VsockConfig>()
            .unwrap_err()
            .contains("expected a number"));
        assert_eq!(
            "cid=3".parse::<VsockConfig>().unwrap_err(),
            "socket= is missing"
        );
        assert!("cid=3,socket=/x,port=1"
            .parse::<VsockConfig>()
            .unwrap_err()
            .contains("unknown vsock option"));
    }
}
