//! The objects a DataLink owns: the tokens Secret, the server Deployment and its Service.
//! Pure builders, so what the controller applies can be checked without a cluster.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvFromSource, EnvVar,
    EnvVarSource, HTTPGetAction, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    ResourceRequirements, SecretEnvSource, SecretKeySelector, SecretVolumeSource, SecurityContext,
    Service, ServicePort, ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;

use crate::crd::{DataLink, MemoryPolicy};

pub const GRPC_PORT: i32 = 8815;
pub const HTTP_PORT: i32 = 8816;
pub const WRITER_TOKEN_KEY: &str = "writer-token";
pub const READER_TOKEN_KEY: &str = "reader-token";
const DEFAULT_MEMORY: &str = "4Gi";
const DEFAULT_CPU: &str = "1";
/// The pod's memory limit over the Arrow budget: 10% plus a fixed base, the bound our /proc
/// measurements hold the server to (docs/benchmarks.md), with room for the HTTP side.
const BASE_OVERHEAD_BYTES: u64 = 256 << 20;
const SPILL_DIR: &str = "/var/lib/handoff";

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

/// The Flight endpoint producers and consumers are given.
pub fn endpoint(link: &DataLink) -> String {
    let namespace = link.metadata.namespace.as_deref().unwrap_or("default");
    format!("grpc://{}.{namespace}.svc:{GRPC_PORT}", server_name(link))
}

fn labels(link: &DataLink) -> BTreeMap<String, String> {
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

/// The writer and reader tokens of the link's server. Created once; later reconciles keep them.
pub fn token_secret(
    link: &DataLink,
    writer_token: &str,
    reader_token: &str,
) -> k8s_openapi::api::core::v1::Secret {
    k8s_openapi::api::core::v1::Secret {
        metadata: owned_meta(link, secret_name(link)),
        data: Some(BTreeMap::from([
            (
                WRITER_TOKEN_KEY.to_string(),
                ByteString(writer_token.as_bytes().to_vec()),
            ),
            (
                READER_TOKEN_KEY.to_string(),
                ByteString(reader_token.as_bytes().to_vec()),
            ),
        ])),
        type_: Some("Opaque".into()),
        ..Default::default()
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

/// `handoff serve` for this link: memory limit derived from the budget, probes on /readyz and
/// /healthz, non-root with a read-only root filesystem; spill goes to an emptyDir unless the spec
/// names object storage.
pub fn server_deployment(link: &DataLink, default_image: &str) -> Result<Deployment, InvalidSpec> {
    let server = &link.spec.server;
    let budget = quantity_bytes(server.memory.as_deref().unwrap_or(DEFAULT_MEMORY))?;
    let pod_limit = budget + budget / 10 + BASE_OVERHEAD_BYTES;
    let cpu = server.cpu.clone().unwrap_or_else(|| DEFAULT_CPU.into());
    quantity_cpu_ok(&cpu)?;
    let replicas = server.replicas.unwrap_or(1);
    if replicas < 1 {
        return Err(InvalidSpec(
            "spec.server.replicas must be at least 1".into(),
        ));
    }
    let spill_url = server
        .spill_url
        .clone()
        .unwrap_or_else(|| format!("file://{SPILL_DIR}"));
    let policy = match link.spec.policy.memory_policy {
        MemoryPolicy::Reject => "reject",
        MemoryPolicy::Wait => "wait",
        MemoryPolicy::Spill => "spill",
    };
    let secret = secret_name(link);
    let args = vec![
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
    // The tokens also as files, for operators who exec into the pod to inspect the link.
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
        image: Some(server.image.clone().unwrap_or_else(|| default_image.into())),
        args: Some(args),
        env: Some(vec![
            secret_env("HANDOFF_WRITER_TOKEN", &secret, WRITER_TOKEN_KEY),
            secret_env("HANDOFF_READER_TOKEN", &secret, READER_TOKEN_KEY),
            EnvVar {
                name: "RUST_LOG".into(),
                value: Some("info".into()),
                ..Default::default()
            },
        ]),
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
    let labels = labels(link);
    Ok(Deployment {
        metadata: owned_meta(link, server_name(link)),
        spec: Some(DeploymentSpec {
            replicas: Some(replicas),
            selector: LabelSelector {
                match_labels: Some(labels.clone()),
                ..Default::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
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
            },
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

/// The Service in front of the server's pods: Flight on 8815, health and metrics on 8816.
pub fn server_service(link: &DataLink) -> Service {
    let port = |name: &str, port: i32| ServicePort {
        name: Some(name.into()),
        port,
        target_port: Some(IntOrString::Int(port)),
        // Server-side apply needs the whole list-map key; older servers do not default it.
        protocol: Some("TCP".into()),
        ..Default::default()
    };
    Service {
        metadata: owned_meta(link, server_name(link)),
        spec: Some(ServiceSpec {
            selector: Some(labels(link)),
            ports: Some(vec![port("grpc", GRPC_PORT), port("http", HTTP_PORT)]),
            ..Default::default()
        }),
        ..Default::default()
    }
}
