/*!
Fire drills (`ctguard drill`): a conntrack incident staged in scratch network namespaces
on the real kernel, once without ctguard and once with the real daemon, and a report of
how the daemon did and whether it left everything as it found it.

A drill:
1. takes the host-wide kernel lab lock and saves the global knobs; with `--allow-global`
   it lowers `nf_conntrack_max` to [`DRILL_MAX`] so that a small flood fills the table
   (a guard restores both on every exit: error, interrupt, panic);
2. baseline: makes a namespace (`/run/netns/ctguard-drill-<pid>-baseline`: a bind mount
   of a new netns, loopback up, an nftables `ct state` rule so tracking is active), runs
   the scenario's load (built in, bounded, loopback only: [`crate::loadgen`]) and reads the
   kernel's counters; then deletes it and waits out the kernel's message rate limit
   (`net.core.message_cost`), so the next table-full message is printed, not suppressed;
3. with ctguard: a fresh namespace (`ctguard-drill-<pid>`), a snapshot of every conntrack
   sysctl (global and the namespace's) and of its ruleset, then `ctguard run --netns …` —
   the binary itself, so exactly the product — and the same load, while two watchers time
   the first table-full record in `/dev/kmsg` and (a 1 ms loop over the sysctls and
   counters) the first drop and the first change;
4. the load over, the drill flushes the namespace's table (its flows are done; this saves
   waiting out the kernel's 30 s UDP timeout), lets the daemon recover and roll back, stops
   it, and compares the snapshot (`rollback_exact`).

Without `--allow-global` the daemon runs with `raise_limits` disabled (it could otherwise
write the global knobs from the initial namespace), and the report shows what that stage
would have done, planned by [`crate::engine::plan_raise`], as simulated.

Timings: the drill's policy is `policies/drill.toml` (embedded), or with `--policy` that
file with the drill's timings laid over it ([`drill_policy_text`]).

SIGINT and SIGTERM set a flag that every wait and the load generator look at; the drill
then unwinds through its guards (daemon stopped, namespaces deleted, globals restored).
*/

use crate::engine::plan_raise;
use crate::journal::Journal;
use crate::knob::Knob;
use crate::loadgen::{Load, LoadReport, Protocol};
use crate::observe::memory::HostMemory;
use crate::observe::sampler::Sampler;
use crate::observe::{ConntrackSample, ConntrackStats, KernelEvent};
use crate::policy::Policy;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The drill's embedded policy (lab-sized timings).
pub const DRILL_POLICY: &str = include_str!("../policies/drill.toml");
/// With `--allow-global`, the max the drill sets for the length of the drill.
pub const DRILL_MAX: u64 = 8192;
/// Without `--allow-global`, the largest host max the drill will fill.
pub const FILL_BOUND: u64 = 300_000;
/// The host-wide lock every change of a global conntrack knob is made under.
pub const HOST_LOCK: &str = "/run/lock/ctguard-kernel-tests.lock";
/// Set by a caller that already holds [`HOST_LOCK`] (the kernel tests, benchmarks) to a
/// descriptor of it that the drill inherits: locking that same open file succeeds at once.
pub const HOST_LOCK_FD_ENV: &str = "CTGUARD_HOST_LOCK_FD";

const NETFILTER_SYSCTLS: &str = "/proc/sys/net/netfilter";
const NETNS_DIR: &str = "/run/netns";
/// After its opening burst, the load goes on this many seconds.
const LOAD_SECONDS: u64 = 3;
/// After the load, how long the watchers wait for a first change still to come.
const LATE_CHANGE_WAIT: Duration = Duration::from_secs(2);
/// How long the daemon gets to roll everything back once the flows are gone.
const ROLLBACK_WAIT: Duration = Duration::from_secs(20);

/// A drill's load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// New UDP flows (one datagram each) to distinct loopback ports.
    UdpFlood,
    /// New TCP connections to a local listener, from distinct loopback addresses.
    TcpFlood,
    /// Both at once, half the pace each.
    Mixed,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::UdpFlood => "udp-flood",
            Scenario::TcpFlood => "tcp-flood",
            Scenario::Mixed => "mixed",
        }
    }

    /// The loads of this scenario against a table of `table_max` entries, starting now:
    /// a burst that overfills the table at once (faster than any poll, so the kernel's
    /// table-full message comes before ctguard can see the ratio rise), then a steady
    /// flow of new flows for [`LOAD_SECONDS`].
    pub fn loads(self, table_max: u64) -> Vec<Load> {
        let burst = table_max + table_max / 8;
        let rate = (table_max / 2).max(1);
        // Bounded twice: by count, and a deadline with slack for a slow machine.
        let deadline = Instant::now() + Duration::from_secs(LOAD_SECONDS * 2);
        let load = |protocol, share| Load {
            protocol,
            first_flow: 0,
            flows: (burst + rate * LOAD_SECONDS) / share,
            burst: burst / share,
            rate: Some(rate / share),
            deadline,
        };
        match self {
            Scenario::UdpFlood => vec![load(Protocol::Udp, 1)],
            Scenario::TcpFlood => vec![load(Protocol::Tcp, 1)],
            Scenario::Mixed => vec![load(Protocol::Udp, 2), load(Protocol::Tcp, 2)],
        }
    }
}

/// How a drill was asked to run.
#[derive(Debug, Clone)]
pub struct DrillOptions {
    /// A policy whose stages the drill uses (with the drill's timings); `None` for
    /// `policies/drill.toml`.
    pub policy: Option<PathBuf>,
    pub scenario: Scenario,
    /// Whether the drill (and the daemon) may change the global knobs.
    pub allow_global: bool,
    /// Record problems in the report and carry on, instead of stopping at the first.
    pub keep_going: bool,
    /// Whether to run the baseline (without ctguard) first.
    pub baseline: bool,
    /// The `ctguard` binary to run as the daemon.
    pub exe: PathBuf,
}

/// Kernel counters and load figures of one run, in one namespace.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RunFigures {
    /// Flows the load made.
    pub flows_sent: u64,
    /// Flows the kernel refused.
    pub flows_failed: u64,
    /// Packets dropped: the kernel's `drop` plus `insert_failed`.
    pub drops: u64,
    /// Unreplied entries evicted to make room (`early_drop`): not a lost packet, a lost
    /// entry.
    pub early_drops: u64,
    /// The most entries seen in the table.
    pub peak_count: u64,
    /// From the start of the load to the first refused flow.
    pub time_to_first_drop_ms: Option<f64>,
}

/// A change the daemon made, from its log and journal.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChangeMade {
    pub journal_entry: u64,
    pub knob: String,
    pub from: u64,
    pub to: u64,
    pub stage: String,
    /// The decision's reason, as the engine gave it.
    pub why: String,
    /// The journal entry's state when the daemon stopped (`reverted` after a rollback).
    pub final_state: String,
}

/// A change the daemon was not allowed to make in this drill, as the engine plans it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SimulatedChange {
    pub stage: String,
    pub knob: String,
    pub from: u64,
    pub to: u64,
    pub why: String,
}

/// What a drill found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DrillReport {
    pub scenario: Scenario,
    pub global_allowed: bool,
    /// The table max the load was sized against.
    pub table_max: u64,
    /// From the start of the load (with ctguard) to the first dropped flow.
    pub time_to_first_drop_ms: Option<f64>,
    /// From the start of the load to the first table-full record in `/dev/kmsg`.
    pub first_table_full_ms: Option<f64>,
    /// From the start of the load to the first increase of the drop counters.
    pub first_drop_counter_ms: Option<f64>,
    /// From the start of the load to the first changed sysctl.
    pub first_change_ms: Option<f64>,
    /// From the first kernel signal (table-full record or drop counter, whichever came
    /// first) to the first changed sysctl.
    pub first_signal_to_change_ms: Option<f64>,
    /// By the daemon's own log clock: from its first logged kernel event to its first
    /// change (splits the latency into waking up and acting).
    pub daemon_kernel_event_to_change_ms: Option<f64>,
    pub drops_with: u64,
    pub drops_without: Option<u64>,
    pub with_ctguard: RunFigures,
    pub without_ctguard: Option<RunFigures>,
    pub changes: Vec<ChangeMade>,
    pub simulated: Vec<SimulatedChange>,
    /// Every conntrack sysctl and the namespace's ruleset are as before the daemon ran.
    pub rollback_exact: bool,
    /// What differed, when the rollback was not exact.
    pub rollback_differences: Vec<String>,
    /// Problems recorded under `--keep-going`.
    pub problems: Vec<String>,
    pub duration_ms: f64,
}

impl DrillReport {
    /// Whether the drill passed: the daemon changed something, rolled back exactly, and
    /// nothing went wrong on the way.
    pub fn passed(&self) -> bool {
        self.rollback_exact && self.problems.is_empty() && !self.changes.is_empty()
    }

    /// The short report for a terminal.
    pub fn human(&self) -> String {
        let ms = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{v:.1} ms"));
        let mut out = format!(
            "ctguard drill: {} (table max {}, global knobs {})\n",
            self.scenario.name(),
            self.table_max,
            if self.global_allowed {
                "changed and restored"
            } else {
                "untouched"
            }
        );
        out += &format!(
            "  first drop {} after the load started; table-full record at {}, drop counter at {}\n",
            ms(self.time_to_first_drop_ms),
            ms(self.first_table_full_ms),
            ms(self.first_drop_counter_ms),
        );
        out += &format!(
            "  first change {} after the first kernel signal\n",
            ms(self.first_signal_to_change_ms)
        );
        let without = self
            .drops_without
            .map_or("not measured".to_string(), |d| d.to_string());
        out += &format!(
            "  dropped packets: {} with ctguard, {} without\n",
            self.drops_with, without
        );
        for c in &self.changes {
            out += &format!(
                "  changed {} {} → {} ({}, now {}): {}\n",
                c.knob, c.from, c.to, c.stage, c.final_state, c.why
            );
        }
        for s in &self.simulated {
            out += &format!(
                "  simulated {} {} → {} ({}): {}\n",
                s.knob, s.from, s.to, s.stage, s.why
            );
        }
        out += &format!(
            "  rollback exact: {}\n",
            if self.rollback_exact { "yes" } else { "NO" }
        );
        for d in &self.rollback_differences {
            out += &format!("    {d}\n");
        }
        for p in &self.problems {
            out += &format!("  problem: {p}\n");
        }
        out += &format!("  took {:.1} s\n", self.duration_ms / 1000.0);
        out
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DrillError {
    #[error("interrupted; the drill cleaned up after itself")]
    Interrupted,
    #[error("{step}: {message}")]
    Step { step: &'static str, message: String },
}

/// Wraps an error as the failure of one step of the drill.
fn at<E: std::fmt::Display>(step: &'static str) -> impl FnOnce(E) -> DrillError {
    move |e| DrillError::Step {
        step,
        message: e.to_string(),
    }
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn note_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// Makes SIGINT and SIGTERM set the drill's interrupt flag instead of ending the process,
/// so that its guards clean up.
pub fn catch_interrupts() -> Result<(), DrillError> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let action = SigAction::new(
        SigHandler::Handler(note_interrupt),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { sigaction(signal, &action) }.map_err(at("installing signal handlers"))?;
    }
    Ok(())
}

fn check_interrupt() -> Result<(), DrillError> {
    if INTERRUPTED.load(Ordering::Relaxed) {
        Err(DrillError::Interrupted)
    } else {
        Ok(())
    }
}

/// Sleeps `duration`, or less when interrupted.
fn sleep(duration: Duration) -> Result<(), DrillError> {
    let end = Instant::now() + duration;
    while Instant::now() < end {
        check_interrupt()?;
        std::thread::sleep((end - Instant::now()).min(Duration::from_millis(50)));
    }
    check_interrupt()
}

/// Polls `check` every 100 ms until it holds or `limit` passes; says whether it held.
fn wait_until(limit: Duration, mut check: impl FnMut() -> bool) -> Result<bool, DrillError> {
    let end = Instant::now() + limit;
    loop {
        if check() {
            return Ok(true);
        }
        if Instant::now() >= end {
            return Ok(false);
        }
        sleep(Duration::from_millis(100))?;
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}

fn ms_since(start: Instant, at: Option<Instant>) -> Option<f64> {
    at.map(|at| ms(at.saturating_duration_since(start)))
}

/// The policy text a drill runs with: `policies/drill.toml`, or `user` with the drill's
/// timings laid over it (see that file's header). The result is validated.
pub fn drill_policy_text(user: Option<(&str, &str)>) -> Result<String, DrillError> {
    let Some((text, source)) = user else {
        return Ok(DRILL_POLICY.to_string());
    };
    let mut table: toml::Table = text.parse().map_err(at("reading the policy"))?;
    let drill: toml::Table = DRILL_POLICY.parse().map_err(at("the drill policy"))?;
    table.insert("mode".into(), drill["mode"].clone());
    for key in ["poll", "backoff", "rate_limit"] {
        table.insert(key.into(), drill[key].clone());
    }
    for (path, key) in [
        (&["levels", "warn"][..], "sustain"),
        (&["levels", "act"], "sustain"),
        (&["levels", "critical"], "sustain"),
        (&["stages", "raise_limits"], "cooldown"),
        (&["stages", "raise_limits"], "bucket_change_interval"),
        (&["stages", "shorten_timeouts"], "cooldown"),
        (&["rollback"], "recover_for"),
        (&["rollback"], "pause"),
        (&["rollback"], "rollback_on_exit"),
    ] {
        let from = lookup(&drill, path).and_then(|t| t.get(key)).cloned();
        if let (Some(value), Some(to)) = (from, lookup_mut(&mut table, path)) {
            to.insert(key.into(), value);
        }
    }
    // Later stages keep their own cooldowns, shortened to the drill's longest.
    for stage in ["notrack_hot_ports", "evict"] {
        if let Some(t) = lookup_mut(&mut table, &["stages", stage]) {
            t.insert("cooldown".into(), "1s".into());
        }
    }
    let merged = toml::to_string(&table).map_err(at("writing the drill policy"))?;
    Policy::from_toml(&merged, &format!("{source} (drill timings)"))
        .map_err(at("the policy with drill timings"))?;
    Ok(merged)
}

/// `text` with the `raise_limits` stage disabled: the daemon's policy when the drill may
/// not change global knobs.
pub fn without_raise(text: &str) -> Result<String, DrillError> {
    let mut table: toml::Table = text.parse().map_err(at("reading the drill policy"))?;
    if let Some(stage) = lookup_mut(&mut table, &["stages", "raise_limits"]) {
        stage.insert("enabled".into(), false.into());
    }
    toml::to_string(&table).map_err(at("writing the drill policy"))
}

fn lookup<'a>(table: &'a toml::Table, path: &[&str]) -> Option<&'a toml::Table> {
    path.iter()
        .try_fold(table, |t, key| t.get(*key)?.as_table())
}

fn lookup_mut<'a>(table: &'a mut toml::Table, path: &[&str]) -> Option<&'a mut toml::Table> {
    path.iter()
        .try_fold(table, |t, key| t.get_mut(*key)?.as_table_mut())
}

/// A network namespace the drill made, bound at `/run/netns/NAME`; deleted on drop.
pub struct ScratchNetns {
    pub name: String,
    pub path: PathBuf,
}

impl ScratchNetns {
    /// Makes the namespace, brings its loopback up and loads `ruleset` (an nftables rule
    /// that needs tracking, so tracking is active).
    pub fn create(name: &str, ruleset: &str) -> Result<ScratchNetns, DrillError> {
        std::fs::create_dir_all(NETNS_DIR).map_err(at(NETNS_DIR))?;
        let path = Path::new(NETNS_DIR).join(name);
        File::create_new(&path).map_err(at("creating the namespace mount point"))?;
        let netns = ScratchNetns {
            name: name.to_string(),
            path,
        };
        let target = netns.path.clone();
        std::thread::scope(|scope| {
            scope
                .spawn(move || -> nix::Result<()> {
                    // This thread alone moves to the new namespace; the bind mount keeps
                    // the namespace alive after the thread ends.
                    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)?;
                    nix::mount::mount(
                        Some("/proc/thread-self/ns/net"),
                        &target,
                        None::<&str>,
                        nix::mount::MsFlags::MS_BIND,
                        None::<&str>,
                    )
                })
                .join()
                .unwrap_or(Err(nix::errno::Errno::EIO))
        })
        .map_err(at("making a network namespace"))?;
        netns
            .inside(loopback_up)?
            .map_err(at("bringing loopback up"))?;
        netns.nft(&["-f", "-"], Some(ruleset))?;
        Ok(netns)
    }

    /// Runs `f` on a thread inside the namespace.
    pub fn inside<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, DrillError> {
        crate::netns::run_in(&self.path, f).map_err(at("entering the namespace"))
    }

    /// Runs `nft ARGS` inside the namespace (spawned from a thread there), with `input`
    /// on its stdin; returns its stdout.
    pub fn nft(&self, args: &[&str], input: Option<&str>) -> Result<String, DrillError> {
        let output = self
            .inside(|| {
                let mut child = Command::new("nft")
                    .args(args)
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()?;
                if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
                    stdin.write_all(text.as_bytes())?;
                }
                child.wait_with_output()
            })?
            .map_err(at("running nft (install nftables)"))?;
        if !output.status.success() {
            return Err(DrillError::Step {
                step: "nft",
                message: String::from_utf8_lossy(&output.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    pub fn inode(&self) -> Result<u64, DrillError> {
        crate::netns::inode_of(&self.path).map_err(at("reading the namespace inode"))
    }

    /// Deletes every entry of the namespace's table over ctnetlink (as `conntrack -F`).
    pub fn flush_table(&self) -> Result<(), DrillError> {
        use crate::observe::ctnetlink::{NetlinkSocket, errno_message};
        self.inside(|| -> Result<(), String> {
            let mut socket = NetlinkSocket::open_ctnetlink().map_err(|e| e.to_string())?;
            let sequence = socket.send(flush_request)?;
            let reply = socket.receive().map_err(|e| e.to_string())?;
            match ack_errno(reply, sequence) {
                Some(0) => Ok(()),
                Some(errno) => Err(errno_message(errno)),
                None => Err("expected an acknowledgement from ctnetlink".into()),
            }
        })?
        .map_err(at("flushing the namespace's table"))
    }
}

impl Drop for ScratchNetns {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.path, nix::mount::MntFlags::MNT_DETACH);
        if let Err(e) = std::fs::remove_file(&self.path) {
            eprintln!("ctguard drill: removing {}: {e}", self.path.display());
        }
    }
}

/// `IPCTNL_MSG_CT_DELETE` without a tuple: flush the table (all families).
fn flush_request(sequence: u32) -> Vec<u8> {
    const NFNL_SUBSYS_CTNETLINK: u16 = 1;
    const IPCTNL_MSG_CT_DELETE: u16 = 2;
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
    let mut message = Vec::with_capacity(20);
    message.extend_from_slice(&20u32.to_ne_bytes());
    message.extend_from_slice(&(NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_DELETE).to_ne_bytes());
    message.extend_from_slice(&flags.to_ne_bytes());
    message.extend_from_slice(&sequence.to_ne_bytes());
    message.extend_from_slice(&0u32.to_ne_bytes());
    // nfgenmsg: AF_UNSPEC, NFNETLINK_V0, resource id 0.
    message.extend_from_slice(&[0, 0, 0, 0]);
    message
}

/// The errno of a netlink acknowledgement for `sequence` (0: success), if `reply` is one.
fn ack_errno(reply: &[u8], sequence: u32) -> Option<i32> {
    let field = |at: usize, len: usize| reply.get(at..at + len);
    let kind = u16::from_ne_bytes(field(4, 2)?.try_into().ok()?);
    let seq = u32::from_ne_bytes(field(8, 4)?.try_into().ok()?);
    let error = i32::from_ne_bytes(field(16, 4)?.try_into().ok()?);
    (kind == libc::NLMSG_ERROR as u16 && seq == sequence).then_some(-error)
}

/// Sets IFF_UP on `lo` in the calling thread's namespace.
fn loopback_up() -> std::io::Result<()> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").or_else(|_| {
        // Loopback is down, so 127.0.0.1 may not be bindable yet: any socket will do.
        std::net::UdpSocket::bind("0.0.0.0:0")
    })?;
    use std::os::fd::AsRawFd;
    // SAFETY: ifreq is plain data; zeroed is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(b"lo\0") {
        *slot = *byte as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the ifreq we pass.
    unsafe {
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &request) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The rule that makes the kernel track connections in a drill namespace.
const TRACKING_RULESET: &str = "table inet ctguard_drill {\n\
    \tchain input {\n\
    \t\ttype filter hook input priority 0;\n\
    \t\tct state established,related accept\n\
    \t}\n\
    }\n";

fn global_path(knob: Knob) -> PathBuf {
    Path::new(NETFILTER_SYSCTLS).join(knob.sysctl_file())
}

fn read_number(path: &Path) -> Result<u64, DrillError> {
    let text = std::fs::read_to_string(path).map_err(|e| DrillError::Step {
        step: "reading a sysctl",
        message: format!("{}: {e}", path.display()),
    })?;
    text.trim().parse().map_err(|e| DrillError::Step {
        step: "reading a sysctl",
        message: format!("{}: expected a number, got {:?}: {e}", path.display(), text),
    })
}

/// The host lock and the global knobs as they were; restores them on drop when the drill
/// may change them (and never writes anything when it may not).
struct HostGlobals {
    _lock: File,
    saved: Vec<(Knob, u64)>,
    restore: bool,
}

impl HostGlobals {
    fn lock_and_save(allow_global: bool) -> Result<HostGlobals, DrillError> {
        let lock = lock_host()?;
        let saved = [Knob::Max, Knob::Buckets]
            .into_iter()
            .map(|knob| Ok((knob, read_number(&global_path(knob))?)))
            .collect::<Result<_, DrillError>>()?;
        Ok(HostGlobals {
            _lock: lock,
            saved,
            restore: allow_global,
        })
    }

    fn saved(&self, knob: Knob) -> u64 {
        self.saved
            .iter()
            .find(|(k, _)| *k == knob)
            .map_or(0, |(_, v)| *v)
    }

    /// Lowers max for the drill (only with `--allow-global`), never below four times the
    /// entries the host itself tracks; returns the max the drill works against.
    fn set_drill_max(&self) -> Result<u64, DrillError> {
        let original = self.saved(Knob::Max);
        if !self.restore {
            return Ok(original);
        }
        let host_count = read_number(&Path::new(NETFILTER_SYSCTLS).join("nf_conntrack_count"))?;
        let max = DRILL_MAX.max(host_count.saturating_mul(4));
        if max >= original {
            return Ok(original);
        }
        std::fs::write(global_path(Knob::Max), max.to_string())
            .map_err(at("lowering nf_conntrack_max for the drill"))?;
        Ok(max)
    }
}

impl Drop for HostGlobals {
    fn drop(&mut self) {
        if !self.restore {
            return;
        }
        for (knob, value) in &self.saved {
            let path = global_path(*knob);
            let live = std::fs::read_to_string(&path).ok();
            if live.as_deref().map(str::trim) == Some(value.to_string().as_str()) {
                continue;
            }
            if let Err(e) = std::fs::write(&path, value.to_string()) {
                eprintln!(
                    "ctguard drill: RESTORE FAILED {}: {e} (was {value})",
                    path.display()
                );
            }
        }
    }
}

/// Takes [`HOST_LOCK`], or the caller's inherited descriptor of it
/// ([`HOST_LOCK_FD_ENV`]), waiting while another drill or kernel test holds it.
fn lock_host() -> Result<File, DrillError> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let file = match std::env::var(HOST_LOCK_FD_ENV)
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
    {
        // A duplicate shares the caller's locked open file (so locking it succeeds at
        // once) and can be closed without releasing the caller's lock.
        Some(fd) => {
            // SAFETY: dup of a descriptor number; failure is checked.
            let copy = unsafe { libc::dup(fd) };
            if copy < 0 {
                return Err(at(HOST_LOCK_FD_ENV)(std::io::Error::last_os_error()));
            }
            // SAFETY: `copy` is a fresh descriptor that nothing else owns.
            unsafe { File::from_raw_fd(copy) }
        }
        None => std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(HOST_LOCK)
            .map_err(at(HOST_LOCK))?,
    };
    let mut told = false;
    loop {
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(file);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(at(HOST_LOCK)(e));
        }
        if !told {
            eprintln!("ctguard drill: waiting for {HOST_LOCK} (kernel tests or another drill)");
            told = true;
        }
        sleep(Duration::from_millis(100))?;
    }
}

/// Every conntrack sysctl: the global ones as seen from ctguard's namespace, and all of
/// the namespace's own (except the entry count), by `global:`/`netns:` name.
fn snapshot(netns: &ScratchNetns) -> Result<BTreeMap<String, String>, DrillError> {
    let mut all = BTreeMap::new();
    for knob in [Knob::Max, Knob::Buckets] {
        let path = global_path(knob);
        all.insert(
            format!("global:{}", knob.sysctl_file()),
            std::fs::read_to_string(&path)
                .map_err(at("reading a global sysctl"))?
                .trim()
                .to_string(),
        );
    }
    let inside = netns.inside(|| -> std::io::Result<Vec<(String, String)>> {
        let mut values = Vec::new();
        for entry in std::fs::read_dir(NETFILTER_SYSCTLS)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with("nf_conntrack_") || name == "nf_conntrack_count" {
                continue;
            }
            // Some files are write-only or unreadable here; what can be read is compared.
            if let Ok(value) = std::fs::read_to_string(entry.path()) {
                values.push((name, value.trim().to_string()));
            }
        }
        Ok(values)
    })?;
    for (name, value) in inside.map_err(at("reading the namespace's sysctls"))? {
        all.insert(format!("netns:{name}"), value);
    }
    Ok(all)
}

/// What differs between two snapshots, one line per name.
pub fn differences(
    before: &BTreeMap<String, String>,
    after: &BTreeMap<String, String>,
) -> Vec<String> {
    let names: std::collections::BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    names
        .into_iter()
        .filter(|name| before.get(*name) != after.get(*name))
        .map(|name| {
            let show = |v: Option<&String>| v.map_or("(absent)".to_string(), Clone::clone);
            format!(
                "{name}: {} before, {} after",
                show(before.get(name)),
                show(after.get(name))
            )
        })
        .collect()
}

/// When the kernel first signalled trouble and ctguard first changed something.
#[derive(Debug, Default, Clone, Copy)]
struct Signals {
    table_full: Option<Instant>,
    drop_counter: Option<Instant>,
    change: Option<Instant>,
    peak_count: u64,
}

impl Signals {
    fn first_signal(&self) -> Option<Instant> {
        match (self.table_full, self.drop_counter) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// Why a drill saw no kernel signal to time the daemon against: the load fell short of
/// the max, or it reached it and the kernel evicted unreplied entries (`early_drop`)
/// instead of dropping packets.
fn no_signal_problem(run: &RunFigures, table_max: u64) -> String {
    if run.peak_count < table_max {
        return format!(
            "the kernel never signalled a full table: the load did not fill it \
             (peak {} of max {table_max})",
            run.peak_count
        );
    }
    format!(
        "the kernel never signalled a full table: the load filled it (peak {} of max \
         {table_max}) but the kernel evicted {} unreplied entries (early_drop) instead of \
         dropping packets; with --allow-global the drill lowers max to {DRILL_MAX}, where \
         the load overflows it",
        run.peak_count, run.early_drops
    )
}

fn packet_drops(stats: &ConntrackStats) -> u64 {
    stats.drop + stats.insert_failed
}

/// Whether any knob a daemon may change differs between two samples.
fn knobs_differ(a: &ConntrackSample, b: &ConntrackSample) -> bool {
    a.max != b.max || a.buckets != b.buckets || a.timeouts != b.timeouts
}

/// Runs the scenario's loads in `netns` while watching `/dev/kmsg` and (every 1 ms) the
/// namespace's sysctls and counters. Returns the load reports and what the watchers saw.
fn watched_load(
    netns: &ScratchNetns,
    loads: &[Load],
) -> Result<(Vec<LoadReport>, Signals, ConntrackSample), DrillError> {
    let inode = netns.inode()?;
    let mut sampler = Sampler::open(Some(&netns.path)).map_err(at("sampling the namespace"))?;
    let before = sampler.read().map_err(at("sampling the namespace"))?;
    let stop = AtomicBool::new(false);
    let changed = AtomicBool::new(false);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let result = std::thread::scope(|scope| {
        let kmsg = scope.spawn(|| first_table_full(inode, &stop, ready_tx));
        let sysctls = scope.spawn(|| watch_sysctls(&mut sampler, &before, &stop, &changed));
        // The follower must be at the end of the log before the first packet is sent.
        let _ = ready_rx.recv_timeout(Duration::from_secs(2));
        let loaded = netns.inside(|| run_loads(loads));
        // A change may come just after the last flow: give the daemon a moment.
        let end = Instant::now() + LATE_CHANGE_WAIT;
        while Instant::now() < end
            && !changed.load(Ordering::Relaxed)
            && !INTERRUPTED.load(Ordering::Relaxed)
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        stop.store(true, Ordering::Relaxed);
        let table_full = kmsg.join().unwrap_or(None);
        let mut signals = sysctls.join().unwrap_or_default();
        signals.table_full = table_full;
        (loaded, signals)
    });
    check_interrupt()?;
    let (loaded, signals) = result;
    let reports = loaded?.map_err(at("running the load"))?;
    let after = sampler.read().map_err(at("sampling the namespace"))?;
    let mut counters = after.clone();
    counters.stats = match (before.stats, after.stats) {
        (Some(b), Some(a)) => Some(ConntrackStats {
            drop: a.drop.saturating_sub(b.drop),
            insert_failed: a.insert_failed.saturating_sub(b.insert_failed),
            early_drop: a.early_drop.saturating_sub(b.early_drop),
            ..a
        }),
        _ => None,
    };
    Ok((reports, signals, counters))
}

/// Runs every load at once, each on its own thread (inside the caller's namespace).
fn run_loads(loads: &[Load]) -> std::io::Result<Vec<LoadReport>> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = loads
            .iter()
            .map(|load| scope.spawn(|| crate::loadgen::run(load, &INTERRUPTED)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(std::io::Error::other("load thread panicked")))
            })
            .collect()
    })
}

/// Follows `/dev/kmsg` from now until `stop`; the time the first table-full record for the
/// namespace `inode` (or for no namespace, as older kernels print it) was read.
fn first_table_full(
    inode: u64,
    stop: &AtomicBool,
    ready: std::sync::mpsc::Sender<()>,
) -> Option<Instant> {
    use crate::observe::kmsg_follower::KmsgFollower;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    runtime.block_on(async {
        let follower = KmsgFollower::open();
        let _ = ready.send(());
        let mut follower = follower.ok()?;
        while !stop.load(Ordering::Relaxed) {
            let next = tokio::time::timeout(Duration::from_millis(20), follower.next_event());
            if let Ok(Ok(record)) = next.await
                && let KernelEvent::TableFull { netns } = record.event
                && netns.is_none_or(|n| n == inode)
            {
                return Some(Instant::now());
            }
        }
        None
    })
}

/// Reads the namespace's sysctls and counters every millisecond until `stop`; sets
/// `changed` at the first changed knob.
fn watch_sysctls(
    sampler: &mut Sampler,
    before: &ConntrackSample,
    stop: &AtomicBool,
    changed: &AtomicBool,
) -> Signals {
    let mut signals = Signals::default();
    let drops_before = before.stats.as_ref().map_or(0, packet_drops);
    let mut sample = before.clone();
    while !stop.load(Ordering::Relaxed) {
        if sampler.read_into(&mut sample).is_ok() {
            let now = Instant::now();
            signals.peak_count = signals.peak_count.max(sample.count);
            if signals.drop_counter.is_none()
                && sample.stats.as_ref().map_or(0, packet_drops) > drops_before
            {
                signals.drop_counter = Some(now);
            }
            if signals.change.is_none() && knobs_differ(&sample, before) {
                signals.change = Some(now);
                changed.store(true, Ordering::Relaxed);
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    signals
}

fn figures(reports: &[LoadReport], signals: &Signals, counters: &ConntrackSample) -> RunFigures {
    let stats = counters.stats.unwrap_or_default();
    let started = reports.iter().map(|r| r.started).min();
    let first_failure = reports.iter().filter_map(|r| r.first_failure).min();
    RunFigures {
        flows_sent: reports.iter().map(|r| r.sent).sum(),
        flows_failed: reports.iter().map(|r| r.failed).sum(),
        drops: packet_drops(&stats),
        early_drops: stats.early_drop,
        peak_count: signals.peak_count.max(counters.count),
        time_to_first_drop_ms: started.and_then(|s| ms_since(s, first_failure)),
    }
}

/// A `ctguard run` child; stopped (SIGTERM, then SIGKILL) on drop.
struct DaemonProcess {
    child: Option<Child>,
    log: PathBuf,
}

impl DaemonProcess {
    fn spawn(
        exe: &Path,
        netns: &ScratchNetns,
        policy: &Path,
        state: &Path,
    ) -> Result<DaemonProcess, DrillError> {
        let log = state.join("daemon.log");
        let log_file = File::create(&log).map_err(at("creating the daemon log"))?;
        let child = Command::new(exe)
            .args(["--log-format", "json", "run", "--netns"])
            .arg(&netns.path)
            .arg("--policy")
            .arg(policy)
            .arg("--state-dir")
            .arg(state.join("state"))
            .env("CTGUARD_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .map_err(at("starting ctguard run"))?;
        Ok(DaemonProcess {
            child: Some(child),
            log,
        })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The end of the log, for problem reports.
    fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }

    fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Stops the daemon (it rolls back what is left on SIGTERM); says whether it exited
    /// cleanly within 15 s.
    fn stop(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return false;
        };
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let end = Instant::now() + Duration::from_secs(15);
        while Instant::now() < end {
            if let Ok(Some(status)) = child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
    }
}

/// A directory removed (with its contents) on drop.
struct ScratchDir(PathBuf);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The changes a daemon's JSON log reports (`changed` lines, each with the reason of the
/// decision before it), with each journal entry's final state from `journal`.
pub fn changes_from_log(log: &str, final_state: impl Fn(u64) -> String) -> Vec<ChangeMade> {
    let mut changes = Vec::new();
    let mut decision: Option<(String, String)> = None;
    for line in log.lines() {
        let Ok(record) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let fields = &record["fields"];
        let text = |key: &str| fields[key].as_str().unwrap_or_default().to_string();
        match fields["message"].as_str() {
            Some("decision") => decision = Some((text("stage"), text("reason"))),
            Some("changed") => {
                let (stage, why) = decision.clone().unwrap_or_default();
                let entry = fields["entry"].as_u64().unwrap_or(0);
                changes.push(ChangeMade {
                    journal_entry: entry,
                    knob: text("knob"),
                    from: fields["from"].as_u64().unwrap_or(0),
                    to: fields["to"].as_u64().unwrap_or(0),
                    stage,
                    why,
                    final_state: final_state(entry),
                });
            }
            _ => {}
        }
    }
    changes
}

/// From the first `kernel` line of a daemon's JSON log to its first `changed` line, by
/// the log's own timestamps.
pub fn kernel_event_to_change_ms(log: &str) -> Option<f64> {
    let time_of = |message: &str| {
        log.lines().find_map(|line| {
            let record: serde_json::Value = serde_json::from_str(line).ok()?;
            (record["fields"]["message"] == message)
                .then(|| humantime::parse_rfc3339_weak(record["timestamp"].as_str()?).ok())
                .flatten()
        })
    };
    let kernel = time_of("kernel")?;
    let change = time_of("changed")?;
    change.duration_since(kernel).ok().map(ms)
}

/// What `raise_limits` would do with a full table, for a drill that may not do it.
fn simulated_raise(
    policy: &Policy,
    host: &HostMemory,
    sample: &ConntrackSample,
) -> Vec<SimulatedChange> {
    let stage = &policy.stages.raise_limits;
    if !stage.common.enabled {
        return Vec::new();
    }
    let plan = plan_raise(stage, host, sample.max, sample.max, sample.buckets, true);
    plan.changes
        .iter()
        .map(|change| SimulatedChange {
            stage: "raise_limits".into(),
            knob: change.knob.to_string(),
            from: change.from,
            to: change.to,
            why: format!(
                "--allow-global not given: with the table full, plan_raise would {}",
                plan.describe()
            ),
        })
        .collect()
}

/// Runs one drill. Guards undo everything it did on every way out.
pub fn run(options: &DrillOptions) -> Result<DrillReport, DrillError> {
    let started = Instant::now();
    check_interrupt()?;
    let user_policy = match &options.policy {
        Some(path) => Some((
            std::fs::read_to_string(path).map_err(|e| DrillError::Step {
                step: "reading the policy",
                message: format!("{}: {e}", path.display()),
            })?,
            path.display().to_string(),
        )),
        None => None,
    };
    let policy_text =
        drill_policy_text(user_policy.as_ref().map(|(t, s)| (t.as_str(), s.as_str())))?;
    let policy = Policy::from_toml(&policy_text, "drill policy").map_err(at("the drill policy"))?;
    let daemon_policy_text = if options.allow_global {
        policy_text.clone()
    } else {
        without_raise(&policy_text)?
    };

    let mut problems = Vec::new();
    let mut problem = |text: String| -> Result<(), DrillError> {
        if options.keep_going {
            problems.push(text);
            Ok(())
        } else {
            Err(DrillError::Step {
                step: "drill",
                message: text,
            })
        }
    };

    let globals = HostGlobals::lock_and_save(options.allow_global)?;
    if !options.allow_global && globals.saved(Knob::Max) > FILL_BOUND {
        return Err(DrillError::Step {
            step: "sizing the load",
            message: format!(
                "the host's nf_conntrack_max is {}, more than a drill fills safely ({FILL_BOUND}); \
                 run with --allow-global (the drill lowers it to {DRILL_MAX} and restores it)",
                globals.saved(Knob::Max)
            ),
        });
    }
    let table_max = globals.set_drill_max()?;
    let pid = std::process::id();

    let without_ctguard = if options.baseline {
        let netns =
            ScratchNetns::create(&format!("ctguard-drill-{pid}-baseline"), TRACKING_RULESET)?;
        let (reports, signals, counters) =
            watched_load(&netns, &options.scenario.loads(table_max))?;
        drop(netns);
        // The next table-full message must be printed, not rate limited away.
        let cost = read_number(Path::new("/proc/sys/net/core/message_cost")).unwrap_or(5);
        sleep(Duration::from_secs(cost) + Duration::from_millis(500))?;
        Some(figures(&reports, &signals, &counters))
    } else {
        None
    };

    let netns = ScratchNetns::create(&format!("ctguard-drill-{pid}"), TRACKING_RULESET)?;
    let before = snapshot(&netns)?;
    let ruleset_before = netns.nft(&["list", "ruleset"], None)?;
    let scratch = ScratchDir(std::env::temp_dir().join(format!("ctguard-drill-{pid}")));
    std::fs::create_dir_all(&scratch.0).map_err(at("creating the drill's state directory"))?;
    let policy_path = scratch.0.join("policy.toml");
    std::fs::write(&policy_path, &daemon_policy_text).map_err(at("writing the daemon policy"))?;
    let mut daemon = DaemonProcess::spawn(&options.exe, &netns, &policy_path, &scratch.0)?;
    let started_up = wait_until(Duration::from_secs(10), || {
        daemon.log().contains("ctguard starting")
    })?;
    if !started_up || !daemon.running() {
        return Err(DrillError::Step {
            step: "starting ctguard run",
            message: daemon.log_tail(),
        });
    }
    // Its first sample and its kernel-log follower are in place just after that line.
    sleep(Duration::from_millis(300))?;

    let (reports, signals, counters) = watched_load(&netns, &options.scenario.loads(table_max))?;
    let with_ctguard = figures(&reports, &signals, &counters);
    if signals.change.is_none() {
        problem(format!(
            "ctguard changed nothing during the load; its log ends:\n{}",
            daemon.log_tail()
        ))?;
    }
    if signals.first_signal().is_none() {
        problem(no_signal_problem(&with_ctguard, table_max))?;
    }

    // The flood is over: its flows go, and the daemon recovers and rolls back.
    netns.flush_table()?;
    let restored = wait_until(ROLLBACK_WAIT, || {
        snapshot(&netns).is_ok_and(|now| now == before)
    })?;
    if !restored {
        problem(format!(
            "not rolled back within {} s of the flood's end",
            ROLLBACK_WAIT.as_secs()
        ))?;
    }
    let clean_exit = daemon.stop();
    if !clean_exit {
        problem(format!(
            "ctguard run did not exit cleanly:\n{}",
            daemon.log_tail()
        ))?;
    }
    let after = snapshot(&netns)?;
    let ruleset_after = netns.nft(&["list", "ruleset"], None)?;
    let mut rollback_differences = differences(&before, &after);
    if ruleset_after != ruleset_before {
        rollback_differences.push(format!(
            "ruleset: before\n{ruleset_before}after\n{ruleset_after}"
        ));
    }

    let journal = Journal::open(&scratch.0.join("state")).ok();
    let daemon_log = daemon.log();
    let changes = changes_from_log(&daemon_log, |id| {
        journal
            .as_ref()
            .and_then(|j| j.entry(id))
            .map_or("unknown".into(), |e| e.state.name().into())
    });
    let simulated = if options.allow_global {
        Vec::new()
    } else {
        let full = ConntrackSample {
            count: table_max,
            max: table_max,
            buckets: Some(globals.saved(Knob::Buckets)),
            ..ConntrackSample::default()
        };
        let host = HostMemory::read().map_err(at("reading host memory"))?;
        simulated_raise(&policy, &host, &full)
    };
    let load_started = reports.iter().map(|r| r.started).min();
    let since_load = |at: Option<Instant>| load_started.and_then(|s| ms_since(s, at));
    let first_signal_to_change_ms = match (signals.first_signal(), signals.change) {
        (Some(signal), Some(change)) => Some(if change >= signal {
            ms(change - signal)
        } else {
            // The change came first (the fill ratio crossed a level before any drop).
            -ms(signal - change)
        }),
        _ => None,
    };
    drop(netns);
    drop(globals);
    Ok(DrillReport {
        scenario: options.scenario,
        global_allowed: options.allow_global,
        table_max,
        time_to_first_drop_ms: with_ctguard.time_to_first_drop_ms,
        first_table_full_ms: since_load(signals.table_full),
        first_drop_counter_ms: since_load(signals.drop_counter),
        first_change_ms: since_load(signals.change),
        first_signal_to_change_ms,
        daemon_kernel_event_to_change_ms: kernel_event_to_change_ms(&daemon_log),
        drops_with: with_ctguard.drops,
        drops_without: without_ctguard.as_ref().map(|f| f.drops),
        with_ctguard,
        without_ctguard,
        changes,
        simulated,
        rollback_exact: rollback_differences.is_empty(),
        rollback_differences,
        problems,
        duration_ms: ms(started.elapsed()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_policy_is_valid_and_fast() {
        let policy = Policy::from_toml(DRILL_POLICY, "drill.toml").unwrap();
        assert!(policy.stages.raise_limits.common.enabled);
        assert!(policy.poll.under_pressure <= Duration::from_millis(100));
        assert!(policy.rollback.recover_for <= Duration::from_secs(1));
    }

    #[test]
    fn a_user_policy_keeps_its_stages_and_gets_drill_timings() {
        let user = include_str!("../policies/default.toml");
        let text = drill_policy_text(Some((user, "default.toml"))).unwrap();
        let policy = Policy::from_toml(&text, "merged").unwrap();
        let default = Policy::embedded_default();
        assert_eq!(
            policy.stages.shorten_timeouts.timeouts,
            default.stages.shorten_timeouts.timeouts
        );
        assert_eq!(
            policy.stages.raise_limits.headroom,
            default.stages.raise_limits.headroom
        );
        assert_eq!(policy.rollback.recover_for, Duration::from_secs(1));
        assert_eq!(
            policy.stages.raise_limits.common.cooldown,
            Duration::from_millis(200)
        );
        assert_eq!(policy.levels.act.sustain, Duration::ZERO);
    }

    #[test]
    fn a_broken_user_policy_names_the_problem() {
        let err = drill_policy_text(Some(("mode = 3", "bad.toml"))).unwrap_err();
        assert!(err.to_string().contains("drill timings"), "{err}");
        assert!(drill_policy_text(Some(("[[[", "bad.toml"))).is_err());
    }

    #[test]
    fn without_raise_disables_only_that_stage() {
        let text = without_raise(DRILL_POLICY).unwrap();
        let policy = Policy::from_toml(&text, "no raise").unwrap();
        assert!(!policy.stages.raise_limits.common.enabled);
        assert!(policy.stages.shorten_timeouts.common.enabled);
    }

    #[test]
    fn loads_overfill_the_table_at_once_then_keep_coming() {
        for scenario in [Scenario::UdpFlood, Scenario::TcpFlood, Scenario::Mixed] {
            let loads = scenario.loads(8192);
            let burst: u64 = loads.iter().map(|l| l.burst).sum();
            let flows: u64 = loads.iter().map(|l| l.flows).sum();
            let rate: u64 = loads.iter().filter_map(|l| l.rate).sum();
            assert!(burst > 8192, "{scenario:?} must overfill at once: {burst}");
            assert!(
                flows >= burst + rate * 2,
                "{scenario:?} must go on: {flows}"
            );
            assert!(
                rate <= 8192,
                "{scenario:?} would outrun any raise: {rate}/s"
            );
            assert!(loads.iter().all(|l| l.deadline > Instant::now()));
        }
    }

    #[test]
    fn differences_name_each_changed_value() {
        let before = BTreeMap::from([
            ("global:nf_conntrack_max".to_string(), "8192".to_string()),
            (
                "netns:nf_conntrack_udp_timeout".to_string(),
                "30".to_string(),
            ),
        ]);
        let mut after = before.clone();
        assert!(differences(&before, &after).is_empty());
        after.insert("netns:nf_conntrack_udp_timeout".into(), "2".into());
        after.remove("global:nf_conntrack_max");
        assert_eq!(
            differences(&before, &after),
            [
                "global:nf_conntrack_max: 8192 before, (absent) after",
                "netns:nf_conntrack_udp_timeout: 30 before, 2 after",
            ]
        );
    }

    #[test]
    fn changes_are_read_from_the_daemon_log_with_their_reasons() {
        let log = concat!(
            r#"{"level":"INFO","fields":{"message":"ctguard starting"}}"#,
            "\n",
            r#"{"level":"INFO","fields":{"message":"decision","id":"d1","stage":"raise_limits","reason":"table full: raise max 8192 → 16384"}}"#,
            "\n",
            r#"{"level":"INFO","fields":{"message":"changed","entry":1,"knob":"net.netfilter.nf_conntrack_max","from":8192,"to":16384}}"#,
            "\n",
            "not json\n",
            r#"{"level":"INFO","fields":{"message":"decision","id":"d2","stage":"shorten_timeouts","reason":"shorten udp"}}"#,
            "\n",
            r#"{"level":"INFO","fields":{"message":"changed","entry":2,"knob":"net.netfilter.nf_conntrack_udp_timeout","from":30,"to":2}}"#,
            "\n",
        );
        let changes = changes_from_log(log, |id| format!("state-{id}"));
        assert_eq!(changes.len(), 2);
        assert_eq!(changes[0].stage, "raise_limits");
        assert_eq!(changes[0].why, "table full: raise max 8192 → 16384");
        assert_eq!((changes[0].from, changes[0].to), (8192, 16384));
        assert_eq!(changes[1].knob, "net.netfilter.nf_conntrack_udp_timeout");
        assert_eq!(changes[1].final_state, "state-2");
    }

    #[test]
    fn the_daemon_reaction_is_timed_by_its_own_log() {
        let log = concat!(
            r#"{"timestamp":"2025-01-01T00:00:00.100000Z","fields":{"message":"ctguard starting"}}"#,
            "\n",
            r#"{"timestamp":"2025-01-01T00:00:01.000000Z","fields":{"message":"kernel"}}"#,
            "\n",
            r#"{"timestamp":"2025-01-01T00:00:01.002500Z","fields":{"message":"changed"}}"#,
            "\n",
        );
        assert_eq!(kernel_event_to_change_ms(log), Some(2.5));
        assert_eq!(kernel_event_to_change_ms("{}\nnot json"), None);
    }

    #[test]
    fn flush_request_and_its_acknowledgement() {
        let request = flush_request(7);
        assert_eq!(request.len(), 20);
        assert_eq!(u16::from_ne_bytes([request[4], request[5]]), 0x0102);
        let mut ack = vec![0u8; 36];
        ack[4..6].copy_from_slice(&(libc::NLMSG_ERROR as u16).to_ne_bytes());
        ack[8..12].copy_from_slice(&7u32.to_ne_bytes());
        assert_eq!(ack_errno(&ack, 7), Some(0));
        assert_eq!(ack_errno(&ack, 8), None);
        ack[16..20].copy_from_slice(&(-libc::EPERM).to_ne_bytes());
        assert_eq!(ack_errno(&ack, 7), Some(libc::EPERM));
        assert_eq!(ack_errno(&ack[..10], 7), None);
    }

    #[test]
    fn no_signal_says_whether_the_table_filled() {
        let short = RunFigures {
            peak_count: 1000,
            ..RunFigures::default()
        };
        assert!(
            no_signal_problem(&short, 8192).contains("did not fill it (peak 1000 of max 8192)")
        );
        let evicted = RunFigures {
            peak_count: 262_145,
            early_drops: 155_217,
            ..RunFigures::default()
        };
        let text = no_signal_problem(&evicted, 262_144);
        assert!(text.contains("the load filled it"), "{text}");
        assert!(
            text.contains("evicted 155217 unreplied entries (early_drop)"),
            "{text}"
        );
        assert!(text.contains("--allow-global"), "{text}");
    }

    #[test]
    fn the_simulated_raise_says_why() {
        let policy = Policy::from_toml(DRILL_POLICY, "drill.toml").unwrap();
        let full = ConntrackSample {
            count: 8192,
            max: 8192,
            buckets: Some(2048),
            ..ConntrackSample::default()
        };
        let host = HostMemory {
            mem_total_bytes: 4 << 30,
            entry_bytes: 256,
            entry_bytes_source: crate::observe::memory::EntrySizeSource::Slabinfo,
            pointer_bits: 64,
        };
        let simulated = simulated_raise(&policy, &host, &full);
        assert_eq!(simulated[0].knob, "net.netfilter.nf_conntrack_max");
        assert_eq!((simulated[0].from, simulated[0].to), (8192, 16384));
        assert!(
            simulated[0].why.contains("--allow-global"),
            "{}",
            simulated[0].why
        );
        let mut off = policy.clone();
        off.stages.raise_limits.common.enabled = false;
        assert!(simulated_raise(&off, &host, &full).is_empty());
    }
}
