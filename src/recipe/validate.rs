//! Checks that serde cannot express: required keys, ranges, and fields that must agree.
//! All problems are reported at once, so a user fixes a recipe in one pass.

use std::collections::HashSet;

use anyhow::{bail, Result};

use super::Recipe;
use crate::model::lora::Proj;

impl Recipe {
    /// Fails with every problem found, one per line.
    pub fn validate(&self) -> Result<()> {
        if let Err(problems) = self.check() {
            bail!("invalid recipe:\n  - {}", problems.join("\n  - "));
        }
        Ok(())
    }

    pub(super) fn check(&self) -> Result<(), Vec<String>> {
        let mut p = Vec::new();
        self.check_required(&mut p);
        self.check_peft(&mut p);
        self.check_data(&mut p);
        self.check_steps(&mut p);
        self.check_optim(&mut p);
        if p.is_empty() {
            Ok(())
        } else {
            Err(p)
        }
    }

    fn check_required(&self, p: &mut Vec<String>) {
        if self.model.path.as_os_str().is_empty() {
            p.push("model.path is required: the Hugging Face model directory".into());
        }
        if self.data.train.is_empty() {
            p.push("data.train is required: a JSONL file or a list of them".into());
        }
        for (key, list) in [("data.train", &self.data.train), ("data.validation", &self.data.validation)] {
            if list.iter().any(|f| f.as_os_str().is_empty()) {
                p.push(format!("{key} has an empty path"));
            }
        }
        if self.output_dir.as_os_str().is_empty() {
            p.push("output_dir is required: where checkpoints and the adapter go".into());
        }
    }

    fn check_peft(&self, p: &mut Vec<String>) {
        let peft = &self.peft;
        if peft.r == 0 {
            p.push("peft.r must be > 0".into());
        }
        if !(peft.alpha.is_finite() && peft.alpha > 0.0) {
            p.push(format!("peft.alpha must be > 0 (got {})", peft.alpha));
        }
        if !(0.0..1.0).contains(&peft.dropout) {
            p.push(format!("peft.dropout must be in [0, 1) (got {})", peft.dropout));
        }
        if peft.target_modules.is_empty() && !peft.full {
            p.push("peft.target_modules is empty: name at least one module, or \"all-linear\"".into());
        }
        let mut seen = HashSet::new();
        for name in &peft.target_modules {
            if Proj::from_module(name).is_none() {
                p.push(format!(
                    "peft.target_modules: unknown module `{name}` (valid: {})",
                    super::all_linear().join(", ")
                ));
            } else if !seen.insert(name) {
                p.push(format!("peft.target_modules lists `{name}` twice"));
            }
        }
        if peft.full && peft.init_from.is_some() {
            p.push("peft.init_from continues a LoRA adapter; it cannot be used with peft.full: true".into());
        }
    }

    fn check_data(&self, p: &mut Vec<String>) {
        let data = &self.data;
        if !(0.0..1.0).contains(&data.val_fraction) {
            p.push(format!("data.val_fraction must be in [0, 1) (got {})", data.val_fraction));
        }
        if data.seq_len < 16 {
            p.push(format!("data.seq_len must be >= 16 (got {})", data.seq_len));
        }
        if data.filters.min_rating.is_some_and(|r| !r.is_finite()) {
            p.push("data.filters.min_rating must be a finite number".into());
        }
        if data.filters.max_tokens == Some(0) {
            p.push("data.filters.max_tokens must be > 0 (or null for no limit)".into());
        }
    }

    fn check_steps(&self, p: &mut Vec<String>) {
        let s = &self.step_scheduler;
        if s.local_batch_size == 0 || s.global_batch_size == 0 {
            p.push("step_scheduler.global_batch_size and local_batch_size must be > 0".into());
        } else if s.global_batch_size % s.local_batch_size != 0 {
            p.push(format!(
                "step_scheduler.global_batch_size ({}) must be divisible by local_batch_size ({})",
                s.global_batch_size, s.local_batch_size
            ));
        }
        if s.max_steps.is_none() && s.num_epochs.is_none() {
            p.push("step_scheduler: set max_steps or num_epochs (both are null)".into());
        }
        let positive = [
            ("max_steps", s.max_steps),
            ("num_epochs", s.num_epochs),
            ("val_every_steps", s.val_every_steps),
            ("ckpt_every_steps", s.ckpt_every_steps),
            ("log_every_steps", Some(s.log_every_steps)),
        ];
        for (key, v) in positive {
            if v == Some(0) {
                p.push(format!("step_scheduler.{key} must be > 0"));
            }
        }
        if self.checkpoint.keep_last == 0 {
            p.push("checkpoint.keep_last must be >= 1: resuming needs the last checkpoint".into());
        }
    }

    fn check_optim(&self, p: &mut Vec<String>) {
        let o = &self.optimizer;
        if o.name != "adamw" {
            p.push(format!("optimizer.name `{}` is not supported (only `adamw`)", o.name));
        }
        if !(o.lr.is_finite() && o.lr > 0.0) {
            p.push(format!("optimizer.lr must be > 0 (got {})", o.lr));
        }
        if !o.betas.iter().all(|b| (0.0..1.0).contains(b)) {
            p.push(format!("optimizer.betas must each be in [0, 1) (got {:?})", o.betas));
        }
        if !(o.eps.is_finite() && o.eps > 0.0) {
            p.push(format!("optimizer.eps must be > 0 (got {})", o.eps));
        }
        if !(o.weight_decay.is_finite() && o.weight_decay >= 0.0) {
            p.push(format!("optimizer.weight_decay must be >= 0 (got {})", o.weight_decay));
        }
        if !(0.0..=1.0).contains(&self.lr_scheduler.min_lr_ratio) {
            p.push(format!(
                "lr_scheduler.min_lr_ratio must be in [0, 1] (got {})",
                self.lr_scheduler.min_lr_ratio
            ));
        }
        if let Some(c) = self.clip_grad_norm {
            if !(c.is_finite() && c > 0.0) {
                p.push(format!("clip_grad_norm must be > 0, or null to disable (got {c})"));
            }
        }
    }
}
