//! A real kube-apiserver and etcd for the controller tests (started by `scripts/kube-up.sh`,
//! which builds the API server once), or any cluster named by `HANDOFF_TEST_KUBECONFIG`.

#![allow(dead_code)]

pub mod crd_rules;

use std::path::{Path, PathBuf};
use std::process::Command;

use handoff_controller::DataLink;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Client, Config, CustomResourceExt};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A real API server for one test; stopped on drop unless it came from the environment.
pub struct Cluster {
    pub client: Client,
    pub kubeconfig: PathBuf,
    dir: Option<tempfile::TempDir>,
}

impl Cluster {
    pub async fn start() -> Self {
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
        let client = Client::try_from(config_for(&kubeconfig, None).await).expect("client");
        Self {
            client,
            kubeconfig,
            dir,
        }
    }

    /// Whether this test owns the API server (and may restart it).
    pub fn is_local(&self) -> bool {
        self.dir.is_some()
    }

    /// Stop and start the API server on the same port and etcd.
    pub fn restart_api_server(&self) {
        let dir = self.dir.as_ref().expect("only a local cluster restarts");
        let out = Command::new("bash")
            .arg(repo().join("scripts/kube-up.sh"))
            .arg("--restart-apiserver")
            .arg(dir.path())
            .output()
            .expect("run scripts/kube-up.sh");
        assert!(
            out.status.success(),
            "restart failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
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

/// The kubeconfig's identity, or the given user impersonated through it.
pub async fn config_for(kubeconfig: &Path, impersonate: Option<(&str, Vec<String>)>) -> Config {
    let kubeconfig = Kubeconfig::read_from(kubeconfig).expect("kubeconfig");
    let mut config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("config");
    if let Some((user, groups)) = impersonate {
        config.auth_info.impersonate = Some(user.to_string());
        config.auth_info.impersonate_groups = Some(groups);
    }
    config
}

pub async fn install_crd(client: &Client) {
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
    established(&crds, &name).await;
}

async fn established(crds: &Api<CustomResourceDefinition>, name: &str) {
    handoff_testkit::within(
        &format!("CRD {name} to be established"),
        await_condition(crds.clone(), name, conditions::is_crd_established()),
    )
    .await
    .expect("watch");
}

/// Adjust an upstream CRD so that the 1.20 test server accepts it. Each change names its reason;
/// none of them touches what the controller reads or patches.
pub fn for_api_server_1_20(node: &mut serde_json::Value) {
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

pub fn fixture(name: &str) -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/upstream")
        .join(name);
    let text = std::fs::read_to_string(&path).expect("read fixture");
    serde_yaml::from_str(&text).expect("yaml")
}

pub const UPSTREAM_CRDS: [&str; 3] = [
    "sparkoperator.k8s.io_sparkapplications.yaml",
    "kubeflow.org_pytorchjobs.yaml",
    "trainer.kubeflow.org_trainjobs.yaml",
];

/// Kueue's CRDs that the controller uses, from `../shared/crds` (Kueue v0.19.2, verbatim; see
/// SOURCES.md there), adjusted for 1.20 on the local server.
pub const KUEUE_CRDS: [&str; 2] = [
    "kueue.x-k8s.io_admissionchecks.yaml",
    "kueue.x-k8s.io_workloads.yaml",
];

pub fn shared_crd(name: &str) -> serde_json::Value {
    let path = repo().join("../shared/crds").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; the Kueue tests read the upstream CRDs from ../shared/crds beside the checkout",
            path.display()
        )
    });
    serde_yaml::from_str(&text).expect("yaml")
}

pub async fn install_kueue_crds(cluster: &Cluster) {
    for file in KUEUE_CRDS {
        let mut crd = shared_crd(file);
        if cluster.is_local() {
            for version in crd["spec"]["versions"].as_array_mut().into_iter().flatten() {
                // Field selectors for custom resources arrived in 1.30; nothing here uses them.
                if let Some(version) = version.as_object_mut() {
                    version.remove("selectableFields");
                }
            }
        }
        install_upstream_crd(cluster, file, crd).await;
    }
}

/// The SparkApplication, PyTorchJob and TrainJob CRDs, adjusted for 1.20 on the local server.
pub async fn install_upstream_crds(cluster: &Cluster) {
    for file in UPSTREAM_CRDS {
        install_upstream_crd(cluster, file, fixture(file)).await;
    }
}

/// Apply another project's CRD, adjusted for 1.20 on the local server, and wait until it serves.
async fn install_upstream_crd(cluster: &Cluster, file: &str, mut crd: serde_json::Value) {
    let crds: Api<CustomResourceDefinition> = Api::all(cluster.client.clone());
    if cluster.is_local() {
        for_api_server_1_20(&mut crd);
    }
    let crd: CustomResourceDefinition = serde_json::from_value(crd).expect("a CRD");
    let name = crd.metadata.name.clone().expect("name");
    crds.patch(
        &name,
        &PatchParams::apply("handoff-test").force(),
        &Patch::Apply(&crd),
    )
    .await
    .unwrap_or_else(|e| panic!("{file} installs: {e}"));
    established(&crds, &name).await;
}
