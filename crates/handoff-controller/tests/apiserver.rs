//! The DataLink CRD against a real kube-apiserver and etcd (started by `scripts/kube-up.sh`, which
//! builds the API server once), or against any cluster named by `HANDOFF_TEST_KUBECONFIG`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use handoff_controller::{DataLink, DataLinkStatus, Phase, resources};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Client, Config, CustomResourceExt};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A real API server for one test binary; stopped on drop unless it came from the environment.
struct Cluster {
    client: Client,
    dir: Option<tempfile::TempDir>,
}

impl Cluster {
    async fn start() -> Self {
        let (kubeconfig, dir) = match std::env::var_os("HANDOFF_TEST_KUBECONFIG") {
            Some(path) => (PathBuf::from(path), None),
            None => {
                let dir = tempfile::tempdir().expect("tempdir");
                let out = Command::new("bash")
                    .arg(repo().join("scripts/kube-up.sh"))
                    .arg(dir.path())
                    .output()
                    .expect("run scripts/kube-up.sh");
                let stdout = String::from_utf8_lossy(&out.stdout);
                assert!(
                    out.status.success(),
                    "scripts/kube-up.sh failed:\n{stdout}\n{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let path = stdout
                    .lines()
                    .rev()
                    .find_map(|l| l.strip_prefix("KUBECONFIG="))
                    .expect("kube-up.sh prints KUBECONFIG=<path>");
                (PathBuf::from(path), Some(dir))
            }
        };
        let client = client_for(&kubeconfig).await;
        Self { client, dir }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(dir) = &self.dir {
            let _ = Command::new("bash")
                .arg(repo().join("scripts/kube-up.sh"))
                .arg("--down")
                .arg(dir.path())
                .status();
        }
    }
}

async fn client_for(kubeconfig: &Path) -> Client {
    let kubeconfig = Kubeconfig::read_from(kubeconfig).expect("kubeconfig");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("config");
    Client::try_from(config).expect("client")
}

async fn install_crd(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = DataLink::crd();
    let name = crd.metadata.name.clone().expect("crd name");
    crds.patch(
        &name,
        &PatchParams::apply("handoff-test").force(),
        &Patch::Apply(&crd),
    )
    .await
    .expect("apply the CRD");
    tokio::time::timeout(
        Duration::from_secs(30),
        await_condition(crds, &name, conditions::is_crd_established()),
    )
    .await
    .expect("established in time")
    .expect("watch");
}

#[tokio::test]
async fn the_crd_installs_and_datalinks_round_trip_through_a_real_api_server() {
    let cluster = Cluster::start().await;
    install_crd(&cluster.client).await;
    let links: Api<DataLink> = Api::namespaced(cluster.client.clone(), "default");

    let text = std::fs::read_to_string(repo().join("examples/k8s/datalink.yaml")).expect("read");
    let example: DataLink = serde_yaml::from_str(&text).expect("parse");
    let created = links
        .create(&PostParams::default(), &example)
        .await
        .expect("create the example DataLink");
    assert_eq!(
        created.spec, example.spec,
        "the server keeps the spec as sent"
    );

    // Defaults come from the schema: a minimal spec is filled in by the API server.
    let minimal: DataLink = serde_yaml::from_str(
        "apiVersion: handoff.kubeflow.org/v1alpha1\nkind: DataLink\nmetadata: {name: minimal}\n\
         spec: {producer: {sparkApplication: s}, consumer: {trainJob: t}}\n",
    )
    .expect("parse");
    let stored = links
        .create(&PostParams::default(), &minimal)
        .await
        .expect("create minimal");
    let raw = serde_json::to_value(&stored).expect("json");
    assert_eq!(raw["spec"]["policy"]["gate"], "sealed", "{raw}");
    assert_eq!(raw["spec"]["policy"]["memoryPolicy"], "spill", "{raw}");

    // The schema refuses what is not a DataLink.
    let bad = serde_json::json!({
        "apiVersion": "handoff.kubeflow.org/v1alpha1", "kind": "DataLink",
        "metadata": {"name": "bad"},
        "spec": {"producer": {"sparkApplication": "s"}, "consumer": {}, "policy": {"gate": "later"}}
    });
    // Sent raw: the typed struct cannot even hold an unknown gate.
    let request =
        http::Request::post("/apis/handoff.kubeflow.org/v1alpha1/namespaces/default/datalinks")
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&bad).expect("body"))
            .expect("request");
    let refused = cluster
        .client
        .request::<serde_json::Value>(request)
        .await
        .expect_err("an unknown gate is refused");
    assert!(refused.to_string().contains("gate"), "{refused}");

    // Status goes through the status subresource, by server-side apply.
    let status = serde_json::json!({
        "apiVersion": "handoff.kubeflow.org/v1alpha1", "kind": "DataLink",
        "status": DataLinkStatus { phase: Phase::Provisioning, observed_generation: Some(1), ..Default::default() }
    });
    links
        .patch_status(
            "features",
            &PatchParams::apply("handoff-test").force(),
            &Patch::Apply(&status),
        )
        .await
        .expect("status by server-side apply");
    let read = links.get("features").await.expect("get");
    assert_eq!(read.status.expect("status").phase, Phase::Provisioning);

    // The objects the controller will own validate on the real server, owned by the DataLink.
    let owner = links.get("features").await.expect("get");
    let namespace = "default";
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(cluster.client.clone(), namespace);
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> =
        Api::namespaced(cluster.client.clone(), namespace);
    let services: Api<k8s_openapi::api::core::v1::Service> =
        Api::namespaced(cluster.client.clone(), namespace);
    let params = PatchParams::apply("handoff-test").force();
    let tokens = resources::Tokens::generate().expect("tokens");
    let secret = resources::token_secret(&owner, &tokens);
    secrets
        .patch(
            &resources::secret_name(&owner),
            &params,
            &Patch::Apply(&secret),
        )
        .await
        .expect("secret applies");
    let deployment = resources::server_deployment(&owner, "handoff:test").expect("deployment");
    let applied = deployments
        .patch(
            &resources::server_name(&owner),
            &params,
            &Patch::Apply(&deployment),
        )
        .await
        .expect("deployment applies");
    let container = &applied
        .spec
        .expect("spec")
        .template
        .spec
        .expect("pod")
        .containers[0];
    let args = container.args.clone().expect("args");
    assert!(
        args.windows(2)
            .any(|w| w == ["--memory-limit", &(8u64 << 30).to_string()])
    );
    assert!(
        args.windows(2)
            .any(|w| w == ["--spill-url", "s3://ml-scratch/handoff"])
    );
    let limit = &container
        .resources
        .as_ref()
        .expect("resources")
        .limits
        .as_ref()
        .expect("limits")["memory"];
    let expected = (8u64 << 30) + (8u64 << 30) / 10 + (256 << 20);
    assert_eq!(limit.0, expected.to_string());
    let service = services
        .patch(
            &resources::server_name(&owner),
            &params,
            &Patch::Apply(&resources::server_service(&owner)),
        )
        .await
        .expect("service applies");
    let owners = service.metadata.owner_references.expect("owned");
    assert_eq!(owners[0].uid, owner.metadata.uid.clone().expect("uid"));
    assert_eq!(
        resources::endpoint(&owner),
        "grpc://features-handoff.default.svc:8815"
    );
    let mut bad = owner.clone();
    bad.spec.server.memory = Some("8GB".into());
    assert!(resources::server_deployment(&bad, "x").is_err());

    for name in ["features", "minimal"] {
        links
            .delete(name, &DeleteParams::default())
            .await
            .expect("delete");
    }
}

/// Adjust an upstream CRD so that the 1.20 test server accepts it. Each change names its reason;
/// none of them touches what the controller reads or patches.
fn for_api_server_1_20(node: &mut serde_json::Value) {
    if let serde_json::Value::Object(map) = node {
        // CEL validation rules arrived in 1.23.
        map.remove("x-kubernetes-validations");
        // 1.20 reads an empty-string default as null and refuses it.
        if map.get("default") == Some(&serde_json::Value::String(String::new())) {
            map.remove("default");
        }
        // Without those defaults, 1.20 refuses list-map keys that may be absent.
        if map.get("x-kubernetes-list-type") == Some(&serde_json::Value::from("map")) {
            map.insert("x-kubernetes-list-type".into(), "atomic".into());
            map.remove("x-kubernetes-list-map-keys");
        }
        for value in map.values_mut() {
            for_api_server_1_20(value);
        }
    } else if let serde_json::Value::Array(items) = node {
        items.iter_mut().for_each(for_api_server_1_20);
    }
}

fn fixture(name: &str) -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/upstream")
        .join(name);
    let text = std::fs::read_to_string(&path).expect("read fixture");
    serde_yaml::from_str(&text).expect("yaml")
}

#[tokio::test]
async fn the_upstream_producer_and_consumer_crds_install_and_their_examples_suspend() {
    let cluster = Cluster::start().await;
    let crds: Api<CustomResourceDefinition> = Api::all(cluster.client.clone());
    for file in [
        "sparkoperator.k8s.io_sparkapplications.yaml",
        "kubeflow.org_pytorchjobs.yaml",
        "trainer.kubeflow.org_trainjobs.yaml",
    ] {
        let mut crd = fixture(file);
        for_api_server_1_20(&mut crd);
        let crd: CustomResourceDefinition = serde_json::from_value(crd).expect("a CRD");
        let name = crd.metadata.name.clone().expect("name");
        crds.patch(
            &name,
            &PatchParams::apply("handoff-test").force(),
            &Patch::Apply(&crd),
        )
        .await
        .unwrap_or_else(|e| panic!("{file} installs: {e}"));
        tokio::time::timeout(
            Duration::from_secs(30),
            await_condition(crds.clone(), &name, conditions::is_crd_established()),
        )
        .await
        .expect("established in time")
        .expect("watch");
    }

    // The upstream examples, created suspended in one namespace, as a DataLink expects them.
    for (file, group, version, kind, plural, suspend) in [
        (
            "examples/spark-pi.yaml",
            "sparkoperator.k8s.io",
            "v1beta2",
            "SparkApplication",
            "sparkapplications",
            serde_json::json!({"spec": {"suspend": true}}),
        ),
        (
            "examples/pytorchjob-simple.yaml",
            "kubeflow.org",
            "v1",
            "PyTorchJob",
            "pytorchjobs",
            serde_json::json!({"spec": {"runPolicy": {"suspend": true}}}),
        ),
        (
            "examples/trainjob-01-multi-node.yaml",
            "trainer.kubeflow.org",
            "v1alpha1",
            "TrainJob",
            "trainjobs",
            serde_json::json!({"spec": {"suspend": true}}),
        ),
    ] {
        let resource = ApiResource {
            group: group.into(),
            version: version.into(),
            api_version: format!("{group}/{version}"),
            kind: kind.into(),
            plural: plural.into(),
        };
        let api: Api<DynamicObject> =
            Api::namespaced_with(cluster.client.clone(), "default", &resource);
        let mut object: DynamicObject = serde_json::from_value(fixture(file)).expect("object");
        object.metadata.namespace = Some("default".into());
        let name = object.metadata.name.clone().expect("name");
        api.create(&PostParams::default(), &object)
            .await
            .unwrap_or_else(|e| panic!("{file} creates: {e}"));
        api.patch(&name, &PatchParams::default(), &Patch::Merge(&suspend))
            .await
            .unwrap_or_else(|e| panic!("{kind} can be suspended: {e}"));
        let read = api.get(&name).await.expect("get");
        let field = if kind == "PyTorchJob" {
            &read.data["spec"]["runPolicy"]["suspend"]
        } else {
            &read.data["spec"]["suspend"]
        };
        assert_eq!(field, &serde_json::Value::Bool(true), "{kind}");
    }
}
