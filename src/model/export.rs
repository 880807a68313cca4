//! Writing HF model directories: a model's `config.json` and `model.safetensors`
//! (HF names), the tokenizer files beside it, and LoRA merged into the base weights.

use std::path::Path;

use anyhow::{Context, Result};
use serde_json::json;

use super::config::{Arch, ModelConfig, RopeScaling};
use super::lora::{Adapter, Proj};
use super::safetensors_io::{pt_metadata, save_named, write_views, FloatDtype};
use super::weights::Model;
use crate::ops::Ops;

/// Files of an HF tokenizer folder that travel with a model or an adapter.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
];

/// Copies a model directory's `config.json` as it is and whichever tokenizer files it
/// has from `base` into `to` (each atomically): what a model derived from `base` without
/// changing its shapes (merged, or fully fine-tuned) carries over.
pub fn copy_config_and_tokenizer(base: &Path, to: &Path) -> Result<()> {
    let config = base.join("config.json");
    let bytes = std::fs::read(&config).with_context(|| format!("reading {}", config.display()))?;
    crate::util::atomic_write(&to.join("config.json"), &bytes)?;
    copy_tokenizer_files(base, to)?;
    Ok(())
}

/// Copies whichever tokenizer files `from` has into `to` (each atomically).
pub fn copy_tokenizer_files(from: &Path, to: &Path) -> Result<usize> {
    let mut n = 0;
    for f in TOKENIZER_FILES {
        let src = from.join(f);
        if src.exists() {
            let bytes = std::fs::read(&src).with_context(|| format!("reading {}", src.display()))?;
            crate::util::atomic_write(&to.join(f), &bytes)?;
            n += 1;
        }
    }
    Ok(n)
}

impl ModelConfig {
    /// `config.json` as transformers writes it (the keys tuneloop reads, in HF's names).
    pub fn to_hf_json(&self) -> serde_json::Value {
        let (arch, model_type) = match self.arch {
            Arch::Llama => ("LlamaForCausalLM", "llama"),
            Arch::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
        };
        let mut rope = json!({"rope_theta": self.rope_theta, "rope_type": "default"});
        if let RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } = self.rope_scaling
        {
            rope = json!({"rope_theta": self.rope_theta, "rope_type": "llama3", "factor": factor,
                "low_freq_factor": low_freq_factor, "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position_embeddings});
        }
        let mut v = json!({
            "architectures": [arch],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": match self.eos_token_ids.as_slice() { [one] => json!(one), many => json!(many) },
            "dtype": "float32",
        });
        if self.arch == Arch::Llama {
            v["attention_bias"] = json!(self.qkv_bias);
            v["mlp_bias"] = json!(self.mlp_bias);
        }
        v
    }
}

impl<T> Model<T> {
    /// Every tensor with its HF name.
    pub fn named(&self) -> Vec<(String, &T)> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), &self.embed_tokens)];
        for (l, layer) in self.layers.iter().enumerate() {
            out.push((format!("model.layers.{l}.input_layernorm.weight"), &layer.input_layernorm));
            out.push((
                format!("model.layers.{l}.post_attention_layernorm.weight"),
                &layer.post_attention_layernorm,
            ));
            for p in Proj::ALL {
                let lin = &layer.proj[p as usize];
                out.push((format!("{}.weight", p.hf_prefix(l)), &lin.w));
                if let Some(b) = &lin.b {
                    out.push((format!("{}.bias", p.hf_prefix(l)), b));
                }
            }
        }
        out.push(("model.norm.weight".to_string(), &self.norm));
        if let Some(h) = &self.lm_head {
            out.push(("lm_head.weight".to_string(), h));
        }
        out
    }

    /// The tensors of [`Model::named`], in its order, for updating in place.
    pub fn tensors_mut(&mut self) -> Vec<&mut T> {
        let mut out = vec![&mut self.embed_tokens];
        for layer in self.layers.iter_mut() {
            out.push(&mut layer.input_layernorm);
            out.push(&mut layer.post_attention_layernorm);
            for lin in layer.proj.iter_mut() {
                out.push(&mut lin.w);
                if let Some(b) = &mut lin.b {
                    out.push(b);
                }
            }
        }
        out.push(&mut self.norm);
        if let Some(h) = &mut self.lm_head {
            out.push(h);
        }
        out
    }

    /// Writes `config.json` and `model.safetensors` (f32) into `dir`.
    pub fn save<O: Ops<Tensor = T>>(&self, ops: &O, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        save_named(ops, self.named(), &dir.join("model.safetensors"))?;
        crate::util::atomic_write(
            &dir.join("config.json"),
            &serde_json::to_vec_pretty(&self.cfg.to_hf_json())?,
        )
    }
}

/// `W += scale · B·A` on a row-major `[out, in]` weight (`B [out, r]`, `A [r, in]`), in
/// f32, each element's products added in the order of k.
fn add_low_rank(w: &mut [f32], a: &[f32], b: &[f32], inp: usize, scale: f32) {
    use rayon::prelude::*;
    let r = a.len() / inp.max(1);
    w.par_chunks_exact_mut(inp.max(1)).enumerate().for_each(|(i, row)| {
        for k in 0..r {
            let bik = b[i * r + k] * scale;
            for (wj, aj) in row.iter_mut().zip(&a[k * inp..(k + 1) * inp]) {
                *wj += bik * aj;
            }
        }
    });
}

/// What [`merge_export`] wrote.
#[derive(Clone, Debug, PartialEq)]
pub struct MergeReport {
    /// Tensors in `model.safetensors`.
    pub tensors: usize,
    /// Of those, the ones a LoRA pair was folded into.
    pub merged: usize,
    pub bytes: u64,
}

/// One tensor of a merged export: the base's bytes as they are, or (`delta`: A, B and
/// the scale) `W + scale·B·A` in W's own dtype, computed when the writer reaches it, so
/// one merged tensor is in memory at a time.
struct ExportView<'a> {
    w: crate::ops::HostWeight<'a>,
    delta: Option<(&'a [f32], &'a [f32], f32, FloatDtype)>,
}

impl safetensors::View for ExportView<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.w.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.w.shape
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        let Some((a, b, scale, dtype)) = self.delta else { return self.w.bytes.into() };
        let mut v = dtype.decode(self.w.bytes);
        add_low_rank(&mut v, a, b, self.w.shape[1], scale);
        dtype.encode(&v).into()
    }

    fn data_len(&self) -> usize {
        self.w.bytes.len()
    }
}

/// `export --merge`: writes `out/model.safetensors` with every tensor of the base model
/// directory `base` (one file or shards), those the adapter in `adapter_dir` has a LoRA
/// pair for as `W + scale·B·A` (in f32, then rounded to W's own dtype: a bf16 checkpoint
/// stays bf16), the others byte for byte; then the base's `config.json` as it is and the
/// tokenizer files of both. One merged tensor is in memory at a time, and the file
/// appears whole (written to a temporary file and renamed).
pub fn merge_export(base: &Path, adapter_dir: &Path, out: &Path) -> Result<MergeReport> {
    use super::safetensors_io::TensorStore;
    use crate::ops::cpu::CpuOps;
    let cfg = ModelConfig::from_file(&base.join("config.json"))?;
    let adapter = Adapter::load(&CpuOps, adapter_dir, &cfg)?;
    let scale = adapter.cfg.scale();
    let store = TensorStore::open_dir(base)?;
    let mut deltas = std::collections::HashMap::new();
    for l in 0..cfg.num_hidden_layers {
        for p in Proj::ALL {
            if let Some(pair) = adapter.pair(l, p) {
                deltas.insert(format!("{}.weight", p.hf_prefix(l)), pair);
            }
        }
    }
    let names = store.names();
    let mut views = Vec::with_capacity(names.len());
    for name in &names {
        let w = store.get(name)?;
        let delta = match deltas.remove(*name) {
            None => None,
            Some(pair) => {
                let Some(dtype) = FloatDtype::of(w.dtype) else {
                    anyhow::bail!(
                        "{}: tensor `{name}` is {:?}; a LoRA pair merges into F32, BF16 or F16 weights",
                        base.display(),
                        w.dtype
                    )
                };
                let (out_dim, in_dim) = (pair.b.shape[0], pair.a.shape[1]);
                anyhow::ensure!(
                    w.shape == [out_dim, in_dim],
                    "{}: tensor `{name}` has shape {:?}; the adapter's pair is for [{out_dim}, {in_dim}]",
                    base.display(),
                    w.shape
                );
                Some((pair.a.data.as_slice(), pair.b.data.as_slice(), scale, dtype))
            }
        };
        views.push((name.to_string(), ExportView { w, delta }));
    }
    if let Some(name) = deltas.keys().next() {
        anyhow::bail!("{}: no tensor `{name}` for the adapter's LoRA pair", base.display());
    }
    let merged = views.iter().filter(|(_, v)| v.delta.is_some()).count();
    let bytes = views.iter().map(|(_, v)| v.w.bytes.len() as u64).sum();
    write_views(&out.join("model.safetensors"), views, pt_metadata())?;
    copy_config_and_tokenizer(base, out)?;
    copy_tokenizer_files(adapter_dir, out)?;
    Ok(MergeReport { tensors: names.len(), merged, bytes })
}

/// A new HF model directory with random weights of a preset's shapes (its vocabulary
/// sized to the tokenizer's, rounded up to a multiple of 64) and that tokenizer:
/// a base for trying the pipeline end to end without downloading a checkpoint.
pub fn init_random_model<O: Ops>(
    ops: &O,
    preset: &str,
    tokenizer_dir: &Path,
    out: &Path,
    seed: u64,
    embed_std: f32,
) -> Result<()> {
    let mut cfg = super::presets::preset(preset)?;
    let tok_path = tokenizer_dir.join("tokenizer.json");
    let tok = tokenizers::Tokenizer::from_file(&tok_path)
        .map_err(|e| anyhow::anyhow!("{}: {e}", tok_path.display()))?;
    cfg.vocab_size = tok.get_vocab_size(true).div_ceil(64) * 64;
    let special = |name: &str| -> Option<u32> {
        let text = std::fs::read_to_string(tokenizer_dir.join("tokenizer_config.json")).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        let t = &v[name];
        let content = t.as_str().or_else(|| t["content"].as_str())?;
        tok.token_to_id(content)
    };
    cfg.bos_token_id = special("bos_token");
    cfg.eos_token_ids = special("eos_token").into_iter().collect();
    let model = Model::random(ops, cfg, seed, embed_std)?;
    model.save(ops, out)?;
    copy_tokenizer_files(tokenizer_dir, out)?;
    Ok(())
}
