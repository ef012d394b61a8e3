/*!
Which NOTRACK backend a host gets: nftables where the kernel has nf_tables, the iptables
fallback only where it does not, and neither when using one would load a kernel module.

The decision is read from the kernel's module lists ([`KernelModules`]), never by asking
the kernel (an nfnetlink request is what would load `nf_tables`):

| nf_tables modules (`nf_tables`, `nft_ct`) | backend |
|---|---|
| loaded or built in | nftables (unavailable, with the reason, when `nft` is not installed) |
| in no list, on a kernel without module support, or with all lists there | tried: `nft` answering means nftables; the kernel refusing means iptables |
| not loaded, and `modules.dep` missing (a container without the host's `/lib/modules`) | treated as installed: the kernel would run the host's `modprobe` |
| installed but not loaded | iptables: nf_tables is missing from the running kernel, and loading it is not ctguard's call |

The iptables fallback has its own module requirements (see [`IptablesBackend::for_host`]).
*/

use super::iptables::IptablesBackend;
use super::nft::NftBackend;
use super::notrack::{BackendKind, NotrackBackend, NotrackChange, NotrackError, PortKey};
use crate::observe::modules::KernelModules;
use std::path::PathBuf;

/// What NOTRACK needs of nftables in the kernel: the core and the `notrack` expression.
pub const NFTABLES_MODULES: [&str; 2] = ["nf_tables", "nft_ct"];

/// The backend chosen for a namespace, and why (for the log and `ctguard check`).
pub struct Choice {
    pub backend: Box<dyn NotrackBackend + Send>,
    pub why: String,
}

/// Picks the backend for the namespace at `netns` (`None`: ctguard's own).
/// `accept_untracked` is the policy's ask for UNTRACKED accept rules (iptables only).
pub fn choose(
    netns: Option<PathBuf>,
    modules: &KernelModules,
    accept_untracked: bool,
) -> Result<Choice, NotrackError> {
    let missing = modules.would_load(&NFTABLES_MODULES);
    let nftables_why = if !missing.is_empty() {
        format!("nftables: {}", modules.not_loaded(&missing))
    } else {
        let nft = NftBackend::new(netns.clone());
        let known = modules.all_present(&NFTABLES_MODULES);
        // Where the lists cannot tell, a listing of ctguard's own table is a safe test:
        // nothing can be loaded.
        match if known { Ok(None) } else { nft.table() } {
            Ok(_) => {
                return Ok(Choice {
                    backend: Box::new(nft),
                    why: if known {
                        "nf_tables is in the kernel".into()
                    } else {
                        "nft answers".into()
                    },
                });
            }
            Err(NotrackError::Unavailable { why, .. }) if !why.contains("not installed") => {
                format!("nf_tables does not work here ({why})")
            }
            Err(e) => return Err(e),
        }
    };
    match IptablesBackend::for_host(netns, modules, accept_untracked) {
        Ok(backend) => Ok(Choice {
            backend: Box::new(backend),
            why: format!("{nftables_why}: iptables fallback"),
        }),
        Err(NotrackError::Unavailable { why, .. }) => Err(NotrackError::Unavailable {
            backend: "nftables or iptables",
            why: format!("{nftables_why}; iptables: {why}"),
        }),
        Err(e) => Err(e),
    }
}

/// A backend of `kind` for undoing what it made (rollback, an exemption made before a
/// restart): the same checks as [`choose`], without the fallback.
pub fn open(
    kind: BackendKind,
    netns: Option<PathBuf>,
    modules: &KernelModules,
) -> Result<Box<dyn NotrackBackend + Send>, NotrackError> {
    Ok(match kind {
        BackendKind::Nftables => match modules.would_load(&NFTABLES_MODULES)[..] {
            [] => Box::new(NftBackend::new(netns)),
            ref missing => Box::new(NftablesNotInKernel {
                why: modules.not_loaded(missing),
            }),
        },
        BackendKind::Iptables => Box::new(IptablesBackend::for_host(netns, modules, false)?),
    })
}

/// nftables where nf_tables is not in the kernel (after a reboot, say): no exemption
/// ctguard made with it can be in force, so undoing one is done; and running `nft` at all
/// would load the module.
struct NftablesNotInKernel {
    why: String,
}

impl NotrackBackend for NftablesNotInKernel {
    fn kind(&self) -> BackendKind {
        BackendKind::Nftables
    }

    fn install(&mut self) -> Result<(), NotrackError> {
        Err(NotrackError::Unavailable {
            backend: BackendKind::Nftables.name(),
            why: self.why.clone(),
        })
    }

    fn apply(&mut self, _: &[NotrackChange]) -> Result<(), NotrackError> {
        self.install()
    }

    fn remove(&mut self, _: &[PortKey]) -> Result<(), NotrackError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn modules(loaded: &str, loadable: &str) -> KernelModules {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("proc")).unwrap();
        std::fs::create_dir_all(root.path().join("lib/modules")).unwrap();
        std::fs::write(root.path().join("proc/modules"), loaded).unwrap();
        std::fs::write(root.path().join("lib/modules/modules.dep"), loadable).unwrap();
        KernelModules::read(root.path()).unwrap()
    }

    #[test]
    fn nf_tables_in_the_kernel_means_nftables() {
        let m = modules("nf_tables 1 0 - Live 0x0\nnft_ct 1 0 - Live 0x0\n", "");
        let choice = choose(None, &m, false).unwrap();
        assert_eq!(choice.backend.kind(), BackendKind::Nftables);
        assert_eq!(choice.why, "nf_tables is in the kernel");
    }

    #[test]
    fn nf_tables_not_loaded_means_iptables_or_a_reason() {
        let m = modules("", "k/nf_tables.ko:\nk/nft_ct.ko: k/nf_tables.ko\n");
        match choose(None, &m, false) {
            Ok(choice) => {
                assert_eq!(choice.backend.kind(), BackendKind::Iptables);
                assert!(
                    choice.why.contains("nf_tables, nft_ct not loaded"),
                    "{}",
                    choice.why
                );
            }
            // No legacy iptables tools on this machine: the reason names both backends.
            Err(e) => {
                let text = e.to_string();
                assert!(
                    text.contains("nftables: kernel module(s) nf_tables, nft_ct not loaded")
                        && text.contains("iptables-legacy-restore is not installed"),
                    "{text}"
                );
            }
        }
    }

    #[test]
    fn undoing_nftables_exemptions_without_nf_tables_runs_no_nft() {
        // After a reboot nf_tables is not loaded: `nft` would load it, and nothing ctguard
        // made with it is left.
        let m = modules("", "k/nf_tables.ko:\nk/nft_ct.ko: k/nf_tables.ko\n");
        let mut backend = open(BackendKind::Nftables, None, &m).unwrap();
        assert_eq!(backend.kind(), BackendKind::Nftables);
        let web = PortKey {
            proto: crate::port::Proto::Tcp,
            port: 80,
        };
        backend.remove(&[web]).unwrap();
        assert!(!backend.uninstall().unwrap());
        let err = backend.install().unwrap_err();
        assert!(err.is_unavailable(), "{err}");
        assert!(
            err.to_string().contains("nf_tables, nft_ct not loaded"),
            "{err}"
        );
    }

    #[test]
    fn neither_backend_loads_a_module() {
        let m = modules(
            "",
            "k/nf_tables.ko:\nk/iptable_raw.ko:\nk/ip6table_raw.ko:\n",
        );
        let text = choose(None, &m, false).err().unwrap().to_string();
        assert!(text.contains("iptable_raw not loaded"), "{text}");
        assert!(text.contains("ctguard never loads modules"), "{text}");
    }
}
