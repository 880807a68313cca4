//! The base model: HF weight names, shapes checked against `config.json`. Frozen in a
//! LoRA run; in a full fine-tuning run its tensors are the trained (master) weights.

use std::path::Path;

use anyhow::{Context, Result};

use super::config::ModelConfig;
use super::lora::{Adapter, Proj};
use super::safetensors_io::TensorStore;
use crate::ops::{HostWeight, LinearGradRef, Ops};

/// Values a [`Model::random`] stream draws for one chunk of a tensor.
const RANDOM_CHUNK: usize = 1 << 20;

pub struct Linear<T> {
    /// `[out, in]`
    pub w: T,
    pub b: Option<T>,
}

impl<T> Linear<T> {
    /// This layer as the target of its own weight gradients (a gradient-shaped model).
    pub fn grad_ref(&mut self) -> LinearGradRef<'_, T> {
        LinearGradRef { dw: &mut self.w, db: self.b.as_mut() }
    }
}

pub struct Layer<T> {
    pub input_layernorm: T,
    pub post_attention_layernorm: T,
    /// Indexed by `Proj as usize`.
    pub proj: [Linear<T>; 7],
}

pub struct Model<T> {
    pub cfg: ModelConfig,
    pub embed_tokens: T,
    pub layers: Vec<Layer<T>>,
    pub norm: T,
    /// `None` when the lm_head is tied to `embed_tokens`.
    pub lm_head: Option<T>,
}

impl<T> Model<T> {
    pub fn lm_head(&self) -> &T {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// The lm_head, which is the embedding when the two are tied.
    pub fn lm_head_mut(&mut self) -> &mut T {
        match &mut self.lm_head {
            Some(h) => h,
            None => &mut self.embed_tokens,
        }
    }

    /// Gives every projection that `adapter` puts a LoRA pair on room for it
    /// ([`Ops::reserve_lora_tail`]), so a backend that can folds the low-rank update into
    /// the frozen product. The weights' values stay the same.
    pub fn reserve_lora_tails<O: Ops<Tensor = T>>(&mut self, ops: &O, adapter: &Adapter<T>) -> Result<()> {
        for (layer, pairs) in self.layers.iter_mut().zip(&adapter.layers) {
            for (lin, pair) in layer.proj.iter_mut().zip(pairs) {
                if let Some(pair) = pair {
                    ops.reserve_lora_tail(&mut lin.w, ops.shape(&pair.a)[0])?;
                }
            }
        }
        Ok(())
    }

    pub fn has_bias(cfg: &ModelConfig, p: Proj) -> bool {
        match p {
            Proj::Q | Proj::K | Proj::V => cfg.qkv_bias,
            Proj::O => cfg.o_bias,
            _ => cfg.mlp_bias,
        }
    }

    /// Loads `config.json` and the safetensors weights of an HF model directory, each
    /// weight in the backend's base-weight type ([`Ops::upload_weight`]).
    pub fn load<O: Ops<Tensor = T>>(ops: &O, dir: &Path) -> Result<Self> {
        Self::load_with(dir, |w| ops.upload_weight(w))
    }

    /// Loads an HF model directory as the master weights of a full fine-tuning run:
    /// every tensor in f32 ([`Ops::upload_master`]), in any mode of the backend.
    pub fn load_master<O: Ops<Tensor = T>>(ops: &O, dir: &Path) -> Result<Self> {
        Self::load_with(dir, |w| ops.upload_master(w))
    }

    fn load_with(dir: &Path, upload: impl Fn(&HostWeight) -> Result<T>) -> Result<Self> {
        let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
        let store = TensorStore::open_dir(dir)?;
        Self::build(cfg, |name, shape| upload(&store.get_shaped(name, shape)?))
            .with_context(|| format!("loading model {}", dir.display()))
    }

    /// A model of the same config from `tensors`, one for each of [`Model::named`]'s
    /// names (in any order), tied the same way.
    pub fn from_named(cfg: ModelConfig, tensors: impl IntoIterator<Item = (String, T)>) -> Result<Self> {
        let mut by_name: std::collections::HashMap<String, T> = tensors.into_iter().collect();
        let model =
            Self::build(cfg, |name, _| by_name.remove(name).with_context(|| format!("no tensor {name}")))?;
        anyhow::ensure!(by_name.is_empty(), "tensors the model does not have: {:?}", by_name.keys());
        Ok(model)
    }

    /// Random weights of the config's shapes (benchmarks, tests, a base to try the
    /// pipeline on): uniform matrices and biases of std 0.02 as HF initialises, unit norm
    /// weights, and embeddings of std `embed_std`. (At 0.02 a tied lm_head bounds the
    /// logits to a few units, so nothing trained on top of the frozen base can become
    /// confident; a larger value gives an adapter room to learn.)
    pub fn random<O: Ops<Tensor = T>>(ops: &O, cfg: ModelConfig, seed: u64, embed_std: f32) -> Result<Self> {
        Self::random_with(cfg, seed, embed_std, |w| ops.upload_weight(w))
    }

    /// [`Model::random`]'s values as the f32 master weights of a full fine-tuning run
    /// ([`Ops::upload_master`]).
    pub fn random_master<O: Ops<Tensor = T>>(
        ops: &O,
        cfg: ModelConfig,
        seed: u64,
        embed_std: f32,
    ) -> Result<Self> {
        Self::random_with(cfg, seed, embed_std, |w| ops.upload_master(w))
    }

    fn random_with(
        cfg: ModelConfig,
        seed: u64,
        embed_std: f32,
        upload: impl Fn(&HostWeight) -> Result<T>,
    ) -> Result<Self> {
        use rand::{Rng, SeedableRng};
        use rayon::prelude::*;
        // Tensor t's chunk c of RANDOM_CHUNK values comes from ChaCha8 stream (t << 40) + c
        // of the seed: the same values on any number of threads, drawn in parallel (an 8B
        // model's eight billion values in seconds, not minutes).
        let mut tensor = 0u64;
        Self::build(cfg, |name, shape| {
            let n: usize = shape.iter().product();
            let std =
                if name.contains("embed_tokens") || name.contains("lm_head") { embed_std } else { 0.02 };
            let a = std * 3f32.sqrt();
            tensor += 1;
            let mut v = vec![1.0f32; n];
            if !name.contains("norm") {
                v.par_chunks_mut(RANDOM_CHUNK).enumerate().for_each(|(c, out)| {
                    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
                    rng.set_stream((tensor << 40) + c as u64);
                    out.iter_mut().for_each(|x| *x = rng.random_range(-a..a));
                });
            }
            // as a checkpoint's weight: the backend stores it in its base-weight type
            // (or as a master weight)
            let w = HostWeight {
                name,
                shape: shape.to_vec(),
                dtype: safetensors::Dtype::F32,
                bytes: bytemuck::cast_slice(&v),
            };
            upload(&w)
        })
    }

    /// Zeros of the same shapes, tied the same way (gradients, optimizer moments).
    pub fn zeros_like<O: Ops<Tensor = T>>(&self, ops: &O) -> Result<Self> {
        Self::build(self.cfg.clone(), |_, shape| ops.zeros(shape))
    }

    /// The model's tensors, each made by `load(hf_name, shape)`.
    fn build(cfg: ModelConfig, mut load: impl FnMut(&str, &[usize]) -> Result<T>) -> Result<Self> {
        let d = cfg.hidden_size;
        let embed_tokens = load("model.embed_tokens.weight", &[cfg.vocab_size, d])?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let mut linear = |p: Proj| -> Result<Linear<T>> {
                let (inp, out) = p.dims(&cfg);
                let prefix = p.hf_prefix(l);
                let w = load(&format!("{prefix}.weight"), &[out, inp])?;
                let b = if Self::has_bias(&cfg, p) {
                    Some(load(&format!("{prefix}.bias"), &[out])?)
                } else {
                    None
                };
                Ok(Linear { w, b })
            };
            let proj = [
                linear(Proj::Q)?,
                linear(Proj::K)?,
                linear(Proj::V)?,
                linear(Proj::O)?,
                linear(Proj::Gate)?,
                linear(Proj::Up)?,
                linear(Proj::Down)?,
            ];
            layers.push(Layer {
                input_layernorm: load(&format!("model.layers.{l}.input_layernorm.weight"), &[d])?,
                post_attention_layernorm: load(
                    &format!("model.layers.{l}.post_attention_layernorm.weight"),
                    &[d],
                )?,
                proj,
            });
        }
        let norm = load("model.norm.weight", &[d])?;
        let lm_head =
            if cfg.tie_word_embeddings { None } else { Some(load("lm_head.weight", &[cfg.vocab_size, d])?) };
        Ok(Self { cfg, embed_tokens, layers, norm, lm_head })
    }
}
