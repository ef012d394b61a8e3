//! The kernel lab: scratch network namespaces whose conntrack table a test may fill, and
//! guards that put global settings back even when a test fails (rules in shared LAB.md).

// Not every test module uses every lab helper.
#![allow(dead_code)]

use std::io::Write;
use std::net::{Ipv4Addr, TcpListener, TcpStream, UdpSocket};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Why kernel tests cannot run here, or `None` when they can.
pub fn unavailable_reason() -> Option<String> {
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Some(format!("not root (euid {euid})"));
    }
    if !Path::new("/proc/sys/net/netfilter/nf_conntrack_max").exists() {
        return Some("no connection tracking in this kernel".into());
    }
    if which("nft").is_none() {
        return Some("nft is not installed (.ci/run installs nftables)".into());
    }
    None
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(tool))
        .find(|p| p.exists())
}

/// Takes the host-wide kernel-test lock (released when the file is closed).
pub fn lock_host() -> std::fs::File {
    use std::os::fd::AsRawFd;
    let path = "/run/lock/ctguard-kernel-tests.lock";
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    // SAFETY: flock on a descriptor we own; blocks until other runs finish.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(rc, 0, "{path}: flock: {}", std::io::Error::last_os_error());
    file
}

/// Runs a command and fails the test with its stderr when it fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A network namespace made for one test, deleted on drop. Its loopback is up and an
/// nftables rule makes the kernel track connections in it (tracking starts only once a
/// rule needs it).
pub struct LabNetns {
    pub name: String,
    pub path: PathBuf,
}

impl LabNetns {
    pub fn new(tag: &str) -> LabNetns {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "ctg-{tag}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        run(Command::new("ip").args(["netns", "add", &name]));
        let lab = LabNetns {
            path: PathBuf::from("/run/netns").join(&name),
            name,
        };
        run(&mut lab.exec(&["ip", "link", "set", "lo", "up"]));
        lab.nft(
            "table inet lab {\n chain in {\n type filter hook input priority 0;\n ct state established,related accept\n }\n}\n",
        );
        lab
    }

    /// A command that runs inside the namespace.
    /// A lab whose UDP entries live `secs` (the kernel default is 30 s): short-lived
    /// flows keep the daemon tests short.
    pub fn with_udp_timeout(tag: &str, secs: u64) -> LabNetns {
        let lab = LabNetns::new(tag);
        lab.set_sysctl("nf_conntrack_udp_timeout", secs);
        lab
    }

    pub fn exec(&self, argv: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).args(argv);
        cmd
    }

    /// Loads an nftables ruleset fragment inside the namespace.
    pub fn nft(&self, ruleset: &str) {
        let mut child = self
            .exec(&["nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn nft");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(ruleset.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "nft: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The namespace inode, as the kernel prints it in `table full in netns N`.
    pub fn inode(&self) -> u64 {
        std::fs::metadata(&self.path).unwrap().ino()
    }

    /// Reads a per-namespace sysctl (e.g. `nf_conntrack_count`) from inside.
    pub fn sysctl(&self, file: &str) -> u64 {
        let path = format!("/proc/sys/net/netfilter/{file}");
        ctguard::netns::run_in(&self.path, || std::fs::read_to_string(&path))
            .unwrap()
            .unwrap_or_else(|e| panic!("{path}: {e}"))
            .trim()
            .parse()
            .unwrap()
    }

    /// Sets a per-namespace sysctl inside the namespace.
    pub fn set_sysctl(&self, file: &str, value: u64) {
        let path = format!("/proc/sys/net/netfilter/{file}");
        ctguard::netns::run_in(&self.path, || std::fs::write(&path, value.to_string()))
            .unwrap()
            .unwrap_or_else(|e| panic!("{path}: {e}"));
    }

    /// Fills the table with UDP flows on loopback until it holds `max` entries (or 10 s
    /// pass), then sends `extra` more datagrams that the kernel must drop. Returns the count.
    pub fn fill_table(&self, extra: u64) -> u64 {
        let max = read_global("nf_conntrack_max");
        let deadline = Instant::now() + Duration::from_secs(10);
        ctguard::netns::run_in(&self.path, || {
            ctguard::loadgen::fill_udp(0, max + extra, deadline)
        })
        .unwrap()
        .unwrap();
        self.sysctl("nf_conntrack_count")
    }
}

impl LabNetns {
    /// Lets the kernel drop expired entries now: reading the table collects them (the
    /// garbage collector alone may take a minute in an idle namespace).
    pub fn collect_expired(&self) {
        ctguard::netns::run_in(&self.path, || std::fs::read("/proc/net/nf_conntrack"))
            .unwrap()
            .unwrap();
    }

    /// Every conntrack sysctl this test could change, with the global ones: the state a
    /// rollback must restore value for value.
    pub fn snapshot(&self) -> std::collections::BTreeMap<String, u64> {
        let mut all = std::collections::BTreeMap::new();
        for global in ["nf_conntrack_max", "nf_conntrack_buckets"] {
            all.insert(global.to_string(), read_global(global));
        }
        for t in ctguard::knob::TimeoutKnob::ALL {
            all.insert(t.sysctl_file().to_string(), self.sysctl(t.sysctl_file()));
        }
        all
    }
}

/// Polls `check` every 50 ms until it holds or `limit` passes; says whether it held.
pub fn wait_until(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    check()
}

impl Drop for LabNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Reads a global conntrack sysctl from the initial namespace.
pub fn read_global(file: &str) -> u64 {
    let path = format!("/proc/sys/net/netfilter/{file}");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .trim()
        .parse()
        .unwrap()
}

/// Saves a global sysctl, sets it, and restores the saved value on drop, test failure
/// included.
pub struct GlobalSysctl {
    path: String,
    saved: String,
}

impl GlobalSysctl {
    pub fn set(file: &str, value: u64) -> GlobalSysctl {
        let path = format!("/proc/sys/net/netfilter/{file}");
        let saved = std::fs::read_to_string(&path).unwrap();
        if file == "nf_conntrack_max" {
            let host_count = read_global("nf_conntrack_count");
            assert!(
                value > host_count,
                "refusing to lower the host's max to {value}: it tracks {host_count} entries"
            );
        }
        std::fs::write(&path, value.to_string()).unwrap_or_else(|e| panic!("{path}: {e}"));
        GlobalSysctl { path, saved }
    }
}

impl Drop for GlobalSysctl {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(&self.path, self.saved.trim()) {
            eprintln!("RESTORE FAILED {}: {e}", self.path);
        }
    }
}

/// The globals a daemon test lets ctguard change, restored when dropped: max lowered to
/// 4096 so a namespace's table fills in an instant, and buckets as they are now.
pub fn small_table() -> [GlobalSysctl; 2] {
    [
        GlobalSysctl::set("nf_conntrack_max", 4096),
        GlobalSysctl::set("nf_conntrack_buckets", read_global("nf_conntrack_buckets")),
    ]
}

/// One UDP datagram from each of `count` source ports starting at `first_source` to
/// 127.0.0.1:`port`: one entry each (nothing listens; the entries stay unreplied).
pub fn udp_flows(first_source: u16, count: u16, port: u16) {
    for source in first_source..first_source + count {
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, source)).unwrap();
        socket
            .send_to(b"ctguard", (Ipv4Addr::LOCALHOST, port))
            .unwrap();
    }
}

/// `count` established connections to a listener on 127.0.0.1:8080, both ends kept open
/// (returned) so the entries stay ESTABLISHED while the test reads them.
pub fn tcp_flows(count: u16) -> Vec<(TcpStream, TcpStream)> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 8080)).unwrap();
    tcp_flows_to(&listener, count)
}

/// `count` established connections to `listener` (in the calling thread's namespace).
pub fn tcp_flows_to(listener: &TcpListener, count: u16) -> Vec<(TcpStream, TcpStream)> {
    let addr = listener.local_addr().unwrap();
    (0..count)
        .map(|_| {
            let client = TcpStream::connect(addr).unwrap();
            let (server, _) = listener.accept().unwrap();
            (client, server)
        })
        .collect()
}

/// The policy with lab-sized timings the daemon tests run with.
pub fn fast_policy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/daemon/fast-lab.toml")
}

/// The fast lab policy with some settings replaced, written next to the state dir.
pub fn policy_with(dir: &Path, edits: &[(&str, &str)]) -> PathBuf {
    let mut text = std::fs::read_to_string(fast_policy()).unwrap();
    for (from, to) in edits {
        assert!(text.contains(from), "{from} not in the fast policy");
        text = text.replace(from, to);
    }
    let path = dir.join("policy.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A running `ctguard`, killed if the test ends without stopping it.
pub struct Daemon {
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    pub fn start(cmd: &mut Command, log: PathBuf) -> Daemon {
        let file = std::fs::File::create(&log).unwrap();
        let child = cmd
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("start ctguard");
        Daemon {
            child: Some(child),
            log,
        }
    }

    pub fn run(args: &[&str], log: PathBuf) -> Daemon {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ctguard"));
        cmd.arg("run").args(args);
        Daemon::start(&mut cmd, log)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn wait_for_log(&self, text: &str, limit: Duration) -> bool {
        wait_until(limit, || self.log().contains(text))
    }

    /// Fails the test, with the log, unless the daemon says it started within 5 s.
    pub fn assert_started(&self) {
        assert!(
            self.wait_for_log("ctguard starting", Duration::from_secs(5)),
            "ctguard did not start:\n{}",
            self.log()
        );
    }

    /// Waits up to `limit` for the daemon to end by itself; `None` if it is still running.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut().expect("daemon running");
        let mut status = None;
        wait_until(limit, || {
            status = child.try_wait().unwrap();
            status.is_some()
        });
        if status.is_some() {
            self.child = None;
        }
        status
    }

    pub fn signal(&mut self, signal: i32) -> ExitStatus {
        let mut child = self.child.take().expect("daemon running");
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, signal) };
        child.wait().unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            eprintln!("--- ctguard log ---\n{}", self.log());
        }
    }
}

pub fn state_args<'a>(lab: &'a LabNetns, policy: &'a Path, state: &'a Path) -> Vec<&'a str> {
    vec![
        "--netns",
        &lab.name,
        "--policy",
        policy.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
    ]
}
