//! Kueue, for jobs it manages (they carry `kueue.x-k8s.io/queue-name`). Kueue owns such a job's
//! `suspend`: it unsuspends the job once its Workload is admitted. Toggling `suspend` ourselves
//! would fight it, so the link gates these jobs the way Kueue asks external conditions to: an
//! AdmissionCheck whose controller is us. We keep our check Pending until the gate opens, then set
//! it Ready, and Kueue admits and unsuspends the job. Env is written while the job is suspended,
//! before admission, since a check's podSetUpdates cannot carry env.
//!
//! Pure functions over Kueue's JSON (`kueue.x-k8s.io/v1beta2`), so each can be tested without a
//! cluster. The contract is in `../shared/crds/SOURCES.md` (Kueue v0.19).

use kube::api::ApiResource;
use serde_json::{Value, json};

/// `spec.controllerName` of the AdmissionChecks this controller answers.
pub const CONTROLLER_NAME: &str = "handoff.kubeflow.org/datalink";
/// The label that puts a job under Kueue.
pub const QUEUE_LABEL: &str = "kueue.x-k8s.io/queue-name";

pub fn admission_check() -> ApiResource {
    kueue_resource("AdmissionCheck", "admissionchecks")
}

pub fn workload() -> ApiResource {
    kueue_resource("Workload", "workloads")
}

fn kueue_resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: "kueue.x-k8s.io".into(),
        version: "v1beta2".into(),
        api_version: "kueue.x-k8s.io/v1beta2".into(),
        kind: kind.into(),
        plural: plural.into(),
    }
}

/// Whether Kueue manages the job.
pub fn managed(job: &Value) -> bool {
    job["metadata"]["labels"][QUEUE_LABEL]
        .as_str()
        .is_some_and(|q| !q.is_empty())
}

/// The Workload Kueue made for `job`: the one whose controller owner reference is the job's uid
/// (Kueue finds it the same way, not by name).
pub fn workload_of<'a>(workloads: &'a [Value], job: &Value) -> Option<&'a Value> {
    let uid = job["metadata"]["uid"].as_str()?;
    workloads.iter().find(|w| {
        w["metadata"]["ownerReferences"]
            .as_array()
            .is_some_and(|owners| {
                owners
                    .iter()
                    .any(|o| o["uid"] == uid && o["controller"] == true)
            })
    })
}

/// The names of the AdmissionChecks that name us as their controller.
pub fn our_checks(checks: &[Value]) -> Vec<String> {
    checks
        .iter()
        .filter(|c| c["spec"]["controllerName"] == CONTROLLER_NAME)
        .filter_map(|c| c["metadata"]["name"].as_str().map(str::to_string))
        .collect()
}

/// The status patch that marks one of our AdmissionChecks Active, which Kueue requires before a
/// ClusterQueue that lists it admits anything; `None` when it already is.
pub fn active_patch(check: &Value, now: &str) -> Option<Value> {
    if check["spec"]["controllerName"] != CONTROLLER_NAME {
        return None;
    }
    let conditions: Vec<Value> = check["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if conditions
        .iter()
        .any(|c| c["type"] == "Active" && c["status"] == "True")
    {
        return None;
    }
    let mut conditions: Vec<Value> = conditions
        .into_iter()
        .filter(|c| c["type"] != "Active")
        .collect();
    conditions.push(json!({
        "type": "Active",
        "status": "True",
        "reason": "Active",
        "message": "the handoff controller holds jobs of DataLinks until their data is ready",
        "lastTransitionTime": now,
        "observedGeneration": check["metadata"]["generation"],
    }));
    Some(json!({"status": {"conditions": conditions}}))
}

/// The states of an admission check (Kueue's `CheckState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckState {
    Pending,
    Ready,
    Retry,
    Rejected,
}

impl CheckState {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckState::Pending => "Pending",
            CheckState::Ready => "Ready",
            CheckState::Retry => "Retry",
            CheckState::Rejected => "Rejected",
        }
    }
}

/// How our checks stand on a Workload.
#[derive(Debug, Clone, PartialEq)]
pub enum Checks {
    /// Kueue has listed none of ours yet: it does so once quota is reserved, and never when the
    /// ClusterQueue does not name one of our AdmissionChecks.
    NotListed,
    /// Ours are listed; the status patch that sets them, `None` when they already say so.
    Listed(Option<Value>),
}

/// Set every check of ours that Kueue listed on the Workload to `state`, with `message`. The
/// patch replaces the whole list (a merge patch cannot address one entry) and so carries the
/// Workload's resourceVersion: a concurrent change by Kueue makes it fail, and we read again.
pub fn set_checks(
    workload: &Value,
    ours: &[String],
    state: CheckState,
    message: &str,
    now: &str,
) -> Checks {
    let current: Vec<Value> = workload["status"]["admissionChecks"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let is_ours = |c: &Value| {
        c["name"]
            .as_str()
            .is_some_and(|n| ours.iter().any(|o| o == n))
    };
    if !current.iter().any(is_ours) {
        return Checks::NotListed;
    }
    let mut changed = false;
    let updated: Vec<Value> = current
        .iter()
        .map(|c| {
            if !is_ours(c) || (c["state"] == state.as_str() && c["message"] == message) {
                return c.clone();
            }
            changed = true;
            let mut c = c.clone();
            if c["state"] != state.as_str() {
                c["lastTransitionTime"] = json!(now);
            }
            c["state"] = json!(state.as_str());
            c["message"] = json!(message);
            c
        })
        .collect();
    if !changed {
        return Checks::Listed(None);
    }
    let mut patch = json!({"status": {"admissionChecks": updated}});
    if let Some(version) = workload["metadata"]["resourceVersion"].as_str() {
        patch["metadata"] = json!({ "resourceVersion": version });
    }
    Checks::Listed(Some(patch))
}

/// The kind and name of the job that owns a Workload, for the watch that wakes its DataLinks.
pub fn owner_of(workload: &Value) -> Option<(String, String)> {
    workload["metadata"]["ownerReferences"]
        .as_array()?
        .iter()
        .find(|o| o["controller"] == true)
        .and_then(|o| Some((o["kind"].as_str()?.into(), o["name"].as_str()?.into())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(uid: &str, queue: Option<&str>) -> Value {
        let mut job = json!({"metadata": {"name": "train", "uid": uid, "labels": {}}});
        if let Some(queue) = queue {
            job["metadata"]["labels"][QUEUE_LABEL] = json!(queue);
        }
        job
    }

    fn workload(owner: &str, checks: Value) -> Value {
        json!({"metadata": {"name": "pytorchjob-train-1a2b3", "resourceVersion": "9",
            "ownerReferences": [{"kind": "PyTorchJob", "name": "train", "uid": owner, "controller": true}]},
            "status": {"admissionChecks": checks}})
    }

    #[test]
    fn a_job_is_managed_by_its_queue_label_and_found_by_its_owner_uid() {
        assert!(managed(&job("u1", Some("team-a"))));
        assert!(!managed(&job("u1", None)) && !managed(&job("u1", Some(""))));
        let workloads = [workload("other", json!([])), workload("u1", json!([]))];
        let found = workload_of(&workloads, &job("u1", None)).expect("found");
        assert_eq!(found["metadata"]["ownerReferences"][0]["uid"], "u1");
        assert!(workload_of(&workloads, &job("u2", None)).is_none());
        assert_eq!(
            owner_of(&workloads[1]),
            Some(("PyTorchJob".into(), "train".into()))
        );
    }

    #[test]
    fn only_our_admission_checks_are_made_active_once() {
        let ours = json!({"metadata": {"name": "data-ready", "generation": 1},
            "spec": {"controllerName": CONTROLLER_NAME}});
        let theirs = json!({"metadata": {"name": "prov"},
            "spec": {"controllerName": "kueue.x-k8s.io/provisioning-request"}});
        assert_eq!(our_checks(&[ours.clone(), theirs.clone()]), ["data-ready"]);
        assert!(active_patch(&theirs, "t").is_none());
        let patch = active_patch(&ours, "2026-12-02T00:00:00Z").expect("patch");
        assert_eq!(patch["status"]["conditions"][0]["type"], "Active");
        let mut active = ours.clone();
        active["status"] = patch["status"].clone();
        assert!(active_patch(&active, "t").is_none());
    }

    #[test]
    fn our_checks_change_and_no_one_elses() {
        let entry = |name: &str, state: &str| json!({"name": name, "state": state, "message": "", "lastTransitionTime": "t0"});
        let ours = vec!["data-ready".to_string()];
        let w = workload(
            "u1",
            json!([entry("prov", "Pending"), entry("data-ready", "Pending")]),
        );
        let Checks::Listed(Some(patch)) = set_checks(
            &w,
            &ours,
            CheckState::Pending,
            "waiting for DataLink x",
            "t1",
        ) else {
            panic!("a message to write");
        };
        let list = &patch["status"]["admissionChecks"];
        assert_eq!(
            list[0],
            entry("prov", "Pending"),
            "another controller's check"
        );
        assert_eq!(list[1]["message"], "waiting for DataLink x");
        assert_eq!(list[1]["lastTransitionTime"], "t0", "same state, same time");
        assert_eq!(patch["metadata"]["resourceVersion"], "9");
        let mut pending = w.clone();
        pending["status"] = patch["status"].clone();
        assert_eq!(
            set_checks(
                &pending,
                &ours,
                CheckState::Pending,
                "waiting for DataLink x",
                "t2"
            ),
            Checks::Listed(None)
        );
        let Checks::Listed(Some(ready)) =
            set_checks(&pending, &ours, CheckState::Ready, "sealed", "t3")
        else {
            panic!("ready");
        };
        assert_eq!(ready["status"]["admissionChecks"][1]["state"], "Ready");
        assert_eq!(
            ready["status"]["admissionChecks"][1]["lastTransitionTime"],
            "t3"
        );
        let unlisted = workload("u1", json!([entry("prov", "Pending")]));
        assert_eq!(
            set_checks(&unlisted, &ours, CheckState::Ready, "m", "t"),
            Checks::NotListed
        );
    }
}
