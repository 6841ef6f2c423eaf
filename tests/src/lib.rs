//! The netns lab shared by integration tests, the demo and benchmarks.
//!
//! Everything here is test infrastructure: it shells out to `ip` (iproute2) and touches host
//! sysctls, which product crates never do.
//!
//! # Topology (Calico-style, routed)
//!
//! A [`Lab`] owns a set of [`Pod`]s. Each pod is a network namespace `tpXXX-<name>` with `eth0`
//! (a veth) holding a `/32` from the lab's own /24 in 10.240.0.0/13, and a default route
//! `via 169.254.1.1 dev eth0 onlink`. The host-side veth `tpXXX-NN<name>` stays in the root
//! namespace with `proxy_arp=1` (so it answers ARP for 169.254.1.1), `rp_filter=0`, and a `/32`
//! route to the pod; its `neigh.proxy_delay=0` makes proxy ARP answer at once, as Calico does.
//! `net.ipv4.ip_forward=1` on the host while a lab exists; the previous value
//! comes back when the last lab goes. Pod-to-pod traffic is routed by the host, crossing both
//! host veths: the place for tc programs is [`Pod::host_ifindex`].
//!
//! Labs are safe to create from parallel test threads and processes: each reserves a slot in
//! `/run/tapestry-lab` giving a unique prefix `tpXXX` and /24 (see [`lab`]). Dropping a `Lab`
//! stops its servers, kills processes left in its pods, deletes its namespaces and links, and
//! never panics; [`Lab::destroy`] does the same and returns the errors. [`Lab::keep`] leaves it
//! all in place (`make demo --keep`); [`destroy_lab`]`(prefix)` or [`cleanup_labs`]`(true)`
//! removes kept labs later.
//!
//! # Running things in a pod
//!
//! `ip netns exec` remounts `/sys` and hides `/sys/fs/bpf`, so nothing here uses it:
//! - [`tapestry_netns::run_in`] / [`Pod::in_netns`] run a closure on a fresh thread that called
//!   `setns(CLONE_NEWNET)`; sockets created there stay in the pod and can be used from any
//!   thread afterwards.
//! - [`Pod::spawn`], [`Pod::run`], [`Pod::run_ok`], [`Pod::command`] run a process in the pod
//!   (`setns` between fork and exec, like `nsenter --net=`), keeping the `Command`'s stdio.
//! - [`Pod::ip`] runs `ip -n <netns> ...`; [`Pod::sysctl`] / [`Pod::set_sysctl`].
//!
//! # Servers and clients
//!
//! [`Pod::serve_tcp_name`] / [`Pod::serve_udp_name`] start in-process server threads (sockets
//! bound to `0.0.0.0:port` inside the pod) answering every request with `"<pod name>\n"`; the
//! returned [`ServerHandle`] stops them on drop and counts requests and client IPs.
//! [`Pod::tcp_request`], [`Pod::udp_request`], [`Pod::tcp_connect`] are the clients inside a
//! pod; [`tcp_request`], [`udp_request`], [`tcp_connect`] the same from the calling thread's
//! namespace (the host, for a test thread). Every call takes a timeout. Protocol: [`net`].
//!
//! # In an integration test
//!
//! ```no_run
//! use std::time::Duration;
//! use tapestry_tests::{Lab, require_lab};
//!
//! #[test]
//! fn client_reaches_backend() {
//!     require_lab!(); // skip (or fail under CI=…) without root, bpffs, `ip`
//!     let mut lab = Lab::new("client_reaches_backend").unwrap();
//!     let client = lab.add_pod("client").unwrap();
//!     let backend = lab.add_pod("backend").unwrap();
//!     let _srv = backend.serve_tcp_name(8080).unwrap();
//!     let reply = client
//!         .tcp_request(backend.addr(8080), b"hi", Duration::from_secs(2))
//!         .unwrap();
//!     assert_eq!(reply, "backend");
//!     let vip = lab.service_ip(0); // a VIP no other lab uses
//!     # let _ = vip;
//! } // lab dropped: servers stopped, namespaces and links deleted
//! ```

pub mod cluster;
pub mod cmd;
pub mod cni;
pub mod conformance;
pub mod daemon;
pub mod guest;
pub mod k8s;
pub mod lab;
pub mod migration;
pub mod net;
pub mod netns;
pub mod node;
pub mod poll;
pub mod prereq;
pub mod tapfd;

pub use lab::{
    Lab, MAX_PODS, MAX_SERVICE_IPS, POD_GATEWAY, Pod, cleanup_labs, destroy_lab, lab_resources,
    registered_labs,
};
pub use net::{Proto, ServerHandle, stream_request, tcp_connect, tcp_request, udp_request};
pub use netns::{kill_netns_processes, pids_in_netns};
pub use poll::poll;
pub use prereq::{lab_available, require_root_and_bpffs};
