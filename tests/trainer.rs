//! The fine-tune loop: resuming after a stop gives the uninterrupted run's adapter (or,
//! training the full model, the model) byte for byte; half-written checkpoints are never
//! picked; training lowers the held-out loss.

mod common;

use std::path::Path;

use tuneloop::model::{Adapter, LoraConfig, Model, Proj};
use tuneloop::ops::{cpu::CpuOps, cpu::CpuTensor};
use tuneloop::train::checkpoint;
use tuneloop::train::pack::Example;
use tuneloop::train::trainer::{train, TrainConfig};

fn examples(n: usize, seed: u32) -> Vec<Example> {
    // a learnable pattern: each sequence counts up from a start token, prompt masked
    (0..n as u32)
        .map(|i| {
            let len = 6 + ((i * 7 + seed) % 13) as usize;
            let start = (i * 31 + seed) % 200;
            let ids: Vec<u32> = (0..len as u32).map(|t| (start + t) % 256).collect();
            let labels = ids.iter().enumerate().map(|(t, &x)| if t < 2 { -100 } else { x as i64 }).collect();
            Example { ids, labels }
        })
        .collect()
}

fn fresh_adapter(model: &Model<tuneloop::ops::cpu::CpuTensor>) -> Adapter<tuneloop::ops::cpu::CpuTensor> {
    Adapter::init(&CpuOps, &LoraConfig::new(4, 8.0, Proj::ALL.to_vec()), &model.cfg, 3).unwrap()
}

fn adapter_bytes(a: &Adapter<tuneloop::ops::cpu::CpuTensor>) -> Vec<u8> {
    let d = tempfile::tempdir().unwrap();
    a.save(&CpuOps, d.path()).unwrap();
    std::fs::read(d.path().join("adapter_model.safetensors")).unwrap()
}

#[test]
fn resume_after_a_stop_is_bit_exact() {
    let model = Model::load(&CpuOps, &common::golden("llama3-rope-tied").join("model")).unwrap();
    let (tr, va) = (examples(24, 1), examples(6, 99));

    let full_dir = tempfile::tempdir().unwrap();
    let (full, outcome) = train(
        &CpuOps,
        &model,
        fresh_adapter(&model),
        &tr,
        &va,
        &common::train_config(full_dir.path()),
        false,
    )
    .unwrap();
    assert_eq!(outcome.steps, 6);

    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::train_config(dir.path());
    cfg.stop_after = Some(3); // between two checkpoint steps: the stop itself checkpoints
    let (_, first) = train(&CpuOps, &model, fresh_adapter(&model), &tr, &va, &cfg, false).unwrap();
    assert_eq!(first.steps, 3);
    // a run killed while writing its next checkpoint leaves only a temp dir behind
    let ckpts = dir.path().join("checkpoints");
    std::fs::create_dir_all(ckpts.join(".tmp-step-000004-killed/adapter")).unwrap();
    std::fs::write(ckpts.join(".tmp-step-000004-killed/adapter/adapter_model.safetensors"), b"half").unwrap();
    assert_eq!(checkpoint::list(&ckpts).unwrap().last().unwrap().0, 3);
    // starting over into the same output_dir without --resume refuses to clobber it
    let again =
        train(&CpuOps, &model, fresh_adapter(&model), &tr, &va, &common::train_config(dir.path()), false);
    assert!(format!("{:#}", again.err().expect("must refuse")).contains("--resume"));

    // The resumed run keeps the whole lines before its checkpoint byte for byte, and reads
    // their numbers exactly: this throughput is one that a parse to the nearest double
    // but one (serde_json without `float_roundtrip`) changes.
    let metrics = dir.path().join("metrics.jsonl");
    let lines: Vec<String> = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            if v["step"] == 1 {
                v["tokens_per_s"] = serde_json::json!(98999.51327998887_f64);
            }
            v.to_string() + "\n"
        })
        .collect();
    assert_eq!(lines.len(), 4, "step 0's validation and 3 steps");
    // and a line that a run killed while appending step 4's left unterminated
    std::fs::write(&metrics, lines.concat() + r#"{"step":4,"loss":0.7"#).unwrap();

    let cfg = common::train_config(dir.path());
    let (resumed, outcome) = train(&CpuOps, &model, fresh_adapter(&model), &tr, &va, &cfg, true).unwrap();
    assert_eq!(outcome.steps, 6);
    assert!(std::fs::read_to_string(&metrics).unwrap().starts_with(&lines.concat()));
    let step1 = outcome.history.iter().find(|m| m.step == 1).unwrap();
    assert_eq!(step1.tokens_per_s.map(f64::to_bits), Some(98999.51327998887_f64.to_bits()));
    assert_eq!(
        adapter_bytes(&resumed),
        adapter_bytes(&full),
        "resumed adapter differs from the uninterrupted one"
    );
    // metrics.jsonl tells the same story as the uninterrupted run's
    let read = |d: &Path| std::fs::read_to_string(d.join("metrics.jsonl")).unwrap();
    let strip = |s: String| -> Vec<String> {
        s.lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                v.as_object_mut().unwrap().remove("tokens_per_s");
                v.to_string()
            })
            .collect()
    };
    assert_eq!(strip(read(dir.path())), strip(read(full_dir.path())));
    // keep_last: 2 complete checkpoints, no temp dirs
    let left: Vec<String> =
        std::fs::read_dir(&ckpts).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
    let mut left = left;
    left.sort();
    assert_eq!(left, vec!["step-000004", "step-000006"]);
}

#[test]
fn training_lowers_the_held_out_loss() {
    let model = Model::load(&CpuOps, &common::golden("llama-gqa").join("model")).unwrap();
    let (tr, va) = (examples(64, 5), examples(8, 77));
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::train_config(dir.path());
    cfg.max_steps = Some(60);
    cfg.adamw.lr = 2e-2;
    cfg.lora_dropout = 0.0;
    cfg.ckpt_every = None;
    cfg.val_every = Some(20);
    let (_, outcome) = train(&CpuOps, &model, fresh_adapter(&model), &tr, &va, &cfg, false).unwrap();
    let v = outcome.val_points();
    assert_eq!(v.first().unwrap().0, 0);
    assert_eq!(v.last().unwrap().0, 60);
    assert!(v.last().unwrap().1 < v[0].1 - 0.3, "val loss should fall clearly: {v:?}");
}

fn model_bytes(m: &Model<CpuTensor>) -> Vec<u8> {
    let d = tempfile::tempdir().unwrap();
    m.save(&CpuOps, d.path()).unwrap();
    std::fs::read(d.path().join("model.safetensors")).unwrap()
}

#[test]
fn full_fine_tuning_resumes_bit_exactly() {
    let case = common::golden("llama3-rope-tied").join("model");
    let load = || Model::load(&CpuOps, &case).unwrap();
    let (tr, va) = (examples(16, 1), examples(4, 99));
    let short =
        |out: &Path| TrainConfig { max_steps: Some(4), val_every: Some(2), ..common::train_config(out) };

    let full_dir = tempfile::tempdir().unwrap();
    let (full, outcome) = train(&CpuOps, &(), load(), &tr, &va, &short(full_dir.path()), false).unwrap();
    assert_eq!(outcome.steps, 4);
    assert_ne!(model_bytes(&full), model_bytes(&load()), "training must change the weights");
    let v = outcome.val_points();
    assert!(v.last().unwrap().1 < v[0].1, "val loss should fall: {v:?}");

    let dir = tempfile::tempdir().unwrap();
    let cfg = TrainConfig { stop_after: Some(3), ..short(dir.path()) };
    let (_, first) = train(&CpuOps, &(), load(), &tr, &va, &cfg, false).unwrap();
    assert_eq!(first.steps, 3);
    // the checkpoint is an HF model directory plus both moments of every tensor
    let ckpt = dir.path().join("checkpoints/step-000003");
    let saved = Model::load(&CpuOps, &ckpt.join("model")).unwrap();
    let opt =
        tuneloop::model::safetensors_io::TensorStore::open_file(&ckpt.join("optimizer.safetensors")).unwrap();
    assert_eq!(opt.names().len(), 2 * saved.named().len());
    assert!(opt.contains("m.model.embed_tokens.weight") && opt.contains("v.model.norm.weight"));
    // a LoRA run cannot pick up a full run's checkpoint
    let lora = train(&CpuOps, &load(), fresh_adapter(&load()), &tr, &va, &short(dir.path()), true);
    assert!(format!("{:#}", lora.err().expect("must refuse")).contains("no `adapter` directory"));

    let (resumed, outcome) = train(&CpuOps, &(), load(), &tr, &va, &short(dir.path()), true).unwrap();
    assert_eq!(outcome.steps, 4);
    assert_eq!(model_bytes(&resumed), model_bytes(&full), "resumed model differs from the uninterrupted one");
}

/// A step whose loss and gradients are not finite (here from a NaN in the frozen model's
/// final norm) stops the run with an error naming the step, and saves nothing: the last
/// checkpoint and metrics.jsonl stay as the steps before left them.
#[test]
fn a_step_that_is_not_finite_stops_without_saving() {
    let model = Model::load(&CpuOps, &common::golden("llama3-rope-tied").join("model")).unwrap();
    let (tr, va) = (examples(24, 1), examples(6, 99));
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::train_config(dir.path());
    cfg.stop_after = Some(2);
    let (_, first) = train(&CpuOps, &model, fresh_adapter(&model), &tr, &va, &cfg, false).unwrap();
    assert_eq!(first.steps, 2);
    let ckpts = dir.path().join("checkpoints");
    let snapshot = || {
        let mut files = vec![std::fs::read(dir.path().join("metrics.jsonl")).unwrap()];
        for (_, d) in checkpoint::list(&ckpts).unwrap() {
            let mut names: Vec<_> = walk(&d);
            names.sort();
            files.extend(names.into_iter().map(|f| std::fs::read(f).unwrap()));
        }
        (checkpoint::list(&ckpts).unwrap().into_iter().map(|(s, _)| s).collect::<Vec<_>>(), files)
    };
    let before = snapshot();

    let mut bad = Model::load(&CpuOps, &common::golden("llama3-rope-tied").join("model")).unwrap();
    bad.norm.data.iter_mut().for_each(|x| *x = f32::NAN);
    let cfg = common::train_config(dir.path());
    let e =
        train(&CpuOps, &bad, fresh_adapter(&bad), &tr, &va, &cfg, true).err().expect("a NaN loss must stop");
    let msg = format!("{e:#}");
    assert!(msg.contains("loss is NaN") && msg.contains("at step 3"), "{msg}");
    assert!(msg.contains("without saving"), "{msg}");
    assert_eq!(snapshot(), before, "the checkpoints or metrics changed");
}

/// Every file under `d`.
fn walk(d: &Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(d).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
