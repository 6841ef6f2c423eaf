//! `tapestry`: a node's Tapestry datapath from the command line (also `kubectl tapestry`).
//!
//! The binary (src/main.rs) parses arguments and dispatches; each command in [`commands`] fetches
//! what it shows from tapestryd's local API and renders it with [`output`]. Rendering functions
//! take API values and return text, so layouts are tested without a daemon.

use std::{io::IsTerminal, path::PathBuf};

use tapestry_api::client::{ClientError, blocking::Client};

pub mod commands;
pub mod output;

pub use output::{Format, Render};

/// What every command gets: the daemon's client and where the output goes.
#[derive(Clone, Debug)]
pub struct Ctx {
    pub client: Client,
    pub socket: PathBuf,
    pub render: Render,
}

impl Ctx {
    pub fn new(socket: impl Into<PathBuf>, render: Render) -> Ctx {
        let socket = socket.into();
        Ctx {
            client: Client::new(&socket),
            socket,
            render,
        }
    }

    /// Standard input is a terminal: a person can answer a question.
    pub fn interactive(&self) -> bool {
        std::io::stdin().is_terminal()
    }
}

/// The message for an error, with what to do about it when we know: the daemon is not running,
/// or its socket is not ours to open.
pub fn describe_error(e: &anyhow::Error) -> String {
    if let Some(ClientError::Unreachable { socket, source }) = e.downcast_ref::<ClientError>() {
        let socket = socket.display();
        let hint = match source.kind() {
            std::io::ErrorKind::PermissionDenied => "tapestryd's socket is only open to root: run \
                                                     this command as root (sudo), or point \
                                                     --socket at a socket you may open"
                .to_owned(),
            _ => format!(
                "is tapestryd running on this node? Start it with `tapestryd --state-file \
                 /etc/tapestry/state.yaml` (as root; its --socket defaults to {}), or point \
                 --socket (or TAPESTRY_SOCKET) at the socket it serves",
                tapestry_api::types::DEFAULT_SOCKET
            ),
        };
        return format!("cannot reach tapestryd at {socket}: {source}\n  hint: {hint}");
    }
    format!("{e:#}")
}
