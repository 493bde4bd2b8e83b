//! The DataLink controller end to end, against a real kube-apiserver and etcd (or any cluster in
//! `HANDOFF_TEST_KUBECONFIG`) and a real `handoff serve`.
//!
//! The controller runs in-process with the ClusterRole from `deploy/base/rbac.yaml`, by
//! impersonating its service account, so every call it makes is checked by real RBAC. Every write
//! it issues is recorded at the HTTP layer.
//!
//! No pods run here (no controller-manager, scheduler or kubelet), so the test plays the other
//! parts as they would: it starts the link's server with the tokens from the Secret the
//! controller wrote, marks the Deployment available, writes real batches with the token the
//! SparkApplication was given, and moves the Spark and training jobs through their states.

mod common;

use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use arrow_array::{Float32Array, Int64Array, RecordBatch};
use arrow_schema::{DataType, Field, Schema};
use common::{Cluster, fixture, install_crd, install_kueue_crds, install_upstream_crds, repo};
use handoff_client::HandoffClient;
use handoff_controller::{ControllerConfig, DataLink, Metrics, Phase, resources};
use handoff_testkit::eventually;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{Namespace, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use tokio::sync::oneshot;

const SERVICE_ACCOUNT: &str = "system:serviceaccount:handoff-system:handoff-controller";

/// Apply deploy/base's namespace and RBAC, as `kubectl apply -k deploy/base` would.
async fn install_rbac(client: &Client) {
    let params = PatchParams::apply("handoff-test").force();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let text = std::fs::read_to_string(repo().join("deploy/base/namespace.yaml")).expect("read");
    let namespace: Namespace = serde_yaml::from_str(&text).expect("namespace");
    namespaces
        .patch(&namespace.name_any(), &params, &Patch::Apply(&namespace))
        .await
        .expect("namespace");
    let text = std::fs::read_to_string(repo().join("deploy/base/rbac.yaml")).expect("read");
    for document in serde_yaml::Deserializer::from_str(&text) {
        let value: Value = serde::Deserialize::deserialize(document).expect("yaml");
        match value["kind"].as_str() {
            Some("ServiceAccount") => {
                let sa: ServiceAccount = serde_json::from_value(value).expect("sa");
                let api: Api<ServiceAccount> = Api::namespaced(client.clone(), "handoff-system");
                api.patch(&sa.name_any(), &params, &Patch::Apply(&sa))
                    .await
                    .expect("service account");
            }
            Some("ClusterRole") => {
                let role: ClusterRole = serde_json::from_value(value).expect("role");
                Api::<ClusterRole>::all(client.clone())
                    .patch(&role.name_any(), &params, &Patch::Apply(&role))
                    .await
                    .expect("cluster role");
            }
            Some("ClusterRoleBinding") => {
                let binding: ClusterRoleBinding = serde_json::from_value(value).expect("binding");
                Api::<ClusterRoleBinding>::all(client.clone())
                    .patch(&binding.name_any(), &params, &Patch::Apply(&binding))
                    .await
                    .expect("binding");
            }
            other => panic!("unexpected kind {other:?} in deploy/base/rbac.yaml"),
        }
    }
}

/// Records every request that is not a read.
#[derive(Clone)]
struct RecordWrites<S> {
    inner: S,
    writes: Arc<Mutex<Vec<String>>>,
}

impl<S, B> tower::Service<http::Request<B>> for RecordWrites<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.method() != http::Method::GET {
            let line = format!("{} {}", request.method(), request.uri().path());
            self.writes.lock().expect("lock").push(line);
        }
        self.inner.call(request)
    }
}

/// A controller instance watching one namespace.
struct RunningController {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), handoff_controller::Error>>,
    metrics: Arc<Metrics>,
    writes: Arc<Mutex<Vec<String>>>,
}

impl RunningController {
    async fn start(cluster: &Cluster, namespace: &str, endpoint: &str) -> Self {
        // On a real cluster (kind), load an image that runs, e.g. `handoff:dev`.
        let image =
            std::env::var("HANDOFF_TEST_SERVER_IMAGE").unwrap_or_else(|_| "handoff:test".into());
        Self::start_with_image(cluster, namespace, endpoint, &image).await
    }

    async fn start_with_image(
        cluster: &Cluster,
        namespace: &str,
        endpoint: &str,
        server_image: &str,
    ) -> Self {
        let groups = vec![
            "system:serviceaccounts".to_string(),
            "system:serviceaccounts:handoff-system".to_string(),
            "system:authenticated".to_string(),
        ];
        let config = common::config_for(&cluster.kubeconfig, Some((SERVICE_ACCOUNT, groups))).await;
        let writes = Arc::new(Mutex::new(Vec::new()));
        let recorder = writes.clone();
        let client = kube::client::ClientBuilder::try_from(config)
            .expect("client builder")
            .with_layer(&tower::layer::layer_fn(move |inner| RecordWrites {
                inner,
                writes: recorder.clone(),
            }))
            .build();
        let metrics = Arc::new(Metrics::default());
        let config = ControllerConfig {
            namespace: Some(namespace.into()),
            server_image: server_image.into(),
            endpoint_override: Some(endpoint.into()),
            poll_interval: Duration::from_millis(500),
            instance: Some(format!("test-{namespace}")),
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(handoff_controller::run(
            client,
            config,
            Arc::clone(&metrics),
            async move {
                let _ = stopped.await;
            },
        ));
        Self {
            stop,
            task,
            metrics,
            writes,
        }
    }

    fn writes(&self) -> Vec<String> {
        self.writes.lock().expect("lock").clone()
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        self.task
            .await
            .expect("controller task")
            .expect("controller ran");
    }
}

/// The link's `handoff serve`, as its pod would run it.
struct LinkServer {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl LinkServer {
    fn spawn(
        store: Arc<handoff_store::Store>,
        config: handoff_server::ServerConfig,
        listener: tokio::net::TcpListener,
    ) -> Self {
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            handoff_server::serve(store, config, listener, None, async move {
                let _ = stopped.await;
            })
            .await
            .expect("server ran");
        });
        Self { stop, task }
    }
}

/// Object storage at `url`, ready for use, as `serve --spill-url` prepares it.
fn storage(url: &str) -> handoff_store::ObjectStorage {
    let storage = handoff_store::ObjectStorage::from_url(url).expect("storage url");
    storage.prepare().expect("storage");
    storage
}

fn batch(start: i64, rows: usize) -> RecordBatch {
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("x", DataType::Float32, false),
    ]));
    let ids: Vec<i64> = (start..start + rows as i64).collect();
    let xs: Vec<f32> = ids.iter().map(|i| *i as f32 / 2.0).collect();
    RecordBatch::try_new(
        schema,
        vec![
            Arc::new(Int64Array::from(ids)),
            Arc::new(Float32Array::from(xs)),
        ],
    )
    .expect("batch")
}

#[derive(Clone, Copy, PartialEq)]
enum Consumer {
    PyTorchJob,
    TrainJob,
}

/// Every version of one object, as a watch sees them; a re-list starts a new run, since versions
/// between the two were not seen.
struct History {
    runs: Arc<Mutex<Vec<Vec<Value>>>>,
    task: tokio::task::JoinHandle<()>,
    kind: String,
}

impl History {
    fn watch(api: Api<DynamicObject>, name: &str, kind: &str) -> Self {
        use futures::StreamExt;
        use kube::runtime::WatchStreamExt;
        use kube::runtime::watcher::{self, Event};
        let runs: Arc<Mutex<Vec<Vec<Value>>>> = Arc::default();
        let sink = Arc::clone(&runs);
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let task = tokio::spawn(async move {
            // With backoff: a watch that fails at once again and again would never yield.
            let mut events = std::pin::pin!(watcher::watcher(api, config).default_backoff());
            while let Some(event) = events.next().await {
                let mut runs = sink.lock().expect("lock");
                match event {
                    Ok(Event::Init) => runs.push(Vec::new()),
                    Ok(Event::Apply(object) | Event::InitApply(object)) => {
                        let value = serde_json::to_value(object).expect("json");
                        if runs.is_empty() {
                            runs.push(Vec::new());
                        }
                        let run = runs.last_mut().expect("a run");
                        if run.last().map(|v| &v["metadata"]["resourceVersion"])
                            != Some(&value["metadata"]["resourceVersion"])
                        {
                            run.push(value);
                        }
                    }
                    _ => {}
                }
            }
        });
        Self {
            runs,
            task,
            kind: kind.into(),
        }
    }

    /// Hold every update seen to the upstream CRD's CEL rules.
    fn check(self, rules: &common::crd_rules::CrdRules) {
        self.task.abort();
        let runs = self.runs.lock().expect("lock").clone();
        let versions: usize = runs.iter().map(Vec::len).sum();
        assert!(versions >= 1, "the {} watch saw nothing", self.kind);
        for run in &runs {
            let violations = common::crd_rules::check_history(rules, run);
            assert!(
                violations.is_empty(),
                "{} updates a current API server would refuse: {violations:#?}",
                self.kind
            );
        }
    }
}

fn upstream_rules(consumer: Option<Consumer>) -> common::crd_rules::CrdRules {
    let (file, version) = match consumer {
        None => ("sparkoperator.k8s.io_sparkapplications.yaml", "v1beta2"),
        Some(Consumer::PyTorchJob) => ("kubeflow.org_pytorchjobs.yaml", "v1"),
        Some(Consumer::TrainJob) => ("trainer.kubeflow.org_trainjobs.yaml", "v1alpha1"),
    };
    common::crd_rules::CrdRules::of(&fixture(file), version)
}

/// One namespace with a SparkApplication, a training job, a DataLink, its server and a controller.
struct Scenario<'a> {
    /// Every version of the two jobs, held to their CRDs' rules at the end.
    histories: Vec<(Option<Consumer>, History)>,
    cluster: &'a Cluster,
    namespace: String,
    consumer: Consumer,
    endpoint: String,
    /// Where the link's server listens, across its restarts.
    addr: std::net::SocketAddr,
    listener: Option<tokio::net::TcpListener>,
    server: Option<LinkServer>,
    controller: Option<RunningController>,
    /// Kept from the Secret: cleanup deletes it.
    tokens: Option<resources::Tokens>,
    /// The link's Secret as the server found it: tokens, certificate and key, CA.
    secret_data: Option<std::collections::BTreeMap<String, Vec<u8>>>,
    /// Over several replicas: each replica's address (replica 0's is `addr`) and server.
    replica_addrs: Vec<std::net::SocketAddr>,
    replicas: Vec<Option<LinkServer>>,
}

fn spark_resource() -> ApiResource {
    handoff_controller::workloads::spark_application()
}

impl<'a> Scenario<'a> {
    async fn new(cluster: &'a Cluster, name: &str, consumer: Consumer, link: Value) -> Self {
        // A shared cluster keeps namespaces from earlier runs (they may still be terminating).
        let namespace = &if cluster.is_local() {
            name.to_string()
        } else {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            format!("{name}-{:x}", now.as_secs())
        };
        let namespaces: Api<Namespace> = Api::all(cluster.client.clone());
        let ns: Namespace =
            serde_json::from_value(json!({"metadata": {"name": namespace}})).expect("ns");
        namespaces
            .create(&PostParams::default(), &ns)
            .await
            .expect("create namespace");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        // The server speaks TLS, as the controller configures it by default.
        let addr = listener.local_addr().expect("addr");
        let endpoint = format!("grpc+tls://{addr}");
        let mut scenario = Self {
            histories: Vec::new(),
            cluster,
            namespace: namespace.into(),
            consumer,
            endpoint,
            addr,
            listener: Some(listener),
            server: None,
            controller: None,
            tokens: None,
            secret_data: None,
            replica_addrs: Vec::new(),
            replicas: Vec::new(),
        };
        scenario.create_jobs().await;
        scenario.histories = vec![
            (
                None,
                History::watch(
                    scenario.dynamic(&spark_resource()),
                    "producer",
                    "SparkApplication",
                ),
            ),
            (
                Some(consumer),
                History::watch(
                    scenario.dynamic(&scenario.consumer_resource()),
                    "trainer",
                    &scenario.consumer_resource().kind,
                ),
            ),
        ];
        let mut link: DataLink = serde_json::from_value(json!({
            "apiVersion": "handoff.kubeflow.org/v1alpha1", "kind": "DataLink",
            "metadata": {"name": "features", "namespace": namespace},
            "spec": link,
        }))
        .expect("a DataLink");
        link.spec.producer.spark_application = "producer".into();
        scenario
            .links()
            .create(&PostParams::default(), &link)
            .await
            .expect("create the DataLink");
        scenario
    }

    /// A scenario whose SparkApplication the controller has wired and the operator runs: the
    /// start most scenarios share. Returns the application as wired.
    async fn producing(
        cluster: &'a Cluster,
        name: &str,
        consumer: Consumer,
        link: Value,
    ) -> (Self, Value) {
        let mut s = Self::new(cluster, name, consumer, link).await;
        s.start_controller().await;
        s.run_server().await;
        let spark = s.wait_producer_wired().await;
        s.spark_state("RUNNING").await;
        (s, spark)
    }

    fn links(&self) -> Api<DataLink> {
        Api::namespaced(self.cluster.client.clone(), &self.namespace)
    }

    fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>,
    {
        Api::namespaced(self.cluster.client.clone(), &self.namespace)
    }

    fn dynamic(&self, resource: &ApiResource) -> Api<DynamicObject> {
        Api::namespaced_with(self.cluster.client.clone(), &self.namespace, resource)
    }

    fn consumer_resource(&self) -> ApiResource {
        match self.consumer {
            Consumer::PyTorchJob => handoff_controller::workloads::pytorch_job(),
            Consumer::TrainJob => handoff_controller::workloads::train_job(),
        }
    }

    /// The upstream examples, renamed into this namespace and created suspended, with one env
    /// entry of the user's own that wiring must keep.
    async fn create_jobs(&self) {
        let mut spark = fixture("examples/spark-pi.yaml");
        spark["metadata"] = json!({"name": "producer", "namespace": self.namespace});
        spark["spec"]["suspend"] = json!(true);
        spark["spec"]["driver"]["env"] = json!([{"name": "USER_SETTING", "value": "kept"}]);
        let spark: DynamicObject = serde_json::from_value(spark).expect("spark");
        self.dynamic(&spark_resource())
            .create(&PostParams::default(), &spark)
            .await
            .expect("create the SparkApplication");
        let mut job = match self.consumer {
            Consumer::PyTorchJob => {
                let mut job = fixture("examples/pytorchjob-simple.yaml");
                job["spec"]["runPolicy"]["suspend"] = json!(true);
                job
            }
            Consumer::TrainJob => {
                let mut job = fixture("examples/trainjob-01-multi-node.yaml");
                job["spec"]["suspend"] = json!(true);
                job
            }
        };
        job["metadata"] = json!({"name": "trainer", "namespace": self.namespace});
        let job: DynamicObject = serde_json::from_value(job).expect("job");
        self.dynamic(&self.consumer_resource())
            .create(&PostParams::default(), &job)
            .await
            .expect("create the training job");
    }

    async fn start_controller(&mut self) {
        let controller =
            RunningController::start(self.cluster, &self.namespace, &self.endpoint).await;
        self.controller = Some(controller);
    }

    /// A controller as a newer release would run: another default server image.
    async fn start_controller_with_image(&mut self, image: &str) {
        let controller = RunningController::start_with_image(
            self.cluster,
            &self.namespace,
            &self.endpoint,
            image,
        )
        .await;
        self.controller = Some(controller);
    }

    async fn stop_controller(&mut self) {
        if let Some(controller) = self.controller.take() {
            controller.stop().await;
        }
    }

    fn controller(&self) -> &RunningController {
        self.controller.as_ref().expect("controller running")
    }

    async fn tokens(&self) -> resources::Tokens {
        let secrets: Api<Secret> = self.api();
        let secret = eventually("the tokens Secret", || async {
            secrets
                .get_opt("features-handoff-tokens")
                .await
                .ok()
                .flatten()
        })
        .await;
        resources::Tokens::from_secret(&secret).expect("three tokens")
    }

    /// The link's tokens and Secret, as the server's pod mounts them.
    async fn read_secret(&mut self) {
        self.tokens = Some(self.tokens().await);
        let secret: Secret = self
            .api()
            .get("features-handoff-tokens")
            .await
            .expect("secret");
        self.secret_data = Some(
            secret
                .data
                .expect("data")
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect(),
        );
    }

    /// A link server's config as its pod runs it: TLS with the Secret's certificate, and the
    /// Secret's three tokens.
    fn server_config(&self) -> handoff_server::ServerConfig {
        let tokens = self.tokens.as_ref().expect("tokens read");
        let secret = self.secret_data.as_ref().expect("secret read");
        let file = |key: &str| {
            secret
                .get(key)
                .unwrap_or_else(|| panic!("{key} in the Secret"))
                .clone()
        };
        handoff_server::ServerConfig {
            tls: Some(handoff_server::TlsConfig {
                cert_pem: file("tls.crt"),
                key_pem: file("tls.key"),
                client_ca_pem: None,
            }),
            auth: handoff_server::AuthConfig {
                disabled: false,
                admin_tokens: vec![tokens.admin.clone()],
                writer_tokens: vec![tokens.writer.clone()],
                reader_tokens: vec![tokens.reader.clone()],
            },
            ..Default::default()
        }
    }

    /// Be the kubelet and the deployment controller: run the server the Deployment describes,
    /// with its Secret's tokens, and report the Deployment available.
    async fn run_server(&mut self) {
        self.read_secret().await;
        let deployments: Api<Deployment> = self.api();
        let deployment = eventually("the server Deployment", || async {
            deployments.get_opt("features-handoff").await.ok().flatten()
        })
        .await;
        let pod = deployment.spec.expect("spec").template.spec.expect("pod");
        let env = pod.containers[0].env.clone().expect("env");
        for (var, key) in [
            ("HANDOFF_TOKEN", resources::ADMIN_TOKEN_KEY),
            ("HANDOFF_WRITER_TOKEN", resources::WRITER_TOKEN_KEY),
            ("HANDOFF_READER_TOKEN", resources::READER_TOKEN_KEY),
        ] {
            let from = env.iter().find(|e| e.name == var).expect("token env");
            let key_ref = from
                .value_from
                .as_ref()
                .and_then(|v| v.secret_key_ref.as_ref());
            assert_eq!(key_ref.map(|k| k.key.as_str()), Some(key), "{var}");
        }
        // TLS: the certificate and key from the Secret, at the paths the args name.
        let args = pod.containers[0].args.clone().expect("args");
        let arg = |flag: &str| {
            let at = args.iter().position(|a| a == flag).expect(flag);
            args[at + 1].clone()
        };
        assert_eq!(arg("--tls-cert"), "/etc/handoff/tls.crt");
        assert_eq!(arg("--tls-key"), "/etc/handoff/tls.key");
        let mounted = pod.containers[0]
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.mount_path == "/etc/handoff")
            .expect("the Secret mounted at /etc/handoff");
        let volume = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == mounted.name)
            .expect("volume");
        assert_eq!(
            volume
                .secret
                .as_ref()
                .and_then(|s| s.secret_name.as_deref()),
            Some("features-handoff-tokens")
        );
        let listener = match self.listener.take() {
            Some(listener) => listener,
            // A restart: the same address, as the Service keeps routing to the new pod.
            None => tokio::net::TcpListener::bind(self.addr)
                .await
                .expect("bind the server's address again"),
        };
        let config = self.server_config();
        // Object storage, snapshots and restore, as the args say.
        let flag = |name: &str| args.iter().any(|a| a == name);
        let value = |name: &str| {
            args.iter()
                .position(|a| a == name)
                .map(|at| args[at + 1].clone())
        };
        let store = handoff_store::Store::new(handoff_store::StoreConfig {
            storage: value("--spill-url")
                .filter(|url| !url.starts_with("file:///var/lib/handoff"))
                .map(|url| storage(&url)),
            snapshot_on_seal: flag("--snapshot-on-seal"),
            ..Default::default()
        });
        if let Some(url) = value("--restore-from") {
            let restored = store
                .restore_all(&storage(&url))
                .await
                .expect("restore before serving");
            assert!(restored.skipped.is_empty(), "{:?}", restored.skipped);
        }
        self.server = Some(LinkServer::spawn(store, config, listener));
        let status = json!({"status": {"replicas": 1, "readyReplicas": 1, "availableReplicas": 1,
            "updatedReplicas": 1, "observedGeneration": 1,
            "conditions": [{"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable",
                "message": "test", "lastUpdateTime": "2026-01-01T00:00:00Z", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}});
        if self.cluster.is_local() {
            deployments
                .patch_status(
                    "features-handoff",
                    &PatchParams::default(),
                    &Patch::Merge(&status),
                )
                .await
                .expect("mark the Deployment available");
        }
    }

    /// Be the StatefulSet controller and the kubelet for a link over several replicas: check the
    /// StatefulSet, its headless Service, the Service (replica 0 alone) and the NetworkPolicy the
    /// controller made, then start every replica as its pod would run, and report them ready.
    async fn run_replicas(&mut self, count: usize) {
        self.read_secret().await;
        let sets: Api<StatefulSet> = self.api();
        let set = eventually("the server StatefulSet", || async {
            sets.get_opt("features-handoff").await.ok().flatten()
        })
        .await;
        let deployments: Api<Deployment> = self.api();
        assert!(
            deployments
                .get_opt("features-handoff")
                .await
                .expect("get")
                .is_none(),
            "a StatefulSet, not a Deployment"
        );
        let spec = set.spec.expect("spec");
        assert_eq!(spec.replicas, Some(count as i32));
        assert_eq!(spec.service_name.as_deref(), Some("features-handoff-peers"));
        assert_eq!(spec.pod_management_policy.as_deref(), Some("Parallel"));
        let services: Api<Service> = self.api();
        let peers = eventually("the headless Service", || async {
            services
                .get_opt("features-handoff-peers")
                .await
                .ok()
                .flatten()
        })
        .await
        .spec
        .expect("spec");
        assert_eq!(peers.cluster_ip.as_deref(), Some("None"));
        assert_eq!(peers.publish_not_ready_addresses, Some(true));
        let front = eventually("the Service", || async {
            services.get_opt("features-handoff").await.ok().flatten()
        })
        .await
        .spec
        .expect("spec");
        assert_eq!(
            front
                .selector
                .expect("selector")
                .get("statefulset.kubernetes.io/pod-name")
                .map(String::as_str),
            Some("features-handoff-0"),
            "clients start at the planner"
        );
        let policies: Api<NetworkPolicy> = self.api();
        let policy = eventually("the NetworkPolicy", || async {
            policies.get_opt("features-handoff").await.ok().flatten()
        })
        .await;
        let policy = serde_json::to_value(policy).expect("json");
        assert!(
            policy["spec"]["ingress"][0]["from"]
                .as_array()
                .expect("from")
                .iter()
                .any(
                    |peer| peer["podSelector"]["matchLabels"]["app.kubernetes.io/instance"]
                        == "features-handoff"
                ),
            "replicas may call each other: {policy}"
        );
        let pod = spec.template.spec.expect("pod");
        let env = pod.containers[0].env.clone().expect("env");
        let pod_name = env
            .iter()
            .find(|e| e.name == "HANDOFF_POD_NAME")
            .expect("the pod's name in its env");
        assert_eq!(
            pod_name
                .value_from
                .as_ref()
                .and_then(|v| v.field_ref.as_ref())
                .map(|f| f.field_path.as_str()),
            Some("metadata.name")
        );
        let args = pod.containers[0].args.clone().expect("args");
        let arg = |flag: &str| {
            let at = args.iter().position(|a| a == flag).expect(flag);
            args[at + 1].clone()
        };
        let ns = &self.namespace;
        let names: Vec<String> = (0..count)
            .map(|i| format!("features-handoff-{i}.features-handoff-peers.{ns}.svc"))
            .collect();
        let endpoints: Vec<String> = names
            .iter()
            .map(|n| format!("grpc+tls://{n}:8815"))
            .collect();
        assert_eq!(arg("--peers"), endpoints.join(","));
        assert_eq!(arg("--replica-index"), "$(HANDOFF_POD_NAME)");
        assert_eq!(arg("--peer-ca"), "/etc/handoff/ca.crt");
        // The kubelet's expansion of $(HANDOFF_POD_NAME) in each pod's args.
        let expand = |value: String, i: usize| {
            value.replace("$(HANDOFF_POD_NAME)", &format!("features-handoff-{i}"))
        };
        if self.replica_addrs.is_empty() {
            // Replica 0 listens where the Service (the controller's endpoint) points.
            drop(self.listener.take());
            self.replica_addrs.push(self.addr);
            for _ in 1..count {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind");
                self.replica_addrs
                    .push(listener.local_addr().expect("addr"));
                drop(listener);
            }
            self.replicas = (0..count).map(|_| None).collect();
        }
        let spill = arg("--spill-url");
        let restore = arg("--restore-from");
        for i in 0..count {
            self.start_replica(
                i,
                expand(spill.clone(), i),
                expand(restore.clone(), i),
                // Replicas dial each other by address here, and verify the name the pods would
                // dial: replica 0's, under the certificate's wildcard.
                names[0].clone(),
            )
            .await;
        }
        if self.cluster.is_local() {
            let status = json!({"status": {"replicas": count, "readyReplicas": count,
                "currentReplicas": count, "updatedReplicas": count, "observedGeneration": 1}});
            sets.patch_status(
                "features-handoff",
                &PatchParams::default(),
                &Patch::Merge(&status),
            )
            .await
            .expect("mark the StatefulSet ready");
        }
    }

    /// Start replica `i` as its pod runs: with its own storage prefix, restoring what it
    /// snapshotted there, and peers verified as `peer_name`.
    async fn start_replica(&mut self, i: usize, spill: String, restore: String, peer_name: String) {
        let admin = self.tokens.as_ref().expect("tokens read").admin.clone();
        let ca = self.secret_data.as_ref().expect("secret read")["ca.crt"].clone();
        let peers: Vec<String> = self
            .replica_addrs
            .iter()
            .map(|a| format!("grpc+tls://{a}"))
            .collect();
        let replicas = handoff_server::ReplicaConfig::new(peers, i as u32, Some(admin))
            .expect("replica config")
            .with_tls(Some(ca), Some(peer_name));
        let config = handoff_server::ServerConfig {
            replicas: Some(replicas),
            ..self.server_config()
        };
        let store = handoff_store::Store::new(handoff_store::StoreConfig {
            storage: Some(storage(&spill)),
            snapshot_on_seal: true,
            ..Default::default()
        });
        let restored = store
            .restore_all(&storage(&restore))
            .await
            .expect("restore before serving");
        assert!(restored.skipped.is_empty(), "{:?}", restored.skipped);
        let listener = tokio::net::TcpListener::bind(self.replica_addrs[i])
            .await
            .expect("bind the replica's address");
        self.replicas[i] = Some(LinkServer::spawn(store, config, listener));
    }

    async fn stop_replica(&mut self, i: usize) {
        if let Some(server) = self.replicas.get_mut(i).and_then(Option::take) {
            let _ = server.stop.send(());
            server.task.await.expect("replica task");
        }
    }

    /// Replica `i`'s pod restarts: its memory goes, and it restores its own snapshot.
    async fn restart_replica(&mut self, i: usize, storage: &str) {
        self.stop_replica(i).await;
        let own = format!("{storage}/features-handoff-{i}");
        let name = format!(
            "features-handoff-0.features-handoff-peers.{}.svc",
            self.namespace
        );
        self.start_replica(i, own.clone(), own, name).await;
    }

    /// The server pod restarts: a new process, empty unless it restores a snapshot.
    async fn restart_server(&mut self) {
        self.stop_server().await;
        self.run_server().await;
    }

    /// The DataLink once `condition` holds with `reason`.
    async fn wait_condition(&self, condition: &str, reason: &str) -> DataLink {
        let links = self.links();
        let waited = handoff_testkit::patience();
        let found = handoff_testkit::poll_until(waited, || async {
            let link = links.get("features").await.ok()?;
            link.status
                .as_ref()?
                .conditions
                .iter()
                .any(|c| c.type_ == condition && c.reason == reason && c.status == "True")
                .then_some(link)
        })
        .await;
        if let Some(link) = found {
            return link;
        }
        // Say what the controller last wrote, so that a failure in CI can be read.
        let status = links
            .get("features")
            .await
            .ok()
            .and_then(|l| l.status)
            .map(|s| {
                let conditions: Vec<String> = s
                    .conditions
                    .iter()
                    .map(|c| format!("{}={} {}: {}", c.type_, c.status, c.reason, c.message))
                    .collect();
                format!(
                    "phase {:?}; server instance {:?}; restarts {:?}; {}",
                    s.phase,
                    s.server_instance,
                    s.server_restarts,
                    conditions.join("; ")
                )
            });
        panic!(
            "timed out after {waited:?} waiting for condition {condition}={reason} in {}; the \
             DataLink: {status:?}",
            self.namespace
        );
    }

    /// The DataLink once the controller has read `rows` rows from the server.
    async fn wait_rows(&self, rows: i64) -> DataLink {
        let links = self.links();
        eventually(&format!("{rows} rows in the status"), || async {
            let link = links.get("features").await.ok()?;
            (link.status.as_ref()?.rows == Some(rows)).then_some(link)
        })
        .await
    }

    async fn stop_server(&mut self) {
        if let Some(server) = self.server.take() {
            let _ = server.stop.send(());
            server.task.await.expect("server task");
        }
    }

    async fn wait_phase(&self, phase: Phase) -> DataLink {
        let links = self.links();
        eventually(
            &format!("phase {phase:?} in {}", self.namespace),
            || async {
                let link = links.get("features").await.ok()?;
                (link.status.as_ref()?.phase == phase).then_some(link)
            },
        )
        .await
    }

    async fn spark(&self) -> Value {
        let spark = self
            .dynamic(&spark_resource())
            .get("producer")
            .await
            .expect("get the SparkApplication");
        serde_json::to_value(spark).expect("json")
    }

    async fn job(&self) -> Value {
        let job = self
            .dynamic(&self.consumer_resource())
            .get("trainer")
            .await
            .expect("get the training job");
        serde_json::to_value(job).expect("json")
    }

    async fn consumer_suspended(&self) -> bool {
        let job = self.job().await;
        let flag = match self.consumer {
            Consumer::PyTorchJob => &job["spec"]["runPolicy"]["suspend"],
            Consumer::TrainJob => &job["spec"]["suspend"],
        };
        flag.as_bool().unwrap_or(false)
    }

    async fn wait_producer_wired(&self) -> Value {
        let scenario = self;
        eventually("the SparkApplication to be unsuspended", || async move {
            let spark = scenario.spark().await;
            (spark["spec"]["suspend"] == json!(false)).then_some(spark)
        })
        .await
    }

    /// Plays the Spark Operator's suspend: it reports SUSPENDED only after the controller set
    /// `spec.suspend: true`, never before.
    async fn operator_suspends(&self) {
        eventually("the SparkApplication suspended for a rerun", || async {
            (self.spark().await["spec"]["suspend"] == json!(true)).then_some(())
        })
        .await;
        self.spark_state("SUSPENDED").await;
    }

    async fn spark_state(&self, state: &str) {
        let mut application_state = json!({ "state": state });
        if state == "FAILED" {
            application_state["errorMessage"] = json!("driver exited with code 1");
        }
        // driverInfo is required by the schema; the operator always writes it.
        let status = json!({"status": {"applicationState": application_state, "driverInfo": {}}});
        self.dynamic(&spark_resource())
            .patch_status("producer", &PatchParams::default(), &Patch::Merge(&status))
            .await
            .expect("set the SparkApplication state");
    }

    async fn consumer_condition(&self, kind: &str) {
        let condition = json!({"type": kind, "status": "True", "reason": kind, "message": format!("test says {kind}"),
            "lastTransitionTime": "2026-01-01T00:00:00Z", "lastUpdateTime": "2026-01-01T00:00:00Z"});
        let status = match self.consumer {
            Consumer::PyTorchJob => {
                json!({"status": {"conditions": [condition], "replicaStatuses": {}}})
            }
            Consumer::TrainJob if kind == "Running" => {
                json!({"status": {"jobsStatus": [{"name": "node", "active": 1, "ready": 1, "succeeded": 0, "failed": 0, "suspended": 0}]}})
            }
            Consumer::TrainJob => json!({"status": {"conditions": [condition]}}),
        };
        self.dynamic(&self.consumer_resource())
            .patch_status("trainer", &PatchParams::default(), &Patch::Merge(&status))
            .await
            .expect("set the training job's status");
    }

    /// Write as the Spark job would: with the endpoint, link and token it was given.
    async fn write(&self, spark: &Value, rows: usize, seal: bool) {
        let env = spark["spec"]["executor"]["env"]
            .as_array()
            .expect("executor env");
        let find = |name: &str| {
            env.iter()
                .find(|e| e["name"] == name)
                .cloned()
                .unwrap_or_else(|| panic!("{name} in {env:?}"))
        };
        assert_eq!(find("HANDOFF_LINK")["value"], "features");
        assert_eq!(
            find("HANDOFF_ENDPOINT")["value"],
            format!("grpc+tls://features-handoff.{}.svc:8815", self.namespace)
        );
        let key = &find("HANDOFF_TOKEN")["valueFrom"]["secretKeyRef"];
        assert_eq!(key["name"], "features-handoff-tokens");
        let ca = &find("HANDOFF_TLS_CA_PEM")["valueFrom"]["secretKeyRef"];
        assert_eq!(ca["name"], "features-handoff-tokens");
        assert_eq!(ca["key"], "ca.crt");
        let secret: Secret = self
            .api()
            .get("features-handoff-tokens")
            .await
            .expect("secret");
        let token = String::from_utf8(
            secret.data.expect("data")[key["key"].as_str().expect("key")]
                .0
                .clone(),
        )
        .expect("utf8");
        // The Service's address resolves only in a cluster; the test server stands in for it.
        // The client trusts only the CA the job's env names, and checks the Service's name.
        let mut client = self.connect(token).await;
        for part in 0..2 {
            let start = (part * rows / 2) as i64;
            let batches = futures::stream::iter(vec![Ok(batch(start, rows / 2))]);
            client
                .put("features", batches)
                .await
                .expect("put as the producer");
        }
        if seal {
            client.seal("features").await.expect("seal as the producer");
        }
    }

    async fn admin(&self) -> HandoffClient {
        let token = self.tokens.as_ref().expect("server started").admin.clone();
        self.connect(token).await
    }

    /// A client as a job would make it: the link's CA from the Secret (HANDOFF_TLS_CA_PEM), and
    /// the Service's name, which the test server's certificate must carry.
    async fn connect(&self, token: String) -> HandoffClient {
        let ca = self
            .secret_data
            .as_ref()
            .expect("server started")
            .get("ca.crt")
            .expect("ca.crt in the Secret")
            .clone();
        let mut config = handoff_client::ClientConfig::new(self.endpoint.clone(), Some(token));
        config.tls_ca_pem = Some(ca);
        config.tls_domain = Some(format!("features-handoff.{}.svc", self.namespace));
        HandoffClient::connect_with(config)
            .await
            .expect("connect over TLS with the link's CA")
    }

    async fn event_reasons(&self) -> Vec<String> {
        let events: Api<k8s_openapi::api::events::v1::Event> = self.api();
        let list = events.list(&ListParams::default()).await.expect("events");
        list.items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("features"))
            .filter_map(|e| e.reason)
            .collect()
    }

    /// Waits until the link has an event with each reason; events are published after the
    /// writes they report, so a single read can come too early.
    async fn wait_events(&self, reasons: &[&str]) {
        let what = format!("events {reasons:?} in {}", self.namespace);
        eventually(&what, || async {
            let seen = self.event_reasons().await;
            reasons
                .iter()
                .all(|reason| seen.iter().any(|r| r == reason))
                .then_some(())
        })
        .await
    }

    async fn server_objects_gone(&self) {
        let deployments: Api<Deployment> = self.api();
        let services: Api<Service> = self.api();
        let secrets: Api<Secret> = self.api();
        let policies: Api<NetworkPolicy> = self.api();
        eventually("the server's objects to be deleted", || async {
            let gone = deployments
                .get_opt("features-handoff")
                .await
                .ok()?
                .is_none()
                && services.get_opt("features-handoff").await.ok()?.is_none()
                && policies.get_opt("features-handoff").await.ok()?.is_none()
                && secrets
                    .get_opt("features-handoff-tokens")
                    .await
                    .ok()?
                    .is_none();
            gone.then_some(())
        })
        .await;
    }

    async fn finish(mut self) {
        self.stop_controller().await;
        self.stop_server().await;
        for i in 0..self.replicas.len() {
            self.stop_replica(i).await;
        }
        for (kind, history) in std::mem::take(&mut self.histories) {
            history.check(&upstream_rules(kind));
        }
        if !self.cluster.is_local() {
            let namespaces: Api<Namespace> = Api::all(self.cluster.client.clone());
            let _ = namespaces
                .delete(&self.namespace, &DeleteParams::default())
                .await;
        }
    }
}

/// Sealed gate, PyTorchJob: provision, wire, seal, release, finish, TTL cleanup, then delete.
async fn happy_path_pytorchjob(cluster: &Cluster) {
    let mut s = Scenario::new(
        cluster,
        "happy-pytorch",
        Consumer::PyTorchJob,
        json!({"producer": {"sparkApplication": "producer"}, "consumer": {"pytorchJob": "trainer"},
               "policy": {"ttlSecondsAfterFinished": 2}, "read": {"batchRows": 512, "shuffle": true, "seed": 7}}),
    )
    .await;
    s.start_controller().await;
    let link = s.wait_phase(Phase::Provisioning).await;
    assert_eq!(
        link.metadata.finalizers,
        Some(vec![handoff_controller::FINALIZER.to_string()])
    );
    assert_eq!(
        s.spark().await["spec"]["suspend"],
        json!(true),
        "not wired before the server is up"
    );
    s.run_server().await;

    let spark = s.wait_producer_wired().await;
    let driver_env = spark["spec"]["driver"]["env"]
        .as_array()
        .expect("driver env");
    assert_eq!(
        driver_env[0],
        json!({"name": "USER_SETTING", "value": "kept"}),
        "the user's env stays first"
    );
    assert!(s.consumer_suspended().await, "sealed gate: training waits");
    s.wait_phase(Phase::Receiving).await;

    s.spark_state("RUNNING").await;
    s.write(&spark, 1000, true).await;
    s.spark_state("COMPLETED").await;
    let link = s.wait_phase(Phase::Sealed).await;
    let status = link.status.expect("status");
    assert_eq!(status.rows, Some(1000));
    assert_eq!(status.partitions, Some(2));
    assert!(status.bytes.unwrap_or(0) > 0);
    assert_eq!(
        status.endpoint.as_deref(),
        Some(format!("grpc+tls://features-handoff.{}.svc:8815", s.namespace).as_str())
    );

    assert!(!s.consumer_suspended().await, "released after the seal");
    let job = s.job().await;
    for role in ["Master", "Worker"] {
        let env =
            &job["spec"]["pytorchReplicaSpecs"][role]["template"]["spec"]["containers"][0]["env"];
        let names: Vec<&str> = env
            .as_array()
            .expect("env")
            .iter()
            .filter_map(|e| e["name"].as_str())
            .collect();
        assert_eq!(
            names,
            [
                "HANDOFF_ENDPOINT",
                "HANDOFF_LINK",
                "HANDOFF_TOKEN",
                "HANDOFF_TLS_CA_PEM",
                "HANDOFF_BATCH_ROWS",
                "HANDOFF_SHUFFLE",
                "HANDOFF_SEED"
            ],
            "{role}"
        );
        assert_eq!(
            env[2]["valueFrom"]["secretKeyRef"]["key"], "reader-token",
            "{role}"
        );
    }

    s.consumer_condition("Running").await;
    s.wait_phase(Phase::Consuming).await;
    s.consumer_condition("Succeeded").await;
    let link = s.wait_phase(Phase::Finished).await;
    assert_eq!(
        link.status.as_ref().and_then(|s| s.reason.as_deref()),
        Some("ConsumerSucceeded")
    );
    // ttlSecondsAfterFinished: the server and its data go; the DataLink stays to be read.
    s.server_objects_gone().await;
    let mut admin = s.admin().await;
    let err = admin
        .stats("features")
        .await
        .expect_err("the link was deleted on the server");
    assert_eq!(err.code(), Some(tonic::Code::NotFound));
    // The controller deletes the objects first and publishes ServerDeleted after, so the events
    // are awaited, not read once.
    s.wait_events(&[
        "Provisioning",
        "Receiving",
        "Sealed",
        "Consuming",
        "ConsumerSucceeded",
        "ServerDeleted",
    ])
    .await;

    // Deletion goes through the finalizer and leaves the user's jobs.
    s.links()
        .delete("features", &DeleteParams::default())
        .await
        .expect("delete");
    let links = s.links();
    eventually("the DataLink to be gone", || async {
        links
            .get_opt("features")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    s.spark().await;
    s.job().await;
    s.finish().await;
}

/// TrainJob consumer: env through our spec.runtimePatches entry (spec.trainer is immutable
/// upstream), released on the seal, Finished on Complete; then deleting the DataLink removes the
/// server but not the TrainJob. Every update of the TrainJob is held to its CRD's rules.
async fn happy_path_trainjob(cluster: &Cluster) {
    let (s, spark) = Scenario::producing(
        cluster,
        "happy-trainjob",
        Consumer::TrainJob,
        json!({"producer": {"sparkApplication": "producer"}, "consumer": {"trainJob": "trainer"}}),
    )
    .await;
    s.write(&spark, 600, true).await;
    assert!(s.consumer_suspended().await);
    s.spark_state("COMPLETED").await;
    let link = s.wait_phase(Phase::Sealed).await;
    assert_eq!(link.status.and_then(|s| s.rows), Some(600));
    assert!(!s.consumer_suspended().await);
    let job = s.job().await;
    assert_eq!(
        job["spec"]["trainer"],
        fixture("examples/trainjob-01-multi-node.yaml")["spec"]["trainer"],
        "spec.trainer is untouched"
    );
    let patches = job["spec"]["runtimePatches"]
        .as_array()
        .expect("runtimePatches");
    assert_eq!(patches.len(), 1);
    assert_eq!(patches[0]["manager"], "handoff.kubeflow.org/datalink");
    let env = patches[0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
        ["template"]["spec"]["template"]["spec"]["containers"][0]["env"]
        .clone();
    let names: Vec<&str> = env
        .as_array()
        .expect("trainer env")
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    assert_eq!(
        names,
        [
            "HANDOFF_ENDPOINT",
            "HANDOFF_LINK",
            "HANDOFF_TOKEN",
            "HANDOFF_TLS_CA_PEM"
        ]
    );
    s.consumer_condition("Running").await;
    s.wait_phase(Phase::Consuming).await;
    s.consumer_condition("Complete").await;
    s.wait_phase(Phase::Finished).await;
    // No TTL: the server stays until the DataLink goes.
    let deployments: Api<Deployment> = s.api();
    assert!(
        deployments
            .get_opt("features-handoff")
            .await
            .expect("get")
            .is_some()
    );
    s.links()
        .delete("features", &DeleteParams::default())
        .await
        .expect("delete");
    s.server_objects_gone().await;
    s.job().await;
    s.finish().await;
}

/// FAILED: phase Failed with the reason, the consumer stays suspended, a Warning event.
async fn producer_failure(cluster: &Cluster) {
    let (s, spark) = Scenario::producing(
        cluster,
        "producer-failure",
        Consumer::PyTorchJob,
        json!({"producer": {"sparkApplication": "producer"}, "consumer": {"pytorchJob": "trainer"}}),
    )
    .await;
    s.write(&spark, 100, false).await;
    s.spark_state("FAILED").await;
    let link = s.wait_phase(Phase::Failed).await;
    let status = link.status.expect("status");
    assert_eq!(status.reason.as_deref(), Some("ProducerFailed"));
    let condition = status
        .conditions
        .iter()
        .find(|c| c.type_ == "ProducerWired")
        .expect("condition");
    assert!(
        condition.message.contains("driver exited with code 1"),
        "{}",
        condition.message
    );
    assert!(s.consumer_suspended().await, "the consumer stays suspended");
    let events: Api<k8s_openapi::api::events::v1::Event> = s.api();
    let warned = eventually("a Warning event", || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        list.items.into_iter().find(|e| {
            e.type_.as_deref() == Some("Warning") && e.reason.as_deref() == Some("ProducerFailed")
        })
    })
    .await;
    assert!(
        warned
            .note
            .unwrap_or_default()
            .contains("consumer stays suspended")
    );
    // KeepConsumerSuspended keeps what was written, for inspection.
    let stats = s
        .admin()
        .await
        .stats("features")
        .await
        .expect("still served");
    assert_eq!(stats.rows, 100);
    s.finish().await;
}

/// SUBMISSION_FAILED with `onProducerFailure: DeleteServer`: the server objects go at once.
async fn producer_failure_deletes_the_server(cluster: &Cluster) {
    let mut s = Scenario::new(
        cluster,
        "producer-failure-delete",
        Consumer::TrainJob,
        json!({"producer": {"sparkApplication": "producer"}, "consumer": {"trainJob": "trainer"},
               "policy": {"onProducerFailure": "DeleteServer"}}),
    )
    .await;
    s.start_controller().await;
    s.run_server().await;
    let spark = s.wait_producer_wired().await;
    s.write(&spark, 100, false).await;
    s.spark_state("SUBMISSION_FAILED").await;
    let link = s.wait_phase(Phase::Failed).await;
    assert_eq!(
        link.status.and_then(|s| s.reason),
        Some("ProducerFailed".into())
    );
    s.server_objects_gone().await;
    let err = s
        .admin()
        .await
        .stats("features")
        .await
        .expect_err("the link's data is gone");
    assert_eq!(err.code(), Some(tonic::Code::NotFound));
    assert!(s.consumer_suspended().await);
    s.finish().await;
}

/// A spec the controller cannot act on fails with a sentence, creates nothing, and recovers
/// when fixed.
async fn invalid_spec_then_fixed(cluster: &Cluster) {
    let mut s = Scenario::new(
        cluster,
        "invalid-spec",
        Consumer::PyTorchJob,
        json!({"producer": {"sparkApplication": "producer"}, "consumer": {"pytorchJob": "trainer"},
               "server": {"memory": "8GB"}}),
    )
    .await;
    s.start_controller().await;
    let link = s.wait_phase(Phase::Failed).await;
    let status = link.status.expect("status");
    assert_eq!(status.reason.as_deref(), Some("InvalidSpec"));
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .expect("Ready condition");
    assert!(
        ready.message.contains("use Ki, Mi, Gi"),
        "{}",
        ready.message
    );
    let deployments: Api<Deployment> = s.api();
    assert!(
        deployments
            .get_opt("features-handoff")
            .await
            .expect("get")
            .is_none()
    );
    let fix = json!({"spec": {"server": {"memory": "8Gi"}}});
    s.links()
        .patch("features", &PatchParams::default(), &Patch::Merge(&fix))
        .await
        .expect("fix");
    s.run_server().await;
    s.wait_producer_wired().await;
    s.wait_phase(Phase::Receiving).await;
    s.finish().await;
}

/// gate: streaming: the consumer is released as soon as the producer is wired, and the link is
/// created on the server before that, so readers never see NOT_FOUND.
async fn streaming_gate(cluster: &Cluster) {
    let (s, spark) = Scenario::producing(
        cluster,
        "streaming",
        Consumer::PyTorchJob,
        json!({"producer": {"sparkApplication": "producer"}, "consumer": {"pytorchJob": "trainer"},
               "policy": {"gate": "streaming"}}),
    )
    .await;
    let scenario = &s;
    eventually("the consumer released before the seal", || async move {
        (!scenario.consumer_suspended().await).then_some(())
    })
    .await;
    let link = s.wait_phase(Phase::Receiving).await;
    let released = link
        .status
        .expect("status")
        .conditions
        .into_iter()
        .find(|c| c.type_ == "ConsumerReleased")
        .expect("condition");
    assert_eq!(
        (released.status.as_str(), released.reason.as_str()),
        ("True", "Streaming")
    );
    // The link exists for the readers before the producer has written a row.
    let mut reader = s.connect(s.tokens().await.reader).await;
    let empty = reader.stats("features").await.expect("the link exists");
    assert_eq!((empty.rows, empty.state.as_str()), (0, "open"));
    s.write(&spark, 200, false).await;
    let links = s.links();
    eventually("rows reported while receiving", || async {
        (links.get("features").await.ok()?.status?.rows == Some(200)).then_some(())
    })
    .await;
    s.admin().await.seal("features").await.expect("seal");
    s.spark_state("COMPLETED").await;
    s.wait_phase(Phase::Sealed).await;
    s.finish().await;
}

/// Deleting the DataLink while data flows: the finalizer removes the server, its Secret and the
/// link's data; the user's jobs stay.
async fn deletion_midway(cluster: &Cluster) {
    let (s, spark) = Scenario::producing(
        cluster,
        "deletion",
        Consumer::PyTorchJob,
        json!({"producer": {"sparkApplication": "producer"}, "consumer": {"pytorchJob": "trainer"}}),
    )
    .await;
    s.write(&spark, 300, false).await;
    s.wait_phase(Phase::Receiving).await;
    s.links()
        .delete("features", &DeleteParams::default())
        .await
        .expect("delete");
    s.server_objects_gone().await;
    let links = s.links();
    eventually("the DataLink to be gone", || async {
        links
            .get_opt("features")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    let err = s
        .admin()
        .await
        .stats("features")
        .await
        .expect_err("deleted on the server");
    assert_eq!(err.code(), Some(tonic::Code::NotFound));
    assert_eq!(s.spark().await["metadata"]["name"], "producer");
    assert!(
        s.consumer_suspended().await,
        "the consumer was never released"
    );
    s.finish().await;
}

/// A reconcile with nothing to do writes nothing: not after an unrelated change to the DataLink,
/// and not from a freshly started controller. A controller restarted while the producer
/// completed converges.
async fn idempotent_and_restartable(cluster: &Cluster) {
    let (mut s, spark) = Scenario::producing(
        cluster,
        "idempotent",
        Consumer::PyTorchJob,
        json!({"producer": {"sparkApplication": "producer"}, "consumer": {"pytorchJob": "trainer"}}),
    )
    .await;
    s.wait_phase(Phase::Receiving).await;

    // Restart while the producer finishes.
    s.stop_controller().await;
    s.write(&spark, 400, true).await;
    s.spark_state("COMPLETED").await;
    s.start_controller().await;
    s.wait_phase(Phase::Sealed).await;
    s.consumer_condition("Running").await;
    s.wait_phase(Phase::Consuming).await;

    // Settled: now count.
    let controller = s.controller();
    let settle = controller.metrics.reconciliations() + 2;
    eventually("reconciles after settling", || async {
        (controller.metrics.reconciliations() >= settle).then_some(())
    })
    .await;
    let before = controller.writes().len();
    let annotate = json!({"metadata": {"annotations": {"example.com/touched": "yes"}}});
    s.links()
        .patch(
            "features",
            &PatchParams::default(),
            &Patch::Merge(&annotate),
        )
        .await
        .expect("annotate");
    let target = controller.metrics.reconciliations() + 2;
    eventually("reconciles after the annotation", || async {
        (controller.metrics.reconciliations() >= target).then_some(())
    })
    .await;
    let writes = controller.writes();
    assert_eq!(
        writes[before..],
        [] as [String; 0],
        "a reconcile with no change wrote"
    );

    s.stop_controller().await;
    s.start_controller().await;
    let controller = s.controller();
    eventually("a fresh controller's reconciles", || async {
        (controller.metrics.reconciliations() >= 3).then_some(())
    })
    .await;
    assert_eq!(
        controller.writes(),
        Vec::<String>::new(),
        "a fresh controller on a settled link wrote"
    );
    assert_eq!(controller.metrics.errors("forbidden"), 0);
    s.finish().await;
}

/// A link whose Secret an older controller made, with tokens and no certificates: the
/// controller adds a CA and the server's certificate, keeps the tokens, and the jobs reach the
/// server over TLS.
async fn upgrade_from_a_secret_without_certificates(cluster: &Cluster) {
    let mut s = Scenario::new(
        cluster,
        "upgrade",
        Consumer::PyTorchJob,
        json!({"producer": {"sparkApplication": "producer"}, "consumer": {"pytorchJob": "trainer"}}),
    )
    .await;
    let link = s.links().get("features").await.expect("the DataLink");
    let old = resources::Tokens::generate().expect("tokens");
    let secrets: Api<Secret> = s.api();
    secrets
        .create(
            &PostParams::default(),
            &resources::token_secret(&link, &old, None),
        )
        .await
        .expect("the old controller's Secret");
    s.start_controller().await;
    eventually("the certificates added to the Secret", || async {
        let secret = secrets.get("features-handoff-tokens").await.ok()?;
        let data = secret.data?;
        ["ca.crt", "tls.crt", "tls.key"]
            .iter()
            .all(|k| data.contains_key(*k))
            .then_some(())
    })
    .await;
    s.run_server().await;
    let kept = s.tokens.clone().expect("tokens");
    assert_eq!(
        (&kept.admin, &kept.writer, &kept.reader),
        (&old.admin, &old.writer, &old.reader),
        "the tokens stay"
    );
    let spark = s.wait_producer_wired().await;
    s.spark_state("RUNNING").await;
    s.write(&spark, 200, true).await;
    s.spark_state("COMPLETED").await;
    let link = s.wait_phase(Phase::Sealed).await;
    assert_eq!(link.status.and_then(|s| s.rows), Some(200));
    s.finish().await;
}

/// With spillUrl, the server snapshots on seal and restores on start: a server killed after the
/// seal comes back with the link, the DataLink says ServerRestarted, and training goes on.
async fn a_server_restarted_after_the_seal_restores_the_link(cluster: &Cluster) {
    let spill = tempfile::tempdir().expect("tempdir");
    let base = format!("file://{}", spill.path().display());
    let mut s = Scenario::new(
        cluster,
        "restart-restores",
        Consumer::PyTorchJob,
        json!({"producer": {"sparkApplication": "producer"}, "consumer": {"pytorchJob": "trainer"},
               "server": {"spillUrl": base}}),
    )
    .await;
    s.start_controller().await;
    s.run_server().await;
    let deployments: Api<Deployment> = s.api();
    let deployment = deployments
        .get("features-handoff")
        .await
        .expect("deployment");
    let spec = deployment.spec.clone().expect("spec");
    assert_eq!(
        spec.strategy.and_then(|s| s.type_).as_deref(),
        Some("Recreate")
    );
    let args = spec.template.spec.expect("pod").containers[0]
        .args
        .clone()
        .expect("args");
    let uid = s.links().get("features").await.expect("link").metadata.uid;
    let storage = format!("{base}/{}/features-{}", s.namespace, uid.expect("uid"));
    assert!(
        args.windows(2).any(|w| w == ["--restore-from", &storage]),
        "{args:?}"
    );
    assert!(args.contains(&"--snapshot-on-seal".to_string()));
    let spark = s.wait_producer_wired().await;
    s.spark_state("RUNNING").await;
    s.write(&spark, 300, true).await;
    s.spark_state("COMPLETED").await;
    let link = s.wait_phase(Phase::Sealed).await;
    let status = link.status.expect("status");
    assert_eq!(status.server_image.as_deref(), Some("handoff:test"));
    let first = status.server_instance.expect("instance read");
    s.restart_server().await;
    let link = s.wait_condition("ServerRestarted", "Restored").await;
    let status = link.status.expect("status");
    assert_eq!(status.rows, Some(300));
    assert_eq!(status.server_restarts, Some(1));
    assert_ne!(status.server_instance.as_deref(), Some(first.as_str()));
    assert!(!s.consumer_suspended().await, "training goes on");
    let mut reader = s.connect(s.tokens().await.reader).await;
    assert_eq!(reader.stats("features").await.expect("stats").rows, 300);
    s.consumer_condition("Running").await;
    s.wait_phase(Phase::Consuming).await;
    s.finish().await;
}

/// Every rank of `world` reads its shard of "features" in batches of 16: every id seen, and
/// each rank's batch count.
async fn read_all(s: &Scenario<'_>, world: u32) -> (Vec<i64>, Vec<usize>) {
    let batch_rows = 16usize;
    let mut seen = Vec::new();
    let mut counts = Vec::new();
    for rank in 0..world {
        let mut reader = s.connect(s.tokens().await.reader).await;
        let shard = handoff_client::ReadShard {
            link: "features".into(),
            rank,
            world_size: world,
            batch_rows: batch_rows as u64,
            ..Default::default()
        };
        let mut batches = reader.shard_batches(shard).await.expect("plan");
        let mut n = 0;
        while let Some(b) = futures::StreamExt::next(&mut batches).await {
            let b = b.expect("batch");
            assert_eq!(b.num_rows(), batch_rows, "world {world} rank {rank}");
            let ids = b
                .column(0)
                .as_any()
                .downcast_ref::<Int64Array>()
                .expect("ids");
            seen.extend(ids.values().iter().copied());
            n += 1;
        }
        counts.push(n);
    }
    (seen, counts)
}

/// `spec.server.replicas: 3`: the controller runs a StatefulSet with a headless Service, and the
/// test plays the StatefulSet controller and the kubelet (three in-process servers with the
/// pods' args, calling each other over TLS with the link's CA and the certificate's wildcard
/// name). The producer's task failures commit exactly once; the planner killed between its
/// recorded commit decision and applying it finishes the commit on restart, and the controller
/// says nothing was lost; shards for worlds 1, 2, 3 and 7 are disjoint, complete and equal in
/// batches; a replica killed after the seal restores its part from its own snapshot.
async fn three_replicas_under_the_controller(cluster: &Cluster) {
    const REPLICAS: u32 = 3;
    const ROWS: usize = 40;
    let spill = tempfile::tempdir().expect("tempdir");
    let base = format!("file://{}", spill.path().display());
    let mut s = Scenario::new(
        cluster,
        "replicas",
        Consumer::PyTorchJob,
        json!({"producer": {"sparkApplication": "producer"}, "consumer": {"pytorchJob": "trainer"},
               "server": {"spillUrl": base, "replicas": REPLICAS}}),
    )
    .await;
    s.start_controller().await;
    s.run_replicas(REPLICAS as usize).await;
    let link = s.wait_condition("ServerReady", "Available").await;
    let uid = link.metadata.uid.expect("uid");
    let storage = format!("{base}/{}/features-{uid}", s.namespace);
    let spark = s.wait_producer_wired().await;
    s.spark_state("RUNNING").await;
    let env = spark["spec"]["executor"]["env"].as_array().expect("env");
    let endpoint = env
        .iter()
        .find(|e| e["name"] == "HANDOFF_ENDPOINT")
        .expect("endpoint");
    assert_eq!(
        endpoint["value"],
        format!("grpc+tls://features-handoff.{}.svc:8815", s.namespace),
        "the job starts at the Service, replica 0"
    );
    let mut writer = s.connect(s.tokens().await.writer).await;
    let topology = writer.topology().await.expect("topology");
    assert_eq!(topology.replicas.len(), REPLICAS as usize);
    writer
        .create(handoff_client::CreateLink {
            link: "features".into(),
            ..Default::default()
        })
        .await
        .expect("create");
    let owner = |p: u64| handoff_proto::placement::owner("features", p, REPLICAS);
    let stage = |partition: u64, attempt: u64, rows: usize| {
        let batches = futures::stream::iter(vec![Ok(batch(partition as i64 * 1000, rows))]);
        (partition, attempt, batches)
    };
    // Tasks on replicas 1 and 2; every third one failed once, half written, and ran again.
    let first: Vec<u64> = (0..200).filter(|p| owner(*p) != 0).take(12).collect();
    let mut winners = Vec::new();
    for &p in &first {
        let retried = p % 3 == 0;
        if retried {
            let (p, a, b) = stage(p, 0, ROWS / 2);
            writer
                .put_partition("features", p, a, b)
                .await
                .expect("failed attempt");
        }
        let attempt = u64::from(retried);
        let (p, a, b) = stage(p, attempt, ROWS);
        writer
            .put_partition("features", p, a, b)
            .await
            .expect("put");
        winners.push((p, attempt));
    }
    // The controller has read the link from every replica: a restart is then news to it.
    eventually("the replicas' instances in the status", || async {
        let link = s.links().get("features").await.ok()?;
        let instance = link.status?.server_instance?;
        // Every replica's, the planner's too (",a,b" is a poll before it had answered).
        let instances: Vec<&str> = instance.split(',').collect();
        (instances.len() == REPLICAS as usize && instances.iter().all(|i| !i.is_empty()))
            .then_some(())
    })
    .await;
    // The planner records the job's decision, then dies before any replica publishes it.
    let planner_storage =
        handoff_store::ObjectStorage::from_url(&format!("{storage}/features-handoff-0"))
            .expect("planner storage");
    planner_storage
        .record_commit("features", false, &winners, REPLICAS)
        .await
        .expect("record the decision");
    s.restart_replica(0, &storage).await;
    // On restart it finishes the record; the driver's retried commit then finds it done.
    eventually("the recorded commit applied", || async {
        let pending = planner_storage.pending_commits().await.ok()?;
        pending.is_empty().then_some(())
    })
    .await;
    let mut writer = s.connect(s.tokens().await.writer).await;
    let committed = writer
        .commit("features", &winners)
        .await
        .expect("retried commit");
    assert_eq!(committed["already"], winners.len(), "{committed}");
    assert_eq!(committed["rows"], 0, "nothing published twice: {committed}");
    let link = s.wait_condition("ServerRestarted", "NothingLost").await;
    assert!(
        link.status.as_ref().expect("status").phase != Phase::Failed,
        "a planner restart that lost nothing does not fail the link"
    );
    // Tasks on replica 0, committed as usual.
    let second: Vec<u64> = (0..200).filter(|p| owner(*p) == 0).take(6).collect();
    let mut second_winners = Vec::new();
    for &p in &second {
        let (p, a, b) = stage(p, 0, ROWS);
        writer
            .put_partition("features", p, a, b)
            .await
            .expect("put");
        second_winners.push((p, 0));
    }
    writer
        .commit("features", &second_winners)
        .await
        .expect("commit");
    let stats = writer.seal("features").await.expect("seal");
    let total = (first.len() + second.len()) * ROWS;
    assert_eq!(stats.rows, total as u64);
    assert_eq!(stats.replicas.len(), REPLICAS as usize);
    assert!(
        stats.replicas.iter().all(|r| r.rows > 0),
        "{:?}",
        stats.replicas
    );
    s.spark_state("COMPLETED").await;
    let link = s.wait_phase(Phase::Sealed).await;
    assert_eq!(
        link.status.as_ref().and_then(|s| s.rows),
        Some(total as i64)
    );
    assert!(!s.consumer_suspended().await, "training is released");

    // Every rank of worlds 1, 2, 3 and 7: disjoint, complete, equal batches of batch_rows.
    let want: std::collections::BTreeSet<i64> = first
        .iter()
        .chain(&second)
        .flat_map(|&p| (0..ROWS as i64).map(move |r| p as i64 * 1000 + r))
        .collect();
    for world in [1u32, 2, 3, 7] {
        let (seen, counts) = read_all(&s, world).await;
        assert!(
            counts.windows(2).all(|w| w[0] == w[1]),
            "world {world}: {counts:?}"
        );
        let distinct: std::collections::BTreeSet<i64> = seen.iter().copied().collect();
        // Padding at the global end repeats rows; nothing else does, and nothing is missing.
        assert_eq!(distinct, want, "world {world}");
        let batches: usize = counts.iter().sum();
        assert_eq!(seen.len(), batches * 16);
        assert!(
            seen.len() - want.len() < world as usize * 16,
            "world {world}"
        );
    }

    // A replica killed after the seal comes back with its part from its own snapshot.
    let before = s.links().get("features").await.expect("link");
    let restarts = before.status.as_ref().and_then(|s| s.server_restarts);
    s.restart_replica(2, &storage).await;
    let link = eventually("the restored replica noticed", || async {
        let link = s.links().get("features").await.ok()?;
        (link.status.as_ref()?.server_restarts != restarts).then_some(link)
    })
    .await;
    let restored = link
        .status
        .as_ref()
        .expect("status")
        .conditions
        .iter()
        .find(|c| c.type_ == "ServerRestarted")
        .expect("condition");
    assert_eq!(restored.reason, "Restored", "{restored:?}");
    assert_eq!(
        link.status.as_ref().and_then(|s| s.rows),
        Some(total as i64)
    );
    let (seen, _) = read_all(&s, 3).await;
    let distinct: std::collections::BTreeSet<i64> = seen.into_iter().collect();
    assert_eq!(distinct, want, "complete after the restore");
    s.consumer_condition("Running").await;
    s.wait_phase(Phase::Consuming).await;
    s.finish().await;
}

/// No spillUrl, and the server restarts before the seal: the DataLink says what was lost and,
/// with onServerLoss: RestartProducer, reruns the SparkApplication, which fills the link again.
async fn a_lost_server_reruns_the_producer(cluster: &Cluster) {
    let (mut s, spark) = Scenario::producing(
        cluster,
        "restart-reruns",
        Consumer::PyTorchJob,
        json!({"producer": {"sparkApplication": "producer"}, "consumer": {"pytorchJob": "trainer"},
               "policy": {"onServerLoss": "RestartProducer"}}),
    )
    .await;
    s.write(&spark, 200, false).await;
    s.wait_rows(200).await;
    s.restart_server().await;
    let link = s.wait_condition("ServerLost", "RestartingProducer").await;
    let lost = link
        .status
        .as_ref()
        .and_then(|st| st.conditions.iter().find(|c| c.type_ == "ServerLost"))
        .map(|c| c.message.clone())
        .expect("ServerLost");
    assert!(lost.contains("200 rows"), "{lost}");
    assert!(lost.contains("spillUrl"), "{lost}");
    // The Spark Operator stops it; then the controller runs it again.
    s.operator_suspends().await;
    assert!(s.consumer_suspended().await);
    let spark = s.wait_producer_wired().await;
    assert_eq!(rerun_env(&spark), Some("1".into()));
    s.spark_state("RUNNING").await;
    s.write(&spark, 150, true).await;
    s.spark_state("COMPLETED").await;
    let link = s.wait_phase(Phase::Sealed).await;
    assert_eq!(link.status.and_then(|st| st.rows), Some(150));
    assert!(!s.consumer_suspended().await);
    s.finish().await;
}

/// The `HANDOFF_PRODUCER_RERUN` the controller put in the driver's env.
fn rerun_env(spark: &Value) -> Option<String> {
    spark["spec"]["driver"]["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == "HANDOFF_PRODUCER_RERUN")
        .and_then(|e| e["value"].as_str().map(String::from))
}

/// A sealed link lost with its server (no snapshot) after the SparkApplication COMPLETED. The
/// Spark Operator ignores suspend on an ended application, so the controller reruns it by
/// changing its env (the operator reruns an application whose spec changed), and the link fills
/// again.
async fn a_lost_sealed_link_reruns_a_completed_producer(cluster: &Cluster) {
    let (mut s, spark) = Scenario::producing(
        cluster,
        "rerun-completed",
        Consumer::PyTorchJob,
        json!({"producer": {"sparkApplication": "producer"}, "consumer": {"pytorchJob": "trainer"},
               "policy": {"onServerLoss": "RestartProducer"}}),
    )
    .await;
    s.write(&spark, 60, true).await;
    s.spark_state("COMPLETED").await;
    s.wait_phase(Phase::Sealed).await;
    s.restart_server().await;
    let link = s.wait_condition("ServerLost", "RestartingProducer").await;
    assert_eq!(link.status.and_then(|st| st.producer_reruns), Some(1));
    let spark = eventually("the rerun's env on the SparkApplication", || async {
        let spark = s.spark().await;
        (rerun_env(&spark).as_deref() == Some("1")).then_some(spark)
    })
    .await;
    assert_eq!(
        spark["spec"]["suspend"],
        json!(false),
        "an ended application is not suspended: its rerun would stop in SUSPENDING"
    );
    // The operator saw the spec change: INVALIDATING, PENDING_RERUN, then it runs.
    s.spark_state("RUNNING").await;
    s.write(&spark, 70, true).await;
    s.spark_state("COMPLETED").await;
    s.wait_rows(70).await;
    let link = s.wait_phase(Phase::Sealed).await;
    let status = link.status.expect("status");
    assert_eq!(status.producer_reruns, Some(1));
    assert_eq!(status.server_restarts, Some(1));
    s.finish().await;
}

/// The default policy: a server lost before the seal fails the link, saying what was lost.
async fn a_lost_server_fails_the_link(cluster: &Cluster) {
    let (mut s, spark) = Scenario::producing(
        cluster,
        "restart-fails",
        Consumer::PyTorchJob,
        json!({"producer": {"sparkApplication": "producer"}, "consumer": {"pytorchJob": "trainer"}}),
    )
    .await;
    s.write(&spark, 100, false).await;
    s.wait_rows(100).await;
    s.restart_server().await;
    let link = s.wait_phase(Phase::Failed).await;
    let status = link.status.expect("status");
    assert_eq!(status.reason.as_deref(), Some("ServerLost"));
    let lost = status
        .conditions
        .iter()
        .find(|c| c.type_ == "ServerLost")
        .expect("ServerLost");
    assert!(lost.message.contains("100 rows"), "{}", lost.message);
    assert!(s.consumer_suspended().await);
    s.finish().await;
}

/// A controller upgrade (a new default image) leaves a running link's server alone, and a
/// Deployment an older controller made, without the inputs annotation, is adopted by a
/// metadata-only write that does not restart its pod.
async fn a_controller_upgrade_does_not_restart_link_servers(cluster: &Cluster) {
    let (mut s, spark) = Scenario::producing(
        cluster,
        "upgrade-keeps",
        Consumer::PyTorchJob,
        json!({"producer": {"sparkApplication": "producer"}, "consumer": {"pytorchJob": "trainer"}}),
    )
    .await;
    s.write(&spark, 100, false).await;
    s.wait_rows(100).await;
    let deployments: Api<Deployment> = s.api();
    let before = deployments
        .get("features-handoff")
        .await
        .expect("deployment");
    s.stop_controller().await;
    // As an older controller left it: no record of its inputs.
    let strip = json!({"metadata": {"annotations": {resources::SERVER_INPUTS: null}}});
    deployments
        .patch(
            "features-handoff",
            &PatchParams::default(),
            &Patch::Merge(&strip),
        )
        .await
        .expect("strip the annotation");
    s.start_controller_with_image("handoff:next").await;
    s.write(&spark, 50, false).await;
    s.wait_rows(150).await;
    let after = eventually("the Deployment adopted", || async {
        let d = deployments.get("features-handoff").await.ok()?;
        d.annotations()
            .contains_key(resources::SERVER_INPUTS)
            .then_some(d)
    })
    .await;
    let image = |d: &Deployment| resources::RunningServer::Deployment(d.clone()).image();
    assert_eq!(image(&after).as_deref(), Some("handoff:test"));
    // (Annotation changes bump a Deployment's generation, but only a new pod template rolls
    // its pods.)
    assert_eq!(
        after.spec.as_ref().map(|s| &s.template),
        before.spec.as_ref().map(|s| &s.template),
        "the pod template is untouched"
    );
    let link = s.links().get("features").await.expect("link");
    assert_eq!(
        link.status.and_then(|st| st.server_image).as_deref(),
        Some("handoff:test")
    );
    s.finish().await;
}

/// Kueue's part, played by the test (Kueue cannot run here): the AdmissionChecks an admin
/// creates, the Workload Kueue makes for a job with a queue-name label, our check listed once
/// quota is reserved, and the unsuspend at admission.
impl Scenario<'_> {
    /// An AdmissionCheck of ours and one of another controller; `(ours, theirs)`.
    async fn admission_checks(&self) -> (String, String) {
        let api: Api<DynamicObject> = Api::all_with(
            self.cluster.client.clone(),
            &handoff_controller::kueue::admission_check(),
        );
        let ours = format!("data-{}", self.namespace);
        let theirs = format!("other-{}", self.namespace);
        for (name, controller) in [
            (&ours, handoff_controller::kueue::CONTROLLER_NAME),
            (&theirs, "kueue.x-k8s.io/provisioning-request"),
        ] {
            let check: DynamicObject = serde_json::from_value(json!({
                "apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "AdmissionCheck",
                "metadata": {"name": name}, "spec": {"controllerName": controller}}))
            .expect("check");
            api.create(&PostParams::default(), &check)
                .await
                .expect("create the AdmissionCheck");
        }
        (ours, theirs)
    }

    async fn check_active(&self, name: &str) -> bool {
        let api: Api<DynamicObject> = Api::all_with(
            self.cluster.client.clone(),
            &handoff_controller::kueue::admission_check(),
        );
        let check = serde_json::to_value(api.get(name).await.expect("check")).expect("json");
        check["status"]["conditions"].as_array().is_some_and(|c| {
            c.iter()
                .any(|c| c["type"] == "Active" && c["status"] == "True")
        })
    }

    /// Put a job under Kueue (its label), and make its Workload with our check and another
    /// listed Pending, as Kueue does once quota is reserved. Returns the Workload's name.
    async fn under_kueue(&self, resource: &ApiResource, name: &str, checks: &[&str]) -> String {
        let api = self.dynamic(resource);
        let label = json!({"metadata": {"labels": {"kueue.x-k8s.io/queue-name": "team-a"}}});
        let job = api
            .patch(name, &PatchParams::default(), &Patch::Merge(&label))
            .await
            .expect("label the job");
        let uid = job.metadata.uid.clone().expect("uid");
        let workload_name = format!("{}-{name}-1a2b3", resource.kind.to_lowercase());
        let workload: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "Workload",
            "metadata": {"name": workload_name, "namespace": self.namespace,
                "labels": {"kueue.x-k8s.io/job-uid": uid},
                "ownerReferences": [{"apiVersion": resource.api_version, "kind": resource.kind,
                    "name": name, "uid": uid, "controller": true, "blockOwnerDeletion": true}]},
            "spec": {"queueName": "team-a", "podSets": [{"name": "main", "count": 1,
                "template": {"spec": {"containers": [{"name": "main", "image": "x"}]}}}]}}))
        .expect("workload");
        let workloads = self.dynamic(&handoff_controller::kueue::workload());
        workloads
            .create(&PostParams::default(), &workload)
            .await
            .expect("create the Workload");
        let entries: Vec<Value> = checks
            .iter()
            // Kueue writes an empty message; the 1.20 server reads "" here as null and refuses it.
            .map(|c| json!({"name": c, "state": "Pending", "message": "listed", "lastTransitionTime": "2026-01-01T00:00:00Z"}))
            .collect();
        let status = json!({"status": {"admissionChecks": entries, "conditions": [{
            "type": "QuotaReserved", "status": "True", "reason": "QuotaReserved", "message": "test",
            "lastTransitionTime": "2026-01-01T00:00:00Z"}]}});
        workloads
            .patch_status(
                &workload_name,
                &PatchParams::default(),
                &Patch::Merge(&status),
            )
            .await
            .expect("reserve quota");
        workload_name
    }

    /// `(state, message)` of a check on a Workload.
    async fn check_on(&self, workload: &str, check: &str) -> (String, String) {
        let workloads = self.dynamic(&handoff_controller::kueue::workload());
        let w =
            serde_json::to_value(workloads.get(workload).await.expect("workload")).expect("json");
        let entry = w["status"]["admissionChecks"]
            .as_array()
            .and_then(|a| a.iter().find(|c| c["name"] == check).cloned())
            .expect("the check is listed");
        (
            entry["state"].as_str().unwrap_or_default().into(),
            entry["message"].as_str().unwrap_or_default().into(),
        )
    }

    async fn wait_check(&self, workload: &str, check: &str, state: &str) -> String {
        self.wait_check_saying(workload, check, state, "").await
    }

    /// [`Self::wait_check`] for a message that contains `saying` too.
    async fn wait_check_saying(
        &self,
        workload: &str,
        check: &str,
        state: &str,
        saying: &str,
    ) -> String {
        let waited = handoff_testkit::patience();
        let found = handoff_testkit::poll_until(waited, || async {
            let (now, message) = self.check_on(workload, check).await;
            (now == state && message.contains(saying)).then_some(message)
        })
        .await;
        if let Some(message) = found {
            return message;
        }
        // Say what the controller last wrote, so that a failure in CI can be read.
        let (now, message) = self.check_on(workload, check).await;
        let link = self.links().get("features").await.ok();
        let status = link.and_then(|l| l.status).map(|s| {
            let conditions: Vec<String> = s
                .conditions
                .iter()
                .map(|c| format!("{}={} {}: {}", c.type_, c.status, c.reason, c.message))
                .collect();
            format!("phase {:?}; {}", s.phase, conditions.join("; "))
        });
        panic!(
            "timed out after {waited:?} waiting for {check} {state} saying {saying:?} on \
             {workload} in {}: the check is {now} ({message}); the DataLink: {status:?}",
            self.namespace
        );
    }

    /// Kueue admits: it unsuspends the job (`spec.suspend`, or `runPolicy.suspend`).
    async fn kueue_admits(&self, resource: &ApiResource, name: &str) {
        let patch = if resource.kind == "PyTorchJob" {
            json!({"spec": {"runPolicy": {"suspend": false}}})
        } else {
            json!({"spec": {"suspend": false}})
        };
        self.dynamic(resource)
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .expect("unsuspend");
    }
}

/// A Kueue-managed SparkApplication and PyTorchJob: the controller never writes their suspend.
/// Our AdmissionCheck is made Active; on the producer's Workload it goes Ready once the env is
/// written; on the consumer's it stays Pending, naming the DataLink, until the seal.
async fn kueue_holds_a_pytorchjob_until_the_seal(cluster: &Cluster) {
    let mut s = Scenario::new(
        cluster,
        "kueue-pytorch",
        Consumer::PyTorchJob,
        json!({"producer": {"sparkApplication": "producer"}, "consumer": {"pytorchJob": "trainer"}}),
    )
    .await;
    let (ours, theirs) = s.admission_checks().await;
    let spark_workload = s.under_kueue(&spark_resource(), "producer", &[&ours]).await;
    let job_workload = s
        .under_kueue(&s.consumer_resource(), "trainer", &[&theirs, &ours])
        .await;
    s.start_controller().await;
    eventually("our AdmissionCheck Active", || async {
        s.check_active(&ours).await.then_some(())
    })
    .await;
    s.run_server().await;
    s.wait_check(&spark_workload, &ours, "Ready").await;
    assert_eq!(s.spark().await["spec"]["suspend"], true, "Kueue starts it");
    let env = &s.spark().await["spec"]["executor"]["env"];
    assert!(
        env.as_array()
            .is_some_and(|e| e.iter().any(|v| v["name"] == "HANDOFF_TOKEN"))
    );
    s.kueue_admits(&spark_resource(), "producer").await;
    let spark = s.spark().await;
    s.spark_state("RUNNING").await;
    let held = s.wait_check(&job_workload, &ours, "Pending").await;
    eventually("the hold to name the DataLink", || async {
        let (_, message) = s.check_on(&job_workload, &ours).await;
        message
            .contains("DataLink features holds PyTorchJob trainer")
            .then_some(())
    })
    .await;
    let _ = held;
    s.write(&spark, 250, true).await;
    s.spark_state("COMPLETED").await;
    s.wait_check(&job_workload, &ours, "Ready").await;
    s.wait_condition("Sealed", "Sealed").await;
    assert!(
        s.consumer_suspended().await,
        "the controller leaves suspend to Kueue"
    );
    assert_eq!(
        s.check_on(&job_workload, &theirs).await.0,
        "Pending",
        "not ours"
    );
    assert!(!s.check_active(&theirs).await, "not ours");
    s.kueue_admits(&s.consumer_resource(), "trainer").await;
    s.wait_condition("ConsumerReleased", "Admitted").await;
    s.consumer_condition("Running").await;
    s.wait_phase(Phase::Consuming).await;
    s.finish().await;
}

/// A Kueue-managed TrainJob: wired through our runtimePatches entry next to Kueue's, held by
/// our check until the seal.
async fn kueue_holds_a_trainjob_until_the_seal(cluster: &Cluster) {
    let mut s = Scenario::new(
        cluster,
        "kueue-trainjob",
        Consumer::TrainJob,
        json!({"producer": {"sparkApplication": "producer"}, "consumer": {"trainJob": "trainer"}}),
    )
    .await;
    let (ours, _) = s.admission_checks().await;
    // Kueue's webhook writes its own runtime patch entry.
    let kueue_entry = json!({"spec": {"runtimePatches": [{"manager": "kueue.x-k8s.io/manager",
        "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [{"name": "node",
            "template": {"spec": {"template": {"spec": {"nodeSelector": {"pool": "a"}}}}}}]}}}}]}});
    s.dynamic(&s.consumer_resource())
        .patch(
            "trainer",
            &PatchParams::default(),
            &Patch::Merge(&kueue_entry),
        )
        .await
        .expect("Kueue's entry");
    let workload = s
        .under_kueue(&s.consumer_resource(), "trainer", &[&ours])
        .await;
    s.start_controller().await;
    s.run_server().await;
    let spark = s.wait_producer_wired().await;
    s.spark_state("RUNNING").await;
    s.wait_check(&workload, &ours, "Pending").await;
    s.write(&spark, 120, true).await;
    s.spark_state("COMPLETED").await;
    s.wait_check(&workload, &ours, "Ready").await;
    let job = s.job().await;
    assert_eq!(job["spec"]["suspend"], true, "Kueue unsuspends it, not us");
    let managers: Vec<&str> = job["spec"]["runtimePatches"]
        .as_array()
        .expect("runtimePatches")
        .iter()
        .filter_map(|p| p["manager"].as_str())
        .collect();
    assert_eq!(
        managers,
        ["kueue.x-k8s.io/manager", "handoff.kubeflow.org/datalink"]
    );
    s.kueue_admits(&s.consumer_resource(), "trainer").await;
    s.wait_condition("ConsumerReleased", "Admitted").await;
    s.finish().await;
}

/// The producer fails: our check on the consumer's Workload is Rejected, so Kueue deactivates it.
async fn kueue_rejects_when_the_producer_fails(cluster: &Cluster) {
    let mut s = Scenario::new(
        cluster,
        "kueue-rejects",
        Consumer::PyTorchJob,
        json!({"producer": {"sparkApplication": "producer"}, "consumer": {"pytorchJob": "trainer"}}),
    )
    .await;
    let (ours, _) = s.admission_checks().await;
    let workload = s
        .under_kueue(&s.consumer_resource(), "trainer", &[&ours])
        .await;
    s.start_controller().await;
    s.run_server().await;
    s.wait_producer_wired().await;
    s.spark_state("RUNNING").await;
    s.wait_check(&workload, &ours, "Pending").await;
    s.spark_state("FAILED").await;
    let message = s.wait_check(&workload, &ours, "Rejected").await;
    assert!(
        message.contains("SparkApplication producer ended in FAILED"),
        "{message}"
    );
    s.wait_phase(Phase::Failed).await;
    s.finish().await;
}

/// A server lost before the seal with onServerLoss: RestartProducer: our check on a Kueue-managed
/// consumer goes Retry (Kueue evicts and requeues it), then holds it again until the new seal.
async fn kueue_retries_the_consumer_while_the_producer_reruns(cluster: &Cluster) {
    let mut s = Scenario::new(
        cluster,
        "kueue-retry",
        Consumer::PyTorchJob,
        json!({"producer": {"sparkApplication": "producer"}, "consumer": {"pytorchJob": "trainer"},
               "policy": {"onServerLoss": "RestartProducer"}}),
    )
    .await;
    let (ours, _) = s.admission_checks().await;
    let workload = s
        .under_kueue(&s.consumer_resource(), "trainer", &[&ours])
        .await;
    s.start_controller().await;
    s.run_server().await;
    let spark = s.wait_producer_wired().await;
    s.spark_state("RUNNING").await;
    s.write(&spark, 80, false).await;
    s.wait_rows(80).await;
    s.restart_server().await;
    let message = s.wait_check(&workload, &ours, "Retry").await;
    assert!(message.contains("lost link features: 80 rows"), "{message}");
    // Kueue evicts, requeues and, with quota again, lists our check Pending.
    let relisted = json!({"status": {"admissionChecks": [{"name": ours, "state": "Pending",
        "message": "requeued", "lastTransitionTime": "2026-01-01T00:00:01Z"}]}});
    s.dynamic(&handoff_controller::kueue::workload())
        .patch_status(&workload, &PatchParams::default(), &Patch::Merge(&relisted))
        .await
        .expect("requeue");
    s.operator_suspends().await;
    let spark = s.wait_producer_wired().await;
    s.spark_state("RUNNING").await;
    s.wait_check_saying(&workload, &ours, "Pending", "holds PyTorchJob trainer")
        .await;
    s.write(&spark, 90, true).await;
    s.spark_state("COMPLETED").await;
    s.wait_check(&workload, &ours, "Ready").await;
    assert!(s.consumer_suspended().await);
    s.finish().await;
}

async fn prepared_cluster() -> Cluster {
    let cluster = Cluster::start().await;
    install_crd(&cluster.client).await;
    install_upstream_crds(&cluster).await;
    install_kueue_crds(&cluster).await;
    install_rbac(&cluster.client).await;
    cluster
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn datalinks_are_reconciled_end_to_end() {
    let cluster = prepared_cluster().await;
    tokio::join!(
        happy_path_pytorchjob(&cluster),
        happy_path_trainjob(&cluster),
        producer_failure(&cluster),
        producer_failure_deletes_the_server(&cluster),
        invalid_spec_then_fixed(&cluster),
        streaming_gate(&cluster),
        deletion_midway(&cluster),
        idempotent_and_restartable(&cluster),
        upgrade_from_a_secret_without_certificates(&cluster),
        a_server_restarted_after_the_seal_restores_the_link(&cluster),
        three_replicas_under_the_controller(&cluster),
        a_lost_server_reruns_the_producer(&cluster),
        a_lost_sealed_link_reruns_a_completed_producer(&cluster),
        a_lost_server_fails_the_link(&cluster),
        a_controller_upgrade_does_not_restart_link_servers(&cluster),
        kueue_holds_a_pytorchjob_until_the_seal(&cluster),
        kueue_holds_a_trainjob_until_the_seal(&cluster),
        kueue_rejects_when_the_producer_fails(&cluster),
        kueue_retries_the_consumer_while_the_producer_reruns(&cluster),
    );
}

/// The API server goes away and comes back mid-flow; the controller's watches resume and it
/// converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_converges_after_an_api_server_restart() {
    let cluster = prepared_cluster().await;
    if !cluster.is_local() {
        eprintln!("skipped: HANDOFF_TEST_KUBECONFIG names a cluster this test cannot restart");
        return;
    }
    let mut s = Scenario::new(
        &cluster,
        "apiserver-restart",
        Consumer::PyTorchJob,
        json!({"producer": {"sparkApplication": "producer"}, "consumer": {"pytorchJob": "trainer"}}),
    )
    .await;
    s.start_controller().await;
    s.run_server().await;
    let spark = s.wait_producer_wired().await;
    s.spark_state("RUNNING").await;
    s.wait_phase(Phase::Receiving).await;
    cluster.restart_api_server();
    s.write(&spark, 500, true).await;
    s.spark_state("COMPLETED").await;
    let link = s.wait_phase(Phase::Sealed).await;
    assert_eq!(link.status.and_then(|s| s.rows), Some(500));
    assert!(!s.consumer_suspended().await);
    s.finish().await;
}
