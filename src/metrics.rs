/*!
Prometheus metrics for `ctguard run`, and the small HTTP endpoint that serves them.

The daemon owns one [`Metrics`] and updates it from its existing hooks: once per loop turn
from the last sample and the engine's state ([`Metrics::observe`]), and on each kernel log
event, decision, outcome and drift. [`spawn_server`] answers `GET /metrics` in the
OpenMetrics text format (what Prometheus asks for first). It listens on loopback unless
told otherwise: the endpoint has no authentication, so exposing it is an explicit choice.

| metric | type | meaning |
| --- | --- | --- |
| `ctguard_up` | gauge | 1 while the agent runs (absent means down) |
| `ctguard_build_info{version}` | info | the running version |
| `ctguard_conntrack_entries` | gauge | entries in the protected table (`nf_conntrack_count`) |
| `ctguard_conntrack_max` | gauge | the table limit (`nf_conntrack_max`) |
| `ctguard_conntrack_ratio` | gauge | entries / max, 0..1 |
| `ctguard_conntrack_buckets` | gauge | hash buckets (`nf_conntrack_buckets`), when readable |
| `ctguard_kernel_drop_total` | counter | the kernel's `drop` counter (packets dropped, table full) |
| `ctguard_kernel_early_drop_total` | counter | the kernel's `early_drop` (unreplied entries evicted to make room) |
| `ctguard_kernel_insert_failed_total` | counter | the kernel's `insert_failed` |
| `ctguard_kmsg_events_total{kind}` | counter | kernel log events about conntrack, by kind (`table_full`, `expectation_table_full`, `callbacks_suppressed`, `syn_flood`, `records_lost`) |
| `ctguard_level` | gauge | pressure level: 0 normal, 1 warn, 2 act, 3 critical |
| `ctguard_stage_active{stage}` | gauge | 1 while a stage has changes in force |
| `ctguard_changes_total{stage,result}` | counter | changes carried out (one per decision, which may write several knobs), by stage and result: `applied`, `refused` (not permitted here), `failed`, `reverted` (rolled back) |
| `ctguard_incidents_total` | counter | incidents opened since start |
| `ctguard_incident_open` | gauge | 1 while an incident is open |
| `ctguard_last_decision_timestamp_seconds` | gauge | Unix time of the last decision (dry-run ones too); 0 before the first |
| `ctguard_drift_total` | counter | knobs found changed by someone else after ctguard set them |

The `ctguard_kernel_*` counters mirror the kernel's own (summed over CPUs, per namespace):
they start at the kernel's value, not at 0, and only reset when the host reboots, so
`rate()` and `increase()` work across agent restarts. Every labelled series exists from
the start (at 0), so an alert on `increase(...)` sees the first change.
*/

use crate::engine::{Action, Decision, EngineState, IncidentId, Outcome};
use crate::observe::{ConntrackSample, KernelEvent};
use crate::policy::{Level, StageKind};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::{info, warn};

/// The default `--metrics-listen` address (loopback only).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9477";

/// What the endpoint says it serves: OpenMetrics text, which Prometheus parses natively.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The kernel log event kinds, as in `KernelEvent`'s serialized `kind`.
const KMSG_KINDS: [&str; 5] = [
    "table_full",
    "expectation_table_full",
    "callbacks_suppressed",
    "syn_flood",
    "records_lost",
];

type Labels1 = [(&'static str, &'static str); 1];
type Labels2 = [(&'static str, &'static str); 2];

/// How one change ended, as the `result` label of `ctguard_changes_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeResult {
    Applied,
    /// Refused by the kernel as not permitted here (e.g. a global knob from a namespace).
    Refused,
    Failed,
    /// A rollback that went through.
    Reverted,
}

impl ChangeResult {
    pub const ALL: [ChangeResult; 4] = [
        ChangeResult::Applied,
        ChangeResult::Refused,
        ChangeResult::Failed,
        ChangeResult::Reverted,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ChangeResult::Applied => "applied",
            ChangeResult::Refused => "refused",
            ChangeResult::Failed => "failed",
            ChangeResult::Reverted => "reverted",
        }
    }

    /// The result of a carried-out action: a rollback that went through is `reverted`.
    pub fn of(action: &Action, outcome: &Outcome) -> ChangeResult {
        match outcome {
            Outcome::Applied if matches!(action, Action::Revert(_)) => ChangeResult::Reverted,
            Outcome::Applied => ChangeResult::Applied,
            Outcome::NotPermitted(_) => ChangeResult::Refused,
            Outcome::Failed(_) => ChangeResult::Failed,
        }
    }
}

/// Every metric the daemon exports. See the module docs for names and meanings.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    entries: Gauge,
    max: Gauge,
    ratio: Gauge<f64, AtomicU64>,
    buckets: Gauge,
    kernel_drop: Counter,
    kernel_early_drop: Counter,
    kernel_insert_failed: Counter,
    kmsg_events: Family<Labels1, Counter>,
    level: Gauge,
    stage_active: Family<Labels1, Gauge>,
    changes: Family<Labels2, Counter>,
    incidents: Counter,
    incident_open: Gauge,
    last_decision: Gauge<f64, AtomicU64>,
    drift: Counter,
    /// The incident last seen open, so each new one is counted once.
    last_incident: Mutex<Option<IncidentId>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("ctguard");
        let up = Gauge::<i64>::default();
        up.set(1);
        registry.register("up", "1 while the ctguard agent runs", up);
        registry.register(
            "build",
            "ctguard build information",
            Info::new([("version", env!("CARGO_PKG_VERSION"))]),
        );
        let metrics = Metrics {
            registry,
            entries: Gauge::default(),
            max: Gauge::default(),
            ratio: Gauge::default(),
            buckets: Gauge::default(),
            kernel_drop: Counter::default(),
            kernel_early_drop: Counter::default(),
            kernel_insert_failed: Counter::default(),
            kmsg_events: Family::default(),
            level: Gauge::default(),
            stage_active: Family::default(),
            changes: Family::default(),
            incidents: Counter::default(),
            incident_open: Gauge::default(),
            last_decision: Gauge::default(),
            drift: Counter::default(),
            last_incident: Mutex::new(None),
        };
        // Labelled series exist from the start, at 0.
        for kind in KMSG_KINDS {
            metrics.kmsg_events.get_or_create_owned(&[("kind", kind)]);
        }
        for stage in StageKind::ALL {
            metrics
                .stage_active
                .get_or_create_owned(&[("stage", stage.name())]);
            for result in ChangeResult::ALL {
                metrics
                    .changes
                    .get_or_create_owned(&change_labels(stage, result));
            }
        }
        metrics.register_all()
    }

    fn register_all(mut self) -> Metrics {
        let r = &mut self.registry;
        r.register(
            "conntrack_entries",
            "Entries in the protected conntrack table (nf_conntrack_count)",
            self.entries.clone(),
        );
        r.register(
            "conntrack_max",
            "The conntrack table limit (nf_conntrack_max)",
            self.max.clone(),
        );
        r.register(
            "conntrack_ratio",
            "Conntrack entries / max",
            self.ratio.clone(),
        );
        r.register(
            "conntrack_buckets",
            "Conntrack hash buckets (nf_conntrack_buckets)",
            self.buckets.clone(),
        );
        r.register(
            "kernel_drop",
            "Kernel conntrack drop counter: packets dropped because the table was full",
            self.kernel_drop.clone(),
        );
        r.register(
            "kernel_early_drop",
            "Kernel conntrack early_drop counter: unreplied entries evicted to make room",
            self.kernel_early_drop.clone(),
        );
        r.register(
            "kernel_insert_failed",
            "Kernel conntrack insert_failed counter",
            self.kernel_insert_failed.clone(),
        );
        r.register(
            "kmsg_events",
            "Kernel log events about conntrack, by kind",
            self.kmsg_events.clone(),
        );
        r.register(
            "level",
            "Pressure level: 0 normal, 1 warn, 2 act, 3 critical",
            self.level.clone(),
        );
        r.register(
            "stage_active",
            "1 while a stage has changes in force",
            self.stage_active.clone(),
        );
        r.register(
            "changes",
            "Changes carried out, by stage and result (applied, refused, failed, reverted)",
            self.changes.clone(),
        );
        r.register(
            "incidents",
            "Incidents opened since the agent started",
            self.incidents.clone(),
        );
        r.register(
            "incident_open",
            "1 while an incident is open",
            self.incident_open.clone(),
        );
        r.register(
            "last_decision_timestamp_seconds",
            "Unix time of the last decision, 0 before the first",
            self.last_decision.clone(),
        );
        r.register(
            "drift",
            "Knobs found changed by someone else after ctguard set them",
            self.drift.clone(),
        );
        self
    }

    /// Updates the table, counter and engine metrics from the last sample and the engine.
    pub fn observe(&self, sample: &ConntrackSample, state: &EngineState) {
        self.entries.set(gauge_value(sample.count));
        self.max.set(gauge_value(sample.max));
        self.ratio.set(sample.ratio());
        if let Some(buckets) = sample.buckets {
            self.buckets.set(gauge_value(buckets));
        }
        if let Some(stats) = &sample.stats {
            // Mirrors, not increments: the kernel's counters are the source of truth.
            self.kernel_drop
                .inner()
                .store(stats.drop, Ordering::Relaxed);
            self.kernel_early_drop
                .inner()
                .store(stats.early_drop, Ordering::Relaxed);
            self.kernel_insert_failed
                .inner()
                .store(stats.insert_failed, Ordering::Relaxed);
        }
        self.level.set(level_value(state.level));
        for stage in StageKind::ALL {
            let active = state.active_stages.contains(&stage);
            self.stage_active
                .get_or_create(&[("stage", stage.name())])
                .set(i64::from(active));
        }
        self.incident_open.set(i64::from(state.incident.is_some()));
        let mut last = self
            .last_incident
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(incident) = state.incident
            && *last != Some(incident.id)
        {
            self.incidents.inc();
            *last = Some(incident.id);
        }
    }

    /// Counts a kernel log event that concerns the protected namespace.
    pub fn kernel_event(&self, event: &KernelEvent) {
        self.kmsg_events
            .get_or_create(&[("kind", kmsg_kind(event))])
            .inc();
    }

    /// Records that a decision was made (dry-run ones too).
    /// Stamps a decision now. The metric is a wall-clock timestamp for dashboards; the
    /// engine itself only ever sees monotonic time.
    pub fn decision_now(&self) {
        self.decision(SystemTime::now());
    }

    pub fn decision(&self, at: SystemTime) {
        let seconds = at
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs_f64();
        self.last_decision.set(seconds);
    }

    /// Counts the outcome of a carried-out decision.
    pub fn outcome(&self, decision: &Decision, outcome: &Outcome) {
        let result = ChangeResult::of(&decision.action, outcome);
        self.changes
            .get_or_create(&change_labels(decision.stage, result))
            .inc();
    }

    /// Counts a newly seen drift.
    pub fn drift(&self) {
        self.drift.inc();
    }

    /// The exposition text (OpenMetrics, ending in `# EOF`).
    pub fn encode(&self) -> String {
        let mut text = String::new();
        encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }
}

fn change_labels(stage: StageKind, result: ChangeResult) -> Labels2 {
    [("stage", stage.name()), ("result", result.name())]
}

fn gauge_value(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn level_value(level: Level) -> i64 {
    match level {
        Level::Normal => 0,
        Level::Warn => 1,
        Level::Act => 2,
        Level::Critical => 3,
    }
}

fn kmsg_kind(event: &KernelEvent) -> &'static str {
    match event {
        KernelEvent::TableFull { .. } => KMSG_KINDS[0],
        KernelEvent::ExpectationTableFull => KMSG_KINDS[1],
        KernelEvent::CallbacksSuppressed { .. } => KMSG_KINDS[2],
        KernelEvent::SynFlood { .. } => KMSG_KINDS[3],
        KernelEvent::RecordsLost { .. } => KMSG_KINDS[4],
    }
}

/// Why the metrics endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics endpoint: cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Binds `addr` and serves `/metrics` on it from a task of its own, for the life of the
/// runtime. Returns the bound address (the port, when 0 was asked for).
pub async fn spawn_server(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
) -> Result<SocketAddr, MetricsError> {
    let bind_error = |source| MetricsError::Bind { addr, source };
    let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
    let bound = listener.local_addr().map_err(bind_error)?;
    if !bound.ip().is_loopback() {
        warn!(%bound, "metrics endpoint reachable from the network; it has no authentication");
    }
    info!("metrics at http://{bound}/metrics");
    tokio::spawn(accept_loop(listener, metrics));
    Ok(bound)
}

/// How long one client may take to send its request and read the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// The most request-head bytes read: a scrape request is a few hundred.
const MAX_REQUEST_HEAD: usize = 8192;

async fn accept_loop(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let metrics = metrics.clone();
                tokio::spawn(async move {
                    // A slow or silent client is dropped; the next scrape will come.
                    let _ = tokio::time::timeout(CLIENT_TIMEOUT, answer(stream, &metrics)).await;
                });
            }
            Err(e) => {
                // Out of file descriptors and the like: wait instead of spinning.
                warn!(error = %e, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// Reads one request head and writes one response, then closes.
async fn answer<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    metrics: &Metrics,
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST_HEAD {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    stream.write_all(&respond(&head, metrics)).await?;
    stream.shutdown().await
}

/// The full HTTP/1.1 response to a request head. Pure: tested without sockets.
pub fn respond(head: &[u8], metrics: &Metrics) -> Vec<u8> {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut words = line.split_ascii_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => ("200 OK", CONTENT_TYPE, metrics.encode()),
        ("GET" | "HEAD", "/") => (
            "200 OK",
            "text/plain; charset=utf-8",
            "ctguard: metrics at /metrics\n".to_string(),
        ),
        ("GET" | "HEAD", _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "not found; metrics are at /metrics\n".to_string(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "only GET is served\n".to_string(),
        ),
    };
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if status.starts_with("405") {
        response.push_str("Allow: GET, HEAD\r\n");
    }
    response.push_str("\r\n");
    if method != "HEAD" {
        response.push_str(&body);
    }
    response.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{DecisionId, IncidentInfo};
    use crate::knob::Knob;
    use crate::observe::ConntrackStats;
    use crate::policy::Mode;

    fn state(level: Level, incident: Option<u64>, active: Vec<StageKind>) -> EngineState {
        EngineState {
            mode: Mode::Enforce,
            level,
            ratio: 0.0,
            incident: incident.map(|id| IncidentInfo {
                id: IncidentId(id),
                opened_at: Duration::ZERO,
            }),
            active_stages: active,
            applied: Vec::new(),
            notracked: Vec::new(),
            unavailable: Vec::new(),
            pending: Vec::new(),
            poll_interval: Duration::from_secs(1),
            wants_hot_ports: false,
        }
    }

    fn sample() -> ConntrackSample {
        ConntrackSample {
            count: 3900,
            max: 4096,
            buckets: Some(1024),
            stats: Some(ConntrackStats {
                drop: 17,
                early_drop: 250,
                insert_failed: 2,
                ..ConntrackStats::default()
            }),
            ..ConntrackSample::default()
        }
    }

    fn decision(stage: StageKind, action: Action) -> Decision {
        Decision {
            id: DecisionId(1),
            stage,
            action,
            reason: String::new(),
        }
    }

    /// The lines of the exposition that are samples of `name` (no comments).
    fn samples<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
        text.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .collect()
    }

    #[test]
    fn fresh_metrics_expose_every_series_at_rest() {
        let text = Metrics::new().encode();
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert_eq!(samples(&text, "ctguard_up"), ["ctguard_up 1"]);
        assert_eq!(
            samples(&text, "ctguard_build_info"),
            [format!(
                "ctguard_build_info{{version=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION")
            )]
        );
        assert_eq!(samples(&text, "ctguard_kmsg_events_total").len(), 5);
        assert_eq!(samples(&text, "ctguard_stage_active").len(), 4);
        assert_eq!(samples(&text, "ctguard_changes_total").len(), 16);
        assert!(text.contains("ctguard_changes_total{stage=\"evict\",result=\"reverted\"} 0"));
        assert!(text.contains("# TYPE ctguard_kernel_drop counter"));
        assert_eq!(
            samples(&text, "ctguard_incidents_total"),
            ["ctguard_incidents_total 0"]
        );
        assert_eq!(
            samples(&text, "ctguard_last_decision_timestamp_seconds").len(),
            1
        );
    }

    #[test]
    fn observe_mirrors_the_sample_and_the_engine() {
        let metrics = Metrics::new();
        metrics.observe(
            &sample(),
            &state(Level::Critical, Some(1), vec![StageKind::RaiseLimits]),
        );
        let text = metrics.encode();
        for line in [
            "ctguard_conntrack_entries 3900",
            "ctguard_conntrack_max 4096",
            "ctguard_conntrack_buckets 1024",
            "ctguard_kernel_drop_total 17",
            "ctguard_kernel_early_drop_total 250",
            "ctguard_kernel_insert_failed_total 2",
            "ctguard_level 3",
            "ctguard_incident_open 1",
            "ctguard_incidents_total 1",
            "ctguard_stage_active{stage=\"raise_limits\"} 1",
            "ctguard_stage_active{stage=\"shorten_timeouts\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }
        let ratio = samples(&text, "ctguard_conntrack_ratio")[0];
        let value: f64 = ratio.split(' ').nth(1).unwrap().parse().unwrap();
        assert!((value - 3900.0 / 4096.0).abs() < 1e-9, "{ratio}");
    }

    #[test]
    fn incidents_are_counted_once_each() {
        let metrics = Metrics::new();
        let s = sample();
        for incident in [Some(1), Some(1), None, Some(2), Some(2)] {
            metrics.observe(&s, &state(Level::Act, incident, Vec::new()));
        }
        let text = metrics.encode();
        assert_eq!(
            samples(&text, "ctguard_incidents_total"),
            ["ctguard_incidents_total 2"]
        );
    }

    #[test]
    fn outcomes_are_counted_by_stage_and_result() {
        let metrics = Metrics::new();
        let change = crate::engine::Change {
            knob: Knob::Max,
            from: 1,
            to: 2,
        };
        let apply = decision(StageKind::RaiseLimits, Action::Apply(vec![change]));
        let revert = decision(StageKind::RaiseLimits, Action::Revert(vec![change]));
        metrics.outcome(&apply, &Outcome::Applied);
        metrics.outcome(&apply, &Outcome::NotPermitted("EACCES".into()));
        metrics.outcome(&apply, &Outcome::NotPermitted("EACCES".into()));
        metrics.outcome(&revert, &Outcome::Applied);
        metrics.outcome(&revert, &Outcome::Failed("EIO".into()));
        let text = metrics.encode();
        for (result, n) in [
            ("applied", 1),
            ("refused", 2),
            ("reverted", 1),
            ("failed", 1),
        ] {
            let line =
                format!("ctguard_changes_total{{stage=\"raise_limits\",result=\"{result}\"}} {n}");
            assert!(text.contains(&line), "{line} not in\n{text}");
        }
    }

    #[test]
    fn kernel_events_drift_and_decisions_are_recorded() {
        let metrics = Metrics::new();
        metrics.kernel_event(&KernelEvent::TableFull { netns: None });
        metrics.kernel_event(&KernelEvent::TableFull { netns: Some(4) });
        metrics.kernel_event(&KernelEvent::SynFlood { port: 80 });
        metrics.drift();
        metrics.decision(UNIX_EPOCH + Duration::from_secs(1_700_000_000));
        let text = metrics.encode();
        for line in [
            "ctguard_kmsg_events_total{kind=\"table_full\"} 2",
            "ctguard_kmsg_events_total{kind=\"syn_flood\"} 1",
            "ctguard_kmsg_events_total{kind=\"records_lost\"} 0",
            "ctguard_drift_total 1",
            "ctguard_last_decision_timestamp_seconds 1700000000.0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }
    }

    #[test]
    fn http_answers_get_metrics_and_refuses_the_rest() {
        let metrics = Metrics::new();
        let ok = String::from_utf8(respond(
            b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
            &metrics,
        ))
        .unwrap();
        let (head, body) = ok.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.contains(CONTENT_TYPE));
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        assert!(body.contains("ctguard_up 1"));

        let with_query = respond(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n", &metrics);
        assert!(with_query.starts_with(b"HTTP/1.1 200 OK"));
        let head_only =
            String::from_utf8(respond(b"HEAD /metrics HTTP/1.1\r\n\r\n", &metrics)).unwrap();
        assert!(head_only.ends_with("\r\n\r\n"), "{head_only}");
        assert!(respond(b"GET /nope HTTP/1.1\r\n\r\n", &metrics).starts_with(b"HTTP/1.1 404"));
        let post = String::from_utf8(respond(b"POST /metrics HTTP/1.1\r\n\r\n", &metrics)).unwrap();
        assert!(post.starts_with("HTTP/1.1 405") && post.contains("Allow: GET, HEAD"));
        assert!(respond(b"", &metrics).starts_with(b"HTTP/1.1 405"));
    }

    #[tokio::test]
    async fn a_request_over_a_stream_gets_the_exposition_and_the_stream_closes() {
        let metrics = Metrics::new();
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let serving = tokio::spawn(async move { answer(server, &metrics).await });
        // Sent in two pieces: the head is read until its blank line.
        client
            .write_all(b"GET /metrics HTTP/1.1\r\n")
            .await
            .unwrap();
        client.write_all(b"Host: x\r\n\r\n").await.unwrap();
        let mut response = String::new();
        client.read_to_string(&mut response).await.unwrap();
        serving.await.unwrap().unwrap();
        assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
        assert!(response.ends_with("# EOF\n"));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_requests_get_an_http_response(head in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let response = respond(&head, &Metrics::new());
            proptest::prop_assert!(response.starts_with(b"HTTP/1.1 "));
        }
    }
}
