//! A thin wrapper over cuBLASLt's C API (`cudarc::cublaslt::result`/`sys`). cudarc's
//! safe wrapper takes one dtype for A, B and C, has no backward epilogues and re-runs the
//! algorithm heuristic on every call; training wants none of that, so, as llm.c's
//! `matmul_cublaslt`, this keeps one descriptor set and the chosen algorithm per shape.
//!
//! Matrices are row-major. cuBLASLt is column-major, and a row-major `[r, c]` matrix is
//! the column-major `[c, r]` one, so `C = op(A)·op(B)` is computed as
//! `Cᵀ = op(B)ᵀ·op(A)ᵀ`: cuBLASLt's A is our B and its B our A, with the same
//! transpose flags.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Arc;

use anyhow::{Context, Result};
use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

/// The element types of A/B and of C (= D). Compute and scaling are f32 in all three,
/// which are combinations cuBLASLt supports for `CUBLAS_COMPUTE_32F`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GemmDtype {
    /// A, B, C f32 (the f32 mode; no TF32).
    F32,
    /// A, B, C bf16 (the bf16 mode's activations and frozen weights).
    Bf16,
    /// A, B bf16, C f32: bf16 operands accumulated into an f32 tensor (LoRA gradients).
    Bf16F32,
}

impl GemmDtype {
    /// (A and B, C and D)
    fn cuda(self) -> (sys::cudaDataType, sys::cudaDataType) {
        use sys::cudaDataType::{CUDA_R_16BF, CUDA_R_32F};
        match self {
            GemmDtype::F32 => (CUDA_R_32F, CUDA_R_32F),
            GemmDtype::Bf16 => (CUDA_R_16BF, CUDA_R_16BF),
            GemmDtype::Bf16F32 => (CUDA_R_16BF, CUDA_R_32F),
        }
    }
}

/// `C [m, n] = alpha · op(A) · op(B) + beta · C (+ bias)`, all row-major. `op(A)` is
/// `[m, k]`: A is stored `[m, k]`, or `[k, m]` when `trans_a`, its rows `lda` elements
/// apart (at least the stored width). `op(B)` is `[k, n]`: B is stored `[k, n]`, or
/// `[n, k]` when `trans_b`, rows `ldb` apart. C is dense. With `bias`, a vector of `n`
/// elements of C's type is added to every row of C by cuBLASLt's `BIAS` epilogue (in
/// f32, before the one rounding to C's type).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GemmShape {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    pub lda: usize,
    pub ldb: usize,
    pub dtype: GemmDtype,
    pub bias: bool,
}

/// Descriptors and the heuristic's algorithm for one shape.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    /// cuBLASLt's A (our B), B (our A), C/D layouts.
    layouts: [sys::cublasLtMatrixLayout_t; 3],
    algo: sys::cublasLtMatmulAlgo_t,
}

pub struct BlasLt {
    handle: sys::cublasLtHandle_t,
    stream: Arc<CudaStream>,
    workspace: CudaSlice<u8>,
    plans: HashMap<GemmShape, Plan>,
}

// SAFETY: the handle and descriptors are plain heap objects of cuBLASLt, used only
// through `&mut self` (CudaOps keeps BlasLt behind a Mutex).
unsafe impl Send for BlasLt {}

/// cuBLASLt's recommended workspace for Hopper.
const WORKSPACE_BYTES: usize = 32 << 20;

fn op(trans: bool) -> cudarc::cublas::sys::cublasOperation_t {
    if trans {
        cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_T
    } else {
        cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_N
    }
}

impl BlasLt {
    pub fn new(stream: Arc<CudaStream>) -> Result<Self> {
        let handle = lt::create_handle().map_err(|e| anyhow::anyhow!("cublasLtCreate: {e}"))?;
        // SAFETY: allocation only; the buffer is scratch for cuBLASLt.
        let workspace = unsafe { stream.alloc::<u8>(WORKSPACE_BYTES) }.context("cuBLASLt workspace")?;
        Ok(Self { handle, stream, workspace, plans: HashMap::new() })
    }

    fn plan(&mut self, s: GemmShape) -> Result<&Plan> {
        if !self.plans.contains_key(&s) {
            let plan = self.make_plan(s).with_context(|| format!("no cuBLASLt algorithm for {s:?}"))?;
            self.plans.insert(s, plan);
        }
        Ok(&self.plans[&s])
    }

    fn make_plan(&self, s: GemmShape) -> Result<Plan> {
        let err = |what: &'static str| move |e: lt::CublasError| anyhow::anyhow!("{what}: {e}");
        let (ab_type, c_type) = s.dtype.cuda();
        // Plain f32 compute: no TF32, so f32 mode matches the CPU backend.
        let desc = lt::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType::CUDA_R_32F,
        )
        .map_err(err("cublasLtMatmulDescCreate"))?;
        let (ta, tb) = (op(s.trans_b), op(s.trans_a));
        // SAFETY: desc is live; the values are cublasOperation_t as the attributes expect.
        unsafe {
            lt::set_matmul_desc_attribute(
                desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                &ta as *const _ as *const c_void,
                std::mem::size_of_val(&ta),
            )
            .map_err(err("TRANSA"))?;
            lt::set_matmul_desc_attribute(
                desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
                &tb as *const _ as *const c_void,
                std::mem::size_of_val(&tb),
            )
            .map_err(err("TRANSB"))?;
            if s.bias {
                // cuBLASLt's D is our Cᵀ, column-major [n, m]: its n rows are our columns,
                // so the bias vector (one value per D row) is added to each of our rows.
                let epilogue = sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS;
                lt::set_matmul_desc_attribute(
                    desc,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE,
                    &epilogue as *const _ as *const c_void,
                    std::mem::size_of_val(&epilogue),
                )
                .map_err(err("EPILOGUE"))?;
                // The default is D's type already; said explicitly so no reader has to know.
                lt::set_matmul_desc_attribute(
                    desc,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE,
                    &c_type as *const _ as *const c_void,
                    std::mem::size_of_val(&c_type),
                )
                .map_err(err("BIAS_DATA_TYPE"))?;
            }
        }
        let (m, n, k) = (s.m as u64, s.n as u64, s.k as u64);
        let (lda, ldb) = (s.lda as u64, s.ldb as u64);
        // cuBLASLt's A = our B, stored column-major [n, k], or [k, n] when transposed, with
        // our row stride as its ld; its B = our A, [k, m] or [m, k]; D = [n, m] (ld n).
        let a_layout = if s.trans_b { (k, n, ldb) } else { (n, k, ldb) };
        let b_layout = if s.trans_a { (m, k, lda) } else { (k, m, lda) };
        let mk = |dt, (r, c, ld): (u64, u64, u64)| {
            lt::create_matrix_layout(dt, r, c, ld as i64).map_err(err("cublasLtMatrixLayoutCreate"))
        };
        let layouts = [mk(ab_type, a_layout)?, mk(ab_type, b_layout)?, mk(c_type, (n, m, n))?];

        let pref = lt::create_matmul_pref().map_err(err("cublasLtMatmulPreferenceCreate"))?;
        let ws = WORKSPACE_BYTES as u64;
        // SAFETY: all descriptors are live; pref is destroyed right after use.
        let heuristic = unsafe {
            lt::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const u64 as *const c_void,
                std::mem::size_of::<u64>(),
            )
            .map_err(err("MAX_WORKSPACE_BYTES"))?;
            let h = lt::get_matmul_algo_heuristic(
                self.handle,
                desc,
                layouts[0],
                layouts[1],
                layouts[2],
                layouts[2],
                pref,
            );
            let _ = lt::destroy_matmul_pref(pref);
            h.map_err(err("cublasLtMatmulAlgoGetHeuristic"))?
        };
        Ok(Plan { desc, layouts, algo: heuristic.algo })
    }

    /// `D = alpha·op(A)·op(B) + beta·C (+ bias)` on the stream. `a`, `b`, `c`, `d` are
    /// device addresses of buffers holding A's and B's stored rows at their strides, and
    /// `m·n`, `m·n` elements, of `s.dtype`'s types, `bias` (given exactly when `s.bias`) one of `n` elements of C's
    /// type (the caller checks). `c == d` is in place; otherwise C must not overlap D.
    /// `beta = 0` ignores what C held. Every address is the start of an allocation
    /// (cuBLASLt's heuristic assumes 256-byte alignment by default).
    #[allow(clippy::too_many_arguments)]
    pub fn matmul(
        &mut self,
        s: GemmShape,
        d: u64,
        c: u64,
        a: u64,
        b: u64,
        alpha: f32,
        beta: f32,
        bias: Option<u64>,
    ) -> Result<()> {
        anyhow::ensure!(s.bias == bias.is_some(), "matmul {s:?}: bias pointer {bias:?}");
        if s.m == 0 || s.n == 0 {
            return Ok(());
        }
        let handle = self.handle;
        let stream = self.stream.cu_stream() as sys::cudaStream_t;
        let ws = self.workspace.device_ptr(&self.stream).0;
        let plan = self.plan(s)?;
        if let Some(bias) = bias {
            // Read by cublasLtMatmul when it enqueues, so setting it per call on the cached
            // descriptor is safe (all calls come through `&mut self`).
            // SAFETY: desc is live; the attribute is a device pointer, passed by address.
            unsafe {
                lt::set_matmul_desc_attribute(
                    plan.desc,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                    &bias as *const u64 as *const c_void,
                    std::mem::size_of::<u64>(),
                )
            }
            .map_err(|e| anyhow::anyhow!("BIAS_POINTER: {e}"))?;
        }
        // SAFETY: descriptors are live, pointers are device buffers of the documented
        // sizes, alpha/beta are host f32 (the default pointer mode).
        unsafe {
            lt::matmul(
                handle,
                plan.desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                b as *const c_void,
                plan.layouts[0],
                a as *const c_void,
                plan.layouts[1],
                c as *const c_void,
                plan.layouts[2],
                d as *mut c_void,
                plan.layouts[2],
                &plan.algo,
                ws as *mut c_void,
                WORKSPACE_BYTES,
                stream,
            )
        }
        .map_err(|e| anyhow::anyhow!("cublasLtMatmul {s:?}: {e}"))
    }
}

impl Drop for BlasLt {
    fn drop(&mut self) {
        // SAFETY: each descriptor was created by this object and is destroyed once.
        unsafe {
            for plan in self.plans.values() {
                for l in plan.layouts {
                    let _ = lt::destroy_matrix_layout(l);
                }
                let _ = lt::destroy_matmul_desc(plan.desc);
            }
            let _ = lt::destroy_handle(self.handle);
        }
    }
}
