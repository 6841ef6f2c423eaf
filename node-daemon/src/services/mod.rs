//! The Service path: a source of desired states (a state file, or Services and EndpointSlices),
//! the reconciler that keeps the datapath's Service maps equal to it, and what the read views
//! need to know about what is programmed.
//!
//! ```text
//! source (file | endpointslice) --watch--> run_reconciler --maps--> datapath
//!                                               |
//!                                               +--> Services: snapshot + status (views, /healthz)
//! ```
//! Only the reconciler task writes the Service maps, and it owns the [`Reconciler`]; nobody waits
//! for it. Readers take the last [`Programmed`] snapshot, which is swapped in after each apply.

pub mod endpointslice;
pub mod health;
pub mod maglev;
pub mod reconcile;
pub mod source;

use std::sync::{Arc, Mutex, RwLock};

use anyhow::{Context, Result};
use tapestry_api::state::DesiredState;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::datapath::Maps;
use reconcile::{Programmed, Reconciler};
use source::SourceStatus;

/// How the Service path is doing.
#[derive(Debug, Clone, Default)]
pub struct ServiceStatus {
    /// Desired states fully programmed since start.
    pub generation: u64,
    pub source: SourceStatus,
    /// The last desired state the reconciler could not program, and why.
    pub apply_error: Option<String>,
    /// Health check ports (`healthCheckNodePort`) that could not be opened, and why.
    pub health_check_error: Option<String>,
}

/// The Service side as the rest of the daemon sees it: what is programmed and how it went.
/// Every lock here is held only to copy an `Arc` or a small struct.
#[derive(Debug, Default)]
pub struct Services {
    programmed: RwLock<Arc<Programmed>>,
    status: Mutex<ServiceStatus>,
}

impl Services {
    pub fn new(programmed: Programmed, source: String) -> Self {
        Services {
            programmed: RwLock::new(Arc::new(programmed)),
            status: Mutex::new(ServiceStatus {
                source: SourceStatus {
                    source,
                    ..SourceStatus::default()
                },
                ..ServiceStatus::default()
            }),
        }
    }

    /// What is programmed now.
    pub fn programmed(&self) -> Arc<Programmed> {
        self.programmed
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn status(&self) -> ServiceStatus {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Live when a desired state is programmed, or when the source has published none yet (the
    /// adopted datapath is serving): not when the source has a state the datapath lacks.
    pub fn healthy(&self) -> bool {
        let s = self.status();
        s.generation > 0 || s.source.generation == 0
    }

    pub fn set_health_check_error(&self, error: Option<String>) {
        self.update_status(|s| s.health_check_error = error);
    }

    fn update_status(&self, f: impl FnOnce(&mut ServiceStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()));
    }

    fn publish(&self, programmed: Programmed) {
        *self.programmed.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(programmed);
    }
}

/// Programs every new desired state; records failures without touching the last good state.
/// Owns the reconciler and its map handles; applies run on a blocking thread (a large state is
/// hundreds of milliseconds of map writes).
pub async fn run_reconciler(
    services: Arc<Services>,
    reconciler: Reconciler,
    maps: Maps,
    mut updates: watch::Receiver<Arc<DesiredState>>,
    mut status: watch::Receiver<SourceStatus>,
) -> Result<()> {
    let mut owned = Some((reconciler, maps));
    let mut status_open = true;
    loop {
        tokio::select! {
            changed = updates.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                let desired = updates.borrow_and_update().clone();
                let (mut reconciler, mut maps) = owned.take().expect("returned after each apply");
                let (reconciler, maps, result, programmed) = tokio::task::spawn_blocking(move || {
                    let result = reconciler.apply(&mut maps, &desired);
                    let programmed = reconciler.snapshot();
                    (reconciler, maps, result.map(|_| desired.services.len()), programmed)
                })
                .await
                .context("the reconciler thread")?;
                owned = Some((reconciler, maps));
                services.publish(programmed);
                match result {
                    Ok(count) => services.update_status(|s| {
                        s.generation += 1;
                        s.apply_error = None;
                        if s.generation == 1 {
                            info!(services = count, "ready");
                        }
                    }),
                    Err(e) => {
                        let msg = format!("programming the desired state: {e:#}");
                        warn!("{msg}");
                        services.update_status(|s| s.apply_error = Some(msg));
                    }
                }
            }
            changed = status.changed(), if status_open => {
                if changed.is_err() {
                    status_open = false;
                    continue;
                }
                let s = status.borrow_and_update().clone();
                services.update_status(|st| st.source = s);
            }
        }
    }
}
