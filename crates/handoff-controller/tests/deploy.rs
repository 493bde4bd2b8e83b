//! The deployment files stay honest: the Helm chart renders to what the kustomize base holds, the
//! base's ClusterRole is exactly what the controller needs, and the examples in examples/k8s
//! parse, name each other, and use only fields the upstream CRDs define. File checks only, plus
//! `kubectl kustomize deploy/base` when kubectl is on PATH.

use std::collections::BTreeSet;
use std::path::PathBuf;

use handoff_controller::{ConsumerRef, DataLink};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

const CRD: &str = "deploy/crds/handoff.kubeflow.org_datalinks.yaml";
const CHART: &str = "deploy/helm/handoff";
const UPSTREAM: &str = "crates/handoff-controller/tests/fixtures/upstream";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(path: &str) -> String {
    let path = repo().join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The documents of a multi-document YAML text; comment-only documents are skipped.
fn docs(text: &str, what: &str) -> Vec<Value> {
    let parsed = serde_yaml::Deserializer::from_str(text).map(Value::deserialize);
    let all: Result<Vec<Value>, _> = parsed.collect();
    let all = all.unwrap_or_else(|e| panic!("{what}: {e}"));
    all.into_iter()
        .filter(|doc| !doc.is_null())
        .map(whole_numbers)
        .collect()
}

/// `1.0` as `1`: the CRD's `maximum` is a float in the Kubernetes types, and kustomize prints it
/// back as an integer.
fn whole_numbers(value: Value) -> Value {
    match value {
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() && f.fract() == 0.0 && f.abs() < 1e15 => Value::from(f as i64),
            _ => Value::Number(n),
        },
        Value::Array(items) => Value::Array(items.into_iter().map(whole_numbers).collect()),
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| (k, whole_numbers(v)))
                .collect(),
        ),
        other => other,
    }
}

fn yaml(path: &str) -> Value {
    serde_yaml::from_str(&read(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The one document of `kind`.
fn find<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = docs.iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "expected one {kind}");
    found[0]
}

/// The one document of `kind`, as a typed object.
fn one<T: DeserializeOwned>(docs: &[Value], kind: &str) -> T {
    let doc = find(docs, kind).clone();
    serde_json::from_value(doc).unwrap_or_else(|e| panic!("{kind}: {e}"))
}

/// Parses every document of a kind k8s-openapi knows as that type, so a value of the wrong type
/// fails. (Unknown fields are ignored there; comparisons against the base catch misspellings.)
fn typed(docs: &[Value]) {
    fn parse<T: DeserializeOwned>(doc: &Value) {
        let what = format!("{} {}", s(&doc["kind"]), s(&doc["metadata"]["name"]));
        let parsed = serde_json::from_value::<T>(doc.clone());
        parsed.map(drop).unwrap_or_else(|e| panic!("{what}: {e}"));
    }
    for doc in docs {
        match s(&doc["kind"]) {
            "ClusterRole" => parse::<ClusterRole>(doc),
            "ClusterRoleBinding" => parse::<ClusterRoleBinding>(doc),
            "ConfigMap" => parse::<ConfigMap>(doc),
            "Deployment" => parse::<Deployment>(doc),
            "NetworkPolicy" => parse::<NetworkPolicy>(doc),
            "Secret" => parse::<Secret>(doc),
            "Service" => parse::<Service>(doc),
            "ServiceAccount" => parse::<ServiceAccount>(doc),
            _ => {}
        }
    }
}

fn s(value: &Value) -> &str {
    value.as_str().unwrap_or_default()
}

/// Whether `got` has everything `want` has (objects may hold more keys; arrays match by index).
fn contains(got: &Value, want: &Value) -> bool {
    match (got, want) {
        (Value::Object(g), Value::Object(w)) => w
            .iter()
            .all(|(k, w)| g.get(k).is_some_and(|g| contains(g, w))),
        (Value::Array(g), Value::Array(w)) => {
            g.len() == w.len() && g.iter().zip(w).all(|(g, w)| contains(g, w))
        }
        _ => got == want,
    }
}

/// The ClusterRoles Kubeflow's roles aggregate (deploy/base/kubeflow-roles.yaml).
fn kubeflow_roles() -> Vec<Value> {
    docs(&read("deploy/base/kubeflow-roles.yaml"), "kubeflow-roles")
}

/// The one document of `kind` named `name`.
fn named_doc<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    let found: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .collect();
    assert_eq!(found.len(), 1, "expected one {kind} {name}");
    found[0]
}

fn base() -> Vec<Value> {
    let files = ["namespace", "rbac", "controller", "networkpolicy"];
    let each = files.map(|f| docs(&read(&format!("deploy/base/{f}.yaml")), f));
    each.concat()
}

/// The names of the files in `dir`, sorted.
fn files(dir: &str) -> Vec<String> {
    let entries = std::fs::read_dir(repo().join(dir)).expect(dir);
    let name = |e: std::io::Result<std::fs::DirEntry>| e.expect(dir).file_name();
    let mut names: Vec<String> = entries.map(|e| name(e).to_string_lossy().into()).collect();
    names.sort();
    names
}

/// Renders the few forms the chart uses: `.Values.*`, `.Release.*` and `.Chart.*` lookups,
/// `X | quote`, `toYaml X | nindent N`, `if X` ... `end`, with `{{-` and `-}}` trimming. Anything
/// else is an error: extend this (or simplify the template) so the chart stays checked.
fn render(template: &str, values: &Value, chart: &Value) -> Result<String, String> {
    let lookup = |path: &str| -> Result<Value, String> {
        let found = match path.strip_prefix(".Values.") {
            Some(keys) => keys.split('.').try_fold(values, |v, k| v.get(k)).cloned(),
            None => match path {
                ".Release.Namespace" => Some(json!("handoff-system")),
                ".Release.Name" => Some(json!("handoff")),
                ".Release.Service" => Some(json!("Helm")),
                ".Chart.Name" => chart.get("name").cloned(),
                ".Chart.Version" => chart.get("version").cloned(),
                ".Chart.AppVersion" => chart.get("appVersion").cloned(),
                _ => None,
            },
        };
        found
            .filter(|v| !v.is_null())
            .ok_or(format!("{path} has no value"))
    };
    let scalar = |path: &str| match lookup(path)? {
        Value::String(s) => Ok(s),
        v @ (Value::Number(_) | Value::Bool(_)) => Ok(v.to_string()),
        _ => Err(format!("{path} is not a scalar")),
    };
    let (mut out, mut emit, mut rest, mut trim_next) = (String::new(), vec![true], template, false);
    loop {
        let start = rest.find("{{").unwrap_or(rest.len());
        let mut text = &rest[..start];
        if trim_next {
            text = text.trim_start();
        }
        if rest[start..].starts_with("{{-") {
            text = text.trim_end();
        }
        if emit.iter().all(|e| *e) {
            out.push_str(text);
        }
        if start == rest.len() {
            break;
        }
        let end = rest[start..].find("}}").ok_or("an unclosed {{")? + start;
        let action = &rest[start + 2..end];
        rest = &rest[end + 2..];
        trim_next = action.ends_with('-');
        let action = action.trim_matches('-').trim();
        let emitting = emit.iter().all(|e| *e);
        let falsy = [json!(false), json!(0), json!(""), json!([]), json!({})];
        match action.split_whitespace().collect::<Vec<_>>().as_slice() {
            // Go templates' truth: not false, 0, "", an empty list or map, or missing.
            ["if", path] => emit.push(lookup(path).is_ok_and(|v| !falsy.contains(&v))),
            ["end"] if emit.len() > 1 => drop(emit.pop()),
            _ if !emitting => {}
            [path] if path.starts_with('.') => out.push_str(&scalar(path)?),
            [path, "|", "quote"] => out.push_str(&json!(scalar(path)?).to_string()),
            ["toYaml", path, "|", "nindent", n] => {
                let n: usize = n.parse().map_err(|_| format!("nindent {n}"))?;
                let yaml = serde_yaml::to_string(&lookup(path)?).map_err(|e| e.to_string())?;
                for line in yaml.trim_end().lines() {
                    out.push_str(&format!("\n{:n$}{line}", ""));
                }
            }
            _ => return Err(format!("unsupported template action `{{{{ {action} }}}}`")),
        }
    }
    match emit.len() {
        1 => Ok(out),
        _ => Err("an `if` without `end`".into()),
    }
}

/// The chart's templates rendered as release `handoff` in namespace `handoff-system`.
fn chart(values: &Value) -> Vec<Value> {
    let (meta, dir) = (
        yaml(&format!("{CHART}/Chart.yaml")),
        format!("{CHART}/templates"),
    );
    let mut rendered = Vec::new();
    for name in files(&dir) {
        let text = read(&format!("{dir}/{name}"));
        let out = render(&text, values, &meta).unwrap_or_else(|e| panic!("{name}: {e}"));
        match name.rsplit_once('.').map(|(_, ext)| ext) {
            Some("yaml") => rendered.extend(docs(&out, &name)),
            Some("txt") => {}
            _ => panic!("templates/{name}: neither YAML nor NOTES.txt"),
        }
    }
    rendered
}

#[test]
fn the_charts_crd_is_a_copy_of_the_generated_one() {
    let copy = format!("{CHART}/crds/handoff.kubeflow.org_datalinks.yaml");
    let fix = format!("cp {CRD} {copy}");
    assert!(
        read(&copy) == read(CRD),
        "the chart's CRD is stale: `{fix}` (`HANDOFF_REGEN=1 cargo test -p handoff-controller --test crd` writes both)"
    );
}

#[test]
fn the_chart_renders_what_the_kustomize_base_holds() {
    let values = yaml(&format!("{CHART}/values.yaml"));
    let meta = yaml(&format!("{CHART}/Chart.yaml"));
    let want = json!({"apiVersion": "v2", "name": "handoff", "version": "0.1.0"});
    assert!(contains(&meta, &want), "Chart.yaml: {meta}");
    let (repository, tag) = (&values["image"]["repository"], &values["image"]["tag"]);
    assert_eq!(tag, &meta["appVersion"], "image.tag is the appVersion");
    let image = format!("{}:{}", s(repository), s(tag));
    assert_eq!(values["serverImage"], json!(image), "the same image");

    let (base, rendered) = (base(), chart(&values));
    let kinds: BTreeSet<&str> = rendered.iter().filter_map(|d| d["kind"].as_str()).collect();
    let want = "ClusterRole ClusterRoleBinding Deployment NetworkPolicy Service ServiceAccount";
    assert_eq!(kinds, want.split(' ').collect());
    typed(&rendered);
    let want: Deployment = one(&base, "Deployment");
    let got: Deployment = one(&rendered, "Deployment");
    let chart_spec = serde_yaml::to_string(&got.spec).unwrap_or_default();
    assert!(
        got.spec == want.spec,
        "the chart's Deployment is not the base's:\n{chart_spec}"
    );

    let role = named_doc(&rendered, "ClusterRole", "handoff-controller");
    assert_eq!(role["rules"], find(&base, "ClusterRole")["rules"]);
    // The Kubeflow roles: the base's, with the chart's labels; off with kubeflowRoles: false.
    for want in kubeflow_roles() {
        let name = s(&want["metadata"]["name"]);
        let got = named_doc(&rendered, "ClusterRole", name);
        assert_eq!(got["rules"], want["rules"], "{name}");
        assert!(
            contains(&got["metadata"]["labels"], &want["metadata"]["labels"]),
            "{name}"
        );
    }
    let mut without = values.clone();
    without["kubeflowRoles"] = json!(false);
    let roles = chart(&without)
        .iter()
        .filter(|d| d["kind"] == "ClusterRole")
        .count();
    assert_eq!(
        roles, 1,
        "kubeflowRoles: false leaves only the controller's"
    );
    for kind in ["Service", "NetworkPolicy"] {
        assert_eq!(find(&rendered, kind)["spec"], find(&base, kind)["spec"]);
    }
    let account = &find(&rendered, "ServiceAccount")["metadata"];
    let deployment = &find(&rendered, "Deployment")["metadata"];
    for namespace in [&account["namespace"], &deployment["namespace"]] {
        assert_eq!(namespace, "handoff-system");
    }
    let binding = find(&rendered, "ClusterRoleBinding");
    let want = json!({
        "roleRef": {"kind": "ClusterRole", "name": role["metadata"]["name"]},
        "subjects": [{"kind": "ServiceAccount", "name": account["name"], "namespace": "handoff-system"}],
    });
    assert!(contains(binding, &want), "{binding:#}");

    // Values reach the pod.
    let mut custom = values.clone();
    custom["image"]["tag"] = json!("9.9.9");
    custom["serverImage"] = json!("registry.example.com/handoff:9.9.9");
    custom["watchNamespace"] = json!("team-a");
    custom["logLevel"] = json!("debug");
    let custom = chart(&custom);
    let container = &find(&custom, "Deployment")["spec"]["template"]["spec"]["containers"][0];
    let want = json!({
        "image": "ghcr.io/handoff-dev/handoff:9.9.9",
        "args": ["controller", "--server-image=registry.example.com/handoff:9.9.9",
            "--http-listen=0.0.0.0:8080", "--poll-interval=5s", "--namespace=team-a"],
        "env": [{"name": "RUST_LOG", "value": "debug"}],
    });
    assert!(contains(container, &want), "{container:#}");
}

#[test]
fn the_chart_monitors_the_controller_and_every_link_server_only_when_asked() {
    let values = yaml(&format!("{CHART}/values.yaml"));
    assert_eq!(values["metrics"]["serviceMonitor"]["enabled"], json!(false));
    let monitors = |docs: &[Value]| -> Vec<String> {
        let kinds = docs.iter().filter_map(|d| d["kind"].as_str());
        kinds
            .filter(|k| k.ends_with("Monitor"))
            .map(String::from)
            .collect()
    };
    assert!(monitors(&chart(&values)).is_empty(), "off by default");

    let mut on = values.clone();
    on["metrics"]["serviceMonitor"] = json!({"enabled": true, "interval": "15s",
        "labels": {"release": "kube-prometheus-stack"}});
    let rendered = chart(&on);
    assert_eq!(monitors(&rendered), ["ServiceMonitor", "PodMonitor"]);
    for kind in ["ServiceMonitor", "PodMonitor"] {
        let doc = find(&rendered, kind);
        assert_eq!(doc["apiVersion"], "monitoring.coreos.com/v1");
        assert_eq!(doc["metadata"]["namespace"], "handoff-system");
        let label = &doc["metadata"]["labels"]["release"];
        assert_eq!(label, "kube-prometheus-stack", "{kind}: the values' labels");
    }

    // The ServiceMonitor picks the controller's metrics Service, and its port, by name.
    let monitor = &find(&rendered, "ServiceMonitor")["spec"];
    let service = find(&rendered, "Service");
    let selector = &monitor["selector"]["matchLabels"];
    assert!(
        contains(&service["metadata"]["labels"], selector),
        "{selector} selects the metrics Service"
    );
    let matched = &monitor["namespaceSelector"]["matchNames"];
    assert_eq!(matched, &json!([service["metadata"]["namespace"]]));
    let endpoint = json!([{"port": "http", "path": "/metrics", "interval": "15s"}]);
    assert!(contains(&monitor["endpoints"], &endpoint), "{monitor:#}");
    let ports = service["spec"]["ports"].as_array().expect("ports");
    assert!(
        ports
            .iter()
            .any(|p| p["name"] == "http" && p["port"] == 8080)
    );

    // The PodMonitor picks every link's server pods, in any namespace, by the labels and port
    // name the controller gives them.
    let monitor = &find(&rendered, "PodMonitor")["spec"];
    assert_eq!(monitor["namespaceSelector"], json!({"any": true}));
    let link: DataLink =
        serde_json::from_value(docs(&read("examples/k8s/datalink.yaml"), "link")[0].clone())
            .expect("the example DataLink");
    let deployment = handoff_controller::resources::server_deployment(&link, "x", true)
        .expect("the example's server");
    let pod = serde_json::to_value(deployment.spec.expect("spec").template).expect("pod");
    let selector = &monitor["selector"]["matchLabels"];
    assert!(
        contains(&pod["metadata"]["labels"], selector),
        "{selector} selects the server pods: {:#}",
        pod["metadata"]
    );
    let ports = &pod["spec"]["containers"][0]["ports"];
    let http = json!(handoff_controller::resources::HTTP_PORT);
    let named = ports
        .as_array()
        .expect("ports")
        .iter()
        .find(|p| p["name"] == "http");
    assert_eq!(named.map(|p| &p["containerPort"]), Some(&http), "{ports}");
    let endpoint = json!([{"port": "http", "path": "/metrics", "interval": "15s"}]);
    assert!(
        contains(&monitor["podMetricsEndpoints"], &endpoint),
        "{monitor:#}"
    );

    // Without labels, only the chart's.
    on["metrics"]["serviceMonitor"]["labels"] = json!({});
    let rendered = chart(&on);
    let labels = &find(&rendered, "PodMonitor")["metadata"]["labels"];
    assert!(labels.get("release").is_none(), "{labels}");
}

/// What the controller calls, and nothing else: `group resource: verbs` (`core` is "").
const RULES: &str = "
    handoff.kubeflow.org datalinks: get list watch patch update
    handoff.kubeflow.org datalinks/status: get patch update
    handoff.kubeflow.org datalinks/finalizers: update
    apps deployments: get list watch create patch delete
    apps statefulsets: get list watch create patch delete
    core services: get list watch create patch delete
    core secrets: get create patch delete
    networking.k8s.io networkpolicies: get create patch delete
    events.k8s.io events: create patch
    sparkoperator.k8s.io sparkapplications: get list watch patch
    kubeflow.org pytorchjobs: get list watch patch
    trainer.kubeflow.org trainjobs: get list watch patch
    kueue.x-k8s.io admissionchecks: get list watch
    kueue.x-k8s.io workloads: get list watch
    kueue.x-k8s.io admissionchecks/status: get patch
    kueue.x-k8s.io workloads/status: get patch";

#[test]
fn the_base_grants_exactly_the_controllers_rules_and_runs_it_locked_down() {
    let base = base();
    let mut got = Vec::new();
    let role: ClusterRole = one(&base, "ClusterRole");
    for rule in role.rules.unwrap_or_default() {
        assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none());
        let verbs = rule.verbs.join(" ");
        for group in rule.api_groups.unwrap_or_default() {
            for resource in rule.resources.iter().flatten() {
                let group = if group.is_empty() { "core" } else { &group };
                got.push(format!("{group} {resource}: {verbs}"));
            }
        }
    }
    assert!(!got.iter().any(|r| r.contains('*')), "{got:#?}");
    let want: Vec<&str> = RULES.trim().lines().map(str::trim).collect();
    assert_eq!(got, want, "deploy/base/rbac.yaml's ClusterRole");

    typed(&base);
    let binding = find(&base, "ClusterRoleBinding");
    let want = json!({
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "handoff-controller"},
        "subjects": [{"kind": "ServiceAccount", "name": "handoff-controller", "namespace": "handoff-system"}],
    });
    assert!(contains(binding, &want), "{binding:#}");

    // One replica, replaced not rolled (no leader election yet); the pod label per-link server
    // NetworkPolicies admit; non-root, read-only, no capabilities; probes on the http port.
    let deployment = find(&base, "Deployment");
    let image = "ghcr.io/handoff-dev/handoff:0.1.0";
    let want = json!({"metadata": {"namespace": "handoff-system"}, "spec": {
        "replicas": 1,
        "strategy": {"type": "Recreate"},
        "template": {
            "metadata": {"labels": {"app.kubernetes.io/name": "handoff-controller"}},
            "spec": {
                "serviceAccountName": "handoff-controller",
                "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532,
                    "seccompProfile": {"type": "RuntimeDefault"}},
                "containers": [{
                    "image": image,
                    "securityContext": {"allowPrivilegeEscalation": false,
                        "readOnlyRootFilesystem": true, "runAsNonRoot": true,
                        "capabilities": {"drop": ["ALL"]}},
                    "ports": [{"name": "http", "containerPort": 8080}],
                    "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}},
                    "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}},
                    "resources": {"requests": {"cpu": "100m", "memory": "128Mi"},
                        "limits": {"memory": "256Mi"}},
                }],
            },
        },
    }});
    assert!(contains(deployment, &want), "{deployment:#}");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let args = container["args"].as_array().expect("args");
    assert_eq!(args[0], "controller");
    assert!(args.contains(&json!(format!("--server-image={image}"))));
    let for_tests = args.iter().any(|a| s(a).contains("endpoint-override"));
    assert!(!for_tests, "--endpoint-override is for tests");
}

/// Problems of `value` against an OpenAPI v3 schema: fields the schema does not have (the API
/// server would drop them without a word), wrong types, values outside an enum, missing fields.
fn schema_problems(value: &Value, schema: &Value, at: &str, problems: &mut Vec<String>) {
    if schema["x-kubernetes-preserve-unknown-fields"] == true {
        return;
    }
    let type_ok = match (schema["type"].as_str(), value) {
        _ if schema["x-kubernetes-int-or-string"] == true => value.is_i64() || value.is_string(),
        (None, _) | (Some("object"), Value::Object(_)) | (Some("array"), Value::Array(_)) => true,
        (Some("string"), Value::String(_)) | (Some("boolean"), Value::Bool(_)) => true,
        (Some("integer"), v) => v.is_i64(),
        (Some("number"), v) => v.is_number(),
        _ => false,
    };
    if !type_ok {
        return problems.push(format!("{at}: {value} is not a {}", schema["type"]));
    }
    if let Some(options) = schema["enum"].as_array().filter(|o| !o.contains(value)) {
        problems.push(format!("{at}: {value} is not one of {options:?}"));
    }
    if let Value::Array(items) = value {
        for (i, item) in items.iter().enumerate() {
            schema_problems(item, &schema["items"], &format!("{at}[{i}]"), problems);
        }
    }
    let Value::Object(map) = value else { return };
    for key in schema["required"].as_array().into_iter().flatten() {
        if !map.contains_key(key.as_str().unwrap_or_default()) {
            problems.push(format!("{at}: required field {key} is missing"));
        }
    }
    for (key, child) in map {
        let child_schema = match (&schema["properties"][key], &schema["additionalProperties"]) {
            (s @ Value::Object(_), _) | (_, s @ Value::Object(_)) => s,
            (_, Value::Bool(true)) => continue,
            _ => {
                problems.push(format!("{at}.{key}: no such field"));
                continue;
            }
        };
        schema_problems(child, child_schema, &format!("{at}.{key}"), problems);
    }
}

/// The problems of `object`'s spec against the schema of its apiVersion in `crd_file`.
fn spec_problems(object: &Value, crd_file: &str) -> Vec<String> {
    let crd = &docs(&read(crd_file), crd_file)[0]["spec"];
    let versions = crd["versions"].as_array().into_iter().flatten();
    let group = crd["group"].as_str().unwrap_or_default();
    let version = versions.filter(|v| v["served"] == true).find(|v| {
        let name = v["name"].as_str().unwrap_or_default();
        object["apiVersion"] == format!("{group}/{name}") && object["kind"] == crd["names"]["kind"]
    });
    let Some(version) = version else {
        return vec![format!("{crd_file} serves no such apiVersion and kind")];
    };
    let schema = &version["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let mut problems = Vec::new();
    schema_problems(&object["spec"], schema, "spec", &mut problems);
    problems
}

#[test]
fn the_examples_parse_name_each_other_are_suspended_and_fit_the_upstream_schemas() {
    let (mut all, mut problems) = (Vec::new(), Vec::new());
    for name in files("examples/k8s")
        .into_iter()
        .filter(|n| n.ends_with(".yaml"))
    {
        for doc in docs(&read(&format!("examples/k8s/{name}")), &name) {
            let what = format!(
                "{name}: {} {}",
                s(&doc["kind"]),
                s(&doc["metadata"]["name"])
            );
            let crd = match s(&doc["kind"]) {
                "DataLink" => CRD.to_string(),
                "SparkApplication" => {
                    format!("{UPSTREAM}/sparkoperator.k8s.io_sparkapplications.yaml")
                }
                "PyTorchJob" => format!("{UPSTREAM}/kubeflow.org_pytorchjobs.yaml"),
                "TrainJob" => format!("{UPSTREAM}/trainer.kubeflow.org_trainjobs.yaml"),
                "ConfigMap" | "Secret" => String::new(),
                other => panic!("{what}: nothing checks a {other}; add it here"),
            };
            typed(std::slice::from_ref(&doc));
            if !crd.is_empty() {
                let found = spec_problems(&doc, &crd);
                problems.extend(found.iter().map(|p| format!("{what}: {p}")));
            }
            all.push(doc);
        }
    }
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));

    let named = |kind: &str, name: &str| {
        let mut candidates = all.iter().filter(|d| d["kind"] == kind);
        let found = candidates.find(|d| d["metadata"]["name"] == name);
        found.unwrap_or_else(|| panic!("no {kind} {name} among the examples"))
    };
    let links = all.iter().filter(|d| d["kind"] == "DataLink").cloned();
    let parse = |d| serde_json::from_value::<DataLink>(d).expect("a DataLink");
    let links: Vec<DataLink> = links.map(parse).collect();
    assert_eq!(links.len(), 2, "datalink.yaml and datalink-trainjob.yaml");
    let suspended = json!({"spec": {"suspend": true}});
    for link in &links {
        let namespace = json!({"metadata": {"namespace": link.metadata.namespace}});
        let spark = named("SparkApplication", &link.spec.producer.spark_application);
        let ok = contains(spark, &suspended) && contains(spark, &namespace);
        assert!(ok, "suspended, in the DataLink's namespace: {spark:#}");
        let (job, script) = match link.spec.consumer.target().expect("one consumer") {
            ConsumerRef::PyTorchJob(name) => {
                let job = named("PyTorchJob", name);
                let want = json!({"spec": {"runPolicy": {"suspend": true}}});
                assert!(contains(job, &want), "the PyTorchJob starts suspended");
                let replicas = &job["spec"]["pytorchReplicaSpecs"];
                for role in ["Master", "Worker"] {
                    let want = json!({"template": {"spec": {"containers": [{"name": "pytorch"}]}}});
                    assert!(contains(&replicas[role], &want), "{role}");
                }
                // The script comes from the ConfigMap the pods mount.
                let map = &replicas["Master"]["template"]["spec"]["volumes"][0]["configMap"];
                let map = named("ConfigMap", s(&map["name"]));
                (job, map["data"].to_string())
            }
            ConsumerRef::TrainJob(name) => {
                let job = named("TrainJob", name);
                assert!(contains(job, &suspended), "the TrainJob starts suspended");
                (job, job["spec"]["trainer"]["command"].to_string())
            }
        };
        assert!(contains(job, &namespace), "in the DataLink's namespace");
        assert!(
            script.contains("HandoffDataset("),
            "no HandoffDataset in {script}"
        );
        if let Some(secret) = &link.spec.server.spill_credentials_secret {
            let data = &named("Secret", secret)["stringData"];
            let keys = "AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_ENDPOINT AWS_REGION";
            for key in keys.split(' ') {
                assert!(data[key].is_string(), "Secret {secret} has no {key}");
            }
        }
    }
    // The SparkApplication runs the script its ConfigMap holds, and that writes to the link.
    let spark = &named("SparkApplication", "build-features")["spec"];
    let file = s(&spark["mainApplicationFile"]).trim_start_matches("local://");
    let (dir, key) = file.rsplit_once('/').expect("a path");
    assert_eq!(spark["driver"]["volumeMounts"][0]["mountPath"], dir);
    let map = named("ConfigMap", s(&spark["volumes"][0]["configMap"]["name"]));
    let write = r#".write.format("handoff").mode("append").save()"#;
    assert!(s(&map["data"][key]).contains(write), "{map:#}");
}

#[test]
fn kubectl_kustomize_builds_the_base() {
    let dir = repo().join("deploy/base");
    let mut kubectl = std::process::Command::new("kubectl");
    let output = match kubectl.arg("kustomize").arg(dir).output() {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return eprintln!("skipped: no kubectl on PATH to run `kubectl kustomize deploy/base`");
        }
        Err(e) => panic!("kubectl: {e}"),
    };
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "kubectl kustomize: {stderr}");
    let key = |d: &Value| format!("{}/{}", d["kind"], d["metadata"]["name"]).replace('"', "");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let mut got = docs(&stdout, "kubectl kustomize");
    let mut want = [base(), kubeflow_roles(), docs(&read(CRD), CRD)].concat();
    got.sort_by_key(key);
    want.sort_by_key(key);
    let names: Vec<String> = got.iter().map(key).collect();
    let expected = "ClusterRole/handoff-controller ClusterRole/kubeflow-datalink-admin \
        ClusterRole/kubeflow-datalink-edit ClusterRole/kubeflow-datalink-view \
        ClusterRoleBinding/handoff-controller CustomResourceDefinition/datalinks.handoff.kubeflow.org Deployment/handoff-controller \
        Namespace/handoff-system NetworkPolicy/handoff-controller \
        Service/handoff-controller-metrics ServiceAccount/handoff-controller";
    assert_eq!(names, expected.split(' ').collect::<Vec<_>>());
    assert!(got == want, "kustomize changed the base's objects");
}
