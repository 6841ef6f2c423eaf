//! `tapestry metrics`: the daemon's Prometheus metrics, as its /metrics endpoint serves them.

use anyhow::Result;

use crate::{Ctx, output};

#[derive(Clone, Debug, Default, clap::Args)]
#[command(after_help = "Examples:
  # Every metric (OpenMetrics text)
  {bin} metrics

  # Drops by reason
  {bin} metrics | grep tapestry_drops_total")]
pub struct MetricsArgs {}

pub fn run(ctx: &Ctx, _args: &MetricsArgs) -> Result<()> {
    output::print_flush(&ctx.client.metrics()?)
}
