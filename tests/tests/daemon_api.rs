//! The daemon's local API with a real `tapestryd`:
//! - conntrack evictions, counted by the datapath and kept counting across a `kill -9`;
//! - under load: the liveness probe and the read views must never wait for each other (its
//!   conntrack map filled, through the daemon's own map handles as the datapath would fill it,
//!   with 200,000 live entries, scraped by `/metrics` in a loop);
//! - its socket: root only whatever the umask, or a configured group's;
//! - its endpoint registry on disk: a corrupt file, durable 0600 writes, coalesced writes under
//!   a guest's DHCP flood;
//! - endpoint validation: guest IPs and host interfaces are not shared, and an endpoint whose
//!   interface is gone (its DEL never arrived) gives way.

use std::{
    fs,
    net::Ipv4Addr,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::Path,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use dhcproto::v4::MessageType;
use tapestry_api::{
    client::ClientError,
    types::{AttachmentKey, EndpointGcRequest, EndpointRequest, GuestPhase},
};
use tapestry_common::{MAX_CONNTRACK, map_names};
use tapestry_tests::{
    Lab, Pod,
    daemon::{Daemon, binary},
    require_lab,
    tapfd::{TapGuest, dhcp_frame, register_vm_pod},
};

const ENTRIES: u32 = 200_000;

const STATE: &str = "
services:
  - name: web
    vip: 10.96.0.10
    port: 80
    backends:
      - { ip: 10.22.0.5, port: 8080 }
";

/// 200,000 live entries of distinct clients' new connections, stored by the datapath.
fn fill_conntrack(d: &Daemon) {
    let stored = d
        .fill_conntrack(ENTRIES, Ipv4Addr::new(10, 96, 0, 10))
        .expect("the daemon's pinned program");
    assert_eq!(stored, u64::from(ENTRIES));
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

/// The TCP conntrack table's fill and its evictions as the daemon reports them.
fn conntrack_fill(d: &Daemon) -> (u64, Option<u64>) {
    let st = d.client().status().expect("status");
    let ct = st
        .maps
        .iter()
        .find(|m| m.name == map_names::CONNTRACK)
        .expect("the TCP conntrack table in the status");
    (ct.entries, ct.evicted)
}

/// The TCP conntrack table filled past its capacity by new connections through the datapath:
/// every live entry the kernel took back to make room is counted as evicted, exactly (nothing
/// else removes entries here: no traffic, none expired), in the status and the metrics; with
/// `tapestryd` killed (`kill -9`), what is evicted meanwhile is counted as well, and a flush
/// through the API afterwards is no eviction.
#[test]
fn conntrack_evictions_are_counted_across_a_restart_and_a_flush_is_none() {
    require_lab!();
    let mut d = Daemon::start("api-evict", STATE, &[]).expect("daemon starts");
    let vip = Ipv4Addr::new(10, 96, 0, 10);
    assert_eq!(
        conntrack_fill(&d),
        (0, Some(0)),
        "an empty table, nothing evicted"
    );
    let over = 20_000;
    let t = Instant::now();
    let mut stored = d
        .fill_conntrack(MAX_CONNTRACK + over, vip)
        .expect("the daemon's pinned program");
    eprintln!("{stored} entries stored in {:?}", t.elapsed());
    assert_eq!(
        stored,
        u64::from(MAX_CONNTRACK + over),
        "every flow balanced"
    );
    let (live0, evicted) = conntrack_fill(&d);
    let evicted = evicted.expect("evictions reported");
    assert_eq!(evicted, stored - live0, "{live0} live of {stored}");
    assert!(evicted >= u64::from(over), "{evicted} evicted");
    let metrics = d.client().metrics().expect("a scrape");
    let line = format!(
        "tapestry_map_evictions_total{{map=\"{}\"}} {evicted}",
        map_names::CONNTRACK
    );
    assert!(metrics.contains(&line), "no `{line}` in:\n{metrics}");

    d.kill9().unwrap();
    // Evicted while no daemon runs: the datapath counts on.
    stored += d
        .fill_conntrack_from(MAX_CONNTRACK + over, 10_000, vip)
        .unwrap();
    d.restart().expect("the daemon starts again");
    let (live, after) = conntrack_fill(&d);
    let after = after.expect("evictions reported after the restart");
    assert_eq!(after, stored - live, "{live} live of {stored}");
    // The 10,000 new entries: in the table, or each evicted an older one.
    assert_eq!(
        (after - evicted) as i64 + (live as i64 - live0 as i64),
        10_000,
        "{evicted} then {after}"
    );
    let flushed = d.client().flush_conntrack().expect("a flush").removed;
    assert_eq!(flushed, live);
    assert_eq!(
        conntrack_fill(&d),
        (0, Some(after)),
        "a flush evicts nothing"
    );
    eprintln!("{stored} stored, {live} live, {after} evicted");
}

const EMPTY_STATE: &str = "services: []\n";

/// The daemon's endpoint registry file.
fn registry_file(d: &Daemon) -> std::path::PathBuf {
    d.dir.join("state").join("endpoints.json")
}

#[test]
fn a_corrupt_endpoint_registry_is_kept_aside_and_the_daemon_starts() {
    require_lab!();
    let mut d = Daemon::start("api-corrupt", EMPTY_STATE, &[]).expect("daemon starts");
    d.stop().unwrap();
    let file = registry_file(&d);
    // What a crash in the middle of an unsynced write leaves.
    let garbage = b"{\"endpoints\": [{\"request\": {\"containerId\": \"ab";
    fs::write(&file, garbage).unwrap();

    let st = d
        .restart()
        .expect("the daemon starts with a corrupt registry");
    let err = st
        .last_error
        .expect("the status reports the corrupt registry");
    assert!(err.contains("corrupt"), "{err}");
    let kept: Vec<_> = fs::read_dir(file.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains("endpoints.json.corrupt-"))
        .collect();
    assert_eq!(kept.len(), 1, "the bad file was not kept aside");
    assert_eq!(fs::read(&kept[0]).unwrap(), garbage);
    assert!(err.contains(&*kept[0].to_string_lossy()), "{err}");
    // The registry is usable again, and written for root only.
    assert!(d.client().endpoints().unwrap().is_empty());
    let mode = fs::metadata(&file).unwrap().mode() & 0o777;
    assert_eq!(mode, 0o600, "endpoints.json has mode {mode:o}");
}

/// Runs the CLI's `status` as `uid`:`gid` (no supplementary groups) through `setpriv`.
fn status_as(socket: &Path, uid: u32, gid: u32) -> std::process::Output {
    Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .arg("--clear-groups")
        .arg(binary("tapestry").unwrap())
        .arg("--socket")
        .arg(socket)
        .args(["status", "-o", "json"])
        .output()
        .expect("running setpriv")
}

#[test]
fn the_api_socket_is_root_only_whatever_the_umask_or_a_groups() {
    require_lab!();
    const NOBODY: u32 = 65534;
    const GROUP: u32 = 4245;
    // SAFETY: umask has no preconditions; the daemons inherit the permissive one.
    let old = unsafe { libc::umask(0) };
    let root_only = Daemon::start("api-socket", EMPTY_STATE, &[]);
    let grouped = Daemon::start_with(
        "api-socket-group",
        EMPTY_STATE,
        &[],
        &["--api-socket-group", &GROUP.to_string()],
    );
    unsafe { libc::umask(old) };
    let (root_only, grouped) = (root_only.unwrap(), grouped.unwrap());
    // The directory does not stand in the way: only the socket's own mode does.
    for d in [&root_only, &grouped] {
        fs::set_permissions(&d.dir, fs::Permissions::from_mode(0o755)).unwrap();
    }

    let meta = fs::metadata(&root_only.socket).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o600, "mode {:o}", meta.mode() & 0o777);
    assert_eq!(meta.uid(), 0);
    let out = status_as(&root_only.socket, NOBODY, NOBODY);
    assert!(!out.status.success(), "nobody used the API");

    let meta = fs::metadata(&grouped.socket).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o660, "mode {:o}", meta.mode() & 0o777);
    assert_eq!(meta.gid(), GROUP);
    let out = status_as(&grouped.socket, NOBODY, GROUP);
    assert!(
        out.status.success(),
        "a member of the group was refused: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = status_as(&grouped.socket, NOBODY, NOBODY);
    assert!(!out.status.success(), "nobody used the API");
}

/// A VM pod's request for `pod` whose pod and guest IP is `ip` (its tap `tap0` is made here).
fn vm_request(pod: &Pod, ip: Ipv4Addr) -> EndpointRequest {
    pod.ip(&["tuntap", "add", "dev", "tap0", "mode", "tap"])
        .unwrap();
    pod.ip(&["link", "set", "tap0", "up"]).unwrap();
    let mut req = pod_request(pod);
    req.ips = vec![format!("{ip}/32")];
    req.vm = Some(tapestry_api::types::VmAttachment {
        tap: "tap0".into(),
        guest_mac: pod.mac.into(),
        guest_ip: format!("{ip}/32"),
        mtu: 1500,
        routes: vec![],
        dns: Default::default(),
        hostname: None,
        queues: 1,
        migration: None,
    });
    req
}

/// A plain pod's request for `pod`.
fn pod_request(pod: &Pod) -> EndpointRequest {
    EndpointRequest {
        container_id: format!("ctr-{}", pod.name),
        ifname: "eth0".into(),
        netns: pod.netns_path.display().to_string(),
        host_ifname: pod.host_ifname.clone(),
        ips: vec![format!("{}/32", pod.ip)],
        gateway: Some(tapestry_tests::POD_GATEWAY),
        mac: Some(pod.mac.into()),
        pod: None,
        vm: None,
        network: None,
    }
}

fn api_status(r: Result<tapestry_api::types::EndpointInfo, ClientError>) -> (u16, String) {
    match r {
        Err(ClientError::Api { status, message }) => (status, message),
        other => panic!("not refused: {other:?}"),
    }
}

#[test]
fn endpoints_sharing_a_guest_ip_or_an_interface_are_refused_unless_the_holder_is_gone() {
    require_lab!();
    let mut lab = Lab::new("api-validate").unwrap();
    let a = lab.add_pod("a").unwrap();
    let b = lab.add_pod("b").unwrap();
    let c = lab.add_pod("c").unwrap();
    let d = Daemon::start("api-validate", EMPTY_STATE, &[]).expect("daemon starts");
    let client = d.client();
    register_vm_pod(&client, &a).expect("a's endpoint");

    // A guest IP that is not the pod's.
    let mut bad = vm_request(&b, b.ip);
    bad.vm.as_mut().unwrap().guest_ip = format!("{}/32", c.ip);
    let (status, msg) = api_status(client.add_endpoint(&bad));
    assert_eq!(status, 400, "{msg}");
    assert!(msg.contains("vm.guestIp"), "{msg}");
    // a's guest IP again, on b.
    let (status, msg) = api_status(client.add_endpoint(&vm_request_again(&b, a.ip)));
    assert_eq!(status, 409, "{msg}");
    assert!(msg.contains(&format!("guest IP {}", a.ip)), "{msg}");
    // a's host interface, for c.
    let mut shared = pod_request(&c);
    shared.host_ifname = a.host_ifname.clone();
    let (status, msg) = api_status(client.add_endpoint(&shared));
    assert_eq!(status, 409, "{msg}");
    assert!(msg.contains("host interface"), "{msg}");
    // Nothing was lost.
    let eps = client.endpoints().unwrap();
    assert_eq!(eps.len(), 1, "{eps:?}");
    assert_eq!(eps[0].request.container_id, "ctr-a");
    assert_eq!(client.guests().unwrap().len(), 1);

    // a's pod goes without a DEL reaching the daemon: its address can be handed out again.
    a.ip(&["link", "del", "eth0"]).unwrap();
    let info = client
        .add_endpoint(&vm_request_again(&b, a.ip))
        .expect("the stale endpoint gives way");
    assert_eq!(info.request.container_id, "ctr-b");
    let eps = client.endpoints().unwrap();
    assert_eq!(
        eps.iter()
            .map(|e| e.request.container_id.as_str())
            .collect::<Vec<_>>(),
        ["ctr-b"]
    );
    let guests = client.guests().unwrap();
    assert_eq!(guests.len(), 1);
    assert_eq!(guests[0].container_id, "ctr-b");
}

/// [`vm_request`] for a pod whose tap exists already.
fn vm_request_again(pod: &Pod, ip: Ipv4Addr) -> EndpointRequest {
    let _ = pod.ip(&["tuntap", "del", "dev", "tap0", "mode", "tap"]);
    vm_request(pod, ip)
}

#[test]
fn endpoints_whose_interface_is_gone_are_removed_by_gc_and_in_the_background() {
    require_lab!();
    let mut lab = Lab::new("api-stale").unwrap();
    let a = lab.add_pod("a").unwrap();
    let b = lab.add_pod("b").unwrap();
    let d = Daemon::start("api-stale", EMPTY_STATE, &[]).expect("daemon starts");
    let client = d.client();
    client.add_endpoint(&pod_request(&a)).unwrap();
    client.add_endpoint(&pod_request(&b)).unwrap();

    // Both pods go; their DELs never reach the daemon.
    a.ip(&["link", "del", "eth0"]).unwrap();
    b.ip(&["link", "del", "eth0"]).unwrap();
    // A GC from a runtime that still counts both as valid removes them all the same: their
    // interfaces are gone.
    let valid = [&a, &b]
        .iter()
        .map(|p| AttachmentKey {
            container_id: format!("ctr-{}", p.name),
            ifname: "eth0".into(),
        })
        .collect();
    client
        .gc_endpoints(&EndpointGcRequest {
            network: None,
            valid,
        })
        .unwrap();
    let left: Vec<String> = client
        .endpoints()
        .unwrap()
        .into_iter()
        .map(|e| e.request.container_id)
        .collect();
    assert!(left.is_empty(), "left after GC: {left:?}");

    // Without a GC: the periodic check.
    let c = lab.add_pod("c").unwrap();
    client.add_endpoint(&pod_request(&c)).unwrap();
    c.ip(&["link", "del", "eth0"]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(25);
    while !client.endpoints().unwrap().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the endpoint of a deleted interface is still registered:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Counts the files renamed into a directory (each write of the registry is one rename). The
/// watch takes creations too: inotify merges an event into an identical one still unread, and
/// the temporary file's creation between two renames keeps them apart.
struct RenameCounter(i32);

impl RenameCounter {
    fn watch(dir: &Path) -> RenameCounter {
        // SAFETY: plain syscalls on a descriptor we own.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        assert!(
            fd >= 0,
            "inotify_init1: {}",
            std::io::Error::last_os_error()
        );
        let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
        let wd = unsafe {
            libc::inotify_add_watch(fd, path.as_ptr(), libc::IN_MOVED_TO | libc::IN_CREATE)
        };
        assert!(
            wd >= 0,
            "inotify_add_watch: {}",
            std::io::Error::last_os_error()
        );
        RenameCounter(fd)
    }

    /// Renames to `name` since the last call.
    fn take(&self, name: &str) -> usize {
        let mut n = 0;
        let mut buf = [0u8; 16 * 1024];
        loop {
            // SAFETY: reading into our own buffer.
            let len = unsafe { libc::read(self.0, buf.as_mut_ptr().cast(), buf.len()) };
            if len <= 0 {
                return n;
            }
            let mut off = 0;
            while off + 16 <= len as usize {
                let name_len =
                    u32::from_ne_bytes(buf[off + 12..off + 16].try_into().unwrap()) as usize;
                let raw = &buf[off + 16..off + 16 + name_len];
                let end = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
                let mask = u32::from_ne_bytes(buf[off + 4..off + 8].try_into().unwrap());
                if mask & libc::IN_MOVED_TO != 0 && &raw[..end] == name.as_bytes() {
                    n += 1;
                }
                off += 16 + name_len;
            }
        }
    }
}

impl Drop for RenameCounter {
    fn drop(&mut self) {
        // SAFETY: closing our own descriptor.
        unsafe { libc::close(self.0) };
    }
}

#[test]
fn a_guests_dhcp_flood_writes_the_registry_a_bounded_number_of_times() {
    require_lab!();
    // For 3 s: the guest program passes about 50 of these to the daemon (its per-guest DHCP
    // rate), each one flipping the guest's binding.
    const ROUNDS: usize = 60;
    let mut lab = Lab::new("api-dhcp-flood").unwrap();
    let vm = lab.add_pod("vm").unwrap();
    let other = lab.add_pod("other").unwrap();
    let d = Daemon::start("api-dhcp-flood", EMPTY_STATE, &[]).expect("daemon starts");
    let client = d.client();
    register_vm_pod(&client, &vm).expect("the VM pod's endpoint");
    let mut guest = TapGuest::open(&vm.netns_path, "tap0").unwrap();
    let file = registry_file(&d);
    let writes = RenameCounter::watch(file.parent().unwrap());

    // Bind, release, bind, release...
    let start = Instant::now();
    let mut add_took = Duration::ZERO;
    for i in 0..ROUNDS {
        guest
            .send(&dhcp_frame(vm.mac, MessageType::Request, Some(vm.ip)))
            .unwrap();
        guest
            .send(&dhcp_frame(vm.mac, MessageType::Release, None))
            .unwrap();
        if i == ROUNDS / 2 {
            // A CNI ADD in the middle of the flood.
            let t = Instant::now();
            client.add_endpoint(&pod_request(&other)).unwrap();
            add_took = t.elapsed();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let flood = start.elapsed();
    // The last word: bound (asked again until the guest's DHCP rate lets it through).
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        guest
            .send(&dhcp_frame(vm.mac, MessageType::Request, Some(vm.ip)))
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let g = &client.guests().unwrap()[0];
        if g.dhcp_bound && g.phase == GuestPhase::Ready {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the guest never bound:\n{}",
            d.log()
        );
    }
    let handled = client.guests().unwrap()[0].dhcp_messages;
    // The binding reaches the file within the flush interval.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = fs::read_to_string(&file).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let bound = v["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["bound"] == serde_json::json!(true));
        if bound {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the binding was never written: {text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let n = writes.take("endpoints.json");
    let total = start.elapsed();
    // At most one write per flush interval, plus the ADD's.
    let bound = total.as_secs() as usize + 3;
    eprintln!(
        "{} DHCP messages sent in {flood:?} ({handled} counted by the guest program): {n} \
         registry writes in {total:?}; ADD took {add_took:?}",
        2 * ROUNDS
    );
    assert!(
        handled >= 20,
        "only {handled} DHCP messages reached the daemon: the flood shows nothing"
    );
    assert!(
        n <= bound,
        "the guest's DHCP caused {n} registry writes in {total:?} (at most {bound} expected)"
    );
    assert!(
        add_took < Duration::from_secs(1),
        "a CNI ADD took {add_took:?} during the flood"
    );
}
