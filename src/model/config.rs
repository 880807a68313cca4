//! HF `config.json` for `LlamaForCausalLM` and `Qwen2ForCausalLM`, mirroring HF's keys.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::Value;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RopeScaling {
    Default,
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v (Qwen2 always; Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on o_proj (Llama's `attention_bias`).
    pub o_bias: bool,
    /// Biases on gate/up/down (Llama's `mlp_bias`).
    pub mlp_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

fn get_usize(v: &Value, key: &str) -> Result<usize> {
    v.get(key)
        .and_then(Value::as_u64)
        .map(|x| x as usize)
        .with_context(|| format!("missing or non-integer `{key}`"))
}

fn get_f64(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

fn get_bool(v: &Value, key: &str, default: bool) -> bool {
    v.get(key).and_then(Value::as_bool).unwrap_or(default)
}

fn token_ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).map(|x| x as u32).collect(),
        _ => Vec::new(),
    }
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let v = crate::util::read_json(path)?;
        Self::from_json(&v).with_context(|| format!("{}", path.display()))
    }

    pub fn from_json(v: &Value) -> Result<Self> {
        let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
        let arch = match model_type {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            other => {
                let archs = v.get("architectures").map(|a| a.to_string()).unwrap_or_default();
                bail!(
                    "unsupported model_type `{other}` (architectures {archs}); tuneloop supports \
                     `llama` (LlamaForCausalLM) and `qwen2` (Qwen2ForCausalLM)"
                )
            }
        };
        let act = v.get("hidden_act").and_then(Value::as_str).unwrap_or("silu");
        if act != "silu" {
            bail!("unsupported hidden_act `{act}` (only `silu` is supported)");
        }
        if arch == Arch::Qwen2 && get_bool(v, "use_sliding_window", false) {
            bail!("unsupported: `use_sliding_window: true` (sliding-window attention)");
        }
        let hidden_size = get_usize(v, "hidden_size")?;
        let num_attention_heads = get_usize(v, "num_attention_heads")?;
        let num_key_value_heads = v
            .get("num_key_value_heads")
            .and_then(Value::as_u64)
            .map(|x| x as usize)
            .unwrap_or(num_attention_heads);
        let head_dim = match v.get("head_dim").and_then(Value::as_u64) {
            Some(h) => h as usize,
            None => {
                if num_attention_heads == 0 || hidden_size % num_attention_heads != 0 {
                    bail!("hidden_size {hidden_size} is not divisible by num_attention_heads {num_attention_heads}");
                }
                hidden_size / num_attention_heads
            }
        };
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            bail!("num_attention_heads {num_attention_heads} is not a multiple of num_key_value_heads {num_key_value_heads}");
        }
        if head_dim % 2 != 0 {
            bail!("head_dim {head_dim} must be even for RoPE");
        }
        let (rope_theta, rope_scaling) = parse_rope(v)?;
        let attention_bias = get_bool(v, "attention_bias", false);
        Ok(Self {
            arch,
            vocab_size: get_usize(v, "vocab_size")?,
            hidden_size,
            intermediate_size: get_usize(v, "intermediate_size")?,
            num_hidden_layers: get_usize(v, "num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: get_f64(v, "rms_norm_eps").unwrap_or(1e-6) as f32,
            rope_theta,
            rope_scaling,
            max_position_embeddings: v.get("max_position_embeddings").and_then(Value::as_u64).unwrap_or(2048)
                as usize,
            tie_word_embeddings: get_bool(v, "tie_word_embeddings", false),
            qkv_bias: arch == Arch::Qwen2 || attention_bias,
            o_bias: arch == Arch::Llama && attention_bias,
            mlp_bias: arch == Arch::Llama && get_bool(v, "mlp_bias", false),
            bos_token_id: token_ids(v.get("bos_token_id")).first().copied(),
            eos_token_ids: token_ids(v.get("eos_token_id")),
        })
    }

    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }
}

/// RoPE from transformers-5 `rope_parameters`, or the older `rope_theta` +
/// `rope_scaling` keys.
fn parse_rope(v: &Value) -> Result<(f64, RopeScaling)> {
    let params = match v.get("rope_parameters") {
        Some(p @ Value::Object(_)) => Some(p),
        _ => match v.get("rope_scaling") {
            Some(p @ Value::Object(_)) => Some(p),
            _ => None,
        },
    };
    let theta =
        params.and_then(|p| get_f64(p, "rope_theta")).or_else(|| get_f64(v, "rope_theta")).unwrap_or(10000.0);
    let rope_type = params
        .and_then(|p| {
            p.get("rope_type").and_then(Value::as_str).or_else(|| p.get("type").and_then(Value::as_str))
        })
        .unwrap_or("default");
    let scaling = match rope_type {
        "default" => RopeScaling::Default,
        "llama3" => {
            let p = params.context("rope type llama3 without its parameters")?;
            let need = |k: &str| get_f64(p, k).with_context(|| format!("rope type llama3: missing `{k}`"));
            RopeScaling::Llama3 {
                factor: need("factor")?,
                low_freq_factor: need("low_freq_factor")?,
                high_freq_factor: need("high_freq_factor")?,
                original_max_position_embeddings: need("original_max_position_embeddings")?,
            }
        }
        other => bail!("unsupported rope type `{other}` (supported: `default`, `llama3`)"),
    };
    if let Some(f) = params.and_then(|p| get_f64(p, "partial_rotary_factor")) {
        if f != 1.0 {
            bail!("unsupported partial_rotary_factor {f}");
        }
    }
    Ok((theta, scaling))
}
