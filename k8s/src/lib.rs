//! Tapestry's Kubernetes API: the [`Guest`] custom resource (`tapestry.dev/v1alpha1`), its
//! generated CRD ([`crd`]), the [`names`] that the controller, the node daemon and the
//! manifests share, and what every program that talks to the API needs: a [`client()`] from a
//! kubeconfig, a [`delete_unless_replaced`], and the [`duration`] grammar of Kubernetes flags.

pub mod client;
pub mod delete;
pub mod duration;
pub mod guest;
pub mod names;

pub use client::{ClientError, client};
pub use delete::delete_unless_replaced;

pub use guest::{
    ConditionStatus, Guest, GuestCondition, GuestConditionType, GuestMigration, GuestPodRef,
    GuestPort, GuestReadinessProbe, GuestSpec, GuestStatus, MigrationPhase, Protocol, crd,
    crd_yaml,
};
