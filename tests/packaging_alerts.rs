//! Checks `packaging/prometheus/alerts.yml` against what ctguard exports: every rule is
//! complete, and every metric an expression names is one ctguard exports (or Prometheus'
//! own `up`). Also checks that the README documents every exported metric. (CI also runs
//! `promtool check rules` on the file for PromQL syntax.)

use serde::Deserialize;
use std::collections::BTreeSet;
use std::path::Path;

#[derive(Deserialize)]
struct RuleFile {
    groups: Vec<Group>,
}

#[derive(Deserialize)]
struct Group {
    name: String,
    rules: Vec<Rule>,
}

#[derive(Deserialize)]
struct Rule {
    alert: String,
    expr: String,
    labels: std::collections::BTreeMap<String, String>,
    annotations: std::collections::BTreeMap<String, String>,
}

fn read(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The metric family names a fresh agent exposes (`ctguard_up`, `ctguard_changes_total`, …).
fn exported() -> BTreeSet<String> {
    ctguard::metrics::Metrics::new()
        .encode()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split(['{', ' ']).next().unwrap().to_string())
        .collect()
}

/// PromQL words that are not metric names.
const KEYWORDS: &[&str] = &[
    "and",
    "or",
    "unless",
    "on",
    "ignoring",
    "by",
    "without",
    "bool",
    "offset",
    "group_left",
    "group_right",
];

/// The metric names an expression selects: identifiers outside label matchers, ranges and
/// strings that are neither functions (followed by `(`) nor keywords, nor the label lists
/// of `on(…)`/`by(…)`/… .
fn metric_names(expr: &str) -> Vec<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = Vec::new();
    let mut i = 0;
    let mut skip_label_list = false;
    while i < chars.len() {
        let c = chars[i];
        let closing = match c {
            '{' => Some('}'),
            '[' => Some(']'),
            '"' => Some('"'),
            '(' if skip_label_list => Some(')'),
            _ => None,
        };
        if let Some(close) = closing {
            skip_label_list = false;
            i += chars[i + 1..].iter().position(|&x| x == close).unwrap() + 2;
            continue;
        }
        if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || "_:".contains(chars[i])) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let next = chars[i..].iter().find(|c| !c.is_whitespace());
            if KEYWORDS.contains(&word.as_str()) {
                skip_label_list = next == Some(&'(');
            } else if next != Some(&'(') {
                names.push(word);
            }
            continue;
        }
        i += 1;
    }
    names
}

#[test]
fn the_expression_scanner_finds_metrics_only() {
    assert_eq!(
        metric_names(
            r#"increase(ctguard_kernel_drop_total{x="a b"}[5m]) > 0 and on(instance) ctguard_up == 1"#
        ),
        ["ctguard_kernel_drop_total", "ctguard_up"]
    );
    assert_eq!(metric_names(r#"absent(up{job="ctguard"})"#), ["up"]);
}

#[test]
fn every_alert_is_complete_and_names_only_exported_metrics() {
    let file: RuleFile = serde_yaml::from_str(&read("packaging/prometheus/alerts.yml")).unwrap();
    let exported = exported();
    let mut seen = BTreeSet::new();
    let mut alerts = 0;
    for group in &file.groups {
        assert!(!group.name.is_empty());
        for rule in &group.rules {
            alerts += 1;
            assert!(
                seen.insert(rule.alert.clone()),
                "duplicate alert {}",
                rule.alert
            );
            let severity = rule.labels.get("severity").map(String::as_str);
            assert!(
                matches!(severity, Some("critical" | "warning" | "info")),
                "{}: severity {severity:?}",
                rule.alert
            );
            for key in ["summary", "description"] {
                assert!(
                    rule.annotations.contains_key(key),
                    "{}: no {key}",
                    rule.alert
                );
            }
            let names = metric_names(&rule.expr);
            assert!(
                !names.is_empty(),
                "{}: no metric in {}",
                rule.alert,
                rule.expr
            );
            for name in names {
                assert!(
                    name == "up" || exported.contains(&name),
                    "{}: {name} is not exported by ctguard (exported: {exported:?})",
                    rule.alert
                );
            }
        }
    }
    assert!(alerts >= 6, "only {alerts} alerts");
}

#[test]
fn the_readme_documents_every_exported_metric() {
    let readme = read("README.md");
    for name in exported() {
        assert!(
            readme.contains(&format!("`{name}")),
            "README does not document {name}"
        );
    }
}
