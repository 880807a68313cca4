//! `tuneloop bench`: LoRA training steps (forward, loss, backward, gradient clipping,
//! AdamW), or with `--full` full fine-tuning ones, on random weights of a real model's
//! shapes, on any backend. A step is the one fine-tuning runs: [`train_step`] (lm_head
//! and cross-entropy in row chunks), optionally with activation recompute.
//!
//! What it reports and how it measures:
//! - step time: [`Ops::timed`] around each step (CUDA events on the CUDA backend, the
//!   host clock between synchronizes on the CPU), mean over the timed steps after the
//!   warm-up ones;
//! - model FLOPs as DESIGN.md counts them ([`step_flops`]): 4 × linear parameters
//!   (lm_head included; 6 × in full fine-tuning, for the weight gradients) + 3.5 ×
//!   causal attention, per sequence of the batch;
//! - MFU against a GEMM rate measured here, on the same backend, through the same
//!   `linear_fwd` the frozen projections use (an `n × n` by `n × n` product);
//! - peak memory: the process's peak resident set (VmHWM) for host tensors, or the
//!   device's memory in use ([`Ops::memory_in_use`]) sampled after every op of a profiled
//!   step for device tensors;
//! - the time split per op, from one more step run through [`Profiled`] (each op timed
//!   between synchronizes), apart from the timed steps so it does not slow them.

pub mod anchors;
pub mod kernels;
pub mod profile;

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{ensure, Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::model::decoder::Recompute;
use crate::model::presets::{preset, step_flops};
use crate::model::{Adapter, LoraConfig, Model, ModelConfig, Proj};
use crate::ops::{AdamWParams, GradScale, HostWeight, Ops};
use crate::train::Trainable;
use crate::train::{grad_clip, train_step, AdamW, TokenBatch};
use crate::util::gib;

use crate::ops::KernelClock;
pub use anchors::{Anchor, ANCHORS};
pub use profile::{OpTime, Profiled};

/// The shapes to benchmark: a preset's, or an HF model directory's `config.json` (its
/// weights are not read).
#[derive(Clone, Debug, PartialEq)]
pub enum ModelSource {
    Preset(String),
    Dir(PathBuf),
}

impl ModelSource {
    /// A name for reports and the model's config.
    pub fn load(&self) -> Result<(String, ModelConfig)> {
        match self {
            ModelSource::Preset(name) => Ok((name.clone(), preset(name)?)),
            ModelSource::Dir(dir) => {
                let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
                Ok((dir.display().to_string(), cfg))
            }
        }
    }

    fn preset_name(&self) -> Option<&str> {
        match self {
            ModelSource::Preset(name) => Some(name),
            ModelSource::Dir(_) => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct BenchOptions {
    pub model: ModelSource,
    pub seq: usize,
    pub batch: usize,
    /// LoRA rank on all seven projections; alpha is 2r.
    pub lora_r: usize,
    /// PEFT's `lora_dropout` on the LoRA paths' inputs (0: none).
    pub lora_dropout: f32,
    /// Which layers keep only their input and recompute their activations in the
    /// backward ([`crate::model::Decoder::recompute`]).
    pub recompute: Recompute,
    /// The batch's `batch × seq` tokens as one packed run of documents of random
    /// lengths up to `seq`, instead of `batch` rows of `seq`.
    pub packing: bool,
    /// The LoRA paths as separate products instead of folded into the frozen ones
    /// ([`Model::reserve_lora_tails`] left out), to measure what the fold gains.
    pub lora_apart: bool,
    /// Full fine-tuning steps (every weight trained, from f32 master weights) instead of
    /// LoRA ones.
    pub full: bool,
    pub warmup: usize,
    pub steps: usize,
    /// Run one more step through [`Profiled`] for the time split per op.
    pub profile: bool,
    /// Size of the square GEMM the MFU is taken against (default: 4096 on a device
    /// backend, 1024 on the CPU).
    pub gemm_size: Option<usize>,
    pub seed: u64,
}

impl BenchOptions {
    pub fn new(model: ModelSource) -> Self {
        Self {
            model,
            seq: 2048,
            batch: 4,
            lora_r: 16,
            lora_dropout: 0.0,
            recompute: Recompute::Off,
            packing: false,
            lora_apart: false,
            full: false,
            warmup: 2,
            steps: 10,
            profile: true,
            gemm_size: None,
            seed: 0,
        }
    }

    pub fn check(&self) -> Result<()> {
        ensure!(self.seq >= 2, "--seq {}: a sequence needs at least 2 tokens to train on", self.seq);
        ensure!(self.batch >= 1, "--batch must be at least 1");
        ensure!(self.lora_r >= 1, "--lora-r must be at least 1");
        ensure!(
            (0.0..1.0).contains(&self.lora_dropout),
            "--lora-dropout {} is not in [0, 1)",
            self.lora_dropout
        );
        ensure!(
            !(self.full && self.lora_dropout > 0.0),
            "--lora-dropout is about LoRA paths; --full trains no adapter"
        );
        ensure!(self.steps >= 1, "--steps must be at least 1 (the timed steps)");
        ensure!(self.gemm_size != Some(0), "--gemm-size must be at least 1");
        ensure!(
            !(self.full && self.lora_apart),
            "--lora-apart is about LoRA paths; --full trains no adapter"
        );
        Ok(())
    }

    /// The side of the square GEMM whose rate the figures are taken against:
    /// `--gemm-size`, else 1024 on the CPU and 4096 on a GPU.
    pub fn gemm_n<O: Ops>(&self, ops: &O) -> usize {
        self.gemm_size.unwrap_or(if ops.name() == "cpu" { 1024 } else { 4096 })
    }
}

/// Lengths of packed documents: uniformly random between `max_len / 8` and `max_len`
/// (seeded), end to end until they hold exactly `total` tokens.
pub fn packed_lengths(total: usize, max_len: usize, seed: u64) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let min = (max_len / 8).max(1);
    let mut lens = Vec::new();
    let mut left = total;
    while left > 0 {
        let len = rng.random_range(min..=max_len.max(min)).min(left);
        lens.push(len);
        left -= len;
    }
    lens
}

/// A batch of random token ids, every token trained: `batch` rows of `seq`, or with
/// `packing` the same number of tokens as documents of [`packed_lengths`].
pub fn synthetic_batch(
    cfg: &ModelConfig,
    seq: usize,
    batch: usize,
    packing: bool,
    seed: u64,
) -> Result<TokenBatch> {
    ensure!(cfg.vocab_size > 0, "the model's vocab_size is 0");
    let vocab = u32::try_from(cfg.vocab_size).context("vocab_size does not fit 32-bit token ids")?;
    let total = seq.checked_mul(batch).context("--seq × --batch overflows")?;
    let lens = if packing { packed_lengths(total, seq, seed) } else { vec![seq; batch] };
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x7e57_da7a);
    let mut tb = TokenBatch::default();
    for len in lens {
        let ids: Vec<u32> = (0..len).map(|_| rng.random_range(0..vocab)).collect();
        let labels: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
        tb.push(&ids, &labels);
    }
    Ok(tb)
}

/// Everything one training step touches: what stays frozen (the base model under a LoRA
/// adapter, nothing in full fine-tuning), the trained tensors `P` (an [`Adapter`], or the
/// whole [`Model`]'s f32 masters), their gradients, AdamW and the batch. The tensors
/// belong to a backend's tensor type `T`, so a [`Profiled`] wrapper of that backend can
/// run the same state.
pub struct TrainStep<T, P: Trainable<T>> {
    pub frozen: P::Frozen,
    pub params: P,
    pub grads: P,
    pub opt: AdamW<P>,
    pub batch: TokenBatch,
    /// Clip the gradient norm to this, as HF's Trainer does by default (1.0).
    pub max_grad_norm: f64,
    /// Which layers recompute their activations.
    pub recompute: Recompute,
    /// LoRA dropout's probability (none at 0), a new mask every step.
    pub lora_dropout: f32,
    steps_done: u64,
}

/// A LoRA step: a frozen base model under a trained adapter.
pub type LoraStep<T> = TrainStep<T, Adapter<T>>;
/// A full fine-tuning step: every weight trained (f32 masters, [`Model::random_master`]).
pub type FullStep<T> = TrainStep<T, Model<T>>;

impl<T> LoraStep<T> {
    /// A random-initialised model of `cfg`'s shapes (HF's init, std 0.02) and a fresh
    /// adapter (PEFT's init), both seeded; AdamW at lr 1e-4 without weight decay.
    pub fn new<O: Ops<Tensor = T>>(
        ops: &O,
        cfg: ModelConfig,
        lora: &LoraConfig,
        batch: TokenBatch,
        seed: u64,
    ) -> Result<Self> {
        let model = Model::random(ops, cfg, seed, 0.02)?;
        let adapter = Adapter::init(ops, lora, &model.cfg, seed)?;
        Self::with(ops, model, adapter, batch)
    }
}

impl<T> FullStep<T> {
    /// The random-initialised model of [`LoraStep::new`], all of it trained.
    pub fn new<O: Ops<Tensor = T>>(ops: &O, cfg: ModelConfig, batch: TokenBatch, seed: u64) -> Result<Self> {
        Self::with(ops, (), Model::random_master(ops, cfg, seed, 0.02)?, batch)
    }
}

impl<T, P: Trainable<T>> TrainStep<T, P> {
    fn with<O: Ops<Tensor = T>>(ops: &O, frozen: P::Frozen, params: P, batch: TokenBatch) -> Result<Self> {
        let grads = params.zeros(ops)?;
        let hp = AdamWParams { lr: 1e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 };
        let opt = AdamW::new(ops, &params, hp)?;
        Ok(Self {
            frozen,
            params,
            grads,
            opt,
            batch,
            max_grad_norm: 1.0,
            recompute: Recompute::Off,
            lora_dropout: 0.0,
            steps_done: 0,
        })
    }

    /// One training step: zero the gradients, forward, chunked lm_head and loss,
    /// backward, clip, AdamW. Returns the batch's mean loss.
    pub fn step<O: Ops<Tensor = T>>(&mut self, ops: &O) -> Result<f64> {
        ops.fill_zero_all(&mut self.grads.tensors_mut())?;
        // as a training step: the trained tensors in the compute type once, not at every op
        let copy = self.params.compute_copy(ops)?;
        let mut dec = copy.as_ref().unwrap_or(&self.params).decoder(ops, &self.frozen);
        dec.recompute = self.recompute;
        self.steps_done += 1;
        dec.lora_dropout = (self.lora_dropout > 0.0).then_some(crate::ops::Dropout {
            p: self.lora_dropout,
            seed: self.steps_done.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        });
        let mut sums = ops.loss_sums()?;
        train_step(&dec, &self.batch, self.grads.as_grads(), None, None, &mut sums)?;
        let clip = grad_clip(ops, &self.grads, Some(self.max_grad_norm))?;
        let lr = self.opt.hp.lr;
        self.opt.update(ops, &mut self.params, &self.grads, lr, GradScale::Clip(&clip))?;
        // as a fine-tuning step: one wait, after the update is queued
        Ok(ops.read_step(&sums, &clip)?.0.mean())
    }

    /// Elements of the trained tensors.
    pub fn trainable_params<O: Ops<Tensor = T>>(&self, ops: &O) -> u64 {
        self.params.named().iter().map(|(_, t)| ops.shape(t).iter().product::<usize>() as u64).sum()
    }
}

/// A square matmul's rate through `linear_fwd` on one backend.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GemmRate {
    /// `[n, n] · [n, n]ᵀ`.
    pub n: usize,
    pub reps: usize,
    /// Per product.
    pub seconds: f64,
    pub tflops: f64,
}

/// Times `y = x·Wᵀ` with `x, W` of `[n, n]` (2n³ FLOPs) in the backend's base-weight
/// type through [`Ops::linear_fwd`], after one untimed product (plans, thread pools); as
/// many repetitions as fill about half a second, at least 3.
pub fn gemm_rate<O: Ops>(ops: &O, n: usize) -> Result<GemmRate> {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let data: Vec<f32> = (0..n * n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    // both as weights, so both are in the backend's base-weight type, as the activations
    // and frozen weights of a projection are (bf16 in the CUDA backend's bf16 mode)
    let host = |name| HostWeight {
        name,
        shape: vec![n, n],
        dtype: safetensors::Dtype::F32,
        bytes: bytemuck::cast_slice(&data),
    };
    let x = ops.upload_weight(&host("gemm.x"))?;
    let w = ops.upload_weight(&host("gemm.weight"))?;
    let product = || ops.linear_fwd(&x, &w, None, None, None).map(drop);
    let ((), once) = ops.timed(product)?;
    let reps = ((0.5 / once.max(1e-9)).ceil() as usize).clamp(3, 200);
    let ((), seconds) = ops.timed(|| (0..reps).try_for_each(|_| product()))?;
    let flops = 2.0 * (n as f64).powi(3) * reps as f64;
    Ok(GemmRate { n, reps, seconds: seconds / reps as f64, tflops: flops / seconds / 1e12 })
}

/// The time split of one step run through [`Profiled`].
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ProfileReport {
    /// The profiled step's own time (slower than a timed step: every op synchronizes).
    pub step_s: f64,
    /// Per op, most time first.
    pub ops: Vec<OpTime>,
    /// The step's time outside any op (host work between them).
    pub other_s: f64,
}

/// The time split per kernel of one more step run with [`Ops::kernel_clock`] on: every
/// kernel, GEMM and memset between two events, queued as a plain step queues them (no
/// synchronize between ops), so for kernels longer than a launch the events time the
/// kernel alone.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct KernelSplit {
    /// That step's own time (the events slow it a little).
    pub step_s: f64,
    /// Per kernel (GEMMs per shape), most time first.
    pub kernels: Vec<KernelClock>,
}

/// An anchor of DESIGN.md at this run's shape and how this run compares.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AnchorRatio {
    pub system: &'static str,
    pub tokens_per_s: f64,
    pub memory_gib: Option<f64>,
    /// This run's tokens/s over the anchor's.
    pub ratio: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BenchReport {
    pub model: String,
    pub preset: Option<String>,
    pub backend: &'static str,
    /// Host threads of the CPU backend's pool.
    pub threads: usize,
    pub seq: usize,
    pub batch: usize,
    pub packing: bool,
    /// Sequences in the batch (`batch` rows, or the packed documents).
    pub documents: usize,
    pub tokens_per_step: usize,
    /// Full fine-tuning steps (`--full`) rather than LoRA ones.
    pub full: bool,
    /// The adapter's rank and alpha (none in full fine-tuning).
    pub lora_r: Option<usize>,
    pub lora_alpha: Option<f64>,
    pub lora_dropout: Option<f32>,
    pub trainable_params: u64,
    /// Which layers recomputed their activations, in words ("off", "every layer", ...).
    pub recompute: String,
    /// The LoRA paths ran as separate products (`--lora-apart`).
    pub lora_apart: bool,
    pub warmup: usize,
    pub steps: usize,
    /// How the steps were timed.
    pub clock: &'static str,
    pub step_seconds: Vec<f64>,
    /// Mean of `step_seconds`.
    pub step_s: f64,
    pub tokens_per_s: f64,
    /// Model FLOPs of a step over its tokens.
    pub flops_per_token: f64,
    /// `flops_per_token × tokens_per_s / 1e12`.
    pub tflops: f64,
    pub gemm: GemmRate,
    /// `tflops / gemm.tflops`.
    pub mfu: f64,
    pub peak_memory_bytes: Option<u64>,
    /// What `peak_memory_bytes` measures.
    pub peak_memory: String,
    /// The backend's activation arena after the steps, where it has one.
    pub arena: Option<crate::ops::ArenaStats>,
    /// The most times the host waited for the device inside one timed step (reading the
    /// loss and the gradient norm), where there is a device. (A warm-up step also waits
    /// where the activation arena is laid out.)
    pub host_waits_per_step: Option<u64>,
    pub loss_first: f64,
    pub loss_last: f64,
    pub profile: Option<ProfileReport>,
    /// Where the backend has kernels (and with the profile).
    pub kernels: Option<KernelSplit>,
    pub anchors: Vec<AnchorRatio>,
}

/// The process's peak resident set (`VmHWM` of /proc/self/status), where there is one.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?;
    kb.trim().trim_end_matches("kB").trim().parse::<u64>().ok().map(|kb| kb * 1024)
}

/// Runs the benchmark on `ops`: `warmup` steps, `steps` timed steps, one profiled step
/// (unless turned off), then the GEMM rate. Progress goes to stderr.
/// Runs `f` with [`Ops::kernel_clock`] on and returns its result with the kernels it
/// queued; `None`, without running `f`, where ops are not kernels (the CPU).
fn with_kernel_clock<O: Ops, R>(
    ops: &O,
    f: impl FnOnce() -> Result<R>,
) -> Result<Option<(R, Vec<KernelClock>)>> {
    if !ops.kernel_clock(true)? {
        return Ok(None);
    }
    let r = f().and_then(|r| Ok((r, ops.kernel_times()?)));
    ops.kernel_clock(false)?;
    r.map(Some)
}

pub fn run<O: Ops>(ops: &O, opts: &BenchOptions) -> Result<BenchReport> {
    opts.check()?;
    let (name, cfg) = opts.model.load()?;
    let batch = synthetic_batch(&cfg, opts.seq, opts.batch, opts.packing, opts.seed)?;
    if opts.full {
        let st = FullStep::new(ops, cfg.clone(), batch, opts.seed)?;
        return measure(ops, opts, name, &cfg, st, None);
    }
    let lora = LoraConfig::new(opts.lora_r, 2.0 * opts.lora_r as f64, Proj::ALL.to_vec());
    let mut st = LoraStep::new(ops, cfg.clone(), &lora, batch, opts.seed)?;
    if !opts.lora_apart {
        // as fine-tuning runs it: the LoRA updates inside the frozen products
        st.frozen.reserve_lora_tails(ops, &st.params)?;
    }
    measure(ops, opts, name, &cfg, st, Some(&lora))
}

/// Times `st`'s steps as [`run`] describes.
fn measure<O: Ops, P: Trainable<O::Tensor>>(
    ops: &O,
    opts: &BenchOptions,
    name: String,
    cfg: &ModelConfig,
    mut st: TrainStep<O::Tensor, P>,
    lora: Option<&LoraConfig>,
) -> Result<BenchReport> {
    let documents = st.batch.seq_lens.len();
    let flops = step_flops(cfg, &st.batch.seq_lens, opts.full);
    let tokens = st.batch.ids.len();
    st.recompute = opts.recompute;
    st.lora_dropout = opts.lora_dropout;
    let mut device_peak = ops.memory_in_use();
    let mut sample = |m: Option<u64>| {
        if let Some(m) = m {
            device_peak = Some(device_peak.map_or(m, |p: u64| p.max(m)));
        }
    };

    let mut losses = Vec::new();
    let mut step_seconds = Vec::new();
    let mut host_waits_per_step = None;
    for i in 0..opts.warmup + opts.steps {
        let (loss, s) = ops.timed(|| {
            let before = ops.host_waits();
            let loss = st.step(ops)?;
            let waits = ops.host_waits().zip(before).map(|(after, before)| after - before);
            if i >= opts.warmup {
                host_waits_per_step = host_waits_per_step.max(waits);
            }
            Ok(loss)
        })?;
        sample(ops.memory_in_use());
        let what = if i < opts.warmup { "warm-up" } else { "timed" };
        eprintln!("step {i} ({what}): loss {loss:.4} in {s:.3} s");
        if i >= opts.warmup {
            step_seconds.push(s);
        }
        losses.push(loss);
    }
    // before the profiled step and the GEMM, so the peak is the training steps' own
    let host_peak = peak_rss_bytes();

    let profile = if opts.profile {
        let p = Profiled::new(ops);
        let (_, step_s) = p.timed(|| st.step(&p))?;
        sample(p.peak_memory());
        let ops_times = p.times();
        let in_ops: f64 = ops_times.iter().map(|o| o.seconds).sum();
        eprintln!("profiled step: {step_s:.3} s");
        Some(ProfileReport { step_s, ops: ops_times, other_s: (step_s - in_ops).max(0.0) })
    } else {
        None
    };
    let kernels = if opts.profile {
        with_kernel_clock(ops, || ops.timed(|| st.step(ops)))?.map(|((_, step_s), kernels)| {
            eprintln!("step with every kernel between events: {step_s:.3} s");
            KernelSplit { step_s, kernels }
        })
    } else {
        None
    };

    let n = opts.gemm_n(ops);
    let gemm = gemm_rate(ops, n)?;
    eprintln!("gemm {n}³: {:.4} TFLOP/s over {} products", gemm.tflops, gemm.reps);

    let step_s = step_seconds.iter().sum::<f64>() / step_seconds.len() as f64;
    let tokens_per_s = tokens as f64 / step_s;
    let flops_per_token = flops / tokens as f64;
    let tflops = flops_per_token * tokens_per_s / 1e12;
    let (peak_memory_bytes, peak_memory) = match (device_peak, host_peak) {
        (Some(d), _) => (
            Some(d),
            if opts.profile {
                "device memory in use (cuMemGetInfo total − free: the whole GPU, CUDA context \
                 included), peak of samples after every op of the profiled step"
            } else {
                "device memory in use (cuMemGetInfo total − free: the whole GPU, CUDA context \
                 included), sampled between steps only (the activation arena's region, where \
                 there is one, included; other activations freed)"
            }
            .to_string(),
        ),
        (None, Some(h)) => (Some(h), "peak resident set of the process (VmHWM), host memory".into()),
        (None, None) => (None, "not measured".into()),
    };
    // the anchors are LoRA runs
    let preset = opts.model.preset_name().filter(|_| !opts.full);
    let anchors = anchors::matching(preset, opts.seq, opts.batch, opts.packing)
        .into_iter()
        .map(|a| AnchorRatio {
            system: a.system,
            tokens_per_s: a.tokens_per_s,
            memory_gib: a.memory_gib,
            ratio: tokens_per_s / a.tokens_per_s,
        })
        .collect();
    Ok(BenchReport {
        model: name,
        preset: opts.model.preset_name().map(str::to_string),
        backend: ops.name(),
        threads: rayon::current_num_threads(),
        seq: opts.seq,
        batch: opts.batch,
        packing: opts.packing,
        documents,
        tokens_per_step: tokens,
        full: opts.full,
        lora_r: lora.map(|l| l.r),
        lora_alpha: lora.map(|l| l.lora_alpha),
        lora_dropout: lora.map(|_| opts.lora_dropout),
        trainable_params: st.trainable_params(ops),
        recompute: opts.recompute.describe(cfg.num_hidden_layers),
        lora_apart: opts.lora_apart,
        warmup: opts.warmup,
        steps: opts.steps,
        clock: ops.clock(),
        step_seconds,
        step_s,
        tokens_per_s,
        flops_per_token,
        tflops,
        mfu: tflops / gemm.tflops,
        gemm,
        peak_memory_bytes,
        peak_memory,
        arena: ops.arena_stats(),
        host_waits_per_step,
        loss_first: losses.first().copied().unwrap_or(f64::NAN),
        loss_last: losses.last().copied().unwrap_or(f64::NAN),
        profile,
        kernels,
        anchors,
    })
}

/// TFLOP/s with digits enough for a CPU's small rates.
fn tflops_str(x: f64) -> String {
    if x >= 1.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.4}")
    }
}

impl BenchReport {
    /// The report as one JSON line.
    pub fn json_line(&self) -> Result<String> {
        Ok(serde_json::to_string(self)?)
    }

    /// Markdown tables: the result, how it was measured, the time split per op and the
    /// anchors at this shape.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let mut layout =
            if self.packing { format!("packed, {} docs", self.documents) } else { "rows".into() };
        if self.recompute != "off" {
            layout.push_str(&format!(", recompute {}", self.recompute));
        }
        if self.lora_apart {
            layout.push_str(", LoRA apart");
        }
        if let Some(p) = self.lora_dropout.filter(|&p| p > 0.0) {
            layout.push_str(&format!(", LoRA dropout {p}"));
        }
        if self.full {
            layout.push_str(", full fine-tuning");
        }
        let backend = if self.backend == "cpu" {
            format!("cpu ({} threads)", self.threads)
        } else {
            self.backend.to_string()
        };
        let mem = self.peak_memory_bytes.map_or("-".into(), |b| format!("{:.2} GiB", gib(b)));
        let _ = writeln!(
            s,
            "| model | backend | seq x batch | layout | step s | tokens/s | model TFLOP/s | GEMM TFLOP/s | MFU | peak memory |"
        );
        let _ = writeln!(s, "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
        let _ = writeln!(
            s,
            "| {} | {backend} | {} x {} | {layout} | {:.3} | {:.0} | {} | {} ({}³) | {:.1}% | {mem} |",
            self.model,
            self.seq,
            self.batch,
            self.step_s,
            self.tokens_per_s,
            tflops_str(self.tflops),
            tflops_str(self.gemm.tflops),
            self.gemm.n,
            100.0 * self.mfu,
        );
        let recompute = match self.recompute.as_str() {
            "off" => "activation recompute off".to_string(),
            layers => format!("activation recompute in {layers} (its forward runs again in the backward)"),
        };
        let (trained, linear_factor) = match (self.lora_r, self.lora_alpha) {
            (Some(r), Some(alpha)) => (format!("LoRA r={r} alpha={alpha} on all seven projections"), 4),
            _ => ("every weight trained (full fine-tuning, f32 master weights)".to_string(), 6),
        };
        let _ = writeln!(
            s,
            "\n{trained} ({} trainable parameters); mean of {} timed steps after {} warm-up ({}); loss \
             {:.4} -> {:.4}; {:.3e} model FLOPs per token ({linear_factor} × linear parameters incl. \
             lm_head + 3.5 × causal attention); MFU against the GEMM rate measured here through \
             linear_fwd; peak memory: {}; {recompute}.",
            self.trainable_params,
            self.steps,
            self.warmup,
            self.clock,
            self.loss_first,
            self.loss_last,
            self.flops_per_token,
            self.peak_memory,
        );
        if let Some(a) = self.arena.filter(|a| a.plans > 0) {
            let _ = writeln!(
                s,
                "\nActivation arena: {:.3} GiB laid out for a step that has at most {:.3} GiB of buffers \
                 alive at once ({:.1}% over); {} buffers placed in it, {} from the pool (the first, \
                 recorded step's, and any the plan had no room for).",
                gib(a.plan_bytes),
                gib(a.plan_live_peak),
                100.0 * (a.plan_bytes as f64 / a.plan_live_peak.max(1) as f64 - 1.0),
                a.placed,
                a.pooled,
            );
        }
        if let Some(w) = self.host_waits_per_step {
            let _ = writeln!(
                s,
                "\nThe host waited for the device {w} times in a timed step (a step reads back \
                 the loss sums and the gradient norm together, after its AdamW update is queued)."
            );
        }
        if let Some(p) = &self.profile {
            let _ = writeln!(
                s,
                "\n| op (one profiled step, {:.3} s) | calls | ms | share | model TFLOP/s | ms at the GEMM rate |",
                p.step_s
            );
            let _ = writeln!(s, "| --- | --- | --- | --- | --- | --- |");
            let share = |t: f64| 100.0 * t / p.step_s.max(1e-12);
            for o in &p.ops {
                let (rate, floor) = if o.flops > 0.0 {
                    (
                        tflops_str(o.flops / o.seconds.max(1e-12) / 1e12),
                        format!("{:.1}", 1e3 * o.flops / (self.gemm.tflops * 1e12).max(1e-12)),
                    )
                } else {
                    ("-".into(), "-".into())
                };
                let _ = writeln!(
                    s,
                    "| {} | {} | {:.1} | {:.1}% | {rate} | {floor} |",
                    o.op,
                    o.calls,
                    1e3 * o.seconds,
                    share(o.seconds)
                );
            }
            let _ =
                writeln!(s, "| (outside ops) | | {:.1} | {:.1}% | | |", 1e3 * p.other_s, share(p.other_s));
        }
        if let Some(k) = &self.kernels {
            let _ = writeln!(
                s,
                "\n| kernel (one step with each between events, {:.3} s) | calls | ms | share |",
                k.step_s
            );
            let _ = writeln!(s, "| --- | --- | --- | --- |");
            let share = |t: f64| 100.0 * t / k.step_s.max(1e-12);
            const SHOWN: usize = 30;
            for c in k.kernels.iter().take(SHOWN) {
                let _ = writeln!(
                    s,
                    "| {} | {} | {:.2} | {:.1}% |",
                    c.kernel,
                    c.calls,
                    1e3 * c.seconds,
                    share(c.seconds)
                );
            }
            let rest = &k.kernels[k.kernels.len().min(SHOWN)..];
            if !rest.is_empty() {
                let (calls, secs) = rest.iter().fold((0, 0.0), |(n, t), c| (n + c.calls, t + c.seconds));
                let what = format!("({} other kernels)", rest.len());
                let _ = writeln!(s, "| {what} | {calls} | {:.2} | {:.1}% |", 1e3 * secs, share(secs));
            }
            let gaps = k.step_s - k.kernels.iter().map(|c| c.seconds).sum::<f64>();
            let _ = writeln!(s, "| (between kernels) | | {:.2} | {:.1}% |", 1e3 * gaps, share(gaps));
        }
        if !self.anchors.is_empty() {
            let _ = writeln!(
                s,
                "\n| anchor at this shape (DESIGN.md, one H100) | tokens/s | memory | this run / anchor |"
            );
            let _ = writeln!(s, "| --- | --- | --- | --- |");
            for a in &self.anchors {
                let m = a.memory_gib.map_or("-".into(), |g| format!("{g:.1} GiB"));
                let _ = writeln!(s, "| {} | {:.0} | {m} | {:.3}× |", a.system, a.tokens_per_s, a.ratio);
            }
        }
        s
    }
}
