/*!
The iptables NOTRACK fallback, for kernels without nf_tables only (see [`super::choose`]).

Rules go into the `raw` table with `iptables-legacy-restore --noflush` (so nothing else in
the table is touched), each tagged `-m comment --comment ctguard`. Before each change the
backend reads only the tables it writes to (`iptables-legacy-save -t raw`, and `-t filter`
for the accept rules) and deletes exactly the tagged rules that are there, so it never
duplicates a rule nor touches one it did not write. Tables are read only once their
modules are known to be in (listing iptables tables can load modules). The legacy tools
are the only ones that work without nf_tables: `iptables-nft` writes to nf_tables itself.

When the policy asks for it (`accept_untracked`), each port also gets an ACCEPT rule for
its UNTRACKED packets at the top of the `filter` table's INPUT chain, for hosts whose
filter only lets ESTABLISHED/NEW packets in (seed 000): an untracked packet is neither.

iptables rules cannot expire: a NOTRACK made here lasts until ctguard removes it. The
daemon removes each one when its expiry passes without a renewal (also at its next start
after a crash), and `ctguard rollback` removes them all. A backend covers the address
families whose kernel modules are in (IPv4, and IPv6 where `ip6table_raw` is).
*/

use super::notrack::{
    BackendKind, NotrackBackend, NotrackChange, NotrackError, PortKey, describe, program, run_tool,
    status_text,
};
use crate::observe::modules::KernelModules;
use std::path::{Path, PathBuf};

const BACKEND: &str = "iptables";
/// The tag on every rule ctguard writes.
pub const COMMENT: &str = "ctguard";

/// What every family's NOTRACK rules use: the CT target, the comment tag, the tcp/udp port
/// matches.
const COMMON_MODULES: [&str; 4] = ["x_tables", "xt_CT", "xt_comment", "xt_tcpudp"];
/// What the UNTRACKED accept rule adds (besides the family's filter table).
const ACCEPT_MODULES: [&str; 1] = ["xt_conntrack"];

/// An address family's tool and the modules its tables need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Family {
    /// `ipv4`, `ipv6`.
    pub name: &'static str,
    /// The legacy restore tool (never the nf_tables variant).
    pub restore: &'static str,
    pub modules: [&'static str; 2],
    pub filter_module: &'static str,
}

pub const IPV4: Family = Family {
    name: "ipv4",
    restore: "iptables-legacy-restore",
    modules: ["ip_tables", "iptable_raw"],
    filter_module: "iptable_filter",
};

pub const IPV6: Family = Family {
    name: "ipv6",
    restore: "ip6tables-legacy-restore",
    modules: ["ip6_tables", "ip6table_raw"],
    filter_module: "ip6table_filter",
};

/// `-A` (append), `-I` (insert at the top) or `-D` (delete) a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Append,
    Insert,
    Delete,
}

/// One rule ctguard writes: its table, chain, matches and target.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    table: &'static str,
    chain: &'static str,
    matches: String,
    target: &'static str,
}

/// The raw-table rules that NOTRACK one port (see [`super::notrack`] for why these three).
fn notrack_rules(port: PortKey) -> [Rule; 3] {
    let p = port.proto.name();
    let n = port.port;
    let rule = |chain, matches| Rule {
        table: "raw",
        chain,
        matches,
        target: "CT --notrack",
    };
    [
        rule("PREROUTING", format!("-p {p} -m {p} --dport {n}")),
        rule("OUTPUT", format!("-p {p} -m {p} --sport {n}")),
        rule("OUTPUT", format!("-o lo -p {p} -m {p} --dport {n}")),
    ]
}

/// The filter-table rule that lets one port's untracked packets in.
fn accept_rule(port: PortKey) -> Rule {
    let p = port.proto.name();
    Rule {
        table: "filter",
        chain: "INPUT",
        matches: format!(
            "-p {p} -m {p} --dport {} -m conntrack --ctstate UNTRACKED",
            port.port
        ),
        target: "ACCEPT",
    }
}

/// One rule line of `iptables-restore` input.
fn rule_line(op: Op, rule: &Rule) -> String {
    let flag = match op {
        Op::Append => "-A",
        Op::Insert => "-I",
        Op::Delete => "-D",
    };
    format!(
        "{flag} {} {} -m comment --comment {COMMENT} -j {}\n",
        rule.chain, rule.matches, rule.target
    )
}

/// `iptables-restore` input applying `(op, rule)`s as one transaction (one `*table` block
/// per table, in the order the tables first appear).
fn transaction(ops: &[(Op, Rule)]) -> String {
    let mut tables: Vec<&str> = Vec::new();
    for (_, rule) in ops {
        if !tables.contains(&rule.table) {
            tables.push(rule.table);
        }
    }
    let mut text = String::new();
    for table in tables {
        text.push_str(&format!("*{table}\n"));
        for (op, rule) in ops.iter().filter(|(_, r)| r.table == table) {
            text.push_str(&rule_line(*op, rule));
        }
        text.push_str("COMMIT\n");
    }
    text
}

/// NOTRACK through tagged rules in the `raw` tables of one namespace's address families.
#[derive(Debug, Clone)]
pub struct IptablesBackend {
    netns: Option<PathBuf>,
    /// The `(restore, save)` tools of each family covered.
    tools: Vec<(PathBuf, PathBuf)>,
    /// Whether `apply` also adds the UNTRACKED accept rule.
    accept_untracked: bool,
    /// Whether the filter tables may be touched at all: their modules are in (reading or
    /// changing them where they are not would load them, and finds nothing anyway).
    filter_usable: bool,
}

impl IptablesBackend {
    /// A backend for the families whose modules are in the kernel (`modules`) and whose
    /// legacy tools are on `PATH`; unavailable, with the reason, when no family qualifies or
    /// when `accept_untracked` needs modules that are not in.
    pub fn for_host(
        netns: Option<PathBuf>,
        modules: &KernelModules,
        accept_untracked: bool,
    ) -> Result<IptablesBackend, NotrackError> {
        let unavailable = |why: String| NotrackError::Unavailable {
            backend: BACKEND,
            why,
        };
        let missing = modules.would_load(&COMMON_MODULES);
        if !missing.is_empty() {
            return Err(unavailable(modules.not_loaded(&missing)));
        }
        let mut tools = Vec::new();
        let mut skipped = Vec::new();
        let mut filter_usable = modules.would_load(&ACCEPT_MODULES).is_empty();
        for family in [IPV4, IPV6] {
            let missing = modules.would_load(&family.modules);
            let restore = program(family.restore);
            let save = program(&family.restore.replace("-restore", "-save"));
            if !missing.is_empty() {
                skipped.push(format!("{}: {}", family.name, modules.not_loaded(&missing)));
            } else if !restore.is_file() || !save.is_file() {
                skipped.push(format!(
                    "{}: {} is not installed",
                    family.name, family.restore
                ));
            } else {
                filter_usable &= !modules.state(family.filter_module).would_load();
                tools.push((restore, save));
            }
        }
        if tools.is_empty() {
            return Err(unavailable(skipped.join("; ")));
        }
        if accept_untracked && !filter_usable {
            return Err(unavailable(format!(
                "accept_untracked needs the filter table and the conntrack match: {}",
                modules.not_loaded(&modules.would_load(&[
                    ACCEPT_MODULES[0],
                    IPV4.filter_module,
                    IPV6.filter_module
                ]))
            )));
        }
        Ok(IptablesBackend {
            netns,
            tools,
            accept_untracked,
            filter_usable,
        })
    }

    /// A backend using exactly these `(restore, save)` tools (one pair per family).
    pub fn with_programs(
        netns: Option<PathBuf>,
        tools: Vec<(PathBuf, PathBuf)>,
        accept_untracked: bool,
    ) -> IptablesBackend {
        IptablesBackend {
            netns,
            tools,
            accept_untracked,
            filter_usable: true,
        }
    }

    /// The rules of `ports` this backend writes or may have written.
    fn rules_of(&self, ports: &[PortKey], with_accept: bool) -> Vec<Rule> {
        ports
            .iter()
            .flat_map(|&port| {
                let accept = with_accept.then(|| accept_rule(port));
                notrack_rules(port).into_iter().chain(accept)
            })
            .collect()
    }

    /// The tables ctguard writes to.
    fn tables(&self) -> &'static [&'static str] {
        if self.filter_usable {
            &["raw", "filter"]
        } else {
            &["raw"]
        }
    }

    /// In each family, one transaction: delete those of `gone` that exist, then add `new`.
    /// Reading ctguard's own tables first is what makes this exact (a delete of a missing
    /// rule fails the whole restore, and an append of a present one duplicates it).
    fn replace(&self, gone: &[Rule], new: &[(Op, Rule)]) -> Result<(), NotrackError> {
        for (restore, save) in &self.tools {
            let present = tagged_rules(self.netns.as_deref(), save, self.tables())?;
            let mut ops: Vec<(Op, Rule)> = gone
                .iter()
                .filter(|rule| present.contains(&(rule.table, rule_line(Op::Append, rule))))
                .map(|rule| (Op::Delete, rule.clone()))
                .collect();
            ops.extend(new.iter().cloned());
            if !ops.is_empty() {
                restore_one(self.netns.as_deref(), restore, &transaction(&ops))?;
            }
        }
        Ok(())
    }
}

/// ctguard's rules in `tables` as `save` prints them: `(table, "-A … --comment ctguard …")`.
fn tagged_rules(
    netns: Option<&Path>,
    save: &Path,
    tables: &[&'static str],
) -> Result<Vec<(&'static str, String)>, NotrackError> {
    let mut rules = Vec::new();
    for &table in tables {
        let args = ["-t", table];
        let output = run_tool(BACKEND, netns, save, &args, b"")?;
        if !output.status.success() {
            return Err(NotrackError::Failed {
                command: describe(save, &args),
                status: status_text(&output),
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
                sent: String::new(),
            });
        }
        rules.extend(
            parse_tagged(&String::from_utf8_lossy(&output.stdout))
                .into_iter()
                .map(|line| (table, line)),
        );
    }
    Ok(rules)
}

/// The lines of an `iptables-save` listing that are ctguard's rules, each with its newline
/// (as [`rule_line`] writes them).
fn parse_tagged(listing: &str) -> Vec<String> {
    let tag = format!(" -m comment --comment {COMMENT} ");
    listing
        .lines()
        .filter(|line| line.starts_with("-A ") && line.contains(&tag))
        .map(|line| format!("{line}\n"))
        .collect()
}

/// One `restore --noflush` run.
fn restore_one(netns: Option<&Path>, tool: &Path, text: &str) -> Result<(), NotrackError> {
    let args = ["--noflush"];
    let output = run_tool(BACKEND, netns, tool, &args, text.as_bytes())?;
    if output.status.success() {
        return Ok(());
    }
    Err(NotrackError::Failed {
        command: describe(tool, &args),
        status: status_text(&output),
        stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        sent: text.to_string(),
    })
}

impl NotrackBackend for IptablesBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Iptables
    }

    /// Nothing to create: the `raw` chains are built in.
    fn install(&mut self) -> Result<(), NotrackError> {
        Ok(())
    }

    /// Adds the ports' rules, replacing any copy already there in the same transaction
    /// (the timeout is ignored: these rules never expire).
    fn apply(&mut self, changes: &[NotrackChange]) -> Result<(), NotrackError> {
        changes.iter().try_for_each(NotrackChange::check)?;
        let ports: Vec<PortKey> = changes.iter().map(NotrackChange::target).collect();
        let new: Vec<(Op, Rule)> = self
            .rules_of(&ports, self.accept_untracked)
            .into_iter()
            .map(|rule| {
                // The accept rule must come before the host's own filter rules.
                let op = if rule.table == "filter" {
                    Op::Insert
                } else {
                    Op::Append
                };
                (op, rule)
            })
            .collect();
        self.replace(&self.rules_of(&ports, self.filter_usable), &new)
    }

    /// Deletes the ports' rules that exist (the accept rules too, wherever the filter table
    /// may hold them).
    fn remove(&mut self, ports: &[PortKey]) -> Result<(), NotrackError> {
        self.replace(&self.rules_of(ports, self.filter_usable), &[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::act::notrack::Proto;

    const DNS: PortKey = PortKey {
        proto: Proto::Udp,
        port: 5353,
    };
    const WEB: PortKey = PortKey {
        proto: Proto::Tcp,
        port: 8080,
    };

    fn appended(ports: &[PortKey], accept: bool) -> String {
        let backend = IptablesBackend::with_programs(None, Vec::new(), accept);
        let ops: Vec<(Op, Rule)> = backend
            .rules_of(ports, accept)
            .into_iter()
            .map(|r| {
                (
                    if r.table == "filter" {
                        Op::Insert
                    } else {
                        Op::Append
                    },
                    r,
                )
            })
            .collect();
        transaction(&ops)
    }

    #[test]
    fn append_text_tags_every_rule_and_commits_once() {
        assert_eq!(
            appended(&[DNS, WEB], false),
            "*raw\n\
             -A PREROUTING -p udp -m udp --dport 5353 -m comment --comment ctguard -j CT --notrack\n\
             -A OUTPUT -p udp -m udp --sport 5353 -m comment --comment ctguard -j CT --notrack\n\
             -A OUTPUT -o lo -p udp -m udp --dport 5353 -m comment --comment ctguard -j CT --notrack\n\
             -A PREROUTING -p tcp -m tcp --dport 8080 -m comment --comment ctguard -j CT --notrack\n\
             -A OUTPUT -p tcp -m tcp --sport 8080 -m comment --comment ctguard -j CT --notrack\n\
             -A OUTPUT -o lo -p tcp -m tcp --dport 8080 -m comment --comment ctguard -j CT --notrack\n\
             COMMIT\n"
        );
    }

    #[test]
    fn the_accept_rule_goes_first_in_the_filter_input_chain() {
        let text = appended(&[WEB], true);
        assert!(
            text.ends_with(
                "COMMIT\n*filter\n\
                 -I INPUT -p tcp -m tcp --dport 8080 -m conntrack --ctstate UNTRACKED \
                 -m comment --comment ctguard -j ACCEPT\nCOMMIT\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn only_tagged_rules_are_read_back_exactly_as_written() {
        let listing = "# Generated by iptables-save v1.8.9\n*raw\n:PREROUTING ACCEPT [0:0]\n\
            -A PREROUTING -p udp -m udp --dport 5353 -m comment --comment ctguard -j CT --notrack\n\
            -A PREROUTING -p udp -m udp --dport 53 -m comment --comment ctguard-other -j CT --notrack\n\
            -A PREROUTING -p udp -m udp --dport 53 -j CT --notrack\nCOMMIT\n";
        assert_eq!(
            parse_tagged(listing),
            [rule_line(Op::Append, &notrack_rules(DNS)[0])]
        );
    }

    #[test]
    fn delete_text_mirrors_append_text() {
        let rules = notrack_rules(WEB);
        let delete: Vec<(Op, Rule)> = rules.iter().map(|r| (Op::Delete, r.clone())).collect();
        assert_eq!(
            transaction(&delete),
            appended(&[WEB], false).replace("\n-A ", "\n-D ")
        );
    }

    #[test]
    fn missing_restore_tool_is_unavailable() {
        let mut ipt = IptablesBackend::with_programs(
            None,
            vec![(
                PathBuf::from("/nonexistent/iptables-restore"),
                PathBuf::from("/nonexistent/iptables-save"),
            )],
            false,
        );
        let err = ipt.remove(&[WEB]).unwrap_err();
        assert!(err.is_unavailable(), "{err}");
    }

    fn modules(loadable: &str) -> KernelModules {
        let root = tempfile::tempdir().unwrap();
        let lib = root.path().join("lib/modules");
        std::fs::create_dir_all(&lib).unwrap();
        std::fs::write(lib.join("modules.dep"), loadable).unwrap();
        KernelModules::read(root.path()).unwrap()
    }

    #[test]
    fn families_whose_modules_would_load_are_left_out() {
        let err = IptablesBackend::for_host(None, &modules("k/xt_CT.ko:\n"), false).unwrap_err();
        assert!(err.to_string().contains("xt_CT not loaded"), "{err}");
        let err = IptablesBackend::for_host(
            None,
            &modules("k/iptable_raw.ko:\nk/ip6table_raw.ko:\n"),
            false,
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("ipv4: kernel module(s) iptable_raw not loaded")
                && text.contains("ipv6: kernel module(s) ip6table_raw"),
            "{text}"
        );
        let err = IptablesBackend::for_host(None, &modules("k/xt_conntrack.ko:\n"), true)
            .err()
            .map(|e| e.to_string());
        // Without the legacy tools installed the families are out for that reason instead.
        assert!(
            err.as_deref().is_some_and(|e| e.contains("xt_conntrack")
                || e.contains("iptables-legacy-restore is not installed")),
            "{err:?}"
        );
    }
}
