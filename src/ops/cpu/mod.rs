//! The f32 reference backend: exact, multithreaded with rayon, what CI and the golden
//! tests run. Each op family lives in its own file; this one holds the tensor type
//! and the trait impl that dispatches to them.

mod attention;
pub mod gemm;
mod loss;
mod pointwise;

use anyhow::{bail, ensure, Result};
use rayon::prelude::*;

use super::{
    AdamWParams, AttnLayout, AttnShape, ClipStats, Dropout, GradScale, HostWeight, InputGrad, LinearGradRef,
    LoraGradRef, LoraRef, LossStats, Ops,
};
use crate::model::safetensors_io::decode_f32;
use gemm::{matmul, Mat};

/// `a += b`, shapes checked.
fn add_into(a: &mut CpuTensor, b: &CpuTensor, what: &str) -> Result<()> {
    same_shape(a, b, what)?;
    a.data.par_iter_mut().zip(&b.data).for_each(|(x, y)| *x += y);
    Ok(())
}

/// `acc + t` (in that order, as `acc += t`), or `t` without `acc`.
fn added_to(acc: Option<CpuTensor>, t: CpuTensor, what: &str) -> Result<CpuTensor> {
    let Some(mut acc) = acc else { return Ok(t) };
    add_into(&mut acc, &t, what)?;
    Ok(acc)
}

/// A row-major f32 tensor in host memory.
#[derive(Clone, Debug, PartialEq)]
pub struct CpuTensor {
    pub data: Vec<f32>,
    pub shape: Vec<usize>,
}

impl CpuTensor {
    pub fn new(data: Vec<f32>, shape: &[usize]) -> Self {
        debug_assert_eq!(data.len(), shape.iter().product::<usize>());
        Self { data, shape: shape.to_vec() }
    }
    fn zeros(shape: &[usize]) -> Self {
        Self::new(vec![0.0; shape.iter().product()], shape)
    }
    /// Rows and the width of the last axis.
    pub fn rows_cols(&self) -> (usize, usize) {
        let cols = self.shape.last().copied().unwrap_or(1);
        let rows = self.data.len().checked_div(cols).unwrap_or(0);
        (rows, cols)
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct CpuOps;

/// The low-rank path's input: `x`, or `x` with the dropout mask applied.
fn dropped(x: &[f32], dropout: Option<Dropout>) -> std::borrow::Cow<'_, [f32]> {
    match dropout {
        None => std::borrow::Cow::Borrowed(x),
        Some(d) => x.par_iter().enumerate().map(|(i, &v)| v * d.factor(i as u64)).collect::<Vec<_>>().into(),
    }
}

fn same_shape(a: &CpuTensor, b: &CpuTensor, what: &str) -> Result<()> {
    ensure!(a.shape == b.shape, "{what}: shapes {:?} and {:?} differ", a.shape, b.shape);
    Ok(())
}

impl Ops for CpuOps {
    type Tensor = CpuTensor;
    type Ids = Vec<u32>;
    type LossSums = LossStats;
    type GradClip = ClipStats;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn upload(&self, data: &[f32], shape: &[usize]) -> Result<CpuTensor> {
        ensure!(
            data.len() == shape.iter().product::<usize>(),
            "upload: {} values for shape {shape:?}",
            data.len()
        );
        Ok(CpuTensor::new(data.to_vec(), shape))
    }

    fn upload_weight(&self, w: &HostWeight) -> Result<CpuTensor> {
        Ok(CpuTensor::new(decode_f32(w)?, &w.shape))
    }

    fn upload_ids(&self, ids: &[u32]) -> Result<Vec<u32>> {
        Ok(ids.to_vec())
    }

    fn download(&self, t: &CpuTensor) -> Result<Vec<f32>> {
        Ok(t.data.clone())
    }

    fn shape<'a>(&self, t: &'a CpuTensor) -> &'a [usize] {
        &t.shape
    }

    fn zeros(&self, shape: &[usize]) -> Result<CpuTensor> {
        Ok(CpuTensor::zeros(shape))
    }

    fn fill_zero(&self, t: &mut CpuTensor) -> Result<()> {
        t.data.fill(0.0);
        Ok(())
    }

    fn copy_rows(
        &self,
        dst: &mut CpuTensor,
        dst_row: usize,
        src: &CpuTensor,
        src_row: usize,
        n: usize,
    ) -> Result<()> {
        let (dr, dc) = dst.rows_cols();
        let (sr, sc) = src.rows_cols();
        ensure!(dc == sc, "copy_rows: widths {dc} and {sc} differ");
        ensure!(dst_row + n <= dr && src_row + n <= sr, "copy_rows: rows out of range");
        dst.data[dst_row * dc..(dst_row + n) * dc]
            .copy_from_slice(&src.data[src_row * sc..(src_row + n) * sc]);
        Ok(())
    }

    fn gather_rows(&self, x: &CpuTensor, rows: &[usize]) -> Result<CpuTensor> {
        let (n, d) = x.rows_cols();
        let mut out = Vec::with_capacity(rows.len() * d);
        for &r in rows {
            ensure!(r < n, "gather_rows: row {r} of {n}");
            out.extend_from_slice(&x.data[r * d..(r + 1) * d]);
        }
        Ok(CpuTensor::new(out, &[rows.len(), d]))
    }

    fn add_assign(&self, a: &mut CpuTensor, b: &CpuTensor) -> Result<()> {
        add_into(a, b, "add")
    }

    fn embedding_fwd(&self, table: &CpuTensor, ids: &Vec<u32>) -> Result<CpuTensor> {
        let (v, d) = table.rows_cols();
        let mut out = vec![0.0; ids.len() * d];
        for (row, &id) in out.chunks_mut(d).zip(ids) {
            let id = id as usize;
            ensure!(id < v, "token id {id} is outside the vocabulary (size {v})");
            row.copy_from_slice(&table.data[id * d..(id + 1) * d]);
        }
        Ok(CpuTensor::new(out, &[ids.len(), d]))
    }

    fn embedding_bwd(&self, dy: &CpuTensor, ids: &Vec<u32>, dtable: &mut CpuTensor) -> Result<()> {
        let (v, d) = dtable.rows_cols();
        for (row, &id) in dy.data.chunks(d).zip(ids) {
            let id = id as usize;
            ensure!(id < v, "token id {id} is outside the vocabulary (size {v})");
            for (g, x) in dtable.data[id * d..(id + 1) * d].iter_mut().zip(row) {
                *g += x;
            }
        }
        Ok(())
    }

    fn rmsnorm_fwd(
        &self,
        x: &CpuTensor,
        w: &CpuTensor,
        eps: f32,
        _tail: usize,
    ) -> Result<(CpuTensor, CpuTensor)> {
        let (n, d) = x.rows_cols();
        ensure!(w.data.len() == d, "rmsnorm: weight of {} for width {d}", w.data.len());
        let (y, rstd) = pointwise::rmsnorm_fwd(&x.data, &w.data, d, eps);
        Ok((CpuTensor::new(y, &x.shape), CpuTensor::new(rstd, &[n])))
    }

    fn rmsnorm_bwd(
        &self,
        dy: &CpuTensor,
        x: &CpuTensor,
        w: &CpuTensor,
        rstd: &CpuTensor,
        dw: Option<&mut CpuTensor>,
        residual: Option<CpuTensor>,
        _tail: usize,
    ) -> Result<CpuTensor> {
        same_shape(dy, x, "rmsnorm_bwd")?;
        let (_, d) = x.rows_cols();
        let dx =
            pointwise::rmsnorm_bwd(&dy.data, &x.data, &w.data, &rstd.data, d, dw.map(|t| &mut t.data[..]));
        added_to(residual, CpuTensor::new(dx, &x.shape), "rmsnorm_bwd residual")
    }

    fn linear_fwd(
        &self,
        x: &CpuTensor,
        w: &CpuTensor,
        bias: Option<&CpuTensor>,
        lora: Option<LoraRef<CpuTensor>>,
        residual: Option<&CpuTensor>,
    ) -> Result<(CpuTensor, Option<CpuTensor>)> {
        let (n, inp) = x.rows_cols();
        let (out, w_in) = w.rows_cols();
        ensure!(w_in == inp, "linear: input width {inp}, weight {:?}", w.shape);
        let mut y = vec![0.0; n * out];
        matmul(&mut y, Mat::rm(&x.data, n, inp), Mat::rm_t(&w.data, inp, out), 1.0, 0.0);
        if let Some(b) = bias {
            ensure!(b.data.len() == out, "linear: bias of {} for {out} outputs", b.data.len());
            y.par_chunks_mut(out).for_each(|row| row.iter_mut().zip(&b.data).for_each(|(y, b)| *y += b));
        }
        let xa = match lora {
            None => None,
            Some(l) => {
                let r = l.rank(|t| &t.shape, inp, out)?;
                let xd = dropped(&x.data, l.dropout);
                let mut xa = vec![0.0; n * r];
                matmul(&mut xa, Mat::rm(&xd, n, inp), Mat::rm_t(&l.a.data, inp, r), 1.0, 0.0);
                matmul(&mut y, Mat::rm(&xa, n, r), Mat::rm_t(&l.b.data, r, out), l.scale, 1.0);
                Some(CpuTensor::new(xa, &[n, r]))
            }
        };
        let mut shape = x.shape.clone();
        if let Some(last) = shape.last_mut() {
            *last = out;
        }
        let mut y = CpuTensor::new(y, &shape);
        if let Some(res) = residual {
            add_into(&mut y, res, "linear residual")?;
        }
        Ok((y, xa))
    }

    fn linear_bwd(
        &self,
        dy: &CpuTensor,
        x: &CpuTensor,
        w: &CpuTensor,
        lora: Option<LoraRef<CpuTensor>>,
        xa: Option<&CpuTensor>,
        grads: Option<LoraGradRef<CpuTensor>>,
        weight_grads: Option<LinearGradRef<CpuTensor>>,
        dx_to: InputGrad<CpuTensor>,
    ) -> Result<Option<CpuTensor>> {
        let (n, inp) = x.rows_cols();
        let (out, _) = w.rows_cols();
        ensure!(dy.data.len() == n * out, "linear_bwd: dy {:?} for weight {:?}", dy.shape, w.shape);
        if let Some(g) = weight_grads {
            same_shape(g.dw, w, "linear_bwd weight gradient")?;
            // dW += dyᵀ·x  [out, in]
            matmul(&mut g.dw.data, Mat::rm_t(&dy.data, out, n), Mat::rm(&x.data, n, inp), 1.0, 1.0);
            if let Some(db) = g.db {
                ensure!(
                    db.data.len() == out,
                    "linear_bwd: bias gradient of {} for {out} outputs",
                    db.data.len()
                );
                // rows in order, so the sum has the same bits on every run (bit-exact resume)
                for row in dy.data.chunks_exact(out) {
                    db.data.iter_mut().zip(row).for_each(|(b, g)| *b += g);
                }
            }
        }
        let mut dx = if !matches!(dx_to, InputGrad::Skip) {
            let mut dx = vec![0.0; n * inp];
            matmul(&mut dx, Mat::rm(&dy.data, n, out), Mat::rm(&w.data, out, inp), 1.0, 0.0);
            Some(dx)
        } else {
            None
        };
        if let Some(l) = lora {
            let Some(xa) = xa else { bail!("linear_bwd: LoRA path without its saved x·Aᵀ") };
            let r = l.rank(|t| &t.shape, inp, out)?;
            ensure!(xa.data.len() == n * r, "linear_bwd: x·Aᵀ {:?} for [{n}, {r}]", xa.shape);
            // dxa = scale · dy·B  [n, r]
            let mut dxa = vec![0.0; n * r];
            matmul(&mut dxa, Mat::rm(&dy.data, n, out), Mat::rm(&l.b.data, out, r), l.scale, 0.0);
            if let Some(g) = grads {
                // dB += scale · dyᵀ·xa  [out, r];  dA += dxaᵀ·x  [r, in]
                matmul(&mut g.db.data, Mat::rm_t(&dy.data, out, n), Mat::rm(&xa.data, n, r), l.scale, 1.0);
                let xd = dropped(&x.data, l.dropout);
                matmul(&mut g.da.data, Mat::rm_t(&dxa, r, n), Mat::rm(&xd, n, inp), 1.0, 1.0);
            }
            if let Some(dx) = dx.as_mut() {
                match l.dropout {
                    None => matmul(dx, Mat::rm(&dxa, n, r), Mat::rm(&l.a.data, r, inp), 1.0, 1.0),
                    Some(d) => {
                        let mut dxd = vec![0.0; n * inp];
                        matmul(&mut dxd, Mat::rm(&dxa, n, r), Mat::rm(&l.a.data, r, inp), 1.0, 0.0);
                        dx.par_iter_mut()
                            .zip(&dxd)
                            .enumerate()
                            .for_each(|(i, (g, &v))| *g += v * d.factor(i as u64));
                    }
                }
            }
        }
        let dx = dx.map(|d| CpuTensor::new(d, &x.shape));
        match (dx_to, dx) {
            (InputGrad::AddTo(acc), Some(dx)) => {
                added_to(Some(acc), dx, "linear_bwd input gradient").map(Some)
            }
            (_, dx) => Ok(dx),
        }
    }

    fn rope_fwd(
        &self,
        q: &mut CpuTensor,
        k: &mut CpuTensor,
        cos: &CpuTensor,
        sin: &CpuTensor,
        head_dim: usize,
    ) -> Result<()> {
        pointwise::rope(&mut q.data, &cos.data, &sin.data, head_dim, 1.0)?;
        pointwise::rope(&mut k.data, &cos.data, &sin.data, head_dim, 1.0)
    }

    fn rope_bwd(
        &self,
        dq: &mut CpuTensor,
        dk: &mut CpuTensor,
        cos: &CpuTensor,
        sin: &CpuTensor,
        head_dim: usize,
    ) -> Result<()> {
        pointwise::rope(&mut dq.data, &cos.data, &sin.data, head_dim, -1.0)?;
        pointwise::rope(&mut dk.data, &cos.data, &sin.data, head_dim, -1.0)
    }

    fn attention_fwd(
        &self,
        q: &CpuTensor,
        k: &CpuTensor,
        v: &CpuTensor,
        shape: AttnShape,
        layout: &AttnLayout,
        _tail: usize,
    ) -> Result<(CpuTensor, CpuTensor)> {
        super::check_attention(&q.shape, &k.shape, &v.shape, shape, layout)?;
        let (nq, _) = q.rows_cols();
        let (out, lse) = attention::forward(&q.data, &k.data, &v.data, nq, shape, layout);
        Ok((CpuTensor::new(out, &q.shape), CpuTensor::new(lse, &[nq, shape.n_heads])))
    }

    fn attention_bwd(
        &self,
        dout: &CpuTensor,
        q: &CpuTensor,
        k: &CpuTensor,
        v: &CpuTensor,
        out: &CpuTensor,
        lse: &CpuTensor,
        shape: AttnShape,
        layout: &AttnLayout,
        _tail: usize,
    ) -> Result<(CpuTensor, CpuTensor, CpuTensor)> {
        super::check_attention(&q.shape, &k.shape, &v.shape, shape, layout)?;
        same_shape(dout, q, "attention_bwd")?;
        let (dq, dk, dv) =
            attention::backward(&dout.data, &q.data, &k.data, &v.data, &out.data, &lse.data, shape, layout);
        Ok((CpuTensor::new(dq, &q.shape), CpuTensor::new(dk, &k.shape), CpuTensor::new(dv, &v.shape)))
    }

    fn swiglu_fwd(&self, gate: &CpuTensor, up: &CpuTensor, _tail: usize) -> Result<CpuTensor> {
        same_shape(gate, up, "swiglu")?;
        Ok(CpuTensor::new(pointwise::swiglu_fwd(&gate.data, &up.data), &gate.shape))
    }

    fn swiglu_bwd(
        &self,
        dh: &CpuTensor,
        gate: &CpuTensor,
        up: &CpuTensor,
        _tail: usize,
    ) -> Result<(CpuTensor, CpuTensor)> {
        same_shape(dh, gate, "swiglu_bwd")?;
        let (dg, du) = pointwise::swiglu_bwd(&dh.data, &gate.data, &up.data);
        Ok((CpuTensor::new(dg, &gate.shape), CpuTensor::new(du, &up.shape)))
    }

    fn cross_entropy_into(
        &self,
        logits: &CpuTensor,
        targets: &[i64],
        grad_scale: Option<f32>,
        sums: &mut LossStats,
    ) -> Result<Option<CpuTensor>> {
        let (n, v) = logits.rows_cols();
        ensure!(targets.len() == n, "cross_entropy: {} targets for {n} rows", targets.len());
        let (stats, dlogits) = loss::cross_entropy(&logits.data, targets, v, grad_scale)?;
        sums.add(stats);
        Ok(dlogits.map(|d| CpuTensor::new(d, &logits.shape)))
    }

    fn loss_sums(&self) -> Result<LossStats> {
        Ok(LossStats::default())
    }

    fn read_loss(&self, sums: &LossStats) -> Result<LossStats> {
        Ok(*sums)
    }

    fn sum_squares(&self, ts: &[&CpuTensor]) -> Result<f64> {
        // Fixed chunks summed in order: the same bits on every run (a resumed run must
        // clip exactly as an uninterrupted one).
        let chunk_sums = |t: &CpuTensor| -> Vec<f64> {
            t.data.par_chunks(4096).map(|c| c.iter().map(|&x| (x as f64) * (x as f64)).sum()).collect()
        };
        Ok(ts.iter().flat_map(|t| chunk_sums(t)).sum())
    }

    fn grad_clip(&self, grads: &[&CpuTensor], max_norm: Option<f64>) -> Result<ClipStats> {
        Ok(ClipStats::new(self.sum_squares(grads)?.sqrt(), max_norm))
    }

    fn read_clip(&self, clip: &ClipStats) -> Result<ClipStats> {
        Ok(*clip)
    }

    fn adamw_step(
        &self,
        params: &mut [&mut CpuTensor],
        grads: &[&CpuTensor],
        m: &mut [&mut CpuTensor],
        v: &mut [&mut CpuTensor],
        step: u64,
        hp: AdamWParams,
        scale: GradScale<'_, ClipStats>,
    ) -> Result<()> {
        let n = params.len();
        ensure!(grads.len() == n && m.len() == n && v.len() == n, "adamw: tensor lists differ in length");
        ensure!(step >= 1, "adamw: steps count from 1");
        let corrections = hp.bias_corrections(step)?;
        let Some(grad_scale) = scale.on_host() else { return Ok(()) };
        for i in 0..n {
            same_shape(params[i], grads[i], "adamw")?;
            let moments = (&mut m[i].data[..], &mut v[i].data[..]);
            pointwise::adamw(&mut params[i].data, &grads[i].data, moments, hp, corrections, grad_scale);
        }
        Ok(())
    }
}
