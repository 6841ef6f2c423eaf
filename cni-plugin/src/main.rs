//! tapestry-cni: the chained CNI plugin that registers every pod with tapestryd and gives VM pods
//! their tap.
//!
//! The runtime runs it with CNI_COMMAND and the other CNI_* variables set and the network config
//! on stdin (SPEC.md, section 2). It prints a result or nothing on success, and the spec's error
//! object with exit status 1 on failure. Nothing else is needed to drive it: `TAPESTRY_SOCKET`
//! overrides the daemon's socket, for tests.

mod args;
mod commands;
mod config;
mod error;
mod guest;
mod interface;
mod names;
mod netns;
mod tap;
#[cfg(test)]
mod testnet;
mod version;

use std::{
    io::{IsTerminal, Read, Write},
    path::PathBuf,
    process::ExitCode,
};

use serde_json::Value;

use crate::{
    args::CniArgs,
    commands::{Attachment, Network},
    config::{NetConf, valid_cni_name, validate_ifname},
    error::{CniError, Result},
    version::{CniVersion, LATEST},
};

fn main() -> ExitCode {
    let env = Env::from_lookup(|key| std::env::var(key).ok());
    if env.command.is_none() {
        // As the reference skel does when run by hand: say what this is.
        eprintln!(
            "CNI plugin {} v{}\nCNI protocol versions supported: {}",
            names::PLUGIN_TYPE,
            env!("CARGO_PKG_VERSION"),
            version::supported_strings().join(", ")
        );
        return ExitCode::SUCCESS;
    }
    let mut answer_version = LATEST.as_str().to_owned();
    let outcome = dispatch(&env, &mut answer_version, read_stdin);
    let mut stdout = std::io::stdout().lock();
    match outcome {
        Ok(Some(result)) => {
            let text = serde_json::to_string_pretty(&result).expect("results serialize");
            let _ = writeln!(stdout, "{text}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(code = err.code(), "{err}");
            let spec = err.to_spec(&answer_version);
            let text = serde_json::to_string_pretty(&spec).expect("errors serialize");
            let _ = writeln!(stdout, "{text}");
            ExitCode::FAILURE
        }
    }
}

/// The most the plugin reads from stdin. A network config with its prevResult is a few KiB;
/// 1 MiB is also what a Kubernetes ConfigMap (where conflists often come from) can hold. A
/// runtime, or anything else, writing more gets a decoding error instead of a plugin growing
/// without bound.
const MAX_STDIN_BYTES: usize = 1 << 20;

fn read_stdin(command: Command) -> Result<Vec<u8>> {
    let stdin = std::io::stdin().lock();
    // VERSION may come without a config; never wait on a terminal for one.
    if command == Command::Version && stdin.is_terminal() {
        return Ok(Vec::new());
    }
    read_capped(stdin)
}

/// All of `input` if it holds at most [`MAX_STDIN_BYTES`]; reads one byte more to tell.
fn read_capped(input: impl Read) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    input
        .take(MAX_STDIN_BYTES as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(CniError::Io)?;
    if buf.len() > MAX_STDIN_BYTES {
        return Err(CniError::StdinTooLarge {
            limit: MAX_STDIN_BYTES,
        });
    }
    Ok(buf)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

impl Command {
    fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            other => {
                return Err(CniError::InvalidEnv {
                    var: "CNI_COMMAND",
                    msg: format!(
                        "unknown command {other:?}: expected ADD, DEL, CHECK, STATUS, GC or VERSION"
                    ),
                });
            }
        })
    }

    fn name(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Version => "VERSION",
            Command::Status => "STATUS",
            Command::Gc => "GC",
        }
    }
}

/// The CNI_* environment, as read; an empty variable counts as unset.
#[derive(Debug, Clone, Default)]
pub struct Env {
    pub command: Option<String>,
    pub container_id: Option<String>,
    pub netns: Option<String>,
    pub ifname: Option<String>,
    pub args: Option<String>,
    /// Where the runtime's plugins are; this plugin delegates to none, so it is not required.
    pub path: Option<String>,
    pub socket: Option<String>,
}

impl Env {
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Self {
        let get = |key: &str| lookup(key).filter(|v| !v.is_empty());
        Env {
            command: get("CNI_COMMAND"),
            container_id: get("CNI_CONTAINERID"),
            netns: get("CNI_NETNS"),
            ifname: get("CNI_IFNAME"),
            args: get("CNI_ARGS"),
            path: get("CNI_PATH"),
            socket: get(names::SOCKET_ENV),
        }
    }
}

/// Everything between the process edge and the commands: env and stdin checks, config and
/// version negotiation, then one command. `answer_version` is set to the version errors should
/// carry as soon as the config names one.
fn dispatch(
    env: &Env,
    answer_version: &mut String,
    stdin: impl FnOnce(Command) -> Result<Vec<u8>>,
) -> Result<Option<Value>> {
    let command = Command::parse(env.command.as_deref().unwrap_or(""))?;
    check_env(command, env)?;
    let input = stdin(command)?;

    // Errors answer in the config's version, even when the rest of the config is wrong.
    let requested = serde_json::from_slice::<Value>(&input)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_owned))
        .filter(|v| !v.is_empty());
    if command == Command::Version {
        return Ok(Some(version::version_info(requested.as_deref())));
    }
    if let Some(v) = &requested {
        answer_version.clone_from(v);
    }

    let conf = NetConf::parse(&input)?;
    init_logging(&conf);
    let version = version::negotiate(conf.cni_version.as_deref())?;
    let socket = conf.socket(env.socket.clone());
    tracing::debug!(
        command = command.name(),
        %version,
        container = env.container_id.as_deref().unwrap_or(""),
        ifname = env.ifname.as_deref().unwrap_or(""),
        netns = env.netns.as_deref().unwrap_or(""),
        socket = %socket.display(),
        cni_path = env.path.as_deref().unwrap_or(""),
        "invoked"
    );

    match command {
        Command::Add | Command::Del | Command::Check => {
            if command == Command::Check && !version.allows_check() {
                return Err(not_allowed("CHECK", version, "0.4.0"));
            }
            let attachment = Attachment {
                container_id: env.container_id.clone().unwrap_or_default(),
                ifname: env.ifname.clone().unwrap_or_default(),
                netns: env.netns.as_ref().map(PathBuf::from),
                args: CniArgs::parse(env.args.as_deref().unwrap_or(""))?,
                conf,
                version,
                socket,
            };
            match command {
                Command::Add => commands::add::add(&attachment).map(Some),
                Command::Del => commands::del::del(&attachment).map(|()| None),
                _ => commands::check::check(&attachment).map(|()| None),
            }
        }
        Command::Status | Command::Gc => {
            if !version.allows_status_and_gc() {
                return Err(not_allowed(command.name(), version, "1.1.0"));
            }
            let network = Network { conf, socket };
            match command {
                Command::Status => commands::status::status(&network),
                _ => commands::gc::gc(&network),
            }
            .map(|()| None)
        }
        Command::Version => unreachable!("answered above"),
    }
}

/// The variables each command needs, as the reference skel requires them.
fn check_env(command: Command, env: &Env) -> Result<()> {
    let attachment = matches!(command, Command::Add | Command::Del | Command::Check);
    let mut missing = Vec::new();
    if attachment && env.container_id.is_none() {
        missing.push("CNI_CONTAINERID");
    }
    if matches!(command, Command::Add | Command::Check) && env.netns.is_none() {
        missing.push("CNI_NETNS");
    }
    if attachment && env.ifname.is_none() {
        missing.push("CNI_IFNAME");
    }
    if !missing.is_empty() {
        return Err(CniError::InvalidEnv {
            var: if missing.len() == 1 {
                missing[0]
            } else {
                "CNI_*"
            },
            msg: format!(
                "required variables [{}] missing for {}",
                missing.join(","),
                command.name()
            ),
        });
    }
    if !attachment {
        return Ok(());
    }
    // Both end up in the daemon's URL path: hold them to the reference library's rules.
    if let Some(id) = &env.container_id
        && !valid_cni_name(id)
    {
        return Err(CniError::InvalidEnv {
            var: "CNI_CONTAINERID",
            msg: format!(
                "invalid characters in {id:?}: letters, digits, `_`, `.` and `-` only, starting \
                 with a letter or digit"
            ),
        });
    }
    if let Some(ifname) = &env.ifname
        && let Err(why) = validate_ifname(ifname)
    {
        return Err(CniError::InvalidEnv {
            var: "CNI_IFNAME",
            msg: format!("{ifname:?} is not a valid interface name: {why}"),
        });
    }
    Ok(())
}

fn not_allowed(command: &str, version: CniVersion, since: &str) -> CniError {
    CniError::IncompatibleVersion {
        msg: format!("config version does not allow {command}"),
        details: format!(
            "{command} exists from CNI {since} on; the network config has cniVersion {version}"
        ),
    }
}

fn init_logging(conf: &NetConf) {
    // stderr is for logs (SPEC.md section 5); stdout carries only the result or the error.
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false)
        .with_max_level(conf.log_level.as_tracing())
        .try_init();
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use serde_json::json;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Env {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Env::from_lookup(|k| map.get(k).cloned())
    }

    fn run(pairs: &[(&str, &str)], stdin: Value) -> (Result<Option<Value>>, String) {
        let mut answer = LATEST.as_str().to_owned();
        let input = serde_json::to_vec(&stdin).unwrap();
        let out = dispatch(&env(pairs), &mut answer, move |_| Ok(input));
        (out, answer)
    }

    fn attachment_env(command: &str) -> Vec<(&str, &str)> {
        vec![
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", "c0ffee"),
            ("CNI_NETNS", "/run/netns/tapestry-no-such-ns"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/usr/lib/cni"),
            // Nothing listens here: daemon calls fail as unreachable.
            ("TAPESTRY_SOCKET", "/nonexistent/tapestryd.sock"),
        ]
    }

    #[test]
    fn version_lists_supported_versions_without_a_config() {
        let mut answer = String::new();
        let out = dispatch(&env(&[("CNI_COMMAND", "VERSION")]), &mut answer, |_| {
            Ok(Vec::new())
        })
        .unwrap()
        .unwrap();
        assert_eq!(out["cniVersion"], "1.1.0");
        assert_eq!(
            out["supportedVersions"],
            json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
        );
        let (out, _) = run(
            &[("CNI_COMMAND", "VERSION")],
            json!({"cniVersion": "0.3.1"}),
        );
        assert_eq!(out.unwrap().unwrap()["cniVersion"], "0.3.1");
    }

    #[test]
    fn stdin_is_read_up_to_its_limit() {
        let at_limit = vec![b' '; MAX_STDIN_BYTES];
        assert_eq!(read_capped(&at_limit[..]).unwrap().len(), MAX_STDIN_BYTES);
        let over = vec![b' '; MAX_STDIN_BYTES + 1];
        let err = read_capped(&over[..]).unwrap_err();
        assert_eq!(err.code(), 6, "{err}");
        assert_eq!(
            err.to_string(),
            "the network config on stdin is larger than 1048576 bytes: not reading it"
        );
        // An endless stdin ends the read too.
        let err = read_capped(std::io::repeat(b'{')).unwrap_err();
        assert_eq!(err.code(), 6, "{err}");
    }

    #[test]
    fn unknown_command_is_invalid_env() {
        let (out, _) = run(&[("CNI_COMMAND", "UP")], json!({}));
        let err = out.unwrap_err();
        assert_eq!(err.code(), 4);
        assert!(err.to_string().contains("CNI_COMMAND"));
    }

    #[test]
    fn missing_variables_are_named() {
        let (out, _) = run(
            &[("CNI_COMMAND", "ADD"), ("CNI_IFNAME", "eth0")],
            json!({"cniVersion": "1.0.0", "name": "n"}),
        );
        let err = out.unwrap_err();
        assert_eq!(err.code(), 4);
        let msg = err.to_string();
        assert!(
            msg.contains("CNI_CONTAINERID") && msg.contains("CNI_NETNS"),
            "{msg}"
        );

        // DEL needs no netns.
        let (out, _) = run(
            &[
                ("CNI_COMMAND", "DEL"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_NETNS", ""),
            ],
            json!({"cniVersion": "1.0.0", "name": "n"}),
        );
        assert!(out.unwrap_err().to_string().contains("[CNI_CONTAINERID]"));
    }

    #[test]
    fn bad_container_id_and_ifname_are_refused() {
        let mut e = attachment_env("ADD");
        e[1] = ("CNI_CONTAINERID", "../etc");
        let (out, _) = run(&e, json!({"cniVersion": "1.0.0", "name": "n"}));
        assert!(out.unwrap_err().to_string().contains("CNI_CONTAINERID"));
        // The reference library's ValidateInterfaceName: empty (here: unset), longer than 15
        // bytes, `.` or `..`, `/`, `:` or whitespace.
        for bad in [
            "eth0/1",
            "",
            "0123456789abcdef",
            ".",
            "..",
            "eth0:1",
            "eth 0",
            "eth0\t",
        ] {
            for command in ["ADD", "DEL", "CHECK"] {
                let mut e = attachment_env(command);
                e[3] = ("CNI_IFNAME", bad);
                let (out, _) = run(&e, json!({"cniVersion": "1.0.0", "name": "n"}));
                let err = out.unwrap_err();
                assert_eq!(err.code(), 4, "{command} {bad:?}: {err}");
                assert!(err.to_string().contains("CNI_IFNAME"), "{bad:?}: {err}");
            }
        }
    }

    #[test]
    fn unsupported_config_version_is_code_1_in_the_configs_version() {
        let (out, answer) = run(
            &attachment_env("ADD"),
            json!({"cniVersion": "0.2.0", "name": "n"}),
        );
        let err = out.unwrap_err();
        assert_eq!(err.code(), 1);
        assert_eq!(answer, "0.2.0");
        assert!(err.to_spec(&answer).details.contains("0.2.0"));
    }

    #[test]
    fn check_needs_0_4_0() {
        for v in ["0.3.0", "0.3.1"] {
            let (out, answer) = run(
                &attachment_env("CHECK"),
                json!({"cniVersion": v, "name": "n", "prevResult": {}}),
            );
            let err = out.unwrap_err();
            assert_eq!(err.code(), 1, "{v}");
            assert_eq!(err.to_string(), "config version does not allow CHECK");
            assert_eq!(answer, v);
        }
    }

    #[test]
    fn status_and_gc_need_1_1_0() {
        for command in ["STATUS", "GC"] {
            for v in ["0.3.1", "0.4.0", "1.0.0"] {
                let (out, _) = run(
                    &[("CNI_COMMAND", command)],
                    json!({"cniVersion": v, "name": "n"}),
                );
                let err = out.unwrap_err();
                assert_eq!(err.code(), 1, "{command} {v}");
                assert!(err.to_string().contains(command));
            }
        }
    }

    #[test]
    fn add_without_prev_result_says_to_chain_the_plugin() {
        let (out, _) = run(
            &attachment_env("ADD"),
            json!({"cniVersion": "1.0.0", "name": "n", "type": "tapestry-cni"}),
        );
        let err = out.unwrap_err();
        assert_eq!(err.code(), 7);
        assert!(
            err.to_string()
                .contains("tapestry-cni must be chained after a primary plugin"),
            "{err}"
        );
    }

    #[test]
    fn config_errors_surface_before_any_work() {
        let (out, _) = run(&attachment_env("ADD"), json!({"cniVersion": "1.0.0"}));
        assert_eq!(out.unwrap_err().code(), 7);
        let mut answer = String::new();
        let out = dispatch(&env(&attachment_env("ADD")), &mut answer, |_| {
            Ok(b"not json".to_vec())
        });
        assert_eq!(out.unwrap_err().code(), 6);
        let mut e = attachment_env("ADD");
        e.push(("CNI_ARGS", "K8S_POD_NAME=a;FOO=1"));
        let (out, _) = run(
            &e,
            json!({"cniVersion": "1.0.0", "name": "n", "prevResult": fixtures_bridge()}),
        );
        assert_eq!(out.unwrap_err().code(), 4);
    }

    fn fixtures_bridge() -> Value {
        version::tests::bridge_1_0_0()
    }

    #[test]
    fn del_with_nothing_left_succeeds() {
        // No prevResult, no netns, no daemon: DEL still succeeds.
        let mut e = attachment_env("DEL");
        e[2] = ("CNI_NETNS", "");
        let (out, _) = run(&e, json!({"cniVersion": "1.0.0", "name": "n"}));
        assert_eq!(out.unwrap(), None);
        // A netns that is gone, with prevResult and a VM network: still success.
        let (out, _) = run(
            &attachment_env("DEL"),
            json!({"cniVersion": "0.3.1", "name": "n", "vm": {"enabled": true},
                   "prevResult": version::tests::calico_0_3_1()}),
        );
        assert_eq!(out.unwrap(), None);
    }

    #[test]
    fn add_with_daemon_down_or_netns_gone_fails_cleanly() {
        let (out, _) = run(
            &attachment_env("ADD"),
            json!({"cniVersion": "1.0.0", "name": "n", "prevResult": fixtures_bridge()}),
        );
        // The netns does not exist: the container is gone.
        assert_eq!(out.unwrap_err().code(), 3);
    }

    #[test]
    fn status_with_daemon_down_is_code_50_and_gc_is_try_again() {
        let e = [
            ("CNI_COMMAND", "STATUS"),
            ("TAPESTRY_SOCKET", "/nonexistent/tapestryd.sock"),
        ];
        let (out, _) = run(&e, json!({"cniVersion": "1.1.0", "name": "n"}));
        let err = out.unwrap_err();
        assert_eq!(err.code(), 50);
        assert!(
            err.to_string().contains("/nonexistent/tapestryd.sock"),
            "{err}"
        );

        let e = [
            ("CNI_COMMAND", "GC"),
            ("TAPESTRY_SOCKET", "/nonexistent/tapestryd.sock"),
        ];
        let (out, _) = run(
            &e,
            json!({"cniVersion": "1.1.0", "name": "n",
                   "cni.dev/valid-attachments": [{"containerID": "a", "ifname": "eth0"}]}),
        );
        assert_eq!(out.unwrap_err().code(), 11);
        let (out, _) = run(&e, json!({"cniVersion": "1.1.0", "name": "n"}));
        assert_eq!(out.unwrap_err().code(), 7);
    }

    #[test]
    fn check_with_daemon_down_is_try_again() {
        let (out, _) = run(
            &attachment_env("CHECK"),
            json!({"cniVersion": "1.0.0", "name": "n", "prevResult": fixtures_bridge()}),
        );
        assert_eq!(out.unwrap_err().code(), 11);
        let (out, _) = run(
            &attachment_env("CHECK"),
            json!({"cniVersion": "1.0.0", "name": "n"}),
        );
        assert_eq!(out.unwrap_err().code(), 7);
    }
}
