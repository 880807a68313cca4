//! AdamW over the adapter's tensors, global gradient norm and clipping.

use anyhow::Result;

use crate::model::{Adapter, ModelConfig};
use crate::ops::{AdamWParams, Ops};

/// `torch.optim.AdamW` over every LoRA tensor, its moments kept in f32 on the backend.
pub struct AdamW<T> {
    pub hp: AdamWParams,
    pub m: Adapter<T>,
    pub v: Adapter<T>,
    /// Steps taken so far.
    pub step: u64,
}

impl<T> AdamW<T> {
    pub fn new<O: Ops<Tensor = T>>(
        ops: &O,
        params: &Adapter<T>,
        model: &ModelConfig,
        hp: AdamWParams,
    ) -> Result<Self> {
        Ok(Self { hp, m: params.zeros_like(ops, model)?, v: params.zeros_like(ops, model)?, step: 0 })
    }

    /// One update of `params` from `grads` at learning rate `lr`.
    pub fn update<O: Ops<Tensor = T>>(
        &mut self,
        ops: &O,
        params: &mut Adapter<T>,
        grads: &Adapter<T>,
        lr: f32,
    ) -> Result<()> {
        self.step += 1;
        let grads: Vec<&T> = grads.named().into_iter().map(|(_, t)| t).collect();
        let mut p = params.tensors_mut();
        let mut m = self.m.tensors_mut();
        let mut v = self.v.tensors_mut();
        ops.adamw_step(&mut p, &grads, &mut m, &mut v, self.step, AdamWParams { lr, ..self.hp })
    }
}

/// Global L2 norm of all gradients.
pub fn grad_norm<O: Ops>(ops: &O, grads: &Adapter<O::Tensor>) -> Result<f64> {
    let ts: Vec<&O::Tensor> = grads.named().into_iter().map(|(_, t)| t).collect();
    Ok(ops.sum_squares(&ts)?.sqrt())
}

/// `torch.nn.utils.clip_grad_norm_`: scales all gradients by `max / (norm + 1e-6)` when
/// that is below 1. Returns the norm before clipping.
pub fn clip_grad_norm<O: Ops>(ops: &O, grads: &mut Adapter<O::Tensor>, max_norm: f64) -> Result<f64> {
    let norm = grad_norm(ops, grads)?;
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for t in grads.tensors_mut() {
            ops.scale(t, coef as f32)?;
        }
    }
    Ok(norm)
}
