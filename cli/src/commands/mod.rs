//! One module per command; each has a `run` that talks to the daemon and a pure `render`
//! (`expose` talks to the Kubernetes API instead).

pub mod conntrack;
pub mod expose;
pub mod flows;
pub mod guest;
pub mod metrics;
pub mod service;
pub mod status;

/// "a, b, c", or "none" (for messages that list what exists).
pub(crate) fn list_or_none<'a>(names: impl IntoIterator<Item = &'a str>) -> String {
    let v: Vec<&str> = names.into_iter().filter(|n| !n.is_empty()).collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}
