//! Prometheus metrics, read from the datapath's counters at scrape time.

use anyhow::Result;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric, text::encode},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};

use tapestry_api::types::GuestPhase;

use crate::views::Views;

type Labels = Vec<(&'static str, String)>;

#[derive(Debug, Default)]
struct Family {
    name: &'static str,
    help: &'static str,
    kind: Option<MetricType>,
    samples: Vec<(Labels, u64)>,
}

/// One scrape's values, encoded by prometheus-client.
#[derive(Debug, Default)]
struct Snapshot {
    families: Vec<Family>,
}

impl Snapshot {
    fn family(&mut self, name: &'static str, help: &'static str, kind: MetricType) -> &mut Family {
        self.families.push(Family {
            name,
            help,
            kind: Some(kind),
            samples: Vec::new(),
        });
        self.families.last_mut().expect("just pushed")
    }
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for f in &self.families {
            let kind = f.kind.unwrap_or(MetricType::Gauge);
            let mut m = encoder.encode_descriptor(f.name, f.help, None, kind)?;
            for (labels, v) in &f.samples {
                let e = m.encode_family(labels)?;
                if matches!(kind, MetricType::Counter) {
                    ConstCounter::new(*v).encode(e)?;
                } else {
                    ConstGauge::new(*v as i64).encode(e)?;
                }
            }
        }
        Ok(())
    }
}

/// The Prometheus text exposition of the node's metrics.
pub fn render(views: &Views) -> Result<String> {
    let mut snap = Snapshot::default();
    let (counters, drops) = views.counters()?;
    let f = snap.family(
        "tapestry_datapath_events",
        "Datapath events by kind (packets seen, new flows, reverse NAT, ...).",
        MetricType::Counter,
    );
    for (name, v) in counters {
        f.samples.push((vec![("event", name)], v));
    }
    let f = snap.family(
        "tapestry_drops",
        "Packets dropped or rejected by the datapath, by reason.",
        MetricType::Counter,
    );
    for (reason, v) in drops {
        f.samples.push((vec![("reason", reason)], v));
    }

    let services = views.services()?;
    let mut packets = Vec::new();
    let mut bytes = Vec::new();
    let mut flows = Vec::new();
    let mut be_packets = Vec::new();
    let mut be_bytes = Vec::new();
    let mut active = Vec::new();
    for s in &services {
        let labels: Labels = vec![
            ("service", s.name.clone()),
            ("frontend", format!("{}:{}/{}", s.vip, s.port, s.protocol)),
        ];
        packets.push((labels.clone(), s.traffic.packets));
        bytes.push((labels.clone(), s.traffic.bytes));
        flows.push((labels.clone(), s.traffic.flows));
        active.push((labels.clone(), s.active_backends as u64));
        for b in &s.backends {
            let mut l = labels.clone();
            l.push(("backend", format!("{}:{}", b.ip, b.port)));
            l.push(("kind", b.kind.to_string()));
            l.push(("endpoint", b.name.clone().unwrap_or_default()));
            be_packets.push((l.clone(), b.traffic.packets));
            be_bytes.push((l, b.traffic.bytes));
        }
    }
    snap.family(
        "tapestry_service_packets",
        "Packets sent to a service frontend (client to service direction).",
        MetricType::Counter,
    )
    .samples = packets;
    snap.family(
        "tapestry_service_bytes",
        "Bytes sent to a service frontend.",
        MetricType::Counter,
    )
    .samples = bytes;
    snap.family(
        "tapestry_service_flows",
        "Flows (conntrack entries) created for a service.",
        MetricType::Counter,
    )
    .samples = flows;
    snap.family(
        "tapestry_service_active_backends",
        "Backends new flows of a service may choose.",
        MetricType::Gauge,
    )
    .samples = active;
    snap.family(
        "tapestry_backend_packets",
        "Packets balanced to a backend (shared by services with the same backend address).",
        MetricType::Counter,
    )
    .samples = be_packets;
    snap.family(
        "tapestry_backend_bytes",
        "Bytes balanced to a backend.",
        MetricType::Counter,
    )
    .samples = be_bytes;

    // Guests, labelled with their identity.
    let guests = views.guests();
    let guest_labels = |g: &tapestry_api::types::GuestInfo| -> Labels {
        vec![
            ("guest", g.name.clone()),
            ("namespace", g.namespace.clone().unwrap_or_default()),
            ("ip", g.ip.clone()),
        ]
    };
    let mut f = Vec::new();
    let mut ready = Vec::new();
    for g in &guests {
        for (dir, v) in [("from_guest", g.rx_packets), ("to_guest", g.tx_packets)] {
            let mut l = guest_labels(g);
            l.push(("direction", dir.to_owned()));
            f.push((l, v));
        }
        ready.push((guest_labels(g), u64::from(g.phase == GuestPhase::Ready)));
    }
    snap.family(
        "tapestry_guest_packets",
        "Packets between a guest and the pod network, by direction.",
        MetricType::Counter,
    )
    .samples = f;
    let mut drops = Vec::new();
    for g in &guests {
        for (reason, v) in &g.drops {
            let mut l = guest_labels(g);
            l.push(("reason", reason.clone()));
            drops.push((l, *v));
        }
    }
    snap.family(
        "tapestry_guest_drops",
        "Frames from a guest dropped by the anti-spoofing checks, by reason.",
        MetricType::Counter,
    )
    .samples = drops;
    snap.family(
        "tapestry_guest_ready",
        "1 when the guest is Ready (bound its address or sent traffic from it).",
        MetricType::Gauge,
    )
    .samples = ready;

    let status = views.status()?;
    snap.family(
        "tapestry_desired_state_generation",
        "Desired states fully programmed since the daemon started.",
        MetricType::Gauge,
    )
    .samples = vec![(vec![], status.generation)];
    snap.family(
        "tapestry_attachments",
        "Interfaces the datapath is attached to.",
        MetricType::Gauge,
    )
    .samples = vec![(vec![], status.attachments.len() as u64)];
    let f = snap.family(
        "tapestry_map_entries",
        "Entries in a datapath map.",
        MetricType::Gauge,
    );
    for m in &status.maps {
        f.samples.push((vec![("map", m.name.clone())], m.entries));
    }
    let f = snap.family(
        "tapestry_map_capacity",
        "Capacity of a datapath map.",
        MetricType::Gauge,
    );
    for m in &status.maps {
        f.samples
            .push((vec![("map", m.name.clone())], m.max_entries));
    }

    let mut registry = Registry::default();
    registry.register_collector(Box::new(snap));
    let mut out = String::new();
    encode(&mut out, &registry)?;
    Ok(out)
}
