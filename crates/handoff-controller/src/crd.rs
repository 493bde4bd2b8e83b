//! The `DataLink` custom resource: one Spark producer, one training consumer, and the Handoff
//! server between them.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Pairs a SparkApplication with a PyTorchJob or TrainJob through a Handoff server. The controller
/// starts the server, wires both jobs to it, holds training back until the data is sealed (or
/// flowing, with `gate: streaming`), and cleans up after.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "handoff.kubeflow.org",
    version = "v1alpha1",
    kind = "DataLink",
    plural = "datalinks",
    singular = "datalink",
    shortname = "dl",
    namespaced,
    status = "DataLinkStatus",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Producer","type":"string","jsonPath":".spec.producer.sparkApplication"}"#,
    printcolumn = r#"{"name":"Rows","type":"integer","jsonPath":".status.rows"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct DataLinkSpec {
    /// The job that writes the data.
    pub producer: Producer,
    /// The training job that reads it.
    pub consumer: Consumer,
    /// The Handoff server the controller runs for this link.
    #[serde(default)]
    pub server: ServerSpec,
    /// What happens under memory pressure, when training starts, and when things end.
    #[serde(default)]
    pub policy: LinkPolicy,
    /// Read defaults handed to the training loader through the environment.
    #[serde(default)]
    pub read: ReadDefaults,
}

/// The producer: a SparkApplication (Spark Operator, `sparkoperator.k8s.io/v1beta2`) in the same
/// namespace, created with `spec.suspend: true`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Producer {
    /// Name of the SparkApplication.
    pub spark_application: String,
}

/// The consumer: exactly one of a PyTorchJob (`kubeflow.org/v1`, created with
/// `runPolicy.suspend: true`) or a TrainJob (`trainer.kubeflow.org/v1alpha1`, created with
/// `spec.suspend: true`), in the same namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Consumer {
    /// Name of the PyTorchJob.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pytorch_job: Option<String>,
    /// Name of the TrainJob.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_job: Option<String>,
}

/// Which training job a DataLink feeds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConsumerRef<'a> {
    PyTorchJob(&'a str),
    TrainJob(&'a str),
}

impl Consumer {
    /// The one consumer named, or why the spec is wrong.
    pub fn target(&self) -> Result<ConsumerRef<'_>, String> {
        match (self.pytorch_job.as_deref(), self.train_job.as_deref()) {
            (Some(name), None) if !name.is_empty() => Ok(ConsumerRef::PyTorchJob(name)),
            (None, Some(name)) if !name.is_empty() => Ok(ConsumerRef::TrainJob(name)),
            (Some(_), Some(_)) => {
                Err("spec.consumer names both a pytorchJob and a trainJob; name one".into())
            }
            _ => Err("spec.consumer names no job; set pytorchJob or trainJob".into()),
        }
    }
}

/// The Handoff server: a Deployment, or a StatefulSet over several replicas.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServerSpec {
    /// Container image of `handoff`. Default: the controller's own image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Memory budget for Arrow data, as a Kubernetes quantity (`8Gi`). The pod's memory limit is
    /// derived from it. Default: 4Gi.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    /// CPU request of the server pod, as a quantity (`2`, `500m`). Default: 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
    /// Server replicas, 1 to 64. One runs a Deployment. More run a StatefulSet with a
    /// headless Service (`<name>-handoff-peers`): each partition lives on one replica, chosen by
    /// a hash of (link, partition); replica 0 plans, and the link's Service and endpoint are
    /// replica 0's; clients find the others from it. Each replica holds the memory budget
    /// `memory`, and with `spillUrl` snapshots its own part below `<prefix>/<pod name>`.
    /// Changing it restarts the server, which starts empty. Default: 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("minimum" = 1, "maximum" = 64))]
    pub replicas: Option<i32>,
    /// Object storage for spilled partitions and snapshots (`s3://bucket/prefix`, `gs://`,
    /// `az://`, `file:///path`); each DataLink uses its own prefix below it,
    /// `<namespace>/<name>-<uid>`. With it, the server snapshots the link when it is sealed and a
    /// restarted server pod restores it before it reports ready. Default: an emptyDir volume in
    /// the pod, which a pod restart loses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spill_url: Option<String>,
    /// A Secret whose keys (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT`, ...) become
    /// the server's environment, for `spillUrl`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spill_credentials_secret: Option<String>,
    /// Serve Flight over TLS, with a certificate from a CA the controller makes for this link
    /// (kept in the link's Secret as `ca.crt`); both jobs get the CA and a `grpc+tls://`
    /// endpoint, so no token crosses the network in clear. `false` serves plain text: only for a
    /// network you trust. Default: true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<bool>,
}

/// What a write does when the server's memory budget is full; the names of `serve --memory-policy`.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum MemoryPolicy {
    /// Fail the write with RESOURCE_EXHAUSTED.
    Reject,
    /// Stall the writer until readers or deletes free memory.
    Wait,
    /// Move finished partitions to `server.spillUrl`; reads stream them back.
    #[default]
    Spill,
}

/// When the consumer is released.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Gate {
    /// When the producer succeeded and the server confirms the link is sealed.
    #[default]
    Sealed,
    /// As soon as the producer is running: training reads while data flows.
    Streaming,
}

/// What happens when the producer fails.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum ProducerFailure {
    /// Phase Failed; the consumer stays suspended and the server keeps what was written, for
    /// inspection, until the DataLink is deleted or its TTL passes.
    #[default]
    KeepConsumerSuspended,
    /// Phase Failed, and the server objects are deleted at once.
    DeleteServer,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LinkPolicy {
    /// What a write does when the memory budget is full: `reject`, `wait` or `spill` (default).
    #[serde(default)]
    pub memory_policy: MemoryPolicy,
    /// When training starts: `sealed` (default) or `streaming`.
    #[serde(default)]
    pub gate: Gate,
    /// Delete the server and its data this long after the consumer finished. Default: keep
    /// them until the DataLink is deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds_after_finished: Option<i64>,
    /// What happens when the producer fails. Default: KeepConsumerSuspended.
    #[serde(default)]
    pub on_producer_failure: ProducerFailure,
    /// What happens when the server restarts and its data is gone (before the seal, or with no
    /// `server.spillUrl` to restore from). Default: Fail.
    #[serde(default)]
    pub on_server_loss: ServerLoss,
}

/// What happens when the link's server lost its data.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum ServerLoss {
    /// Phase Failed, reason ServerLost; the condition says what was lost.
    #[default]
    Fail,
    /// Rerun the SparkApplication, so the link fills again: suspend it, then unsuspend it once
    /// the Spark Operator says SUSPENDED; one that had ended is rerun by a change to its env.
    /// The consumer stays suspended until the link is sealed again.
    RestartProducer,
}

/// Defaults for `HandoffDataset`, passed as `HANDOFF_BATCH_ROWS`, `HANDOFF_SHUFFLE` and
/// `HANDOFF_SEED`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReadDefaults {
    /// Rows per batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_rows: Option<i64>,
    /// Shuffle every epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shuffle: Option<bool>,
    /// Shuffle seed, the same on every rank.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
}

/// Where a DataLink is in its life.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum Phase {
    /// Accepted; nothing created yet.
    #[default]
    Pending,
    /// The server's Secret, Deployment and Service exist; waiting for the server to be available.
    Provisioning,
    /// The producer is wired and running; data is arriving.
    Receiving,
    /// The producer succeeded and the link is sealed; the consumer is released.
    Sealed,
    /// The consumer is running.
    Consuming,
    /// The consumer finished (successfully or not; see conditions).
    Finished,
    /// The producer failed, or the spec is wrong; see `reason`.
    Failed,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DataLinkStatus {
    #[serde(default)]
    pub phase: Phase,
    /// Why the phase is what it is, in a word (`ProducerFailed`, `InvalidSpec`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Conditions `ServerReady`, `ProducerWired`, `ConsumerReleased`, `Sealed`, `Finished`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The server's Flight endpoint (`grpc+tls://<service>.<namespace>.svc:8815`; `grpc://` without TLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partitions: Option<i64>,
    /// Bytes of the link held in the server's memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_used: Option<i64>,
    /// Bytes of the link moved to object storage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spilled_bytes: Option<i64>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// When the consumer finished; the TTL counts from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// The server image this link runs, fixed when the link is provisioned, so a controller
    /// upgrade does not restart running link servers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_image: Option<String>,
    /// The server's instance id when the controller last read the link; a new one means the
    /// server restarted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_instance: Option<String>,
    /// How many times the server restarted under this link.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_restarts: Option<i64>,
    /// How many times the producer was run again after the server lost the link
    /// (`onServerLoss: RestartProducer`). The producer's env carries it as
    /// `HANDOFF_PRODUCER_RERUN`; the change is what reruns an application that had ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub producer_reruns: Option<i64>,
}

/// The CustomResourceDefinition as YAML, as `handoff crd` prints it and
/// `deploy/crds/handoff.kubeflow.org_datalinks.yaml` holds it.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    use kube::CustomResourceExt;
    serde_yaml::to_string(&DataLink::crd())
}
