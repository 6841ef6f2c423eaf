//! Real QEMU guests (tests/src/guest.rs) on a tap in a lab pod, without the eBPF
//! cross-connect: the tap itself carries an address in the pod, so the pod reaches the guest
//! directly; and QEMU's live migration of a guest between two such pods. Need root, bpffs,
//! `ip`, qemu-system-x86_64 and the artifacts of scripts/build-guest.sh; skipped otherwise
//! (failed under `CI=...`).

use std::fs;
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tapestry_node_daemon::datapath::iface::{capture_socket, ifindex_of, recv_frame};
use tapestry_tests::guest::{
    GUEST_TCP_PORT, GUEST_UDP_PORT, Guest, GuestConfig, GuestNet, MigrationStatus, fmt_mac,
};
use tapestry_tests::{Lab, Pod, poll, require_lab, require_qemu, stream_request};

/// Per boot attempt; `wait_ready` retries once when the kernel never reaches /init.
const BOOT: Duration = Duration::from_secs(45);
const T: Duration = Duration::from_secs(10);

/// `tap0` in the pod, up, with `addr` on the pod's side.
fn add_tap(pod: &Pod, addr: &str) {
    pod.ip(&["tuntap", "add", "dev", "tap0", "mode", "tap"])
        .unwrap();
    pod.ip(&["addr", "add", addr, "dev", "tap0"]).unwrap();
    pod.ip(&["link", "set", "tap0", "up"]).unwrap();
}

fn pid_alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z')),
        Err(_) => false,
    }
}

#[test]
fn static_guest_serves_its_name_and_runs_console_commands() {
    require_lab!();
    require_qemu!();
    let mut lab = Lab::new("guest_static").unwrap();
    let pod = lab.add_pod("vm").unwrap();
    add_tap(&pod, "192.168.77.1/24");
    let guest_ip = Ipv4Addr::new(192, 168, 77, 2);
    let cfg = GuestConfig::new("vm-static", pod.mac).with_static(
        guest_ip,
        24,
        Some(Ipv4Addr::new(192, 168, 77, 1)),
    );
    let mut g = Guest::boot(&pod, cfg).unwrap();
    let boot = g.wait_ready(BOOT).unwrap();
    eprintln!("guest ready in {boot:?} ({} attempt(s))", g.attempts());
    assert_eq!(g.ip(), Some(guest_ip));
    assert!(g.dhcp_lease().is_none());

    // TCP 8080: one request per connection, then several lines on one connection.
    let addr = g.addr(GUEST_TCP_PORT).unwrap();
    let t0 = Instant::now();
    assert_eq!(pod.tcp_request(addr, b"who", T).unwrap(), "vm-static");
    eprintln!("first TCP request took {:?}", t0.elapsed());
    let mut s = pod.tcp_connect(addr, T).unwrap();
    for _ in 0..3 {
        assert_eq!(stream_request(&mut s, b"again").unwrap(), "vm-static");
    }
    drop(s);
    // UDP 5353.
    assert_eq!(
        pod.udp_request(g.addr(GUEST_UDP_PORT).unwrap(), b"who", T)
            .unwrap(),
        "vm-static"
    );
    // ICMP, and the pod learned the guest's MAC.
    pod.run_ok(Command::new("busybox").args(["ping", "-c", "1", "-W", "5", "192.168.77.2"]))
        .unwrap();
    let neigh = pod.ip(&["neigh", "show", "192.168.77.2"]).unwrap();
    assert!(
        neigh.contains(&fmt_mac(&pod.mac)),
        "neighbour entry {neigh:?} lacks {}",
        fmt_mac(&pod.mac)
    );

    // The serial console.
    let out = g.console("ip -o addr show eth0", T).unwrap();
    assert!(out.contains("inet 192.168.77.2/24"), "{out:?}");
    let mac = g.console("cat /sys/class/net/eth0/address", T).unwrap();
    assert_eq!(mac.trim(), fmt_mac(&pod.mac));
    let routes = g.console("ip route", T).unwrap();
    assert!(routes.contains("default via 192.168.77.1"), "{routes:?}");
    let (rc, out) = g
        .console_status("sh -c 'echo to-stderr >&2; exit 3'", T)
        .unwrap();
    assert_eq!((rc, out.as_str()), (3, "to-stderr\n"));
    assert!(g.console("false", T).is_err());
    // A command that does not finish is interrupted; the shell stays usable.
    assert!(g.console("sleep 60", Duration::from_secs(2)).is_err());
    assert_eq!(g.console("echo still here", T).unwrap(), "still here\n");
    // The guest reaches the pod.
    g.console("ping -c 1 -W 5 192.168.77.1", T).unwrap();

    let status = g.monitor("info status", T).unwrap();
    assert!(status.contains("running"), "{status:?}");

    // kill() stops QEMU by its pid file.
    let pid = g.pid().unwrap();
    let dir = g.dir().to_path_buf();
    assert!(pid_alive(pid));
    g.kill().unwrap();
    assert!(!pid_alive(pid), "qemu {pid} survived kill()");
    assert!(g.console("true", T).is_err());
    drop(g);
    assert!(!dir.exists(), "{} left behind", dir.display());
}

/// busybox udhcpd in the pod on tap0, killed on drop.
struct Udhcpd {
    child: Child,
    dir: PathBuf,
}

impl Udhcpd {
    fn start(pod: &Pod, conf: &str) -> Udhcpd {
        let dir = std::env::temp_dir().join(format!("tapestry-udhcpd-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let leases = dir.join("leases");
        fs::write(&leases, b"").unwrap();
        let conf = format!(
            "{conf}\nlease_file {}\npidfile {}\n",
            leases.display(),
            dir.join("pid").display()
        );
        let path = dir.join("udhcpd.conf");
        fs::write(&path, conf).unwrap();
        let log = fs::File::create(dir.join("log")).unwrap();
        let child = pod
            .spawn(
                Command::new("busybox")
                    .arg("udhcpd")
                    .arg("-f")
                    .arg(&path)
                    .stdin(Stdio::null())
                    .stdout(log.try_clone().unwrap())
                    .stderr(log),
            )
            .unwrap();
        Udhcpd { child, dir }
    }

    fn log(&self) -> String {
        fs::read_to_string(Path::new(&self.dir).join("log")).unwrap_or_default()
    }
}

impl Drop for Udhcpd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn dhcp_guest_applies_the_offered_lease() {
    require_lab!();
    require_qemu!();
    let mut lab = Lab::new("guest_dhcp").unwrap();
    let pod = lab.add_pod("vm").unwrap();
    add_tap(&pod, "192.168.78.1/24");
    let mac = fmt_mac(&pod.mac);
    let dhcpd = Udhcpd::start(
        &pod,
        &format!(
            "interface tap0\nstart 192.168.78.10\nend 192.168.78.20\n\
             option subnet 255.255.255.0\noption router 192.168.78.1\n\
             option dns 192.168.78.1\noption mtu 1400\noption hostname dhcp-host\n\
             option domain lab.test\noption lease 600\nstatic_lease {mac} 192.168.78.42"
        ),
    );
    let cfg = GuestConfig::new("vm-dhcp", pod.mac);
    assert_eq!(cfg.net, GuestNet::Dhcp);
    let mut g = Guest::boot(&pod, cfg).unwrap();
    let boot = match g.wait_ready(BOOT) {
        Ok(t) => t,
        Err(e) => panic!("{e:#}\nudhcpd:\n{}", dhcpd.log()),
    };
    eprintln!("guest ready in {boot:?} ({} attempt(s))", g.attempts());

    let lease = g.dhcp_lease().expect("a TAPESTRY-DHCP line");
    assert_eq!(lease.ip, Ipv4Addr::new(192, 168, 78, 42));
    assert_eq!(lease.prefix, 24);
    assert_eq!(lease.router, Some(Ipv4Addr::new(192, 168, 78, 1)));
    assert_eq!(lease.server, Some(Ipv4Addr::new(192, 168, 78, 1)));
    assert_eq!(lease.dns, vec![Ipv4Addr::new(192, 168, 78, 1)]);
    assert_eq!(lease.mtu, Some(1400));
    assert_eq!(lease.link_mtu, Some(1400));
    assert_eq!(lease.hostname.as_deref(), Some("dhcp-host"));
    assert_eq!(lease.domain.as_deref(), Some("lab.test"));
    assert_eq!(lease.lease_secs, Some(600));
    assert_eq!(g.ip(), Some(lease.ip));

    // The guest applied it.
    let out = g.console("ip -o addr show eth0", T).unwrap();
    assert!(out.contains("inet 192.168.78.42/24"), "{out:?}");
    assert_eq!(
        g.console("cat /sys/class/net/eth0/mtu", T).unwrap().trim(),
        "1400"
    );
    let routes = g.console("ip route", T).unwrap();
    assert!(routes.contains("default via 192.168.78.1"), "{routes:?}");
    let resolv = g.console("cat /etc/resolv.conf", T).unwrap();
    assert!(resolv.contains("nameserver 192.168.78.1"), "{resolv:?}");
    // Its name server answers on the leased address.
    assert_eq!(
        pod.tcp_request(g.addr(GUEST_TCP_PORT).unwrap(), b"who", T)
            .unwrap(),
        "vm-dhcp"
    );

    // Drop kills QEMU.
    let pid = g.pid().unwrap();
    drop(g);
    assert!(!pid_alive(pid), "qemu {pid} survived drop");
}

#[test]
fn a_boot_that_never_reaches_init_is_retried_once_then_reported() {
    require_lab!();
    require_qemu!();
    let mut lab = Lab::new("guest_noboot").unwrap();
    let pod = lab.add_pod("vm").unwrap();
    add_tap(&pod, "192.168.79.1/24");

    // /init replaced by `cat`: the kernel boots, but TAPESTRY-BOOT never comes.
    let mut cfg = GuestConfig::new("vm-hang", pod.mac);
    cfg.extra_append = "rdinit=/bin/cat".into();
    let mut g = Guest::boot(&pod, cfg).unwrap();
    let first = g.pid().unwrap();
    let err = g.wait_ready(Duration::from_secs(3)).unwrap_err();
    assert_eq!(g.attempts(), 2, "{err:#}");
    assert!(format!("{err:#}").contains("never ran"), "{err:#}");
    assert!(
        !pid_alive(first),
        "the first qemu {first} survived the retry"
    );
    let second = g.pid().unwrap();
    drop(g);
    assert!(!pid_alive(second), "qemu {second} survived drop");

    // No init at all: the kernel panics, QEMU exits (-no-reboot), no retry.
    let mut cfg = GuestConfig::new("vm-panic", pod.mac);
    cfg.extra_append = "rdinit=/nonexistent".into();
    let mut g = Guest::boot(&pod, cfg).unwrap();
    let err = g.wait_ready(BOOT).unwrap_err();
    assert_eq!(g.attempts(), 1, "{err:#}");
    assert!(
        format!("{err:#}").contains("exited before ready"),
        "{err:#}"
    );
    eprintln!("expected failure: {err:#}");
}

/// One whole migration (128 MB under TCG: about a second when the machine is idle).
const MIGRATE: Duration = Duration::from_secs(120);

/// Frames and when they came.
type Frames = Vec<(Instant, Vec<u8>)>;

/// Every frame on a pod's `tap0` (both ways), read by a thread until [`Capture::stop`].
struct Capture {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Frames>>,
}

impl Capture {
    fn start(pod: &Pod) -> Capture {
        let sock: OwnedFd = pod
            .in_netns(|| capture_socket(ifindex_of("tap0")?))
            .unwrap()
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let done = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut frames = Vec::new();
            let mut buf = [0u8; 2048];
            while !done.load(Ordering::Relaxed) {
                if let Some(n) = recv_frame(&sock, &mut buf, Duration::from_millis(50)).unwrap() {
                    frames.push((Instant::now(), buf[..n].to_vec()));
                }
            }
            frames
        });
        Capture {
            stop,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> Frames {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

/// RARP (ethertype 0x8035) from `mac`: what QEMU sends to announce a migrated NIC.
fn is_rarp_from(frame: &[u8], mac: &[u8; 6]) -> bool {
    frame.len() >= 14 && frame[6..12] == mac[..] && frame[12..14] == [0x80, 0x35]
}

/// A gratuitous ARP request (sender IP = target IP = `ip`) from `mac`: the guest kernel's own
/// announce, asked for by virtio-net.
fn is_garp_from(frame: &[u8], mac: &[u8; 6], ip: Ipv4Addr) -> bool {
    frame.len() >= 42
        && frame[6..12] == mac[..]
        && frame[12..14] == [0x08, 0x06]
        && frame[20..22] == [0, 1]
        && frame[28..32] == ip.octets()
        && frame[38..42] == ip.octets()
}

fn uptime(g: &Guest) -> f64 {
    let out = g.console("cat /proc/uptime", T).unwrap();
    out.split_whitespace().next().unwrap().parse().unwrap()
}

/// A value of `info migrate_parameters` (`announce-rounds: 5`).
fn migrate_parameter(g: &Guest, key: &str) -> String {
    let out = g.monitor("info migrate_parameters", T).unwrap();
    out.lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{key}: ")))
        .unwrap_or_else(|| panic!("no {key} in {out:?}"))
        .to_string()
}

/// Two pods, each with `tap0` holding 192.168.80.1/24 on its side: the guest (192.168.80.2)
/// answers whichever pod's tap its QEMU is on.
fn two_vm_pods(lab: &mut Lab) -> [Pod; 2] {
    let pods = [lab.add_pod("vm-a").unwrap(), lab.add_pod("vm-b").unwrap()];
    for p in &pods {
        add_tap(p, "192.168.80.1/24");
    }
    pods
}

const MIG_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 80, 2);

fn mig_config(pod: &Pod, name: &str) -> GuestConfig {
    GuestConfig::new(name, pod.mac).with_static(MIG_IP, 24, Some(Ipv4Addr::new(192, 168, 80, 1)))
}

#[test]
fn a_guest_migrates_between_two_pods_and_back_three_times_and_stays_the_same_guest() {
    require_lab!();
    require_qemu!();
    let mut lab = Lab::new("guest_migrate").unwrap();
    let pods = two_vm_pods(&mut lab);
    let cfg = mig_config(&pods[0], "vm-mig");
    let mac = cfg.mac;
    let mut g = Guest::boot(&pods[0], cfg.clone()).unwrap();
    g.wait_ready(BOOT).unwrap();
    let addr = g.addr(GUEST_TCP_PORT).unwrap();
    assert_eq!(pods[0].tcp_request(addr, b"who", T).unwrap(), "vm-mig");
    // What a reboot would change: the boot id, a file in the initramfs's RAM, the uptime.
    let boot_id = g.console("cat /proc/sys/kernel/random/boot_id", T).unwrap();
    g.console("echo written-before-the-first-move > /tmp/marker", T)
        .unwrap();
    let mut last_uptime = uptime(&g);
    let mut at = 0;
    for hop in 1..=6 {
        let to = 1 - at;
        let target = Guest::boot_incoming(&pods[to], cfg.clone()).unwrap();
        assert!(target.is_incoming());
        assert_eq!(target.vm_status().unwrap(), "paused (inmigrate)");
        assert!(target.migration_socket().exists());
        let rounds: usize = migrate_parameter(&target, "announce-rounds")
            .parse()
            .unwrap();
        let cap = Capture::start(&pods[to]);
        let t0 = Instant::now();
        let info = g.migrate_to(&target, MIGRATE).unwrap();
        let returned = Instant::now();
        eprintln!(
            "hop {hop} (pod {at} -> {to}): {} in {:?}, setup {:?} ms, {:?} KiB sent of {:?}, \
             {:?} Mbit/s",
            info.describe(),
            returned - t0,
            info.setup_ms,
            info.transferred_kib,
            info.total_kib,
            info.throughput_mbps
        );
        assert_eq!(info.status, MigrationStatus::Completed, "{}", info.raw);
        let total = info.total_time_ms.expect("total time");
        let down = info.downtime_ms.expect("downtime");
        assert!(total > 0 && down > 0 && down <= total, "{}", info.raw);
        assert!(info.setup_ms.is_some(), "{}", info.raw);
        assert!(info.total_kib.unwrap() >= 128 * 1024, "{}", info.raw);
        assert!(info.transferred_kib.unwrap() > 0, "{}", info.raw);
        assert_eq!(info.remaining_kib, Some(0), "{}", info.raw);

        // The source is paused for good and says so; the target runs.
        assert_eq!(g.vm_status().unwrap(), "paused (postmigrate)");
        assert!(
            format!("{:#}", g.console("true", T).unwrap_err()).contains("migrated away"),
            "the source's console must refuse"
        );
        assert_eq!(target.vm_status().unwrap(), "running");

        // The guest answers on the target's tap, and no longer on the source's.
        assert_eq!(pods[to].tcp_request(addr, b"who", T).unwrap(), "vm-mig");
        assert!(
            pods[at]
                .tcp_request(addr, b"who", Duration::from_secs(1))
                .is_err(),
            "the paused source still answers in pod {at}"
        );

        // The same guest, not a reboot: boot id, the marker, uptime going on.
        assert_eq!(
            target
                .console("cat /proc/sys/kernel/random/boot_id", T)
                .unwrap(),
            boot_id
        );
        assert_eq!(
            target.console("cat /tmp/marker", T).unwrap(),
            "written-before-the-first-move\n"
        );
        let up = uptime(&target);
        assert!(
            up > last_uptime,
            "uptime {up} after {last_uptime}: rebooted?"
        );
        last_uptime = up;
        assert!(
            target
                .console_log()
                .contains("written-before-the-first-move"),
            "the target's console log has what came after the switch-over"
        );

        // The announce on the target's tap: QEMU's RARPs (announce-rounds of them, the last
        // about 800 ms after the first) and the guest's gratuitous ARPs.
        std::thread::sleep(Duration::from_secs(2));
        let frames = cap.stop();
        let rarps: Vec<Instant> = frames
            .iter()
            .filter(|(_, f)| is_rarp_from(f, &mac))
            .map(|(t, _)| *t)
            .collect();
        let garps = frames
            .iter()
            .filter(|(_, f)| is_garp_from(f, &mac, MIG_IP))
            .count();
        let first = rarps.first().copied().unwrap_or(returned);
        let ms = |a: Instant, b: Instant| a.saturating_duration_since(b).as_millis();
        eprintln!(
            "hop {hop}: {} RARP on pod {to}'s tap0 at +{:?} ms after the first, the first {} ms \
             after migrate_to started and {} ms before it returned; {garps} gratuitous ARP; \
             {} frames in all",
            rarps.len(),
            rarps.iter().map(|t| ms(*t, first)).collect::<Vec<_>>(),
            ms(first, t0),
            ms(returned, first),
            frames.len()
        );
        assert_eq!(rarps.len(), rounds, "announce-rounds is {rounds}");
        assert!(
            garps >= 1,
            "no gratuitous ARP from the guest on the target's tap"
        );

        // Dropping the source kills its QEMU and frees its tap; the target does not notice.
        let src_pid = g.pid().unwrap();
        let tgt_pid = target.pid().unwrap();
        drop(g);
        assert!(
            !pid_alive(src_pid),
            "the source's qemu {src_pid} survived drop"
        );
        assert!(pid_alive(tgt_pid));
        assert_eq!(
            target.console("echo on the target", T).unwrap(),
            "on the target\n"
        );
        g = target;
        at = to;
    }
    assert_eq!(at, 0, "three round trips end where they began");
    assert_eq!(pods[0].tcp_request(addr, b"who", T).unwrap(), "vm-mig");
}

#[test]
fn a_cancelled_or_failed_migration_leaves_the_guest_running_at_the_source() {
    require_lab!();
    require_qemu!();
    let mut lab = Lab::new("guest_migcancel").unwrap();
    let pods = two_vm_pods(&mut lab);
    let cfg = mig_config(&pods[0], "vm-stay");
    let mut g = Guest::boot(&pods[0], cfg.clone()).unwrap();
    g.wait_ready(BOOT).unwrap();
    let addr = g.addr(GUEST_TCP_PORT).unwrap();
    let boot_id = g.console("cat /proc/sys/kernel/random/boot_id", T).unwrap();
    let still_here = |g: &Guest| {
        assert_eq!(g.vm_status().unwrap(), "running");
        assert_eq!(
            g.console("cat /proc/sys/kernel/random/boot_id", T).unwrap(),
            boot_id
        );
        assert_eq!(pods[0].tcp_request(addr, b"who", T).unwrap(), "vm-stay");
    };
    assert_eq!(
        g.migration_status().unwrap().status,
        MigrationStatus::None,
        "no migration yet"
    );
    assert!(g.wait_migration(T).is_err(), "nothing to wait for");
    assert!(g.set_migration_speed(0).is_err());
    let err = format!("{:#}", g.start_migration(&g).unwrap_err());
    assert!(err.contains("not started by boot_incoming"), "{err}");

    // 1 MB/s: 128 MB would take two minutes.
    g.set_migration_speed(1_000_000).unwrap();
    assert_eq!(
        migrate_parameter(&g, "max-bandwidth"),
        "1000000 bytes/second"
    );
    let target = Guest::boot_incoming(&pods[1], cfg.clone()).unwrap();
    let target_pid = target.pid().unwrap();
    g.start_migration(&target).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let info = g.migration_status().unwrap();
    eprintln!("after 2 s at 1 MB/s: {}", info.describe());
    assert_eq!(info.status, MigrationStatus::Active, "{}", info.raw);
    let sent = info.transferred_kib.unwrap();
    assert!(
        sent > 0 && sent < 16 * 1024,
        "{sent} KiB sent in 2 s at 1 MB/s"
    );
    assert!(info.expected_downtime_ms.is_some(), "{}", info.raw);
    let info = g.cancel_migration().unwrap();
    assert_eq!(info.status, MigrationStatus::Cancelled, "{}", info.raw);
    let err = format!("{:#}", g.wait_migration(T).unwrap_err());
    assert!(err.contains("cancelled"), "{err}");
    still_here(&g);
    // The target's QEMU gives up by itself; its Guest says so and drops.
    let err = format!("{:#}", target.wait_incoming(T).unwrap_err());
    assert!(err.contains("exited"), "{err}");
    assert!(target.console("true", T).is_err());
    poll(T, "the cancelled target's qemu to exit", || {
        Ok((!pid_alive(target_pid)).then_some(()))
    })
    .unwrap();
    let dir = target.dir().to_path_buf();
    drop(target);
    assert!(!dir.exists());

    // Failed: the target dies in the middle.
    let mut target = Guest::boot_incoming(&pods[1], cfg.clone()).unwrap();
    g.start_migration(&target).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        g.migration_status().unwrap().status,
        MigrationStatus::Active
    );
    target.kill().unwrap();
    let err = format!("{:#}", g.wait_migration(MIGRATE).unwrap_err());
    eprintln!("expected failure: {err}");
    assert!(err.contains("migration failed ("), "{err}");
    assert_eq!(
        g.migration_status().unwrap().status,
        MigrationStatus::Failed
    );
    still_here(&g);
    drop(target);

    // Full speed again: the next migration goes through, to the same guest.
    g.set_migration_speed(1 << 30).unwrap();
    let target = Guest::boot_incoming(&pods[1], cfg).unwrap();
    let info = g.migrate_to(&target, MIGRATE).unwrap();
    eprintln!("after a cancel and a failure: {}", info.describe());
    assert_eq!(info.status, MigrationStatus::Completed);
    drop(g);
    assert_eq!(
        target
            .console("cat /proc/sys/kernel/random/boot_id", T)
            .unwrap(),
        boot_id
    );
    assert_eq!(pods[1].tcp_request(addr, b"who", T).unwrap(), "vm-stay");
}
