//! The CUDA backend: the kernels of `kernels/*.cu` and cuBLASLt behind the [`Ops`] trait.
//!
//! Two modes ([`DType`]):
//! - **f32** (TF32 off) mirrors the CPU backend op for op: the exact-parity mode.
//! - **bf16**: base weights (from `upload_weight`, converted from f32/f16 checkpoints on
//!   upload) and activations are bf16 on the device, every kernel accumulates in f32, the
//!   matmuls are cuBLASLt bf16 GEMMs with f32 compute (Qwen2's bias fused as the `BIAS`
//!   epilogue). LoRA A/B, their gradients and AdamW's moments stay f32: the LoRA path
//!   casts A and B to bf16 for its GEMMs and accumulates the gradients into the f32
//!   tensors (bf16 operands, f32 C). `download` returns f32 and `upload` takes f32 in
//!   both. Which tensor has which type: see [`tensor`]. Full fine-tuning is refused in
//!   this mode (the weight-gradient ops and AdamW say so): the base weights are bf16 and
//!   would need f32 master copies, which this backend does not keep.
//!
//! What is verified: nothing here has run on a GPU yet, in either mode. Checked without
//! one: the kernels compile (build.rs with the pinned nvcc), every kernel name a launcher
//! forms exists in the fatbin's list, checkpoint bytes convert to bf16 with
//! round-to-nearest-even, and on the CUDA emulator (tests/emu: the kernels, launchers and
//! library calls run on the CPU) every op matches the CPU op in both modes
//! (`tests/cuda_ops.rs`: 1e-5 in f32, 1e-2 relative L2 in bf16) and the golden cases
//! pass `parity` in both. `scripts/gpu-check.sh` runs those tests, compute-sanitizer and
//! `tuneloop parity --backend cuda` on a GPU machine; until it has, what only a GPU shows
//! (real mma/ldmatrix/cp.async hardware, cuBLASLt's own algorithms, timing, races the
//! emulator's schedule does not produce) is unverified.
//!
//! Memory: base weights, LoRA tensors and optimizer states are allocations of their own
//! from the stream-ordered pool; a training or validation step's activations go in the
//! activation arena ([`arena`]), laid out from the steps' own records.
//!
//! Synchronisation: one compute stream, no per-buffer events (data parallelism's NCCL
//! stream orders itself against it with explicit events, `dist::nccl`); the host waits
//! only where it reads results back (download, the loss sums, norms): a training
//! micro-step queues its chunks' losses into sums on the device and never waits
//! (`Ops::host_waits` counts the waits).

pub mod arena;
mod blaslt;
pub mod runtime;
pub mod tensor;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use anyhow::{bail, ensure, Context, Result};
use cudarc::driver::{CudaSlice, LaunchConfig};

use super::{
    AdamWParams, ArenaStats, AttnLayout, AttnShape, ClipStats, Dropout, GradScale, HostWeight, InputGrad,
    LinearGradRef, LoraGradRef, LoraRef, LossStats, Ops,
};
use crate::model::safetensors_io::decode_f32;
use blaslt::{BlasLt, GemmDtype, GemmShape};
use runtime::{args, grid_1d, int, Pattern, Runtime, BLOCK};

use arena::{Arena, Placement};
pub use runtime::{probe_libraries, probe_nccl};
use tensor::{host_bf16, Operand};
pub use tensor::{CudaBuf, CudaTensor, DType};

/// Threads of `loss_sums_add`'s one block (kernels/cross_entropy.cu).
const LOSS_SUMS_BLOCK: u32 = 256;

/// Threads of `clip_norm`'s one block (kernels/adamw.cu).
const CLIP_NORM_BLOCK: u32 = 256;

/// The loss sums on the device ([`Ops::cross_entropy_into`]): the loss sum, the counted
/// and the correct tokens, in f64.
pub struct LossSums(CudaSlice<f64>);

/// The gradients' norm on the device ([`Ops::grad_clip`]): Σ g², the norm and the clip's
/// coefficient, in f64 (`clip_norm` in kernels/adamw.cu).
pub struct GradClip(CudaSlice<f64>);

/// Token ids on the device, with the host copy the launchers check them against.
pub struct CudaIds {
    pub buf: CudaSlice<u32>,
    pub host: Vec<u32>,
}

pub struct CudaOps {
    rt: Runtime,
    blas: Mutex<BlasLt>,
    /// The activation type: what `upload_weight` and the ops' outputs are stored in.
    dtype: DType,
    /// Where a planned step's buffers go ([`Ops::planned`]).
    arena: Arena,
    /// Whether the bf16 attention (head_dim 64 and 128) runs on wgmma (`attn_*_wgmma_*`,
    /// sm_90 only) instead of mma.sync: off unless `TUNELOOP_WGMMA=1` or
    /// [`CudaOps::set_wgmma`].
    wgmma: AtomicBool,
    /// Whether the GPU has wgmma (compute capability 9.x: Hopper).
    has_wgmma: bool,
}

/// Rows of a tile of the attention kernels: warps per block (kernels/attention.cu).
const ATTN_ROWS: usize = 4;

/// Rows of the tiles the tensor-core attention kernels stream through shared memory
/// (`MMA_TILE`).
const ATTN_MMA_KEYS: usize = 64;

/// PyTorch's `ignore_index`.
const IGNORE_INDEX: i64 = -100;

impl CudaOps {
    /// Opens CUDA device `ordinal`. Errors, never panics, when this build has no kernels,
    /// the driver or cuBLASLt cannot be loaded, or there is no such device.
    pub fn new(ordinal: usize, dtype: DType) -> Result<Self> {
        let rt = Runtime::new(ordinal)?;
        let blas = BlasLt::new(rt.stream.clone())?;
        let major = rt
            .ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
            .context("reading the GPU's compute capability")?;
        let has_wgmma = major == 9;
        let asked = std::env::var("TUNELOOP_WGMMA").is_ok_and(|v| v == "1");
        if asked && !has_wgmma {
            tracing::warn!(
                "TUNELOOP_WGMMA=1 ignored: wgmma needs a compute capability 9.x GPU (Hopper), this one is {major}.x"
            );
        }
        let wgmma = AtomicBool::new(asked && has_wgmma);
        Ok(Self { rt, blas: Mutex::new(blas), dtype, arena: Arena::from_env(), wgmma, has_wgmma })
    }

    /// Runs the bf16 attention at head_dim 64 and 128 on wgmma (`on`) or on mma.sync;
    /// returns whether it now runs on wgmma (never on a GPU without it).
    pub fn set_wgmma(&self, on: bool) -> bool {
        self.wgmma.store(on && self.has_wgmma, Ordering::Relaxed);
        self.wgmma.load(Ordering::Relaxed)
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

    /// An uninitialised tensor of the activation type (every launcher that uses one
    /// writes all of it).
    fn alloc(&self, shape: &[usize]) -> Result<CudaTensor> {
        self.alloc_as(shape, self.dtype)
    }

    /// An uninitialised tensor of type `dtype`.
    fn alloc_as(&self, shape: &[usize], dtype: DType) -> Result<CudaTensor> {
        let buf = self.buffer(shape.iter().product::<usize>().max(1), dtype)?;
        Ok(CudaTensor::new(buf, shape.to_vec()))
    }

    /// An uninitialised buffer of `n` elements: in the arena's region when a planned step
    /// has a place for it, else from the pool.
    fn buffer(&self, n: usize, dtype: DType) -> Result<CudaBuf> {
        let bytes = n * dtype.size();
        match self.arena.place(bytes as u64) {
            Placement::Region { ptr, tie } => {
                if self.arena.poison {
                    self.rt.memset(ptr, Pattern::U8(0xff), bytes)?;
                }
                Ok(CudaBuf::region(ptr, n, dtype, tie))
            }
            Placement::Pool { tie } => {
                // SAFETY: u8 has no invalid bit patterns; callers overwrite the buffer
                // before reading it.
                let slice = unsafe { self.rt.stream.alloc::<u8>(bytes) }.context("CUDA allocation")?;
                let ptr = self.rt.ptr(&slice);
                Ok(CudaBuf::pool(slice, ptr, n, dtype, tie))
            }
        }
    }

    /// An uninitialised tensor of type `dtype` whose rows have `tail` elements of room
    /// after them.
    fn alloc_with_tail(&self, shape: &[usize], tail: usize, dtype: DType) -> Result<CudaTensor> {
        if tail == 0 {
            return self.alloc_as(shape, dtype);
        }
        let (rows, cols) = crate::ops::rows_cols(shape);
        let mut t = self.alloc_as(&[rows, cols + tail], dtype)?;
        t.shape = shape.to_vec();
        t.tail = tail;
        Ok(t)
    }

    /// A zeroed activation tensor with `tail` elements of room after each row.
    fn alloc_zeros_with_tail(&self, shape: &[usize], tail: usize) -> Result<CudaTensor> {
        let mut t = self.alloc_with_tail(shape, tail, self.dtype)?;
        self.fill_zero(&mut t)?;
        Ok(t)
    }

    /// The SwiGLU backward's kernel: (dgate, dup) with `tail` elements of room after
    /// their rows, and with `want_h` h = silu(gate)·up (dense) from the same pass.
    fn swiglu_backward(
        &self,
        dh: &CudaTensor,
        gate: &CudaTensor,
        up: &CudaTensor,
        tail: usize,
        want_h: bool,
    ) -> Result<(CudaTensor, CudaTensor, Option<CudaTensor>)> {
        same_shape(dh, gate, "swiglu_bwd")?;
        same_shape(up, gate, "swiglu_bwd")?;
        let (dh, gate, up) = (self.act(dh)?, self.act(gate)?, self.act(up)?);
        let n = gate.numel();
        let dg = self.alloc_with_tail(&gate.shape, room(tail), self.dtype)?;
        let du = self.alloc_with_tail(&up.shape, room(tail), self.dtype)?;
        let h = want_h.then(|| self.alloc(&gate.shape)).transpose()?;
        let width = dg.rows_cols().1.max(1);
        self.rt.launch(
            &self.kernel("swiglu_bwd"),
            grid_1d(n.div_ceil(8)), // 8 values a thread (kernels/swiglu.cu)
            args![
                self.base_ptr(&dg),
                self.base_ptr(&du),
                h.as_ref().map_or(0, |h| self.ptr(h)),
                self.ptr(&dh),
                self.ptr(&gate),
                self.ptr(&up),
                n as u64,
                int(width, "width")?,
                int(dg.ld().max(1), "row stride")?
            ],
        )?;
        Ok((dg, du, h))
    }

    /// An attention output (or input gradient) of the activation type with `tail`
    /// elements of room after each row: zeroed unless `written`, when the kernel writes
    /// every row itself (`AttnLayout::covers_rows`; the room is the LoRA path's).
    fn alloc_attn_out(&self, shape: &[usize], tail: usize, written: bool) -> Result<CudaTensor> {
        if written {
            self.alloc_with_tail(shape, tail, self.dtype)
        } else {
            self.alloc_zeros_with_tail(shape, tail)
        }
    }

    /// A zeroed tensor of type `dtype` (zeroed by `fill_zero`, as every activation is).
    fn alloc_zeros_as(&self, shape: &[usize], dtype: DType) -> Result<CudaTensor> {
        let mut t = self.alloc_as(shape, dtype)?;
        self.fill_zero(&mut t)?;
        Ok(t)
    }

    fn upload_i32(&self, v: &[i32]) -> Result<CudaSlice<i32>> {
        if v.is_empty() {
            return self.rt.stream.alloc_zeros::<i32>(1).context("CUDA allocation");
        }
        self.rt.stream.clone_htod(v).context("host-to-device copy")
    }

    /// The device address of a dense tensor's first element: every launcher that reads or
    /// writes a tensor as `numel` consecutive elements. A tensor with room after its rows
    /// reaches those only as a dense copy ([`CudaOps::dense`]); this asserts it.
    fn ptr(&self, t: &CudaTensor) -> u64 {
        assert!(t.is_dense(), "a tensor with room ({:?} + {} columns) read as dense", t.shape, t.tail);
        self.base_ptr(t)
    }

    /// The device address of a tensor's first element, whatever its row stride.
    fn base_ptr(&self, t: &CudaTensor) -> u64 {
        t.buf.ptr()
    }

    /// `t` without room after its rows: itself, or a dense copy.
    fn dense<'a>(&self, t: &'a CudaTensor) -> Result<Operand<'a>> {
        if t.is_dense() {
            return Ok(Operand::Borrowed(t));
        }
        let (rows, cols) = t.rows_cols();
        let out = self.alloc_as(&t.shape, t.dtype())?;
        self.copy_2d(&out, cols, t, t.ld(), rows, cols)?;
        Ok(Operand::Converted(out))
    }

    /// `dst[r, c] = src[r, c]` for the first `cols` columns of `rows` rows, rows `ld_dst`
    /// and `ld_src` elements apart (one type).
    fn copy_2d(
        &self,
        dst: &CudaTensor,
        ld_dst: usize,
        src: &CudaTensor,
        ld_src: usize,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        ensure!(src.dtype() == dst.dtype(), "copy_2d: {:?} into {:?}", src.dtype(), dst.dtype());
        if rows * cols == 0 {
            return Ok(());
        }
        self.rt.launch(
            &format!("copy_2d_{}", src.dtype().suffix()),
            grid_1d(rows * cols),
            args![
                self.base_ptr(dst),
                int(ld_dst, "row stride")?,
                self.base_ptr(src),
                int(ld_src, "row stride")?,
                int(rows, "rows")?,
                int(cols, "width")?
            ],
        )
    }

    /// `t` as a dense tensor of type `to`: itself, or a converted copy (one cast kernel).
    fn to_type<'a>(&self, t: &'a CudaTensor, to: DType) -> Result<Operand<'a>> {
        let t = self.dense(t)?;
        if t.dtype() == to {
            return Ok(t);
        }
        let out = self.alloc_as(&t.shape, to)?;
        let n = t.numel();
        let kernel = format!("cast_{}_to_{}", t.dtype().suffix(), to.suffix());
        self.rt.launch(&kernel, grid_1d(n), args![self.ptr(&out), self.ptr(&t), n as u64])?;
        Ok(Operand::Converted(out))
    }

    /// `t` as a dense tensor of the activation type (what the kernels of this mode read).
    fn act<'a>(&self, t: &'a CudaTensor) -> Result<Operand<'a>> {
        self.to_type(t, self.dtype)
    }

    /// `t` in the activation type for a GEMM, which reads rows with room after them as
    /// they are: itself when it has that type, else a converted dense copy.
    fn act_ld<'a>(&self, t: &'a CudaTensor) -> Result<Operand<'a>> {
        if t.dtype() == self.dtype {
            return Ok(Operand::Borrowed(t));
        }
        self.act(t)
    }

    /// The kernel `base` for the activation type: `rope` -> `rope_bf16` in the bf16 mode.
    fn kernel(&self, base: &str) -> String {
        format!("{base}_{}", self.dtype.suffix())
    }

    /// Fills a tensor with a value (NaN poisoning in tests, -inf log-sum-exp rows): a
    /// memset of its words. An f32 tensor gets the bits of `v` unchanged; a bf16 one gets
    /// `v` rounded (to nearest even; a NaN stays a NaN).
    pub fn fill(&self, t: &mut CudaTensor, v: f32) -> Result<()> {
        let word = match t.dtype() {
            DType::F32 => Pattern::U32(v.to_bits()),
            DType::Bf16 => Pattern::U16(half::bf16::from_f32(v).to_bits()),
        };
        self.rt.memset(self.ptr(t), word, t.numel())
    }

    /// `c = alpha·op(a)·op(b) + beta·c` (see [`GemmShape`]), sizes and types checked: a
    /// and b of one type, c of theirs or (for bf16 operands) f32.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        c: &CudaTensor,
        a: &CudaTensor,
        trans_a: bool,
        b: &CudaTensor,
        trans_b: bool,
        mnk: (usize, usize, usize),
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        self.gemm_full(c, None, a, trans_a, b, trans_b, mnk, alpha, beta, None)
    }

    /// [`CudaOps::gemm`] into `d` (a different tensor from `c` when `c_in` is given: `d =
    /// alpha·op(a)·op(b) + beta·c_in`), with an optional bias of `n` elements of d's type
    /// added to every row (cuBLASLt's epilogue; with `beta = 0` only).
    #[allow(clippy::too_many_arguments)]
    fn gemm_full(
        &self,
        c: &CudaTensor,
        c_in: Option<&CudaTensor>,
        a: &CudaTensor,
        trans_a: bool,
        b: &CudaTensor,
        trans_b: bool,
        mnk: (usize, usize, usize),
        alpha: f32,
        beta: f32,
        bias: Option<&CudaTensor>,
    ) -> Result<()> {
        self.gemm_in(&mut self.blas(), c, c_in, a, trans_a, b, trans_b, mnk, alpha, beta, bias)
    }

    /// [`CudaOps::gemm_full`] through a cuBLASLt handle the caller holds (to enqueue
    /// other work between products that no other thread may interleave with). An `a` or
    /// `b` with room after its rows is read in place, its rows `ld` apart, and its stored
    /// rows may reach into the room (the LoRA path's extended K).
    #[allow(clippy::too_many_arguments)]
    fn gemm_in(
        &self,
        blas: &mut BlasLt,
        c: &CudaTensor,
        c_in: Option<&CudaTensor>,
        a: &CudaTensor,
        trans_a: bool,
        b: &CudaTensor,
        trans_b: bool,
        (m, n, k): (usize, usize, usize),
        alpha: f32,
        beta: f32,
        bias: Option<&CudaTensor>,
    ) -> Result<()> {
        let what =
            || format!("matmul [{m}, {k}]·[{k}, {n}]: operands {:?} {:?} -> {:?}", a.shape, b.shape, c.shape);
        ensure!(c.numel() == m * n, "{}", what());
        // the stored [rows, cols] of each operand and the row stride it is read with
        let ld = |t: &CudaTensor, (rows, cols): (usize, usize)| -> Result<usize> {
            if t.is_dense() {
                ensure!(t.numel() == rows * cols, "{}", what());
                Ok(cols)
            } else {
                let fits = rows <= t.rows_cols().0 + t.extra_rows && cols <= t.ld();
                ensure!(fits, "{} (rows {} apart, {} more rows)", what(), t.ld(), t.extra_rows);
                Ok(t.ld())
            }
        };
        let lda = ld(a, if trans_a { (k, m) } else { (m, k) })?;
        let ldb = ld(b, if trans_b { (n, k) } else { (k, n) })?;
        if let Some(c_in) = c_in {
            ensure!(
                c_in.numel() == m * n && c_in.dtype() == c.dtype() && k > 0 && self.ptr(c_in) != self.ptr(c),
                "matmul [{m}, {k}]·[{k}, {n}]: addend {:?} of {:?} for {:?} of {:?}",
                c_in.shape,
                c_in.dtype(),
                c.shape,
                c.dtype()
            );
        }
        let dtype = match (a.dtype(), b.dtype(), c.dtype()) {
            (DType::F32, DType::F32, DType::F32) => GemmDtype::F32,
            (DType::Bf16, DType::Bf16, DType::Bf16) => GemmDtype::Bf16,
            (DType::Bf16, DType::Bf16, DType::F32) => GemmDtype::Bf16F32,
            (ta, tb, tc) => bail!("matmul: no GEMM for {ta:?}·{tb:?} -> {tc:?} operands"),
        };
        if let Some(bias) = bias {
            ensure!(
                beta == 0.0 && bias.numel() == n && bias.dtype() == c.dtype(),
                "matmul: bias {:?} of {:?} for {n} columns of {:?} (beta {beta})",
                bias.shape,
                bias.dtype(),
                c.dtype()
            );
        }
        if k == 0 {
            // no product: C = beta·C (+ bias)
            let n_c = m * n;
            let scale = format!("scale_{}", c.dtype().suffix());
            self.rt.launch(&scale, grid_1d(n_c), args![self.ptr(c), n_c as u64, beta])?;
            if let Some(bias) = bias {
                let add = format!("add_bias_rows_{}", c.dtype().suffix());
                self.rt.launch(
                    &add,
                    grid_1d(n_c),
                    args![self.ptr(c), self.ptr(bias), int(m, "rows")?, int(n, "width")?],
                )?;
            }
            return Ok(());
        }
        let s = GemmShape { m, n, k, trans_a, trans_b, lda, ldb, dtype, bias: bias.is_some() };
        let bias = bias.map(|t| self.ptr(t));
        let (d, c) = (self.ptr(c), c_in.map_or(self.ptr(c), |t| self.ptr(t)));
        let (a, b) = (self.base_ptr(a), self.base_ptr(b));
        let name = || format!("cuBLASLt {m}×{n}×{k}{}", if beta == 0.0 { "" } else { " + C" });
        self.rt.clocked(name, || blas.matmul(s, d, c, a, b, alpha, beta, bias))
    }

    /// A gradient that an op adds its own into (`acc += ...`): shaped like `like` and of
    /// the activation type.
    fn check_accumulator(&self, acc: &CudaTensor, like: &CudaTensor, what: &str) -> Result<()> {
        same_shape(acc, like, what)?;
        ensure!(acc.dtype() == self.dtype, "{what}: {:?} in the {:?} mode", acc.dtype(), self.dtype);
        Ok(())
    }

    /// A multi-tensor kernel's descriptors on the device (`desc`: u64 fields in the
    /// kernel's struct order, for `n` tensors) and its launch: blockIdx.y picks the
    /// tensor, blocks along x cover the longest (`max_len` elements).
    fn multi_tensor_launch(
        &self,
        kernel: &str,
        desc: &[u64],
        n: usize,
        max_len: usize,
    ) -> Result<(CudaSlice<u64>, LaunchConfig)> {
        ensure!(n <= 65_535, "{kernel}: {n} tensors in one launch (at most 65535)");
        let desc = self.rt.stream.clone_htod(desc).context("host-to-device copy")?;
        let cfg = LaunchConfig {
            grid_dim: (max_len.div_ceil(BLOCK as usize).clamp(1, 1024) as u32, n as u32, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        Ok((desc, cfg))
    }

    /// A multi-tensor kernel whose only arguments are the descriptors and their count.
    fn launch_multi(&self, kernel: &str, desc: &[u64], n: usize, max_len: usize) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let (desc, cfg) = self.multi_tensor_launch(kernel, desc, n, max_len)?;
        self.rt.launch(kernel, cfg, args![self.rt.ptr(&desc), int(n, "tensors")?])
    }

    /// `xa = drop(x)·Aᵀ` [n, r] with the dropout mask applied as x is read
    /// (kernels/lora.cu: the dropped input is never written).
    fn lora_xa_dropout(&self, xa: &CudaTensor, x: &CudaTensor, a: &CudaTensor, d: Dropout) -> Result<()> {
        let (n, inp) = x.rows_cols();
        let r = a.rows_cols().0;
        // a warp for each 4 rows
        let blocks = n.div_ceil(4 * (BLOCK as usize / 32)).clamp(1, 65_535) as u32;
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
        self.rt.launch(
            &self.kernel("lora_xa_dropout"),
            cfg,
            args![
                self.ptr(xa),
                self.base_ptr(x),
                int(x.ld().max(1), "row stride")?,
                self.ptr(a),
                int(n, "rows")?,
                int(inp, "width")?,
                int(r, "rank")?,
                d.p,
                d.seed
            ],
        )
    }

    /// `dA += dxaᵀ·drop(x)` with the mask applied as x is read: each chunk of rows' share
    /// into f32 partials, then the chunks summed in order (deterministic).
    fn lora_da_dropout(
        &self,
        da: &mut CudaTensor,
        dxa: &CudaTensor,
        x: &CudaTensor,
        d: Dropout,
    ) -> Result<()> {
        let (n, inp) = x.rows_cols();
        let r = dxa.rows_cols().1;
        ensure!(da.dtype() == DType::F32, "linear_bwd: the LoRA A gradient must be f32");
        let strips = inp.div_ceil(BLOCK as usize).max(1);
        // about two blocks an SM of an H100 in all, chunks of at least 16 rows
        let chunks = (264usize.div_ceil(strips)).clamp(1, n.div_ceil(16).max(1));
        let part = self.alloc_as(&[chunks, r * inp], DType::F32)?;
        let cfg = LaunchConfig {
            grid_dim: (int(strips, "column strips")? as u32, chunks as u32, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        self.rt.launch(
            &self.kernel("lora_da_dropout"),
            cfg,
            args![
                self.ptr(&part),
                self.ptr(dxa),
                self.base_ptr(x),
                int(x.ld().max(1), "row stride")?,
                int(n, "rows")?,
                int(inp, "width")?,
                int(r, "rank")?,
                d.p,
                d.seed
            ],
        )?;
        self.col_sum_acc(da, &part, chunks, r * inp)
    }

    /// `out[c] += Σ_rows input[row, c]` (out f32, input dense [rows, width] of f32 or
    /// bf16): 32 columns a block, its 32 warps splitting the rows, in a fixed order.
    fn col_sum_acc(&self, out: &CudaTensor, input: &CudaTensor, rows: usize, width: usize) -> Result<()> {
        let cfg = LaunchConfig {
            grid_dim: (width.div_ceil(32).max(1) as u32, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        self.rt.launch(
            &format!("col_sum_acc_{}", input.dtype().suffix()),
            cfg,
            args![self.ptr(out), self.ptr(input), int(rows, "rows")?, int(width, "width")?],
        )
    }

    /// The (span, first row) tiles of `rows` rows of one side of an attention layout,
    /// those with the most work first: under the causal mask a query tile's work grows
    /// with its row and a key tile's shrinks, and starting the long blocks first keeps
    /// the last wave of the grid short. Every block is independent, so the order changes
    /// no result.
    fn attn_tiles(
        &self,
        layout: &AttnLayout,
        keys: bool,
        rows: usize,
    ) -> Result<(CudaSlice<i32>, CudaSlice<i32>, u32)> {
        let mut spans = Vec::with_capacity(layout.seqs.len() * 4);
        // (work, span, first row)
        let mut tiles: Vec<(usize, usize, usize)> = Vec::new();
        for (i, sp) in layout.seqs.iter().enumerate() {
            for v in [sp.q_start, sp.q_len, sp.k_start, sp.k_len] {
                spans.push(int(v, "attention span bound")?);
            }
            // query i sees keys 0 ..= i + k_len - q_len
            let shift = sp.k_len as i64 - sp.q_len as i64;
            let len = if keys { sp.k_len } else { sp.q_len };
            for r0 in (0..len).step_by(rows) {
                let work = if keys {
                    // the queries that see the tile's first key
                    (sp.q_len as i64 - (r0 as i64 - shift).max(0)).max(0)
                } else {
                    // the keys the tile's last row sees
                    ((r0 + rows).min(sp.q_len) as i64 + shift).clamp(0, sp.k_len as i64)
                };
                tiles.push((work as usize, i, r0));
            }
        }
        tiles.sort_by_key(|&(work, _, _)| std::cmp::Reverse(work));
        let mut flat = Vec::with_capacity(tiles.len() * 2);
        for (_, i, r0) in tiles {
            flat.push(int(i, "sequence index")?);
            flat.push(int(r0, "row")?);
        }
        let n_tiles = u32::try_from(flat.len() / 2).context("too many attention tiles")?;
        Ok((self.upload_i32(&spans)?, self.upload_i32(&flat)?, n_tiles))
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

    /// The tensor-core kernel of `kernel` at head width `hd`, on wgmma or on mma.sync, with
    /// its (rows a block, warps a block, dynamic shared memory): in the bf16 mode, at the
    /// head widths of the Llama and Qwen2 models (64, 128); `None` where the CUDA-core
    /// kernels run (the f32 mode, other widths).
    fn attn_tensor_core_kernel(
        &self,
        kernel: MmaKernel,
        hd: usize,
    ) -> Option<(String, (usize, usize, usize))> {
        if self.dtype != DType::Bf16 || (hd != 64 && hd != 128) {
            return None;
        }
        let op = match kernel {
            MmaKernel::Fwd => "fwd",
            MmaKernel::Dq => "bwd_dq",
            MmaKernel::Dkdv => "bwd_dkdv",
        };
        Some(if self.wgmma.load(Ordering::Relaxed) {
            (format!("attn_{op}_wgmma_bf16_hd{hd}"), attn_wgmma_block(kernel, hd))
        } else {
            (format!("attn_{op}_mma_bf16_hd{hd}"), attn_mma_block(kernel, hd))
        })
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

/// A tensor-core attention kernel (kernels/attention.cu).
#[derive(Clone, Copy)]
enum MmaKernel {
    Fwd,
    Dq,
    Dkdv,
}

/// A block of a tensor-core attention kernel at head width `hd`, as kernels/attention.cu
/// lays it out: (rows of its own side: query rows in the forward and dq, keys in dkdv;
/// warps; bytes of dynamic shared memory). A warp takes 16 rows times its m-tiles: two,
/// but one in dq at head_dim 128, where two would need more than 255 registers; dkdv at
/// 128 has 8 warps, 32 keys each, with Pᵀ and dSᵀ in shared memory (bwd_dkdv_mma8).
fn attn_mma_block(kernel: MmaKernel, hd: usize) -> (usize, usize, usize) {
    let tile = ATTN_MMA_KEYS * (hd + 8) * 2; // 64 rows of bf16, hd + 8 apart
    let stats = 4 * ATTN_MMA_KEYS * 4; // two stages of lse and D
    match (kernel, hd) {
        // Q of the block's rows, two stages of K and V tiles
        (MmaKernel::Fwd, _) => (128, 4, 2 * tile + 4 * tile),
        // two stages of K and V tiles
        (MmaKernel::Dq, 64) => (128, 4, 4 * tile),
        (MmaKernel::Dq, _) => (64, 4, 4 * tile),
        // K and V of the block's keys, two stages of Q and dO tiles with their lse and D
        (MmaKernel::Dkdv, 64) => (128, 4, 4 * tile + 4 * tile + stats),
        // and Pᵀ, dSᵀ of a tile: 128 keys × 72 bf16 each
        (MmaKernel::Dkdv, _) => (128, 8, 4 * tile + 4 * tile + 2 * 128 * (ATTN_MMA_KEYS + 8) * 2 + stats),
    }
}

/// (rows a block, warps a block, dynamic shared memory) of the wgmma attention kernels
/// (kernels/attention.cu): two warpgroups of 64 rows; 64-row bf16 tiles of Q (and dO) of
/// the block's rows, or of K and V of its keys, two stages of the other side's tiles, and
/// 1024 bytes to align them; dkdv also two stages of 64 lse and D values.
fn attn_wgmma_block(kernel: MmaKernel, hd: usize) -> (usize, usize, usize) {
    let tile = ATTN_MMA_KEYS * hd * 2;
    match kernel {
        MmaKernel::Fwd => (128, 8, 1024 + 6 * tile),
        MmaKernel::Dq => (128, 8, 1024 + 8 * tile),
        MmaKernel::Dkdv => (128, 8, 1024 + 8 * tile + 4 * ATTN_MMA_KEYS * 4),
    }
}

/// The positions of `ids` grouped by id, for a scatter-add without atomics: the distinct
/// ids (ascending), where each one's positions start in the third list (one more entry
/// at the end: its length), and the positions, each id's in increasing order.
fn positions_by_id(ids: &[u32]) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let mut pos: Vec<u32> = (0..ids.len() as u32).collect();
    pos.sort_by_key(|&p| ids[p as usize]); // stable: positions stay increasing per id
    let (mut uniq, mut start) = (Vec::new(), Vec::new());
    for (k, &p) in pos.iter().enumerate() {
        let id = ids[p as usize];
        if uniq.last() != Some(&id) {
            uniq.push(id);
            start.push(k as u32);
        }
    }
    start.push(pos.len() as u32);
    (uniq, start, pos)
}

/// A launch of one block a row (grid-strided past 65,535 rows) over `n` rows of `v`
/// values: 1024 threads on rows of 8192 values or more (a vocabulary), else 256.
fn block_per_row(n: usize, v: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.min(65_535) as u32, 1, 1),
        block_dim: (if v >= 8192 { 1024 } else { BLOCK }, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// What a [`LossSums`]' three values on the host say.
fn loss_stats(s: &[f64]) -> LossStats {
    LossStats { loss_sum: s[0], n_counted: s[1] as usize, n_correct: s[2] as usize }
}

/// What a [`GradClip`]'s three values on the host say.
fn clip_stats(c: &[f64]) -> ClipStats {
    ClipStats { norm: c[1], scale: c[2] as f32 }
}

/// The room kept after each row for a LoRA path of rank `r`: r rounded up to 8 elements,
/// so rows stay 16-byte aligned in bf16 (as cuBLASLt's fast kernels want their ld).
fn room(r: usize) -> usize {
    r.next_multiple_of(8)
}

fn same_shape(a: &CudaTensor, b: &CudaTensor, what: &str) -> Result<()> {
    ensure!(a.shape == b.shape, "{what}: shapes {:?} and {:?} differ", a.shape, b.shape);
    Ok(())
}

/// An attention launch: `tiles` × `heads` blocks of `warps` warps (4 in the CUDA-core
/// kernels, one a row; `attn_mma_block` in the tensor-core ones).
fn attn_cfg(tiles: u32, heads: usize, (warps, smem_bytes): (usize, usize)) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (tiles, heads as u32, 1),
        block_dim: ((warps * 32) as u32, 1, 1),
        shared_mem_bytes: smem_bytes as u32,
    }
}

impl Ops for CudaOps {
    type Tensor = CudaTensor;
    type Ids = CudaIds;
    type LossSums = LossSums;
    type GradClip = GradClip;

    /// `f` with its buffers in the activation arena ([`arena`]).
    fn planned<R>(&self, key: u64, f: impl FnOnce() -> Result<R>) -> Result<R> {
        self.arena.begin(&self.rt, key)?;
        let r = f();
        let ended = self.arena.end(&self.rt);
        let r = r?;
        ended?;
        Ok(r)
    }

    fn arena_stats(&self) -> Option<ArenaStats> {
        Some(self.arena.stats())
    }

    fn name(&self) -> &'static str {
        match self.dtype {
            DType::F32 => "cuda-f32",
            DType::Bf16 => "cuda-bf16",
        }
    }

    /// An f32 tensor in both modes (LoRA weights, optimizer states, RoPE tables).
    fn upload(&self, data: &[f32], shape: &[usize]) -> Result<CudaTensor> {
        let _range = crate::profiling::range(c"upload");
        ensure!(
            data.len() == shape.iter().product::<usize>(),
            "upload: {} values for shape {shape:?}",
            data.len()
        );
        if data.is_empty() {
            return self.zeros(shape);
        }
        let buf = self.buffer(data.len(), DType::F32)?;
        self.rt.copy_htod(buf.ptr(), data)?;
        Ok(CudaTensor::new(buf, shape.to_vec()))
    }

    /// In the activation type: f32 as before in the f32 mode; bf16 in the bf16 mode, a
    /// bf16 checkpoint's bytes as they are and f32/f16 ones rounded on the host.
    fn upload_weight(&self, w: &HostWeight) -> Result<CudaTensor> {
        let _range = crate::profiling::range(c"upload_weight");
        match self.dtype {
            DType::F32 => self.upload(&decode_f32(w)?, &w.shape),
            DType::Bf16 => {
                let data = host_bf16(w)?;
                if data.is_empty() {
                    return self.alloc_zeros_as(&w.shape, DType::Bf16);
                }
                let buf = self.buffer(data.len(), DType::Bf16)?;
                self.rt.copy_htod(buf.ptr(), &data)?;
                Ok(CudaTensor::new(buf, w.shape.clone()))
            }
        }
    }

    fn upload_ids(&self, ids: &[u32]) -> Result<CudaIds> {
        let _range = crate::profiling::range(c"upload_ids");
        let buf = if ids.is_empty() {
            self.rt.stream.alloc_zeros::<u32>(1)
        } else {
            self.rt.stream.clone_htod(ids)
        }
        .context("host-to-device copy")?;
        Ok(CudaIds { buf, host: ids.to_vec() })
    }

    /// f32 values whatever the tensor's type (bf16 widens exactly).
    fn download(&self, t: &CudaTensor) -> Result<Vec<f32>> {
        let _range = crate::profiling::range(c"download");
        let mut v = match t.dtype() {
            DType::F32 => {
                let mut h = vec![0f32; t.buf.len()];
                self.rt.copy_dtoh(&mut h, t.buf.ptr())?;
                h
            }
            DType::Bf16 => {
                let mut h = vec![half::bf16::ZERO; t.buf.len()];
                self.rt.copy_dtoh(&mut h, t.buf.ptr())?;
                h.into_iter().map(half::bf16::to_f32).collect()
            }
        };
        if !t.is_dense() {
            let (ld, cols) = (t.ld(), t.rows_cols().1);
            return Ok(v.chunks(ld).take(t.rows_cols().0).flat_map(|row| &row[..cols]).copied().collect());
        }
        v.truncate(t.numel());
        Ok(v)
    }

    fn shape<'a>(&self, t: &'a CudaTensor) -> &'a [usize] {
        &t.shape
    }

    /// An f32 tensor in both modes (gradients and moments of the trained tensors).
    fn zeros(&self, shape: &[usize]) -> Result<CudaTensor> {
        let _range = crate::profiling::range(c"zeros");
        self.alloc_zeros_as(shape, DType::F32)
    }

    fn zeros_like(&self, t: &CudaTensor) -> Result<CudaTensor> {
        let _range = crate::profiling::range(c"zeros_like");
        self.alloc_zeros_as(&t.shape, t.dtype())
    }

    fn fill_zero(&self, t: &mut CudaTensor) -> Result<()> {
        let _range = crate::profiling::range(c"fill_zero");
        self.rt.memset(t.buf.ptr(), Pattern::U8(0), t.buf.bytes())
    }

    /// Rows of either type into rows of either type (converted when they differ, e.g.
    /// bf16 keys into a KV cache made by `zeros`).
    fn copy_rows(
        &self,
        dst: &mut CudaTensor,
        dst_row: usize,
        src: &CudaTensor,
        src_row: usize,
        n: usize,
    ) -> Result<()> {
        let _range = crate::profiling::range(c"copy_rows");
        let (dr, dc) = dst.rows_cols();
        let (sr, sc) = src.rows_cols();
        ensure!(dc == sc, "copy_rows: widths {dc} and {sc} differ");
        ensure!(dst_row + n <= dr && src_row + n <= sr, "copy_rows: rows out of range");
        if n == 0 || dc == 0 {
            return Ok(());
        }
        let src = self.dense(src)?;
        let (from, to) = (src_row * sc..(src_row + n) * sc, dst_row * dc..(dst_row + n) * dc);
        let (st, dt) = (src.dtype(), dst.dtype());
        if st != dt {
            // Both ranges are in bounds (checked above); the cast reads and writes n·dc
            // elements from the two element offsets.
            let src_at = self.ptr(&src) + (from.start * st.size()) as u64;
            let dst_at = self.ptr(dst) + (to.start * dt.size()) as u64;
            let len = n * dc;
            let kernel = format!("cast_{}_to_{}", st.suffix(), dt.suffix());
            return self.rt.launch(&kernel, grid_1d(len), args![dst_at, src_at, len as u64]);
        }
        let size = st.size();
        self.rt.copy_dtod(
            self.ptr(dst) + (to.start * size) as u64,
            self.ptr(&src) + (from.start * size) as u64,
            (from.end - from.start) * size,
        )
    }

    /// In x's type.
    fn gather_rows(&self, x: &CudaTensor, rows: &[usize]) -> Result<CudaTensor> {
        let _range = crate::profiling::range(c"gather_rows");
        let (n, d) = x.rows_cols();
        let mut idx = Vec::with_capacity(rows.len());
        for &r in rows {
            ensure!(r < n, "gather_rows: row {r} of {n}");
            idx.push(int(r, "row")?);
        }
        let x = self.dense(x)?;
        let out = self.alloc_as(&[rows.len(), d], x.dtype())?;
        let idx = self.upload_i32(&idx)?;
        self.rt.launch(
            &format!("gather_rows_{}", x.dtype().suffix()),
            grid_1d(rows.len() * d),
            args![
                self.ptr(&out),
                self.ptr(&x),
                self.rt.ptr(&idx),
                int(rows.len(), "rows")?,
                int(d, "width")?
            ],
        )?;
        Ok(out)
    }

    /// In a's type, b converted element by element in the kernel.
    fn add_assign(&self, a: &mut CudaTensor, b: &CudaTensor) -> Result<()> {
        let _range = crate::profiling::range(c"add_assign");
        same_shape(a, b, "add")?;
        let b = self.dense(b)?;
        let n = a.numel();
        let kernel = match (a.dtype(), b.dtype()) {
            (ta, tb) if ta == tb => format!("add_assign_{}", ta.suffix()),
            (ta, tb) => format!("add_assign_{}_{}", ta.suffix(), tb.suffix()),
        };
        self.rt.launch(&kernel, grid_1d(n), args![self.ptr(a), self.ptr(&b), n as u64])
    }

    fn embedding_fwd(&self, table: &CudaTensor, ids: &CudaIds) -> Result<CudaTensor> {
        let _range = crate::profiling::range(c"embedding_fwd");
        let (v, d) = table.rows_cols();
        for &id in &ids.host {
            ensure!((id as usize) < v, "token id {id} is outside the vocabulary (size {v})");
        }
        let table = self.act(table)?;
        let n = ids.host.len();
        let out = self.alloc(&[n, d])?;
        // the ids on the device are `ids.host`, checked above: nothing to wait for
        self.rt.launch(
            &self.kernel("embedding_fwd"),
            grid_1d(n * d),
            args![
                self.ptr(&out),
                self.ptr(&table),
                self.rt.ptr(&ids.buf),
                int(n, "tokens")?,
                int(d, "width")?,
                int(v, "vocab")?
            ],
        )?;
        Ok(out)
    }

    /// The embedding's gradient (full fine-tuning): dy in the activation type, added
    /// into the f32 table gradient. Without atomics: each id's positions are added in
    /// increasing order by one thread a column ([`positions_by_id`]), so a run and its
    /// resumption give the same bits.
    fn embedding_bwd(&self, dy: &CudaTensor, ids: &CudaIds, dtable: &mut CudaTensor) -> Result<()> {
        let _range = crate::profiling::range(c"embedding_bwd");
        ensure!(dtable.dtype() == DType::F32, "embedding_bwd: the table gradient must be f32");
        let (v, d) = dtable.rows_cols();
        let n = ids.host.len();
        ensure!(dy.numel() == n * d, "embedding_bwd: dy {:?} for {n} ids of width {d}", dy.shape);
        for &id in &ids.host {
            ensure!((id as usize) < v, "token id {id} is outside the vocabulary (size {v})");
        }
        if n == 0 {
            return Ok(());
        }
        let (uniq, start, pos) = positions_by_id(&ids.host);
        let upload = |v: &[u32]| self.rt.stream.clone_htod(v).context("host-to-device copy");
        let (uniq_dev, start_dev, pos_dev) = (upload(&uniq)?, upload(&start)?, upload(&pos)?);
        let dy = self.act(dy)?;
        self.rt.launch(
            &self.kernel("embedding_bwd"),
            grid_1d(uniq.len() * d),
            args![
                self.ptr(dtable),
                self.ptr(&dy),
                self.rt.ptr(&uniq_dev),
                self.rt.ptr(&start_dev),
                self.rt.ptr(&pos_dev),
                int(uniq.len(), "distinct tokens")?,
                int(d, "width")?,
                int(v, "vocab")?
            ],
        )
    }

    /// `tail`: y's rows get room for the LoRA path of the projections that read it.
    fn rmsnorm_fwd(
        &self,
        x: &CudaTensor,
        w: &CudaTensor,
        eps: f32,
        tail: usize,
    ) -> Result<(CudaTensor, CudaTensor)> {
        let _range = crate::profiling::range(c"rmsnorm_fwd");
        let (n, d) = x.rows_cols();
        ensure!(w.numel() == d, "rmsnorm: weight of {} for width {d}", w.numel());
        let (x, w) = (self.act(x)?, self.act(w)?);
        let y = self.alloc_with_tail(&x.shape, room(tail), self.dtype)?;
        let rstd = self.alloc_as(&[n], DType::F32)?;
        let cfg = LaunchConfig {
            grid_dim: (n.clamp(1, 65_535) as u32, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        if n > 0 {
            self.rt.launch(
                &self.kernel("rmsnorm_fwd"),
                cfg,
                args![
                    self.base_ptr(&y),
                    self.ptr(&rstd),
                    self.ptr(&x),
                    self.ptr(&w),
                    int(n, "rows")?,
                    int(d, "width")?,
                    int(y.ld(), "row stride")?,
                    eps
                ],
            )?;
        }
        Ok((y, rstd))
    }

    /// `dw` (a norm weight's gradient) is full fine-tuning only, so the f32 mode only.
    fn rmsnorm_bwd(
        &self,
        dy: &CudaTensor,
        x: &CudaTensor,
        w: &CudaTensor,
        rstd: &CudaTensor,
        dw: Option<&mut CudaTensor>,
        residual: Option<CudaTensor>,
        tail: usize,
    ) -> Result<CudaTensor> {
        let _range = crate::profiling::range(c"rmsnorm_bwd");
        same_shape(dy, x, "rmsnorm_bwd")?;
        let (n, d) = x.rows_cols();
        ensure!(
            w.numel() == d && rstd.numel() == n,
            "rmsnorm_bwd: weight {:?}, rstd {:?}",
            w.shape,
            rstd.shape
        );
        let (dy, x, w, rstd) = (self.act(dy)?, self.act(x)?, self.act(w)?, self.to_type(rstd, DType::F32)?);
        let accumulate = residual.is_some();
        let dx = match residual {
            Some(r) => {
                self.check_accumulator(&r, &x, "rmsnorm_bwd residual")?;
                r
            }
            None => self.alloc_with_tail(&x.shape, room(tail), self.dtype)?,
        };
        if n == 0 {
            return Ok(dx);
        }
        let blocks = n.min(256);
        let partial = match &dw {
            Some(dw) => {
                ensure!(
                    dw.numel() == d && dw.dtype() == DType::F32,
                    "rmsnorm_bwd: dw {:?} of {:?} for width {d}",
                    dw.shape,
                    dw.dtype()
                );
                Some(self.alloc_as(&[blocks, d], DType::F32)?)
            }
            None => None,
        };
        let cfg =
            LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
        let partial_ptr = partial.as_ref().map_or(0, |p| self.ptr(p));
        self.rt.launch(
            &self.kernel("rmsnorm_bwd"),
            cfg,
            args![
                self.base_ptr(&dx),
                partial_ptr,
                self.ptr(&dy),
                self.ptr(&x),
                self.ptr(&w),
                self.ptr(&rstd),
                int(n, "rows")?,
                int(d, "width")?,
                int(dx.ld(), "row stride")?,
                accumulate as i32
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

    /// In the bf16 mode the bias is cuBLASLt's epilogue and the LoRA path runs on bf16
    /// copies of A and B (tiny: r rows or columns), `x·Aᵀ` kept in bf16. When x and W both
    /// have room for r more columns after their rows (x from `rmsnorm_fwd`/`swiglu_fwd`
    /// with a tail, W given one by `reserve_lora_tail`), the low-rank update is folded
    /// into the frozen product: `[x | scale·x·Aᵀ]·[W | B]ᵀ`, one GEMM over K = in + r
    /// (kernels/lora.cu), so y is written once and never read back.
    fn linear_fwd(
        &self,
        x: &CudaTensor,
        w: &CudaTensor,
        bias: Option<&CudaTensor>,
        lora: Option<LoraRef<CudaTensor>>,
        residual: Option<&CudaTensor>,
    ) -> Result<(CudaTensor, Option<CudaTensor>)> {
        let _range = crate::profiling::range(c"linear_fwd");
        let (n, inp) = x.rows_cols();
        let (out, w_in) = w.rows_cols();
        ensure!(w_in == inp && w.shape.len() == 2, "linear: input width {inp}, weight {:?}", w.shape);
        let mut shape = x.shape.clone();
        if let Some(last) = shape.last_mut() {
            *last = out;
        }
        let (x, w) = (self.act_ld(x)?, self.act_ld(w)?);
        let residual = residual.map(|r| self.act(r)).transpose()?;
        if let Some(r) = &residual {
            ensure!(r.numel() == n * out, "linear: residual {:?} for [{n}, {out}]", r.shape);
        }
        if let Some(b) = bias {
            ensure!(b.numel() == out, "linear: bias of {} for {out} outputs", b.numel());
        }
        let bias = bias.map(|b| self.act(b)).transpose()?;
        // One handle for the whole op: no other thread's product can refill W's room
        // between this op's filling it and its product.
        let mut blas = self.blas();
        // The LoRA path's x·Aᵀ; then either its room filled (`k` grows by r) or the
        // update left for a second product (`unfused`: B and the scale).
        let mut k = inp;
        let mut unfused = None;
        let xa = match lora {
            None => None,
            Some(l) => {
                let r = l.rank(|t| &t.shape, inp, out)?;
                let (a, b) = (self.act(l.a)?, self.act(l.b)?);
                let xa = self.alloc(&[n, r])?;
                match l.dropout {
                    Some(d) => self.lora_xa_dropout(&xa, &x, &a, d)?,
                    None => {
                        self.gemm_in(&mut blas, &xa, None, &x, false, &a, true, (n, r, inp), 1.0, 0.0, None)?
                    }
                }
                if r > 0 && inp > 0 && x.tail >= r && w.tail >= r {
                    self.rt.launch(
                        &self.kernel("lora_tails"),
                        grid_1d((n + out) * r),
                        args![
                            self.base_ptr(&x),
                            int(x.ld(), "row stride")?,
                            int(inp, "width")?,
                            self.ptr(&xa),
                            int(n, "rows")?,
                            int(r, "rank")?,
                            l.scale,
                            self.base_ptr(&w),
                            int(w.ld(), "row stride")?,
                            self.ptr(&b),
                            int(out, "outputs")?
                        ],
                    )?;
                    k = inp + r;
                } else {
                    unfused = Some((b, r, l.scale));
                }
                Some(xa)
            }
        };
        let mut y = self.alloc(&shape)?;
        // The residual is the product's addend (`beta = 1`), except beside the bf16 mode's
        // bias epilogue, which needs `beta = 0`: then it is added after.
        let mut add_residual_after = None;
        match (self.dtype, &bias) {
            (DType::Bf16, Some(b)) => {
                self.gemm_in(&mut blas, &y, None, &x, false, &w, true, (n, out, k), 1.0, 0.0, Some(b))?;
                add_residual_after = residual.as_deref();
            }
            _ => {
                // The f32 mode adds the bias after the product, as the CPU backend does.
                match (&residual, k) {
                    (Some(r), 1..) => self.gemm_in(
                        &mut blas,
                        &y,
                        Some(r),
                        &x,
                        false,
                        &w,
                        true,
                        (n, out, k),
                        1.0,
                        1.0,
                        None,
                    )?,
                    _ => {
                        self.gemm_in(&mut blas, &y, None, &x, false, &w, true, (n, out, k), 1.0, 0.0, None)?;
                        add_residual_after = residual.as_deref();
                    }
                }
                if let Some(b) = &bias {
                    self.rt.launch(
                        &self.kernel("add_bias_rows"),
                        grid_1d(n * out),
                        args![self.ptr(&y), self.ptr(b), int(n, "rows")?, int(out, "width")?],
                    )?;
                }
            }
        }
        if let (Some(xa), Some((b, r, scale))) = (&xa, &unfused) {
            self.gemm_in(&mut blas, &y, None, xa, false, b, true, (n, out, *r), *scale, 1.0, None)?;
        }
        drop(blas);
        if let Some(r) = add_residual_after {
            self.add_assign(&mut y, r)?;
        }
        Ok((y, xa))
    }

    /// In the bf16 mode: dx in bf16; the LoRA gradients (f32) accumulate bf16 products
    /// in f32 (`dB += scale·dyᵀ·xa`, `dA += dxaᵀ·drop(x)` with `dxa = scale·dy·B` in
    /// bf16). Weight gradients (full fine-tuning) are refused there. When dy has room for
    /// r more columns (from `rmsnorm_bwd`/`swiglu_bwd` with a tail) and W r more rows
    /// (`reserve_lora_tail`), and there is no LoRA dropout, the input gradient is one GEMM
    /// over K = out + r: `[dy | dxa]·[W ; A]` (kernels/lora.cu), dx written once.
    fn linear_bwd(
        &self,
        dy: &CudaTensor,
        x: &CudaTensor,
        w: &CudaTensor,
        lora: Option<LoraRef<CudaTensor>>,
        xa: Option<&CudaTensor>,
        grads: Option<LoraGradRef<CudaTensor>>,
        weight_grads: Option<LinearGradRef<CudaTensor>>,
        dx_to: InputGrad<CudaTensor>,
    ) -> Result<Option<CudaTensor>> {
        let _range = crate::profiling::range(c"linear_bwd");
        let (n, inp) = x.rows_cols();
        let (out, w_in) = w.rows_cols();
        ensure!(w_in == inp, "linear_bwd: input width {inp}, weight {:?}", w.shape);
        ensure!(dy.numel() == n * out, "linear_bwd: dy {:?} for weight {:?}", dy.shape, w.shape);
        let (dy, x, w) = (self.act_ld(dy)?, self.act_ld(x)?, self.act_ld(w)?);
        if let Some(g) = weight_grads {
            same_shape(g.dw, &w, "linear_bwd weight gradient")?;
            // dW += dyᵀ·x  [out, in]
            self.gemm(g.dw, &dy, true, &x, false, (out, inp, n), 1.0, 1.0)?;
            if let Some(db) = g.db {
                ensure!(db.numel() == out, "linear_bwd: bias gradient of {} for {out} outputs", db.numel());
                ensure!(db.dtype() == DType::F32, "linear_bwd: the bias gradient must be f32");
                self.col_sum_acc(db, &*self.dense(&dy)?, n, out)?;
            }
        }
        // The LoRA path: dxa = scale·dy·B and the adapter's gradients; the input
        // gradient's share `dxa·A` is left for below (`low_rank`: dxa, A, r, the dropout).
        let mut low_rank = None;
        if let Some(l) = lora {
            let Some(xa) = xa else { bail!("linear_bwd: LoRA path without its saved x·Aᵀ") };
            let r = l.rank(|t| &t.shape, inp, out)?;
            ensure!(xa.numel() == n * r, "linear_bwd: x·Aᵀ {:?} for [{n}, {r}]", xa.shape);
            let (a, b, xa) = (self.act(l.a)?, self.act(l.b)?, self.act(xa)?);
            // dxa = scale · dy·B  [n, r]
            let dxa = self.alloc(&[n, r])?;
            self.gemm(&dxa, &dy, false, &b, false, (n, r, out), l.scale, 0.0)?;
            if let Some(g) = grads {
                same_shape(g.da, l.a, "linear_bwd LoRA A gradient")?;
                same_shape(g.db, l.b, "linear_bwd LoRA B gradient")?;
                // dB += scale · dyᵀ·xa  [out, r];  dA += dxaᵀ·drop(x)  [r, in]
                self.gemm(g.db, &dy, true, &xa, false, (out, r, n), l.scale, 1.0)?;
                match l.dropout {
                    Some(d) => self.lora_da_dropout(g.da, &dxa, &x, d)?,
                    None => self.gemm(g.da, &dxa, true, &x, false, (r, inp, n), 1.0, 1.0)?,
                }
            }
            low_rank = Some((dxa, a, r, l.dropout));
        }
        let (dx, beta) = match dx_to {
            InputGrad::Skip => return Ok(None),
            InputGrad::New => (self.alloc(&x.shape)?, 0.0),
            InputGrad::AddTo(acc) => {
                self.check_accumulator(&acc, &x, "linear_bwd input gradient")?;
                (acc, 1.0)
            }
        };
        let mut blas = self.blas();
        // With room in dy and W (and no dropout), `dxa·A` joins the product: dxa into
        // dy's room and A into W's extra rows first, then K grows by r. Otherwise it is a
        // second product (through the dropout's mask when there is one).
        let folded = match low_rank {
            Some((_, _, r, None)) => out > 0 && dy.tail >= r && w.extra_rows >= r,
            _ => false,
        };
        let mut k = out;
        if let (true, Some((dxa, a, r, _))) = (folded, &low_rank) {
            let r = *r;
            self.rt.launch(
                &self.kernel("lora_rows"),
                grid_1d((n + inp) * r),
                args![
                    self.base_ptr(&dy),
                    int(dy.ld(), "row stride")?,
                    int(out, "outputs")?,
                    self.ptr(dxa),
                    int(n, "rows")?,
                    int(r, "rank")?,
                    self.base_ptr(&w),
                    int(w.ld(), "row stride")?,
                    self.ptr(a),
                    int(inp, "width")?
                ],
            )?;
            k = out + r;
        }
        self.gemm_in(&mut blas, &dx, None, &dy, false, &w, false, (n, inp, k), 1.0, beta, None)?;
        match low_rank {
            Some((dxa, a, r, None)) if !folded => {
                self.gemm_in(&mut blas, &dx, None, &dxa, false, &a, false, (n, inp, r), 1.0, 1.0, None)?
            }
            Some((dxa, a, r, Some(d))) => {
                // the mask applied to dxa·A as it is formed and added: no [n, in] temporary
                self.rt.launch(
                    &self.kernel("lora_dx_dropout_acc"),
                    grid_1d((n * inp).div_ceil(8)),
                    args![
                        self.ptr(&dx),
                        self.ptr(&dxa),
                        self.ptr(&a),
                        int(n, "rows")?,
                        int(inp, "width")?,
                        int(r, "rank")?,
                        d.p,
                        d.seed
                    ],
                )?;
            }
            _ => {}
        }
        Ok(Some(dx))
    }

    fn rope_fwd(
        &self,
        q: &mut CudaTensor,
        k: &mut CudaTensor,
        cos: &CudaTensor,
        sin: &CudaTensor,
        head_dim: usize,
    ) -> Result<()> {
        let _range = crate::profiling::range(c"rope_fwd");
        self.rope(q, k, cos, sin, head_dim, 1.0)
    }

    fn rope_bwd(
        &self,
        dq: &mut CudaTensor,
        dk: &mut CudaTensor,
        cos: &CudaTensor,
        sin: &CudaTensor,
        head_dim: usize,
    ) -> Result<()> {
        let _range = crate::profiling::range(c"rope_bwd");
        self.rope(dq, dk, cos, sin, head_dim, -1.0)
    }

    fn attention_fwd(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        shape: AttnShape,
        layout: &AttnLayout,
        tail: usize,
    ) -> Result<(CudaTensor, CudaTensor)> {
        let _range = crate::profiling::range(c"attention_fwd");
        self.attn_check(q, k, v, shape, layout)?;
        let (q, k, v) = (self.act(q)?, self.act(k)?, self.act(v)?);
        let (nq, _) = q.rows_cols();
        let hd = shape.head_dim;
        // rows outside every span are not written: zeroed, unless there are none
        let out = self.alloc_attn_out(&q.shape, room(tail), layout.covers_rows(nq, false))?;
        let mut lse = self.alloc_as(&[nq, shape.n_heads], DType::F32)?;
        self.fill(&mut lse, f32::NEG_INFINITY)?;
        let (name, (rows, warps, smem)) =
            self.attn_tensor_core_kernel(MmaKernel::Fwd, hd).unwrap_or_else(|| {
                let (suffix, bc) = Self::attn_variant(hd);
                let smem = 4 * (ATTN_ROWS * hd + bc * (hd + 1) + bc * hd);
                (format!("{}_{suffix}", self.kernel("attn_fwd")), (ATTN_ROWS, ATTN_ROWS, smem))
            });
        let (spans, tiles, n_tiles) = self.attn_tiles(layout, false, rows)?;
        let cfg = attn_cfg(n_tiles, shape.n_heads, (warps, smem));
        self.rt.launch(
            &name,
            cfg,
            args![
                self.base_ptr(&out),
                self.ptr(&lse),
                self.ptr(&q),
                self.ptr(&k),
                self.ptr(&v),
                self.rt.ptr(&spans),
                self.rt.ptr(&tiles),
                int(shape.n_heads, "heads")?,
                int(shape.n_kv_heads, "kv heads")?,
                int(hd, "head_dim")?,
                1.0 / (hd as f32).sqrt(),
                int(out.ld(), "row stride")?
            ],
        )?;
        Ok((out, lse))
    }

    /// `tail`: dq's, dk's and dv's rows get room for q/k/v_proj's LoRA paths.
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
        tail: usize,
    ) -> Result<(CudaTensor, CudaTensor, CudaTensor)> {
        let _range = crate::profiling::range(c"attention_bwd");
        self.attn_check(q, k, v, shape, layout)?;
        same_shape(dout, q, "attention_bwd")?;
        same_shape(out, q, "attention_bwd")?;
        let (nq, _) = q.rows_cols();
        let hd = shape.head_dim;
        ensure!(lse.numel() == nq * shape.n_heads, "attention_bwd: lse {:?}", lse.shape);
        let (q, k, v) = (self.act(q)?, self.act(k)?, self.act(v)?);
        // `out` may keep the room o_proj's LoRA path filled: attn_bwd_dot reads its rows as they are
        let (dout, out, lse) = (self.act(dout)?, self.act_ld(out)?, self.to_type(lse, DType::F32)?);
        let (h, hkv) = (int(shape.n_heads, "heads")?, int(shape.n_kv_heads, "kv heads")?);
        let scale = 1.0 / (hd as f32).sqrt();

        // attn_bwd_dot writes D of every (row, head)
        let d = self.alloc_as(&[nq, shape.n_heads], DType::F32)?;
        let warps = nq * shape.n_heads;
        self.rt.launch(
            &self.kernel("attn_bwd_dot"),
            grid_1d(warps * 32),
            args![
                self.ptr(&d),
                self.ptr(&dout),
                self.base_ptr(&out),
                int(nq, "rows")?,
                h,
                int(hd, "head_dim")?,
                int(out.ld(), "row stride")?
            ],
        )?;

        // rows outside every span are not written: zeroed, unless there are none
        let (q_written, k_written) =
            (layout.covers_rows(nq, false), layout.covers_rows(k.rows_cols().0, true));
        let dq = self.alloc_attn_out(&q.shape, room(tail), q_written)?;
        let dk = self.alloc_attn_out(&k.shape, room(tail), k_written)?;
        let dv = self.alloc_attn_out(&v.shape, room(tail), k_written)?;
        let tensor_cores = (
            self.attn_tensor_core_kernel(MmaKernel::Dq, hd),
            self.attn_tensor_core_kernel(MmaKernel::Dkdv, hd),
        );
        let (dq_name, (q_rows, dq_warps, dq_smem), dkdv_name, (k_rows, dkdv_warps, dkdv_smem)) =
            match tensor_cores {
                (Some((dq, dq_block)), Some((dkdv, dkdv_block))) => (dq, dq_block, dkdv, dkdv_block),
                _ => {
                    let (suffix, bc) = Self::attn_variant(hd);
                    let dq_smem = 4 * (2 * ATTN_ROWS * hd + 2 * bc * (hd + 1));
                    (
                        format!("{}_{suffix}", self.kernel("attn_bwd_dq")),
                        (ATTN_ROWS, ATTN_ROWS, dq_smem),
                        format!("{}_{suffix}", self.kernel("attn_bwd_dkdv")),
                        (ATTN_ROWS, ATTN_ROWS, dq_smem + 4 * 2 * bc),
                    )
                }
            };
        let (spans, q_tiles, n_q_tiles) = self.attn_tiles(layout, false, q_rows)?;
        let (_, k_tiles, n_k_tiles) = self.attn_tiles(layout, true, k_rows)?;
        let dq_cfg = attn_cfg(n_q_tiles, shape.n_heads, (dq_warps, dq_smem));
        let dkdv_cfg = attn_cfg(n_k_tiles, shape.n_kv_heads, (dkdv_warps, dkdv_smem));
        self.rt.launch(
            &dq_name,
            dq_cfg,
            args![
                self.base_ptr(&dq),
                self.ptr(&dout),
                self.ptr(&q),
                self.ptr(&k),
                self.ptr(&v),
                self.ptr(&lse),
                self.ptr(&d),
                self.rt.ptr(&spans),
                self.rt.ptr(&q_tiles),
                h,
                hkv,
                int(hd, "head_dim")?,
                scale,
                int(dq.ld(), "row stride")?
            ],
        )?;
        self.rt.launch(
            &dkdv_name,
            dkdv_cfg,
            args![
                self.base_ptr(&dk),
                self.base_ptr(&dv),
                self.ptr(&dout),
                self.ptr(&q),
                self.ptr(&k),
                self.ptr(&v),
                self.ptr(&lse),
                self.ptr(&d),
                self.rt.ptr(&spans),
                self.rt.ptr(&k_tiles),
                h,
                hkv,
                int(hd, "head_dim")?,
                scale,
                int(dk.ld(), "row stride")?
            ],
        )?;
        Ok((dq, dk, dv))
    }

    /// `tail`: h's rows get room for down_proj's LoRA path.
    fn swiglu_fwd(&self, gate: &CudaTensor, up: &CudaTensor, tail: usize) -> Result<CudaTensor> {
        let _range = crate::profiling::range(c"swiglu_fwd");
        same_shape(gate, up, "swiglu")?;
        let (gate, up) = (self.act(gate)?, self.act(up)?);
        let n = gate.numel();
        let h = self.alloc_with_tail(&gate.shape, room(tail), self.dtype)?;
        let width = h.rows_cols().1.max(1);
        self.rt.launch(
            &self.kernel("swiglu_fwd"),
            grid_1d(n.div_ceil(8)), // 8 values a thread (kernels/swiglu.cu)
            args![
                self.base_ptr(&h),
                self.ptr(&gate),
                self.ptr(&up),
                n as u64,
                int(width, "width")?,
                int(h.ld().max(1), "row stride")?
            ],
        )?;
        Ok(h)
    }

    /// `tail`: dgate's and dup's rows get room for their projections' LoRA paths.
    fn swiglu_bwd(
        &self,
        dh: &CudaTensor,
        gate: &CudaTensor,
        up: &CudaTensor,
        tail: usize,
    ) -> Result<(CudaTensor, CudaTensor)> {
        let _range = crate::profiling::range(c"swiglu_bwd");
        let (dg, du, _) = self.swiglu_backward(dh, gate, up, tail, false)?;
        Ok((dg, du))
    }

    /// One pass: the kernel writes h beside dgate and dup.
    fn swiglu_bwd_h(
        &self,
        dh: &CudaTensor,
        gate: &CudaTensor,
        up: &CudaTensor,
        tail: usize,
    ) -> Result<(CudaTensor, CudaTensor, CudaTensor)> {
        let _range = crate::profiling::range(c"swiglu_bwd_h");
        let (dg, du, h) = self.swiglu_backward(dh, gate, up, tail, true)?;
        Ok((dg, du, h.context("the SwiGLU backward wrote no h")?))
    }

    fn cross_entropy_into(
        &self,
        logits: &CudaTensor,
        targets: &[i64],
        grad_scale: Option<f32>,
        sums: &mut LossSums,
    ) -> Result<Option<CudaTensor>> {
        let _range = crate::profiling::range(c"cross_entropy");
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
        let logits = self.act(logits)?;
        let dlogits = grad_scale.map(|_| self.alloc(&logits.shape)).transpose()?;
        if n == 0 {
            return Ok(dlogits);
        }
        let row_loss = self.alloc_as(&[n], DType::F32)?;
        // SAFETY: i32 has no invalid bit patterns; the kernel writes every row.
        let row_flag = unsafe { self.rt.stream.alloc::<i32>(n) }.context("CUDA allocation")?;
        let targets_dev = self.upload_i32(&t32)?;
        self.rt.launch(
            &self.kernel("cross_entropy"),
            block_per_row(n, v),
            args![
                self.ptr(&row_loss),
                self.rt.ptr(&row_flag),
                dlogits.as_ref().map_or(0, |d| self.ptr(d)),
                self.ptr(&logits),
                self.rt.ptr(&targets_dev),
                int(n, "rows")?,
                int(v, "vocab")?,
                grad_scale.unwrap_or(0.0)
            ],
        )?;
        // the rows' sums added on the device, in a fixed order (one block)
        let cfg =
            LaunchConfig { grid_dim: (1, 1, 1), block_dim: (LOSS_SUMS_BLOCK, 1, 1), shared_mem_bytes: 0 };
        self.rt.launch(
            "loss_sums_add",
            cfg,
            args![self.rt.ptr(&sums.0), self.ptr(&row_loss), self.rt.ptr(&row_flag), int(n, "rows")?],
        )?;
        Ok(dlogits)
    }

    fn argmax_rows(&self, x: &CudaTensor) -> Result<Vec<u32>> {
        let _range = crate::profiling::range(c"argmax_rows");
        let (n, v) = x.rows_cols();
        ensure!(v > 0, "argmax_rows: rows without values");
        if n == 0 {
            return Ok(vec![]);
        }
        let x = self.dense(x)?;
        // SAFETY: u32 has no invalid bit patterns; the kernel writes every row.
        let out = unsafe { self.rt.stream.alloc::<u32>(n) }.context("CUDA allocation")?;
        let kernel = format!("argmax_rows_{}", x.dtype().suffix());
        self.rt.launch(
            &kernel,
            block_per_row(n, v),
            args![self.rt.ptr(&out), self.ptr(&x), int(n, "rows")?, int(v, "columns")?],
        )?;
        self.rt.download(&out)
    }

    fn loss_sums(&self) -> Result<LossSums> {
        Ok(LossSums(self.rt.stream.alloc_zeros::<f64>(3).context("CUDA allocation")?))
    }

    fn read_loss(&self, sums: &LossSums) -> Result<LossStats> {
        Ok(loss_stats(&self.rt.download(&sums.0)?))
    }

    fn sum_squares(&self, ts: &[&CudaTensor]) -> Result<f64> {
        let _range = crate::profiling::range(c"sum_squares");
        Ok(self.rt.download(&self.norm_of(ts, None)?.0)?[0])
    }

    fn grad_clip(&self, grads: &[&CudaTensor], max_norm: Option<f64>) -> Result<GradClip> {
        let _range = crate::profiling::range(c"grad_clip");
        self.norm_of(grads, max_norm)
    }

    fn read_clip(&self, clip: &GradClip) -> Result<ClipStats> {
        Ok(clip_stats(&self.rt.download(&clip.0)?))
    }

    fn read_step(&self, sums: &LossSums, clip: &GradClip) -> Result<(LossStats, ClipStats)> {
        let [s, c] = &self.rt.download_all(&[&sums.0, &clip.0])?[..] else { bail!("read_step: two buffers") };
        Ok((loss_stats(s), clip_stats(c)))
    }

    fn adamw_step(
        &self,
        params: &mut [&mut CudaTensor],
        grads: &[&CudaTensor],
        m: &mut [&mut CudaTensor],
        v: &mut [&mut CudaTensor],
        step: u64,
        hp: AdamWParams,
        scale: GradScale<'_, GradClip>,
    ) -> Result<()> {
        let _range = crate::profiling::range(c"adamw_step");
        let n = params.len();
        ensure!(grads.len() == n && m.len() == n && v.len() == n, "adamw: tensor lists differ in length");
        ensure!(step >= 1, "adamw: steps count from 1");
        if n == 0 {
            return Ok(());
        }
        let mut desc = Vec::with_capacity(n * 5);
        let mut max_len = 0;
        for i in 0..n {
            ensure!(
                params[i].dtype() == DType::F32,
                "adamw: parameter {i} is stored in bf16; trained tensors are f32 master weights \
                 (a full fine-tuning run loads the model with Model::load_master)"
            );
            ensure!(
                [grads[i].dtype(), m[i].dtype(), v[i].dtype()] == [DType::F32; 3],
                "adamw: the gradient and moments of parameter {i} must be f32 (made by zeros/upload)"
            );
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
        let (step_size, bc2_sqrt) = hp.bias_corrections(step)?;
        let (grad_scale, clip) = match scale {
            GradScale::By(s) => (s, 0),
            GradScale::Clip(c) => (1.0, self.rt.ptr(&c.0)),
        };
        let (desc, cfg) = self.multi_tensor_launch("adamw_multi", &desc, n, max_len)?;
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
                bc2_sqrt,
                grad_scale,
                clip
            ],
        )
    }

    fn synchronize(&self) -> Result<()> {
        self.rt.sync()
    }

    /// Device time between two CUDA events recorded on the stream around `f`.
    fn timed<R>(&self, f: impl FnOnce() -> Result<R>) -> Result<(R, f64)> {
        use cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT;
        self.rt.sync()?;
        let start = self.rt.stream.record_event(Some(CU_EVENT_DEFAULT)).context("recording a CUDA event")?;
        let r = f()?;
        let end = self.rt.stream.record_event(Some(CU_EVENT_DEFAULT)).context("recording a CUDA event")?;
        let ms = start.elapsed_ms(&end).context("timing between CUDA events (a kernel faulted?)")?;
        Ok((r, ms as f64 / 1e3))
    }

    fn clock(&self) -> &'static str {
        "CUDA events on the stream"
    }

    /// The whole device's memory in use (cuMemGetInfo: total − free), so it includes the
    /// CUDA context, the kernels and any other process on the GPU.
    fn memory_in_use(&self) -> Option<u64> {
        let (free, total) = self.rt.ctx.mem_get_info().ok()?;
        Some(total.saturating_sub(free) as u64)
    }

    fn host_waits(&self) -> Option<u64> {
        Some(self.rt.waits())
    }

    fn activation_bytes(&self) -> usize {
        self.dtype.size()
    }

    fn kernel_clock(&self, on: bool) -> Result<bool> {
        self.rt.kernel_clock(on)?;
        Ok(true)
    }

    fn kernel_times(&self) -> Result<Vec<crate::ops::KernelClock>> {
        self.rt.kernel_times()
    }

    /// W in rows of `in + room(r)` and with `room(r)` more rows (all the room zeroed),
    /// when it is in the activation type: B goes after the rows for the forward's fold, A
    /// after the last row for the backward's.
    fn reserve_lora_tail(&self, w: &mut CudaTensor, r: usize) -> Result<()> {
        if (w.tail >= r && w.extra_rows >= r) || w.dtype() != self.dtype || w.shape.len() != 2 {
            return Ok(());
        }
        let (rows, cols) = w.rows_cols();
        let more = room(r).max(w.tail).max(w.extra_rows);
        let mut t = self.alloc_zeros_as(&[rows + more, cols + more], w.dtype())?;
        self.copy_2d(&t, cols + more, w, w.ld(), rows, cols)?;
        (t.shape, t.tail, t.extra_rows) = (w.shape.clone(), more, more);
        *w = t;
        Ok(())
    }

    fn compute_copy(&self, t: &CudaTensor) -> Result<Option<CudaTensor>> {
        Ok(match self.act(t)? {
            Operand::Converted(c) => Some(c),
            Operand::Borrowed(_) => None,
        })
    }

    /// The bf16 mode's copies of f32 tensors in one launch (`cast_f32_to_bf16_multi`).
    fn compute_copies(&self, ts: &[&CudaTensor]) -> Result<Option<Vec<CudaTensor>>> {
        let _range = crate::profiling::range(c"compute_copies");
        if self.dtype == DType::F32 || ts.iter().any(|t| t.dtype() != DType::F32) {
            return Ok(None);
        }
        let mut out = Vec::with_capacity(ts.len());
        let mut desc = Vec::with_capacity(3 * ts.len());
        for t in ts {
            let c = self.alloc_as(&t.shape, DType::Bf16)?;
            desc.extend([self.ptr(&c), self.ptr(t), t.numel() as u64]);
            out.push(c);
        }
        let max_len = ts.iter().map(|t| t.numel()).max().unwrap_or(0);
        self.launch_multi("cast_f32_to_bf16_multi", &desc, ts.len(), max_len)?;
        Ok(Some(out))
    }

    /// One launch (`zero_multi`) for every tensor.
    fn fill_zero_all(&self, ts: &mut [&mut CudaTensor]) -> Result<()> {
        let _range = crate::profiling::range(c"fill_zero_all");
        let words = |t: &CudaTensor| t.numel() * if t.dtype() == DType::F32 { 2 } else { 1 };
        let desc: Vec<u64> = ts.iter().flat_map(|t| [self.ptr(t), words(t) as u64]).collect();
        let max_len = ts.iter().map(|t| words(t)).max().unwrap_or(0);
        self.launch_multi("zero_multi", &desc, ts.len(), max_len)
    }
}

impl CudaOps {
    /// Queues Σ x² over `ts`, its square root and the clip's coefficient for `max_norm`
    /// into a [`GradClip`]: `sum_squares_multi` over every tensor in one launch, then
    /// `clip_norm` adds its partials in a fixed order.
    fn norm_of(&self, ts: &[&CudaTensor], max_norm: Option<f64>) -> Result<GradClip> {
        let blocks: Vec<usize> = ts.iter().map(|t| t.numel().div_ceil(BLOCK as usize).min(1024)).collect();
        let total: usize = blocks.iter().sum();
        // SAFETY: f64 has no invalid bit patterns; sum_squares_multi writes every partial
        // (each block its own) and clip_norm every value of `out`.
        let out = unsafe { self.rt.stream.alloc::<f64>(3) }.context("CUDA allocation")?;
        let partial = unsafe { self.rt.stream.alloc::<f64>(total.max(1)) }.context("CUDA allocation")?;
        if total > 0 {
            // one launch for all the tensors, each with its own blocks
            let mut desc = Vec::with_capacity(ts.len() * 5);
            let mut first = 0;
            for (t, &b) in ts.iter().zip(&blocks) {
                if b > 0 {
                    let bf16 = u64::from(t.dtype() == DType::Bf16);
                    desc.extend([self.ptr(t), bf16, t.numel() as u64, first as u64, b as u64]);
                    first += b;
                }
            }
            let n = i32::try_from(desc.len() / 5).context("sum_squares: too many tensors")?;
            let desc = self.rt.stream.clone_htod(&desc).context("host-to-device copy")?;
            let grid = u32::try_from(total).context("sum_squares: too many blocks")?;
            let cfg = LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
            self.rt.launch("sum_squares_multi", cfg, args![self.rt.ptr(&partial), self.rt.ptr(&desc), n])?;
        }
        let cfg =
            LaunchConfig { grid_dim: (1, 1, 1), block_dim: (CLIP_NORM_BLOCK, 1, 1), shared_mem_bytes: 0 };
        let max_norm = match max_norm {
            Some(m) => {
                ensure!(m >= 0.0, "clip: the largest gradient norm is {m}; it must be 0 or more");
                m
            }
            None => -1.0,
        };
        let n = i32::try_from(total).context("clip: too many partial sums")?;
        self.rt.launch("clip_norm", cfg, args![self.rt.ptr(&out), self.rt.ptr(&partial), n, max_norm])?;
        Ok(GradClip(out))
    }

    /// Q and K rotated in one launch.
    fn rope(
        &self,
        q: &mut CudaTensor,
        k: &mut CudaTensor,
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
        let heads = |x: &CudaTensor, what: &str| {
            ensure!(
                x.numel() % (rows * head_dim) == 0,
                "rope: {} values of {what} for {rows} rows of {head_dim}-wide heads",
                x.numel()
            );
            Ok(x.numel() / (rows * head_dim))
        };
        let (heads_q, heads_k) = (heads(q, "q")?, heads(k, "k")?);
        ensure!(q.dtype() == k.dtype(), "rope: q of {:?}, k of {:?}", q.dtype(), k.dtype());
        // In place in q's and k's own type; the tables are f32 (made by `upload`).
        let (cos, sin) = (self.to_type(cos, DType::F32)?, self.to_type(sin, DType::F32)?);
        self.rt.launch(
            &format!("rope_{}", q.dtype().suffix()),
            grid_1d(rows * (heads_q + heads_k) * half),
            args![
                self.base_ptr(q),
                int(heads_q, "heads")?,
                self.base_ptr(k),
                int(heads_k, "kv heads")?,
                self.ptr(&cos),
                self.ptr(&sin),
                int(rows, "rows")?,
                int(head_dim, "head_dim")?,
                sign,
                int(q.ld(), "row stride")?,
                int(k.ld(), "row stride")?
            ],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::DType;
    use crate::kernels::KERNEL_NAMES;

    #[test]
    fn positions_by_id_group_each_ids_positions_in_order() {
        let ids = [7, 2, 7, 7, 0, 2, 9];
        let (uniq, start, pos) = super::positions_by_id(&ids);
        assert_eq!(uniq, [0, 2, 7, 9]);
        assert_eq!(start, [0, 1, 3, 6, 7]);
        assert_eq!(pos, [4, 1, 5, 0, 2, 3, 6]);
        for (u, &id) in uniq.iter().enumerate() {
            let mine = &pos[start[u] as usize..start[u + 1] as usize];
            assert!(mine.windows(2).all(|w| w[0] < w[1]) && mine.iter().all(|&p| ids[p as usize] == id));
        }
        assert_eq!(super::positions_by_id(&[]), (vec![], vec![0], vec![]));
    }

    /// Every kernel name the launchers put together from a base and a type suffix exists
    /// in the fatbin's list, for both types (a typo would otherwise show only on a GPU).
    #[test]
    fn every_typed_kernel_name_exists() {
        let typed = [
            "scale",
            "add_bias_rows",
            "lora_xa_dropout",
            "lora_da_dropout",
            "lora_dx_dropout_acc",
            "gather_rows",
            "add_assign",
            "embedding_fwd",
            "rmsnorm_fwd",
            "rmsnorm_bwd",
            "attn_bwd_dot",
            "swiglu_fwd",
            "swiglu_bwd",
            "cross_entropy",
            "rope",
        ];
        let mut names = Vec::new();
        for t in [DType::F32, DType::Bf16] {
            names.extend(typed.iter().map(|b| format!("{b}_{}", t.suffix())));
            for attn in ["attn_fwd", "attn_bwd_dq", "attn_bwd_dkdv"] {
                for tile in ["bc32", "bc16"] {
                    names.push(format!("{attn}_{}_{tile}", t.suffix()));
                }
            }
            for u in [DType::F32, DType::Bf16] {
                if t != u {
                    names.push(format!("cast_{}_to_{}", t.suffix(), u.suffix()));
                    names.push(format!("add_assign_{}_{}", t.suffix(), u.suffix()));
                }
            }
        }
        names.push("sum_squares_multi".to_string());
        for attn in [
            "attn_fwd_mma",
            "attn_bwd_dq_mma",
            "attn_bwd_dkdv_mma",
            "attn_fwd_wgmma",
            "attn_bwd_dq_wgmma",
            "attn_bwd_dkdv_wgmma",
        ] {
            names.extend(["hd64", "hd128"].map(|hd| format!("{attn}_bf16_{hd}")));
        }
        for name in &names {
            assert!(KERNEL_NAMES.contains(&name.as_str()), "no kernel {name}");
        }
    }
}
