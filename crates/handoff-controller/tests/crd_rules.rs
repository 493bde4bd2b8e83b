//! The controller's writes to other projects' resources, held to the CEL rules of their upstream
//! CRDs (`tests/fixtures/upstream`, verbatim copies; see SOURCES.md there). The 1.20 API server in
//! the end-to-end tests ignores these rules; a current cluster enforces them. The writes are made
//! by the same functions the reconciler calls, applied as the API server applies a merge patch.

mod common;

use common::crd_rules::{CrdRules, check_history, merge_patch};
use common::fixture;
use handoff_controller::ConsumerRef;
use handoff_controller::workloads::{
    self, RUNTIME_PATCH_MANAGER, consumer_patch, plain_env, secret_env, spark_patch,
};
use serde_json::{Value, json};

fn env(link: &str) -> Vec<Value> {
    vec![
        plain_env(
            "HANDOFF_ENDPOINT",
            "grpc+tls://features-handoff.ns.svc:8815",
        ),
        plain_env("HANDOFF_LINK", link),
        secret_env("HANDOFF_TOKEN", "features-handoff-tokens", "reader-token"),
        secret_env("HANDOFF_TLS_CA_PEM", "features-handoff-tokens", "ca.crt"),
    ]
}

/// Apply a patch as the API server would, with the resourceVersion the server bumps.
fn applied(object: &Value, patch: &Value) -> Value {
    let mut next = merge_patch(object, patch);
    let version: u64 = object["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    next["metadata"]["resourceVersion"] = json!((version + 1).to_string());
    next
}

fn assert_clean(rules: &CrdRules, versions: &[Value]) {
    let violations = check_history(rules, versions);
    assert!(
        violations.is_empty(),
        "writes a current API server would refuse: {violations:#?}"
    );
}

fn train_job() -> Value {
    let mut job = fixture("examples/trainjob-01-multi-node.yaml");
    job["metadata"] = json!({"name": "trainer", "namespace": "ns", "resourceVersion": "1"});
    job["spec"]["suspend"] = json!(true);
    job
}

fn trainjob_rules() -> CrdRules {
    CrdRules::of(&fixture("trainer.kubeflow.org_trainjobs.yaml"), "v1alpha1")
}

#[test]
fn the_checker_evaluates_every_rule_of_the_crds_we_patch() {
    // A rule that does not compile would be skipped silently by a weaker checker: every rule of
    // each CRD runs on a sample object here without a compile error.
    for (file, version) in [
        ("trainer.kubeflow.org_trainjobs.yaml", "v1alpha1"),
        ("kubeflow.org_pytorchjobs.yaml", "v1"),
        ("sparkoperator.k8s.io_sparkapplications.yaml", "v1beta2"),
    ] {
        let rules = CrdRules::of(&fixture(file), version);
        for (path, rule) in rules.rules() {
            assert!(
                cel::Program::compile(&rule).is_ok(),
                "{file} {path}: `{rule}` does not compile"
            );
        }
    }
    for file in [
        "kueue.x-k8s.io_workloads.yaml",
        "kueue.x-k8s.io_admissionchecks.yaml",
    ] {
        let rules = CrdRules::of(&common::shared_crd(file), "v1beta2");
        assert!(!rules.rules().is_empty(), "{file} has CEL rules");
        for (path, rule) in rules.rules() {
            assert!(
                cel::Program::compile(&rule).is_ok(),
                "{file} {path}: `{rule}` does not compile"
            );
        }
    }
    let rules = trainjob_rules().rules();
    let immutable: Vec<&str> = rules
        .iter()
        .filter(|(_, rule)| rule == "self == oldSelf")
        .map(|(path, _)| path.as_str())
        .collect();
    for path in [
        ".spec.trainer",
        ".spec.initializer",
        ".spec.runtimeRef",
        ".spec.managedBy",
        ".spec.runtimePatches[].manager",
        ".spec.runtimePatches[].trainingRuntimeSpec.template.spec.replicatedJobs[].template.spec.template.spec.containers",
    ] {
        assert!(immutable.contains(&path), "{path} is immutable upstream");
    }
}

#[test]
fn the_checker_refuses_what_a_current_api_server_refuses() {
    let rules = trainjob_rules();
    let job = train_job();
    // What this controller used to write: env in spec.trainer.
    let patch = json!({"spec": {"trainer": {"env": env("features")}}});
    let violations = rules.check_update(&job, &applied(&job, &patch));
    assert!(
        violations
            .iter()
            .any(|v| v.path == ".spec.trainer" && v.message == "field is immutable"),
        "{violations:#?}"
    );
    // Changing the containers of an existing runtime patch entry in place.
    let wired = applied(
        &job,
        &consumer_patch(&ConsumerRef::TrainJob("trainer"), &job, &env("a"), false)
            .expect("wires")
            .expect("a patch"),
    );
    let mut changed = wired.clone();
    changed["spec"]["runtimePatches"][0] = workloads::runtime_patch(&env("b"));
    let violations = rules.check_update(&wired, &changed);
    assert!(
        violations.iter().any(|v| v.path.ends_with(".containers")),
        "{violations:#?}"
    );
    // And a rule without oldSelf, on create.
    let mut bad = train_job();
    bad["metadata"]["name"] = json!("Trainer_1");
    assert!(!rules.check_create(&bad).is_empty());
    assert!(rules.check_create(&train_job()).is_empty());
}

#[test]
fn a_trainjob_is_wired_rewired_and_released_within_its_crd_rules() {
    let rules = trainjob_rules();
    let consumer = ConsumerRef::TrainJob("trainer");
    let mut job = train_job();
    // Kueue's webhook adds its own entry, with containers, before we see the job.
    job["spec"]["runtimePatches"] = json!([{
        "manager": "kueue.x-k8s.io/manager",
        "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [{"name": "node",
            "template": {"spec": {"template": {"spec": {
                "containers": [{"name": "node", "env": [{"name": "KUEUE", "value": "1"}]}],
                "nodeSelector": {"pool": "a"}}}}}}]}}}
    }]);
    let mut versions = vec![job.clone()];
    let write = |versions: &mut Vec<Value>, link: &str, release: bool| -> bool {
        let last = versions.last().expect("a version").clone();
        match consumer_patch(&consumer, &last, &env(link), release).expect("wires") {
            Some(patch) => {
                versions.push(applied(&last, &patch));
                true
            }
            None => false,
        }
    };
    assert!(write(&mut versions, "features", false), "wired");
    assert!(!write(&mut versions, "features", false), "idempotent");
    // The link's settings change while the job waits: removed, then written anew.
    assert!(write(&mut versions, "renamed", true), "stale entry removed");
    assert!(
        versions.last().expect("v")["spec"]["suspend"] == true,
        "not released without the env"
    );
    assert!(write(&mut versions, "renamed", true), "rewired");
    assert_eq!(versions.last().expect("v")["spec"]["suspend"], true);
    assert!(write(&mut versions, "renamed", true), "released");
    assert_eq!(versions.last().expect("v")["spec"]["suspend"], false);
    assert!(!write(&mut versions, "renamed", true), "nothing more");
    // Kueue, for its part, writes its entry again at admission (the time field moves).
    let mut admitted = versions.last().expect("v").clone();
    admitted["spec"]["runtimePatches"][0]["time"] = json!("2026-12-02T00:00:00Z");
    versions.push(admitted);
    assert_clean(&rules, &versions);
    let last = versions.last().expect("v");
    let ours: Vec<&Value> = last["spec"]["runtimePatches"]
        .as_array()
        .expect("list")
        .iter()
        .filter(|p| p["manager"] == RUNTIME_PATCH_MANAGER)
        .collect();
    assert_eq!(ours.len(), 1);
    assert_eq!(last["spec"]["trainer"], train_job()["spec"]["trainer"]);
}

#[test]
fn pytorchjob_and_sparkapplication_writes_keep_their_crd_rules() {
    let pytorch = CrdRules::of(&fixture("kubeflow.org_pytorchjobs.yaml"), "v1");
    let mut job = fixture("examples/pytorchjob-simple.yaml");
    job["metadata"] = json!({"name": "trainer", "namespace": "ns", "resourceVersion": "1"});
    job["spec"]["runPolicy"] = json!({"suspend": true, "schedulingPolicy": {"queue": "q"}});
    let consumer = ConsumerRef::PyTorchJob("trainer");
    let wired = applied(
        &job,
        &consumer_patch(&consumer, &job, &env("features"), false)
            .expect("wires")
            .expect("patch"),
    );
    let released = applied(
        &wired,
        &consumer_patch(&consumer, &wired, &env("features"), true)
            .expect("wires")
            .expect("patch"),
    );
    assert_eq!(released["spec"]["runPolicy"]["suspend"], false);
    assert_clean(&pytorch, &[job, wired, released]);

    let spark_rules = CrdRules::of(
        &fixture("sparkoperator.k8s.io_sparkapplications.yaml"),
        "v1beta2",
    );
    let mut spark = fixture("examples/spark-pi.yaml");
    spark["metadata"] = json!({"name": "producer", "namespace": "ns", "resourceVersion": "1"});
    spark["spec"]["suspend"] = json!(true);
    let wired = applied(
        &spark,
        &spark_patch(&spark, &env("features"), true).expect("patch"),
    );
    assert_clean(&spark_rules, &[spark, wired]);
}

/// A Workload as Kueue keeps it once quota is reserved and the job admitted to a flavor, with
/// our check and another controller's listed.
fn admitted_workload() -> Value {
    json!({
        "apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "Workload",
        "metadata": {"name": "pytorchjob-trainer-1a2b3", "namespace": "ns", "resourceVersion": "5"},
        "spec": {"queueName": "team-a", "podSets": [
            {"name": "master", "count": 1, "template": {"spec": {"containers": [{"name": "c", "image": "x"}]}}},
            {"name": "worker", "count": 2, "template": {"spec": {"containers": [{"name": "c", "image": "x"}]}}}]},
        "status": {
            "conditions": [{"type": "QuotaReserved", "status": "True", "reason": "QuotaReserved",
                "message": "", "lastTransitionTime": "2026-12-02T00:00:00Z"}],
            "admission": {"clusterQueue": "cq", "podSetAssignments": [
                {"name": "master", "count": 1}, {"name": "worker", "count": 2}]},
            "admissionChecks": [
                {"name": "prov", "state": "Pending", "message": "", "lastTransitionTime": "2026-12-02T00:00:00Z"},
                {"name": "data-ready", "state": "Pending", "message": "", "lastTransitionTime": "2026-12-02T00:00:00Z"}]}
    })
}

#[test]
fn our_kueue_writes_keep_the_workload_and_admission_check_rules() {
    use handoff_controller::kueue::{self, CheckState, Checks};
    let workload_rules = CrdRules::of(
        &common::shared_crd("kueue.x-k8s.io_workloads.yaml"),
        "v1beta2",
    );
    let ours = vec!["data-ready".to_string()];
    let mut versions = vec![admitted_workload()];
    for (state, message) in [
        (
            CheckState::Pending,
            "DataLink features holds PyTorchJob trainer until the link is sealed",
        ),
        (
            CheckState::Ready,
            "DataLink features: the link is sealed; PyTorchJob trainer may start",
        ),
    ] {
        let last = versions.last().expect("v").clone();
        let Checks::Listed(Some(patch)) =
            kueue::set_checks(&last, &ours, state, message, "2026-12-02T00:01:00Z")
        else {
            panic!("a write");
        };
        versions.push(applied(&last, &patch));
    }
    assert_clean(&workload_rules, &versions);
    assert_eq!(
        versions.last().expect("v")["status"]["admissionChecks"][0]["name"],
        "prov"
    );
    // The checker sees these rules: a Workload whose assignments do not match its pod sets fails.
    let mut broken = admitted_workload();
    broken["status"]["admission"]["podSetAssignments"] = json!([{"name": "master", "count": 1}]);
    assert!(!workload_rules.check_create(&broken).is_empty());

    let check_rules = CrdRules::of(
        &common::shared_crd("kueue.x-k8s.io_admissionchecks.yaml"),
        "v1beta2",
    );
    let check = json!({"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "AdmissionCheck",
        "metadata": {"name": "data-ready", "generation": 1, "resourceVersion": "1"},
        "spec": {"controllerName": kueue::CONTROLLER_NAME}});
    let patch = kueue::active_patch(&check, "2026-12-02T00:00:00Z").expect("patch");
    let active = applied(&check, &patch);
    assert_clean(&check_rules, &[check, active]);
}
