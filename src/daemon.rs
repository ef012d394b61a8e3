/*!
The daemon (`ctguard run`): the live driver around the engine.

One task on a current-thread runtime waits on whichever comes first: the next poll (the
engine says how often: faster under pressure), a kernel log event (a table-full message
wakes the engine at once, with a fresh sample and no fixed sleep on the way to the first
write), a signal, or a change to the policy file. Every decision goes through the
[`Executor`] (journal first, then the write, then a read-back) and its outcome goes back
into the engine, which may decide the next step at once (a stage refused as "not permitted
here" makes it try the next one).

Between a kernel signal and the first change the only disk write is the journal's record
of that change: fsyncs on a busy disk take tens to hundreds of milliseconds. What can wait
(the journal's "applied" marks, the incident record) is written once the turn has acted,
before the next wait (`Daemon::write_behind`).

- `--dry-run`: the engine emits its decisions as "would"; they run through the same
  executor checks against a recording actuator and a journal of their own under
  `STATE_DIR/dry-run`, and nothing on the host changes.
- `--netns`: count, counters and timeouts are those of that namespace; max and hashsize
  are global and written from ctguard's own namespace; kernel messages are attributed by
  the namespace inode.
- On start the journal is reconciled with the host: changes still in force are adopted and
  later rolled back like new ones; values someone else changed are left to them. A journal
  that cannot be read, or settled at start (a full or read-only disk), makes ctguard watch
  and report only; one another ctguard is writing (`ctguard rollback`, a second daemon)
  stops it at start.
- SIGTERM/SIGINT stop cleanly (rolling back first if the policy says so); SIGHUP or a
  write to the policy file reloads it, and an invalid new policy is refused with its error
  while the old one stays in force.
*/

use crate::act::choose::{Choice, choose};
use crate::act::evict::{Criteria, round as evict_round};
use crate::act::executor::{ChangeRequest, ExecError, Executor, Reverted};
use crate::act::notrack::{NotrackChange, PortKey};
use crate::act::persist::Persistence;
use crate::act::probe::TcpProbe;
use crate::act::recording::{RecordingActuator, RecordingNotrack};
use crate::act::sysctl::{Roots, SysctlActuator};
use crate::act::{ActError, Actuator};
use crate::engine::{Action, Change, Decision, Engine, Input, Outcome, PortLoad};
use crate::journal::{EntryState, Journal, JournalError, LiveState};
use crate::knob::Knob;
use crate::observe::kmsg::KmsgEvent;
use crate::observe::kmsg_follower::KmsgFollower;
use crate::observe::memory::HostMemory;
use crate::observe::modules::KernelModules;
use crate::observe::sampler::Sampler;
use crate::observe::table::{TableBreakdown, TableReader};
use crate::observe::{ConntrackSample, KernelEvent};
use crate::policy::{Level, Mode, Policy, StageKind};
use crate::port::Proto;
use anyhow::Context;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{debug, error, info, warn};

/// How `ctguard run` was asked to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// The policy file; `None` for the embedded default.
    pub policy: Option<PathBuf>,
    pub dry_run: bool,
    /// The namespace to watch and protect; `None` for ctguard's own.
    pub netns: Option<PathBuf>,
    pub state_dir: PathBuf,
    /// Where `persist = true` writes `etc/sysctl.d/…` and `etc/modprobe.d/…` (`/`).
    pub persist_root: PathBuf,
    /// Where to serve Prometheus metrics; `None` for no endpoint.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

impl Actuator for Box<dyn Actuator + Send> {
    fn read(&mut self, knob: Knob) -> Result<u64, ActError> {
        (**self).read(knob)
    }

    fn write(&mut self, knob: Knob, value: u64) -> Result<(), ActError> {
        (**self).write(knob, value)
    }

    fn check_write(&mut self, knob: Knob, value: u64) -> Result<(), ActError> {
        (**self).check_write(knob, value)
    }
}

type BoxedExecutor = Executor<Box<dyn Actuator + Send>>;

/// Loads a policy file (or the embedded default), with `--dry-run` overriding its mode.
pub fn load_policy(path: Option<&Path>, dry_run: bool) -> anyhow::Result<Policy> {
    if let Some(path) = path {
        crate::security::check_policy_file(path)?;
    }
    let mut policy = Policy::read(path)?;
    if dry_run && policy.mode == Mode::Enforce {
        policy.mode = Mode::DryRun;
    }
    Ok(policy)
}

/// Runs the daemon until a signal stops it.
pub fn run(options: Options) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(async { Daemon::start(options)?.serve().await })
}

struct Daemon {
    options: Options,
    engine: Engine,
    sampler: Sampler,
    sample: ConntrackSample,
    kmsg: Option<KmsgFollower>,
    /// The inode of the protected namespace: table-full messages naming another
    /// namespace are not ours.
    netns_inode: Option<u64>,
    /// `None` when the journal is unusable: then nothing is ever changed.
    executor: Option<BoxedExecutor>,
    /// The dry-run executor: recording actuator, its own journal.
    rehearsal: Option<BoxedExecutor>,
    started: Instant,
    /// When the last sample was taken: the next is due a poll interval after it, however
    /// many other events (a failing kernel log, another namespace's messages) come first.
    last_poll: tokio::time::Instant,
    /// Drifts already reported, by (journal entry, live value).
    drift_seen: BTreeSet<(u64, u64)>,
    /// Expired NOTRACK entries whose removal failed (reported once).
    expiry_failures: BTreeSet<u64>,
    /// The table analysis for the NOTRACK stage: runs on a blocking thread so a dump of a
    /// large table never delays the reaction to a kernel signal.
    analysis: Option<tokio::task::JoinHandle<Analysis>>,
    table_reader: Option<TableReader>,
    last_analysis: Option<Instant>,
    /// The eviction round running on a blocking thread: its decision (and whether it
    /// deletes or only rehearses), and the task.
    eviction: Option<(Decision, bool)>,
    eviction_task: Option<tokio::task::JoinHandle<Outcome>>,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    /// Keeps the record of the open incident under `STATE_DIR/incidents`.
    incidents: crate::incident::IncidentRecorder,
    /// Whether writing the journal's pending marks failed last time (logged once).
    journal_sync_failing: bool,
    /// Kernel log reads that failed in a row (their pauses grow, only the first warns).
    kmsg_failures: u32,
}

/// A finished table analysis, with the reader handed back for the next one.
type Analysis = (Option<TableReader>, Result<TableBreakdown, String>);

/// How often the table is analysed while the engine wants hot ports.
const ANALYSIS_INTERVAL: Duration = Duration::from_secs(10);

impl Daemon {
    fn start(options: Options) -> anyhow::Result<Daemon> {
        let mut policy = load_policy(options.policy.as_deref(), options.dry_run)?;
        crate::security::check_state_dir(&options.state_dir)?;
        let host = HostMemory::read()?;
        let netns = options.netns.as_deref();
        let netns_inode = match netns {
            Some(path) => Some(
                crate::netns::inode_of(path)
                    .with_context(|| format!("network namespace {}", path.display()))?,
            ),
            None => crate::netns::current_inode().ok(),
        };
        let sampler = Sampler::open(netns)?;
        let kmsg = KmsgFollower::open()
            .map_err(|e| warn!(error = %e, "kernel log unavailable; relying on polling"))
            .ok();
        let actuator = || -> Box<dyn Actuator + Send> {
            Box::new(SysctlActuator::new(Roots::default(), options.netns.clone()))
        };
        let notrack = choose_notrack(options.netns.clone(), &policy);
        let (executor, rehearsal) = if options.dry_run || policy.mode == Mode::DryRun {
            let journal = Journal::open(&options.state_dir.join("dry-run"))?;
            let recording: Box<dyn Actuator + Send> = Box::new(RecordingActuator::new(actuator()));
            let rehearsal = Executor::new(recording, journal, options.netns.clone());
            let rehearsal = match notrack {
                Ok(choice) => rehearsal.with_notrack(Box::new(RecordingNotrack::rehearsing(
                    choice.backend.kind(),
                ))),
                Err(why) => rehearsal.without_notrack(why),
            };
            (None, Some(rehearsal))
        } else {
            match Journal::open_exclusive(&options.state_dir) {
                Ok(journal) => {
                    let executor = Executor::new(actuator(), journal, options.netns.clone());
                    let executor = match notrack {
                        Ok(choice) => executor.with_notrack(choice.backend),
                        Err(why) => executor.without_notrack(why),
                    };
                    (Some(executor), None)
                }
                // Another ctguard writes this journal: starting would undo its records.
                Err(e @ JournalError::Locked { .. }) => return Err(e.into()),
                Err(e) => {
                    error!(error = %e, "journal unusable: watching and reporting only");
                    policy.mode = Mode::Observe;
                    (None, None)
                }
            }
        };
        info!(
            policy = %policy.source,
            mode = policy.mode.name(),
            netns = ?options.netns,
            state_dir = %options.state_dir.display(),
            "ctguard starting"
        );
        let incidents = crate::incident::IncidentRecorder::starting_now(
            crate::incident::IncidentDir::under_state_dir(&options.state_dir),
            options.netns.as_deref(),
        );
        let mut daemon = Daemon {
            options,
            engine: Engine::new(policy, host),
            sampler,
            sample: ConntrackSample::default(),
            kmsg,
            netns_inode,
            executor,
            rehearsal,
            started: Instant::now(),
            last_poll: tokio::time::Instant::now(),
            drift_seen: BTreeSet::new(),
            expiry_failures: BTreeSet::new(),
            analysis: None,
            table_reader: None,
            last_analysis: None,
            eviction: None,
            eviction_task: None,
            metrics: Default::default(),
            incidents,
            journal_sync_failing: false,
            kmsg_failures: 0,
        };
        if let Err(e) = daemon.adopt_previous_changes() {
            // Settling writes the journal (a full or read-only disk fails it): watch anyway,
            // as with a journal that cannot be read, rather than exit and watch nothing.
            error!(error = %e, "cannot settle the previous run's changes: watching and reporting only");
            daemon.executor = None;
            let mut observe = daemon.engine.policy().clone();
            observe.mode = Mode::Observe;
            daemon.engine.replace_policy(observe);
        } else {
            // Entries settled at start drop out of the boot-time files now, not at the next
            // change.
            daemon.persist();
        }
        Ok(daemon)
    }

    fn now(&self) -> Duration {
        self.started.elapsed()
    }

    /// Reconciles the journal with the host and hands changes still in force to the engine.
    fn adopt_previous_changes(&mut self) -> anyhow::Result<()> {
        let Some(exec) = self.executor.as_mut() else {
            return Ok(());
        };
        let now = self.started.elapsed();
        // Reconcile reads this namespace only; another's changes are not settled here.
        for entry in exec.journal().in_force_newest_first() {
            if entry.netns != self.options.netns {
                info!(entry = entry.id, knob = %entry.knob, netns = ?entry.netns,
                    "change in force for another namespace; `ctguard rollback` undoes it");
            }
        }
        for (entry, state) in exec.reconcile()? {
            match state {
                LiveState::InForce => {
                    let stage =
                        StageKind::from_name(&entry.stage).unwrap_or(StageKind::RaiseLimits);
                    info!(entry = entry.id, knob = %entry.knob, original = entry.original,
                        current = entry.new, "adopting a change still in force from a previous run");
                    self.engine
                        .adopt(now, stage, entry.knob, entry.original, entry.new);
                }
                // An interrupted entry was already settled (failed) by reconcile.
                LiveState::Original if entry.state == EntryState::Intended => {}
                LiveState::Original => {
                    exec.journal_mark(
                        entry.id,
                        EntryState::Reverted,
                        "host held the original at start",
                    )?;
                }
                LiveState::Drifted { live } => {
                    warn!(entry = entry.id, knob = %entry.knob, live, set = entry.new,
                        original = entry.original, "changed by someone else while ctguard was away; leaving it");
                    exec.abandon(entry.id, live)?;
                }
            }
        }
        for (port, left) in exec.notrack_left() {
            info!(%port, left = %humantime::format_duration(left),
                "adopting a NOTRACK still in force from a previous run");
            self.engine.adopt_notrack(now, port, now + left);
        }
        Ok(())
    }

    async fn serve(mut self) -> anyhow::Result<()> {
        let mut terminate = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut hangup = signal(SignalKind::hangup())?;
        let mut policy_changes =
            crate::policy_watch::PolicyWatch::new(self.options.policy.as_deref());
        // Guarding matters more than being watched: a busy port costs the metrics only.
        if let Some(addr) = self.options.metrics_listen
            && let Err(e) = crate::metrics::spawn_server(addr, self.metrics.clone()).await
        {
            error!(error = %e, "serving no metrics; guarding goes on");
        }
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        let watchdog = sd_notify::watchdog_enabled();
        self.poll();
        loop {
            self.write_behind();
            self.metrics.observe(&self.sample, &self.engine.state());
            let wait = self.engine.state().poll_interval;
            tokio::select! {
                _ = tokio::time::sleep_until(self.last_poll + wait) => self.poll(),
                event = next_kernel_event(&mut self.kmsg, &mut self.kmsg_failures) => self.kernel_event(event),
                _ = terminate.recv() => break,
                _ = interrupt.recv() => break,
                _ = hangup.recv() => self.reload("SIGHUP"),
                _ = policy_changes.changed() => self.reload("policy file changed"),
                done = finished(&mut self.analysis) => self.hot_ports(done.unwrap_or_else(
                    |e| (None, Err(format!("table analysis task failed: {e}"))),
                )),
                done = finished(&mut self.eviction_task) => self.eviction_done(done),
            }
            self.maybe_start_analysis();
            if watchdog.is_some() {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            }
        }
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        // A round in progress is bounded: let it end so its outcome is accounted for.
        if self.eviction_task.is_some() {
            let done = finished(&mut self.eviction_task).await;
            self.eviction_done(done);
        }
        let now = self.now();
        let decisions = self.engine.shutdown(now);
        if !decisions.is_empty() {
            info!(
                count = decisions.len(),
                "rolling back before exit (rollback_on_exit)"
            );
        }
        self.carry_out(decisions);
        self.write_behind();
        if let Some(exec) = self.executor.as_mut() {
            match exec.uninstall_notrack_if_unused() {
                Ok(true) => info!("NOTRACK table removed"),
                Ok(false) => {}
                Err(e) => warn!(error = %e, "could not remove the NOTRACK table"),
            }
        }
        self.incidents.on_stop(self.now());
        info!("ctguard stopped");
        Ok(())
    }

    /// Writes what a turn left for after its reaction: the journal's "applied" marks, then
    /// the incident record.
    fn write_behind(&mut self) {
        for exec in [self.executor.as_mut(), self.rehearsal.as_mut()]
            .into_iter()
            .flatten()
        {
            match exec.sync_journal() {
                Ok(()) => self.journal_sync_failing = false,
                Err(e) if !self.journal_sync_failing => {
                    error!(error = %e, "could not write the journal's applied marks \
                        (a restart settles them from the live values); will keep trying");
                    self.journal_sync_failing = true;
                }
                Err(_) => {}
            }
        }
        let now = self.now();
        self.incidents.flush(now);
    }

    /// Takes a sample and lets the engine decide on it.
    fn poll(&mut self) {
        let started = Instant::now();
        self.last_poll = started.into();
        if let Err(e) = self.sampler.read_into(&mut self.sample) {
            warn!(error = %e, "sampling failed; will try again");
            return;
        }
        debug!(
            count = self.sample.count,
            max = self.sample.max,
            took_us = started.elapsed().as_micros() as u64,
            "sampled"
        );
        self.note_drift();
        let now = self.now();
        let decisions = self.engine.observe(now, Input::Sample(self.sample.clone()));
        self.incidents
            .on_sample(now, &self.sample, &self.engine.state());
        self.carry_out(decisions);
        self.expire_notrack();
    }

    /// Removes exemptions the kernel does not expire by itself (iptables rules) once their
    /// expiry passed without a renewal, as nftables would have.
    fn expire_notrack(&mut self) {
        let Some(exec) = self.executor.as_mut() else {
            return;
        };
        for (id, result) in exec.expire_notrack() {
            match result {
                Ok(()) => info!(entry = id, "NOTRACK expired without a renewal: removed"),
                // Retried at every poll; said once.
                Err(e) if self.expiry_failures.insert(id) => {
                    warn!(entry = id, error = %e, "could not remove an expired NOTRACK; will keep trying")
                }
                Err(_) => {}
            }
        }
    }

    fn kernel_event(&mut self, record: Option<KmsgEvent>) {
        let Some(KmsgEvent {
            seq,
            timestamp_us,
            event,
        }) = record
        else {
            return;
        };
        if let KernelEvent::TableFull { netns: Some(inode) } = event
            && Some(inode) != self.netns_inode
        {
            return;
        }
        // The record's own kernel time (printk's clock), to tell a late wake-up from a
        // slow reaction when reading a log.
        debug!(seq, kernel_time_us = timestamp_us, "kernel record read");
        info!(?event, "kernel");
        self.metrics.kernel_event(&event);
        // A fresh sample first, so the engine decides on the table as it is now.
        self.poll();
        let now = self.now();
        let decisions = self.engine.observe(now, Input::Kernel(event.clone()));
        self.incidents.on_kernel(now, &event, &self.engine.state());
        self.carry_out(decisions);
    }

    /// Starts a table analysis when the engine would use one and none ran lately.
    fn maybe_start_analysis(&mut self) {
        let due = self
            .last_analysis
            .is_none_or(|t| t.elapsed() >= ANALYSIS_INTERVAL);
        if self.analysis.is_some() || !due || !self.engine.state().wants_hot_ports {
            return;
        }
        self.last_analysis = Some(Instant::now());
        let reader = self.table_reader.take();
        let netns = self.options.netns.clone();
        self.analysis = Some(tokio::task::spawn_blocking(move || {
            let reader = match reader {
                Some(reader) => Ok(reader),
                None => match &netns {
                    Some(ns) => crate::netns::run_in(ns, TableReader::open)
                        .map_err(|e| e.to_string())
                        .and_then(|r| r.map_err(|e| e.to_string())),
                    None => TableReader::open().map_err(|e| e.to_string()),
                },
            };
            match reader {
                Ok(mut reader) => {
                    let result = reader.read(0).map_err(|e| e.to_string());
                    (Some(reader), result)
                }
                Err(e) => (None, Err(e)),
            }
        }));
    }

    fn hot_ports(&mut self, (reader, result): Analysis) {
        self.table_reader = reader;
        match result {
            Ok(breakdown) => {
                let ports = port_loads(&breakdown);
                info!(
                    total = breakdown.total,
                    ports = ports.len(),
                    "table analysed"
                );
                let now = self.now();
                let decisions = self.engine.observe(now, Input::HotPorts(ports));
                self.carry_out(decisions);
            }
            Err(e) => warn!(error = %e, "table analysis failed; NOTRACK has no data"),
        }
    }

    fn reload(&mut self, why: &str) {
        match load_policy(self.options.policy.as_deref(), self.options.dry_run) {
            Ok(mut policy) => {
                if self.executor.is_none() && self.rehearsal.is_none() {
                    policy.mode = Mode::Observe;
                }
                // Started in dry-run, ctguard opened no journal, and it never acts without one.
                if self.executor.is_none() && policy.mode == Mode::Enforce {
                    warn!(why, policy = %policy.source,
                        "the new policy enforces, but ctguard started in dry-run without a journal; staying in dry-run until a restart");
                    policy.mode = Mode::DryRun;
                }
                info!(why, policy = %policy.source, mode = policy.mode.name(), "policy reloaded");
                self.engine.replace_policy(policy);
            }
            Err(e) => {
                error!(why, error = %format!("{e:#}"), "new policy refused; the old one stays in force")
            }
        }
    }

    /// Reports knobs ctguard set that now hold another value. Under pressure the engine
    /// acts per policy on the live values; at rest the operator's value is left alone.
    fn note_drift(&mut self) {
        let Some(exec) = self.executor.as_mut() else {
            return;
        };
        let under_pressure = self.engine.state().level > Level::Normal;
        let drifted: Vec<(u64, Knob, u64, u64)> = exec
            .journal()
            .in_force_newest_first()
            .into_iter()
            .filter(|e| e.netns == self.options.netns)
            .filter(|e| e.state == EntryState::Applied)
            .filter_map(|e| {
                // Back at the original counts too: that is what a firewall restart does.
                let live = observed(&self.sample, e.knob)?;
                (LiveState::of(e, live) != LiveState::InForce)
                    .then_some((e.id, e.knob, live, e.new))
            })
            .collect();
        for (id, knob, live, set) in drifted {
            if !self.drift_seen.insert((id, live)) {
                continue;
            }
            self.metrics.drift();
            if under_pressure {
                warn!(entry = id, %knob, live, set, "drift during an incident: acting per policy on the live value");
                self.incidents.note(self.started.elapsed(), format!("drift: {knob} is {live}, ctguard had set {set}; acting per policy on the live value"));
            } else {
                warn!(entry = id, %knob, live, set, "drift: someone else changed it; leaving the manual value");
                if let Err(e) = exec.abandon(id, live) {
                    error!(error = %e, "could not record the drift in the journal");
                }
            }
        }
    }

    /// Carries out decisions, feeding each outcome back until the engine has nothing more.
    /// An eviction round goes to a blocking thread (a dump of a large table takes a while);
    /// its outcome is fed back when it ends (see [`Daemon::eviction_done`]).
    fn carry_out(&mut self, mut decisions: Vec<Decision>) {
        while let Some(decision) = (!decisions.is_empty()).then(|| decisions.remove(0)) {
            info!(id = %decision.id, stage = decision.stage.name(), reason = %decision.reason, "decision");
            self.metrics.decision_now();
            self.incidents.on_decision(self.now(), &decision);
            let incident = self.engine.state().incident.map_or(0, |i| i.id.0);
            let in_use = self.sample.count;
            if let Some(round) = EvictionRound::of(&decision.action, &self.options.netns) {
                self.start_eviction(decision, round);
                continue;
            }
            let mut notes = Vec::new();
            let outcome = match &decision.action {
                dry_run @ Action::DryRun(_) => {
                    if let Some(exec) = self.rehearsal.as_mut() {
                        let outcome =
                            perform(exec, decision.stage, dry_run, incident, in_use, &mut notes);
                        info!(id = %decision.id, ?outcome, ?notes, "dry-run: would have done this; nothing changed");
                    }
                    continue;
                }
                action => match self.executor.as_mut() {
                    Some(exec) => {
                        perform(exec, decision.stage, action, incident, in_use, &mut notes)
                    }
                    None => Outcome::NotPermitted(
                        "no usable journal: ctguard does not act unjournaled".into(),
                    ),
                },
            };
            for note in notes {
                self.incidents.note(self.now(), note);
            }
            decisions.extend(self.settle(&decision, outcome));
        }
    }

    /// Reports a decision's outcome to the engine (and the log, metrics, incident record);
    /// returns what the engine decides next.
    fn settle(&mut self, decision: &Decision, outcome: Outcome) -> Vec<Decision> {
        match &outcome {
            Outcome::Applied => info!(id = %decision.id, "applied"),
            Outcome::NotPermitted(why) => {
                warn!(id = %decision.id, why, "not permitted here; trying the next stage")
            }
            Outcome::Failed(why) => warn!(id = %decision.id, why, "failed"),
        }
        let changed = outcome == Outcome::Applied;
        self.metrics.outcome(decision, &outcome);
        let now = self.now();
        let more = self.engine.outcome(now, decision.id, outcome.clone());
        self.incidents
            .on_outcome(now, decision.id, &outcome, &self.engine.state());
        if changed {
            self.persist();
        }
        more
    }

    /// Runs an eviction round on a blocking thread. The engine makes no other decision while
    /// a real one is pending; a rehearsal is dropped if a round is still running.
    fn start_eviction(&mut self, decision: Decision, round: EvictionRound) {
        if self.eviction.is_some() {
            warn!(id = %decision.id, "an eviction round is still running; this one is skipped");
            if round.delete {
                let more = self.settle(
                    &decision,
                    Outcome::Failed("an eviction round is still running".into()),
                );
                self.carry_out(more);
            }
            return;
        }
        let delete = round.delete;
        let task = tokio::task::spawn_blocking(move || round.run());
        self.eviction = Some((decision, delete));
        self.eviction_task = Some(task);
    }

    /// Feeds a finished eviction round's outcome back (a rehearsal's is only logged).
    fn eviction_done(&mut self, done: Result<Outcome, String>) {
        let outcome =
            done.unwrap_or_else(|e| Outcome::Failed(format!("eviction task failed: {e}")));
        let Some((decision, delete)) = self.eviction.take() else {
            return;
        };
        if delete {
            let more = self.settle(&decision, outcome);
            self.carry_out(more);
        } else {
            info!(id = %decision.id, ?outcome, "dry-run: would have done this; nothing changed");
        }
    }

    /// Makes the boot-time files follow the journal (`persist = true`), or removes ours
    /// when the policy no longer persists.
    fn persist(&self) {
        let Some(exec) = self.executor.as_ref() else {
            return;
        };
        let persistence = Persistence::new(&self.options.persist_root);
        let enabled = self.engine.policy().persist;
        if !enabled && !persistence.has_files() {
            return;
        }
        if let Err(e) = persistence.sync(exec.journal(), enabled) {
            error!(error = %e, "could not update the persisted values");
        }
    }
}

/// The next event from the kernel log, or never when there is no kernel log. A read error
/// yields `None` after a pause ([`kmsg_retry_pause`]; the follower keeps going); the first
/// of a run of failures is a warning, the others are logged at debug level.
async fn next_kernel_event(
    kmsg: &mut Option<KmsgFollower>,
    failures: &mut u32,
) -> Option<KmsgEvent> {
    match kmsg {
        Some(follower) => match follower.next_event().await {
            Ok(event) => {
                if *failures > 0 {
                    info!(failures = *failures, "kernel log readable again");
                    *failures = 0;
                }
                Some(event)
            }
            Err(e) => {
                if *failures == 0 {
                    warn!(error = %e, "kernel log read failed; retrying (polling goes on meanwhile)");
                } else {
                    debug!(error = %e, failures = *failures, "kernel log read failed again");
                }
                let pause = kmsg_retry_pause(*failures);
                *failures = failures.saturating_add(1);
                tokio::time::sleep(pause).await;
                None
            }
        },
        None => std::future::pending().await,
    }
}

/// The pause after the `failures`+1st kernel log read failure in a row: 1 s, doubling up
/// to a minute, so a log that stays broken costs neither CPU nor log lines.
fn kmsg_retry_pause(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.min(6)).min(Duration::from_secs(60))
}

/// A knob's value in a sample, where the sample has it.
fn observed(sample: &ConntrackSample, knob: Knob) -> Option<u64> {
    match knob {
        Knob::Max => Some(sample.max),
        Knob::Buckets => sample.buckets,
        Knob::Timeout(t) => sample.timeouts.get(&t).copied(),
    }
}

/// Carries out one action through an executor. A multi-knob apply is all or nothing:
/// when one write fails, those already made are undone before the outcome is reported.
/// What is worth keeping with the incident besides the outcome (probe results) goes to
/// `notes`.
fn perform(
    exec: &mut BoxedExecutor,
    stage: StageKind,
    action: &Action,
    incident: u64,
    in_use: u64,
    notes: &mut Vec<String>,
) -> Outcome {
    // A rehearsal (dry-run) logs what it would do, never the words of a real change.
    let (action, rehearsal) = match action {
        Action::DryRun(inner) => (inner.as_ref(), true),
        action => (action, false),
    };
    match action {
        Action::Apply(changes) => apply_all(exec, stage, changes, incident, in_use, rehearsal),
        Action::Revert(changes) => revert_all(exec, changes, in_use, rehearsal),
        Action::Notrack { ports, expiry } => {
            notrack_all(exec, stage, ports, *expiry, incident, notes, rehearsal)
        }
        Action::Untrack { ports } => untrack_all(exec, ports),
        // Eviction rounds run on their own thread (`EvictionRound`), never through here.
        Action::Evict { .. } => {
            Outcome::Failed("an eviction round is not an executor action".into())
        }
        nested @ Action::DryRun(_) => perform(exec, stage, nested, incident, in_use, notes),
    }
}

/// One eviction round in the protected namespace; with `delete` false (a rehearsal: the
/// dry-run executor records writes, but a delete would be real) only a count of what would
/// go. Not journaled: deleted entries cannot be put back (see [`crate::act::evict`]), so
/// the report is logged instead.
struct EvictionRound {
    netns: Option<PathBuf>,
    criteria: Criteria,
    batch: u32,
    delete: bool,
}

impl EvictionRound {
    fn of(action: &Action, netns: &Option<PathBuf>) -> Option<EvictionRound> {
        let (inner, delete) = match action {
            Action::DryRun(inner) => (&**inner, false),
            action => (action, true),
        };
        let Action::Evict {
            states,
            min_age,
            batch,
        } = inner
        else {
            return None;
        };
        Some(EvictionRound {
            netns: netns.clone(),
            criteria: Criteria {
                states: states.clone(),
                min_age: *min_age,
            },
            batch: *batch,
            delete,
        })
    }

    fn run(self) -> Outcome {
        match evict_round(
            self.netns.as_deref(),
            &self.criteria,
            self.batch,
            self.delete,
        ) {
            Ok(report) => {
                info!(%report, delete = self.delete, "eviction round (not journaled: cannot be undone)");
                Outcome::Applied
            }
            Err(e) if e.is_not_permitted() => Outcome::NotPermitted(e.to_string()),
            Err(e) => Outcome::Failed(e.to_string()),
        }
    }
}

fn apply_all(
    exec: &mut BoxedExecutor,
    stage: StageKind,
    changes: &[Change],
    incident: u64,
    in_use: u64,
    rehearsal: bool,
) -> Outcome {
    let mut done = Vec::new();
    for change in changes {
        let request = ChangeRequest {
            knob: change.knob,
            expected: change.from,
            to: change.to,
            stage: stage.name().to_string(),
            incident,
        };
        match exec.apply(&request, in_use) {
            Ok(id) => {
                let did = if rehearsal { "would change" } else { "changed" };
                info!(entry = id, knob = %change.knob, from = change.from, to = change.to, "{did}");
                done.push(id);
            }
            Err(e) => {
                for id in done.into_iter().rev() {
                    if let Err(undo) = exec.revert(id, in_use) {
                        error!(entry = id, error = %undo, "could not undo a partial change; `ctguard rollback` will");
                    }
                }
                return outcome_of(&e);
            }
        }
    }
    Outcome::Applied
}

fn revert_all(
    exec: &mut BoxedExecutor,
    changes: &[Change],
    in_use: u64,
    rehearsal: bool,
) -> Outcome {
    for change in changes {
        let netns = exec.netns().map(Path::to_path_buf);
        let Some(entry) = exec
            .journal()
            .in_force_for(change.knob, netns.as_deref())
            .map(|e| e.id)
        else {
            warn!(knob = %change.knob, "nothing journaled in force for this knob; nothing to revert");
            continue;
        };
        match exec.step_back(entry, change.to, in_use) {
            Ok(Reverted::Restored { knob, to, .. } | Reverted::Stepped { knob, to, .. }) => {
                let did = if rehearsal {
                    "would revert"
                } else {
                    "reverted"
                };
                info!(entry, %knob, to, "{did}")
            }
            Ok(Reverted::AlreadyOriginal { knob, .. }) => {
                info!(entry, %knob, "already at its original")
            }
            Ok(Reverted::LeftDrifted { knob, live, .. }) => {
                warn!(entry, %knob, live, "changed by someone else; left as they set it");
                if let Err(e) = exec.abandon(entry, live) {
                    return outcome_of(&e);
                }
            }
            Ok(Reverted::Deferred { why, .. }) => return Outcome::Failed(why),
            Err(e) => return outcome_of(&e),
        }
    }
    Outcome::Applied
}

/// The NOTRACK backend for the protected namespace (see [`crate::act::choose`]), logged
/// with the reason; or why there is none, which every NOTRACK attempt then reports.
fn choose_notrack(netns: Option<PathBuf>, policy: &Policy) -> Result<Choice, String> {
    let accept_untracked = policy
        .stages
        .notrack_hot_ports
        .as_ref()
        .is_some_and(|s| s.accept_untracked);
    let chosen = KernelModules::read_host()
        .map_err(|e| e.to_string())
        .and_then(|modules| choose(netns, &modules, accept_untracked).map_err(|e| e.to_string()));
    match &chosen {
        Ok(choice) => info!(backend = %choice.backend.kind(), why = %choice.why, "NOTRACK backend"),
        Err(why) => warn!(why, "NOTRACK unavailable; the other stages still work"),
    }
    chosen
}

/// Exempts ports from tracking, one at a time, each checked by a health probe: a TCP
/// service that answered before and not after (a stateful filter dropping untracked
/// packets) has its exemption removed at once and the stage fails with the reason. Each
/// probe's result goes to `notes`.
fn notrack_all(
    exec: &mut BoxedExecutor,
    stage: StageKind,
    ports: &[PortKey],
    expiry: Duration,
    incident: u64,
    notes: &mut Vec<String>,
    rehearsal: bool,
) -> Outcome {
    for &port in ports {
        let change = match NotrackChange::new(port.proto, port.port, expiry) {
            Ok(change) => change,
            Err(e) => return Outcome::Failed(e.to_string()),
        };
        let probe = (port.proto == Proto::Tcp)
            .then(|| TcpProbe::service(exec.netns().map(Path::to_path_buf), port.port));
        let answered_before = probe.as_ref().is_some_and(|p| p.answers().unwrap_or(false));
        let id = match exec.notrack(change, stage.name(), incident) {
            Ok(id) => id,
            Err(e) => return outcome_of(&e),
        };
        let did = if rehearsal {
            "would add NOTRACK"
        } else {
            "NOTRACK added"
        };
        info!(entry = id, %port, expiry = %humantime::format_duration(expiry), "{did}");
        let Some(probe) = probe else { continue };
        let at = probe.addr;
        if !answered_before {
            notes.push(format!(
                "probe: {port} did not answer a local connect to {at} before NOTRACK, so it cannot tell whether NOTRACK breaks it"
            ));
        } else if probe.answers().unwrap_or(false) {
            notes.push(format!(
                "probe: {port} answered a local connect to {at} before and after NOTRACK"
            ));
        } else {
            let why = format!(
                "{port} stopped answering at {at} once untracked (a filter drops untracked \
                 packets?); NOTRACK removed at once"
            );
            if let Err(e) = exec.untrack(id, Some(why.clone())) {
                error!(entry = id, error = %e, "could not remove a harmful NOTRACK");
            }
            return Outcome::Failed(why);
        }
    }
    Outcome::Applied
}

fn untrack_all(exec: &mut BoxedExecutor, ports: &[PortKey]) -> Outcome {
    let netns = exec.netns().map(Path::to_path_buf);
    let ids: Vec<u64> = exec
        .journal()
        .notrack_in_force()
        .into_iter()
        .filter(|e| ports.contains(&e.change.target()) && e.netns == netns)
        .map(|e| e.id)
        .collect();
    for id in ids {
        if let Err(e) = exec.untrack(id, None) {
            return outcome_of(&e);
        }
    }
    Outcome::Applied
}

/// What the engine needs of a table analysis: entries per local service port. Ports whose
/// flows are NAT'd, forwarded or end elsewhere are marked so they are never exempted.
fn port_loads(breakdown: &TableBreakdown) -> Vec<PortLoad> {
    breakdown
        .ports
        .iter()
        .filter_map(|p| {
            Some(PortLoad {
                proto: Proto::from_number(p.proto.0)?,
                port: p.port,
                entries: p.local_entries,
                nat_or_forwarded: p.nat_or_forwarded || !p.terminates_locally,
            })
        })
        .collect()
}

/// The result of a blocking task once it ends; never, when none is running.
async fn finished<T>(task: &mut Option<tokio::task::JoinHandle<T>>) -> Result<T, String> {
    let Some(running) = task.as_mut() else {
        return std::future::pending().await;
    };
    let done = running.await.map_err(|e| e.to_string());
    *task = None;
    done
}

fn outcome_of(e: &ExecError) -> Outcome {
    if e.is_not_permitted() {
        Outcome::NotPermitted(e.to_string())
    } else {
        Outcome::Failed(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_log_retries_back_off_to_a_minute() {
        let pauses: Vec<u64> = (0..9).map(|n| kmsg_retry_pause(n).as_secs()).collect();
        assert_eq!(pauses, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(kmsg_retry_pause(u32::MAX), Duration::from_secs(60));
    }
}
