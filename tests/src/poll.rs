//! Waiting in integration tests for something that happens eventually (a controller's write, a
//! server coming up).

use std::time::{Duration, Instant};

use anyhow::{Result, bail};

/// How long [`poll`] waits between two calls.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// Calls `f` every [`POLL_INTERVAL`] until it returns `Some`, and returns that value. An error
/// from `f` counts as "not yet" (a server still starting); after `timeout` the error names
/// `what` and the last error seen.
///
/// Harnesses keep their logs only when a test panics ([`crate::k8s::ControlPlane`]): unwrap the
/// result where a timeout should leave them for reading.
pub fn poll<T>(
    timeout: Duration,
    what: &str,
    mut f: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    let mut last_error = None;
    loop {
        match f() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_error = Some(e),
        }
        if Instant::now() > deadline {
            match last_error {
                Some(e) => {
                    bail!("timed out after {timeout:?} waiting for {what} (last error: {e:#})")
                }
                None => bail!("timed out after {timeout:?} waiting for {what}"),
            }
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_the_first_value_and_retries_errors() {
        let mut calls = 0;
        let v = poll(Duration::from_secs(5), "the third call", || {
            calls += 1;
            match calls {
                1 => bail!("not up yet"),
                2 => Ok(None),
                n => Ok(Some(n)),
            }
        })
        .unwrap();
        assert_eq!(v, 3);
    }

    #[test]
    fn a_timeout_names_what_and_the_last_error() {
        let mut calls = 0;
        let err = poll(
            Duration::from_millis(300),
            "nothing",
            || -> Result<Option<()>> {
                calls += 1;
                if calls == 1 {
                    bail!("refused")
                } else {
                    Ok(None)
                }
            },
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("timed out after 300ms waiting for nothing"),
            "{err}"
        );
        assert!(err.ends_with("(last error: refused)"), "{err}");
        let err = poll(Duration::ZERO, "nothing", || Ok(None::<()>)).unwrap_err();
        assert_eq!(err.to_string(), "timed out after 0ns waiting for nothing");
    }
}
