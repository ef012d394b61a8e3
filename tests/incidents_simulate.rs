//! `ctguard simulate --scenario flood --svg FILE` draws the run: a well-formed SVG with the
//! fill and max lines and a marker for every stage firing and rollback step.

use std::process::Command;

#[test]
fn flood_simulation_draws_its_timeline() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.svg");
    let out = Command::new(env!("CARGO_BIN_EXE_ctguard"))
        .args(["simulate", "--scenario", "flood", "--svg"])
        .arg(&path)
        .output()
        .expect("run ctguard simulate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("incident-1 closed"),
        "timeline still printed:\n{text}"
    );
    let svg = std::fs::read_to_string(&path).unwrap();

    let mut reader = quick_xml::Reader::from_str(&svg);
    reader.config_mut().check_end_names = true;
    let mut markers = Vec::new();
    loop {
        match reader.read_event().expect("well-formed SVG") {
            quick_xml::events::Event::Start(e) | quick_xml::events::Event::Empty(e) => {
                if let Some(class) = e.try_get_attribute("class").unwrap() {
                    markers.push(class.value.to_string());
                }
            }
            quick_xml::events::Event::Eof => break,
            _ => {}
        }
    }
    let count = |class: &str| markers.iter().filter(|m| *m == class).count();
    // The flood fires raise_limits 3 times and shorten_timeouts twice, then rolls back
    // shorten_timeouts in 8 steps and raise_limits in one.
    assert_eq!(count("marker stage"), 5, "{markers:?}");
    assert_eq!(count("marker rollback"), 9, "{markers:?}");
    assert_eq!(count("count") + count("max"), 2);
    for label in [
        "▲ raise_limits ×3",
        "↩ shorten_timeouts rolled back (8 steps)",
    ] {
        assert!(svg.contains(label), "{label:?} missing");
    }
}
