/*!
Which kernel modules are in the running kernel, found without loading any.

ctguard never loads a module (a newly loaded netfilter module can change how every packet
on the host is handled), yet the NOTRACK backends need some: nftables needs `nf_tables`
and `nft_ct`, the iptables fallback `ip_tables`, `iptable_raw`, `xt_CT`, … Asking the
kernel (an nfnetlink request, an `iptables` run) is exactly what would load them, so this
reads three lists instead:

- `/proc/modules`: the modules loaded now. Absent on a kernel built without module
  support, which can load nothing.
- `/lib/modules/<release>/modules.builtin`: the modules compiled into the kernel.
- `/lib/modules/<release>/modules.dep`: the modules `modprobe` could load (what the
  kernel's `request_module` would pull in).

A module in none of them is [`ModuleState::NotLoadable`] when the lists are there (it is
absent) or when the kernel cannot load modules at all: using it cannot load anything, so a
caller may safely try it and see. Where the kernel loads modules but `modules.dep` is
missing (a container without the host's `/lib/modules`: the kernel still runs the host's
`modprobe`), a module not loaded is [`ModuleState::Unknown`] and treated as one that would
load.
*/

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};

/// Where one module stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModuleState {
    Loaded,
    BuiltIn,
    /// Not loaded but installed: using what it provides would make the kernel load it.
    Loadable,
    /// In no list: absent, or on a kernel without module support. Trying it loads nothing.
    NotLoadable,
    /// Not loaded, on a kernel that loads modules, with `modules.dep` missing: it may be
    /// built in, absent or installed, and using it may load it.
    Unknown,
}

impl ModuleState {
    /// Whether using the module's feature would load a module.
    pub fn would_load(self) -> bool {
        matches!(self, ModuleState::Loadable | ModuleState::Unknown)
    }
}

/// The module lists of one kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelModules {
    loaded: HashSet<String>,
    builtin: HashSet<String>,
    loadable: HashSet<String>,
    /// Whether `/proc/modules` exists: the kernel can load modules.
    loads_modules: bool,
    /// Whether `modules.dep` exists: it lists every module the kernel could load.
    knows_loadable: bool,
}

impl KernelModules {
    /// Reads the running kernel's lists; the kernel tests point `CTGUARD_MODULES_ROOT` at a
    /// fixture tree to play a kernel without nf_tables (not for production use: lists
    /// that lie could let ctguard load a module).
    pub fn read_host() -> Result<KernelModules, ModulesError> {
        match std::env::var_os("CTGUARD_MODULES_ROOT") {
            Some(root) => KernelModules::read(Path::new(&root)),
            None => KernelModules::read(Path::new("/")),
        }
    }

    /// Reads the lists under `root` (`/` on a host; a fixture tree in tests): `proc/modules`,
    /// `proc/sys/kernel/osrelease` and `lib/modules/<release>/modules.{builtin,dep}`.
    /// Missing lists are empty; an unreadable one is an error naming it.
    pub fn read(root: &Path) -> Result<KernelModules, ModulesError> {
        let release_path = root.join("proc/sys/kernel/osrelease");
        let release = read_optional(&release_path)?.unwrap_or_default();
        let lib = root.join("lib/modules").join(release.trim());
        let list = |path: PathBuf, parse: fn(&str) -> HashSet<String>| {
            Ok::<_, ModulesError>(read_optional(&path)?.map(|t| parse(&t)))
        };
        let loaded = list(root.join("proc/modules"), parse_proc_modules)?;
        let loadable = list(lib.join("modules.dep"), parse_module_paths)?;
        Ok(KernelModules {
            loads_modules: loaded.is_some(),
            knows_loadable: loadable.is_some(),
            loaded: loaded.unwrap_or_default(),
            builtin: list(lib.join("modules.builtin"), parse_module_paths)?.unwrap_or_default(),
            loadable: loadable.unwrap_or_default(),
        })
    }

    pub fn state(&self, module: &str) -> ModuleState {
        let name = normalize(module);
        if self.loaded.contains(&name) {
            ModuleState::Loaded
        } else if self.builtin.contains(&name) {
            ModuleState::BuiltIn
        } else if self.loadable.contains(&name) {
            ModuleState::Loadable
        } else if self.loads_modules && !self.knows_loadable {
            ModuleState::Unknown
        } else {
            ModuleState::NotLoadable
        }
    }

    /// Those of `modules` that using them would load, in the order given.
    pub fn would_load<'m>(&self, modules: &[&'m str]) -> Vec<&'m str> {
        modules
            .iter()
            .copied()
            .filter(|m| self.state(m).would_load())
            .collect()
    }

    /// Why the modules `missing` (from [`KernelModules::would_load`]) cannot be used, for
    /// messages; says what to mount when the lists were missing.
    pub fn not_loaded(&self, missing: &[&str]) -> String {
        let blind = if self.loads_modules && !self.knows_loadable {
            "; without modules.dep under /lib/modules it cannot tell whether they are built in \
             or would be loaded: mount the host's /lib/modules read-only"
        } else {
            ""
        };
        format!(
            "kernel module(s) {} not loaded (ctguard never loads modules{blind})",
            missing.join(", ")
        )
    }

    /// Whether all of `modules` are known to be in the kernel now.
    pub fn all_present(&self, modules: &[&str]) -> bool {
        modules
            .iter()
            .all(|m| matches!(self.state(m), ModuleState::Loaded | ModuleState::BuiltIn))
    }
}

#[derive(Debug, thiserror::Error)]
#[error("reading the kernel's module list {path}: {source}")]
pub struct ModulesError {
    path: PathBuf,
    #[source]
    source: io::Error,
}

fn read_optional(path: &Path) -> Result<Option<String>, ModulesError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ModulesError {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// The kernel treats `-` and `_` in module names alike; files often use `-`.
fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// `/proc/modules`: `nf_tables 356352 2 nft_ct, Live 0x0000000000000000`, one a line; the
/// first field is the name.
pub fn parse_proc_modules(text: &str) -> HashSet<String> {
    text.lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(normalize)
        .collect()
}

/// `modules.builtin` (`kernel/net/netfilter/nf_tables.ko`) and `modules.dep`
/// (`kernel/net/netfilter/nft_ct.ko.zst: kernel/net/netfilter/nf_tables.ko.zst …`): each
/// line starts with a module's path; its file name up to `.ko` is the name.
pub fn parse_module_paths(text: &str) -> HashSet<String> {
    text.lines()
        .filter_map(|line| line.split(':').next())
        .filter_map(|path| path.trim().rsplit('/').next())
        .filter_map(|file| file.split_once(".ko").map(|(name, _)| name))
        .filter(|name| !name.is_empty())
        .map(normalize)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn lists_parse_as_the_kernel_writes_them() {
        let loaded = parse_proc_modules(
            "nft_ct 24576 1 - Live 0x0000000000000000\n\
             nf_tables 356352 2 nft_ct, Live 0x0000000000000000\n",
        );
        assert_eq!(loaded, HashSet::from(["nft_ct".into(), "nf_tables".into()]));
        let dep = parse_module_paths(
            "kernel/net/netfilter/nft_ct.ko.zst: kernel/net/netfilter/nf_tables.ko.zst\n\
             kernel/net/netfilter/xt_CT.ko:\n\
             kernel/net/ipv4/netfilter/iptable-raw.ko.xz: kernel/net/ipv4/netfilter/ip_tables.ko.xz\n\
             \n",
        );
        assert_eq!(
            dep,
            HashSet::from(["nft_ct".into(), "xt_CT".into(), "iptable_raw".into()])
        );
    }

    #[test]
    fn states_from_a_fixture_root() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::create_dir_all(r.join("proc/sys/kernel")).unwrap();
        std::fs::create_dir_all(r.join("lib/modules/6.1.0-test")).unwrap();
        std::fs::write(r.join("proc/sys/kernel/osrelease"), "6.1.0-test\n").unwrap();
        std::fs::write(r.join("proc/modules"), "x_tables 1 0 - Live 0x0\n").unwrap();
        let lib = r.join("lib/modules/6.1.0-test");
        std::fs::write(lib.join("modules.builtin"), "kernel/net/x/ip_tables.ko\n").unwrap();
        std::fs::write(lib.join("modules.dep"), "kernel/net/x/nf_tables.ko:\n").unwrap();
        let m = KernelModules::read(r).unwrap();
        assert_eq!(m.state("x_tables"), ModuleState::Loaded);
        assert_eq!(m.state("ip_tables"), ModuleState::BuiltIn);
        assert_eq!(m.state("nf_tables"), ModuleState::Loadable);
        assert_eq!(m.state("xt_CT"), ModuleState::NotLoadable);
        assert_eq!(
            m.would_load(&["x_tables", "nf_tables", "xt_CT"]),
            ["nf_tables"]
        );
        assert!(m.all_present(&["x_tables", "ip_tables"]));
        assert!(!m.all_present(&["x_tables", "xt_CT"]));
    }

    #[test]
    fn a_kernel_without_module_lists_loads_nothing() {
        let root = tempfile::tempdir().unwrap();
        let m = KernelModules::read(root.path()).unwrap();
        assert_eq!(m, KernelModules::default());
        assert_eq!(m.state("nf_tables"), ModuleState::NotLoadable);
    }

    #[test]
    fn without_modules_dep_a_module_not_loaded_may_load() {
        // A container: the kernel loads modules (the host's modprobe), the lists are not here.
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("proc")).unwrap();
        std::fs::write(
            root.path().join("proc/modules"),
            "nf_tables 1 0 - Live 0x0\n",
        )
        .unwrap();
        let m = KernelModules::read(root.path()).unwrap();
        assert_eq!(m.state("nf_tables"), ModuleState::Loaded);
        assert_eq!(m.state("nft_ct"), ModuleState::Unknown);
        assert_eq!(m.would_load(&["nf_tables", "nft_ct"]), ["nft_ct"]);
        let why = m.not_loaded(&["nft_ct"]);
        assert!(
            why.starts_with("kernel module(s) nft_ct not loaded (ctguard never loads modules;")
                && why.contains("mount the host's /lib/modules read-only"),
            "{why}"
        );
    }

    proptest! {
        #[test]
        fn arbitrary_lists_never_panic(text in "\\PC*") {
            let _ = parse_proc_modules(&text);
            let _ = parse_module_paths(&text);
        }
    }
}
