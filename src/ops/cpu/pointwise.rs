//! Row-wise and element-wise ops of the CPU backend: RMSNorm, RoPE, SwiGLU, AdamW.

use anyhow::{ensure, Result};
use rayon::prelude::*;

use crate::ops::AdamWParams;

pub fn rmsnorm_fwd(x: &[f32], w: &[f32], d: usize, eps: f32) -> (Vec<f32>, Vec<f32>) {
    let n = x.len() / d.max(1);
    let mut y = vec![0.0; x.len()];
    let mut rstd = vec![0.0; n];
    y.par_chunks_mut(d).zip(rstd.par_iter_mut()).zip(x.par_chunks(d)).for_each(|((y, r), x)| {
        let ms = x.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / d as f64;
        let rs = 1.0 / (ms + eps as f64).sqrt();
        *r = rs as f32;
        for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
            *y = w * (x as f64 * rs) as f32;
        }
    });
    (y, rstd)
}

/// dx = rstd · (dy·w − x̂ · mean(dy·w·x̂)), x̂ = x·rstd; dw += Σ_rows dy·x̂.
pub fn rmsnorm_bwd(
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    rstd: &[f32],
    d: usize,
    dw: Option<&mut [f32]>,
) -> Vec<f32> {
    let mut dx = vec![0.0; x.len()];
    dx.par_chunks_mut(d).zip(dy.par_chunks(d).zip(x.par_chunks(d))).zip(rstd.par_iter()).for_each(
        |((dx, (dy, x)), &r)| {
            let r = r as f64;
            let dot =
                dy.iter().zip(x).zip(w).map(|((&g, &x), &w)| g as f64 * w as f64 * x as f64 * r).sum::<f64>()
                    / d as f64;
            for (((dx, &g), &x), &w) in dx.iter_mut().zip(dy).zip(x).zip(w) {
                *dx = (r * (g as f64 * w as f64 - x as f64 * r * dot)) as f32;
            }
        },
    );
    if let Some(dw) = dw {
        for ((dy, x), &r) in dy.chunks(d).zip(x.chunks(d)).zip(rstd) {
            for ((dw, &g), &x) in dw.iter_mut().zip(dy).zip(x) {
                *dw += g * x * r;
            }
        }
    }
    dx
}

/// Rotates each head's pairs `(i, i + hd/2)` by the row's angles; `sign = -1` rotates
/// back (the backward).
pub fn rope(x: &mut [f32], cos: &[f32], sin: &[f32], head_dim: usize, sign: f32) -> Result<()> {
    let half = head_dim / 2;
    ensure!(head_dim % 2 == 0 && half > 0, "rope: head_dim {head_dim} must be even");
    let n = cos.len() / half;
    ensure!(cos.len() == sin.len() && n > 0, "rope: cos/sin tables differ");
    ensure!(x.len() % (n * head_dim) == 0, "rope: {} values for {n} rows of {head_dim}-wide heads", x.len());
    let width = x.len() / n;
    x.par_chunks_mut(width).enumerate().for_each(|(row, xr)| {
        let c = &cos[row * half..(row + 1) * half];
        let s = &sin[row * half..(row + 1) * half];
        for head in xr.chunks_mut(head_dim) {
            let (x1, x2) = head.split_at_mut(half);
            for i in 0..half {
                let (a, b, si) = (x1[i], x2[i], sign * s[i]);
                x1[i] = a * c[i] - b * si;
                x2[i] = b * c[i] + a * si;
            }
        }
    });
    Ok(())
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

pub fn swiglu_fwd(gate: &[f32], up: &[f32]) -> Vec<f32> {
    gate.par_iter().zip(up).map(|(&g, &u)| g * sigmoid(g) * u).collect()
}

pub fn swiglu_bwd(dh: &[f32], gate: &[f32], up: &[f32]) -> (Vec<f32>, Vec<f32>) {
    dh.par_iter()
        .zip(gate)
        .zip(up)
        .map(|((&dh, &g), &u)| {
            let s = sigmoid(g);
            let silu = g * s;
            (dh * u * s * (1.0 + g * (1.0 - s)), dh * silu)
        })
        .unzip()
}

/// `torch.optim.AdamW` (single-tensor path): decoupled decay, then the bias-corrected
/// Adam update with `(step_size, bc2_sqrt)` of [`AdamWParams::bias_corrections`]. Each
/// gradient is multiplied by `grad_scale` as it is read.
pub fn adamw(
    p: &mut [f32],
    g: &[f32],
    (m, v): (&mut [f32], &mut [f32]),
    hp: AdamWParams,
    (step_size, bc2_sqrt): (f32, f32),
    grad_scale: f32,
) {
    let decay = 1.0 - hp.lr * hp.weight_decay;
    p.par_iter_mut().zip(g).zip(m.par_iter_mut().zip(v.par_iter_mut())).for_each(|((p, &g), (m, v))| {
        let g = g * grad_scale;
        *p *= decay;
        *m += (g - *m) * (1.0 - hp.beta1);
        *v = *v * hp.beta2 + (1.0 - hp.beta2) * g * g;
        let denom = v.sqrt() / bc2_sqrt + hp.eps;
        *p -= step_size * *m / denom;
    });
}
