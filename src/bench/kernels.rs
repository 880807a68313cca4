//! Kernel micro-benchmarks (`tuneloop bench --kernels`, `cargo bench --bench kernels`):
//! each op of a LoRA step timed on its own at a model's shapes for `seq × batch` tokens,
//! against its floor: its FLOPs at the GEMM rate measured on the same backend, or its
//! bytes at the memory bandwidth measured there (an elementwise add), whichever is
//! longer. The ratio floor / time says how close an op comes to what the hardware allows.

use std::fmt::Write as _;

use anyhow::{ensure, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use super::profile::{attention_fwd_flops, linear_fwd_flops};
use super::{gemm_rate, with_kernel_clock, BenchOptions, GemmRate};
use crate::model::{Adapter, LoraConfig, Proj};
use crate::ops::{AdamWParams, AttnLayout, AttnShape, GradScale, HostWeight, KernelClock, LoraRef, Ops};
use crate::train::{grad_clip, AdamW};

/// One kernel's measurement.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct KernelTime {
    pub kernel: String,
    pub shape: String,
    /// Mean time of one call.
    pub seconds: f64,
    /// Model FLOPs of one call (0 for the memory-bound ops).
    pub flops: f64,
    /// Bytes one call must read and write at the least.
    pub bytes: f64,
    /// max(flops / GEMM rate, bytes / bandwidth).
    pub floor_seconds: f64,
    /// What one call queued, per kernel (GEMMs per shape), from [`Ops::kernel_times`]:
    /// calls and seconds per call of the op; empty where ops are not kernels.
    pub split: Vec<KernelClock>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct KernelReport {
    pub model: String,
    pub backend: String,
    pub tokens: usize,
    pub gemm: GemmRate,
    /// Bytes per second of `add_assign` (two reads and a write) over a large tensor.
    pub bandwidth: f64,
    pub kernels: Vec<KernelTime>,
}

/// Mean seconds of one `f()` over `reps` calls after one untimed call, and what one call
/// queued per kernel: `reps` more calls with [`Ops::kernel_clock`] on (apart from the
/// timed ones, which the events would slow), where the backend has kernels.
fn mean_time<O: Ops>(
    ops: &O,
    reps: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<(f64, Vec<KernelClock>)> {
    f()?;
    let ((), s) = ops.timed(|| (0..reps).try_for_each(|_| f()))?;
    let clocked = with_kernel_clock(ops, || (0..reps).try_for_each(|_| f()))?;
    let mut split = clocked.map(|((), split)| split).unwrap_or_default();
    for k in &mut split {
        k.calls /= reps as u64;
        k.seconds /= reps as f64;
    }
    Ok((s / reps as f64, split))
}

/// Runs the micro-benchmarks of `opts.model`'s shapes at `seq × batch` tokens, `steps`
/// calls each (the other options are the training benchmark's).
pub fn run_kernels<O: Ops>(ops: &O, opts: &BenchOptions) -> Result<KernelReport> {
    opts.check()?;
    let (model, cfg) = opts.model.load()?;
    let (seq, batch, reps) = (opts.seq, opts.batch, opts.steps);
    ensure!(reps > 0, "--steps must be at least 1");
    ensure!(!opts.full, "--kernels times the kernels of a LoRA step; leave out --full");
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut random =
        |n: usize, amp: f32| -> Vec<f32> { (0..n).map(|_| rng.random_range(-amp..amp)).collect() };
    // activations are 2 bytes in the CUDA backend's bf16 mode, 4 elsewhere; the optimizer
    // state and the LoRA masters are f32 everywhere
    let elem = ops.activation_bytes() as f64;
    let t = seq * batch;
    let (d, ff, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let (h, hkv, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
    let (qw, kw) = (h * hd, hkv * hd);
    let tf = t as f64;

    // Activations and frozen weights in the backend's activation type, as a step holds
    // them (`upload_weight`: bf16 in the CUDA backend's bf16 mode); LoRA masters,
    // optimizer state and the RoPE tables in f32 (`upload`).
    let act = |shape: &[usize], data: &[f32]| {
        ops.upload_weight(&HostWeight {
            name: "bench",
            shape: shape.to_vec(),
            dtype: safetensors::Dtype::F32,
            bytes: bytemuck::cast_slice(data),
        })
    };

    let gemm = gemm_rate(ops, opts.gemm_n(ops))?;
    let bw_n = if ops.name() == "cpu" { 1 << 22 } else { 1 << 27 };
    let mut a = act(&[bw_n], &random(bw_n, 1.0))?;
    let b = act(&[bw_n], &random(bw_n, 1.0))?;
    let (bw_s, _) = mean_time(ops, reps, || ops.add_assign(&mut a, &b))?;
    let bandwidth = 3.0 * bw_n as f64 * elem / bw_s;
    drop((a, b));

    let mut kernels = Vec::new();
    let mut record =
        |kernel: &str, shape: String, (seconds, split): (f64, Vec<KernelClock>), flops: f64, bytes: f64| {
            let floor_seconds = (flops / (gemm.tflops * 1e12)).max(bytes / bandwidth);
            let kernel = kernel.to_string();
            kernels.push(KernelTime { kernel, shape, seconds, flops, bytes, floor_seconds, split });
        };

    // attention over `batch` sequences of `seq`
    let shape = AttnShape { n_heads: h, n_kv_heads: hkv, head_dim: hd };
    let layout = AttnLayout::packed(&vec![seq; batch]);
    let q = act(&[t, qw], &random(t * qw, 1.0))?;
    let k = act(&[t, kw], &random(t * kw, 1.0))?;
    let vv = act(&[t, kw], &random(t * kw, 1.0))?;
    let attn_shape = format!("{batch}×{seq}, {h}/{hkv} heads of {hd}");
    let io = (2.0 * tf * qw as f64 + 2.0 * tf * kw as f64) * elem + 4.0 * tf * h as f64;
    let s = mean_time(ops, reps, || ops.attention_fwd(&q, &k, &vv, shape, &layout, 0).map(drop))?;
    record("attention_fwd", attn_shape.clone(), s, attention_fwd_flops(shape, &layout), io);
    let (out, lse) = ops.attention_fwd(&q, &k, &vv, shape, &layout, 0)?;
    let dout = act(&[t, qw], &random(t * qw, 1.0))?;
    let s = mean_time(ops, reps, || {
        ops.attention_bwd(&dout, &q, &k, &vv, &out, &lse, shape, &layout, 0).map(drop)
    })?;
    record("attention_bwd", attn_shape, s, 2.5 * attention_fwd_flops(shape, &layout), 2.0 * io);
    drop((vv, out, lse, dout));

    // two projections with their LoRA path (r = 16): the widest input and a narrow one,
    // each with the LoRA update folded into the frozen product (inputs and weight with
    // room for it, as a training step has them) and as a second product
    let r = 16;
    let x_d = act(&[t, d], &random(t * d, 1.0))?;
    let x_ff = act(&[t, ff], &random(t * ff, 1.0))?;
    let norm_w = act(&[d], &vec![1.0; d])?;
    let norm_ff = act(&[ff], &vec![1.0; ff])?;
    for (name, x, nw, inp, outp) in
        [("linear_fwd q_proj", &x_d, &norm_w, d, qw), ("linear_fwd down_proj", &x_ff, &norm_ff, ff, d)]
    {
        let mut w = act(&[outp, inp], &random(outp * inp, 0.02))?;
        let la = ops.upload(&random(r * inp, 0.02), &[r, inp])?;
        let lb = ops.upload(&random(outp * r, 0.02), &[outp, r])?;
        // in the type the step computes with: it makes those copies once per optimizer
        // step, not per product
        let la = ops.compute_copy(&la)?.unwrap_or(la);
        let lb = ops.compute_copy(&lb)?.unwrap_or(lb);
        let lora = || Some(LoraRef { a: &la, b: &lb, scale: 2.0, dropout: None });
        let flops = linear_fwd_flops(tf, inp as f64, outp as f64, r as f64);
        let bytes = (tf * (inp + outp) as f64 + (inp * outp) as f64) * elem;
        let shape = format!("[{t}, {inp}] → {outp}, r {r}");
        let s = mean_time(ops, reps, || ops.linear_fwd(x, &w, None, lora(), None).map(drop))?;
        record(&format!("{name}, LoRA apart"), shape.clone(), s, flops, bytes);
        let x_room = ops.rmsnorm_fwd(x, nw, 1e-5, r)?.0;
        ops.reserve_lora_tail(&mut w, r)?;
        let s = mean_time(ops, reps, || ops.linear_fwd(&x_room, &w, None, lora(), None).map(drop))?;
        record(&format!("{name}, LoRA folded"), shape, s, flops, bytes);
    }
    drop((x_ff, norm_ff));

    // the memory-bound ops
    let s = mean_time(ops, reps, || ops.rmsnorm_fwd(&x_d, &norm_w, 1e-5, 0).map(drop))?;
    record("rmsnorm_fwd", format!("[{t}, {d}]"), s, 0.0, 2.0 * tf * d as f64 * elem + 4.0 * tf);
    drop(x_d);
    let cos = ops.upload(&random(t * hd / 2, 1.0), &[t, hd / 2])?;
    let sin = ops.upload(&random(t * hd / 2, 1.0), &[t, hd / 2])?;
    let (mut q, mut k) = (q, k);
    let s = mean_time(ops, reps, || ops.rope_fwd(&mut q, &mut k, &cos, &sin, hd))?;
    record(
        "rope_fwd (q and k)",
        format!("[{t}, {qw}] and [{t}, {kw}]"),
        s,
        0.0,
        2.0 * tf * (qw + kw) as f64 * elem + 4.0 * tf * hd as f64,
    );
    drop((q, k, cos, sin));
    let gate = act(&[t, ff], &random(t * ff, 2.0))?;
    let up = act(&[t, ff], &random(t * ff, 2.0))?;
    let s = mean_time(ops, reps, || ops.swiglu_fwd(&gate, &up, 0).map(drop))?;
    record("swiglu_fwd", format!("[{t}, {ff}]"), s, 0.0, 3.0 * tf * ff as f64 * elem);
    let dh = act(&[t, ff], &random(t * ff, 1.0))?;
    let s = mean_time(ops, reps, || ops.swiglu_bwd(&dh, &gate, &up, 0).map(drop))?;
    record("swiglu_bwd", format!("[{t}, {ff}]"), s, 0.0, 5.0 * tf * ff as f64 * elem);
    drop((gate, up, dh));
    let rows = t.min(1024);
    let logits = act(&[rows, v], &random(rows * v, 8.0))?;
    let targets: Vec<i64> = (0..rows).map(|i| ((i * 7919) % v) as i64).collect();
    // as a training step runs it: the losses added into sums on the device, no wait
    let mut sums = ops.loss_sums()?;
    let s =
        mean_time(ops, reps, || ops.cross_entropy_into(&logits, &targets, Some(1.0), &mut sums).map(drop))?;
    record("cross_entropy", format!("[{rows}, {v}]"), s, 0.0, 2.0 * (rows * v) as f64 * elem);
    drop(logits);

    // AdamW over every LoRA tensor of the model (r = 16 on all seven projections), as a
    // training step calls it
    let lora = LoraConfig::new(r, 2.0 * r as f64, Proj::ALL.to_vec());
    let mut adapter = Adapter::init(ops, &lora, &cfg, 8)?;
    let grads = adapter.zeros_like(ops, &cfg)?;
    let hp = AdamWParams { lr: 1e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 };
    let mut opt = AdamW::new(ops, &adapter, hp)?;
    let named = adapter.named();
    let n_params: usize = named.iter().map(|(_, t)| ops.shape(t).iter().product::<usize>()).sum();
    let n_tensors = named.len();
    drop(named);
    // the gradients' norm and the clip's coefficient, left on the device for AdamW
    let s = mean_time(ops, reps, || grad_clip(ops, &grads, Some(1.0)).map(drop))?;
    record("grad_clip", format!("{n_tensors} tensors, {n_params} values"), s, 0.0, 4.0 * n_params as f64);
    let clip = grad_clip(ops, &grads, Some(1.0))?;
    let s = mean_time(ops, reps, || opt.update(ops, &mut adapter, &grads, hp.lr, GradScale::Clip(&clip)))?;
    // read p, g, m, v and write p, m, v: 7 f32 values a parameter
    record("adamw_step", format!("{n_tensors} tensors, {n_params} values"), s, 0.0, 28.0 * n_params as f64);

    Ok(KernelReport { model, backend: ops.name().to_string(), tokens: t, gemm, bandwidth, kernels })
}

impl KernelReport {
    pub fn json_line(&self) -> Result<String> {
        Ok(serde_json::to_string(self)?)
    }

    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{} on {}, {} tokens; GEMM {:.4} TFLOP/s ({}³), bandwidth {:.1} GB/s (add_assign)\n",
            self.model,
            self.backend,
            self.tokens,
            self.gemm.tflops,
            self.gemm.n,
            self.bandwidth / 1e9
        );
        let _ = writeln!(s, "| kernel | shape | ms | TFLOP/s | GB/s | floor ms | floor / time |");
        let _ = writeln!(s, "| --- | --- | --- | --- | --- | --- | --- |");
        for k in &self.kernels {
            let tflops =
                if k.flops > 0.0 { format!("{:.4}", k.flops / k.seconds / 1e12) } else { "-".into() };
            let _ = writeln!(
                s,
                "| {} | {} | {:.3} | {tflops} | {:.1} | {:.3} | {:.1}% |",
                k.kernel,
                k.shape,
                1e3 * k.seconds,
                k.bytes / k.seconds / 1e9,
                1e3 * k.floor_seconds,
                100.0 * k.floor_seconds / k.seconds
            );
            // the kernels of an op that queues more than one, with their share of it
            let total: f64 = k.split.iter().map(|c| c.seconds).sum();
            for c in k.split.iter().filter(|_| k.split.len() > 1) {
                let _ = writeln!(
                    s,
                    "| ↳ {} | ×{} | {:.3} | | | | {:.0}% of the op |",
                    c.kernel,
                    c.calls,
                    1e3 * c.seconds,
                    100.0 * c.seconds / total
                );
            }
        }
        s
    }
}
