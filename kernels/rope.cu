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

// Rows and pairs come from tl::for_each_rc (32-bit arithmetic where the pair count
// allows: a 64-bit division per pair costs several times the pair's bytes).
template <typename T>
__device__ void rotate(T* q, int heads_q, T* k, int heads_k, const float* cos, const float* sin, int rows,
                       int hd, float sign, int ldq, int ldk) {
    const unsigned half = (unsigned)(hd / 2), q_per_row = (unsigned)heads_q * half;
    const size_t per_row = q_per_row + (size_t)heads_k * half;
    tl::for_each_rc((size_t)rows, per_row, [&](size_t, size_t row, size_t at_row) {
        const unsigned at = (unsigned)at_row;  // Q's pairs of the row, then K's
        const bool in_q = at < q_per_row;
        const unsigned i = in_q ? at : at - q_per_row;
        const unsigned head = i / half, j = i - head * half;
        T* h = (in_q ? q : k) + row * (size_t)(in_q ? ldq : ldk) + (size_t)head * hd;
        const float c = cos[row * half + j];
        const float s = sign * sin[row * half + j];
        const float a = tl::load_f32(h + j), b = tl::load_f32(h + j + half);
        tl::store_f32(h + j, a * c - b * s);
        tl::store_f32(h + j + half, b * c + a * s);
    });
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
