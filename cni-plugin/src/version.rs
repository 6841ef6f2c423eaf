//! CNI versions this plugin speaks, and the ADD result in each of them.
//!
//! Two result shapes exist among the supported versions, as in the reference library
//! (containernetworking/cni pkg/types/040 and pkg/types/100):
//! - 0.3.0, 0.3.1, 0.4.0: `ips[].version` ("4"/"6") is part of the result; interfaces carry
//!   name, mac and sandbox only.
//! - 1.0.0, 1.1.0: no `ips[].version`; interfaces may also carry mtu, socketPath and pciID.
//!
//! prevResult is read in its own version (the config's when it names none) and the result is
//! written in the config's version. Fields this plugin does not know are kept as they came
//! (`extra`), so a primary's additions survive the chain.

use std::{fmt, net::IpAddr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{CniError, Result};

/// Supported versions, oldest first: what VERSION reports.
pub const SUPPORTED: [CniVersion; 5] = [
    CniVersion::V0_3_0,
    CniVersion::V0_3_1,
    CniVersion::V0_4_0,
    CniVersion::V1_0_0,
    CniVersion::V1_1_0,
];

/// The newest version, used where no config version is known (VERSION, early errors).
pub const LATEST: CniVersion = CniVersion::V1_1_0;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CniVersion {
    V0_3_0,
    V0_3_1,
    V0_4_0,
    V1_0_0,
    V1_1_0,
}

impl CniVersion {
    pub fn as_str(self) -> &'static str {
        match self {
            CniVersion::V0_3_0 => "0.3.0",
            CniVersion::V0_3_1 => "0.3.1",
            CniVersion::V0_4_0 => "0.4.0",
            CniVersion::V1_0_0 => "1.0.0",
            CniVersion::V1_1_0 => "1.1.0",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        SUPPORTED.into_iter().find(|v| v.as_str() == s)
    }

    /// Results of 0.3.x and 0.4.0 carry `ips[].version`.
    pub fn has_ip_version_field(self) -> bool {
        self <= CniVersion::V0_4_0
    }

    /// CHECK exists from 0.4.0 on.
    pub fn allows_check(self) -> bool {
        self >= CniVersion::V0_4_0
    }

    /// STATUS and GC exist from 1.1.0 on.
    pub fn allows_status_and_gc(self) -> bool {
        self >= CniVersion::V1_1_0
    }
}

impl fmt::Display for CniVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

pub fn supported_strings() -> Vec<&'static str> {
    SUPPORTED.iter().map(|v| v.as_str()).collect()
}

/// The config's `cniVersion`, checked against what this plugin speaks. A config without one
/// means 0.1.0, as in the reference library.
pub fn negotiate(config_version: Option<&str>) -> Result<CniVersion> {
    let raw = config_version.unwrap_or("");
    CniVersion::parse(raw).ok_or_else(|| {
        let shown = if raw.is_empty() {
            "0.1.0 (none given)"
        } else {
            raw
        };
        CniError::IncompatibleVersion {
            msg: format!(
                "incompatible CNI versions: the network config has cniVersion {shown}; set it to \
                 one that tapestry-cni supports"
            ),
            details: format!(
                "config is {raw:?}, plugin supports {:?}",
                supported_strings()
            ),
        }
    })
}

/// The answer to VERSION.
pub fn version_info(input_version: Option<&str>) -> Value {
    // The spec echoes the input's cniVersion; without a usable one, answer as the reference
    // library does, with the newest.
    let version = input_version.and_then(CniVersion::parse).unwrap_or(LATEST);
    serde_json::json!({
        "cniVersion": version.as_str(),
        "supportedVersions": supported_strings(),
    })
}

/// An ADD result (also what prevResult holds), in a version-neutral form.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CniResult {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cni_version: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<Dns>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl CniResult {
    /// The addresses the primary gave the pod interface `ifname`: those pointing at the sandbox
    /// interface of that name, and those pointing at no interface (results such as Calico's).
    pub fn pod_ips(&self, ifname: &str) -> Vec<&IpConfig> {
        let points_at = |ip: &IpConfig, sandbox_only: bool| match ip.interface {
            None => true,
            Some(i) => self
                .interfaces
                .get(i)
                .is_some_and(|intf| intf.name == ifname && (intf.in_sandbox() || !sandbox_only)),
        };
        let strict: Vec<&IpConfig> = self.ips.iter().filter(|ip| points_at(ip, true)).collect();
        if !strict.is_empty() {
            return strict;
        }
        // Some primaries leave `sandbox` out of the container interface.
        self.ips.iter().filter(|ip| points_at(ip, false)).collect()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// 1.0.0+ only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    /// 1.0.0+ only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_path: Option<String>,
    /// 1.0.0+ only.
    #[serde(default, rename = "pciID", skip_serializing_if = "Option::is_none")]
    pub pci_id: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Interface {
    /// An interface inside the container (as opposed to a host interface).
    pub fn in_sandbox(&self) -> bool {
        self.sandbox.as_deref().is_some_and(|s| !s.is_empty())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpConfig {
    /// "4" or "6"; present in 0.3.x/0.4.0 results only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Index into `interfaces`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
    /// CIDR with the host bits kept ("10.22.0.5/16").
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl IpConfig {
    /// The address, validated when the result was parsed.
    pub fn network(&self) -> IpNet {
        self.address
            .parse()
            .expect("addresses are validated when the result is parsed")
    }
}

/// A route; mtu, advmss, priority, table and scope (1.1.0) pass through in `extra`, as the
/// reference library keeps them in every version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Route {
    pub dst: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Route {
    pub fn is_default(&self) -> bool {
        self.dst.parse::<IpNet>().is_ok_and(|n| n.prefix_len() == 0)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Reads a prevResult. Its `cniVersion` says which shape it has; without one it is taken to be
/// in the config's version (as the reference library's `ParsePrevResult` does).
pub fn parse_result(raw: &Value, config_version: CniVersion) -> Result<CniResult> {
    let mut result: CniResult =
        serde_json::from_value(raw.clone()).map_err(|source| CniError::Decode {
            what: "prevResult",
            source,
        })?;
    let version = match result.cni_version.as_deref() {
        None | Some("") => config_version,
        Some(v) => CniVersion::parse(v).ok_or_else(|| CniError::IncompatibleVersion {
            msg: format!(
                "incompatible CNI versions: prevResult has cniVersion {v:?}, which tapestry-cni \
                 does not read; the runtime should hand it over in the config's version \
                 ({config_version})"
            ),
            details: format!(
                "prevResult is {v:?}, plugin supports {:?}",
                supported_strings()
            ),
        })?,
    };
    result.cni_version = Some(version.as_str().to_owned());
    for (i, ip) in result.ips.iter().enumerate() {
        let net = parse_cidr(&ip.address).map_err(|e| {
            invalid_result(format!(
                "ips[{i}].address {:?} is not an address in CIDR notation: {e}",
                ip.address
            ))
        })?;
        if version.has_ip_version_field()
            && let Some(v) = ip.version.as_deref()
            && v != ip_version_of(&net)
        {
            return Err(invalid_result(format!(
                "ips[{i}].version is {v:?} but the address {} is IPv{}",
                ip.address,
                ip_version_of(&net)
            )));
        }
        if let Some(idx) = ip.interface
            && idx >= result.interfaces.len()
        {
            return Err(invalid_result(format!(
                "ips[{i}].interface is {idx} but the result lists {} interfaces",
                result.interfaces.len()
            )));
        }
    }
    for (i, route) in result.routes.iter().enumerate() {
        parse_cidr(&route.dst).map_err(|e| {
            invalid_result(format!(
                "routes[{i}].dst {:?} is not a CIDR: {e}",
                route.dst
            ))
        })?;
    }
    Ok(result)
}

/// `address/prefix`; a bare address is not taken as a /32.
pub fn parse_cidr(s: &str) -> std::result::Result<IpNet, String> {
    if !s.contains('/') {
        return Err("no /prefix".into());
    }
    s.parse().map_err(|e: ipnet::AddrParseError| e.to_string())
}

fn invalid_result(msg: String) -> CniError {
    CniError::InvalidConfig(format!(
        "prevResult is not a valid CNI result: {msg} (it comes from the plugin before \
         tapestry-cni in the chain)"
    ))
}

fn ip_version_of(net: &IpNet) -> &'static str {
    if matches!(net, IpNet::V4(_)) {
        "4"
    } else {
        "6"
    }
}

/// Writes a result in `version`'s shape.
pub fn encode_result(result: &CniResult, version: CniVersion) -> Value {
    let mut out = result.clone();
    out.cni_version = Some(version.as_str().to_owned());
    if version.has_ip_version_field() {
        // The address says which family it is; a version carried in from a result of another
        // version (1.0.0 does not define the field, so nothing checked it) is not trusted.
        for ip in &mut out.ips {
            ip.version = Some(ip_version_of(&ip.network()).to_owned());
        }
        // Fields 0.4.0 does not define, dropped as the reference library's down-conversion
        // does.
        for intf in &mut out.interfaces {
            intf.mtu = None;
            intf.socket_path = None;
            intf.pci_id = None;
        }
    } else {
        for ip in &mut out.ips {
            ip.version = None;
        }
    }
    serde_json::to_value(out).expect("a CNI result serializes")
}

#[cfg(test)]
pub(crate) mod tests {
    use serde_json::json;

    use super::*;

    /// Debian's bridge plugin v1.1.1 (containernetworking-plugins 1.1.1), cniVersion 1.0.0, as
    /// podman hands it to the next plugin.
    pub fn bridge_1_0_0() -> Value {
        json!({
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": "cni-podman1", "mac": "d2:6c:5a:e3:3a:60"},
                {"name": "veth2a4bc6a1", "mac": "3e:8d:2f:10:44:6d"},
                {"name": "eth0", "mac": "8a:7a:4c:0e:21:95", "sandbox": "/run/netns/cni-5e2f3a1b-7c4d-0a9e-11f2-8d6b0c3e4f5a"}
            ],
            "ips": [
                {"interface": 2, "address": "10.89.0.5/24", "gateway": "10.89.0.1"}
            ],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dns": {}
        })
    }

    /// The same bridge plugin at cniVersion 0.4.0: `ips[].version` present.
    pub fn bridge_0_4_0() -> Value {
        json!({
            "cniVersion": "0.4.0",
            "interfaces": [
                {"name": "cni0", "mac": "d2:6c:5a:e3:3a:60"},
                {"name": "veth2a4bc6a1", "mac": "3e:8d:2f:10:44:6d"},
                {"name": "eth0", "mac": "8a:7a:4c:0e:21:95", "sandbox": "/var/run/netns/cni-1"}
            ],
            "ips": [
                {"version": "4", "interface": 2, "address": "10.22.0.5/16", "gateway": "10.22.0.1"}
            ],
            "routes": [{"dst": "0.0.0.0/0", "gw": "10.22.0.1"}, {"dst": "10.96.0.0/12"}],
            "dns": {"nameservers": ["10.96.0.10"], "search": ["default.svc.cluster.local"]}
        })
    }

    /// Debian's ptp plugin v1.1.1 at cniVersion 0.3.1, as it printed it on this machine.
    pub fn ptp_0_3_1() -> Value {
        json!({
            "cniVersion": "0.3.1",
            "interfaces": [
                {"name": "vethffb04607", "mac": "1a:57:7d:1e:a4:64"},
                {"name": "eth0", "mac": "c6:5e:87:55:b7:39", "sandbox": "/run/netns/capt1"}
            ],
            "ips": [
                {"version": "4", "interface": 1, "address": "10.250.78.2/24", "gateway": "10.250.78.1"}
            ],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dns": {}
        })
    }

    /// Debian's ptp plugin v1.1.1 at cniVersion 1.0.0: host veth and container side only, a /32
    /// style gateway on the host side, dual stack.
    pub fn ptp_1_0_0() -> Value {
        json!({
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": "veth5b1d0c7e", "mac": "9e:1f:43:2a:b0:11"},
                {"name": "eth0", "mac": "4a:22:6e:91:0c:3d", "sandbox": "/run/netns/ptp-test"}
            ],
            "ips": [
                {"interface": 1, "address": "10.1.1.2/24", "gateway": "10.1.1.1"},
                {"interface": 1, "address": "fd00:10:1::2/64", "gateway": "fd00:10:1::1"}
            ],
            "routes": [{"dst": "0.0.0.0/0"}, {"dst": "10.244.0.0/16", "gw": "10.1.1.1"}],
            "dns": {}
        })
    }

    /// A Calico-like 0.3.1 result: only the container interface, ips without an interface
    /// index (no host-side interface to find the veth from).
    pub fn calico_0_3_1() -> Value {
        json!({
            "cniVersion": "0.3.1",
            "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/cni-abc"}],
            "ips": [{"version": "4", "address": "192.168.77.10/32"}],
            "dns": {}
        })
    }

    /// A 1.1.0 result with the fields 1.1.0 added and a field no version defines.
    pub fn result_1_1_0() -> Value {
        json!({
            "cniVersion": "1.1.0",
            "interfaces": [
                {"name": "veth0", "mac": "9e:1f:43:2a:b0:11", "mtu": 1450},
                {"name": "eth0", "mac": "4a:22:6e:91:0c:3d", "mtu": 1450, "sandbox": "/run/netns/x",
                 "socketPath": "/run/x.sock", "pciID": "0000:00:01.0", "vendorThing": 1}
            ],
            "ips": [{"interface": 1, "address": "10.1.1.2/24", "gateway": "10.1.1.1", "note": "kept"}],
            "routes": [{"dst": "0.0.0.0/0", "gw": "10.1.1.1", "mtu": 1400, "priority": 10, "table": 100, "scope": 0}],
            "dns": {"nameservers": ["10.96.0.10"], "options": ["ndots:5"]},
            "vendorTop": {"a": 1}
        })
    }

    /// What JSON equality of a round trip should compare: an empty dns object and a missing one
    /// mean the same.
    fn without_empty_dns(mut v: Value) -> Value {
        if v.get("dns") == Some(&json!({})) {
            v.as_object_mut().unwrap().remove("dns");
        }
        v
    }

    #[test]
    fn negotiation_accepts_every_supported_version_and_names_them_otherwise() {
        for v in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
            assert_eq!(negotiate(Some(v)).unwrap().as_str(), v);
        }
        for bad in [
            None,
            Some("0.2.0"),
            Some("0.1.0"),
            Some("2.0.0"),
            Some("1.0"),
        ] {
            let err = negotiate(bad).unwrap_err();
            assert_eq!(err.code(), 1, "{bad:?}");
            assert!(err.to_spec("1.1.0").details.contains("1.1.0"));
        }
    }

    #[test]
    fn version_answer_lists_the_supported_versions() {
        let v = version_info(Some("0.4.0"));
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(
            v["supportedVersions"],
            json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
        );
        assert_eq!(version_info(None)["cniVersion"], "1.1.0");
        assert_eq!(version_info(Some("0.2.0"))["cniVersion"], "1.1.0");
    }

    #[test]
    fn commands_by_version() {
        assert!(!CniVersion::V0_3_1.allows_check());
        assert!(CniVersion::V0_4_0.allows_check());
        assert!(!CniVersion::V1_0_0.allows_status_and_gc());
        assert!(CniVersion::V1_1_0.allows_status_and_gc());
    }

    #[test]
    fn every_fixture_round_trips_in_its_own_version() {
        for (fixture, version) in [
            (bridge_1_0_0(), CniVersion::V1_0_0),
            (bridge_0_4_0(), CniVersion::V0_4_0),
            (ptp_1_0_0(), CniVersion::V1_0_0),
            (ptp_0_3_1(), CniVersion::V0_3_1),
            (calico_0_3_1(), CniVersion::V0_3_1),
            (result_1_1_0(), CniVersion::V1_1_0),
        ] {
            let parsed = parse_result(&fixture, version).unwrap();
            assert_eq!(
                without_empty_dns(encode_result(&parsed, version)),
                without_empty_dns(fixture.clone()),
                "{version}"
            );
        }
    }

    #[test]
    fn bridge_result_reads_interfaces_ips_and_gateway() {
        let r = parse_result(&bridge_1_0_0(), CniVersion::V1_0_0).unwrap();
        assert_eq!(r.interfaces.len(), 3);
        assert!(!r.interfaces[0].in_sandbox());
        assert!(r.interfaces[2].in_sandbox());
        assert_eq!(r.ips[0].interface, Some(2));
        assert_eq!(r.ips[0].gateway, Some("10.89.0.1".parse().unwrap()));
        assert_eq!(r.ips[0].version, None);
        assert!(r.routes[0].is_default());
    }

    #[test]
    fn legacy_results_carry_the_ip_version_field() {
        let r = parse_result(&calico_0_3_1(), CniVersion::V0_3_1).unwrap();
        assert_eq!(r.ips[0].version.as_deref(), Some("4"));
        assert_eq!(r.ips[0].interface, None);
        let r = parse_result(&bridge_0_4_0(), CniVersion::V0_4_0).unwrap();
        assert_eq!(r.dns.as_ref().unwrap().nameservers, vec!["10.96.0.10"]);
    }

    #[test]
    fn up_conversion_drops_ip_version_and_down_conversion_adds_it() {
        let r = parse_result(&bridge_0_4_0(), CniVersion::V0_4_0).unwrap();
        let up = encode_result(&r, CniVersion::V1_0_0);
        assert_eq!(up["cniVersion"], "1.0.0");
        assert!(up["ips"][0].get("version").is_none());

        let r = parse_result(&ptp_1_0_0(), CniVersion::V1_0_0).unwrap();
        let down = encode_result(&r, CniVersion::V0_3_1);
        assert_eq!(down["cniVersion"], "0.3.1");
        assert_eq!(down["ips"][0]["version"], "4");
        assert_eq!(down["ips"][1]["version"], "6");
        // Converting back gives the original.
        let again = parse_result(&down, CniVersion::V0_3_1).unwrap();
        assert_eq!(
            without_empty_dns(encode_result(&again, CniVersion::V1_0_0)),
            without_empty_dns(ptp_1_0_0())
        );
    }

    /// What the fuzzer found (fuzz-targets/regressions/cni_config): a 1.0.0 result carrying an
    /// `ips[].version` (a field 1.0.0 does not define, so nothing checked it) written at 0.4.0
    /// or 0.3.x gets the version its address says, not the bogus one.
    #[test]
    fn down_conversion_writes_the_ip_version_the_address_has() {
        let mut raw = bridge_1_0_0();
        raw["ips"][0]["version"] = json!("5");
        let r = parse_result(&raw, CniVersion::V1_0_0).unwrap();
        for v in [CniVersion::V0_4_0, CniVersion::V0_3_1] {
            assert_eq!(encode_result(&r, v)["ips"][0]["version"], "4", "{v:?}");
        }
    }

    #[test]
    fn down_conversion_drops_fields_0_4_0_lacks_and_keeps_unknown_ones() {
        let r = parse_result(&result_1_1_0(), CniVersion::V1_1_0).unwrap();
        let down = encode_result(&r, CniVersion::V0_4_0);
        let eth0 = &down["interfaces"][1];
        assert!(eth0.get("mtu").is_none());
        assert!(eth0.get("socketPath").is_none());
        assert!(eth0.get("pciID").is_none());
        assert_eq!(eth0["vendorThing"], 1);
        assert_eq!(down["ips"][0]["note"], "kept");
        assert_eq!(down["routes"][0]["table"], 100);
        assert_eq!(down["vendorTop"], json!({"a": 1}));
        assert_eq!(down["dns"]["options"], json!(["ndots:5"]));
    }

    #[test]
    fn pod_ips_are_the_ones_on_the_container_interface() {
        let r = parse_result(&bridge_1_0_0(), CniVersion::V1_0_0).unwrap();
        let ips: Vec<&str> = r
            .pod_ips("eth0")
            .iter()
            .map(|i| i.address.as_str())
            .collect();
        assert_eq!(ips, vec!["10.89.0.5/24"]);
        assert!(r.pod_ips("net1").is_empty());

        let r = parse_result(&ptp_1_0_0(), CniVersion::V1_0_0).unwrap();
        assert_eq!(r.pod_ips("eth0").len(), 2);

        let r = parse_result(&calico_0_3_1(), CniVersion::V0_3_1).unwrap();
        let ips: Vec<&str> = r
            .pod_ips("eth0")
            .iter()
            .map(|i| i.address.as_str())
            .collect();
        assert_eq!(ips, vec!["192.168.77.10/32"]);

        // An address on a host interface is not the pod's.
        let mut host_ip = bridge_1_0_0();
        host_ip["ips"] = json!([
            {"interface": 0, "address": "10.89.0.1/24"},
            {"interface": 2, "address": "10.89.0.5/24"}
        ]);
        let r = parse_result(&host_ip, CniVersion::V1_0_0).unwrap();
        let ips: Vec<&str> = r
            .pod_ips("eth0")
            .iter()
            .map(|i| i.address.as_str())
            .collect();
        assert_eq!(ips, vec!["10.89.0.5/24"]);
    }

    #[test]
    fn prev_result_without_a_version_takes_the_configs() {
        let mut raw = calico_0_3_1();
        raw.as_object_mut().unwrap().remove("cniVersion");
        let r = parse_result(&raw, CniVersion::V0_3_1).unwrap();
        assert_eq!(r.cni_version.as_deref(), Some("0.3.1"));
    }

    #[test]
    fn broken_prev_results_are_refused_with_what_is_wrong() {
        let mut bad_addr = bridge_1_0_0();
        bad_addr["ips"][0]["address"] = json!("10.89.0.5");
        let err = parse_result(&bad_addr, CniVersion::V1_0_0).unwrap_err();
        assert_eq!(err.code(), 7);
        assert!(err.to_string().contains("ips[0].address"), "{err}");

        let mut bad_index = bridge_1_0_0();
        bad_index["ips"][0]["interface"] = json!(7);
        assert!(
            parse_result(&bad_index, CniVersion::V1_0_0)
                .unwrap_err()
                .to_string()
                .contains("ips[0].interface")
        );

        let mut wrong_family = bridge_0_4_0();
        wrong_family["ips"][0]["version"] = json!("6");
        assert_eq!(
            parse_result(&wrong_family, CniVersion::V0_4_0)
                .unwrap_err()
                .code(),
            7
        );

        let mut old = calico_0_3_1();
        old["cniVersion"] = json!("0.2.0");
        assert_eq!(
            parse_result(&old, CniVersion::V0_3_1).unwrap_err().code(),
            1
        );

        let not_an_object = json!(["eth0"]);
        assert_eq!(
            parse_result(&not_an_object, CniVersion::V1_0_0)
                .unwrap_err()
                .code(),
            6
        );
    }
}
