//! Kernel micro-benchmarks on the CPU backend: `tuneloop bench --kernels --backend cpu`
//! as a cargo bench. Each op at a model's shapes against its floor (FLOPs at the GEMM
//! rate or bytes at the bandwidth measured here). `cargo bench --bench kernels`
//! (optionally `-- PRESET SEQ BATCH`). On a GPU: `tuneloop bench --kernels --backend cuda`.

mod common;

use tuneloop::bench::kernels::run_kernels;
use tuneloop::model::presets::preset;
use tuneloop::ops::cpu::CpuOps;

fn main() -> anyhow::Result<()> {
    let args = common::positional();
    let arg = |i: usize, default: usize| common::number(&args, i, default);
    let name = args.first().map(String::as_str).unwrap_or("smollm2-135m");
    let cfg = preset(name)?;
    print!("{}", run_kernels(&CpuOps, name, &cfg, arg(1, 256)?, arg(2, 2)?, 3, 1024)?.markdown());
    Ok(())
}
