//! The generated CRD: the checked-in copy matches the code, and its schema only uses what both a
//! 1.20 API server and current ones accept.

use std::path::PathBuf;

use handoff_controller::{ConsumerRef, DataLink, Gate, MemoryPolicy, crd_yaml};
use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn deploy_crd_matches_the_code() {
    let path = repo().join("deploy/crds/handoff.kubeflow.org_datalinks.yaml");
    let generated = crd_yaml().expect("render");
    if std::env::var_os("HANDOFF_REGEN").is_some() {
        std::fs::write(&path, &generated).expect("write");
        // Helm installs the chart's crds/ first; tests/deploy.rs keeps the copy identical.
        let chart_copy =
            repo().join("deploy/helm/handoff/crds/handoff.kubeflow.org_datalinks.yaml");
        std::fs::write(chart_copy, &generated).expect("write the chart's copy");
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "{} is stale: regenerate it with `HANDOFF_REGEN=1 cargo test -p handoff-controller --test crd` \
         (or `handoff crd > {}`)",
        path.display(),
        path.display()
    );
}

/// Everything in the schema that a 1.20 server refuses, or that is not structural.
fn portability_problems(node: &Value, at: &str, problems: &mut Vec<String>) {
    match node {
        Value::Object(map) => {
            // CEL rules arrived in 1.23.
            if map.contains_key("x-kubernetes-validations") {
                problems.push(format!("{at}: x-kubernetes-validations"));
            }
            // 1.20 rejects an empty-string default as null.
            if map.get("default") == Some(&Value::String(String::new())) {
                problems.push(format!("{at}: default \"\""));
            }
            if map.get("x-kubernetes-list-type") == Some(&Value::String("map".into())) {
                problems.push(format!("{at}: list-type map"));
            }
            // Structural schemas: no combinators carrying types, every node typed.
            for combinator in ["oneOf", "anyOf", "allOf", "not"] {
                if map.contains_key(combinator) {
                    problems.push(format!("{at}: {combinator}"));
                }
            }
            if map.contains_key("properties") && map.get("type") != Some(&Value::from("object")) {
                problems.push(format!("{at}: properties without type: object"));
            }
            if map.contains_key("description") && !map.contains_key("type") && !at.is_empty() {
                problems.push(format!("{at}: no type"));
            }
            for (key, value) in map {
                portability_problems(value, &format!("{at}/{key}"), problems);
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                portability_problems(item, &format!("{at}/{i}"), problems);
            }
        }
        _ => {}
    }
}

#[test]
fn the_schema_installs_on_old_and_new_servers() {
    use kube::CustomResourceExt;
    let crd = serde_json::to_value(DataLink::crd()).expect("json");
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    let mut problems = Vec::new();
    portability_problems(schema, "", &mut problems);
    assert!(problems.is_empty(), "{problems:#?}");
    let version = &crd["spec"]["versions"][0];
    assert_eq!(version["subresources"]["status"], serde_json::json!({}));
    assert_eq!(crd["spec"]["scope"], "Namespaced");
}

#[test]
fn the_example_manifest_parses_and_names_one_consumer() {
    let text = std::fs::read_to_string(repo().join("examples/k8s/datalink.yaml")).expect("read");
    let link: DataLink = serde_yaml::from_str(&text).expect("a DataLink");
    assert_eq!(link.spec.producer.spark_application, "build-features");
    assert_eq!(
        link.spec.consumer.target(),
        Ok(ConsumerRef::PyTorchJob("train-ranker"))
    );
    assert_eq!(link.spec.policy.gate, Gate::Sealed);
    assert_eq!(link.spec.policy.memory_policy, MemoryPolicy::Spill);

    let mut both = link.spec.consumer.clone();
    both.train_job = Some("t".into());
    assert!(
        both.target()
            .expect_err("two consumers")
            .contains("name one")
    );
    let none = handoff_controller::Consumer::default();
    assert!(
        none.target()
            .expect_err("no consumer")
            .contains("pytorchJob or trainJob")
    );
}

#[test]
fn a_minimal_spec_takes_the_defaults() {
    let link: DataLink = serde_yaml::from_str(
        "apiVersion: handoff.kubeflow.org/v1alpha1\nkind: DataLink\nmetadata: {name: m}\n\
         spec: {producer: {sparkApplication: s}, consumer: {trainJob: t}}\n",
    )
    .expect("parse");
    assert_eq!(link.spec.policy.gate, Gate::Sealed);
    assert_eq!(link.spec.policy.memory_policy, MemoryPolicy::Spill);
    assert_eq!(link.spec.server.replicas, None);
    assert_eq!(link.spec.consumer.target(), Ok(ConsumerRef::TrainJob("t")));
}
