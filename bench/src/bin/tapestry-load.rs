//! `tapestry-load serve|rr|crr`: see `tapestry_bench::load`.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use anyhow::{Result, bail};
use clap::{Args, Parser, Subcommand};
use tapestry_bench::load::{self, ClientOptions, Mode, ServeOptions};

#[derive(Parser)]
#[command(about = "TCP_RR / TCP_CRR load tool with no control channel")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Answer each request with a response until the peer closes.
    Serve {
        /// Port to listen on; repeat for several, or give a range A-B.
        #[arg(long = "port", required = true, value_parser = parse_ports)]
        ports: Vec<Vec<u16>>,
        #[arg(long, default_value = "0.0.0.0")]
        addr: Ipv4Addr,
        #[command(flatten)]
        common: Common,
        /// Exit by itself after this many seconds.
        #[arg(long)]
        max_seconds: Option<f64>,
    },
    /// One connection, request/response ping-pong (TCP_RR).
    Rr(ClientArgs),
    /// Connect, one request/response, close with RST, repeat (TCP_CRR).
    Crr(ClientArgs),
}

#[derive(Args)]
struct Common {
    /// Pin to this CPU (sched_setaffinity).
    #[arg(long)]
    cpu: Option<usize>,
    /// Request size in bytes.
    #[arg(long, default_value_t = 1)]
    request_size: usize,
    /// Response size in bytes.
    #[arg(long, default_value_t = 1)]
    response_size: usize,
}

#[derive(Args)]
struct ClientArgs {
    #[arg(long)]
    target: SocketAddrV4,
    /// Measured seconds (after the warm-up).
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    #[arg(long, default_value_t = 0.3)]
    warmup: f64,
    #[arg(long, default_value_t = 100_000_000)]
    max_transactions: u64,
    #[arg(long, default_value_t = 1000)]
    max_errors: u64,
    /// Timeout of each connect/send/receive, milliseconds.
    #[arg(long, default_value_t = 2000)]
    io_timeout_ms: u64,
    /// Pid of the server process on this host: report CPU time per transaction too.
    #[arg(long)]
    peer_pid: Option<i32>,
    /// Pace at this many transactions per second (default: as fast as it goes).
    #[arg(long)]
    rate: Option<f64>,
    #[command(flatten)]
    common: Common,
}

fn parse_ports(s: &str) -> Result<Vec<u16>, String> {
    let bad = |_| format!("bad port or range {s:?}");
    match s.split_once('-') {
        Some((a, b)) => {
            let (a, b): (u16, u16) = (a.parse().map_err(bad)?, b.parse().map_err(bad)?);
            if a > b || b - a > 1000 {
                return Err(format!("bad port range {s:?}"));
            }
            Ok((a..=b).collect())
        }
        None => Ok(vec![s.parse().map_err(bad)?]),
    }
}

fn client(mode: Mode, a: ClientArgs) -> Result<()> {
    if let Some(cpu) = a.common.cpu {
        load::pin_to_cpu(cpu)?;
    }
    if a.seconds <= 0.0 || a.seconds > 3600.0 {
        bail!("--seconds must be in (0, 3600]");
    }
    let report = load::run_client(
        &ClientOptions {
            mode,
            target: a.target,
            seconds: a.seconds,
            warmup_seconds: a.warmup,
            request_size: a.common.request_size,
            response_size: a.common.response_size,
            max_transactions: a.max_transactions,
            max_errors: a.max_errors,
            io_timeout: Duration::from_millis(a.io_timeout_ms),
            peer_pid: a.peer_pid,
            rate: a.rate,
        },
        a.common.cpu,
    );
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Serve {
            ports,
            addr,
            common,
            max_seconds,
        } => {
            if let Some(cpu) = common.cpu {
                load::pin_to_cpu(cpu)?;
            }
            let ports: Vec<u16> = ports.into_iter().flatten().collect();
            let opts = ServeOptions {
                addr,
                ports: ports.clone(),
                request_size: common.request_size,
                response_size: common.response_size,
                max_seconds,
            };
            load::serve(&opts, || {
                // The orchestrator waits for this line before it starts a client.
                println!(
                    "{}",
                    serde_json::json!({"listening": addr.to_string(), "ports": ports})
                );
            })
        }
        Cmd::Rr(a) => client(Mode::Rr, a),
        Cmd::Crr(a) => client(Mode::Crr, a),
    }
}
