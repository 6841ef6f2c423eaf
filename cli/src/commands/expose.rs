//! `kubectl tapestry expose guest NAME`: a Service for a KVM guest, as `kubectl expose pod` makes
//! one for a pod. Unlike the other commands it talks to the Kubernetes API (kube-rs), not to the
//! node daemon: it reads the Guest (`tapestry.dev/v1alpha1`), builds the Service from it and the
//! flags with kubectl's rules ([`service_for_guest`], pure), and creates it, or prints it.
//!
//! The Service selects the guest by its labels (the daemon copies its pod's there), so the
//! tapestry controller gives it an EndpointSlice with the guest's address and guest-level
//! readiness.

use std::{collections::BTreeMap, fmt, path::PathBuf};

use anyhow::{Context as _, Result, anyhow, bail};
use k8s_openapi::{
    api::core::v1::{Service, ServicePort, ServiceSpec},
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};
use kube::{Api, Client, api::PostParams, core::Status};
use tapestry_k8s::{
    Guest, Protocol,
    client::{ConfigSource, client_for},
    names,
};

use crate::output::print_flush;

/// Field manager of the Services this command creates (kubectl's own is `kubectl-expose`).
pub const FIELD_MANAGER: &str = "kubectl-tapestry-expose";

/// kubectl truncates a default Service name to a DNS-1035 label's length.
const MAX_NAME_LEN: usize = 63;

/// Where the Kubernetes API is and which namespace, as kubectl plugins take it.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct KubeArgs {
    /// Kubeconfig file (default: $KUBECONFIG, ~/.kube/config, or the in-cluster service account).
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (default: its current context).
    #[arg(long, value_name = "NAME")]
    pub context: Option<String>,
    /// Namespace of the guest and the Service (default: the context's, else "default").
    #[arg(short = 'n', long, value_name = "NAMESPACE")]
    pub namespace: Option<String>,
}

/// `--protocol`, offered as clap possible values spelled as kubectl spells them (any case is
/// accepted), parsed into the one [`Protocol`].
fn protocol_parser() -> impl clap::builder::TypedValueParser<Value = Protocol> {
    use clap::builder::TypedValueParser as _;
    clap::builder::PossibleValuesParser::new(
        Protocol::ALL
            .iter()
            .map(|p| clap::builder::PossibleValue::new(p.as_str())),
    )
    .map(|s| s.parse::<Protocol>().expect("a possible value"))
}

/// `--type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ServiceType {
    #[value(name = "ClusterIP")]
    ClusterIp,
    #[value(name = "NodePort")]
    NodePort,
    #[value(name = "LoadBalancer")]
    LoadBalancer,
}

impl ServiceType {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceType::ClusterIp => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
        }
    }
}

/// `--dry-run`, as kubectl's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum DryRun {
    /// Create the Service.
    #[default]
    None,
    /// Print the Service; send nothing (the Guest is still read).
    Client,
    /// Send it with dryRun=All: the server validates and defaults it, and stores nothing.
    Server,
}

/// `-o`: what is printed instead of `service/NAME exposed`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Yaml,
    Json,
    /// `service/NAME`.
    Name,
}

#[derive(Clone, Debug, clap::Args)]
#[command(after_help = "Examples:
  # A ClusterIP Service for guest vm-1 on port 80, to the guest's port 80
  {bin} expose guest vm-1 --port 80

  # Port 80 to the guest's port named http (its spec.ports), under another name
  {bin} expose guest vm-1 --port 80 --target-port http --name web

  # The guest declares one port: it is the Service's port too
  {bin} expose guest vm-1 -n vms

  # Print the Service instead of creating it
  {bin} expose guest vm-1 --port 80 --dry-run=client -o yaml

The selector is the guest's labels (its pod's, copied by tapestryd) unless --selector is given;
the tapestry controller gives the Service an EndpointSlice with the guest's address, ready when
the guest is.")]
pub struct GuestArgs {
    /// The Guest to expose (its name: the VM pod's name for a VM in a pod).
    #[arg(value_name = "NAME")]
    pub name: String,

    #[command(flatten)]
    pub kube: KubeArgs,

    /// The port(s) the Service serves on ("80", or "80,443"). Default: the ports the guest
    /// declares (spec.ports).
    #[arg(long, value_name = "PORT")]
    pub port: Option<String>,

    /// The guest's port traffic goes to: a number or the name of one of its declared ports.
    /// Default: the same as --port.
    #[arg(long, value_name = "PORT|NAME")]
    pub target_port: Option<String>,

    /// Protocol of the Service's ports (default: the declared port's, else TCP).
    #[arg(long, value_parser = protocol_parser(), ignore_case = true)]
    pub protocol: Option<Protocol>,

    /// Name of the Service (default: the guest's name).
    #[arg(long = "name", value_name = "NAME")]
    pub name_override: Option<String>,

    /// Type of the Service (default ClusterIP).
    #[arg(long = "type", value_enum, value_name = "TYPE")]
    pub service_type: Option<ServiceType>,

    /// The Service's selector, k=v[,k=v...] (default: the guest's labels).
    #[arg(long, value_name = "k=v,...")]
    pub selector: Option<String>,

    /// Labels of the Service, k=v[,k=v...] (default: the guest's labels).
    #[arg(short = 'l', long, value_name = "k=v,...")]
    pub labels: Option<String>,

    /// none: create the Service; client: only print it; server: have the server check it
    /// without storing it.
    #[arg(long, value_enum, default_value_t = DryRun::None, value_name = "none|client|server")]
    pub dry_run: DryRun,

    /// Print the Service as YAML, JSON or `service/NAME`.
    #[arg(short = 'o', long, value_enum)]
    pub output: Option<Output>,
}

/// What [`service_for_guest`] takes from the flags, parsed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceOptions {
    pub name: Option<String>,
    pub ports: Option<Vec<i32>>,
    pub target_port: Option<IntOrString>,
    pub protocol: Option<&'static str>,
    pub service_type: Option<&'static str>,
    pub selector: Option<BTreeMap<String, String>>,
    pub labels: Option<BTreeMap<String, String>>,
}

impl ServiceOptions {
    /// Parses and checks the flags; every bad value is an error naming the flag.
    pub fn from_args(args: &GuestArgs) -> Result<ServiceOptions> {
        Ok(ServiceOptions {
            name: args.name_override.clone(),
            ports: args.port.as_deref().map(parse_ports).transpose()?,
            target_port: args
                .target_port
                .as_deref()
                .map(parse_target_port)
                .transpose()?,
            protocol: args.protocol.map(Protocol::as_str),
            service_type: args.service_type.map(ServiceType::as_str),
            selector: args
                .selector
                .as_deref()
                .map(|s| parse_labels("--selector", s))
                .transpose()?,
            labels: args
                .labels
                .as_deref()
                .map(|s| parse_labels("--labels", s))
                .transpose()?,
        })
    }
}

/// `--port`: one port or several, comma-separated, each 1-65535.
pub fn parse_ports(s: &str) -> Result<Vec<i32>> {
    let mut out = Vec::new();
    for p in s.split(',') {
        let p = p.trim();
        let n: i32 = p.parse().map_err(|_| {
            anyhow!("--port {s:?}: {p:?} is not a port number (1-65535; several: 80,443)")
        })?;
        if !(1..=65535).contains(&n) {
            bail!("--port {s:?}: {n} is not between 1 and 65535");
        }
        if out.contains(&n) {
            bail!("--port {s:?}: {n} is given twice");
        }
        out.push(n);
    }
    Ok(out)
}

/// `--target-port`: a number 1-65535, or a port name (an IANA service name: at most 15
/// lowercase letters, digits and inner single hyphens, with at least one letter).
pub fn parse_target_port(s: &str) -> Result<IntOrString> {
    if let Ok(n) = s.parse::<i64>() {
        if !(1..=65535).contains(&n) {
            bail!("--target-port {s:?}: a port number must be between 1 and 65535");
        }
        return Ok(IntOrString::Int(n as i32));
    }
    let valid = !s.is_empty()
        && s.len() <= 15
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && s.chars().any(|c| c.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--");
    if !valid {
        bail!(
            "--target-port {s:?}: not a port number (1-65535) nor a port name (at most 15 \
             lowercase letters, digits and single inner hyphens, with a letter)"
        );
    }
    Ok(IntOrString::String(s.to_string()))
}

/// `k=v,k2=v2` (kubectl's equality-only selector and label syntax).
pub fn parse_labels(flag: &str, s: &str) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for pair in s.split(',') {
        let Some((k, v)) = pair.split_once('=') else {
            bail!("{flag} {s:?}: {pair:?} is not key=value");
        };
        if k.is_empty() {
            bail!("{flag} {s:?}: {pair:?} has an empty key");
        }
        if v.contains('=') {
            bail!("{flag} {s:?}: {pair:?} is not key=value");
        }
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

/// The Service `kubectl expose` would make for `guest` (as for a pod): the guest's labels as the
/// selector and the Service's labels, its declared ports when no port is given (one: that port;
/// several: all, named `port-N`), each declared port's protocol, and targetPort = port unless
/// given. The namespace is left to the caller.
pub fn service_for_guest(guest: &Guest, opts: &ServiceOptions) -> Result<Service> {
    let guest_name = guest.metadata.name.as_deref().unwrap_or_default();
    let guest_labels = guest.metadata.labels.clone().unwrap_or_default();

    let selector = match &opts.selector {
        Some(s) => s.clone(),
        None if guest_labels.is_empty() => bail!(
            "couldn't retrieve selectors via --selector flag or introspection: the guest has no \
             labels and cannot be exposed (give it labels, or pass --selector)"
        ),
        None => guest_labels.clone(),
    };

    let ports: Vec<i32> = match &opts.ports {
        Some(p) => p.clone(),
        None => {
            let mut declared = Vec::new();
            for p in &guest.spec.ports {
                if !declared.contains(&p.port) {
                    declared.push(p.port);
                }
            }
            if declared.is_empty() {
                bail!(
                    "couldn't find port via --port flag or introspection: guest {guest_name:?} \
                     declares no ports (spec.ports); pass --port"
                );
            }
            declared
        }
    };

    // kubectl's rules: --protocol wins; else the protocol the guest declares for that number;
    // a number declared with two protocols gets one Service port per protocol.
    let mut service_ports = Vec::new();
    for (i, &port) in ports.iter().enumerate() {
        let name = (ports.len() > 1).then(|| format!("port-{}", i + 1));
        let declared: Vec<&str> = {
            let mut v: Vec<&str> = guest
                .spec
                .ports
                .iter()
                .filter(|p| p.port == port)
                .map(|p| p.protocol.as_str())
                .collect();
            v.dedup();
            v
        };
        match (opts.protocol, declared.as_slice()) {
            (Some(proto), _) => service_ports.push((name, port, proto)),
            (None, []) => service_ports.push((name, port, "TCP")),
            (None, [proto]) => service_ports.push((name, port, *proto)),
            (None, several) => {
                for proto in several {
                    let name = format!("port-{}-{}", i + 1, proto.to_lowercase());
                    service_ports.push((Some(name), port, *proto));
                }
            }
        }
    }
    let service_ports = service_ports
        .into_iter()
        .map(|(name, port, protocol)| ServicePort {
            name,
            port,
            protocol: Some(protocol.to_string()),
            target_port: Some(opts.target_port.clone().unwrap_or(IntOrString::Int(port))),
            ..Default::default()
        })
        .collect();

    let name = match &opts.name {
        Some(n) => n.clone(),
        None => guest_name.chars().take(MAX_NAME_LEN).collect(),
    };
    let labels = match &opts.labels {
        Some(l) => Some(l.clone()),
        None => Some(guest_labels).filter(|l| !l.is_empty()),
    };
    Ok(Service {
        metadata: ObjectMeta {
            name: Some(name),
            labels,
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            selector: Some(selector),
            ports: Some(service_ports),
            type_: opts.service_type.map(str::to_string),
            ..Default::default()
        }),
        status: None,
    })
}

/// An API answer that is not success, printed as kubectl prints it:
/// `Error from server (NotFound): guests.tapestry.dev "x" not found`.
#[derive(Debug)]
pub struct FromServer(pub Box<Status>);

impl fmt::Display for FromServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let reason = if self.0.reason.is_empty() {
            format!("{}", self.0.code)
        } else {
            self.0.reason.clone()
        };
        write!(f, "Error from server ({reason}): {}", self.0.message)
    }
}

impl std::error::Error for FromServer {}

/// The client for `--kubeconfig`/`--context` (else $KUBECONFIG, ~/.kube/config, in-cluster) and
/// the namespace: `-n`, else the context's.
/// Also returns the server's URL, for messages.
async fn client(args: &KubeArgs) -> Result<(Client, String, String)> {
    let config = ConfigSource {
        kubeconfig: args.kubeconfig.clone(),
        context: args.context.clone(),
    }
    .config()
    .await?;
    let namespace = args
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    let url = config.cluster_url.to_string();
    Ok((client_for(config)?, namespace, url))
}

/// Turns an API status into [`FromServer`], and a transport error into one naming the server.
fn api_error(e: kube::Error, server: &str) -> anyhow::Error {
    match e {
        kube::Error::Api(status) => FromServer(status).into(),
        e => anyhow::Error::new(e)
            .context(format!("talking to the Kubernetes API server at {server}")),
    }
}

/// Whether a 404 is the API saying the resource type is unknown (the CRD is not installed), not
/// that the object is missing: a missing object has a NotFound status naming it.
fn is_unknown_resource(status: &Status) -> bool {
    status.code == 404 && (status.reason != "NotFound" || status.details.is_none())
}

/// What is printed after the Service is created (or would be): the object, its name, or
/// kubectl's `service/NAME exposed` with the dry-run suffix.
pub fn render(service: &Service, output: Option<Output>, dry_run: DryRun) -> Result<String> {
    let name = service.metadata.name.as_deref().unwrap_or_default();
    Ok(match output {
        Some(Output::Yaml) => serde_yaml::to_string(service)?,
        Some(Output::Json) => serde_json::to_string_pretty(service)? + "\n",
        Some(Output::Name) => format!("service/{name}\n"),
        None => {
            let suffix = match dry_run {
                DryRun::None => "",
                DryRun::Client => " (dry run)",
                DryRun::Server => " (server dry run)",
            };
            format!("service/{name} exposed{suffix}\n")
        }
    })
}

/// `expose guest`: reads the Guest, builds the Service, creates it (or not), prints.
pub fn guest(args: &GuestArgs) -> Result<()> {
    // Flags first: a bad one is reported before anything is read.
    let opts = ServiceOptions::from_args(args)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async {
        let (client, namespace, server) = client(&args.kube).await?;
        let guests: Api<Guest> = Api::namespaced(client.clone(), &namespace);
        let guest = match guests.get(&args.name).await {
            Ok(g) => g,
            Err(kube::Error::Api(s)) if is_unknown_resource(&s) => bail!(
                "the server doesn't have a resource type \"guests\" ({}): install the Guest CRD \
                 with `tapestry-controller crd | kubectl apply -f -` or the tapestry chart",
                names::GUEST_CRD
            ),
            Err(e) => return Err(api_error(e, &server)),
        };
        let mut service = service_for_guest(&guest, &opts)?;
        if args.dry_run == DryRun::Client {
            // As kubectl: the namespace is in the printed object only when given on the
            // command line, so that the output can be applied to another one.
            if args.kube.namespace.is_some() {
                service.metadata.namespace = Some(namespace);
            }
            return print_flush(&render(&service, args.output, args.dry_run)?);
        }
        let services: Api<Service> = Api::namespaced(client, &namespace);
        let pp = PostParams {
            dry_run: args.dry_run == DryRun::Server,
            field_manager: Some(FIELD_MANAGER.into()),
        };
        let created = services
            .create(&pp, &service)
            .await
            .map_err(|e| api_error(e, &server))?;
        print_flush(&render(&created, args.output, args.dry_run)?)
    })
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn guest(labels: Value, ports: Value) -> Guest {
        serde_json::from_value(json!({
            "apiVersion": "tapestry.dev/v1alpha1",
            "kind": "Guest",
            "metadata": {"name": "vm-1", "namespace": "default", "labels": labels},
            "spec": {
                "nodeName": "node-a",
                "podRef": {"name": "vm-1"},
                "ips": ["10.22.0.5"],
                "mac": "52:54:00:00:00:01",
                "tap": "tap0",
                "ports": ports,
            }
        }))
        .unwrap()
    }

    fn ports(svc: &Service) -> Vec<(Option<String>, i32, String, IntOrString)> {
        svc.spec
            .as_ref()
            .unwrap()
            .ports
            .iter()
            .flatten()
            .map(|p| {
                (
                    p.name.clone(),
                    p.port,
                    p.protocol.clone().unwrap(),
                    p.target_port.clone().unwrap(),
                )
            })
            .collect()
    }

    fn opts(args: &[&str]) -> Result<ServiceOptions> {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct T {
            #[command(flatten)]
            g: GuestArgs,
        }
        let mut argv = vec!["t", "vm-1"];
        argv.extend_from_slice(args);
        ServiceOptions::from_args(&T::try_parse_from(argv)?.g)
    }

    #[test]
    fn selector_labels_and_name_come_from_the_guest() {
        let g = guest(json!({"app": "web", "tier": "front"}), json!([]));
        let svc = service_for_guest(&g, &opts(&["--port", "80"]).unwrap()).unwrap();
        let want: BTreeMap<String, String> = [("app", "web"), ("tier", "front")]
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        assert_eq!(svc.metadata.name.as_deref(), Some("vm-1"));
        assert_eq!(svc.metadata.namespace, None);
        assert_eq!(svc.metadata.labels.as_ref(), Some(&want));
        let spec = svc.spec.as_ref().unwrap();
        assert_eq!(spec.selector.as_ref(), Some(&want));
        assert_eq!(spec.type_, None);
        assert_eq!(
            ports(&svc),
            [(None, 80, "TCP".into(), IntOrString::Int(80))]
        );

        let svc = service_for_guest(
            &g,
            &opts(&[
                "--port=80",
                "--target-port=http",
                "--name=web",
                "--selector=app=web",
                "-l",
                "team=blue",
                "--type=NodePort",
                "--protocol=udp",
            ])
            .unwrap(),
        )
        .unwrap();
        assert_eq!(svc.metadata.name.as_deref(), Some("web"));
        assert_eq!(svc.metadata.labels.as_ref().unwrap()["team"], "blue");
        assert_eq!(svc.metadata.labels.as_ref().unwrap().len(), 1);
        let spec = svc.spec.as_ref().unwrap();
        assert_eq!(spec.selector.as_ref().unwrap().len(), 1);
        assert_eq!(spec.type_.as_deref(), Some("NodePort"));
        assert_eq!(
            ports(&svc),
            [(None, 80, "UDP".into(), IntOrString::String("http".into()))]
        );
    }

    #[test]
    fn a_guest_without_labels_needs_a_selector() {
        let g = guest(json!({}), json!([]));
        let e = service_for_guest(&g, &opts(&["--port", "80"]).unwrap()).unwrap_err();
        assert!(e.to_string().contains("no labels"), "{e}");
        let svc = service_for_guest(&g, &opts(&["--port=80", "--selector=a=b"]).unwrap()).unwrap();
        assert_eq!(svc.spec.unwrap().selector.unwrap()["a"], "b");
        assert_eq!(svc.metadata.labels, None);
    }

    #[test]
    fn ports_default_to_the_declared_ones() {
        let one = guest(
            json!({"app": "web"}),
            json!([{"name": "dns", "port": 53, "protocol": "UDP"}]),
        );
        let svc = service_for_guest(&one, &opts(&[]).unwrap()).unwrap();
        assert_eq!(
            ports(&svc),
            [(None, 53, "UDP".into(), IntOrString::Int(53))]
        );

        let several = guest(
            json!({"app": "web"}),
            json!([
                {"name": "http", "port": 8080},
                {"name": "dns", "port": 53, "protocol": "UDP"},
                {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
            ]),
        );
        let svc = service_for_guest(&several, &opts(&[]).unwrap()).unwrap();
        assert_eq!(
            ports(&svc),
            [
                (
                    Some("port-1".into()),
                    8080,
                    "TCP".into(),
                    IntOrString::Int(8080)
                ),
                (
                    Some("port-2-udp".into()),
                    53,
                    "UDP".into(),
                    IntOrString::Int(53)
                ),
                (
                    Some("port-2-tcp".into()),
                    53,
                    "TCP".into(),
                    IntOrString::Int(53)
                ),
            ]
        );
        // --port wins; the declared protocol of that number still applies.
        let svc = service_for_guest(&several, &opts(&["--port=8080,9090"]).unwrap()).unwrap();
        assert_eq!(
            ports(&svc),
            [
                (
                    Some("port-1".into()),
                    8080,
                    "TCP".into(),
                    IntOrString::Int(8080)
                ),
                (
                    Some("port-2".into()),
                    9090,
                    "TCP".into(),
                    IntOrString::Int(9090)
                ),
            ]
        );

        let none = guest(json!({"app": "web"}), json!([]));
        let e = service_for_guest(&none, &opts(&[]).unwrap()).unwrap_err();
        assert!(e.to_string().contains("pass --port"), "{e}");
    }

    #[test]
    fn a_long_guest_name_is_cut_to_63() {
        let mut g = guest(json!({"app": "web"}), json!([]));
        g.metadata.name = Some("v".repeat(70));
        let svc = service_for_guest(&g, &opts(&["--port=80"]).unwrap()).unwrap();
        assert_eq!(svc.metadata.name.unwrap().len(), 63);
    }

    #[test]
    fn bad_flags_are_refused_with_the_flag_named() {
        for (args, want) in [
            (&["--port=0"][..], "--port"),
            (&["--port=70000"], "between 1 and 65535"),
            (&["--port=http"], "not a port number"),
            (&["--port=80,80"], "twice"),
            (&["--target-port=0"], "--target-port"),
            (&["--target-port=Http"], "--target-port"),
            (&["--target-port=a-very-long-port-name"], "--target-port"),
            (&["--selector=app"], "--selector"),
            (&["--labels==x"], "--labels"),
        ] {
            let e = opts(args).unwrap_err();
            assert!(e.to_string().contains(want), "{args:?}: {e}");
        }
        assert!(opts(&["--protocol=ICMP"]).is_err());
        assert!(opts(&["--type=ExternalName"]).is_err());
        assert!(opts(&["--dry-run=maybe"]).is_err());
        assert_eq!(
            parse_target_port("h2c-1").unwrap(),
            IntOrString::String("h2c-1".into())
        );
        assert_eq!(parse_target_port("8080").unwrap(), IntOrString::Int(8080));
    }

    #[test]
    fn printing_as_kubectl() {
        let g = guest(json!({"app": "web"}), json!([]));
        let svc = service_for_guest(&g, &opts(&["--port=80"]).unwrap()).unwrap();
        assert_eq!(
            render(&svc, None, DryRun::None).unwrap(),
            "service/vm-1 exposed\n"
        );
        assert_eq!(
            render(&svc, None, DryRun::Client).unwrap(),
            "service/vm-1 exposed (dry run)\n"
        );
        assert_eq!(
            render(&svc, None, DryRun::Server).unwrap(),
            "service/vm-1 exposed (server dry run)\n"
        );
        assert_eq!(
            render(&svc, Some(Output::Name), DryRun::Client).unwrap(),
            "service/vm-1\n"
        );
        let yaml: Value =
            serde_yaml::from_str(&render(&svc, Some(Output::Yaml), DryRun::Client).unwrap())
                .unwrap();
        assert_eq!(yaml["apiVersion"], "v1");
        assert_eq!(yaml["kind"], "Service");
        assert_eq!(yaml["spec"]["ports"][0]["targetPort"], 80);
        let json: Value =
            serde_json::from_str(&render(&svc, Some(Output::Json), DryRun::Client).unwrap())
                .unwrap();
        assert_eq!(json, yaml);
    }

    #[test]
    fn server_errors_read_as_kubectl_s() {
        let s: Status = serde_json::from_value(json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": "guests.tapestry.dev \"x\" not found", "reason": "NotFound",
            "details": {"name": "x", "group": "tapestry.dev", "kind": "guests"}, "code": 404
        }))
        .unwrap();
        assert!(!is_unknown_resource(&s));
        assert_eq!(
            FromServer(Box::new(s)).to_string(),
            "Error from server (NotFound): guests.tapestry.dev \"x\" not found"
        );
        let bare =
            Status::failure("404 page not found", "Failed to parse error data").with_code(404);
        assert!(is_unknown_resource(&bare));
    }
}
