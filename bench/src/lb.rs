//! Tapestry's side of the comparison: the same synthetic services as a `tapestryd` state file,
//! and what we read back from the daemon (peak memory, its own programming time).

use tapestry_api::state::{BackendSpec, DesiredState, ServiceSpec};

use crate::anchors::Service;

/// The desired state holding `services` (random backend selection, weight 1, as kube-proxy's
/// equal-probability rules).
pub fn desired_state(services: &[Service]) -> DesiredState {
    DesiredState {
        services: services
            .iter()
            .map(|s| {
                let mut spec = ServiceSpec::new(&s.name, s.vip, s.port);
                spec.backends = s
                    .backends
                    .iter()
                    .map(|&(ip, port)| {
                        let mut b = BackendSpec::new(ip);
                        b.port = Some(port);
                        b
                    })
                    .collect();
                spec
            })
            .collect(),
    }
}

/// `VmHWM` (peak resident set) of a process, in MiB.
pub fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

/// The daemon's own figures from its log lines `programmed N services, M backends in X ms`:
/// `(N, M, X)` of every such line, in order.
pub fn programmed_lines(log: &str) -> Vec<(u64, u64, f64)> {
    log.lines()
        .filter_map(|line| {
            let rest = &line[line.find("programmed ")? + "programmed ".len()..];
            let (n, rest) = rest.split_once(" services, ")?;
            let (m, rest) = rest.split_once(" backends in ")?;
            let (ms, _) = rest.split_once(" ms")?;
            Some((
                n.trim().parse().ok()?,
                m.trim().parse().ok()?,
                ms.trim().parse().ok()?,
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn state_is_valid_and_keeps_ports() {
        let s = crate::anchors::services(
            3,
            10,
            Ipv4Addr::new(10, 240, 0, 3),
            &[8080, 8081, 8082, 8083, 8084, 8085, 8086, 8087, 8088, 8089],
        )
        .unwrap();
        let st = desired_state(&s);
        st.validate().unwrap();
        assert_eq!(st.services.len(), 3);
        assert_eq!(st.services[2].backends[9].port, Some(8089));
        let back = tapestry_api::state::parse(&st.to_yaml(), None).unwrap();
        assert_eq!(back, st);
    }

    #[test]
    fn parses_programmed_lines() {
        let log = "2025-01-01T00:00:00Z  INFO tapestry: programmed 10000 services, 100000 backends in 1234.5 ms services=10000\nother\n";
        assert_eq!(programmed_lines(log), vec![(10000, 100000, 1234.5)]);
    }
}
