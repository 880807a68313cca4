// Rotary position embedding, rotate-half convention (HF): for each head, the pairs
// (x[i], x[i + hd/2]) of row r are rotated by the angle whose cosine and sine are
// cos[r, i], sin[r, i]. sign = +1 is the forward, sign = -1 the backward (the transpose
// rotation, applied to the gradient). In place, on Q and K in one launch.
//
// Layout: q [rows, heads_q * hd], k [rows, heads_k * hd], rows ldq and ldk elements apart
// (>= their widths: room for the LoRA path, lora.cu); cos, sin [rows, hd/2] f32.
// Launch: 1-D, any grid (grid-stride over rows * (heads_q + heads_k) * hd/2 pairs: Q's
// first, then K's), blockDim.x a multiple of 32.

#include "common.cuh"

namespace tl_rope {

template <typename T>
__device__ void rotate(T* q, int heads_q, T* k, int heads_k, const float* cos, const float* sin, int rows,
                       int hd, float sign, int ldq, int ldk) {
    const int half = hd / 2;
    const size_t q_pairs = (size_t)rows * heads_q * half;
    const size_t total = q_pairs + (size_t)rows * heads_k * half;
    for (size_t g = (size_t)blockIdx.x * blockDim.x + threadIdx.x; g < total; g += (size_t)gridDim.x * blockDim.x) {
        const bool in_q = g < q_pairs;
        const size_t i = in_q ? g : g - q_pairs;
        const int heads = in_q ? heads_q : heads_k;
        const size_t j = i % half;
        const size_t head = (i / half) % heads;
        const size_t row = i / ((size_t)half * heads);
        T* h = (in_q ? q : k) + row * (size_t)(in_q ? ldq : ldk) + head * hd;
        const float c = cos[row * half + j];
        const float s = sign * sin[row * half + j];
        const float a = tl::load_f32(h + j), b = tl::load_f32(h + j + half);
        tl::store_f32(h + j, a * c - b * s);
        tl::store_f32(h + j + half, b * c + a * s);
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
