//! `tapestry-load`: a small TCP_RR / TCP_CRR load tool with no control channel.
//!
//! * `serve` answers every fixed-size request on a connection with a response of the same size
//!   until the peer closes. One thread, one epoll set, non-blocking sockets: it never closes a
//!   connection first, so the server side never holds TIME_WAIT sockets.
//! * `rr` keeps one connection and ping-pongs requests and responses (netperf TCP_RR).
//! * `crr` connects, does one request/response and closes, over and over (netperf TCP_CRR).
//!
//! Both clients stop by themselves (time bound, transaction bound, error bound) and print one
//! JSON line ([`ClientReport`]). Everything is pinned to one CPU with `sched_setaffinity` when
//! asked, because on a 2-vCPU machine an unpinned pair flips between "same CPU" and "different
//! CPUs" and produces fake 3x gaps.
//!
//! Why the CRR client closes with `SO_LINGER {on, 0}` (an RST instead of a FIN): a normal close
//! leaves the client socket in TIME_WAIT for 60 s. At ~15k connections/s the 28k ephemeral ports
//! wrap every 2 s, so the kernel either runs out of ports or (with `tcp_tw_reuse`) reuses ports
//! whose previous incarnation still sits in TIME_WAIT, and whether a SYN against such a tuple is
//! accepted at once, answered with a challenge ACK or dropped until a retransmission 1 s later
//! depends on timestamps, sysctls and on the conntrack entry of the previous connection. That is
//! how netperf's CRR collapses to 300-2,500/s and measures TIME_WAIT handling instead of the load
//! balancer. With an RST close no socket on either side ever enters TIME_WAIT, every port reuse
//! starts clean, and conntrack (which moves an RST-ed entry to CLOSE and, on a new SYN for the
//! same tuple, deletes it and creates a fresh one that goes through the NAT rules again) still
//! does the full per-connection work. Each transaction is SYN, SYN-ACK, ACK, request, response,
//! RST: the per-connection cost of the load balancer is a larger share of it than with a
//! four-packet FIN teardown, which is what this figure is for.

use std::io;
use std::mem;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// Pin the calling thread (the whole process when called before any thread is spawned).
pub fn pin_to_cpu(cpu: usize) -> Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET only write inside it.
    unsafe {
        let mut set: libc::cpu_set_t = mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(io::Error::last_os_error()).with_context(|| format!("pin to CPU {cpu}"));
        }
    }
    Ok(())
}

/// Raise RLIMIT_NOFILE to its hard limit (the server may hold many connections at once).
pub fn raise_nofile() {
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        let mut rl: libc::rlimit = mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) == 0 && rl.rlim_cur < rl.rlim_max {
            rl.rlim_cur = rl.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &rl);
        }
    }
}

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn setsockopt<T>(fd: RawFd, level: libc::c_int, name: libc::c_int, val: &T) -> io::Result<()> {
    // SAFETY: val points to a live T of the given size.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            val as *const T as *const libc::c_void,
            mem::size_of::<T>() as libc::socklen_t,
        )
    })
    .map(|_| ())
}

fn sockaddr(addr: SocketAddrV4) -> libc::sockaddr_in {
    // SAFETY: sockaddr_in is plain data.
    let mut sa: libc::sockaddr_in = unsafe { mem::zeroed() };
    sa.sin_family = libc::AF_INET as libc::sa_family_t;
    sa.sin_port = addr.port().to_be();
    sa.sin_addr.s_addr = u32::from(*addr.ip()).to_be();
    sa
}

/// An owned file descriptor that is closed on drop.
struct Fd(RawFd);

impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: we own the descriptor.
        unsafe { libc::close(self.0) };
    }
}

fn tcp_socket() -> io::Result<Fd> {
    // SAFETY: plain socket(2).
    let fd =
        cvt(unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    Ok(Fd(fd))
}

fn read_some(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: buf is valid for buf.len() bytes.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

fn write_some(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: buf is valid for buf.len() bytes. MSG_NOSIGNAL: a closed peer is an error, not
    // a SIGPIPE.
    let n = unsafe {
        libc::send(
            fd,
            buf.as_ptr() as *const libc::c_void,
            buf.len(),
            libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

// ---------------------------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub addr: Ipv4Addr,
    pub ports: Vec<u16>,
    /// Request size; every complete request gets a response of `response_size` bytes.
    pub request_size: usize,
    pub response_size: usize,
    /// Exit by itself after this long (a safety net if whoever started it dies).
    pub max_seconds: Option<f64>,
}

#[derive(Default, Clone, Copy)]
struct Conn {
    /// Bytes of the current, incomplete request.
    have: usize,
    /// Response bytes owed but not yet written (only when the socket buffer was full).
    owe: usize,
    live: bool,
}

const LISTENER_TAG: u64 = 1 << 40;

/// Runs the server until `max_seconds` (or forever). `ready` is called once every port listens.
pub fn serve(opts: &ServeOptions, ready: impl FnOnce()) -> Result<()> {
    if opts.request_size == 0 || opts.response_size == 0 {
        bail!("request and response sizes must be at least 1 byte");
    }
    raise_nofile();
    // SAFETY: plain epoll_create1.
    let ep = Fd(cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) }).context("epoll_create1")?);
    let mut listeners = Vec::new();
    for &port in &opts.ports {
        let s = tcp_socket().context("socket")?;
        let one: libc::c_int = 1;
        setsockopt(s.0, libc::SOL_SOCKET, libc::SO_REUSEADDR, &one)?;
        let sa = sockaddr(SocketAddrV4::new(opts.addr, port));
        // SAFETY: sa is a valid sockaddr_in.
        cvt(unsafe {
            libc::bind(
                s.0,
                &sa as *const _ as *const libc::sockaddr,
                mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        })
        .with_context(|| format!("bind {}:{port}", opts.addr))?;
        // SAFETY: plain listen/fcntl on our socket.
        cvt(unsafe { libc::listen(s.0, 4096) }).context("listen")?;
        set_nonblocking(s.0)?;
        epoll_add(ep.0, s.0, libc::EPOLLIN as u32, LISTENER_TAG | s.0 as u64)?;
        listeners.push(s);
    }
    ready();

    let deadline = opts
        .max_seconds
        .map(|s| Instant::now() + Duration::from_secs_f64(s));
    let mut conns: Vec<Conn> = Vec::new();
    let mut events: Vec<libc::epoll_event> = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut buf = vec![0u8; 64 * 1024];
    let zeros = vec![b'r'; 64 * 1024];
    loop {
        if let Some(d) = deadline
            && Instant::now() >= d
        {
            return Ok(());
        }
        // SAFETY: events has room for events.len() entries.
        let n = unsafe {
            libc::epoll_wait(ep.0, events.as_mut_ptr(), events.len() as libc::c_int, 500)
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e).context("epoll_wait");
        }
        for ev in &events[..n as usize] {
            let data = ev.u64;
            if data & LISTENER_TAG != 0 {
                let lfd = (data & !LISTENER_TAG) as RawFd;
                for _ in 0..128 {
                    // SAFETY: accept4 on our listening socket; we do not want the peer address.
                    let fd = unsafe {
                        libc::accept4(
                            lfd,
                            std::ptr::null_mut(),
                            std::ptr::null_mut(),
                            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                        )
                    };
                    if fd < 0 {
                        break; // EAGAIN, or a connection that died before accept
                    }
                    let one: libc::c_int = 1;
                    let _ = setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, &one);
                    if epoll_add(ep.0, fd, libc::EPOLLIN as u32, fd as u64).is_err() {
                        // SAFETY: we own fd.
                        unsafe { libc::close(fd) };
                        continue;
                    }
                    let i = fd as usize;
                    if conns.len() <= i {
                        conns.resize(i + 1, Conn::default());
                    }
                    conns[i] = Conn {
                        have: 0,
                        owe: 0,
                        live: true,
                    };
                }
                continue;
            }
            let fd = data as RawFd;
            let i = fd as usize;
            if i >= conns.len() || !conns[i].live {
                continue;
            }
            let mut close = ev.events & (libc::EPOLLERR as u32) != 0;
            if !close && ev.events & ((libc::EPOLLIN | libc::EPOLLHUP) as u32) != 0 {
                match read_some(fd, &mut buf) {
                    Ok(0) => close = true,
                    Ok(got) => {
                        let c = &mut conns[i];
                        let total = c.have + got;
                        c.owe += (total / opts.request_size) * opts.response_size;
                        c.have = total % opts.request_size;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => close = true,
                }
            }
            if !close && conns[i].owe > 0 {
                let was_blocked = ev.events & (libc::EPOLLOUT as u32) != 0;
                loop {
                    let c = &mut conns[i];
                    if c.owe == 0 {
                        break;
                    }
                    let chunk = c.owe.min(zeros.len());
                    match write_some(fd, &zeros[..chunk]) {
                        Ok(w) => c.owe -= w,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(_) => {
                            close = true;
                            break;
                        }
                    }
                }
                let want_out = conns[i].owe > 0;
                if !close && want_out != was_blocked {
                    let mask =
                        libc::EPOLLIN as u32 | if want_out { libc::EPOLLOUT as u32 } else { 0 };
                    let mut e = libc::epoll_event {
                        events: mask,
                        u64: fd as u64,
                    };
                    // SAFETY: fd is registered in ep.
                    unsafe { libc::epoll_ctl(ep.0, libc::EPOLL_CTL_MOD, fd, &mut e) };
                }
            }
            if close {
                conns[i].live = false;
                // SAFETY: we own fd; closing removes it from the epoll set.
                unsafe { libc::close(fd) };
            }
        }
    }
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on our own descriptor.
    unsafe {
        let fl = cvt(libc::fcntl(fd, libc::F_GETFL))?;
        cvt(libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK))?;
    }
    Ok(())
}

fn epoll_add(ep: RawFd, fd: RawFd, events: u32, data: u64) -> io::Result<()> {
    let mut e = libc::epoll_event { events, u64: data };
    // SAFETY: both descriptors are ours.
    cvt(unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut e) }).map(|_| ())
}

// ---------------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Rr,
    Crr,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Rr => "rr",
            Mode::Crr => "crr",
        }
    }
}

#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub mode: Mode,
    pub target: SocketAddrV4,
    /// Measured time (after the warm-up).
    pub seconds: f64,
    /// Not counted: lets caches, conntrack and the server settle first.
    pub warmup_seconds: f64,
    pub request_size: usize,
    pub response_size: usize,
    /// Stop after this many measured transactions.
    pub max_transactions: u64,
    /// Stop after this many errors (a dead path should not spin for the whole run).
    pub max_errors: u64,
    /// Per-syscall timeout for connect, send and receive.
    pub io_timeout: Duration,
    /// The server's pid (same host): its CPU time is read with ours, so the report can say what
    /// a transaction costs in CPU time, which other jobs on a shared CPU do not distort.
    pub peer_pid: Option<i32>,
    /// Transactions per second to pace at (from the start, warm-up included); None: as fast
    /// as it goes.
    pub rate: Option<f64>,
}

/// One JSON line per client run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientReport {
    pub mode: Mode,
    pub target: String,
    pub request_size: usize,
    pub response_size: usize,
    pub cpu: Option<usize>,
    /// Measured wall time in seconds (excludes the warm-up).
    pub elapsed_s: f64,
    pub transactions: u64,
    pub transactions_per_s: f64,
    pub errors: u64,
    /// First error text, if any.
    pub first_error: Option<String>,
    pub p50_us: f64,
    pub p99_us: f64,
    pub mean_us: f64,
    /// Why it stopped: "time", "count" or "errors".
    pub stopped_by: String,
    /// CPU time of this process during the measured window, seconds (includes the softirq
    /// work done in its context: sending on a veth runs the receive path too).
    #[serde(default)]
    pub client_cpu_s: f64,
    /// CPU time of the peer (`peer_pid`) during the measured window, seconds.
    #[serde(default)]
    pub peer_cpu_s: Option<f64>,
    /// transactions / (client + peer CPU seconds): throughput per CPU-second actually used.
    /// When client and peer share one CPU and nothing else runs there it equals
    /// `transactions_per_s`; when other jobs take the CPU, it stays put while
    /// `transactions_per_s` drops.
    #[serde(default)]
    pub transactions_per_cpu_s: Option<f64>,
    /// (client + peer CPU seconds) / elapsed: how much of the wall time the pair got.
    #[serde(default)]
    pub on_cpu_fraction: Option<f64>,
}

/// CPU time consumed so far by this process (`pid` None) or another one, seconds.
pub fn process_cpu_seconds(pid: Option<i32>) -> Option<f64> {
    let clock = match pid {
        None => libc::CLOCK_PROCESS_CPUTIME_ID,
        Some(p) => {
            let mut id: libc::clockid_t = 0;
            // SAFETY: plain call with an out-parameter.
            if unsafe { libc::clock_getcpuclockid(p, &mut id) } != 0 {
                return None;
            }
            id
        }
    };
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-parameter.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return None;
    }
    Some(ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9)
}

/// Log-linear latency histogram in nanoseconds, ~1.6% resolution, fixed memory.
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
    sum_ns: u128,
}

const SUB_BITS: u32 = 6;

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

impl Histogram {
    pub fn new() -> Self {
        Histogram {
            counts: vec![0; (64 - SUB_BITS as usize + 1) << SUB_BITS],
            total: 0,
            sum_ns: 0,
        }
    }

    fn index(v: u64) -> usize {
        if v < (1 << SUB_BITS) {
            return v as usize;
        }
        let msb = 63 - v.leading_zeros();
        let shift = msb - SUB_BITS;
        let sub = ((v >> shift) as usize) & ((1 << SUB_BITS) - 1);
        ((shift as usize + 1) << SUB_BITS) + sub
    }

    /// Middle of the bucket.
    fn value(idx: usize) -> f64 {
        if idx < (1 << SUB_BITS) {
            return idx as f64;
        }
        let shift = (idx >> SUB_BITS) - 1;
        let sub = idx & ((1 << SUB_BITS) - 1);
        let low = (((1u64 << SUB_BITS) + sub as u64) << shift) as f64;
        low + ((1u64 << shift) as f64 - 1.0) / 2.0
    }

    pub fn record(&mut self, ns: u64) {
        self.counts[Self::index(ns)] += 1;
        self.total += 1;
        self.sum_ns += ns as u128;
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    /// Value (ns) at quantile q in [0, 1]; 0 when empty.
    pub fn quantile(&self, q: f64) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Self::value(i);
            }
        }
        Self::value(self.counts.len() - 1)
    }

    pub fn mean(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.sum_ns as f64 / self.total as f64
        }
    }
}

fn timeval(d: Duration) -> libc::timeval {
    libc::timeval {
        tv_sec: d.as_secs() as libc::time_t,
        tv_usec: d.subsec_micros() as libc::suseconds_t,
    }
}

/// A blocking, connected socket with send/receive timeouts. `rst_on_close` sets SO_LINGER 0.
fn connect(opts: &ClientOptions, rst_on_close: bool) -> io::Result<Fd> {
    let s = tcp_socket()?;
    let tv = timeval(opts.io_timeout);
    // SO_SNDTIMEO also bounds a blocking connect().
    setsockopt(s.0, libc::SOL_SOCKET, libc::SO_SNDTIMEO, &tv)?;
    setsockopt(s.0, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv)?;
    if rst_on_close {
        let lg = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        setsockopt(s.0, libc::SOL_SOCKET, libc::SO_LINGER, &lg)?;
    } else {
        let one: libc::c_int = 1;
        setsockopt(s.0, libc::IPPROTO_TCP, libc::TCP_NODELAY, &one)?;
    }
    let sa = sockaddr(opts.target);
    loop {
        // SAFETY: sa is a valid sockaddr_in.
        let r = unsafe {
            libc::connect(
                s.0,
                &sa as *const _ as *const libc::sockaddr,
                mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if r == 0 {
            return Ok(s);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn write_all(fd: RawFd, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        match write_some(fd, buf) {
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn read_exact(fd: RawFd, buf: &mut [u8]) -> io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        match read_some(fd, &mut buf[got..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[derive(Default)]
struct Errors {
    count: u64,
    first: Option<String>,
}

impl Errors {
    fn note(&mut self, e: &io::Error, what: &str) {
        self.count += 1;
        if self.first.is_none() {
            self.first = Some(format!("{what}: {e}"));
        }
    }
}

/// Runs one client and returns its report. `cpu` is only copied into the report.
pub fn run_client(opts: &ClientOptions, cpu: Option<usize>) -> ClientReport {
    let req = vec![b'q'; opts.request_size.max(1)];
    let mut resp = vec![0u8; opts.response_size.max(1)];
    let mut hist = Histogram::new();
    let mut errs = Errors::default();

    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(opts.warmup_seconds.max(0.0));
    let end = measure_from + Duration::from_secs_f64(opts.seconds.max(0.0));
    let mut measuring = opts.warmup_seconds <= 0.0;
    let mut measured_start = if measuring { Some(start) } else { None };
    let cpu_sample = || {
        (
            process_cpu_seconds(None).unwrap_or(0.0),
            opts.peer_pid.and_then(|p| process_cpu_seconds(Some(p))),
        )
    };
    let mut cpu_start = cpu_sample();
    let mut stopped_by = "time";
    let mut conn: Option<Fd> = None;
    // Paced: transaction n starts no earlier than n / rate after the start (a late one does
    // not wait, so the average catches up).
    let pace = opts.rate.filter(|r| *r > 0.0).map(|r| 1.0 / r);
    let mut started_n: u64 = 0;

    loop {
        if let Some(every) = pace {
            let due = start + Duration::from_secs_f64(every * started_n as f64);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            started_n += 1;
        }
        let t0 = Instant::now();
        if !measuring && t0 >= measure_from {
            measuring = true;
            measured_start = Some(t0);
            cpu_start = cpu_sample();
            // Errors in the warm-up do not count either.
            errs.count = 0;
        }
        if t0 >= end {
            break;
        }
        if hist.count() >= opts.max_transactions {
            stopped_by = "count";
            break;
        }
        if errs.count >= opts.max_errors {
            stopped_by = "errors";
            break;
        }
        let ok = match opts.mode {
            Mode::Rr => {
                if conn.is_none() {
                    match connect(opts, false) {
                        Ok(s) => conn = Some(s),
                        Err(e) => {
                            errs.note(&e, "connect");
                            std::thread::sleep(Duration::from_millis(10));
                            continue;
                        }
                    }
                }
                let fd = conn.as_ref().map(|s| s.0).unwrap_or(-1);
                match write_all(fd, &req).and_then(|_| read_exact(fd, &mut resp)) {
                    Ok(()) => true,
                    Err(e) => {
                        errs.note(&e, "request/response");
                        conn = None;
                        false
                    }
                }
            }
            Mode::Crr => match connect(opts, true) {
                Ok(s) => match write_all(s.0, &req).and_then(|_| read_exact(s.0, &mut resp)) {
                    Ok(()) => true, // `s` is dropped here: close() with linger 0 sends the RST
                    Err(e) => {
                        errs.note(&e, "request/response");
                        false
                    }
                },
                Err(e) => {
                    errs.note(&e, "connect");
                    // Refused/unreachable fail in microseconds; do not spin on a dead path.
                    std::thread::sleep(Duration::from_millis(1));
                    false
                }
            },
        };
        if ok && measuring {
            hist.record(t0.elapsed().as_nanos() as u64);
        }
    }
    drop(conn);
    let elapsed = measured_start
        .map(|s| s.elapsed().as_secs_f64())
        .unwrap_or(0.0);
    let cpu_end = cpu_sample();
    let client_cpu_s = (cpu_end.0 - cpu_start.0).max(0.0);
    let peer_cpu_s = match (cpu_start.1, cpu_end.1) {
        (Some(a), Some(b)) => Some((b - a).max(0.0)),
        _ => None,
    };
    let n = hist.count();
    let pair_cpu = peer_cpu_s.map(|p| p + client_cpu_s);
    ClientReport {
        mode: opts.mode,
        target: opts.target.to_string(),
        request_size: opts.request_size,
        response_size: opts.response_size,
        cpu,
        elapsed_s: elapsed,
        transactions: n,
        transactions_per_s: if elapsed > 0.0 {
            n as f64 / elapsed
        } else {
            0.0
        },
        errors: errs.count,
        first_error: errs.first,
        p50_us: hist.quantile(0.50) / 1000.0,
        p99_us: hist.quantile(0.99) / 1000.0,
        mean_us: hist.mean() / 1000.0,
        stopped_by: stopped_by.to_string(),
        client_cpu_s,
        peer_cpu_s,
        transactions_per_cpu_s: pair_cpu.filter(|c| *c > 0.0).map(|c| n as f64 / c),
        on_cpu_fraction: pair_cpu.filter(|_| elapsed > 0.0).map(|c| c / elapsed),
    }
}

/// One run of the `tapestry-load` client binary `load` inside `pod` (its network namespace),
/// pinned to `cpu`: its report.
pub fn client_in(
    load: &std::path::Path,
    pod: &tapestry_tests::Pod,
    mode: Mode,
    target: SocketAddrV4,
    seconds: f64,
    cpu: usize,
) -> Result<ClientReport> {
    use std::io::Read as _;
    use std::process::{Command, Stdio};
    let mut child = pod.spawn(
        Command::new(load)
            .arg(mode.as_str())
            .args(["--target", &target.to_string()])
            .args(["--seconds", &seconds.to_string()])
            .args(["--warmup", "0.5"])
            .args(["--cpu", &cpu.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )?;
    let status = child.wait()?;
    let mut out = String::new();
    child
        .stdout
        .take()
        .context("stdout")?
        .read_to_string(&mut out)?;
    if !status.success() {
        let mut err = String::new();
        let _ = child.stderr.take().map(|mut e| e.read_to_string(&mut err));
        bail!("load client failed ({status}): {}", err.trim());
    }
    let line = out.lines().last().context("load client printed nothing")?;
    serde_json::from_str(line).with_context(|| format!("parsing {line:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_monotonic_and_close() {
        let mut last = 0;
        for v in [0u64, 1, 63, 64, 65, 127, 128, 1000, 54_321, 1 << 40] {
            let i = Histogram::index(v);
            assert!(i >= last);
            last = i;
            let back = Histogram::value(i);
            assert!(
                (back - v as f64).abs() <= v as f64 * 0.02 + 1.0,
                "{v} -> {back}"
            );
        }
    }

    #[test]
    fn quantiles() {
        let mut h = Histogram::new();
        for v in 1..=1000u64 {
            h.record(v * 1000);
        }
        let p50 = h.quantile(0.5);
        assert!((p50 - 500_000.0).abs() < 500_000.0 * 0.02, "{p50}");
        let p99 = h.quantile(0.99);
        assert!((p99 - 990_000.0).abs() < 990_000.0 * 0.02, "{p99}");
    }

    #[test]
    fn loopback_rr_and_crr() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let sopts = ServeOptions {
            addr: Ipv4Addr::LOCALHOST,
            ports: vec![port],
            request_size: 3,
            response_size: 5,
            max_seconds: Some(5.0),
        };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || serve(&sopts, move || tx.send(()).unwrap()).unwrap());
        rx.recv().unwrap();
        for mode in [Mode::Rr, Mode::Crr] {
            let r = run_client(
                &ClientOptions {
                    mode,
                    target: SocketAddrV4::new(Ipv4Addr::LOCALHOST, port),
                    seconds: 0.3,
                    warmup_seconds: 0.05,
                    request_size: 3,
                    response_size: 5,
                    max_transactions: 200,
                    max_errors: 10,
                    io_timeout: Duration::from_secs(2),
                    peer_pid: Some(std::process::id() as i32),
                    rate: None,
                },
                None,
            );
            assert_eq!(r.errors, 0, "{r:?}");
            assert!(r.transactions > 0, "{r:?}");
            assert!(r.transactions_per_cpu_s.is_some_and(|x| x > 0.0), "{r:?}");
        }
        // Paced at 200/s for 0.5 s: about 100 transactions, not as many as it could.
        let r = run_client(
            &ClientOptions {
                mode: Mode::Crr,
                target: SocketAddrV4::new(Ipv4Addr::LOCALHOST, port),
                seconds: 0.5,
                warmup_seconds: 0.0,
                request_size: 3,
                response_size: 5,
                max_transactions: 100_000,
                max_errors: 10,
                io_timeout: Duration::from_secs(2),
                peer_pid: None,
                rate: Some(200.0),
            },
            None,
        );
        assert_eq!(r.errors, 0, "{r:?}");
        assert!(
            (80..=102).contains(&r.transactions),
            "paced at 200/s for 0.5 s: {r:?}"
        );
    }
}
