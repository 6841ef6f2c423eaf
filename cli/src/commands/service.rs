//! `tapestry service list`: every frontend with its backends, each backend a VM, a pod, a host
//! (a node's own address) or an external address, with its name and node, weight, state, traffic
//! and live flows.

use anyhow::{Result, bail};
use tapestry_api::types::{BackendInfo, BackendKind, BackendState, ServiceInfo, SessionAffinity};

use crate::{
    Ctx,
    commands::list_or_none,
    output::{self, Cell, Format, OutputArgs, Paint, Render, Table, WatchArgs},
};

#[derive(Clone, Debug, Default, clap::Args)]
#[command(after_help = "Examples:
  # Every service and its backends
  {bin} service list

  # One service
  {bin} service list --service web

  # Ids, exact counters, flows created
  {bin} service list -o wide

  # The daemon's /v1/services objects
  {bin} service list -o json

  # Redraw every 2 seconds
  {bin} service list -w")]
pub struct ListArgs {
    /// Only the service with this name.
    #[arg(short = 's', long, value_name = "NAME")]
    pub service: Option<String>,
    #[command(flatten)]
    pub output: OutputArgs,
    #[command(flatten)]
    pub watch: WatchArgs,
}

pub fn list(ctx: &Ctx, args: &ListArgs) -> Result<()> {
    output::print_or_watch(args.watch.watch, "tapestry service list", || {
        let services = select(ctx.client.services()?, args.service.as_deref())?;
        render(&services, args.output.output, &ctx.render)
    })
}

/// The services named `name` (all without a name); an unknown name is an error that lists the
/// known ones.
pub fn select(services: Vec<ServiceInfo>, name: Option<&str>) -> Result<Vec<ServiceInfo>> {
    let Some(name) = name else {
        return Ok(services);
    };
    let known = list_or_none(services.iter().map(|s| s.name.as_str()));
    let found: Vec<ServiceInfo> = services.into_iter().filter(|s| s.name == name).collect();
    if found.is_empty() {
        bail!("no service named {name:?} on this node (services: {known})");
    }
    Ok(found)
}

fn service_name(s: &ServiceInfo) -> String {
    if s.name.is_empty() {
        // Restored from the pinned maps, not in the desired state (yet).
        format!("(id {})", s.id)
    } else {
        s.name.clone()
    }
}

fn frontend(s: &ServiceInfo) -> String {
    format!("{}:{}/{}", s.vip, s.port, s.protocol)
}

fn affinity(s: &ServiceInfo) -> String {
    if s.session_affinity == SessionAffinity::None {
        "None".into()
    } else {
        format!(
            "{}/{}",
            s.session_affinity,
            output::age(s.session_affinity_timeout_seconds as f64)
        )
    }
}

/// `vm/name`, `pod/name`, `host`, `external`...: what the backend is, and its name if it has one.
pub fn endpoint(b: &BackendInfo) -> String {
    match &b.name {
        Some(n) if !n.is_empty() => format!("{}/{n}", b.kind),
        _ => b.kind.to_string(),
    }
}

fn kind_paint(kind: BackendKind) -> Paint {
    if kind == BackendKind::Vm {
        Paint::Cyan
    } else {
        Paint::None
    }
}

/// The services as `format`. Each backend's NODE is the daemon's: where the desired state puts it
/// (an EndpointSlice endpoint's `nodeName`), this node for an endpoint registered here, `-` when
/// unknown.
pub fn render(services: &[ServiceInfo], format: Format, r: &Render) -> Result<String> {
    if let Some(s) = output::structured(format, services) {
        return s;
    }
    if services.is_empty() {
        return Ok("No services.\n".into());
    }
    let wide = format == Format::Wide;
    let r = &r.for_format(format);
    let n = |v: u64| {
        if wide {
            v.to_string()
        } else {
            output::count(v)
        }
    };
    let b = |v: u64| {
        if wide {
            v.to_string()
        } else {
            output::bytes(v)
        }
    };

    let mut t = Table::new().col("SERVICE").flex();
    if wide {
        t = t.col("ID").right();
    }
    t = t
        .col("FRONTEND")
        .col("ALGORITHM")
        .col("AFFINITY")
        .col("BACKENDS")
        .right()
        .col("FLOWS")
        .right();
    if wide {
        t = t
            .col("CREATED")
            .right()
            .col("PACKETS")
            .right()
            .col("BYTES")
            .right();
    }
    for s in services {
        let mut row: Vec<Cell> = vec![Cell::new(service_name(s), Paint::Bold)];
        if wide {
            row.push(s.id.to_string().into());
        }
        let healthy = s.active_backends > 0;
        row.extend([
            frontend(s).into(),
            s.algorithm.as_str().into(),
            affinity(s).into(),
            Cell::new(
                format!("{}/{}", s.active_backends, s.backends.len()),
                if healthy { Paint::None } else { Paint::Red },
            ),
            n(s.active_flows).into(),
        ]);
        if wide {
            row.extend([
                n(s.traffic.flows).into(),
                n(s.traffic.packets).into(),
                b(s.traffic.bytes).into(),
            ]);
        }
        t.row(row);
    }
    let mut out = t.render(r);

    for s in services {
        out.push('\n');
        out.push_str(&output::heading(
            r,
            &format!("{} ({})", service_name(s), frontend(s)),
        ));
        if s.backends.is_empty() {
            out.push_str("  no backends: new connections are refused\n");
            continue;
        }
        let mut t = Table::new().indent(2);
        if wide {
            t = t.col("ID").right();
        }
        t = t.col("BACKEND");
        t = if wide {
            t.col("KIND").col("NAME")
        } else {
            t.col("ENDPOINT").flex()
        };
        t = t
            .col("NODE")
            .flex()
            .col("WEIGHT")
            .right()
            .col("STATE")
            .col("PACKETS")
            .right()
            .col("BYTES")
            .right();
        if wide {
            t = t.col("CREATED").right();
        }
        t = t.col("FLOWS").right();
        for be in &s.backends {
            let mut row: Vec<Cell> = Vec::new();
            if wide {
                row.push(be.id.to_string().into());
            }
            row.push(format!("{}:{}", be.ip, be.port).into());
            if wide {
                row.push(Cell::new(be.kind.as_str(), kind_paint(be.kind)));
                row.push(output::or_dash(be.name.as_deref()).into());
            } else {
                row.push(Cell::new(endpoint(be), kind_paint(be.kind)));
            }
            row.extend([
                output::or_dash(be.node.as_deref()).into(),
                be.weight.to_string().into(),
                Cell::new(
                    be.state.as_str(),
                    if be.state == BackendState::Active {
                        Paint::Green
                    } else {
                        Paint::Yellow
                    },
                ),
                n(be.traffic.packets).into(),
                b(be.traffic.bytes).into(),
            ]);
            if wide {
                row.push(n(be.traffic.flows).into());
            }
            row.push(n(be.active_flows).into());
            t.row(row);
        }
        out.push_str(&t.render(r));
    }
    Ok(out)
}
