// Causal grouped-query attention over packed sequences, flash-style: the forward keeps
// only the output and the log-sum-exp per (query row, head); the backward recomputes the
// probabilities from them. No [S, S] matrix is ever stored.
//
// Geometry (as ops::AttnShape / ops::AttnLayout):
//   q, out, dout, dq [Nq, H * hd];  k, v, dk, dv [Nk, Hkv * hd];  lse, D [Nq, H] f32
//   spans [n_seqs, 4] int: q_start, q_len, k_start, k_len of each sequence. Query i of a
//   span sees keys 0 ..= i + k_len - q_len (bottom-right causal alignment).
//   softmax scale = 1 / sqrt(hd), applied to q.k as the CPU backend does.
//
// Tiling: a block is ROWS = blockDim.x / 32 warps (launched with 4); each warp owns one
// row (a query row in attn_fwd / attn_bwd_dq, a key row in attn_bwd_dkdv). `tiles`
// [n_tiles, 2] int lists (span index, first row index inside the span) for each block,
// built on the host: ceil(len / ROWS) tiles per span. Grid = (n_tiles, H) for the query
// kernels and (n_tiles, Hkv) for attn_bwd_dkdv.
// The other side (keys, or queries in dkdv) is streamed through shared memory in tiles
// of BC rows; lane r of a warp scores row r of the tile, so BC <= 32. BC = 32 for
// hd <= 128 and BC = 16 for hd <= 256 (suffix _bc32 / _bc16); hd > 256 is refused on
// the host. Each lane owns output columns lane, lane + 32, ... (at most 8 of them).
// Dynamic shared memory (floats), hd1 = hd + 1 (padding: lane-per-row reads of a tile
// row are then conflict-free):
//   attn_fwd:      ROWS*hd + BC*hd1 + BC*hd
//   attn_bwd_dq:   2*ROWS*hd + 2*BC*hd1
//   attn_bwd_dkdv: 2*ROWS*hd + 2*BC*hd1 + 2*BC
//
// Rows outside every span are not written: the host zeroes out/dq/dk/dv and fills lse
// with -inf first, which is what the CPU backend returns for them.
//
// Backward, as FlashAttention-2:
//   attn_bwd_dot:  D[i, h] = dout_i . out_i                    (grid-stride, warp per (i, h))
//   attn_bwd_dq:   P_ij = exp(s_ij - lse_i), dS_ij = P_ij (dout_i . v_j - D_i),
//                  dq_i = scale * sum_j dS_ij k_j
//   attn_bwd_dkdv: dk_j = scale * sum_{h in group} sum_i dS_ij q_i,
//                  dv_j = sum_{h in group} sum_i P_ij dout_i
// dk/dv sum over the query heads of a group inside one warp: no atomics, deterministic.

#include "common.cuh"

namespace tl_attn {

constexpr int MAX_COLS_PER_LANE = 8;  // hd <= 256

struct Span {
    int q_start, q_len, k_start, k_len;
};

__device__ __forceinline__ Span load_span(const int* spans, int s) {
    return Span{spans[4 * s], spans[4 * s + 1], spans[4 * s + 2], spans[4 * s + 3]};
}

// Loads `n` rows (row r is global row row0 + r, valid while r < valid) of width hd from a
// matrix of row width `width` at column offset col0 into shared memory with row stride
// `stride`; rows past `valid` are zero.
template <typename T>
__device__ __forceinline__ void load_tile(float* dst, int stride, const T* src, int row0, int valid, int n,
                                          int width, int col0, int hd) {
    for (int idx = threadIdx.x; idx < n * hd; idx += blockDim.x) {
        const int r = idx / hd, c = idx % hd;
        dst[r * stride + c] = r < valid ? tl::load_f32(src + (size_t)(row0 + r) * width + col0 + c) : 0.0f;
    }
}

__device__ __forceinline__ float dot_smem(const float* a, const float* b, int hd) {
    float s = 0.0f;
    for (int c = 0; c < hd; ++c) s += a[c] * b[c];
    return s;
}

template <typename T, int BC>
__device__ void fwd(T* out, float* lse, const T* q, const T* k, const T* v, const int* spans, const int* tiles,
                    int n_heads, int n_kv_heads, int hd, float scale) {
    TL_DYNAMIC_SHARED(float, smem);
    const int rows = blockDim.x / tl::WARP_SIZE;
    const int warp = threadIdx.x / tl::WARP_SIZE, lane = threadIdx.x % tl::WARP_SIZE;
    const int hd1 = hd + 1;
    float* q_s = smem;
    float* k_s = q_s + rows * hd;
    float* v_s = k_s + BC * hd1;

    const Span sp = load_span(spans, tiles[2 * blockIdx.x]);
    const int i0 = tiles[2 * blockIdx.x + 1];
    const int h = blockIdx.y;
    const int kvh = h / (n_heads / n_kv_heads);
    const int wq = n_heads * hd, wk = n_kv_heads * hd;
    const int shift = sp.k_len - sp.q_len;
    const int i = i0 + warp;
    const bool active = i < sp.q_len;
    const int nv = active ? i + shift + 1 : 0;
    const int nv_block = min(i0 + rows, sp.q_len) + shift;  // keys the block's last row sees

    load_tile(q_s, hd, q, sp.q_start + i0, sp.q_len - i0, rows, wq, h * hd, hd);

    float m = -INFINITY, l = 0.0f;
    float acc[MAX_COLS_PER_LANE];
#pragma unroll
    for (int dd = 0; dd < MAX_COLS_PER_LANE; ++dd) acc[dd] = 0.0f;

    for (int j0 = 0; j0 < nv_block; j0 += BC) {
        __syncthreads();
        load_tile(k_s, hd1, k, sp.k_start + j0, nv_block - j0, BC, wk, kvh * hd, hd);
        load_tile(v_s, hd, v, sp.k_start + j0, nv_block - j0, BC, wk, kvh * hd, hd);
        __syncthreads();
        if (!active || j0 >= nv) continue;  // warp-uniform
        float s = -INFINITY;
        if (lane < BC && j0 + lane < nv) s = dot_smem(q_s + warp * hd, k_s + lane * hd1, hd) * scale;
        const float m_new = fmaxf(m, tl::warp_reduce_max(s));
        const float p = s == -INFINITY ? 0.0f : expf(s - m_new);
        const float corr = m == -INFINITY ? 0.0f : expf(m - m_new);
        l = l * corr + tl::warp_reduce_sum(p);
#pragma unroll
        for (int dd = 0; dd < MAX_COLS_PER_LANE; ++dd) acc[dd] *= corr;
        for (int r = 0; r < BC; ++r) {
            const float pr = __shfl_sync(tl::FULL_MASK, p, r);
#pragma unroll
            for (int dd = 0; dd < MAX_COLS_PER_LANE; ++dd) {
                const int c = lane + dd * tl::WARP_SIZE;
                if (c < hd) acc[dd] += pr * v_s[r * hd + c];
            }
        }
        m = m_new;
    }
    if (!active) return;
    const size_t row = (size_t)sp.q_start + i;
#pragma unroll
    for (int dd = 0; dd < MAX_COLS_PER_LANE; ++dd) {
        const int c = lane + dd * tl::WARP_SIZE;
        if (c < hd) tl::store_f32(out + row * wq + h * hd + c, acc[dd] / l);
    }
    if (lane == 0) lse[row * n_heads + h] = m + logf(l);
}

template <typename T>
__device__ void bwd_dot(float* D, const T* dout, const T* out, int nq, int n_heads, int hd) {
    const int lane = threadIdx.x % tl::WARP_SIZE;
    const size_t warps = (size_t)gridDim.x * blockDim.x / tl::WARP_SIZE;
    const size_t total = (size_t)nq * n_heads;
    for (size_t w = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) / tl::WARP_SIZE; w < total; w += warps) {
        const T* a = dout + w * hd;  // row-major [nq, H*hd]: (row, h) is at (row*H + h)*hd
        const T* b = out + w * hd;
        float s = 0.0f;
        for (int c = lane; c < hd; c += tl::WARP_SIZE) s += tl::load_f32(a + c) * tl::load_f32(b + c);
        s = tl::warp_reduce_sum(s);
        if (lane == 0) D[w] = s;
    }
}

template <typename T, int BC>
__device__ void bwd_dq(T* dq, const T* dout, const T* q, const T* k, const T* v, const float* lse, const float* D,
                       const int* spans, const int* tiles, int n_heads, int n_kv_heads, int hd, float scale) {
    TL_DYNAMIC_SHARED(float, smem);
    const int rows = blockDim.x / tl::WARP_SIZE;
    const int warp = threadIdx.x / tl::WARP_SIZE, lane = threadIdx.x % tl::WARP_SIZE;
    const int hd1 = hd + 1;
    float* q_s = smem;
    float* do_s = q_s + rows * hd;
    float* k_s = do_s + rows * hd;
    float* v_s = k_s + BC * hd1;

    const Span sp = load_span(spans, tiles[2 * blockIdx.x]);
    const int i0 = tiles[2 * blockIdx.x + 1];
    const int h = blockIdx.y;
    const int kvh = h / (n_heads / n_kv_heads);
    const int wq = n_heads * hd, wk = n_kv_heads * hd;
    const int shift = sp.k_len - sp.q_len;
    const int i = i0 + warp;
    const bool active = i < sp.q_len;
    const int nv = active ? i + shift + 1 : 0;
    const int nv_block = min(i0 + rows, sp.q_len) + shift;
    const size_t row = (size_t)sp.q_start + i;
    const float lse_i = active ? lse[row * n_heads + h] : 0.0f;
    const float d_i = active ? D[row * n_heads + h] : 0.0f;

    load_tile(q_s, hd, q, sp.q_start + i0, sp.q_len - i0, rows, wq, h * hd, hd);
    load_tile(do_s, hd, dout, sp.q_start + i0, sp.q_len - i0, rows, wq, h * hd, hd);

    float acc[MAX_COLS_PER_LANE];
#pragma unroll
    for (int dd = 0; dd < MAX_COLS_PER_LANE; ++dd) acc[dd] = 0.0f;

    for (int j0 = 0; j0 < nv_block; j0 += BC) {
        __syncthreads();
        load_tile(k_s, hd1, k, sp.k_start + j0, nv_block - j0, BC, wk, kvh * hd, hd);
        load_tile(v_s, hd1, v, sp.k_start + j0, nv_block - j0, BC, wk, kvh * hd, hd);
        __syncthreads();
        if (!active || j0 >= nv) continue;  // warp-uniform
        float ds = 0.0f;
        if (lane < BC && j0 + lane < nv) {
            const float s = dot_smem(q_s + warp * hd, k_s + lane * hd1, hd) * scale;
            const float p = expf(s - lse_i);
            const float dp = dot_smem(do_s + warp * hd, v_s + lane * hd1, hd);
            ds = p * (dp - d_i);
        }
        for (int r = 0; r < BC; ++r) {
            const float dsr = __shfl_sync(tl::FULL_MASK, ds, r);
#pragma unroll
            for (int dd = 0; dd < MAX_COLS_PER_LANE; ++dd) {
                const int c = lane + dd * tl::WARP_SIZE;
                if (c < hd) acc[dd] += scale * dsr * k_s[r * hd1 + c];
            }
        }
    }
    if (!active) return;
#pragma unroll
    for (int dd = 0; dd < MAX_COLS_PER_LANE; ++dd) {
        const int c = lane + dd * tl::WARP_SIZE;
        if (c < hd) tl::store_f32(dq + row * wq + h * hd + c, acc[dd]);
    }
}

template <typename T, int BC>
__device__ void bwd_dkdv(T* dk, T* dv, const T* dout, const T* q, const T* k, const T* v, const float* lse,
                         const float* D, const int* spans, const int* tiles, int n_heads, int n_kv_heads, int hd,
                         float scale) {
    TL_DYNAMIC_SHARED(float, smem);
    const int rows = blockDim.x / tl::WARP_SIZE;
    const int warp = threadIdx.x / tl::WARP_SIZE, lane = threadIdx.x % tl::WARP_SIZE;
    const int hd1 = hd + 1;
    float* k_s = smem;
    float* v_s = k_s + rows * hd;
    float* q_s = v_s + rows * hd;
    float* do_s = q_s + BC * hd1;
    float* lse_s = do_s + BC * hd1;
    float* d_s = lse_s + BC;

    const Span sp = load_span(spans, tiles[2 * blockIdx.x]);
    const int j0 = tiles[2 * blockIdx.x + 1];
    const int kvh = blockIdx.y;
    const int group = n_heads / n_kv_heads;
    const int wq = n_heads * hd, wk = n_kv_heads * hd;
    const int shift = sp.k_len - sp.q_len;
    const int j = j0 + warp;
    const bool active = j < sp.k_len;
    // query i sees key j iff i >= j - shift
    const int first_i = active ? max(j - shift, 0) : sp.q_len;
    const int first_block = max(j0 - shift, 0);

    load_tile(k_s, hd, k, sp.k_start + j0, sp.k_len - j0, rows, wk, kvh * hd, hd);
    load_tile(v_s, hd, v, sp.k_start + j0, sp.k_len - j0, rows, wk, kvh * hd, hd);

    float acc_k[MAX_COLS_PER_LANE], acc_v[MAX_COLS_PER_LANE];
#pragma unroll
    for (int dd = 0; dd < MAX_COLS_PER_LANE; ++dd) acc_k[dd] = acc_v[dd] = 0.0f;

    for (int h = kvh * group; h < (kvh + 1) * group; ++h) {
        for (int i0 = first_block; i0 < sp.q_len; i0 += BC) {
            __syncthreads();
            load_tile(q_s, hd1, q, sp.q_start + i0, sp.q_len - i0, BC, wq, h * hd, hd);
            load_tile(do_s, hd1, dout, sp.q_start + i0, sp.q_len - i0, BC, wq, h * hd, hd);
            for (int r = threadIdx.x; r < BC; r += blockDim.x) {
                const bool ok = i0 + r < sp.q_len;
                const size_t qrow = (size_t)sp.q_start + i0 + r;
                lse_s[r] = ok ? lse[qrow * n_heads + h] : 0.0f;
                d_s[r] = ok ? D[qrow * n_heads + h] : 0.0f;
            }
            __syncthreads();
            if (!active || i0 + BC <= first_i) continue;  // warp-uniform
            float p = 0.0f, ds = 0.0f;
            const int i = i0 + lane;
            if (lane < BC && i < sp.q_len && i >= first_i) {
                const float s = dot_smem(q_s + lane * hd1, k_s + warp * hd, hd) * scale;
                p = expf(s - lse_s[lane]);
                const float dp = dot_smem(do_s + lane * hd1, v_s + warp * hd, hd);
                ds = p * (dp - d_s[lane]);
            }
            for (int r = 0; r < BC; ++r) {
                const float pr = __shfl_sync(tl::FULL_MASK, p, r);
                const float dsr = __shfl_sync(tl::FULL_MASK, ds, r);
#pragma unroll
                for (int dd = 0; dd < MAX_COLS_PER_LANE; ++dd) {
                    const int c = lane + dd * tl::WARP_SIZE;
                    if (c < hd) {
                        acc_k[dd] += scale * dsr * q_s[r * hd1 + c];
                        acc_v[dd] += pr * do_s[r * hd1 + c];
                    }
                }
            }
        }
    }
    if (!active) return;
    const size_t row = (size_t)sp.k_start + j;
#pragma unroll
    for (int dd = 0; dd < MAX_COLS_PER_LANE; ++dd) {
        const int c = lane + dd * tl::WARP_SIZE;
        if (c < hd) {
            tl::store_f32(dk + row * wk + kvh * hd + c, acc_k[dd]);
            tl::store_f32(dv + row * wk + kvh * hd + c, acc_v[dd]);
        }
    }
}

}  // namespace tl_attn

// Entry points, written out (not macro-generated) so their names can be grepped and
// checked against KERNEL_NAMES.
extern "C" __global__ void attn_fwd_f32_bc32(float* out, float* lse, const float* q, const float* k,
                                            const float* v, const int* spans, const int* tiles, int n_heads,
                                            int n_kv_heads, int hd, float scale) {
    tl_attn::fwd<float, 32>(out, lse, q, k, v, spans, tiles, n_heads, n_kv_heads, hd, scale);
}
extern "C" __global__ void attn_bwd_dq_f32_bc32(float* dq, const float* dout, const float* q, const float* k,
                                               const float* v, const float* lse, const float* D,
                                               const int* spans, const int* tiles, int n_heads,
                                               int n_kv_heads, int hd, float scale) {
    tl_attn::bwd_dq<float, 32>(dq, dout, q, k, v, lse, D, spans, tiles, n_heads, n_kv_heads, hd, scale);
}
extern "C" __global__ void attn_bwd_dkdv_f32_bc32(float* dk, float* dv, const float* dout, const float* q,
                                                 const float* k, const float* v, const float* lse,
                                                 const float* D, const int* spans, const int* tiles,
                                                 int n_heads, int n_kv_heads, int hd, float scale) {
    tl_attn::bwd_dkdv<float, 32>(dk, dv, dout, q, k, v, lse, D, spans, tiles, n_heads, n_kv_heads, hd, scale);
}

extern "C" __global__ void attn_fwd_f32_bc16(float* out, float* lse, const float* q, const float* k,
                                            const float* v, const int* spans, const int* tiles, int n_heads,
                                            int n_kv_heads, int hd, float scale) {
    tl_attn::fwd<float, 16>(out, lse, q, k, v, spans, tiles, n_heads, n_kv_heads, hd, scale);
}
extern "C" __global__ void attn_bwd_dq_f32_bc16(float* dq, const float* dout, const float* q, const float* k,
                                               const float* v, const float* lse, const float* D,
                                               const int* spans, const int* tiles, int n_heads,
                                               int n_kv_heads, int hd, float scale) {
    tl_attn::bwd_dq<float, 16>(dq, dout, q, k, v, lse, D, spans, tiles, n_heads, n_kv_heads, hd, scale);
}
extern "C" __global__ void attn_bwd_dkdv_f32_bc16(float* dk, float* dv, const float* dout, const float* q,
                                                 const float* k, const float* v, const float* lse,
                                                 const float* D, const int* spans, const int* tiles,
                                                 int n_heads, int n_kv_heads, int hd, float scale) {
    tl_attn::bwd_dkdv<float, 16>(dk, dv, dout, q, k, v, lse, D, spans, tiles, n_heads, n_kv_heads, hd, scale);
}

extern "C" __global__ void attn_fwd_bf16_bc32(__nv_bfloat16* out, float* lse, const __nv_bfloat16* q, const __nv_bfloat16* k,
                                            const __nv_bfloat16* v, const int* spans, const int* tiles, int n_heads,
                                            int n_kv_heads, int hd, float scale) {
    tl_attn::fwd<__nv_bfloat16, 32>(out, lse, q, k, v, spans, tiles, n_heads, n_kv_heads, hd, scale);
}
extern "C" __global__ void attn_bwd_dq_bf16_bc32(__nv_bfloat16* dq, const __nv_bfloat16* dout, const __nv_bfloat16* q, const __nv_bfloat16* k,
                                               const __nv_bfloat16* v, const float* lse, const float* D,
                                               const int* spans, const int* tiles, int n_heads,
                                               int n_kv_heads, int hd, float scale) {
    tl_attn::bwd_dq<__nv_bfloat16, 32>(dq, dout, q, k, v, lse, D, spans, tiles, n_heads, n_kv_heads, hd, scale);
}
extern "C" __global__ void attn_bwd_dkdv_bf16_bc32(__nv_bfloat16* dk, __nv_bfloat16* dv, const __nv_bfloat16* dout, const __nv_bfloat16* q,
                                                 const __nv_bfloat16* k, const __nv_bfloat16* v, const float* lse,
                                                 const float* D, const int* spans, const int* tiles,
                                                 int n_heads, int n_kv_heads, int hd, float scale) {
    tl_attn::bwd_dkdv<__nv_bfloat16, 32>(dk, dv, dout, q, k, v, lse, D, spans, tiles, n_heads, n_kv_heads, hd, scale);
}

extern "C" __global__ void attn_fwd_bf16_bc16(__nv_bfloat16* out, float* lse, const __nv_bfloat16* q, const __nv_bfloat16* k,
                                            const __nv_bfloat16* v, const int* spans, const int* tiles, int n_heads,
                                            int n_kv_heads, int hd, float scale) {
    tl_attn::fwd<__nv_bfloat16, 16>(out, lse, q, k, v, spans, tiles, n_heads, n_kv_heads, hd, scale);
}
extern "C" __global__ void attn_bwd_dq_bf16_bc16(__nv_bfloat16* dq, const __nv_bfloat16* dout, const __nv_bfloat16* q, const __nv_bfloat16* k,
                                               const __nv_bfloat16* v, const float* lse, const float* D,
                                               const int* spans, const int* tiles, int n_heads,
                                               int n_kv_heads, int hd, float scale) {
    tl_attn::bwd_dq<__nv_bfloat16, 16>(dq, dout, q, k, v, lse, D, spans, tiles, n_heads, n_kv_heads, hd, scale);
}
extern "C" __global__ void attn_bwd_dkdv_bf16_bc16(__nv_bfloat16* dk, __nv_bfloat16* dv, const __nv_bfloat16* dout, const __nv_bfloat16* q,
                                                 const __nv_bfloat16* k, const __nv_bfloat16* v, const float* lse,
                                                 const float* D, const int* spans, const int* tiles,
                                                 int n_heads, int n_kv_heads, int hd, float scale) {
    tl_attn::bwd_dkdv<__nv_bfloat16, 16>(dk, dv, dout, q, k, v, lse, D, spans, tiles, n_heads, n_kv_heads, hd, scale);
}

extern "C" __global__ void attn_bwd_dot_f32(float* D, const float* dout, const float* out, int nq, int n_heads,
                                            int hd) {
    tl_attn::bwd_dot(D, dout, out, nq, n_heads, hd);
}
extern "C" __global__ void attn_bwd_dot_bf16(float* D, const __nv_bfloat16* dout, const __nv_bfloat16* out,
                                             int nq, int n_heads, int hd) {
    tl_attn::bwd_dot(D, dout, out, nq, n_heads, hd);
}
