//! One forward + loss + backward over a batch of token sequences.

use anyhow::{ensure, Context, Result};

use crate::model::decoder::{shift_labels, ForwardState, Grads, StepInputs};
use crate::model::{Adapter, Decoder};
use crate::ops::{AttnLayout, LossStats, Ops};

/// Sequences laid end to end on one token axis (a `[batch, seq]` batch, or packed
/// documents): positions restart at 0 for each sequence and attention never crosses
/// from one to the next.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TokenBatch {
    pub ids: Vec<u32>,
    /// Unshifted labels (`-100` = not trained), as HF takes them.
    pub labels: Vec<i64>,
    pub seq_lens: Vec<usize>,
}

impl TokenBatch {
    pub fn push(&mut self, ids: &[u32], labels: &[i64]) {
        debug_assert_eq!(ids.len(), labels.len());
        self.ids.extend_from_slice(ids);
        self.labels.extend_from_slice(labels);
        self.seq_lens.push(ids.len());
    }

    pub fn positions(&self) -> Vec<u32> {
        self.seq_lens.iter().flat_map(|&n| 0..n as u32).collect()
    }

    pub fn layout(&self) -> AttnLayout {
        AttnLayout::packed(&self.seq_lens)
    }

    /// Tokens that count in the loss (after the shift).
    pub fn n_targets(&self) -> usize {
        shift_labels(&self.labels, &self.layout()).iter().filter(|&&t| t != -100).count()
    }
}

pub struct StepResult<O: Ops> {
    pub inputs: StepInputs<O>,
    pub state: ForwardState<O::Tensor>,
    pub logits: O::Tensor,
    pub loss: LossStats,
}

impl<O: Ops> StepResult<O> {
    pub fn mean_loss(&self) -> f64 {
        self.loss.mean()
    }
}

/// Forward, loss and (with `grads`) backward into the adapter's gradients. The
/// gradient is that of `loss_sum / denominator`; `denominator` defaults to this batch's
/// counted tokens (HF's mean), and is the whole global batch's count under gradient
/// accumulation.
pub fn forward_backward<O: Ops>(
    dec: &Decoder<O>,
    batch: &TokenBatch,
    grads: Option<&mut Adapter<O::Tensor>>,
    denominator: Option<usize>,
) -> Result<StepResult<O>> {
    forward_backward_into(dec, batch, grads.map(Grads::adapter), denominator)
}

/// The batch on the device, and its shifted targets (`-100` = not counted).
fn step_inputs<O: Ops>(dec: &Decoder<O>, batch: &TokenBatch) -> Result<(StepInputs<O>, Vec<i64>)> {
    ensure!(
        batch.ids.len() == batch.labels.len(),
        "{} ids but {} labels",
        batch.ids.len(),
        batch.labels.len()
    );
    let inputs = StepInputs::new(dec.ops, &dec.rope, &batch.ids, &batch.positions(), batch.layout())?;
    let targets = shift_labels(&batch.labels, &inputs.layout);
    Ok((inputs, targets))
}

/// The denominator of the mean loss: `given`, or the counted targets.
fn loss_denominator(given: Option<usize>, targets: &[i64]) -> usize {
    given.unwrap_or_else(|| targets.iter().filter(|&&t| t != -100).count())
}

/// [`forward_backward`] with any gradient targets: the adapter's, the model's own
/// (full fine-tuning), or both.
pub fn forward_backward_into<O: Ops>(
    dec: &Decoder<O>,
    batch: &TokenBatch,
    grads: Option<Grads<O::Tensor>>,
    denominator: Option<usize>,
) -> Result<StepResult<O>> {
    let (inputs, targets) = step_inputs(dec, batch)?;
    let want_grad = grads.is_some();
    let fwd = crate::profiling::range(c"forward");
    let state = dec.forward(&inputs, None, want_grad)?;
    drop(fwd);
    let _loss = crate::profiling::range(c"lm_head_loss");
    let logits = dec.logits(&state, None)?;
    let denom = loss_denominator(denominator, &targets);
    let scale = want_grad.then(|| 1.0 / denom.max(1) as f32);
    let (loss, dlogits) = dec.ops.cross_entropy(&logits, &targets, scale)?;
    if let Some(grads) = grads {
        let dlogits = dlogits.as_ref().context("cross-entropy gave no gradient")?;
        let _bwd = crate::profiling::range(c"backward");
        dec.backward(&inputs, &state, dlogits, grads)?;
    }
    Ok(StepResult { inputs, state, logits, loss })
}

/// How many bytes of lm_head logits [`train_step`] computes at once: with a 128k
/// vocabulary, 512 rows in f32 and 1024 in bf16. The full `[tokens × vocab]` logits and
/// their gradient never exist, which on an 8k-token micro-batch saves twice 4 GiB (f32).
pub const HEAD_CHUNK_BYTES: usize = 256 << 20;

/// Rows of a chunk of [`train_step`]'s lm_head by default: as many as
/// [`HEAD_CHUNK_BYTES`] of logits of `elem_bytes` an element hold, rounded down to a
/// multiple of 128, the row tiles of the GEMMs on a GPU (523 rows of a 128k vocabulary
/// in f32 would leave 117 rows of a fifth 128-row tile idle in both of the chunk's
/// products: 18% of the head's work).
pub fn head_chunk_rows(vocab: usize, elem_bytes: usize) -> usize {
    let rows = HEAD_CHUNK_BYTES / (vocab.max(1) * elem_bytes.max(1));
    if rows >= 128 {
        rows / 128 * 128
    } else {
        rows.max(1)
    }
}

/// How a step runs its lm_head: chunks of `chunk` rows, those with a trained token
/// (`ranges`; the others have no loss and their gradient rows stay zero), and the key of
/// the step's buffers for [`Ops::planned`]: steps of one `kind` with as many chunks ask
/// for the same buffers in the same order, each as large as their tokens make it.
struct HeadChunks {
    ranges: Vec<std::ops::Range<usize>>,
    key: u64,
}

impl HeadChunks {
    fn new<O: Ops>(dec: &Decoder<O>, targets: &[i64], head_rows: Option<usize>, kind: &str) -> Self {
        use std::hash::{Hash, Hasher};
        let n = targets.len();
        let chunk = head_rows
            .unwrap_or_else(|| head_chunk_rows(dec.model.cfg.vocab_size, dec.ops.activation_bytes()))
            .max(1);
        let ranges: Vec<_> = (0..n)
            .step_by(chunk)
            .map(|r0| r0..(r0 + chunk).min(n))
            .filter(|r| targets[r.clone()].iter().any(|&t| t != -100))
            .collect();
        // the same ops in the same order, at any number of tokens
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (kind, chunk, ranges.len()).hash(&mut h);
        Self { ranges, key: h.finish() }
    }
}

/// Rows `r` of the final norm's output and their cross-entropy, added into `sums`
/// (with `scale`, also the gradient of their logits); the chunk's logits are gone when
/// it returns.
fn chunk_loss<O: Ops>(
    dec: &Decoder<O>,
    final_norm: &O::Tensor,
    targets: &[i64],
    r: &std::ops::Range<usize>,
    scale: Option<f32>,
    sums: &mut O::LossSums,
) -> Result<(O::Tensor, Option<O::Tensor>)> {
    let x = dec.ops.gather_rows(final_norm, &r.clone().collect::<Vec<_>>())?;
    let logits = dec.ops.linear_fwd(&x, dec.model.lm_head(), None, None, None)?.0;
    let dlogits = dec.ops.cross_entropy_into(&logits, &targets[r.clone()], scale, sums)?;
    Ok((x, dlogits))
}

/// Forward, loss and backward for training: the gradients of [`forward_backward_into`],
/// with the lm_head and the cross-entropy run over chunks of `head_rows` token rows
/// (by default [`head_chunk_rows`]), each chunk's logits gone before
/// the next one's exist. Chunks without a trained token are skipped. The lm_head is
/// frozen under LoRA, so no weight gradient is formed for it there. The step's buffers
/// are planned ([`Ops::planned`]). Its loss statistics are added into `sums`, where the
/// backend computes: the step never waits for the device ([`Ops::read_loss`] does).
pub fn train_step<O: Ops>(
    dec: &Decoder<O>,
    batch: &TokenBatch,
    mut grads: Grads<O::Tensor>,
    denominator: Option<usize>,
    head_rows: Option<usize>,
    sums: &mut O::LossSums,
) -> Result<()> {
    let ops = dec.ops;
    let (inputs, targets) = step_inputs(dec, batch)?;
    let head = HeadChunks::new(dec, &targets, head_rows, "train");
    ops.planned(head.key, || {
        let state = {
            let _fwd = crate::profiling::range(c"forward");
            dec.forward(&inputs, None, true)?
        };
        let denom = loss_denominator(denominator, &targets);
        let scale = 1.0 / denom.max(1) as f32;
        // in the activation type, as each chunk's input gradient comes (no casts either way)
        let mut dnorm = ops.zeros_like(&state.final_norm)?;
        {
            let _head = crate::profiling::range(c"lm_head_loss");
            for r in &head.ranges {
                let (x, dlogits) = chunk_loss(dec, &state.final_norm, &targets, r, Some(scale), sums)?;
                let dlogits = dlogits.context("cross-entropy gave no gradient")?;
                let dx = dec.head_backward(&x, &dlogits, &mut grads)?;
                ops.copy_rows(&mut dnorm, r.start, &dx, 0, r.len())?;
            }
        }
        let _bwd = crate::profiling::range(c"backward");
        dec.backward_from_norm(&inputs, &state, &dnorm, grads)
    })
}

/// The loss and token accuracy of a batch, without gradients: a forward that keeps no
/// activations and the lm_head in chunks of rows as in [`train_step`], so the
/// `[tokens × vocab]` logits never exist (validation on an 8k-token batch of a 128k
/// vocabulary would otherwise hold 2 GiB of them in bf16). Its buffers are planned too,
/// and its statistics added into `sums` as [`train_step`]'s.
pub fn eval_step<O: Ops>(
    dec: &Decoder<O>,
    batch: &TokenBatch,
    head_rows: Option<usize>,
    sums: &mut O::LossSums,
) -> Result<()> {
    let ops = dec.ops;
    let (inputs, targets) = step_inputs(dec, batch)?;
    let head = HeadChunks::new(dec, &targets, head_rows, "eval");
    ops.planned(head.key, || {
        let state = {
            let _fwd = crate::profiling::range(c"forward");
            dec.forward(&inputs, None, false)?
        };
        let _head = crate::profiling::range(c"lm_head_loss");
        for r in &head.ranges {
            chunk_loss(dec, &state.final_norm, &targets, r, None, sums)?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::head_chunk_rows;

    #[test]
    fn head_chunks_are_whole_row_tiles_within_the_byte_budget() {
        // Llama 3's and Qwen2's vocabularies, SmolLM2's, and vocabularies too wide for 128
        // rows, in f32 and in bf16
        for (vocab, bytes, rows) in [
            (128_256, 4, 512),
            (128_256, 2, 1024),
            (152_064, 4, 384),
            (152_064, 2, 768),
            (49_152, 4, 1280),
            (600_000, 4, 111),
            (1 << 30, 4, 1),
        ] {
            assert_eq!(head_chunk_rows(vocab, bytes), rows, "vocabulary {vocab}, {bytes} bytes");
            assert!(rows * vocab * bytes <= super::HEAD_CHUNK_BYTES || rows == 1);
        }
    }
}
