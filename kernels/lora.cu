// LoRA dropout: inverted dropout whose mask is a pure function of (seed, element index),
// exactly `ops::Dropout::factor` (splitmix64 of seed ^ i * golden ratio, top 24 bits as
// a uniform in [0, 1)), so the backward regenerates the mask and every backend draws
// the same one.
//
//   dropout_fwd:      out[i] = x[i] * factor(i)
//   dropout_bwd_acc:  dx[i] += g[i] * factor(i)     (g: gradient of the dropped input)
//
// Launch: 1-D, any grid (grid-stride), blockDim.x a multiple of 32. The element index i
// is the flat index into the [rows, in] input, as on the CPU.

#include "common.cuh"

namespace tl_lora {

__device__ __forceinline__ float dropout_factor(unsigned long long seed, unsigned long long i, float p) {
    unsigned long long z = seed ^ (i * 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    const float u = (float)(z >> 40) / 16777216.0f;
    return u < p ? 0.0f : 1.0f / (1.0f - p);
}

template <typename T>
__device__ void dropout_fwd(T* out, const T* x, size_t n, float p, unsigned long long seed) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        tl::store_f32(out + i, tl::load_f32(x + i) * dropout_factor(seed, i, p));
    }
}

template <typename T>
__device__ void dropout_bwd_acc(T* dx, const T* g, size_t n, float p, unsigned long long seed) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        tl::store_f32(dx + i, tl::load_f32(dx + i) + tl::load_f32(g + i) * dropout_factor(seed, i, p));
    }
}

}  // namespace tl_lora

extern "C" __global__ void lora_dropout_fwd_f32(float* out, const float* x, size_t n, float p,
                                                unsigned long long seed) {
    tl_lora::dropout_fwd(out, x, n, p, seed);
}
extern "C" __global__ void lora_dropout_fwd_bf16(__nv_bfloat16* out, const __nv_bfloat16* x, size_t n,
                                                 float p, unsigned long long seed) {
    tl_lora::dropout_fwd(out, x, n, p, seed);
}
extern "C" __global__ void lora_dropout_bwd_acc_f32(float* dx, const float* g, size_t n, float p,
                                                    unsigned long long seed) {
    tl_lora::dropout_bwd_acc(dx, g, n, p, seed);
}
extern "C" __global__ void lora_dropout_bwd_acc_bf16(__nv_bfloat16* dx, const __nv_bfloat16* g, size_t n,
                                                     float p, unsigned long long seed) {
    tl_lora::dropout_bwd_acc(dx, g, n, p, seed);
}
