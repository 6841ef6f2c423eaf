//! A guest's live migration between the nodes of a [`Cluster`], and what clients see of it: the
//! scenario of tests/tests/migration.rs, `make bench`'s migration figures and
//! `make demo-cluster`.
//!
//! [`Cluster::migrate`] plays KubeVirt's part: it creates the target VM pod on the target node
//! (annotated `tapestry.dev/migration-source`, plumbed by the real CNI chain), starts the
//! target's QEMU with `-incoming` on that pod's tap, runs QEMU's own migration from the source's
//! monitor, waits until the target's daemon records the switch-over in the target's Guest and
//! every node routes the guest's address there, then deletes the source pod (CNI DEL, as the
//! kubelet does once virt-launcher exits) and stops the source's QEMU.
//!
//! [`StreamClient`] keeps one TCP connection and sends a request every `interval`, timing each
//! reply; [`ConnectLoop`] opens a new connection per request. Both run in a pod's namespace.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{
    Pod,
    cluster::{Cluster, NAMESPACE, TargetMark},
    guest::{Guest, GuestConfig, MigrationInfo},
    net, poll,
};

/// The `ip route` protocol of the daemon's migration routes (node-daemon's `RTPROT_TAPESTRY`).
pub const RTPROT_TAPESTRY: &str = "116";

/// A guest in a VM pod of the cluster, as it moves.
pub struct Vm {
    /// The pod the guest runs in now.
    pub pod: Pod,
    pub guest: Guest,
    pub node: usize,
    /// The guest's address and MAC (its first pod's), whatever pod it is in.
    pub ip: Ipv4Addr,
    pub mac: [u8; 6],
    pub labels: Value,
    /// The guest's own name (what it answers; its QEMU configuration's, the same in every
    /// pod it moves to).
    pub name: String,
}

impl Vm {
    /// The guest `guest` (named `name` in its QEMU configuration) booted in VM pod `pod` on
    /// node `node`, whose labels the pods it moves to copy.
    pub fn new(pod: Pod, guest: Guest, node: usize, labels: Value, name: &str) -> Vm {
        let (ip, mac) = (pod.ip, pod.mac);
        Vm {
            pod,
            guest,
            node,
            ip,
            mac,
            labels,
            name: name.to_owned(),
        }
    }
}

/// One migration, as [`Cluster::migrate`] saw it.
#[derive(Debug, Clone)]
pub struct Moved {
    pub from: usize,
    pub to: usize,
    /// QEMU's own report (`info migrate`).
    pub qemu: MigrationInfo,
    /// When `migrate` was issued and when QEMU reported it completed.
    pub started: Instant,
    pub completed: Instant,
    /// When the target's Guest said `Live` (as read from the apiserver).
    pub live: Instant,
    /// When every node routed the address to the target.
    pub routed: Instant,
}

impl Cluster {
    /// Moves `vm` into a new VM pod `name` on node `to` by live migration (module docs);
    /// returns the guest in its new pod. The source pod is gone afterwards.
    pub fn migrate(&mut self, vm: Vm, to: usize, name: &str) -> Result<(Vm, Moved)> {
        self.migrate_marked(vm, to, name, TargetMark::Tapestry)
    }

    /// [`Cluster::migrate`], with the target pod marked as `mark` says.
    pub fn migrate_marked(
        &mut self,
        vm: Vm,
        to: usize,
        name: &str,
        mark: TargetMark,
    ) -> Result<(Vm, Moved)> {
        let (pod, guest) = self.add_migration_target(
            to,
            name,
            vm.labels.clone(),
            &vm.pod.name,
            mark,
            GuestConfig::new(&vm.name, vm.mac),
        )?;
        if pod.ip != vm.ip {
            bail!(
                "the migration target {name} got {} from the CNI chain, not the guest's {}",
                pod.ip,
                vm.ip
            );
        }
        let started = Instant::now();
        let qemu = vm
            .guest
            .migrate_to(&guest, Duration::from_secs(180))
            .with_context(|| format!("migrating {} to {name}", vm.pod.name))?;
        let completed = Instant::now();
        poll(
            Duration::from_secs(30),
            &format!("Guest {name} live"),
            || Ok((self.migration_phase(name)?.as_deref() == Some("Live")).then_some(())),
        )?;
        let live = Instant::now();
        self.wait_routed(vm.ip, to, Duration::from_secs(30))?;
        let routed = Instant::now();
        // As a careful orchestrator would, the source goes only once the target pod is Ready
        // (its guest-ready gate True), so the address never lacks a ready endpoint.
        poll(
            Duration::from_secs(30),
            &format!("pod {name} Ready"),
            || Ok((self.pod_ready(name)? == Some(true)).then_some(())),
        )?;
        let from = vm.node;
        let Vm {
            pod: old_pod,
            guest: old_guest,
            ip,
            mac,
            labels,
            name: guest_name,
            ..
        } = vm;
        self.delete_pod(&old_pod.name)?;
        drop(old_guest);
        Ok((
            Vm {
                pod,
                guest,
                node: to,
                ip,
                mac,
                labels,
                name: guest_name,
            },
            Moved {
                from,
                to,
                qemu,
                started,
                completed,
                live,
                routed,
            },
        ))
    }

    /// The `Ready` condition of pod `name` (None: not reported yet).
    pub fn pod_ready(&self, name: &str) -> Result<Option<bool>> {
        let out = self.cp.kubectl_ok([
            "get",
            "pod",
            "-n",
            NAMESPACE,
            name,
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
        ])?;
        Ok(match out.trim() {
            "True" => Some(true),
            "False" => Some(false),
            _ => None,
        })
    }

    /// `status.migration.phase` of Guest `name` (None: no migration record).
    pub fn migration_phase(&self, name: &str) -> Result<Option<String>> {
        let out = self.cp.kubectl_ok([
            "get",
            "guest",
            "-n",
            NAMESPACE,
            name,
            "-o",
            "jsonpath={.status.migration.phase}",
        ])?;
        let p = out.trim();
        Ok((!p.is_empty()).then(|| p.to_owned()))
    }

    /// The daemon's migration route for `ip` on node `node`: `via <addr>` or `dev <ifname>`
    /// (None: no such route).
    pub fn migration_route(&self, node: usize, ip: Ipv4Addr) -> Result<Option<String>> {
        let out = self.nodes[node].run(Command::new("ip").args([
            "-4",
            "route",
            "show",
            &format!("{ip}/32"),
            "proto",
            RTPROT_TAPESTRY,
        ]))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let words: Vec<&str> = text.split_whitespace().collect();
        let find = |key: &str| {
            words
                .windows(2)
                .find(|w| w[0] == key)
                .map(|w| format!("{key} {}", w[1]))
        };
        Ok(find("via").or_else(|| find("dev")))
    }

    /// Waits until every node but `to` routes `ip` via `to`'s InternalIP and `to` routes it to
    /// a local interface.
    pub fn wait_routed(&self, ip: Ipv4Addr, to: usize, timeout: Duration) -> Result<()> {
        let via = format!("via {}", self.nodes[to].underlay_ip);
        for n in 0..self.nodes.len() {
            poll(
                timeout,
                &format!(
                    "{} routes {ip} to {}",
                    self.nodes[n].name, self.nodes[to].name
                ),
                || {
                    let r = self.migration_route(n, ip)?;
                    Ok(match r {
                        Some(r) if n == to && r.starts_with("dev ") => Some(()),
                        Some(r) if n != to && r == via => Some(()),
                        _ => None,
                    })
                },
            )?;
        }
        Ok(())
    }
}

/// What a [`StreamClient`] saw.
#[derive(Debug, Clone, Default)]
pub struct StreamReport {
    /// When each reply arrived.
    pub replies: Vec<Instant>,
    /// Each reply's text.
    pub answers: Vec<String>,
    /// Why the connection ended before it was stopped.
    pub error: Option<String>,
}

impl StreamReport {
    /// The longest time between two consecutive replies in `[from, to]` (the reply before
    /// `from` and the one after `to` included): the blackout a migration in that window caused.
    pub fn longest_gap(&self, from: Instant, to: Instant) -> Option<Duration> {
        self.replies
            .windows(2)
            .filter(|w| w[1] >= from && w[0] <= to)
            .map(|w| w[1] - w[0])
            .max()
    }
}

/// One TCP connection from a pod, a request every `interval`, until stopped.
pub struct StreamClient {
    stop: Arc<AtomicBool>,
    report: Arc<Mutex<StreamReport>>,
    thread: Option<JoinHandle<()>>,
}

impl StreamClient {
    /// Connects from `pod` to `addr` and starts streaming. A reply may take up to `patience`
    /// (a migration's blackout and TCP's retransmission) before the stream counts as broken.
    pub fn start(
        pod: &Pod,
        addr: SocketAddrV4,
        interval: Duration,
        patience: Duration,
    ) -> Result<StreamClient> {
        let mut stream = pod
            .tcp_connect(addr, patience)
            .with_context(|| format!("{} connecting to {addr}", pod.name))?;
        let stop = Arc::new(AtomicBool::new(false));
        let report = Arc::new(Mutex::new(StreamReport::default()));
        let (s, r) = (stop.clone(), report.clone());
        let thread = std::thread::spawn(move || {
            let mut n = 0u64;
            while !s.load(Ordering::SeqCst) {
                n += 1;
                match net::stream_request(&mut stream, format!("s{n}").as_bytes()) {
                    Ok(answer) => {
                        let mut rep = r.lock().unwrap();
                        rep.replies.push(Instant::now());
                        rep.answers.push(answer);
                    }
                    Err(e) => {
                        r.lock().unwrap().error = Some(format!("request {n}: {e}"));
                        return;
                    }
                }
                std::thread::sleep(interval);
            }
        });
        Ok(StreamClient {
            stop,
            report,
            thread: Some(thread),
        })
    }

    /// What it saw so far.
    pub fn report(&self) -> StreamReport {
        self.report.lock().unwrap().clone()
    }

    pub fn stop(mut self) -> StreamReport {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.report()
    }
}

impl Drop for StreamClient {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// One attempt of a [`ConnectLoop`]: when it started and ended, and its error if it failed.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub start: Instant,
    pub end: Instant,
    pub error: Option<String>,
}

/// New TCP connections from a pod in a loop, one request each, until stopped.
pub struct ConnectLoop {
    stop: Arc<AtomicBool>,
    attempts: Arc<Mutex<Vec<Attempt>>>,
    thread: Option<JoinHandle<()>>,
}

impl ConnectLoop {
    pub fn start(pod: &Pod, addr: SocketAddrV4, timeout: Duration) -> Result<ConnectLoop> {
        let stop = Arc::new(AtomicBool::new(false));
        let attempts = Arc::new(Mutex::new(Vec::new()));
        let (s, a) = (stop.clone(), attempts.clone());
        let netns = pod.netns_path.clone();
        let thread = std::thread::spawn(move || {
            let run = || {
                while !s.load(Ordering::SeqCst) {
                    let start = Instant::now();
                    let error = net::tcp_request(addr, b"new", timeout)
                        .err()
                        .map(|e| e.to_string());
                    a.lock().unwrap().push(Attempt {
                        start,
                        end: Instant::now(),
                        error,
                    });
                    std::thread::sleep(Duration::from_millis(20));
                }
            };
            if let Err(e) = tapestry_netns::run_in(&netns, run) {
                a.lock().unwrap().push(Attempt {
                    start: Instant::now(),
                    end: Instant::now(),
                    error: Some(format!("entering the client's namespace: {e}")),
                });
            }
        });
        Ok(ConnectLoop {
            stop,
            attempts,
            thread: Some(thread),
        })
    }

    pub fn stop(mut self) -> Vec<Attempt> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.attempts.lock().unwrap().clone()
    }
}

impl Drop for ConnectLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Samples one daemon's active backends of a Service every 20 ms, until stopped: the moments
/// it had none.
pub struct BackendWatch {
    stop: Arc<AtomicBool>,
    empty: Arc<Mutex<Vec<Instant>>>,
    samples: Arc<Mutex<u64>>,
    thread: Option<JoinHandle<()>>,
}

impl BackendWatch {
    pub fn start(daemon: &crate::daemon::Daemon, service: &str) -> BackendWatch {
        let client = daemon.client();
        let full = format!("{NAMESPACE}/{service}");
        let stop = Arc::new(AtomicBool::new(false));
        let empty = Arc::new(Mutex::new(Vec::new()));
        let samples = Arc::new(Mutex::new(0));
        let (s, e, n) = (stop.clone(), empty.clone(), samples.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                if let Ok(services) = client.services() {
                    let active = services
                        .iter()
                        .filter(|svc| svc.name == full || svc.name.starts_with(&format!("{full}/")))
                        .flat_map(|svc| svc.backends.iter())
                        .filter(|b| b.state == tapestry_api::types::BackendState::Active)
                        .count();
                    *n.lock().unwrap() += 1;
                    if active == 0 {
                        e.lock().unwrap().push(Instant::now());
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        BackendWatch {
            stop,
            empty,
            samples,
            thread: Some(thread),
        }
    }

    /// (samples taken, the moments with no active backend).
    pub fn stop(mut self) -> (u64, Vec<Instant>) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        (
            *self.samples.lock().unwrap(),
            self.empty.lock().unwrap().clone(),
        )
    }
}

impl Drop for BackendWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}
