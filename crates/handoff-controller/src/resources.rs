//! The objects a DataLink owns: the tokens Secret, the server (a Deployment, or a StatefulSet
//! with a headless Service over several replicas) and its Service. Pure builders, so what the
//! controller applies can be checked without a cluster.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, StatefulSet, StatefulSetSpec,
};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvFromSource, EnvVar,
    EnvVarSource, HTTPGetAction, ObjectFieldSelector, PodSecurityContext, PodSpec, PodTemplateSpec,
    Probe, ResourceRequirements, SecretEnvSource, SecretKeySelector, SecretVolumeSource,
    SecurityContext, Service, ServicePort, ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;

use crate::crd::{ConsumerRef, DataLink, MemoryPolicy};
use crate::pki::{self, LinkCertificates};

pub const GRPC_PORT: i32 = 8815;
pub const HTTP_PORT: i32 = 8816;
pub const WRITER_TOKEN_KEY: &str = "writer-token";
pub const READER_TOKEN_KEY: &str = "reader-token";
/// The controller's own token: it reads stats and deletes the link at cleanup.
pub const ADMIN_TOKEN_KEY: &str = "admin-token";
/// Hash of what the controller last applied to an object; equal means no write is needed.
pub const APPLIED_HASH: &str = "handoff.kubeflow.org/applied-hash";
/// On the server Deployment: [`server_inputs`] when it was applied.
pub const SERVER_INPUTS: &str = "handoff.kubeflow.org/server-inputs";
const DEFAULT_MEMORY: &str = "4Gi";
const DEFAULT_CPU: &str = "1";
/// The pod's memory limit over the Arrow budget: 10% plus a fixed base, the bound our /proc
/// measurements hold the server to (docs/benchmarks.md), with room for the HTTP side.
const BASE_OVERHEAD_BYTES: u64 = 256 << 20;
const SPILL_DIR: &str = "/var/lib/handoff";
/// Most replicas one link may have: far beyond what one training job's readers need (the
/// placement's balance is measured to 64, docs/scale-out.md).
pub const MAX_REPLICAS: i32 = 64;
/// The label the StatefulSet controller puts on each pod, with the pod's name.
const POD_NAME_LABEL: &str = "statefulset.kubernetes.io/pod-name";
/// A server pod's own name, for `--replica-index` and its own storage prefix.
const POD_NAME_ENV: &str = "HANDOFF_POD_NAME";

/// A spec the controller cannot act on; the DataLink goes to phase Failed with this sentence.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid DataLink spec: {0}")]
pub struct InvalidSpec(pub String);

/// Bytes of a Kubernetes quantity such as `8Gi`, `512Mi`, `2G` or `1073741824`.
pub fn quantity_bytes(quantity: &str) -> Result<u64, InvalidSpec> {
    let q = quantity.trim();
    let digits = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(q.len());
    let (number, suffix) = q.split_at(digits);
    let number: f64 = number
        .parse()
        .map_err(|_| InvalidSpec(format!("'{quantity}' is not a quantity like 8Gi or 512Mi")))?;
    let scale: f64 = match suffix {
        "" => 1.0,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        _ => {
            return Err(InvalidSpec(format!(
                "'{quantity}': unknown unit '{suffix}'; use Ki, Mi, Gi, Ti, k, M, G or T"
            )));
        }
    };
    let bytes = number * scale;
    if !(bytes.is_finite() && bytes >= 1.0) {
        return Err(InvalidSpec(format!("'{quantity}' is not a positive size")));
    }
    Ok(bytes as u64)
}

/// Names of the objects one DataLink owns.
pub fn server_name(link: &DataLink) -> String {
    format!(
        "{}-handoff",
        link.metadata.name.as_deref().unwrap_or("datalink")
    )
}

pub fn secret_name(link: &DataLink) -> String {
    format!("{}-tokens", server_name(link))
}

/// Whether the spec asks for a TLS server (the default). A running server keeps what it was
/// started with: see [`RunningServer::tls`].
pub fn tls_enabled(link: &DataLink) -> bool {
    link.spec.server.tls.unwrap_or(true)
}

/// The server as it runs: a Deployment (one replica) or a StatefulSet (several).
#[derive(Clone, Debug)]
pub enum RunningServer {
    Deployment(Deployment),
    StatefulSet(StatefulSet),
}

impl RunningServer {
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Deployment(_) => "Deployment",
            Self::StatefulSet(_) => "StatefulSet",
        }
    }

    pub fn annotations(&self) -> &BTreeMap<String, String> {
        match self {
            Self::Deployment(d) => kube::ResourceExt::annotations(d),
            Self::StatefulSet(s) => kube::ResourceExt::annotations(s),
        }
    }

    fn container(&self) -> Option<&Container> {
        let template = match self {
            Self::Deployment(d) => &d.spec.as_ref()?.template,
            Self::StatefulSet(s) => &s.spec.as_ref()?.template,
        };
        template.spec.as_ref()?.containers.first()
    }

    /// Whether it serves TLS, from its args.
    pub fn tls(&self) -> bool {
        self.container()
            .and_then(|c| c.args.as_ref())
            .is_some_and(|args| args.iter().any(|a| a == "--tls-cert"))
    }

    /// The image it runs.
    pub fn image(&self) -> Option<String> {
        self.container().and_then(|c| c.image.clone())
    }

    /// Replicas it asks for.
    pub fn replicas(&self) -> i32 {
        match self {
            Self::Deployment(d) => d.spec.as_ref().and_then(|s| s.replicas),
            Self::StatefulSet(s) => s.spec.as_ref().and_then(|s| s.replicas),
        }
        .unwrap_or(1)
    }

    /// Replicas serving: a Deployment's available ones, a StatefulSet's ready ones.
    pub fn ready(&self) -> i32 {
        match self {
            Self::Deployment(d) => d.status.as_ref().and_then(|s| s.available_replicas),
            Self::StatefulSet(s) => s.status.as_ref().and_then(|s| s.ready_replicas),
        }
        .unwrap_or(0)
    }
}

/// Hash of what the DataLink says about its server: the spec's `server` and memory policy, and
/// the link's uid. The Deployment is applied again only when this changes, never because the
/// controller's own code (its default image, a new flag) changed: that would restart a running
/// server, and a restarted server starts empty.
pub fn server_inputs(link: &DataLink) -> String {
    let inputs = serde_json::json!([
        link.spec.server,
        link.spec.policy.memory_policy,
        link.metadata.uid
    ]);
    text_hash(&inputs.to_string())
}

/// The image a link's server runs: the spec's, else the one pinned in its status when it was
/// provisioned, else the one an older controller gave its running Deployment, else `default`.
pub fn pinned_image(link: &DataLink, running: Option<&RunningServer>, default: &str) -> String {
    link.spec
        .server
        .image
        .clone()
        .or_else(|| link.status.as_ref().and_then(|s| s.server_image.clone()))
        .or_else(|| running.and_then(RunningServer::image))
        .unwrap_or_else(|| default.to_string())
}

/// The object storage the link's server spills to and snapshots to: its own prefix below
/// `spec.server.spillUrl`, so links that share a bucket never restore each other's snapshots,
/// and a DataLink made again under the same name starts empty.
pub fn link_storage_url(link: &DataLink) -> Option<String> {
    let base = link.spec.server.spill_url.as_deref()?;
    let namespace = link.metadata.namespace.as_deref().unwrap_or("default");
    let name = link.metadata.name.as_deref().unwrap_or("datalink");
    Some(match link.metadata.uid.as_deref() {
        Some(uid) => format!("{}/{namespace}/{name}-{uid}", base.trim_end_matches('/')),
        None => format!("{}/{namespace}/{name}", base.trim_end_matches('/')),
    })
}

/// The Service's DNS name, which the server's certificate names and clients verify.
pub fn server_host(link: &DataLink) -> String {
    let namespace = link.metadata.namespace.as_deref().unwrap_or("default");
    format!("{}.{namespace}.svc", server_name(link))
}

/// Every name a client in the cluster may reach the server by; with replicas, each replica's
/// name below the headless Service too (a wildcard, so any number of replicas share one
/// certificate).
pub fn server_dns_names(link: &DataLink) -> Vec<String> {
    let namespace = link.metadata.namespace.as_deref().unwrap_or("default");
    let name = server_name(link);
    let peers = format!("{}.{namespace}.svc", peers_service_name(link));
    vec![
        server_host(link),
        format!("{}.cluster.local", server_host(link)),
        format!("{name}.{namespace}"),
        name,
        format!("*.{peers}"),
        format!("*.{peers}.cluster.local"),
    ]
}

/// The headless Service that gives each replica of a StatefulSet server its DNS name.
pub fn peers_service_name(link: &DataLink) -> String {
    format!("{}-peers", server_name(link))
}

/// The replicas the spec asks for, checked: 1 runs a Deployment, more a StatefulSet.
pub fn replicas(link: &DataLink) -> Result<i32, InvalidSpec> {
    match link.spec.server.replicas.unwrap_or(1) {
        n @ 1..=MAX_REPLICAS => Ok(n),
        // The CRD's schema says so too; this is for API servers that do not enforce it.
        n => Err(InvalidSpec(format!(
            "spec.server.replicas is {n}; give 1 to {MAX_REPLICAS}"
        ))),
    }
}

/// Whether the spec asks for several replicas (a StatefulSet server).
pub fn replicated(link: &DataLink) -> bool {
    link.spec.server.replicas.unwrap_or(1) > 1
}

/// Each replica's Flight endpoint, in index order: StatefulSet pod `<server>-<i>` by its name
/// under the headless Service.
pub fn replica_endpoints(link: &DataLink, replicas: i32, tls: bool) -> Vec<String> {
    let namespace = link.metadata.namespace.as_deref().unwrap_or("default");
    let (name, peers) = (server_name(link), peers_service_name(link));
    (0..replicas)
        .map(|i| flight_url(&format!("{name}-{i}.{peers}.{namespace}.svc"), tls))
        .collect()
}

/// The Flight endpoint producers and consumers are given.
pub fn endpoint(link: &DataLink, tls: bool) -> String {
    flight_url(&server_host(link), tls)
}

fn flight_url(host: &str, tls: bool) -> String {
    let scheme = if tls { "grpc+tls" } else { "grpc" };
    format!("{scheme}://{host}:{GRPC_PORT}")
}

/// The endpoint the controller dials: the Service's ClusterIP when it has one (headless
/// Services have `None`), so the controller works without cluster DNS; else [`endpoint`]. TLS
/// verifies [`server_host`] either way.
pub fn dial_endpoint(link: &DataLink, tls: bool, cluster_ip: Option<&str>) -> String {
    match cluster_ip.filter(|ip| !ip.is_empty() && *ip != "None") {
        Some(ip) if ip.contains(':') => flight_url(&format!("[{ip}]"), tls),
        Some(ip) => flight_url(ip, tls),
        None => endpoint(link, tls),
    }
}

pub fn labels(link: &DataLink) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "handoff".to_string()),
        ("app.kubernetes.io/instance".to_string(), server_name(link)),
        (
            "app.kubernetes.io/managed-by".to_string(),
            "handoff-controller".to_string(),
        ),
    ])
}

fn owned_meta(link: &DataLink, name: String) -> ObjectMeta {
    let owner: Option<OwnerReference> = link.controller_owner_ref(&());
    ObjectMeta {
        name: Some(name),
        namespace: link.metadata.namespace.clone(),
        labels: Some(labels(link)),
        owner_references: owner.map(|o| vec![o]),
        ..Default::default()
    }
}

/// The certificates' keys of the link's Secret, for a Secret or a patch to one.
pub fn certificate_data(certs: &LinkCertificates) -> BTreeMap<String, ByteString> {
    BTreeMap::from([
        (
            pki::CA_CERT_KEY.to_string(),
            ByteString(certs.ca_pem.as_bytes().to_vec()),
        ),
        (
            pki::TLS_CERT_KEY.to_string(),
            ByteString(certs.cert_pem.as_bytes().to_vec()),
        ),
        (
            pki::TLS_KEY_KEY.to_string(),
            ByteString(certs.key_pem.as_bytes().to_vec()),
        ),
    ])
}

/// The tokens of the link's server, and its certificates when TLS is on. Created once; later
/// reconciles keep them.
pub fn token_secret(
    link: &DataLink,
    tokens: &Tokens,
    certs: Option<&LinkCertificates>,
) -> k8s_openapi::api::core::v1::Secret {
    let Tokens {
        admin: admin_token,
        writer: writer_token,
        reader: reader_token,
        ca_pem: _,
    } = tokens;
    let mut data = BTreeMap::from([
        (
            ADMIN_TOKEN_KEY.to_string(),
            ByteString(admin_token.as_bytes().to_vec()),
        ),
        (
            WRITER_TOKEN_KEY.to_string(),
            ByteString(writer_token.as_bytes().to_vec()),
        ),
        (
            READER_TOKEN_KEY.to_string(),
            ByteString(reader_token.as_bytes().to_vec()),
        ),
    ]);
    if let Some(certs) = certs {
        data.extend(certificate_data(certs));
    }
    k8s_openapi::api::core::v1::Secret {
        metadata: owned_meta(link, secret_name(link)),
        data: Some(data),
        type_: Some("Opaque".into()),
        ..Default::default()
    }
}

/// A link server's three tokens: the controller's (admin), the producer's and the consumer's;
/// and, when the server speaks TLS, the CA its certificate chains to.
#[derive(Clone, PartialEq, Eq)]
pub struct Tokens {
    pub admin: String,
    pub writer: String,
    pub reader: String,
    pub ca_pem: Option<String>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tokens(..)")
    }
}

impl Tokens {
    /// Fresh random tokens, 32 hex digits each.
    pub fn generate() -> Result<Self, getrandom::Error> {
        let token = || -> Result<String, getrandom::Error> {
            let mut bytes = [0u8; 16];
            getrandom::fill(&mut bytes)?;
            Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
        };
        Ok(Self {
            admin: token()?,
            writer: token()?,
            reader: token()?,
            ca_pem: None,
        })
    }

    /// The tokens held in the link's Secret, or what is missing from it.
    pub fn from_secret(secret: &k8s_openapi::api::core::v1::Secret) -> Result<Self, String> {
        let data = secret.data.as_ref();
        let key = |k: &str| -> Result<String, String> {
            data.and_then(|d| d.get(k))
                .and_then(|v| String::from_utf8(v.0.clone()).ok())
                .filter(|v| !v.is_empty())
                .ok_or_else(|| format!("key {k} is missing or empty"))
        };
        Ok(Self {
            admin: key(ADMIN_TOKEN_KEY)?,
            writer: key(WRITER_TOKEN_KEY)?,
            reader: key(READER_TOKEN_KEY)?,
            ca_pem: key(pki::CA_CERT_KEY).ok(),
        })
    }
}

fn secret_env(name: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.into(),
                key: key.into(),
                optional: Some(false),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn http_probe(path: &str, period: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(HTTP_PORT),
            ..Default::default()
        }),
        period_seconds: Some(period),
        ..Default::default()
    }
}

/// The server's pod template: `handoff serve` for this link, running `image`, with TLS when
/// `tls`: memory limit derived from the budget, probes on /readyz and /healthz, non-root with a
/// read-only root filesystem. Spill goes to an emptyDir unless the spec names object storage;
/// then the server also snapshots the link when it is sealed and restores it on start, before
/// it reports ready. With `replicas` > 1, every pod is one replica: it finds its index and its
/// own storage prefix from its name.
fn server_pod(
    link: &DataLink,
    image: &str,
    tls: bool,
    replicas: i32,
) -> Result<PodTemplateSpec, InvalidSpec> {
    let server = &link.spec.server;
    let budget = quantity_bytes(server.memory.as_deref().unwrap_or(DEFAULT_MEMORY))?;
    let pod_limit = budget + budget / 10 + BASE_OVERHEAD_BYTES;
    let cpu = server.cpu.clone().unwrap_or_else(|| DEFAULT_CPU.into());
    quantity_cpu_ok(&cpu)?;
    let durable = link_storage_url(link).map(|url| {
        if replicas > 1 {
            // Each replica snapshots and restores its own part (Kubernetes expands the
            // variable from the pod's env).
            format!("{url}/$({POD_NAME_ENV})")
        } else {
            url
        }
    });
    let spill_url = durable
        .clone()
        .unwrap_or_else(|| format!("file://{SPILL_DIR}"));
    let policy = match link.spec.policy.memory_policy {
        MemoryPolicy::Reject => "reject",
        MemoryPolicy::Wait => "wait",
        MemoryPolicy::Spill => "spill",
    };
    let secret = secret_name(link);
    let mut args = vec![
        "serve".to_string(),
        "--listen".into(),
        format!("0.0.0.0:{GRPC_PORT}"),
        "--http-listen".into(),
        format!("0.0.0.0:{HTTP_PORT}"),
        "--memory-limit".into(),
        budget.to_string(),
        "--memory-policy".into(),
        policy.into(),
        "--spill-url".into(),
        spill_url,
    ];
    if let Some(url) = durable {
        args.extend(["--snapshot-on-seal".into(), "--restore-from".into(), url]);
    }
    if tls {
        // The Secret is mounted at /etc/handoff (below).
        args.extend([
            "--tls-cert".into(),
            format!("/etc/handoff/{}", pki::TLS_CERT_KEY),
            "--tls-key".into(),
            format!("/etc/handoff/{}", pki::TLS_KEY_KEY),
        ]);
    }
    let mut env = vec![
        secret_env("HANDOFF_TOKEN", &secret, ADMIN_TOKEN_KEY),
        secret_env("HANDOFF_WRITER_TOKEN", &secret, WRITER_TOKEN_KEY),
        secret_env("HANDOFF_READER_TOKEN", &secret, READER_TOKEN_KEY),
        EnvVar {
            name: "RUST_LOG".into(),
            value: Some("info".into()),
            ..Default::default()
        },
    ];
    if replicas > 1 {
        args.extend([
            "--peers".into(),
            replica_endpoints(link, replicas, tls).join(","),
            "--replica-index".into(),
            format!("$({POD_NAME_ENV})"),
        ]);
        if tls {
            // Replicas verify each other against the link's own CA, as its clients do.
            args.extend([
                "--peer-ca".into(),
                format!("/etc/handoff/{}", pki::CA_CERT_KEY),
            ]);
        }
        // Env vars a later one expands must come first.
        env.insert(
            0,
            EnvVar {
                name: POD_NAME_ENV.into(),
                value_from: Some(EnvVarSource {
                    field_ref: Some(ObjectFieldSelector {
                        field_path: "metadata.name".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            },
        );
    }
    let resources = ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("memory".to_string(), Quantity(pod_limit.to_string())),
            ("cpu".to_string(), Quantity(cpu)),
        ])),
        limits: Some(BTreeMap::from([(
            "memory".to_string(),
            Quantity(pod_limit.to_string()),
        )])),
        ..Default::default()
    };
    let mut volumes = vec![Volume {
        name: "spill".into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Default::default()
    }];
    let mut mounts = vec![VolumeMount {
        name: "spill".into(),
        mount_path: SPILL_DIR.into(),
        ..Default::default()
    }];
    let env_from = server.spill_credentials_secret.as_ref().map(|name| {
        vec![EnvFromSource {
            secret_ref: Some(SecretEnvSource {
                name: name.clone(),
                optional: Some(false),
            }),
            ..Default::default()
        }]
    });
    // The certificate and key as files for --tls-cert and --tls-key; the tokens too, for operators
    // who exec into the pod to inspect the link.
    volumes.push(Volume {
        name: "tokens".into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret.clone()),
            ..Default::default()
        }),
        ..Default::default()
    });
    mounts.push(VolumeMount {
        name: "tokens".into(),
        mount_path: "/etc/handoff".into(),
        read_only: Some(true),
        ..Default::default()
    });
    let container = Container {
        name: "handoff".into(),
        image: Some(image.into()),
        args: Some(args),
        env: Some(env),
        env_from,
        ports: Some(vec![
            ContainerPort {
                name: Some("grpc".into()),
                container_port: GRPC_PORT,
                protocol: Some("TCP".into()),
                ..Default::default()
            },
            ContainerPort {
                name: Some("http".into()),
                container_port: HTTP_PORT,
                protocol: Some("TCP".into()),
                ..Default::default()
            },
        ]),
        readiness_probe: Some(http_probe("/readyz", 5)),
        liveness_probe: Some(http_probe("/healthz", 10)),
        resources: Some(resources),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            ..Default::default()
        }),
        volume_mounts: Some(mounts),
        ..Default::default()
    };
    Ok(PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels(link)),
            ..Default::default()
        }),
        spec: Some(PodSpec {
            containers: vec![container],
            volumes: Some(volumes),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(65532),
                run_as_group: Some(65532),
                ..Default::default()
            }),
            // SIGTERM drains in-flight reads and writes first (serve --drain-timeout).
            termination_grace_period_seconds: Some(45),
            automount_service_account_token: Some(false),
            ..Default::default()
        }),
    })
}

/// The server's object metadata: owned by the link, with the spec inputs it was made from.
fn server_meta(link: &DataLink) -> ObjectMeta {
    let mut metadata = owned_meta(link, server_name(link));
    metadata.annotations = Some(BTreeMap::from([(
        SERVER_INPUTS.to_string(),
        server_inputs(link),
    )]));
    metadata
}

/// The server of a one-replica link: a Deployment of [`server_pod`], replaced by Recreate (two
/// servers at once would split the link).
pub fn server_deployment(
    link: &DataLink,
    image: &str,
    tls: bool,
) -> Result<Deployment, InvalidSpec> {
    let replicas = replicas(link)?;
    if replicas != 1 {
        return Err(InvalidSpec(format!(
            "spec.server.replicas is {replicas}: that server is a StatefulSet, not a Deployment"
        )));
    }
    Ok(Deployment {
        metadata: server_meta(link),
        spec: Some(DeploymentSpec {
            replicas: Some(1),
            // Never two servers at once: the old one is gone before the new one starts.
            strategy: Some(DeploymentStrategy {
                type_: Some("Recreate".into()),
                ..Default::default()
            }),
            selector: LabelSelector {
                match_labels: Some(labels(link)),
                ..Default::default()
            },
            template: server_pod(link, image, tls, 1)?,
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// The server of a link over several replicas: a StatefulSet of [`server_pod`], so each
/// replica keeps its name (and its place in the placement) across restarts, under the headless
/// Service [`peers_service`]. Its pods start in parallel: replica 0 plans, but every replica
/// must be up before any write.
pub fn server_statefulset(
    link: &DataLink,
    image: &str,
    tls: bool,
) -> Result<StatefulSet, InvalidSpec> {
    let replicas = replicas(link)?;
    Ok(StatefulSet {
        metadata: server_meta(link),
        spec: Some(StatefulSetSpec {
            replicas: Some(replicas),
            service_name: Some(peers_service_name(link)),
            pod_management_policy: Some("Parallel".into()),
            selector: LabelSelector {
                match_labels: Some(labels(link)),
                ..Default::default()
            },
            template: server_pod(link, image, tls, replicas)?,
            ..Default::default()
        }),
        ..Default::default()
    })
}

fn quantity_cpu_ok(cpu: &str) -> Result<(), InvalidSpec> {
    let number = cpu.strip_suffix('m').unwrap_or(cpu);
    match number.parse::<f64>() {
        Ok(v) if v > 0.0 => Ok(()),
        _ => Err(InvalidSpec(format!(
            "spec.server.cpu '{cpu}' is not a CPU quantity like 2 or 500m"
        ))),
    }
}

fn service_port(name: &str, port: i32) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        port,
        target_port: Some(IntOrString::Int(port)),
        // Server-side apply needs the whole list-map key; older servers do not default it.
        protocol: Some("TCP".into()),
        ..Default::default()
    }
}

/// The Service in front of the server: Flight on 8815, health and metrics on 8816. Over
/// replicas it is replica 0 alone, the planner, which every client starts from; the
/// `topology` action names the others.
pub fn server_service(link: &DataLink) -> Service {
    let mut selector = labels(link);
    if replicated(link) {
        selector.insert(POD_NAME_LABEL.into(), format!("{}-0", server_name(link)));
    }
    Service {
        metadata: owned_meta(link, server_name(link)),
        spec: Some(ServiceSpec {
            selector: Some(selector),
            ports: Some(vec![
                service_port("grpc", GRPC_PORT),
                service_port("http", HTTP_PORT),
            ]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The headless Service of a StatefulSet server: a DNS name per replica, published before the
/// replica is ready, since replicas must reach each other to become so.
pub fn peers_service(link: &DataLink) -> Service {
    Service {
        metadata: owned_meta(link, peers_service_name(link)),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(labels(link)),
            ports: Some(vec![service_port("grpc", GRPC_PORT)]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Only the producer's pods, the consumer's pods and the controller may reach the link's server.
pub fn server_network_policy(
    link: &DataLink,
    consumer: &ConsumerRef<'_>,
) -> k8s_openapi::api::networking::v1::NetworkPolicy {
    use k8s_openapi::api::networking::v1::{
        NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
        NetworkPolicySpec,
    };
    let pods = |key: &str, value: &str| NetworkPolicyPeer {
        pod_selector: Some(LabelSelector {
            match_labels: Some(BTreeMap::from([(key.to_string(), value.to_string())])),
            ..Default::default()
        }),
        ..Default::default()
    };
    let consumer_peer = match consumer {
        // Labels the training operators put on their pods.
        ConsumerRef::PyTorchJob(name) => pods("training.kubeflow.org/job-name", name),
        ConsumerRef::TrainJob(name) => pods("jobset.sigs.k8s.io/jobset-name", name),
    };
    let controller_peer = NetworkPolicyPeer {
        // The controller runs in its own namespace; any namespace, but only its pods.
        namespace_selector: Some(LabelSelector::default()),
        ..pods("app.kubernetes.io/name", "handoff-controller")
    };
    let port = |port: i32| NetworkPolicyPort {
        port: Some(IntOrString::Int(port)),
        protocol: Some("TCP".into()),
        ..Default::default()
    };
    let mut grpc_from = vec![
        pods(
            "sparkoperator.k8s.io/app-name",
            &link.spec.producer.spark_application,
        ),
        consumer_peer,
        controller_peer.clone(),
    ];
    if replicated(link) {
        // Replicas call each other: the planner applies commits and plans reads on the others.
        grpc_from.push(pods("app.kubernetes.io/instance", &server_name(link)));
    }
    NetworkPolicy {
        metadata: owned_meta(link, server_name(link)),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(labels(link)),
                ..Default::default()
            }),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(vec![
                NetworkPolicyIngressRule {
                    from: Some(grpc_from),
                    ports: Some(vec![port(GRPC_PORT)]),
                },
                // Probes come from the kubelet, which policies do not cover; metrics from the
                // controller's namespace only.
                NetworkPolicyIngressRule {
                    from: Some(vec![controller_peer]),
                    ports: Some(vec![port(HTTP_PORT)]),
                },
            ]),
            ..Default::default()
        }),
    }
}

/// `object` with the hash of its content in the `applied-hash` annotation. Comparing the stored
/// annotation with a fresh hash tells whether a server-side apply would change anything, without
/// issuing it.
pub fn with_applied_hash<T: serde::Serialize + Resource>(
    mut object: T,
) -> Result<(T, String), serde_json::Error> {
    let hash = text_hash(&serde_json::to_string(&object)?);
    object
        .meta_mut()
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(APPLIED_HASH.to_string(), hash.clone());
    Ok((object, hash))
}

/// The first 16 hex digits of the text's SHA-256: stable across builds and Rust versions (std's
/// DefaultHasher is not), since a changed hash means a write, and for the server a restart.
fn text_hash(text: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(text.as_bytes())
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}
