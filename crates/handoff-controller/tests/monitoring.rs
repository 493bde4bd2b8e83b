//! What operators see: the server's and the controller's `/metrics` pass `promtool check metrics`
//! (when promtool is on PATH), and the Grafana dashboard in deploy/grafana queries only metrics
//! that they expose, and shows every one of them.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

const DASHBOARD: &str = "deploy/grafana/handoff.json";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The server's OpenMetrics text, with a sample in every labelled family.
fn server_openmetrics() -> String {
    let (metrics, store) = (
        handoff_server::Metrics::default(),
        handoff_store::Store::new(Default::default()),
    );
    metrics.rpc("do_get", tonic::Code::Ok);
    metrics.rpc("do_put", tonic::Code::ResourceExhausted);
    let idle = handoff_server::metrics::ReasonLabels { reason: "idle" };
    metrics.expired_links.get_or_create(&idle).inc();
    metrics.render(&store)
}

/// The controller's OpenMetrics text, with a sample in every labelled family.
fn controller_openmetrics() -> String {
    let metrics = handoff_controller::Metrics::default();
    metrics.reconciled(Duration::from_millis(3));
    metrics.failed("conflict");
    metrics.render()
}

/// What `curl /metrics` gets from the server and from the controller.
fn scraped() -> [(&'static str, String); 2] {
    let server = handoff_server::Metrics::default();
    let store = handoff_store::Store::new(Default::default());
    let (kind, _) = server.exposition(&store, None);
    assert_eq!(kind, handoff_metrics::TEXT_CONTENT_TYPE);
    let (kind, _) = handoff_controller::Metrics::default().exposition(None);
    assert_eq!(kind, handoff_metrics::TEXT_CONTENT_TYPE);
    [
        (
            "server",
            handoff_metrics::to_prometheus_text(&server_openmetrics()),
        ),
        (
            "controller",
            handoff_metrics::to_prometheus_text(&controller_openmetrics()),
        ),
    ]
}

/// The series names a text exposes: each family's, and a histogram's `_bucket`, `_sum` and
/// `_count`.
fn exposed(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let Some(typed) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let (name, kind) = typed.split_once(' ').expect("# TYPE name kind");
        match kind {
            "histogram" => {
                names.extend(["_bucket", "_sum", "_count"].map(|s| format!("{name}{s}")))
            }
            _ => drop(names.insert(name.to_string())),
        }
    }
    names
}

#[test]
fn promtool_finds_nothing_to_lint() {
    for (what, text) in scraped() {
        let child = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn();
        let mut child = match child {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return eprintln!(
                    "skipped: no promtool on PATH (Debian package `prometheus`) to lint /metrics"
                );
            }
            Err(e) => panic!("promtool: {e}"),
        };
        let mut stdin = child.stdin.take().expect("stdin");
        std::io::Write::write_all(&mut stdin, text.as_bytes()).expect("write to promtool");
        drop(stdin);
        let output = child.wait_with_output().expect("promtool ran");
        let said =
            String::from_utf8_lossy(&output.stdout) + String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success() && said.trim().is_empty(),
            "promtool check metrics on the {what}'s /metrics: {}\n{said}\n{text}",
            output.status
        );
    }
}

/// Skips a string literal that starts at `chars[i]`; returns the index after it.
fn skip_string(chars: &[char], mut i: usize) -> usize {
    let quote = chars[i];
    i += 1;
    while i < chars.len() && chars[i] != quote {
        i += if chars[i] == '\\' { 2 } else { 1 };
    }
    i + 1
}

/// Skips from `chars[i]` (an opening bracket) past its `close`, minding strings.
fn skip_to(chars: &[char], mut i: usize, close: char) -> usize {
    while i < chars.len() && chars[i] != close {
        i = match chars[i] {
            '"' | '\'' | '`' => skip_string(chars, i),
            _ => i + 1,
        };
    }
    i + 1
}

/// The metric names a PromQL expression selects: its identifiers outside label matchers,
/// ranges and strings that are not functions, aggregations, keywords, or the labels of `by (...)`
/// and the like.
fn selected(expr: &str) -> Vec<String> {
    const NOT_METRICS: &[&str] = &[
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "atan2",
        "inf",
        "nan",
    ];
    const LABEL_LISTS: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    let chars: Vec<char> = expr.chars().collect();
    let word_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let (mut names, mut i, mut labels_next) = (Vec::new(), 0, false);
    while i < chars.len() {
        let c = chars[i];
        if matches!(c, '"' | '\'' | '`') {
            i = skip_string(&chars, i);
        } else if c == '{' {
            i = skip_to(&chars, i, '}');
        } else if c == '[' {
            i = skip_to(&chars, i, ']');
        } else if c == '(' && labels_next {
            i = skip_to(&chars, i, ')');
            labels_next = false;
        } else if c == '$' || c.is_ascii_digit() || c == '.' {
            // A dashboard variable, or a number or duration.
            i += 1;
            while i < chars.len() && (word_char(chars[i]) || chars[i] == '.') {
                i += 1;
            }
        } else if word_char(c) {
            let start = i;
            while i < chars.len() && word_char(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let next = chars[i..].iter().find(|c| !c.is_whitespace());
            if LABEL_LISTS.contains(&word.as_str()) {
                labels_next = true;
            } else if next != Some(&'(') && !NOT_METRICS.contains(&word.as_str()) {
                names.push(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

#[test]
fn promql_names_are_found() {
    let expr = r#"histogram_quantile(0.99, sum by (le) (rate(a_bucket{job=~"$job", x="}"}[$__rate_interval]))) / on (pod) group_left(node) b_total offset 5m > 0"#;
    assert_eq!(selected(expr), ["a_bucket", "b_total"]);
}

/// Every panel of the dashboard, rows' nested panels included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut all = Vec::new();
    let mut stack: Vec<&Value> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .collect();
    while let Some(panel) = stack.pop() {
        stack.extend(panel["panels"].as_array().into_iter().flatten());
        all.push(panel);
    }
    all
}

#[test]
fn the_dashboard_shows_every_metric_and_only_metrics_that_exist() {
    let path = repo().join(DASHBOARD);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{DASHBOARD}: {e}"));
    let dashboard: Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{DASHBOARD}: {e}"));
    let exposed: BTreeSet<String> = scraped().iter().flat_map(|(_, t)| exposed(t)).collect();
    assert!(exposed.contains("handoff_rpcs_total"), "{exposed:?}");
    assert!(
        exposed.contains("handoff_controller_reconcile_duration_seconds_bucket"),
        "{exposed:?}"
    );

    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("variables");
    let variable = |name: &str| variables.iter().find(|v| v["name"] == name);
    let source = variable("datasource").expect("a datasource variable");
    assert_eq!(
        (&source["type"], &source["query"]),
        (&"datasource".into(), &"prometheus".into())
    );
    for name in ["namespace", "job", "controller_job"] {
        assert!(variable(name).is_some(), "a {name} variable");
    }
    let prometheus = serde_json::json!({"type": "prometheus", "uid": "${datasource}"});
    let mut used = BTreeSet::new();
    let mut check = |what: &str, expr: &str| {
        let names = selected(expr);
        assert!(!names.is_empty(), "{what} selects no metric: {expr}");
        for name in names {
            assert!(
                exposed.contains(&name),
                "{what}: no metric {name} in /metrics: {expr}"
            );
            used.insert(name);
        }
    };
    for v in variables.iter().filter(|v| v["type"] == "query") {
        assert_eq!(v["datasource"], prometheus, "variable {}", v["name"]);
        let query = v["query"]["query"]
            .as_str()
            .or(v["query"].as_str())
            .unwrap_or_default();
        let series = query
            .strip_prefix("label_values(")
            .and_then(|q| q.rsplit_once(','))
            .map(|(series, _)| series);
        check(
            &format!("variable {}", v["name"]),
            series.expect("label_values(series, label)"),
        );
    }
    let panels = panels(&dashboard);
    assert!(panels.len() > 10, "{} panels", panels.len());
    for panel in panels.into_iter().filter(|p| p["type"] != "row") {
        let title = panel["title"].as_str().unwrap_or_default();
        assert_eq!(panel["datasource"], prometheus, "panel {title}");
        let targets = panel["targets"].as_array().filter(|t| !t.is_empty());
        for target in targets.unwrap_or_else(|| panic!("panel {title} has no targets")) {
            assert_eq!(target["datasource"], prometheus, "panel {title}");
            check(
                &format!("panel {title}"),
                target["expr"].as_str().expect("expr"),
            );
        }
    }
    // A histogram is seen through its buckets, or its sum and count.
    let unseen: Vec<&String> = exposed
        .iter()
        .filter(|n| !used.contains(*n) && !n.ends_with("_sum") && !n.ends_with("_count"))
        .collect();
    assert!(unseen.is_empty(), "metrics no panel shows: {unseen:?}");
}
