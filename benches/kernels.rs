//! Kernel micro-benchmarks on the CPU backend: `tuneloop bench --kernels --backend cpu`
//! as a cargo bench. Each op at a model's shapes against its floor (FLOPs at the GEMM
//! rate or bytes at the bandwidth measured here). `cargo bench --bench kernels`
//! (optionally `-- PRESET SEQ BATCH`). On a GPU: `tuneloop bench --kernels --backend cuda`.

mod common;

use tuneloop::bench::kernels::run_kernels;
use tuneloop::bench::{BenchOptions, ModelSource};
use tuneloop::ops::cpu::CpuOps;

fn main() -> anyhow::Result<()> {
    let args = common::positional();
    let arg = |i: usize, default: usize| common::number(&args, i, default);
    let name = args.first().map(String::as_str).unwrap_or("smollm2-135m");
    let opts = BenchOptions {
        seq: arg(1, 256)?,
        batch: arg(2, 2)?,
        steps: 3,
        ..BenchOptions::new(ModelSource::Preset(name.to_string()))
    };
    print!("{}", run_kernels(&CpuOps, &opts)?.markdown());
    Ok(())
}
