//! The CUDA backend: the kernels of `kernels/*.cu` and cuBLASLt behind the [`Ops`] trait.
//!
//! Status: f32 mode (`DType::F32`, TF32 off) implements every op and mirrors the CPU
//! backend op for op. bf16 storage of activations and base weights is not wired yet:
//! the kernels have their bf16 variants (`*_bf16`), but `CudaOps::new(_, DType::Bf16)`
//! returns an error saying so. `tests/cuda_ops.rs` checks each op against the CPU op on a
//! GPU; `scripts/gpu-check.sh` runs it.
//!
//! Synchronisation: one stream, no per-buffer events; the host waits only where it reads
//! results back (download, loss, norms, the embedding's error flag).

mod blaslt;
pub mod runtime;

use std::sync::{Mutex, MutexGuard};

use anyhow::{bail, ensure, Context, Result};
use cudarc::driver::{CudaSlice, LaunchConfig};

use super::{
    AdamWParams, AttnLayout, AttnShape, CrossEntropyOut, Dropout, HostWeight, LinearGradRef, LoraGradRef,
    LoraRef, Ops,
};
use crate::model::safetensors_io::decode_f32;
use blaslt::{BlasLt, GemmDtype, GemmShape};
use runtime::{args, grid_1d, int, Runtime, BLOCK};

pub use runtime::{probe_libraries, probe_nccl};

/// How the CUDA backend stores activations and base weights. LoRA weights, their
/// gradients and AdamW states are f32 in both.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DType {
    /// Everything f32, TF32 off: the CPU backend's numbers (parity at 1e-4).
    #[default]
    F32,
    /// bf16 activations and base weights, f32 accumulation (the fast mode).
    Bf16,
}

impl std::str::FromStr for DType {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(DType::F32),
            "bf16" => Ok(DType::Bf16),
            _ => bail!("unknown dtype {s:?}: expected f32 or bf16"),
        }
    }
}

/// A row-major f32 tensor in device memory. The buffer holds at least one element so
/// that empty tensors need no special case in cudarc; `shape` says how many count.
pub struct CudaTensor {
    pub buf: CudaSlice<f32>,
    pub shape: Vec<usize>,
}

impl CudaTensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// Rows and the width of the last axis, as `CpuTensor::rows_cols`.
    pub fn rows_cols(&self) -> (usize, usize) {
        let cols = self.shape.last().copied().unwrap_or(1);
        (self.numel().checked_div(cols).unwrap_or(0), cols)
    }
}

/// Token ids on the device, with the host copy the launchers check them against.
pub struct CudaIds {
    pub buf: CudaSlice<u32>,
    pub host: Vec<u32>,
}

pub struct CudaOps {
    rt: Runtime,
    blas: Mutex<BlasLt>,
    dtype: DType,
}

/// Rows of a tile of the attention kernels: warps per block (kernels/attention.cu).
const ATTN_ROWS: usize = 4;

/// PyTorch's `ignore_index`.
const IGNORE_INDEX: i64 = -100;

impl CudaOps {
    /// Opens CUDA device `ordinal`. Errors, never panics, when this build has no kernels,
    /// the driver or cuBLASLt cannot be loaded, or there is no such device.
    pub fn new(ordinal: usize, dtype: DType) -> Result<Self> {
        let rt = Runtime::new(ordinal)?;
        if dtype == DType::Bf16 {
            bail!(
                "the CUDA backend's bf16 mode is not implemented yet (its kernels are built, the \
                 launchers are f32-only); use --dtype f32"
            );
        }
        let blas = BlasLt::new(rt.stream.clone())?;
        Ok(Self { rt, blas: Mutex::new(blas), dtype })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The context, stream and kernels (for the NCCL collective, which runs on the
    /// same stream).
    pub fn runtime(&self) -> &Runtime {
        &self.rt
    }

    /// The GPU's name, for reports.
    pub fn device_name(&self) -> String {
        self.rt.ctx.name().unwrap_or_else(|_| "unknown CUDA device".into())
    }

    fn blas(&self) -> MutexGuard<'_, BlasLt> {
        self.blas.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An uninitialised tensor (every launcher that uses one writes all of it).
    fn alloc(&self, shape: &[usize]) -> Result<CudaTensor> {
        let n = shape.iter().product::<usize>().max(1);
        // SAFETY: f32 has no invalid bit patterns; callers overwrite it before reading.
        let buf = unsafe { self.rt.stream.alloc::<f32>(n) }.context("CUDA allocation")?;
        Ok(CudaTensor { buf, shape: shape.to_vec() })
    }

    fn alloc_zeros(&self, shape: &[usize]) -> Result<CudaTensor> {
        let n = shape.iter().product::<usize>().max(1);
        let buf = self.rt.stream.alloc_zeros::<f32>(n).context("CUDA allocation")?;
        Ok(CudaTensor { buf, shape: shape.to_vec() })
    }

    fn upload_i32(&self, v: &[i32]) -> Result<CudaSlice<i32>> {
        if v.is_empty() {
            return self.rt.stream.alloc_zeros::<i32>(1).context("CUDA allocation");
        }
        self.rt.stream.clone_htod(v).context("host-to-device copy")
    }

    fn ptr(&self, t: &CudaTensor) -> u64 {
        self.rt.ptr(&t.buf)
    }

    /// Fills a tensor with a value (NaN poisoning in tests, -inf log-sum-exp rows).
    pub fn fill(&self, t: &mut CudaTensor, v: f32) -> Result<()> {
        let n = t.numel();
        self.rt.launch("fill_f32", grid_1d(n), args![self.ptr(t), n as u64, v])
    }

    /// `c = alpha·op(a)·op(b) + beta·c` (see [`GemmShape`]), sizes checked.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        c: &CudaTensor,
        a: &CudaTensor,
        trans_a: bool,
        b: &CudaTensor,
        trans_b: bool,
        (m, n, k): (usize, usize, usize),
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        ensure!(
            c.numel() == m * n && a.numel() == m * k && b.numel() == k * n,
            "matmul [{m}, {k}]·[{k}, {n}]: operands {:?} {:?} -> {:?}",
            a.shape,
            b.shape,
            c.shape
        );
        if k == 0 {
            // no product: C = beta·C
            let n_c = m * n;
            return self.rt.launch("scale_f32", grid_1d(n_c), args![self.ptr(c), n_c as u64, beta]);
        }
        let s = GemmShape { m, n, k, trans_a, trans_b, dtype: GemmDtype::F32 };
        self.blas().matmul(s, self.ptr(c), self.ptr(a), self.ptr(b), alpha, beta)
    }

    fn dropout(&self, x: &CudaTensor, d: Dropout) -> Result<CudaTensor> {
        let n = x.numel();
        let out = self.alloc(&x.shape)?;
        self.rt.launch(
            "lora_dropout_fwd_f32",
            grid_1d(n),
            args![self.ptr(&out), self.ptr(x), n as u64, d.p, d.seed],
        )?;
        Ok(out)
    }

    /// The (span, first row) tiles of one side of an attention layout.
    fn attn_tiles(&self, layout: &AttnLayout, keys: bool) -> Result<(CudaSlice<i32>, CudaSlice<i32>, u32)> {
        let mut spans = Vec::with_capacity(layout.seqs.len() * 4);
        let mut tiles = Vec::new();
        for (i, sp) in layout.seqs.iter().enumerate() {
            for v in [sp.q_start, sp.q_len, sp.k_start, sp.k_len] {
                spans.push(int(v, "attention span bound")?);
            }
            let len = if keys { sp.k_len } else { sp.q_len };
            for r0 in (0..len).step_by(ATTN_ROWS) {
                tiles.push(int(i, "sequence index")?);
                tiles.push(int(r0, "row")?);
            }
        }
        let n_tiles = u32::try_from(tiles.len() / 2).context("too many attention tiles")?;
        Ok((self.upload_i32(&spans)?, self.upload_i32(&tiles)?, n_tiles))
    }

    fn attn_check(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        s: AttnShape,
        layout: &AttnLayout,
    ) -> Result<()> {
        ensure!(
            s.head_dim > 0 && s.head_dim <= 256,
            "attention: head_dim {} (the CUDA kernels take 1..=256)",
            s.head_dim
        );
        super::check_attention(&q.shape, &k.shape, &v.shape, s, layout)
    }

    /// (kernel suffix, rows of the streamed tile) for a head width.
    fn attn_variant(hd: usize) -> (&'static str, usize) {
        if hd <= 128 {
            ("bc32", 32)
        } else {
            ("bc16", 16)
        }
    }
}

fn same_shape(a: &CudaTensor, b: &CudaTensor, what: &str) -> Result<()> {
    ensure!(a.shape == b.shape, "{what}: shapes {:?} and {:?} differ", a.shape, b.shape);
    Ok(())
}

fn attn_cfg(tiles: u32, heads: usize, smem_floats: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (tiles, heads as u32, 1),
        block_dim: ((ATTN_ROWS * 32) as u32, 1, 1),
        shared_mem_bytes: (smem_floats * 4) as u32,
    }
}

impl Ops for CudaOps {
    type Tensor = CudaTensor;
    type Ids = CudaIds;

    fn name(&self) -> &'static str {
        match self.dtype {
            DType::F32 => "cuda-f32",
            DType::Bf16 => "cuda-bf16",
        }
    }

    fn upload(&self, data: &[f32], shape: &[usize]) -> Result<CudaTensor> {
        ensure!(
            data.len() == shape.iter().product::<usize>(),
            "upload: {} values for shape {shape:?}",
            data.len()
        );
        if data.is_empty() {
            return self.alloc_zeros(shape);
        }
        let buf = self.rt.stream.clone_htod(data).context("host-to-device copy")?;
        Ok(CudaTensor { buf, shape: shape.to_vec() })
    }

    fn upload_weight(&self, w: &HostWeight) -> Result<CudaTensor> {
        self.upload(&decode_f32(w)?, &w.shape)
    }

    fn upload_ids(&self, ids: &[u32]) -> Result<CudaIds> {
        let buf = if ids.is_empty() {
            self.rt.stream.alloc_zeros::<u32>(1)
        } else {
            self.rt.stream.clone_htod(ids)
        }
        .context("host-to-device copy")?;
        Ok(CudaIds { buf, host: ids.to_vec() })
    }

    fn download(&self, t: &CudaTensor) -> Result<Vec<f32>> {
        let mut v = self.rt.stream.clone_dtoh(&t.buf).context("device-to-host copy")?;
        v.truncate(t.numel());
        Ok(v)
    }

    fn shape<'a>(&self, t: &'a CudaTensor) -> &'a [usize] {
        &t.shape
    }

    fn zeros(&self, shape: &[usize]) -> Result<CudaTensor> {
        self.alloc_zeros(shape)
    }

    fn fill_zero(&self, t: &mut CudaTensor) -> Result<()> {
        self.rt.stream.memset_zeros(&mut t.buf).context("memset")
    }

    fn copy_rows(
        &self,
        dst: &mut CudaTensor,
        dst_row: usize,
        src: &CudaTensor,
        src_row: usize,
        n: usize,
    ) -> Result<()> {
        let (dr, dc) = dst.rows_cols();
        let (sr, sc) = src.rows_cols();
        ensure!(dc == sc, "copy_rows: widths {dc} and {sc} differ");
        ensure!(dst_row + n <= dr && src_row + n <= sr, "copy_rows: rows out of range");
        if n == 0 || dc == 0 {
            return Ok(());
        }
        let from = src.buf.slice(src_row * sc..(src_row + n) * sc);
        let mut to = dst.buf.slice_mut(dst_row * dc..(dst_row + n) * dc);
        self.rt.stream.memcpy_dtod(&from, &mut to).context("device-to-device copy")
    }

    fn gather_rows(&self, x: &CudaTensor, rows: &[usize]) -> Result<CudaTensor> {
        let (n, d) = x.rows_cols();
        let mut idx = Vec::with_capacity(rows.len());
        for &r in rows {
            ensure!(r < n, "gather_rows: row {r} of {n}");
            idx.push(int(r, "row")?);
        }
        let out = self.alloc(&[rows.len(), d])?;
        let idx = self.upload_i32(&idx)?;
        self.rt.launch(
            "gather_rows_f32",
            grid_1d(rows.len() * d),
            args![self.ptr(&out), self.ptr(x), self.rt.ptr(&idx), int(rows.len(), "rows")?, int(d, "width")?],
        )?;
        Ok(out)
    }

    fn add_assign(&self, a: &mut CudaTensor, b: &CudaTensor) -> Result<()> {
        same_shape(a, b, "add")?;
        let n = a.numel();
        self.rt.launch("add_assign_f32", grid_1d(n), args![self.ptr(a), self.ptr(b), n as u64])
    }

    fn embedding_fwd(&self, table: &CudaTensor, ids: &CudaIds) -> Result<CudaTensor> {
        let (v, d) = table.rows_cols();
        for &id in &ids.host {
            ensure!((id as usize) < v, "token id {id} is outside the vocabulary (size {v})");
        }
        let n = ids.host.len();
        let out = self.alloc(&[n, d])?;
        let err = self.rt.stream.alloc_zeros::<i32>(1).context("CUDA allocation")?;
        self.rt.launch(
            "embedding_fwd_f32",
            grid_1d(n * d),
            args![
                self.ptr(&out),
                self.rt.ptr(&err),
                self.ptr(table),
                self.rt.ptr(&ids.buf),
                int(n, "tokens")?,
                int(d, "width")?,
                int(v, "vocab")?
            ],
        )?;
        let flag = self.rt.stream.clone_dtoh(&err).context("device-to-host copy")?;
        ensure!(flag[0] == 0, "embedding: the device saw a token id outside the vocabulary (size {v})");
        Ok(out)
    }

    fn embedding_bwd(&self, dy: &CudaTensor, ids: &CudaIds, dtable: &mut CudaTensor) -> Result<()> {
        let (v, d) = dtable.rows_cols();
        let n = ids.host.len();
        ensure!(dy.numel() == n * d, "embedding_bwd: dy {:?} for {n} ids of width {d}", dy.shape);
        for &id in &ids.host {
            ensure!((id as usize) < v, "token id {id} is outside the vocabulary (size {v})");
        }
        let err = self.rt.stream.alloc_zeros::<i32>(1).context("CUDA allocation")?;
        self.rt.launch(
            "embedding_bwd_f32",
            grid_1d(n * d),
            args![
                self.ptr(dtable),
                self.rt.ptr(&err),
                self.ptr(dy),
                self.rt.ptr(&ids.buf),
                int(n, "tokens")?,
                int(d, "width")?,
                int(v, "vocab")?
            ],
        )
    }

    fn rmsnorm_fwd(&self, x: &CudaTensor, w: &CudaTensor, eps: f32) -> Result<(CudaTensor, CudaTensor)> {
        let (n, d) = x.rows_cols();
        ensure!(w.numel() == d, "rmsnorm: weight of {} for width {d}", w.numel());
        let y = self.alloc(&x.shape)?;
        let rstd = self.alloc(&[n])?;
        let cfg = LaunchConfig {
            grid_dim: (n.clamp(1, 65_535) as u32, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        if n > 0 {
            self.rt.launch(
                "rmsnorm_fwd_f32",
                cfg,
                args![
                    self.ptr(&y),
                    self.ptr(&rstd),
                    self.ptr(x),
                    self.ptr(w),
                    int(n, "rows")?,
                    int(d, "width")?,
                    eps
                ],
            )?;
        }
        Ok((y, rstd))
    }

    fn rmsnorm_bwd(
        &self,
        dy: &CudaTensor,
        x: &CudaTensor,
        w: &CudaTensor,
        rstd: &CudaTensor,
        dw: Option<&mut CudaTensor>,
    ) -> Result<CudaTensor> {
        same_shape(dy, x, "rmsnorm_bwd")?;
        let (n, d) = x.rows_cols();
        ensure!(
            w.numel() == d && rstd.numel() == n,
            "rmsnorm_bwd: weight {:?}, rstd {:?}",
            w.shape,
            rstd.shape
        );
        let dx = self.alloc(&x.shape)?;
        if n == 0 {
            return Ok(dx);
        }
        let blocks = n.min(256);
        let partial = match &dw {
            Some(dw) => {
                ensure!(dw.numel() == d, "rmsnorm_bwd: dw {:?} for width {d}", dw.shape);
                Some(self.alloc(&[blocks, d])?)
            }
            None => None,
        };
        let cfg =
            LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
        let partial_ptr = partial.as_ref().map_or(0, |p| self.ptr(p));
        self.rt.launch(
            "rmsnorm_bwd_f32",
            cfg,
            args![
                self.ptr(&dx),
                partial_ptr,
                self.ptr(dy),
                self.ptr(x),
                self.ptr(w),
                self.ptr(rstd),
                int(n, "rows")?,
                int(d, "width")?
            ],
        )?;
        if let (Some(dw), Some(p)) = (dw, partial) {
            let cfg = LaunchConfig {
                grid_dim: (d.div_ceil(32) as u32, 1, 1),
                block_dim: (BLOCK, 1, 1),
                shared_mem_bytes: 0,
            };
            self.rt.launch(
                "rmsnorm_dw_reduce",
                cfg,
                args![self.ptr(dw), self.ptr(&p), int(blocks, "partials")?, int(d, "width")?],
            )?;
        }
        Ok(dx)
    }

    fn linear_fwd(
        &self,
        x: &CudaTensor,
        w: &CudaTensor,
        bias: Option<&CudaTensor>,
        lora: Option<LoraRef<CudaTensor>>,
    ) -> Result<(CudaTensor, Option<CudaTensor>)> {
        let (n, inp) = x.rows_cols();
        let (out, w_in) = w.rows_cols();
        ensure!(w_in == inp && w.shape.len() == 2, "linear: input width {inp}, weight {:?}", w.shape);
        let mut shape = x.shape.clone();
        if let Some(last) = shape.last_mut() {
            *last = out;
        }
        let y = self.alloc(&shape)?;
        self.gemm(&y, x, false, w, true, (n, out, inp), 1.0, 0.0)?;
        if let Some(b) = bias {
            ensure!(b.numel() == out, "linear: bias of {} for {out} outputs", b.numel());
            self.rt.launch(
                "add_bias_rows_f32",
                grid_1d(n * out),
                args![self.ptr(&y), self.ptr(b), int(n, "rows")?, int(out, "width")?],
            )?;
        }
        let xa = match lora {
            None => None,
            Some(l) => {
                let (r, a_in) = l.a.rows_cols();
                ensure!(
                    a_in == inp && l.b.shape == [out, r],
                    "linear: LoRA shapes {:?} {:?}",
                    l.a.shape,
                    l.b.shape
                );
                let dropped = l.dropout.map(|d| self.dropout(x, d)).transpose()?;
                let xd = dropped.as_ref().unwrap_or(x);
                let xa = self.alloc(&[n, r])?;
                self.gemm(&xa, xd, false, l.a, true, (n, r, inp), 1.0, 0.0)?;
                self.gemm(&y, &xa, false, l.b, true, (n, out, r), l.scale, 1.0)?;
                Some(xa)
            }
        };
        Ok((y, xa))
    }

    fn linear_bwd(
        &self,
        dy: &CudaTensor,
        x: &CudaTensor,
        w: &CudaTensor,
        lora: Option<LoraRef<CudaTensor>>,
        xa: Option<&CudaTensor>,
        grads: Option<LoraGradRef<CudaTensor>>,
        weight_grads: Option<LinearGradRef<CudaTensor>>,
        need_dx: bool,
    ) -> Result<Option<CudaTensor>> {
        let (n, inp) = x.rows_cols();
        let (out, w_in) = w.rows_cols();
        ensure!(w_in == inp, "linear_bwd: input width {inp}, weight {:?}", w.shape);
        ensure!(dy.numel() == n * out, "linear_bwd: dy {:?} for weight {:?}", dy.shape, w.shape);
        if let Some(g) = weight_grads {
            same_shape(g.dw, w, "linear_bwd weight gradient")?;
            // dW += dyᵀ·x  [out, in]
            self.gemm(g.dw, dy, true, x, false, (out, inp, n), 1.0, 1.0)?;
            if let Some(db) = g.db {
                ensure!(db.numel() == out, "linear_bwd: bias gradient of {} for {out} outputs", db.numel());
                let cfg = LaunchConfig {
                    grid_dim: (out.div_ceil(BLOCK as usize).max(1) as u32, 1, 1),
                    block_dim: (BLOCK, 1, 1),
                    shared_mem_bytes: 0,
                };
                self.rt.launch(
                    "col_sum_acc_f32",
                    cfg,
                    args![self.ptr(db), self.ptr(dy), int(n, "rows")?, int(out, "width")?],
                )?;
            }
        }
        let dx = if need_dx {
            let dx = self.alloc(&x.shape)?;
            self.gemm(&dx, dy, false, w, false, (n, inp, out), 1.0, 0.0)?;
            Some(dx)
        } else {
            None
        };
        if let Some(l) = lora {
            let Some(xa) = xa else { bail!("linear_bwd: LoRA path without its saved x·Aᵀ") };
            let (r, a_in) = l.a.rows_cols();
            ensure!(
                a_in == inp && l.b.shape == [out, r] && xa.numel() == n * r,
                "linear_bwd: LoRA shapes {:?} {:?}, x·Aᵀ {:?}",
                l.a.shape,
                l.b.shape,
                xa.shape
            );
            // dxa = scale · dy·B  [n, r]
            let dxa = self.alloc(&[n, r])?;
            self.gemm(&dxa, dy, false, l.b, false, (n, r, out), l.scale, 0.0)?;
            if let Some(g) = grads {
                same_shape(g.da, l.a, "linear_bwd LoRA A gradient")?;
                same_shape(g.db, l.b, "linear_bwd LoRA B gradient")?;
                // dB += scale · dyᵀ·xa  [out, r];  dA += dxaᵀ·drop(x)  [r, in]
                self.gemm(g.db, dy, true, xa, false, (out, r, n), l.scale, 1.0)?;
                let dropped = l.dropout.map(|d| self.dropout(x, d)).transpose()?;
                let xd = dropped.as_ref().unwrap_or(x);
                self.gemm(g.da, &dxa, true, xd, false, (r, inp, n), 1.0, 1.0)?;
            }
            if let Some(dx) = dx.as_ref() {
                match l.dropout {
                    None => self.gemm(dx, &dxa, false, l.a, false, (n, inp, r), 1.0, 1.0)?,
                    Some(d) => {
                        let dxd = self.alloc(&x.shape)?;
                        self.gemm(&dxd, &dxa, false, l.a, false, (n, inp, r), 1.0, 0.0)?;
                        let len = dx.numel();
                        self.rt.launch(
                            "lora_dropout_bwd_acc_f32",
                            grid_1d(len),
                            args![self.ptr(dx), self.ptr(&dxd), len as u64, d.p, d.seed],
                        )?;
                    }
                }
            }
        }
        Ok(dx)
    }

    fn rope_fwd(
        &self,
        x: &mut CudaTensor,
        cos: &CudaTensor,
        sin: &CudaTensor,
        head_dim: usize,
    ) -> Result<()> {
        self.rope(x, cos, sin, head_dim, 1.0)
    }

    fn rope_bwd(
        &self,
        dx: &mut CudaTensor,
        cos: &CudaTensor,
        sin: &CudaTensor,
        head_dim: usize,
    ) -> Result<()> {
        self.rope(dx, cos, sin, head_dim, -1.0)
    }

    fn attention_fwd(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        shape: AttnShape,
        layout: &AttnLayout,
    ) -> Result<(CudaTensor, CudaTensor)> {
        self.attn_check(q, k, v, shape, layout)?;
        let (nq, _) = q.rows_cols();
        let hd = shape.head_dim;
        let out = self.alloc_zeros(&q.shape)?;
        let mut lse = self.alloc(&[nq, shape.n_heads])?;
        self.fill(&mut lse, f32::NEG_INFINITY)?;
        let (spans, tiles, n_tiles) = self.attn_tiles(layout, false)?;
        let (suffix, bc) = Self::attn_variant(hd);
        let smem = ATTN_ROWS * hd + bc * (hd + 1) + bc * hd;
        self.rt.launch(
            &format!("attn_fwd_f32_{suffix}"),
            attn_cfg(n_tiles, shape.n_heads, smem),
            args![
                self.ptr(&out),
                self.ptr(&lse),
                self.ptr(q),
                self.ptr(k),
                self.ptr(v),
                self.rt.ptr(&spans),
                self.rt.ptr(&tiles),
                int(shape.n_heads, "heads")?,
                int(shape.n_kv_heads, "kv heads")?,
                int(hd, "head_dim")?,
                1.0 / (hd as f32).sqrt()
            ],
        )?;
        Ok((out, lse))
    }

    fn attention_bwd(
        &self,
        dout: &CudaTensor,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        out: &CudaTensor,
        lse: &CudaTensor,
        shape: AttnShape,
        layout: &AttnLayout,
    ) -> Result<(CudaTensor, CudaTensor, CudaTensor)> {
        self.attn_check(q, k, v, shape, layout)?;
        same_shape(dout, q, "attention_bwd")?;
        same_shape(out, q, "attention_bwd")?;
        let (nq, _) = q.rows_cols();
        let hd = shape.head_dim;
        ensure!(lse.numel() == nq * shape.n_heads, "attention_bwd: lse {:?}", lse.shape);
        let (h, hkv) = (int(shape.n_heads, "heads")?, int(shape.n_kv_heads, "kv heads")?);
        let scale = 1.0 / (hd as f32).sqrt();

        let d = self.alloc_zeros(&[nq, shape.n_heads])?;
        let warps = nq * shape.n_heads;
        self.rt.launch(
            "attn_bwd_dot_f32",
            grid_1d(warps * 32),
            args![self.ptr(&d), self.ptr(dout), self.ptr(out), int(nq, "rows")?, h, int(hd, "head_dim")?],
        )?;

        let dq = self.alloc_zeros(&q.shape)?;
        let dk = self.alloc_zeros(&k.shape)?;
        let dv = self.alloc_zeros(&v.shape)?;
        let (suffix, bc) = Self::attn_variant(hd);
        let (spans, q_tiles, n_q_tiles) = self.attn_tiles(layout, false)?;
        self.rt.launch(
            &format!("attn_bwd_dq_f32_{suffix}"),
            attn_cfg(n_q_tiles, shape.n_heads, 2 * ATTN_ROWS * hd + 2 * bc * (hd + 1)),
            args![
                self.ptr(&dq),
                self.ptr(dout),
                self.ptr(q),
                self.ptr(k),
                self.ptr(v),
                self.ptr(lse),
                self.ptr(&d),
                self.rt.ptr(&spans),
                self.rt.ptr(&q_tiles),
                h,
                hkv,
                int(hd, "head_dim")?,
                scale
            ],
        )?;
        let (_, k_tiles, n_k_tiles) = self.attn_tiles(layout, true)?;
        self.rt.launch(
            &format!("attn_bwd_dkdv_f32_{suffix}"),
            attn_cfg(n_k_tiles, shape.n_kv_heads, 2 * ATTN_ROWS * hd + 2 * bc * (hd + 1) + 2 * bc),
            args![
                self.ptr(&dk),
                self.ptr(&dv),
                self.ptr(dout),
                self.ptr(q),
                self.ptr(k),
                self.ptr(v),
                self.ptr(lse),
                self.ptr(&d),
                self.rt.ptr(&spans),
                self.rt.ptr(&k_tiles),
                h,
                hkv,
                int(hd, "head_dim")?,
                scale
            ],
        )?;
        Ok((dq, dk, dv))
    }

    fn swiglu_fwd(&self, gate: &CudaTensor, up: &CudaTensor) -> Result<CudaTensor> {
        same_shape(gate, up, "swiglu")?;
        let n = gate.numel();
        let h = self.alloc(&gate.shape)?;
        self.rt.launch(
            "swiglu_fwd_f32",
            grid_1d(n),
            args![self.ptr(&h), self.ptr(gate), self.ptr(up), n as u64],
        )?;
        Ok(h)
    }

    fn swiglu_bwd(
        &self,
        dh: &CudaTensor,
        gate: &CudaTensor,
        up: &CudaTensor,
    ) -> Result<(CudaTensor, CudaTensor)> {
        same_shape(dh, gate, "swiglu_bwd")?;
        same_shape(up, gate, "swiglu_bwd")?;
        let n = gate.numel();
        let dg = self.alloc(&gate.shape)?;
        let du = self.alloc(&up.shape)?;
        self.rt.launch(
            "swiglu_bwd_f32",
            grid_1d(n),
            args![self.ptr(&dg), self.ptr(&du), self.ptr(dh), self.ptr(gate), self.ptr(up), n as u64],
        )?;
        Ok((dg, du))
    }

    fn cross_entropy(
        &self,
        logits: &CudaTensor,
        targets: &[i64],
        grad_scale: Option<f32>,
    ) -> Result<CrossEntropyOut<CudaTensor>> {
        let (n, v) = logits.rows_cols();
        ensure!(targets.len() == n, "cross_entropy: {} targets for {n} rows", targets.len());
        let mut t32 = Vec::with_capacity(n);
        for (i, &t) in targets.iter().enumerate() {
            ensure!(
                t == IGNORE_INDEX || (0..v as i64).contains(&t),
                "label {t} at token {i} is outside the vocabulary (size {v}) and is not -100"
            );
            t32.push(t as i32);
        }
        let dlogits = grad_scale.map(|_| self.alloc(&logits.shape)).transpose()?;
        if n == 0 {
            return Ok(CrossEntropyOut { loss_sum: 0.0, n_counted: 0, n_correct: 0, dlogits });
        }
        let row_loss = self.alloc(&[n])?;
        // SAFETY: i32 has no invalid bit patterns; the kernel writes every row.
        let row_flag = unsafe { self.rt.stream.alloc::<i32>(n) }.context("CUDA allocation")?;
        let targets_dev = self.upload_i32(&t32)?;
        let cfg = LaunchConfig {
            grid_dim: (n.min(65_535) as u32, 1, 1),
            block_dim: (if v >= 8192 { 1024 } else { BLOCK }, 1, 1),
            shared_mem_bytes: 0,
        };
        self.rt.launch(
            "cross_entropy_f32",
            cfg,
            args![
                self.ptr(&row_loss),
                self.rt.ptr(&row_flag),
                dlogits.as_ref().map_or(0, |d| self.ptr(d)),
                self.ptr(logits),
                self.rt.ptr(&targets_dev),
                int(n, "rows")?,
                int(v, "vocab")?,
                grad_scale.unwrap_or(0.0)
            ],
        )?;
        let losses = self.download(&row_loss)?;
        let flags = self.rt.stream.clone_dtoh(&row_flag).context("device-to-host copy")?;
        let mut out = CrossEntropyOut { loss_sum: 0.0, n_counted: 0, n_correct: 0, dlogits };
        for (&l, &f) in losses.iter().zip(&flags) {
            if f > 0 {
                out.loss_sum += l as f64;
                out.n_counted += 1;
                out.n_correct += usize::from(f == 2);
            }
        }
        Ok(out)
    }

    fn sum_squares(&self, ts: &[&CudaTensor]) -> Result<f64> {
        let blocks: Vec<usize> = ts.iter().map(|t| t.numel().div_ceil(BLOCK as usize).min(1024)).collect();
        let total: usize = blocks.iter().sum();
        if total == 0 {
            return Ok(0.0);
        }
        let partial = self.rt.stream.alloc_zeros::<f64>(total).context("CUDA allocation")?;
        let base = self.rt.ptr(&partial);
        let mut offset = 0;
        for (t, &b) in ts.iter().zip(&blocks) {
            if b == 0 {
                continue;
            }
            let cfg =
                LaunchConfig { grid_dim: (b as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
            let n = t.numel();
            self.rt.launch(
                "sum_squares_partial",
                cfg,
                args![base + 8 * offset as u64, self.ptr(t), n as u64],
            )?;
            offset += b;
        }
        let partials = self.rt.stream.clone_dtoh(&partial).context("device-to-host copy")?;
        Ok(partials.iter().sum())
    }

    fn scale(&self, t: &mut CudaTensor, s: f32) -> Result<()> {
        let n = t.numel();
        self.rt.launch("scale_f32", grid_1d(n), args![self.ptr(t), n as u64, s])
    }

    fn adamw_step(
        &self,
        params: &mut [&mut CudaTensor],
        grads: &[&CudaTensor],
        m: &mut [&mut CudaTensor],
        v: &mut [&mut CudaTensor],
        step: u64,
        hp: AdamWParams,
    ) -> Result<()> {
        let n = params.len();
        ensure!(grads.len() == n && m.len() == n && v.len() == n, "adamw: tensor lists differ in length");
        ensure!(step >= 1, "adamw: steps count from 1");
        if n == 0 {
            return Ok(());
        }
        ensure!(n <= 65_535, "adamw: {n} tensors in one launch (at most 65535)");
        let mut desc = Vec::with_capacity(n * 5);
        let mut max_len = 0;
        for i in 0..n {
            same_shape(params[i], grads[i], "adamw")?;
            same_shape(params[i], m[i], "adamw first moment")?;
            same_shape(params[i], v[i], "adamw second moment")?;
            let len = params[i].numel();
            max_len = max_len.max(len);
            desc.extend([
                self.ptr(params[i]),
                self.ptr(grads[i]),
                self.ptr(m[i]),
                self.ptr(v[i]),
                len as u64,
            ]);
        }
        let desc = self.rt.stream.clone_htod(&desc).context("host-to-device copy")?;
        let step_i = i32::try_from(step).context("adamw: step count too large")?;
        let bc1 = 1.0 - (hp.beta1 as f64).powi(step_i);
        let bc2 = 1.0 - (hp.beta2 as f64).powi(step_i);
        let step_size = (hp.lr as f64 / bc1) as f32;
        let bc2_sqrt = bc2.sqrt() as f32;
        let cfg = LaunchConfig {
            grid_dim: (max_len.div_ceil(BLOCK as usize).clamp(1, 1024) as u32, n as u32, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        self.rt.launch(
            "adamw_multi",
            cfg,
            args![
                self.rt.ptr(&desc),
                int(n, "tensors")?,
                hp.lr,
                hp.beta1,
                hp.beta2,
                hp.eps,
                hp.weight_decay,
                step_size,
                bc2_sqrt
            ],
        )
    }
}

impl CudaOps {
    fn rope(
        &self,
        x: &mut CudaTensor,
        cos: &CudaTensor,
        sin: &CudaTensor,
        head_dim: usize,
        sign: f32,
    ) -> Result<()> {
        let half = head_dim / 2;
        ensure!(head_dim % 2 == 0 && half > 0, "rope: head_dim {head_dim} must be even");
        let rows = cos.numel() / half;
        ensure!(
            cos.shape == sin.shape && rows > 0 && cos.numel() == rows * half,
            "rope: cos/sin tables differ"
        );
        ensure!(
            x.numel() % (rows * head_dim) == 0,
            "rope: {} values for {rows} rows of {head_dim}-wide heads",
            x.numel()
        );
        let heads = x.numel() / (rows * head_dim);
        self.rt.launch(
            "rope_f32",
            grid_1d(rows * heads * half),
            args![
                self.ptr(x),
                self.ptr(cos),
                self.ptr(sin),
                int(rows, "rows")?,
                int(heads, "heads")?,
                int(head_dim, "head_dim")?,
                sign
            ],
        )
    }
}
