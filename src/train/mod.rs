//! Training: the step (forward, loss, backward), AdamW and gradient clipping.

pub mod optim;
pub mod step;

pub use optim::{clip_grad_norm, grad_norm, AdamW};
pub use step::{forward_backward, TokenBatch};
