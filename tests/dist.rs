//! Data parallelism on the CPU backend, through the code path the GPUs take (only the
//! collective differs: TCP here, NCCL there): N ranks' summed shares of a global batch
//! give one process's gradient over the whole batch; N-rank training follows the
//! single-process run, and resumes with another number of ranks; a rank that dies stops
//! the others with its name, and leaves the last checkpoint intact.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{adapter_values, base_model, free_port, train_losses, tuneloop_cmd as tuneloop};
use tuneloop::dist::{Collective, DistEnv, Single, TcpGroup};
use tuneloop::model::{Adapter, Decoder, Model};
use tuneloop::ops::cpu::{CpuOps, CpuTensor};
use tuneloop::ops::{Dropout, Ops};
use tuneloop::train::pack::Example;
use tuneloop::train::trainer::{global_batch_gradients, train, train_data_parallel, TrainConfig};
use tuneloop::train::{TokenBatch, Trainable};
use tuneloop::util::rel_l2;

fn env(rank: usize, world: usize, port: u16) -> DistEnv {
    DistEnv {
        rank,
        world_size: world,
        local_rank: rank,
        local_world_size: world,
        master_addr: "127.0.0.1".into(),
        master_port: port,
        timeout: Duration::from_secs(60),
        launched: true,
    }
}

/// Micro-batches of uneven lengths and loss masks (so the ranks' token counts differ).
fn micro_batches(n: usize, vocab: usize) -> Vec<TokenBatch> {
    (0..n)
        .map(|m| {
            let mut b = TokenBatch::default();
            for s in 0..1 + m % 3 {
                let len = 5 + (m * 7 + s * 3) % 11;
                let ids: Vec<u32> = (0..len).map(|t| ((m * 31 + s * 17 + t * 5) % vocab) as u32).collect();
                let labels = ids
                    .iter()
                    .enumerate()
                    .map(|(t, &x)| if t < 1 + m % 4 { -100 } else { x as i64 })
                    .collect::<Vec<_>>();
                b.push(&ids, &labels);
            }
            b
        })
        .collect()
}

fn flat<T: Trainable<CpuTensor>>(p: &T) -> Vec<f32> {
    p.named().into_iter().flat_map(|(_, t)| CpuOps.download(t).unwrap()).collect()
}

/// Zeroed loss sums.
fn sums() -> tuneloop::ops::LossStats {
    CpuOps.loss_sums().unwrap()
}

/// The golden model with the golden adapter (non-zero B, so every LoRA tensor has a gradient).
fn model_and_adapter() -> (Model<CpuTensor>, Adapter<CpuTensor>) {
    let case = common::golden("llama-gqa");
    let model = Model::load(&CpuOps, &case.join("model")).unwrap();
    let adapter = Adapter::load(&CpuOps, &case.join("adapter"), &model.cfg).unwrap();
    (model, adapter)
}

fn dropout(i: usize, dec: &mut Decoder<'_, CpuOps>) {
    dec.lora_dropout = Some(Dropout { p: 0.1, seed: 99 + i as u64 });
}

/// Every rank's gradient after [`global_batch_gradients`] over `world` ranks on loopback.
fn ranks_gradients<P: Trainable<CpuTensor> + Sync>(
    frozen: &P::Frozen,
    params: &P,
    micro: &[TokenBatch],
    world: usize,
) -> Vec<(Vec<f32>, f64, usize)>
where
    P::Frozen: Sync,
{
    let port = free_port();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..world)
            .map(|r| {
                s.spawn(move || {
                    let group = TcpGroup::join(&env(r, world, port)).unwrap();
                    let mut grads = params.zeros(&CpuOps).unwrap();
                    let mut losses = CpuOps.loss_sums().unwrap();
                    let st = global_batch_gradients(
                        &CpuOps,
                        frozen,
                        params,
                        micro,
                        &mut grads,
                        dropout,
                        &group,
                        &mut losses,
                    )
                    .unwrap();
                    (flat(&grads), st.loss_sum.expect("summed over the ranks"), st.tokens)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn ranks_summed_shares_equal_one_process_over_the_global_batch() {
    let (model, adapter) = model_and_adapter();
    let micro = micro_batches(8, model.cfg.vocab_size);
    let mut grads = adapter.zeros(&CpuOps).unwrap();
    let mut losses = CpuOps.loss_sums().unwrap();
    let one =
        global_batch_gradients(&CpuOps, &model, &adapter, &micro, &mut grads, dropout, &Single, &mut losses)
            .unwrap();
    // one rank: the loss stays in the sums, unread
    assert_eq!(one.loss_sum, None);
    let one_loss = CpuOps.read_loss(&losses).unwrap().loss_sum;
    let want = flat(&grads);
    assert!(want.iter().any(|&g| g != 0.0));
    for world in [2, 4] {
        for (rank, (got, loss_sum, tokens)) in
            ranks_gradients(&model, &adapter, &micro, world).into_iter().enumerate()
        {
            let e = rel_l2(&got, &want);
            assert!(e < 1e-6, "world {world}, rank {rank}: gradient off by {e:.2e}");
            assert!((loss_sum - one_loss).abs() <= 1e-9 * one_loss.abs(), "world {world}: loss sum");
            assert_eq!(tokens, one.tokens);
        }
    }
    // full fine-tuning: the model's own gradients
    let mut grads = model.zeros(&CpuOps).unwrap();
    global_batch_gradients(&CpuOps, &(), &model, &micro[..4], &mut grads, |_, _| {}, &Single, &mut sums())
        .unwrap();
    let want = flat(&grads);
    for (got, _, _) in ranks_gradients(&(), &model, &micro[..4], 2) {
        let e = rel_l2(&got, &want);
        assert!(e < 1e-6, "full fine-tuning over 2 ranks: gradient off by {e:.2e}");
    }
}

/// A collective of one that records what it is given: each started bucket's values at
/// the moment it was started, and how many tensors the final sum was left with.
struct Recording {
    rank: usize,
    world: usize,
    buckets: std::cell::RefCell<Vec<Vec<Vec<f32>>>>,
    rest: std::cell::Cell<usize>,
}

impl Collective<CpuOps> for Recording {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn kind(&self) -> &'static str {
        "recording"
    }
    fn start_bucket(&self, ops: &CpuOps, tensors: &[&CpuTensor]) -> anyhow::Result<()> {
        self.buckets.borrow_mut().push(tensors.iter().map(|t| ops.download(t).unwrap()).collect());
        Ok(())
    }
    fn all_reduce_sum(
        &self,
        _: &CpuOps,
        tensors: &mut [&mut CpuTensor],
        _: &mut [f64],
    ) -> anyhow::Result<()> {
        self.rest.set(tensors.len() - self.buckets.borrow().iter().map(Vec::len).sum::<usize>());
        Ok(())
    }
}

/// Each layer's gradients are handed to the collective as one bucket, last layer first,
/// and only once they are final (their values then are the values the step ends with),
/// whether this rank's share has one micro-batch, several, or none; the model's other
/// gradients (full fine-tuning) are left to the final sum.
#[test]
fn layer_buckets_start_in_order_once_final() {
    let (model, adapter) = model_and_adapter();
    let micro = micro_batches(3, model.cfg.vocab_size);
    let layers = model.cfg.num_hidden_layers;
    // (micro-batches, rank, world): shares of 2, 1 and 0 micro-batches
    for (n, rank, world) in [(3, 1, 2), (3, 0, 2), (1, 0, 2)] {
        let group = Recording { rank, world, buckets: Default::default(), rest: Default::default() };
        let mut grads = adapter.zeros(&CpuOps).unwrap();
        global_batch_gradients(
            &CpuOps,
            &model,
            &adapter,
            &micro[..n],
            &mut grads,
            dropout,
            &group,
            &mut sums(),
        )
        .unwrap();
        let buckets = group.buckets.into_inner();
        assert_eq!(buckets.len(), layers, "one bucket a layer");
        let g = grads.as_grads();
        for (k, bucket) in buckets.iter().enumerate() {
            let l = layers - 1 - k;
            let now: Vec<Vec<f32>> = g.layer(l).into_iter().map(|t| CpuOps.download(t).unwrap()).collect();
            assert_eq!(bucket.len(), 14, "layer {l}: seven LoRA pairs");
            assert!(
                bucket == &now,
                "share of {n} over {world}, rank {rank}: layer {l} changed after it was started"
            );
        }
        assert_eq!(group.rest.get(), 0, "a LoRA step leaves nothing to the final sum");
        let nonzero = buckets.iter().flatten().flatten().any(|&v| v != 0.0);
        assert_eq!(nonzero, !shard_of(n, rank, world).is_empty(), "gradients of a non-empty share");
    }
    // full fine-tuning: the layers in buckets, embedding, final norm and lm_head at the end
    let group = Recording { rank: 0, world: 1, buckets: Default::default(), rest: Default::default() };
    let mut grads = model.zeros(&CpuOps).unwrap();
    global_batch_gradients(&CpuOps, &(), &model, &micro[..1], &mut grads, |_, _| {}, &group, &mut sums())
        .unwrap();
    assert_eq!(group.buckets.borrow().len(), layers);
    assert_eq!(group.rest.get(), 2 + model.lm_head.is_some() as usize);
}

fn shard_of(n: usize, rank: usize, world: usize) -> std::ops::Range<usize> {
    tuneloop::train::trainer::shard(n, rank, world)
}

fn examples(n: usize) -> Vec<Example> {
    (0..n as u32)
        .map(|i| {
            let len = 6 + (i * 7 % 13) as usize;
            let ids: Vec<u32> = (0..len as u32).map(|t| (i * 31 + t) % 256).collect();
            let labels = ids.iter().enumerate().map(|(t, &x)| if t < 2 { -100 } else { x as i64 }).collect();
            Example { ids, labels }
        })
        .collect()
}

fn config(out: &Path, steps: usize) -> TrainConfig {
    TrainConfig {
        local_batch: 1,
        max_steps: Some(steps),
        val_every: Some(2),
        keep_last: 3,
        warmup_steps: 1,
        ..common::train_config(out)
    }
}

/// Trains on `world` ranks (threads on loopback) sharing `cfg.output_dir`; rank 0's result.
fn train_on(world: usize, cfg: &TrainConfig, resume: bool) -> (Adapter<CpuTensor>, Vec<f64>) {
    let (tr, va) = (examples(24), examples(6));
    let port = free_port();
    let outs: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..world)
            .map(|r| {
                let (tr, va) = (&tr, &va);
                s.spawn(move || {
                    let (model, adapter) = model_and_adapter();
                    let group = TcpGroup::join(&env(r, world, port)).unwrap();
                    let (a, o) =
                        train_data_parallel(&CpuOps, &model, adapter, tr, va, cfg, resume, &group).unwrap();
                    (a, o.history.iter().filter_map(|m| m.loss).collect::<Vec<f64>>())
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // every rank holds the same weights
    for (a, _) in &outs[1..] {
        assert_eq!(flat(a), flat(&outs[0].0), "ranks disagree");
    }
    outs.into_iter().next().unwrap()
}

#[test]
fn training_on_two_ranks_follows_one_process_and_resumes_on_another_count() {
    let (model, adapter) = model_and_adapter();
    let (tr, va) = (examples(24), examples(6));
    let single_dir = tempfile::tempdir().unwrap();
    let (want, want_out) =
        train(&CpuOps, &model, adapter, &tr, &va, &config(single_dir.path(), 6), false).unwrap();
    let want_loss: Vec<f64> = want_out.history.iter().filter_map(|m| m.loss).collect();

    let dir = tempfile::tempdir().unwrap();
    let (got, loss) = train_on(2, &config(dir.path(), 6), false);
    let e = rel_l2(&flat(&got), &flat(&want));
    assert!(e < 1e-4, "2 ranks vs 1 process: adapters differ by {e:.2e}");
    for (a, b) in loss.iter().zip(&want_loss) {
        assert!((a - b).abs() < 1e-5 * b.abs(), "losses {loss:?} vs {want_loss:?}");
    }
    // rank 0 alone wrote the metrics: one line per step and validation, as one process
    let lines = |d: &Path| std::fs::read_to_string(d.join("metrics.jsonl")).unwrap().lines().count();
    assert_eq!(lines(dir.path()), lines(single_dir.path()));

    // stop after 2 steps on 4 ranks, resume on 1 ... and on 2: the same run
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), 6);
    cfg.stop_after = Some(2);
    train_on(4, &cfg, false);
    cfg.stop_after = Some(4);
    let (model, adapter) = model_and_adapter();
    train(&CpuOps, &model, adapter, &tr, &va, &cfg, true).unwrap();
    cfg.stop_after = None;
    let (resumed, _) = train_on(2, &cfg, true);
    let e = rel_l2(&flat(&resumed), &flat(&want));
    assert!(e < 1e-4, "resumed across world sizes 4 -> 1 -> 2: adapters differ by {e:.2e}");
}

#[test]
fn the_global_batch_must_split_evenly_over_the_ranks() {
    let (model, adapter) = model_and_adapter();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), 2);
    cfg.local_batch = 2;
    let port = free_port();
    let e = std::thread::scope(|s| {
        let h: Vec<_> = (0..4)
            .map(|r| {
                let (model, adapter) = (&model, adapter.zeros(&CpuOps).unwrap());
                let cfg = &cfg;
                s.spawn(move || {
                    let g = TcpGroup::join(&env(r, 4, port)).unwrap();
                    train_data_parallel(&CpuOps, model, adapter, &examples(8), &[], cfg, false, &g).err()
                })
            })
            .collect();
        h.into_iter().map(|h| h.join().unwrap()).next().unwrap()
    });
    let e = format!("{:#}", e.expect("4 ranks x local batch 2 cannot split a global batch of 4"));
    assert!(e.contains("global batch (4)") && e.contains("ranks (4)"), "{e}");
}

// ---- the CLI: launcher, torchrun variables, a dying rank ----

/// `finetune` with `flags` (before the recipe overrides, which take the rest of the line).
fn finetune_args(base: &Path, out: &Path, steps: usize, flags: &[&str]) -> Vec<String> {
    let overrides = [
        format!("--step_scheduler.max_steps={steps}"),
        "--step_scheduler.val_every_steps=2".into(),
        "--step_scheduler.ckpt_every_steps=1".into(),
        "--backend=cpu".into(),
    ];
    common::quickstart_finetune(base, out, flags, &overrides)
}

#[test]
fn launcher_and_torchrun_variables_run_the_same_training() {
    let tmp = tempfile::tempdir().unwrap();
    let base = base_model(tmp.path());
    let plain = tmp.path().join("plain");
    let out = tuneloop().args(finetune_args(&base, &plain, 4, &[])).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT by hand, world size 1, on loopback: the
    // rendezvous and the collective run, and the adapter is the plain run's, bit for bit
    let by_hand = tmp.path().join("by-hand");
    let out = tuneloop()
        .args(finetune_args(&base, &by_hand, 4, &[]))
        .envs([("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")])
        .env("MASTER_PORT", free_port().to_string())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("rendezvous at 127.0.0.1") && err.contains("all 1 ranks arrived"), "{err}");
    let read = |d: &Path, f: &str| std::fs::read(d.join(f)).unwrap();
    assert_eq!(
        read(&by_hand, "adapter/adapter_model.safetensors"),
        read(&plain, "adapter/adapter_model.safetensors")
    );

    // two workers from the launcher: the same run up to the order of additions
    let launched = tmp.path().join("launched");
    let out =
        tuneloop().args(finetune_args(&base, &launched, 4, &["--nproc-per-node", "2"])).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("all 2 ranks arrived"), "{err}");
    let e = rel_l2(&adapter_values(&launched, &base), &adapter_values(&plain, &base));
    assert!(e < 1e-4, "2 workers vs 1 process: adapters differ by {e:.2e}");
    let (got, want) = (train_losses(&launched), train_losses(&plain));
    assert_eq!(got.len(), 4, "rank 0 alone writes metrics.jsonl");
    for (a, b) in got.iter().zip(&want) {
        assert!((a - b).abs() < 1e-5 * b.abs(), "{got:?} vs {want:?}");
    }
}

#[test]
fn a_rank_that_dies_stops_the_others_and_the_checkpoint_survives() {
    let tmp = tempfile::tempdir().unwrap();
    let base = base_model(tmp.path());
    let run = tmp.path().join("run");
    let port = free_port().to_string();
    let start = |rank: &str| {
        tuneloop()
            .args(finetune_args(&base, &run, 100_000, &[]))
            .envs([("RANK", rank), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", &port)])
            .env("RAYON_NUM_THREADS", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let rank0 = start("0");
    let mut rank1 = start("1");
    let ckpts = run.join("checkpoints");
    let t0 = Instant::now();
    while tuneloop::train::checkpoint::list(&ckpts).map(|l| l.len()).unwrap_or(0) < 2 {
        assert!(t0.elapsed() < Duration::from_secs(120), "no checkpoints after 2 minutes");
        std::thread::sleep(Duration::from_millis(20));
    }
    rank1.kill().unwrap();
    rank1.wait().unwrap();
    let t1 = Instant::now();
    let out = rank0.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "rank 0 went on without rank 1");
    assert!(err.contains("lost rank 1"), "{err}");
    assert!(t1.elapsed() < Duration::from_secs(30), "rank 0 took {:?} to stop", t1.elapsed());

    // the newest checkpoint loads, and one process resumes from it
    let (last, _) = *tuneloop::train::checkpoint::list(&ckpts).unwrap().last().unwrap();
    let stop = (last + 1).to_string();
    let out = tuneloop()
        .args(finetune_args(&base, &run, 100_000, &["--resume", "--stop-after-steps", &stop]))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(tuneloop::train::checkpoint::list(&ckpts).unwrap().last().unwrap().0, last + 1);
}
