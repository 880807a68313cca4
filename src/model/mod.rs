//! The model: HF config and weights, LoRA adapters, the decoder and generation.

pub mod config;
pub mod decoder;
pub mod export;
pub mod generate;
pub mod lora;
pub mod presets;
pub mod rope;
pub mod safetensors_io;
pub mod weights;

pub use config::ModelConfig;
pub use decoder::Decoder;
pub use lora::{Adapter, LoraConfig, Proj};
pub use weights::Model;
