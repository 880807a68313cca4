//! The fine-tune loop: epochs of shuffled, packed rows; micro-batches accumulated to
//! the global batch; AdamW with warm-up and decay; gradient clipping; validation every
//! N steps; `metrics.jsonl`; checkpoints every N steps; bit-exact resume. The same loop
//! trains a LoRA adapter or, for full fine-tuning, the whole model ([`Trainable`]).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;

use super::checkpoint::{self, TrainerState};
use super::optim::{grad_clip, AdamW};
use super::pack::{batch_of, rows, Example};
use super::params::Trainable;
use super::schedule::Schedule;
use super::step::{eval_step, train_step, TokenBatch};
use crate::dist::{Collective, Single};
use crate::model::decoder::{Grads, Recompute};
use crate::model::Decoder;
use crate::ops::{AdamWParams, ClipStats, Dropout, GradScale, Ops};
use crate::util::gib;

#[derive(Clone, Debug, PartialEq)]
pub struct TrainConfig {
    pub seq_len: usize,
    pub packing: bool,
    /// Rows per optimizer step and per forward/backward.
    pub global_batch: usize,
    pub local_batch: usize,
    pub max_steps: Option<usize>,
    pub epochs: Option<usize>,
    pub val_every: Option<usize>,
    pub ckpt_every: Option<usize>,
    pub keep_last: usize,
    pub adamw: AdamWParams,
    pub warmup_steps: usize,
    pub decay: super::schedule::Decay,
    pub min_lr_ratio: f64,
    pub clip_grad_norm: Option<f64>,
    pub lora_dropout: f32,
    /// Which layers recompute their activations (see [`Decoder::recompute`]).
    pub recompute: Recompute,
    pub seed: u64,
    pub output_dir: PathBuf,
    /// Stop (after checkpointing) once this many steps are done, leaving the schedule
    /// as if the run went on: a time-boxed run that a later `--resume` continues.
    pub stop_after: Option<usize>,
    pub progress: bool,
}

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct Metrics {
    pub step: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_token_accuracy: Option<f64>,
}

pub struct TrainOutcome {
    pub steps: usize,
    pub history: Vec<Metrics>,
}

impl TrainOutcome {
    pub fn val_points(&self) -> Vec<(usize, f64, f64)> {
        self.history
            .iter()
            .filter_map(|m| Some((m.step, m.val_loss?, m.val_token_accuracy.unwrap_or(0.0))))
            .collect()
    }
}

/// The rows of one epoch: examples shuffled by `(seed, epoch)`, packed, rows shuffled.
fn epoch_rows(train: &[Example], cfg: &TrainConfig, epoch: usize) -> Vec<Vec<usize>> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9));
    let mut order: Vec<usize> = (0..train.len()).collect();
    order.shuffle(&mut rng);
    let shuffled: Vec<Example> = order.iter().map(|&i| train[i].clone()).collect();
    let mut r: Vec<Vec<usize>> = rows(&shuffled, cfg.seq_len, cfg.packing)
        .into_iter()
        .map(|row| row.iter().map(|&i| order[i]).collect())
        .collect();
    r.shuffle(&mut rng);
    r
}

pub fn steps_per_epoch(n_rows: usize, global: usize) -> usize {
    n_rows.div_ceil(global.max(1))
}

/// Mean loss and token accuracy over `val`, by rows of `local_batch`.
pub fn evaluate<O: Ops>(
    dec: &Decoder<O>,
    val: &[Example],
    seq_len: usize,
    local_batch: usize,
) -> Result<(f64, f64)> {
    evaluate_sharded(dec, val, seq_len, local_batch, &Single)
}

/// [`evaluate`] with the batches shared out over the ranks of `dist` and the sums
/// combined: every rank gets the whole set's figures.
pub fn evaluate_sharded<O: Ops>(
    dec: &Decoder<O>,
    val: &[Example],
    seq_len: usize,
    local_batch: usize,
    dist: &dyn Collective<O>,
) -> Result<(f64, f64)> {
    let all = rows(val, seq_len, true);
    let chunks: Vec<_> = all.chunks(local_batch.max(1)).collect();
    let mine = shard(chunks.len(), dist.rank(), dist.world_size());
    let mut on_device = dec.ops.loss_sums()?;
    for chunk in &chunks[mine] {
        eval_step(dec, &batch_of(val, chunk, seq_len), None, &mut on_device)?;
    }
    let r = dec.ops.read_loss(&on_device)?;
    let mut sums = [r.loss_sum, r.n_counted as f64, r.n_correct as f64];
    dist.all_reduce_sum(dec.ops, &mut [], &mut sums)?;
    let [loss, counted, correct] = sums;
    ensure!(counted > 0.0, "the validation set has no trained tokens");
    Ok((loss / counted, correct / counted))
}

/// The contiguous share of `n` items that rank `rank` of `world` takes.
pub fn shard(n: usize, rank: usize, world: usize) -> std::ops::Range<usize> {
    let world = world.max(1);
    n * rank / world..n * (rank + 1) / world
}

/// What one global batch came to, summed over the ranks.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchStats {
    /// Sum of the trained tokens' losses over the ranks, where there is more than one
    /// (read from the losses and summed with the gradients). `None` with one rank: the
    /// sum stays in the losses on the device, unread, so that nothing waits for it.
    pub loss_sum: Option<f64>,
    /// Trained tokens (the mean's denominator).
    pub n_targets: usize,
    /// Tokens run through the model.
    pub tokens: usize,
    /// Values summed over the ranks (gradients and the two host sums), and the seconds
    /// the sum took on this rank (waiting for the slowest rank included).
    pub reduced_values: usize,
    pub reduce_s: f64,
    /// Whether a signal asked any rank to stop ([`crate::interrupt`]) before its share
    /// of this batch was summed: every rank sees the same answer.
    pub stop_requested: bool,
}

/// The gradient of the global batch's mean loss, into `grads` (zeroed first).
/// `micro` holds all the global batch's micro-batches, the same list on every rank; this
/// rank runs its contiguous share, each micro-batch's loss scaled by the whole batch's
/// count of trained tokens, and the shares are summed over the ranks of `dist`: each
/// layer's gradients as one bucket, started as soon as this rank's last micro-batch's
/// backward has finished that layer (so the sums overlap the backward of the layers
/// below, where the collective can), then the rest. One process (`Single`) running
/// every micro-batch gets the same gradient up to the order of the additions.
/// `prepare(i, decoder)` sets micro-batch `i`'s LoRA dropout (keyed by its place in the
/// global batch, so it does not depend on the ranks) and activation recompute. This
/// rank's losses are added into `losses` ([`BatchStats::loss_sum`] says when they are
/// read).
#[allow(clippy::too_many_arguments)]
pub fn global_batch_gradients<O: Ops, P: Trainable<O::Tensor>>(
    ops: &O,
    frozen: &P::Frozen,
    params: &P,
    micro: &[TokenBatch],
    grads: &mut P,
    prepare: impl Fn(usize, &mut Decoder<'_, O>),
    dist: &dyn Collective<O>,
    losses: &mut O::LossSums,
) -> Result<BatchStats> {
    let denom: usize = micro.iter().map(|b| b.n_targets()).sum();
    ops.fill_zero_all(&mut grads.tensors_mut())?;
    let mut host = [0.0f64, 0.0, 0.0]; // loss sum, tokens, ranks asked to stop
    let copy = params.compute_copy(ops)?;
    let params = copy.as_ref().unwrap_or(params);
    // Every rank starts the layers' buckets in the same order (the backward's, last
    // layer first); a rank whose share is empty starts them after its loop.
    let n_layers = grads.as_grads().n_layers();
    let started = std::cell::Cell::new(0usize);
    let start = |l: usize, g: &Grads<'_, O::Tensor>| -> Result<()> {
        ensure!(l + 1 + started.get() == n_layers, "gradient buckets out of order: layer {l}");
        dist.start_bucket(ops, &g.layer(l))?;
        started.set(started.get() + 1);
        Ok(())
    };
    let mine = shard(micro.len(), dist.rank(), dist.world_size());
    // the micro-batches' losses add up on the device: read once, after all are queued
    for i in mine.clone() {
        let mut dec = params.decoder(ops, frozen);
        prepare(i, &mut dec);
        if i + 1 == mine.end {
            dec.layer_done = Some(&start);
        }
        train_step(&dec, &micro[i], grads.as_grads(), Some(denom), None, losses)?;
        host[1] += micro[i].ids.len() as f64;
    }
    {
        let g = grads.as_grads();
        for l in (0..n_layers - started.get()).rev() {
            start(l, &g)?;
        }
    }
    let exchanged = dist.world_size() > 1;
    if exchanged {
        host[0] = ops.read_loss(losses)?.loss_sum;
    }
    host[2] = f64::from(u8::from(crate::interrupt::requested()));
    let mut tensors = grads.tensors_mut();
    let reduced_values =
        tensors.iter().map(|t| ops.shape(t).iter().product::<usize>()).sum::<usize>() + host.len();
    let t0 = Instant::now();
    let reduce = crate::profiling::range(c"all_reduce");
    dist.all_reduce_sum(ops, &mut tensors, &mut host)?;
    drop(reduce);
    let reduce_s = t0.elapsed().as_secs_f64();
    Ok(BatchStats {
        loss_sum: exchanged.then_some(host[0]),
        n_targets: denom,
        tokens: host[1] as usize,
        reduced_values,
        reduce_s,
        stop_requested: host[2] > 0.0,
    })
}

struct MetricsLog {
    /// `None` on the ranks other than 0, which keep the history but write nothing.
    path: Option<PathBuf>,
    history: Vec<Metrics>,
}

impl MetricsLog {
    /// Opens `metrics.jsonl`, keeping only lines up to `upto` steps (a resumed run
    /// redoes what came after its checkpoint) and written whole (a run killed while it
    /// appended a line leaves it unterminated; that step came after its last checkpoint).
    /// The lines kept are written back as they were, byte for byte. With `write` false,
    /// reads it only.
    fn open(dir: &Path, upto: usize, write: bool) -> Result<Self> {
        let path = dir.join("metrics.jsonl");
        let (mut history, mut kept) = (Vec::new(), String::new());
        if let Ok(text) = std::fs::read_to_string(&path) {
            let whole = crate::util::whole_lines(&text);
            for (i, line) in whole.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                let m: Metrics = serde_json::from_str(line)
                    .with_context(|| format!("{}:{}: bad line {line}", path.display(), i + 1))?;
                if m.step <= upto {
                    history.push(m);
                    kept.push_str(line);
                    kept.push('\n');
                }
            }
        }
        if write {
            crate::util::atomic_write(&path, kept.as_bytes())?;
        }
        Ok(Self { path: write.then_some(path), history })
    }

    fn push(&mut self, m: Metrics) -> Result<()> {
        if let Some(path) = &self.path {
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(path)
                .with_context(|| format!("opening {}", path.display()))?;
            let mut line = serde_json::to_vec(&m)?;
            line.push(b'\n');
            f.write_all(&line).with_context(|| format!("writing {}", path.display()))?;
        }
        self.history.push(m);
        Ok(())
    }
}

/// Names and shapes of a set of trained tensors.
fn layout<O: Ops, P: Trainable<O::Tensor>>(ops: &O, params: &P) -> Vec<(String, Vec<usize>)> {
    params.named().into_iter().map(|(n, t)| (n, ops.shape(t).to_vec())).collect()
}

/// Trains `params` on `train`, validating on `val`: an `Adapter` on the frozen base
/// model `frozen`, or a `Model` itself (full fine-tuning, `frozen` is `&()`). With
/// `resume`, continues from the newest checkpoint in `output_dir/checkpoints` (an error
/// if there is none) in place of `params`.
pub fn train<O: Ops, P: Trainable<O::Tensor>>(
    ops: &O,
    frozen: &P::Frozen,
    params: P,
    train: &[Example],
    val: &[Example],
    cfg: &TrainConfig,
    resume: bool,
) -> Result<(P, TrainOutcome)> {
    train_data_parallel(ops, frozen, params, train, val, cfg, resume, &Single)
}

/// [`train`] as one rank of a data-parallel run: every rank walks the same sequence of
/// global batches, runs its share of each and sums the gradients through `dist`
/// (see [`global_batch_gradients`]), so all ranks take the same optimizer step. Rank 0
/// alone writes checkpoints, `metrics.jsonl` and the progress bar. The data position is
/// kept in global rows, so a run may resume with another number of ranks.
#[allow(clippy::too_many_arguments)]
pub fn train_data_parallel<O: Ops, P: Trainable<O::Tensor>>(
    ops: &O,
    frozen: &P::Frozen,
    params: P,
    train: &[Example],
    val: &[Example],
    cfg: &TrainConfig,
    resume: bool,
    dist: &dyn Collective<O>,
) -> Result<(P, TrainOutcome)> {
    ensure!(!train.is_empty(), "no training examples");
    let world = dist.world_size();
    let root = dist.rank() == 0;
    ensure!(
        cfg.global_batch % (cfg.local_batch.max(1) * world) == 0,
        "the global batch ({}) must be a multiple of the local batch ({}) times the number of ranks ({world})",
        cfg.global_batch,
        cfg.local_batch
    );
    let ckpt_root = cfg.output_dir.join("checkpoints");
    // Every epoch packs the same lengths, so it has as many rows as the first.
    let first_epoch = epoch_rows(train, cfg, 0);
    let per_epoch = steps_per_epoch(first_epoch.len(), cfg.global_batch);
    let total_steps = super::schedule::total_steps(cfg.max_steps, cfg.epochs, per_epoch).max(1);

    let (mut state, mut params, mut opt) = if resume {
        let Some((_, dir)) = checkpoint::list(&ckpt_root)?.pop() else {
            bail!("--resume: no checkpoint in {}", ckpt_root.display());
        };
        let want = layout(ops, &params);
        // the checkpoint replaces the fresh tensors: free them first (a whole model in a
        // full run)
        drop(params);
        let (state, params, opt) = checkpoint::load::<O, P>(ops, &dir, frozen)?;
        let got = layout(ops, &params);
        if got != want {
            let diff = want.iter().zip(&got).find(|(w, g)| w != g);
            bail!(
                "{}: holds {} tensors where this recipe trains {}{}",
                dir.display(),
                got.len(),
                want.len(),
                diff.map(|(w, g)| format!(" (e.g. `{}` {:?}, recipe `{}` {:?})", g.0, g.1, w.0, w.1))
                    .unwrap_or_default()
            );
        }
        ensure!(
            state.total_steps == total_steps && state.seed == cfg.seed,
            "{}: saved by a run of {} steps with seed {}, this recipe makes {} steps with seed {}",
            dir.display(),
            state.total_steps,
            state.seed,
            total_steps,
            cfg.seed
        );
        tracing::info!("resuming from {} (step {})", dir.display(), state.step);
        (state, params, opt)
    } else {
        if !checkpoint::list(&ckpt_root)?.is_empty() {
            bail!(
                "{} holds checkpoints of an earlier run: pass --resume to continue it, or choose another output_dir",
                ckpt_root.display()
            );
        }
        let opt = AdamW::new(ops, &params, cfg.adamw)?;
        let state =
            TrainerState { step: 0, epoch: 0, cursor: 0, total_steps, seed: cfg.seed, tokens_seen: 0 };
        (state, params, opt)
    };
    std::fs::create_dir_all(&cfg.output_dir)
        .with_context(|| format!("creating {}", cfg.output_dir.display()))?;
    let mut log = MetricsLog::open(&cfg.output_dir, state.step, root)?;
    let sched = Schedule {
        lr: cfg.adamw.lr as f64,
        warmup_steps: cfg.warmup_steps,
        total_steps,
        decay: cfg.decay,
        min_lr_ratio: cfg.min_lr_ratio,
    };
    let bar = if cfg.progress && root {
        indicatif::ProgressBar::new(total_steps as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} step {pos}/{len} {msg} ETA {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_position(state.step as u64);
    let say = |s: String| match (root, bar.is_hidden()) {
        (false, _) => {}
        (true, true) => eprintln!("{s}"),
        (true, false) => bar.println(s),
    };

    let validate = |params: &P| -> Result<(f64, f64)> {
        let _range = crate::profiling::range(c"validate");
        let copy = params.compute_copy(ops)?;
        let params = copy.as_ref().unwrap_or(params);
        evaluate_sharded(&params.decoder(ops, frozen), val, cfg.seq_len, cfg.local_batch, dist)
    };
    if state.step == 0 && !val.is_empty() && !log.history.iter().any(|m| m.val_loss.is_some()) {
        let (l, a) = validate(&params)?;
        say(format!("step 0: val_loss {l:.4}, val_token_accuracy {a:.3}"));
        log.push(Metrics { step: 0, val_loss: Some(l), val_token_accuracy: Some(a), ..Default::default() })?;
    }

    let mut plan = if state.epoch == 0 { first_epoch } else { epoch_rows(train, cfg, state.epoch) };
    // allocated once: a full run's gradients are as large as the model
    let mut grads = params.zeros(ops)?;
    let stop = cfg.stop_after.unwrap_or(total_steps).min(total_steps);
    let first_step = state.step;
    while state.step < stop {
        let _step = crate::profiling::range(c"step");
        let t0 = Instant::now();
        // this step's rows, continuing into the next epoch when this one runs out
        let mut step_rows = Vec::with_capacity(cfg.global_batch);
        while step_rows.len() < cfg.global_batch {
            if state.cursor >= plan.len() {
                state.epoch += 1;
                state.cursor = 0;
                plan = epoch_rows(train, cfg, state.epoch);
            }
            step_rows.push(plan[state.cursor].clone());
            state.cursor += 1;
        }
        let micro: Vec<_> =
            step_rows.chunks(cfg.local_batch).map(|c| batch_of(train, c, cfg.seq_len)).collect();
        let prepare = |i: usize, dec: &mut Decoder<'_, O>| {
            dec.lora_dropout = (cfg.lora_dropout > 0.0).then(|| Dropout {
                p: cfg.lora_dropout,
                seed: cfg.seed ^ ((state.step as u64) << 20 | i as u64).wrapping_mul(0xA076_1D64_78BD_642F),
            });
            dec.recompute = cfg.recompute;
        };
        let mut losses = ops.loss_sums()?;
        let stats =
            global_batch_gradients(ops, frozen, &params, &micro, &mut grads, prepare, dist, &mut losses)?;
        let tokens = stats.tokens;
        if root && dist.kind() != "single" && (state.step + 1) % 50 == 1 {
            say(format!(
                "[rank 0] step {}: all-reduce over {} of {} values ({:.2} MB f32) in {:.1} ms",
                state.step + 1,
                dist.kind(),
                stats.reduced_values,
                stats.reduced_values as f64 * 4.0 / 1e6,
                stats.reduce_s * 1e3
            ));
        }
        if state.step == first_step {
            if let Some(a) = ops.arena_stats().filter(|a| a.plans > 0) {
                say(format!(
                    "activation arena: {:.3} GiB after the first step (its largest plan has at most \
                     {:.3} GiB of buffers alive at once)",
                    gib(a.region_bytes),
                    gib(a.plan_live_peak),
                ));
            }
        }
        // The optimizer step is queued before the loss and the norm are read, so the
        // host waits for the device once a step; AdamW changes nothing when the norm is
        // not finite, and a run whose loss or norm is not finite stops before it saves.
        let opt_range = crate::profiling::range(c"optimizer");
        let clip = grad_clip(ops, &grads, cfg.clip_grad_norm)?;
        let lr = sched.lr_at(state.step);
        opt.update(ops, &mut params, &grads, lr as f32, GradScale::Clip(&clip))?;
        drop(opt_range);
        let (step_loss, ClipStats { norm: gnorm, .. }) = ops.read_step(&losses, &clip)?;
        let loss = stats.loss_sum.unwrap_or(step_loss.loss_sum) / stats.n_targets.max(1) as f64;
        if !loss.is_finite() || !gnorm.is_finite() {
            bail!(
                "loss is {loss} and the gradient norm {gnorm} at step {}: stopping without saving it \
                 (the last checkpoint is as it was)",
                state.step + 1
            );
        }
        state.step += 1;
        state.tokens_seen += tokens as u64;
        let tps = tokens as f64 / t0.elapsed().as_secs_f64().max(1e-9);
        bar.set_position(state.step as u64);
        bar.set_message(format!("loss {loss:.4} lr {lr:.2e} {tps:.0} tok/s"));
        let mut m = Metrics {
            step: state.step,
            loss: Some(loss),
            lr: Some(lr),
            grad_norm: Some(gnorm),
            tokens_per_s: Some(tps),
            ..Default::default()
        };
        let last = state.step == total_steps;
        if !val.is_empty() && (last || cfg.val_every.is_some_and(|n| n > 0 && state.step % n == 0)) {
            let (l, a) = validate(&params)?;
            say(format!("step {}: loss {loss:.4}, val_loss {l:.4}, val_token_accuracy {a:.3}", state.step));
            (m.val_loss, m.val_token_accuracy) = (Some(l), Some(a));
        }
        log.push(m)?;
        // a signal: stop here with a checkpoint, unless this step ends the run anyway
        let interrupted = stats.stop_requested && !last;
        let stopping = state.step == stop || interrupted;
        if root && (last || stopping || cfg.ckpt_every.is_some_and(|n| n > 0 && state.step % n == 0)) {
            let _range = crate::profiling::range(c"checkpoint");
            let dir = checkpoint::save(ops, &ckpt_root, &state, &params, &opt)?;
            checkpoint::prune(&ckpt_root, cfg.keep_last)?;
            tracing::info!("checkpoint {}", dir.display());
        }
        if interrupted {
            bar.finish_and_clear();
            return Err(crate::interrupt::Interrupted {
                what: format!(
                    "stopped by a signal after step {} of {total_steps}, its checkpoint in {}",
                    state.step,
                    ckpt_root.display()
                ),
            }
            .into());
        }
    }
    if let Some(a) = ops.arena_stats().filter(|a| a.plans > 0) {
        say(format!(
            "activation arena: {:.3} GiB at the end; {} of the planned steps' {} buffers placed in it \
             (the others from the pool: the first step of each kind, and buffers larger than \
             any before them)",
            gib(a.region_bytes),
            a.placed,
            a.placed + a.pooled,
        ));
    }
    bar.finish_and_clear();
    Ok((params, TrainOutcome { steps: state.step, history: log.history }))
}
