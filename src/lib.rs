//! tuneloop: turns an agent's feedback log into LoRA adapters for HF Llama / Qwen2
//! checkpoints. The decoder is written once against the [`ops::Ops`] trait; the CPU
//! backend is the exact f32 reference.

pub mod bench;
pub mod data;
pub mod dist;
pub mod eval;
pub mod interrupt;
pub mod kernels;
pub mod lifecycle;
pub mod model;
pub mod ops;
pub mod parity;
pub mod profiling;
pub mod recipe;
pub mod registry;
pub mod train;
pub mod util;
