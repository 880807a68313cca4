// SwiGLU: h = silu(gate) * up, silu(g) = g * sigmoid(g).
//   backward: dgate = dh * up * s * (1 + g * (1 - s)),  dup = dh * silu(g),  s = sigmoid(g)
//
// Layout: all [n] (flattened [rows, width]), except the forward's h and the backward's
// dgate and dup, whose rows of `width` values are `ld` >= width apart (room for the LoRA
// path of the projections that read them, see lora.cu; left alone here). Launch: 1-D,
// any grid, blockDim.x % 32 == 0.
//
// Memory-bound: each thread takes 8 consecutive values of a row with 16-byte loads and
// stores where widths, row strides and pointers allow (every model's intermediate size
// is a multiple of 8), and indexes in 32 bits where n allows (a 64-bit division per
// value costs more than the value's bytes).

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

// Groups of 8 values (V = 8) or single values (V = 1) of rows of `width`, index type I.
template <typename I, int V, typename T>
__device__ void fwd_impl(T* h, const T* gate, const T* up, I n, I width, I ldh) {
    const I groups = n / V, per_row = width / V;
    for (I i = (I)blockIdx.x * blockDim.x + threadIdx.x; i < groups; i += (I)gridDim.x * blockDim.x) {
        const I r = i / per_row, c = (i - r * per_row) * V;
        float g[8], u[8], y[8];
        if (V == 8) {
            tl::load8(g, gate + i * V);
            tl::load8(u, up + i * V);
        } else {
            g[0] = tl::load_f32(gate + i);
            u[0] = tl::load_f32(up + i);
        }
#pragma unroll
        for (int j = 0; j < V; ++j) y[j] = fwd_value(g[j], u[j]);
        if (V == 8) {
            tl::store8(h + r * ldh + c, y);
        } else {
            tl::store_f32(h + r * ldh + c, y[0]);
        }
    }
}

template <typename I, int V, typename T>
__device__ void bwd_impl(T* dgate, T* dup, const T* dh, const T* gate, const T* up, I n, I width, I ld) {
    const I groups = n / V, per_row = width / V;
    for (I i = (I)blockIdx.x * blockDim.x + threadIdx.x; i < groups; i += (I)gridDim.x * blockDim.x) {
        const I r = i / per_row, c = (i - r * per_row) * V;
        float g[8], u[8], d[8], dg[8], du[8];
        if (V == 8) {
            tl::load8(g, gate + i * V);
            tl::load8(u, up + i * V);
            tl::load8(d, dh + i * V);
        } else {
            g[0] = tl::load_f32(gate + i);
            u[0] = tl::load_f32(up + i);
            d[0] = tl::load_f32(dh + i);
        }
#pragma unroll
        for (int j = 0; j < V; ++j) bwd_value(d[j], g[j], u[j], dg[j], du[j]);
        if (V == 8) {
            tl::store8(dgate + r * ld + c, dg);
            tl::store8(dup + r * ld + c, du);
        } else {
            tl::store_f32(dgate + r * ld + c, dg[0]);
            tl::store_f32(dup + r * ld + c, du[0]);
        }
    }
}

template <typename T> __device__ void fwd(T* h, const T* gate, const T* up, size_t n, int width, int ldh) {
    if (width <= 0) return;
    const bool vec = width % 8 == 0 && ldh % 8 == 0 && tl::aligned16(h) && tl::aligned16(gate) && tl::aligned16(up);
    if (tl::fits_u32(n)) {
        const unsigned n32 = (unsigned)n, w = (unsigned)width, ld = (unsigned)ldh;
        vec ? fwd_impl<unsigned, 8>(h, gate, up, n32, w, ld) : fwd_impl<unsigned, 1>(h, gate, up, n32, w, ld);
    } else {
        vec ? fwd_impl<size_t, 8>(h, gate, up, n, (size_t)width, (size_t)ldh)
            : fwd_impl<size_t, 1>(h, gate, up, n, (size_t)width, (size_t)ldh);
    }
}

template <typename T>
__device__ void bwd(T* dgate, T* dup, const T* dh, const T* gate, const T* up, size_t n, int width, int ld) {
    if (width <= 0) return;
    const bool vec = width % 8 == 0 && ld % 8 == 0 && tl::aligned16(dgate) && tl::aligned16(dup) &&
                     tl::aligned16(dh) && tl::aligned16(gate) && tl::aligned16(up);
    if (tl::fits_u32(n)) {
        const unsigned n32 = (unsigned)n, w = (unsigned)width, l = (unsigned)ld;
        vec ? bwd_impl<unsigned, 8>(dgate, dup, dh, gate, up, n32, w, l)
            : bwd_impl<unsigned, 1>(dgate, dup, dh, gate, up, n32, w, l);
    } else {
        vec ? bwd_impl<size_t, 8>(dgate, dup, dh, gate, up, n, (size_t)width, (size_t)ld)
            : bwd_impl<size_t, 1>(dgate, dup, dh, gate, up, n, (size_t)width, (size_t)ld);
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
