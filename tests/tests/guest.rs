//! Real QEMU guests (tests/src/guest.rs) on a tap in a lab pod, without the eBPF
//! cross-connect: the tap itself carries an address in the pod, so the pod reaches the guest
//! directly. Need root, bpffs, `ip`, qemu-system-x86_64 and the artifacts of
//! scripts/build-guest.sh; skipped otherwise (failed under `CI=...`).

use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tapestry_tests::guest::{
    GUEST_TCP_PORT, GUEST_UDP_PORT, Guest, GuestConfig, GuestNet, fmt_mac,
};
use tapestry_tests::{Lab, Pod, require_lab, require_qemu, stream_request};

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
