//! Desired state of one host's Services: the standalone state file (YAML or JSON).
//!
//! ```yaml
//! services:
//!   - name: web
//!     vip: 10.96.0.10
//!     port: 80
//!     backends:
//!       - ip: 10.200.0.2
//!         port: 8080
//! ```
//!
//! Parsing is two passes: serde (types, unknown fields, value ranges, with the field path and the
//! line and column of the offending value), then [`DesiredState::validate`] for rules that span
//! several values (name syntax, addresses, duplicates). [`parse`] and [`load`] run both, so a
//! `DesiredState` they return is valid. States built in code should call `validate` themselves.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};

use crate::keyword::keyword_enum;

/// Longest service name (a DNS subdomain, as Kubernetes object names).
pub const MAX_NAME_LEN: usize = 253;
pub const MIN_WEIGHT: u16 = 1;
/// Weights are relative; a bound keeps one backend from crowding the others out of the
/// service's fixed-size selection table.
pub const MAX_WEIGHT: u16 = 256;
pub const DEFAULT_WEIGHT: u16 = 1;
/// Kubernetes' default for `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT_SECONDS: u32 = 10_800;
/// Kubernetes' maximum (1 day).
pub const MAX_AFFINITY_TIMEOUT_SECONDS: u32 = 86_400;

/// All Services of this host. The default (no services) is a valid state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    rename_all = "camelCase",
    deny_unknown_fields,
    expecting = "a mapping with a `services` list"
)]
pub struct DesiredState {
    #[serde(default, deserialize_with = "null_as_empty")]
    pub services: Vec<ServiceSpec>,
}

/// One Service: a frontend (VIP, port, protocol) and the backends it balances over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    rename_all = "camelCase",
    deny_unknown_fields,
    expecting = "a service (a mapping with name, vip, port, ...)"
)]
pub struct ServiceSpec {
    /// Unique; `[a-z0-9]([-a-z0-9./]*[a-z0-9])?`, so `namespace/name` fits.
    pub name: String,
    /// The frontend's address; `0.0.0.0` is a node port: `port` on every address of the node
    /// (within `tapestryd --nodeport-range`), as a NodePort Service's.
    #[serde(deserialize_with = "de_vip")]
    pub vip: Ipv4Addr,
    #[serde(deserialize_with = "de_port")]
    pub port: u16,
    #[serde(default, deserialize_with = "de_datapath_protocol")]
    pub protocol: Protocol,
    #[serde(default)]
    pub algorithm: Algorithm,
    #[serde(default)]
    pub session_affinity: SessionAffinity,
    /// Only used with [`SessionAffinity::ClientIP`]; 1..=86400.
    #[serde(
        default = "default_affinity_timeout",
        deserialize_with = "de_affinity_timeout"
    )]
    pub session_affinity_timeout_seconds: u32,
    /// As Kubernetes' `spec.externalTrafficPolicy`, for node ports and external addresses:
    /// `Local` sends clients outside the node (those arriving on `tapestryd
    /// --nodeport-interface`) only to the backends on this node (`node` equal to this node's
    /// name), their source address kept, and drops them while this node has none; pods and
    /// the node itself still reach every backend.
    #[serde(default, skip_serializing_if = "TrafficPolicy::is_cluster")]
    pub external_traffic_policy: TrafficPolicy,
    /// May be empty: the datapath then rejects new connections (ICMP port unreachable).
    #[serde(default, deserialize_with = "null_as_empty")]
    pub backends: Vec<BackendSpec>,
}

/// One backend (endpoint) of a Service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    rename_all = "camelCase",
    deny_unknown_fields,
    expecting = "a backend (a mapping with ip, port, ...)"
)]
pub struct BackendSpec {
    #[serde(deserialize_with = "de_backend_ip")]
    pub ip: Ipv4Addr,
    /// As written in the file: `None` means "the service's port". Kept unresolved so a state
    /// serializes back to what was read; use [`BackendSpec::target_port`] for the real port.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "de_opt_port"
    )]
    pub port: Option<u16>,
    /// Relative share of new flows, 1..=256. Zero is not allowed: drain with `terminating`.
    #[serde(default = "default_weight", deserialize_with = "de_weight")]
    pub weight: u16,
    /// Display name (pod or VM name), for logs and the status API only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default)]
    pub kind: EndpointKind,
    /// The node the backend runs on (an EndpointSlice endpoint's `nodeName`), for display only.
    /// `None`: not named; the daemon then reports its own node for the endpoints it knows are
    /// local (those the CNI plugin registered), and no node for the others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Kept for existing flows, never chosen for new ones (graceful drain).
    #[serde(default)]
    pub terminating: bool,
}

keyword_enum! {
    /// Transport protocol, spelled as Kubernetes spells it: of a frontend and its backends (the
    /// datapath balances TCP and UDP), of a guest's declared port, of a flow.
    Protocol (default Tcp) {
        Tcp => "TCP",
        Udp => "UDP",
        /// Declared by pods and guests; not balanced by the datapath.
        Sctp => "SCTP",
    }
}

keyword_enum! {
    /// How new flows choose a backend.
    Algorithm (default Random) {
        /// Uniform random over the weighted selection table.
        Random => "random",
        /// Maglev consistent hashing of the 5-tuple: few flows move when backends change.
        Maglev => "maglev",
    }
}

keyword_enum! {
    /// As Kubernetes' `Service.spec.sessionAffinity`.
    SessionAffinity (default None) {
        None => "None",
        /// A client keeps its backend for `sessionAffinityTimeoutSeconds` after its last flow.
        ClientIP => "ClientIP",
    }
}

keyword_enum! {
    /// As Kubernetes' `Service.spec.externalTrafficPolicy`.
    TrafficPolicy (default Cluster) {
        /// Every backend; a client outside the node has its source translated to the node.
        Cluster => "Cluster",
        /// This node's backends only, the client's source kept.
        Local => "Local",
    }
}

impl TrafficPolicy {
    pub fn is_cluster(&self) -> bool {
        *self == TrafficPolicy::Cluster
    }
}

keyword_enum! {
    /// What runs behind a backend address (for display and policy; the datapath treats them all
    /// alike).
    EndpointKind (default Pod) {
        Pod => "pod",
        Vm => "vm",
        /// An address of a node itself: a host-network server, the apiserver behind `kubernetes`.
        Host => "host",
        /// An address outside the cluster: neither a pod's nor a node's.
        External => "external",
    }
}

#[cfg(feature = "schemars")]
impl schemars::JsonSchema for Protocol {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Protocol".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "Transport protocol of a port, spelled as in Kubernetes.",
            "type": "string",
            "enum": Protocol::ALL.iter().map(|p| p.as_str()).collect::<Vec<_>>(),
        })
    }
}

impl Protocol {
    /// IP protocol number (`IPPROTO_TCP`, `IPPROTO_UDP`, `IPPROTO_SCTP`).
    pub const fn ip_proto(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }

    /// The protocol of an IP protocol number, if it is one of these.
    pub const fn from_ip_proto(n: u8) -> Option<Protocol> {
        match n {
            6 => Some(Protocol::Tcp),
            17 => Some(Protocol::Udp),
            132 => Some(Protocol::Sctp),
            _ => None,
        }
    }

    /// Whether the datapath balances this protocol.
    pub const fn in_datapath(self) -> bool {
        matches!(self, Protocol::Tcp | Protocol::Udp)
    }
}

impl ServiceSpec {
    /// A TCP service with default settings and no backends.
    pub fn new(name: impl Into<String>, vip: Ipv4Addr, port: u16) -> Self {
        ServiceSpec {
            name: name.into(),
            vip,
            port,
            protocol: Protocol::default(),
            algorithm: Algorithm::default(),
            session_affinity: SessionAffinity::default(),
            session_affinity_timeout_seconds: DEFAULT_AFFINITY_TIMEOUT_SECONDS,
            external_traffic_policy: TrafficPolicy::default(),
            backends: Vec::new(),
        }
    }

    /// The frontend key: unique across the state.
    /// The checks [`DesiredState::validate`] makes of one service; `at` names it in errors.
    pub fn validate(&self, at: &str) -> Result<(), StateError> {
        validate_service(at, self)
    }

    pub fn frontend(&self) -> (Ipv4Addr, u16, Protocol) {
        (self.vip, self.port, self.protocol)
    }

    /// A node port (`vip: 0.0.0.0`): `port` on every address of the node.
    pub fn is_node_port(&self) -> bool {
        self.vip.is_unspecified()
    }
}

impl BackendSpec {
    /// An active pod backend of weight 1 on the service's port.
    pub fn new(ip: Ipv4Addr) -> Self {
        BackendSpec {
            ip,
            port: None,
            weight: DEFAULT_WEIGHT,
            name: None,
            kind: EndpointKind::default(),
            node: None,
            terminating: false,
        }
    }

    /// The port connections are sent to: the backend's own, else the service's.
    pub fn target_port(&self, service: &ServiceSpec) -> u16 {
        self.port.unwrap_or(service.port)
    }
}

/// State file syntax.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Yaml,
    Json,
}

impl Format {
    /// From the file extension (`.json`, `.yaml`, `.yml`, any case).
    pub fn from_path(path: &Path) -> Option<Format> {
        let ext = path.extension()?.to_str()?;
        if ext.eq_ignore_ascii_case("json") {
            Some(Format::Json)
        } else if ext.eq_ignore_ascii_case("yaml") || ext.eq_ignore_ascii_case("yml") {
            Some(Format::Yaml)
        } else {
            None
        }
    }

    /// Without a hint: a document that starts with `{` is JSON (serde_json reports its errors
    /// more precisely), anything else YAML (of which JSON is a subset).
    fn sniff(text: &str) -> Format {
        if text.trim_start().starts_with('{') {
            Format::Json
        } else {
            Format::Yaml
        }
    }
}

/// Why a state file was rejected. `Display` is one line naming the field and the problem.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Syntax, type or range error found while parsing. `path_in_doc` is like
    /// `services[1].backends[0].port`, empty when the error is not inside a field.
    #[error("{}", parse_display(.path_in_doc, .message, *.line, *.column))]
    Parse {
        path_in_doc: String,
        message: String,
        line: Option<usize>,
        column: Option<usize>,
    },
    /// A semantic rule broken by a well-typed document.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
}

fn parse_display(path: &str, message: &str, line: Option<usize>, column: Option<usize>) -> String {
    let mut out = String::new();
    if !path.is_empty() {
        out.push_str(path);
        out.push_str(": ");
    }
    out.push_str(message);
    match (line, column) {
        (Some(l), Some(c)) => out.push_str(&format!(" (line {l}, column {c})")),
        (Some(l), None) => out.push_str(&format!(" (line {l})")),
        _ => {}
    }
    out
}

impl StateError {
    /// The file does not exist (as opposed to being unreadable or invalid).
    pub fn is_not_found(&self) -> bool {
        matches!(self, StateError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }

    /// The document path of the offending field, when there is one.
    pub fn field(&self) -> Option<&str> {
        match self {
            StateError::Io { .. } => None,
            StateError::Parse { path_in_doc, .. } if path_in_doc.is_empty() => None,
            StateError::Parse { path_in_doc, .. } => Some(path_in_doc),
            StateError::Invalid { field, .. } => Some(field),
        }
    }

    fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        StateError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Parses and validates a state document. Without a hint, a document starting with `{` is tried
/// as JSON first (for its precise errors), then as YAML (a flow mapping also starts with `{`).
/// Empty input (or only comments, or `services: []`) is the empty state.
pub fn parse(text: &str, format_hint: Option<Format>) -> Result<DesiredState, StateError> {
    if text.trim().is_empty() {
        return Ok(DesiredState::default());
    }
    let state = match (format_hint, Format::sniff(text)) {
        (Some(Format::Json), _) => parse_json(text)?,
        (Some(Format::Yaml), _) | (None, Format::Yaml) => parse_yaml(text)?,
        // A YAML flow mapping (`{services: []}`) also starts with `{`.
        (None, Format::Json) => match parse_json(text) {
            Ok(state) => state,
            Err(json_err) => parse_yaml(text).map_err(|_| json_err)?,
        },
    };
    state.validate()?;
    Ok(state)
}

/// Reads, parses and validates a state file; the extension picks the format (see [`parse`]).
pub fn load(path: &Path) -> Result<DesiredState, StateError> {
    let text = std::fs::read_to_string(path).map_err(|source| StateError::Io {
        path: path.to_owned(),
        source,
    })?;
    parse(&text, Format::from_path(path))
}

fn parse_yaml(text: &str) -> Result<DesiredState, StateError> {
    let de = serde_yaml::Deserializer::from_str(text);
    // Option: a document of only comments is null, i.e. the empty state.
    match serde_path_to_error::deserialize::<_, Option<DesiredState>>(de) {
        Ok(state) => Ok(state.unwrap_or_default()),
        Err(err) => {
            let path = err.path().to_string();
            let inner = err.into_inner();
            let location = inner.location();
            let mut message = inner.to_string();
            if let Some(loc) = &location {
                let suffix = format!(" at line {} column {}", loc.line(), loc.column());
                message = message.replacen(&suffix, "", 1);
            }
            Err(parse_error(
                &path,
                &message,
                location.as_ref().map(|l| l.line()),
                location.as_ref().map(|l| l.column()),
            ))
        }
    }
}

fn parse_json(text: &str) -> Result<DesiredState, StateError> {
    let mut de = serde_json::Deserializer::from_str(text);
    let state = serde_path_to_error::deserialize::<_, Option<DesiredState>>(&mut de)
        .map_err(|err| json_error(&err.path().to_string(), err.inner()))?;
    // Trailing garbage after the document is an error in JSON.
    de.end().map_err(|err| json_error("", &err))?;
    Ok(state.unwrap_or_default())
}

fn json_error(path: &str, err: &serde_json::Error) -> StateError {
    let (line, column) = (err.line(), err.column());
    let mut message = err.to_string();
    if line == 0 {
        return parse_error(path, &message, None, None);
    }
    message = message.replacen(&format!(" at line {line} column {column}"), "", 1);
    parse_error(path, &message, Some(line), Some(column))
}

/// Normalises serde's messages so the field is named once, in the path.
fn parse_error(
    path: &str,
    message: &str,
    line: Option<usize>,
    column: Option<usize>,
) -> StateError {
    let mut path = if path == "." { "" } else { path }.to_string();
    let mut message = strip_path_prefix(message).to_string();

    if let Some(rest) = message.strip_prefix("missing field `")
        && let Some(field) = rest.strip_suffix('`')
    {
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(field);
        message = "required field is missing".to_string();
    } else if let Some(rest) = message.strip_prefix("duplicate field `")
        && let Some(field) = rest.strip_suffix('`')
    {
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(field);
        message = "given more than once".to_string();
    } else if let Some(rest) = message.strip_prefix("unknown field `")
        && let Some((_, expected)) = rest.split_once("`, ")
    {
        message = format!("unknown field, {}", expected.replace('`', ""));
    }
    StateError::Parse {
        path_in_doc: path,
        message,
        line,
        column,
    }
}

/// serde_yaml prefixes its own copy of the path (`services[0].port: ...`); drop it, since
/// serde_path_to_error's path (which also covers unknown keys) is used instead.
fn strip_path_prefix(message: &str) -> &str {
    match message.split_once(": ") {
        Some((head, rest))
            if !head.is_empty()
                && head.chars().all(|c| {
                    c.is_ascii_alphanumeric() || matches!(c, '.' | '[' | ']' | '_' | '-' | '?')
                }) =>
        {
            rest
        }
        _ => message,
    }
}

impl DesiredState {
    /// Checks the rules serde cannot: name syntax, usable addresses, value ranges (for states
    /// built in code), unique names, frontends and backends. Returns the first problem found.
    pub fn validate(&self) -> Result<(), StateError> {
        let mut names: HashMap<&str, usize> = HashMap::new();
        let mut frontends: HashMap<(Ipv4Addr, u16, Protocol), usize> = HashMap::new();
        for (i, svc) in self.services.iter().enumerate() {
            let at = format!("services[{i}]");
            validate_service(&at, svc)?;
            if let Some(first) = names.insert(&svc.name, i) {
                return Err(StateError::invalid(
                    format!("{at}.name"),
                    format!(
                        "duplicate service name {:?}, already used by services[{first}]",
                        svc.name
                    ),
                ));
            }
            if let Some(&first) = frontends.get(&svc.frontend()) {
                return Err(StateError::invalid(
                    at,
                    format!(
                        "frontend {}:{}/{} is already used by service {:?} (services[{first}])",
                        svc.vip, svc.port, svc.protocol, self.services[first].name
                    ),
                ));
            }
            frontends.insert(svc.frontend(), i);
        }
        Ok(())
    }

    /// YAML that [`parse`] reads back as an equal state.
    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).expect("plain structs of strings and numbers serialize")
    }

    /// Pretty JSON that [`parse`] reads back as an equal state.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("plain structs of strings and numbers serialize")
    }
}

fn validate_service(at: &str, svc: &ServiceSpec) -> Result<(), StateError> {
    if let Err(why) = check_name(&svc.name) {
        return Err(StateError::invalid(
            format!("{at}.name"),
            format!("invalid name {:?}: {why}", svc.name),
        ));
    }
    // 0.0.0.0: a node port.
    if !svc.is_node_port() {
        check_unicast(svc.vip).map_err(|m| StateError::invalid(format!("{at}.vip"), m))?;
    }
    if svc.external_traffic_policy == TrafficPolicy::Local && !svc.is_node_port() {
        check_external(svc.vip)
            .map_err(|m| StateError::invalid(format!("{at}.externalTrafficPolicy"), m))?;
    }
    if !svc.protocol.in_datapath() {
        return Err(StateError::invalid(
            format!("{at}.protocol"),
            format!("must be one of TCP, UDP, got {:?}", svc.protocol.as_str()),
        ));
    }
    check_range(u64::from(svc.port), 1, 65_535, "")
        .map_err(|m| StateError::invalid(format!("{at}.port"), m))?;
    check_range(
        u64::from(svc.session_affinity_timeout_seconds),
        1,
        u64::from(MAX_AFFINITY_TIMEOUT_SECONDS),
        "",
    )
    .map_err(|m| StateError::invalid(format!("{at}.sessionAffinityTimeoutSeconds"), m))?;

    let mut seen: HashMap<(Ipv4Addr, u16), usize> = HashMap::new();
    for (j, be) in svc.backends.iter().enumerate() {
        let bat = format!("{at}.backends[{j}]");
        check_unicast(be.ip).map_err(|m| StateError::invalid(format!("{bat}.ip"), m))?;
        if let Some(port) = be.port {
            check_range(u64::from(port), 1, 65_535, "")
                .map_err(|m| StateError::invalid(format!("{bat}.port"), m))?;
        }
        check_range(
            u64::from(be.weight),
            u64::from(MIN_WEIGHT),
            u64::from(MAX_WEIGHT),
            WEIGHT_HINT,
        )
        .map_err(|m| StateError::invalid(format!("{bat}.weight"), m))?;
        if let Some(node) = &be.node
            && let Err(why) = check_node_name(node)
        {
            return Err(StateError::invalid(
                format!("{bat}.node"),
                format!("invalid node name {node:?}: {why}"),
            ));
        }
        let target = (be.ip, be.target_port(svc));
        if let Some(first) = seen.insert(target, j) {
            return Err(StateError::invalid(
                bat,
                format!(
                    "duplicate backend {}:{} (same as backends[{first}])",
                    target.0, target.1
                ),
            ));
        }
    }
    Ok(())
}

/// `externalTrafficPolicy: Local` is for what clients outside the cluster reach: a node port
/// or an external address. An address no client outside can reach (link-local, loopback and
/// the like are already refused as VIPs) gets no traffic from outside, so the policy there is a
/// mistake, named as one.
fn check_external(vip: Ipv4Addr) -> Result<(), String> {
    if vip.is_link_local() {
        return Err(format!(
            "Local applies to node ports (vip 0.0.0.0) and external addresses; {vip} is \
             link-local, which no client outside the node reaches"
        ));
    }
    Ok(())
}

/// A service name: a DNS subdomain that may also hold `/` (`namespace/name`).
fn check_name(name: &str) -> Result<(), &'static str> {
    check_subdomain(
        name,
        true,
        "use lowercase letters, digits, '-', '.' and '/', starting and ending with a letter or digit",
    )
}

/// A Kubernetes Node's name: a DNS subdomain (RFC 1123).
fn check_node_name(name: &str) -> Result<(), &'static str> {
    check_subdomain(
        name,
        false,
        "use lowercase letters, digits, '-' and '.', starting and ending with a letter or digit",
    )
}

fn check_subdomain(name: &str, slash: bool, rule: &'static str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("must not be empty");
    }
    if name.len() > MAX_NAME_LEN {
        return Err("longer than 253 characters");
    }
    let edge = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    let bytes = name.as_bytes();
    let inner_ok = bytes
        .iter()
        .all(|&c| edge(c) || matches!(c, b'-' | b'.') || (slash && c == b'/'));
    if !inner_ok || !edge(bytes[0]) || !edge(bytes[bytes.len() - 1]) {
        return Err(rule);
    }
    Ok(())
}

/// Addresses the datapath can NAT to or from: not 0.0.0.0, broadcast, multicast or loopback
/// (a pod's loopback never reaches the host's programs).
fn check_unicast(addr: Ipv4Addr) -> Result<(), String> {
    let what = if addr.is_unspecified() {
        "unspecified"
    } else if addr.is_broadcast() {
        "broadcast"
    } else if addr.is_multicast() {
        "multicast"
    } else if addr.is_loopback() {
        "loopback"
    } else {
        return Ok(());
    };
    Err(format!("must be a unicast address, got {addr} ({what})"))
}

const WEIGHT_HINT: &str = "; to drain a backend, set terminating: true";

fn check_range(v: u64, min: u64, max: u64, hint: &str) -> Result<(), String> {
    if (min..=max).contains(&v) {
        Ok(())
    } else {
        Err(range_message(min, max, v, hint))
    }
}

fn range_message(min: u64, max: u64, got: impl fmt::Display, hint: &str) -> String {
    format!("must be between {min} and {max}, got {got}{hint}")
}

fn default_affinity_timeout() -> u32 {
    DEFAULT_AFFINITY_TIMEOUT_SECONDS
}

fn default_weight() -> u16 {
    DEFAULT_WEIGHT
}

fn null_as_empty<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Vec<T>, D::Error> {
    Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
}

/// An integer in `min..=max`, so an out-of-range value is reported with the range rather than
/// as a type mismatch ("expected u16").
struct Ranged {
    min: u64,
    max: u64,
    hint: &'static str,
}

impl Visitor<'_> for Ranged {
    type Value = u64;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "an integer between {} and {}", self.min, self.max)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
        check_range(v, self.min, self.max, self.hint).map_err(E::custom)?;
        Ok(v)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
        match u64::try_from(v) {
            Ok(v) => self.visit_u64(v),
            Err(_) => Err(E::custom(range_message(self.min, self.max, v, self.hint))),
        }
    }
}

fn ranged<'de, D: Deserializer<'de>>(
    d: D,
    min: u64,
    max: u64,
    hint: &'static str,
) -> Result<u64, D::Error> {
    // Not deserialize_u64: serde_yaml would report a negative number as a type mismatch.
    d.deserialize_any(Ranged { min, max, hint })
}

struct Port(u16);

impl<'de> Deserialize<'de> for Port {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Port(ranged(d, 1, 65_535, "")? as u16))
    }
}

fn de_port<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    Ok(Port::deserialize(d)?.0)
}

fn de_opt_port<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u16>, D::Error> {
    Ok(Option::<Port>::deserialize(d)?.map(|p| p.0))
}

fn de_weight<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    Ok(ranged(d, u64::from(MIN_WEIGHT), u64::from(MAX_WEIGHT), WEIGHT_HINT)? as u16)
}

fn de_affinity_timeout<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    Ok(ranged(d, 1, u64::from(MAX_AFFINITY_TIMEOUT_SECONDS), "")? as u32)
}

/// An IPv4 address; IPv6 gets its own message since it is a missing feature, not a typo.
struct Ipv4Field {
    role: &'static str,
}

impl Visitor<'_> for Ipv4Field {
    type Value = Ipv4Addr;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an IPv4 address")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Ipv4Addr, E> {
        match v.parse::<IpAddr>() {
            Ok(IpAddr::V4(addr)) => Ok(addr),
            Ok(IpAddr::V6(_)) => Err(E::custom(format!(
                "IPv6 {} are not supported yet, got {v:?}",
                self.role
            ))),
            Err(_) => Err(E::custom(format!("invalid IPv4 address {v:?}"))),
        }
    }
}

/// A frontend's protocol: one the datapath balances.
fn de_datapath_protocol<'de, D: Deserializer<'de>>(d: D) -> Result<Protocol, D::Error> {
    struct V;
    impl Visitor<'_> for V {
        type Value = Protocol;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("one of TCP, UDP")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Protocol, E> {
            match v.parse::<Protocol>() {
                Ok(p) if p.in_datapath() => Ok(p),
                _ => Err(E::custom(format!("must be one of TCP, UDP, got {v:?}"))),
            }
        }
    }
    d.deserialize_str(V)
}

fn de_vip<'de, D: Deserializer<'de>>(d: D) -> Result<Ipv4Addr, D::Error> {
    d.deserialize_str(Ipv4Field { role: "frontends" })
}

fn de_backend_ip<'de, D: Deserializer<'de>>(d: D) -> Result<Ipv4Addr, D::Error> {
    d.deserialize_str(Ipv4Field { role: "backends" })
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE_YAML: &str = r#"
# two services
services:
  - name: web
    vip: 10.96.0.10
    port: 80
    protocol: tcp
    algorithm: maglev
    sessionAffinity: ClientIP
    sessionAffinityTimeoutSeconds: 600
    backends:
      - ip: 10.200.0.2
        port: 8080
        weight: 3
        name: pod-a
        node: node-2
      - ip: 10.200.0.3
        kind: vm
        terminating: true
  - name: default/dns
    vip: 10.96.0.53
    port: 53
    protocol: UDP
    backends: []
"#;

    fn example() -> DesiredState {
        let mut web = ServiceSpec::new("web", Ipv4Addr::new(10, 96, 0, 10), 80);
        web.algorithm = Algorithm::Maglev;
        web.session_affinity = SessionAffinity::ClientIP;
        web.session_affinity_timeout_seconds = 600;
        web.backends = vec![
            BackendSpec {
                port: Some(8080),
                weight: 3,
                name: Some("pod-a".into()),
                node: Some("node-2".into()),
                ..BackendSpec::new(Ipv4Addr::new(10, 200, 0, 2))
            },
            BackendSpec {
                kind: EndpointKind::Vm,
                terminating: true,
                ..BackendSpec::new(Ipv4Addr::new(10, 200, 0, 3))
            },
        ];
        let mut dns = ServiceSpec::new("default/dns", Ipv4Addr::new(10, 96, 0, 53), 53);
        dns.protocol = Protocol::Udp;
        DesiredState {
            services: vec![web, dns],
        }
    }

    /// Parses YAML that must fail and returns the one-line message.
    fn yaml_err(text: &str) -> String {
        let err = parse(text, Some(Format::Yaml)).expect_err("should be rejected");
        let msg = err.to_string();
        assert!(!msg.contains('\n'), "multi-line message: {msg}");
        msg
    }

    /// A minimal valid service line with `extra` appended to its mapping.
    fn one_service(extra: &str) -> String {
        format!("services:\n  - name: web\n    vip: 10.96.0.10\n    port: 80\n{extra}")
    }

    #[test]
    fn parses_yaml_example() {
        assert_eq!(parse(EXAMPLE_YAML, None).unwrap(), example());
    }

    #[test]
    fn parses_json_example() {
        let json = r#"{"services": [
            {"name": "web", "vip": "10.96.0.10", "port": 80, "protocol": "TCP",
             "algorithm": "Maglev", "sessionAffinity": "clientip",
             "sessionAffinityTimeoutSeconds": 600,
             "backends": [
                {"ip": "10.200.0.2", "port": 8080, "weight": 3, "name": "pod-a", "node": "node-2"},
                {"ip": "10.200.0.3", "kind": "VM", "terminating": true}]},
            {"name": "default/dns", "vip": "10.96.0.53", "port": 53, "protocol": "udp"}
        ]}"#;
        assert_eq!(parse(json, Some(Format::Json)).unwrap(), example());
        // Also as YAML, of which JSON is a subset, and sniffed without a hint.
        assert_eq!(parse(json, Some(Format::Yaml)).unwrap(), example());
        assert_eq!(parse(json, None).unwrap(), example());
        // A YAML flow mapping starts like JSON but is not.
        let flow = "{services: [{name: a, vip: 10.0.0.1, port: 1}]}";
        assert_eq!(parse(flow, None).unwrap().services[0].name, "a");
        assert!(parse(flow, Some(Format::Json)).is_err());
    }

    #[test]
    fn defaults() {
        let state = parse(
            "services:\n- name: a\n  vip: 10.0.0.1\n  port: 443\n  backends:\n  - ip: 10.1.0.1\n",
            None,
        )
        .unwrap();
        let svc = &state.services[0];
        assert_eq!(svc.protocol, Protocol::Tcp);
        assert_eq!(svc.algorithm, Algorithm::Random);
        assert_eq!(svc.session_affinity, SessionAffinity::None);
        assert_eq!(svc.session_affinity_timeout_seconds, 10_800);
        let be = &svc.backends[0];
        assert_eq!(be.port, None);
        assert_eq!(be.target_port(svc), 443);
        assert_eq!(be.weight, 1);
        assert_eq!(be.name, None);
        assert_eq!(be.kind, EndpointKind::Pod);
        assert_eq!(be.node, None);
        assert!(!be.terminating);
        assert_eq!(
            svc.frontend(),
            (Ipv4Addr::new(10, 0, 0, 1), 443, Protocol::Tcp)
        );
        // A service without `backends` has none.
        let state = parse("services:\n- {name: a, vip: 10.0.0.1, port: 1}\n", None).unwrap();
        assert!(state.services[0].backends.is_empty());
    }

    #[test]
    fn empty_documents_are_the_empty_state() {
        for text in [
            "",
            "  \n",
            "# nothing yet\n",
            "services: []\n",
            "services:\n",
            "{}",
        ] {
            assert_eq!(
                parse(text, None).unwrap(),
                DesiredState::default(),
                "{text:?}"
            );
        }
        assert_eq!(
            parse("", Some(Format::Json)).unwrap(),
            DesiredState::default()
        );
        assert_eq!(
            parse(r#"{"services": []}"#, Some(Format::Json)).unwrap(),
            DesiredState::default()
        );
    }

    #[test]
    fn round_trips_through_yaml_and_json() {
        let state = example();
        let yaml = state.to_yaml();
        assert_eq!(parse(&yaml, Some(Format::Yaml)).unwrap(), state, "{yaml}");
        let json = state.to_json();
        assert_eq!(parse(&json, Some(Format::Json)).unwrap(), state, "{json}");
        // Canonical spellings, and an unset backend port stays unset.
        assert!(yaml.contains("protocol: UDP"), "{yaml}");
        assert!(yaml.contains("sessionAffinity: ClientIP"), "{yaml}");
        assert_eq!(yaml.matches("port: 8080").count(), 1, "{yaml}");
    }

    #[test]
    fn load_uses_extension_and_reports_io_errors() {
        let dir = std::env::temp_dir().join(format!("tapestry-state-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let json = dir.join("state.json");
        std::fs::write(&json, example().to_json()).unwrap();
        assert_eq!(load(&json).unwrap(), example());
        let yml = dir.join("state.yml");
        std::fs::write(&yml, EXAMPLE_YAML).unwrap();
        assert_eq!(load(&yml).unwrap(), example());

        let missing = dir.join("missing.yaml");
        let err = load(&missing).unwrap_err();
        assert!(err.is_not_found());
        assert!(
            err.to_string().contains(&missing.display().to_string()),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn out_of_range_port_names_the_path() {
        let text = "services:\n- name: a\n  vip: 10.0.0.1\n  port: 80\n- name: b\n  vip: 10.0.0.2\n  port: 80\n  backends:\n  - ip: 10.1.0.1\n    port: 0\n";
        let msg = yaml_err(text);
        assert!(
            msg.starts_with("services[1].backends[0].port: must be between 1 and 65535, got 0"),
            "{msg}"
        );
        assert!(msg.contains("line 10"), "{msg}");
        let msg = yaml_err(&one_service("").replace("port: 80", "port: 70000"));
        assert!(
            msg.starts_with("services[0].port: must be between 1 and 65535, got 70000"),
            "{msg}"
        );
        let msg = yaml_err(&one_service("").replace("port: 80", "port: -1"));
        assert!(
            msg.starts_with("services[0].port: must be between"),
            "{msg}"
        );
    }

    #[test]
    fn invalid_address_names_the_path_and_value() {
        let text = "services:\n- {name: a, vip: 10.0.0.1, port: 1}\n- {name: b, vip: 10.0.0.2, port: 1}\n- {name: c, vip: 10.96.0.999, port: 1}\n";
        let msg = yaml_err(text);
        assert!(
            msg.starts_with(r#"services[2].vip: invalid IPv4 address "10.96.0.999""#),
            "{msg}"
        );
        let msg = yaml_err(&one_service("").replace("10.96.0.10", "fd00::10"));
        assert!(
            msg.starts_with("services[0].vip: IPv6 frontends are not supported yet"),
            "{msg}"
        );
        let msg = yaml_err(&one_service("    backends:\n      - ip: fd00::1\n"));
        assert!(
            msg.starts_with("services[0].backends[0].ip: IPv6 backends are not supported yet"),
            "{msg}"
        );
    }

    #[test]
    fn unusable_addresses_are_rejected() {
        let msg = yaml_err(&one_service("").replace("10.96.0.10", "255.255.255.255"));
        assert!(
            msg.starts_with("services[0].vip: must be a unicast address"),
            "{msg}"
        );
        let msg = yaml_err(&one_service("").replace("10.96.0.10", "127.0.0.1"));
        assert!(
            msg.starts_with("services[0].vip: must be a unicast address"),
            "{msg}"
        );
        // 0.0.0.0 is a node port.
        let state = parse(
            &one_service("").replace("10.96.0.10", "0.0.0.0"),
            Some(Format::Yaml),
        )
        .unwrap();
        assert!(state.services[0].is_node_port());
        let msg = yaml_err(&one_service("    backends:\n      - ip: 127.0.0.1\n"));
        assert!(
            msg.starts_with("services[0].backends[0].ip: must be a unicast address"),
            "{msg}"
        );
    }

    #[test]
    fn unknown_field_names_the_path_and_expected_fields() {
        let msg = yaml_err(&one_service("    protocl: UDP\n"));
        assert!(
            msg.starts_with("services[0].protocl: unknown field, expected one of name, vip, port,"),
            "{msg}"
        );
        assert!(msg.contains("line 5"), "{msg}");
        let msg = yaml_err(&one_service(
            "    backends:\n      - ip: 10.1.0.1\n        wieght: 2\n",
        ));
        assert!(
            msg.starts_with("services[0].backends[0].wieght: unknown field"),
            "{msg}"
        );
        let msg = yaml_err("service: []\n");
        assert!(
            msg.starts_with("service: unknown field, expected services"),
            "{msg}"
        );
    }

    #[test]
    fn unknown_field_in_json_has_line_and_column() {
        let text = "{\"services\": [\n  {\"name\": \"a\", \"vip\": \"10.0.0.1\", \"port\": 1, \"protocl\": \"TCP\"}\n]}";
        let err = parse(text, Some(Format::Json)).unwrap_err();
        let StateError::Parse {
            path_in_doc, line, ..
        } = &err
        else {
            panic!("{err:?}")
        };
        assert_eq!(path_in_doc, "services[0].protocl");
        assert_eq!(*line, Some(2));
        assert!(err.to_string().contains("(line 2, column"), "{err}");
    }

    #[test]
    fn missing_required_field_names_it() {
        let msg = yaml_err("services:\n- name: a\n  port: 80\n");
        assert!(
            msg.starts_with("services[0].vip: required field is missing"),
            "{msg}"
        );
        let msg = yaml_err(&one_service("    backends:\n      - port: 80\n"));
        assert!(
            msg.starts_with("services[0].backends[0].ip: required field is missing"),
            "{msg}"
        );
    }

    #[test]
    fn bad_enum_and_type_errors_name_the_path() {
        let msg = yaml_err(&one_service("    protocol: SCTP\n"));
        assert!(
            msg.starts_with(r#"services[0].protocol: must be one of TCP, UDP, got "SCTP""#),
            "{msg}"
        );
        let msg = yaml_err(&one_service("    algorithm: roundrobin\n"));
        assert!(
            msg.starts_with("services[0].algorithm: must be one of random, maglev"),
            "{msg}"
        );
        let msg = yaml_err(&one_service("    backends: {ip: 10.1.0.1}\n"));
        assert!(
            msg.starts_with("services[0].backends: invalid type"),
            "{msg}"
        );
        let msg = yaml_err(&one_service(
            "    backends:\n      - ip: 10.1.0.1\n        terminating: maybe\n",
        ));
        assert!(
            msg.starts_with("services[0].backends[0].terminating: invalid type"),
            "{msg}"
        );
    }

    #[test]
    fn weight_zero_suggests_terminating() {
        let msg = yaml_err(&one_service(
            "    backends:\n      - ip: 10.1.0.1\n        weight: 0\n",
        ));
        assert!(
            msg.starts_with("services[0].backends[0].weight: must be between 1 and 256, got 0"),
            "{msg}"
        );
        assert!(msg.contains("terminating"), "{msg}");
        let msg = yaml_err(&one_service(
            "    backends:\n      - ip: 10.1.0.1\n        weight: 257\n",
        ));
        assert!(msg.contains("got 257"), "{msg}");
        let msg = yaml_err(&one_service("    port: 81\n"));
        assert!(
            msg.starts_with("services[0].port: given more than once"),
            "{msg}"
        );
    }

    #[test]
    fn affinity_timeout_range() {
        let msg = yaml_err(&one_service("    sessionAffinityTimeoutSeconds: 86401\n"));
        assert!(
            msg.starts_with(
                "services[0].sessionAffinityTimeoutSeconds: must be between 1 and 86400"
            ),
            "{msg}"
        );
    }

    #[test]
    fn invalid_service_name() {
        for bad in ["Web", "-web", "web-", "we b", "web_1"] {
            let msg = yaml_err(&one_service("").replace("name: web", &format!("name: {bad:?}")));
            assert!(
                msg.starts_with(&format!("services[0].name: invalid name {bad:?}")),
                "{msg}"
            );
        }
        let long = "a".repeat(254);
        let msg = yaml_err(&one_service("").replace("name: web", &format!("name: {long}")));
        assert!(msg.contains("longer than 253"), "{msg}");
        // Namespaced names and single characters are fine.
        assert!(
            parse(
                &one_service("").replace("name: web", "name: ns/web.v2"),
                None
            )
            .is_ok()
        );
        assert!(parse(&one_service("").replace("name: web", "name: w"), None).is_ok());
    }

    #[test]
    fn duplicate_service_name() {
        let text = "services:\n- {name: web, vip: 10.0.0.1, port: 80}\n- {name: web, vip: 10.0.0.2, port: 80}\n";
        let msg = yaml_err(text);
        assert!(
            msg.starts_with(r#"services[1].name: duplicate service name "web""#),
            "{msg}"
        );
        assert!(msg.contains("services[0]"), "{msg}");
    }

    #[test]
    fn duplicate_frontend() {
        let text = "services:
- {name: web, vip: 10.96.0.10, port: 80}
- {name: a, vip: 10.96.0.10, port: 80, protocol: UDP}
- {name: b, vip: 10.96.0.10, port: 81}
- {name: c, vip: 10.96.0.10, port: 80, protocol: tcp}
";
        let msg = yaml_err(text);
        assert_eq!(
            msg,
            r#"services[3]: frontend 10.96.0.10:80/TCP is already used by service "web" (services[0])"#
        );
    }

    #[test]
    fn duplicate_backend_uses_the_resolved_port() {
        let text = one_service(
            "    backends:\n      - ip: 10.0.0.2\n        port: 8080\n      - ip: 10.0.0.2\n      - ip: 10.0.0.2\n        port: 8080\n",
        );
        let msg = yaml_err(&text);
        assert!(
            msg.starts_with("services[0].backends[2]: duplicate backend 10.0.0.2:8080"),
            "{msg}"
        );
        // Without a port the backend uses the service's (80): that one is a duplicate too.
        let text = one_service(
            "    backends:\n      - ip: 10.0.0.2\n      - ip: 10.0.0.2\n        port: 80\n",
        );
        let msg = yaml_err(&text);
        assert!(
            msg.starts_with("services[0].backends[1]: duplicate backend 10.0.0.2:80"),
            "{msg}"
        );
    }

    #[test]
    fn syntax_errors_carry_a_position() {
        // A tab where YAML wants spaces.
        let err = parse("services:\n\t- name: a\n", Some(Format::Yaml)).unwrap_err();
        assert!(
            matches!(err, StateError::Parse { line: Some(2), .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("(line 2, column 1)"), "{err}");
        let err = parse("{\"services\": [}", Some(Format::Json)).unwrap_err();
        assert!(
            matches!(
                err,
                StateError::Parse {
                    line: Some(1),
                    column: Some(_),
                    ..
                }
            ),
            "{err:?}"
        );
        let err = parse("{} trailing", Some(Format::Json)).unwrap_err();
        assert!(matches!(err, StateError::Parse { .. }), "{err:?}");
    }

    #[test]
    fn backends_may_name_their_node_and_be_hosts_or_external() {
        let state = parse(
            &one_service(
                "    backends:
      - {ip: 10.1.0.1, node: worker-1.example}
      - {ip: 192.168.1.10, kind: host, node: worker-2}
      - {ip: 203.0.113.7, kind: EXTERNAL}
",
            ),
            None,
        )
        .unwrap();
        let b = &state.services[0].backends;
        assert_eq!(
            b.iter()
                .map(|b| (b.kind, b.node.as_deref()))
                .collect::<Vec<_>>(),
            [
                (EndpointKind::Pod, Some("worker-1.example")),
                (EndpointKind::Host, Some("worker-2")),
                (EndpointKind::External, None),
            ]
        );
        // Written back in the canonical spelling; an unnamed node stays unwritten.
        let yaml = state.to_yaml();
        assert!(yaml.contains("kind: external"), "{yaml}");
        assert_eq!(yaml.matches("node:").count(), 2, "{yaml}");
        assert_eq!(parse(&yaml, None).unwrap(), state);

        let msg = yaml_err(&one_service(
            "    backends:\n      - {ip: 10.1.0.1, node: Worker_1}\n",
        ));
        assert!(
            msg.starts_with(r#"services[0].backends[0].node: invalid node name "Worker_1""#),
            "{msg}"
        );
        let msg = yaml_err(&one_service(
            "    backends:\n      - {ip: 10.1.0.1, kind: node}\n",
        ));
        assert!(
            msg.starts_with(
                r#"services[0].backends[0].kind: must be one of pod, vm, host, external, got "node""#
            ),
            "{msg}"
        );
    }

    #[test]
    fn external_traffic_policy_defaults_to_cluster_and_local_is_for_outside_frontends() {
        let st = parse(&one_service(""), None).unwrap();
        assert_eq!(
            st.services[0].external_traffic_policy,
            TrafficPolicy::Cluster
        );
        // Cluster is not written out: a state without the field reads back the same.
        assert!(!st.to_yaml().contains("externalTrafficPolicy"));
        let node_port = "services:\n  - name: np\n    vip: 0.0.0.0\n    port: 30080\n    \
                         externalTrafficPolicy: local\n";
        let st = parse(node_port, None).unwrap();
        assert_eq!(st.services[0].external_traffic_policy, TrafficPolicy::Local);
        assert_eq!(parse(&st.to_yaml(), None).unwrap(), st);
        let st = parse(&one_service("    externalTrafficPolicy: Local\n"), None).unwrap();
        assert_eq!(st.services[0].external_traffic_policy, TrafficPolicy::Local);
        let err = yaml_err(&one_service("    externalTrafficPolicy: Nearby\n"));
        assert!(err.contains("services[0].externalTrafficPolicy"), "{err}");
        assert!(err.contains("Cluster") && err.contains("Local"), "{err}");
        let link_local = "services:\n  - name: ll\n    vip: 169.254.10.1\n    port: 80\n    \
                          externalTrafficPolicy: Local\n";
        let err = parse(link_local, None).unwrap_err().to_string();
        assert!(
            err.starts_with("services[0].externalTrafficPolicy: Local applies to node ports"),
            "{err}"
        );
        // The same address is a fine VIP under Cluster.
        parse(&link_local.replace("Local", "Cluster"), None).unwrap();
    }

    #[test]
    fn validate_checks_states_built_in_code() {
        let mut state = example();
        assert!(state.validate().is_ok());
        state.services[1].backends.push(BackendSpec {
            weight: 0,
            ..BackendSpec::new(Ipv4Addr::new(10, 0, 0, 9))
        });
        let err = state.validate().unwrap_err();
        assert_eq!(err.field(), Some("services[1].backends[0].weight"));
        state.services[1].backends[0].weight = 1;
        state.services[0].port = 0;
        assert_eq!(
            state.validate().unwrap_err().to_string(),
            "services[0].port: must be between 1 and 65535, got 0"
        );
    }
}
