//! Whether connection tracking exists on this host, found without ever loading it.
//!
//! Many innocent-looking actions make the kernel load `nf_conntrack`: `iptables -L` (it
//! loads the iptables modules, and a state/conntrack match pulls in conntrack), opening
//! `/proc/net/ip_tables_names`, or a ctnetlink socket request (`request_module`). Once the
//! module is in, every connection on the host is tracked, and a host that never tracked can
//! now hit the very "table full, dropping packet" this tool exists to prevent (seed 000
//! warns about exactly this). So this check only asks whether paths *exist*: the conntrack
//! sysctls are there exactly when the table is, and `/sys/module` tells a loadable module
//! from a built-in one. Nothing here opens a file.

use super::sysctl;
use crate::knob::Knob;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// How `nf_conntrack` got into the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Linkage {
    /// A loaded module (`/sys/module/nf_conntrack/initstate` exists: only loadable modules
    /// have it).
    Module,
    /// Built into the kernel (`/sys/module/nf_conntrack` exists for its parameters, but
    /// without `initstate`).
    BuiltIn,
    /// `/sys/module` says nothing (sysfs not mounted, or a pre-2.6.20 `ip_conntrack`).
    Unknown,
}

/// What [`detect`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Activity {
    /// The conntrack table exists (its `max` sysctl does).
    pub present: bool,
    /// It is exposed under the pre-2.6.20 `ip_conntrack_*` names.
    pub legacy_names: bool,
    pub linkage: Linkage,
}

/// Checks the real `/proc/sys` and `/sys`.
pub fn detect_host() -> Activity {
    detect(Path::new(sysctl::DEFAULT_ROOT), Path::new("/sys"))
}

/// Checks a sysctl tree laid out like `/proc/sys` and a tree laid out like `/sys`.
pub fn detect(sysctl_root: &Path, sys_root: &Path) -> Activity {
    let max = sysctl::locate(sysctl_root, Knob::Max);
    let module_dir = sys_root.join("module/nf_conntrack");
    let linkage = if module_dir.join("initstate").exists() {
        Linkage::Module
    } else if module_dir.exists() {
        Linkage::BuiltIn
    } else {
        Linkage::Unknown
    };
    Activity {
        present: max.is_some(),
        legacy_names: max.as_deref().is_some_and(sysctl::is_legacy_name),
        linkage,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn fixtures() -> &'static Path {
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/proc"))
    }

    #[test]
    fn built_in_conntrack_as_on_this_kernel() {
        let sys = tempfile::tempdir().unwrap();
        fs::create_dir_all(sys.path().join("module/nf_conntrack/parameters")).unwrap();
        let found = detect(&fixtures().join("sysctl_6.18"), sys.path());
        assert_eq!(
            found,
            Activity {
                present: true,
                legacy_names: false,
                linkage: Linkage::BuiltIn
            }
        );
    }

    #[test]
    fn a_loaded_module_and_legacy_names() {
        let sys = tempfile::tempdir().unwrap();
        fs::create_dir_all(sys.path().join("module/nf_conntrack")).unwrap();
        fs::write(sys.path().join("module/nf_conntrack/initstate"), "live\n").unwrap();
        let found = detect(&fixtures().join("sysctl_2.6.18"), sys.path());
        assert!(found.present && found.legacy_names);
        assert_eq!(found.linkage, Linkage::Module);
    }

    #[test]
    fn absent_when_there_is_no_max_sysctl() {
        let empty = tempfile::tempdir().unwrap();
        let found = detect(empty.path(), empty.path());
        assert!(!found.present && !found.legacy_names);
        assert_eq!(found.linkage, Linkage::Unknown);
    }
}
