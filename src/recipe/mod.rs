//! The training recipe: one YAML file that says which model, which adapter, which data and
//! how to step, in the vocabulary of NeMo Automodel and TRL (`step_scheduler`,
//! `global_batch_size`, `peft.target_modules`, ...).
//!
//! [`Recipe::load`] reads the file, applies `--section.key=value` overrides from the
//! command line, fills the defaults and validates. Every section except `model.path`,
//! `data.train` and `output_dir` may be left out. Relative paths are kept as written and
//! resolve against the current working directory, as the TRL and NeMo CLIs do.

use crate::ops::backend::BackendKind;
use crate::ops::cuda::DType;

mod fields;
mod load;
mod overrides;
mod validate;

use std::path::PathBuf;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::model::decoder::Recompute;
use crate::model::lora::{LoraConfig, Proj};

pub use overrides::split_overrides;

/// The seven projections that `"all-linear"` (and the default) expands to, in PEFT's order.
pub fn all_linear() -> Vec<String> {
    Proj::ALL.iter().map(|p| p.module().to_string()).collect()
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Recipe {
    pub model: ModelSection,
    pub peft: PeftSection,
    pub data: DataSection,
    pub step_scheduler: StepScheduler,
    pub optimizer: Optimizer,
    pub lr_scheduler: LrScheduler,
    /// Max global L2 norm of the adapter gradients; `null` turns clipping off.
    pub clip_grad_norm: Option<f64>,
    /// Recompute layers' activations in the backward instead of keeping them (less
    /// memory, one more forward of each such layer per step): `false`, `true` (every
    /// layer) or `k` (every k-th layer: layers 0, k, 2k, ...).
    #[serde(with = "fields::recompute")]
    pub activation_checkpointing: Recompute,
    pub output_dir: PathBuf,
    pub checkpoint: CheckpointSection,
    pub backend: BackendKind,
    pub seed: u64,
}

/// The defaults of every field. The empty `model.path`, `data.train` and `output_dir` are
/// placeholders that [`Recipe::validate`] rejects: they stand for "required".
impl Default for Recipe {
    fn default() -> Self {
        Self {
            model: ModelSection::default(),
            peft: PeftSection::default(),
            data: DataSection::default(),
            step_scheduler: StepScheduler::default(),
            optimizer: Optimizer::default(),
            lr_scheduler: LrScheduler::default(),
            clip_grad_norm: Some(1.0),
            activation_checkpointing: Recompute::Off,
            output_dir: PathBuf::new(),
            checkpoint: CheckpointSection::default(),
            backend: BackendKind::Auto,
            seed: 42,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSection {
    /// A Hugging Face model directory: config.json, tokenizer.json, *.safetensors.
    pub path: PathBuf,
    /// Compute dtype of the frozen base weights on the GPU (adapters always keep f32
    /// masters; the CPU backend computes in f32).
    pub dtype: DType,
}

impl Default for ModelSection {
    fn default() -> Self {
        Self { path: PathBuf::new(), dtype: DType::Bf16 }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PeftSection {
    /// Train every weight instead of a LoRA adapter.
    pub full: bool,
    pub r: usize,
    pub alpha: f64,
    pub dropout: f32,
    /// Module names, or the string `"all-linear"` in the YAML (PEFT's spelling).
    #[serde(deserialize_with = "fields::target_modules")]
    pub target_modules: Vec<String>,
    /// Scale by `alpha / sqrt(r)` instead of `alpha / r`.
    pub rslora: bool,
    /// An existing PEFT adapter directory to continue training from.
    pub init_from: Option<PathBuf>,
}

impl Default for PeftSection {
    fn default() -> Self {
        Self {
            full: false,
            r: 16,
            alpha: 32.0,
            dropout: 0.0,
            target_modules: all_linear(),
            rslora: false,
            init_from: None,
        }
    }
}

impl PeftSection {
    /// The target modules as projections; fails on a name that is not one of the seven.
    pub fn targets(&self) -> Result<Vec<Proj>> {
        let mut out = Vec::with_capacity(self.target_modules.len());
        for name in &self.target_modules {
            match Proj::from_module(name) {
                Some(p) if !out.contains(&p) => out.push(p),
                Some(_) => {}
                None => anyhow::bail!("peft.target_modules: unknown module `{name}`"),
            }
        }
        out.sort();
        Ok(out)
    }

    /// The adapter config this section describes, as written to `adapter_config.json`.
    pub fn lora_config(&self) -> Result<LoraConfig> {
        let mut c = LoraConfig::new(self.r, self.alpha, self.targets()?);
        c.lora_dropout = self.dropout;
        c.use_rslora = self.rslora;
        Ok(c)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataSection {
    /// One JSONL file or a list of them.
    #[serde(deserialize_with = "fields::one_or_many_paths")]
    pub train: Vec<PathBuf>,
    /// Held-out files; when empty, `val_fraction` of the training records are held out.
    #[serde(deserialize_with = "fields::one_or_many_paths")]
    pub validation: Vec<PathBuf>,
    pub val_fraction: f64,
    pub format: DataFormat,
    pub filters: Filters,
    pub seq_len: usize,
    pub packing: bool,
    pub dedup: bool,
}

impl Default for DataSection {
    fn default() -> Self {
        Self {
            train: Vec::new(),
            validation: Vec::new(),
            val_fraction: 0.1,
            format: DataFormat::Auto,
            filters: Filters::default(),
            seq_len: 1024,
            packing: true,
            dedup: true,
        }
    }
}

/// How each JSONL record is read; `auto` decides per record from its keys.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataFormat {
    #[default]
    Auto,
    /// `{"messages": [{"role": ..., "content": ...}, ...]}`
    Chat,
    /// `{"prompt": ..., "completion": ...}`
    PromptCompletion,
    /// An agent's logged interaction with the user's rating / thumbs.
    Feedback,
}

/// Which feedback records become training examples.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Filters {
    /// Drop records rated below this.
    pub min_rating: Option<f64>,
    /// A thumbs-down marks a response not to imitate.
    pub drop_thumbs_down: bool,
    /// Drop examples longer than this many tokens instead of truncating them.
    pub max_tokens: Option<usize>,
}

impl Default for Filters {
    fn default() -> Self {
        Self { min_rating: None, drop_thumbs_down: true, max_tokens: None }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StepScheduler {
    /// Sequences per optimizer step, over all processes and micro-batches.
    pub global_batch_size: usize,
    /// Sequences per forward/backward micro-batch on one process.
    pub local_batch_size: usize,
    pub max_steps: Option<usize>,
    /// Left out, it is 1 when `max_steps` is unset and unset otherwise (the loader fills it
    /// in), so a recipe that gives only `max_steps` is not capped at one epoch.
    #[serde(default)]
    pub num_epochs: Option<usize>,
    pub val_every_steps: Option<usize>,
    pub ckpt_every_steps: Option<usize>,
    pub log_every_steps: usize,
}

impl Default for StepScheduler {
    fn default() -> Self {
        Self {
            global_batch_size: 8,
            local_batch_size: 2,
            max_steps: None,
            num_epochs: Some(1),
            val_every_steps: None,
            ckpt_every_steps: None,
            log_every_steps: 1,
        }
    }
}

impl StepScheduler {
    /// Micro-batches accumulated per optimizer step on a single process.
    pub fn grad_accum_steps(&self) -> usize {
        self.global_batch_size / self.local_batch_size.max(1)
    }

    /// Optimizer steps the run takes when an epoch is `steps_per_epoch` steps: it stops at
    /// whichever of `max_steps` and `num_epochs` comes first.
    pub fn total_steps(&self, steps_per_epoch: usize) -> usize {
        crate::train::schedule::total_steps(self.max_steps, self.num_epochs, steps_per_epoch)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Optimizer {
    /// Only `adamw` exists; the key is there so recipes read like NeMo's and TRL's.
    pub name: String,
    pub lr: f64,
    pub betas: [f64; 2],
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for Optimizer {
    fn default() -> Self {
        Self { name: "adamw".into(), lr: 2e-4, betas: [0.9, 0.999], eps: 1e-8, weight_decay: 0.0 }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LrScheduler {
    /// Linear warmup from 0 to `optimizer.lr`.
    pub warmup_steps: usize,
    pub decay: Decay,
    /// The LR the decay ends at, as a fraction of `optimizer.lr`.
    pub min_lr_ratio: f64,
}

impl Default for LrScheduler {
    fn default() -> Self {
        Self { warmup_steps: 0, decay: Decay::Cosine, min_lr_ratio: 0.0 }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decay {
    #[default]
    Cosine,
    Linear,
    Constant,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CheckpointSection {
    /// Checkpoints kept in `output_dir`; older ones are deleted once a newer one is complete.
    pub keep_last: usize,
}

impl Default for CheckpointSection {
    fn default() -> Self {
        Self { keep_last: 2 }
    }
}

impl Recipe {
    /// The resolved recipe, every default filled in, for `--print-config`. It parses back
    /// to an equal recipe.
    pub fn to_yaml(&self) -> String {
        // Only a non-UTF-8 path set from Rust code can fail here (YAML input is UTF-8);
        // say so in the output rather than panic.
        serde_norway::to_string(self)
            .unwrap_or_else(|e| format!("# the recipe cannot be written as YAML: {e}\n"))
    }
}
