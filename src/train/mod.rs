//! Training: the step (forward, loss, backward), AdamW and gradient clipping.

pub mod checkpoint;
pub mod finetune;
pub mod optim;
pub mod pack;
pub mod plot;
pub mod schedule;
pub mod step;
pub mod trainer;

pub use optim::{clip_grad_norm, grad_norm, AdamW};
pub use step::{forward_backward, forward_backward_into, TokenBatch};
