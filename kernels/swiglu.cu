// SwiGLU: h = silu(gate) * up, silu(g) = g * sigmoid(g).
//   backward: dgate = dh * up * s * (1 + g * (1 - s)),  dup = dh * silu(g),  s = sigmoid(g)
//
// Layout: all [n] (flattened [rows, width]), except the forward's h and the backward's
// dgate and dup, whose rows of `width` values are `ld` >= width apart (room for the LoRA
// path of the projections that read them, see lora.cu; left alone here). The backward
// also writes h (dense, [n]) when given one: a training backward that did not keep h
// gets it there without a second pass over gate and up. Launch: 1-D, any grid,
// blockDim.x % 32 == 0.
//
// Memory-bound: each thread takes 8 consecutive values of a row with 16-byte loads and
// stores where widths, row strides and pointers allow (every model's intermediate size
// is a multiple of 8); rows and columns come from tl::for_each_rc (32-bit arithmetic).

#include "common.cuh"

namespace tl_swiglu {

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

__device__ __forceinline__ float fwd_value(float g, float u) { return g * sigmoid(g) * u; }

// (dgate, dup) of one value
__device__ __forceinline__ void bwd_value(float d, float g, float u, float& dg, float& du) {
    const float s = sigmoid(g);
    dg = d * u * s * (1.0f + g * (1.0f - s));
    du = d * (g * s);
}

// V = 8 values a thread (16-byte loads and stores) or 1, over `rows` rows of `width`.
template <int V, typename T>
__device__ void fwd_v(T* h, const T* gate, const T* up, size_t rows, int width, int ldh) {
    tl::for_each_rc(rows, (size_t)(width / V), [&](size_t i, size_t r, size_t cv) {
        float g[V], u[V];
        tl::load_n(g, gate + i * V);
        tl::load_n(u, up + i * V);
#pragma unroll
        for (int j = 0; j < V; ++j) g[j] = fwd_value(g[j], u[j]);
        tl::store_n(h + r * ldh + cv * V, g);
    });
}

template <int V, typename T>
__device__ void bwd_v(T* dgate, T* dup, T* h, const T* dh, const T* gate, const T* up, size_t rows, int width,
                      int ld) {
    tl::for_each_rc(rows, (size_t)(width / V), [&](size_t i, size_t r, size_t cv) {
        float g[V], u[V], d[V], dg[V], du[V];
        tl::load_n(g, gate + i * V);
        tl::load_n(u, up + i * V);
        tl::load_n(d, dh + i * V);
#pragma unroll
        for (int j = 0; j < V; ++j) bwd_value(d[j], g[j], u[j], dg[j], du[j]);
        tl::store_n(dgate + r * ld + cv * V, dg);
        tl::store_n(dup + r * ld + cv * V, du);
        if (h != nullptr) {  // uniform
#pragma unroll
            for (int j = 0; j < V; ++j) g[j] = fwd_value(g[j], u[j]);
            tl::store_n(h + i * V, g);
        }
    });
}

template <typename T> __device__ void fwd(T* h, const T* gate, const T* up, size_t n, int width, int ldh) {
    if (width <= 0) return;
    const size_t rows = n / width;
    if (width % 8 == 0 && ldh % 8 == 0 && tl::aligned16(h) && tl::aligned16(gate) && tl::aligned16(up)) {
        fwd_v<8>(h, gate, up, rows, width, ldh);
    } else {
        fwd_v<1>(h, gate, up, rows, width, ldh);
    }
}

template <typename T>
__device__ void bwd(T* dgate, T* dup, T* h, const T* dh, const T* gate, const T* up, size_t n, int width, int ld) {
    if (width <= 0) return;
    const size_t rows = n / width;
    if (width % 8 == 0 && ld % 8 == 0 && tl::aligned16(dgate) && tl::aligned16(dup) && tl::aligned16(h) &&
        tl::aligned16(dh) && tl::aligned16(gate) && tl::aligned16(up)) {
        bwd_v<8>(dgate, dup, h, dh, gate, up, rows, width, ld);
    } else {
        bwd_v<1>(dgate, dup, h, dh, gate, up, rows, width, ld);
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
extern "C" __global__ void swiglu_bwd_f32(float* dgate, float* dup, float* h, const float* dh, const float* gate,
                                          const float* up, size_t n, int width, int ld) {
    tl_swiglu::bwd(dgate, dup, h, dh, gate, up, n, width, ld);
}
extern "C" __global__ void swiglu_bwd_bf16(__nv_bfloat16* dgate, __nv_bfloat16* dup, __nv_bfloat16* h,
                                           const __nv_bfloat16* dh, const __nv_bfloat16* gate,
                                           const __nv_bfloat16* up, size_t n, int width, int ld) {
    tl_swiglu::bwd(dgate, dup, h, dh, gate, up, n, width, ld);
}
