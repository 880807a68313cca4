//! Generation with the KV cache gives the same logits as the full forward, for
//! several prompts of different lengths decoded together.

mod common;

use tuneloop::model::{Adapter, Decoder, Model};
use tuneloop::ops::{cpu::CpuOps, Ops};
use tuneloop::train::{forward_backward, TokenBatch};
use tuneloop::util::rel_l2;

#[test]
fn kv_cache_logits_equal_the_full_forward() {
    let ops = CpuOps;
    for case in common::CASES {
        let dir = common::golden(case);
        let model = Model::load(&ops, &dir.join("model")).unwrap();
        let adapter = Adapter::load(&ops, &dir.join("adapter"), &model.cfg).unwrap();
        let dec = Decoder::new(&ops, &model, Some(&adapter));
        let v = model.cfg.vocab_size;
        let prompts: Vec<Vec<u32>> = vec![vec![3, 17, 9], vec![5, 1, 200, 7, 42, 8, 11]];
        let outs = dec.generate_greedy(&prompts, 6, &[]).unwrap();
        for (prompt, full) in prompts.iter().zip(&outs) {
            assert_eq!(full.len(), prompt.len() + 6);
            assert_eq!(&full[..prompt.len()], &prompt[..]);
        }
        // Reference: one full forward per finished sequence.
        let mut cache = tuneloop::model::generate::KvCache::new(&dec, 2, 16).unwrap();
        let prefill = dec.extend(&mut cache, &prompts, false).unwrap();
        let prefill = ops.download(&prefill).unwrap();
        let mut row = 0;
        for (b, full) in outs.iter().enumerate() {
            let mut batch = TokenBatch::default();
            batch.push(full, &vec![-100; full.len()]);
            let reference = forward_backward(&dec, &batch, None, None).unwrap();
            let ref_logits = ops.download(&reference.logits).unwrap();
            let n = prompts[b].len();
            let got = &prefill[row * v..(row + n) * v];
            assert!(rel_l2(got, &ref_logits[..n * v]) < 1e-5, "{case}: prefill logits of sequence {b}");
            row += n;
            // each greedy token is the argmax of the full forward at the step before it
            for t in n..full.len() {
                let logits = &ref_logits[(t - 1) * v..t * v];
                assert_eq!(
                    full[t] as usize,
                    tuneloop::model::generate::argmax(logits),
                    "{case} seq {b} token {t}"
                );
            }
        }
        // decode steps: feed one token per sequence, compare against the full forward
        let feed: Vec<Vec<u32>> = outs.iter().zip(&prompts).map(|(o, p)| vec![o[p.len()]]).collect();
        let step = ops.download(&dec.extend(&mut cache, &feed, true).unwrap()).unwrap();
        for (b, full) in outs.iter().enumerate() {
            let n = prompts[b].len() + 1;
            let mut batch = TokenBatch::default();
            batch.push(&full[..n], &vec![-100; n]);
            let r = forward_backward(&dec, &batch, None, None).unwrap();
            let ref_logits = ops.download(&r.logits).unwrap();
            let e = rel_l2(&step[b * v..(b + 1) * v], &ref_logits[(n - 1) * v..n * v]);
            assert!(e < 1e-5, "{case}: decode-step logits of sequence {b}: {e}");
        }
    }
}
