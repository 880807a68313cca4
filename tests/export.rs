//! Model directories written by tuneloop: they load back, and a merged export gives
//! the same logits as base + adapter, in the base checkpoint's dtypes.

mod common;

use std::path::Path;

use tuneloop::model::safetensors_io::TensorStore;
use tuneloop::model::{Adapter, Decoder, Model, Proj};
use tuneloop::ops::{cpu::CpuOps, Ops};
use tuneloop::train::{forward_backward, TokenBatch};
use tuneloop::util::rel_l2;

fn logits(
    model: &Model<tuneloop::ops::cpu::CpuTensor>,
    adapter: Option<&Adapter<tuneloop::ops::cpu::CpuTensor>>,
) -> Vec<f32> {
    let mut b = TokenBatch::default();
    b.push(&[3, 14, 15, 92, 65, 35, 89, 79], &[-100; 8]);
    b.push(&[2, 71, 82, 81, 82], &[-100; 5]);
    let r = forward_backward(&Decoder::new(&CpuOps, model, adapter), &b, None, None).unwrap();
    CpuOps.download(&r.logits).unwrap()
}

#[test]
fn a_saved_model_round_trips() {
    // Model::save writes a full run's checkpoints: config.json from the parsed config, f32
    // weights
    for case in common::CASES {
        let dir = common::golden(case);
        let base = Model::load(&CpuOps, &dir.join("model")).unwrap();
        let out = tempfile::tempdir().unwrap();
        base.save(&CpuOps, out.path()).unwrap();
        let reloaded = Model::load(&CpuOps, out.path()).unwrap();
        assert_eq!(reloaded.cfg, base.cfg, "{case}: config.json round trip");
        assert_eq!(logits(&reloaded, None), logits(&base, None), "{case}: weights round trip");
    }
}

/// `tuneloop export --merge` of `base` with `adapter` into `out`.
fn export(base: &Path, adapter: &Path, out: &Path) {
    let mut cmd = common::tuneloop_cmd();
    cmd.args(["export", "--merge", "--model"]).arg(base).arg("--adapter").arg(adapter).arg("--out").arg(out);
    let (stdout, _) = common::run_ok(&mut cmd, "export --merge");
    assert!(stdout.contains("wrote merged model"), "{stdout}");
}

/// The HF names of the weights `adapter` has a LoRA pair for.
fn adapted(adapter: &Adapter<tuneloop::ops::cpu::CpuTensor>, layers: usize) -> Vec<String> {
    (0..layers)
        .flat_map(|l| Proj::ALL.into_iter().map(move |p| (l, p)))
        .filter(|&(l, p)| adapter.pair(l, p).is_some())
        .map(|(l, p)| format!("{}.weight", p.hf_prefix(l)))
        .collect()
}

#[test]
fn export_merge_keeps_the_base_dtype_and_every_other_byte() {
    for case in common::CASES {
        let dir = common::golden(case);
        let (base_dir, adapter_dir) = (dir.join("model"), dir.join("adapter"));
        let out = tempfile::tempdir().unwrap();
        export(&base_dir, &adapter_dir, out.path());
        let base = Model::load(&CpuOps, &base_dir).unwrap();
        let adapter = Adapter::load(&CpuOps, &adapter_dir, &base.cfg).unwrap();
        let e =
            rel_l2(&logits(&Model::load(&CpuOps, out.path()).unwrap(), None), &logits(&base, Some(&adapter)));
        assert!(e < 1e-5, "{case}: exported logits differ from base+adapter by {e}");
        // and the adapter matters: the base alone is far off
        assert!(rel_l2(&logits(&base, None), &logits(&base, Some(&adapter))) > 1e-3, "{case}");
        let config = |d: &Path| std::fs::read(d.join("config.json")).unwrap();
        assert_eq!(config(out.path()), config(&base_dir), "{case}: config.json as the base's");
        // the same tensors in the same dtypes; only the adapted ones changed
        let (a, b) = (TensorStore::open_dir(&base_dir).unwrap(), TensorStore::open_dir(out.path()).unwrap());
        assert_eq!(a.names(), b.names(), "{case}");
        let adapted = adapted(&adapter, base.cfg.num_hidden_layers);
        assert!(!adapted.is_empty());
        for name in a.names() {
            let (x, y) = (a.get(name).unwrap(), b.get(name).unwrap());
            assert_eq!((x.dtype, &x.shape), (y.dtype, &y.shape), "{case}: {name}");
            assert_eq!(x.bytes == y.bytes, !adapted.iter().any(|n| n == name), "{case}: {name}");
        }
    }

    // a bf16 checkpoint stays bf16: half the bytes, merged weights rounded back to bf16
    let dir = common::golden("llama-gqa");
    let (base_f32, adapter_dir) = (dir.join("model"), dir.join("adapter"));
    let tmp = tempfile::tempdir().unwrap();
    let base_dir = tmp.path().join("bf16");
    common::bf16_copy(&base_f32, &base_dir);
    let out = tmp.path().join("merged");
    export(&base_dir, &adapter_dir, &out);
    let merged = TensorStore::open_dir(&out).unwrap();
    for name in merged.names() {
        assert_eq!(merged.get(name).unwrap().dtype, safetensors::Dtype::BF16, "{name}");
    }
    let size = |d: &Path| std::fs::metadata(d.join("model.safetensors")).unwrap().len() as f64;
    assert!(size(&out) < 0.55 * size(&base_f32), "{} vs {} bytes", size(&out), size(&base_f32));
    let base = Model::load(&CpuOps, &base_dir).unwrap();
    let adapter = Adapter::load(&CpuOps, &adapter_dir, &base.cfg).unwrap();
    let e = rel_l2(&logits(&Model::load(&CpuOps, &out).unwrap(), None), &logits(&base, Some(&adapter)));
    eprintln!("bf16 export: logits {e:.2e} (relative L2) from the bf16 base + adapter");
    assert!(e > 0.0 && e < 1e-2, "bf16 export: logits {e:.2e} from the bf16 base + adapter");
}

#[test]
fn init_model_writes_a_loadable_model_with_its_tokenizer() {
    let tok =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat-goldens/chatml-tools");
    let out = tempfile::tempdir().unwrap();
    tuneloop::model::export::init_random_model(&CpuOps, "tiny", &tok, out.path(), 0, 0.02).unwrap();
    let m = Model::load(&CpuOps, out.path()).unwrap();
    assert_eq!(m.cfg.vocab_size % 64, 0);
    assert!(m.cfg.eos_token_ids.len() == 1, "eos from tokenizer_config.json");
    assert!(out.path().join("tokenizer.json").exists() && out.path().join("tokenizer_config.json").exists());
    tuneloop::data::ChatModel::load(out.path()).unwrap();
}
