// Rotary position embedding, rotate-half convention (HF): for each head, the pairs
// (x[i], x[i + hd/2]) of row r are rotated by the angle whose cosine and sine are
// cos[r, i], sin[r, i]. sign = +1 is the forward, sign = -1 the backward (the transpose
// rotation, applied to the gradient). In place.
//
// Layout: x [rows, heads * hd]; cos, sin [rows, hd/2] f32. Launch: 1-D, any grid
// (grid-stride over rows * heads * hd/2 pairs), blockDim.x a multiple of 32.

#include "common.cuh"

namespace tl_rope {

template <typename T>
__device__ void rotate(T* x, const float* cos, const float* sin, int rows, int heads, int hd, float sign) {
    const int half = hd / 2;
    const size_t total = (size_t)rows * heads * half;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const size_t k = i % half;
        const size_t head = (i / half) % heads;
        const size_t row = i / ((size_t)half * heads);
        T* h = x + row * (size_t)heads * hd + head * hd;
        const float c = cos[row * half + k];
        const float s = sign * sin[row * half + k];
        const float a = tl::load_f32(h + k), b = tl::load_f32(h + k + half);
        tl::store_f32(h + k, a * c - b * s);
        tl::store_f32(h + k + half, b * c + a * s);
    }
}

}  // namespace tl_rope

extern "C" __global__ void rope_f32(float* x, const float* cos, const float* sin, int rows, int heads, int hd,
                                    float sign) {
    tl_rope::rotate(x, cos, sin, rows, heads, hd, sign);
}
extern "C" __global__ void rope_bf16(__nv_bfloat16* x, const float* cos, const float* sin, int rows, int heads,
                                     int hd, float sign) {
    tl_rope::rotate(x, cos, sin, rows, heads, hd, sign);
}
