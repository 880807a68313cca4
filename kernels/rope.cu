// Rotary position embedding, rotate-half convention (HF): for each head, the pairs
// (x[i], x[i + hd/2]) of row r are rotated by the angle whose cosine and sine are
// cos[r, i], sin[r, i]. sign = +1 is the forward, sign = -1 the backward (the transpose
// rotation, applied to the gradient). In place, on Q and K in one launch.
//
// Layout: q [rows, heads_q * hd], k [rows, heads_k * hd], rows ldq and ldk elements apart
// (>= their widths: room for the LoRA path, lora.cu); cos, sin [rows, hd/2] f32.
// Launch: 1-D, any grid (grid-stride over rows * (heads_q + heads_k) * hd/2 pairs: a
// row's Q pairs, then its K pairs), blockDim.x a multiple of 32.

#include "common.cuh"

namespace tl_rope {

// Index type I: 32-bit where the pair count allows (a 64-bit division per pair costs
// several times the pair's bytes), else 64-bit.
template <typename I, typename T>
__device__ void rotate_impl(T* q, int heads_q, T* k, int heads_k, const float* cos, const float* sin, int rows,
                            int hd, float sign, int ldq, int ldk) {
    const I half = (I)(hd / 2);
    const I q_per_row = (I)heads_q * half, per_row = q_per_row + (I)heads_k * half;
    const I total = (I)rows * per_row;
    for (I g = (I)blockIdx.x * blockDim.x + threadIdx.x; g < total; g += (I)gridDim.x * blockDim.x) {
        const I row = g / per_row, at = g - row * per_row;  // Q's pairs of the row, then K's
        const bool in_q = at < q_per_row;
        const I i = in_q ? at : at - q_per_row;
        const I head = i / half, j = i - head * half;
        T* h = (in_q ? q : k) + (size_t)row * (size_t)(in_q ? ldq : ldk) + head * (I)hd;
        const float c = cos[(size_t)row * half + j];
        const float s = sign * sin[(size_t)row * half + j];
        const float a = tl::load_f32(h + j), b = tl::load_f32(h + j + half);
        tl::store_f32(h + j, a * c - b * s);
        tl::store_f32(h + j + half, b * c + a * s);
    }
}

template <typename T>
__device__ void rotate(T* q, int heads_q, T* k, int heads_k, const float* cos, const float* sin, int rows,
                       int hd, float sign, int ldq, int ldk) {
    const size_t total = (size_t)rows * (size_t)(heads_q + heads_k) * (size_t)(hd / 2);
    if (tl::fits_u32(total)) {
        rotate_impl<unsigned>(q, heads_q, k, heads_k, cos, sin, rows, hd, sign, ldq, ldk);
    } else {
        rotate_impl<size_t>(q, heads_q, k, heads_k, cos, sin, rows, hd, sign, ldq, ldk);
    }
}

}  // namespace tl_rope

extern "C" __global__ void rope_f32(float* q, int heads_q, float* k, int heads_k, const float* cos,
                                    const float* sin, int rows, int hd, float sign, int ldq, int ldk) {
    tl_rope::rotate(q, heads_q, k, heads_k, cos, sin, rows, hd, sign, ldq, ldk);
}
extern "C" __global__ void rope_bf16(__nv_bfloat16* q, int heads_q, __nv_bfloat16* k, int heads_k,
                                     const float* cos, const float* sin, int rows, int hd, float sign, int ldq,
                                     int ldk) {
    tl_rope::rotate(q, heads_q, k, heads_k, cos, sin, rows, hd, sign, ldq, ldk);
}
