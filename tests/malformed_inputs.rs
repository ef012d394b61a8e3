//! Every parser over the corpus of malformed samples in `tests/fixtures/malformed/`
//! (made from real captures by `make.py` there): each sample must give an error that
//! names what was wrong, never a panic and never a value. Arbitrary bytes are covered by
//! each parser's own property test; the policy parser's is here.

use ctguard::journal::Journal;
use ctguard::policy::Policy;
use proptest::prelude::*;
use std::path::{Path, PathBuf};

/// The samples of one area, sorted, with their bytes.
fn samples(area: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/malformed")
        .join(area);
    let mut all: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            (path, bytes)
        })
        .collect();
    all.sort();
    assert!(!all.is_empty(), "no samples in {}", dir.display());
    all
}

fn name(path: &Path) -> &str {
    path.file_name().unwrap().to_str().unwrap()
}

/// Asserts a parse failed with a message that says something.
fn assert_clear_error<T: std::fmt::Debug, E: std::fmt::Display>(
    path: &Path,
    result: Result<T, E>,
) -> String {
    match result {
        Ok(value) => panic!("{}: parsed as {value:?}", path.display()),
        Err(e) => {
            let message = e.to_string();
            assert!(
                message.len() > 10,
                "{}: vague error {message:?}",
                path.display()
            );
            message
        }
    }
}

#[test]
fn policy_samples() {
    for (path, bytes) in samples("policy") {
        let source = path.display().to_string();
        let result = String::from_utf8(bytes)
            .map_err(|e| format!("{source}: not UTF-8 ({e})"))
            .and_then(|text| Policy::from_toml(&text, &source).map_err(|e| e.to_string()));
        let message = assert_clear_error(&path, result);
        assert!(message.contains(name(&path)), "{message}");
    }
}

#[test]
fn kmsg_samples() {
    for (path, bytes) in samples("kmsg") {
        assert_clear_error(&path, ctguard::observe::kmsg::KmsgRecord::parse(&bytes));
    }
}

#[test]
fn proc_samples() {
    use ctguard::observe::{memory, stat, sysctl};
    for (path, bytes) in samples("proc") {
        let file = name(&path);
        let message = if file.starts_with("stat-") {
            assert_clear_error(&path, stat::parse_stats(&path, &bytes))
        } else if file.starts_with("sysctl-") {
            assert_clear_error(&path, sysctl::parse_value(&path, &bytes))
        } else if file.starts_with("meminfo-") {
            assert_clear_error(&path, memory::parse_mem_total(&path, &bytes))
        } else {
            panic!("{file}: no parser for this sample");
        };
        assert!(message.contains(file), "{message}");
    }
}

#[test]
fn netlink_samples() {
    use ctguard::observe::{ctnetlink, table};
    for (path, bytes) in samples("netlink") {
        let file = name(&path);
        if file.starts_with("stats-") {
            // The capture answered request 2 (`conntrack -S`'s global stats).
            assert_clear_error(&path, ctnetlink::parse_stats_reply(2, &bytes));
        } else if file.starts_with("flow-payload-") {
            assert_clear_error(&path, table::parse_flow(&bytes));
        } else {
            panic!("{file}: no parser for this sample");
        }
    }
}

#[test]
fn trace_samples() {
    for (path, bytes) in samples("trace") {
        let text = String::from_utf8(bytes).unwrap();
        let source = path.display().to_string();
        let message =
            assert_clear_error(&path, ctguard::simulate::trace::parse_trace(&text, &source));
        assert!(message.contains(name(&path)), "{message}");
    }
}

#[test]
fn journal_samples() {
    for (path, bytes) in samples("journal") {
        let state = tempfile::tempdir().unwrap();
        let journal = state.path().join(ctguard::journal::FILE_NAME);
        std::fs::write(&journal, &bytes).unwrap();
        let message = assert_clear_error(&path, Journal::open(state.path()));
        assert!(message.contains("journal.json"), "{message}");
        assert!(message.contains("corrupt"), "{message}");
        // A journal that cannot be read is never overwritten.
        assert_eq!(std::fs::read(&journal).unwrap(), bytes);
    }
}

#[test]
fn nft_samples() {
    for (path, bytes) in samples("nft") {
        assert_clear_error(&path, ctguard::act::nft::parse_listing(&bytes));
    }
}

proptest! {
    #[test]
    fn policy_from_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = Policy::from_toml(&String::from_utf8_lossy(&bytes), "fuzz");
    }

    #[test]
    fn policy_near_real_keys_never_panics(
        text in "(mode = \"(enforce|observe|x)\"\n)?(\\[(poll|levels\\.act|stages\\.raise_limits|rollback)\\]\n)?([a-z_]{1,14} = (\"[0-9a-z%]{0,6}\"|-?[0-9.]{1,8}|true)\n){0,5}"
    ) {
        let _ = Policy::from_toml(&text, "fuzz");
    }

    #[test]
    fn journal_from_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let state = tempfile::tempdir().unwrap();
        std::fs::write(state.path().join(ctguard::journal::FILE_NAME), &bytes).unwrap();
        let _ = Journal::open(state.path());
    }
}
