//! Learning-rate schedules as HF transformers defines them (`get_*_schedule_with_warmup`):
//! linear warm-up from 0, then cosine, linear or constant, down to `min_lr_ratio · lr`.

pub use crate::recipe::Decay;

/// Optimizer steps of a run whose epoch is `steps_per_epoch` steps: whichever of
/// `max_steps` and `epochs` ends first.
pub fn total_steps(max_steps: Option<usize>, epochs: Option<usize>, steps_per_epoch: usize) -> usize {
    let by_epochs = epochs.map(|e| e.saturating_mul(steps_per_epoch));
    match (max_steps, by_epochs) {
        (Some(m), Some(e)) => m.min(e),
        (Some(m), None) => m,
        (None, Some(e)) => e,
        (None, None) => 0,
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    pub lr: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
    pub decay: Decay,
    pub min_lr_ratio: f64,
}

impl Schedule {
    /// Learning rate of optimizer step `step` (0-based).
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.lr * step as f64 / self.warmup_steps.max(1) as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
        let f = match self.decay {
            Decay::Constant => 1.0,
            Decay::Linear => 1.0 - progress,
            Decay::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        };
        self.lr * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_as_hf() {
        let s =
            Schedule { lr: 1.0, warmup_steps: 4, total_steps: 14, decay: Decay::Cosine, min_lr_ratio: 0.0 };
        assert_eq!(s.lr_at(0), 0.0);
        assert_eq!(s.lr_at(2), 0.5);
        assert_eq!(s.lr_at(4), 1.0);
        assert!((s.lr_at(9) - 0.5).abs() < 1e-12);
        assert!(s.lr_at(14).abs() < 1e-12);
        let l = Schedule { decay: Decay::Linear, min_lr_ratio: 0.1, ..s };
        assert!((l.lr_at(9) - (0.1 + 0.9 * 0.5)).abs() < 1e-12);
        let c = Schedule { decay: Decay::Constant, ..s };
        assert_eq!(c.lr_at(13), 1.0);
    }
}
