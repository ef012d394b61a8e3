//! Incident records from a live daemon: a filled lab table makes one incident, recorded
//! from the first breach to the rollback, that `ctguard incidents` lists, tells and draws.

use crate::lab::{LabNetns, wait_until};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const TESTS: &[(&str, fn())] = &[(
    "incident_is_recorded_listed_told_and_drawn",
    incident_is_recorded,
)];

/// The daemon, killed when the test ends (its log shown when the test failed).
struct Running {
    child: Child,
    log: std::path::PathBuf,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- ctguard log ---\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

fn ctguard(args: &[&str], state: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_ctguard"))
        .args(args)
        .arg("--state-dir")
        .arg(state)
        .output()
        .expect("run ctguard");
    assert!(
        out.status.success(),
        "ctguard {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn list(state: &Path) -> Vec<serde_json::Value> {
    serde_json::from_str(&ctguard(&["incidents", "--json"], state)).expect("JSON list")
}

fn incident_is_recorded() {
    let _globals = crate::lab::small_table();
    let lab = LabNetns::new("incidents");
    let state = tempfile::tempdir().unwrap();
    let policy = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/daemon/fast-lab.toml");
    let log = state.path().join("log");
    let child = Command::new(env!("CARGO_BIN_EXE_ctguard"))
        .args(["run", "--netns", &lab.name, "--policy"])
        .arg(&policy)
        .arg("--state-dir")
        .arg(state.path())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start ctguard");
    let daemon = Running { child, log };
    let started = wait_until(Duration::from_secs(5), || {
        std::fs::read_to_string(&daemon.log).is_ok_and(|l| l.contains("ctguard starting"))
    });
    assert!(started, "ctguard did not start");
    assert!(list(state.path()).is_empty());

    lab.fill_table(2000);
    let closed = wait_until(Duration::from_secs(90), || {
        lab.collect_expired();
        list(state.path())
            .first()
            .is_some_and(|i| i["status"] == "closed")
    });
    assert!(closed, "no closed incident: {:?}", list(state.path()));

    let incidents = list(state.path());
    assert_eq!(incidents.len(), 1, "{incidents:?}");
    let incident = &incidents[0];
    assert!(
        incident["peak_ratio"].as_f64().unwrap() >= 0.85,
        "{incident}"
    );
    assert!(
        incident["stages"]
            .as_array()
            .unwrap()
            .contains(&"raise_limits".into()),
        "{incident}"
    );
    let decisions = incident["decisions"].as_array().unwrap();
    let raised = decisions
        .iter()
        .any(|d| d["stage"] == "raise_limits" && d["verb"] == "apply" && d["result"] == "applied");
    let rolled_back = decisions.iter().any(|d| {
        d["stage"] == "raise_limits" && d["verb"] == "rollback" && d["result"] == "applied"
    });
    assert!(raised && rolled_back, "{decisions:?}");

    let id = incident["id"].as_str().unwrap();
    let svg = state.path().join("incident.svg");
    let story = ctguard(
        &["incidents", "show", id, "--svg", svg.to_str().unwrap()],
        state.path(),
    );
    for needle in [
        "opened: table at",
        "(raise_limits) — applied",
        "closed after",
    ] {
        assert!(story.contains(needle), "{needle:?} missing from:\n{story}");
    }
    let picture = std::fs::read_to_string(&svg).unwrap();
    assert!(picture.starts_with("<svg") && picture.trim_end().ends_with("</svg>"));
    assert!(
        picture.contains(r#"class="marker stage""#)
            && picture.contains(r#"class="marker rollback""#)
    );
    let file = state.path().join("incidents").join(format!("{id}.json"));
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(file).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    drop(daemon);
}
