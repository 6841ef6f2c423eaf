//! A real Kubernetes control plane for tests, envtest-style: etcd, kube-apiserver and, on
//! demand, kube-controller-manager, run as plain processes on loopback. No root, no images.
//!
//! The binaries come from `scripts/build-k8s.sh`, which builds them from the Go module in
//! `tests/k8s/` (k8s.io/kubernetes and etcd at pinned versions) into
//! `~/.cache/tapestry/k8s-<k8s version>-<sha256(go.sum), 12 hex>/bin/` (`$TAPESTRY_CACHE`
//! replaces `~/.cache/tapestry`; `$TAPESTRY_K8S_BIN` names a bin directory directly).
//! [`require_k8s!`](crate::require_k8s) skips a test when they are missing (or fails it under
//! `CI=...`).
//!
//! # What [`ControlPlane::start`] sets up
//!
//! - A directory `$TMPDIR/tapestry-k8s-<pid>-<n>/` holding everything: etcd data, PKI, token
//!   file, kubeconfigs, and one log per process (`etcd.log`, `kube-apiserver.log`,
//!   `kube-controller-manager.log`). Dropping the [`ControlPlane`] kills the processes
//!   (controller-manager, apiserver, then etcd: an apiserver whose etcd is gone hangs in
//!   shutdown) and removes the directory; a test that panics, or a start that fails, keeps the
//!   logs and says where. Do not keep a `ControlPlane` in a `static` (never dropped).
//!   Processes leaked by a killed test binary are killed by the next `start` (their directory
//!   names a dead owner).
//! - Ports: etcd's client port and the apiserver's secure port are free loopback ports picked at
//!   start (no fixed ports, so control planes run in parallel from threads and processes); a start
//!   that loses a port race is retried with new ports. etcd's peer listener is on port 0.
//! - PKI (openssl CLI, EC P-256): a CA (`ca_pem()`, also the apiserver's `--client-ca-file`), a
//!   serving certificate for 127.0.0.1/localhost/kubernetes.default.svc, a service-account signing
//!   key, and a client certificate the apiserver uses towards kubelets ([`ControlPlane::client_cert`]
//!   signs more).
//! - Identities: bearer tokens in a `--token-auth-file`, one kubeconfig each
//!   ([`ControlPlane::kubeconfig_path`]). Always present: [`ADMIN`] (`admin` in `system:masters`),
//!   [`NODE`] (`system:node:<NODE_NAME>` in `system:nodes`), [`CONTROLLER_MANAGER`]
//!   (`system:kube-controller-manager`). [`ControlPlane::start_with`] adds more.
//! - kube-apiserver: `--authorization-mode=Node,RBAC`, `--service-cluster-ip-range=`[`SERVICE_CIDR`],
//!   the ServiceAccount admission plugin off (pods need no service account), ValidatingAdmissionPolicy
//!   on, `--endpoint-reconciler-type=none` (it refuses the loopback advertise address, so the
//!   `default/kubernetes` Service has no endpoints). Ready when `/readyz` answers `ok` (about 3 s
//!   on an idle machine). [`ControlPlane::start_with_options`] binds it to another address (a
//!   real node's, see [`crate::node`]; then `default/kubernetes` has that endpoint) and can turn
//!   the ServiceAccount admission plugin on.
//! - [`ControlPlane::start_controller_manager`]: kube-controller-manager with the EndpointSlice,
//!   garbage-collector and namespace controllers, as `system:kube-controller-manager` with
//!   `--use-service-account-credentials` (each controller acts as its own service account, under
//!   the bootstrap RBAC roles, as in a real cluster).
//!
//! ```no_run
//! use tapestry_tests::k8s::ControlPlane;
//!
//! #[test]
//! fn creates_a_service() -> anyhow::Result<()> {
//!     tapestry_tests::require_k8s!(Ok(()));
//!     let cp = ControlPlane::start()?;
//!     cp.kubectl_ok(["create", "service", "clusterip", "web", "--tcp=80:8080"])?;
//!     let ip = cp.kubectl_ok(["get", "svc", "web", "-o", "jsonpath={.spec.clusterIP}"])?;
//!     assert!(ip.starts_with("10.96."));
//!     Ok(())
//! }
//! ```

use std::{
    collections::HashSet,
    ffi::OsStr,
    fs,
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};

/// Identity id of the cluster admin (user `admin`, group `system:masters`).
pub const ADMIN: &str = "admin";
/// Identity id of the node [`NODE_NAME`] (user `system:node:<NODE_NAME>`, group `system:nodes`).
pub const NODE: &str = "node";
/// Identity id of kube-controller-manager (user `system:kube-controller-manager`).
pub const CONTROLLER_MANAGER: &str = "controller-manager";
/// Node name of the [`NODE`] identity.
pub const NODE_NAME: &str = "tapestry-node";
/// `--service-cluster-ip-range` of every control plane.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// The ClusterIP of `default/kubernetes`: the first address of [`SERVICE_CIDR`].
pub const APISERVER_CLUSTER_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 96, 0, 1);
/// `--service-account-issuer` of every control plane.
pub const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// Controllers [`ControlPlane::start_controller_manager`] runs.
pub const DEFAULT_CONTROLLERS: &[&str] = &[
    "endpointslice-controller",
    "garbage-collector-controller",
    "namespace-controller",
];
/// What a node needs on top of [`DEFAULT_CONTROLLERS`] when pods get service-account tokens
/// ([`ControlPlaneOptions::service_accounts`]): the `default` ServiceAccount of every namespace
/// and the `kube-root-ca.crt` ConfigMap that the token volume mounts.
pub const SERVICE_ACCOUNT_CONTROLLERS: &[&str] = &[
    "serviceaccount-controller",
    "root-ca-certificate-publisher-controller",
];
/// Binaries [`require_k8s`] checks for: what [`ControlPlane`] runs.
pub const REQUIRED_BINARIES: &[&str] = &[
    "etcd",
    "kube-apiserver",
    "kubectl",
    "kube-controller-manager",
];

const START_ATTEMPTS: u32 = 3;
const READY_TIMEOUT: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------------------------
// Binaries and the skip-or-fail policy

fn cache_dir() -> PathBuf {
    if let Some(c) = std::env::var_os("TAPESTRY_CACHE") {
        return PathBuf::from(c);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/tapestry")
}

/// `tests/k8s/` of this checkout: the Go module the binaries are built from.
pub fn module_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("k8s")
}

/// The Kubernetes version `tests/k8s/go.mod` requires (`v1.37.2`).
pub fn kubernetes_version() -> Result<String> {
    let go_mod = module_dir().join("go.mod");
    let text =
        fs::read_to_string(&go_mod).with_context(|| format!("reading {}", go_mod.display()))?;
    text.lines()
        .find_map(|l| {
            let mut w = l.split_whitespace();
            match (w.next(), w.next()) {
                (Some("k8s.io/kubernetes"), Some(v)) if v.starts_with('v') => Some(v.to_string()),
                _ => None,
            }
        })
        .ok_or_else(|| anyhow!("{} requires no k8s.io/kubernetes", go_mod.display()))
}

/// Where `scripts/build-k8s.sh` puts the binaries for this checkout's `tests/k8s/`:
/// `$TAPESTRY_K8S_BIN` if set, else `<cache>/k8s-<version>-<sha256(go.sum), 12 hex>/bin`.
pub fn bin_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("TAPESTRY_K8S_BIN") {
        return Ok(PathBuf::from(d));
    }
    let version = kubernetes_version()?;
    let go_sum = module_dir().join("go.sum");
    let out = Command::new("sha256sum")
        .arg(&go_sum)
        .stdin(Stdio::null())
        .output()
        .context("running sha256sum")?;
    if !out.status.success() {
        bail!(
            "sha256sum {}: {}",
            go_sum.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let hash: String = String::from_utf8_lossy(&out.stdout)
        .chars()
        .take(12)
        .collect();
    Ok(cache_dir().join(format!("k8s-{version}-{hash}/bin")))
}

/// Path of one of the built binaries (`kube-apiserver`, `etcd`, `kubectl`,
/// `kube-controller-manager`, and with `scripts/build-k8s.sh kubelet helm`, `kubelet` and
/// `helm`), or an error naming the script that builds it.
pub fn binary(name: &str) -> Result<PathBuf> {
    let dir = bin_dir()?;
    let p = dir.join(name);
    if !p.is_file() {
        let extra = if REQUIRED_BINARIES.contains(&name) {
            String::new()
        } else {
            format!(" {name}")
        };
        bail!(
            "{} not found: run scripts/build-k8s.sh{extra} (builds the Kubernetes binaries from \
             tests/k8s/, several minutes the first time), or set TAPESTRY_K8S_BIN",
            p.display()
        );
    }
    Ok(p)
}

/// Checks that [`REQUIRED_BINARIES`] are built and `openssl` runs; returns the bin directory.
/// The error names everything missing.
pub fn require_k8s() -> Result<PathBuf, String> {
    let mut missing = Vec::new();
    let dir = match bin_dir() {
        Ok(d) => Some(d),
        Err(e) => {
            missing.push(format!("{e:#}"));
            None
        }
    };
    if let Some(dir) = &dir {
        let absent: Vec<&str> = REQUIRED_BINARIES
            .iter()
            .copied()
            .filter(|b| !dir.join(b).is_file())
            .collect();
        if !absent.is_empty() {
            missing.push(format!(
                "{} in {}: run scripts/build-k8s.sh (several minutes the first time) or set \
                 TAPESTRY_K8S_BIN",
                absent.join(", "),
                dir.display()
            ));
        }
    }
    let openssl_ok = Command::new("openssl")
        .arg("version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !openssl_ok {
        missing.push("the openssl command (apt-get install openssl)".into());
    }
    match dir {
        Some(d) if missing.is_empty() => Ok(d),
        _ => Err(format!(
            "missing Kubernetes prerequisite: {}",
            missing.join("; ")
        )),
    }
}

/// The policy behind [`require_k8s!`](crate::require_k8s): `true` when [`require_k8s`] passes;
/// otherwise panics under `CI=...`, or prints `skipped: <why>` and returns `false`.
pub fn k8s_available() -> bool {
    crate::prereq::available("Kubernetes", require_k8s())
}

/// First line of a test that runs a [`ControlPlane`]: returns early (with `()` or the given
/// value) after printing `skipped: <why>` when the binaries of `scripts/build-k8s.sh` or
/// `openssl` are missing, or panics if the environment variable `CI` is set. Needs no root.
#[macro_export]
macro_rules! require_k8s {
    () => {
        if !$crate::k8s::k8s_available() {
            return;
        }
    };
    ($ret:expr) => {
        if !$crate::k8s::k8s_available() {
            return $ret;
        }
    };
}

// ---------------------------------------------------------------------------------------------
// Identities

/// A test identity: a bearer token in the apiserver's token file and a kubeconfig.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Short name, used for [`ControlPlane::kubeconfig_path`] (and the file name).
    pub id: String,
    /// Kubernetes user name.
    pub user: String,
    pub groups: Vec<String>,
}

impl Identity {
    pub fn new(id: &str, user: &str, groups: &[&str]) -> Identity {
        assert!(
            !id.is_empty()
                && id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')),
            "identity id {id:?}: use [A-Za-z0-9._-]"
        );
        for s in std::iter::once(&user).chain(groups) {
            assert!(
                !s.contains([',', '"', '\n']),
                "identity {id}: user and groups cannot contain , \" or newlines"
            );
        }
        Identity {
            id: id.to_string(),
            user: user.to_string(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
        }
    }

    /// A node: user `system:node:<node_name>` in group `system:nodes` (what the Node authorizer
    /// and NodeRestriction admission recognise).
    pub fn node(id: &str, node_name: &str) -> Identity {
        Identity::new(id, &format!("system:node:{node_name}"), &["system:nodes"])
    }

    /// A service account as a token user (`system:serviceaccount:<ns>:<name>` in
    /// `system:serviceaccounts` and `system:serviceaccounts:<ns>`), e.g. a controller's.
    pub fn service_account(id: &str, namespace: &str, name: &str) -> Identity {
        Identity::new(
            id,
            &format!("system:serviceaccount:{namespace}:{name}"),
            &[
                "system:serviceaccounts",
                &format!("system:serviceaccounts:{namespace}"),
            ],
        )
    }
}

fn default_identities() -> Vec<Identity> {
    vec![
        Identity::new(ADMIN, "admin", &["system:masters"]),
        Identity::node(NODE, NODE_NAME),
        Identity::new(CONTROLLER_MANAGER, "system:kube-controller-manager", &[]),
    ]
}

// ---------------------------------------------------------------------------------------------
// The control plane

/// How [`ControlPlane::start_with_options`] sets up a control plane; the default is what
/// [`ControlPlane::start`] does.
#[derive(Debug, Clone, Default)]
pub struct ControlPlaneOptions {
    /// Identities besides the defaults (ids must differ from theirs).
    pub identities: Vec<Identity>,
    /// Address the apiserver (and nothing else) binds and advertises; `None`: 127.0.0.1. Any
    /// other address (a real node's, which its pods can reach) goes into the serving
    /// certificate, kubeconfigs use it, and the lease endpoint reconciler gives
    /// `default/kubernetes` an endpoint there, so pods reach the apiserver through its
    /// ClusterIP as in a cluster.
    pub address: Option<Ipv4Addr>,
    /// Turn the ServiceAccount admission plugin on: pods get a service account and a projected
    /// token (with [`SERVICE_ACCOUNT_CONTROLLERS`] running, see
    /// [`ControlPlane::start_controller_manager_with`]). Off by default, so that pods need no
    /// service account.
    pub service_accounts: bool,
}

struct Member {
    identity: Identity,
    token: String,
    kubeconfig: PathBuf,
}

/// etcd + kube-apiserver (+ kube-controller-manager) on loopback; see the [module docs](self).
pub struct ControlPlane {
    dir: PathBuf,
    bin: PathBuf,
    etcd_port: u16,
    api_port: u16,
    members: Vec<Member>,
    etcd: Option<Child>,
    apiserver: Option<Child>,
    controller_manager: Option<Child>,
    /// Keep the logs on drop (set when starting failed).
    keep_logs: bool,
    address: Ipv4Addr,
    service_accounts: bool,
}

impl ControlPlane {
    /// Starts etcd and kube-apiserver with the default identities ([`ADMIN`], [`NODE`],
    /// [`CONTROLLER_MANAGER`]) and returns once `/readyz` answers.
    pub fn start() -> Result<ControlPlane> {
        Self::start_with(&[])
    }

    /// [`start`](Self::start) with more identities (ids must differ from the defaults').
    pub fn start_with(extra: &[Identity]) -> Result<ControlPlane> {
        Self::start_with_options(ControlPlaneOptions {
            identities: extra.to_vec(),
            ..ControlPlaneOptions::default()
        })
    }

    /// Starts a control plane as `options` say.
    pub fn start_with_options(options: ControlPlaneOptions) -> Result<ControlPlane> {
        let bin = require_k8s().map_err(|e| anyhow!(e))?;
        sweep_leftovers();
        let address = options.address.unwrap_or(Ipv4Addr::LOCALHOST);
        if address.is_unspecified() || address.is_multicast() || address.is_broadcast() {
            bail!("control-plane address {address}: give a unicast address of this host");
        }
        let mut identities = default_identities();
        for id in &options.identities {
            if identities.iter().any(|i| i.id == id.id) {
                bail!("identity id {:?} is used twice", id.id);
            }
            identities.push(id.clone());
        }

        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tapestry-k8s-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        if dir.exists() {
            fs::remove_dir_all(&dir)?;
        }
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        fs::write(
            dir.join("owner"),
            format!(
                "{} {}\n",
                std::process::id(),
                process_start_time(std::process::id()).unwrap_or(0)
            ),
        )?;
        let members = identities
            .into_iter()
            .map(|identity| {
                Ok(Member {
                    kubeconfig: dir.join(format!("kubeconfig-{}.yaml", identity.id)),
                    token: random_hex(16)?,
                    identity,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut cp = ControlPlane {
            dir,
            bin,
            etcd_port: 0,
            api_port: 0,
            members,
            etcd: None,
            apiserver: None,
            controller_manager: None,
            keep_logs: false,
            address,
            service_accounts: options.service_accounts,
        };
        // From here on, Drop cleans up whatever was started.
        cp.write_pki()?;
        cp.write_token_file()?;
        let mut last_err = None;
        for attempt in 1..=START_ATTEMPTS {
            match cp.try_start_processes() {
                Ok(()) => return Ok(cp),
                Err(e) => {
                    let port_race = cp.log("etcd").contains("address already in use")
                        || cp.log("kube-apiserver").contains("address already in use");
                    cp.stop_processes();
                    if !port_race || attempt == START_ATTEMPTS {
                        cp.keep_logs = true;
                        return Err(e.context(format!(
                            "starting a control plane (logs kept in {})",
                            cp.dir.display()
                        )));
                    }
                    eprintln!("tapestry k8s: lost a port race (attempt {attempt}), retrying");
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow!("control plane did not start")))
    }

    fn try_start_processes(&mut self) -> Result<()> {
        self.etcd_port = free_port(Ipv4Addr::LOCALHOST)?;
        self.api_port = free_port(self.address)?;
        for f in ["etcd.log", "kube-apiserver.log"] {
            let _ = fs::remove_file(self.dir.join(f));
        }
        let data = self.dir.join("etcd");
        let _ = fs::remove_dir_all(&data);
        let client_url = format!("http://127.0.0.1:{}", self.etcd_port);
        let mut etcd = Command::new(self.bin.join("etcd"));
        etcd.arg("--name=tapestry")
            .arg(format!("--data-dir={}", data.display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg("--listen-peer-urls=http://127.0.0.1:0")
            .arg("--unsafe-no-fsync")
            .arg("--log-level=warn");
        self.etcd = Some(self.spawn("etcd", etcd)?);
        self.wait_port("etcd", self.etcd_port, Duration::from_secs(30))?;

        for m in &self.members {
            write_kubeconfig(
                &m.kubeconfig,
                &self.server_url(),
                &self.pki("ca.crt"),
                &m.identity.id,
                &m.token,
            )?;
        }
        self.spawn_apiserver()?;
        self.wait_ready()
    }

    /// Starts kube-apiserver on [`Self::api_port`] against the running etcd.
    fn spawn_apiserver(&mut self) -> Result<()> {
        let client_url = self.etcd_url();
        let pki = |f: &str| self.pki(f).display().to_string();
        let mut api = Command::new(self.bin.join("kube-apiserver"));
        api.arg(format!("--etcd-servers={client_url}"))
            .arg(format!("--bind-address={}", self.address))
            .arg(format!("--advertise-address={}", self.address));
        if self.address.is_loopback() {
            // The reconciler of default/kubernetes's endpoints refuses a loopback address.
            api.arg("--endpoint-reconciler-type=none");
        }
        if !self.service_accounts {
            api.arg("--disable-admission-plugins=ServiceAccount");
        }
        api.arg(format!("--secure-port={}", self.api_port))
            .arg(format!(
                "--cert-dir={}",
                self.dir.join("apiserver-certs").display()
            ))
            .arg(format!("--tls-cert-file={}", pki("apiserver.crt")))
            .arg(format!("--tls-private-key-file={}", pki("apiserver.key")))
            .arg(format!("--client-ca-file={}", pki("ca.crt")))
            .arg(format!("--service-cluster-ip-range={SERVICE_CIDR}"))
            .arg(format!("--service-account-issuer={SERVICE_ACCOUNT_ISSUER}"))
            .arg(format!("--service-account-key-file={}", pki("sa.pub")))
            .arg(format!(
                "--service-account-signing-key-file={}",
                pki("sa.key")
            ))
            .arg("--authorization-mode=Node,RBAC")
            .arg(format!(
                "--token-auth-file={}",
                self.dir.join("tokens.csv").display()
            ))
            .arg("--enable-admission-plugins=ValidatingAdmissionPolicy")
            .arg("--allow-privileged=true")
            .arg(format!(
                "--kubelet-client-certificate={}",
                pki("kubelet-client.crt")
            ))
            .arg(format!(
                "--kubelet-client-key={}",
                pki("kubelet-client.key")
            ))
            .arg("--kubelet-preferred-address-types=InternalIP")
            .arg("--profiling=false");
        self.apiserver = Some(self.spawn("kube-apiserver", api)?);
        Ok(())
    }

    /// Kills kube-apiserver (etcd keeps the data): an outage, as clients see it.
    pub fn stop_apiserver(&mut self) {
        kill(&mut self.apiserver);
    }

    /// Starts kube-apiserver again after [`Self::stop_apiserver`], on the same port, and waits
    /// until it is ready.
    pub fn restart_apiserver(&mut self) -> Result<()> {
        kill(&mut self.apiserver);
        self.spawn_apiserver()?;
        self.wait_ready()
    }

    fn spawn(&self, name: &str, mut cmd: Command) -> Result<Child> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{name}.log")))?;
        cmd.env_remove("KUBECONFIG")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        cmd.spawn().with_context(|| format!("starting {name}"))
    }

    fn check_alive(child: &mut Option<Child>, name: &str, log: impl Fn() -> String) -> Result<()> {
        if let Some(c) = child.as_mut()
            && let Some(status) = c.try_wait()?
        {
            *child = None;
            bail!("{name} exited ({status}):\n{}", log_summary(&log()));
        }
        Ok(())
    }

    fn wait_port(&mut self, name: &str, port: u16, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let host = if name == "etcd" {
            Ipv4Addr::LOCALHOST
        } else {
            self.address
        };
        let addr = SocketAddr::from((host, port));
        loop {
            let dir = self.dir.clone();
            let child = if name == "etcd" {
                &mut self.etcd
            } else {
                &mut self.apiserver
            };
            Self::check_alive(child, name, || read_log(&dir, name))?;
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{name} is not listening on {addr} after {timeout:?}:\n{}",
                    log_summary(&read_log(&self.dir, name))
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_ready(&mut self) -> Result<()> {
        self.wait_port("kube-apiserver", self.api_port, READY_TIMEOUT)?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let dir = self.dir.clone();
            Self::check_alive(&mut self.etcd, "etcd", || read_log(&dir, "etcd"))?;
            Self::check_alive(&mut self.apiserver, "kube-apiserver", || {
                read_log(&dir, "kube-apiserver")
            })?;
            let out = self.kubectl(["get", "--raw", "/readyz"])?;
            if out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok" {
                return Ok(());
            }
            let last = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            if Instant::now() > deadline {
                bail!(
                    "kube-apiserver not ready after {READY_TIMEOUT:?}; last /readyz: {}\n{}",
                    last.trim(),
                    log_summary(&self.log("kube-apiserver"))
                );
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    // --- PKI and tokens ----------------------------------------------------------------------

    fn pki(&self, file: &str) -> PathBuf {
        self.dir.join("pki").join(file)
    }

    fn write_pki(&self) -> Result<()> {
        let pki = self.dir.join("pki");
        fs::create_dir_all(&pki)?;
        let mut cnf = OPENSSL_CNF.to_string();
        if !self.address.is_loopback() {
            cnf = cnf.replace(
                "subjectAltName = IP:127.0.0.1,",
                &format!("subjectAltName = IP:127.0.0.1,IP:{},", self.address),
            );
        }
        fs::write(pki.join("openssl.cnf"), cnf)?;
        openssl(
            &pki,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-days",
                "3650",
                "-sha256",
                "-config",
                "openssl.cnf",
                "-extensions",
                "ca_ext",
                "-subj",
                "/CN=tapestry-test-ca",
            ],
        )?;
        self.sign("apiserver", "/CN=kube-apiserver", "serving_ext")?;
        self.sign(
            "kubelet-client",
            "/O=system:masters/CN=kube-apiserver-kubelet-client",
            "client_ext",
        )?;
        openssl(
            &pki,
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                "sa.key",
            ],
        )?;
        openssl(
            &pki,
            &["pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub"],
        )?;
        Ok(())
    }

    fn sign(&self, name: &str, subject: &str, extensions: &str) -> Result<()> {
        let pki = self.dir.join("pki");
        let (key, csr, crt) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
        );
        openssl(
            &pki,
            &[
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &csr,
                "-config",
                "openssl.cnf",
                "-subj",
                subject,
            ],
        )?;
        let serial = format!("0x{}", random_hex(16)?);
        openssl(
            &pki,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-set_serial",
                &serial,
                "-days",
                "3650",
                "-sha256",
                "-extfile",
                "openssl.cnf",
                "-extensions",
                extensions,
                "-out",
                &crt,
            ],
        )?;
        let _ = fs::remove_file(pki.join(csr));
        Ok(())
    }

    /// Signs a client certificate (user `common_name`, groups `organizations`) with the
    /// control plane's CA, which the apiserver trusts (`--client-ca-file`); returns the
    /// certificate and key paths, e.g. for a kubelet's client identity.
    pub fn client_cert(
        &self,
        name: &str,
        common_name: &str,
        organizations: &[&str],
    ) -> Result<(PathBuf, PathBuf)> {
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            bail!("client_cert name {name:?}: use [A-Za-z0-9-]");
        }
        let mut subject = String::new();
        for o in organizations {
            subject.push_str(&format!("/O={}", escape_dn(o)));
        }
        subject.push_str(&format!("/CN={}", escape_dn(common_name)));
        self.sign(name, &subject, "client_ext")?;
        Ok((
            self.pki(&format!("{name}.crt")),
            self.pki(&format!("{name}.key")),
        ))
    }

    fn write_token_file(&self) -> Result<()> {
        let mut csv = String::new();
        for m in &self.members {
            // token,user,uid,"group1,group2"
            csv.push_str(&format!(
                "{},{},{},\"{}\"\n",
                m.token,
                m.identity.user,
                m.identity.user,
                m.identity.groups.join(",")
            ));
        }
        let path = self.dir.join("tokens.csv");
        fs::write(&path, csv)?;
        Ok(())
    }

    // --- accessors ---------------------------------------------------------------------------

    /// `https://<address>:<port>` (127.0.0.1 unless [`ControlPlaneOptions::address`] said
    /// otherwise).
    pub fn server_url(&self) -> String {
        format!("https://{}:{}", self.address, self.api_port)
    }

    /// The address the apiserver binds and advertises.
    pub fn address(&self) -> Ipv4Addr {
        self.address
    }

    /// The apiserver's secure port.
    pub fn api_port(&self) -> u16 {
        self.api_port
    }

    /// etcd's client URL (`http://127.0.0.1:<port>`).
    pub fn etcd_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.etcd_port)
    }

    /// The CA certificate (PEM) that signed the apiserver's serving certificate.
    pub fn ca_pem(&self) -> Result<String> {
        Ok(fs::read_to_string(self.ca_path())?)
    }

    pub fn ca_path(&self) -> PathBuf {
        self.pki("ca.crt")
    }

    /// The working directory (logs, PKI, kubeconfigs, etcd data).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn member(&self, id: &str) -> Result<&Member> {
        self.members
            .iter()
            .find(|m| m.identity.id == id)
            .ok_or_else(|| {
                anyhow!(
                    "no identity {id:?} (have: {})",
                    self.members
                        .iter()
                        .map(|m| m.identity.id.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
    }

    /// The kubeconfig of an identity (a bearer token; works for kubectl and kube-rs).
    pub fn kubeconfig_path(&self, id: &str) -> Result<PathBuf> {
        Ok(self.member(id)?.kubeconfig.clone())
    }

    /// The bearer token of an identity.
    pub fn token(&self, id: &str) -> Result<String> {
        Ok(self.member(id)?.token.clone())
    }

    pub fn identities(&self) -> Vec<Identity> {
        self.members.iter().map(|m| m.identity.clone()).collect()
    }

    /// Contents of `<component>.log` (`etcd`, `kube-apiserver`, `kube-controller-manager`).
    pub fn log(&self, component: &str) -> String {
        read_log(&self.dir, component)
    }

    // --- kubectl -----------------------------------------------------------------------------

    /// A `kubectl` command with `--kubeconfig` of identity `id`, stdin closed.
    pub fn kubectl_command(&self, id: &str) -> Result<Command> {
        let mut cmd = Command::new(self.bin.join("kubectl"));
        cmd.arg(format!(
            "--kubeconfig={}",
            self.kubeconfig_path(id)?.display()
        ))
        .env_remove("KUBECONFIG")
        .env("KUBECACHEDIR", self.dir.join("kubectl-cache"))
        .stdin(Stdio::null());
        Ok(cmd)
    }

    /// Runs the built kubectl as [`ADMIN`].
    pub fn kubectl<I, S>(&self, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.kubectl_as(ADMIN, args)
    }

    /// Runs the built kubectl as identity `id`.
    pub fn kubectl_as<I, S>(&self, id: &str, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.kubectl_command(id)?;
        cmd.args(args);
        cmd.output().context("running kubectl")
    }

    /// [`kubectl`](Self::kubectl) that returns stdout, and fails with stderr on a non-zero exit.
    pub fn kubectl_ok<I, S>(&self, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let out = self.kubectl(&args)?;
        check_output("kubectl", &args, out)
    }

    /// The Guest CRD as `tapestry-controller crd` prints it (the workspace's binary), applied and
    /// waited for until Established.
    pub fn install_guest_crd(&self) -> Result<()> {
        let bin = crate::daemon::binary("tapestry-controller")?;
        let out = Command::new(&bin)
            .arg("crd")
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {} crd", bin.display()))?;
        if !out.status.success() {
            bail!(
                "{} crd failed: {}",
                bin.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        self.apply(&String::from_utf8(out.stdout)?)?;
        self.kubectl_ok([
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/guests.tapestry.dev",
        ])?;
        Ok(())
    }

    /// The daemon's identity as the chart makes it, in namespace `tapestry`: the ServiceAccount,
    /// its ClusterRole, and the admission policies that scope it to its node and to pods' Guests
    /// (rendered by helm from the chart; helm from `scripts/build-k8s.sh helm`).
    pub fn install_node_identity(&self) -> Result<()> {
        let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/helm/tapestry");
        let out = Command::new(binary("helm")?)
            .args(["template", "tapestry"])
            .arg(&chart)
            .args([
                "--namespace",
                "tapestry",
                "--show-only",
                "templates/serviceaccounts.yaml",
                "--show-only",
                "templates/rbac-node.yaml",
                "--show-only",
                "templates/admission-policy.yaml",
            ])
            .output()
            .context("running helm template")?;
        if !out.status.success() {
            bail!("helm template: {}", String::from_utf8_lossy(&out.stderr));
        }
        let _ = self.kubectl(["create", "namespace", "tapestry"])?;
        self.apply(&String::from_utf8(out.stdout)?)?;
        Ok(())
    }

    /// A kubeconfig for the daemon of `node`: a token of the tapestry-node ServiceAccount
    /// (from [`ControlPlane::install_node_identity`]) bound to a daemon Pod on that node, as the
    /// kubelet would mount it, so it carries the node-name claim. Creates the Node if missing.
    pub fn node_kubeconfig(&self, node: &str) -> Result<PathBuf> {
        let pod = format!("tapestry-node-{node}");
        let _ = self.apply(&format!(
            "{{\"apiVersion\": \"v1\", \"kind\": \"Node\", \"metadata\": {{\"name\": \"{node}\"}}}}"
        ));
        self.apply(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}, namespace: tapestry}}\n\
             spec: {{nodeName: {node}, serviceAccountName: tapestry-node, \
             containers: [{{name: tapestryd, image: tapestryd}}]}}\n"
        ))?;
        let uid = self.kubectl_ok([
            "get",
            "pod",
            "-n",
            "tapestry",
            &pod,
            "-o",
            "jsonpath={.metadata.uid}",
        ])?;
        let token = self.kubectl_ok([
            "create",
            "token",
            "tapestry-node",
            "-n",
            "tapestry",
            "--bound-object-kind",
            "Pod",
            "--bound-object-name",
            &pod,
            "--bound-object-uid",
            uid.trim(),
        ])?;
        let path = self.dir().join(format!("kubeconfig-daemon-{node}.yaml"));
        fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {}\n    certificate-authority: {}\n\
                 users:\n- name: u\n  user:\n    token: {}\ncontexts:\n- name: x\n  context: {{cluster: c, user: u}}\ncurrent-context: x\n",
                self.server_url(),
                self.ca_path().display(),
                token.trim()
            ),
        )?;
        Ok(path)
    }

    /// `kubectl apply -f -` as [`ADMIN`] with `manifest` (YAML or JSON) on stdin.
    pub fn apply(&self, manifest: &str) -> Result<String> {
        let mut cmd = self.kubectl_command(ADMIN)?;
        cmd.args(["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().context("running kubectl apply")?;
        child
            .stdin
            .take()
            .context("kubectl stdin")?
            .write_all(manifest.as_bytes())?;
        let out = child.wait_with_output()?;
        check_output("kubectl", &["apply", "-f", "-"], out)
            .with_context(|| format!("applying:\n{manifest}"))
    }

    // --- kube-controller-manager -------------------------------------------------------------

    /// Starts kube-controller-manager with [`DEFAULT_CONTROLLERS`] (EndpointSlice, garbage
    /// collector, namespace) and waits until those controllers have their service accounts.
    pub fn start_controller_manager(&mut self) -> Result<()> {
        self.start_controller_manager_with(DEFAULT_CONTROLLERS)
    }

    /// Starts kube-controller-manager with the given `--controllers` (names as in
    /// `kube-controller-manager --help`), as `system:kube-controller-manager` with
    /// `--use-service-account-credentials`: each controller acts as service account
    /// `kube-system/<controller>-controller` under its bootstrap ClusterRole.
    pub fn start_controller_manager_with(&mut self, controllers: &[&str]) -> Result<()> {
        if self.controller_manager.is_some() {
            bail!("kube-controller-manager is already running");
        }
        let bin = binary("kube-controller-manager")?;
        let _ = fs::remove_file(self.dir.join("kube-controller-manager.log"));
        let kubeconfig = self.kubeconfig_path(CONTROLLER_MANAGER)?;
        let mut cmd = Command::new(bin);
        cmd.arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg(format!(
                "--authentication-kubeconfig={}",
                kubeconfig.display()
            ))
            .arg(format!(
                "--authorization-kubeconfig={}",
                kubeconfig.display()
            ))
            .arg(format!("--controllers={}", controllers.join(",")))
            .arg("--leader-elect=false")
            .arg("--use-service-account-credentials=true")
            .arg("--bind-address=127.0.0.1")
            .arg("--secure-port=0")
            .arg(format!(
                "--cert-dir={}",
                self.dir.join("kcm-certs").display()
            ))
            .arg(format!("--service-cluster-ip-range={SERVICE_CIDR}"))
            .arg(format!("--root-ca-file={}", self.ca_path().display()))
            .arg(format!(
                "--flex-volume-plugin-dir={}",
                self.dir.join("flexvolume").display()
            ))
            .arg("--profiling=false");
        self.controller_manager = Some(self.spawn("kube-controller-manager", cmd)?);

        // Each controller gets its service account when it starts.
        let accounts: Vec<&str> = controllers
            .iter()
            .filter_map(|c| controller_service_account(c))
            .collect();
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let dir = self.dir.clone();
            Self::check_alive(
                &mut self.controller_manager,
                "kube-controller-manager",
                || read_log(&dir, "kube-controller-manager"),
            )?;
            let out =
                self.kubectl(["get", "serviceaccounts", "-n", "kube-system", "-o", "name"])?;
            let have = String::from_utf8_lossy(&out.stdout).into_owned();
            let missing: Vec<&str> = accounts
                .iter()
                .copied()
                .filter(|a| !have.lines().any(|l| l == format!("serviceaccount/{a}")))
                .collect();
            if out.status.success() && missing.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "kube-controller-manager: no service account {} after {READY_TIMEOUT:?}:\n{}",
                    missing.join(", "),
                    log_summary(&self.log("kube-controller-manager"))
                );
            }
            thread::sleep(Duration::from_millis(250));
        }
    }

    /// Stops kube-controller-manager (if running).
    pub fn stop_controller_manager(&mut self) {
        kill(&mut self.controller_manager);
    }

    fn stop_processes(&mut self) {
        // Order matters: an apiserver whose etcd is gone hangs in shutdown. The apiserver's and
        // the controller-manager's graceful shutdown (about a second) buys a test nothing.
        kill(&mut self.controller_manager);
        kill(&mut self.apiserver);
        stop(&mut self.etcd);
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop_processes();
        if thread::panicking() || self.keep_logs {
            let _ = fs::remove_dir_all(self.dir.join("etcd"));
            let _ = fs::write(self.dir.join("kept"), "");
            if !self.keep_logs {
                eprintln!(
                    "tapestry k8s: test panicked; control-plane logs kept in {}",
                    self.dir.display()
                );
            }
        } else if let Err(e) = fs::remove_dir_all(&self.dir) {
            eprintln!("tapestry k8s: removing {}: {e}", self.dir.display());
        }
    }
}

/// Service account a built-in controller runs as under `--use-service-account-credentials`.
fn controller_service_account(controller: &str) -> Option<&'static str> {
    // Names as in cmd/kube-controller-manager/names (canonical and legacy alias); service
    // accounts as the controllers' NewClient("...") calls name them.
    Some(match controller {
        "endpointslice-controller" | "endpointslice" => "endpointslice-controller",
        "garbage-collector-controller" | "garbagecollector" => "generic-garbage-collector",
        "namespace-controller" | "namespace" => "namespace-controller",
        "endpoints-controller" | "endpoint" => "endpoint-controller",
        "endpointslice-mirroring-controller" | "endpointslicemirroring" => {
            "endpointslicemirroring-controller"
        }
        "serviceaccount-controller" | "serviceaccount" => "service-account-controller",
        "daemonset-controller" | "daemonset" => "daemon-set-controller",
        "deployment-controller" | "deployment" => "deployment-controller",
        "replicaset-controller" | "replicaset" => "replicaset-controller",
        "root-ca-certificate-publisher-controller" | "root-ca-cert-publisher" => {
            "root-ca-cert-publisher"
        }
        _ => return None,
    })
}

// ---------------------------------------------------------------------------------------------
// Helpers

const OPENSSL_CNF: &str = "\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca_ext]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign,digitalSignature
subjectKeyIdentifier = hash
[serving_ext]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,IP:10.96.0.1
authorityKeyIdentifier = keyid
[client_ext]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = clientAuth
authorityKeyIdentifier = keyid
";

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .context("running openssl (apt-get install openssl)")?;
    if !out.status.success() {
        bail!(
            "openssl {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn escape_dn(s: &str) -> String {
    s.replace('\\', "\\\\").replace('/', "\\/")
}

fn write_kubeconfig(path: &Path, server: &str, ca: &Path, id: &str, token: &str) -> Result<()> {
    let cfg = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{
            "name": "tapestry",
            "cluster": { "server": server, "certificate-authority": ca.display().to_string() },
        }],
        "users": [{ "name": id, "user": { "token": token } }],
        "contexts": [{ "name": id, "context": { "cluster": "tapestry", "user": id } }],
        "current-context": id,
    });
    fs::write(path, serde_yaml::to_string(&cfg)?)
        .with_context(|| format!("writing {}", path.display()))
}

fn check_output<S: AsRef<OsStr>>(prog: &str, args: &[S], out: Output) -> Result<String> {
    if !out.status.success() {
        let args: Vec<_> = args.iter().map(|a| a.as_ref().to_string_lossy()).collect();
        bail!(
            "{prog} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn read_log(dir: &Path, component: &str) -> String {
    fs::read_to_string(dir.join(format!("{component}.log"))).unwrap_or_default()
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The last error lines of a klog/zap log (klog `E`/`F` lines, `"level":"error"`, `Error:`)
/// and its last lines: what a start failure shows.
fn log_summary(text: &str) -> String {
    let errors: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.starts_with('E')
                || l.starts_with('F')
                || l.contains("\"level\":\"error\"")
                || l.contains("\"level\":\"fatal\"")
                || l.contains("Error:")
        })
        .collect();
    let errors = errors[errors.len().saturating_sub(10)..].join("\n");
    format!("errors:\n{errors}\nlast lines:\n{}", tail(text, 15))
}

fn random_hex(bytes: usize) -> Result<String> {
    let mut buf = vec![0u8; bytes];
    fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// A port on `addr` that was free a moment ago and that this process has not handed out before.
fn free_port(addr: Ipv4Addr) -> Result<u16> {
    static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    for _ in 0..100 {
        let port = TcpListener::bind((IpAddr::V4(addr), 0))?
            .local_addr()?
            .port();
        let mut set = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
        if set.get_or_insert_with(HashSet::new).insert(port) {
            return Ok(port);
        }
    }
    bail!("no free loopback port")
}

fn kill(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// SIGTERM, then SIGKILL after 5 s.
fn stop(child: &mut Option<Child>) {
    let Some(mut c) = child.take() else {
        return;
    };
    // SAFETY: plain syscall on our own child's pid, which has not been reaped yet.
    unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = c.try_wait() {
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let _ = c.kill();
    let _ = c.wait();
}

/// Start time (clock ticks since boot) of a process, to tell a live owner from a reused pid.
fn process_start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    // Fields after the command: state is field 3, starttime field 22.
    after.split_whitespace().nth(19)?.parse().ok()
}

/// Kills processes left by control planes whose test process died without dropping them
/// (SIGKILL, Ctrl-C), and removes their directories (unless kept after a panic).
fn sweep_leftovers() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("tapestry-k8s-") {
            continue;
        }
        let dir = e.path();
        let Ok(owner) = fs::read_to_string(dir.join("owner")) else {
            continue;
        };
        let mut w = owner.split_whitespace();
        let (Some(pid), Some(start)) = (
            w.next().and_then(|p| p.parse::<u32>().ok()),
            w.next().and_then(|s| s.parse::<u64>().ok()),
        ) else {
            continue;
        };
        if process_start_time(pid) == Some(start) {
            continue; // owner alive
        }
        let needle = dir.display().to_string();
        if let Ok(procs) = fs::read_dir("/proc") {
            for p in procs.flatten() {
                let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                    continue;
                };
                let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
                    continue;
                };
                if String::from_utf8_lossy(&cmdline).contains(&needle) {
                    // SAFETY: plain syscall; the process runs from a dead test's directory.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        if dir.join("kept").exists() {
            let _ = fs::remove_dir_all(dir.join("etcd"));
        } else {
            let _ = fs::remove_dir_all(&dir);
        }
    }
}
