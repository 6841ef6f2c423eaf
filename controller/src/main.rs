//! `tapestry-controller`: runs the controller (leader-elected), or prints the Guest CRD.

use std::{
    io::IsTerminal, net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc, time::Duration,
};

use anyhow::Result;
use clap::{Parser, Subcommand};
use tapestry_controller::{
    Error,
    controller::{self, Settings},
    leader::{self, LeaderElector, Timing},
    metrics::{self, Metrics},
};
use tapestry_k8s::{duration, names};
use tracing::{error, info, warn};

/// EndpointSlices for the KVM guests (Guest objects) that Services select, beside the built-in
/// controller's pod slices.
#[derive(Parser, Debug)]
#[command(name = "tapestry-controller", version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    /// Kubeconfig to use (default: $KUBECONFIG, ~/.kube/config, or the in-cluster service account).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,

    /// Where to serve /metrics (Prometheus) and /healthz.
    #[arg(long, default_value = "0.0.0.0:9965")]
    metrics_addr: SocketAddr,

    /// Elect a leader among replicas with a Lease; only the leader reconciles.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,

    /// Namespace of the Lease (default: $POD_NAMESPACE, else the kubeconfig's namespace).
    #[arg(long, env = "POD_NAMESPACE")]
    lease_namespace: Option<String>,

    /// Name of the Lease.
    #[arg(long, default_value = names::CONTROLLER_LEASE)]
    lease_name: String,

    /// This replica's identity in the Lease (default: pod or host name and a random suffix).
    #[arg(long)]
    identity: Option<String>,

    /// How long a Lease record must stay unchanged before another replica takes it over.
    #[arg(long, default_value = "15s", value_parser = duration::parse)]
    lease_duration: Duration,

    /// How long the leader tries to renew before it steps down.
    #[arg(long, default_value = "10s", value_parser = duration::parse)]
    renew_deadline: Duration,

    /// Between two attempts to acquire or renew the Lease.
    #[arg(long, default_value = "2s", value_parser = duration::parse)]
    retry_period: Duration,

    /// Every Service is reconciled (and orphaned slices swept) at least this often.
    #[arg(long, default_value = "5m", value_parser = duration::parse)]
    resync: Duration,

    /// Services reconciled at once.
    #[arg(long, default_value_t = 4)]
    concurrency: u16,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the Guest CustomResourceDefinition (YAML): `tapestry-controller crd | kubectl apply -f -`.
    Crd,
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    info!("shutting down");
}

async fn run(cli: Cli) -> Result<()> {
    let client = tapestry_k8s::client(cli.kubeconfig.as_deref()).await?;
    controller::check_crd(&client).await?;

    let metrics = Arc::new(Metrics::default());
    let metrics_server = tokio::spawn(metrics::serve(cli.metrics_addr, metrics.clone()));
    let settings = Settings {
        resync: cli.resync,
        concurrency: cli.concurrency.max(1),
        instance: cli.identity.clone(),
    };
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);

    if !cli.leader_elect {
        metrics.leader.set(1);
        tokio::select! {
            r = controller::run(client, metrics, settings) => r?,
            r = metrics_server => r??,
            _ = &mut shutdown => {}
        }
        return Ok(());
    }

    let namespace = cli
        .lease_namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_string());
    let identity = cli
        .identity
        .clone()
        .unwrap_or_else(leader::default_identity);
    let timing = Timing {
        lease_duration: cli.lease_duration,
        renew_deadline: cli.renew_deadline,
        retry_period: cli.retry_period,
    };
    info!(%identity, lease = %format!("{namespace}/{}", cli.lease_name), "leader election");
    let mut elector = LeaderElector::new(
        client.clone(),
        &namespace,
        &cli.lease_name,
        &identity,
        timing,
    );
    tokio::pin!(metrics_server);
    loop {
        tokio::select! {
            _ = elector.acquire() => {}
            r = &mut metrics_server => return r?,
            _ = &mut shutdown => return Ok(()),
        }
        metrics.leader.set(1);
        metrics.leader_transitions.inc();
        let stop = tokio::select! {
            r = controller::run(client.clone(), metrics.clone(), settings.clone()) => {
                if let Err(e) = r {
                    warn!(error = %e, "controller stopped; standing again");
                }
                false
            }
            _ = elector.hold() => false,
            r = &mut metrics_server => { r??; true }
            _ = &mut shutdown => true,
        };
        metrics.leader.set(0);
        if stop {
            elector.release().await;
            return Ok(());
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Crd) = cli.command {
        print!("{}", tapestry_k8s::crd_yaml());
        return ExitCode::SUCCESS;
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(Error::CrdMissing) = e.downcast_ref::<Error>() {
                error!("{e}");
            } else {
                error!("{e:#}");
            }
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(duration::parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(duration::parse("15s"), Ok(Duration::from_secs(15)));
        assert_eq!(duration::parse("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(duration::parse("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(duration::parse("1h"), Ok(Duration::from_secs(3600)));
        assert!(duration::parse("15").is_err());
        assert!(duration::parse("s").is_err());
        assert!(duration::parse("3d").is_err());
    }

    #[test]
    fn cli_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "tapestry-controller",
            "--leader-elect=false",
            "--resync",
            "30s",
        ])
        .unwrap();
        assert!(!cli.leader_elect);
        assert_eq!(cli.resync, Duration::from_secs(30));
        let cli = Cli::try_parse_from(["tapestry-controller", "crd"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Crd)));
    }
}
