// Token cross-entropy with PyTorch's ignore_index = -100, fused with its gradient.
//
// One block per row (grid = rows, blockDim.x a power of two, <= 1024). The row is read
// in chunks with an online max/sum (each thread keeps its own running max and the sum
// rescaled to it; the block then merges them), so any vocabulary size works, 128k
// included, without holding the row in shared memory.
//
//   row_loss[r]  = logsumexp(x_r) - x_r[t_r]                    (0 for an ignored row)
//   row_flag[r]  = 0 ignored, 1 counted, 2 counted and argmax == t_r (first max wins)
//   dlogits[r,j] = (softmax(x_r)_j - [j == t_r]) * grad_scale   (0 on ignored rows;
//                  pass dlogits = nullptr to skip)
//
// targets are int32 and were checked on the host (-100 or in [0, vocab)).
//
// loss_sums_add: sums[0] += Σ row_loss of counted rows, sums[1] += counted rows,
//                sums[2] += rows predicted right, in f64. One block of 256 threads (any
//                number of rows): each thread sums its rows r ≡ threadIdx.x (mod 256) in
//                order, then a fixed tree, so the sums are the same bits on every run.
//                Queued after cross_entropy_*, it lets a step's chunks add up their
//                losses on the device: the host reads the three sums once.

#include "common.cuh"

namespace tl_ce {

constexpr int IGNORE_INDEX = -100;

// The block's largest of the threads' (value, index) pairs, the lowest index among equal
// values, into s_val[0] and s_idx[0] (shared scratch of blockDim.x each, a power of two).
// It waits for every thread first, so the scratch may hold what the last call left.
__device__ void block_argmax(float m, int arg, float* s_val, int* s_idx) {
    __syncthreads();
    s_val[threadIdx.x] = m;
    s_idx[threadIdx.x] = arg;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
        if ((int)threadIdx.x < stride) {
            const float vo = s_val[threadIdx.x + stride];
            const int io = s_idx[threadIdx.x + stride];
            const float vm = s_val[threadIdx.x];
            if (vo > vm || (vo == vm && io < s_idx[threadIdx.x])) {
                s_val[threadIdx.x] = vo;
                s_idx[threadIdx.x] = io;
            }
        }
        __syncthreads();
    }
}

// V = 8 values a thread at a time (16-byte loads and stores) or 1; s_val, s_idx: shared
// scratch of blockDim.x each.
template <int V, typename T>
__device__ void ce_v(float* row_loss, int* row_flag, T* dlogits, const T* logits, const int* targets, int rows,
                     int vocab, float grad_scale, float* s_val, int* s_idx) {
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
        const T* x = logits + (size_t)row * vocab;
        T* d = dlogits == nullptr ? nullptr : dlogits + (size_t)row * vocab;
        const int t = targets[row];
        if (t == IGNORE_INDEX) {
            if (d != nullptr) {
                for (int j = threadIdx.x; j < vocab; j += blockDim.x) tl::store_f32(d + j, 0.0f);
            }
            if (threadIdx.x == 0) {
                row_loss[row] = 0.0f;
                row_flag[row] = 0;
            }
            continue;
        }
        // online max / sum of exp and argmax, per thread, over its values in increasing
        // index order
        // (a -inf logit, a masked entry, adds nothing: exp(-inf - -inf) would be a NaN
        // while the thread has seen nothing larger; a row of them has argmax 0, as the
        // host's)
        constexpr int NO_ARG = 0x7fffffff;
        float m = -INFINITY, s = 0.0f;
        int arg = NO_ARG;
        for (int j = V * threadIdx.x; j < vocab; j += V * blockDim.x) {
            float v[V];
            tl::load_n(v, x + j);
#pragma unroll
            for (int e = 0; e < V; ++e) {
                if (v[e] > m) {
                    s = s * expf(m - v[e]) + 1.0f;
                    m = v[e];
                    arg = j + e;
                } else if (v[e] != -INFINITY) {
                    s += expf(v[e] - m);
                } else if (arg == NO_ARG) {
                    arg = j + e;
                }
            }
        }
        // merge: block max, then argmax with the lowest index among equal maxima
        block_argmax(m, arg, s_val, s_idx);
        const float row_max = s_val[0];
        const int row_arg = s_idx[0];
        const float scaled = m == -INFINITY ? 0.0f : s * expf(m - row_max);
        const float sum = tl::block_reduce_sum(scaled);
        const float lse = row_max + logf(sum);
        if (threadIdx.x == 0) {
            row_loss[row] = lse - tl::load_f32(x + t);
            row_flag[row] = row_arg == t ? 2 : 1;
        }
        if (d != nullptr) {
            for (int j = V * threadIdx.x; j < vocab; j += V * blockDim.x) {
                float v[V];
                tl::load_n(v, x + j);
#pragma unroll
                for (int e = 0; e < V; ++e) v[e] = (expf(v[e] - lse) - (j + e == t ? 1.0f : 0.0f)) * grad_scale;
                tl::store_n(d + j, v);
            }
        }
    }
}

// Rows of 8k values with 16-byte alignment (every model's vocabulary size is a multiple
// of 8) take 16-byte loads and stores.
template <typename T>
__device__ void ce(float* row_loss, int* row_flag, T* dlogits, const T* logits, const int* targets, int rows,
                   int vocab, float grad_scale) {
    TL_SHARED(float, s_val, [1024]);
    TL_SHARED(int, s_idx, [1024]);
    if (vocab % 8 == 0 && tl::aligned16(logits) && (dlogits == nullptr || tl::aligned16(dlogits))) {
        ce_v<8>(row_loss, row_flag, dlogits, logits, targets, rows, vocab, grad_scale, s_val, s_idx);
    } else {
        ce_v<1>(row_loss, row_flag, dlogits, logits, targets, rows, vocab, grad_scale, s_val, s_idx);
    }
}

}  // namespace tl_ce

extern "C" __global__ void __launch_bounds__(1024)
cross_entropy_f32(float* row_loss, int* row_flag, float* dlogits, const float* logits, const int* targets,
                  int rows, int vocab, float grad_scale) {
    tl_ce::ce(row_loss, row_flag, dlogits, logits, targets, rows, vocab, grad_scale);
}
extern "C" __global__ void __launch_bounds__(1024)
cross_entropy_bf16(float* row_loss, int* row_flag, __nv_bfloat16* dlogits, const __nv_bfloat16* logits,
                   const int* targets, int rows, int vocab, float grad_scale) {
    tl_ce::ce(row_loss, row_flag, dlogits, logits, targets, rows, vocab, grad_scale);
}

constexpr int LOSS_SUMS_THREADS = 256;  // the launcher's LOSS_SUMS_BLOCK

extern "C" __global__ void __launch_bounds__(256)
loss_sums_add(double* sums, const float* row_loss, const int* row_flag, int rows) {
    TL_SHARED(double, s_loss, [LOSS_SUMS_THREADS]);
    TL_SHARED(double, s_counted, [LOSS_SUMS_THREADS]);
    TL_SHARED(double, s_correct, [LOSS_SUMS_THREADS]);
    double loss = 0.0, counted = 0.0, correct = 0.0;
    for (int r = threadIdx.x; r < rows; r += LOSS_SUMS_THREADS) {
        const int f = row_flag[r];
        if (f > 0) {
            loss += (double)row_loss[r];
            counted += 1.0;
            correct += f == 2 ? 1.0 : 0.0;
        }
    }
    s_loss[threadIdx.x] = loss;
    s_counted[threadIdx.x] = counted;
    s_correct[threadIdx.x] = correct;
    __syncthreads();
    for (int stride = LOSS_SUMS_THREADS / 2; stride > 0; stride /= 2) {
        if ((int)threadIdx.x < stride) {
            s_loss[threadIdx.x] += s_loss[threadIdx.x + stride];
            s_counted[threadIdx.x] += s_counted[threadIdx.x + stride];
            s_correct[threadIdx.x] += s_correct[threadIdx.x + stride];
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        sums[0] += s_loss[0];
        sums[1] += s_counted[0];
        sums[2] += s_correct[0];
    }
}

// argmax_rows: out[r] = the index of row r's largest value, the first of equal ones, as
// the host's argmax (a fold that keeps the first value no later one exceeds): a NaN at
// index 0 is the answer, other NaNs are passed over. Greedy decoding's next tokens, so
// that only they come to the host. One block per row (grid-strided over the rows),
// blockDim.x a power of two, at most 1024.
namespace tl_ce {

template <typename T>
__device__ void argmax_rows(unsigned* out, const T* x, int rows, int cols) {
    TL_SHARED(float, s_val, [1024]);
    TL_SHARED(int, s_idx, [1024]);
    constexpr int NONE = 0x7fffffff;
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
        const T* r = x + (size_t)row * cols;
        // this thread's values in increasing index order: the first largest
        float m = -INFINITY;
        int arg = NONE;
        for (int j = threadIdx.x; j < cols; j += blockDim.x) {
            const float v = tl::load_f32(r + j);
            if (v > m || (v == m && arg == NONE)) {
                m = v;
                arg = j;
            }
        }
        block_argmax(m, arg, s_val, s_idx);
        if (threadIdx.x == 0) {
            const float first = tl::load_f32(r);
            out[row] = (first != first || s_idx[0] == NONE) ? 0u : (unsigned)s_idx[0];
        }
    }
}

}  // namespace tl_ce

extern "C" __global__ void __launch_bounds__(1024)
argmax_rows_f32(unsigned* out, const float* x, int rows, int cols) {
    tl_ce::argmax_rows(out, x, rows, cols);
}
extern "C" __global__ void __launch_bounds__(1024)
argmax_rows_bf16(unsigned* out, const __nv_bfloat16* x, int rows, int cols) {
    tl_ce::argmax_rows(out, x, rows, cols);
}
