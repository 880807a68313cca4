//! LoRA training step on the CPU backend, random weights of real small-model shapes:
//! `tuneloop bench --backend cpu` as a cargo bench. Prints tokens/s, model TFLOP/s, MFU,
//! peak memory and the time per op. `cargo bench --bench cpu_step`
//! (optionally `-- PRESET SEQ BATCH STEPS`).

mod common;

use tuneloop::bench::{run, BenchOptions, ModelSource};
use tuneloop::ops::cpu::CpuOps;

fn main() -> anyhow::Result<()> {
    let args = common::positional();
    let arg = |i: usize, default: usize| common::number(&args, i, default);
    let name = args.first().map(String::as_str).unwrap_or("smollm2-135m");
    let opts = BenchOptions {
        seq: arg(1, 256)?,
        batch: arg(2, 2)?,
        steps: arg(3, 3)?,
        warmup: 1,
        ..BenchOptions::new(ModelSource::Preset(name.to_string()))
    };
    print!("{}", run(&CpuOps, &opts)?.markdown());
    Ok(())
}
