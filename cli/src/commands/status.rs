//! `tapestry status`: is the daemon healthy, where its state comes from, what is attached and
//! pinned, how full the maps are, and what the datapath counted and dropped.

use anyhow::Result;
use tapestry_api::{client::ClientError, types::Status};

use crate::{
    Ctx,
    output::{self, Cell, Fields, Format, OutputArgs, Paint, Render, Table, WatchArgs},
};

#[derive(Clone, Debug, Default, clap::Args)]
#[command(after_help = "Examples:
  # Health, source, interfaces, maps, counters, drops
  {bin} status

  # Every drop reason, zeros included
  {bin} status -o wide

  # The daemon's /v1/status object
  {bin} status -o json

  # Redraw every 2 seconds
  {bin} status --watch")]
pub struct StatusArgs {
    #[command(flatten)]
    pub output: OutputArgs,
    #[command(flatten)]
    pub watch: WatchArgs,
}

/// `None` when /healthz says the daemon is up and has programmed its desired state; else why not.
pub type Health = Option<String>;

pub fn run(ctx: &Ctx, args: &StatusArgs) -> Result<()> {
    output::print_or_watch(args.watch.watch, "tapestry status", || {
        let health = match ctx.client.healthz() {
            Ok(()) => None,
            Err(ClientError::Api { message, .. }) => Some(message.trim().to_owned()),
            Err(e) => return Err(e.into()),
        };
        let status = ctx.client.status()?;
        render(&status, &health, args.output.output, &ctx.render)
    })
}

pub fn render(st: &Status, health: &Health, format: Format, r: &Render) -> Result<String> {
    if let Some(s) = output::structured(format, st) {
        return s;
    }
    let wide = format == Format::Wide;
    let r = &r.for_format(format);
    let mut out = String::new();

    let mut f = Fields::new();
    f.add(
        "Daemon",
        match health {
            None => Cell::new(format!("healthy (tapestryd {})", st.version), Paint::Green),
            Some(why) => Cell::new(format!("unhealthy: {why}"), Paint::Red),
        },
    );
    f.add("Mode", st.mode.as_str());
    f.add("Source", st.source.as_str());
    f.add("Generation", st.generation.to_string());
    f.add(
        "Last error",
        match &st.last_error {
            None => Cell::from("none"),
            Some(e) => Cell::new(e.clone(), Paint::Red),
        },
    );
    f.add(
        "Services",
        format!("{} services, {} backends", st.services, st.backends),
    );
    f.add(
        "Flow events",
        if st.flow_events {
            "on"
        } else {
            "off (start tapestryd with --flow-events)"
        },
    );
    f.add(
        "Pins",
        Cell::new(
            format!(
                "{} ({})",
                st.bpffs_dir,
                if st.program_pinned {
                    "program pinned"
                } else {
                    "program NOT pinned"
                }
            ),
            if st.program_pinned {
                Paint::None
            } else {
                Paint::Red
            },
        ),
    );
    out.push_str(&f.render(r));

    out.push('\n');
    out.push_str(&output::heading(
        r,
        &format!("Interfaces ({} attached)", st.attachments.len()),
    ));
    if st.attachments.is_empty() {
        out.push_str("  none: no endpoint has the datapath yet\n");
    } else {
        let mut t = Table::new().indent(2).col("IFINDEX").right().col("NAME");
        for a in &st.attachments {
            t.row(vec![a.ifindex.to_string().into(), a.ifname.clone().into()]);
        }
        out.push_str(&t.render(r));
    }

    out.push('\n');
    out.push_str(&output::heading(r, "Maps"));
    let mut t = Table::new()
        .indent(2)
        .col("MAP")
        .col("ENTRIES")
        .right()
        .col("CAPACITY")
        .right()
        .col("FILL")
        .right()
        .col("EVICTED")
        .right()
        .col("PINNED");
    for m in &st.maps {
        let fill = if m.max_entries == 0 {
            0.0
        } else {
            m.entries as f64 / m.max_entries as f64
        };
        let paint = match fill {
            f if f >= 0.95 => Paint::Red,
            f if f >= 0.8 => Paint::Yellow,
            _ => Paint::None,
        };
        t.row(vec![
            m.name.clone().into(),
            thousands(m.entries).into(),
            thousands(m.max_entries).into(),
            Cell::new(output::percent(m.entries, m.max_entries), paint),
            // "-": nothing counts this map's evictions.
            m.evicted.map_or_else(|| "-".into(), thousands).into(),
            Cell::new(
                output::yes_no(m.pinned),
                if m.pinned { Paint::None } else { Paint::Red },
            ),
        ]);
    }
    out.push_str(&t.render(r));

    out.push('\n');
    out.push_str(&output::heading(r, "Datapath counters"));
    let mut t = Table::new().indent(2).col("COUNTER").col("VALUE").right();
    for (name, v) in &st.counters {
        let paint = if name == "events_lost" {
            Paint::alarm(*v)
        } else {
            Paint::None
        };
        t.row(vec![name.clone().into(), Cell::new(thousands(*v), paint)]);
    }
    out.push_str(&t.render(r));

    out.push('\n');
    let total: u64 = st.drops.values().sum();
    out.push_str(&output::heading(
        r,
        &format!("Drops by reason ({} packets)", thousands(total)),
    ));
    let shown: Vec<_> = st.drops.iter().filter(|(_, v)| wide || **v > 0).collect();
    if shown.is_empty() {
        out.push_str("  none\n");
    } else {
        let mut t = Table::new().indent(2).col("REASON").col("PACKETS").right();
        for (reason, v) in shown {
            t.row(vec![
                reason.clone().into(),
                Cell::new(thousands(*v), Paint::alarm(*v)),
            ]);
        }
        out.push_str(&t.render(r));
    }
    Ok(out)
}

/// An exact count, digits grouped: 1,234,567.
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
