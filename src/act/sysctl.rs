//! The real actuator: writes allowlisted conntrack sysctls (and the `hashsize` module
//! parameter) and reads each one back.
//!
//! Namespace-local knobs (the timeouts) are opened inside the target network namespace, if
//! one is given; global knobs (max, buckets) always belong to ctguard's own namespace, where
//! the kernel refuses them unless that is the initial one. Roots are injectable so tests can
//! point the actuator at a fixture tree.

use super::{ActError, Actuator, forbids};
use crate::knob::Knob;
use crate::observe::sysctl;
use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Where the actuator finds the knobs.
#[derive(Debug, Clone)]
pub struct Roots {
    /// `/proc/sys` normally.
    pub proc_sys: PathBuf,
    /// `/sys/module/nf_conntrack/parameters` normally (the `hashsize` fallback).
    pub module_params: PathBuf,
}

impl Default for Roots {
    fn default() -> Self {
        Roots {
            proc_sys: PathBuf::from("/proc/sys"),
            module_params: PathBuf::from("/sys/module/nf_conntrack/parameters"),
        }
    }
}

/// Writes conntrack knobs through procfs/sysfs.
#[derive(Debug, Clone)]
pub struct SysctlActuator {
    roots: Roots,
    netns: Option<PathBuf>,
}

impl SysctlActuator {
    /// An actuator for the knobs of the namespace at `netns` (timeouts) and of ctguard's
    /// own namespace (max, buckets).
    pub fn new(roots: Roots, netns: Option<PathBuf>) -> SysctlActuator {
        SysctlActuator { roots, netns }
    }

    /// The file that holds `knob` (modern layout, else the pre-2.6.20 one; the modern
    /// path when neither exists, so errors name what was expected).
    fn path(&self, knob: Knob) -> PathBuf {
        sysctl::locate(&self.roots.proc_sys, knob).unwrap_or_else(|| {
            self.roots
                .proc_sys
                .join("net/netfilter")
                .join(knob.sysctl_file())
        })
    }

    /// Runs file I/O in the knob's namespace: the target one for per-namespace knobs.
    fn in_namespace<T: Send>(
        &self,
        knob: Knob,
        op: impl FnOnce() -> io::Result<T> + Send,
    ) -> io::Result<T> {
        match (&self.netns, knob.is_global()) {
            (Some(ns), false) => crate::netns::run_in(ns, op)?,
            _ => op(),
        }
    }

    fn read_path(&self, knob: Knob, path: &Path) -> Result<u64, ActError> {
        let read_error = |detail: String| ActError::Read {
            knob,
            path: path.to_path_buf(),
            detail,
        };
        let bytes = self
            .in_namespace(knob, || std::fs::read(path))
            .map_err(|e| read_error(e.to_string()))?;
        sysctl::parse_value(path, &bytes).map_err(|e| read_error(e.to_string()))
    }

    /// Writes `value` to `target` and verifies it by reading `readback` (the same file,
    /// except for the `hashsize` parameter, which is read back through the sysctl).
    fn write_verified(
        &self,
        knob: Knob,
        target: &Path,
        readback: &Path,
        value: u64,
    ) -> Result<(), ActError> {
        self.in_namespace(knob, || write_value(target, value))
            .map_err(|source| write_error(knob, target, value, source))?;
        let read = self.read_path(knob, readback)?;
        if read != value {
            return Err(ActError::Verify {
                knob,
                path: target.to_path_buf(),
                wrote: value,
                read,
            });
        }
        Ok(())
    }
}

impl Actuator for SysctlActuator {
    fn read(&mut self, knob: Knob) -> Result<u64, ActError> {
        self.read_path(knob, &self.path(knob))
    }

    /// Opens the knob's sysctl for writing and closes it: procfs checks a sysctl's mode at
    /// open (the global knobs are read-only outside the initial namespace, even to root).
    /// Where buckets are resized through the `hashsize` parameter (read-only sysctl on
    /// older kernels), the kernel allows that exactly where it allows raising max.
    fn check_write(&mut self, knob: Knob, value: u64) -> Result<(), ActError> {
        let open = |knob: Knob| {
            let path = self.path(knob);
            self.in_namespace(knob, || OpenOptions::new().write(true).open(&path))
                .map(drop)
                .map_err(|source| write_error(knob, &path, value, source))
        };
        match open(knob) {
            Err(ActError::NotPermitted { .. })
                if knob == Knob::Buckets && self.roots.module_params.join("hashsize").exists() =>
            {
                open(Knob::Max).map_err(|_| ActError::NotPermitted {
                    knob,
                    path: self.path(knob),
                    source: io::Error::from_raw_os_error(libc::EACCES),
                })
            }
            other => other,
        }
    }

    fn write(&mut self, knob: Knob, value: u64) -> Result<(), ActError> {
        let path = self.path(knob);
        let hashsize = self.roots.module_params.join("hashsize");
        match self.write_verified(knob, &path, &path, value) {
            // Older kernels expose `nf_conntrack_buckets` read-only; the module parameter
            // is the way to resize there.
            Err(ActError::NotPermitted { .. } | ActError::Failed { .. })
                if knob == Knob::Buckets && hashsize.exists() =>
            {
                self.write_verified(knob, &hashsize, &path, value)
            }
            other => other,
        }
    }
}

/// A failed write of `value` to `path`: not permitted here (the engine moves on to the next
/// stage), or a failure.
fn write_error(knob: Knob, path: &Path, value: u64, source: io::Error) -> ActError {
    let path = path.to_path_buf();
    if forbids(&source) {
        ActError::NotPermitted { knob, path, source }
    } else {
        ActError::Failed {
            knob,
            path,
            value,
            source,
        }
    }
}

/// Writes the decimal value at offset 0 in one write, as sysctl expects.
fn write_value(path: &Path, value: u64) -> io::Result<()> {
    // O_TRUNC is what sysctl(8) uses too; procfs ignores it, and fixture files need it.
    let file = OpenOptions::new().write(true).truncate(true).open(path)?;
    let text = format!("{value}\n");
    let written = file.write_at(text.as_bytes(), 0)?;
    if written != text.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("short write: {written} of {} bytes", text.len()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::knob::TimeoutKnob;

    fn fixture() -> (tempfile::TempDir, SysctlActuator) {
        let dir = tempfile::tempdir().unwrap();
        let nf = dir.path().join("sys/net/netfilter");
        std::fs::create_dir_all(&nf).unwrap();
        std::fs::write(nf.join("nf_conntrack_max"), "65536\n").unwrap();
        std::fs::write(nf.join("nf_conntrack_tcp_timeout_established"), "432000\n").unwrap();
        let params = dir.path().join("params");
        std::fs::create_dir_all(&params).unwrap();
        let act = SysctlActuator::new(
            Roots {
                proc_sys: dir.path().join("sys"),
                module_params: params,
            },
            None,
        );
        (dir, act)
    }

    #[test]
    fn writes_and_reads_back() {
        let (_dir, mut act) = fixture();
        assert_eq!(act.read(Knob::Max).unwrap(), 65536);
        act.write(Knob::Max, 131072).unwrap();
        assert_eq!(act.read(Knob::Max).unwrap(), 131072);
        let est = Knob::Timeout(TimeoutKnob::Established);
        act.write(est, 3600).unwrap();
        assert_eq!(act.read(est).unwrap(), 3600);
    }

    #[test]
    fn garbage_value_is_a_read_error_naming_the_file() {
        let (dir, mut act) = fixture();
        std::fs::write(
            dir.path().join("sys/net/netfilter/nf_conntrack_max"),
            "lots",
        )
        .unwrap();
        let err = act.read(Knob::Max).unwrap_err().to_string();
        assert!(err.contains("nf_conntrack_max"), "{err}");
        assert!(err.contains("unsigned integer"), "{err}");
    }

    #[test]
    fn missing_knob_fails_with_its_path() {
        let (_dir, mut act) = fixture();
        let err = act
            .write(Knob::Timeout(TimeoutKnob::Udp), 10)
            .unwrap_err()
            .to_string();
        assert!(err.contains("nf_conntrack_udp_timeout"), "{err}");
    }

    #[test]
    fn legacy_layout_is_used_when_modern_is_absent() {
        let dir = tempfile::tempdir().unwrap();
        let ipv4 = dir.path().join("net/ipv4");
        std::fs::create_dir_all(ipv4.join("netfilter")).unwrap();
        std::fs::write(ipv4.join("ip_conntrack_max"), "32768\n").unwrap();
        let mut act = SysctlActuator::new(
            Roots {
                proc_sys: dir.path().to_path_buf(),
                module_params: dir.path().join("none"),
            },
            None,
        );
        assert_eq!(act.read(Knob::Max).unwrap(), 32768);
    }
}
