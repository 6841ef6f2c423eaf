//! `tapestry conntrack list|flush`: the datapath's connection tracking entries.
//!
//! A flow has two entries: `forward` (client -> frontend, translated to the backend) and `reply`
//! (backend -> client, translated back to the frontend).

use std::io::{BufRead, Write};

use anyhow::{Result, bail};
use tapestry_api::types::{ConntrackEntry, FlowDirection, Protocol};

use crate::{
    Ctx,
    commands::list_or_none,
    output::{self, Cell, Format, OutputArgs, Paint, Render, Table, WatchArgs},
};

/// `--protocol`: the protocols conntrack holds, offered as clap possible values (so help and
/// completions list them), parsed into the API's one [`Protocol`].
fn protocol_parser() -> impl clap::builder::TypedValueParser<Value = Protocol> {
    use clap::builder::TypedValueParser as _;
    clap::builder::PossibleValuesParser::new(["tcp", "udp"])
        .map(|s| s.parse::<Protocol>().expect("a possible value"))
}

/// Which entries to show.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct Filter {
    /// Only entries of this service.
    #[arg(short = 's', long, value_name = "NAME")]
    pub service: Option<String>,
    /// Only entries whose source is ADDR (an IP or IP:port), before or after translation: a
    /// client, or the backend of a reply entry.
    #[arg(long, value_name = "ADDR")]
    pub src: Option<String>,
    /// Only entries whose destination is ADDR (an IP or IP:port), before or after translation: a
    /// frontend, the backend it was translated to, or the client of a reply entry.
    #[arg(long, value_name = "ADDR")]
    pub dst: Option<String>,
    /// Only entries of this protocol.
    #[arg(short = 'p', long, value_parser = protocol_parser())]
    pub protocol: Option<Protocol>,
}

/// `addr` ("10.0.0.1" or "10.0.0.1:80") names the endpoint `ep` ("10.0.0.1:80").
fn addr_matches(addr: &str, ep: &str) -> bool {
    if addr.contains(':') {
        addr == ep
    } else {
        ep.rsplit_once(':').is_some_and(|(ip, _)| ip == addr)
    }
}

impl Filter {
    pub fn matches(&self, e: &ConntrackEntry) -> bool {
        let forward = e.direction == FlowDirection::Forward;
        if let Some(s) = &self.service
            && e.service.as_deref() != Some(s.as_str())
        {
            return false;
        }
        if let Some(p) = self.protocol
            && p != e.protocol
        {
            return false;
        }
        if let Some(a) = &self.src
            && !(addr_matches(a, &e.src) || (!forward && addr_matches(a, &e.nat)))
        {
            return false;
        }
        if let Some(a) = &self.dst
            && !(addr_matches(a, &e.dst) || (forward && addr_matches(a, &e.nat)))
        {
            return false;
        }
        true
    }
}

#[derive(Clone, Debug, Default, clap::Args)]
#[command(after_help = "Examples:
  # Every live entry
  {bin} conntrack list

  # The TCP flows of one service
  {bin} conntrack list --service web -p tcp

  # A client's flows (and replies from a backend)
  {bin} conntrack list --src 10.22.0.9

  # Flows translated to one backend
  {bin} conntrack list --dst 10.22.0.5:8080

  # Age, flags, service and backend ids
  {bin} conntrack list -o wide

  # The daemon's /v1/conntrack objects
  {bin} conntrack list -o json")]
pub struct ListArgs {
    #[command(flatten)]
    pub filter: Filter,
    #[command(flatten)]
    pub output: OutputArgs,
    #[command(flatten)]
    pub watch: WatchArgs,
}

#[derive(Clone, Debug, Default, clap::Args)]
#[command(
    after_help = "Live flows are not cut: each is balanced anew on its next packet, so \
                        connections may move to another backend (TCP peers then answer RST).

Examples:
  # Asks for confirmation
  {bin} conntrack flush

  # No question (scripts)
  {bin} conntrack flush --yes"
)]
pub struct FlushArgs {
    /// Do not ask for confirmation (required when standard input is not a terminal).
    #[arg(short = 'y', long)]
    pub yes: bool,
}

pub fn list(ctx: &Ctx, args: &ListArgs) -> Result<()> {
    if let Some(name) = &args.filter.service {
        let services = ctx.client.services()?;
        if !services.iter().any(|s| &s.name == name) {
            bail!(
                "no service named {name:?} on this node (services: {})",
                list_or_none(services.iter().map(|s| s.name.as_str()))
            );
        }
    }
    output::print_or_watch(args.watch.watch, "tapestry conntrack list", || {
        let entries: Vec<ConntrackEntry> = ctx
            .client
            .conntrack()?
            .into_iter()
            .filter(|e| args.filter.matches(e))
            .collect();
        render(&entries, args.output.output, &ctx.render)
    })
}

pub fn flush(ctx: &Ctx, args: &FlushArgs) -> Result<()> {
    if !args.yes {
        if !ctx.interactive() {
            bail!(
                "refusing to flush the conntrack table without confirmation: standard input is \
                 not a terminal; pass --yes to flush anyway"
            );
        }
        let n = ctx.client.conntrack()?.len();
        let mut err = std::io::stderr().lock();
        write!(
            err,
            "Flush all {n} conntrack entries on this node (live flows are balanced anew)? [y/N] "
        )?;
        err.flush()?;
        let mut answer = String::new();
        std::io::stdin().lock().read_line(&mut answer)?;
        if !matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes") {
            bail!("aborted: nothing flushed");
        }
    }
    let r = ctx.client.flush_conntrack()?;
    output::print_flush(&format!("Flushed {} conntrack entries.\n", r.removed))
}

fn state(e: &ConntrackEntry) -> String {
    let mut s = vec![if e.closing {
        "closing"
    } else if e.seen_reply {
        "established"
    } else {
        "new"
    }];
    if e.hairpin {
        s.push("hairpin");
    }
    s.join(",")
}

pub fn render(entries: &[ConntrackEntry], format: Format, r: &Render) -> Result<String> {
    if let Some(s) = output::structured(format, entries) {
        return s;
    }
    if entries.is_empty() {
        return Ok("No conntrack entries.\n".into());
    }
    let wide = format == Format::Wide;
    let r = &r.for_format(format);
    let mut t = Table::new()
        .col("PROTO")
        .col("DIR")
        .col("SOURCE")
        .col("DESTINATION")
        .col("NAT")
        .col("SERVICE")
        .flex();
    if wide {
        t = t
            .col("SVC-ID")
            .right()
            .col("BACKEND-ID")
            .right()
            .col("AGE")
            .right();
    }
    t = t.col("IDLE").right();
    if wide {
        t = t.col("STATE");
    }
    for e in entries {
        let dir = match (wide, e.direction) {
            (false, FlowDirection::Forward) => "fwd",
            (_, d) => d.as_str(),
        };
        let mut row: Vec<Cell> = vec![
            e.protocol.as_str().into(),
            Cell::new(dir, Paint::Dim),
            e.src.clone().into(),
            e.dst.clone().into(),
            e.nat.clone().into(),
            Cell::new(output::or_dash(e.service.as_deref()), Paint::Bold),
        ];
        if wide {
            row.extend([
                e.service_id.to_string().into(),
                e.backend_id.to_string().into(),
                output::age(e.age_seconds).into(),
            ]);
        }
        row.push(output::age(e.idle_seconds).into());
        if wide {
            let paint = if e.closing {
                Paint::Yellow
            } else {
                Paint::None
            };
            row.push(Cell::new(state(e), paint));
        }
        t.row(row);
    }
    let mut out = t.render(r);
    let flows = entries
        .iter()
        .filter(|e| e.direction == FlowDirection::Forward)
        .count();
    out.push_str(&format!(
        "\n{} entries, {flows} flows (forward entries)\n",
        entries.len()
    ));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(direction: &str, src: &str, dst: &str, nat: &str) -> ConntrackEntry {
        ConntrackEntry {
            direction: direction.parse().unwrap(),
            protocol: Protocol::Tcp,
            src: src.into(),
            dst: dst.into(),
            nat: nat.into(),
            service_id: 1,
            service: Some("web".into()),
            backend_id: 1,
            idle_seconds: 1.0,
            age_seconds: 2.0,
            closing: false,
            hairpin: false,
            seen_reply: true,
        }
    }

    #[test]
    fn addresses_match_before_or_after_translation() {
        let fwd = entry("forward", "10.0.0.9:4000", "10.96.0.1:80", "10.0.0.5:8080");
        let rep = entry("reply", "10.0.0.5:8080", "10.0.0.9:4000", "10.96.0.1:80");
        let f = |src: Option<&str>, dst: Option<&str>| Filter {
            src: src.map(Into::into),
            dst: dst.map(Into::into),
            ..Default::default()
        };
        assert!(f(Some("10.0.0.9"), None).matches(&fwd));
        assert!(!f(Some("10.0.0.9"), None).matches(&rep));
        assert!(f(Some("10.0.0.5"), None).matches(&rep));
        assert!(f(Some("10.96.0.1:80"), None).matches(&rep));
        assert!(f(None, Some("10.0.0.5:8080")).matches(&fwd));
        assert!(f(None, Some("10.96.0.1")).matches(&fwd));
        assert!(!f(None, Some("10.96.0.1:81")).matches(&fwd));
        assert!(f(None, Some("10.0.0.9")).matches(&rep));
        let udp = Filter {
            protocol: Some(Protocol::Udp),
            ..Default::default()
        };
        assert!(!udp.matches(&fwd));
        let svc = |s: &str| Filter {
            service: Some(s.into()),
            ..Default::default()
        };
        assert!(svc("web").matches(&fwd) && !svc("dns").matches(&fwd));
    }
}
