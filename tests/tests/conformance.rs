//! Upstream conformance in `make test`: the `[Conformance]` specs among Kubernetes'
//! sig-network Service e2e specs (tests/src/conformance.rs: the focus and skips, the images, the
//! report), against the real node with Tapestry installed by its chart and the cluster DNS
//! answering through it. `make conformance` runs every Service spec.
//!
//! Needs root, `scripts/setup.sh` (containerd, the Kubernetes binaries, scripts/build-e2e.sh)
//! and `make images`; under `CI=...` a missing prerequisite fails the test.

use std::time::Duration;

use anyhow::Result;
use tapestry_tests::conformance::{self, E2e, RunOptions};
use tapestry_tests::node::{self, Node};

#[test]
fn upstreams_conformance_service_specs_pass_with_tapestry_as_the_service_proxy() -> Result<()> {
    tapestry_tests::require_node!(Ok(()));
    if !tapestry_tests::prereq::available("conformance (Tapestry)", node::require_tapestry()) {
        return Ok(());
    }
    let e2e = E2e::build()?;
    let mut node = Node::start()?;
    let work = node.dir().join("e2e");
    let result = (|| {
        conformance::prepare(&node, &e2e, &[])?;
        conformance::run(
            &node,
            &e2e,
            &RunOptions {
                focus: conformance::CONFORMANCE_FOCUS,
                skip: conformance::SKIP,
                procs: 2,
                timeout: Duration::from_secs(20 * 60),
                out_dir: &work,
            },
        )
    })();
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            node.keep_logs();
            return Err(e);
        }
    };
    eprintln!(
        "{} specs run in {:.1} min: {} passed, {} failed, {} skipped themselves",
        report.run,
        report.seconds / 60.0,
        report.passed,
        report.failed,
        report.skipped
    );
    if report.failed > 0 {
        node.keep_logs();
    }
    // The focus selects about twenty specs; far fewer means the filter or the build went wrong.
    assert!(
        report.run >= 10,
        "only {} [Conformance] Service specs ran:\n{:#?}",
        report.run,
        report.specs
    );
    assert_eq!(
        report.failed,
        0,
        "[Conformance] Service specs failed (ginkgo's output: {}):\n{}",
        work.join("ginkgo.log").display(),
        report.failures()
    );
    Ok(())
}
