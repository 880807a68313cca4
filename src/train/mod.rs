//! Training: the step (forward, loss, backward), AdamW and gradient clipping, of a LoRA
//! adapter or (full fine-tuning) of the whole model.

pub mod checkpoint;
pub mod finetune;
pub mod optim;
pub mod pack;
pub mod params;
pub mod plot;
pub mod schedule;
pub mod step;
pub mod trainer;

pub use optim::{clip_scale, grad_clip, grad_norm, AdamW};
pub use params::Trainable;
pub use step::{eval_step, forward_backward, forward_backward_into, train_step, TokenBatch};
