//! The fuzz targets: one `pub fn(&[u8])` per parser of outside input. None may panic on any
//! input; an `Err` from the code under test is a fine answer. Where the code promises more (a
//! merged conflist holds our step exactly once, a DHCP answer is a frame to the asking guest, a
//! state file reads back equal), the target asserts it, so a broken promise is a crash too.
//!
//! Driven by `fuzz/` (cargo fuzz, `make fuzz`) and replayed over the committed corpus by
//! `tests/corpus.rs` in `cargo test`.
//!
//! The plugin's config, CNI_ARGS and result code are modules of the `tapestry-cni` binary, and
//! tapestryd's DHCP answerer is one file of a daemon that needs the eBPF build: those files are
//! compiled in here as they are, unchanged, with `#[path]`, so the fuzzer runs the very code the
//! binaries run without their heavy dependencies.

// `crate::error` and `crate::names` are what the plugin's modules name, so they sit at the root.
#[allow(dead_code)]
#[path = "../../cni-plugin/src/error.rs"]
mod error;
#[allow(dead_code)]
#[path = "../../cni-plugin/src/names.rs"]
mod names;

// tapestry-cni's own modules, compiled from its sources.
#[allow(dead_code)]
#[path = "../../cni-plugin/src/args.rs"]
mod args;
#[allow(dead_code)]
#[path = "../../cni-plugin/src/config.rs"]
mod config;
#[allow(dead_code)]
#[path = "../../cni-plugin/src/version.rs"]
mod version;

/// tapestryd's DHCP answerer, compiled from its source (node-daemon/src/guests/dhcp.rs).
#[allow(dead_code)]
#[path = "../../node-daemon/src/guests/dhcp.rs"]
mod dhcp;

mod cni;
mod daemon;

pub use cni::{cni_args, cni_config, conflist_merge};
pub use daemon::{GUEST_MAC, SERVER_MAC, api_request, dhcp_answer, endpoint_registry, state_file};

/// A fuzz target: takes any bytes, never panics.
pub type Target = fn(&[u8]);

/// Every target by name: the names of `fuzz/fuzz_targets/*.rs` and of the corpus directories.
pub const TARGETS: &[(&str, Target)] = &[
    ("cni_config", cni_config),
    ("cni_args", cni_args),
    ("conflist_merge", conflist_merge),
    ("dhcp_answer", dhcp_answer),
    ("state_file", state_file),
    ("endpoint_registry", endpoint_registry),
    ("api_request", api_request),
];
