//! The daemon's local API under load: the liveness probe and the read views must never wait for
//! each other. A real `tapestryd`, its conntrack map filled (through the daemon's own map handles,
//! as the datapath would fill it) with 200,000 live entries, scraped by `/metrics` in a loop.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tapestry_common::{CtEntry, CtKey, IPPROTO_TCP, ct_direction, ct_flags};
use tapestry_node_daemon::datapath::{Maps, monotonic_ns};
use tapestry_tests::{daemon::Daemon, require_lab};

const ENTRIES: u32 = 200_000;

const STATE: &str = "
services:
  - name: web
    vip: 10.96.0.10
    port: 80
    backends:
      - { ip: 10.22.0.5, port: 8080 }
";

/// 200,000 live forward entries of distinct clients, as the datapath writes them.
fn fill_conntrack(d: &Daemon) {
    let mut maps = Maps::open(&d.bpffs_dir).expect("the daemon's pinned maps");
    let now = monotonic_ns();
    for i in 0..ENTRIES {
        let key = CtKey {
            saddr: u32::from_ne_bytes([10, 30 + (i >> 16) as u8, (i >> 8) as u8, i as u8]),
            daddr: u32::from_ne_bytes([10, 96, 0, 10]),
            sport: (10_000 + (i % 50_000) as u16).to_be(),
            dport: 80u16.to_be(),
            proto: IPPROTO_TCP,
            direction: ct_direction::FORWARD,
            _pad: [0; 2],
        };
        let entry = CtEntry {
            nat_addr: u32::from_ne_bytes([10, 22, 0, 5]),
            nat_peer_addr: 0,
            backend_id: 1,
            service_id: 1,
            created_ns: now,
            last_seen_ns: now,
            nat_port: 8080u16.to_be(),
            flags: ct_flags::SEEN_REPLY,
            nat_peer_port: [0; 2],
            _pad: [0; 3],
        };
        maps.conntrack
            .insert(key, entry, 0)
            .expect("conntrack insert");
    }
}

#[test]
fn healthz_answers_while_metrics_walks_a_full_conntrack_table() {
    require_lab!();
    let d = Daemon::start("api-healthz", STATE, &[]).expect("daemon starts");
    fill_conntrack(&d);

    // The scrape sees every entry: it really walks the whole table.
    let metrics = d.client().metrics().expect("a scrape");
    assert!(
        metrics.contains(&format!(
            "tapestry_map_entries{{map=\"TAPESTRY_CT\"}} {ENTRIES}"
        )),
        "the scrape does not count {ENTRIES} conntrack entries"
    );

    // Two scrapers in a loop; probes of /healthz meanwhile, each noting whether a scrape was
    // in flight when it started and when it was answered.
    let stop = Arc::new(AtomicBool::new(false));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let scrapes = Arc::new(AtomicUsize::new(0));
    let scrapers: Vec<_> = (0..2)
        .map(|_| {
            let (stop, in_flight, scrapes) = (stop.clone(), in_flight.clone(), scrapes.clone());
            let client = d.client();
            std::thread::spawn(move || {
                let mut slowest = Duration::ZERO;
                while !stop.load(Ordering::Relaxed) {
                    in_flight.fetch_add(1, Ordering::SeqCst);
                    let t = Instant::now();
                    let r = client.metrics();
                    slowest = slowest.max(t.elapsed());
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                    r.expect("a scrape during the probes");
                    scrapes.fetch_add(1, Ordering::SeqCst);
                }
                slowest
            })
        })
        .collect();
    let client = d.client();
    let mut overlapped = 0;
    let mut worst = Duration::ZERO;
    let deadline = Instant::now() + Duration::from_secs(8);
    while Instant::now() < deadline && overlapped < 40 {
        let before = in_flight.load(Ordering::SeqCst);
        let t = Instant::now();
        client.healthz().expect("/healthz answers 200");
        let took = t.elapsed();
        if before > 0 && in_flight.load(Ordering::SeqCst) > 0 {
            overlapped += 1;
            worst = worst.max(took);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    let slowest_scrape = scrapers
        .into_iter()
        .map(|h| h.join().unwrap())
        .max()
        .unwrap();
    eprintln!(
        "{} scrapes, slowest {slowest_scrape:?}; {overlapped} probes during a scrape, slowest {worst:?}",
        scrapes.load(Ordering::SeqCst)
    );
    assert!(
        overlapped >= 10,
        "only {overlapped} probes overlapped a scrape: the scrape is too quick to show anything"
    );
    assert!(
        worst < Duration::from_millis(100),
        "/healthz took {worst:?} while /metrics walked {ENTRIES} conntrack entries"
    );
}
