//! What a run trains: a LoRA adapter on a frozen base model, or (full fine-tuning,
//! `peft.full`) every tensor of the model. The loop, AdamW, gradient clipping and the
//! checkpoints see either one as named f32 tensors with gradients and moments of the
//! same shapes, so there is one training loop for both.

use std::path::Path;

use anyhow::{Context, Result};

use crate::model::decoder::Grads;
use crate::model::{Adapter, Decoder, Model};
use crate::ops::Ops;

/// A set of trained tensors. The same type holds the weights, their gradients and
/// AdamW's two moments.
pub trait Trainable<T>: Sized {
    /// What the forward needs besides these tensors: the frozen base model under an
    /// adapter, nothing (`()`) when the model itself is trained.
    type Frozen;
    /// The sub-directory of a checkpoint that holds these tensors.
    const DIR: &'static str;

    /// The decoder that runs with these weights.
    fn decoder<'a, O: Ops<Tensor = T>>(&'a self, ops: &'a O, frozen: &'a Self::Frozen) -> Decoder<'a, O>;
    /// These tensors as the target of a backward (this set holds gradients).
    fn as_grads(&mut self) -> Grads<'_, T>;
    /// Every tensor with its name in the saved files, in a fixed order.
    fn named(&self) -> Vec<(String, &T)>;
    /// The tensors of [`Trainable::named`], in its order.
    fn tensors_mut(&mut self) -> Vec<&mut T>;
    /// Zeros of the same shapes (gradients, optimizer moments).
    fn zeros<O: Ops<Tensor = T>>(&self, ops: &O) -> Result<Self>;
    /// Writes the tensors (and their config) into `dir` in the HF format a user loads.
    fn save<O: Ops<Tensor = T>>(&self, ops: &O, dir: &Path) -> Result<()>;
    /// Reads back what [`Trainable::save`] wrote.
    fn load<O: Ops<Tensor = T>>(ops: &O, dir: &Path, frozen: &Self::Frozen) -> Result<Self>;
    /// These tensors in the type `ops` computes with ([`Ops::compute_copy`]), for the
    /// forwards and backwards until the next optimizer step; `None` when they already
    /// are.
    fn compute_copy<O: Ops<Tensor = T>>(&self, _ops: &O) -> Result<Option<Self>> {
        Ok(None)
    }
}

impl<T> Trainable<T> for Adapter<T> {
    type Frozen = Model<T>;
    const DIR: &'static str = "adapter";

    fn decoder<'a, O: Ops<Tensor = T>>(&'a self, ops: &'a O, base: &'a Model<T>) -> Decoder<'a, O> {
        Decoder::new(ops, base, Some(self))
    }

    fn as_grads(&mut self) -> Grads<'_, T> {
        Grads::adapter(self)
    }

    fn named(&self) -> Vec<(String, &T)> {
        Adapter::named(self)
    }

    fn tensors_mut(&mut self) -> Vec<&mut T> {
        Adapter::tensors_mut(self)
    }

    fn zeros<O: Ops<Tensor = T>>(&self, ops: &O) -> Result<Self> {
        let zeros = self.try_map(|t| ops.zeros(ops.shape(t)).map(Some))?;
        zeros.context("zeros of an adapter")
    }

    fn save<O: Ops<Tensor = T>>(&self, ops: &O, dir: &Path) -> Result<()> {
        Adapter::save(self, ops, dir)
    }

    fn load<O: Ops<Tensor = T>>(ops: &O, dir: &Path, base: &Model<T>) -> Result<Self> {
        Adapter::load(ops, dir, &base.cfg)
    }

    /// All the copies in one [`Ops::compute_copies`] call, put back in the order
    /// [`Adapter::tensors`] gave them.
    fn compute_copy<O: Ops<Tensor = T>>(&self, ops: &O) -> Result<Option<Self>> {
        let ts = self.tensors();
        let Some(copies) = ops.compute_copies(&ts)? else { return Ok(None) };
        anyhow::ensure!(copies.len() == ts.len(), "{} compute copies of {} tensors", copies.len(), ts.len());
        let mut copies = copies.into_iter();
        self.try_map(|_| Ok(copies.next()))
    }
}

impl<T> Trainable<T> for Model<T> {
    type Frozen = ();
    const DIR: &'static str = "model";

    fn decoder<'a, O: Ops<Tensor = T>>(&'a self, ops: &'a O, _: &'a ()) -> Decoder<'a, O> {
        Decoder::new(ops, self, None)
    }

    fn as_grads(&mut self) -> Grads<'_, T> {
        Grads::model(self)
    }

    fn named(&self) -> Vec<(String, &T)> {
        Model::named(self)
    }

    fn tensors_mut(&mut self) -> Vec<&mut T> {
        Model::tensors_mut(self)
    }

    fn zeros<O: Ops<Tensor = T>>(&self, ops: &O) -> Result<Self> {
        self.zeros_like(ops)
    }

    fn save<O: Ops<Tensor = T>>(&self, ops: &O, dir: &Path) -> Result<()> {
        Model::save(self, ops, dir)
    }

    /// The f32 master weights, whatever the checkpoint's dtype ([`Model::load_master`]).
    fn load<O: Ops<Tensor = T>>(ops: &O, dir: &Path, _: &()) -> Result<Self> {
        Model::load_master(ops, dir)
    }

    /// The whole model in the compute type (bf16 copies of the f32 masters in a bf16
    /// mode), in one [`Ops::compute_copies`] call.
    fn compute_copy<O: Ops<Tensor = T>>(&self, ops: &O) -> Result<Option<Self>> {
        let named = self.named();
        let Some(copies) = ops.compute_copies(&named.iter().map(|(_, t)| *t).collect::<Vec<_>>())? else {
            return Ok(None);
        };
        anyhow::ensure!(
            copies.len() == named.len(),
            "{} compute copies of {} tensors",
            copies.len(),
            named.len()
        );
        let names = named.into_iter().map(|(n, _)| n);
        Model::from_named(self.cfg.clone(), names.zip(copies)).map(Some)
    }
}

/// Whether AdamW's weight decay applies to the tensor of this name. As HF's Trainer
/// (and TRL) group parameters: biases and norm weights are not decayed; everything
/// else, LoRA A/B included, is.
pub fn decays(name: &str) -> bool {
    !(name.ends_with(".bias") || name.contains("norm"))
}
