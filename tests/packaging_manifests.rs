//! Checks the fleet manifests and the package metadata without a cluster or helm (neither
//! is installable here): the plain DaemonSet, the Helm chart rendered by a tiny renderer
//! that understands the few template forms the chart uses, and Cargo.toml's deb and rpm
//! sections.

use serde::Deserialize;
use serde_yaml::Value;
use std::path::{Path, PathBuf};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The YAML documents of a multi-document text, skipping empty ones.
fn documents(text: &str, source: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{source}: {e}\n{text}")))
        .filter(|doc| !doc.is_null())
        .collect()
}

/// `doc.a.b.c` as a string, or a panic naming the path.
fn str_at<'a>(doc: &'a Value, path: &str, source: &str) -> &'a str {
    at(doc, path, source)
        .as_str()
        .unwrap_or_else(|| panic!("{source}: {path} is not a string"))
}

fn at<'a>(doc: &'a Value, path: &str, source: &str) -> &'a Value {
    path.split('.').fold(doc, |v, key| {
        match key.parse::<usize>() {
            Ok(i) => v.get(i),
            Err(_) => v.get(key),
        }
        .unwrap_or_else(|| panic!("{source}: no {path}"))
    })
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_sequence()
        .map(|s| s.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// What every Kubernetes object needs, and what the ctguard DaemonSet must have to work.
fn check_objects(docs: &[Value], source: &str) -> Vec<String> {
    let mut kinds = Vec::new();
    for doc in docs {
        str_at(doc, "apiVersion", source);
        let kind = str_at(doc, "kind", source);
        assert!(
            !str_at(doc, "metadata.name", source).is_empty(),
            "{source}: empty name"
        );
        if kind == "DaemonSet" {
            check_daemonset(doc, source);
        }
        kinds.push(kind.to_string());
    }
    kinds
}

fn check_daemonset(ds: &Value, source: &str) {
    let pod = at(ds, "spec.template.spec", source);
    assert_eq!(
        pod.get("hostNetwork"),
        Some(&Value::Bool(true)),
        "{source}: hostNetwork"
    );
    let template_labels = at(ds, "spec.template.metadata.labels", source);
    for (key, value) in at(ds, "spec.selector.matchLabels", source)
        .as_mapping()
        .unwrap()
    {
        assert_eq!(
            template_labels.get(key),
            Some(value),
            "{source}: selector {key:?}"
        );
    }
    let container = at(pod, "containers.0", source);
    let image = str_at(container, "image", source);
    assert!(
        image.contains(':') && !image.starts_with(':'),
        "{source}: image {image:?}"
    );
    let caps = strings(at(container, "securityContext.capabilities.add", source));
    for cap in ["NET_ADMIN", "SYSLOG"] {
        assert!(
            caps.contains(&cap),
            "{source}: capability {cap} missing from {caps:?}"
        );
    }
    let args = strings(at(container, "args", source));
    assert_eq!(args.first(), Some(&"run"), "{source}: {args:?}");
    assert!(
        args.iter()
            .any(|a| a.starts_with("--metrics-listen=$(NODE_IP):")),
        "{source}: metrics must listen on the node address: {args:?}"
    );
    let port = at(container, "ports.0.containerPort", source);
    assert_eq!(
        at(container, "livenessProbe.httpGet.path", source),
        "/metrics"
    );
    assert_eq!(at(container, "livenessProbe.httpGet.port", source), port);
    assert!(
        args.iter()
            .any(|a| a.ends_with(&format!(":{}", port.as_u64().unwrap())))
    );
    // Every mount has its volume; the journal, the kernel log and the module lists (which
    // tell ctguard what would load a module) come from the host.
    let volumes = at(pod, "volumes", source).as_sequence().unwrap();
    let volume = |name: &str| volumes.iter().find(|v| v.get("name") == Some(&name.into()));
    for mount in at(container, "volumeMounts", source).as_sequence().unwrap() {
        let name = str_at(mount, "name", source);
        assert!(
            volume(name).is_some(),
            "{source}: mount {name} has no volume"
        );
    }
    for (name, path) in [
        ("state", "/var/lib/ctguard"),
        ("kmsg", "/dev/kmsg"),
        ("modules", "/lib/modules"),
    ] {
        let v = volume(name).unwrap_or_else(|| panic!("{source}: no volume {name}"));
        assert_eq!(str_at(v, "hostPath.path", source), path);
    }
}

#[test]
fn plain_daemonset_has_what_ctguard_needs() {
    let source = "packaging/kubernetes/daemonset.yaml";
    let docs = documents(&read(source), source);
    assert_eq!(
        check_objects(&docs, source),
        ["ServiceAccount", "DaemonSet"]
    );
    let container = at(&docs[1], "spec.template.spec.containers.0", source);
    let args = strings(at(container, "args", source));
    assert!(
        args.contains(&"--policy=/etc/ctguard/policy.toml"),
        "{args:?}"
    );
    assert_eq!(
        at(
            &docs[1],
            "spec.template.spec.volumes.0.configMap.name",
            source
        ),
        "ctguard-policy"
    );
}

/// Renders a chart template the way helm would for the forms the chart uses:
/// `{{ PATH }}`, `{{ PATH | quote }}`, `{{ toYaml PATH | nindent N }}`, `{{ if PATH }}` …
/// `{{ end }}`, with `{{-` / `-}}` trimming. PATH is `.Values.…`, `.Release.Name`,
/// `.Release.Namespace` or `.Chart.AppVersion`. Anything else fails the test.
fn render(template: &str, values: &Value, chart: &Value) -> String {
    let mut out = String::new();
    // Whether each enclosing `if` holds.
    let mut conditions: Vec<bool> = Vec::new();
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        let emitting = conditions.iter().all(|c| *c);
        if emitting {
            out.push_str(&rest[..start]);
        }
        let end = rest[start..].find("}}").expect("unclosed {{") + start;
        let mut action = &rest[start + 2..end];
        if let Some(a) = action.strip_prefix('-') {
            action = a;
            if emitting {
                out.truncate(out.trim_end().len());
            }
        }
        let trim_after = action.ends_with('-');
        let action = action.trim_end_matches('-').trim();
        rest = &rest[end + 2..];
        if trim_after {
            rest = rest.trim_start();
        }
        let words: Vec<&str> = action.split_whitespace().collect();
        match words.as_slice() {
            ["if", path] => conditions.push(truthy(lookup(path, values, chart))),
            ["end"] => {
                conditions.pop().expect("end without if");
            }
            _ if emitting => out.push_str(&expression(action, values, chart)),
            _ => {}
        }
    }
    assert!(conditions.is_empty(), "unclosed if");
    out.push_str(rest);
    out
}

fn expression(action: &str, values: &Value, chart: &Value) -> String {
    let mut stages = action.split('|').map(str::trim);
    let head: Vec<&str> = stages.next().unwrap().split_whitespace().collect();
    let mut text = match head.as_slice() {
        ["toYaml", path] => to_yaml(lookup(path, values, chart)),
        [path] => scalar(lookup(path, values, chart)),
        _ => panic!("template form not supported: {action}"),
    };
    for stage in stages {
        let words: Vec<&str> = stage.split_whitespace().collect();
        text = match words.as_slice() {
            ["quote"] => serde_json::to_string(&text).unwrap(),
            ["nindent", n] => {
                let pad = " ".repeat(n.parse().unwrap());
                text.lines().map(|l| format!("\n{pad}{l}")).collect()
            }
            _ => panic!("template function not supported: {stage}"),
        };
    }
    text
}

fn lookup(path: &str, values: &Value, chart: &Value) -> Value {
    let fixed = |s: &str| Value::String(s.to_string());
    match path {
        ".Release.Name" => fixed("ctguard"),
        ".Release.Namespace" => fixed("kube-system"),
        ".Chart.AppVersion" => chart["appVersion"].clone(),
        _ => {
            let keys = path
                .strip_prefix(".Values.")
                .unwrap_or_else(|| panic!("unknown template path {path}"));
            keys.split('.')
                .fold(values, |v, k| {
                    v.get(k).unwrap_or_else(|| panic!("no value {path}"))
                })
                .clone()
        }
    }
}

fn truthy(v: Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => b,
        Value::String(s) => !s.is_empty(),
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::Sequence(s) => !s.is_empty(),
        Value::Mapping(m) => !m.is_empty(),
        Value::Tagged(_) => true,
    }
}

fn scalar(v: Value) -> String {
    match v {
        Value::String(s) => s,
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        other => panic!("not a scalar: {other:?}"),
    }
}

fn to_yaml(v: Value) -> String {
    serde_yaml::to_string(&v).unwrap().trim_end().to_string()
}

fn render_chart(values: &Value) -> Vec<Value> {
    let chart_dir = "packaging/helm/ctguard";
    let chart: Value = serde_yaml::from_str(&read(&format!("{chart_dir}/Chart.yaml"))).unwrap();
    let mut docs = Vec::new();
    for name in ["serviceaccount.yaml", "configmap.yaml", "daemonset.yaml"] {
        let source = format!("{chart_dir}/templates/{name}");
        let text = render(&read(&source), values, &chart);
        docs.extend(documents(&text, &source));
    }
    docs
}

fn chart_values() -> Value {
    serde_yaml::from_str(&read("packaging/helm/ctguard/values.yaml")).unwrap()
}

#[test]
fn chart_with_default_values_uses_the_built_in_policy() {
    let source = "helm chart (default values)";
    let docs = render_chart(&chart_values());
    assert_eq!(
        check_objects(&docs, source),
        ["ServiceAccount", "DaemonSet"]
    );
    let container = at(&docs[1], "spec.template.spec.containers.0", source);
    assert!(
        !strings(at(container, "args", source))
            .iter()
            .any(|a| a.starts_with("--policy"))
    );
    assert_eq!(str_at(container, "image", source), "ctguard:0.1.0");
    assert_eq!(
        at(container, "securityContext.privileged", source),
        &Value::Bool(true)
    );
}

#[test]
fn chart_with_a_policy_ships_it_in_a_configmap_ctguard_accepts() {
    let source = "helm chart (policy set)";
    let policy = read("policies/web-server.toml");
    let mut values = chart_values();
    values["policy"] = Value::String(policy.clone());
    let docs = render_chart(&values);
    assert_eq!(
        check_objects(&docs, source),
        ["ServiceAccount", "ConfigMap", "DaemonSet"]
    );
    let shipped = at(&docs[1], "data", source)["policy.toml"]
        .as_str()
        .expect("data policy.toml");
    assert_eq!(shipped, policy);
    ctguard::policy::Policy::from_toml(shipped, source).expect("a valid policy");
    let pod = at(&docs[2], "spec.template.spec", source);
    let args = strings(at(pod, "containers.0.args", source));
    assert!(
        args.contains(&"--policy=/etc/ctguard/policy.toml"),
        "{args:?}"
    );
    assert_eq!(
        at(pod, "volumes.0.configMap.name", source),
        "ctguard-policy"
    );
}

#[test]
fn package_metadata_ships_the_policy_as_config_and_existing_files() {
    let manifest: toml::Value = toml::from_str(&read("Cargo.toml")).unwrap();
    let metadata = &manifest["package"]["metadata"];
    let deb = metadata["deb"]["assets"].as_array().unwrap();
    let rpm = metadata["generate-rpm"]["assets"].as_array().unwrap();
    let mut sources: Vec<&str> = deb.iter().map(|a| a[0].as_str().unwrap()).collect();
    sources.extend(rpm.iter().map(|a| a["source"].as_str().unwrap()));
    // Built files come from cargo and packaging/build-assets.sh; the rest must exist.
    for source in sources.iter().filter(|s| !s.starts_with("target/")) {
        let matches = match source.split_once('*') {
            Some((dir, suffix)) => std::fs::read_dir(repo(dir))
                .unwrap_or_else(|e| panic!("{source}: {e}"))
                .any(|e| e.unwrap().file_name().to_string_lossy().ends_with(suffix)),
            None => repo(source).is_file(),
        };
        assert!(matches, "package asset {source} matches no file");
    }
    let deb_policy = deb
        .iter()
        .find(|a| a[1].as_str() == Some("etc/ctguard/policy.toml"))
        .expect("deb ships /etc/ctguard/policy.toml");
    assert_eq!(deb_policy[0].as_str(), Some("policies/default.toml"));
    let conf_files = metadata["deb"]["conf-files"].as_array().unwrap();
    assert!(conf_files.contains(&"/etc/ctguard/policy.toml".into()));
    let rpm_policy = rpm
        .iter()
        .find(|a| a["dest"].as_str() == Some("/etc/ctguard/policy.toml"))
        .expect("rpm ships /etc/ctguard/policy.toml");
    assert_eq!(rpm_policy["config"].as_str(), Some("noreplace"));
    // The unit starts ctguard with that policy.
    let unit = read("packaging/systemd/ctguard.service");
    assert!(unit.contains("ExecStart=/usr/bin/ctguard run --policy /etc/ctguard/policy.toml"));
}
