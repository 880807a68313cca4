//! Choosing a backend at run time. [`Ops`](super::Ops) has associated types, so it cannot
//! be a trait object; instead [`AnyBackend`] holds one of the backends and
//! [`with_backend!`](crate::with_backend) runs generic code on whichever it holds:
//!
//! ```no_run
//! use tuneloop::ops::backend::{select, BackendKind};
//! use tuneloop::ops::cuda::DType;
//! use tuneloop::ops::Ops;
//!
//! let backend = select(BackendKind::Auto, DType::F32)?;
//! let name = tuneloop::with_backend!(&backend, |ops| ops.name());
//! println!("running on {name}");
//! # anyhow::Ok(())
//! ```

use anyhow::{bail, Result};

use super::cpu::CpuOps;
use super::cuda::{CudaOps, DType};

/// Which backend a command or a recipe asks for (`cpu`, `cuda`, `auto`).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// The f32 reference backend.
    Cpu,
    /// The CUDA backend on device 0; an error when it cannot run.
    Cuda,
    /// CUDA when this build has kernels and a GPU is there, else the CPU.
    #[default]
    Auto,
}

impl std::str::FromStr for BackendKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(BackendKind::Cpu),
            "cuda" => Ok(BackendKind::Cuda),
            "auto" => Ok(BackendKind::Auto),
            _ => bail!("unknown backend {s:?}: expected cpu, cuda or auto"),
        }
    }
}

/// One of the backends, chosen at run time.
pub enum AnyBackend {
    Cpu(CpuOps),
    Cuda(Box<CudaOps>),
}

impl AnyBackend {
    pub fn name(&self) -> &'static str {
        use super::Ops;
        crate::with_backend!(self, |ops| ops.name())
    }

    /// What this backend computes in: the CPU backend always in f32.
    pub fn dtype(&self) -> DType {
        match self {
            AnyBackend::Cpu(_) => DType::F32,
            AnyBackend::Cuda(cuda) => cuda.dtype(),
        }
    }
}

/// Opens the backend `kind` asks for. `dtype` applies to CUDA; the CPU backend is f32
/// only, so asking it for bf16 is an error, and `Auto` falling back to the CPU says why
/// in a log line.
pub fn select(kind: BackendKind, dtype: DType) -> Result<AnyBackend> {
    select_on(kind, dtype, 0, false)
}

/// [`select`] on GPU `ordinal`. With `cpu_computes_f32`, a bf16 request that ends on the
/// CPU backend (asked for, or `Auto` without CUDA) runs in f32 instead of failing: a
/// recipe's `model.dtype` describes the GPU run, and the CPU is always exact.
pub fn select_on(
    kind: BackendKind,
    dtype: DType,
    ordinal: usize,
    cpu_computes_f32: bool,
) -> Result<AnyBackend> {
    let cpu = |why: Option<anyhow::Error>| -> Result<AnyBackend> {
        if dtype != DType::F32 && !cpu_computes_f32 {
            match why {
                Some(e) => bail!("bf16 needs the CUDA backend, which cannot run here: {e:#}"),
                None => bail!("the CPU backend computes in f32 only; use --dtype f32"),
            }
        }
        if let Some(e) = why {
            tracing::info!("using the CPU backend: CUDA is not available ({e:#})");
        }
        Ok(AnyBackend::Cpu(CpuOps))
    };
    match kind {
        BackendKind::Cpu => cpu(None),
        BackendKind::Cuda => Ok(AnyBackend::Cuda(Box::new(CudaOps::new(ordinal, dtype)?))),
        BackendKind::Auto => match CudaOps::new(ordinal, dtype) {
            Ok(ops) => Ok(AnyBackend::Cuda(Box::new(ops))),
            Err(e) => cpu(Some(e)),
        },
    }
}

/// Runs `$body` with `$ops` bound to the backend inside an `&AnyBackend` (a `&CpuOps` or
/// a `&CudaOps`), so generic code over `O: Ops` runs on either. The body is compiled once
/// per backend.
#[macro_export]
macro_rules! with_backend {
    ($backend:expr, |$ops:ident| $body:expr) => {
        match $backend {
            $crate::ops::backend::AnyBackend::Cpu(cpu) => {
                let $ops: &$crate::ops::cpu::CpuOps = cpu;
                $body
            }
            $crate::ops::backend::AnyBackend::Cuda(cuda) => {
                let $ops: &$crate::ops::cuda::CudaOps = cuda;
                $body
            }
        }
    };
}
