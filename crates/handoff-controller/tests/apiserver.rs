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
    // At most 64 replicas: the schema refuses more, and so does the controller.
    let mut many = minimal.clone();
    many.metadata.name = Some("many".into());
    many.spec.server.replicas = Some(resources::MAX_REPLICAS + 1);
    let refused = links
        .create(&PostParams::default(), &many)
        .await
        .expect_err("replicas: 65 is refused");
    assert!(refused.to_string().contains("replicas"), "{refused}");
    let why = resources::replicas(&many).expect_err("the controller refuses it too");
    assert!(why.0.contains("give 1 to 64"), "{why}");

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
    // The controller dials the ClusterIP the API server gave the Service (no cluster DNS
    // needed); a headless or not yet allocated Service falls back to the DNS name.
    let ip = service
        .spec
        .as_ref()
        .and_then(|s| s.cluster_ip.clone())
        .expect("the API server allocates a ClusterIP");
    assert_eq!(
        resources::dial_endpoint(&owner, true, Some(&ip)),
        format!("grpc+tls://{ip}:8815")
    );
    for none in [None, Some(""), Some("None")] {
        assert_eq!(
            resources::dial_endpoint(&owner, true, none),
            "grpc+tls://features-handoff.default.svc:8815"
        );
    }
    assert_eq!(
        resources::dial_endpoint(&owner, false, Some("fd00::10")),
        "grpc://[fd00::10]:8815"
    );
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

    // Three replicas: a StatefulSet under a headless Service, which the real server takes.
    let mut three = owner.clone();
    three.spec.server.replicas = Some(3);
    assert!(resources::server_deployment(&three, "x", true).is_err());
    let sets: Api<k8s_openapi::api::apps::v1::StatefulSet> =
        Api::namespaced(cluster.client.clone(), namespace);
    let peers = services
        .patch(
            &resources::peers_service_name(&three),
            &params,
            &Patch::Apply(&resources::peers_service(&three)),
        )
        .await
        .expect("headless service applies")
        .spec
        .expect("spec");
    assert_eq!(peers.cluster_ip.as_deref(), Some("None"));
    let set = resources::server_statefulset(&three, "handoff:test", true).expect("statefulset");
    let applied = sets
        .patch(
            &resources::server_name(&three),
            &params,
            &Patch::Apply(&set),
        )
        .await
        .expect("statefulset applies")
        .spec
        .expect("spec");
    assert_eq!(applied.replicas, Some(3));
    assert_eq!(
        applied.service_name.as_deref(),
        Some("features-handoff-peers")
    );
    let container = &applied.template.spec.expect("pod").containers[0];
    let args = container.args.clone().expect("args");
    let after = |flag: &str| {
        args.windows(2)
            .find(|w| w[0] == flag)
            .map(|w| w[1].clone())
            .unwrap_or_else(|| panic!("{flag} in {args:?}"))
    };
    let peer = |i: usize| {
        format!("grpc+tls://features-handoff-{i}.features-handoff-peers.default.svc:8815")
    };
    assert_eq!(after("--peers"), [peer(0), peer(1), peer(2)].join(","));
    assert_eq!(after("--replica-index"), "$(HANDOFF_POD_NAME)");
    assert_eq!(after("--peer-ca"), "/etc/handoff/ca.crt");
    // Each replica snapshots its own part, below the link's prefix.
    assert_eq!(
        after("--spill-url"),
        format!("{storage}/$(HANDOFF_POD_NAME)")
    );
    assert_eq!(
        after("--restore-from"),
        format!("{storage}/$(HANDOFF_POD_NAME)")
    );
    let env = container.env.clone().expect("env");
    assert_eq!(
        env[0].name, "HANDOFF_POD_NAME",
        "defined before the args use it"
    );
    let front = resources::server_service(&three);
    let selector = front.spec.and_then(|s| s.selector).expect("selector");
    assert_eq!(
        selector
            .get("statefulset.kubernetes.io/pod-name")
            .map(String::as_str),
        Some("features-handoff-0")
    );
    // One certificate for every replica: the wildcard under the headless Service.
    assert!(
        resources::server_dns_names(&three)
            .contains(&"*.features-handoff-peers.default.svc".to_string())
    );
    sets.delete(&resources::server_name(&three), &DeleteParams::default())
        .await
        .expect("delete");

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

/// Kubeflow Profiles: a user bound to kubeflow-edit in their profile's namespace may create
/// DataLinks there and nowhere else; one bound to kubeflow-view may only read them. The roles are
/// deploy/base's; kubeflow-edit and kubeflow-view are Kubeflow's (kubeflow/manifests), whose
/// rules the clusterrole-aggregation controller fills in. That controller runs in
/// kube-controller-manager, which this API-server-only cluster does not run, so the test does its
/// one step: the union of the rules of every ClusterRole the aggregation selects. The
/// authorization itself is the real API server's RBAC.
#[tokio::test]
async fn kubeflow_profile_users_get_datalinks_in_their_namespace_only() {
    use k8s_openapi::api::core::v1::Namespace;
    use k8s_openapi::api::rbac::v1::{ClusterRole, RoleBinding};
    let cluster = Cluster::start().await;
    install_crd(&cluster.client).await;
    let roles: Api<ClusterRole> = Api::all(cluster.client.clone());
    let params = PatchParams::apply("handoff-test").force();
    let text =
        std::fs::read_to_string(repo().join("deploy/base/kubeflow-roles.yaml")).expect("read");
    let ours: Vec<ClusterRole> = serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde::Deserialize::deserialize(doc).expect("a ClusterRole"))
        .collect();
    assert_eq!(ours.len(), 3);
    for role in &ours {
        roles
            .patch(
                role.metadata.name.as_deref().expect("name"),
                &params,
                &Patch::Apply(role),
            )
            .await
            .expect("apply");
    }
    // Kubeflow's roles, as kubeflow/manifests defines their aggregation.
    let kubeflow = |name: &str, selects: &[&str]| -> ClusterRole {
        let selectors: Vec<serde_json::Value> = selects
            .iter()
            .map(|s| serde_json::json!({"matchLabels": {format!("rbac.authorization.kubeflow.org/aggregate-to-{s}"): "true"}}))
            .collect();
        serde_json::from_value(serde_json::json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": name}, "aggregationRule": {"clusterRoleSelectors": selectors},
            "rules": []}))
        .expect("role")
    };
    for role in [
        kubeflow("kubeflow-edit", &["kubeflow-edit", "kubeflow-view"]),
        kubeflow("kubeflow-view", &["kubeflow-view"]),
    ] {
        let all = roles.list(&Default::default()).await.expect("list").items;
        let selectors = role
            .aggregation_rule
            .as_ref()
            .and_then(|a| a.cluster_role_selectors.clone())
            .unwrap_or_default();
        // The aggregation controller's step: every rule of every role a selector matches.
        let rules: Vec<_> =
            all.iter()
                .filter(|r| {
                    selectors.iter().any(|s| {
                        s.match_labels.iter().flatten().all(|(k, v)| {
                            r.metadata.labels.as_ref().and_then(|l| l.get(k)) == Some(v)
                        })
                    })
                })
                .flat_map(|r| r.rules.clone().unwrap_or_default())
                .collect();
        assert!(!rules.is_empty(), "our roles are aggregated");
        let mut aggregated = role.clone();
        aggregated.rules = Some(rules);
        roles
            .patch(
                aggregated.metadata.name.as_deref().expect("name"),
                &params,
                &Patch::Apply(&aggregated),
            )
            .await
            .expect("apply");
    }
    let namespaces: Api<Namespace> = Api::all(cluster.client.clone());
    for ns in ["team-a", "team-b"] {
        let namespace: Namespace =
            serde_json::from_value(serde_json::json!({"metadata": {"name": ns}})).expect("ns");
        namespaces
            .create(&PostParams::default(), &namespace)
            .await
            .expect("namespace");
    }
    // What a Profile makes for its contributors: RoleBindings in the profile's namespace.
    let bindings: Api<RoleBinding> = Api::namespaced(cluster.client.clone(), "team-a");
    for (user, role) in [
        ("alice@example.com", "kubeflow-edit"),
        ("bob@example.com", "kubeflow-view"),
    ] {
        let binding: RoleBinding = serde_json::from_value(serde_json::json!({
            "metadata": {"name": format!("user-{}", user.split('@').next().unwrap_or(user)), "namespace": "team-a"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]}))
        .expect("binding");
        bindings
            .create(&PostParams::default(), &binding)
            .await
            .expect("bind");
    }
    let link: DataLink = serde_yaml::from_str(
        "apiVersion: handoff.kubeflow.org/v1alpha1\nkind: DataLink\nmetadata: {name: features}\n\
         spec: {producer: {sparkApplication: s}, consumer: {pytorchJob: t}}\n",
    )
    .expect("link");
    let as_user = |user: &'static str| {
        let kubeconfig = cluster.kubeconfig.clone();
        async move {
            let config = common::config_for(
                &kubeconfig,
                Some((user, vec!["system:authenticated".to_string()])),
            )
            .await;
            kube::Client::try_from(config).expect("client")
        }
    };
    let forbidden = |e: kube::Error| matches!(e, kube::Error::Api(s) if s.code == 403);
    let alice = as_user("alice@example.com").await;
    let mine: Api<DataLink> = Api::namespaced(alice.clone(), "team-a");
    mine.create(&PostParams::default(), &link)
        .await
        .expect("an editor creates a DataLink in their namespace");
    assert_eq!(
        mine.list(&Default::default())
            .await
            .expect("list")
            .items
            .len(),
        1
    );
    let theirs: Api<DataLink> = Api::namespaced(alice, "team-b");
    let refused = theirs
        .create(&PostParams::default(), &link)
        .await
        .expect_err("nowhere else");
    assert!(forbidden(refused));
    let bob = as_user("bob@example.com").await;
    let viewer: Api<DataLink> = Api::namespaced(bob, "team-a");
    assert!(viewer.get("features").await.is_ok(), "a viewer reads");
    let mut other = link.clone();
    other.metadata.name = Some("other".into());
    let refused = viewer
        .create(&PostParams::default(), &other)
        .await
        .expect_err("a viewer does not create");
    assert!(forbidden(refused));
    assert!(forbidden(
        viewer
            .delete("features", &Default::default())
            .await
            .expect_err("nor delete")
    ));
}
