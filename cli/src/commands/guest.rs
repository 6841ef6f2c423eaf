//! `tapestry guest list` / `tapestry guest show NAME`: the KVM guests on this node (VM pods'
//! taps), their readiness, counters, DHCP and the frames dropped from them.

use anyhow::{Result, bail};
use tapestry_api::types::{GuestInfo, GuestPhase};

use crate::{
    Ctx,
    commands::{list_or_none, status::thousands},
    output::{self, Cell, Fields, Format, OutputArgs, Paint, Render, Table, WatchArgs},
};

#[derive(Clone, Debug, Default, clap::Args)]
#[command(after_help = "Examples:
  # Every guest: phase, address, traffic, drops
  {bin} guest list

  # MAC, MTU, queues, bytes, DHCP, readiness reason
  {bin} guest list -o wide

  # The daemon's /v1/guests objects
  {bin} guest list -o json

  # Redraw every 2 seconds
  {bin} guest list -w")]
pub struct ListArgs {
    #[command(flatten)]
    pub output: OutputArgs,
    #[command(flatten)]
    pub watch: WatchArgs,
}

#[derive(Clone, Debug, Default, clap::Args)]
#[command(after_help = "Examples:
  # By pod name
  {bin} guest show my-vm

  # By namespace and name
  {bin} guest show default/my-vm

  # The daemon's object for it
  {bin} guest show my-vm -o yaml")]
pub struct ShowArgs {
    /// The guest: its pod's name, `namespace/name`, or its container id.
    #[arg(value_name = "NAME")]
    pub name: String,
    #[command(flatten)]
    pub output: OutputArgs,
}

pub fn list(ctx: &Ctx, args: &ListArgs) -> Result<()> {
    output::print_or_watch(args.watch.watch, "tapestry guest list", || {
        render_list(&ctx.client.guests()?, args.output.output, &ctx.render)
    })
}

pub fn show(ctx: &Ctx, args: &ShowArgs) -> Result<()> {
    let guests = ctx.client.guests()?;
    let g = find(&guests, &args.name)?;
    output::print_flush(&render_one(g, args.output.output, &ctx.render)?)
}

fn qualified(g: &GuestInfo) -> String {
    match &g.namespace {
        Some(ns) => format!("{ns}/{}", g.name),
        None => g.name.clone(),
    }
}

/// The guest called `name` (pod name, `namespace/name` or container id); an unknown or
/// ambiguous name is an error that says what exists.
pub fn find<'a>(guests: &'a [GuestInfo], name: &str) -> Result<&'a GuestInfo> {
    let matches: Vec<&GuestInfo> = guests
        .iter()
        .filter(|g| g.name == name || qualified(g) == name || g.container_id == name)
        .collect();
    match matches.as_slice() {
        [g] => Ok(g),
        [] => {
            let known: Vec<String> = guests.iter().map(qualified).collect();
            bail!(
                "no guest named {name:?} on this node (guests: {})",
                list_or_none(known.iter().map(String::as_str))
            )
        }
        many => {
            let which: Vec<String> = many.iter().map(|g| qualified(g)).collect();
            bail!(
                "{name:?} names several guests ({}): give namespace/name",
                which.join(", ")
            )
        }
    }
}

fn phase_paint(phase: GuestPhase) -> Paint {
    if phase == GuestPhase::Ready {
        Paint::Green
    } else {
        Paint::Yellow
    }
}

fn drops_total(g: &GuestInfo) -> u64 {
    g.drops.values().sum()
}

pub fn render_list(guests: &[GuestInfo], format: Format, r: &Render) -> Result<String> {
    if let Some(s) = output::structured(format, guests) {
        return s;
    }
    if guests.is_empty() {
        return Ok("No guests on this node.\n".into());
    }
    let wide = format == Format::Wide;
    let r = &r.for_format(format);
    let mut t = Table::new();
    if wide {
        t = t.col("NAMESPACE");
    }
    t = t.col("NAME").flex().col("PHASE").col("IP");
    if wide {
        t = t
            .col("MAC")
            .col("TAP")
            .col("MTU")
            .right()
            .col("QUEUES")
            .right();
    } else {
        t = t.col("TAP");
    }
    t = t.col("DHCP").col("RX").right().col("TX").right();
    if wide {
        t = t.col("RX-BYTES").right().col("TX-BYTES").right();
    }
    t = t.col("DROPS").right();
    if wide {
        t = t.col("REASON");
    }
    for g in guests {
        let mut row: Vec<Cell> = Vec::new();
        if wide {
            row.push(output::or_dash(g.namespace.as_deref()).into());
        }
        row.extend([
            Cell::new(g.name.clone(), Paint::Bold),
            Cell::new(g.phase.as_str(), phase_paint(g.phase)),
            g.ip.clone().into(),
        ]);
        if wide {
            row.extend([
                g.mac.to_string().into(),
                g.tap.clone().into(),
                g.mtu.to_string().into(),
                g.queues.to_string().into(),
            ]);
        } else {
            row.push(g.tap.clone().into());
        }
        let n = |v: u64| {
            if wide {
                v.to_string()
            } else {
                output::count(v)
            }
        };
        row.extend([
            (if g.dhcp_bound { "bound" } else { "-" }).into(),
            n(g.rx_packets).into(),
            n(g.tx_packets).into(),
        ]);
        if wide {
            row.extend([g.rx_bytes.to_string().into(), g.tx_bytes.to_string().into()]);
        }
        let drops = drops_total(g);
        row.push(Cell::new(n(drops), Paint::alarm(drops)));
        if wide {
            row.push(g.reason.clone().into());
        }
        t.row(row);
    }
    Ok(t.render(r))
}

pub fn render_one(g: &GuestInfo, format: Format, r: &Render) -> Result<String> {
    if let Some(s) = output::structured(format, g) {
        return s;
    }
    let mut f = Fields::new();
    f.add("Name", Cell::new(g.name.clone(), Paint::Bold));
    f.add("Namespace", output::or_dash(g.namespace.as_deref()));
    f.add("Container", g.container_id.as_str());
    f.add("Netns", g.netns.as_str());
    f.add("Tap", g.tap.as_str());
    f.add("MAC", g.mac.to_string());
    f.add("IP", g.ip.as_str());
    f.add("MTU", g.mtu.to_string());
    f.add("Queues", g.queues.to_string());
    f.add("Phase", Cell::new(g.phase.as_str(), phase_paint(g.phase)));
    f.add("Reason", g.reason.as_str());
    f.add(
        "DHCP",
        format!(
            "{} ({} messages from the guest)",
            if g.dhcp_bound { "bound" } else { "not bound" },
            thousands(g.dhcp_messages)
        ),
    );
    if let Some(m) = &g.migration {
        let from = match &m.source_node {
            Some(n) => format!("pod {} on {n}", m.source_pod),
            None => format!("pod {}", m.source_pod),
        };
        f.add(
            "Migration",
            match (&m.switchover, m.live, m.blackout_ms) {
                (Some(t), true, Some(b)) => format!(
                    "arrived from {from}, live here since {t}; the network reached it {b} ms \
                     after"
                ),
                (Some(t), true, None) => format!(
                    "arrived from {from}, live here since {t}; nothing from the network yet"
                ),
                _ => format!("incoming from {from}: dark until the guest switches over"),
            },
        );
    }
    f.add(
        "Announces",
        format!(
            "{} (RARP from the guest's MAC, as QEMU sends after a migration)",
            thousands(g.announces)
        ),
    );
    f.add(
        "RX",
        format!(
            "{} packets, {} (from the guest)",
            thousands(g.rx_packets),
            output::bytes(g.rx_bytes)
        ),
    );
    f.add(
        "TX",
        format!(
            "{} packets, {} (to the guest)",
            thousands(g.tx_packets),
            output::bytes(g.tx_bytes)
        ),
    );
    let total = drops_total(g);
    f.add(
        "Drops",
        Cell::new(
            format!("{} frames from the guest", thousands(total)),
            Paint::alarm(total),
        ),
    );
    let mut out = f.render(r);
    if total > 0 {
        let mut t = Table::new().indent(2).col("REASON").col("FRAMES").right();
        for (reason, n) in g.drops.iter().filter(|(_, n)| **n > 0) {
            t.row(vec![
                reason.clone().into(),
                Cell::new(thousands(*n), Paint::Red),
            ]);
        }
        out.push_str(&t.render(r));
    }
    Ok(out)
}
