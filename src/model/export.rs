//! Writing HF model directories: a model's `config.json` and `model.safetensors`
//! (HF names), the tokenizer files beside it, and LoRA merged into the base weights.

use std::path::Path;

use anyhow::{Context, Result};
use serde_json::json;

use super::config::{Arch, ModelConfig, RopeScaling};
use super::lora::{Adapter, Proj};
use super::safetensors_io::save_named;
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

    /// Folds the adapter into the frozen weights: `W += scale · B·A` for every LoRA pair.
    pub fn merge<O: Ops<Tensor = T>>(&mut self, ops: &O, adapter: &Adapter<T>) -> Result<()> {
        let scale = adapter.cfg.scale();
        for (l, layer) in self.layers.iter_mut().enumerate() {
            for p in Proj::ALL {
                let Some(pair) = adapter.pair(l, p) else { continue };
                let w = &mut layer.proj[p as usize].w;
                let shape = ops.shape(w).to_vec();
                let (out, inp) = (shape[0], shape[1]);
                let (a, b) = (ops.download(&pair.a)?, ops.download(&pair.b)?);
                let r = a.len() / inp;
                let mut host = ops.download(w)?;
                for i in 0..out {
                    for k in 0..r {
                        let bik = b[i * r + k] * scale;
                        for (wj, aj) in
                            host[i * inp..(i + 1) * inp].iter_mut().zip(&a[k * inp..(k + 1) * inp])
                        {
                            *wj += bik * aj;
                        }
                    }
                }
                *w = ops.upload(&host, &shape)?;
            }
        }
        Ok(())
    }
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
