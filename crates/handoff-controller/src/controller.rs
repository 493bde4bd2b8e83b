//! The DataLink reconciler: provision the server, wire the producer and the consumer, gate the
//! consumer on the seal, and clean up.
//!
//! Every reconcile reads first and writes only what differs, so a reconcile with nothing to do
//! issues no writes: owned objects carry a hash of what was applied, env entries and suspend flags
//! are compared before a patch, status is applied only when it changed, and events go out only
//! on a phase change.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use handoff_client::{ClientConfig, HandoffClient, LinkStats};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalized, finalizer};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::Value;
use tracing::{debug, info, warn};

use crate::crd::{ConsumerRef, DataLink, DataLinkStatus, Gate, Phase, ProducerFailure, ServerLoss};
use crate::error::{Error, Result};
use crate::kueue;
use crate::metrics::Metrics;
use crate::pki;
use crate::resources::{self, InvalidSpec, RunningServer, Tokens};
use crate::workloads::{self, ConsumerState, ProducerState};

/// Held on every DataLink until the controller has removed what it created.
pub const FINALIZER: &str = "handoff.kubeflow.org/cleanup";
/// The field manager of every write, so `kubectl get --show-managed-fields` names us.
pub const MANAGER: &str = "handoff-controller";
const FLIGHT_TIMEOUT: Duration = Duration::from_secs(10);

/// How the controller runs; the CLI builds it from `handoff controller` flags.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// Watch one namespace; `None` watches all.
    pub namespace: Option<String>,
    /// Image of the per-link `handoff serve` Deployments, unless a DataLink names one.
    pub server_image: String,
    /// Reach every link's server at this URL instead of its Service: for tests and
    /// out-of-cluster runs (`kubectl port-forward`). Jobs are still given the Service address.
    pub endpoint_override: Option<String>,
    /// How often a link is looked at while data flows, for status and the seal.
    pub poll_interval: Duration,
    /// The reporting instance on events, usually the pod name.
    pub instance: Option<String>,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self {
            namespace: None,
            server_image: format!("ghcr.io/handoff-dev/handoff:{}", env!("CARGO_PKG_VERSION")),
            endpoint_override: None,
            poll_interval: Duration::from_secs(5),
            instance: None,
        }
    }
}

struct Context {
    client: Client,
    config: ControllerConfig,
    recorder: Recorder,
    metrics: Arc<Metrics>,
    /// Failed reconciles in a row, per DataLink: one broken link backs off alone.
    failures: std::sync::Mutex<std::collections::HashMap<ObjectRef<DataLink>, u32>>,
}

/// The wait after the `failures`th failed reconcile in a row: 1 s, doubling, at most 5 min.
fn backoff(failures: u32) -> Duration {
    let exponent = failures.saturating_sub(1).min(9);
    Duration::from_secs(1u64 << exponent).min(Duration::from_secs(300))
}

fn scoped(
    client: &Client,
    namespace: &Option<String>,
    resource: &ApiResource,
) -> Api<DynamicObject> {
    match namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, resource),
        None => Api::all_with(client.clone(), resource),
    }
}

fn scoped_typed<K>(client: &Client, namespace: &Option<String>) -> Api<K>
where
    K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// The DataLinks in `namespace` that name `name` as producer (`role = None`) or as consumer of
/// the given kind.
fn links_naming(
    store: &Store<DataLink>,
    namespace: Option<String>,
    name: &str,
    consumer_kind: Option<&str>,
) -> Vec<ObjectRef<DataLink>> {
    store
        .state()
        .iter()
        .filter(|link| link.namespace() == namespace)
        .filter(|link| match consumer_kind {
            None => link.spec.producer.spark_application == name,
            Some(kind) => match link.spec.consumer.target() {
                Ok(ConsumerRef::PyTorchJob(job)) => kind == "PyTorchJob" && job == name,
                Ok(ConsumerRef::TrainJob(job)) => kind == "TrainJob" && job == name,
                Err(_) => false,
            },
        })
        .map(|link| ObjectRef::from_obj(link.as_ref()))
        .collect()
}

/// Run the controller until `shutdown` completes; in-flight reconciles finish first.
pub async fn run(
    client: Client,
    config: ControllerConfig,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> Result<()> {
    let links: Api<DataLink> = scoped_typed(&client, &config.namespace);
    if let Err(e) = links.list(&ListParams::default().limit(1)).await {
        return Err(Error::Config(format!(
            "cannot list DataLinks ({e}); install the CRD with `handoff crd | kubectl apply -f -` \
             and check the controller's ClusterRole (deploy/base/rbac.yaml)"
        )));
    }
    let owned =
        watcher::Config::default().labels("app.kubernetes.io/managed-by=handoff-controller");
    let mut controller = Controller::new(links, watcher::Config::default())
        .owns(
            scoped_typed::<Deployment>(&client, &config.namespace),
            owned.clone(),
        )
        .owns(
            scoped_typed::<StatefulSet>(&client, &config.namespace),
            owned,
        );
    let store = controller.store();
    for (resource, consumer_kind) in [
        (workloads::spark_application(), None),
        (workloads::pytorch_job(), Some("PyTorchJob")),
        (workloads::train_job(), Some("TrainJob")),
    ] {
        let api: Api<DynamicObject> = scoped(&client, &config.namespace, &resource);
        // A cluster without, say, the Kubeflow trainer has no TrainJob API: links then poll.
        if let Err(e) = api.list(&ListParams::default().limit(1)).await {
            warn!(
                kind = %resource.kind,
                error = %e,
                "cannot watch {} (is its CRD installed, and may the controller list it?); DataLinks that name one are polled every --poll-interval",
                resource.plural
            );
            continue;
        }
        let store = store.clone();
        controller = controller.watches_with(
            api,
            resource,
            watcher::Config::default(),
            move |object: DynamicObject| {
                links_naming(
                    &store,
                    object.namespace(),
                    &object.name_any(),
                    consumer_kind,
                )
            },
        );
    }
    // Kueue: our AdmissionChecks are made Active, and a Workload's change (Kueue listing our
    // check, admitting) wakes the DataLinks of the job that owns it.
    let workloads: Api<DynamicObject> = scoped(&client, &config.namespace, &kueue::workload());
    let checks: Api<DynamicObject> = Api::all_with(client.clone(), &kueue::admission_check());
    let kueue_task = match (
        workloads.list(&ListParams::default().limit(1)).await,
        checks.list(&ListParams::default().limit(1)).await,
    ) {
        (Ok(_), Ok(_)) => {
            let store = store.clone();
            controller = controller.watches_with(
                workloads,
                kueue::workload(),
                watcher::Config::default(),
                move |workload: DynamicObject| {
                    let Ok(value) = serde_json::to_value(&workload) else {
                        return Vec::new();
                    };
                    match kueue::owner_of(&value) {
                        Some((kind, name)) if kind == "SparkApplication" => {
                            links_naming(&store, workload.namespace(), &name, None)
                        }
                        Some((kind, name)) => {
                            links_naming(&store, workload.namespace(), &name, Some(&kind))
                        }
                        None => Vec::new(),
                    }
                },
            );
            Some(tokio::spawn(activate_checks(checks)))
        }
        (Err(e), _) | (_, Err(e)) => {
            info!(error = %e, "no Kueue API here (or no access to it); jobs with a queue-name label are not gated by an AdmissionCheck");
            None
        }
    };
    let reporter = Reporter {
        controller: MANAGER.into(),
        instance: config.instance.clone(),
    };
    let context = Arc::new(Context {
        recorder: Recorder::new(client.clone(), reporter),
        client,
        config,
        metrics: Arc::clone(&metrics),
        failures: Default::default(),
    });
    metrics.set_ready(true);
    info!("controller running");
    controller
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, context)
        .for_each(|outcome| async move {
            if let Err(e) = outcome {
                // Watch errors are retried with backoff by the runtime; say what happened.
                warn!(error = %e, "controller event");
            }
        })
        .await;
    if let Some(task) = kueue_task {
        task.abort();
    }
    metrics.set_ready(false);
    Ok(())
}

/// Mark every AdmissionCheck whose controllerName is ours Active, as it appears: Kueue keeps a
/// ClusterQueue that lists a check inactive until the check's controller does.
async fn activate_checks(api: Api<DynamicObject>) {
    use kube::runtime::WatchStreamExt;
    let checks = watcher(api.clone(), watcher::Config::default())
        .default_backoff()
        .applied_objects();
    let mut checks = std::pin::pin!(checks);
    while let Some(check) = checks.next().await {
        let check = match check {
            Ok(check) => check,
            Err(e) => {
                warn!(error = %e, "watching AdmissionChecks");
                continue;
            }
        };
        let Ok(value) = serde_json::to_value(&check) else {
            continue;
        };
        let Some(patch) = kueue::active_patch(&value, &now().0.to_string()) else {
            continue;
        };
        let name = check.name_any();
        match api
            .patch_status(&name, &merge_params(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => info!(check = %name, "AdmissionCheck active"),
            Err(e) => warn!(check = %name, error = %e, "could not mark the AdmissionCheck active"),
        }
    }
}

async fn reconcile(link: Arc<DataLink>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    let link_ref = Arc::clone(&link);
    let namespace = link.namespace().unwrap_or_else(|| "default".into());
    let api: Api<DataLink> = Api::namespaced(ctx.client.clone(), &namespace);
    let outcome = finalizer(&api, FINALIZER, link, |event| async {
        match event {
            Finalized::Apply(link) => Run::new(&link, &ctx, namespace.clone()).apply().await,
            Finalized::Cleanup(link) => Run::new(&link, &ctx, namespace.clone()).cleanup().await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    ctx.metrics.reconciled(started.elapsed());
    if outcome.is_ok()
        && let Ok(mut failures) = ctx.failures.lock()
    {
        failures.remove(&ObjectRef::from_obj(link_ref.as_ref()));
    }
    outcome
}

fn error_policy(link: Arc<DataLink>, error: &Error, ctx: Arc<Context>) -> Action {
    let label = error.metric_label();
    ctx.metrics.failed(label);
    warn!(link = %link.name_any(), namespace = ?link.namespace(), error = %error, "reconcile failed");
    let failures = match ctx.failures.lock() {
        Ok(mut failures) => {
            let count = failures
                .entry(ObjectRef::from_obj(link.as_ref()))
                .or_insert(0);
            *count = count.saturating_add(1);
            *count
        }
        Err(_) => 1,
    };
    Action::requeue(retry_after(label, failures, ctx.config.poll_interval))
}

/// When to reconcile again after a failure with this metric label.
fn retry_after(label: &str, failures: u32, poll_interval: Duration) -> Duration {
    match label {
        // Someone changed the object between our read and our patch: read again soon.
        "conflict" => Duration::from_millis(500),
        // The link's server is unreachable: its pod is starting or restarting, which the
        // DataLink must report as soon as it is back (ServerRestarted, ServerLost), so it is
        // looked at every poll interval however long it is down, never backed off past that.
        "server" => backoff(failures).min(poll_interval),
        _ => backoff(failures),
    }
}

/// Where our AdmissionCheck stands on a job's Workload.
enum KueueCheck {
    NoWorkload,
    /// The Workload, which lists none of our checks.
    NotListed(String),
    /// The Workload, whose checks of ours now say what we set.
    Set(String),
}

/// The user's two jobs as read in this reconcile.
struct Jobs {
    producer_name: String,
    spark: Value,
    spark_api: Api<DynamicObject>,
    consumer_kind: String,
    consumer_name: String,
    job: Value,
    consumer_api: Api<DynamicObject>,
}

/// One reconcile of one DataLink: the status it builds and the events it will publish.
struct Run<'a> {
    link: &'a DataLink,
    ctx: &'a Context,
    namespace: String,
    name: String,
    /// Whether the link's server speaks TLS: the spec's wish, or what a running server was
    /// started with.
    tls: bool,
    before: DataLinkStatus,
    status: DataLinkStatus,
    events: Vec<(EventType, String, String)>,
    /// The AdmissionChecks that name us, listed at most once per reconcile.
    our_checks: tokio::sync::OnceCell<Vec<String>>,
    /// The server Service's ClusterIP, read at most once per reconcile.
    service_ip: tokio::sync::OnceCell<Option<String>>,
}

fn phase_rank(phase: Phase) -> u8 {
    match phase {
        Phase::Pending => 0,
        Phase::Provisioning => 1,
        Phase::Receiving => 2,
        Phase::Sealed => 3,
        Phase::Consuming => 4,
        Phase::Finished | Phase::Failed => 5,
    }
}

/// Parameters of our merge patches: the field manager, so `--show-managed-fields` names us.
fn merge_params() -> PatchParams {
    PatchParams {
        field_manager: Some(MANAGER.into()),
        ..Default::default()
    }
}

fn now() -> Time {
    // Whole seconds: that is what the API server stores, so comparisons stay stable.
    Time(Timestamp::from_second(Timestamp::now().as_second()).unwrap_or_else(|_| Timestamp::now()))
}

impl<'a> Run<'a> {
    fn new(link: &'a DataLink, ctx: &'a Context, namespace: String) -> Self {
        let before = link.status.clone().unwrap_or_default();
        Self {
            link,
            ctx,
            namespace,
            name: link.name_any(),
            tls: resources::tls_enabled(link),
            status: before.clone(),
            before,
            events: Vec::new(),
            our_checks: tokio::sync::OnceCell::new(),
            service_ip: tokio::sync::OnceCell::new(),
        }
    }

    fn api<K>(&self) -> Api<K>
    where
        K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>,
    {
        Api::namespaced(self.ctx.client.clone(), &self.namespace)
    }

    fn dynamic(&self, resource: &ApiResource) -> Api<DynamicObject> {
        Api::namespaced_with(self.ctx.client.clone(), &self.namespace, resource)
    }

    async fn apply(mut self) -> Result<Action> {
        let outcome = self.step().await;
        // What was learned before a failure is still worth recording.
        self.publish().await?;
        outcome
    }

    /// Move the phase forward (never back), with an event for the change.
    fn advance(&mut self, phase: Phase, reason: Option<&str>, note: String) {
        if phase == self.status.phase || phase_rank(phase) < phase_rank(self.status.phase) {
            return;
        }
        self.status.phase = phase;
        self.status.reason = reason.map(str::to_string);
        let kind = if phase == Phase::Failed {
            EventType::Warning
        } else {
            EventType::Normal
        };
        self.events.push((
            kind,
            reason.unwrap_or(&format!("{phase:?}")).to_string(),
            note,
        ));
    }

    fn has_condition(&self, kind: &str) -> bool {
        self.status
            .conditions
            .iter()
            .any(|c| c.type_ == kind && c.status == "True")
    }

    fn condition(&mut self, kind: &str, ok: bool, reason: &str, message: String) {
        let status = if ok { "True" } else { "False" };
        let generation = self.link.metadata.generation;
        let existing = self.status.conditions.iter().position(|c| c.type_ == kind);
        if let Some(i) = existing {
            let c = &self.status.conditions[i];
            if c.status == status && c.reason == reason && c.message == message {
                return;
            }
        }
        let last_transition_time = match existing {
            Some(i) if self.status.conditions[i].status == status => {
                self.status.conditions[i].last_transition_time.clone()
            }
            _ => now(),
        };
        let condition = Condition {
            type_: kind.into(),
            status: status.into(),
            reason: reason.into(),
            message,
            last_transition_time,
            observed_generation: generation,
        };
        match existing {
            Some(i) => self.status.conditions[i] = condition,
            None => self.status.conditions.push(condition),
        }
    }

    /// Apply the status if it changed, then publish the events.
    async fn publish(&mut self) -> Result<()> {
        if self.status != self.before {
            let api: Api<DataLink> = self.api();
            let body = serde_json::json!({
                "apiVersion": "handoff.kubeflow.org/v1alpha1",
                "kind": "DataLink",
                "status": self.status,
            });
            api.patch_status(
                &self.name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&body),
            )
            .await?;
            self.before = self.status.clone();
        }
        self.publish_events("Reconcile").await;
        Ok(())
    }

    /// Publish the events gathered so far; a failure is logged, never fails the reconcile.
    async fn publish_events(&mut self, action: &str) {
        let reference = self.link.object_ref(&());
        for (type_, reason, note) in self.events.drain(..) {
            let event = Event {
                type_,
                reason: reason.clone(),
                note: Some(note),
                action: action.into(),
                secondary: None,
            };
            if let Err(e) = self.ctx.recorder.publish(&event, &reference).await {
                warn!(link = %self.name, %reason, error = %e, "could not publish event");
            }
        }
    }

    fn poll(&self) -> Action {
        Action::requeue(self.ctx.config.poll_interval)
    }

    fn invalid(&mut self, why: String) -> Result<Action> {
        self.condition("Ready", false, "InvalidSpec", why.clone());
        self.advance(Phase::Failed, Some("InvalidSpec"), why);
        Ok(Action::await_change())
    }

    async fn step(&mut self) -> Result<Action> {
        self.status.observed_generation = self.link.metadata.generation;
        let fixed_spec = self.status.phase == Phase::Failed
            && self.status.reason.as_deref() == Some("InvalidSpec")
            && self.before.observed_generation != self.link.metadata.generation;
        if fixed_spec {
            self.status.phase = Phase::Pending;
            self.status.reason = None;
        }
        let running = self.observe_server().await?;
        self.status.endpoint = Some(resources::endpoint(self.link, self.tls));
        if matches!(self.status.phase, Phase::Finished | Phase::Failed) {
            return self.after_end().await;
        }
        let consumer = match self.link.spec.consumer.target() {
            Ok(consumer) => consumer,
            Err(why) => return self.invalid(why),
        };
        let Some(tokens) = self.provision(&consumer, running).await? else {
            // The Deployment's (StatefulSet's) watch wakes us when it becomes available.
            return Ok(self.poll());
        };
        let Some(jobs) = self.read_jobs(&consumer).await? else {
            return Ok(self.poll());
        };
        let producer = workloads::producer_state(&jobs.spark);
        if let ProducerState::Failed(why) = &producer
            && !self.rerunning()
        {
            let message = format!(
                "DataLink {}: SparkApplication {} ended in {why}",
                self.name, jobs.producer_name
            );
            self.set_kueue_check(&jobs.job, kueue::CheckState::Rejected, &message)
                .await?;
            return self.producer_failed(&jobs.producer_name, why).await;
        }
        let mut stats = self.stats(&tokens).await?;
        if let Some(action) = self.server_continuity(stats.as_ref(), &jobs).await? {
            return Ok(action);
        }
        if stats.is_none() && self.link.spec.policy.gate == Gate::Streaming && !self.rerunning() {
            // Training is released before the producer writes: the link must be there for
            // its readers, or they start with NOT_FOUND.
            stats = Some(self.create_link(&tokens).await?);
        }
        let sealed = stats.as_ref().is_some_and(|s| s.state == "sealed");
        let completed = producer == ProducerState::Completed;
        if !self
            .wire_consumer(&consumer, &jobs, completed, sealed)
            .await?
        {
            return Ok(self.poll());
        }
        self.wire_producer(&jobs).await?;
        self.seal_conditions(&jobs, stats.as_ref(), completed, sealed);
        self.consumer_progress(&consumer, &jobs);
        if self.status.phase == Phase::Finished {
            return self.after_end().await;
        }
        Ok(match self.status.phase {
            Phase::Receiving => self.poll(),
            // Stats barely move once sealed; the consumer's watch wakes us on its progress.
            _ => Action::requeue(self.ctx.config.poll_interval * 6),
        })
    }

    /// The server as it runs now: its Deployment, or its StatefulSet over several replicas. A
    /// running server keeps the TLS setting it was started with, whatever the controller's
    /// defaults became since.
    async fn observe_server(&mut self) -> Result<Option<RunningServer>> {
        let name = resources::server_name(self.link);
        // The kind the spec asks for first: the other is there only while replicas change.
        let several = resources::replicated(self.link);
        let mut running = None;
        for statefulset in [several, !several] {
            running = if statefulset {
                self.api::<StatefulSet>()
                    .get_opt(&name)
                    .await?
                    .map(RunningServer::StatefulSet)
            } else {
                self.api::<Deployment>()
                    .get_opt(&name)
                    .await?
                    .map(RunningServer::Deployment)
            };
            if running.is_some() {
                break;
            }
        }
        if let Some(server) = &running
            && self.keeps(server)
        {
            self.tls = server.tls();
        }
        Ok(running)
    }

    /// Whether a running server stays as it is: its spec inputs are unchanged, or an older
    /// controller made it (no inputs recorded) and the DataLink's spec has not changed since.
    fn keeps(&self, server: &RunningServer) -> bool {
        match server.annotations().get(resources::SERVER_INPUTS) {
            Some(inputs) => *inputs == resources::server_inputs(self.link),
            None => self.before.observed_generation == self.link.metadata.generation,
        }
    }

    /// The Secret, the server (Deployment, or StatefulSet and its headless Service), its
    /// Service and NetworkPolicy; the link's tokens once every replica serves, `None` until
    /// then.
    async fn provision(
        &mut self,
        consumer: &ConsumerRef<'_>,
        running: Option<RunningServer>,
    ) -> Result<Option<Tokens>> {
        let image =
            resources::pinned_image(self.link, running.as_ref(), &self.ctx.config.server_image);
        let tokens = self.ensure_secret().await?;
        let server = match running {
            Some(running) if self.keeps(&running) => {
                self.adopt(&running).await?;
                self.status.server_image = running.image().or(Some(image));
                running
            }
            running => {
                let replicas = match resources::replicas(self.link) {
                    Ok(replicas) => replicas,
                    Err(InvalidSpec(why)) => {
                        self.invalid(why)?;
                        return Ok(None);
                    }
                };
                let built = if replicas > 1 {
                    resources::server_statefulset(self.link, &image, self.tls)
                        .map(RunningServer::StatefulSet)
                } else {
                    resources::server_deployment(self.link, &image, self.tls)
                        .map(RunningServer::Deployment)
                };
                let built = match built {
                    Ok(built) => built,
                    Err(InvalidSpec(why)) => {
                        self.invalid(why)?;
                        return Ok(None);
                    }
                };
                // Replicas went from one to several or back: the server of the other kind goes
                // (its data with it, as with any change to spec.server).
                if let Some(old) = running
                    && old.kind() != built.kind()
                {
                    self.delete_workload(old.kind()).await?;
                }
                self.status.server_image = Some(image);
                match built {
                    RunningServer::Deployment(d) => {
                        RunningServer::Deployment(self.ensure_applied(d).await?)
                    }
                    RunningServer::StatefulSet(s) => {
                        self.ensure_applied(resources::peers_service(self.link))
                            .await?;
                        RunningServer::StatefulSet(self.ensure_applied(s).await?)
                    }
                }
            }
        };
        self.ensure_applied(resources::server_service(self.link))
            .await?;
        self.ensure_applied(resources::server_network_policy(self.link, consumer))
            .await?;
        self.advance(
            Phase::Provisioning,
            None,
            format!(
                "Created Secret {}, {} and Service {}",
                resources::secret_name(self.link),
                server.kind(),
                resources::server_name(self.link)
            ),
        );
        let (ready, wanted) = (server.ready(), server.replicas());
        if ready < wanted.max(1) {
            let message = if wanted > 1 {
                format!(
                    "StatefulSet {} has {ready} of {wanted} replicas ready; every replica holds \
                     part of the link, so all must serve",
                    resources::server_name(self.link)
                )
            } else {
                format!(
                    "Deployment {} has no available replica yet",
                    resources::server_name(self.link)
                )
            };
            self.condition("ServerReady", false, "Unavailable", message);
            return Ok(None);
        }
        let serving = if wanted > 1 {
            format!(
                "serving at {} (replica 0 of {wanted})",
                resources::endpoint(self.link, self.tls)
            )
        } else {
            format!("serving at {}", resources::endpoint(self.link, self.tls))
        };
        self.condition("ServerReady", true, "Available", serving);
        Ok(Some(tokens))
    }

    /// A server an older controller made records no inputs: record them, in metadata only,
    /// which does not restart its pods.
    async fn adopt(&self, running: &RunningServer) -> Result<()> {
        if running.annotations().contains_key(resources::SERVER_INPUTS) {
            return Ok(());
        }
        let patch = serde_json::json!({"metadata": {"annotations": {
            resources::SERVER_INPUTS: resources::server_inputs(self.link)
        }}});
        let name = resources::server_name(self.link);
        let patch = Patch::Merge(&patch);
        match running {
            RunningServer::Deployment(_) => {
                self.api::<Deployment>()
                    .patch(&name, &merge_params(), &patch)
                    .await?;
            }
            RunningServer::StatefulSet(_) => {
                self.api::<StatefulSet>()
                    .patch(&name, &merge_params(), &patch)
                    .await?;
            }
        }
        Ok(())
    }

    /// Delete the server's Deployment or StatefulSet (with its headless Service).
    async fn delete_workload(&self, kind: &str) -> Result<()> {
        let name = resources::server_name(self.link);
        let params = DeleteParams::background();
        if kind == "StatefulSet" {
            ignore_missing(self.api::<StatefulSet>().delete(&name, &params).await)?;
            let peers = resources::peers_service_name(self.link);
            ignore_missing(self.api::<Service>().delete(&peers, &params).await)
        } else {
            ignore_missing(self.api::<Deployment>().delete(&name, &params).await)
        }
    }

    /// The user's jobs, which must exist, suspended, before anything is wired.
    async fn read_jobs(&mut self, consumer: &ConsumerRef<'_>) -> Result<Option<Jobs>> {
        let producer_name = self.link.spec.producer.spark_application.clone();
        let spark_api = self.dynamic(&workloads::spark_application());
        let Some(spark) = self.read(&spark_api, &producer_name).await? else {
            self.condition(
                "ProducerWired",
                false,
                "ProducerNotFound",
                format!(
                    "SparkApplication {producer_name} is not in namespace {}; create it with spec.suspend: true",
                    self.namespace
                ),
            );
            return Ok(None);
        };
        let consumer_resource = workloads::consumer_resource(consumer);
        let consumer_name = match consumer {
            ConsumerRef::PyTorchJob(name) | ConsumerRef::TrainJob(name) => name.to_string(),
        };
        let consumer_api = self.dynamic(&consumer_resource);
        let Some(job) = self.read(&consumer_api, &consumer_name).await? else {
            self.condition(
                "ConsumerReleased",
                false,
                "ConsumerNotFound",
                format!(
                    "{} {consumer_name} is not in namespace {}; create it suspended",
                    consumer_resource.kind, self.namespace
                ),
            );
            return Ok(None);
        };
        Ok(Some(Jobs {
            producer_name,
            spark,
            spark_api,
            consumer_kind: consumer_resource.kind,
            consumer_name,
            job,
            consumer_api,
        }))
    }

    /// Whether the producer is being rerun after the server lost the link.
    fn rerunning(&self) -> bool {
        self.status
            .conditions
            .iter()
            .any(|c| c.type_ == "ProducerWired" && c.reason == "Rerun")
    }

    /// Tell a restarted server from the one the link was on. Restored from its snapshot: note it
    /// and go on. Gone: say what was lost, and fail or rerun the producer per policy.
    async fn server_continuity(
        &mut self,
        stats: Option<&LinkStats>,
        jobs: &Jobs,
    ) -> Result<Option<Action>> {
        let known = self.before.server_instance.clone();
        let current = stats
            .map(|s| s.server_instance.clone())
            .filter(|i| !i.is_empty());
        let restarted = match (&known, &current, stats) {
            (Some(known), Some(current), _) => known != current,
            // We read the link from this server before; now it has none.
            (Some(_), None, None) => true,
            _ => false,
        };
        if let Some(stats) = stats {
            self.status.rows = Some(stats.rows as i64);
            self.status.bytes = Some(stats.bytes as i64);
            self.status.partitions = Some(stats.partitions as i64);
            self.status.memory_used = Some(stats.memory_bytes as i64);
            self.status.spilled_bytes = Some(stats.spilled_bytes as i64);
        }
        if current.is_some() {
            self.status.server_instance = current.clone();
        }
        if !restarted {
            return Ok(None);
        }
        self.status.server_restarts =
            Some(self.before.server_restarts.unwrap_or(0).saturating_add(1));
        if let Some(stats) = stats.filter(|s| s.state == "sealed") {
            let note = format!(
                "the server restarted and restored link {} from its snapshot: {} rows in {} partitions",
                self.name, stats.rows, stats.partitions
            );
            self.condition("ServerRestarted", true, "Restored", note.clone());
            self.events
                .push((EventType::Normal, "ServerRestarted".into(), note));
            return Ok(None);
        }
        if let Some(stats) = stats.filter(|s| !s.replicas.is_empty() && s.lost.is_empty()) {
            // Over replicas the planner knows what each restarted replica held: its commit
            // records name every published partition, and none is missing. Staged, uncommitted
            // partitions are checked by the job's own commit, which names any that are gone.
            let which = restarted_replicas(known.as_deref(), current.as_deref())
                .unwrap_or_else(|| "?".into());
            let note = format!(
                "replicas {which} of link {} restarted before the seal and lost no committed \
                 partition: {} rows in {} partitions are held; partitions they had staged but \
                 not committed are refused by the job's commit, which names them",
                self.name, stats.rows, stats.partitions
            );
            self.condition("ServerRestarted", true, "NothingLost", note.clone());
            self.events
                .push((EventType::Normal, "ServerRestarted".into(), note));
            return Ok(None);
        }
        let was = |v: Option<i64>| v.unwrap_or(0);
        let why = if self.link.spec.server.spill_url.is_none() {
            "the link had no spec.server.spillUrl to snapshot to"
        } else {
            "the link was not sealed yet, so it had no snapshot"
        };
        let mut lost = format!(
            "the server restarted and lost link {}: {} rows in {} partitions ({} bytes) as last read; {why}",
            self.name,
            was(self.before.rows),
            was(self.before.partitions),
            was(self.before.bytes),
        );
        if let Some(restarted) = restarted_replicas(known.as_deref(), current.as_deref()) {
            lost.push_str(&format!("; replicas restarted: {restarted}"));
        }
        for part in stats.iter().flat_map(|s| &s.lost) {
            lost.push_str(&format!(
                "; replica {} ({}) lost partitions {:?}",
                part.replica, part.endpoint, part.partitions
            ));
        }
        self.status.server_instance = None;
        self.status.rows = None;
        self.status.bytes = None;
        self.status.partitions = None;
        self.status.memory_used = None;
        self.status.spilled_bytes = None;
        match self.link.spec.policy.on_server_loss {
            ServerLoss::Fail => {
                let message = format!("DataLink {}: {lost}", self.name);
                self.set_kueue_check(&jobs.job, kueue::CheckState::Rejected, &message)
                    .await?;
                self.condition("ServerLost", true, "ServerLost", lost.clone());
                self.status.finished_at = Some(now().0.to_string());
                self.advance(Phase::Failed, Some("ServerLost"), lost);
                Ok(Some(self.after_end().await?))
            }
            ServerLoss::RestartProducer => {
                let reruns = self.before.producer_reruns.unwrap_or(0).saturating_add(1);
                self.status.producer_reruns = Some(reruns);
                let note = format!(
                    "{lost}; rerunning SparkApplication {} (onServerLoss: RestartProducer)",
                    jobs.producer_name
                );
                self.condition("ServerLost", true, "RestartingProducer", note.clone());
                // A Kueue-managed consumer is evicted and requeued (Retry) until the new seal.
                let message = format!(
                    "DataLink {}: {lost}; the producer runs again, training waits for it",
                    self.name
                );
                self.set_kueue_check(&jobs.job, kueue::CheckState::Retry, &message)
                    .await?;
                let how = if workloads::spark_terminated(&jobs.spark) {
                    format!(
                        "SparkApplication {} had ended; it runs again from the start with \
                         HANDOFF_PRODUCER_RERUN={reruns} in its env",
                        jobs.producer_name
                    )
                } else {
                    format!(
                        "SparkApplication {} is suspended, to run again (HANDOFF_PRODUCER_RERUN={reruns}) \
                         once the Spark Operator says SUSPENDED",
                        jobs.producer_name
                    )
                };
                self.condition("ProducerWired", false, "Rerun", how);
                self.condition(
                    "Sealed",
                    false,
                    "Receiving",
                    "the producer runs again".into(),
                );
                // The one way a phase goes back: the link fills again.
                self.status.phase = Phase::Receiving;
                self.status.reason = Some("ServerLost".into());
                self.events
                    .push((EventType::Warning, "ServerLost".into(), note));
                if resources::replicated(self.link) {
                    // The replicas that kept their part would mix it with the rerun's: the
                    // link starts over on all of them.
                    self.delete_link_on_server().await;
                }
                if let Some(patch) = workloads::spark_suspend_patch(&jobs.spark) {
                    jobs.spark_api
                        .patch(
                            &jobs.producer_name,
                            &PatchParams::apply(MANAGER),
                            &Patch::Merge(&patch),
                        )
                        .await?;
                }
                Ok(Some(self.poll()))
            }
        }
    }

    /// The consumer: env now, unsuspended when the gate opens. Only once: a user who suspends
    /// it again afterwards means it. `false` when it cannot be wired; nothing else starts then.
    async fn wire_consumer(
        &mut self,
        consumer: &ConsumerRef<'_>,
        jobs: &Jobs,
        completed: bool,
        sealed: bool,
    ) -> Result<bool> {
        let release = match self.link.spec.policy.gate {
            Gate::Streaming => !self.rerunning(),
            Gate::Sealed => completed && sealed,
        };
        let kind = &jobs.consumer_kind;
        let name = &jobs.consumer_name;
        let released_before = self.has_condition("ConsumerReleased");
        // Kueue owns a managed job's suspend: we never write it, our AdmissionCheck gates it.
        let by_kueue = kueue::managed(&jobs.job);
        let consumer_env = self.env(resources::READER_TOKEN_KEY, true);
        let patch = match workloads::consumer_patch(
            consumer,
            &jobs.job,
            &consumer_env,
            release && !released_before && !by_kueue,
        ) {
            Ok(patch) => patch,
            Err(why) => {
                // Nothing is started for a consumer that can never be given the link.
                self.condition(
                    "ConsumerReleased",
                    false,
                    "CannotWire",
                    format!("{kind} {name}: {why}"),
                );
                return Ok(false);
            }
        };
        let wired = patch.is_none();
        let releasing = patch
            .as_ref()
            .is_some_and(|p| workloads::releases(consumer, p));
        if let Some(patch) = patch {
            jobs.consumer_api
                .patch(name, &PatchParams::apply(MANAGER), &Patch::Merge(&patch))
                .await?;
        }
        if by_kueue && self.rerunning() {
            // Our Retry stands until the producer runs again: Kueue evicts and requeues on it.
            self.condition(
                "ConsumerReleased",
                false,
                "WaitingForRerun",
                format!(
                    "our AdmissionCheck asks Kueue to requeue {kind} {name} until the rerun \
                     producer seals the link"
                ),
            );
            return Ok(true);
        }
        if by_kueue {
            let gate = match self.link.spec.policy.gate {
                Gate::Sealed => "the link is sealed",
                Gate::Streaming => "the producer writes",
            };
            let (state, message) = if release && wired {
                (
                    kueue::CheckState::Ready,
                    format!("DataLink {}: {gate}; {kind} {name} may start", self.name),
                )
            } else {
                (
                    kueue::CheckState::Pending,
                    format!(
                        "DataLink {} holds {kind} {name} until {gate} (phase {:?})",
                        self.name, self.status.phase
                    ),
                )
            };
            let check = self.set_kueue_check(&jobs.job, state, &message).await?;
            self.kueue_released(consumer, jobs, check, state);
            return Ok(true);
        }
        let released = released_before
            || releasing
            || (release && !workloads::consumer_suspended(consumer, &jobs.job));
        if released {
            self.condition(
                "ConsumerReleased",
                true,
                if completed { "Sealed" } else { "Streaming" },
                format!("{kind} {name} unsuspended"),
            );
        } else if release {
            // A TrainJob's runtime patch was just written; the next write releases it.
            self.condition(
                "ConsumerReleased",
                false,
                "Wiring",
                format!("{kind} {name} is being given the link's settings"),
            );
        } else {
            self.condition(
                "ConsumerReleased",
                false,
                "WaitingForSeal",
                format!("{kind} {name} stays suspended until the link is sealed"),
            );
        }
        Ok(true)
    }

    /// `ConsumerReleased` for a job Kueue manages: released when Kueue unsuspended it, which
    /// should follow our check going Ready; if it came first, say so.
    fn kueue_released(
        &mut self,
        consumer: &ConsumerRef<'_>,
        jobs: &Jobs,
        check: KueueCheck,
        state: kueue::CheckState,
    ) {
        let (kind, name) = (&jobs.consumer_kind, &jobs.consumer_name);
        if !workloads::consumer_suspended(consumer, &jobs.job) {
            let (reason, message) = match (&check, state) {
                (KueueCheck::Set(_), kueue::CheckState::Ready) => (
                    "Admitted",
                    format!("Kueue admitted {kind} {name} once our AdmissionCheck was Ready"),
                ),
                _ => (
                    "AdmittedBeforeTheGate",
                    format!(
                        "Kueue started {kind} {name} before the link's gate opened: its \
                         ClusterQueue must list an AdmissionCheck with controllerName {} \
                         (docs/controller.md)",
                        kueue::CONTROLLER_NAME
                    ),
                ),
            };
            self.condition("ConsumerReleased", true, reason, message);
            return;
        }
        let (reason, message) = match check {
            KueueCheck::NoWorkload => (
                "WaitingForWorkload",
                format!("Kueue has made no Workload for {kind} {name} yet"),
            ),
            KueueCheck::NotListed(workload) => (
                "WaitingForKueue",
                format!(
                    "Workload {workload} lists no AdmissionCheck with controllerName {} yet; \
                     Kueue lists them once quota is reserved, if the ClusterQueue names one",
                    kueue::CONTROLLER_NAME
                ),
            ),
            KueueCheck::Set(workload) if state == kueue::CheckState::Ready => (
                "AdmissionCheckReady",
                format!("our check on Workload {workload} is Ready; Kueue admits {kind} {name}"),
            ),
            KueueCheck::Set(workload) => (
                "HeldByAdmissionCheck",
                format!("our check on Workload {workload} holds {kind} {name}"),
            ),
        };
        self.condition("ConsumerReleased", false, reason, message);
    }

    /// Set our AdmissionChecks on the Workload of a job Kueue manages; nothing for other jobs.
    async fn set_kueue_check(
        &self,
        job: &Value,
        state: kueue::CheckState,
        message: &str,
    ) -> Result<KueueCheck> {
        if !kueue::managed(job) {
            return Ok(KueueCheck::NoWorkload);
        }
        let uid = job["metadata"]["uid"].as_str().unwrap_or_default();
        let workloads = self.dynamic(&kueue::workload());
        // Kueue labels the Workload with its job's uid; the owner reference decides.
        let listed = workloads
            .list(&ListParams::default().labels(&format!("kueue.x-k8s.io/job-uid={uid}")))
            .await?;
        let listed: Vec<Value> = listed
            .items
            .into_iter()
            .map(serde_json::to_value)
            .collect::<Result<_, _>>()?;
        let Some(workload) = kueue::workload_of(&listed, job) else {
            return Ok(KueueCheck::NoWorkload);
        };
        let workload_name = workload["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let ours = self
            .our_checks
            .get_or_try_init(|| async {
                let checks: Api<DynamicObject> =
                    Api::all_with(self.ctx.client.clone(), &kueue::admission_check());
                let checks: Vec<Value> = checks
                    .list(&ListParams::default())
                    .await?
                    .items
                    .into_iter()
                    .map(serde_json::to_value)
                    .collect::<Result<_, _>>()?;
                Ok::<_, Error>(kueue::our_checks(&checks))
            })
            .await?;
        let now = now().0.to_string();
        match kueue::set_checks(workload, ours, state, message, &now) {
            kueue::Checks::NotListed => Ok(KueueCheck::NotListed(workload_name)),
            kueue::Checks::Listed(patch) => {
                if let Some(patch) = patch {
                    workloads
                        .patch_status(&workload_name, &merge_params(), &Patch::Merge(&patch))
                        .await?;
                }
                Ok(KueueCheck::Set(workload_name))
            }
        }
    }

    /// The producer: env, then unsuspended, once; after a server loss, once more when the
    /// Spark Operator has suspended it or it had ended, with a new `HANDOFF_PRODUCER_RERUN`.
    async fn wire_producer(&mut self, jobs: &Jobs) -> Result<()> {
        let producer_name = &jobs.producer_name;
        let rerun = self.rerunning();
        let mut producer_env = self.env(resources::WRITER_TOKEN_KEY, false);
        if let Some(reruns) = self.status.producer_reruns {
            // A spec change besides suspend is what makes the Spark Operator run an
            // application that had ended again; it also tells the job which run it is.
            producer_env.push(workloads::plain_env(
                "HANDOFF_PRODUCER_RERUN",
                &reruns.to_string(),
            ));
        }
        // Still stopping: its watch wakes us. Unless this rerun was started already: the
        // DataLink a reconcile starts from can predate our own last status write (the cache
        // lags), and the application, running again, will not stop for us a second time.
        if rerun
            && !workloads::spark_stopped(&jobs.spark)
            && !workloads::rerun_started(&jobs.spark, &producer_env)
        {
            return Ok(());
        }
        let wired_before = self.has_condition("ProducerWired");
        let by_kueue = kueue::managed(&jobs.spark);
        let patch = workloads::spark_patch(&jobs.spark, &producer_env, !wired_before && !by_kueue);
        let wired = patch.is_none();
        if let Some(patch) = patch {
            jobs.spark_api
                .patch(
                    producer_name,
                    &PatchParams::apply(MANAGER),
                    &Patch::Merge(&patch),
                )
                .await?;
        }
        if by_kueue {
            // The server is up (we got here) and, once the env is on the application, Kueue
            // may start it.
            let (state, message) = if wired {
                (
                    kueue::CheckState::Ready,
                    format!(
                        "DataLink {}: the server is ready and the env written",
                        self.name
                    ),
                )
            } else {
                (
                    kueue::CheckState::Pending,
                    format!("DataLink {} is writing the link's env", self.name),
                )
            };
            self.set_kueue_check(&jobs.spark, state, &message).await?;
            if !wired {
                return Ok(());
            }
        }
        self.condition(
            "ProducerWired",
            true,
            if rerun { "Rerunning" } else { "Wired" },
            format!(
                "SparkApplication {producer_name} writes to link {}",
                self.name
            ),
        );
        self.advance(
            Phase::Receiving,
            None,
            format!(
                "SparkApplication {producer_name} unsuspended; it writes to {}",
                resources::endpoint(self.link, self.tls)
            ),
        );
        Ok(())
    }

    fn seal_conditions(
        &mut self,
        jobs: &Jobs,
        stats: Option<&LinkStats>,
        completed: bool,
        sealed: bool,
    ) {
        let producer_name = &jobs.producer_name;
        let rows = stats.map_or(0, |s| s.rows);
        if completed && sealed {
            self.condition("Sealed", true, "Sealed", format!("{rows} rows sealed"));
            self.advance(
                Phase::Sealed,
                None,
                format!(
                    "SparkApplication {producer_name} completed and link {} is sealed with {rows} rows; {} {} released",
                    self.name, jobs.consumer_kind, jobs.consumer_name
                ),
            );
        } else if completed {
            let state = stats.map_or("missing", |s| s.state.as_str());
            self.condition(
                "Sealed",
                false,
                "NotSealed",
                format!(
                    "SparkApplication {producer_name} completed but link {} is {state} on the server; \
                     write with seal=true (the default) or run `handoff seal {}`",
                    self.name, self.name
                ),
            );
        } else {
            self.condition(
                "Sealed",
                false,
                "Receiving",
                "the producer is still writing".into(),
            );
        }
    }

    fn consumer_progress(&mut self, consumer: &ConsumerRef<'_>, jobs: &Jobs) {
        let (kind, name) = (&jobs.consumer_kind, &jobs.consumer_name);
        match workloads::consumer_state(consumer, &jobs.job) {
            ConsumerState::Succeeded => {
                self.finish("ConsumerSucceeded", format!("{kind} {name} succeeded"))
            }
            ConsumerState::Failed(why) => {
                self.finish("ConsumerFailed", format!("{kind} {name} failed: {why}"))
            }
            ConsumerState::Running if self.status.phase == Phase::Sealed => {
                self.advance(Phase::Consuming, None, format!("{kind} {name} is reading"))
            }
            _ => {}
        }
    }

    fn finish(&mut self, reason: &str, note: String) {
        self.status.finished_at = Some(now().0.to_string());
        self.condition("Finished", true, reason, note.clone());
        self.advance(Phase::Finished, Some(reason), note);
    }

    async fn producer_failed(&mut self, producer: &str, why: &str) -> Result<Action> {
        let consumer = if self.has_condition("ConsumerReleased") {
            "the consumer was already released (gate: streaming) and reads an unsealed link"
        } else {
            "the consumer stays suspended"
        };
        let note = format!("SparkApplication {producer} ended in {why}; {consumer}");
        self.status.finished_at = Some(now().0.to_string());
        self.condition("ProducerWired", true, "ProducerFailed", note.clone());
        self.advance(Phase::Failed, Some("ProducerFailed"), note);
        self.after_end().await
    }

    /// Phases Finished and Failed: remove the server when the policy or the TTL says so.
    async fn after_end(&mut self) -> Result<Action> {
        if self.has_condition("ServerDeleted") {
            return Ok(Action::await_change());
        }
        if self.status.phase == Phase::Failed
            && self.status.reason.as_deref() == Some("ProducerFailed")
            && self.link.spec.policy.on_producer_failure == ProducerFailure::DeleteServer
        {
            self.delete_server().await?;
            self.condition(
                "ServerDeleted",
                true,
                "ProducerFailed",
                "onProducerFailure: DeleteServer".into(),
            );
            self.events.push((
                EventType::Normal,
                "ServerDeleted".into(),
                "deleted the server and its data: the producer failed".into(),
            ));
            return Ok(Action::await_change());
        }
        let Some(ttl) = self.link.spec.policy.ttl_seconds_after_finished else {
            return Ok(Action::await_change());
        };
        let finished: Timestamp = match self.status.finished_at.as_deref().map(str::parse) {
            Some(Ok(at)) => at,
            // Failed before anything started (an invalid spec): nothing runs to expire.
            _ => return Ok(Action::await_change()),
        };
        let age = Timestamp::now().as_second() - finished.as_second();
        if age < ttl {
            return Ok(Action::requeue(Duration::from_secs(
                (ttl - age).max(1) as u64
            )));
        }
        self.delete_server().await?;
        self.condition(
            "ServerDeleted",
            true,
            "TTLExpired",
            format!("ttlSecondsAfterFinished ({ttl}) passed"),
        );
        self.events.push((
            EventType::Normal,
            "ServerDeleted".into(),
            format!("deleted the server and its data {ttl} s after the link finished"),
        ));
        Ok(Action::await_change())
    }

    /// 7. Deletion: remove what we created; the user's jobs stay.
    async fn cleanup(mut self) -> Result<Action> {
        self.observe_server().await?;
        self.delete_server().await?;
        self.events.push((
            EventType::Normal,
            "Deleted".into(),
            "deleted the server, its Secret and its data; the SparkApplication and training job are untouched".into(),
        ));
        self.publish_events("Cleanup").await;
        Ok(Action::await_change())
    }

    /// The env a job gets: the endpoint, the link, its token from the Secret, and for the
    /// consumer the read defaults.
    fn env(&self, token_key: &str, read_defaults: bool) -> Vec<Value> {
        let mut env = vec![
            workloads::plain_env(
                "HANDOFF_ENDPOINT",
                &resources::endpoint(self.link, self.tls),
            ),
            workloads::plain_env("HANDOFF_LINK", &self.name),
            workloads::secret_env(
                "HANDOFF_TOKEN",
                &resources::secret_name(self.link),
                token_key,
            ),
        ];
        if self.tls {
            env.push(workloads::secret_env(
                "HANDOFF_TLS_CA_PEM",
                &resources::secret_name(self.link),
                pki::CA_CERT_KEY,
            ));
        }
        if read_defaults {
            let read = &self.link.spec.read;
            if let Some(rows) = read.batch_rows {
                env.push(workloads::plain_env(
                    "HANDOFF_BATCH_ROWS",
                    &rows.to_string(),
                ));
            }
            if let Some(shuffle) = read.shuffle {
                env.push(workloads::plain_env(
                    "HANDOFF_SHUFFLE",
                    if shuffle { "1" } else { "0" },
                ));
            }
            if let Some(seed) = read.seed {
                env.push(workloads::plain_env("HANDOFF_SEED", &seed.to_string()));
            }
        }
        env
    }

    async fn read(&self, api: &Api<DynamicObject>, name: &str) -> Result<Option<Value>> {
        Ok(match api.get_opt(name).await? {
            Some(object) => Some(serde_json::to_value(object)?),
            None => None,
        })
    }

    /// The link's tokens: from its Secret, which is created once with fresh random tokens.
    async fn ensure_secret(&self) -> Result<Tokens> {
        let api: Api<Secret> = self.api();
        let name = resources::secret_name(self.link);
        let bad = |why: String| Error::Workload {
            kind: "Secret",
            name: name.clone(),
            why: format!("{why}; delete it and the controller writes a new one"),
        };
        let tls = self.tls;
        if let Some(secret) = api.get_opt(&name).await? {
            let tokens = Tokens::from_secret(&secret).map_err(bad)?;
            if !tls || tokens.ca_pem.is_some() {
                return Ok(tokens);
            }
            // A Secret from before TLS (a controller upgrade, or `tls` switched on): add the
            // certificates; the server's Deployment, changed too, picks them up.
            let certs = self.issue_certificates()?;
            let patch = Secret {
                data: Some(resources::certificate_data(&certs)),
                ..Default::default()
            };
            api.patch(&name, &merge_params(), &Patch::Merge(&patch))
                .await?;
            return Ok(Tokens {
                ca_pem: Some(certs.ca_pem),
                ..tokens
            });
        }
        let mut tokens = Tokens::generate()
            .map_err(|e| Error::Config(format!("no randomness for tokens: {e}")))?;
        let certs = tls.then(|| self.issue_certificates()).transpose()?;
        tokens.ca_pem = certs.as_ref().map(|c| c.ca_pem.clone());
        match api
            .create(
                &PostParams {
                    field_manager: Some(MANAGER.into()),
                    ..Default::default()
                },
                &resources::token_secret(self.link, &tokens, certs.as_ref()),
            )
            .await
        {
            Ok(_) => Ok(tokens),
            // Another reconcile won the race; its tokens are the ones the server uses.
            Err(kube::Error::Api(status)) if status.is_already_exists() => {
                let secret = api.get(&name).await?;
                Tokens::from_secret(&secret).map_err(bad)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// A fresh CA for this link and its server's certificate.
    fn issue_certificates(&self) -> Result<pki::LinkCertificates> {
        pki::issue(&self.name, resources::server_dns_names(self.link))
            .map_err(|e| Error::Config(format!("cannot make the link's TLS certificates: {e}")))
    }

    /// Server-side apply `object` unless it is already what we last applied.
    async fn ensure_applied<K>(&self, object: K) -> Result<K>
    where
        K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
            + Clone
            + DeserializeOwned
            + serde::Serialize
            + std::fmt::Debug,
    {
        let api: Api<K> = self.api();
        let (object, hash) = resources::with_applied_hash(object)?;
        let name = object.meta().name.clone().unwrap_or_default();
        if let Some(current) = api.get_opt(&name).await?
            && current.annotations().get(resources::APPLIED_HASH) == Some(&hash)
        {
            return Ok(current);
        }
        Ok(api
            .patch(
                &name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&object),
            )
            .await?)
    }

    /// Where the controller dials the server: the Service's ClusterIP, so that it needs no
    /// cluster DNS (TLS still verifies the Service's DNS name); its DNS name while the Service
    /// has no ClusterIP.
    async fn server_endpoint(&self) -> String {
        if let Some(endpoint) = &self.ctx.config.endpoint_override {
            return endpoint.clone();
        }
        let ip = self
            .service_ip
            .get_or_init(|| async {
                let service = self
                    .api::<Service>()
                    .get_opt(&resources::server_name(self.link))
                    .await;
                match service {
                    Ok(service) => service.and_then(|s| s.spec).and_then(|s| s.cluster_ip),
                    Err(e) => {
                        // The DNS name still works where the cluster has DNS.
                        debug!(link = %self.name, error = %e, "could not read the server Service");
                        None
                    }
                }
            })
            .await;
        resources::dial_endpoint(self.link, self.tls, ip.as_deref())
    }

    async fn flight(&self, tokens: &Tokens) -> Result<HandoffClient> {
        let endpoint = self.server_endpoint().await;
        let mut config = ClientConfig::new(endpoint.clone(), Some(tokens.admin.clone()));
        config.connect_timeout = FLIGHT_TIMEOUT;
        if self.tls {
            // The link's own CA, and the Service's name, whatever address reaches it.
            config.tls_ca_pem = tokens.ca_pem.clone().map(String::into_bytes);
            config.tls_domain = Some(resources::server_host(self.link));
        }
        HandoffClient::connect_with(config)
            .await
            .map_err(|source| Error::Server { endpoint, source })
    }

    /// The link's stats; `None` while the producer has not created it.
    async fn stats(&self, tokens: &Tokens) -> Result<Option<LinkStats>> {
        let endpoint = self.server_endpoint().await;
        let mut client = self.flight(tokens).await?;
        match tokio::time::timeout(FLIGHT_TIMEOUT, client.stats(&self.name)).await {
            Ok(Ok(stats)) => Ok(Some(stats)),
            Ok(Err(e)) if e.code() == Some(tonic::Code::NotFound) => Ok(None),
            Ok(Err(source)) => Err(Error::Server { endpoint, source }),
            Err(_) => Err(Error::ServerTimeout {
                endpoint,
                call: "stats",
                waited: FLIGHT_TIMEOUT,
            }),
        }
    }

    /// Create the (empty) link on its server; the producer's first commit fixes its schema.
    async fn create_link(&mut self, tokens: &Tokens) -> Result<LinkStats> {
        let endpoint = self.server_endpoint().await;
        let mut client = self.flight(tokens).await?;
        let request = handoff_client::CreateLink {
            link: self.name.clone(),
            exist_ok: true,
            ..Default::default()
        };
        match tokio::time::timeout(FLIGHT_TIMEOUT, client.create(request)).await {
            Ok(Ok(_)) => {}
            Ok(Err(source)) => return Err(Error::Server { endpoint, source }),
            Err(_) => {
                return Err(Error::ServerTimeout {
                    endpoint,
                    call: "create",
                    waited: FLIGHT_TIMEOUT,
                });
            }
        }
        info!(link = %self.name, "created the link on its server for a streaming consumer");
        let stats = self.stats(tokens).await?.ok_or_else(|| {
            Error::Config(format!(
                "link {} is not on the server right after it was created",
                self.name
            ))
        })?;
        if !stats.server_instance.is_empty() {
            self.status.server_instance = Some(stats.server_instance.clone());
        }
        Ok(stats)
    }

    /// Delete the link on its server (which removes spilled objects), then the server's objects.
    async fn delete_server(&self) -> Result<()> {
        self.delete_link_on_server().await;
        let secrets: Api<Secret> = self.api();
        let name = resources::server_name(self.link);
        let params = DeleteParams::background();
        ignore_missing(self.api::<NetworkPolicy>().delete(&name, &params).await)?;
        ignore_missing(self.api::<Service>().delete(&name, &params).await)?;
        self.delete_workload("Deployment").await?;
        self.delete_workload("StatefulSet").await?;
        ignore_missing(
            secrets
                .delete(&resources::secret_name(self.link), &params)
                .await,
        )?;
        Ok(())
    }

    /// Delete the link on its server, on every replica; best effort.
    async fn delete_link_on_server(&self) {
        let secrets: Api<Secret> = self.api();
        if let Ok(Some(secret)) = secrets.get_opt(&resources::secret_name(self.link)).await
            && let Ok(tokens) = Tokens::from_secret(&secret)
        {
            // Best effort: a server that is gone took its memory and emptyDir with it, and one
            // stopping on SIGTERM removes its spill prefix.
            let deleted = async {
                let endpoint = self.server_endpoint().await;
                let mut client = self.flight(&tokens).await?;
                client
                    .delete(&self.name)
                    .await
                    .map_err(|source| Error::Server { endpoint, source })
            };
            match tokio::time::timeout(FLIGHT_TIMEOUT, deleted).await {
                Ok(Ok(_)) => info!(link = %self.name, "deleted the link on its server"),
                Ok(Err(e)) => {
                    info!(link = %self.name, error = %e, "link not deleted on its server")
                }
                Err(_) => info!(link = %self.name, "the server did not answer delete in time"),
            }
        }
    }
}

/// Which replicas restarted, from the server instances before and now (each replica's, joined
/// by commas): `None` for a single server.
fn restarted_replicas(before: Option<&str>, now: Option<&str>) -> Option<String> {
    let (before, now) = (
        before?.split(',').collect::<Vec<_>>(),
        now?.split(',').collect::<Vec<_>>(),
    );
    if before.len() <= 1 || before.len() != now.len() {
        return None;
    }
    let changed: Vec<String> = (0..before.len())
        .filter(|&i| before[i] != now[i])
        .map(|i| i.to_string())
        .collect();
    (!changed.is_empty()).then(|| changed.join(", "))
}

fn ignore_missing<T>(result: kube::Result<T>) -> Result<()> {
    match result {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.is_not_found() => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::{backoff, retry_after};
    use std::time::Duration;

    #[test]
    fn an_unreachable_server_is_retried_every_poll_interval_at_most() {
        let poll = Duration::from_secs(5);
        assert_eq!(retry_after("server", 1, poll), Duration::from_secs(1));
        assert_eq!(retry_after("server", 30, poll), poll);
        assert_eq!(retry_after("kube", 30, poll), Duration::from_secs(300));
        assert_eq!(
            retry_after("conflict", 30, poll),
            Duration::from_millis(500)
        );
    }

    #[test]
    fn backoff_doubles_per_failure_up_to_five_minutes() {
        let secs: Vec<u64> = [1, 2, 3, 4, 9, 10, 50, u32::MAX]
            .map(|n| backoff(n).as_secs())
            .to_vec();
        assert_eq!(secs, [1, 2, 4, 8, 256, 300, 300, 300]);
        assert_eq!(backoff(0), Duration::from_secs(1));
    }
}
