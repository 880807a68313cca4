// SwiGLU: h = silu(gate) * up, silu(g) = g * sigmoid(g).
//   backward: dgate = dh * up * s * (1 + g * (1 - s)),  dup = dh * silu(g),  s = sigmoid(g)
//
// Layout: all [n] (flattened [rows, inter]), except the forward's h and the backward's
// dgate and dup, whose rows of `width` values are `ld` >= width apart (room for the LoRA
// path of the projections that read them, see lora.cu; left alone here). Launch: 1-D,
// any grid, blockDim.x % 32 == 0.

#include "common.cuh"

namespace tl_swiglu {

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

template <typename T> __device__ void fwd(T* h, const T* gate, const T* up, size_t n, int width, int ldh) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float g = tl::load_f32(gate + i);
        const size_t at = ldh == width ? i : i / width * ldh + i % width;
        tl::store_f32(h + at, g * sigmoid(g) * tl::load_f32(up + i));
    }
}

template <typename T>
__device__ void bwd(T* dgate, T* dup, const T* dh, const T* gate, const T* up, size_t n, int width, int ld) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float g = tl::load_f32(gate + i), u = tl::load_f32(up + i), d = tl::load_f32(dh + i);
        const float s = sigmoid(g);
        const size_t at = ld == width ? i : i / width * ld + i % width;
        tl::store_f32(dgate + at, d * u * s * (1.0f + g * (1.0f - s)));
        tl::store_f32(dup + at, d * (g * s));
    }
}

}  // namespace tl_swiglu

extern "C" __global__ void swiglu_fwd_f32(float* h, const float* gate, const float* up, size_t n, int width,
                                          int ldh) {
    tl_swiglu::fwd(h, gate, up, n, width, ldh);
}
extern "C" __global__ void swiglu_fwd_bf16(__nv_bfloat16* h, const __nv_bfloat16* gate, const __nv_bfloat16* up,
                                           size_t n, int width, int ldh) {
    tl_swiglu::fwd(h, gate, up, n, width, ldh);
}
extern "C" __global__ void swiglu_bwd_f32(float* dgate, float* dup, const float* dh, const float* gate,
                                          const float* up, size_t n, int width, int ld) {
    tl_swiglu::bwd(dgate, dup, dh, gate, up, n, width, ld);
}
extern "C" __global__ void swiglu_bwd_bf16(__nv_bfloat16* dgate, __nv_bfloat16* dup, const __nv_bfloat16* dh,
                                           const __nv_bfloat16* gate, const __nv_bfloat16* up, size_t n, int width,
                                           int ld) {
    tl_swiglu::bwd(dgate, dup, dh, gate, up, n, width, ld);
}
