//! The conntrack sysctls: `nf_conntrack_count`, `_max`, `_buckets` and the state timeouts.
//!
//! A [`SysctlSource`] opens every file once, from a root directory that stands for
//! `/proc/sys` (tests pass a fixture tree), and then re-reads them with `pread` into a
//! small stack buffer: a daemon polling every second allocates nothing and does no path
//! lookups. Files opened inside a network namespace keep reading that namespace.
//!
//! Kernels before 2.6.20 (`ip_conntrack`) used other names under `net/ipv4/`; each value is
//! looked up under its modern name first and its legacy names after. A timeout or the
//! bucket count that this kernel lacks is simply absent; the count and max are required.

use super::{ConntrackSample, ObserveError};
use crate::knob::{Knob, TimeoutKnob};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Where the sysctl tree lives on a real host.
pub const DEFAULT_ROOT: &str = "/proc/sys";

/// The directory of the modern names, relative to the sysctl root.
const MODERN_DIR: &str = "net/netfilter";
/// The directory of the `ip_conntrack_*` names (kernels before 2.6.20).
const LEGACY_DIR: &str = "net/ipv4/netfilter";

/// A sysctl value holds at most a u64 (20 digits) and a newline; anything that fills this
/// buffer is not a single number.
const VALUE_BUFFER_BYTES: usize = 32;

/// One value this source reads. The count is not a [`Knob`] (ctguard never writes it), so
/// it and the legacy names of the global knobs are spelled here, next to the lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Value {
    Count,
    Knob(Knob),
}

impl Value {
    /// Paths relative to the sysctl root, in the order they are tried.
    fn candidates(self) -> Vec<PathBuf> {
        let modern = |file: &str| Path::new(MODERN_DIR).join(file);
        let legacy = |file: &str| Path::new(LEGACY_DIR).join(file);
        match self {
            Value::Count => vec![modern("nf_conntrack_count"), legacy("ip_conntrack_count")],
            Value::Knob(Knob::Max) => vec![
                modern(Knob::Max.sysctl_file()),
                legacy("ip_conntrack_max"),
                // 2.6.x kernels also (or only) had it one level up.
                PathBuf::from("net/ipv4/ip_conntrack_max"),
            ],
            Value::Knob(Knob::Buckets) => vec![
                modern(Knob::Buckets.sysctl_file()),
                legacy("ip_conntrack_buckets"),
            ],
            Value::Knob(Knob::Timeout(t)) => std::iter::once(modern(t.sysctl_file()))
                .chain(t.legacy_sysctl_file().map(legacy))
                .collect(),
        }
    }
}

/// An open sysctl file and the path it was opened at (for error messages).
#[derive(Debug)]
struct OpenValue {
    file: File,
    path: PathBuf,
}

impl OpenValue {
    /// Opens the first candidate of `value` that exists; `Ok(None)` when none does.
    fn open(root: &Path, value: Value) -> Result<Option<OpenValue>, ObserveError> {
        for relative in value.candidates() {
            let path = root.join(relative);
            match File::open(&path) {
                Ok(file) => return Ok(Some(OpenValue { file, path })),
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(ObserveError::io(path, e)),
            }
        }
        Ok(None)
    }

    /// Like [`OpenValue::open`], but a missing file is an error naming the modern path.
    fn open_required(root: &Path, value: Value) -> Result<OpenValue, ObserveError> {
        OpenValue::open(root, value)?.ok_or_else(|| {
            let modern = root.join(&value.candidates()[0]);
            ObserveError::io(modern, io::Error::from(io::ErrorKind::NotFound))
        })
    }

    /// Re-reads the value from offset 0 (no allocation unless it is malformed).
    fn read(&self) -> Result<u64, ObserveError> {
        let mut buf = [0u8; VALUE_BUFFER_BYTES];
        let mut filled = 0;
        while filled < buf.len() {
            match self.file.read_at(&mut buf[filled..], filled as u64) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ObserveError::io(&self.path, e)),
            }
        }
        if filled == buf.len() {
            return Err(ObserveError::format(
                &self.path,
                "an unsigned integer",
                format!("{}…", String::from_utf8_lossy(&buf)),
            ));
        }
        parse_value(&self.path, &buf[..filled])
    }
}

/// Parses the contents of a numeric sysctl file: decimal digits, surrounding whitespace
/// (the kernel ends it with a newline) allowed. `path` only names the file in the error.
pub fn parse_value(path: &Path, bytes: &[u8]) -> Result<u64, ObserveError> {
    let digits = bytes.trim_ascii();
    let bad = || {
        ObserveError::format(
            path,
            "an unsigned integer",
            String::from_utf8_lossy(digits).into_owned(),
        )
    };
    if digits.is_empty() {
        return Err(bad());
    }
    digits.iter().try_fold(0u64, |acc, &b| {
        if !b.is_ascii_digit() {
            return Err(bad());
        }
        acc.checked_mul(10)
            .and_then(|v| v.checked_add(u64::from(b - b'0')))
            .ok_or_else(bad)
    })
}

/// The conntrack sysctls of one network namespace, held open for cheap polling.
#[derive(Debug)]
pub struct SysctlSource {
    /// The tree the files were opened from (names knobs it lacks in errors).
    root: PathBuf,
    count: OpenValue,
    max: OpenValue,
    buckets: Option<OpenValue>,
    /// The timeouts this kernel has, in [`TimeoutKnob::ALL`] order.
    timeouts: Vec<(TimeoutKnob, OpenValue)>,
}

impl SysctlSource {
    /// Opens the files under `/proc/sys`, in the calling thread's network namespace.
    pub fn open_default() -> Result<SysctlSource, ObserveError> {
        SysctlSource::open(Path::new(DEFAULT_ROOT))
    }

    /// Opens the files under `root`, a directory laid out like `/proc/sys`.
    pub fn open(root: &Path) -> Result<SysctlSource, ObserveError> {
        let mut timeouts = Vec::with_capacity(TimeoutKnob::ALL.len());
        for knob in TimeoutKnob::ALL {
            if let Some(open) = OpenValue::open(root, Value::Knob(Knob::Timeout(knob)))? {
                timeouts.push((knob, open));
            }
        }
        Ok(SysctlSource {
            root: root.to_owned(),
            count: OpenValue::open_required(root, Value::Count)?,
            max: OpenValue::open_required(root, Value::Knob(Knob::Max))?,
            buckets: OpenValue::open(root, Value::Knob(Knob::Buckets))?,
            timeouts,
        })
    }

    /// Reads every value into `sample`, reusing its timeout map (no allocation once the
    /// map holds this kernel's knobs). `sample.stats` is left as it is.
    pub fn read_into(&self, sample: &mut ConntrackSample) -> Result<(), ObserveError> {
        sample.count = self.count.read()?;
        sample.max = self.max.read()?;
        sample.buckets = match &self.buckets {
            Some(open) => Some(open.read()?),
            None => None,
        };
        // Keep only the knobs this source reads, then overwrite their values in place.
        sample
            .timeouts
            .retain(|knob, _| self.timeouts.iter().any(|(k, _)| k == knob));
        for (knob, open) in &self.timeouts {
            sample.timeouts.insert(*knob, open.read()?);
        }
        Ok(())
    }

    /// Reads every value into a new sample (stats `None`).
    pub fn read(&self) -> Result<ConntrackSample, ObserveError> {
        let mut sample = ConntrackSample::default();
        self.read_into(&mut sample)?;
        Ok(sample)
    }

    /// Re-reads one knob's live value (e.g. after an actuator wrote it). A knob this
    /// kernel lacks is an error naming its modern path.
    pub fn read_knob(&self, knob: Knob) -> Result<u64, ObserveError> {
        let open = match knob {
            Knob::Max => Some(&self.max),
            Knob::Buckets => self.buckets.as_ref(),
            Knob::Timeout(t) => self
                .timeouts
                .iter()
                .find(|(k, _)| *k == t)
                .map(|(_, open)| open),
        };
        match open {
            Some(open) => open.read(),
            None => Err(ObserveError::io(
                self.root.join(MODERN_DIR).join(knob.sysctl_file()),
                io::Error::from(io::ErrorKind::NotFound),
            )),
        }
    }
}

/// Reads one knob once from the tree at `root` (modern name, then legacy ones), without
/// keeping anything open.
pub fn read_knob(root: &Path, knob: Knob) -> Result<u64, ObserveError> {
    OpenValue::open_required(root, Value::Knob(knob))?.read()
}

/// Reads the entry count once from the tree at `root`.
pub fn read_count(root: &Path) -> Result<u64, ObserveError> {
    OpenValue::open_required(root, Value::Count)?.read()
}

/// Where `knob`'s sysctl (modern name, else a legacy one) is under `root`, if anywhere.
/// For `Knob::Max`, the table exists exactly when it does. Only looks paths up; opens nothing.
pub fn locate(root: &Path, knob: Knob) -> Option<PathBuf> {
    Value::Knob(knob)
        .candidates()
        .into_iter()
        .map(|relative| root.join(relative))
        .find(|path| path.exists())
}

/// Whether a path [`locate`] returned is a pre-2.6.20 `ip_conntrack_*` name.
pub fn is_legacy_name(path: &Path) -> bool {
    path.file_name() != Some(std::ffi::OsStr::new(Knob::Max.sysctl_file()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::fs;

    fn fixture_root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/proc/sysctl_6.18")
    }

    fn legacy_root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/proc/sysctl_2.6.18")
    }

    #[test]
    fn parses_a_sysctl_value() {
        let p = Path::new("f");
        assert_eq!(parse_value(p, b"262144\n").unwrap(), 262_144);
        assert_eq!(parse_value(p, b"  0 ").unwrap(), 0);
        assert_eq!(parse_value(p, b"18446744073709551615\n").unwrap(), u64::MAX);
    }

    #[test]
    fn rejects_what_is_not_an_unsigned_integer() {
        for bad in [
            &b""[..],
            b"\n",
            b"-1\n",
            b"12 34\n",
            b"0x10",
            b"18446744073709551616",
        ] {
            let err = parse_value(Path::new("/proc/sys/x"), bad).unwrap_err();
            let msg = err.to_string();
            assert!(
                msg.contains("/proc/sys/x") && msg.contains("an unsigned integer"),
                "{msg}"
            );
        }
    }

    #[test]
    fn reads_the_captured_tree_of_this_kernel() {
        let source = SysctlSource::open(&fixture_root()).unwrap();
        let sample = source.read().unwrap();
        assert_eq!(sample.count, 4096);
        assert_eq!(sample.max, 4096);
        assert_eq!(sample.buckets, Some(262_144));
        assert_eq!(sample.timeouts.len(), TimeoutKnob::ALL.len());
        assert_eq!(sample.timeouts[&TimeoutKnob::Established], 432_000);
        assert_eq!(sample.timeouts[&TimeoutKnob::UdpStream], 120);
        assert_eq!(sample.stats, None);
        assert_eq!(
            source
                .read_knob(Knob::Timeout(TimeoutKnob::TimeWait))
                .unwrap(),
            120
        );
        assert_eq!(read_knob(&fixture_root(), Knob::Buckets).unwrap(), 262_144);
    }

    #[test]
    fn falls_back_to_the_legacy_ip_conntrack_names() {
        let root = legacy_root();
        let sample = SysctlSource::open(&root).unwrap().read().unwrap();
        assert_eq!(sample.count, 1210);
        assert_eq!(sample.max, 65_536);
        assert_eq!(sample.buckets, Some(8192));
        // 2.6.18 had neither `unacknowledged` nor an ICMPv6 timeout in ip_conntrack.
        assert!(!sample.timeouts.contains_key(&TimeoutKnob::Icmpv6));
        assert!(!sample.timeouts.contains_key(&TimeoutKnob::Unacknowledged));
        assert_eq!(sample.timeouts[&TimeoutKnob::Established], 432_000);
        assert_eq!(sample.timeouts[&TimeoutKnob::CloseWait], 60);
        assert!(locate(&root, Knob::Max).is_some_and(|p| is_legacy_name(&p)));
        assert!(locate(&fixture_root(), Knob::Max).is_some_and(|p| !is_legacy_name(&p)));
    }

    #[test]
    fn max_one_level_up_is_found_on_old_kernels() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("net/ipv4/netfilter")).unwrap();
        fs::write(
            dir.path().join("net/ipv4/netfilter/ip_conntrack_count"),
            "5\n",
        )
        .unwrap();
        fs::write(dir.path().join("net/ipv4/ip_conntrack_max"), "1024\n").unwrap();
        let sample = SysctlSource::open(dir.path()).unwrap().read().unwrap();
        assert_eq!((sample.count, sample.max, sample.buckets), (5, 1024, None));
        assert!(sample.timeouts.is_empty());
    }

    #[test]
    fn a_missing_count_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join(MODERN_DIR)).unwrap();
        fs::write(dir.path().join(MODERN_DIR).join("nf_conntrack_max"), "1\n").unwrap();
        let err = SysctlSource::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("nf_conntrack_count"), "{err}");
    }

    #[test]
    fn re_reads_live_values_from_open_files() {
        let dir = tempfile::tempdir().unwrap();
        let netfilter = dir.path().join(MODERN_DIR);
        fs::create_dir_all(&netfilter).unwrap();
        fs::write(netfilter.join("nf_conntrack_count"), "1\n").unwrap();
        fs::write(netfilter.join("nf_conntrack_max"), "10\n").unwrap();
        let source = SysctlSource::open(dir.path()).unwrap();
        let mut sample = ConntrackSample::default();
        sample.timeouts.insert(TimeoutKnob::Udp, 1);
        source.read_into(&mut sample).unwrap();
        assert_eq!((sample.count, sample.max), (1, 10));
        assert!(
            sample.timeouts.is_empty(),
            "knobs this kernel lacks are dropped"
        );
        // Rewrite in place (the open file sees it, as it would see the kernel's new value).
        fs::OpenOptions::new()
            .write(true)
            .open(netfilter.join("nf_conntrack_count"))
            .unwrap()
            .write_all_at(b"7\n", 0)
            .unwrap();
        source.read_into(&mut sample).unwrap();
        assert_eq!(sample.count, 7);
        let err = source
            .read_knob(Knob::Timeout(TimeoutKnob::Udp))
            .unwrap_err()
            .to_string();
        assert!(err.contains("nf_conntrack_udp_timeout"), "{err}");
    }

    #[test]
    fn a_non_number_in_a_file_is_a_format_error() {
        let dir = tempfile::tempdir().unwrap();
        let netfilter = dir.path().join(MODERN_DIR);
        fs::create_dir_all(&netfilter).unwrap();
        fs::write(netfilter.join("nf_conntrack_count"), "1\n").unwrap();
        fs::write(netfilter.join("nf_conntrack_max"), "x".repeat(100)).unwrap();
        let err = SysctlSource::open(dir.path()).unwrap().read().unwrap_err();
        assert!(matches!(err, ObserveError::Format { .. }));
        assert!(err.to_string().contains("nf_conntrack_max"));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = parse_value(Path::new("f"), &bytes);
        }

        #[test]
        fn every_u64_round_trips(n in any::<u64>()) {
            prop_assert_eq!(parse_value(Path::new("f"), format!("{n}\n").as_bytes()).unwrap(), n);
        }
    }
}
