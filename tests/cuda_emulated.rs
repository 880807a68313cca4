//! The commands' CUDA paths end to end, on the CPU, through the test suite's CUDA
//! emulator (tests/emu: stand-ins for libcuda, libcublasLt and libnccl that run
//! kernels/*.cu on the CPU): `finetune --backend cuda` follows the CPU backend and resumes
//! bit for bit (and in the bf16 mode at head_dim 64, the tensor-core attention kernels and
//! the folded LoRA paths, trains the CPU's adapter to bf16's precision), full fine-tuning
//! does too in both modes (in bf16 on f32 master weights, also on two GPUs), NCCL data
//! parallelism (by hand with world size 1, and two workers on two emulated GPUs) follows
//! one process, `loop`'s agents share one CUDA base and each trains as it would alone,
//! and `eval`, `bench` and `parity` run on it.
//!
//! These check the CUDA backend's host code, kernels and library calls for correctness,
//! nothing about speed. Each test is skipped (and says so) in a build without kernels,
//! which also has no emulator; CI always builds both.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{adapter_values, base_model, free_port, run_ok, train_losses, tuneloop_cmd};
use tuneloop::util::rel_l2;

/// `tuneloop` with the emulator first on the library path, or `None` (the test is
/// skipped) in a build without it.
fn emulated() -> Option<Command> {
    let mut cmd = tuneloop_cmd();
    common::on_emulator(&mut cmd)?;
    Some(cmd)
}

/// A short quickstart fine-tune: 3 steps of 2 rows of 64 tokens, 5% held out.
fn finetune_args(base: &Path, out: &Path, backend: &str, extra: &[&str]) -> Vec<String> {
    let overrides = [
        format!("--backend={backend}"),
        "--data.seq_len=64".into(),
        "--data.val_fraction=0.05".into(),
        "--step_scheduler.global_batch_size=2".into(),
        "--step_scheduler.local_batch_size=1".into(),
        "--step_scheduler.max_steps=3".into(),
        "--step_scheduler.val_every_steps=3".into(),
        "--step_scheduler.ckpt_every_steps=1".into(),
    ];
    common::quickstart_finetune(base, out, extra, &overrides)
}

fn adapter_bytes(run: &Path) -> Vec<u8> {
    std::fs::read(run.join("adapter/adapter_model.safetensors")).expect("adapter file")
}

fn close_losses(got: &[f64], want: &[f64], rel: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: {got:?} vs {want:?}");
    for (a, b) in got.iter().zip(want) {
        assert!((a - b).abs() <= rel * b.abs(), "{what}: losses {got:?} vs {want:?}");
    }
}

/// Run `got` trained as run `want` did: losses to `loss_rel`, adapters to 1e-4.
fn follows(got: &Path, want: &Path, base: &Path, loss_rel: f64, what: &str) {
    close_losses(&train_losses(got), &train_losses(want), loss_rel, what);
    let e = rel_l2(&adapter_values(got, base), &adapter_values(want, base));
    assert!(e < 1e-4, "{what}: adapters differ by {e:.2e}");
}

/// A tiny base model in `dir/base` and the short fine-tune's run on the CPU backend in
/// `dir/cpu`.
fn base_and_cpu_run(dir: &Path) -> (PathBuf, PathBuf) {
    let base = base_model(dir);
    let cpu = dir.join("cpu");
    run_ok(tuneloop_cmd().args(finetune_args(&base, &cpu, "cpu", &[])), "finetune on the CPU");
    (base, cpu)
}

#[test]
fn finetune_on_cuda_follows_the_cpu_and_resumes_bit_for_bit() {
    let Some(_) = emulated() else { return common::skipped_without_emulator() };
    let tmp = tempfile::tempdir().unwrap();
    let (base, cpu) = base_and_cpu_run(tmp.path());

    // f32 mode: the same training up to the order of additions
    let f32_run = tmp.path().join("cuda-f32");
    let (_, err) =
        run_ok(emulated().unwrap().args(finetune_args(&base, &f32_run, "cuda", &[])), "finetune on CUDA f32");
    assert!(err.contains("backend: cuda-f32, GPU 0"), "{err}");
    follows(&f32_run, &cpu, &base, 1e-5, "CUDA f32 vs CPU");

    // bf16 mode: bf16 weights and activations, f32 masters
    let bf16_run = tmp.path().join("cuda-bf16");
    let (_, err) = run_ok(
        emulated().unwrap().args(finetune_args(&base, &bf16_run, "cuda", &["--model.dtype=bf16"])),
        "finetune on CUDA bf16",
    );
    assert!(err.contains("backend: cuda-bf16, GPU 0"), "{err}");
    close_losses(&train_losses(&bf16_run), &train_losses(&cpu), 2e-2, "CUDA bf16 vs CPU");
    // every micro-batch after the first in the activation arena's places (each filled
    // with NaNs first, see common::on_emulator), the bytes of a run with every buffer
    // its own allocation
    let placed = err.lines().find_map(|l| {
        let rest = l.split("GiB at the end; ").nth(1)?;
        let mut n = rest.split_whitespace().filter_map(|w| w.parse::<u64>().ok());
        Some((n.next()?, n.next()?))
    });
    let (placed, all) = placed.unwrap_or_else(|| panic!("no arena summary in:\n{err}"));
    // rows of 64 tokens or fewer: all but the first steps' buffers (one training, one
    // validation step) and what outgrew the first layout
    assert!(placed * 2 > all, "{placed} of {all} buffers placed in the arena");
    let pooled = tmp.path().join("cuda-bf16-pool");
    run_ok(
        emulated().unwrap().env("TUNELOOP_ARENA", "off").args(finetune_args(
            &base,
            &pooled,
            "cuda",
            &["--model.dtype=bf16"],
        )),
        "finetune on CUDA bf16 without the arena",
    );
    assert_eq!(adapter_bytes(&pooled), adapter_bytes(&bf16_run), "CUDA bf16 with and without the arena");

    // stopped after step 1 and resumed from its checkpoint: the uninterrupted run's bytes
    let resumed = tmp.path().join("resumed");
    let stop = ["--stop-after-steps", "1"];
    run_ok(emulated().unwrap().args(finetune_args(&base, &resumed, "cuda", &stop)), "the first step on CUDA");
    run_ok(
        emulated().unwrap().args(finetune_args(&base, &resumed, "cuda", &["--resume"])),
        "resuming on CUDA",
    );
    assert_eq!(adapter_bytes(&resumed), adapter_bytes(&f32_run), "resumed CUDA run vs uninterrupted");
}

/// A copy of base model `base` in `dir` whose attention has 2 heads of 64 (1 K/V head)
/// where the tiny preset has 4 of 32 (2): the same weight shapes, and head_dim 64 runs the
/// bf16 mode's tensor-core attention kernels.
fn with_head_dim_64(base: &Path, dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    for entry in std::fs::read_dir(base).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
    }
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(base.join("config.json")).unwrap()).unwrap();
    for (key, value) in [("num_attention_heads", 2), ("num_key_value_heads", 1), ("head_dim", 64)] {
        cfg[key] = value.into();
    }
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    dir.to_path_buf()
}

#[test]
fn finetune_bf16_on_tensor_core_attention_follows_the_cpu() {
    let Some(_) = emulated() else { return common::skipped_without_emulator() };
    let tmp = tempfile::tempdir().unwrap();
    let base = with_head_dim_64(&base_model(tmp.path()), &tmp.path().join("hd64"));
    // The tensor-core attention kernels and every projection's LoRA path folded into its
    // frozen product: forward and backward without LoRA dropout (the recipe's), the
    // backward's separate products with it. The losses alone would hide a wrong
    // gradient for three steps; the trained adapters do not. Last, the attention on
    // wgmma (TUNELOOP_WGMMA=1; the emulator is an sm_90 GPU).
    for (name, extra, wgmma) in [
        ("no dropout", vec![], "0"),
        ("dropout", vec!["--peft.dropout=0.1"], "0"),
        ("attention on wgmma", vec![], "1"),
    ] {
        let (cpu, cuda) = (tmp.path().join(format!("cpu {name}")), tmp.path().join(format!("cuda {name}")));
        run_ok(tuneloop_cmd().args(finetune_args(&base, &cpu, "cpu", &extra)), "finetune on the CPU");
        let bf16: Vec<&str> = extra.iter().copied().chain(["--model.dtype=bf16"]).collect();
        run_ok(
            emulated().unwrap().env("TUNELOOP_WGMMA", wgmma).args(finetune_args(&base, &cuda, "cuda", &bf16)),
            "finetune on CUDA bf16",
        );
        let what = format!("CUDA bf16 vs CPU, head_dim 64, {name}");
        close_losses(&train_losses(&cuda), &train_losses(&cpu), 2e-2, &what);
        // bf16's own error is 4.5e-3 to 6.8e-3 here; reading dV's fragments of the wrong
        // keys in dkdv gives 2.4e-2
        let e = rel_l2(&adapter_values(&cuda, &base), &adapter_values(&cpu, &base));
        eprintln!("{what}: adapters {e:.2e} apart (relative L2)");
        assert!(e < 1.2e-2, "{what}: adapters differ by {e:.2e}");
    }
}

/// What a full fine-tuning run in `run` changed: each weight of `run/model` minus the
/// base's, by tensor name in the model's order.
fn model_updates(run: &Path, base: &Path) -> Vec<(String, Vec<f32>)> {
    use tuneloop::model::Model;
    let cpu = tuneloop::ops::cpu::CpuOps;
    let (trained, base) = (Model::load(&cpu, &run.join("model")).unwrap(), Model::load(&cpu, base).unwrap());
    let (t, b) = (trained.named(), base.named());
    assert_eq!(t.len(), b.len());
    t.iter()
        .zip(&b)
        .map(|((name, t), (base_name, b))| {
            assert_eq!(name, base_name);
            (name.clone(), t.data.iter().zip(&b.data).map(|(t, b)| t - b).collect())
        })
        .collect()
}

#[test]
fn full_finetune_on_cuda_follows_the_cpu_and_resumes_bit_for_bit() {
    let Some(_) = emulated() else { return common::skipped_without_emulator() };
    let tmp = tempfile::tempdir().unwrap();
    let base = base_model(tmp.path());
    let run = |name: &str, backend: &str, extra: &[&str]| {
        let dir = tmp.path().join(name);
        let flags: Vec<&str> = ["--peft.full=true"].iter().chain(extra).copied().collect();
        let cmd = if backend == "cpu" { &mut tuneloop_cmd() } else { &mut emulated().unwrap() };
        run_ok(cmd.args(finetune_args(&base, &dir, backend, &flags)), &format!("full finetune {name}"));
        dir
    };
    let cpu = run("cpu", "cpu", &[]);
    let cpu_updates = model_updates(&cpu, &base);
    // f32 mode: the same training up to the order of additions. bf16 mode: f32 master
    // weights, AdamW on them, and the forward and backward on their bf16 copies.
    for (dtype, loss_rel, update_rel) in [("f32", 1e-5, 1e-4), ("bf16", 2e-2, 0.2)] {
        let what = format!("full fine-tuning, CUDA {dtype} vs CPU");
        let dir = run(dtype, "cuda", &[&format!("--model.dtype={dtype}")]);
        close_losses(&train_losses(&dir), &train_losses(&cpu), loss_rel, &what);
        // tensor by tensor: one weight's wrong gradient shows however small it is
        let mut apart: Vec<(f64, &str)> = model_updates(&dir, &base)
            .iter()
            .zip(&cpu_updates)
            .map(|((_, got), (name, want))| (rel_l2(got, want), name.as_str()))
            .collect();
        apart.sort_by(|a, b| b.0.total_cmp(&a.0));
        eprintln!("{what}: weight updates apart (relative L2), the largest: {:?}", &apart[..4]);
        let (e, name) = apart[0];
        assert!(e < update_rel, "{what}: the updates of {name} differ by {e:.2e}");
    }
    // bf16, stopped after step 1 and resumed: the masters and moments come back in f32,
    // so the run ends with the uninterrupted run's bytes
    let resumed = tmp.path().join("resumed");
    let bf16 = ["--peft.full=true", "--model.dtype=bf16"];
    // (flags first: the recipe's overrides take the rest of the line)
    let stop: Vec<&str> = ["--stop-after-steps", "1"].iter().chain(&bf16).copied().collect();
    run_ok(emulated().unwrap().args(finetune_args(&base, &resumed, "cuda", &stop)), "the first step");
    let resume: Vec<&str> = ["--resume"].iter().chain(&bf16).copied().collect();
    run_ok(emulated().unwrap().args(finetune_args(&base, &resumed, "cuda", &resume)), "resuming");
    let weights = |run: &Path| std::fs::read(run.join("model/model.safetensors")).expect("model file");
    assert!(weights(&resumed) == weights(&tmp.path().join("bf16")), "resumed full bf16 run vs uninterrupted");

    // bf16 on two emulated GPUs over NCCL: every weight's gradient all-reduced (the
    // layers in buckets, the embedding and the final norm last), the same run up to the
    // order of the f32 additions
    let two = tmp.path().join("two");
    let flags: Vec<&str> = ["--nproc-per-node", "2"].iter().chain(&bf16).copied().collect();
    let mut cmd = emulated().unwrap();
    cmd.args(finetune_args(&base, &two, "cuda", &flags)).env("TUNELOOP_EMU_DEVICES", "2");
    let (_, err) = run_ok(&mut cmd, "full fine-tuning on two GPUs");
    assert!(err.contains("all 2 ranks arrived"), "{err}");
    let one = tmp.path().join("bf16");
    close_losses(&train_losses(&two), &train_losses(&one), 1e-5, "full bf16, 2 GPUs vs 1");
    let e = model_updates(&two, &base)
        .iter()
        .zip(&model_updates(&one, &base))
        .map(|((_, got), (_, want))| rel_l2(got, want))
        .fold(0.0, f64::max);
    eprintln!("full fine-tuning bf16, 2 GPUs vs 1: weight updates at most {e:.2e} apart");
    assert!(e < 1e-5, "full bf16, 2 GPUs vs 1: weight updates {e:.2e} apart");
}

#[test]
fn nccl_data_parallel_follows_one_process() {
    let Some(_) = emulated() else { return common::skipped_without_emulator() };
    let tmp = tempfile::tempdir().unwrap();
    let base = base_model(tmp.path());
    let plain = tmp.path().join("plain");
    run_ok(emulated().unwrap().args(finetune_args(&base, &plain, "cuda", &[])), "finetune on CUDA");

    // RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT by hand, world size 1: the rendezvous and
    // an NCCL communicator of one, and the plain run's adapter bit for bit
    let by_hand = tmp.path().join("by-hand");
    let mut cmd = emulated().unwrap();
    cmd.args(finetune_args(&base, &by_hand, "cuda", &[]))
        .envs([("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")])
        .env("MASTER_PORT", free_port().to_string());
    let (_, err) = run_ok(&mut cmd, "finetune with a world of 1");
    assert!(
        err.contains("all 1 ranks arrived") && err.contains("NCCL") && err.contains("communicator"),
        "{err}"
    );
    assert!(err.contains("all-reduce over nccl"), "{err}");
    assert_eq!(adapter_bytes(&by_hand), adapter_bytes(&plain), "NCCL world of 1 vs no NCCL");

    // two workers on two GPUs: the same run up to the order of additions
    let two = tmp.path().join("two");
    let mut cmd = emulated().unwrap();
    cmd.args(finetune_args(&base, &two, "cuda", &["--nproc-per-node", "2"])).env("TUNELOOP_EMU_DEVICES", "2");
    let (_, err) = run_ok(&mut cmd, "finetune on two GPUs");
    assert!(err.contains("all 2 ranks arrived") && err.contains("rank 1 of 2 on GPU 1"), "{err}");
    follows(&two, &plain, &base, 1e-5, "2 GPUs vs 1");
}

/// `tuneloop loop` with two agents on one CUDA bf16 base: the base is loaded once, and
/// the second agent's promoted adapter has the bytes it has when that agent runs alone
/// (the LoRA columns folded into the shared base's products are rewritten by every
/// product that uses them, so the first agent leaves nothing behind).
#[test]
fn loop_agents_share_a_cuda_base_and_train_as_alone() {
    let Some(mut both) = emulated() else { return common::skipped_without_emulator() };
    let Some(mut alone) = emulated() else { return common::skipped_without_emulator() };
    // bf16 on CUDA, and short enough for the emulator: 2 steps of 2 rows of 64 tokens
    let on_cuda = |recipe: String| {
        recipe
            .replace("backend: auto", "backend: cuda")
            .replace("dtype: f32", "dtype: bf16")
            .replace("seq_len: 256", "seq_len: 64")
            .replace("global_batch_size: 8", "global_batch_size: 2")
            .replace("local_batch_size: 4", "local_batch_size: 1")
            .replace("max_steps: 4", "max_steps: 2")
    };
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for dir in [a.path(), b.path()] {
        let loop_yaml = common::loop_setup(dir, on_cuda);
        // the gate on 3 conversations of the agent's task and 3 of the regression set
        let small = |from: &str, name: &str| {
            let file = dir.join(name);
            std::fs::write(&file, common::feedback_head(from, 3)).unwrap();
            file.display().to_string()
        };
        let task = small("configs/quickstart/feedback.jsonl", "task.jsonl");
        let regression = small("configs/quickstart/regression.jsonl", "regression.jsonl");
        let yaml = std::fs::read_to_string(&loop_yaml).unwrap();
        let (head, rest) = yaml.split_once("      regression: [").unwrap();
        let (_, tail) = rest.split_once(']').unwrap();
        let yaml = format!("{head}      task: [{task}]\n      regression: [{regression}]{tail}");
        std::fs::write(&loop_yaml, yaml).unwrap();
        common::add_second_agent(dir);
    }
    let (stdout, stderr) = run_ok(both.args(["loop", "-c"]).arg(a.path().join("loop.yaml")), "loop on CUDA");
    assert!(stdout.contains("| order-help | v1 |") && stdout.contains("| returns | v1 |"), "{stdout}");
    assert_eq!(
        stderr.matches("loaded on cuda-bf16, kept for the agents after this one").count(),
        1,
        "{stderr}"
    );
    run_ok(
        alone.args(["loop", "--agent", "returns", "-c"]).arg(b.path().join("loop.yaml")),
        "loop on CUDA, one agent",
    );
    let registry = |dir: &Path| tuneloop::registry::Registry::open(dir.join("registry")).unwrap();
    let (both_reg, alone_reg) = (registry(a.path()), registry(b.path()));
    let returns = common::promoted_adapter(&both_reg, "returns", "production");
    assert_eq!(
        returns,
        common::promoted_adapter(&alone_reg, "returns", "production"),
        "on CUDA the second agent's adapter depends on the first"
    );
    assert_ne!(common::promoted_adapter(&both_reg, "order-help", "production"), returns);
}

#[test]
fn eval_bench_and_parity_run_on_cuda() {
    let Some(_) = emulated() else { return common::skipped_without_emulator() };
    let tmp = tempfile::tempdir().unwrap();
    let (base, run) = base_and_cpu_run(tmp.path());

    // eval: held-out loss and the greedy decodes (through the KV cache) as on the CPU
    let data = tmp.path().join("three.jsonl");
    let lines: Vec<&str> = include_str!("../configs/quickstart/regression.jsonl").lines().take(3).collect();
    std::fs::write(&data, lines.join("\n") + "\n").unwrap();
    let eval = |mut cmd: Command, backend: &str| -> serde_json::Value {
        let out = tmp.path().join(format!("eval-{backend}.json"));
        cmd.args(["eval", "--backend", backend, "--dtype", "f32", "--max-new-tokens", "6", "--model"])
            .arg(&base)
            .arg("--adapter")
            .arg(run.join("adapter"))
            .arg("--data")
            .arg(&data)
            .arg("--json")
            .arg(&out);
        run_ok(&mut cmd, &format!("eval on {backend}"));
        serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap()
    };
    let (want, got) = (eval(tuneloop_cmd(), "cpu"), eval(emulated().unwrap(), "cuda"));
    let loss = |v: &serde_json::Value| v["loss"].as_f64().expect("loss");
    assert!((loss(&got) - loss(&want)).abs() < 1e-5 * loss(&want), "eval loss {got} vs {want}");
    let decodes = |v: &serde_json::Value| -> Vec<String> {
        v["samples"].as_array().expect("samples").iter().map(|s| s["generated"].to_string()).collect()
    };
    assert_eq!(decodes(&got), decodes(&want), "greedy decodes on CUDA f32 vs the CPU");

    // bench: full LoRA steps in the bf16 mode on head_dim 64 (the tensor-core attention
    // kernels), packed documents, timed by CUDA events, one JSON line
    let shapes = with_head_dim_64(&base, &tmp.path().join("hd64"));
    let mut cmd = emulated().unwrap();
    cmd.arg("bench").arg("--model").arg(&shapes).args(["--seq", "80", "--batch", "2", "--packing"]).args([
        "--warmup",
        "1",
        "--steps",
        "1",
        "--backend",
        "cuda",
        "--dtype",
        "bf16",
        "--json",
    ]);
    let (stdout, _) = run_ok(&mut cmd, "bench on CUDA");
    let line = stdout.lines().last().expect("a JSON line");
    let v: serde_json::Value = serde_json::from_str(line).expect("bench prints JSON");
    // the emulator counting memory without computing (how BENCHMARKS.md counts the anchor
    // shapes): the same allocations, so the same peak and the same arena
    let (stdout, _) = run_ok(cmd.env("TUNELOOP_EMU_NO_COMPUTE", "1"), "bench on CUDA, not computed");
    let counted: serde_json::Value =
        serde_json::from_str(stdout.lines().last().expect("a JSON line")).unwrap();
    assert_eq!(
        (&counted["peak_memory_bytes"], &counted["arena"]),
        (&v["peak_memory_bytes"], &v["arena"]),
        "device memory counted without computing vs computed"
    );
    assert_eq!(v["backend"], "cuda-bf16");
    assert_eq!(v["clock"], "CUDA events on the stream");
    let (first, last) = (v["loss_first"].as_f64().unwrap(), v["loss_last"].as_f64().unwrap());
    assert!(first.is_finite() && last < first, "bench's loss {first} -> {last}");
    assert!(v["tokens_per_s"].as_f64().unwrap() > 0.0 && v["peak_memory_bytes"].as_u64().unwrap() > 0);
    // a step queues everything, its AdamW update included, and waits once, for the loss
    // sums and the gradient norm together (not for the embedding's ids, each lm_head
    // chunk's loss, or the norm before the update)
    assert_eq!(v["host_waits_per_step"], 1, "host waits a step");
    // four steps of one shape (warm-up, timed, profiled, kernels clocked): the first
    // recorded (its buffers from the pool), every buffer of the other three in the arena
    let arena = &v["arena"];
    let (placed, pooled) = (arena["placed"].as_u64().unwrap(), arena["pooled"].as_u64().unwrap());
    assert!(arena["plans"] == 1 && pooled > 0 && placed == 3 * pooled, "{arena}");
    let (size, peak) = (arena["plan_bytes"].as_u64().unwrap(), arena["plan_live_peak"].as_u64().unwrap());
    assert!(peak > 0 && size >= peak && arena["region_bytes"].as_u64() == Some(size), "{arena}");
    // one more step's time per kernel: each attention kernel once a layer, the GEMMs per
    // shape, all of it inside that step's time
    let layers = v["kernels"]["kernels"].as_array().expect("the time per kernel");
    let calls =
        |name: &str| layers.iter().find(|k| k["kernel"] == name).map(|k| k["calls"].as_u64().unwrap());
    for name in ["attn_fwd_mma_bf16_hd64", "attn_bwd_dq_mma_bf16_hd64", "attn_bwd_dkdv_mma_bf16_hd64"] {
        assert_eq!(calls(name), Some(4), "{name} in a step of 4 layers: {v}");
    }
    assert_eq!(calls("adamw_multi"), Some(1), "{v}");
    assert!(layers.iter().any(|k| k["kernel"].as_str().unwrap().starts_with("cuBLASLt ")), "{v}");
    let in_kernels: f64 = layers.iter().map(|k| k["seconds"].as_f64().unwrap()).sum();
    assert!(in_kernels > 0.0 && in_kernels <= v["kernels"]["step_s"].as_f64().unwrap(), "{v}");

    // the kernel micro-benchmarks, on the same shapes
    let mut cmd = emulated().unwrap();
    cmd.args(["bench", "--kernels", "--model"]).arg(&shapes).args(["--seq", "32", "--batch", "2"]).args([
        "--steps",
        "1",
        "--backend",
        "cuda",
        "--dtype",
        "bf16",
        "--gemm-size",
        "128",
        "--json",
    ]);
    let (stdout, _) = run_ok(&mut cmd, "bench --kernels on CUDA");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("bench --kernels prints JSON");
    assert_eq!(v["backend"], "cuda-bf16");
    let kernels = v["kernels"].as_array().expect("kernels");
    assert_eq!(kernels.len(), 13, "{v}");
    assert!(kernels.iter().all(|k| k["seconds"].as_f64().unwrap() > 0.0), "{v}");
    // what the attention backward queues, kernel by kernel
    let bwd = kernels.iter().find(|k| k["kernel"] == "attention_bwd").expect("attention_bwd");
    let mut split: Vec<&str> =
        bwd["split"].as_array().unwrap().iter().map(|k| k["kernel"].as_str().unwrap()).collect();
    split.sort_unstable();
    assert_eq!(
        split,
        ["attn_bwd_dkdv_mma_bf16_hd64", "attn_bwd_dot_bf16", "attn_bwd_dq_mma_bf16_hd64"],
        "{v}"
    );
    // the gradients' norm for the clip: two launches, nothing read back
    let clip = kernels.iter().find(|k| k["kernel"] == "grad_clip").expect("grad_clip");
    let mut split: Vec<&str> =
        clip["split"].as_array().unwrap().iter().map(|k| k["kernel"].as_str().unwrap()).collect();
    split.sort_unstable();
    assert_eq!(split, ["clip_norm", "sum_squares_multi"], "{v}");

    // parity on the golden cases, both modes
    for dtype in ["f32", "bf16"] {
        let mut cmd = emulated().unwrap();
        cmd.args(["parity", "--backend", "cuda", "--dtype", dtype, "--case"]);
        for case in common::CASES {
            cmd.arg(common::golden(case));
        }
        let (stdout, _) = run_ok(&mut cmd, &format!("parity --backend cuda --dtype {dtype}"));
        let summary = stdout.lines().find(|l| l.starts_with("parity: ")).unwrap_or_default();
        assert!(summary.ends_with(" passed, 0 failed") && !summary.contains(" 0 passed"), "{stdout}");
        assert_eq!(
            stdout.matches("\ncase ").count() + usize::from(stdout.starts_with("case ")),
            3,
            "{stdout}"
        );
    }
}
