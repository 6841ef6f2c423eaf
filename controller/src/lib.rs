//! tapestry-controller: EndpointSlices for the KVM guests that Services select.
//!
//! For every Service with a selector, the Guests in its namespace whose labels match get
//! endpoints in slices labelled `endpointslice.kubernetes.io/managed-by: tapestry-controller.tapestry.dev`,
//! beside the built-in controller's pod slices, with guest-level readiness. See
//! [`endpointslice`] for what a slice holds, [`controller`] for when it is written, [`leader`]
//! for how two replicas share the work.

pub mod controller;
pub mod endpointslice;
pub mod error;
pub mod index;
pub mod leader;
pub mod metrics;
pub mod trust;

pub use error::{Error, Result};
