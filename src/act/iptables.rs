/*!
The iptables NOTRACK fallback, for kernels without nf_tables only.

Rules go into the `raw` table with `iptables-restore --noflush` (so nothing else in the
table is touched), each tagged `-m comment --comment ctguard` and written exactly as they
are deleted, so ctguard adds and removes only its own rules and never lists a table
(listing iptables tables can load kernel modules).

iptables rules cannot expire: a NOTRACK made here lasts until ctguard removes it, so the
journal and rollback are the only way it goes — if ctguard dies mid-incident, the rules
stay until `ctguard rollback` (or a firewall reload) removes them. Use one backend per
address family ([`IptablesBackend::ipv4`], [`IptablesBackend::ipv6`]).
*/

use super::notrack::{
    NotrackBackend, NotrackChange, NotrackError, PortKey, describe, program, run_tool, status_text,
};
use std::path::PathBuf;

const BACKEND: &str = "iptables";
/// The tag on every rule ctguard writes.
pub const COMMENT: &str = "ctguard";

/// `-A` (append) or `-D` (delete) a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Append,
    Delete,
}

/// The rules that NOTRACK one port, as `(chain, match)` (see [`super::notrack`] for why
/// these three).
fn rules(port: PortKey) -> [(&'static str, String); 3] {
    let p = port.proto.name();
    let n = port.port;
    [
        ("PREROUTING", format!("-p {p} -m {p} --dport {n}")),
        ("OUTPUT", format!("-p {p} -m {p} --sport {n}")),
        ("OUTPUT", format!("-o lo -p {p} -m {p} --dport {n}")),
    ]
}

/// One rule line of `iptables-restore` input.
fn rule_line(op: Op, (chain, matches): &(&str, String)) -> String {
    let flag = match op {
        Op::Append => "-A",
        Op::Delete => "-D",
    };
    format!("{flag} {chain} {matches} -m comment --comment {COMMENT} -j CT --notrack\n")
}

/// `iptables-restore` input applying `lines` to the raw table as one transaction.
fn raw_transaction(lines: impl IntoIterator<Item = String>) -> String {
    let mut text = String::from("*raw\n");
    text.extend(lines);
    text.push_str("COMMIT\n");
    text
}

/// Appends or deletes the rules of `ports`, one transaction.
fn restore_text(op: Op, ports: &[PortKey]) -> String {
    raw_transaction(
        ports
            .iter()
            .flat_map(|&port| rules(port))
            .map(|rule| rule_line(op, &rule)),
    )
}

/// NOTRACK through tagged rules in the `raw` table of one family and namespace.
#[derive(Debug, Clone)]
pub struct IptablesBackend {
    netns: Option<PathBuf>,
    restore: PathBuf,
}

impl IptablesBackend {
    /// IPv4 rules (`iptables-restore` from `PATH`) in the namespace at `netns`.
    pub fn ipv4(netns: Option<PathBuf>) -> IptablesBackend {
        IptablesBackend {
            netns,
            restore: program("iptables-restore"),
        }
    }

    /// IPv6 rules (`ip6tables-restore` from `PATH`).
    pub fn ipv6(netns: Option<PathBuf>) -> IptablesBackend {
        IptablesBackend {
            netns,
            restore: program("ip6tables-restore"),
        }
    }

    /// Feeds `text` to `iptables-restore --noflush`; `Ok(false)` when it refused because
    /// a rule to delete does not exist.
    fn restore(&self, text: &str) -> Result<bool, NotrackError> {
        let args = ["--noflush"];
        let output = run_tool(
            BACKEND,
            self.netns.as_deref(),
            &self.restore,
            &args,
            text.as_bytes(),
        )?;
        if output.status.success() {
            return Ok(true);
        }
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
        if stderr.contains("does a matching rule exist") {
            return Ok(false);
        }
        Err(NotrackError::Failed {
            command: describe(&self.restore, &args),
            status: status_text(&output),
            stderr,
            sent: text.to_string(),
        })
    }
}

impl NotrackBackend for IptablesBackend {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn expires_by_itself(&self) -> bool {
        false
    }

    /// Nothing to create: the `raw` chains are built in.
    fn install(&mut self) -> Result<(), NotrackError> {
        Ok(())
    }

    /// Adds the ports' rules; a port already NOTRACKed keeps one copy of each rule (the
    /// timeout is ignored: these rules never expire).
    fn apply(&mut self, changes: &[NotrackChange]) -> Result<(), NotrackError> {
        changes.iter().try_for_each(NotrackChange::check)?;
        let ports: Vec<PortKey> = changes.iter().map(NotrackChange::target).collect();
        // Without listing the table there is no "append unless present": remove first.
        self.remove(&ports)?;
        if ports.is_empty() {
            return Ok(());
        }
        self.restore(&restore_text(Op::Append, &ports)).map(drop)
    }

    /// Deletes the ports' rules. All at once when they are all there; otherwise rule by
    /// rule, skipping the ones already gone (a delete of a missing rule fails the whole
    /// restore).
    fn remove(&mut self, ports: &[PortKey]) -> Result<(), NotrackError> {
        if ports.is_empty() || self.restore(&restore_text(Op::Delete, ports))? {
            return Ok(());
        }
        for &port in ports {
            for rule in rules(port) {
                self.restore(&raw_transaction([rule_line(Op::Delete, &rule)]))?;
            }
        }
        Ok(())
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

    #[test]
    fn append_text_tags_every_rule_and_commits_once() {
        assert_eq!(
            restore_text(Op::Append, &[DNS, WEB]),
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
    fn delete_text_mirrors_append_text() {
        let append = restore_text(Op::Append, &[WEB]);
        let delete = restore_text(Op::Delete, &[WEB]);
        assert_eq!(delete, append.replace("\n-A ", "\n-D "));
        for rule in rules(WEB) {
            assert!(delete.contains(&rule_line(Op::Delete, &rule)), "{rule:?}");
        }
    }

    #[test]
    fn missing_restore_tool_is_unavailable() {
        let mut ipt = IptablesBackend {
            netns: None,
            restore: PathBuf::from("/nonexistent/iptables-restore"),
        };
        let err = ipt.remove(&[WEB]).unwrap_err();
        assert!(err.is_unavailable(), "{err}");
    }
}
