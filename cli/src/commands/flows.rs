//! `tapestry flows`: the datapath's flow events with VM and pod identities, like `hubble
//! observe`: one line per event, `--follow` for new ones as they happen.
//!
//! Events come from tapestryd's bounded flow log (`GET /v1/flows?since=N`), which is filled only
//! when the daemon runs with `--flow-events`. Following polls every 200 ms.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use tapestry_api::types::{
    EndpointKind, FlowKind, FlowRecord, FlowsResponse, GuestMove, Identity, Verdict,
};
use tapestry_k8s::duration;

use crate::{
    Ctx,
    output::{self, Format, OutputArgs, Paint, Render},
};

/// How often `--follow` asks for new events.
pub const POLL: Duration = Duration::from_millis(200);

/// `--verdict`, offered as clap possible values, parsed into the API's [`Verdict`].
fn verdict_parser() -> impl clap::builder::TypedValueParser<Value = Verdict> {
    use clap::builder::TypedValueParser as _;
    clap::builder::PossibleValuesParser::new(Verdict::ALL.iter().map(|v| v.as_str()))
        .map(|s| s.parse::<Verdict>().expect("a possible value"))
}

/// Which events to show.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct Filter {
    /// Only events of this service.
    #[arg(short = 's', long, value_name = "NAME")]
    pub service: Option<String>,
    /// Only events from, to or balanced to this VM guest (its pod's name, or namespace/name).
    #[arg(long, value_name = "NAME")]
    pub guest: Option<String>,
    /// Only events from, to or balanced to this pod (name, or namespace/name).
    #[arg(long, value_name = "NAME")]
    pub pod: Option<String>,
    /// Only forwarded or only dropped events.
    #[arg(long, value_parser = verdict_parser())]
    pub verdict: Option<Verdict>,
    /// Only events of the last DURATION (e.g. 30s, 5m, 1h30m).
    #[arg(long, value_name = "DURATION", value_parser = duration::parse_lenient)]
    pub since: Option<Duration>,
}

fn identity_is(id: &Option<Identity>, kind: EndpointKind, name: &str) -> bool {
    id.as_ref().is_some_and(|id| {
        id.kind == kind
            && (id.name == name
                || id
                    .namespace
                    .as_ref()
                    .is_some_and(|ns| format!("{ns}/{}", id.name) == name))
    })
}

fn involves(f: &FlowRecord, kind: EndpointKind, name: &str) -> bool {
    [&f.src_identity, &f.dst_identity, &f.backend_identity]
        .into_iter()
        .any(|id| identity_is(id, kind, name))
}

impl Filter {
    /// `cutoff_ms`: the oldest time `--since` lets through (Unix ms).
    pub fn matches(&self, f: &FlowRecord, cutoff_ms: Option<u64>) -> bool {
        if let Some(s) = &self.service
            && f.service.as_deref() != Some(s.as_str())
        {
            return false;
        }
        if let Some(g) = &self.guest
            && !involves(f, EndpointKind::Vm, g)
        {
            return false;
        }
        if let Some(p) = &self.pod
            && !involves(f, EndpointKind::Pod, p)
        {
            return false;
        }
        if let Some(v) = self.verdict
            && f.verdict != v
        {
            return false;
        }
        if let Some(c) = cutoff_ms
            && f.unix_ms < c
        {
            return false;
        }
        true
    }
}

#[derive(Clone, Debug, Default, clap::Args)]
#[command(after_help = "Each line: time, verdict, protocol, then
  source (pod|vm name on node) -> destination (service name) => backend (kind name on node)
and the reason of a drop. The source's node is the one that balanced the flow; the backend's is
where the desired state puts it (an EndpointSlice endpoint's nodeName). Flow events are recorded only when tapestryd runs
with --flow-events; it keeps the last 8192.

Examples:
  # Every event the daemon holds
  {bin} flows

  # New events as they happen (Ctrl-C to stop)
  {bin} flows --follow

  # One service's new flows
  {bin} flows -f --service web

  # A VM's flows of the last 5 minutes
  {bin} flows --guest my-vm --since 5m

  # Drops, with their reason
  {bin} flows --verdict dropped

  # One JSON object per line (jq-friendly)
  {bin} flows -f -o json")]
pub struct FlowsArgs {
    /// Keep running and print new events as they happen.
    #[arg(short = 'f', long)]
    pub follow: bool,
    #[command(flatten)]
    pub filter: Filter,
    /// Start with the last N matching events the daemon holds (--follow alone starts with
    /// none; without --follow all are shown).
    #[arg(long, value_name = "N")]
    pub last: Option<usize>,
    #[command(flatten)]
    pub output: OutputArgs,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn note(msg: &str) {
    eprintln!("{msg}");
}

pub fn run(ctx: &Ctx, args: &FlowsArgs) -> Result<()> {
    let status = ctx.client.status()?;
    if !status.flow_events {
        note(
            "note: tapestryd runs without --flow-events: it records no flow events (restart it \
             with --flow-events to see them)",
        );
    }
    let cutoff = args
        .filter
        .since
        .map(|d| now_ms().saturating_sub(d.as_millis() as u64));
    let offset = output::local_offset_secs((now_ms() / 1000) as i64);
    let print = |f: &FlowRecord| -> Result<()> {
        output::print_flush(&render_event(f, args.output.output, &ctx.render, offset)?)
    };

    let first = ctx.client.flows(0)?;
    if first.lost > 0 {
        note(&format!(
            "note: tapestryd has lost {} flow events since it started (ring buffer full, or its \
             log of 8192 overflowed before a reader came)",
            first.lost
        ));
    }
    if let Some(name) = &args.filter.service
        && !first
            .flows
            .iter()
            .any(|f| f.service.as_deref() == Some(name))
    {
        let services = ctx.client.services()?;
        if !services.iter().any(|s| &s.name == name) {
            note(&format!(
                "warning: no service named {name:?} on this node (services: {}); showing only \
                 events that name it",
                crate::commands::list_or_none(services.iter().map(|s| s.name.as_str()))
            ));
        }
    }
    // History: everything held without --follow; with it, only what --since or --last asks.
    let want_history = !args.follow || args.filter.since.is_some() || args.last.is_some();
    if want_history {
        for f in history(&first, &args.filter, cutoff, args.last) {
            print(f)?;
        }
    }
    if !args.follow {
        if history(&first, &args.filter, cutoff, args.last).is_empty() {
            note("No flow events match.");
        }
        return Ok(());
    }

    let (mut next, mut lost) = (first.next, first.lost);
    let mut unreachable = false;
    loop {
        std::thread::sleep(POLL);
        let resp = match ctx.client.flows(next) {
            Ok(r) => r,
            Err(e) => {
                if !unreachable {
                    note(&format!(
                        "warning: {}; retrying",
                        crate::describe_error(&e.into())
                    ));
                    unreachable = true;
                }
                continue;
            }
        };
        if unreachable {
            note("tapestryd answers again");
            unreachable = false;
        }
        if resp.next < next {
            // A restarted daemon starts a new log: follow it from its beginning.
            note("note: tapestryd restarted; following its new flow log");
            next = 0;
            lost = resp.lost;
            continue;
        }
        if resp.lost > lost {
            note(&format!(
                "warning: {} flow events lost (ring buffer full or log overflowed)",
                resp.lost - lost
            ));
            lost = resp.lost;
        }
        for f in resp.flows.iter().filter(|f| args.filter.matches(f, cutoff)) {
            print(f)?;
        }
        next = resp.next;
    }
}

/// The held events that match, the last `last` of them when asked.
pub fn history<'a>(
    resp: &'a FlowsResponse,
    filter: &Filter,
    cutoff_ms: Option<u64>,
    last: Option<usize>,
) -> Vec<&'a FlowRecord> {
    let matching: Vec<&FlowRecord> = resp
        .flows
        .iter()
        .filter(|f| filter.matches(f, cutoff_ms))
        .collect();
    let skip = last.map_or(0, |n| matching.len().saturating_sub(n));
    matching.into_iter().skip(skip).collect()
}

/// ` (pod name on node)`: who an address is and where, as far as the daemon knows; for a
/// guest that moved by live migration, also from where and when (`, moved from node at time`).
fn identity(
    id: &Option<Identity>,
    node: Option<&str>,
    moved: Option<&GuestMove>,
    wide: bool,
    offset_secs: i64,
) -> String {
    let who = id.as_ref().map(|id| match (&id.namespace, wide) {
        (Some(ns), true) => format!("{} {ns}/{}", id.kind, id.name),
        _ => format!("{} {}", id.kind, id.name),
    });
    let place = match (who, node) {
        (None, None) => return String::new(),
        (Some(who), None) => who,
        (None, Some(node)) => format!("on {node}"),
        (Some(who), Some(node)) => format!("{who} on {node}"),
    };
    match moved {
        Some(m) => {
            let at = if wide {
                m.switchover.clone()
            } else {
                output::event_time(m.switchover_unix_ms, offset_secs)
            };
            format!(" ({place}, moved from {} at {at})", m.from_node)
        }
        None => format!(" ({place})"),
    }
}

/// One event as printed: a line for table and wide (`hubble observe` style), a JSON object on
/// one line, or a YAML document.
pub fn render_event(
    f: &FlowRecord,
    format: Format,
    r: &Render,
    offset_secs: i64,
) -> Result<String> {
    match format {
        Format::Json => return Ok(format!("{}\n", serde_json::to_string(f)?)),
        Format::Yaml => return Ok(format!("---\n{}", output::to_yaml(f)?)),
        Format::Table | Format::Wide => {}
    }
    let wide = format == Format::Wide;
    let mut line = if wide {
        format!("{}  #{}  ", f.time, f.seq)
    } else {
        format!("{}  ", output::event_time(f.unix_ms, offset_secs))
    };
    let dropped = f.verdict == Verdict::Dropped;
    let verdict = format!("{:<9}", f.verdict.as_str().to_uppercase());
    line.push_str(&r.paint(&verdict, if dropped { Paint::Red } else { Paint::Green }));
    if wide {
        line.push_str(&format!("  {:<10}", f.kind));
    }
    line.push_str(&format!(
        "  {:<3}  ",
        f.protocol.map_or("?", |p| p.as_str())
    ));
    line.push_str(&f.src);
    line.push_str(&identity(
        &f.src_identity,
        f.src_node.as_deref(),
        f.src_moved.as_ref(),
        wide,
        offset_secs,
    ));
    line.push_str(" -> ");
    line.push_str(&f.dst);
    match (&f.service, f.service_id) {
        (Some(s), _) => line.push_str(&format!(
            " ({})",
            r.paint(&format!("service {s}"), Paint::Bold)
        )),
        (None, 0) => line.push_str(&identity(&f.dst_identity, None, None, wide, offset_secs)),
        (None, id) => line.push_str(&format!(" (service id {id})")),
    }
    if let Some(b) = &f.backend {
        line.push_str(" => ");
        line.push_str(b);
        line.push_str(&identity(
            &f.backend_identity,
            f.backend_node.as_deref(),
            f.backend_moved.as_ref(),
            wide,
            offset_secs,
        ));
    }
    if f.kind == FlowKind::Reselected && !wide {
        line.push_str(", backend reselected");
    }
    if dropped {
        let reason = f.drop_reason.as_deref().unwrap_or("unknown");
        line.push_str(&format!(
            "  {}",
            r.paint(&format!("drop reason: {reason}"), Paint::Red)
        ));
    }
    if wide {
        line.push_str(&format!("  ifindex {}", f.ifindex));
    }
    line.push('\n');
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(duration::parse_lenient("30"), Ok(Duration::from_secs(30)));
        assert_eq!(duration::parse_lenient("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(duration::parse_lenient("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(
            duration::parse_lenient("1h30m"),
            Ok(Duration::from_secs(5400))
        );
        assert_eq!(
            duration::parse_lenient("2d"),
            Ok(Duration::from_secs(172_800))
        );
        assert_eq!(
            duration::parse_lenient("500ms"),
            Ok(Duration::from_millis(500))
        );
        assert!(duration::parse_lenient("5x").is_err());
        assert!(duration::parse_lenient("m").is_err());
        assert!(duration::parse_lenient("").is_err());
    }
}
