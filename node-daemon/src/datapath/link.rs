//! TCX links pinned on bpffs: the one way every program of the datapath is put on an interface.
//!
//! A link is pinned at a path of its own (`links/ingress-<ifindex>`, `links/guest-<slot>-pod`,
//! ...). Attaching when the pin exists (a restarted daemon, a repeated ADD) switches the pinned
//! link to the new program with `bpf_link_update`: the interface never runs without a program,
//! and the pin keeps naming the same link, so nothing is re-pinned and a crash at any point
//! leaves either the old program or the new one attached.

use std::{io, path::Path};

use anyhow::{Context, Result};
use aya::{
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        links::{FdLink, LinkError, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
    },
    sys::SyscallError,
};

/// What [`attach`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attached {
    /// A new link, now pinned.
    Created,
    /// The pinned link now runs this program.
    Swapped,
}

fn is_not_found(e: &LinkError) -> bool {
    matches!(e, LinkError::SyscallError(SyscallError { io_error, .. }) if io_error.kind() == io::ErrorKind::NotFound)
}

/// Puts `prog` on `hook` of `ifname` (resolved in the calling thread's network namespace), first
/// in its TCX chain, and pins the link at `pin`; when `pin` already holds a link, switches that
/// link to `prog` instead.
///
/// First in the chain so that a primary CNI's or kube-proxy's own program sees the packet after
/// the rewrite (ours returns "next" for everything it does not own, and after a rewrite).
pub fn attach(
    prog: &mut SchedClassifier,
    ifname: &str,
    hook: TcAttachType,
    pin: &Path,
) -> Result<Attached> {
    match PinnedLink::from_pin(pin) {
        Ok(old) => {
            let link = SchedClassifierLink::try_from(FdLink::from(old))
                .with_context(|| format!("{} is not a tc link", pin.display()))?;
            let id = prog
                .attach_to_link(link)
                .with_context(|| format!("switching the link at {}", pin.display()))?;
            // Our fd on the link goes; the pin keeps it.
            drop(prog.take_link(id)?);
            Ok(Attached::Swapped)
        }
        Err(e) if is_not_found(&e) => {
            let id = prog
                .attach_with_options(ifname, hook, TcAttachOptions::TcxOrder(LinkOrder::first()))
                .with_context(|| format!("attaching to {ifname}"))?;
            let link: FdLink = prog.take_link(id)?.try_into()?;
            link.pin(pin)
                .with_context(|| format!("pinning the link at {}", pin.display()))?;
            Ok(Attached::Created)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", pin.display())),
    }
}

/// Removes the link pinned at `pin`, which detaches its program once nobody else holds the link.
/// Returns whether there was one; a missing pin (never attached, or removed already) is success,
/// and so is the pin of a link whose interface is gone (the kernel released the link already).
pub fn remove(pin: &Path) -> Result<bool> {
    match PinnedLink::from_pin(pin) {
        Ok(link) => {
            // Dropping the last reference releases the link.
            drop(link.unpin().context("unpinning the link")?);
            Ok(true)
        }
        Err(e) if is_not_found(&e) => Ok(false),
        Err(e) => Err(e).with_context(|| format!("reading {}", pin.display())),
    }
}
