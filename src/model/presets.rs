//! `config.json` of well-known checkpoints, for benchmarks and tests on random weights
//! of the real shapes (nothing is downloaded).

use anyhow::{bail, Result};
use serde_json::json;

use super::config::ModelConfig;

pub const NAMES: &[&str] =
    &["tiny", "smollm2-135m", "qwen2.5-0.5b", "llama3.2-1b", "llama3.1-8b", "qwen2.5-7b"];

pub fn preset(name: &str) -> Result<ModelConfig> {
    let llama3_rope = json!({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
        "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
    let v = match name {
        // the bundled quickstart's base: small enough to train on two CPU cores
        "tiny" => json!({"model_type": "llama", "vocab_size": 1024, "hidden_size": 128,
            "intermediate_size": 352, "num_hidden_layers": 4, "num_attention_heads": 4,
            "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "tie_word_embeddings": true, "max_position_embeddings": 2048}),
        "smollm2-135m" => json!({"model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
            "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
            "num_key_value_heads": 3, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
            "tie_word_embeddings": true, "max_position_embeddings": 8192}),
        "qwen2.5-0.5b" => json!({"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896,
            "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
            "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
            "tie_word_embeddings": true, "max_position_embeddings": 32768}),
        "llama3.2-1b" => json!({"model_type": "llama", "vocab_size": 128256, "hidden_size": 2048,
            "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 64, "rms_norm_eps": 1e-5, "rope_scaling": llama3_rope,
            "tie_word_embeddings": true, "max_position_embeddings": 131072}),
        "llama3.1-8b" => json!({"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
            "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_scaling": {"rope_type": "llama3",
            "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192},
            "tie_word_embeddings": false, "max_position_embeddings": 131072}),
        "qwen2.5-7b" => json!({"model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584,
            "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
            "num_key_value_heads": 4, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
            "tie_word_embeddings": false, "max_position_embeddings": 32768}),
        other => bail!("unknown preset `{other}` (known: {})", NAMES.join(", ")),
    };
    ModelConfig::from_json(&v)
}

/// Parameters of the linear layers, lm_head included (what a LoRA step's ~4N FLOPs
/// per token counts).
pub fn linear_params(c: &ModelConfig) -> u64 {
    let (d, i, q, kv) =
        (c.hidden_size as u64, c.intermediate_size as u64, c.q_dim() as u64, c.kv_dim() as u64);
    let per_layer = d * q + 2 * d * kv + q * d + 3 * d * i;
    per_layer * c.num_hidden_layers as u64 + d * c.vocab_size as u64
}

/// Model FLOPs per token of a training step, counted as the anchor figures are: 4 ×
/// linear parameters (forward and input gradient) in a LoRA step, 6 × in full
/// fine-tuning (the weight gradients too), plus 3.5 × causal attention
/// (2·2·layers·seq·hidden / 2) in both.
pub fn step_flops_per_token(c: &ModelConfig, seq: usize, full: bool) -> f64 {
    let attn = 2.0 * 2.0 * c.num_hidden_layers as f64 * seq as f64 * c.hidden_size as f64 / 2.0;
    (if full { 6.0 } else { 4.0 }) * linear_params(c) as f64 + 3.5 * attn
}

/// Model FLOPs of one training step over sequences of these lengths (a plain
/// `[batch, seq]` batch, or packed documents, whose attention spans only their own
/// tokens): each sequence's tokens at [`step_flops_per_token`] of its length.
pub fn step_flops(c: &ModelConfig, seq_lens: &[usize], full: bool) -> f64 {
    seq_lens.iter().map(|&len| len as f64 * step_flops_per_token(c, len, full)).sum()
}
