//! The figures DESIGN.md measures tuneloop against: other trainers' LoRA throughput on
//! one H100 (r=16 on all seven projections, random weights of the real shapes).

use serde::Serialize;

/// One measured figure of another system for one shape.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Anchor {
    pub preset: &'static str,
    pub seq: usize,
    pub batch: usize,
    pub system: &'static str,
    pub tokens_per_s: f64,
    /// Peak GPU memory, where it was measured.
    pub memory_gib: Option<f64>,
}

const HF_EAGER: &str = "HF transformers 5.17 + PEFT 0.21, eager + SDPA";
const HF_COMPILE: &str = "HF transformers 5.17 + PEFT 0.21, torch.compile";

pub const ANCHORS: &[Anchor] = &[
    Anchor {
        preset: "llama3.2-1b",
        seq: 2048,
        batch: 4,
        system: HF_EAGER,
        tokens_per_s: 32_200.0,
        memory_gib: Some(35.5),
    },
    Anchor {
        preset: "llama3.2-1b",
        seq: 2048,
        batch: 4,
        system: HF_COMPILE,
        tokens_per_s: 49_600.0,
        memory_gib: Some(23.0),
    },
    Anchor {
        preset: "llama3.1-8b",
        seq: 2048,
        batch: 2,
        system: HF_EAGER,
        tokens_per_s: 8_100.0,
        memory_gib: Some(58.4),
    },
    Anchor {
        preset: "llama3.1-8b",
        seq: 4096,
        batch: 1,
        system: HF_EAGER,
        tokens_per_s: 7_900.0,
        memory_gib: None,
    },
    Anchor {
        preset: "llama3.1-8b",
        seq: 4096,
        batch: 2,
        system: "NeMo Automodel (published, 402 TFLOP/s)",
        tokens_per_s: 12_500.0,
        memory_gib: None,
    },
];

/// The anchors measured at exactly this shape: same preset, sequence length and batch,
/// on plain `[batch, seq]` rows (a packed batch attends over shorter documents, so its
/// throughput is not comparable).
pub fn matching(preset: Option<&str>, seq: usize, batch: usize, packing: bool) -> Vec<Anchor> {
    let Some(preset) = preset else { return Vec::new() };
    if packing {
        return Vec::new();
    }
    ANCHORS.iter().filter(|a| a.preset == preset && a.seq == seq && a.batch == batch).copied().collect()
}
