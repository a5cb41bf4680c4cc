//! `rankfuse soak`: adapters swapped under load (the harness is soak/harness.rs, shared with
//! tests/soak.rs, which runs it for a few seconds).

mod harness;

use rankfuse::Result;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// The peft-tiny fixture folder (base.safetensors + adapters/lora-r8, rslora-pattern, lora-r64).
    #[arg(long, default_value = "tests/fixtures/peft-tiny")]
    fixture: PathBuf,
    /// Caller threads (default: the global --threads when given, else 8; the runtime's pool
    /// gets --threads as every subcommand does).
    #[arg(long)]
    callers: Option<usize>,
    /// How long to run.
    #[arg(long, default_value_t = 60.0)]
    seconds: f64,
    /// Microseconds between publishes.
    #[arg(long, default_value_t = 1000)]
    publish_us: u64,
}

/// `threads`: the global --threads (0 = not given).
pub fn run(threads: usize, a: &Args) -> Result<()> {
    let c = harness::Config {
        fixture: a.fixture.clone(),
        callers: a.callers.unwrap_or(if threads > 0 { threads } else { 8 }),
        seconds: a.seconds,
        publish_us: a.publish_us,
        runtime_threads: threads,
    };
    let r = harness::run(&c)?;
    println!(
        "soak: {} caller threads, {:.1} s: {r}",
        c.callers, c.seconds
    );
    Ok(())
}
