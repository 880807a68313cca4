//! Token cross-entropy with PyTorch's `ignore_index = -100` semantics.

use anyhow::{ensure, Result};
use rayon::prelude::*;

use crate::ops::LossStats;

pub const IGNORE_INDEX: i64 = -100;

/// The rows' loss statistics and, with `grad_scale`, the gradient of their logits.
pub fn cross_entropy(
    logits: &[f32],
    targets: &[i64],
    v: usize,
    grad_scale: Option<f32>,
) -> Result<(LossStats, Option<Vec<f32>>)> {
    for (i, &t) in targets.iter().enumerate() {
        ensure!(
            t == IGNORE_INDEX || (0..v as i64).contains(&t),
            "label {t} at token {i} is outside the vocabulary (size {v}) and is not -100"
        );
    }
    let mut dlogits = grad_scale.map(|_| vec![0.0f32; logits.len()]);
    // per row: (loss, correct); rows with target -100 give None
    let per_row = |row: &[f32], t: i64, drow: Option<&mut [f32]>| -> Option<(f64, bool)> {
        if t == IGNORE_INDEX {
            return None;
        }
        let t = t as usize;
        let (mut m, mut arg) = (f32::NEG_INFINITY, 0);
        for (j, &x) in row.iter().enumerate() {
            if x > m {
                (m, arg) = (x, j);
            }
        }
        let sum: f64 = row.iter().map(|&x| ((x - m) as f64).exp()).sum();
        let lse = m as f64 + sum.ln();
        if let (Some(d), Some(gs)) = (drow, grad_scale) {
            for (j, (dj, &x)) in d.iter_mut().zip(row).enumerate() {
                let p = ((x as f64) - lse).exp();
                *dj = ((p - if j == t { 1.0 } else { 0.0 }) * gs as f64) as f32;
            }
        }
        Some((lse - row[t] as f64, arg == t))
    };
    let rows: Vec<Option<(f64, bool)>> = match dlogits.as_mut() {
        Some(d) => logits
            .par_chunks(v)
            .zip(d.par_chunks_mut(v))
            .zip(targets.par_iter())
            .map(|((row, drow), &t)| per_row(row, t, Some(drow)))
            .collect(),
        None => logits.par_chunks(v).zip(targets.par_iter()).map(|(row, &t)| per_row(row, t, None)).collect(),
    };
    let counted = rows.iter().flatten();
    let stats = LossStats {
        loss_sum: counted.clone().map(|r| r.0).sum(),
        n_counted: counted.clone().count(),
        n_correct: counted.filter(|r| r.1).count(),
    };
    Ok((stats, dlogits))
}
