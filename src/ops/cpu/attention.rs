//! Causal grouped-query attention on the CPU, flash-style in its arithmetic: the
//! forward keeps only the output and the row log-sum-exp; the backward recomputes the
//! probabilities from them. Query rows, and in the backward key rows, are independent,
//! so both passes parallelise over rows with no reduction between threads.

use rayon::prelude::*;

use crate::ops::{AttnLayout, AttnShape, SeqSpan};

/// For each row, the span it belongs to and its index inside it.
fn row_owner(n: usize, layout: &AttnLayout, of_key: bool) -> Vec<Option<(SeqSpan, usize)>> {
    let mut owner = vec![None; n];
    for sp in &layout.seqs {
        let (start, len) = if of_key { (sp.k_start, sp.k_len) } else { (sp.q_start, sp.q_len) };
        for i in 0..len {
            owner[start + i] = Some((*sp, i));
        }
    }
    owner
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

struct Geometry {
    hd: usize,
    group: usize,
    wq: usize,
    wk: usize,
    scale: f32,
}

impl Geometry {
    fn new(s: AttnShape) -> Self {
        Self {
            hd: s.head_dim,
            group: s.n_heads / s.n_kv_heads,
            wq: s.n_heads * s.head_dim,
            wk: s.n_kv_heads * s.head_dim,
            scale: 1.0 / (s.head_dim as f32).sqrt(),
        }
    }
    fn q<'a>(&self, q: &'a [f32], row: usize, h: usize) -> &'a [f32] {
        &q[row * self.wq + h * self.hd..][..self.hd]
    }
    fn kv<'a>(&self, k: &'a [f32], row: usize, h: usize) -> &'a [f32] {
        let kvh = h / self.group;
        &k[row * self.wk + kvh * self.hd..][..self.hd]
    }
}

/// Number of keys query `i` of a span sees.
fn visible(sp: &SeqSpan, i: usize) -> usize {
    i + sp.k_len - sp.q_len + 1
}

pub fn forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    nq: usize,
    s: AttnShape,
    layout: &AttnLayout,
) -> (Vec<f32>, Vec<f32>) {
    let g = Geometry::new(s);
    let owner = row_owner(nq, layout, false);
    let mut out = vec![0.0; nq * g.wq];
    let mut lse = vec![f32::NEG_INFINITY; nq * s.n_heads];
    out.par_chunks_mut(g.wq).zip(lse.par_chunks_mut(s.n_heads)).zip(owner.par_iter()).enumerate().for_each(
        |(row, ((o_row, lse_row), owner))| {
            let Some((sp, i)) = owner else { return };
            let nk = visible(sp, *i);
            let mut p = vec![0.0f32; nk];
            for h in 0..s.n_heads {
                let qh = g.q(q, row, h);
                let mut m = f32::NEG_INFINITY;
                for (j, pj) in p.iter_mut().enumerate() {
                    *pj = dot(qh, g.kv(k, sp.k_start + j, h)) * g.scale;
                    m = m.max(*pj);
                }
                let mut l = 0.0f32;
                for pj in p.iter_mut() {
                    *pj = (*pj - m).exp();
                    l += *pj;
                }
                let oh = &mut o_row[h * g.hd..(h + 1) * g.hd];
                for (j, &pj) in p.iter().enumerate() {
                    let w = pj / l;
                    for (o, &vv) in oh.iter_mut().zip(g.kv(v, sp.k_start + j, h)) {
                        *o += w * vv;
                    }
                }
                lse_row[h] = m + l.ln();
            }
        },
    );
    (out, lse)
}

#[allow(clippy::too_many_arguments)]
pub fn backward(
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    s: AttnShape,
    layout: &AttnLayout,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let g = Geometry::new(s);
    let h_n = s.n_heads;
    let nq = q.len() / g.wq;
    let nk = k.len() / g.wk;
    // D_i = dO_i · O_i, per row and head
    let d: Vec<f32> = (0..nq * h_n)
        .into_par_iter()
        .map(|idx| dot(g.q(dout, idx / h_n, idx % h_n), g.q(out, idx / h_n, idx % h_n)))
        .collect();
    // dS_ij = P_ij (dO_i·v_j − D_i), P_ij = exp(s_ij − lse_i)
    let ds = |row: usize, h: usize, krow: usize| -> (f32, f32) {
        let sij = dot(g.q(q, row, h), g.kv(k, krow, h)) * g.scale;
        let p = (sij - lse[row * h_n + h]).exp();
        let dp = dot(g.q(dout, row, h), g.kv(v, krow, h));
        (p, p * (dp - d[row * h_n + h]))
    };

    let q_owner = row_owner(nq, layout, false);
    let mut dq = vec![0.0; q.len()];
    dq.par_chunks_mut(g.wq).zip(q_owner.par_iter()).enumerate().for_each(|(row, (dq_row, owner))| {
        let Some((sp, i)) = owner else { return };
        for h in 0..h_n {
            let dqh = &mut dq_row[h * g.hd..(h + 1) * g.hd];
            for j in 0..visible(sp, *i) {
                let (_, dsij) = ds(row, h, sp.k_start + j);
                for (a, &kk) in dqh.iter_mut().zip(g.kv(k, sp.k_start + j, h)) {
                    *a += g.scale * dsij * kk;
                }
            }
        }
    });

    let k_owner = row_owner(nk, layout, true);
    let mut dk = vec![0.0; k.len()];
    let mut dv = vec![0.0; v.len()];
    dk.par_chunks_mut(g.wk).zip(dv.par_chunks_mut(g.wk)).zip(k_owner.par_iter()).enumerate().for_each(
        |(krow, ((dk_row, dv_row), owner))| {
            let Some((sp, j)) = owner else { return };
            // queries i with visible(i) > j, i.e. i >= j − (k_len − q_len)
            let first = (j + sp.q_len).saturating_sub(sp.k_len);
            for h in 0..h_n {
                let kvh = h / g.group;
                let dkh = &mut dk_row[kvh * g.hd..(kvh + 1) * g.hd];
                let dvh = &mut dv_row[kvh * g.hd..(kvh + 1) * g.hd];
                for i in first..sp.q_len {
                    let row = sp.q_start + i;
                    let (p, dsij) = ds(row, h, krow);
                    for (a, &qq) in dkh.iter_mut().zip(g.q(q, row, h)) {
                        *a += g.scale * dsij * qq;
                    }
                    for (a, &o) in dvh.iter_mut().zip(g.q(dout, row, h)) {
                        *a += p * o;
                    }
                }
            }
        },
    );
    (dq, dk, dv)
}
