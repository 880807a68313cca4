//! The CUDA kernels, compiled by `build.rs` from `kernels/*.cu` into one fatbin
//! (SASS for sm_90a and sm_80, PTX for compute_90 and newer) and embedded here.
//!
//! The fatbin exists only when the build found `nvcc`: it looks for `$NVCC`, then
//! `$CUDA_HOME/bin/nvcc`, then `nvcc` on `PATH`. To build with kernels on a machine
//! without CUDA, install CUDA 13.0's compiler from PyPI into a cached virtualenv and
//! point `NVCC` at it:
//!
//! ```text
//! eval "$(scripts/nvcc-env.sh)"    # prints `export NVCC=...`
//! cargo build --release
//! ```
//!
//! Without `nvcc`, [`FATBIN`] is `None` and only the CPU backend can run.
//! `TUNELOOP_REQUIRE_KERNELS=1` makes a build without `nvcc` fail instead.

/// The fatbin holding every kernel in [`KERNEL_NAMES`], or `None` when the crate was
/// built without `nvcc`. Load it with `CudaContext::load_module(Ptx::from_binary(..))`.
#[cfg(tuneloop_kernels)]
pub const FATBIN: Option<&[u8]> = Some({
    // cuModuleLoadData reads the image in place; keep it 16-byte aligned like nvcc's
    // own embedded fatbins rather than at include_bytes!'s alignment of 1.
    #[repr(C, align(16))]
    struct Aligned<T: ?Sized>(T);
    const ALIGNED: &Aligned<[u8]> =
        &Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/tuneloop_kernels.fatbin")));
    &ALIGNED.0
});

/// The fatbin holding every kernel in [`KERNEL_NAMES`], or `None` when the crate was
/// built without `nvcc`. Load it with `CudaContext::load_module(Ptx::from_binary(..))`.
#[cfg(not(tuneloop_kernels))]
pub const FATBIN: Option<&[u8]> = None;

/// What to tell a user who asks for the CUDA backend of a build without kernels.
pub const NO_KERNELS_HELP: &str = "this tuneloop was built without CUDA kernels (no nvcc at \
     build time); rebuild with nvcc available: set NVCC=/path/to/nvcc (e.g. \
     `eval \"$(scripts/nvcc-env.sh)\"`) or CUDA_HOME, then `cargo build --release`";

/// The `extern "C"` entry points in [`FATBIN`], one per kernel. Signatures and launch
/// rules are documented beside each kernel in `kernels/*.cu`.
pub const KERNEL_NAMES: &[&str] = &[
    // kernels/adamw.cu
    "adamw_multi",
    "sum_squares_multi",
    "clip_norm",
    // kernels/attention.cu
    "attn_fwd_f32_bc32",
    "attn_bwd_dq_f32_bc32",
    "attn_bwd_dkdv_f32_bc32",
    "attn_fwd_f32_bc16",
    "attn_bwd_dq_f32_bc16",
    "attn_bwd_dkdv_f32_bc16",
    "attn_fwd_bf16_bc32",
    "attn_bwd_dq_bf16_bc32",
    "attn_bwd_dkdv_bf16_bc32",
    "attn_fwd_bf16_bc16",
    "attn_bwd_dq_bf16_bc16",
    "attn_bwd_dkdv_bf16_bc16",
    "attn_bwd_dot_f32",
    "attn_bwd_dot_bf16",
    "attn_fwd_mma_bf16_hd64",
    "attn_fwd_mma_bf16_hd128",
    "attn_bwd_dq_mma_bf16_hd64",
    "attn_bwd_dq_mma_bf16_hd128",
    "attn_bwd_dkdv_mma_bf16_hd64",
    "attn_bwd_dkdv_mma_bf16_hd128",
    "attn_fwd_wgmma_bf16_hd64",
    "attn_fwd_wgmma_bf16_hd128",
    "attn_bwd_dq_wgmma_bf16_hd64",
    "attn_bwd_dq_wgmma_bf16_hd128",
    "attn_bwd_dkdv_wgmma_bf16_hd64",
    "attn_bwd_dkdv_wgmma_bf16_hd128",
    // kernels/cross_entropy.cu
    "cross_entropy_f32",
    "cross_entropy_bf16",
    "loss_sums_add",
    "argmax_rows_f32",
    "argmax_rows_bf16",
    // kernels/embedding.cu
    "embedding_fwd_f32",
    "embedding_fwd_bf16",
    "embedding_bwd_f32",
    "embedding_bwd_bf16",
    // kernels/lora.cu
    "lora_xa_dropout_f32",
    "lora_xa_dropout_bf16",
    "lora_da_dropout_f32",
    "lora_da_dropout_bf16",
    "lora_dx_dropout_acc_f32",
    "lora_dx_dropout_acc_bf16",
    "lora_tails_f32",
    "lora_tails_bf16",
    "lora_rows_f32",
    "lora_rows_bf16",
    // kernels/rmsnorm.cu
    "rmsnorm_fwd_f32",
    "rmsnorm_fwd_bf16",
    "rmsnorm_bwd_f32",
    "rmsnorm_bwd_bf16",
    "rmsnorm_dw_reduce",
    // kernels/rope.cu
    "rope_f32",
    "rope_bf16",
    // kernels/swiglu.cu
    "swiglu_fwd_f32",
    "swiglu_fwd_bf16",
    "swiglu_bwd_f32",
    "swiglu_bwd_bf16",
    // kernels/util.cu
    "add_assign_f32",
    "copy_2d_f32",
    "copy_2d_bf16",
    "add_assign_bf16",
    "add_assign_f32_bf16",
    "add_assign_bf16_f32",
    "scale_f32",
    "scale_bf16",
    "cast_f32_to_bf16",
    "cast_bf16_to_f32",
    "gather_rows_f32",
    "gather_rows_bf16",
    "add_bias_rows_f32",
    "add_bias_rows_bf16",
    "col_sum_acc_f32",
    "col_sum_acc_bf16",
    "cast_f32_to_bf16_multi",
    "zero_multi",
    // kernels/wgmma.cu
    "wgmma_probe_n64_bf16",
    "wgmma_probe_n128_bf16",
];

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::path::Path;

    /// Every `extern "C" __global__` function defined in kernels/*.cu.
    fn entry_points_in_sources() -> BTreeSet<String> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
        let mut names = BTreeSet::new();
        for entry in std::fs::read_dir(&dir).expect("kernels/ exists") {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "cu") {
                continue;
            }
            let source = std::fs::read_to_string(&path).unwrap();
            for (start, _) in source.match_indices("extern \"C\" __global__") {
                let mut rest = &source[start..];
                // The name is the identifier before the first '(' that does not belong
                // to __launch_bounds__(...).
                loop {
                    let open = rest.find('(').expect("kernel has a parameter list");
                    let name = rest[..open]
                        .trim_end()
                        .rsplit(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                        .next()
                        .unwrap();
                    if name == "__launch_bounds__" {
                        let close = rest[open..].find(')').expect("closed __launch_bounds__");
                        rest = &rest[open + close + 1..];
                        continue;
                    }
                    names.insert(name.to_string());
                    break;
                }
            }
        }
        names
    }

    #[test]
    fn kernel_names_match_the_sources() {
        let listed: BTreeSet<String> = KERNEL_NAMES.iter().map(|s| s.to_string()).collect();
        assert_eq!(listed.len(), KERNEL_NAMES.len(), "duplicate in KERNEL_NAMES");
        assert_eq!(listed, entry_points_in_sources());
    }

    #[test]
    fn fatbin_is_present_exactly_when_built_with_kernels() {
        assert_eq!(FATBIN.is_some(), cfg!(tuneloop_kernels));
        if let Some(fatbin) = FATBIN {
            // A fatbin starts with its magic number 0xBA55ED50 (little-endian).
            assert!(fatbin.len() > 16);
            assert_eq!(&fatbin[..4], &0xBA55_ED50u32.to_le_bytes());
            assert_eq!(fatbin.as_ptr() as usize % 16, 0);
        }
    }
}
