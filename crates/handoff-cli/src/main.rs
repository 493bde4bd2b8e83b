//! `handoff`: the one binary. Clap stays here; each subcommand converts its flags into library
//! configuration.

mod bench;
mod certs;
mod commands;
mod controller;
mod files;
mod serve;
mod size;

use clap::{Parser, Subcommand};

// mimalloc reuses large blocks; glibc maps every message over 32 MiB afresh, and page faults on
// fresh mappings cost 2-3x of DoPut throughput in our measurements. Transparent huge pages are off
// (`no_thp`): zeroing 2 MiB pages on first touch made a fresh server's first GiB of DoPut cost
// 2.8 s of CPU instead of 1.3 s on this VM.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Hand Spark output straight to distributed PyTorch training over Arrow Flight.
#[derive(Debug, Parser)]
#[command(name = "handoff", version, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the Flight server that producers write to and training ranks read from.
    Serve(serve::ServeArgs),
    /// Append a Parquet, Arrow IPC or CSV file to a link as one partition.
    Put(commands::PutArgs),
    /// Read a link, or one rank's shard of it, into a Parquet, Arrow IPC or CSV file.
    Get(commands::GetArgs),
    /// List links with their state, rows and bytes.
    Ls(commands::LsArgs),
    /// Show one link's statistics and schema.
    Stat(commands::LinkArgs),
    /// Seal a link: no more writes; readers waiting for the seal start.
    Seal(commands::LinkArgs),
    /// Delete a link and free its memory.
    Rm(commands::LinkArgs),
    /// Persist a sealed link to the server's object storage (`serve --spill-url`).
    Snapshot(commands::LinkArgs),
    /// Fill a link from Parquet files in object storage (s3://bucket/path/*.parquet), all or
    /// nothing, in parallel, within the server's memory budget.
    Import(commands::ImportArgs),
    /// Measure this server against a pyarrow Flight server with the same pyarrow client.
    Bench(bench::BenchArgs),
    /// Make a CA and a server certificate signed by it, for `serve --tls-cert` outside
    /// Kubernetes (the controller makes its own per link): DIR/ca.crt, DIR/tls.crt, DIR/tls.key.
    Certs(certs::CertsArgs),
    /// Print the DataLink CustomResourceDefinition as YAML (`handoff crd | kubectl apply -f -`).
    Crd,
    /// Run the DataLink controller: start a server per link, wire the SparkApplication and the
    /// training job to it, release training when the data is sealed, and clean up.
    Controller(controller::ControllerArgs),
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// mimalloc reads its options from the environment once, at startup. By default it hands freed
/// memory back to the OS after 10 ms, and on this kind of VM touching that memory again costs as
/// much as fresh memory: a server that deletes one link and fills the next paid 0.7-1.2 s of CPU
/// per GiB of DoPut instead of 0.16-0.19 s. So `serve` keeps freed memory for a minute, by
/// re-executing itself once with the option set, unless the operator set it already.
///
/// With `--memory-limit` the budget wins instead: kept memory is not always reused for new
/// frames, and under spill churn resident memory reached 1.25-1.38x the limit with a 60 s delay,
/// 1.15x with the 10 ms default, and 1.08x with immediate purging, which is what we then use.
#[cfg(unix)]
fn ensure_allocator_options() {
    use std::os::unix::process::CommandExt;
    const PURGE_DELAY: &str = "MIMALLOC_PURGE_DELAY";
    let mut args = std::env::args().skip(1);
    let serving = args.next().as_deref() == Some("serve");
    let budgeted = args.any(|a| a == "--memory-limit" || a.starts_with("--memory-limit="));
    if !serving || std::env::var_os(PURGE_DELAY).is_some() {
        return;
    }
    let delay_ms = if budgeted { "0" } else { "60000" };
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let error = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env(PURGE_DELAY, delay_ms)
        .exec();
    // Only reached when exec failed; serving with the allocator defaults is still correct.
    eprintln!(
        "note: could not re-execute with {PURGE_DELAY} set ({error}); continuing with mimalloc defaults"
    );
}

#[cfg(not(unix))]
fn ensure_allocator_options() {}

fn main() {
    ensure_allocator_options();
    let cli = Cli::parse();
    let default_log = if matches!(cli.command, Command::Serve(_) | Command::Controller(_)) {
        "info"
    } else {
        "warn"
    };
    init_tracing(default_log);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // DataFusion plans by recursion; the SQL limits (handoff_query::limits) keep the deepest
        // plan inside 2 MiB, and 8 MiB leaves margin. Untouched stack pages cost no memory.
        .thread_stack_size(8 << 20)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve::run(args).await,
            Command::Put(args) => commands::put(args).await,
            Command::Get(args) => commands::get(args).await,
            Command::Ls(args) => commands::ls(args).await,
            Command::Stat(args) => commands::stat(args).await,
            Command::Seal(args) => commands::seal(args).await,
            Command::Rm(args) => commands::rm(args).await,
            Command::Snapshot(args) => commands::snapshot(args).await,
            Command::Import(args) => commands::import(args).await,
            Command::Bench(args) => tokio::task::spawn_blocking(move || bench::run(args))
                .await
                .unwrap_or_else(|e| Err(e.to_string())),
            Command::Controller(args) => controller::run(args).await,
            Command::Certs(args) => certs::run(&args),
            Command::Crd => handoff_controller::crd_yaml()
                .map(|yaml| print!("{yaml}"))
                .map_err(|e| format!("cannot render the CRD: {e}")),
        }
    });
    if let Err(message) = result {
        eprintln!("error: {message}");
        std::process::exit(1);
    }
}
