//! `cargo xtask bench` (placeholder until the benchmark lands).

use std::path::Path;

/// Benchmark options.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// A short run (under 3 minutes).
    #[arg(long)]
    pub quick: bool,
}

/// Runs the benchmark.
pub fn run(_root: &Path, _args: BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("the benchmark is not written yet")
}
