//! The client subcommands: put, get, ls, stat, seal, rm.

use std::path::PathBuf;
use std::time::Instant;

use arrow_array::RecordBatch;
use clap::Args;
use futures::{StreamExt, TryStreamExt};
use handoff_client::{ClientConfig, HandoffClient, ReadShard};
use indicatif::{ProgressBar, ProgressStyle};

use crate::files::{Format, Output, open_input};
use crate::size::format_size;

#[derive(Debug, Clone, Args)]
pub struct Connection {
    /// The server's Flight endpoint.
    #[arg(
        long,
        env = "HANDOFF_ENDPOINT",
        default_value = "grpc://127.0.0.1:8815"
    )]
    pub endpoint: String,
    /// Bearer token for the server (admin, writer or reader, as the command needs).
    #[arg(long, env = "HANDOFF_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// For grpc+tls:// endpoints: the PEM CA the server's certificate chains to (default: the
    /// system's roots). Also HANDOFF_TLS_CA, or the PEM itself in HANDOFF_TLS_CA_PEM.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// Mutual TLS: this client's PEM certificate (also HANDOFF_TLS_CLIENT_CERT).
    #[arg(long, requires = "tls_client_key")]
    pub tls_client_cert: Option<PathBuf>,
    /// Mutual TLS: the PEM key of --tls-client-cert (also HANDOFF_TLS_CLIENT_KEY).
    #[arg(long, requires = "tls_client_cert")]
    pub tls_client_key: Option<PathBuf>,
}

impl Connection {
    pub async fn connect(&self) -> Result<HandoffClient, String> {
        let mut config = ClientConfig::new(self.endpoint.clone(), self.token.clone())
            .with_env_tls()
            .map_err(|e| e.to_string())?;
        let read = |flag: &str, path: &PathBuf| {
            std::fs::read(path).map_err(|e| format!("cannot read {flag} {}: {e}", path.display()))
        };
        if let Some(ca) = &self.tls_ca {
            config.tls_ca_pem = Some(read("--tls-ca", ca)?);
        }
        if let (Some(cert), Some(key)) = (&self.tls_client_cert, &self.tls_client_key) {
            config.tls_identity = Some((
                read("--tls-client-cert", cert)?,
                read("--tls-client-key", key)?,
            ));
        }
        HandoffClient::connect_with(config)
            .await
            .map_err(|e| e.to_string())
    }
}

#[derive(Debug, Args)]
pub struct PutArgs {
    #[command(flatten)]
    pub conn: Connection,
    /// The link to append to; created on first write.
    #[arg(long, env = "HANDOFF_LINK")]
    pub link: String,
    /// Parquet, Arrow IPC (file or stream) or CSV file.
    pub file: PathBuf,
    /// Input format; by default from the extension or the file's magic bytes.
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    /// Rows per record batch read from the file.
    #[arg(long, default_value_t = 65_536)]
    pub batch_rows: usize,
    /// Seal the link after this file: no more writes, readers may start.
    #[arg(long)]
    pub seal: bool,
    /// Hide the progress bar.
    #[arg(long, short)]
    pub quiet: bool,
}

fn bar(total: Option<u64>, quiet: bool, what: &str) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = match total {
        Some(total) => ProgressBar::new(total).with_style(
            ProgressStyle::with_template(&format!(
                "{what} {{bar:40.cyan/blue}} {{human_pos}}/{{human_len}} rows {{msg}} ({{per_sec}}, eta {{eta}})"
            ))
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        ),
        None => ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template(&format!("{what} {{spinner}} {{human_pos}} rows {{msg}} ({{per_sec}})"))
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        ),
    };
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    bar
}

pub async fn put(args: PutArgs) -> Result<(), String> {
    let format = match args.format {
        Some(f) => f,
        None => Format::detect(&args.file)?,
    };
    let input = open_input(&args.file, format, args.batch_rows)?;
    let schema = input.schema.clone();
    let progress = bar(input.rows, args.quiet, "put");
    let mut client = args.conn.connect().await?;
    let (tx, rx) =
        tokio::sync::mpsc::channel::<Result<RecordBatch, handoff_client::ClientError>>(4);
    let counter = progress.clone();
    // Files are read on a blocking thread so the network side never waits on disk decoding.
    let reader = tokio::task::spawn_blocking(move || {
        let mut bytes = 0u64;
        for batch in input.batches {
            match batch {
                Ok(batch) => {
                    counter.inc(batch.num_rows() as u64);
                    bytes += batch.get_array_memory_size() as u64;
                    counter.set_message(format_size(bytes));
                    if tx.blocking_send(Ok(batch)).is_err() {
                        return Ok(());
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    });
    let batches =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (b, rx)) });
    let started = Instant::now();
    let outcome = client.put_with_schema(&args.link, schema, batches).await;
    let read_result = reader.await.map_err(|e| e.to_string())?;
    progress.finish_and_clear();
    read_result.map_err(|e| {
        format!(
            "reading {} failed: {e}; nothing was committed",
            args.file.display()
        )
    })?;
    let outcome = outcome.map_err(|e| e.to_string())?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "put {} rows ({}) into '{}' as partition {} in {:.2}s ({}/s)",
        outcome.rows,
        format_size(outcome.bytes),
        args.link,
        outcome.partition,
        secs,
        format_size((outcome.bytes as f64 / secs.max(1e-9)) as u64)
    );
    if args.seal {
        let stats = client.seal(&args.link).await.map_err(|e| e.to_string())?;
        println!(
            "sealed '{}': {} rows in {} partitions",
            args.link, stats.rows, stats.partitions
        );
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct GetArgs {
    #[command(flatten)]
    pub conn: Connection,
    /// The link to read.
    #[arg(long, env = "HANDOFF_LINK")]
    pub link: String,
    /// Output file: .parquet, .arrow or .csv.
    #[arg(long)]
    pub out: PathBuf,
    /// Output format; by default from the extension.
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    /// Read only this rank's shard (with --world-size).
    #[arg(long, requires = "world_size")]
    pub rank: Option<u32>,
    /// Number of ranks the link is split across.
    #[arg(long, requires = "rank")]
    pub world_size: Option<u32>,
    /// Rows per batch of the shard; 0 keeps the stored batches and splits rows evenly.
    #[arg(long, default_value_t = 0)]
    pub batch_rows: u64,
    /// Shuffle rows (deterministic in --seed and --epoch).
    #[arg(long)]
    pub shuffle: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 0)]
    pub epoch: u64,
    /// Drop the remainder instead of padding it by wrapping around.
    #[arg(long)]
    pub drop_last: bool,
    /// Read committed partitions as they arrive instead of waiting for the seal.
    #[arg(long)]
    pub streaming: bool,
    /// Only these columns, in this order (comma-separated). The others are never decoded.
    #[arg(long, value_delimiter = ',')]
    pub columns: Vec<String>,
    /// Only rows where this SQL condition holds, e.g. "split = 'train' AND score > 0.5".
    /// Ranks split the rows that pass.
    #[arg(long)]
    pub filter: Option<String>,
    /// Hide the progress bar.
    #[arg(long, short)]
    pub quiet: bool,
}

pub async fn get(args: GetArgs) -> Result<(), String> {
    let format = match args.format {
        Some(f) => f,
        None => Format::from_output(&args.out)?,
    };
    let mut client = args.conn.connect().await?;
    let started = Instant::now();
    let query = !args.columns.is_empty() || args.filter.is_some();
    // Columns and filters are applied by shard reads; the whole link is the one shard of one rank.
    let shard_of = match (args.rank, args.world_size) {
        (Some(rank), Some(world_size)) => Some((rank, world_size)),
        _ if query => Some((0, 1)),
        _ => None,
    };
    let mut schema = None;
    let (total, mut streams) = match shard_of {
        Some((rank, world_size)) => {
            let shard = ReadShard {
                link: args.link.clone(),
                rank,
                world_size,
                epoch: args.epoch,
                seed: args.seed,
                batch_rows: args.batch_rows,
                shuffle: args.shuffle,
                drop_last: args.drop_last,
                start_batch: 0,
                mode: if args.streaming {
                    handoff_client::ReadMode::Streaming
                } else {
                    handoff_client::ReadMode::WaitForSeal
                } as i32,
                columns: args.columns.clone(),
                filter: args.filter.clone().unwrap_or_default(),
                // The output is written row by row, so batch boundaries do not matter here:
                // fewer, larger messages cost less on both ends.
                batches_per_message: 16,
            };
            let info = client.shard_info(&shard).await.map_err(|e| e.to_string())?;
            schema = info
                .clone()
                .try_decode_schema()
                .ok()
                .map(std::sync::Arc::new);
            let total = (info.total_records >= 0).then_some(info.total_records as u64);
            // One server's stream, or every replica's read at once, in plan order.
            (
                total,
                vec![
                    client
                        .shard_batches(shard)
                        .await
                        .map_err(|e| e.to_string())?,
                ],
            )
        }
        _ => {
            let (info, streams) = client
                .read_link(&args.link)
                .await
                .map_err(|e| e.to_string())?;
            let streams = streams
                .into_iter()
                .map(|s| s.map_err(handoff_client::ClientError::from).boxed())
                .collect();
            (Some(info.total_records.max(0) as u64), streams)
        }
    };
    let progress = bar(total, args.quiet, "get");
    let mut output: Option<Output> = None;
    let (mut rows, mut bytes) = (0u64, 0u64);
    for stream in &mut streams {
        while let Some(batch) = stream.next().await {
            let batch = batch.map_err(|e| e.to_string())?;
            if output.is_none() {
                output = Some(Output::create(&args.out, format, &batch.schema())?);
            }
            if let Some(out) = output.as_mut() {
                out.write(&batch)?;
            }
            rows += batch.num_rows() as u64;
            bytes += batch.get_array_memory_size() as u64;
            progress.inc(batch.num_rows() as u64);
            progress.set_message(format_size(bytes));
        }
    }
    if output.is_none() {
        let schema = match schema.filter(|s| !s.fields().is_empty()) {
            Some(schema) => schema,
            None => client.schema(&args.link).await.map_err(|e| e.to_string())?,
        };
        output = Some(Output::create(&args.out, format, &schema)?);
    }
    if let Some(out) = output {
        out.finish()?;
    }
    progress.finish_and_clear();
    println!(
        "wrote {rows} rows of '{}' to {} in {:.2}s",
        args.link,
        args.out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[derive(Debug, Args)]
pub struct LinkArgs {
    #[command(flatten)]
    pub conn: Connection,
    /// The link.
    #[arg(env = "HANDOFF_LINK")]
    pub link: String,
    /// Print the server's JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    #[command(flatten)]
    pub conn: Connection,
    /// The link to fill; created if it does not exist.
    #[arg(long, env = "HANDOFF_LINK")]
    pub link: String,
    /// Parquet to import, as the server sees it: a file, a directory or a glob, e.g.
    /// s3://bucket/path/*.parquet (the server's AWS_* variables give credentials and endpoint).
    pub url: String,
    /// Seal the link after the import.
    #[arg(long)]
    pub seal: bool,
    /// Print the server's JSON.
    #[arg(long)]
    pub json: bool,
    /// Hide the spinner.
    #[arg(long, short)]
    pub quiet: bool,
}

pub async fn import(args: ImportArgs) -> Result<(), String> {
    let mut client = args.conn.connect().await?;
    let started = Instant::now();
    let spinner = if args.quiet {
        ProgressBar::hidden()
    } else {
        let spinner = ProgressBar::new_spinner().with_message(format!(
            "importing {} into '{}' on the server",
            args.url, args.link
        ));
        spinner.enable_steady_tick(std::time::Duration::from_millis(120));
        spinner
    };
    // The import is one call; a second connection reports what it has staged so far.
    let progress = if args.quiet {
        None
    } else {
        let mut watcher = args.conn.connect().await?;
        let (spinner, link, url) = (spinner.clone(), args.link.clone(), args.url.clone());
        Some(tokio::spawn(async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                if let Ok(stats) = watcher.stats(&link).await
                    && stats.staged_bytes > 0
                {
                    spinner.set_message(format!(
                        "importing {url} into '{link}': {} read into {} partitions so far",
                        format_size(stats.staged_bytes),
                        stats.staged_partitions
                    ));
                }
            }
        }))
    };
    let reply = client.import(&args.link, &args.url, args.seal).await;
    if let Some(progress) = progress {
        progress.abort();
    }
    spinner.finish_and_clear();
    let reply = reply.map_err(|e| e.to_string())?;
    if args.json {
        println!("{reply}");
    } else {
        println!(
            "imported {} rows ({}) from {} files into '{}' as {} partitions in {:.2}s{}",
            reply["rows"],
            format_size(reply["bytes"].as_u64().unwrap_or(0)),
            reply["files"],
            args.link,
            reply["partitions"],
            started.elapsed().as_secs_f64(),
            if args.seal { "; sealed" } else { "" }
        );
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct LsArgs {
    #[command(flatten)]
    pub conn: Connection,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub async fn ls(args: LsArgs) -> Result<(), String> {
    let mut client = args.conn.connect().await?;
    let infos = client.list().await.map_err(|e| e.to_string())?;
    if !args.json {
        println!(
            "{:<32} {:>8} {:>12} {:>12} {:>10}",
            "LINK", "STATE", "ROWS", "BYTES", "PARTITIONS"
        );
    }
    for info in infos {
        let name = info
            .flight_descriptor
            .as_ref()
            .and_then(|d| d.path.first().cloned())
            .unwrap_or_default();
        let stats = client.stats(&name).await.map_err(|e| e.to_string())?;
        if args.json {
            println!(
                "{}",
                serde_json::json!({"link": name, "state": stats.state, "rows": stats.rows, "bytes": stats.bytes, "partitions": stats.partitions})
            );
        } else {
            println!(
                "{:<32} {:>8} {:>12} {:>12} {:>10}",
                name,
                stats.state,
                stats.rows,
                format_size(stats.bytes),
                stats.partitions
            );
        }
    }
    Ok(())
}

fn print_stats(stats: &handoff_client::LinkStats, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(stats).unwrap_or_default()
        );
        return;
    }
    println!("link:        {}", stats.link);
    println!("state:       {}", stats.state);
    println!("rows:        {}", stats.rows);
    println!(
        "partitions:  {} committed, {} staged",
        stats.partitions, stats.staged_partitions
    );
    println!(
        "bytes:       {} committed, {} staged",
        format_size(stats.bytes),
        format_size(stats.staged_bytes)
    );
    if stats.spilled_partitions > 0 {
        println!(
            "spilled:     {} in {} partitions, in object storage",
            format_size(stats.spilled_bytes),
            stats.spilled_partitions
        );
    }
    let limit = stats
        .server_memory_limit
        .map(format_size)
        .unwrap_or_else(|| "no limit".into());
    println!(
        "server:      {} used of {}",
        format_size(stats.server_memory_used),
        limit
    );
    let quota = stats
        .memory_limit
        .map(format_size)
        .unwrap_or_else(|| "none".into());
    println!(
        "link memory: {} held, quota {}, policy {}",
        format_size(stats.memory_bytes),
        quota,
        stats.memory_policy
    );
    for part in &stats.replicas {
        println!(
            "replica {:<4} {} rows in {} partitions, {}, {} ({})",
            part.replica,
            part.rows,
            part.partitions,
            format_size(part.bytes),
            part.state,
            part.endpoint
        );
    }
    for lost in &stats.lost {
        println!(
            "LOST on replica {} ({}): partitions {:?}; it restarted without them",
            lost.replica, lost.endpoint, lost.partitions
        );
    }
    println!("schema:");
    for field in &stats.schema {
        println!("  {field}");
    }
}

pub async fn stat(args: LinkArgs) -> Result<(), String> {
    let mut client = args.conn.connect().await?;
    let stats = client.stats(&args.link).await.map_err(|e| e.to_string())?;
    print_stats(&stats, args.json);
    Ok(())
}

pub async fn seal(args: LinkArgs) -> Result<(), String> {
    let mut client = args.conn.connect().await?;
    let stats = client.seal(&args.link).await.map_err(|e| e.to_string())?;
    if args.json {
        print_stats(&stats, true);
    } else {
        println!(
            "sealed '{}': {} rows in {} partitions",
            stats.link, stats.rows, stats.partitions
        );
    }
    Ok(())
}

pub async fn rm(args: LinkArgs) -> Result<(), String> {
    let mut client = args.conn.connect().await?;
    client.delete(&args.link).await.map_err(|e| e.to_string())?;
    println!("deleted '{}'", args.link);
    Ok(())
}

pub async fn snapshot(args: LinkArgs) -> Result<(), String> {
    let mut client = args.conn.connect().await?;
    let reply = client
        .snapshot(&args.link)
        .await
        .map_err(|e| e.to_string())?;
    if args.json {
        println!("{reply}");
    } else {
        println!(
            "snapshot of '{}': {} rows in {} partitions at {}",
            args.link,
            reply["rows"],
            reply["partitions"],
            reply["url"].as_str().unwrap_or("")
        );
    }
    Ok(())
}
