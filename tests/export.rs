//! Model directories written by tuneloop: they load back, and a merged export gives
//! the same logits as base + adapter.

mod common;

use tuneloop::model::{Adapter, Decoder, Model};
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
fn merged_export_matches_base_plus_adapter() {
    for case in common::CASES {
        let dir = common::golden(case);
        let base = Model::load(&CpuOps, &dir.join("model")).unwrap();
        let adapter = Adapter::load(&CpuOps, &dir.join("adapter"), &base.cfg).unwrap();
        let want = logits(&base, Some(&adapter));

        let mut merged = Model::load(&CpuOps, &dir.join("model")).unwrap();
        merged.merge(&CpuOps, &adapter).unwrap();
        let out = tempfile::tempdir().unwrap();
        merged.save(&CpuOps, out.path()).unwrap();
        let reloaded = Model::load(&CpuOps, out.path()).unwrap();
        assert_eq!(reloaded.cfg, base.cfg, "{case}: config.json round trip");
        let got = logits(&reloaded, None);
        let e = rel_l2(&got, &want);
        assert!(e < 1e-5, "{case}: merged logits differ from base+adapter by {e}");
        // and the merge did something: the base alone is far off
        assert!(rel_l2(&logits(&base, None), &want) > 1e-3);
    }
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
