//! Reading and patching the user's jobs: the SparkApplication that writes and the PyTorchJob or
//! TrainJob that reads. They are other operators' custom resources, so they are handled as JSON,
//! and every patch touches only the env entries named here and the suspend flag.
//!
//! Patches are JSON merge patches that carry the object's `resourceVersion`: a merge patch replaces
//! a whole list, and the version makes the API server refuse it (409) if anyone changed the object
//! since we read it, so a user's own env entries are never lost.

use kube::api::ApiResource;
use serde_json::{Map, Value, json};

use crate::crd::ConsumerRef;

pub fn spark_application() -> ApiResource {
    resource(
        "sparkoperator.k8s.io",
        "v1beta2",
        "SparkApplication",
        "sparkapplications",
    )
}

pub fn pytorch_job() -> ApiResource {
    resource("kubeflow.org", "v1", "PyTorchJob", "pytorchjobs")
}

pub fn train_job() -> ApiResource {
    resource("trainer.kubeflow.org", "v1alpha1", "TrainJob", "trainjobs")
}

fn resource(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: group.into(),
        version: version.into(),
        api_version: format!("{group}/{version}"),
        kind: kind.into(),
        plural: plural.into(),
    }
}

pub fn consumer_resource(consumer: &ConsumerRef<'_>) -> ApiResource {
    match consumer {
        ConsumerRef::PyTorchJob(_) => pytorch_job(),
        ConsumerRef::TrainJob(_) => train_job(),
    }
}

/// An env entry whose value is read from the link's token Secret.
pub fn secret_env(name: &str, secret: &str, key: &str) -> Value {
    json!({"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": false}}})
}

pub fn plain_env(name: &str, value: &str) -> Value {
    json!({"name": name, "value": value})
}

/// `current` with each of `ours` replacing the entry of the same name in place, or appended.
/// Entries the user wrote keep their order. `None` when nothing would change.
pub fn merged_env(current: Option<&Value>, ours: &[Value]) -> Option<Vec<Value>> {
    let mut env: Vec<Value> = current
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let before = env.clone();
    for var in ours {
        let name = &var["name"];
        match env.iter_mut().find(|e| &e["name"] == name) {
            Some(existing) => *existing = var.clone(),
            None => env.push(var.clone()),
        }
    }
    (env != before || current.is_none_or(|c| !c.is_array())).then_some(env)
}

/// What the Spark Operator says about the application (`status.applicationState.state`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProducerState {
    /// Not submitted yet, or no state recorded.
    NotStarted,
    Running,
    Completed,
    Failed(String),
}

pub fn producer_state(spark: &Value) -> ProducerState {
    let state = &spark["status"]["applicationState"];
    match state["state"].as_str().unwrap_or("") {
        "COMPLETED" => ProducerState::Completed,
        "FAILED" | "SUBMISSION_FAILED" => {
            let what = state["state"].as_str().unwrap_or_default();
            match state["errorMessage"].as_str().filter(|m| !m.is_empty()) {
                Some(message) => ProducerState::Failed(format!("{what}: {message}")),
                None => ProducerState::Failed(what.to_string()),
            }
        }
        "" | "NEW" => ProducerState::NotStarted,
        // SUBMITTED, RUNNING, PENDING_RERUN, SUCCEEDING, FAILING, INVALIDATING, UNKNOWN: in flight.
        _ => ProducerState::Running,
    }
}

pub fn spark_suspended(spark: &Value) -> bool {
    spark["spec"]["suspend"].as_bool().unwrap_or(false)
}

/// The merge patch that puts `ours` into the driver's and the executors' env, and unsuspends the
/// application when `unsuspend`. `None` when the application already looks like that.
pub fn spark_patch(spark: &Value, ours: &[Value], unsuspend: bool) -> Option<Value> {
    let mut spec = Map::new();
    for role in ["driver", "executor"] {
        if let Some(env) = merged_env(spark["spec"][role].get("env"), ours) {
            spec.insert(role.into(), json!({ "env": env }));
        }
    }
    if unsuspend && spark_suspended(spark) {
        spec.insert("suspend".into(), Value::Bool(false));
    }
    (!spec.is_empty()).then(|| with_version(spark, json!({ "spec": spec })))
}

/// Whether our rerun of the application has started: it is not suspended and its env already
/// carries `ours`, whose `HANDOFF_PRODUCER_RERUN` only the rerun's own patch writes.
pub fn rerun_started(spark: &Value, ours: &[Value]) -> bool {
    !spark_suspended(spark) && spark_patch(spark, ours, false).is_none()
}

/// Whether the application ended (COMPLETED, FAILED, SUBMISSION_FAILED). The Spark Operator
/// ignores `spec.suspend` on such an application; a change to its spec other than suspend
/// reruns it (state INVALIDATING, then PENDING_RERUN).
pub fn spark_terminated(spark: &Value) -> bool {
    matches!(
        spark["status"]["applicationState"]["state"]
            .as_str()
            .unwrap_or(""),
        "COMPLETED" | "FAILED" | "SUBMISSION_FAILED"
    )
}

/// The merge patch that suspends the application, for a rerun; `None` when it is suspended or
/// has ended. An ended one must not be suspended: its rerun would stop in SUSPENDING.
pub fn spark_suspend_patch(spark: &Value) -> Option<Value> {
    (!spark_suspended(spark) && !spark_terminated(spark))
        .then(|| with_version(spark, json!({"spec": {"suspend": true}})))
}

/// Whether a rerun may be started: the Spark Operator has stopped the application after a
/// suspend (state SUSPENDED), it never ran, or it ended. Unsuspending it, with the new
/// `HANDOFF_PRODUCER_RERUN` in its env, then runs it from the start.
pub fn spark_stopped(spark: &Value) -> bool {
    spark_terminated(spark)
        || matches!(
            spark["status"]["applicationState"]["state"]
                .as_str()
                .unwrap_or(""),
            "" | "NEW" | "SUSPENDED"
        )
}

pub fn consumer_suspended(consumer: &ConsumerRef<'_>, job: &Value) -> bool {
    let flag = match consumer {
        ConsumerRef::PyTorchJob(_) => &job["spec"]["runPolicy"]["suspend"],
        ConsumerRef::TrainJob(_) => &job["spec"]["suspend"],
    };
    flag.as_bool().unwrap_or(false)
}

/// The merge patch that puts `ours` into every container of every PyTorchJob replica template, or
/// into a TrainJob's trainer through our `spec.runtimePatches` entry, and unsuspends the job when
/// `unsuspend`. `None` when the job already looks like that. `Err` says why the job cannot be
/// wired, in a sentence for the DataLink's conditions.
pub fn consumer_patch(
    consumer: &ConsumerRef<'_>,
    job: &Value,
    ours: &[Value],
    unsuspend: bool,
) -> Result<Option<Value>, String> {
    let unsuspend = unsuspend && consumer_suspended(consumer, job);
    let mut spec = Map::new();
    match consumer {
        ConsumerRef::PyTorchJob(_) => {
            let replicas = job["spec"]["pytorchReplicaSpecs"]
                .as_object()
                .filter(|r| !r.is_empty())
                .ok_or("spec.pytorchReplicaSpecs has no replica types")?;
            let mut patched = Map::new();
            for (role, replica) in replicas {
                let containers = replica["template"]["spec"]["containers"]
                    .as_array()
                    .filter(|c| !c.is_empty())
                    .ok_or_else(|| format!("replica {role} has no containers"))?;
                let mut changed = false;
                let containers: Vec<Value> = containers
                    .iter()
                    .map(|c| {
                        let mut c = c.clone();
                        if let Some(env) = merged_env(c.get("env"), ours) {
                            c["env"] = Value::Array(env);
                            changed = true;
                        }
                        c
                    })
                    .collect();
                if changed {
                    patched.insert(
                        role.clone(),
                        json!({"template": {"spec": {"containers": containers}}}),
                    );
                }
            }
            if !patched.is_empty() {
                spec.insert("pytorchReplicaSpecs".into(), Value::Object(patched));
            }
            if unsuspend {
                spec.insert("runPolicy".into(), json!({"suspend": false}));
            }
        }
        ConsumerRef::TrainJob(_) => {
            let (patches, wired) = train_job_runtime_patches(job, ours)?;
            if let Some(patches) = patches {
                spec.insert("runtimePatches".into(), Value::Array(patches));
            }
            if unsuspend && wired {
                spec.insert("suspend".into(), Value::Bool(false));
            }
        }
    }
    Ok((!spec.is_empty()).then(|| with_version(job, json!({ "spec": spec }))))
}

/// Whether `patch` (from [`consumer_patch`]) unsuspends the job.
pub fn releases(consumer: &ConsumerRef<'_>, patch: &Value) -> bool {
    let flag = match consumer {
        ConsumerRef::PyTorchJob(_) => &patch["spec"]["runPolicy"]["suspend"],
        ConsumerRef::TrainJob(_) => &patch["spec"]["suspend"],
    };
    flag == &Value::Bool(false)
}

/// Our entry's key in a TrainJob's `spec.runtimePatches`, a list keyed by manager.
pub const RUNTIME_PATCH_MANAGER: &str = "handoff.kubeflow.org/datalink";
/// Kubeflow Trainer's name for the trainer's replicated job and its container in the runtimes it
/// ships (`node`, the job labelled `trainer.kubeflow.org/trainjob-ancestor-step: trainer`).
pub const TRAINER_NODE: &str = "node";

/// Our runtime patch: `ours` in the env of the trainer node's container.
pub fn runtime_patch(ours: &[Value]) -> Value {
    let pod = json!({"spec": {"containers": [{"name": TRAINER_NODE, "env": ours}]}});
    json!({
        "manager": RUNTIME_PATCH_MANAGER,
        "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [
            {"name": TRAINER_NODE, "template": {"spec": {"template": pod}}}
        ]}}}
    })
}

/// The TrainJob's `spec.runtimePatches` with our entry in it (`None`: already there), and whether
/// the job is wired already, so that this write may release it.
///
/// The upstream CRD makes `spec.trainer` immutable (`self == oldSelf`), and with it the
/// containers of a runtime patch entry, and Kubeflow Trainer takes runtime patches only while the
/// job is suspended. So our entry is written once, whole, while suspended, next to the entries of
/// other managers (Kueue's), which are kept as they are. An entry that no longer matches the
/// link (its read settings changed) is removed while the job is still suspended, and the next
/// write adds the new one: a removal and an add are two updates, neither of which changes the
/// containers of an entry that exists on both sides.
type RuntimePatches = (Option<Vec<Value>>, bool);

fn train_job_runtime_patches(job: &Value, ours: &[Value]) -> Result<RuntimePatches, String> {
    let current: Vec<Value> = job["spec"]["runtimePatches"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let wanted = runtime_patch(ours);
    let position = current
        .iter()
        .position(|p| p["manager"] == RUNTIME_PATCH_MANAGER);
    let suspended = job["spec"]["suspend"].as_bool().unwrap_or(false);
    match position {
        Some(i) if current[i]["trainingRuntimeSpec"] == wanted["trainingRuntimeSpec"] => {
            Ok((None, true))
        }
        // Released already: the running trainer keeps the env it started with.
        Some(_) if !suspended => Ok((None, true)),
        // Not in the same write that releases the job: remove now, add on the next reconcile,
        // which then releases it.
        Some(i) => {
            let mut patches = current;
            patches.remove(i);
            Ok((Some(patches), false))
        }
        None if !suspended => Err(
            "the TrainJob is not suspended, and Kubeflow Trainer takes runtimePatches only while a \
             TrainJob is suspended; create it with spec.suspend: true"
                .into(),
        ),
        None if current.len() >= MAX_RUNTIME_PATCHES => Err(format!(
            "the TrainJob already has {MAX_RUNTIME_PATCHES} runtimePatches, the most its CRD allows; \
             remove one so the controller can add its own"
        )),
        None => {
            // Released by a later write: the job's runtime patches change only while the old
            // object is suspended.
            let mut patches = current;
            patches.push(wanted);
            Ok((Some(patches), false))
        }
    }
}

/// `maxItems` of `spec.runtimePatches` in the TrainJob CRD.
const MAX_RUNTIME_PATCHES: usize = 16;

fn with_version(object: &Value, mut patch: Value) -> Value {
    if let Some(version) = object["metadata"]["resourceVersion"].as_str() {
        patch["metadata"] = json!({ "resourceVersion": version });
    }
    patch
}

/// How far the training job got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsumerState {
    Waiting,
    Running,
    Succeeded,
    Failed(String),
}

fn condition<'a>(job: &'a Value, kind: &str) -> Option<&'a Value> {
    job["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind && c["status"] == "True")
}

pub fn consumer_state(consumer: &ConsumerRef<'_>, job: &Value) -> ConsumerState {
    let (succeeded, running) = match consumer {
        ConsumerRef::PyTorchJob(_) => ("Succeeded", condition(job, "Running").is_some()),
        ConsumerRef::TrainJob(_) => (
            "Complete",
            job["status"]["jobsStatus"].as_array().is_some_and(|jobs| {
                jobs.iter().any(|j| {
                    j["active"].as_i64().unwrap_or(0) + j["ready"].as_i64().unwrap_or(0) > 0
                })
            }),
        ),
    };
    if let Some(failed) = condition(job, "Failed") {
        let why = failed["message"]
            .as_str()
            .or(failed["reason"].as_str())
            .unwrap_or("Failed");
        return ConsumerState::Failed(why.to_string());
    }
    if condition(job, succeeded).is_some() {
        return ConsumerState::Succeeded;
    }
    if running {
        ConsumerState::Running
    } else {
        ConsumerState::Waiting
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ours() -> Vec<Value> {
        vec![
            plain_env("HANDOFF_LINK", "features"),
            secret_env("HANDOFF_TOKEN", "features-handoff-tokens", "writer-token"),
        ]
    }

    #[test]
    fn env_merges_in_place_keeps_the_users_entries_and_is_idempotent() {
        let current =
            json!([{"name": "A", "value": "1"}, {"name": "HANDOFF_LINK", "value": "old"}]);
        let merged = merged_env(Some(&current), &ours()).expect("changes");
        assert_eq!(merged[0], json!({"name": "A", "value": "1"}));
        assert_eq!(merged[1], plain_env("HANDOFF_LINK", "features"));
        assert_eq!(merged.len(), 3);
        assert_eq!(merged_env(Some(&Value::Array(merged)), &ours()), None);
        assert_eq!(merged_env(None, &ours()).map(|e| e.len()), Some(2));
    }

    #[test]
    fn spark_patch_carries_the_version_and_unsuspends_once() {
        let spark = json!({"metadata": {"resourceVersion": "7"},
            "spec": {"suspend": true, "driver": {"cores": 1}, "executor": {"env": [{"name": "X", "value": "y"}]}}});
        let patch = spark_patch(&spark, &ours(), true).expect("a patch");
        assert_eq!(patch["metadata"]["resourceVersion"], "7");
        assert_eq!(patch["spec"]["suspend"], false);
        assert_eq!(patch["spec"]["executor"]["env"][0]["name"], "X");
        assert!(
            patch["spec"]["driver"].get("cores").is_none(),
            "only env is sent"
        );
        let mut done = spark.clone();
        done["spec"]["suspend"] = json!(false);
        done["spec"]["driver"]["env"] = patch["spec"]["driver"]["env"].clone();
        done["spec"]["executor"]["env"] = patch["spec"]["executor"]["env"].clone();
        assert_eq!(spark_patch(&done, &ours(), true), None);
    }

    #[test]
    fn consumer_patches_reach_every_replica_container_or_the_trainer() {
        let job = json!({"metadata": {"resourceVersion": "3"}, "spec": {"runPolicy": {"suspend": true},
            "pytorchReplicaSpecs": {
                "Master": {"replicas": 1, "template": {"spec": {"containers": [{"name": "pytorch"}]}}},
                "Worker": {"replicas": 2, "template": {"spec": {"containers": [{"name": "pytorch"}, {"name": "sidecar", "env": []}]}}}}}});
        let consumer = ConsumerRef::PyTorchJob("train");
        let patch = consumer_patch(&consumer, &job, &ours(), false)
            .expect("ok")
            .expect("patch");
        let worker =
            &patch["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"];
        assert_eq!(worker[1]["name"], "sidecar");
        assert_eq!(worker[1]["env"].as_array().map(Vec::len), Some(2));
        assert!(
            patch["spec"].get("runPolicy").is_none(),
            "stays suspended until the gate opens"
        );
        let released = consumer_patch(&consumer, &job, &ours(), true)
            .expect("ok")
            .expect("patch");
        assert_eq!(released["spec"]["runPolicy"]["suspend"], false);

        let empty = json!({"spec": {"pytorchReplicaSpecs": {}}});
        assert!(consumer_patch(&consumer, &empty, &ours(), false).is_err());
    }

    #[test]
    fn a_trainjob_is_wired_through_one_runtime_patch_entry_written_while_suspended() {
        let kueue = json!({"manager": "kueue.x-k8s.io/manager", "trainingRuntimeSpec": {}});
        let train = json!({"metadata": {"resourceVersion": "4"}, "spec": {"suspend": true,
            "runtimeRef": {"name": "torch"}, "trainer": {"env": [{"name": "A", "value": "1"}]},
            "runtimePatches": [kueue]}});
        let trainer = ConsumerRef::TrainJob("t");
        let patch = consumer_patch(&trainer, &train, &ours(), false)
            .expect("ok")
            .expect("patch");
        assert!(
            patch["spec"].get("trainer").is_none(),
            "spec.trainer is immutable"
        );
        assert!(patch["spec"].get("suspend").is_none());
        let patches = patch["spec"]["runtimePatches"].as_array().expect("list");
        assert_eq!(
            patches[0], kueue,
            "other managers' entries stay as they are"
        );
        assert_eq!(patches[1], runtime_patch(&ours()));
        let job = &patches[1]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0];
        assert_eq!(job["name"], TRAINER_NODE);
        let container = &job["template"]["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(container["env"].as_array().map(Vec::len), Some(2));

        // The write that adds the entry does not release; the next one does, and only that.
        let first = consumer_patch(&trainer, &train, &ours(), true)
            .expect("ok")
            .expect("patch");
        assert!(first["spec"].get("suspend").is_none());
        // Wired: the release writes only suspend.
        let mut wired = train.clone();
        wired["spec"]["runtimePatches"] = patch["spec"]["runtimePatches"].clone();
        assert_eq!(consumer_patch(&trainer, &wired, &ours(), false), Ok(None));
        let released = consumer_patch(&trainer, &wired, &ours(), true)
            .expect("ok")
            .expect("patch");
        assert_eq!(released["spec"], json!({"suspend": false}));

        // The link's settings changed while suspended: the stale entry goes first, alone.
        let changed = vec![plain_env("HANDOFF_LINK", "other")];
        let removal = consumer_patch(&trainer, &wired, &changed, true)
            .expect("ok")
            .expect("patch");
        assert_eq!(removal["spec"]["runtimePatches"], json!([kueue]));
        assert!(
            removal["spec"].get("suspend").is_none(),
            "not released unwired"
        );

        // Released: nothing more is written, whatever changed.
        let mut running = wired.clone();
        running["spec"]["suspend"] = json!(false);
        assert_eq!(consumer_patch(&trainer, &running, &changed, true), Ok(None));

        // Never suspended, never wired: a sentence, no write.
        let mut unsuspended = train.clone();
        unsuspended["spec"]["suspend"] = json!(false);
        let why = consumer_patch(&trainer, &unsuspended, &ours(), false).expect_err("refused");
        assert!(why.contains("spec.suspend: true"), "{why}");
        let mut full = train.clone();
        full["spec"]["runtimePatches"] = Value::Array(
            (0..MAX_RUNTIME_PATCHES)
                .map(|i| json!({"manager": format!("m{i}")}))
                .collect(),
        );
        assert!(consumer_patch(&trainer, &full, &ours(), false).is_err());
    }

    #[test]
    fn release_is_read_from_the_patch() {
        let pt = ConsumerRef::PyTorchJob("p");
        assert!(releases(
            &pt,
            &json!({"spec": {"runPolicy": {"suspend": false}}})
        ));
        assert!(!releases(
            &pt,
            &json!({"spec": {"pytorchReplicaSpecs": {}}})
        ));
        let tj = ConsumerRef::TrainJob("t");
        assert!(releases(&tj, &json!({"spec": {"suspend": false}})));
        assert!(!releases(&tj, &json!({"spec": {"runtimePatches": []}})));
    }

    #[test]
    fn a_rerun_suspends_a_running_application_but_not_an_ended_one() {
        let spark = |state: &str, suspend: bool| {
            json!({"metadata": {"resourceVersion": "4"}, "spec": {"suspend": suspend},
                   "status": {"applicationState": {"state": state}}})
        };
        let patch = spark_suspend_patch(&spark("RUNNING", false)).expect("suspends");
        assert_eq!(patch["spec"]["suspend"], true);
        assert_eq!(spark_suspend_patch(&spark("RUNNING", true)), None);
        // The operator ignores suspend once an application ended; a suspended one would stop
        // its rerun in SUSPENDING.
        for ended in ["COMPLETED", "FAILED", "SUBMISSION_FAILED"] {
            assert_eq!(spark_suspend_patch(&spark(ended, false)), None, "{ended}");
            assert!(spark_stopped(&spark(ended, false)), "{ended}");
        }
        for stopped in ["", "NEW", "SUSPENDED"] {
            assert!(spark_stopped(&spark(stopped, true)), "{stopped}");
        }
        for moving in ["RUNNING", "SUSPENDING", "SUBMITTED", "RESUMING"] {
            assert!(!spark_stopped(&spark(moving, true)), "{moving}");
        }
    }

    #[test]
    fn a_rerun_has_started_once_its_env_is_on_the_running_application() {
        let ours = vec![
            plain_env("HANDOFF_ENDPOINT", "grpc://h:1"),
            plain_env("HANDOFF_PRODUCER_RERUN", "1"),
        ];
        let app = |suspend: bool, rerun: &str| {
            let env = json!([{"name": "HANDOFF_ENDPOINT", "value": "grpc://h:1"},
                             {"name": "HANDOFF_PRODUCER_RERUN", "value": rerun}]);
            json!({"spec": {"suspend": suspend, "driver": {"env": env},
                            "executor": {"env": env}},
                   "status": {"applicationState": {"state": "RUNNING"}}})
        };
        // Unsuspended with this rerun's number: our patch landed, and it runs again.
        assert!(rerun_started(&app(false, "1"), &ours));
        // Still suspended, or running the run before: the rerun waits for the stop.
        assert!(!rerun_started(&app(true, "1"), &ours));
        assert!(!rerun_started(&app(false, "0"), &ours));
    }

    #[test]
    fn states_read_from_status() {
        let spark = |state: &str| json!({"status": {"applicationState": {"state": state, "errorMessage": "driver OOM"}}});
        assert_eq!(producer_state(&json!({})), ProducerState::NotStarted);
        assert_eq!(producer_state(&spark("RUNNING")), ProducerState::Running);
        assert_eq!(
            producer_state(&spark("COMPLETED")),
            ProducerState::Completed
        );
        assert_eq!(
            producer_state(&spark("SUBMISSION_FAILED")),
            ProducerState::Failed("SUBMISSION_FAILED: driver OOM".into())
        );
        let pt = ConsumerRef::PyTorchJob("p");
        let job = |kind: &str| json!({"status": {"conditions": [{"type": "Created", "status": "True"}, {"type": kind, "status": "True", "message": "m"}]}});
        assert_eq!(consumer_state(&pt, &job("Running")), ConsumerState::Running);
        assert_eq!(
            consumer_state(&pt, &job("Succeeded")),
            ConsumerState::Succeeded
        );
        assert_eq!(
            consumer_state(&pt, &job("Failed")),
            ConsumerState::Failed("m".into())
        );
        let tj = ConsumerRef::TrainJob("t");
        assert_eq!(
            consumer_state(&tj, &job("Complete")),
            ConsumerState::Succeeded
        );
        let active = json!({"status": {"jobsStatus": [{"name": "node", "active": 2}]}});
        assert_eq!(consumer_state(&tj, &active), ConsumerState::Running);
    }
}
