//! Kernel micro-benchmarks on the CPU backend: `tuneloop bench --kernels --backend cpu`
//! as a cargo bench. Each op at a model's shapes against its floor (FLOPs at the GEMM
//! rate or bytes at the bandwidth measured here). `cargo bench --bench kernels`
//! (optionally `-- PRESET SEQ BATCH STEPS`, STEPS calls of each op). On a GPU:
//! `tuneloop bench --kernels --backend cuda`.

mod common;

use tuneloop::bench::kernels::run_kernels;
use tuneloop::ops::cpu::CpuOps;

fn main() -> anyhow::Result<()> {
    print!("{}", run_kernels(&CpuOps, &common::options()?)?.markdown());
    Ok(())
}
