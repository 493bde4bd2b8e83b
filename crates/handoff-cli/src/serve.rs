//! `handoff serve`: flags, their conversion into the library config, and signal handling.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use handoff_server::{AuthConfig, ServerConfig};
use handoff_store::{MemoryPolicy, ObjectStorage, Store, StoreConfig};

use crate::size::parse_size;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address for Arrow Flight (gRPC). Port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:8815")]
    pub listen: SocketAddr,
    /// Address for /healthz, /readyz and /metrics.
    #[arg(long, default_value = "127.0.0.1:8816")]
    pub http_listen: SocketAddr,
    /// Admin token: may do everything. Clients send it as `authorization: Bearer <token>`.
    #[arg(long, env = "HANDOFF_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Token that may write, commit and seal any link, but not read it.
    #[arg(long, env = "HANDOFF_WRITER_TOKEN", hide_env_values = true)]
    pub writer_token: Option<String>,
    /// Token that may read any link, but not write it.
    #[arg(long, env = "HANDOFF_READER_TOKEN", hide_env_values = true)]
    pub reader_token: Option<String>,
    /// Serve without any authentication. Only for local experiments. Tokens given as well (for
    /// example a HANDOFF_TOKEN meant for clients) are ignored, with a warning.
    #[arg(long)]
    pub no_auth: bool,
    /// Bytes of Arrow data the server may hold in memory, staged and committed, e.g. 8GiB.
    /// What a write beyond it does is --memory-policy. Default: no limit.
    #[arg(long, value_parser = parse_size)]
    pub memory_limit: Option<u64>,
    /// What a write does when it would go over a memory limit, for links that do not choose:
    /// `reject` fails it with RESOURCE_EXHAUSTED at once; `wait` stalls the writer until memory
    /// is freed (links deleted), up to --memory-wait-timeout; `spill` moves finished partitions,
    /// least recently used first, to --spill-url and reads stream them back.
    #[arg(long, value_enum, default_value = "reject")]
    pub memory_policy: PolicyArg,
    /// Seconds a `wait` write waits for memory before it fails.
    #[arg(long, default_value_t = 60)]
    pub memory_wait_timeout: u64,
    /// Object storage for spilled partitions and snapshots: file:///path, s3://bucket/prefix (credentials, endpoint
    /// and allow-http from the AWS_* variables), gs://..., az://... Default: a directory under
    /// the system's temporary directory.
    #[arg(long)]
    pub spill_url: Option<String>,
    /// Snapshot every link to --spill-url when it is sealed, so a restarted server loses nothing.
    #[arg(long)]
    pub snapshot_on_seal: bool,
    /// Before serving, load every snapshot found at this URL as a sealed link.
    #[arg(long)]
    pub restore_from: Option<String>,
    /// Largest gRPC message accepted; clients must accept as large (handoff's do).
    #[arg(long, default_value = "256MiB", value_parser = parse_size)]
    pub max_message_size: u64,
    /// Drop a link that is open and nobody wrote to for this many seconds (0: never).
    #[arg(long, default_value_t = 0)]
    pub idle_timeout: u64,
    /// Seconds that SIGTERM waits for in-flight calls before closing them.
    #[arg(long, default_value_t = 30)]
    pub drain_timeout: u64,
    /// Let `import` read Parquet under this URL prefix (repeat for more), with the server's own
    /// credentials: e.g. s3://bucket/warehouse/. Without it, import is off. Local files need a
    /// file:// prefix named here.
    #[arg(long = "import-allow", value_name = "URL_PREFIX")]
    pub import_allow: Vec<String>,
    /// Open connections each port accepts; further ones are closed at once, with a warning.
    #[arg(long, default_value_t = handoff_server::DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// The most one shuffled epoch holds decoded at once, e.g. 1GiB. Links that weigh less (their
    /// bytes plus 4 bytes a row) get a full shuffle; larger ones are shuffled in windows of this
    /// size: rows mix fully inside a window, and frames in random order across windows.
    /// Default: a quarter of --memory-limit, or no windows without a limit.
    #[arg(long, value_parser = parse_size)]
    pub shuffle_window: Option<u64>,
    /// Seconds a read waits for memory (for a shuffle window, a fetched spilled frame or a
    /// batch it builds) before it fails with RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 30)]
    pub read_memory_wait: u64,
    /// Serve Flight over TLS with this PEM certificate (chain); clients then connect to
    /// grpc+tls://. Needs --tls-key.
    #[arg(long, env = "HANDOFF_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, env = "HANDOFF_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Mutual TLS: accept only clients whose certificate chains to this PEM CA.
    #[arg(long, requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Serve links together with other replicas: every replica's Flight endpoint, in index
    /// order, this one's included (grpc://HOST:PORT,...; grpc+tls:// when the replicas serve
    /// TLS). Each partition lives on one replica, chosen by a hash of (link, partition);
    /// replica 0 plans: commits, seals and stats go there. Every replica gets the same list.
    /// Needs --token: replicas call each other with it.
    #[arg(long, value_delimiter = ',', value_name = "ENDPOINTS")]
    pub peers: Vec<String>,
    /// This server's place in --peers, from 0: a number, or a StatefulSet pod name such as
    /// `features-handoff-2`, whose ordinal it is.
    #[arg(long, requires = "peers", default_value = "0", value_parser = parse_replica_index)]
    pub replica_index: u32,
    /// The PEM CA that grpc+tls:// --peers' certificates chain to. Default: the system's roots.
    #[arg(long, requires = "peers")]
    pub peer_ca: Option<PathBuf>,
    /// Send DoGet through tonic's regular encoder instead of the zero-copy path.
    #[arg(long, hide = true)]
    pub copying_get: bool,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum PolicyArg {
    Reject,
    Wait,
    Spill,
}

pub struct ServeConfig {
    pub server: ServerConfig,
    pub store: StoreConfig,
    /// Files that `run` reads into `server.tls` (the conversion does no I/O).
    pub tls_files: Option<TlsFiles>,
    /// The file that `run` reads as the replicas' CA (`--peer-ca`).
    pub peer_ca: Option<PathBuf>,
}

/// `--replica-index`: `2`, or the name of the StatefulSet pod `features-handoff-2`, which a
/// pod's args get from its own name, so one template serves every replica.
fn parse_replica_index(value: &str) -> Result<u32, String> {
    let ordinal = value.rsplit_once('-').map_or(value, |(_, ordinal)| ordinal);
    ordinal.parse().map_err(|_| {
        format!(
            "'{value}' is neither a replica index (0, 1, ...) nor a StatefulSet pod name ending \
             in one (features-handoff-2)"
        )
    })
}

pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    pub fn read(&self) -> Result<handoff_server::TlsConfig, String> {
        let read = |flag: &str, path: &PathBuf| {
            std::fs::read(path).map_err(|e| format!("cannot read {flag} {}: {e}", path.display()))
        };
        Ok(handoff_server::TlsConfig {
            cert_pem: read("--tls-cert", &self.cert)?,
            key_pem: read("--tls-key", &self.key)?,
            client_ca_pem: self
                .client_ca
                .as_ref()
                .map(|ca| read("--tls-client-ca", ca))
                .transpose()?,
        })
    }
}

impl TryFrom<&ServeArgs> for ServeConfig {
    type Error = String;

    fn try_from(args: &ServeArgs) -> Result<Self, String> {
        let auth = if args.no_auth {
            if args.token.is_some() || args.writer_token.is_some() || args.reader_token.is_some() {
                tracing::warn!("--no-auth: ignoring the tokens given by flags or HANDOFF_*TOKEN");
            }
            AuthConfig::disabled()
        } else {
            let one = |t: &Option<String>| {
                t.iter()
                    .filter(|t| !t.is_empty())
                    .cloned()
                    .collect::<Vec<_>>()
            };
            let auth = AuthConfig {
                disabled: false,
                admin_tokens: one(&args.token),
                writer_tokens: one(&args.writer_token),
                reader_tokens: one(&args.reader_token),
            };
            if !auth.is_configured() {
                return Err("no token given: pass --token <T> (or set HANDOFF_TOKEN), or --no-auth to serve without authentication".into());
            }
            auth
        };
        let max_message_bytes = usize::try_from(args.max_message_size)
            .map_err(|_| "max message size too large".to_string())?;
        if max_message_bytes < 1 << 20 {
            return Err("--max-message-size below 1MiB would refuse ordinary batches".into());
        }
        let spill_url = match &args.spill_url {
            Some(url) => url.clone(),
            None => {
                let dir = std::env::temp_dir().join("handoff");
                format!("file://{}", dir.display())
            }
        };
        if args.shuffle_window == Some(0) {
            return Err("--shuffle-window 0 would hold no rows; give a size such as 1GiB".into());
        }
        let tls_files = match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: args.tls_client_ca.clone(),
            }),
            (None, None) => None,
            _ => return Err("TLS needs both --tls-cert and --tls-key".into()),
        };
        let replicas = if args.peers.is_empty() {
            None
        } else {
            let token = auth.admin_tokens.first().cloned();
            if token.is_none() && !auth.disabled {
                return Err(
                    "--peers needs --token (replicas call each other with the admin \
                            token), or --no-auth"
                        .into(),
                );
            }
            let replicas =
                handoff_server::ReplicaConfig::new(args.peers.clone(), args.replica_index, token)?;
            // Replicas are alike: a TLS server's peers speak TLS too.
            if replicas.tls() != args.tls_cert.is_some() {
                return Err(if replicas.tls() {
                    "--peers are grpc+tls:// but this server has no --tls-cert; every replica \
                     serves as the others do"
                } else {
                    "this server serves TLS (--tls-cert), so --peers must be grpc+tls:// \
                     endpoints; every replica serves as the others do"
                }
                .into());
            }
            if args.tls_client_ca.is_some() {
                return Err(
                    "--peers with --tls-client-ca is not supported: replicas call each other \
                     with the admin token, not a client certificate; use tokens"
                        .into(),
                );
            }
            if args.peer_ca.is_some() && !replicas.tls() {
                return Err("--peer-ca is for grpc+tls:// --peers; these are plain text".into());
            }
            Some(replicas)
        };
        Ok(Self {
            tls_files,
            peer_ca: args.peer_ca.clone(),
            server: ServerConfig {
                replicas,
                auth,
                max_message_bytes,
                max_flight_data_size: handoff_proto::TARGET_FLIGHT_DATA_BYTES
                    .min(max_message_bytes / 2),
                zero_copy_get: !args.copying_get,
                drain_timeout: Duration::from_secs(args.drain_timeout),
                idle_timeout: (args.idle_timeout > 0)
                    .then(|| Duration::from_secs(args.idle_timeout)),
                max_connections: args.max_connections.max(1),
                import_allow: args.import_allow.clone(),
                h2_window: handoff_server::h2_window_for(args.memory_limit),
                ..ServerConfig::default()
            },
            store: StoreConfig {
                storage: Some(ObjectStorage::from_url(&spill_url).map_err(|e| e.to_string())?),
                snapshot_on_seal: args.snapshot_on_seal,
                memory_limit: args.memory_limit,
                default_policy: match args.memory_policy {
                    PolicyArg::Reject => MemoryPolicy::Reject,
                    PolicyArg::Wait => MemoryPolicy::Wait {
                        timeout: Duration::from_secs(args.memory_wait_timeout),
                    },
                    PolicyArg::Spill => MemoryPolicy::Spill,
                },
                shuffle_window: args.shuffle_window,
                read_memory_wait: Some(Duration::from_secs(args.read_memory_wait)),
            },
        })
    }
}

pub(crate) async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutdown signal received");
}

pub async fn run(args: ServeArgs) -> Result<(), String> {
    let mut config = ServeConfig::try_from(&args)?;
    if let Some(files) = &config.tls_files {
        config.server.tls = Some(files.read()?);
    }
    if let Some(path) = &config.peer_ca {
        let ca = std::fs::read(path)
            .map_err(|e| format!("cannot read --peer-ca {}: {e}", path.display()))?;
        config.server.replicas = config.server.replicas.map(|r| r.with_tls(Some(ca), None));
    }
    if let Some(storage) = &config.store.storage {
        storage.prepare().map_err(|e| e.to_string())?;
    }
    let grpc = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot bind --listen {}: {e}", args.listen))?;
    let http = tokio::net::TcpListener::bind(args.http_listen)
        .await
        .map_err(|e| format!("cannot bind --http-listen {}: {e}", args.http_listen))?;
    let grpc_addr = grpc.local_addr().map_err(|e| e.to_string())?;
    let http_addr = http.local_addr().map_err(|e| e.to_string())?;
    let store = Store::new(config.store);
    if let Some(url) = &args.restore_from {
        let storage = ObjectStorage::from_url(url).map_err(|e| e.to_string())?;
        let restored = store
            .restore_all(&storage)
            .await
            .map_err(|e| format!("restoring from {url} failed: {e}"))?;
        tracing::info!(url = %url, links = restored.links.len(), skipped = restored.skipped.len(), "restored snapshots");
        for what in &restored.skipped {
            // Said once more on stderr, plainly: this is data that did not come back.
            eprintln!("handoff: not restored: {what}");
        }
    }
    let tls = config.server.tls.is_some();
    tracing::info!(grpc = %grpc_addr, http = %http_addr, tls, auth = !config.server.auth.disabled, memory_limit = ?args.memory_limit, "serving");
    // Scripts and tests wait for this line, so it goes to stdout, once, after binding.
    println!("handoff listening grpc={grpc_addr} http={http_addr}");
    handoff_server::serve(
        Arc::clone(&store),
        config.server,
        grpc,
        Some(http),
        shutdown_signal(),
    )
    .await
    .map_err(|e| e.to_string())?;
    match store.close().await {
        Ok(0) => {}
        Ok(removed) => tracing::info!(objects = removed, "removed spilled data"),
        Err(e) => tracing::warn!(error = %e, "could not remove all spilled data"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn config(args: &[&str]) -> Result<ServeConfig, String> {
        let cli = Cli::try_parse_from(["serve"].iter().chain(args)).map_err(|e| e.to_string())?;
        ServeConfig::try_from(&cli.serve)
    }

    const TLS_PEERS: &str = "grpc+tls://l-handoff-0.l-handoff-peers.ns.svc:8815,\
                             grpc+tls://l-handoff-1.l-handoff-peers.ns.svc:8815";

    #[test]
    fn a_replica_index_is_a_number_or_a_statefulset_pod_name() {
        assert_eq!(parse_replica_index("2"), Ok(2));
        assert_eq!(parse_replica_index("features-handoff-11"), Ok(11));
        let err = parse_replica_index("features-handoff").expect_err("no ordinal");
        assert!(err.contains("ending in one"), "{err}");
        let config = config(&[
            "--token",
            "t",
            "--peers",
            "grpc://a:1,grpc://b:1",
            "--replica-index",
            "l-handoff-1",
        ])
        .expect("config");
        assert_eq!(config.server.replicas.expect("replicas").index(), 1);
    }

    #[test]
    fn tls_replicas_serve_tls_and_verify_each_other() {
        let tls = ["--tls-cert", "c.pem", "--tls-key", "k.pem"];
        let mut args = vec!["--token", "t", "--peers", TLS_PEERS, "--replica-index", "1"];
        args.extend(tls);
        args.extend(["--peer-ca", "ca.pem"]);
        let made = config(&args).expect("TLS replicas");
        assert!(made.server.replicas.expect("replicas").tls());
        assert_eq!(made.peer_ca, Some(PathBuf::from("ca.pem")));
        // Replicas are alike: TLS peers need this server to serve TLS, and the other way round.
        let err = config(&["--token", "t", "--peers", TLS_PEERS])
            .err()
            .expect("plain server");
        assert!(err.contains("no --tls-cert"), "{err}");
        let mut args = vec!["--token", "t", "--peers", "grpc://a:1,grpc://b:1"];
        args.extend(tls);
        let err = config(&args).err().expect("plain peers");
        assert!(err.contains("must be grpc+tls://"), "{err}");
        let err = config(&[
            "--token",
            "t",
            "--peers",
            "grpc://a:1",
            "--peer-ca",
            "ca.pem",
        ])
        .err()
        .expect("a CA for plain peers");
        assert!(err.contains("--peer-ca is for grpc+tls://"), "{err}");
        let mut args = vec![
            "--token",
            "t",
            "--peers",
            TLS_PEERS,
            "--tls-client-ca",
            "ca.pem",
        ];
        args.extend(tls);
        let err = config(&args).err().expect("mutual TLS");
        assert!(err.contains("--tls-client-ca is not supported"), "{err}");
    }
}
