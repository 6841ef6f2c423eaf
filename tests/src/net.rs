//! Name servers and clients used by tests: each server answers with the name of the pod it runs
//! in, so a test sees which backend a Service connection reached.
//!
//! Protocol, TCP: for every `\n`-terminated line the client sends, the server writes back
//! `NAME\n`. When the client shuts down its sending side without having received any reply (or
//! with an unterminated line pending), the server answers once more before closing. A
//! connection can therefore carry many requests ([`stream_request`]).
//! UDP: every datagram is answered with one datagram `NAME\n` to its source.
//!
//! Clients here ([`tcp_request`], [`udp_request`], [`tcp_connect`]) run in the calling thread's
//! network namespace, i.e. on the host for a plain test thread; the `Pod` methods of the same
//! names run them inside a pod.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{
    IpAddr, Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket,
};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// How often server threads look at their stop flag.
const TICK: Duration = Duration::from_millis(50);
/// A connection that sends nothing for this long is closed by the server.
const IDLE_LIMIT: Duration = Duration::from_secs(120);
/// Connections served at the same time by one TCP server; more wait in the backlog.
const MAX_CONNS: usize = 256;
/// Longest reply line a client accepts.
const MAX_REPLY: usize = 64 * 1024;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// State shared by a server's threads, its handle and the lab that owns it.
#[derive(Debug, Default)]
pub(crate) struct ServerShared {
    stop: AtomicBool,
    /// Server threads still running (accept/receive loop and connection threads).
    alive: AtomicUsize,
    connections: AtomicU64,
    requests: AtomicU64,
    clients: Mutex<BTreeMap<IpAddr, u64>>,
    last_peer: Mutex<Option<SocketAddr>>,
}

impl ServerShared {
    fn record_peer(&self, peer: SocketAddr) {
        *lock(&self.clients).entry(peer.ip()).or_default() += 1;
        *lock(&self.last_peer) = Some(peer);
    }

    fn stop_and_wait(&self, limit: Duration) -> bool {
        self.stop.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + limit;
        while self.alive.load(Ordering::SeqCst) > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }
}

/// Decrements `alive` when a server thread ends, however it ends.
struct AliveGuard(Arc<ServerShared>);

impl AliveGuard {
    fn new(shared: &Arc<ServerShared>) -> Self {
        shared.alive.fetch_add(1, Ordering::SeqCst);
        AliveGuard(shared.clone())
    }
}

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.alive.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The servers a lab started, so that tearing the lab down stops them all.
#[derive(Debug, Default)]
pub(crate) struct ServerRegistry {
    servers: Mutex<Vec<Weak<ServerShared>>>,
}

impl ServerRegistry {
    fn register(&self, s: &Arc<ServerShared>) {
        let mut v = lock(&self.servers);
        v.retain(|w| w.strong_count() > 0);
        v.push(Arc::downgrade(s));
    }

    /// Stops every registered server; returns how many did not stop within `limit`.
    pub(crate) fn stop_all(&self, limit: Duration) -> usize {
        let servers: Vec<_> = lock(&self.servers)
            .drain(..)
            .filter_map(|w| w.upgrade())
            .collect();
        for s in &servers {
            s.stop.store(true, Ordering::SeqCst);
        }
        servers.iter().filter(|s| !s.stop_and_wait(limit)).count()
    }
}

/// Transport of a [`ServerHandle`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

/// A running name server. Dropping it (or [`ServerHandle::stop`]) stops its threads and closes
/// its sockets; the lab that owns the pod also stops it on teardown.
#[derive(Debug)]
pub struct ServerHandle {
    shared: Arc<ServerShared>,
    thread: Option<JoinHandle<()>>,
    local_addr: SocketAddrV4,
    proto: Proto,
}

impl ServerHandle {
    /// Port the server listens on (useful when started with port 0).
    pub fn port(&self) -> u16 {
        self.local_addr.port()
    }
    /// Bound address (the wildcard address inside the pod, and the port).
    pub fn local_addr(&self) -> SocketAddrV4 {
        self.local_addr
    }
    pub fn proto(&self) -> Proto {
        self.proto
    }
    /// TCP connections accepted, or UDP datagrams received.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }
    /// Requests answered (TCP lines, UDP datagrams).
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::SeqCst)
    }
    /// Source addresses seen (connections or datagrams per client IP): tells whether the client
    /// IP was preserved or SNATed on the way.
    pub fn client_ips(&self) -> BTreeMap<IpAddr, u64> {
        lock(&self.shared.clients).clone()
    }
    /// Source address and port of the latest connection or datagram.
    pub fn last_peer(&self) -> Option<SocketAddr> {
        *lock(&self.shared.last_peer)
    }
    /// Stops the server and waits (bounded) for its threads.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.shared.stop_and_wait(Duration::from_secs(2));
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

/// Starts a TCP name server bound to `0.0.0.0:port` inside the namespace at `netns_path`.
pub(crate) fn serve_tcp_name(
    netns_path: &Path,
    name: &str,
    port: u16,
    registry: &ServerRegistry,
) -> Result<ServerHandle> {
    let listener = tapestry_netns::run_in(netns_path, || {
        TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))
    })?
    .with_context(|| format!("binding TCP port {port} in {}", netns_path.display()))?;
    listener.set_nonblocking(true)?;
    let local_addr = v4(listener.local_addr()?)?;
    let shared = Arc::new(ServerShared::default());
    registry.register(&shared);
    let reply: Arc<[u8]> = format!("{name}\n").into_bytes().into();
    let guard = AliveGuard::new(&shared);
    let s = shared.clone();
    let thread = std::thread::Builder::new()
        .name(format!("tcp-{name}"))
        .spawn(move || {
            let _guard = guard;
            tcp_accept_loop(listener, reply, s);
        })?;
    Ok(ServerHandle {
        shared,
        thread: Some(thread),
        local_addr,
        proto: Proto::Tcp,
    })
}

fn tcp_accept_loop(listener: TcpListener, reply: Arc<[u8]>, shared: Arc<ServerShared>) {
    while !shared.stop.load(Ordering::SeqCst) {
        if !poll_readable(listener.as_raw_fd(), TICK) {
            continue;
        }
        let (stream, peer) = match listener.accept() {
            Ok(x) => x,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => {
                std::thread::sleep(TICK);
                continue;
            }
        };
        shared.connections.fetch_add(1, Ordering::SeqCst);
        shared.record_peer(peer);
        // Bound the number of connection threads.
        while shared.alive.load(Ordering::SeqCst) > MAX_CONNS && !shared.stop.load(Ordering::SeqCst)
        {
            std::thread::sleep(Duration::from_millis(2));
        }
        let guard = AliveGuard::new(&shared);
        let s = shared.clone();
        let r = reply.clone();
        let spawned = std::thread::Builder::new()
            .name("tcp-conn".into())
            .spawn(move || {
                let _guard = guard;
                let _ = tcp_serve_conn(stream, &r, &s);
            });
        if spawned.is_err() {
            std::thread::sleep(TICK);
        }
    }
    // Stop listening now, not when the last reference goes: a child process forked by another
    // thread holds a copy of every fd until it execs, which would keep the port open and
    // accept (then reset) connections after the handle is gone.
    // SAFETY: plain syscall on a valid fd.
    unsafe { libc::shutdown(listener.as_raw_fd(), libc::SHUT_RDWR) };
}

fn tcp_serve_conn(mut stream: TcpStream, reply: &[u8], shared: &ServerShared) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(TICK))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let _ = stream.set_nodelay(true);
    let mut buf = [0u8; 4096];
    let mut partial = false;
    let mut replied = false;
    let mut last_activity = Instant::now();
    loop {
        if shared.stop.load(Ordering::SeqCst) || last_activity.elapsed() > IDLE_LIMIT {
            break;
        }
        match stream.read(&mut buf) {
            Ok(0) => {
                if partial || !replied {
                    shared.requests.fetch_add(1, Ordering::SeqCst);
                    stream.write_all(reply)?;
                }
                break;
            }
            Ok(n) => {
                last_activity = Instant::now();
                let lines = buf[..n].iter().filter(|&&b| b == b'\n').count();
                partial = buf[n - 1] != b'\n';
                if lines > 0 {
                    let out = reply.repeat(lines);
                    shared.requests.fetch_add(lines as u64, Ordering::SeqCst);
                    stream.write_all(&out)?;
                    replied = true;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
    }
    let _ = stream.shutdown(Shutdown::Both);
    Ok(())
}

/// Starts a UDP name server bound to `0.0.0.0:port` inside the namespace at `netns_path`.
pub(crate) fn serve_udp_name(
    netns_path: &Path,
    name: &str,
    port: u16,
    registry: &ServerRegistry,
) -> Result<ServerHandle> {
    let sock = tapestry_netns::run_in(netns_path, || {
        UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))
    })?
    .with_context(|| format!("binding UDP port {port} in {}", netns_path.display()))?;
    sock.set_read_timeout(Some(TICK))?;
    sock.set_write_timeout(Some(Duration::from_secs(1)))?;
    let local_addr = v4(sock.local_addr()?)?;
    let shared = Arc::new(ServerShared::default());
    registry.register(&shared);
    let reply = format!("{name}\n").into_bytes();
    let guard = AliveGuard::new(&shared);
    let s = shared.clone();
    let thread = std::thread::Builder::new()
        .name(format!("udp-{name}"))
        .spawn(move || {
            let _guard = guard;
            let mut buf = [0u8; 65536];
            while !s.stop.load(Ordering::SeqCst) {
                match sock.recv_from(&mut buf) {
                    Ok((_, peer)) => {
                        s.connections.fetch_add(1, Ordering::SeqCst);
                        s.record_peer(peer);
                        if sock.send_to(&reply, peer).is_ok() {
                            s.requests.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    Err(_) => continue,
                }
            }
        })?;
    Ok(ServerHandle {
        shared,
        thread: Some(thread),
        local_addr,
        proto: Proto::Udp,
    })
}

fn v4(a: SocketAddr) -> io::Result<SocketAddrV4> {
    match a {
        SocketAddr::V4(a) => Ok(a),
        SocketAddr::V6(_) => Err(io::Error::other("expected an IPv4 socket address")),
    }
}

fn poll_readable(fd: i32, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as libc::c_int) };
    n > 0
}

fn remaining(deadline: Instant) -> io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(io::Error::new(io::ErrorKind::TimedOut, "request timed out"))
    } else {
        Ok(left)
    }
}

/// Opens a TCP connection from the calling thread's namespace, with `timeout` for connecting
/// and as the stream's read and write timeouts.
pub fn tcp_connect(addr: SocketAddrV4, timeout: Duration) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr.into(), timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Sends one request line on an open stream and reads one reply line (without its `\n`),
/// using the stream's own timeouts. A `\n` is appended to `payload` if it lacks one; `payload`
/// should hold a single line.
pub fn stream_request(stream: &mut TcpStream, payload: &[u8]) -> io::Result<String> {
    let mut msg = payload.to_vec();
    if msg.last() != Some(&b'\n') {
        msg.push(b'\n');
    }
    stream.write_all(&msg)?;
    read_line(stream)
}

fn read_line(stream: &mut TcpStream) -> io::Result<String> {
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            if out.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed without a reply",
                ));
            }
            break;
        }
        out.extend_from_slice(&buf[..n]);
        if let Some(i) = out.iter().position(|&b| b == b'\n') {
            out.truncate(i);
            break;
        }
        if out.len() > MAX_REPLY {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "reply too long"));
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// One request on a fresh TCP connection from the calling thread's namespace: connect, send
/// `payload` (plus `\n`), return the first reply line without its `\n`. `timeout` bounds the
/// whole exchange.
pub fn tcp_request(addr: SocketAddrV4, payload: &[u8], timeout: Duration) -> io::Result<String> {
    let deadline = Instant::now() + timeout;
    let mut stream = TcpStream::connect_timeout(&addr.into(), timeout)?;
    let _ = stream.set_nodelay(true);
    stream.set_write_timeout(Some(remaining(deadline)?))?;
    stream.set_read_timeout(Some(remaining(deadline)?))?;
    let reply = stream_request(&mut stream, payload)?;
    let _ = stream.shutdown(Shutdown::Both);
    Ok(reply)
}

/// [`tcp_request`] from the network namespace at `netns` (a lab node's, a client outside).
pub fn tcp_request_in(
    netns: &std::path::Path,
    addr: SocketAddrV4,
    payload: &[u8],
    timeout: Duration,
) -> io::Result<String> {
    tapestry_netns::run_in(netns, || tcp_request(addr, payload, timeout))
        .map_err(io::Error::other)?
}

/// `GET path` over HTTP/1.1 from the network namespace at `netns`: the status code, the
/// header block (lowercased) and the body, read until the server closes.
pub fn http_get_in(
    netns: &std::path::Path,
    addr: SocketAddrV4,
    path: &str,
    timeout: Duration,
) -> io::Result<(u16, String, String)> {
    let get = || -> io::Result<(u16, String, String)> {
        let mut stream = TcpStream::connect_timeout(&addr.into(), timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw)?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let bad = || io::Error::new(io::ErrorKind::InvalidData, format!("not HTTP: {text:?}"));
        let (head, body) = text.split_once("\r\n\r\n").ok_or_else(bad)?;
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(bad)?;
        Ok((status, head.to_ascii_lowercase(), body.to_owned()))
    };
    tapestry_netns::run_in(netns, get).map_err(io::Error::other)?
}

/// [`udp_request`] from the network namespace at `netns`.
pub fn udp_request_in(
    netns: &std::path::Path,
    addr: SocketAddrV4,
    payload: &[u8],
    timeout: Duration,
) -> io::Result<String> {
    tapestry_netns::run_in(netns, || udp_request(addr, payload, timeout))
        .map_err(io::Error::other)?
}

/// One UDP request from the calling thread's namespace: a socket on an ephemeral port,
/// *connected* to `addr`, so only a reply whose source is `addr` is accepted (a load balancer
/// must reverse its NAT). Returns the reply without a trailing `\n`; an ICMP port-unreachable
/// comes back as `ConnectionRefused`.
pub fn udp_request(addr: SocketAddrV4, payload: &[u8], timeout: Duration) -> io::Result<String> {
    let sock = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
    sock.connect(addr)?;
    sock.set_read_timeout(Some(timeout))?;
    sock.set_write_timeout(Some(timeout))?;
    sock.send(payload)?;
    let mut buf = [0u8; 65536];
    let n = sock.recv(&mut buf)?;
    let mut reply = &buf[..n];
    if reply.last() == Some(&b'\n') {
        reply = &reply[..n - 1];
    }
    Ok(String::from_utf8_lossy(reply).into_owned())
}

/// One DNS query for the A records of `name` from the calling thread's namespace, over UDP to
/// `server` (a connected socket: only an answer from `server` counts). Returns the addresses of
/// the answer section (empty for NXDOMAIN or no records); an error for a timeout, a malformed
/// answer, or an rcode other than NOERROR and NXDOMAIN.
pub fn dns_query_a(
    server: SocketAddrV4,
    name: &str,
    timeout: Duration,
) -> io::Result<Vec<Ipv4Addr>> {
    let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidData, format!("{name}: {why}"));
    let id = (std::process::id() as u16) ^ 0x5a5a;
    // Header: id, flags RD, one question.
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(bad("not a DNS name"));
        }
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]); // root, type A, class IN
    let sock = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
    sock.connect(server)?;
    sock.set_read_timeout(Some(timeout))?;
    sock.send(&q)?;
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf)?;
    let r = &buf[..n];
    if n < 12 || r[..2] != id.to_be_bytes() || r[2] & 0x80 == 0 {
        return Err(bad("not an answer to the query"));
    }
    match r[3] & 0x0f {
        0 => {}
        3 => return Ok(Vec::new()),
        rcode => return Err(bad(&format!("rcode {rcode}"))),
    }
    let count = |i: usize| u16::from_be_bytes([r[i], r[i + 1]]) as usize;
    let (questions, answers) = (count(4), count(6));
    // Skips a possibly compressed name at `at`, returning the offset after it.
    let skip_name = |mut at: usize| -> Option<usize> {
        loop {
            let len = *r.get(at)? as usize;
            match len {
                0 => return Some(at + 1),
                l if l & 0xc0 == 0xc0 => return Some(at + 2),
                l => at += 1 + l,
            }
        }
    };
    let mut at = 12;
    for _ in 0..questions {
        at = skip_name(at).ok_or_else(|| bad("truncated question"))? + 4;
    }
    let mut ips = Vec::new();
    for _ in 0..answers {
        at = skip_name(at).ok_or_else(|| bad("truncated answer"))?;
        let rr = r.get(at..at + 10).ok_or_else(|| bad("truncated answer"))?;
        let (rtype, len) = (u16::from_be_bytes([rr[0], rr[1]]), count(at + 8));
        let data = r
            .get(at + 10..at + 10 + len)
            .ok_or_else(|| bad("truncated data"))?;
        if rtype == 1 && len == 4 {
            ips.push(Ipv4Addr::new(data[0], data[1], data[2], data[3]));
        }
        at += 10 + len;
    }
    Ok(ips)
}
