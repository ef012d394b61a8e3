/*!
The nftables NOTRACK backend: ctguard's own table `inet ctguard`, and nothing else.

The table holds two sets of ports, `notrack_tcp` and `notrack_udp` (`flags timeout`), and
two chains at priority raw that NOTRACK what the sets name (see [`super::notrack`] for
which packets). Ports are set elements with a timeout: ctguard refreshes them while an
incident lasts, and if ctguard dies the kernel expires them by itself.

Every change is one JSON transaction on `nft -j -f -`, built from the typed structs below
(the `nftables` crate is not used: it serialises `notrack` wrongly; nft wants
`{"notrack": null}`). The only read is `nft -j list table inet ctguard`: listing anything
wider would show (and, for iptables, could load modules for) tables that are not ours.

The builders and the listing parser are pure functions, tested on JSON captured from this
kernel (`tests/fixtures/nft/`); [`NftBackend`] only adds running nft in the namespace.
*/

use super::notrack::{
    BackendKind, NotrackBackend, NotrackChange, NotrackError, NotrackedPort, PortKey, Proto,
    describe, program, run_tool, status_text,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

const FAMILY: &str = "inet";
const TABLE: &str = "ctguard";
/// `priority raw`: before conntrack (-200) looks at the packet.
const PRIORITY_RAW: i32 = -300;
const BACKEND: &str = "nftables";

fn set_name(proto: Proto) -> &'static str {
    match proto {
        Proto::Tcp => "notrack_tcp",
        Proto::Udp => "notrack_udp",
    }
}

// --- What ctguard sends ---------------------------------------------------------------

#[derive(Debug, Serialize)]
struct Batch {
    nftables: Vec<Cmd>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "lowercase")]
enum Cmd {
    Add(Object),
    /// Like `add`, but fails if the object exists.
    Create(Object),
    Delete(Object),
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "lowercase")]
enum Object {
    Table(TableRef),
    Set(SetDef),
    Chain(ChainDef),
    Rule(RuleDef),
    Element(Elements),
}

#[derive(Debug, Serialize)]
struct TableRef {
    family: &'static str,
    name: &'static str,
}

#[derive(Debug, Serialize)]
struct SetDef {
    family: &'static str,
    table: &'static str,
    name: &'static str,
    #[serde(rename = "type")]
    key_type: &'static str,
    flags: [&'static str; 1],
}

#[derive(Debug, Serialize)]
struct ChainDef {
    family: &'static str,
    table: &'static str,
    name: &'static str,
    #[serde(rename = "type")]
    chain_type: &'static str,
    hook: &'static str,
    prio: i32,
    policy: &'static str,
}

#[derive(Debug, Serialize)]
struct RuleDef {
    family: &'static str,
    table: &'static str,
    chain: &'static str,
    expr: Vec<Stmt>,
}

#[derive(Debug, Serialize)]
struct Elements {
    family: &'static str,
    table: &'static str,
    name: &'static str,
    elem: Vec<ElemOut>,
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
enum ElemOut {
    Timed {
        elem: TimedElem,
    },
    /// A bare value names an element to delete.
    Bare(u16),
}

#[derive(Debug, Serialize)]
struct TimedElem {
    val: u16,
    /// Seconds (nft's JSON unit for element timeouts).
    timeout: u32,
}

/// A rule statement.
#[derive(Debug, Serialize)]
#[serde(rename_all = "lowercase")]
enum Stmt {
    Match(Match),
    /// Serialises as `{"notrack": null}`, the form nft accepts.
    Notrack(()),
}

#[derive(Debug, Serialize)]
struct Match {
    op: String,
    left: Expr,
    right: Expr,
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
enum Expr {
    Payload {
        payload: Payload,
    },
    Meta {
        meta: Meta,
    },
    /// A literal: a set reference (`@notrack_tcp`) or an interface name.
    Literal(String),
}

#[derive(Debug, Serialize)]
struct Payload {
    protocol: String,
    field: String,
}

#[derive(Debug, Serialize)]
struct Meta {
    key: String,
}

fn eq(left: Expr, right: Expr) -> Stmt {
    Stmt::Match(Match {
        op: "==".into(),
        left,
        right,
    })
}

fn port_in_set(proto: Proto, field: &str) -> Stmt {
    eq(
        Expr::Payload {
            payload: Payload {
                protocol: proto.name().into(),
                field: field.into(),
            },
        },
        Expr::Literal(format!("@{}", set_name(proto))),
    )
}

/// The chains ctguard's table holds: (name, hook).
const CHAINS: [(&str, &str); 2] = [("prerouting", "prerouting"), ("output", "output")];

/// Every rule of ctguard's table, per chain, in order.
fn rules() -> Vec<(&'static str, Vec<Stmt>)> {
    let out_via_lo = || {
        eq(
            Expr::Meta {
                meta: Meta { key: "oif".into() },
            },
            Expr::Literal("lo".into()),
        )
    };
    let mut rules = Vec::new();
    for proto in Proto::ALL {
        rules.push((
            "prerouting",
            vec![port_in_set(proto, "dport"), Stmt::Notrack(())],
        ));
    }
    for proto in Proto::ALL {
        rules.push((
            "output",
            vec![port_in_set(proto, "sport"), Stmt::Notrack(())],
        ));
    }
    for proto in Proto::ALL {
        rules.push((
            "output",
            vec![out_via_lo(), port_in_set(proto, "dport"), Stmt::Notrack(())],
        ));
    }
    rules
}

const TABLE_REF: TableRef = TableRef {
    family: FAMILY,
    name: TABLE,
};

/// Creates the whole table (failing if it exists, so two installers never duplicate its
/// rules), then adds `ports` back.
fn create_table(ports: &[NotrackChange]) -> Vec<Cmd> {
    let mut cmds = vec![Cmd::Create(Object::Table(TABLE_REF))];
    for proto in Proto::ALL {
        cmds.push(Cmd::Add(Object::Set(SetDef {
            family: FAMILY,
            table: TABLE,
            name: set_name(proto),
            key_type: "inet_service",
            flags: ["timeout"],
        })));
    }
    for (name, hook) in CHAINS {
        cmds.push(Cmd::Add(Object::Chain(ChainDef {
            family: FAMILY,
            table: TABLE,
            name,
            chain_type: "filter",
            hook,
            prio: PRIORITY_RAW,
            policy: "accept",
        })));
    }
    for (chain, expr) in rules() {
        cmds.push(Cmd::Add(Object::Rule(RuleDef {
            family: FAMILY,
            table: TABLE,
            chain,
            expr,
        })));
    }
    cmds.extend(add_elements(ports));
    cmds
}

/// Replaces a table that is not the one ctguard makes, in one transaction, keeping the
/// ports it held (with the time they had left).
fn recreate_table(ports: &[NotrackChange]) -> Vec<Cmd> {
    let mut cmds = remove_table();
    cmds.extend(create_table(ports));
    cmds
}

/// Deletes the table; adding it first makes the delete succeed when it is already gone.
fn remove_table() -> Vec<Cmd> {
    vec![
        Cmd::Add(Object::Table(TABLE_REF)),
        Cmd::Delete(Object::Table(TABLE_REF)),
    ]
}

fn elements(proto: Proto, elem: Vec<ElemOut>) -> Object {
    Object::Element(Elements {
        family: FAMILY,
        table: TABLE,
        name: set_name(proto),
        elem,
    })
}

/// One port per (proto, port), the longest timeout if a port is named twice.
fn by_set(changes: &[NotrackChange]) -> BTreeMap<Proto, BTreeMap<u16, u32>> {
    let mut sets: BTreeMap<Proto, BTreeMap<u16, u32>> = BTreeMap::new();
    for c in changes {
        let timeout = sets.entry(c.proto).or_default().entry(c.port).or_default();
        *timeout = (*timeout).max(c.timeout_secs);
    }
    sets
}

fn timed(ports: &BTreeMap<u16, u32>) -> Vec<ElemOut> {
    ports
        .iter()
        .map(|(&val, &timeout)| ElemOut::Timed {
            elem: TimedElem { val, timeout },
        })
        .collect()
}

fn bare(ports: impl IntoIterator<Item = u16>) -> Vec<ElemOut> {
    ports.into_iter().map(ElemOut::Bare).collect()
}

/// Adds new elements only (used when the table is created in the same transaction).
fn add_elements(changes: &[NotrackChange]) -> Vec<Cmd> {
    by_set(changes)
        .into_iter()
        .map(|(proto, ports)| Cmd::Add(elements(proto, timed(&ports))))
        .collect()
}

/// Adds the ports or restarts their timeout: add (a no-op if present), delete, add again
/// with the new timeout. Older kernels keep an existing element's timeout on a plain
/// add; the transaction is atomic, so no packet sees the port missing.
fn apply_changes(changes: &[NotrackChange]) -> Vec<Cmd> {
    let mut cmds = Vec::new();
    for (proto, ports) in by_set(changes) {
        cmds.push(Cmd::Add(elements(proto, timed(&ports))));
        cmds.push(Cmd::Delete(elements(proto, bare(ports.keys().copied()))));
        cmds.push(Cmd::Add(elements(proto, timed(&ports))));
    }
    cmds
}

/// Removes the ports; adding them first (with a 1 s timeout, in case the transaction were
/// ever cut short) makes the delete succeed for ports already gone or expired.
fn remove_ports(ports: &[PortKey]) -> Vec<Cmd> {
    let mut sets: BTreeMap<Proto, BTreeMap<u16, u32>> = BTreeMap::new();
    for p in ports {
        sets.entry(p.proto).or_default().insert(p.port, 1);
    }
    let mut cmds = Vec::new();
    for (proto, ports) in sets {
        cmds.push(Cmd::Add(elements(proto, timed(&ports))));
        cmds.push(Cmd::Delete(elements(proto, bare(ports.into_keys()))));
    }
    cmds
}

fn to_json(cmds: Vec<Cmd>) -> String {
    serde_json::to_string(&Batch { nftables: cmds }).expect("nft commands serialise")
}

// --- What nft lists ----------------------------------------------------------------------

#[derive(Debug, Deserialize)]
struct Listing {
    nftables: Vec<ListItem>,
}

/// One object of a listing. Objects of other kinds (`metainfo`, `table`, maps, …) leave
/// every field empty and are skipped.
#[derive(Debug, Deserialize)]
struct ListItem {
    set: Option<ListedSet>,
    chain: Option<ListedChain>,
    rule: Option<ListedRule>,
}

#[derive(Debug, Deserialize)]
struct ListedSet {
    name: String,
    #[serde(rename = "type")]
    key_type: serde_json::Value,
    #[serde(default)]
    flags: Vec<String>,
    #[serde(default)]
    elem: Vec<ListedElem>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ListedElem {
    /// An element with a timeout (all of ctguard's).
    Timed { elem: ElemDetail },
    /// An element without one.
    Bare(u16),
}

#[derive(Debug, Deserialize)]
struct ElemDetail {
    val: u16,
    /// Seconds.
    timeout: Option<u64>,
    /// Seconds left, rounded down.
    expires: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct ListedChain {
    name: String,
    #[serde(rename = "type")]
    chain_type: Option<String>,
    hook: Option<String>,
    prio: Option<i64>,
    policy: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ListedRule {
    chain: String,
    /// Kept loose: a rule ctguard did not write may use any statement; it just does not
    /// match ours.
    expr: serde_json::Value,
}

/// ctguard's table as nft lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableState {
    /// The ports in the sets.
    pub ports: Vec<NotrackedPort>,
    /// Why the table is not exactly the one ctguard makes (someone edited it, or an
    /// older ctguard made it), or `None`.
    pub mismatch: Option<String>,
}

/// Parses `nft -j list table inet ctguard`.
pub fn parse_listing(bytes: &[u8]) -> Result<TableState, String> {
    let listing: Listing = serde_json::from_slice(bytes)
        .map_err(|e| format!("expected nft's JSON listing ({{\"nftables\": [...]}}): {e}"))?;
    let mut ports = Vec::new();
    let mut problems = Vec::new();
    let mut sets_seen = Vec::new();
    let mut chains_seen = Vec::new();
    let mut rules_seen: Vec<(String, serde_json::Value)> = Vec::new();
    for item in listing.nftables {
        if let Some(set) = item.set {
            let Some(proto) = Proto::ALL.into_iter().find(|&p| set_name(p) == set.name) else {
                problems.push(format!("unexpected set {}", set.name));
                continue;
            };
            if set.key_type != "inet_service" || set.flags != ["timeout"] {
                problems.push(format!(
                    "set {} has type {} and flags {:?}, not inet_service with timeout",
                    set.name, set.key_type, set.flags
                ));
            }
            sets_seen.push(proto);
            ports.extend(set.elem.into_iter().map(|e| listed_port(proto, e)));
        }
        if let Some(chain) = item.chain {
            let expected = CHAINS.iter().any(|&(name, hook)| {
                chain.name == name
                    && chain.chain_type.as_deref() == Some("filter")
                    && chain.hook.as_deref() == Some(hook)
                    && chain.prio == Some(i64::from(PRIORITY_RAW))
                    && chain.policy.as_deref() == Some("accept")
            });
            if !expected {
                problems.push(format!("chain {} is not one ctguard makes", chain.name));
            }
            chains_seen.push(chain.name);
        }
        if let Some(rule) = item.rule {
            rules_seen.push((rule.chain, rule.expr));
        }
    }
    for proto in Proto::ALL {
        if !sets_seen.contains(&proto) {
            problems.push(format!("set {} is missing", set_name(proto)));
        }
    }
    for (name, _) in CHAINS {
        if !chains_seen.iter().any(|c| c == name) {
            problems.push(format!("chain {name} is missing"));
        }
    }
    let expected_rules: Vec<(String, serde_json::Value)> = rules()
        .into_iter()
        .map(|(chain, expr)| {
            let expr = serde_json::to_value(expr).expect("rules serialise");
            (chain.to_string(), expr)
        })
        .collect();
    if rules_seen != expected_rules {
        problems.push(format!(
            "its {} rules are not the {} ctguard makes",
            rules_seen.len(),
            expected_rules.len()
        ));
    }
    ports.sort_by_key(|p| p.target);
    Ok(TableState {
        ports,
        mismatch: (!problems.is_empty()).then(|| problems.join("; ")),
    })
}

fn listed_port(proto: Proto, elem: ListedElem) -> NotrackedPort {
    let (port, timeout, expires) = match elem {
        ListedElem::Timed { elem } => (elem.val, elem.timeout, elem.expires),
        ListedElem::Bare(port) => (port, None, None),
    };
    NotrackedPort {
        target: PortKey { proto, port },
        timeout: timeout.map(Duration::from_secs),
        expires: expires.map(Duration::from_secs),
    }
}

/// What nft's stderr means when the kernel (or the environment) cannot do nf_tables at
/// all: no nfnetlink (`Protocol not supported`), no nf_tables or no `notrack` expression
/// (`Operation not supported`), no CAP_NET_ADMIN (`Operation not permitted`).
fn unavailable_reason(stderr: &str) -> Option<&'static str> {
    [
        ("Protocol not supported", "the kernel has no nfnetlink"),
        (
            "Operation not supported",
            "the kernel lacks nf_tables (or its notrack expression)",
        ),
        (
            "Operation not permitted",
            "not permitted (CAP_NET_ADMIN is needed)",
        ),
    ]
    .into_iter()
    .find(|(text, _)| stderr.contains(text))
    .map(|(_, why)| why)
}

/// nft's answer when the listed table does not exist.
fn means_no_table(stderr: &str) -> bool {
    stderr.contains("No such file or directory")
}

// --- The backend -----------------------------------------------------------------------

/// NOTRACK through ctguard's own nftables table in one network namespace.
#[derive(Debug, Clone)]
pub struct NftBackend {
    netns: Option<PathBuf>,
    nft: PathBuf,
}

impl NftBackend {
    /// A backend for the namespace at `netns` (`None`: ctguard's own), using `nft` from
    /// `PATH`.
    pub fn new(netns: Option<PathBuf>) -> NftBackend {
        NftBackend::with_program(netns, program("nft"))
    }

    /// The same with an explicit `nft` binary.
    pub fn with_program(netns: Option<PathBuf>, nft: PathBuf) -> NftBackend {
        NftBackend { netns, nft }
    }

    /// Reads ctguard's table, or `None` when it does not exist.
    pub fn table(&self) -> Result<Option<TableState>, NotrackError> {
        let args = ["-j", "list", "table", FAMILY, TABLE];
        let output = self.nft(&args, b"")?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            if means_no_table(&stderr) {
                return Ok(None);
            }
            return Err(self.failure(&args, &output, ""));
        }
        parse_listing(&output.stdout)
            .map(Some)
            .map_err(|detail| NotrackError::Output {
                command: describe(&self.nft, &args),
                detail,
            })
    }

    /// The ports NOTRACKed now, with the time they have left (empty without the table).
    pub fn list_ports(&self) -> Result<Vec<NotrackedPort>, NotrackError> {
        Ok(self.table()?.map(|t| t.ports).unwrap_or_default())
    }

    /// Adds (or refreshes: restarts the timeout of) `ports`.
    pub fn add_ports(
        &mut self,
        proto: Proto,
        ports: &[u16],
        timeout: Duration,
    ) -> Result<(), NotrackError> {
        self.apply(&NotrackChange::for_ports(proto, ports, timeout)?)
    }

    /// Removes `ports` (absent ones are fine).
    pub fn remove_ports(&mut self, proto: Proto, ports: &[u16]) -> Result<(), NotrackError> {
        let targets: Vec<PortKey> = ports.iter().map(|&port| PortKey { proto, port }).collect();
        self.remove(&targets)
    }

    /// Deletes ctguard's table (and so every NOTRACK) atomically; fine if it is gone.
    pub fn remove_table(&mut self) -> Result<(), NotrackError> {
        self.transaction(remove_table())
    }

    fn transaction(&self, cmds: Vec<Cmd>) -> Result<(), NotrackError> {
        let json = to_json(cmds);
        let args = ["-j", "-f", "-"];
        let output = self.nft(&args, json.as_bytes())?;
        if output.status.success() {
            Ok(())
        } else {
            Err(self.failure(&args, &output, &json))
        }
    }

    fn nft(&self, args: &[&str], stdin: &[u8]) -> Result<std::process::Output, NotrackError> {
        run_tool(BACKEND, self.netns.as_deref(), &self.nft, args, stdin)
    }

    fn failure(&self, args: &[&str], output: &std::process::Output, sent: &str) -> NotrackError {
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
        match unavailable_reason(&stderr) {
            Some(why) => NotrackError::Unavailable {
                backend: BACKEND,
                why: format!("{why}: {stderr}"),
            },
            None => NotrackError::Failed {
                command: describe(&self.nft, args),
                status: status_text(output),
                stderr,
                sent: sent.to_string(),
            },
        }
    }
}

impl NotrackBackend for NftBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Nftables
    }

    /// Creates the table if it is missing; leaves it alone if it is exactly ctguard's;
    /// otherwise replaces it in one transaction, keeping its timed ports.
    fn install(&mut self) -> Result<(), NotrackError> {
        match self.table()? {
            None => self.transaction(create_table(&[])),
            Some(TableState { mismatch: None, .. }) => Ok(()),
            Some(TableState {
                ports,
                mismatch: Some(why),
            }) => {
                tracing::warn!(netns = ?self.netns, %why, "replacing table inet ctguard");
                let keep: Vec<NotrackChange> = ports
                    .iter()
                    .filter_map(|p| {
                        let left = p.expires?.max(Duration::from_secs(1));
                        NotrackChange::new(p.target.proto, p.target.port, left).ok()
                    })
                    .collect();
                self.transaction(recreate_table(&keep))
            }
        }
    }

    fn apply(&mut self, changes: &[NotrackChange]) -> Result<(), NotrackError> {
        changes.iter().try_for_each(NotrackChange::check)?;
        if changes.is_empty() {
            return Ok(());
        }
        self.transaction(apply_changes(changes))
    }

    fn uninstall(&mut self) -> Result<bool, NotrackError> {
        self.remove_table().map(|()| true)
    }

    fn remove(&mut self, ports: &[PortKey]) -> Result<(), NotrackError> {
        // Without the table (a reboot, a flushed ruleset) no port is exempted.
        if ports.is_empty() || self.table()?.is_none() {
            return Ok(());
        }
        self.transaction(remove_ports(ports))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/nft")
            .join(name);
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn json(cmds: Vec<Cmd>) -> serde_json::Value {
        serde_json::from_str(&to_json(cmds)).unwrap()
    }

    fn change(proto: Proto, port: u16, secs: u64) -> NotrackChange {
        NotrackChange::new(proto, port, Duration::from_secs(secs)).unwrap()
    }

    #[test]
    fn notrack_serialises_as_null() {
        let text = serde_json::to_string(&Stmt::Notrack(())).unwrap();
        assert_eq!(text, r#"{"notrack":null}"#);
    }

    #[test]
    fn create_table_matches_the_captured_transaction() {
        let sent = json(create_table(&[]));
        let captured: serde_json::Value =
            serde_json::from_slice(&fixture("create_table.json")).unwrap();
        assert_eq!(sent, captured);
    }

    #[test]
    fn apply_adds_deletes_and_re_adds_each_port_once() {
        let sent = json(apply_changes(&[
            change(Proto::Udp, 5353, 9),
            change(Proto::Tcp, 8080, 30),
            change(Proto::Udp, 5353, 30),
        ]));
        let captured: serde_json::Value = serde_json::from_slice(&fixture("apply.json")).unwrap();
        assert_eq!(sent, captured);
    }

    #[test]
    fn remove_adds_then_deletes_so_absent_ports_are_fine() {
        let sent = json(remove_ports(&[PortKey {
            proto: Proto::Tcp,
            port: 8080,
        }]));
        assert_eq!(
            sent,
            serde_json::json!({"nftables": [
                {"add": {"element": {"family": "inet", "table": "ctguard", "name": "notrack_tcp",
                    "elem": [{"elem": {"val": 8080, "timeout": 1}}]}}},
                {"delete": {"element": {"family": "inet", "table": "ctguard", "name": "notrack_tcp",
                    "elem": [8080]}}}
            ]})
        );
    }

    #[test]
    fn remove_table_touches_only_ours() {
        assert_eq!(
            json(remove_table()),
            serde_json::json!({"nftables": [
                {"add": {"table": {"family": "inet", "name": "ctguard"}}},
                {"delete": {"table": {"family": "inet", "name": "ctguard"}}}
            ]})
        );
    }

    #[test]
    fn parses_a_captured_listing_with_expiry() {
        let state = parse_listing(&fixture("list_with_ports.json")).unwrap();
        assert_eq!(state.mismatch, None);
        let ports: Vec<_> = state.ports.iter().map(|p| p.target.to_string()).collect();
        assert_eq!(ports, ["tcp/8080", "udp/5353"]);
        for p in &state.ports {
            assert_eq!(p.timeout, Some(Duration::from_secs(30)));
            let left = p.expires.unwrap();
            assert!(left <= Duration::from_secs(30) && left >= Duration::from_secs(20));
        }
    }

    #[test]
    fn parses_an_empty_table() {
        let state = parse_listing(&fixture("list_empty.json")).unwrap();
        assert_eq!(state.mismatch, None);
        assert!(state.ports.is_empty());
    }

    #[test]
    fn an_edited_table_is_reported_with_what_differs() {
        let state = parse_listing(&fixture("list_edited.json")).unwrap();
        let why = state.mismatch.expect("an extra rule and an untimed port");
        assert!(why.contains("rules"), "{why}");
        assert_eq!(state.ports.len(), 1);
        assert_eq!(state.ports[0].expires, None);
    }

    #[test]
    fn garbage_listing_says_what_was_expected() {
        let err = parse_listing(b"Error: no").unwrap_err();
        assert!(err.contains("nftables"), "{err}");
        let err = parse_listing(br#"{"nftables": [{"set": {"name": 3}}]}"#).unwrap_err();
        assert!(err.contains("nftables"), "{err}");
    }

    #[test]
    fn kernel_without_nf_tables_is_unavailable() {
        let stderr = "netlink: Error: cache initialization failed: Protocol not supported";
        assert!(unavailable_reason(stderr).is_some());
        assert!(
            unavailable_reason("Error: Could not process rule: Operation not supported").is_some()
        );
        assert!(unavailable_reason("Error: syntax error").is_none());
    }

    #[test]
    fn nft_binary_missing_is_unavailable() {
        let mut nft = NftBackend::with_program(None, PathBuf::from("/nonexistent/nft"));
        let err = nft.install().unwrap_err();
        assert!(err.is_unavailable(), "{err}");
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_listing_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = parse_listing(&bytes);
        }

        #[test]
        fn arbitrary_listing_json_never_panics(text in r#"\{"nftables": \[(\{"(set|chain|rule|table)": \{[a-z":, 0-9\[\]{}]*\}\},?){0,4}\]\}"#) {
            let _ = parse_listing(text.as_bytes());
        }
    }
}
