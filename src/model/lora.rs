//! LoRA adapters as HF PEFT stores them: `adapter_config.json` plus
//! `adapter_model.safetensors` with PEFT's tensor names.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use super::config::ModelConfig;
use super::safetensors_io::{decode_f32, save_named, TensorStore};
use crate::ops::{LoraGradRef, LoraRef, Ops};

/// The seven linear projections of a Llama/Qwen2 decoder layer, in PEFT's order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Proj {
    pub const ALL: [Proj; 7] = [Proj::Q, Proj::K, Proj::V, Proj::O, Proj::Gate, Proj::Up, Proj::Down];

    pub fn module(self) -> &'static str {
        match self {
            Proj::Q => "q_proj",
            Proj::K => "k_proj",
            Proj::V => "v_proj",
            Proj::O => "o_proj",
            Proj::Gate => "gate_proj",
            Proj::Up => "up_proj",
            Proj::Down => "down_proj",
        }
    }

    /// `self_attn` or `mlp`, the HF parent module.
    pub fn parent(self) -> &'static str {
        match self {
            Proj::Q | Proj::K | Proj::V | Proj::O => "self_attn",
            _ => "mlp",
        }
    }

    pub fn from_module(name: &str) -> Option<Proj> {
        Proj::ALL.into_iter().find(|p| p.module() == name)
    }

    /// `(in_features, out_features)` of this projection.
    pub fn dims(self, c: &ModelConfig) -> (usize, usize) {
        let (d, i) = (c.hidden_size, c.intermediate_size);
        match self {
            Proj::Q => (d, c.q_dim()),
            Proj::K | Proj::V => (d, c.kv_dim()),
            Proj::O => (c.q_dim(), d),
            Proj::Gate | Proj::Up => (d, i),
            Proj::Down => (i, d),
        }
    }

    /// HF name of the frozen weight, `model.layers.{l}.self_attn.q_proj`.
    pub fn hf_prefix(self, layer: usize) -> String {
        format!("model.layers.{layer}.{}.{}", self.parent(), self.module())
    }
}

/// `adapter_config.json`, the keys tuneloop uses.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub target_modules: Vec<Proj>,
    pub lora_dropout: f32,
    pub use_rslora: bool,
    pub base_model_name_or_path: Option<String>,
    pub task_type: String,
}

impl LoraConfig {
    pub fn new(r: usize, lora_alpha: f64, target_modules: Vec<Proj>) -> Self {
        Self {
            r,
            lora_alpha,
            target_modules,
            lora_dropout: 0.0,
            use_rslora: false,
            base_model_name_or_path: None,
            task_type: "CAUSAL_LM".into(),
        }
    }

    /// `lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA.
    pub fn scale(&self) -> f32 {
        let r = self.r as f64;
        (if self.use_rslora { self.lora_alpha / r.sqrt() } else { self.lora_alpha / r }) as f32
    }

    pub fn targets(&self, p: Proj) -> bool {
        self.target_modules.contains(&p)
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let v = crate::util::read_json(path)?;
        Self::from_json(&v).with_context(|| format!("{}", path.display()))
    }

    pub fn from_json(v: &Value) -> Result<Self> {
        let s = |k: &str| v.get(k).and_then(Value::as_str);
        if let Some(t) = s("peft_type") {
            ensure!(t == "LORA", "peft_type `{t}` is not LORA");
        }
        if let Some(b) = s("bias") {
            ensure!(b == "none", "bias `{b}` is not supported (only \"none\")");
        }
        for key in ["use_dora", "fan_in_fan_out", "lora_bias"] {
            ensure!(!v.get(key).and_then(Value::as_bool).unwrap_or(false), "`{key}: true` is not supported");
        }
        for key in ["rank_pattern", "alpha_pattern"] {
            if let Some(Value::Object(m)) = v.get(key) {
                ensure!(m.is_empty(), "a non-empty `{key}` is not supported");
            }
        }
        for key in ["layers_to_transform", "modules_to_save"] {
            ensure!(v.get(key).is_none_or(Value::is_null), "`{key}` is not supported");
        }
        let r = v.get("r").and_then(Value::as_u64).context("missing or non-integer `r`")? as usize;
        ensure!(r > 0, "`r` must be positive");
        let lora_alpha = v.get("lora_alpha").and_then(Value::as_f64).context("missing `lora_alpha`")?;
        let target_modules = match v.get("target_modules") {
            Some(Value::String(s)) if s == "all-linear" => Proj::ALL.to_vec(),
            Some(Value::String(s)) => {
                bail!("target_modules as a pattern (`{s}`) is not supported; list the modules")
            }
            Some(Value::Array(a)) => {
                let mut out = Vec::new();
                for m in a {
                    let name = m.as_str().context("target_modules holds a non-string")?;
                    let p = Proj::from_module(name).with_context(|| {
                        format!("target module `{name}` is not one of q_proj k_proj v_proj o_proj gate_proj up_proj down_proj")
                    })?;
                    if !out.contains(&p) {
                        out.push(p);
                    }
                }
                out.sort();
                out
            }
            _ => bail!("missing `target_modules`"),
        };
        Ok(Self {
            r,
            lora_alpha,
            target_modules,
            lora_dropout: v.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0) as f32,
            use_rslora: v.get("use_rslora").and_then(Value::as_bool).unwrap_or(false),
            base_model_name_or_path: s("base_model_name_or_path").map(str::to_string),
            task_type: s("task_type").unwrap_or("CAUSAL_LM").to_string(),
        })
    }

    /// The config as PEFT writes it, with every key PEFT and vLLM read.
    pub fn to_json(&self) -> Value {
        let alpha = if self.lora_alpha.fract() == 0.0 && self.lora_alpha.abs() < 1e15 {
            json!(self.lora_alpha as i64)
        } else {
            json!(self.lora_alpha)
        };
        json!({
            "alpha_pattern": {},
            "auto_mapping": null,
            "base_model_name_or_path": self.base_model_name_or_path,
            "bias": "none",
            "exclude_modules": null,
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "layer_replication": null,
            "layers_pattern": null,
            "layers_to_transform": null,
            "lora_alpha": alpha,
            "lora_bias": false,
            "lora_dropout": self.lora_dropout,
            "modules_to_save": null,
            "peft_type": "LORA",
            "r": self.r,
            "rank_pattern": {},
            "revision": null,
            "target_modules": self.target_modules.iter().map(|p| p.module()).collect::<Vec<_>>(),
            "task_type": self.task_type,
            "use_dora": false,
            "use_rslora": self.use_rslora,
        })
    }
}

/// One LoRA pair: A `[r, in]`, B `[out, r]`.
pub struct LoraPair<T> {
    pub a: T,
    pub b: T,
}

/// All LoRA pairs of a model; also the shape of its gradients and optimizer states.
pub struct Adapter<T> {
    pub cfg: LoraConfig,
    /// `layers[l][proj as usize]`
    pub layers: Vec<[Option<LoraPair<T>>; 7]>,
}

/// PEFT's file name of a LoRA tensor, `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`.
pub fn peft_name(layer: usize, p: Proj, which: char) -> String {
    format!("base_model.model.{}.lora_{which}.weight", p.hf_prefix(layer))
}

impl<T> Adapter<T> {
    pub fn pair(&self, layer: usize, p: Proj) -> Option<&LoraPair<T>> {
        self.layers[layer][p as usize].as_ref()
    }

    pub fn lora_ref(&self, layer: usize, p: Proj) -> Option<LoraRef<'_, T>> {
        let scale = self.cfg.scale();
        self.pair(layer, p).map(|l| LoraRef { a: &l.a, b: &l.b, scale, dropout: None })
    }

    pub fn grad_ref(&mut self, layer: usize, p: Proj) -> Option<LoraGradRef<'_, T>> {
        self.layers[layer][p as usize].as_mut().map(|l| LoraGradRef { da: &mut l.a, db: &mut l.b })
    }

    /// Every tensor with its PEFT file name, in a fixed order (layer, projection, A, B).
    pub fn named(&self) -> Vec<(String, &T)> {
        let mut out = Vec::new();
        for (l, layer) in self.layers.iter().enumerate() {
            for p in Proj::ALL {
                if let Some(pair) = &layer[p as usize] {
                    out.push((peft_name(l, p, 'A'), &pair.a));
                    out.push((peft_name(l, p, 'B'), &pair.b));
                }
            }
        }
        out
    }

    /// Every tensor, in the order [`Adapter::try_map`] visits them.
    pub fn tensors(&self) -> Vec<&T> {
        self.layers.iter().flat_map(|layer| layer.iter().flatten()).flat_map(|p| [&p.a, &p.b]).collect()
    }

    /// An adapter of the same targets whose tensors are `f` of this one's, or `None` as
    /// soon as `f` gives none. Visits layer by layer, projection slot by slot, A then B.
    pub fn try_map<U>(&self, mut f: impl FnMut(&T) -> Result<Option<U>>) -> Result<Option<Adapter<U>>> {
        let mut layers = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            let mut mapped: [Option<LoraPair<U>>; 7] = Default::default();
            for (m, pair) in mapped.iter_mut().zip(layer) {
                if let Some(p) = pair {
                    let (Some(a), Some(b)) = (f(&p.a)?, f(&p.b)?) else { return Ok(None) };
                    *m = Some(LoraPair { a, b });
                }
            }
            layers.push(mapped);
        }
        Ok(Some(Adapter { cfg: self.cfg.clone(), layers }))
    }

    pub fn tensors_mut(&mut self) -> Vec<&mut T> {
        let mut out = Vec::new();
        for layer in self.layers.iter_mut() {
            for pair in layer.iter_mut().flatten() {
                out.push(&mut pair.a);
                out.push(&mut pair.b);
            }
        }
        out
    }

    fn build(
        cfg: &LoraConfig,
        model: &ModelConfig,
        mut make: impl FnMut(usize, Proj, (usize, usize)) -> Result<LoraPair<T>>,
    ) -> Result<Self> {
        let mut layers = Vec::with_capacity(model.num_hidden_layers);
        for l in 0..model.num_hidden_layers {
            let mut layer: [Option<LoraPair<T>>; 7] = Default::default();
            for &p in &cfg.target_modules {
                layer[p as usize] = Some(make(l, p, p.dims(model))?);
            }
            layers.push(layer);
        }
        Ok(Self { cfg: cfg.clone(), layers })
    }
}

impl<T> Adapter<T> {
    /// A fresh adapter as PEFT initialises one: A Kaiming-uniform (a = √5, i.e.
    /// U(−1/√in, 1/√in)), B zero; seeded.
    pub fn init<O: Ops<Tensor = T>>(
        ops: &O,
        cfg: &LoraConfig,
        model: &ModelConfig,
        seed: u64,
    ) -> Result<Self> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let r = cfg.r;
        Self::build(cfg, model, |_, _, (inp, out)| {
            let bound = 1.0 / (inp as f32).sqrt();
            let a: Vec<f32> = (0..r * inp).map(|_| rng.random_range(-bound..bound)).collect();
            Ok(LoraPair { a: ops.upload(&a, &[r, inp])?, b: ops.zeros(&[out, r])? })
        })
    }

    /// Zeros of the same shapes (gradients, optimizer moments).
    pub fn zeros_like<O: Ops<Tensor = T>>(&self, ops: &O, model: &ModelConfig) -> Result<Self> {
        let r = self.cfg.r;
        Self::build(&self.cfg, model, |_, _, (inp, out)| {
            Ok(LoraPair { a: ops.zeros(&[r, inp])?, b: ops.zeros(&[out, r])? })
        })
    }

    /// Reads a PEFT adapter directory for this base model.
    pub fn load<O: Ops<Tensor = T>>(ops: &O, dir: &Path, model: &ModelConfig) -> Result<Self> {
        let cfg = LoraConfig::from_file(&dir.join("adapter_config.json"))?;
        let file = dir.join("adapter_model.safetensors");
        let store = TensorStore::open_file(&file)?;
        let r = cfg.r;
        let mut used = 0;
        let ad = Self::build(&cfg, model, |l, p, (inp, out)| {
            let mut get = |which: char, shape: [usize; 2]| -> Result<T> {
                let name = peft_name(l, p, which);
                // PEFT writes names without the adapter name; accept `.default.` too.
                let alt =
                    name.replace(&format!("lora_{which}.weight"), &format!("lora_{which}.default.weight"));
                let key = if store.contains(&name) || !store.contains(&alt) { name } else { alt };
                let w = store.get_shaped(&key, &shape)?;
                used += 1;
                ops.upload(&decode_f32(&w)?, &shape)
            };
            Ok(LoraPair { a: get('A', [r, inp])?, b: get('B', [out, r])? })
        })
        .with_context(|| format!("loading adapter {}", dir.display()))?;
        if used != store.names().len() {
            let expected: Vec<String> = ad.named().into_iter().map(|(n, _)| n).collect();
            let extra: Vec<&str> = store
                .names()
                .into_iter()
                .filter(|n| !expected.iter().any(|e| e == n || e.replace(".weight", ".default.weight") == *n))
                .take(5)
                .collect();
            bail!(
                "{}: holds tensors that adapter_config.json does not describe (e.g. {extra:?}); \
                 only LoRA A/B of {:?} for {} layers are supported",
                file.display(),
                cfg.target_modules.iter().map(|p| p.module()).collect::<Vec<_>>(),
                model.num_hidden_layers
            );
        }
        Ok(ad)
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` (f32, PEFT's names),
    /// each through a temp file and a rename.
    pub fn save<O: Ops<Tensor = T>>(&self, ops: &O, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        save_named(ops, self.named(), &dir.join("adapter_model.safetensors"))?;
        let cfg = serde_json::to_vec_pretty(&self.cfg.to_json())?;
        crate::util::atomic_write(&dir.join("adapter_config.json"), &cfg)
    }
}
