//! `ctguard status`: conntrack pressure on this host or in one network namespace, now.
//!
//! Reading is done by the `observe` sources; this file only opens them (inside the
//! namespace when `--netns` is given), gathers one report per refresh and formats it,
//! as text for people or as JSON for scripts. A source that fails does not hide the
//! others: its error is printed beside what could be read, and the command exits 0 unless
//! nothing about the table could be read at all.
//!
//! JSON (`--json`; one compact object per line with `--watch`):
//! - `count`, `max`, `buckets` (integers), `ratio` (count/max, 1.0 = full), `load_factor`
//!   (count/buckets): `null` when unreadable.
//! - `timeouts`: object, knob name (`established`, `udp_stream`, …) → seconds; knobs the
//!   kernel lacks are absent.
//! - `stats`: object of counters summed over CPUs (`drop`, `early_drop`, `insert_failed`,
//!   `found`, `invalid`, `search_restart`, `clash_resolve`, `icmp_error`, `ignore`,
//!   `insert`), or `null`.
//! - `ram_ceiling`: an object (or `null` when /proc/meminfo is unreadable): `classic`
//!   (entries, RAM/16384/(ARCH/32)), `budget_percent`, `budget_bytes` and `budget_entries`
//!   (entries that fit in that share of RAM with `entries_per_bucket`, the current
//!   max/buckets ratio), `entry_bytes` and `entry_bytes_source` (`slabinfo`|`fallback`),
//!   `mem_total_bytes`, `pointer_bits`, `bytes_at_max` (the table's size at its max).
//! - `errors`: array of messages, one per source that failed (empty when all read).
//! - also `time`, `conntrack_present`, `linkage`, `legacy_names`, `netns`
//!   (`{name, path, inode}` or `null`). Without conntrack the object is only
//!   `{"conntrack_present": false, "errors": []}`.

use crate::knob::TimeoutKnob;
use crate::netns;
use crate::observe::activity::{self, Activity, Linkage};
use crate::observe::memory::{EntrySizeSource, HostMemory};
use crate::observe::stat::StatSource;
use crate::observe::sysctl::SysctlSource;
use crate::observe::{ConntrackSample, ConntrackStats};
use anyhow::Context;
use serde_json::{Value, json};
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Print JSON instead of the report (one object per line with --watch).
    #[arg(long)]
    pub json: bool,
    /// Refresh every DURATION (e.g. `2s`, `500ms`) until interrupted.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub watch: Option<Duration>,
    /// Look inside a network namespace: a name under /run/netns, or a path such as
    /// /proc/PID/ns/net.
    #[arg(long, value_name = "NAME|PATH")]
    pub netns: Option<String>,
}

/// The share of RAM the report's budget ceiling assumes (what a cautious policy might
/// allow the table).
const BUDGET_PERCENT: u64 = 5;

/// Timeouts above these values keep entries long enough to fill a busy table; each comes
/// with the reason shown in the report. Kernel defaults are at or below them, except
/// `established`, whose 5-day default is the classic cause of full tables.
const RISKY_TIMEOUTS: &[(TimeoutKnob, u64, &str)] = &[
    (
        TimeoutKnob::Established,
        86_400,
        "idle and dead TCP flows stay tracked this long; a full table is then mostly stale entries (1 h to 1 day is usual)",
    ),
    (
        TimeoutKnob::SynSent,
        120,
        "half-open connections (scans, SYN floods) hold entries this long",
    ),
    (
        TimeoutKnob::SynRecv,
        120,
        "half-open connections (SYN floods) hold entries this long",
    ),
    (
        TimeoutKnob::TimeWait,
        120,
        "every closed TCP connection lingers this long",
    ),
    (
        TimeoutKnob::CloseWait,
        300,
        "connections the peer closed linger this long",
    ),
    (
        TimeoutKnob::FinWait,
        300,
        "closing connections linger this long",
    ),
    (
        TimeoutKnob::Udp,
        60,
        "every one-shot UDP exchange (DNS, NTP) holds an entry this long",
    ),
    (
        TimeoutKnob::UdpStream,
        300,
        "UDP flows stay tracked this long after their last packet",
    ),
    (
        TimeoutKnob::Generic,
        600,
        "flows of other protocols stay tracked this long",
    ),
];

/// Why a timeout value is risky, if it is.
fn timeout_note(knob: TimeoutKnob, seconds: u64) -> Option<&'static str> {
    RISKY_TIMEOUTS
        .iter()
        .find(|(k, limit, _)| *k == knob && seconds > *limit)
        .map(|(_, _, why)| *why)
}

/// Which namespace is being looked at.
#[derive(Debug, Clone)]
struct NamespaceLabel {
    name: String,
    path: PathBuf,
    inode: u64,
}

/// The sources, opened once and re-read at each refresh. An open failure is kept as its
/// message and reported every time.
struct Sources {
    sysctl: Result<SysctlSource, String>,
    stat: Result<StatSource, String>,
    memory: Result<HostMemory, String>,
}

impl Sources {
    /// Opens the per-namespace files in the calling thread's namespace.
    fn open_here() -> (Result<SysctlSource, String>, Result<StatSource, String>) {
        (
            SysctlSource::open_default().map_err(|e| e.to_string()),
            StatSource::open_current_netns().map_err(|e| e.to_string()),
        )
    }

    fn open(namespace: Option<&NamespaceLabel>) -> anyhow::Result<Sources> {
        let (sysctl, stat) = match namespace {
            Some(ns) => netns::run_in(&ns.path, Sources::open_here)
                .with_context(|| format!("entering network namespace {}", ns.name))?,
            None => Sources::open_here(),
        };
        Ok(Sources {
            sysctl,
            stat,
            memory: HostMemory::read().map_err(|e| e.to_string()),
        })
    }

    fn read(&mut self) -> Report {
        let mut errors = Vec::new();
        let sample = match &self.sysctl {
            Ok(source) => noted(source.read(), &mut errors),
            Err(e) => noted(Err(e.clone()), &mut errors),
        };
        let stats = match &mut self.stat {
            Ok(source) => noted(source.read(), &mut errors),
            Err(e) => noted(Err(e.clone()), &mut errors),
        };
        let memory = noted(self.memory.clone(), &mut errors);
        Report {
            sample,
            stats,
            memory,
            errors,
        }
    }
}

/// The value, or `None` with its error's message added to `errors`.
fn noted<T, E: ToString>(result: Result<T, E>, errors: &mut Vec<String>) -> Option<T> {
    result.map_err(|e| errors.push(e.to_string())).ok()
}

/// One refresh's worth of readings.
#[derive(Debug)]
struct Report {
    sample: Option<ConntrackSample>,
    stats: Option<ConntrackStats>,
    memory: Option<HostMemory>,
    errors: Vec<String>,
}

/// The RAM ceilings for `nf_conntrack_max` on this host.
#[derive(Debug, Clone, Copy, PartialEq)]
struct RamCeiling {
    memory: HostMemory,
    classic: u64,
    budget_bytes: u64,
    entries_per_bucket: u64,
    budget_entries: u64,
    /// Bytes the table takes when it reaches its current max.
    bytes_at_max: Option<u64>,
}

impl Report {
    /// Whether anything about the table itself was read.
    fn read_anything(&self) -> bool {
        self.sample.is_some() || self.stats.is_some()
    }

    fn ram_ceiling(&self) -> Option<RamCeiling> {
        let memory = self.memory?;
        let table = self.sample.as_ref();
        // Price buckets the way the table is sized now (one bucket per N entries).
        let entries_per_bucket = table
            .and_then(|s| Some(s.max.div_ceil(s.buckets.filter(|&b| b > 0)?)))
            .unwrap_or(1)
            .max(1);
        let budget_bytes = memory.mem_total_bytes / 100 * BUDGET_PERCENT;
        Some(RamCeiling {
            memory,
            classic: memory.classic_ceiling(),
            budget_bytes,
            entries_per_bucket,
            budget_entries: memory.entries_within(budget_bytes, entries_per_bucket),
            bytes_at_max: table.map(|s| memory.bytes_for(s.max, s.buckets.unwrap_or(0))),
        })
    }

    fn load_factor(&self) -> Option<f64> {
        let sample = self.sample.as_ref()?;
        let buckets = sample.buckets.filter(|&b| b > 0)?;
        Some(sample.count as f64 / buckets as f64)
    }
}

fn entry_source_text(source: EntrySizeSource) -> &'static str {
    match source {
        EntrySizeSource::Slabinfo => "from /proc/slabinfo",
        EntrySizeSource::Fallback => "assumed: /proc/slabinfo unreadable or without the cache",
    }
}

fn linkage_text(linkage: Linkage) -> &'static str {
    match linkage {
        Linkage::Module => "loaded as the nf_conntrack module",
        Linkage::BuiltIn => "built into the kernel",
        Linkage::Unknown => "module or built-in: unknown",
    }
}

/// Bytes in the largest binary unit that keeps a number ≥ 1 (`1.5 GiB`).
fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn render_json(report: &Report, activity: &Activity, ns: Option<&NamespaceLabel>) -> Value {
    let sample = report.sample.as_ref();
    let timeouts: serde_json::Map<String, Value> = sample
        .map(|s| {
            s.timeouts
                .iter()
                .map(|(knob, secs)| (knob.name().to_owned(), json!(secs)))
                .collect()
        })
        .unwrap_or_default();
    let ram_ceiling = report.ram_ceiling().map(|c| {
        json!({
            "classic": c.classic,
            "budget_percent": BUDGET_PERCENT,
            "budget_bytes": c.budget_bytes,
            "budget_entries": c.budget_entries,
            "entries_per_bucket": c.entries_per_bucket,
            "entry_bytes": c.memory.entry_bytes,
            "entry_bytes_source": c.memory.entry_bytes_source,
            "mem_total_bytes": c.memory.mem_total_bytes,
            "pointer_bits": c.memory.pointer_bits,
            "bytes_at_max": c.bytes_at_max,
        })
    });
    json!({
        "time": humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        "conntrack_present": activity.present,
        "linkage": activity.linkage,
        "legacy_names": activity.legacy_names,
        "netns": ns.map(|ns| json!({"name": ns.name, "path": ns.path, "inode": ns.inode})),
        "count": sample.map(|s| s.count),
        "max": sample.map(|s| s.max),
        "ratio": sample.map(ConntrackSample::ratio),
        "buckets": sample.and_then(|s| s.buckets),
        "load_factor": report.load_factor(),
        "timeouts": timeouts,
        "stats": report.stats,
        "ram_ceiling": ram_ceiling,
        "errors": report.errors,
    })
}

fn render_human(report: &Report, activity: &Activity, ns: Option<&NamespaceLabel>) -> String {
    let mut out = String::new();
    let mut line = |text: String| {
        out.push_str(&text);
        out.push('\n');
    };
    let place = match ns {
        Some(ns) => format!(
            "network namespace {} ({}, inode {})",
            ns.name,
            ns.path.display(),
            ns.inode
        ),
        None => "this host".to_owned(),
    };
    line(format!(
        "connection tracking on {place}: {}{}",
        linkage_text(activity.linkage),
        if activity.legacy_names {
            " (pre-2.6.20 ip_conntrack names)"
        } else {
            ""
        }
    ));

    if let Some(sample) = &report.sample {
        let full = if sample.max > 0 && sample.count >= sample.max {
            "  FULL: new flows evict unreplied entries or are dropped"
        } else {
            ""
        };
        line(format!(
            "  entries     {} / {} max  ({:.1} %){full}",
            sample.count,
            sample.max,
            sample.ratio() * 100.0
        ));
        match (sample.buckets, report.load_factor()) {
            (Some(buckets), Some(load)) => line(format!(
                "  buckets     {buckets}  (load factor {load:.2} entries per bucket)"
            )),
            (Some(buckets), None) => line(format!("  buckets     {buckets}")),
            (None, _) => line("  buckets     not exposed by this kernel".to_owned()),
        }
        if ns.is_some() {
            line("  (max and buckets are global; the count is this namespace's)".to_owned());
        }
        line("timeouts".to_owned());
        for (knob, secs) in &sample.timeouts {
            let note = timeout_note(*knob, *secs)
                .map(|why| format!("  <- risky: {why}"))
                .unwrap_or_default();
            line(format!(
                "  {:<15} {:>8} s  ({}){note}",
                knob.name(),
                secs,
                humantime::format_duration(Duration::from_secs(*secs))
            ));
        }
    }

    if let Some(stats) = &report.stats {
        line("kernel counters (summed over CPUs; they only grow)".to_owned());
        let counters = [
            ("drop", stats.drop),
            ("early_drop", stats.early_drop),
            ("insert_failed", stats.insert_failed),
            ("found", stats.found),
            ("invalid", stats.invalid),
            ("search_restart", stats.search_restart),
            ("clash_resolve", stats.clash_resolve),
            ("icmp_error", stats.icmp_error),
        ];
        let mut row = String::from(" ");
        for (name, value) in counters {
            // Writing to a String cannot fail.
            let _ = write!(row, " {name} {value}");
        }
        line(row);
    }

    if let Some(c) = report.ram_ceiling() {
        let m = c.memory;
        line("memory".to_owned());
        line(format!(
            "  RAM {}, {}-bit; one entry {} B ({})",
            human_bytes(m.mem_total_bytes),
            m.pointer_bits,
            m.entry_bytes,
            entry_source_text(m.entry_bytes_source)
        ));
        line(format!(
            "  classic ceiling RAM/16384/({}/32): {} entries",
            m.pointer_bits, c.classic
        ));
        line(format!(
            "  {BUDGET_PERCENT} % of RAM ({}) holds {} entries at {} per bucket",
            human_bytes(c.budget_bytes),
            c.budget_entries,
            c.entries_per_bucket
        ));
        if let Some(bytes) = c.bytes_at_max {
            line(format!(
                "  the table at its max takes up to {}",
                human_bytes(bytes)
            ));
        }
    }

    if !report.errors.is_empty() {
        line("errors".to_owned());
        for error in &report.errors {
            line(format!("  {error}"));
        }
    }
    out
}

/// Writes to stdout; a closed pipe (`ctguard status --watch 1s | head`) ends quietly.
fn emit(text: &str) -> anyhow::Result<bool> {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e).context("writing to stdout"),
    }
}

pub fn run(args: StatusArgs) -> anyhow::Result<ExitCode> {
    if args.watch == Some(Duration::ZERO) {
        anyhow::bail!("--watch needs a duration above zero (e.g. 2s)");
    }
    let activity = activity::detect_host();
    let ns = match &args.netns {
        Some(name) => {
            let path = netns::resolve(name);
            let inode = netns::inode_of(&path)
                .with_context(|| format!("network namespace {}", path.display()))?;
            Some(NamespaceLabel {
                name: name.clone(),
                path,
                inode,
            })
        }
        None => None,
    };
    if !activity.present {
        let text = if args.json {
            format!(
                "{}\n",
                json!({"conntrack_present": false, "errors": Vec::<String>::new()})
            )
        } else {
            "connection tracking is not active on this host (no nf_conntrack_max sysctl): \
             nothing can overflow. ctguard did not load it.\n"
                .to_owned()
        };
        emit(&text)?;
        return Ok(ExitCode::SUCCESS);
    }

    let mut sources = Sources::open(ns.as_ref())?;
    let mut first = true;
    loop {
        let report = sources.read();
        if first && !report.read_anything() {
            anyhow::bail!(
                "nothing could be read about the conntrack table:\n  {}",
                report.errors.join("\n  ")
            );
        }
        let text = match (args.json, args.watch.is_some()) {
            (true, true) => format!("{}\n", render_json(&report, &activity, ns.as_ref())),
            (true, false) => format!("{:#}\n", render_json(&report, &activity, ns.as_ref())),
            (false, true) => format!(
                "--- {} ---\n{}\n",
                humantime::format_rfc3339_seconds(SystemTime::now()),
                render_human(&report, &activity, ns.as_ref())
            ),
            (false, false) => render_human(&report, &activity, ns.as_ref()),
        };
        if !emit(&text)? {
            return Ok(ExitCode::SUCCESS);
        }
        match args.watch {
            Some(every) => std::thread::sleep(every),
            None => return Ok(ExitCode::SUCCESS),
        }
        first = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn fixtures() -> &'static Path {
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/proc"))
    }

    fn built_in() -> Activity {
        Activity {
            present: true,
            legacy_names: false,
            linkage: Linkage::BuiltIn,
        }
    }

    /// A report from the fixtures captured on this kernel (a full lab namespace).
    fn full_table_report(stat_fixture: &str) -> Report {
        let mut sources = Sources {
            sysctl: SysctlSource::open(&fixtures().join("sysctl_6.18")).map_err(|e| e.to_string()),
            stat: StatSource::open(&fixtures().join(stat_fixture)).map_err(|e| e.to_string()),
            memory: Ok(HostMemory {
                mem_total_bytes: 24_684_084 * 1024,
                entry_bytes: 256,
                entry_bytes_source: EntrySizeSource::Slabinfo,
                pointer_bits: 64,
            }),
        };
        sources.read()
    }

    #[test]
    fn json_has_the_documented_keys() {
        let report = full_table_report("nf_conntrack_stat_6.18_full.txt");
        let v = render_json(&report, &built_in(), None);
        assert_eq!(v["count"], 4096);
        assert_eq!(v["max"], 4096);
        assert_eq!(v["ratio"], 1.0);
        assert_eq!(v["buckets"], 262_144);
        assert_eq!(v["timeouts"]["established"], 432_000);
        assert_eq!(v["timeouts"]["udp_stream"], 120);
        assert_eq!(v["stats"]["drop"], 0x60b);
        assert_eq!(v["stats"]["early_drop"], 0x1c9);
        for key in ["insert_failed", "found", "invalid", "search_restart"] {
            assert_eq!(v["stats"][key], 0, "{key}");
        }
        // 24684084 KiB / 16384 / 2.
        assert_eq!(
            v["ram_ceiling"]["classic"],
            24_684_084u64 * 1024 / 16384 / 2
        );
        assert_eq!(v["ram_ceiling"]["entry_bytes"], 256);
        assert_eq!(v["ram_ceiling"]["entry_bytes_source"], "slabinfo");
        assert_eq!(v["errors"], json!([]));
    }

    #[test]
    fn human_report_shows_pressure_timeouts_and_ceilings() {
        let report = full_table_report("nf_conntrack_stat_6.18_full.txt");
        let text = render_human(&report, &built_in(), None);
        assert!(text.contains("4096 / 4096 max  (100.0 %)  FULL"), "{text}");
        assert!(text.contains("load factor 0.02"), "{text}");
        let established = text
            .lines()
            .find(|l| l.trim_start().starts_with("established"))
            .unwrap();
        assert!(
            established.contains("432000 s  (5days)  <- risky"),
            "{established}"
        );
        let time_wait = text
            .lines()
            .find(|l| l.trim_start().starts_with("time_wait"))
            .unwrap();
        assert!(!time_wait.contains("risky"), "{time_wait}");
        assert!(text.contains("drop 1547 early_drop 457"), "{text}");
        assert!(
            text.contains("classic ceiling RAM/16384/(64/32): 771377 entries"),
            "{text}"
        );
        assert!(!text.contains("errors"), "{text}");
    }

    #[test]
    fn a_failing_source_is_reported_beside_the_others() {
        let report = full_table_report("nf_conntrack_stat_unknown_header.txt");
        assert!(report.read_anything());
        let v = render_json(&report, &built_in(), None);
        assert_eq!(v["count"], 4096);
        assert_eq!(v["stats"], Value::Null);
        let errors = v["errors"].as_array().unwrap();
        assert_eq!(errors.len(), 1);
        assert!(errors[0].as_str().unwrap().contains("`entries` column"));
        let text = render_human(&report, &built_in(), None);
        assert!(
            text.contains("errors\n  ") && text.contains("4096 / 4096"),
            "{text}"
        );
    }

    #[test]
    fn nothing_read_when_every_table_source_fails() {
        let report = Sources {
            sysctl: Err("no sysctl".into()),
            stat: Err("no stat".into()),
            memory: Err("no meminfo".into()),
        }
        .read();
        assert!(!report.read_anything());
        assert_eq!(report.errors, ["no sysctl", "no stat", "no meminfo"]);
        assert_eq!(report.ram_ceiling(), None);
    }

    #[test]
    fn risky_notes_only_above_their_limits() {
        assert!(timeout_note(TimeoutKnob::Established, 432_000).is_some());
        assert!(timeout_note(TimeoutKnob::Established, 3600).is_none());
        assert!(timeout_note(TimeoutKnob::CloseWait, 60).is_none());
        assert!(timeout_note(TimeoutKnob::Icmp, 1_000_000).is_none());
    }

    #[test]
    fn bytes_read_like_people_write_them() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(24_684_084 * 1024), "23.5 GiB");
    }
}
