//! `ctguard run`'s Prometheus endpoint against the real kernel: the daemon runs inside a
//! lab namespace (so global knobs are refused there and timeouts are shortened instead),
//! the table is filled, and `/metrics` is scraped over that namespace's loopback.

use crate::lab::{GlobalSysctl, LabNetns, read_global, wait_until};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

pub const TESTS: &[(&str, fn())] = &[(
    "metrics_endpoint_reports_the_table_drops_and_changes",
    table_drops_and_changes,
)];

/// The daemon, killed on drop (printing its log) if the test did not stop it.
struct Running {
    child: Option<Child>,
    log: std::path::PathBuf,
}

impl Running {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            eprintln!("--- ctguard log ---\n{}", self.log());
        }
    }
}

/// A port nobody listens on inside the lab namespace.
fn free_port(lab: &LabNetns) -> u16 {
    ctguard::netns::run_in(&lab.path, || {
        TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr())
    })
    .unwrap()
    .unwrap()
    .port()
}

/// One `GET /metrics` from inside the namespace: the body, or why there is none.
fn scrape(lab: &LabNetns, addr: SocketAddr) -> Result<String, String> {
    let response = ctguard::netns::run_in(&lab.path, || -> std::io::Result<String> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: lab\r\n\r\n")?;
        let mut text = String::new();
        stream.read_to_string(&mut text)?;
        Ok(text)
    })
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP head in {response:?}"))?;
    if !head.starts_with("HTTP/1.1 200 OK") {
        return Err(format!("answer {head:?}"));
    }
    Ok(body.to_string())
}

/// The value of one sample line (`name{labels} value`), by its exact series name.
fn value(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
}

fn kernel_losses(lab: &LabNetns) -> [u64; 3] {
    let mut sampler = ctguard::observe::sampler::Sampler::open(Some(&lab.path)).unwrap();
    let stats = sampler.read().unwrap().stats.expect("kernel stats");
    [stats.drop, stats.early_drop, stats.insert_failed]
}

fn scraped_losses(body: &str) -> Option<[u64; 3]> {
    let get = |name| value(body, name).map(|v| v as u64);
    Some([
        get("ctguard_kernel_drop_total")?,
        get("ctguard_kernel_early_drop_total")?,
        get("ctguard_kernel_insert_failed_total")?,
    ])
}

fn table_drops_and_changes() {
    let _max = GlobalSysctl::set("nf_conntrack_max", 4096);
    let lab = LabNetns::new("metrics");
    let state = tempfile::tempdir().unwrap();
    let policy = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/daemon/fast-lab.toml");
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port(&lab)));
    // Scrapes are not tracked: in a full table their SYNs would be dropped (early_drop
    // only looks at a few buckets), and they would move the counters under test.
    let port = addr.port();
    lab.nft(&format!(
        "table inet scrape {{\n\
         chain pre {{ type filter hook prerouting priority raw; tcp dport {port} notrack; tcp sport {port} notrack; }}\n\
         chain out {{ type filter hook output priority raw; tcp dport {port} notrack; tcp sport {port} notrack; }}\n\
         }}\n"
    ));
    let log = state.path().join("log");
    let child = lab
        .exec(&[
            env!("CARGO_BIN_EXE_ctguard"),
            "run",
            "--policy",
            policy.to_str().unwrap(),
            "--state-dir",
            state.path().to_str().unwrap(),
            "--metrics-listen",
            &addr.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start ctguard");
    let mut daemon = Running {
        child: Some(child),
        log,
    };
    assert!(
        wait_until(Duration::from_secs(5), || daemon
            .log()
            .contains(&format!("metrics at http://{addr}/metrics"))),
        "{}",
        daemon.log()
    );
    let at_rest = scrape(&lab, addr).unwrap();
    assert_eq!(value(&at_rest, "ctguard_up"), Some(1.0), "{at_rest}");
    assert_eq!(value(&at_rest, "ctguard_level"), Some(0.0), "{at_rest}");

    lab.fill_table(2000);
    let applied = "ctguard_changes_total{stage=\"shorten_timeouts\",result=\"applied\"}";
    let refused = "ctguard_changes_total{stage=\"raise_limits\",result=\"refused\"}";
    let mut last = String::new();
    let during = wait_until(Duration::from_secs(15), || {
        if let Ok(body) = scrape(&lab, addr) {
            last = body;
        }
        value(&last, applied).is_some_and(|n| n > 0.0)
            && value(&last, "ctguard_conntrack_entries").is_some_and(|n| n > 2000.0)
    });
    assert!(
        during,
        "no applied change or entries seen:\n{last}\n{}",
        daemon.log()
    );
    // Inside a namespace the global max is not ctguard's to raise: refused, not failed.
    assert!(value(&last, refused).is_some_and(|n| n > 0.0), "{last}");
    assert_eq!(
        value(&last, "ctguard_conntrack_max"),
        Some(4096.0),
        "{last}"
    );
    assert_eq!(value(&last, "ctguard_incident_open"), Some(1.0), "{last}");
    assert_eq!(value(&last, "ctguard_incidents_total"), Some(1.0), "{last}");
    assert!(
        value(&last, "ctguard_level").is_some_and(|l| l >= 2.0),
        "{last}"
    );
    assert!(
        value(&last, "ctguard_last_decision_timestamp_seconds").is_some_and(|t| t > 1.0e9),
        "{last}"
    );

    // The kernel counters are mirrored: the scraped values lie between the kernel's before
    // (read a few polls earlier) and after the scrape (the same once the load is over).
    let (mut before, mut after) = ([0; 3], [0; 3]);
    let mirrored = wait_until(Duration::from_secs(20), || {
        before = kernel_losses(&lab);
        std::thread::sleep(Duration::from_millis(500));
        let Ok(body) = scrape(&lab, addr) else {
            return false;
        };
        last = body;
        after = kernel_losses(&lab);
        scraped_losses(&last).is_some_and(|scraped| {
            (0..3).all(|i| before[i] <= scraped[i] && scraped[i] <= after[i])
        })
    });
    assert!(mirrored, "kernel {before:?}..{after:?}, scraped:\n{last}");
    assert!(
        after.iter().sum::<u64>() > 0,
        "the fill lost nothing: {after:?}"
    );
    assert_eq!(read_global("nf_conntrack_max"), 4096);

    let mut child = daemon.child.take().unwrap();
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success(), "{}", daemon.log());
}
