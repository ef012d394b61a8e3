//! `ctguard record`: a live trace of conntrack samples and kernel events, in the format
//! `ctguard simulate --trace` replays (see `docs/trace-format.md`).
//!
//! The file starts with a `#` line saying what was recorded, then the host's memory (for
//! the RAM budget), then one sample per interval from the [`Sampler`] (opened inside
//! `--netns` when given) and every kernel event the `/dev/kmsg` follower reports, each
//! stamped with its offset since the start. With `--netns`, table-full events that name
//! another namespace are left out: the kernel log is shared by the whole host.
//!
//! Recording stops after `--duration` or at Ctrl-C. The sampler must open at the start
//! (without count and max there is nothing to record). Any other failure, or a sampler
//! failure later on, is logged (once per distinct error) and recording goes on without
//! that source; the kernel log is reopened on the next interval. The header and host
//! lines are flushed as soon as the sources are open, so a watcher can tell recording has
//! begun; the rest is flushed and synced at the end. An existing file is never
//! overwritten without `--force`.

use crate::netns;
use crate::observe::kmsg::KmsgEvent;
use crate::observe::kmsg_follower::KmsgFollower;
use crate::observe::memory::HostMemory;
use crate::observe::sampler::Sampler;
use crate::observe::{ConntrackSample, KernelEvent, ObserveError};
use crate::simulate::trace::{TraceBody, TraceRecord, TraceWriter};
use anyhow::Context;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub struct RecordArgs {
    /// The trace file to write (JSON lines).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// How long to record (e.g. `90s`, `10m`); Ctrl-C stops earlier.
    #[arg(long, value_name = "DURATION", value_parser = positive_duration)]
    pub duration: Duration,
    /// Time between two samples.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = positive_duration)]
    pub interval: Duration,
    /// Sample inside a network namespace: a name under /run/netns, or a path such as
    /// /proc/PID/ns/net.
    #[arg(long, value_name = "NAME|PATH")]
    pub netns: Option<String>,
    /// Overwrite FILE if it already exists.
    #[arg(long)]
    pub force: bool,
}

/// A humantime duration that is not zero (a zero interval would sample in a busy loop).
fn positive_duration(text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text) {
        Ok(d) if d.is_zero() => Err("expected a duration above zero".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(format!("expected a duration like `500ms` or `2m`: {e}")),
    }
}

pub fn run(args: RecordArgs) -> anyhow::Result<ExitCode> {
    let netns_path = args.netns.as_deref().map(netns::resolve);
    let netns_inode = match &netns_path {
        Some(path) => Some(
            netns::inode_of(path)
                .with_context(|| format!("network namespace {}", path.display()))?,
        ),
        None => None,
    };
    let sampler = Sampler::open(netns_path.as_deref())?;
    let host = HostMemory::read()
        .inspect_err(|e| {
            tracing::warn!(error = %e, "host memory unreadable; the trace will have no host record")
        })
        .ok();
    let out = create_output(&args.out, args.force)?;
    let header = header_line(&args, netns_path.as_deref());

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let mut recorder = Recorder::new(BufWriter::new(out));
    let stop = runtime.block_on(async {
        // The follower registers with the runtime's reactor, so it opens in here.
        let mut kmsg = KmsgSource::open();
        recorder.start(&header, host)?;
        record_until_stopped(&args, sampler, &mut kmsg, netns_inode, &mut recorder).await
    });
    let name = args.out.display();
    let stop = stop.with_context(|| format!("{name}: cannot write the trace"))?;
    let counts = recorder.counts();
    recorder
        .finish()
        .and_then(|out| out.into_inner().map_err(io::IntoInnerError::into_error))
        .and_then(|file| file.sync_all())
        .with_context(|| format!("{name}: cannot write the trace"))?;
    println!("{}", summary(counts, stop, &args.out));
    Ok(ExitCode::SUCCESS)
}

/// Creates the trace file, refusing to replace an existing one unless `force`.
fn create_output(path: &Path, force: bool) -> anyhow::Result<File> {
    let mut options = File::options();
    options.write(true);
    if force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    options.open(path).map_err(|e| {
        if e.kind() == io::ErrorKind::AlreadyExists {
            anyhow::anyhow!(
                "{}: already exists; pass --force to overwrite it",
                path.display()
            )
        } else {
            anyhow::anyhow!("{}: cannot create: {e}", path.display())
        }
    })
}

/// The `#` line that opens a trace: what was recorded, and how.
fn header_line(args: &RecordArgs, netns: Option<&Path>) -> String {
    let place = match netns {
        Some(path) => format!("netns {}", path.display()),
        None => "the caller's netns".into(),
    };
    format!(
        "# ctguard record: {place}, a sample every {}, for up to {}, started {}",
        humantime::format_duration(args.interval),
        humantime::format_duration(args.duration),
        humantime::format_rfc3339_seconds(std::time::SystemTime::now())
    )
}

/// Why recording stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    DurationElapsed(Duration),
    Interrupted(Duration),
}

/// The main loop: samples on the interval, events as they come, until the duration
/// passes or Ctrl-C. Only writing the trace can fail it.
async fn record_until_stopped<W: Write>(
    args: &RecordArgs,
    mut sampler: Sampler,
    kmsg: &mut KmsgSource,
    netns_inode: Option<u64>,
    recorder: &mut Recorder<W>,
) -> io::Result<Stop> {
    let started = Instant::now();
    let deadline = tokio::time::sleep(args.duration);
    tokio::pin!(deadline);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut ctrl_c_armed = true;
    let mut ticker = tokio::time::interval(args.interval);
    // A slow read must not be followed by a burst of catch-up samples.
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut sample_errors = ErrorNote::default();
    loop {
        tokio::select! {
            () = &mut deadline => return Ok(Stop::DurationElapsed(started.elapsed())),
            signal = &mut ctrl_c, if ctrl_c_armed => match signal {
                Ok(()) => return Ok(Stop::Interrupted(started.elapsed())),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch for Ctrl-C; recording runs for the whole duration");
                    ctrl_c_armed = false;
                }
            },
            _ = ticker.tick() => {
                match sampler.read() {
                    Ok(sample) => {
                        sample_errors.recovered("conntrack sample");
                        recorder.sample(started.elapsed(), sample)?;
                    }
                    Err(e) => sample_errors.failed("conntrack sample", &e),
                }
                kmsg.reopen_if_closed();
            }
            event = kmsg.next_event() => match event {
                Ok(event) if keep_event(&event.event, netns_inode) => {
                    recorder.event(started.elapsed(), event.event)?;
                }
                Ok(_) => {}
                Err(e) => kmsg.lost(&e),
            },
        }
    }
}

/// The kernel log follower, closed after a failure and reopened on the next tick (events
/// logged in between are not seen).
struct KmsgSource {
    follower: Option<KmsgFollower>,
    errors: ErrorNote,
}

impl KmsgSource {
    const NAME: &str = "kernel log";

    fn open() -> KmsgSource {
        let mut source = KmsgSource {
            follower: None,
            errors: ErrorNote::default(),
        };
        source.reopen_if_closed();
        source
    }

    fn reopen_if_closed(&mut self) {
        if self.follower.is_some() {
            return;
        }
        match KmsgFollower::open() {
            Ok(follower) => {
                self.errors.recovered(Self::NAME);
                self.follower = Some(follower);
            }
            Err(e) => self.errors.failed(Self::NAME, &e),
        }
    }

    /// The next event, or never while the follower is closed.
    async fn next_event(&mut self) -> Result<KmsgEvent, ObserveError> {
        match &mut self.follower {
            Some(follower) => follower.next_event().await,
            None => std::future::pending().await,
        }
    }

    fn lost(&mut self, e: &ObserveError) {
        self.errors.failed(Self::NAME, e);
        self.follower = None;
    }
}

/// Whether an event belongs in a trace of the namespace with inode `netns_inode` (`None`:
/// the whole host). Table-full messages that name a namespace are kept only for that one;
/// older kernels name none, and the other kinds concern the whole host, so those stay.
fn keep_event(event: &KernelEvent, netns_inode: Option<u64>) -> bool {
    match (event, netns_inode) {
        (
            KernelEvent::TableFull {
                netns: Some(logged),
            },
            Some(wanted),
        ) => *logged == wanted,
        _ => true,
    }
}

/// Remembers a source's last error so a persistent failure is logged once, not at every
/// interval, and its recovery is logged too.
#[derive(Debug, Default)]
struct ErrorNote {
    last: Option<String>,
}

impl ErrorNote {
    /// Records `message`; true when it differs from the last one (so it should be logged).
    fn is_new(&mut self, message: String) -> bool {
        if self.last.as_ref() == Some(&message) {
            return false;
        }
        self.last = Some(message);
        true
    }

    fn failed(&mut self, source: &str, error: &ObserveError) {
        if self.is_new(error.to_string()) {
            tracing::warn!(%error, "{source} unreadable; recording goes on without it");
        }
    }

    fn recovered(&mut self, source: &str) {
        if self.last.take().is_some() {
            tracing::info!("{source} readable again");
        }
    }
}

/// How many records of each kind went into the trace.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Counts {
    samples: u64,
    events: u64,
}

/// Writes a trace's records in order, keeping times from going backwards and counting.
struct Recorder<W: Write> {
    out: W,
    last_t: Duration,
    counts: Counts,
}

impl<W: Write> Recorder<W> {
    fn new(out: W) -> Self {
        Recorder {
            out,
            last_t: Duration::ZERO,
            counts: Counts::default(),
        }
    }

    /// Writes the header comment and the host record (at t = 0), then flushes.
    fn start(&mut self, header: &str, host: Option<HostMemory>) -> io::Result<()> {
        writeln!(self.out, "{header}")?;
        if let Some(host) = host {
            self.write(Duration::ZERO, TraceBody::Host(host))?;
        }
        self.out.flush()
    }

    fn sample(&mut self, t: Duration, sample: ConntrackSample) -> io::Result<()> {
        self.write(t, TraceBody::Sample(sample))?;
        self.counts.samples += 1;
        Ok(())
    }

    fn event(&mut self, t: Duration, event: KernelEvent) -> io::Result<()> {
        self.write(t, TraceBody::Event(event))?;
        self.counts.events += 1;
        Ok(())
    }

    fn write(&mut self, t: Duration, body: TraceBody) -> io::Result<()> {
        // The clock is monotonic, but a trace must never go backwards whatever the caller does.
        self.last_t = self.last_t.max(t);
        TraceWriter::new(&mut self.out).write(&TraceRecord {
            t: self.last_t,
            body,
        })
    }

    fn counts(&self) -> Counts {
        self.counts
    }

    /// Flushes and hands the writer back.
    fn finish(mut self) -> io::Result<W> {
        self.out.flush()?;
        Ok(self.out)
    }
}

/// The one line printed at the end.
fn summary(counts: Counts, stop: Stop, path: &Path) -> String {
    let (elapsed, how) = match stop {
        Stop::DurationElapsed(d) => (d, ""),
        Stop::Interrupted(d) => (d, " (interrupted)"),
    };
    // Whole milliseconds: the trace's own resolution.
    let elapsed = Duration::from_millis(u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX));
    format!(
        "recorded {} samples and {} events to {} over {}{how}",
        counts.samples,
        counts.events,
        path.display(),
        humantime::format_duration(elapsed)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simulate::trace::{default_host, parse_trace};

    #[test]
    fn table_full_of_another_namespace_is_dropped_only_when_one_is_watched() {
        let other = KernelEvent::TableFull { netns: Some(9) };
        let ours = KernelEvent::TableFull { netns: Some(7) };
        let unnamed = KernelEvent::TableFull { netns: None };
        let host_wide = KernelEvent::CallbacksSuppressed {
            limiter: "net_ratelimit".into(),
            count: 3,
        };
        assert!(!keep_event(&other, Some(7)));
        for kept in [
            &ours,
            &unnamed,
            &host_wide,
            &KernelEvent::SynFlood { port: 80 },
        ] {
            assert!(keep_event(kept, Some(7)), "{kept:?}");
        }
        assert!(keep_event(&other, None));
    }

    #[test]
    fn recorded_trace_parses_back_with_counts_and_times_that_never_go_backwards() {
        let mut recorder = Recorder::new(Vec::new());
        recorder
            .start("# ctguard record: test", Some(default_host()))
            .unwrap();
        let sample = |count| ConntrackSample {
            count,
            max: 4096,
            ..Default::default()
        };
        recorder.sample(Duration::ZERO, sample(10)).unwrap();
        recorder
            .event(
                Duration::from_millis(250),
                KernelEvent::TableFull { netns: Some(7) },
            )
            .unwrap();
        // An earlier time than the last record is written at the last record's time.
        recorder
            .sample(Duration::from_millis(200), sample(4096))
            .unwrap();
        assert_eq!(
            recorder.counts(),
            Counts {
                samples: 2,
                events: 1
            }
        );
        let text = String::from_utf8(recorder.finish().unwrap()).unwrap();
        assert!(text.starts_with("# ctguard record: test\n"), "{text}");
        let trace = parse_trace(&text, "recorded").unwrap();
        assert_eq!(trace.host, Some(default_host()));
        let times: Vec<u128> = trace.records.iter().map(|r| r.t.as_millis()).collect();
        assert_eq!(times, [0, 250, 250]);
        assert_eq!(trace.records[2].body, TraceBody::Sample(sample(4096)));
    }

    #[test]
    fn a_trace_without_host_memory_still_parses() {
        let mut recorder = Recorder::new(Vec::new());
        recorder.start("# no host", None).unwrap();
        recorder
            .sample(Duration::from_secs(1), ConntrackSample::default())
            .unwrap();
        let text = String::from_utf8(recorder.finish().unwrap()).unwrap();
        let trace = parse_trace(&text, "recorded").unwrap();
        assert_eq!((trace.host, trace.records.len()), (None, 1));
    }

    #[test]
    fn a_persistent_error_is_noted_once_until_it_changes_or_clears() {
        let mut note = ErrorNote::default();
        assert!(note.is_new("a: gone".into()));
        assert!(!note.is_new("a: gone".into()));
        assert!(note.is_new("a: other".into()));
        note.recovered("a");
        assert!(note.is_new("a: other".into()));
    }

    #[test]
    fn durations_must_be_positive_and_well_formed() {
        assert_eq!(positive_duration("200ms"), Ok(Duration::from_millis(200)));
        assert!(positive_duration("0s").unwrap_err().contains("above zero"));
        assert!(positive_duration("soon").unwrap_err().contains("500ms"));
    }

    #[test]
    fn an_existing_file_is_kept_unless_forced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trace.jsonl");
        std::fs::write(&path, "keep me\n").unwrap();
        let err = create_output(&path, false).unwrap_err().to_string();
        assert!(
            err.contains("already exists") && err.contains("--force"),
            "{err}"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "keep me\n");
        create_output(&path, true).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
    }

    #[test]
    fn summary_names_counts_duration_and_file() {
        let counts = Counts {
            samples: 20,
            events: 3,
        };
        let line = summary(
            counts,
            Stop::Interrupted(Duration::from_micros(4_000_700)),
            Path::new("t.jsonl"),
        );
        assert_eq!(
            line,
            "recorded 20 samples and 3 events to t.jsonl over 4s (interrupted)"
        );
        let line = summary(
            counts,
            Stop::DurationElapsed(Duration::from_millis(1500)),
            Path::new("t.jsonl"),
        );
        assert_eq!(
            line,
            "recorded 20 samples and 3 events to t.jsonl over 1s 500ms"
        );
    }
}
