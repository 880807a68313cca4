//! [`Profiled`]: a backend that forwards every op to another and adds up the time each
//! op name takes. Each op is timed on its own, between synchronizes of the inner
//! backend (its [`Ops::timed`]), so a profiled step runs slower than a plain one: the
//! benchmark times its steps without it and runs one extra step through it for the
//! split.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use anyhow::Result;
use serde::Serialize;

use crate::ops::{
    AdamWParams, AttnLayout, AttnShape, ClipStats, GradScale, HostWeight, InputGrad, LinearGradRef,
    LoraGradRef, LoraRef, LossStats, Ops,
};

/// Time spent in one op over the calls recorded, and the model FLOPs of those calls
/// (0 for the ops not counted: only the matmuls of linear layers and attention are).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OpTime {
    pub op: &'static str,
    pub calls: u64,
    pub seconds: f64,
    pub flops: f64,
}

#[derive(Default)]
struct Record {
    /// calls, seconds, FLOPs
    ops: BTreeMap<&'static str, (u64, f64, f64)>,
    peak_memory: Option<u64>,
}

/// Causal (query, key) pairs of a layout: query i of a span sees keys 0 ..= i + k_len - q_len.
pub fn causal_pairs(layout: &AttnLayout) -> f64 {
    layout
        .seqs
        .iter()
        .map(|s| {
            let (q, shift) = (s.q_len as f64, s.k_len as f64 - s.q_len as f64);
            q * (q + 1.0) / 2.0 + q * shift
        })
        .sum()
}

/// Model FLOPs of an attention forward: Q·Kᵀ and P·V over the causal pairs, 2 FLOPs a
/// multiply-add. The backward counts 2.5 times that (dV, dP, dQ, dK and half a
/// recompute, as DESIGN.md's 3.5 × attention for a whole step).
pub fn attention_fwd_flops(shape: AttnShape, layout: &AttnLayout) -> f64 {
    4.0 * (shape.n_heads * shape.head_dim) as f64 * causal_pairs(layout)
}

/// Model FLOPs of a linear layer's forward, `x [n, i] · Wᵀ` to `o` outputs with a LoRA
/// path of rank `r` (0 without): the frozen product and the two thin ones. A backward
/// costs the same for dx, and the LoRA part again for the adapter's gradients.
pub fn linear_fwd_flops(n: f64, i: f64, o: f64, r: f64) -> f64 {
    2.0 * n * i * o + 2.0 * n * r * (i + o)
}

/// `inner` with every op timed. Results are exactly the inner backend's: the tensors
/// are its tensors, and each call goes straight through.
pub struct Profiled<'a, O: Ops> {
    inner: &'a O,
    record: Mutex<Record>,
}

impl<'a, O: Ops> Profiled<'a, O> {
    pub fn new(inner: &'a O) -> Self {
        Self { inner, record: Mutex::new(Record::default()) }
    }

    fn lock(&self) -> MutexGuard<'_, Record> {
        self.record.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every op called so far, the most time first.
    pub fn times(&self) -> Vec<OpTime> {
        let mut v: Vec<OpTime> = self
            .lock()
            .ops
            .iter()
            .map(|(&op, &(calls, seconds, flops))| OpTime { op, calls, seconds, flops })
            .collect();
        v.sort_by(|a, b| b.seconds.total_cmp(&a.seconds).then(a.op.cmp(b.op)));
        v
    }

    /// The most device memory in use after any op so far (None when the inner backend
    /// cannot say, see [`Ops::memory_in_use`]).
    pub fn peak_memory(&self) -> Option<u64> {
        self.lock().peak_memory
    }

    /// (rows, in, out, LoRA rank) of a linear layer `x [rows, in] · w [out, in]ᵀ`, as f64.
    fn linear_dims(
        &self,
        x: &O::Tensor,
        w: &O::Tensor,
        lora: Option<&LoraRef<O::Tensor>>,
    ) -> (f64, f64, f64, f64) {
        let (xs, ws) = (self.inner.shape(x), self.inner.shape(w));
        let n = xs[..xs.len().saturating_sub(1)].iter().product::<usize>() as f64;
        let (o, i) = (ws.first().copied().unwrap_or(0) as f64, ws.last().copied().unwrap_or(0) as f64);
        let r = lora.map_or(0.0, |l| self.inner.shape(l.a).first().copied().unwrap_or(0) as f64);
        (n, i, o, r)
    }

    /// Forgets what was recorded.
    pub fn reset(&self) {
        *self.lock() = Record::default();
    }

    fn run<R>(&self, op: &'static str, f: impl FnOnce() -> Result<R>) -> Result<R> {
        self.run_counted(op, 0.0, f)
    }

    /// [`Self::run`] for an op of `flops` model FLOPs.
    fn run_counted<R>(&self, op: &'static str, flops: f64, f: impl FnOnce() -> Result<R>) -> Result<R> {
        let (r, seconds) = self.inner.timed(f)?;
        let mem = self.inner.memory_in_use();
        let mut rec = self.lock();
        let e = rec.ops.entry(op).or_insert((0, 0.0, 0.0));
        e.0 += 1;
        e.1 += seconds;
        e.2 += flops;
        if let Some(m) = mem {
            rec.peak_memory = Some(rec.peak_memory.map_or(m, |p| p.max(m)));
        }
        Ok(r)
    }
}

impl<O: Ops> Ops for Profiled<'_, O> {
    type Tensor = O::Tensor;
    type LossSums = O::LossSums;
    type GradClip = O::GradClip;
    type Ids = O::Ids;

    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn upload(&self, data: &[f32], shape: &[usize]) -> Result<Self::Tensor> {
        self.run("upload", || self.inner.upload(data, shape))
    }

    fn upload_weight(&self, w: &HostWeight) -> Result<Self::Tensor> {
        self.run("upload_weight", || self.inner.upload_weight(w))
    }

    fn upload_ids(&self, ids: &[u32]) -> Result<Self::Ids> {
        self.run("upload_ids", || self.inner.upload_ids(ids))
    }

    fn download(&self, t: &Self::Tensor) -> Result<Vec<f32>> {
        self.run("download", || self.inner.download(t))
    }

    fn shape<'t>(&self, t: &'t Self::Tensor) -> &'t [usize] {
        self.inner.shape(t)
    }

    fn zeros(&self, shape: &[usize]) -> Result<Self::Tensor> {
        self.run("zeros", || self.inner.zeros(shape))
    }

    fn zeros_like(&self, t: &Self::Tensor) -> Result<Self::Tensor> {
        self.run("zeros_like", || self.inner.zeros_like(t))
    }

    fn fill_zero(&self, t: &mut Self::Tensor) -> Result<()> {
        self.run("fill_zero", || self.inner.fill_zero(t))
    }

    fn copy_rows(
        &self,
        dst: &mut Self::Tensor,
        dst_row: usize,
        src: &Self::Tensor,
        src_row: usize,
        n: usize,
    ) -> Result<()> {
        self.run("copy_rows", || self.inner.copy_rows(dst, dst_row, src, src_row, n))
    }

    fn gather_rows(&self, x: &Self::Tensor, rows: &[usize]) -> Result<Self::Tensor> {
        self.run("gather_rows", || self.inner.gather_rows(x, rows))
    }

    fn add_assign(&self, a: &mut Self::Tensor, b: &Self::Tensor) -> Result<()> {
        self.run("add_assign", || self.inner.add_assign(a, b))
    }

    fn embedding_fwd(&self, table: &Self::Tensor, ids: &Self::Ids) -> Result<Self::Tensor> {
        self.run("embedding_fwd", || self.inner.embedding_fwd(table, ids))
    }

    fn embedding_bwd(&self, dy: &Self::Tensor, ids: &Self::Ids, dtable: &mut Self::Tensor) -> Result<()> {
        self.run("embedding_bwd", || self.inner.embedding_bwd(dy, ids, dtable))
    }

    fn rmsnorm_fwd(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        eps: f32,
        tail: usize,
    ) -> Result<(Self::Tensor, Self::Tensor)> {
        self.run("rmsnorm_fwd", || self.inner.rmsnorm_fwd(x, w, eps, tail))
    }

    fn rmsnorm_bwd(
        &self,
        dy: &Self::Tensor,
        x: &Self::Tensor,
        w: &Self::Tensor,
        rstd: &Self::Tensor,
        dw: Option<&mut Self::Tensor>,
        residual: Option<Self::Tensor>,
        tail: usize,
    ) -> Result<Self::Tensor> {
        self.run("rmsnorm_bwd", || self.inner.rmsnorm_bwd(dy, x, w, rstd, dw, residual, tail))
    }

    fn linear_fwd(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        bias: Option<&Self::Tensor>,
        lora: Option<LoraRef<Self::Tensor>>,
        residual: Option<&Self::Tensor>,
    ) -> Result<(Self::Tensor, Option<Self::Tensor>)> {
        let (n, i, o, r) = self.linear_dims(x, w, lora.as_ref());
        let flops = linear_fwd_flops(n, i, o, r);
        self.run_counted("linear_fwd", flops, || self.inner.linear_fwd(x, w, bias, lora, residual))
    }

    fn linear_bwd(
        &self,
        dy: &Self::Tensor,
        x: &Self::Tensor,
        w: &Self::Tensor,
        lora: Option<LoraRef<Self::Tensor>>,
        xa: Option<&Self::Tensor>,
        grads: Option<LoraGradRef<Self::Tensor>>,
        weight_grads: Option<LinearGradRef<Self::Tensor>>,
        dx_to: InputGrad<Self::Tensor>,
    ) -> Result<Option<Self::Tensor>> {
        let (n, i, o, r) = self.linear_dims(x, w, lora.as_ref());
        // dx through the frozen weight; the weight's own gradient (full fine-tuning); dx
        // through the low-rank path; the LoRA gradients
        let need_dx = !matches!(dx_to, InputGrad::Skip);
        let flops = if need_dx { linear_fwd_flops(n, i, o, r) } else { 0.0 }
            + if weight_grads.is_some() { linear_fwd_flops(n, i, o, 0.0) } else { 0.0 }
            + if grads.is_some() {
                linear_fwd_flops(n, i, o, r) - linear_fwd_flops(n, i, o, 0.0)
            } else {
                0.0
            };
        self.run_counted("linear_bwd", flops, || {
            self.inner.linear_bwd(dy, x, w, lora, xa, grads, weight_grads, dx_to)
        })
    }

    fn rope_fwd(
        &self,
        q: &mut Self::Tensor,
        k: &mut Self::Tensor,
        cos: &Self::Tensor,
        sin: &Self::Tensor,
        head_dim: usize,
    ) -> Result<()> {
        self.run("rope_fwd", || self.inner.rope_fwd(q, k, cos, sin, head_dim))
    }

    fn rope_bwd(
        &self,
        dq: &mut Self::Tensor,
        dk: &mut Self::Tensor,
        cos: &Self::Tensor,
        sin: &Self::Tensor,
        head_dim: usize,
    ) -> Result<()> {
        self.run("rope_bwd", || self.inner.rope_bwd(dq, dk, cos, sin, head_dim))
    }

    fn attention_fwd(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        shape: AttnShape,
        layout: &AttnLayout,
        tail: usize,
    ) -> Result<(Self::Tensor, Self::Tensor)> {
        let flops = attention_fwd_flops(shape, layout);
        self.run_counted("attention_fwd", flops, || self.inner.attention_fwd(q, k, v, shape, layout, tail))
    }

    fn attention_bwd(
        &self,
        dout: &Self::Tensor,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        out: &Self::Tensor,
        lse: &Self::Tensor,
        shape: AttnShape,
        layout: &AttnLayout,
        tail: usize,
    ) -> Result<(Self::Tensor, Self::Tensor, Self::Tensor)> {
        let flops = 2.5 * attention_fwd_flops(shape, layout);
        self.run_counted("attention_bwd", flops, || {
            self.inner.attention_bwd(dout, q, k, v, out, lse, shape, layout, tail)
        })
    }

    fn swiglu_fwd(&self, gate: &Self::Tensor, up: &Self::Tensor, tail: usize) -> Result<Self::Tensor> {
        self.run("swiglu_fwd", || self.inner.swiglu_fwd(gate, up, tail))
    }

    fn swiglu_bwd(
        &self,
        dh: &Self::Tensor,
        gate: &Self::Tensor,
        up: &Self::Tensor,
        tail: usize,
    ) -> Result<(Self::Tensor, Self::Tensor)> {
        self.run("swiglu_bwd", || self.inner.swiglu_bwd(dh, gate, up, tail))
    }

    fn swiglu_bwd_h(
        &self,
        dh: &Self::Tensor,
        gate: &Self::Tensor,
        up: &Self::Tensor,
        tail: usize,
    ) -> Result<(Self::Tensor, Self::Tensor, Self::Tensor)> {
        self.run("swiglu_bwd_h", || self.inner.swiglu_bwd_h(dh, gate, up, tail))
    }

    fn cross_entropy_into(
        &self,
        logits: &Self::Tensor,
        targets: &[i64],
        grad_scale: Option<f32>,
        sums: &mut Self::LossSums,
    ) -> Result<Option<Self::Tensor>> {
        self.run("cross_entropy", || self.inner.cross_entropy_into(logits, targets, grad_scale, sums))
    }

    fn argmax_rows(&self, x: &Self::Tensor) -> Result<Vec<u32>> {
        self.run("argmax_rows", || self.inner.argmax_rows(x))
    }

    fn loss_sums(&self) -> Result<Self::LossSums> {
        self.inner.loss_sums()
    }

    fn read_loss(&self, sums: &Self::LossSums) -> Result<LossStats> {
        self.inner.read_loss(sums)
    }

    fn sum_squares(&self, ts: &[&Self::Tensor]) -> Result<f64> {
        self.run("sum_squares", || self.inner.sum_squares(ts))
    }

    fn grad_clip(&self, grads: &[&Self::Tensor], max_norm: Option<f64>) -> Result<Self::GradClip> {
        self.run("grad_clip", || self.inner.grad_clip(grads, max_norm))
    }

    fn read_clip(&self, clip: &Self::GradClip) -> Result<ClipStats> {
        self.inner.read_clip(clip)
    }

    fn read_step(&self, sums: &Self::LossSums, clip: &Self::GradClip) -> Result<(LossStats, ClipStats)> {
        self.inner.read_step(sums, clip)
    }

    fn adamw_step(
        &self,
        params: &mut [&mut Self::Tensor],
        grads: &[&Self::Tensor],
        m: &mut [&mut Self::Tensor],
        v: &mut [&mut Self::Tensor],
        step: u64,
        hp: AdamWParams,
        scale: GradScale<'_, Self::GradClip>,
    ) -> Result<()> {
        self.run("adamw_step", || self.inner.adamw_step(params, grads, m, v, step, hp, scale))
    }

    fn reserve_lora_tail(&self, w: &mut Self::Tensor, r: usize) -> Result<()> {
        self.run("reserve_lora_tail", || self.inner.reserve_lora_tail(w, r))
    }

    fn compute_copies(&self, ts: &[&Self::Tensor]) -> Result<Option<Vec<Self::Tensor>>> {
        self.run("compute_copies", || self.inner.compute_copies(ts))
    }

    fn fill_zero_all(&self, ts: &mut [&mut Self::Tensor]) -> Result<()> {
        self.run("fill_zero_all", || self.inner.fill_zero_all(ts))
    }

    fn synchronize(&self) -> Result<()> {
        self.inner.synchronize()
    }

    fn timed<R>(&self, f: impl FnOnce() -> Result<R>) -> Result<(R, f64)> {
        self.inner.timed(f)
    }

    fn clock(&self) -> &'static str {
        self.inner.clock()
    }

    fn memory_in_use(&self) -> Option<u64> {
        self.inner.memory_in_use()
    }

    fn host_waits(&self) -> Option<u64> {
        self.inner.host_waits()
    }

    fn activation_bytes(&self) -> usize {
        self.inner.activation_bytes()
    }

    fn planned<R>(&self, key: u64, f: impl FnOnce() -> Result<R>) -> Result<R> {
        self.inner.planned(key, f)
    }

    fn arena_stats(&self) -> Option<crate::ops::ArenaStats> {
        self.inner.arena_stats()
    }

    fn kernel_clock(&self, on: bool) -> Result<bool> {
        self.inner.kernel_clock(on)
    }

    fn kernel_times(&self) -> Result<Vec<crate::ops::KernelClock>> {
        self.inner.kernel_times()
    }

    fn compute_copy(&self, t: &Self::Tensor) -> Result<Option<Self::Tensor>> {
        self.run("compute_copy", || self.inner.compute_copy(t))
    }
}
