//! Generation with a KV cache: one prefill over all prompts, then one token per
//! sequence per step, each step attending to the cached keys and values.

use anyhow::{ensure, Result};

use super::decoder::{Decoder, StepInputs};
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
        ensure!(prompts.iter().all(|p| !p.is_empty()), "every prompt needs at least one token");
        let cap = prompts.iter().map(Vec::len).max().unwrap_or(0) + max_new;
        let mut cache = KvCache::new(self, prompts.len(), cap)?;
        let mut out: Vec<Vec<u32>> = prompts.to_vec();
        let mut done = vec![false; prompts.len()];
        let mut feed: Vec<Vec<u32>> = prompts.to_vec();
        for _ in 0..max_new {
            let logits = self.extend(&mut cache, &feed, true)?;
            let v = self.model.cfg.vocab_size;
            let host = self.ops.download(&logits)?;
            let mut rows = host.chunks(v);
            for b in 0..prompts.len() {
                feed[b].clear();
                if done[b] {
                    continue;
                }
                let Some(row) = rows.next() else { break };
                let next = argmax(row) as u32;
                out[b].push(next);
                if eos.contains(&next) {
                    done[b] = true;
                } else {
                    feed[b].push(next);
                }
            }
            if done.iter().all(|&d| d) {
                break;
            }
        }
        Ok(out)
    }
}

/// Index of the largest value; the first one on ties, as `torch.argmax`.
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best
}
