//! LoRA training step on the CPU backend, random weights of real small-model shapes:
//! `tuneloop bench --backend cpu` as a cargo bench. Prints tokens/s, model TFLOP/s, MFU,
//! peak memory and the time per op. `cargo bench --bench cpu_step`
//! (optionally `-- PRESET SEQ BATCH STEPS`).

mod common;

use tuneloop::bench::run;
use tuneloop::ops::cpu::CpuOps;

fn main() -> anyhow::Result<()> {
    print!("{}", run(&CpuOps, &common::options()?)?.markdown());
    Ok(())
}
