//! Boot Loader Specification (type #1) entries: `loader/entries/*.conf` files of `key value`
//! lines naming a kernel (`linux`), initrds and kernel options. The text comes from the guest's
//! disk: any bytes parse (unknown keys and malformed lines are skipped), and an entry without a
//! kernel is not an entry.

use std::cmp::Ordering;

/// One entry as its file gives it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Entry {
    /// The file's name, e.g. `debian-6.1.0.conf`.
    pub file: String,
    pub title: Option<String>,
    pub version: Option<String>,
    pub sort_key: Option<String>,
    /// The kernel, relative to the root of the filesystem that holds `loader/`.
    pub linux: String,
    pub initrds: Vec<String>,
    /// All `options` lines, joined with spaces.
    pub options: String,
}

/// Parses one entry file; `None` when it names no kernel.
pub fn parse(file: &str, text: &[u8]) -> Option<Entry> {
    let text = String::from_utf8_lossy(text);
    let mut entry = Entry {
        file: file.to_string(),
        ..Entry::default()
    };
    let mut options = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = match line.split_once(|c: char| c.is_ascii_whitespace()) {
            Some((k, v)) => (k, v.trim()),
            None => continue,
        };
        if value.is_empty() {
            continue;
        }
        match key {
            "title" => entry.title = Some(value.to_string()),
            "version" => entry.version = Some(value.to_string()),
            "sort-key" => entry.sort_key = Some(value.to_string()),
            "linux" => entry.linux = value.to_string(),
            "initrd" => entry.initrds.push(value.to_string()),
            "options" => options.push(value),
            _ => {}
        }
    }
    entry.options = options.join(" ");
    (!entry.linux.is_empty()).then_some(entry)
}

/// The entry to boot: the specification's order (entries with a sort key first, by sort key;
/// then the newest version; then the file name, last first).
pub fn choose(mut entries: Vec<Entry>) -> Option<Entry> {
    entries.sort_by(boot_order);
    entries.into_iter().next()
}

fn boot_order(a: &Entry, b: &Entry) -> Ordering {
    let by_sort_key = match (&a.sort_key, &b.sort_key) {
        (Some(x), Some(y)) => x.cmp(y),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    };
    let by_version = match (&a.version, &b.version) {
        (Some(x), Some(y)) => compare_versions(y, x),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    };
    by_sort_key
        .then(by_version)
        .then_with(|| compare_versions(&b.file, &a.file))
}

/// Compares version strings the way people read them: runs of digits as numbers, other runs
/// as text (`6.10.0` is newer than `6.9.12`).
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) => {
                let order = if x.is_ascii_digit() && y.is_ascii_digit() {
                    let (na, ra) = split_run(a, true);
                    let (nb, rb) = split_run(b, true);
                    (a, b) = (ra, rb);
                    compare_numbers(na, nb)
                } else {
                    let (ta, ra) = split_run(a, false);
                    let (tb, rb) = split_run(b, false);
                    (a, b) = (ra, rb);
                    ta.cmp(tb)
                };
                if order != Ordering::Equal {
                    return order;
                }
            }
        }
    }
}

/// The leading run of digits (or of non-digits) and the rest.
fn split_run(s: &[u8], digits: bool) -> (&[u8], &[u8]) {
    let n = s
        .iter()
        .position(|c| c.is_ascii_digit() != digits)
        .unwrap_or(s.len());
    s.split_at(n)
}

/// Compares digit runs as numbers of any length (leading zeros ignored).
fn compare_numbers(a: &[u8], b: &[u8]) -> Ordering {
    let strip = |s: &[u8]| -> usize { s.iter().take_while(|&&c| c == b'0').count() };
    let (a, b) = (&a[strip(a)..], &b[strip(b)..]);
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_parses_with_repeated_keys_and_comments() {
        let text = b"# comment\ntitle Debian GNU/Linux\nversion 6.1.0-27-amd64\nlinux /vmlinuz-6.1.0-27-amd64\ninitrd /intel-ucode.img\ninitrd /initrd.img-6.1.0-27-amd64\noptions root=/dev/vda2 ro\noptions console=ttyS0\nbogus\nlinux\n";
        let e = parse("debian.conf", text).unwrap();
        assert_eq!(e.title.as_deref(), Some("Debian GNU/Linux"));
        assert_eq!(e.linux, "/vmlinuz-6.1.0-27-amd64");
        assert_eq!(
            e.initrds,
            ["/intel-ucode.img", "/initrd.img-6.1.0-27-amd64"]
        );
        assert_eq!(e.options, "root=/dev/vda2 ro console=ttyS0");
        assert_eq!(parse("x.conf", b"title no kernel\n"), None);
        assert_eq!(
            parse("x.conf", b"\xff\xfe\0\nlinux\t/k\r\n").unwrap().linux,
            "/k"
        );
    }

    #[test]
    fn versions_compare_by_number() {
        assert_eq!(compare_versions("6.10.0", "6.9.12"), Ordering::Greater);
        assert_eq!(compare_versions("6.1.0-27", "6.1.0-9"), Ordering::Greater);
        assert_eq!(compare_versions("6.1", "6.1.0"), Ordering::Less);
        assert_eq!(compare_versions("007", "7"), Ordering::Equal);
        assert_eq!(
            compare_versions("99999999999999999999999", "1"),
            Ordering::Greater
        );
    }

    #[test]
    fn the_newest_version_boots_unless_a_sort_key_says_otherwise() {
        let entry = |file: &str, version: &str, sort_key: Option<&str>| Entry {
            file: file.into(),
            version: Some(version.into()),
            sort_key: sort_key.map(str::to_string),
            linux: "/k".into(),
            ..Entry::default()
        };
        let chosen = choose(vec![
            entry("a.conf", "6.9.12", None),
            entry("b.conf", "6.10.0", None),
            entry("c.conf", "5.10.0", None),
        ])
        .unwrap();
        assert_eq!(chosen.file, "b.conf");
        let chosen = choose(vec![
            entry("a.conf", "6.10.0", None),
            entry("b.conf", "5.0", Some("debian")),
        ])
        .unwrap();
        assert_eq!(chosen.file, "b.conf");
        assert_eq!(choose(Vec::new()), None);
    }
}
