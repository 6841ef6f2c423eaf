//! Prometheus metrics, read from the datapath's counters at scrape time.
//!
//! A scrape walks the conntrack table (flows per service), which takes a while when the table
//! is full; [`Scrapes`] keeps any number of scrapers to one walk at a time and one per
//! [`MAX_AGE`]: a flood of requests on the metrics port costs the daemon one walk a second.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

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

/// How long one scrape's text answers the scrapes after it.
pub const MAX_AGE: Duration = Duration::from_secs(1);

/// The last rendered exposition, shared by concurrent scrapers.
#[derive(Default)]
pub struct Scrapes {
    last: Mutex<Option<(Instant, Arc<String>)>>,
}

impl Scrapes {
    /// The exposition at most `max_age` old: made by `make` when there is none that fresh. A
    /// scraper arriving while another one renders waits for that text instead of rendering too.
    pub fn get(
        &self,
        max_age: Duration,
        make: impl FnOnce() -> Result<String>,
    ) -> Result<Arc<String>> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, text)) = last.as_ref()
            && at.elapsed() < max_age
        {
            return Ok(text.clone());
        }
        let text = Arc::new(make()?);
        *last = Some((Instant::now(), text.clone()));
        Ok(text)
    }
}

/// The node's metrics as [`render`] makes them, through `views`' [`Scrapes`].
pub fn scrape(views: &Views) -> Result<Arc<String>> {
    views.scrapes.get(MAX_AGE, || render(views))
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
    let f = snap.family(
        "tapestry_map_evictions",
        "Live entries the kernel evicted from a full datapath map to make room (the conntrack \
         tables): stored by the datapath, removed by neither it nor the daemon, gone.",
        MetricType::Counter,
    );
    for m in &status.maps {
        if let Some(n) = m.evicted {
            f.samples.push((vec![("map", m.name.clone())], n));
        }
    }

    let mut registry = Registry::default();
    registry.register_collector(Box::new(snap));
    let mut out = String::new();
    encode(&mut out, &registry)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[test]
    fn concurrent_scrapes_share_one_render_and_a_stale_text_is_made_again() {
        let scrapes = Arc::new(Scrapes::default());
        let renders = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let (scrapes, renders) = (scrapes.clone(), renders.clone());
                std::thread::spawn(move || {
                    scrapes
                        .get(Duration::from_secs(60), || {
                            let n = renders.fetch_add(1, Ordering::SeqCst);
                            // A slow walk: every other scraper arrives while it runs.
                            std::thread::sleep(Duration::from_millis(100));
                            Ok(format!("render {n}"))
                        })
                        .unwrap()
                })
            })
            .collect();
        let texts: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(
            renders.load(Ordering::SeqCst),
            1,
            "one walk for 16 scrapers"
        );
        assert!(texts.iter().all(|t| t.as_str() == "render 0"));

        // Older than the age asked for: rendered again.
        std::thread::sleep(Duration::from_millis(20));
        let again = scrapes
            .get(Duration::from_millis(10), || Ok("fresh".into()))
            .unwrap();
        assert_eq!(again.as_str(), "fresh");
        // A failed render is an error for its scraper, and leaves the last text in place.
        let err = scrapes.get(Duration::ZERO, || anyhow::bail!("map read failed"));
        assert!(err.is_err());
        let kept = scrapes.get(Duration::from_secs(60), || Ok("unused".into()));
        assert_eq!(kept.unwrap().as_str(), "fresh");
    }
}
