//! Generation with a KV cache: one prefill over all prompts, then one token per
//! sequence per step, each step attending to the cached keys and values.

use anyhow::{ensure, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::decoder::{Decoder, StepInputs};
pub use crate::ops::argmax;
use crate::ops::{AttnLayout, Ops, SeqSpan};

/// Per layer, keys and values of `n_seqs` sequences of up to `cap` tokens each:
/// sequence `b` owns rows `b·cap .. (b+1)·cap`.
pub struct KvCache<T> {
    pub k: Vec<T>,
    pub v: Vec<T>,
    pub cap: usize,
    pub lens: Vec<usize>,
}

impl<T> KvCache<T> {
    pub fn new<O: Ops<Tensor = T>>(dec: &Decoder<O>, n_seqs: usize, cap: usize) -> Result<Self> {
        let c = &dec.model.cfg;
        let shape = [n_seqs * cap, c.kv_dim()];
        let mut k = Vec::with_capacity(c.num_hidden_layers);
        let mut v = Vec::with_capacity(c.num_hidden_layers);
        for _ in 0..c.num_hidden_layers {
            k.push(dec.ops.zeros(&shape)?);
            v.push(dec.ops.zeros(&shape)?);
        }
        Ok(Self { k, v, cap, lens: vec![0; n_seqs] })
    }
}

impl<'a, O: Ops> Decoder<'a, O> {
    /// Appends `new[b]` tokens to sequence `b` of the cache and returns the logits
    /// `[Σ new[b].len(), V]` of every appended token (`last_only`: of each sequence's
    /// last one, `[sequences with new tokens, V]`).
    pub fn extend(
        &self,
        cache: &mut KvCache<O::Tensor>,
        new: &[Vec<u32>],
        last_only: bool,
    ) -> Result<O::Tensor> {
        ensure!(
            new.len() == cache.lens.len(),
            "{} token lists for {} cached sequences",
            new.len(),
            cache.lens.len()
        );
        let (mut ids, mut pos, mut seqs, mut writes, mut last) = (vec![], vec![], vec![], vec![], vec![]);
        for (b, toks) in new.iter().enumerate() {
            if toks.is_empty() {
                continue;
            }
            let len = cache.lens[b];
            ensure!(
                len + toks.len() <= cache.cap,
                "sequence {b} would exceed the cache's {} tokens",
                cache.cap
            );
            let row = ids.len();
            writes.push((row, b * cache.cap + len, toks.len()));
            seqs.push(SeqSpan {
                q_start: row,
                q_len: toks.len(),
                k_start: b * cache.cap,
                k_len: len + toks.len(),
            });
            ids.extend_from_slice(toks);
            pos.extend((len..len + toks.len()).map(|p| p as u32));
            last.push(ids.len() - 1);
            cache.lens[b] += toks.len();
        }
        let mut inp = StepInputs::new(self.ops, &self.rope, &ids, &pos, AttnLayout { seqs })?;
        inp.cache_writes = writes;
        let state = self.forward(&inp, Some(cache), false)?;
        self.logits(&state, last_only.then_some(&last[..]))
    }

    /// Greedy decoding of `max_new` tokens after each prompt, stopping a sequence at
    /// any of `eos`. Returns prompt + generated tokens per sequence.
    pub fn generate_greedy(
        &self,
        prompts: &[Vec<u32>],
        max_new: usize,
        eos: &[u32],
    ) -> Result<Vec<Vec<u32>>> {
        self.generate(prompts, max_new, eos, &Sampling::greedy())
    }

    /// Decodes up to `max_new` tokens after each prompt (greedy, or sampled as
    /// `sampling` says), all prompts together through one KV cache; a sequence stops at
    /// any of `eos` (which is kept). Returns prompt + generated tokens per sequence.
    pub fn generate(
        &self,
        prompts: &[Vec<u32>],
        max_new: usize,
        eos: &[u32],
        sampling: &Sampling,
    ) -> Result<Vec<Vec<u32>>> {
        ensure!(prompts.iter().all(|p| !p.is_empty()), "every prompt needs at least one token");
        let cap = prompts.iter().map(Vec::len).max().unwrap_or(0) + max_new;
        let mut cache = KvCache::new(self, prompts.len(), cap)?;
        let mut out: Vec<Vec<u32>> = prompts.to_vec();
        let mut feed: Vec<Vec<u32>> = prompts.to_vec();
        // one generator per sequence: a sequence's samples do not depend on its batch
        let mut rngs: Vec<ChaCha8Rng> = (0..prompts.len())
            .map(|b| {
                ChaCha8Rng::seed_from_u64(sampling.seed ^ (b as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
            })
            .collect();
        for _ in 0..max_new {
            let logits = self.extend(&mut cache, &feed, true)?;
            // the sequences that were fed this step, one logits row each, in order
            let fed: Vec<usize> = (0..feed.len()).filter(|&b| !feed[b].is_empty()).collect();
            let next: Vec<u32> = if sampling.temperature <= 0.0 {
                // greedy: each row's argmax where the logits are, only the tokens come over
                self.ops.argmax_rows(&logits)?
            } else {
                let host = self.ops.download(&logits)?;
                let rows = host.chunks(self.model.cfg.vocab_size);
                rows.zip(&fed).map(|(row, &b)| sampling.pick(row, &mut rngs[b]) as u32).collect()
            };
            ensure!(next.len() == fed.len(), "{} next tokens for {} sequences", next.len(), fed.len());
            for (&b, &tok) in fed.iter().zip(&next) {
                out[b].push(tok);
                feed[b].clear();
                // a sequence that reached a stop token is fed no more
                if !eos.contains(&tok) {
                    feed[b].push(tok);
                }
            }
            if feed.iter().all(Vec::is_empty) {
                break;
            }
        }
        Ok(out)
    }
}

/// How the next token is chosen: greedy when `temperature` is 0, else sampled from
/// the softmax at that temperature, cut to the `top_k` most likely tokens (0 = all) and
/// to the smallest set whose probability reaches `top_p`, as HF's samplers do.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub seed: u64,
}

impl Sampling {
    pub fn greedy() -> Self {
        Self { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 }
    }

    pub fn pick(&self, logits: &[f32], rng: &mut ChaCha8Rng) -> usize {
        if self.temperature <= 0.0 {
            return argmax(logits);
        }
        let mut idx: Vec<usize> = (0..logits.len()).collect();
        idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        if self.top_k > 0 {
            idx.truncate(self.top_k);
        }
        let m = logits[idx[0]];
        let mut p: Vec<f64> =
            idx.iter().map(|&i| (((logits[i] - m) / self.temperature) as f64).exp()).collect();
        let z: f64 = p.iter().sum();
        p.iter_mut().for_each(|x| *x /= z);
        if self.top_p < 1.0 {
            let mut cum = 0.0;
            let keep = p
                .iter()
                .position(|&x| {
                    cum += x;
                    cum >= self.top_p as f64
                })
                .map_or(p.len(), |i| i + 1);
            idx.truncate(keep);
            p.truncate(keep);
        }
        let total: f64 = p.iter().sum();
        let mut u = rng.random::<f64>() * total;
        for (&i, &pi) in idx.iter().zip(&p) {
            if u < pi {
                return i;
            }
            u -= pi;
        }
        idx[idx.len() - 1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_respects_top_k_top_p_and_seed() {
        let logits = [1.0f32, 3.0, 2.0, 0.5, 2.9];
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        assert_eq!(Sampling::greedy().pick(&logits, &mut rng), 1);
        let top2 = Sampling { temperature: 1.0, top_k: 2, top_p: 1.0, seed: 0 };
        for _ in 0..200 {
            assert!(matches!(top2.pick(&logits, &mut rng), 1 | 4));
        }
        // top_p small enough that only the best token is left
        let nucleus = Sampling { temperature: 1.0, top_k: 0, top_p: 0.3, seed: 0 };
        for _ in 0..50 {
            assert_eq!(nucleus.pick(&logits, &mut rng), 1);
        }
        // a hot sampler reaches every token; the same seed gives the same draws
        let hot = Sampling { temperature: 5.0, top_k: 0, top_p: 1.0, seed: 0 };
        let draw = |seed| {
            let mut r = ChaCha8Rng::seed_from_u64(seed);
            (0..300).map(|_| hot.pick(&logits, &mut r)).collect::<Vec<_>>()
        };
        let a = draw(9);
        assert_eq!(a, draw(9));
        assert!((0..5).all(|t| a.contains(&t)));
    }
}
