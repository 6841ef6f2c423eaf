//! Tapestry's Kubernetes API: the [`Guest`] custom resource (`tapestry.dev/v1alpha1`), its
//! generated CRD ([`crd`]), and the [`names`] that the controller, the node daemon and the
//! manifests share.

pub mod guest;
pub mod names;

pub use guest::{
    ConditionStatus, Guest, GuestCondition, GuestConditionType, GuestPodRef, GuestPort, GuestSpec,
    GuestStatus, Protocol, crd, crd_yaml,
};
