// LoRA dropout: inverted dropout whose mask is a pure function of (seed, element index),
// exactly `ops::Dropout::factor` (splitmix64 of seed ^ i * golden ratio, top 24 bits as
// a uniform in [0, 1)), so the backward regenerates the mask and every backend draws
// the same one.
//
//   dropout_fwd:      out[i] = x[i] * factor(i)
//   dropout_bwd_acc:  dx[i] += g[i] * factor(i)     (g: gradient of the dropped input)
//
// Launch: 1-D, any grid (grid-stride), blockDim.x a multiple of 32. The element index i
// is the flat index into the [rows, in] input, as on the CPU. The forward's x may have
// rows `ldx` >= in elements apart (an input with room for the LoRA path, below); out is
// dense.
//
// The LoRA path inside the frozen product. With x [n, in] stored in rows of ldx >= in + r
// and W [out, in] in rows of ldw >= in + r, one GEMM over K = in + r computes
//     [x | scale·(x·Aᵀ)] · [W | B]ᵀ = x·Wᵀ + scale·(x·Aᵀ)·Bᵀ
// so the low-rank update needs no second pass over y. lora_tails fills the room:
//   x[i, in + j] = scale · xa[i, j]   (xa [n, r], dense)
//   w[o, in + j] = b[o, j]            (b [out, r], dense)
// every element rounded once to the tensor's type. Launch: 1-D, any grid.
//
// The backward folds the same way on the other side. With dy [n, out] in rows of
// ldy >= out + r and r more rows after W's out holding A,
//     [dy | dxa] · [W ; A] = dy·W + dxa·A     (dxa = scale·dy·B, [n, r])
// is the input gradient in one GEMM over K = out + r, without a second pass over dx.
// lora_rows fills them:
//   dy[i, out + j] = dxa[i, j]        (dxa dense)
//   w[out + j, c]  = a[j, c]          (a [r, in], dense; W's rows ldw apart)

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
__device__ void dropout_fwd(T* out, const T* x, size_t n, int in, int ldx, float p, unsigned long long seed) {
    if (in <= 0) return;
    tl::for_each_rc(n / in, (size_t)in, [&](size_t i, size_t r, size_t c) {
        tl::store_f32(out + i, tl::load_f32(x + r * ldx + c) * dropout_factor(seed, i, p));
    });
}

template <typename T>
__device__ void tails(T* x, int ldx, int in, const T* xa, int n, int r, float scale, T* w, int ldw, const T* b,
                      int out) {
    const size_t nx = (size_t)n * r, total = nx + (size_t)out * r;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        if (i < nx) {
            tl::store_f32(x + i / r * ldx + in + i % r, scale * tl::load_f32(xa + i));
        } else {
            const size_t j = i - nx;
            w[j / r * ldw + in + j % r] = b[j];
        }
    }
}

template <typename T>
__device__ void dropout_bwd_acc(T* dx, const T* g, size_t n, float p, unsigned long long seed) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        tl::store_f32(dx + i, tl::load_f32(dx + i) + tl::load_f32(g + i) * dropout_factor(seed, i, p));
    }
}

template <typename T>
__device__ void rows(T* dy, int ldy, int out, const T* dxa, int n, int r, T* w, int ldw, const T* a, int in) {
    const size_t ny = (size_t)n * r, total = ny + (size_t)r * in;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        if (i < ny) {
            dy[i / r * ldy + out + i % r] = dxa[i];
        } else {
            const size_t j = i - ny;
            w[(out + j / in) * ldw + j % in] = a[j];
        }
    }
}

}  // namespace tl_lora

extern "C" __global__ void lora_dropout_fwd_f32(float* out, const float* x, size_t n, int in, int ldx, float p,
                                                unsigned long long seed) {
    tl_lora::dropout_fwd(out, x, n, in, ldx, p, seed);
}
extern "C" __global__ void lora_dropout_fwd_bf16(__nv_bfloat16* out, const __nv_bfloat16* x, size_t n, int in,
                                                 int ldx, float p, unsigned long long seed) {
    tl_lora::dropout_fwd(out, x, n, in, ldx, p, seed);
}
extern "C" __global__ void lora_tails_f32(float* x, int ldx, int in, const float* xa, int n, int r, float scale,
                                          float* w, int ldw, const float* b, int out) {
    tl_lora::tails(x, ldx, in, xa, n, r, scale, w, ldw, b, out);
}
extern "C" __global__ void lora_rows_f32(float* dy, int ldy, int out, const float* dxa, int n, int r, float* w,
                                         int ldw, const float* a, int in) {
    tl_lora::rows(dy, ldy, out, dxa, n, r, w, ldw, a, in);
}
extern "C" __global__ void lora_rows_bf16(__nv_bfloat16* dy, int ldy, int out, const __nv_bfloat16* dxa, int n,
                                          int r, __nv_bfloat16* w, int ldw, const __nv_bfloat16* a, int in) {
    tl_lora::rows(dy, ldy, out, dxa, n, r, w, ldw, a, in);
}
extern "C" __global__ void lora_tails_bf16(__nv_bfloat16* x, int ldx, int in, const __nv_bfloat16* xa, int n,
                                           int r, float scale, __nv_bfloat16* w, int ldw, const __nv_bfloat16* b,
                                           int out) {
    tl_lora::tails(x, ldx, in, xa, n, r, scale, w, ldw, b, out);
}
extern "C" __global__ void lora_dropout_bwd_acc_f32(float* dx, const float* g, size_t n, float p,
                                                    unsigned long long seed) {
    tl_lora::dropout_bwd_acc(dx, g, n, p, seed);
}
extern "C" __global__ void lora_dropout_bwd_acc_bf16(__nv_bfloat16* dx, const __nv_bfloat16* g, size_t n,
                                                     float p, unsigned long long seed) {
    tl_lora::dropout_bwd_acc(dx, g, n, p, seed);
}
