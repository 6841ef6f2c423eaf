//! tapestry-install-cni: chains tapestry-cni into the node's primary network config and copies the
//! plugin into the runtime's plugin directory; as a DaemonSet's install container, or by hand.
//! See cni-plugin/README.md, "Installer".

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;
use serde_json::Value;
use tapestry_cni_plugin::install::{
    self, InstallError, PLUGIN_CONFIG_ENV, PLUGIN_TYPE,
    confdir::ConfDir,
    owner::{self, OnStop},
    watch::Installer,
};
use tracing::{error, info};

#[derive(Debug, Parser)]
#[command(
    name = "tapestry-install-cni",
    version,
    about = "Chain tapestry-cni into the node's primary CNI network config and keep it there",
    long_about = "Copies tapestry-cni into the plugin directory and appends a tapestry-cni step to \
                  the primary network config (the bytewise-first .conflist/.conf/.json file of the \
                  conf directory, the one runtimes use), converting a single-plugin .conf into a \
                  .conflist. Without --once it keeps running and puts the step back whenever the \
                  primary plugin rewrites its file."
)]
struct Args {
    /// The runtime's network config directory (usually /etc/cni/net.d).
    #[arg(long, value_name = "DIR")]
    cni_conf_dir: PathBuf,
    /// The runtime's plugin directory (usually /opt/cni/bin).
    #[arg(long, value_name = "DIR")]
    cni_bin_dir: PathBuf,
    /// Install and exit; refuse (exit 1, nothing written) when there is no usable config.
    #[arg(long)]
    once: bool,
    /// Take the step out of every network config (restoring a converted .conf exactly) and
    /// remove the binary, then exit.
    #[arg(long)]
    uninstall: bool,
    /// Without --once: on SIGTERM, take the step out and remove the binary before exiting (what
    /// a DaemonSet's watching container does, so that `helm uninstall` leaves no step behind
    /// that nothing serves). The watch stops first, so nothing puts the step back.
    #[arg(long, conflicts_with_all = ["once", "uninstall"])]
    uninstall_on_exit: bool,
    /// With --uninstall-on-exit: uninstall only when this DaemonSet (NAMESPACE/NAME, the one
    /// whose pod runs this installer) is gone or being deleted, as on `helm uninstall`; on a
    /// rolling update or a restart it still exists and the step stays, so no pod is created
    /// without Tapestry in between. If the API cannot say, the step stays.
    #[arg(
        long,
        value_name = "NAMESPACE/NAME",
        requires = "uninstall_on_exit",
        env = "TAPESTRY_DAEMONSET"
    )]
    unless_daemonset_remains: Option<install::owner::DaemonSetRef>,
    /// The plugin to install [default: tapestry-cni next to this executable].
    #[arg(long, value_name = "PATH")]
    plugin_binary: Option<PathBuf>,
    /// A JSON object merged into the inserted step, e.g.
    /// '{"socket":"/run/tapestry/tapestryd.sock","vm":{"uid":107,"gid":107}}'.
    #[arg(long, value_name = "JSON", env = PLUGIN_CONFIG_ENV)]
    plugin_config: Option<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), InstallError> {
    let plugin_config = args
        .plugin_config
        .as_deref()
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            serde_json::from_str::<Value>(s)
                .map_err(|e| InstallError::PluginConfig(format!("not valid JSON: {e}")))
        })
        .transpose()?;
    let entry = install::entry(plugin_config.as_ref())?;
    let plugin_binary = match args.plugin_binary {
        Some(p) => p,
        None => std::env::current_exe()
            .map_err(InstallError::io(
                "/proc/self/exe",
                "locating this executable",
            ))?
            .with_file_name(PLUGIN_TYPE),
    };
    let installer = Installer {
        conf: ConfDir::new(&args.cni_conf_dir, entry),
        bin_dir: args.cni_bin_dir,
        plugin_binary,
    };
    if args.uninstall {
        return installer.uninstall();
    }
    if args.once {
        return installer.once();
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(InstallError::io("tokio", "starting the runtime"))?;
    let uninstall_on_exit = args.uninstall_on_exit;
    let daemonset = args.unless_daemonset_remains;
    let decision = runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(InstallError::io("SIGTERM", "installing a handler"))?;
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        };
        installer.watch(shutdown).await?;
        Ok::<_, InstallError>(match (uninstall_on_exit, &daemonset) {
            (false, _) => None,
            (true, None) => Some(OnStop::Uninstall("--uninstall-on-exit".into())),
            (true, Some(ds)) => Some(owner::on_stop(ds).await),
        })
    })?;
    match decision {
        None => Ok(()),
        // The watch has stopped: nothing re-inserts what this removes.
        Some(OnStop::Uninstall(why)) => {
            info!(why, "removing the step and the binary");
            installer.uninstall()
        }
        Some(OnStop::Keep(why)) => {
            info!(why, "keeping the step");
            Ok(())
        }
    }
}
