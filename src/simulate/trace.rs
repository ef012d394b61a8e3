//! The trace format: what `ctguard record` writes and `ctguard simulate --trace` replays.
//!
//! A trace is JSON lines, one record per line, times as offsets from the start of the
//! recording:
//!
//! ```text
//! {"t": 0, "host": {"mem_total_bytes": 4294967296, "entry_bytes": 256, "entry_bytes_source": "slabinfo", "pointer_bits": 64}}
//! {"t": 0, "sample": {"count": 1200, "max": 262144, "buckets": 65536, "timeouts": {"established": 432000}, "stats": {"drop": 0, "insert_failed": 0}}}
//! {"t": "1500ms", "event": {"kind": "table_full", "netns": 4026532177}}
//! {"t": "2s", "hot_ports": [{"proto": "tcp", "port": 80, "entries": 900, "nat_or_forwarded": false}]}
//! ```
//!
//! - `t`: milliseconds as an integer, or a humantime string (`"1500ms"`, `"2m 30s"`).
//!   Times never go backwards.
//! - Exactly one of: `sample` (a [`ConntrackSample`]), `event` (a [`KernelEvent`]),
//!   `hot_ports` (a list of [`PortLoad`], from a table analysis) or `host` (the
//!   [`HostMemory`] the RAM budget is computed from; optional, at most once, before any
//!   other record — without it the simulator assumes [`default_host`]).
//! - Blank lines and lines starting with `#` are skipped.
//!
//! [`parse_trace`] is pure and reports `name:line: expected …`; [`TraceWriter`] writes the
//! same format (it always writes `t` as integer milliseconds).

use crate::engine::PortLoad;
use crate::observe::memory::{EntrySizeSource, HostMemory};
use crate::observe::{ConntrackSample, KernelEvent};
use serde::{Deserialize, Serialize};
use std::io::{self, Write};
use std::time::Duration;

/// One record of a trace.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceRecord {
    /// Offset from the start of the recording.
    pub t: Duration,
    pub body: TraceBody,
}

#[derive(Debug, Clone, PartialEq)]
pub enum TraceBody {
    Host(HostMemory),
    Sample(ConntrackSample),
    Event(KernelEvent),
    HotPorts(Vec<PortLoad>),
}

/// A parsed trace.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Trace {
    pub host: Option<HostMemory>,
    /// Every record but the host, in order.
    pub records: Vec<TraceRecord>,
}

/// A line of a trace that could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{source_name}:{line}: {message}")]
pub struct TraceError {
    pub source_name: String,
    pub line: usize,
    pub message: String,
}

/// The host assumed when a trace does not say: 4 GiB, 256-byte entries, 64-bit.
pub fn default_host() -> HostMemory {
    HostMemory {
        mem_total_bytes: 4 << 30,
        entry_bytes: 256,
        entry_bytes_source: EntrySizeSource::Fallback,
        pointer_bits: 64,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLine {
    t: RawTime,
    sample: Option<ConntrackSample>,
    event: Option<KernelEvent>,
    hot_ports: Option<Vec<PortLoad>>,
    host: Option<HostMemory>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawTime {
    Millis(u64),
    Text(String),
}

/// Parses a whole trace. `source_name` names it in errors.
pub fn parse_trace(text: &str, source_name: &str) -> Result<Trace, TraceError> {
    let mut trace = Trace::default();
    let mut last_t = Duration::ZERO;
    for (index, line) in text.lines().enumerate() {
        let error = |message: String| TraceError {
            source_name: source_name.to_string(),
            line: index + 1,
            message,
        };
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let raw: RawLine = serde_json::from_str(line).map_err(|e| {
            error(format!(
                "expected {{\"t\": …, \"sample\"|\"event\"|\"hot_ports\"|\"host\": …}}: {e}"
            ))
        })?;
        let t = match raw.t {
            RawTime::Millis(ms) => Duration::from_millis(ms),
            // No longer than integer milliseconds reach: the engine adds cooldowns to it.
            RawTime::Text(text) => humantime::parse_duration(&text)
                .ok()
                .filter(|t| u64::try_from(t.as_millis()).is_ok())
                .ok_or_else(|| {
                    error(format!(
                        "expected \"t\" as milliseconds or a duration like \"1500ms\" (at most {} ms), found {text:?}",
                        u64::MAX
                    ))
                })?,
        };
        if t < last_t {
            return Err(error(format!(
                "expected times that never go backwards, found {} after {}",
                humantime::format_duration(t),
                humantime::format_duration(last_t)
            )));
        }
        last_t = t;
        let mut bodies = [
            raw.sample.map(TraceBody::Sample),
            raw.event.map(TraceBody::Event),
            raw.hot_ports.map(TraceBody::HotPorts),
            raw.host.map(TraceBody::Host),
        ]
        .into_iter()
        .flatten();
        let (Some(body), None) = (bodies.next(), bodies.next()) else {
            return Err(error(
                "expected exactly one of \"sample\", \"event\", \"hot_ports\", \"host\"".into(),
            ));
        };
        match body {
            TraceBody::Host(host) => {
                if trace.host.is_some() || !trace.records.is_empty() {
                    return Err(error(
                        "expected \"host\" at most once, before any other record".into(),
                    ));
                }
                trace.host = Some(host);
            }
            body => trace.records.push(TraceRecord { t, body }),
        }
    }
    Ok(trace)
}

#[derive(Serialize)]
struct OutLine<'a> {
    t: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    sample: Option<&'a ConntrackSample>,
    #[serde(skip_serializing_if = "Option::is_none")]
    event: Option<&'a KernelEvent>,
    #[serde(skip_serializing_if = "Option::is_none")]
    hot_ports: Option<&'a [PortLoad]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    host: Option<&'a HostMemory>,
}

/// Writes trace records, one JSON line each.
pub struct TraceWriter<W: Write> {
    out: W,
}

impl<W: Write> TraceWriter<W> {
    pub fn new(out: W) -> Self {
        TraceWriter { out }
    }

    pub fn write(&mut self, record: &TraceRecord) -> io::Result<()> {
        let mut line = OutLine {
            t: u64::try_from(record.t.as_millis()).unwrap_or(u64::MAX),
            sample: None,
            event: None,
            hot_ports: None,
            host: None,
        };
        match &record.body {
            TraceBody::Host(h) => line.host = Some(h),
            TraceBody::Sample(s) => line.sample = Some(s),
            TraceBody::Event(e) => line.event = Some(e),
            TraceBody::HotPorts(p) => line.hot_ports = Some(p),
        }
        serde_json::to_writer(&mut self.out, &line)?;
        self.out.write_all(b"\n")
    }

    pub fn into_inner(self) -> W {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Proto;
    use proptest::prelude::*;

    #[test]
    fn writer_output_parses_back() {
        let records = vec![
            TraceRecord {
                t: Duration::from_millis(0),
                body: TraceBody::Host(default_host()),
            },
            TraceRecord {
                t: Duration::from_millis(0),
                body: TraceBody::Sample(ConntrackSample {
                    count: 10,
                    max: 100,
                    ..Default::default()
                }),
            },
            TraceRecord {
                t: Duration::from_millis(1500),
                body: TraceBody::Event(KernelEvent::TableFull { netns: Some(7) }),
            },
            TraceRecord {
                t: Duration::from_secs(2),
                body: TraceBody::HotPorts(vec![PortLoad {
                    proto: Proto::Tcp,
                    port: 80,
                    entries: 9,
                    nat_or_forwarded: false,
                }]),
            },
        ];
        let mut w = TraceWriter::new(Vec::new());
        for r in &records {
            w.write(r).unwrap();
        }
        let text = String::from_utf8(w.into_inner()).unwrap();
        let trace = parse_trace(&text, "t.jsonl").unwrap();
        assert_eq!(trace.host, Some(default_host()));
        assert_eq!(trace.records, records[1..]);
    }

    #[test]
    fn humantime_offsets_comments_and_errors() {
        let text = "# captured by hand\n{\"t\": \"1m 30s\", \"event\": {\"kind\": \"expectation_table_full\"}}\n\n{\"t\": 10, \"event\": {\"kind\": \"expectation_table_full\"}}\n";
        let err = parse_trace(text, "x").unwrap_err();
        assert_eq!(err.line, 4);
        assert!(err.message.contains("never go backwards"), "{err}");
        let two = "{\"t\": 1, \"sample\": {\"count\": 1, \"max\": 2}, \"event\": {\"kind\": \"table_full\"}}";
        assert!(
            parse_trace(two, "x")
                .unwrap_err()
                .message
                .contains("exactly one")
        );
        let unknown = "{\"t\": 1, \"smaple\": {}}";
        assert_eq!(
            parse_trace(unknown, "x")
                .unwrap_err()
                .to_string()
                .split(':')
                .nth(1),
            Some("1")
        );
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let text = String::from_utf8_lossy(&bytes);
            let _ = parse_trace(&text, "fuzz");
        }

        #[test]
        fn arbitrary_json_lines_never_panic(lines in proptest::collection::vec("\\{\"t\": ?[0-9\"a-z ]{0,8}, ?\"(sample|event|host|hot_ports)\": ?[\\[\\]{}a-z0-9:,\"]{0,40}\\}", 0..8)) {
            let _ = parse_trace(&lines.join("\n"), "fuzz");
        }
    }
}
