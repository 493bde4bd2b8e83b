//! `handoff controller`: run the DataLink controller against the cluster in the environment
//! (in-cluster service account, or KUBECONFIG).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use handoff_controller::{ControllerConfig, Metrics};

#[derive(Debug, Args)]
pub struct ControllerArgs {
    /// Watch DataLinks in this namespace only. Default: all namespaces.
    #[arg(long, env = "HANDOFF_WATCH_NAMESPACE")]
    pub namespace: Option<String>,
    /// Image of the per-link `handoff serve` Deployments, for DataLinks that do not name one.
    #[arg(long, env = "HANDOFF_SERVER_IMAGE", default_value_t = ControllerConfig::default().server_image)]
    pub server_image: String,
    /// Address for /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub http_listen: SocketAddr,
    /// How often a link that is receiving data is looked at (status, seal), e.g. 5s or 500ms.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub poll_interval: Duration,
    /// Reach every link's server at this Flight URL instead of its Service. For tests and
    /// out-of-cluster runs, e.g. with `kubectl port-forward svc/<link>-handoff 8815`; jobs are
    /// still given the Service address.
    #[arg(long)]
    pub endpoint_override: Option<String>,
    /// Name of this instance on the events it publishes. Default: $POD_NAME, else the host name.
    #[arg(long, env = "POD_NAME")]
    pub instance: Option<String>,
}

impl TryFrom<&ControllerArgs> for ControllerConfig {
    type Error = String;

    fn try_from(args: &ControllerArgs) -> Result<Self, String> {
        if args.poll_interval.is_zero() {
            return Err("--poll-interval must be more than 0, e.g. 5s".into());
        }
        if let Some(url) = &args.endpoint_override
            && !url.starts_with("grpc://")
            && !url.starts_with("grpc+tcp://")
        {
            return Err(format!(
                "--endpoint-override '{url}' is not a Flight URL; use grpc://host:port"
            ));
        }
        Ok(ControllerConfig {
            namespace: args.namespace.clone(),
            server_image: args.server_image.clone(),
            endpoint_override: args.endpoint_override.clone(),
            poll_interval: args.poll_interval,
            instance: args
                .instance
                .clone()
                .or_else(|| std::env::var("HOSTNAME").ok()),
        })
    }
}

/// `500ms`, `5s`, `2m`, `1h`, or plain seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("'{text}' is not a duration like 5s, 500ms or 2m"))?;
    let seconds = match unit {
        "ms" => number / 1000.0,
        "" | "s" => number,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        _ => {
            return Err(format!(
                "'{text}': unknown unit '{unit}'; use ms, s, m or h"
            ));
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| format!("'{text}' is out of range"))
}

pub async fn run(args: ControllerArgs) -> Result<(), String> {
    let config = ControllerConfig::try_from(&args)?;
    let client = kube::Client::try_default().await.map_err(|e| {
        format!(
            "cannot reach Kubernetes: {e}; run in a pod with a service account, or set KUBECONFIG"
        )
    })?;
    let metrics = Arc::new(Metrics::default());
    let listener = tokio::net::TcpListener::bind(args.http_listen)
        .await
        .map_err(|e| format!("cannot bind --http-listen {}: {e}", args.http_listen))?;
    let (stop_http, http_stopped) = tokio::sync::oneshot::channel::<()>();
    let http = tokio::spawn(handoff_controller::serve_http(
        listener,
        Arc::clone(&metrics),
        async move {
            let _ = http_stopped.await;
        },
    ));
    tracing::info!(namespace = ?config.namespace, image = %config.server_image, "starting the DataLink controller");
    let outcome = handoff_controller::run(client, config, metrics, crate::serve::shutdown_signal())
        .await
        .map_err(|e| e.to_string());
    let _ = stop_http.send(());
    let _ = http.await;
    outcome
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations_parse_and_bad_ones_say_how() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(
            parse_duration("5 days")
                .expect_err("bad unit")
                .contains("use ms, s, m or h")
        );
        assert!(parse_duration("soon").is_err());
    }
}
