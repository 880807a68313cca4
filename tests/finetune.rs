//! `tuneloop finetune` end to end on the bundled quickstart, shortened by overrides:
//! the adapter it writes is a PEFT directory with the tokenizer (with `peft.full`, an HF
//! model directory), and bad input fails with the file and line before anything is
//! written.

mod common;

use std::path::{Path, PathBuf};

use common::base_model;
use tuneloop::model::{Adapter, Model};
use tuneloop::ops::cpu::CpuOps;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tuneloop(args: &[&str]) -> std::process::Output {
    common::tuneloop_cmd().args(args).output().expect("runs")
}

/// `finetune -c configs/quickstart.yaml` of `base` into `out_dir` with these overrides.
fn finetune_quickstart(base: &Path, out_dir: &Path, overrides: &[&str]) -> std::process::Output {
    let overrides: Vec<String> = overrides.iter().map(|o| o.to_string()).collect();
    common::tuneloop_cmd()
        .args(common::quickstart_finetune(base, out_dir, &[], &overrides))
        .output()
        .expect("runs")
}

#[test]
fn finetune_writes_a_peft_adapter_with_its_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    let base = base_model(tmp.path());
    let out_dir = tmp.path().join("run");
    let out = finetune_quickstart(
        &base,
        &out_dir,
        &["--step_scheduler.max_steps=4", "--step_scheduler.val_every_steps=2", "--peft.dropout=0.1"],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("trained 4 steps"), "{stdout}");
    let adapter = out_dir.join("adapter");
    for f in ["adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
        assert!(adapter.join(f).exists(), "{f} missing");
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["r"], 8);
    assert_eq!(cfg["lora_alpha"], 16);
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["base_model_name_or_path"], base.display().to_string());
    assert_eq!(cfg["target_modules"].as_array().unwrap().len(), 7);
    let model = Model::load(&CpuOps, &base).unwrap();
    Adapter::load(&CpuOps, &adapter, &model.cfg).unwrap();
    let metrics = std::fs::read_to_string(out_dir.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().filter(|l| l.contains("\"loss\"")).count(), 4);
    assert!(out_dir.join("loss.png").exists() && out_dir.join("data_manifest.json").exists());
    // the held-out split, as logged lines, loads as an eval set
    let held_out = tuneloop::eval::load_set(&[out_dir.join("validation.jsonl")]).unwrap();
    assert!(!held_out.is_empty());
}

#[test]
fn full_finetune_writes_an_hf_model_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let base = base_model(tmp.path());
    let out_dir = tmp.path().join("run");
    let out = finetune_quickstart(&base, &out_dir, &["--peft.full=true", "--step_scheduler.max_steps=3"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("trained 3 steps"), "{stdout}");
    let dir = out_dir.join("model");
    assert!(stdout.contains(&format!("model: {}", dir.display())), "{stdout}");
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
        assert!(dir.join(f).exists(), "{f} missing");
    }
    assert!(!out_dir.join("adapter").exists(), "a full run writes no adapter");
    let config = |d: &Path| std::fs::read(d.join("config.json")).unwrap();
    assert_eq!(config(&dir), config(&base), "the base's config.json as it is");
    let (trained, base) = (Model::load(&CpuOps, &dir).unwrap(), Model::load(&CpuOps, &base).unwrap());
    assert_eq!(trained.cfg, base.cfg);
    let (t, b) = (trained.named(), base.named());
    assert_eq!(t.len(), b.len());
    for ((name, tw), (_, bw)) in t.iter().zip(&b) {
        assert_ne!(tw.data, bw.data, "{name} was not trained");
    }
}

#[test]
fn full_finetune_of_a_bf16_checkpoint_writes_bf16() {
    use tuneloop::model::safetensors_io::{decode_f32, FloatDtype, TensorStore};
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("bf16");
    common::bf16_copy(&base_model(tmp.path()), &base);
    let out_dir = tmp.path().join("run");
    let out = finetune_quickstart(&base, &out_dir, &["--peft.full=true", "--step_scheduler.max_steps=3"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // each weight as the base stores it: the last checkpoint's f32 masters, rounded
    let written = TensorStore::open_dir(&out_dir.join("model")).unwrap();
    let masters = TensorStore::open_dir(&out_dir.join("checkpoints/step-000003/model")).unwrap();
    assert_eq!(written.names(), masters.names());
    for name in written.names() {
        let (w, m) = (written.get(name).unwrap(), masters.get(name).unwrap());
        assert_eq!((w.dtype, m.dtype), (safetensors::Dtype::BF16, safetensors::Dtype::F32), "{name}");
        assert!(
            w.bytes == FloatDtype::Bf16.encode(&decode_f32(&m).unwrap()),
            "{name}: not the masters rounded"
        );
    }
}

#[test]
fn malformed_data_names_file_and_line_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let base = base_model(tmp.path());
    let good = std::fs::read_to_string(root().join("configs/quickstart/feedback.jsonl")).unwrap();
    let mut lines: Vec<&str> = good.lines().take(5).collect();
    lines.insert(3, r#"{"messages": [{"role": "robot", "content": "hi"}]}"#);
    let data = tmp.path().join("bad.jsonl");
    std::fs::write(&data, lines.join("\n")).unwrap();
    let out_dir = tmp.path().join("run");
    let out = tuneloop(&[
        "finetune",
        "-c",
        "configs/quickstart.yaml",
        &format!("--model.path={}", base.display()),
        &format!("--data.train={}", data.display()),
        &format!("--output_dir={}", out_dir.display()),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&format!("{}:4", data.display())) && stderr.contains("robot"), "{stderr}");
    assert!(!out_dir.exists(), "nothing may be written on bad input");
}

#[test]
fn unknown_recipe_keys_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = tmp.path().join("r.yaml");
    std::fs::write(&recipe, "model:\n  path: x\ndata:\n  train: t.jsonl\n  packin: true\noutput_dir: o\n")
        .unwrap();
    let out = tuneloop(&["finetune", "-c", recipe.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr.contains("r.yaml:5") && stderr.contains("packin"), "{stderr}");
    let out = tuneloop(&["finetune", "-c", "configs/quickstart.yaml", "--peft.rr=3"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--peft.rr=3") && stderr.contains("rr"), "{stderr}");
    // --print-config shows the resolved recipe with the override applied
    let out = tuneloop(&["finetune", "-c", "configs/quickstart.yaml", "--print-config", "--peft.r", "4"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && stdout.contains("r: 4"), "{stdout}");
}
