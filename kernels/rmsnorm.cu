// RMSNorm as HF's LlamaRMSNorm / Qwen2RMSNorm computes it, forward and backward.
//
//   forward:   rstd = 1 / sqrt(mean(x^2) + eps)
//              y    = w * (x * rstd)
//   backward:  xhat = x * rstd,  g = dy * w
//              dx   = rstd * (g - xhat * mean(g * xhat))   (+ dx's own value with
//                     `accumulate`: the residual stream's gradient, added in this pass)
//              dw  += sum over rows of dy * xhat
//
// Everything runs in f32 and is rounded once, to the output's type. HF's bf16 model
// rounds x * rstd to bf16 before the weight as well (`weight * hidden.to(input_dtype)`);
// that extra rounding is left out: it only adds error against the exact result, and it
// raised the gradient error of the bf16 golden parity by about a third. Likewise the
// backward is slightly more precise than PyTorch autograd on a bf16 model (which rounds
// dy * w to bf16 before the f32 part).
//
// Layout: x, y, dy, dx are [rows, d] row-major; w is [d]; rstd is [rows] f32, written by
// the forward for the backward (pass nullptr in the forward when no backward follows).
// The forward's y rows and the backward's dx rows are `ldy` / `ldx` >= d elements apart:
// the columns past d are room the LoRA path of the projections that read them fills (see
// lora.cu); these kernels leave it alone. Outputs must not alias inputs.
//
// Launch: 1-D blocks, blockDim.x a multiple of 32, at most 1024. Each block handles one
// row at a time and strides over rows, so any grid is correct; the forward is normally
// launched with one block per row (grid = rows). Threads stride over a row's columns, 8
// at a time with 16-byte loads and stores when d and the row strides are multiples of 8
// and the pointers 16-byte aligned (every model's hidden size), else one at a time: d
// can be any size.
//
// dw: base weights are frozen in LoRA training, so dw is usually not wanted; pass
// dw_partial = nullptr and the backward skips it. When wanted, it takes two launches and
// no atomics (deterministic, and no contention on d addresses):
//   1. rmsnorm_bwd_*: block b sums dy * round_T(xhat) over its rows into its own row of
//      an f32 scratch dw_partial [gridDim.x, d]. The scratch needs no zeroing: each
//      block overwrites its row on its first row (a block with no rows writes zeros).
//   2. rmsnorm_dw_reduce: dw[c] += sum_b dw_partial[b, c], with num_partials = the grid
//      size of step 1. dw is f32 and accumulates, so gradient accumulation over
//      micro-batches works; zero it at the start of an accumulation window.
// Launch step 1 with grid = min(rows, a few blocks per SM) to keep the scratch small.

#include "common.cuh"

// V = 8 columns a thread at a time (16-byte loads and stores) or 1.
template <int V, typename T>
__device__ __forceinline__ void rmsnorm_fwd_v(T* __restrict__ y, float* __restrict__ rstd_out,
                                              const T* __restrict__ x, const T* __restrict__ w, int rows, int d,
                                              int ldy, float eps) {
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
        const T* xr = x + (size_t)row * d;
        T* yr = y + (size_t)row * ldy;

        float sum_sq = 0.0f;
        for (int c = V * threadIdx.x; c < d; c += V * blockDim.x) {
            float v[V];
            tl::load_n(v, xr + c);
#pragma unroll
            for (int e = 0; e < V; ++e) sum_sq += v[e] * v[e];
        }
        sum_sq = tl::block_reduce_sum(sum_sq);
        const float rstd = rsqrtf(sum_sq / (float)d + eps);
        if (rstd_out != nullptr && threadIdx.x == 0) rstd_out[row] = rstd;

        for (int c = V * threadIdx.x; c < d; c += V * blockDim.x) {
            float v[V], wv[V];
            tl::load_n(v, xr + c);
            tl::load_n(wv, w + c);
#pragma unroll
            for (int e = 0; e < V; ++e) v[e] = wv[e] * (v[e] * rstd);
            tl::store_n(yr + c, v);
        }
    }
}

template <typename T>
__device__ __forceinline__ void rmsnorm_fwd_impl(T* y, float* rstd_out, const T* x, const T* w, int rows, int d,
                                                 int ldy, float eps) {
    if (d % 8 == 0 && ldy % 8 == 0 && tl::aligned16(y) && tl::aligned16(x) && tl::aligned16(w)) {
        rmsnorm_fwd_v<8>(y, rstd_out, x, w, rows, d, ldy, eps);
    } else {
        rmsnorm_fwd_v<1>(y, rstd_out, x, w, rows, d, ldy, eps);
    }
}

template <int V, typename T>
__device__ __forceinline__ void rmsnorm_bwd_v(T* __restrict__ dx, float* __restrict__ dw_partial,
                                              const T* __restrict__ dy, const T* __restrict__ x,
                                              const T* __restrict__ w, const float* __restrict__ rstd, int rows,
                                              int d, int ldx, int accumulate) {
    float* dw_row = dw_partial == nullptr ? nullptr : dw_partial + (size_t)blockIdx.x * d;
    if (dw_row != nullptr && (int)blockIdx.x >= rows) {
        // More blocks than rows: this block's scratch row must still read as zero.
        for (int c = threadIdx.x; c < d; c += blockDim.x) dw_row[c] = 0.0f;
    }

    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
        const T* xr = x + (size_t)row * d;
        const T* dyr = dy + (size_t)row * d;
        T* dxr = dx + (size_t)row * ldx;
        const float r = rstd[row];
        const bool first_row = row == (int)blockIdx.x;

        // mean(g * xhat) = rstd * sum(g * x) / d
        float dot = 0.0f;
        for (int c = V * threadIdx.x; c < d; c += V * blockDim.x) {
            float dyv[V], wv[V], xv[V];
            tl::load_n(dyv, dyr + c);
            tl::load_n(wv, w + c);
            tl::load_n(xv, xr + c);
#pragma unroll
            for (int e = 0; e < V; ++e) dot += dyv[e] * wv[e] * xv[e];
        }
        const float mean_g_xhat = tl::block_reduce_sum(dot) * r / (float)d;

        for (int c = V * threadIdx.x; c < d; c += V * blockDim.x) {
            float dyv[V], wv[V], xv[V], out[V];
            tl::load_n(dyv, dyr + c);
            tl::load_n(wv, w + c);
            tl::load_n(xv, xr + c);
            if (accumulate) tl::load_n(out, dxr + c);
#pragma unroll
            for (int e = 0; e < V; ++e) {
                const float xhat = xv[e] * r;
                const float grad = r * (dyv[e] * wv[e] - xhat * mean_g_xhat);
                out[e] = accumulate ? out[e] + grad : grad;
                if (dw_row != nullptr) {
                    // Thread t always owns the same columns of dw_row: no race.
                    dw_row[c + e] = first_row ? dyv[e] * xhat : dw_row[c + e] + dyv[e] * xhat;
                }
            }
            tl::store_n(dxr + c, out);
        }
    }
}

template <typename T>
__device__ __forceinline__ void rmsnorm_bwd_impl(T* dx, float* dw_partial, const T* dy, const T* x, const T* w,
                                                 const float* rstd, int rows, int d, int ldx, int accumulate) {
    if (d % 8 == 0 && ldx % 8 == 0 && tl::aligned16(dx) && tl::aligned16(dy) && tl::aligned16(x) &&
        tl::aligned16(w)) {
        rmsnorm_bwd_v<8>(dx, dw_partial, dy, x, w, rstd, rows, d, ldx, accumulate);
    } else {
        rmsnorm_bwd_v<1>(dx, dw_partial, dy, x, w, rstd, rows, d, ldx, accumulate);
    }
}

extern "C" __global__ void __launch_bounds__(1024)
rmsnorm_fwd_f32(float* y, float* rstd, const float* x, const float* w, int rows, int d, int ldy,
                float eps) {
    rmsnorm_fwd_impl(y, rstd, x, w, rows, d, ldy, eps);
}

extern "C" __global__ void __launch_bounds__(1024)
rmsnorm_fwd_bf16(__nv_bfloat16* y, float* rstd, const __nv_bfloat16* x, const __nv_bfloat16* w,
                 int rows, int d, int ldy, float eps) {
    rmsnorm_fwd_impl(y, rstd, x, w, rows, d, ldy, eps);
}

extern "C" __global__ void __launch_bounds__(1024)
rmsnorm_bwd_f32(float* dx, float* dw_partial, const float* dy, const float* x, const float* w,
                const float* rstd, int rows, int d, int ldx, int accumulate) {
    rmsnorm_bwd_impl(dx, dw_partial, dy, x, w, rstd, rows, d, ldx, accumulate);
}

extern "C" __global__ void __launch_bounds__(1024)
rmsnorm_bwd_bf16(__nv_bfloat16* dx, float* dw_partial, const __nv_bfloat16* dy,
                 const __nv_bfloat16* x, const __nv_bfloat16* w, const float* rstd, int rows,
                 int d, int ldx, int accumulate) {
    rmsnorm_bwd_impl(dx, dw_partial, dy, x, w, rstd, rows, d, ldx, accumulate);
}

// dw[c] += sum over b < num_partials of dw_partial[b, c]   (both f32; dw_partial [num_partials, d]),
// deterministic (tl::col_sum_acc). Launch: grid = ceil(d / 32), 1-D blocks of a multiple of
// 32 threads (at most 1024).
extern "C" __global__ void __launch_bounds__(1024)
rmsnorm_dw_reduce(float* __restrict__ dw, const float* __restrict__ dw_partial, int num_partials,
                  int d) {
    tl::col_sum_acc(dw, dw_partial, num_partials, d);
}
