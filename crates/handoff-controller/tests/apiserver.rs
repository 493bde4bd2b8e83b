//! The DataLink CRD against a real kube-apiserver and etcd (started by `scripts/kube-up.sh`, which
//! builds the API server once), or against any cluster named by `HANDOFF_TEST_KUBECONFIG`.

mod common;

use common::{Cluster, fixture, install_crd, install_upstream_crds, repo};

use handoff_controller::{DataLink, DataLinkStatus, Phase, resources};
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};

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
    // One server per link: the schema refuses a second replica.
    let mut two = minimal.clone();
    two.metadata.name = Some("two".into());
    two.spec.server.replicas = Some(2);
    let refused = links
        .create(&PostParams::default(), &two)
        .await
        .expect_err("replicas: 2 is refused");
    assert!(refused.to_string().contains("replicas"), "{refused}");

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
    let secret = resources::token_secret(&owner, &tokens, None);
    secrets
        .patch(
            &resources::secret_name(&owner),
            &params,
            &Patch::Apply(&secret),
        )
        .await
        .expect("secret applies");
    let deployment =
        resources::server_deployment(&owner, "handoff:test", true).expect("deployment");
    let applied = deployments
        .patch(
            &resources::server_name(&owner),
            &params,
            &Patch::Apply(&deployment),
        )
        .await
        .expect("deployment applies");
    let strategy = applied
        .spec
        .as_ref()
        .and_then(|s| s.strategy.as_ref())
        .and_then(|s| s.type_.clone());
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
    // Its own prefix below the spec's bucket, snapshotted on seal and restored on start.
    let uid = owner.metadata.uid.clone().expect("uid");
    let storage = format!("s3://ml-scratch/handoff/default/features-{uid}");
    assert!(args.windows(2).any(|w| w == ["--spill-url", &storage]));
    assert!(args.windows(2).any(|w| w == ["--restore-from", &storage]));
    assert!(args.contains(&"--snapshot-on-seal".to_string()));
    assert_eq!(strategy.as_deref(), Some("Recreate"));
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
        resources::endpoint(&owner, resources::tls_enabled(&owner)),
        "grpc+tls://features-handoff.default.svc:8815"
    );
    let mut plain = owner.clone();
    plain.spec.server.tls = Some(false);
    assert_eq!(
        resources::endpoint(&plain, resources::tls_enabled(&plain)),
        "grpc://features-handoff.default.svc:8815"
    );
    let args = |link: &DataLink| {
        resources::server_deployment(link, "x", resources::tls_enabled(link))
            .expect("deployment")
            .spec
            .expect("spec")
            .template
            .spec
            .expect("pod")
            .containers[0]
            .args
            .clone()
            .expect("args")
    };
    assert!(args(&owner).contains(&"--tls-cert".to_string()));
    assert!(!args(&plain).iter().any(|a| a.starts_with("--tls")));
    let mut bad = owner.clone();
    bad.spec.server.memory = Some("8GB".into());
    assert!(resources::server_deployment(&bad, "x", true).is_err());

    for name in ["features", "minimal"] {
        links
            .delete(name, &DeleteParams::default())
            .await
            .expect("delete");
    }
}

#[tokio::test]
async fn the_upstream_producer_and_consumer_crds_install_and_their_examples_suspend() {
    let cluster = Cluster::start().await;
    install_upstream_crds(&cluster).await;

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
