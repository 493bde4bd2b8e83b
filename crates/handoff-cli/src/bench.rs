//! `handoff bench`: our server against a pyarrow `FlightServerBase`, same pyarrow client, same
//! run, alternating rounds. Wall time is noisy here; server CPU per byte much less so.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::Value;

const SCRIPT: &str = include_str!("../../../benches/flight_bench.py");

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Arrow bytes per round.
    #[arg(long, default_value_t = 1024)]
    pub size_mib: u64,
    /// Paired rounds (one against each server per round); medians are reported.
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// Python with pyarrow installed.
    #[arg(long, env = "HANDOFF_BENCH_PYTHON", default_value = "python3")]
    pub python: String,
    /// Also write the raw per-round results as JSON lines here.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
}

struct Server {
    name: &'static str,
    endpoint: String,
    child: Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_ours() -> Result<Server, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--no-auth",
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start handoff serve: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    let grpc = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("grpc="))
        .ok_or_else(|| format!("handoff serve did not report its address: {line:?}"))?;
    Ok(Server {
        name: "handoff",
        endpoint: format!("grpc://{grpc}"),
        child,
    })
}

fn start_pyarrow(python: &str, script: &PathBuf, dir: &std::path::Path) -> Result<Server, String> {
    let port_file = dir.join("pyarrow.port");
    let child = Command::new(python)
        .arg(script)
        .args(["pyarrow-server", "--port-file"])
        .arg(&port_file)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start {python}: {e}"))?;
    let started = Instant::now();
    let mut server = Server {
        name: "pyarrow",
        endpoint: String::new(),
        child,
    };
    loop {
        if let Ok(port) = std::fs::read_to_string(&port_file)
            && !port.trim().is_empty()
        {
            server.endpoint = format!("grpc://127.0.0.1:{}", port.trim());
            return Ok(server);
        }
        if let Ok(Some(status)) = server.child.try_wait() {
            return Err(format!(
                "the pyarrow server exited with {status}; is pyarrow installed for {python}?"
            ));
        }
        if started.elapsed() > Duration::from_secs(60) {
            return Err("the pyarrow server did not start within 60s".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn run_client(
    args: &BenchArgs,
    script: &PathBuf,
    server: &Server,
    round: u32,
) -> Result<Value, String> {
    let output = Command::new(&args.python)
        .arg(script)
        .args([
            "client",
            "--endpoint",
            &server.endpoint,
            "--size-mib",
            &args.size_mib.to_string(),
            "--rounds",
            "1",
        ])
        .args([
            "--pid",
            &server.child.id().to_string(),
            "--link",
            &format!("bench-{round}"),
        ])
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run the bench client: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "the bench client failed against {} ({})",
            server.name, output.status
        ));
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .ok_or("the bench client printed no result")?;
    let mut value: Value =
        serde_json::from_str(line).map_err(|e| format!("bad bench client output: {e}"))?;
    value["server"] = server.name.into();
    value["round"] = round.into();
    Ok(value)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    if values.is_empty() {
        return f64::NAN;
    }
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

pub fn run(args: BenchArgs) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let script = dir.path().join("flight_bench.py");
    std::fs::write(&script, SCRIPT).map_err(|e| e.to_string())?;
    let ours = start_ours()?;
    let theirs = start_pyarrow(&args.python, &script, dir.path())?;
    eprintln!(
        "bench: {} MiB per round, {} paired rounds; handoff at {}, pyarrow at {}",
        args.size_mib, args.rounds, ours.endpoint, theirs.endpoint
    );
    let mut results: Vec<Value> = Vec::new();
    for round in 0..args.rounds {
        // Alternate who goes first, so warm-up and drift do not favour one side.
        let order = if round % 2 == 0 {
            [&ours, &theirs]
        } else {
            [&theirs, &ours]
        };
        for server in order {
            let result = run_client(&args, &script, server, round)?;
            eprintln!("bench: round {round} {}: {result}", server.name);
            results.push(result);
        }
    }
    if let Some(path) = &args.json_out {
        let lines: Vec<String> = results.iter().map(|v| v.to_string()).collect();
        std::fs::write(path, lines.join("\n") + "\n").map_err(|e| e.to_string())?;
    }
    let pick = |server: &str, key: &str| -> Vec<f64> {
        results
            .iter()
            .filter(|r| r["server"] == server)
            .filter_map(|r| r[key].as_f64())
            .collect()
    };
    let per_round = |server: &str, f: &dyn Fn(&Value) -> Option<f64>| -> f64 {
        median(
            results
                .iter()
                .filter(|r| r["server"] == server)
                .filter_map(f)
                .collect(),
        )
    };
    let mb = |r: &Value, t: &str| Some(r["bytes"].as_f64()? / 1e6 / r[t].as_f64()?);
    let cpu_per_gib =
        |r: &Value, c: &str| Some(r[c].as_f64()? / (r["bytes"].as_f64()? / (1u64 << 30) as f64));
    let rows: Vec<(&str, f64, f64, bool)> = vec![
        (
            "DoPut MB/s",
            per_round("handoff", &|r| mb(r, "put_s")),
            per_round("pyarrow", &|r| mb(r, "put_s")),
            true,
        ),
        (
            "DoPut server CPU s/GiB",
            per_round("handoff", &|r| cpu_per_gib(r, "put_cpu_s")),
            per_round("pyarrow", &|r| cpu_per_gib(r, "put_cpu_s")),
            false,
        ),
        (
            "DoGet MB/s",
            per_round("handoff", &|r| mb(r, "get_s")),
            per_round("pyarrow", &|r| mb(r, "get_s")),
            true,
        ),
        (
            "DoGet server CPU s/GiB",
            per_round("handoff", &|r| cpu_per_gib(r, "get_cpu_s")),
            per_round("pyarrow", &|r| cpu_per_gib(r, "get_cpu_s")),
            false,
        ),
        (
            "peak RSS / Arrow bytes",
            median(pick("handoff", "hwm_bytes")) / median(pick("handoff", "bytes")),
            median(pick("pyarrow", "hwm_bytes")) / median(pick("pyarrow", "bytes")),
            false,
        ),
    ];
    println!(
        "{:<26} {:>12} {:>12} {:>14}",
        "median of rounds", "handoff", "pyarrow", "handoff gain"
    );
    for (name, ours_value, theirs_value, higher_is_better) in rows {
        let gain = if higher_is_better {
            ours_value / theirs_value
        } else {
            theirs_value / ours_value
        };
        println!("{name:<26} {ours_value:>12.3} {theirs_value:>12.3} {gain:>13.2}x");
    }
    Ok(())
}
