//! The CUDA backend's tensor: a device buffer of one of two element types, and the rules
//! that say which type a tensor gets.
//!
//! - `upload` and `zeros` make **f32** tensors in both modes: LoRA A/B, their gradients,
//!   AdamW's moments, RoPE tables (what the adapter, optimizer and decoder make that way).
//! - `upload_weight` and every op's output (activations, gradients of activations) are in
//!   the mode's **activation type**: f32 in the f32 mode, bf16 in the bf16 mode. The
//!   exceptions are f32 by nature: RMSNorm's `rstd`, attention's log-sum-exp, losses.
//! - An op converts an operand of the other type to the one its kernel wants (a cast into
//!   a temporary, see [`Operand`]); in-place and data-movement ops (`add_assign`, `rope`,
//!   `copy_rows`, `gather_rows`, `fill_zero`) work on the tensor's own type.
//! - Room after the rows (`CudaTensor::tail`): only the outputs of RMSNorm and SwiGLU
//!   asked for it and the frozen weights given it by `reserve_lora_tail` have any; the
//!   GEMMs and the LoRA dropout read them in place, every other op through a dense copy.
//!
//! In the f32 mode every tensor is f32, so no conversion ever happens there. In the bf16
//! mode a conversion costs a cast kernel and a temporary on every use, so what is used
//! often should be made in the activation type: base weights made with `upload`
//! (`Model::random`, a merged export) and a KV cache made by `zeros` work, but pay that
//! cost each time (LoRA A/B are converted too, but they are `r` rows or columns).

use std::ops::Deref;

use anyhow::{bail, ensure, Result};
use cudarc::driver::CudaSlice;
use half::{bf16, f16};
use rayon::prelude::*;
use safetensors::Dtype;

use super::arena::Tie;
use crate::ops::HostWeight;

/// How the CUDA backend stores activations and base weights, and the element type of one
/// tensor. LoRA weights, their gradients and AdamW states are f32 in both modes.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// Everything f32, TF32 off: the CPU backend's numbers (parity at 1e-4).
    #[default]
    F32,
    /// bf16 activations and base weights, f32 accumulation (the fast mode).
    Bf16,
}

impl DType {
    /// The kernels' name suffix for this storage type (`rope_f32`, `rope_bf16`).
    pub fn suffix(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::Bf16 => "bf16",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::Bf16 => 2,
        }
    }
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

/// A device buffer of `len` f32 or bf16 elements: an allocation of its own from the
/// stream-ordered pool, or a place in the activation arena ([`super::arena`]). Dropping
/// it frees the one or the other.
pub struct CudaBuf {
    ptr: u64,
    len: usize,
    dtype: DType,
    _mem: Mem,
}

enum Mem {
    /// Its own allocation, tied to the arena while the arena records the step it is made in.
    Pool {
        _slice: CudaSlice<u8>,
        _tie: Option<Tie>,
    },
    Region {
        _tie: Tie,
    },
}

impl CudaBuf {
    /// A buffer of the pool (`slice` holds at least `len` elements of `dtype`; `ptr` is
    /// its address).
    pub(super) fn pool(slice: CudaSlice<u8>, ptr: u64, len: usize, dtype: DType, tie: Option<Tie>) -> Self {
        debug_assert!(slice.len() >= len * dtype.size());
        Self { ptr, len, dtype, _mem: Mem::Pool { _slice: slice, _tie: tie } }
    }

    /// A buffer at `ptr` in the arena's region, `len` elements long.
    pub(super) fn region(ptr: u64, len: usize, dtype: DType, tie: Tie) -> Self {
        Self { ptr, len, dtype, _mem: Mem::Region { _tie: tie } }
    }

    /// The device address of the first element.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// Elements.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn bytes(&self) -> usize {
        self.len * self.dtype.size()
    }
}

/// A row-major tensor in device memory. The buffer holds at least one element so that
/// empty tensors need no special case in cudarc; `shape` says how many count.
///
/// A tensor may have `tail` spare elements after each row (rows `cols + tail` apart) and
/// `extra_rows` spare rows after the last: the room an input or output gradient of a
/// LoRA projection, or a frozen weight, keeps for the low-rank path folded into the
/// frozen product (see `kernels/lora.cu`). Only the GEMMs, the dropout, the ops that
/// write such tensors and `download` handle one as it is; every other op gets a dense
/// copy.
pub struct CudaTensor {
    pub buf: CudaBuf,
    pub shape: Vec<usize>,
    pub tail: usize,
    pub extra_rows: usize,
}

impl CudaTensor {
    /// A dense tensor (no room after its rows).
    pub fn new(buf: CudaBuf, shape: Vec<usize>) -> Self {
        Self { buf, shape, tail: 0, extra_rows: 0 }
    }

    /// Whether the tensor is its `numel` elements end to end (no room anywhere).
    pub fn is_dense(&self) -> bool {
        self.tail == 0 && self.extra_rows == 0
    }

    /// Elements from one row's start to the next's.
    pub fn ld(&self) -> usize {
        self.rows_cols().1 + self.tail
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Rows and the width of the last axis, as `CpuTensor::rows_cols`.
    pub fn rows_cols(&self) -> (usize, usize) {
        let cols = self.shape.last().copied().unwrap_or(1);
        (self.numel().checked_div(cols).unwrap_or(0), cols)
    }

    pub fn dtype(&self) -> DType {
        self.buf.dtype()
    }
}

/// An op's operand: the caller's tensor when it already has the type the kernel wants,
/// else a converted copy that lives until the op returns (its memory is freed in stream
/// order, after the kernels that read it).
pub enum Operand<'a> {
    Borrowed(&'a CudaTensor),
    Converted(CudaTensor),
}

impl Deref for Operand<'_> {
    type Target = CudaTensor;
    fn deref(&self) -> &CudaTensor {
        match self {
            Operand::Borrowed(t) => t,
            Operand::Converted(t) => t,
        }
    }
}

/// A checkpoint tensor as bf16 values: bf16 bytes are taken as they are, f32 and f16
/// rounded to nearest even (as PyTorch's `.to(torch.bfloat16)`).
pub fn host_bf16(w: &HostWeight) -> Result<Vec<bf16>> {
    let n: usize = w.shape.iter().product();
    let size = match w.dtype {
        Dtype::BF16 | Dtype::F16 => 2,
        Dtype::F32 => 4,
        other => bail!("tensor `{}` has dtype {other:?}; expected F32, BF16 or F16", w.name),
    };
    ensure!(
        w.bytes.len() == n * size,
        "tensor `{}`: {} bytes of {:?} for shape {:?}",
        w.name,
        w.bytes.len(),
        w.dtype,
        w.shape
    );
    let b = w.bytes;
    Ok(match w.dtype {
        Dtype::BF16 => b.par_chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]])).collect(),
        Dtype::F16 => {
            b.par_chunks_exact(2).map(|c| bf16::from_f32(f16::from_le_bytes([c[0], c[1]]).to_f32())).collect()
        }
        _ => b
            .par_chunks_exact(4)
            .map(|c| bf16::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weight<'a>(dtype: Dtype, shape: &[usize], bytes: &'a [u8]) -> HostWeight<'a> {
        HostWeight { name: "w", shape: shape.to_vec(), dtype, bytes }
    }

    #[test]
    fn checkpoint_tensors_become_bf16_rounded_to_nearest_even() {
        // bf16 steps by 2^-7 above 1: 1 + 2^-8 and 1 + 3·2^-8 are both halfway between
        // two bf16 values, and each goes to the one with an even mantissa (1.0, 1 + 2^-6).
        let vals = [1.0f32, 1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0, -2.5, 1e-3];
        let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let got = host_bf16(&weight(Dtype::F32, &[5], &bytes)).unwrap();
        let got: Vec<f32> = got.iter().map(|v| v.to_f32()).collect();
        assert_eq!(got[..4], [1.0, 1.0, 1.015625, -2.5]);
        assert!((got[4] - 1e-3).abs() < 1e-3 / 128.0);

        let bf: Vec<u8> = [0.5f32, -3.0].iter().flat_map(|&v| bf16::from_f32(v).to_le_bytes()).collect();
        let got = host_bf16(&weight(Dtype::BF16, &[2], &bf)).unwrap();
        assert_eq!(got, [bf16::from_f32(0.5), bf16::from_f32(-3.0)]);

        let h: Vec<u8> = [0.25f32, 7.0].iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()).collect();
        let got = host_bf16(&weight(Dtype::F16, &[1, 2], &h)).unwrap();
        assert_eq!(got, [bf16::from_f32(0.25), bf16::from_f32(7.0)]);
    }

    #[test]
    fn a_byte_count_that_does_not_fit_the_shape_is_an_error() {
        assert!(host_bf16(&weight(Dtype::F32, &[3], &[0; 8])).is_err());
        assert!(host_bf16(&weight(Dtype::I64, &[1], &[0; 8])).is_err());
    }
}
