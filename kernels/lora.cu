// LoRA dropout: inverted dropout whose mask is a pure function of (seed, element index),
// exactly `ops::Dropout::factor` (splitmix64 of seed ^ i * golden ratio, top 24 bits as
// a uniform in [0, 1)), so the backward regenerates the mask and every backend draws
// the same one.
//
// The dropped input drop(x)[i] = x[i] * factor(i) is never written: the three products
// that read it apply the mask as they load x (i is the flat index into the dense
// [n, in] input, as on the CPU; x's rows may be ldx >= in elements apart, an input with
// room for the LoRA path, below):
//
//   xa_dropout:    xa[row, j] = sum_c drop(x)[row, c] * a[j, c]          ([n, r], T)
//       The LoRA path's forward. One warp a group of XA_ROWS rows (grid-stride), its
//       lanes striding the columns (8 at a time where the rows allow 16-byte loads), RC
//       ranks at a time; f32 sums, warp-reduced.
//       Launch: any grid, blockDim.x a multiple of 32.
//   da_dropout:    part[chunk, j, c] = sum over the chunk's rows of dxa[row, j] * drop(x)[row, c]
//       dA's share of each chunk of rows (f32), summed over the chunks in their order by
//       col_sum_acc into dA: deterministic. One thread a column, RC ranks at a time.
//       Launch: grid (ceil(in / blockDim.x), chunks), rows split evenly over the chunks.
//   dx_dropout_acc: dx[row, c] += factor(row * in + c) * sum_j dxa[row, j] * a[j, c]
//       The input gradient's low-rank share added to dx = dy·W (dense), each value
//       rounded once; 8 columns a thread where in is a multiple of 8. Launch: 1-D, any
//       grid.
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

// ranks a pass (sums in registers); a larger rank takes several passes
constexpr int RC = 16;
constexpr int XA_ROWS = 4;

// V = 8 consecutive columns a lane (16-byte loads of x and A) or 1.
template <int V, typename T>
__device__ void xa_dropout_v(T* xa, const T* x, int ldx, const T* a, int n, int in, int r, float p,
                             unsigned long long seed) {
    const int lane = threadIdx.x % 32;
    const int warps = (gridDim.x * blockDim.x) / 32;
    const int warp = (blockIdx.x * blockDim.x + threadIdx.x) / 32;
    for (int row0 = warp * XA_ROWS; row0 < n; row0 += warps * XA_ROWS) {
        for (int j0 = 0; j0 < r; j0 += RC) {
            float acc[XA_ROWS][RC];
#pragma unroll
            for (int k = 0; k < XA_ROWS; ++k) {
#pragma unroll
                for (int j = 0; j < RC; ++j) acc[k][j] = 0.0f;
            }
            for (int c = V * lane; c < in; c += 32 * V) {
                float v[XA_ROWS][V];
#pragma unroll
                for (int k = 0; k < XA_ROWS; ++k) {
                    const int row = row0 + k;
                    if (row < n) {
                        tl::load_n(v[k], x + (size_t)row * ldx + c);
#pragma unroll
                        for (int e = 0; e < V; ++e) v[k][e] *= dropout_factor(seed, (size_t)row * in + c + e, p);
                    } else {
#pragma unroll
                        for (int e = 0; e < V; ++e) v[k][e] = 0.0f;
                    }
                }
#pragma unroll
                for (int j = 0; j < RC; ++j) {
                    if (j0 + j < r) {
                        float aj[V];
                        tl::load_n(aj, a + (size_t)(j0 + j) * in + c);
#pragma unroll
                        for (int k = 0; k < XA_ROWS; ++k) {
#pragma unroll
                            for (int e = 0; e < V; ++e) acc[k][j] += v[k][e] * aj[e];
                        }
                    }
                }
            }
#pragma unroll
            for (int k = 0; k < XA_ROWS; ++k) {
#pragma unroll
                for (int j = 0; j < RC; ++j) {
                    const float total = tl::warp_reduce_sum(acc[k][j]);
                    if (lane == j && row0 + k < n && j0 + j < r) {
                        tl::store_f32(xa + (size_t)(row0 + k) * r + j0 + j, total);
                    }
                }
            }
        }
    }
}

template <typename T>
__device__ void xa_dropout(T* xa, const T* x, int ldx, const T* a, int n, int in, int r, float p,
                           unsigned long long seed) {
    if (in % 8 == 0 && ldx % 8 == 0 && tl::aligned16(x) && tl::aligned16(a)) {
        xa_dropout_v<8>(xa, x, ldx, a, n, in, r, p, seed);
    } else {
        xa_dropout_v<1>(xa, x, ldx, a, n, in, r, p, seed);
    }
}

template <typename T>
__device__ void da_dropout(float* part, const T* dxa, const T* x, int ldx, int n, int in, int r, float p,
                           unsigned long long seed) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    const int chunks = gridDim.y, chunk = blockIdx.y;
    const int per = (n + chunks - 1) / chunks;
    const int r0 = chunk * per, r1 = min(n, r0 + per);
    if (c >= in) return;
    for (int j0 = 0; j0 < r; j0 += RC) {
        float acc[RC];
#pragma unroll
        for (int j = 0; j < RC; ++j) acc[j] = 0.0f;
        for (int row = r0; row < r1; ++row) {
            const float v = tl::load_f32(x + (size_t)row * ldx + c) * dropout_factor(seed, (size_t)row * in + c, p);
#pragma unroll
            for (int j = 0; j < RC; ++j) {
                if (j0 + j < r) acc[j] += tl::load_f32(dxa + (size_t)row * r + j0 + j) * v;
            }
        }
#pragma unroll
        for (int j = 0; j < RC; ++j) {
            if (j0 + j < r) part[((size_t)chunk * r + j0 + j) * in + c] = acc[j];
        }
    }
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

// V = 8 columns a thread (16-byte loads and stores of dx and A, each dxa value loaded once
// for 8 columns) or 1.
template <int V, typename T>
__device__ void dx_dropout_acc_v(T* dx, const T* dxa, const T* a, int n, int in, int r, float p,
                                 unsigned long long seed) {
    tl::for_each_rc((size_t)n, (size_t)(in / V), [&](size_t, size_t row, size_t g) {
        const size_t c0 = g * V, i0 = row * in + c0;
        float s[V];
#pragma unroll
        for (int e = 0; e < V; ++e) s[e] = 0.0f;
        for (int j = 0; j < r; ++j) {
            const float d = tl::load_f32(dxa + row * r + j);
            float av[V];
            tl::load_n(av, a + (size_t)j * in + c0);
#pragma unroll
            for (int e = 0; e < V; ++e) s[e] += d * av[e];
        }
        float v[V];
        tl::load_n(v, dx + i0);
#pragma unroll
        for (int e = 0; e < V; ++e) v[e] += s[e] * dropout_factor(seed, i0 + e, p);
        tl::store_n(dx + i0, v);
    });
}

template <typename T>
__device__ void dx_dropout_acc(T* dx, const T* dxa, const T* a, int n, int in, int r, float p,
                               unsigned long long seed) {
    if (in % 8 == 0 && tl::aligned16(dx) && tl::aligned16(a)) {
        dx_dropout_acc_v<8>(dx, dxa, a, n, in, r, p, seed);
    } else {
        dx_dropout_acc_v<1>(dx, dxa, a, n, in, r, p, seed);
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

extern "C" __global__ void lora_xa_dropout_f32(float* xa, const float* x, int ldx, const float* a, int n, int in,
                                               int r, float p, unsigned long long seed) {
    tl_lora::xa_dropout(xa, x, ldx, a, n, in, r, p, seed);
}
extern "C" __global__ void lora_xa_dropout_bf16(__nv_bfloat16* xa, const __nv_bfloat16* x, int ldx,
                                                const __nv_bfloat16* a, int n, int in, int r, float p,
                                                unsigned long long seed) {
    tl_lora::xa_dropout(xa, x, ldx, a, n, in, r, p, seed);
}
extern "C" __global__ void lora_da_dropout_f32(float* part, const float* dxa, const float* x, int ldx, int n, int in,
                                               int r, float p, unsigned long long seed) {
    tl_lora::da_dropout(part, dxa, x, ldx, n, in, r, p, seed);
}
extern "C" __global__ void lora_da_dropout_bf16(float* part, const __nv_bfloat16* dxa, const __nv_bfloat16* x,
                                                int ldx, int n, int in, int r, float p, unsigned long long seed) {
    tl_lora::da_dropout(part, dxa, x, ldx, n, in, r, p, seed);
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
extern "C" __global__ void lora_dx_dropout_acc_f32(float* dx, const float* dxa, const float* a, int n, int in,
                                                   int r, float p, unsigned long long seed) {
    tl_lora::dx_dropout_acc(dx, dxa, a, n, in, r, p, seed);
}
extern "C" __global__ void lora_dx_dropout_acc_bf16(__nv_bfloat16* dx, const __nv_bfloat16* dxa,
                                                    const __nv_bfloat16* a, int n, int in, int r, float p,
                                                    unsigned long long seed) {
    tl_lora::dx_dropout_acc(dx, dxa, a, n, in, r, p, seed);
}
