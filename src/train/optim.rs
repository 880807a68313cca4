//! AdamW over the trained tensors (an adapter's, or the whole model's), global gradient
//! norm and clipping.

use anyhow::Result;

use super::params::{decays, Trainable};
pub use crate::ops::clip_scale;
use crate::ops::{AdamWParams, GradScale, Ops};

/// `torch.optim.AdamW` over every trained tensor, its moments kept in f32 on the
/// backend, shaped like the parameters `P` (an `Adapter` or a `Model`).
pub struct AdamW<P> {
    pub hp: AdamWParams,
    pub m: P,
    pub v: P,
    /// Steps taken so far.
    pub step: u64,
}

impl<P> AdamW<P> {
    pub fn new<O: Ops>(ops: &O, params: &P, hp: AdamWParams) -> Result<Self>
    where
        P: Trainable<O::Tensor>,
    {
        Ok(Self { hp, m: params.zeros(ops)?, v: params.zeros(ops)?, step: 0 })
    }

    /// One update of `params` from `grads` times `scale` (the clip's coefficient,
    /// [`clip_scale`] or [`Ops::grad_clip`]; 1 for none) at learning rate `lr`. Biases
    /// and norm weights get no weight decay (see [`decays`]).
    pub fn update<O: Ops>(
        &mut self,
        ops: &O,
        params: &mut P,
        grads: &P,
        lr: f32,
        scale: GradScale<'_, O::GradClip>,
    ) -> Result<()>
    where
        P: Trainable<O::Tensor>,
    {
        self.step += 1;
        let decay: Vec<bool> = params.named().into_iter().map(|(n, _)| decays(&n)).collect();
        // two parameter groups, as HF's Trainer makes: with and without weight decay
        for with_decay in [true, false] {
            if !decay.contains(&with_decay) {
                continue;
            }
            let g: Vec<&O::Tensor> =
                select(grads.named(), &decay, with_decay).into_iter().map(|(_, t)| t).collect();
            let hp = AdamWParams {
                lr,
                weight_decay: if with_decay { self.hp.weight_decay } else { 0.0 },
                ..self.hp
            };
            ops.adamw_step(
                &mut select(params.tensors_mut(), &decay, with_decay),
                &g,
                &mut select(self.m.tensors_mut(), &decay, with_decay),
                &mut select(self.v.tensors_mut(), &decay, with_decay),
                self.step,
                hp,
                scale,
            )?;
        }
        Ok(())
    }
}

/// The items of `v` whose flag in `flags` is `want`.
fn select<X>(v: Vec<X>, flags: &[bool], want: bool) -> Vec<X> {
    v.into_iter().zip(flags).filter(|(_, &f)| f == want).map(|(x, _)| x).collect()
}

/// Global L2 norm of all gradients, read at once ([`grad_clip`] without a clip).
pub fn grad_norm<O: Ops, P: Trainable<O::Tensor>>(ops: &O, grads: &P) -> Result<f64> {
    Ok(ops.read_clip(&grad_clip(ops, grads, None)?)?.norm)
}

/// [`Ops::grad_clip`] of all gradients: their norm and the clip's coefficient, queued.
pub fn grad_clip<O: Ops, P: Trainable<O::Tensor>>(
    ops: &O,
    grads: &P,
    max_norm: Option<f64>,
) -> Result<O::GradClip> {
    let ts: Vec<&O::Tensor> = grads.named().into_iter().map(|(_, t)| t).collect();
    ops.grad_clip(&ts, max_norm)
}
