//! End to end with a real VM: a conflist (Debian's `ptp` + `host-local`, then `tapestry-cni` for
//! a VM network) creates the VM pod; a QEMU guest (stock kernel, busybox, `udhcpc`) boots on the
//! tap the plugin created, gets the pod IP from the daemon's DHCP, and becomes a Service backend
//! and a Service client exactly like the lab's pods; its spoofing is dropped; DEL cleans up
//! while it runs.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    process::Command,
    time::Duration,
};

use serde_json::Value;
use tapestry_tests::{
    Lab, Pod,
    cni::{NetworkConfigList, Runtime, RuntimeConf},
    daemon::{Daemon, bin_dir, binary},
    guest::{Guest, GuestConfig, qemu_available},
    lab::{parse_mac, vm_conflist},
    require_lab,
};

const T: Duration = Duration::from_secs(5);

/// A backend: address, name, kind (`pod` or `vm`).
type Backend<'a> = (Ipv4Addr, &'a str, &'a str);

fn state(services: &[(&str, Ipv4Addr, Vec<Backend<'_>>)]) -> String {
    let mut s = String::from("services:\n");
    for (name, vip, backends) in services {
        s.push_str(&format!(
            "  - name: {name}\n    vip: {vip}\n    port: 80\n    backends:\n"
        ));
        for (ip, who, kind) in backends {
            s.push_str(&format!(
                "      - {{ ip: {ip}, port: 8080, name: {who}, kind: {kind} }}\n"
            ));
        }
    }
    s
}

fn tally(client: &Pod, vip: Ipv4Addr, n: usize) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for _ in 0..n {
        let who = client
            .tcp_request(SocketAddrV4::new(vip, 80), b"hi\n", T)
            .expect("request through the VIP");
        *m.entry(who).or_default() += 1;
    }
    m
}

#[test]
fn a_qemu_guest_on_the_plugins_tap_is_a_pod_like_any_other() {
    require_lab!();
    if !qemu_available() {
        return;
    }
    binary("tapestry-cni").expect("tapestry-cni is built");
    let mut lab = Lab::new("vm-guest").unwrap();
    let client = lab.add_pod("client").unwrap();
    let be0 = lab.add_pod("be0").unwrap();
    let be1 = lab.add_pod("be1").unwrap();
    let _s0 = be0.serve_tcp_name(8080).unwrap();
    let _s1 = be1.serve_tcp_name(8080).unwrap();
    let mut d = Daemon::start(
        "vm-guest",
        "services: []\n",
        &[&client.host_ifname, &be0.host_ifname, &be1.host_ifname],
    )
    .unwrap();

    // The VM pod, made by a real conflist: ptp (routed, like the lab) and tapestry-cni.
    let netns_name = format!("{}-vm", lab.prefix());
    let netns = PathBuf::from("/run/netns").join(&netns_name);
    assert!(
        Command::new("ip")
            .args(["netns", "add", &netns_name])
            .status()
            .unwrap()
            .success()
    );
    let list =
        NetworkConfigList::from_value(&vm_conflist(&lab, &d.socket, &d.dir.join("ipam"))).unwrap();
    let rt = Runtime::new(["/usr/lib/cni".into(), bin_dir()], d.dir.join("cni-cache"));
    let conf = RuntimeConf::new("vm-ctr", &netns, "eth0")
        .arg("IgnoreUnknown", "1")
        .arg("K8S_POD_NAMESPACE", "default")
        .arg("K8S_POD_NAME", "vm-1");
    let result: Value = rt.add(&list, &conf).expect("CNI ADD of the VM pod");
    let eth0 = result["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "eth0" && i["sandbox"].is_string())
        .expect("eth0 in the result")
        .clone();
    let vm_ip: Ipv4Addr = result["ips"][0]["address"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        result["interfaces"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["name"] == "tap0"),
        "the result lists the tap: {result}"
    );

    // A stock guest on the plugin's tap: its address comes from DHCP, and it is the pod's.
    let mut guest = Guest::boot_in(
        &netns,
        GuestConfig::new("vm-1", parse_mac(eth0["mac"].as_str().unwrap()).unwrap()),
    )
    .unwrap();
    guest
        .wait_ready(Duration::from_secs(60))
        .expect("the guest boots");
    let lease = guest.dhcp_lease().expect("a DHCP lease");
    assert_eq!(lease.ip, vm_ip, "the guest got the pod IP");
    let g = d.client().guests().unwrap();
    assert_eq!((g.len(), g[0].phase.as_str()), (1, "Ready"), "{g:?}");
    assert_eq!(g[0].name, "vm-1");

    // A pod reaches the guest by pod IP.
    assert_eq!(
        client
            .tcp_request(SocketAddrV4::new(vm_ip, 8080), b"hi\n", T)
            .unwrap(),
        "vm-1"
    );

    // One Service with the VM and two pods: connections spread over all three.
    let vip = lab.service_ip(0);
    let pods_vip = lab.service_ip(1);
    d.write_state(&state(&[
        (
            "mixed",
            vip,
            vec![
                (be0.ip, "be0", "pod"),
                (be1.ip, "be1", "pod"),
                (vm_ip, "vm-1", "vm"),
            ],
        ),
        (
            "pods",
            pods_vip,
            vec![(be0.ip, "be0", "pod"), (be1.ip, "be1", "pod")],
        ),
    ]))
    .unwrap();
    d.wait_generation(2, T).unwrap();
    let t = tally(&client, vip, 90);
    assert_eq!(t.len(), 3, "VM and pods all answer: {t:?}");

    // The guest is a Service client too: balanced per packet on its pod's veth.
    let out = guest
        .console(&format!("echo hi | nc -w 3 {pods_vip} 80"), T)
        .expect("the guest reaches the pods' service");
    assert!(out.contains("be0") || out.contains("be1"), "{out:?}");

    // Spoofing from the guest: another source IP, a rogue ARP, another MAC.
    let o = lab.pod_cidr().0.octets();
    let spoof = Ipv4Addr::new(o[0], o[1], o[2], 99);
    let _ = guest.console(&format!("ip addr add {spoof}/32 dev eth0"), T);
    let _ = guest.console_status(&format!("ping -c 1 -W 1 -I {spoof} {}", be0.ip), T);
    let _ = guest.console_status(&format!("arping -c 1 -U -I eth0 -s {spoof} {spoof}"), T);
    let _ = guest.console_status(
        &format!(
            "ip link set eth0 address 02:00:00:00:00:99 && ping -c 1 -W 1 {}",
            be0.ip
        ),
        T,
    );
    let g = &d.client().guests().unwrap()[0];
    for reason in ["spoofed_ip", "spoofed_arp", "spoofed_mac"] {
        assert!(
            g.drops.get(reason).copied().unwrap_or(0) >= 1,
            "{reason}: {:?}",
            g.drops
        );
    }

    // DEL while the guest runs: endpoint, guest and tap go.
    rt.del(&list, &conf).expect("CNI DEL");
    assert!(d.client().guests().unwrap().is_empty());
    let links = Command::new("ip")
        .args(["-n", &netns_name, "-o", "link", "show"])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&links.stdout).contains("tap0"));
    drop(guest);
    d.kill9().unwrap();
    let _ = Command::new("ip")
        .args(["netns", "del", &netns_name])
        .status();
}
