//! The training step beyond the goldens: packed documents give the same loss and
//! gradients as the same documents run separately, LoRA and full-model gradients agree
//! with finite differences, and a few AdamW steps lower the loss.

mod common;

use tuneloop::model::decoder::{Grads, Recompute};
use tuneloop::model::{Adapter, Decoder, LoraConfig, Model, Proj};
use tuneloop::ops::{cpu::CpuOps, cpu::CpuTensor, AdamWParams, GradScale, LossStats, Ops};
use tuneloop::train::{
    clip_scale, eval_step, forward_backward, forward_backward_into, grad_clip, grad_norm, train_step, AdamW,
    TokenBatch,
};
use tuneloop::util::rel_l2;

fn docs() -> Vec<(Vec<u32>, Vec<i64>)> {
    let a: Vec<u32> = vec![5, 9, 100, 3, 77, 12, 8];
    let b: Vec<u32> = vec![200, 4, 4, 31, 18];
    let c: Vec<u32> = vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11];
    let lab = |v: &Vec<u32>, masked: usize| -> Vec<i64> {
        v.iter().enumerate().map(|(i, &t)| if i < masked { -100 } else { t as i64 }).collect()
    };
    vec![(a.clone(), lab(&a, 2)), (b.clone(), lab(&b, 0)), (c.clone(), lab(&c, 5))]
}

/// A golden case's model and adapter, and [`docs`] packed into one batch.
fn golden_with_docs(case: &str) -> (Model<CpuTensor>, Adapter<CpuTensor>, TokenBatch) {
    let dir = common::golden(case);
    let model = Model::load(&CpuOps, &dir.join("model")).unwrap();
    let adapter = Adapter::load(&CpuOps, &dir.join("adapter"), &model.cfg).unwrap();
    let mut batch = TokenBatch::default();
    for (ids, labels) in docs() {
        batch.push(&ids, &labels);
    }
    (model, adapter, batch)
}

fn grads_of(ops: &CpuOps, g: &Adapter<tuneloop::ops::cpu::CpuTensor>) -> Vec<f32> {
    g.named().into_iter().flat_map(|(_, t)| ops.download(t).unwrap()).collect()
}

#[test]
fn packed_batch_equals_documents_run_separately() {
    let ops = CpuOps;
    for case in common::CASES {
        let dir = common::golden(case);
        let model = Model::load(&ops, &dir.join("model")).unwrap();
        let adapter = Adapter::load(&ops, &dir.join("adapter"), &model.cfg).unwrap();
        let dec = Decoder::new(&ops, &model, Some(&adapter));
        let docs = docs();
        let mut packed = TokenBatch::default();
        for (ids, labels) in &docs {
            packed.push(ids, labels);
        }
        let total = packed.n_targets();
        let mut g_packed = adapter.zeros_like(&ops, &model.cfg).unwrap();
        let p = forward_backward(&dec, &packed, Some(&mut g_packed), None).unwrap();
        // separately, each normalised by the packed batch's count, gradients summed
        let mut g_sep = adapter.zeros_like(&ops, &model.cfg).unwrap();
        let mut loss_sum = 0.0;
        for (ids, labels) in &docs {
            let mut one = TokenBatch::default();
            one.push(ids, labels);
            loss_sum += forward_backward(&dec, &one, Some(&mut g_sep), Some(total)).unwrap().loss.loss_sum;
        }
        assert_eq!(p.loss.n_counted, total);
        let packed_loss = p.loss.loss_sum;
        assert!((packed_loss - loss_sum).abs() / loss_sum < 1e-6, "{case}: {packed_loss} vs {loss_sum}");
        let e = rel_l2(&grads_of(&ops, &g_packed), &grads_of(&ops, &g_sep));
        assert!(e < 1e-5, "{case}: packed vs separate gradients differ by {e}");
    }
}

#[test]
fn lora_gradients_match_finite_differences() {
    let ops = CpuOps;
    let dir = common::golden("qwen2-bias");
    let model = Model::load(&ops, &dir.join("model")).unwrap();
    let mut adapter = Adapter::load(&ops, &dir.join("adapter"), &model.cfg).unwrap();
    let mut batch = TokenBatch::default();
    for (ids, labels) in docs() {
        batch.push(&ids, &labels);
    }
    let mut grads = adapter.zeros_like(&ops, &model.cfg).unwrap();
    forward_backward(&Decoder::new(&ops, &model, Some(&adapter)), &batch, Some(&mut grads), None).unwrap();
    let loss_at = |ad: &Adapter<tuneloop::ops::cpu::CpuTensor>| {
        forward_backward(&Decoder::new(&ops, &model, Some(ad)), &batch, None, None).unwrap().mean_loss()
    };
    // central differences in f64-accumulated f32: probe a few entries of A and B
    let h = 1e-2f32;
    for (layer, proj, which, idx) in [(0, Proj::Q, 'A', 5), (1, Proj::Down, 'B', 17), (1, Proj::V, 'A', 3)] {
        let analytic = {
            let p = grads.pair(layer, proj).unwrap();
            ops.download(if which == 'A' { &p.a } else { &p.b }).unwrap()[idx] as f64
        };
        let bump = |ad: &mut Adapter<tuneloop::ops::cpu::CpuTensor>, delta: f32| {
            let p = ad.layers[layer][proj as usize].as_mut().unwrap();
            let t = if which == 'A' { &mut p.a } else { &mut p.b };
            t.data[idx] += delta;
        };
        bump(&mut adapter, h);
        let up = loss_at(&adapter);
        bump(&mut adapter, -2.0 * h);
        let down = loss_at(&adapter);
        bump(&mut adapter, h);
        let numeric = (up - down) / (2.0 * h as f64);
        assert!(
            (numeric - analytic).abs() <= 2e-3 * analytic.abs().max(1e-2),
            "layer {layer} {proj:?} {which}[{idx}]: numeric {numeric} analytic {analytic}"
        );
    }
}

#[test]
fn adamw_steps_from_a_fresh_adapter_lower_the_loss() {
    let ops = CpuOps;
    let model = Model::load(&ops, &common::golden("llama3-rope-tied").join("model")).unwrap();
    let mut cfg = LoraConfig::new(8, 16.0, Proj::ALL.to_vec());
    cfg.use_rslora = true;
    let mut adapter = Adapter::init(&ops, &cfg, &model.cfg, 1).unwrap();
    let mut batch = TokenBatch::default();
    for (ids, labels) in docs() {
        batch.push(&ids, &labels);
    }
    let hp = AdamWParams { lr: 5e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 };
    let mut opt = AdamW::new(&ops, &adapter, hp).unwrap();
    // torch's way beside: clip_grad_norm_ scales the gradients, then a plain step
    let mut torch_way = Adapter::init(&ops, &cfg, &model.cfg, 1).unwrap();
    let mut torch_opt = AdamW::new(&ops, &torch_way, hp).unwrap();
    let mut losses = vec![];
    let mut clipped = 0;
    for _ in 0..8 {
        let mut grads = adapter.zeros_like(&ops, &model.cfg).unwrap();
        let r = forward_backward(&Decoder::new(&ops, &model, Some(&adapter)), &batch, Some(&mut grads), None)
            .unwrap();
        losses.push(r.mean_loss());
        let norm = grad_norm(&ops, &grads).unwrap();
        let clip = grad_clip(&ops, &grads, Some(1.0)).unwrap();
        let s = clip.scale;
        assert_eq!((clip.norm, s), (norm, clip_scale(norm, Some(1.0))));
        assert_eq!(s < 1.0, norm > 1.0, "norm {norm}, scale {s}");
        assert!(norm * s as f64 <= 1.0 + 1e-6, "{norm} clipped to {}", norm * s as f64);
        clipped += usize::from(s < 1.0);
        opt.update(&ops, &mut adapter, &grads, hp.lr, GradScale::Clip(&clip)).unwrap();
        for t in grads.tensors_mut() {
            t.data.iter_mut().for_each(|g| *g *= s);
        }
        torch_opt.update(&ops, &mut torch_way, &grads, hp.lr, GradScale::By(1.0)).unwrap();
        for ((n, a), (_, b)) in adapter.named().into_iter().zip(torch_way.named()) {
            assert!(a.data.iter().zip(&b.data).all(|(x, y)| x.to_bits() == y.to_bits()), "{n}");
        }
    }
    assert!(clipped > 0, "no step was clipped: the test shows nothing about the clip");
    assert!(losses[7] < losses[0] - 0.05, "loss should fall: {losses:?}");

    // a NaN in one gradient: its norm is NaN, and a clipped step leaves the adapter and
    // the moments as they were (an unclipped one would spread the NaN)
    let mut grads = adapter.zeros_like(&ops, &model.cfg).unwrap();
    forward_backward(&Decoder::new(&ops, &model, Some(&adapter)), &batch, Some(&mut grads), None).unwrap();
    grads.tensors_mut()[3].data[1] = f32::NAN;
    let clip = grad_clip(&ops, &grads, Some(1.0)).unwrap();
    assert!(clip.norm.is_nan(), "norm {}", clip.norm);
    let bits = |a: &Adapter<CpuTensor>| {
        a.named().into_iter().flat_map(|(_, t)| t.data.iter().map(|x| x.to_bits())).collect::<Vec<_>>()
    };
    let before = (bits(&adapter), bits(&opt.m), bits(&opt.v));
    opt.update(&ops, &mut adapter, &grads, hp.lr, GradScale::Clip(&clip)).unwrap();
    assert!((bits(&adapter), bits(&opt.m), bits(&opt.v)) == before, "a NaN gradient changed the adapter");
    opt.update(&ops, &mut adapter, &grads, hp.lr, GradScale::By(1.0)).unwrap();
    assert!(adapter.named().iter().any(|(_, t)| t.data.iter().any(|x| x.is_nan())), "unclipped: no NaN");
}

#[test]
fn full_model_gradients_match_finite_differences() {
    let ops = CpuOps;
    let mut batch = TokenBatch::default();
    for (ids, labels) in docs() {
        batch.push(&ids, &labels);
    }
    for case in common::CASES {
        let mut model = Model::load(&ops, &common::golden(case).join("model")).unwrap();
        let mut grads = model.zeros_like(&ops).unwrap();
        let dec = Decoder::new(&ops, &model, None);
        forward_backward_into(&dec, &batch, Some(Grads::model(&mut grads)), None).unwrap();
        let loss_at = |m: &Model<CpuTensor>| {
            forward_backward(&Decoder::new(&ops, m, None), &batch, None, None).unwrap().mean_loss()
        };
        let d = model.cfg.hidden_size;
        // every kind of tensor: the embedding (a row the input uses, where a tied model's
        // two gradients meet, and one it does not), norm weights, projections, a bias,
        // the final norm and an untied lm_head
        let mut probes: Vec<(String, Option<usize>)> = vec![
            ("model.embed_tokens.weight".into(), Some(5 * d + 3)),
            ("model.embed_tokens.weight".into(), Some(250 * d + 7)),
            ("model.embed_tokens.weight".into(), None),
            ("model.layers.0.input_layernorm.weight".into(), None),
            ("model.layers.1.post_attention_layernorm.weight".into(), Some(11)),
            ("model.layers.0.self_attn.q_proj.weight".into(), None),
            ("model.layers.0.self_attn.v_proj.weight".into(), Some(100)),
            ("model.layers.1.self_attn.o_proj.weight".into(), None),
            ("model.layers.1.mlp.gate_proj.weight".into(), None),
            ("model.layers.0.mlp.down_proj.weight".into(), Some(333)),
            ("model.norm.weight".into(), None),
        ];
        if model.cfg.qkv_bias {
            probes.push(("model.layers.0.self_attn.k_proj.bias".into(), None));
            probes.push(("model.layers.1.self_attn.q_proj.bias".into(), Some(9)));
        }
        if !model.cfg.tie_word_embeddings {
            probes.push(("lm_head.weight".into(), None));
        }
        let g_named = grads.named();
        for (name, idx) in probes {
            let pos =
                g_named.iter().position(|(n, _)| *n == name).unwrap_or_else(|| panic!("{case}: {name}"));
            let g = &g_named[pos].1.data;
            // None: the entry with the largest gradient, where a missing term shows most
            let idx = idx
                .unwrap_or_else(|| (0..g.len()).max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs())).unwrap());
            let analytic = g[idx] as f64;
            let mut central = |h: f32| {
                let w0 = model.tensors_mut()[pos].data[idx];
                model.tensors_mut()[pos].data[idx] = w0 + h;
                let up = loss_at(&model);
                model.tensors_mut()[pos].data[idx] = w0 - h;
                let down = loss_at(&model);
                model.tensors_mut()[pos].data[idx] = w0;
                (up - down) / (2.0 * h as f64)
            };
            // Richardson's extrapolation of two central differences cancels their h² error,
            // which is large where a weight enters through RMSNorm (the embedding)
            let numeric = (4.0 * central(5e-3) - central(1e-2)) / 3.0;
            assert!(
                (numeric - analytic).abs() <= 2e-3 * analytic.abs().max(1e-2),
                "{case} {name}[{idx}]: numeric {numeric} analytic {analytic}"
            );
        }
    }
}

#[test]
fn model_gradients_leave_the_lora_gradients_as_they_are() {
    let ops = CpuOps;
    let dir = common::golden("qwen2-bias");
    let model = Model::load(&ops, &dir.join("model")).unwrap();
    let adapter = Adapter::load(&ops, &dir.join("adapter"), &model.cfg).unwrap();
    let mut batch = TokenBatch::default();
    for (ids, labels) in docs() {
        batch.push(&ids, &labels);
    }
    let dec = Decoder::new(&ops, &model, Some(&adapter));
    let mut lora_only = adapter.zeros_like(&ops, &model.cfg).unwrap();
    forward_backward(&dec, &batch, Some(&mut lora_only), None).unwrap();
    let (mut lora, mut full) =
        (adapter.zeros_like(&ops, &model.cfg).unwrap(), model.zeros_like(&ops).unwrap());
    let both = Grads { adapter: Some(&mut lora), model: Some(&mut full) };
    forward_backward_into(&dec, &batch, Some(both), None).unwrap();
    assert_eq!(grads_of(&ops, &lora), grads_of(&ops, &lora_only));
    assert!(
        full.named().iter().all(|(_, t)| t.data.iter().any(|&g| g != 0.0)),
        "every tensor gets a gradient"
    );
}

#[test]
fn chunked_lm_head_and_loss_give_the_whole_logits_gradients() {
    let ops = CpuOps;
    for case in common::CASES {
        let (model, adapter, batch) = golden_with_docs(case);
        let dec = Decoder::new(&ops, &model, Some(&adapter));
        let (mut lora, mut full) =
            (adapter.zeros_like(&ops, &model.cfg).unwrap(), model.zeros_like(&ops).unwrap());
        let whole = forward_backward_into(
            &dec,
            &batch,
            Some(Grads { adapter: Some(&mut lora), model: Some(&mut full) }),
            None,
        )
        .unwrap()
        .loss;
        // chunks of 4 rows: some hold only masked tokens (skipped), one is ragged
        let (mut c_lora, mut c_full) =
            (adapter.zeros_like(&ops, &model.cfg).unwrap(), model.zeros_like(&ops).unwrap());
        let mut chunked = LossStats::default();
        train_step(
            &dec,
            &batch,
            Grads { adapter: Some(&mut c_lora), model: Some(&mut c_full) },
            None,
            Some(4),
            &mut chunked,
        )
        .unwrap();
        assert_eq!((chunked.n_counted, chunked.n_correct), (whole.n_counted, whole.n_correct));
        assert!((chunked.loss_sum - whole.loss_sum).abs() <= 1e-9 * whole.loss_sum.abs(), "{case}: loss");
        let e = rel_l2(&grads_of(&ops, &c_lora), &grads_of(&ops, &lora));
        assert!(e < 1e-6, "{case}: LoRA gradients off by {e:.2e}");
        let flat = |m: &Model<CpuTensor>| -> Vec<f32> {
            m.named().into_iter().flat_map(|(_, t)| t.data.clone()).collect()
        };
        let e = rel_l2(&flat(&c_full), &flat(&full));
        assert!(e < 1e-6, "{case}: model gradients (lm_head accumulated over chunks) off by {e:.2e}");
        // validation's step: the same loss and accuracy without gradients, in chunks or
        // whole, added to what the sums held (the training step's: twice the batch's)
        for rows in [Some(4), None] {
            let mut eval = chunked;
            eval_step(&dec, &batch, rows, &mut eval).unwrap();
            assert_eq!(
                (eval.n_counted, eval.n_correct),
                (2 * whole.n_counted, 2 * whole.n_correct),
                "{case}"
            );
            let d = (eval.loss_sum - 2.0 * whole.loss_sum).abs();
            assert!(d <= 2e-9 * whole.loss_sum.abs(), "{case}, head rows {rows:?}: eval loss");
        }
    }
}

#[test]
fn recomputed_activations_give_the_same_gradients() {
    let ops = CpuOps;
    for case in common::CASES {
        let (model, adapter, batch) = golden_with_docs(case);
        let run = |recompute: Recompute| {
            let mut dec = Decoder::new(&ops, &model, Some(&adapter));
            dec.lora_dropout = Some(tuneloop::ops::Dropout { p: 0.2, seed: 11 });
            dec.recompute = recompute;
            let (mut lora, mut full) =
                (adapter.zeros_like(&ops, &model.cfg).unwrap(), model.zeros_like(&ops).unwrap());
            let mut r = LossStats::default();
            train_step(
                &dec,
                &batch,
                Grads { adapter: Some(&mut lora), model: Some(&mut full) },
                None,
                None,
                &mut r,
            )
            .unwrap();
            let full: Vec<f32> = full.named().into_iter().flat_map(|(_, t)| t.data.clone()).collect();
            (r, grads_of(&ops, &lora), full)
        };
        let kept = run(Recompute::Off);
        // every layer, and every other one (layer 0 recomputed, layer 1 kept)
        for every in [1, 2] {
            let recomputed = run(Recompute::Every(every));
            assert_eq!(kept.0, recomputed.0, "{case}, every {every}: loss");
            assert_eq!(
                kept.1, recomputed.1,
                "{case}, every {every}: LoRA gradients (dropout masks included)"
            );
            assert_eq!(kept.2, recomputed.2, "{case}, every {every}: model gradients");
        }
    }
}
