// `tapestry` (and `kubectl tapestry`): arguments, dispatch and exit codes.
//
// Exit codes: 0 success; 1 the command failed (daemon unreachable, unknown service or guest,
// flush refused, ...); 2 bad arguments (clap). src/bin/kubectl-tapestry.rs includes this file,
// so it holds no inner attributes.

use std::{path::PathBuf, process::ExitCode};

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use tapestry_api::types::DEFAULT_SOCKET;
use tapestry_cli::{
    Ctx,
    commands::{conntrack, expose, flows, guest, metrics, service, status},
    describe_error,
    output::{ColorChoice, Render},
};

#[derive(Debug, Parser)]
#[command(
    name = "tapestry",
    version,
    about = "Inspect the Tapestry datapath on this node: services, VM guests, conntrack, flows",
    long_about = "Inspect the Tapestry datapath on this node: services and their VM and pod \
                  backends, KVM guests, connection tracking, flow events and metrics, from the \
                  local API of tapestryd (a unix socket; root only by default).",
    after_help = "Examples:
  # Is the datapath healthy, what does it hold
  {bin} status

  # Frontends and their VM and pod backends
  {bin} service list

  # One VM guest: readiness, counters, spoof drops
  {bin} guest show my-vm

  # Flow events as they happen
  {bin} flows --follow

  # Live connections of a service
  {bin} conntrack list --service web

  # Shell completion (bash, zsh or fish)
  {bin} completion bash > /etc/bash_completion.d/tapestry

Every listing takes -o table|wide|json|yaml; status and the lists take --watch."
)]
struct Cli {
    /// tapestryd's API socket.
    #[arg(long, global = true, env = "TAPESTRY_SOCKET", default_value = DEFAULT_SOCKET, value_name = "PATH")]
    socket: PathBuf,

    /// When to colour the output (auto: on a terminal, unless NO_COLOR is set).
    #[arg(long, global = true, value_enum, default_value_t = ColorChoice::Auto, value_name = "WHEN")]
    color: ColorChoice,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Health, state source, interfaces, pins, map fill, counters, drops.
    Status(status::StatusArgs),
    /// Services: frontends with their VM and pod backends.
    #[command(subcommand)]
    Service(ServiceCommand),
    /// KVM guests on this node (VM pods' taps).
    #[command(subcommand)]
    Guest(GuestCommand),
    /// The datapath's connection tracking table.
    #[command(subcommand)]
    Conntrack(ConntrackCommand),
    /// Flow events with VM and pod identities (like `hubble observe`).
    Flows(flows::FlowsArgs),
    /// The daemon's Prometheus metrics.
    Metrics(metrics::MetricsArgs),
    /// Create a Service for a KVM guest, as `kubectl expose` does for a pod (Kubernetes API).
    #[command(subcommand)]
    Expose(ExposeCommand),
    /// Print a shell completion script.
    #[command(after_help = "Examples:
  # bash
  {bin} completion bash > /etc/bash_completion.d/tapestry

  # zsh (a directory of your $fpath)
  {bin} completion zsh > \"${fpath[1]}/_tapestry\"

  # fish
  {bin} completion fish > ~/.config/fish/completions/tapestry.fish")]
    Completion {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
enum ServiceCommand {
    /// Frontends with their VM and pod backends, traffic and live flows.
    #[command(visible_alias = "ls")]
    List(service::ListArgs),
}

#[derive(Debug, Subcommand)]
enum GuestCommand {
    /// Every guest: phase, address, traffic, drops.
    #[command(visible_alias = "ls")]
    List(guest::ListArgs),
    /// One guest: tap, MAC, IP, queues, MTU, readiness, counters, DHCP, drops.
    Show(guest::ShowArgs),
}

#[derive(Debug, Subcommand)]
enum ExposeCommand {
    /// A Service selecting the guest by its labels, on its declared port or --port.
    Guest(expose::GuestArgs),
}

#[derive(Debug, Subcommand)]
enum ConntrackCommand {
    /// Live conntrack entries, filtered by service, address or protocol.
    #[command(visible_alias = "ls")]
    List(conntrack::ListArgs),
    /// Remove every conntrack entry (asks first on a terminal).
    Flush(conntrack::FlushArgs),
}

/// How the program was invoked: `kubectl tapestry` when run as the kubectl plugin
/// `kubectl-tapestry`, else its file name.
fn program_name() -> (String, String) {
    let exe = std::env::args_os()
        .next()
        .map(PathBuf::from)
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "tapestry".into());
    let shown = match exe.strip_prefix("kubectl-") {
        Some(plugin) => format!("kubectl {}", plugin.replace('_', "-")),
        None => exe.clone(),
    };
    (exe, shown)
}

/// The command line with the program's name in usage lines and examples.
fn command(shown: &str) -> clap::Command {
    fn name_examples(cmd: clap::Command, shown: &str) -> clap::Command {
        let mut cmd = match cmd.get_after_help().map(|h| h.to_string()) {
            Some(h) => cmd.after_help(h.replace("{bin}", shown)),
            None => cmd,
        };
        let subs: Vec<String> = cmd
            .get_subcommands()
            .map(|s| s.get_name().to_owned())
            .collect();
        for s in subs {
            cmd = cmd.mut_subcommand(s, |c| name_examples(c, shown));
        }
        cmd
    }
    name_examples(Cli::command().display_name(shown).bin_name(shown), shown)
}

fn run(cli: Cli, exe: &str) -> anyhow::Result<()> {
    let ctx = Ctx::new(&cli.socket, Render::detect(cli.color));
    match &cli.command {
        Command::Status(a) => status::run(&ctx, a),
        Command::Service(ServiceCommand::List(a)) => service::list(&ctx, a),
        Command::Guest(GuestCommand::List(a)) => guest::list(&ctx, a),
        Command::Guest(GuestCommand::Show(a)) => guest::show(&ctx, a),
        Command::Conntrack(ConntrackCommand::List(a)) => conntrack::list(&ctx, a),
        Command::Conntrack(ConntrackCommand::Flush(a)) => conntrack::flush(&ctx, a),
        Command::Flows(a) => flows::run(&ctx, a),
        Command::Metrics(a) => metrics::run(&ctx, a),
        Command::Expose(ExposeCommand::Guest(a)) => expose::guest(a),
        Command::Completion { shell } => {
            let mut cmd = Cli::command();
            clap_complete::generate(*shell, &mut cmd, exe, &mut std::io::stdout());
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    // Die quietly on a closed pipe (`tapestry flows -f | head`), as other Unix tools do.
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let (exe, shown) = program_name();
    let matches = command(&shown).get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    match run(cli, &exe) {
        Ok(()) => ExitCode::SUCCESS,
        // The API server's refusals read as kubectl prints them.
        Err(e) if e.is::<expose::FromServer>() => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {}", describe_error(&e));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        command("tapestry").debug_assert();
    }

    #[test]
    fn examples_name_the_program() {
        let mut cmd = command("kubectl tapestry");
        let help = cmd
            .find_subcommand_mut("service")
            .unwrap()
            .find_subcommand_mut("list")
            .unwrap()
            .render_long_help()
            .to_string();
        assert!(
            help.contains("kubectl tapestry service list --service web"),
            "{help}"
        );
        assert!(!help.contains("{bin}"), "{help}");
    }
}
