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


// ---- forward on tensor cores (bf16, head_dim 64 or 128) ----------------------------
//
// A block of MMA_WARPS warps takes MMA_BR = 64 query rows of one (span, head), `tiles`
// counting in steps of 64; warp w owns rows 16w .. 16w+15 and keeps them in registers:
// its Q fragments, its [16, HD] output accumulator and each row's running max and sum.
// Keys stream through shared memory in tiles of MMA_BC = 64: K and V as bf16, row stride
// HD + 8 elements. S = Q·Kᵀ and O += P·V are mma.sync.m16n8k16 products (bf16 in, f32
// accumulation); P is rounded to bf16 for the second product, as FlashAttention does,
// while the row sums and the log-sum-exp come from the f32 probabilities.
// Dynamic shared memory: 2 * MMA_BC * (HD + 8) bf16.

constexpr int MMA_WARPS = 4, MMA_BR = 16 * MMA_WARPS, MMA_BC = 64;

template <int HD>
__device__ void fwd_mma(__nv_bfloat16* out, float* lse, const __nv_bfloat16* q, const __nv_bfloat16* k,
                        const __nv_bfloat16* v, const int* spans, const int* tiles, int n_heads, int n_kv_heads,
                        float scale) {
    constexpr int LD = HD + 8;
    TL_DYNAMIC_SHARED(float, smem);
    __nv_bfloat16* k_s = reinterpret_cast<__nv_bfloat16*>(smem);
    __nv_bfloat16* v_s = k_s + MMA_BC * LD;
    const int warp = threadIdx.x / tl::WARP_SIZE, lane = threadIdx.x % tl::WARP_SIZE;
    const int g = lane / 4, t = lane % 4;

    const Span sp = load_span(spans, tiles[2 * blockIdx.x]);
    const int i0 = tiles[2 * blockIdx.x + 1];
    const int h = blockIdx.y;
    const int kvh = h / (n_heads / n_kv_heads);
    const int wq = n_heads * HD, wk = n_kv_heads * HD;
    const int shift = sp.k_len - sp.q_len;
    const int r0 = i0 + 16 * warp;
    const int nv_block = min(i0 + MMA_BR, sp.q_len) + shift;  // keys the block's last row sees
    const int nv_warp = min(r0 + 16, sp.q_len) + shift;        // ... and the warp's
    // This lane's two rows (span-relative): r0 + g and r0 + g + 8.
    const int row[2] = {r0 + g, r0 + g + 8};

    uint32_t qf[HD / 16][4];
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int r = row[j % 2], c = 16 * kk + 2 * t + 8 * (j / 2);
            const __nv_bfloat16* src = q + (size_t)(sp.q_start + r) * wq + h * HD + c;
            qf[kk][j] = r < sp.q_len ? tl::pack_bf16(src[0], src[1]) : 0u;
        }
    }
    float o[HD / 8][4];
#pragma unroll
    for (int dn = 0; dn < HD / 8; ++dn) o[dn][0] = o[dn][1] = o[dn][2] = o[dn][3] = 0.0f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};

    for (int j0 = 0; j0 < nv_block; j0 += MMA_BC) {
        __syncthreads();
        for (int idx = threadIdx.x; idx < MMA_BC * HD / 2; idx += blockDim.x) {
            const int r = idx / (HD / 2), c = 2 * (idx % (HD / 2));
            uint32_t kw = 0u, vw = 0u;
            if (j0 + r < nv_block) {
                const size_t src = (size_t)(sp.k_start + j0 + r) * wk + kvh * HD + c;
                kw = tl::pack_bf16(k[src], k[src + 1]);
                vw = tl::pack_bf16(v[src], v[src + 1]);
            }
            *reinterpret_cast<uint32_t*>(k_s + r * LD + c) = kw;
            *reinterpret_cast<uint32_t*>(v_s + r * LD + c) = vw;
        }
        __syncthreads();
        if (r0 >= sp.q_len || j0 >= nv_warp) continue;  // warp-uniform

        float s[MMA_BC / 8][4];
#pragma unroll
        for (int nt = 0; nt < MMA_BC / 8; ++nt) {
            s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
            const __nv_bfloat16* kr = k_s + (8 * nt + g) * LD + 2 * t;
#pragma unroll
            for (int kk = 0; kk < HD / 16; ++kk) {
                const uint32_t b[2] = {*reinterpret_cast<const uint32_t*>(kr + 16 * kk),
                                       *reinterpret_cast<const uint32_t*>(kr + 16 * kk + 8)};
                tl::mma_bf16_16816(s[nt], qf[kk], b);
            }
        }
        // Scale, mask (causal, bottom-right aligned; rows past the span see nothing),
        // then the online softmax per row: a row's 64 scores sit in the 4 lanes of a group.
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int nt = 0; nt < MMA_BC / 8; ++nt) {
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int r = row[j / 2], key = j0 + 8 * nt + 2 * t + j % 2;
                const bool seen = r < sp.q_len && key <= r + shift;
                s[nt][j] = seen ? s[nt][j] * scale : -INFINITY;
                mx[j / 2] = fmaxf(mx[j / 2], s[nt][j]);
            }
        }
        float corr[2], sum[2] = {0.0f, 0.0f};
#pragma unroll
        for (int x = 0; x < 2; ++x) {
            mx[x] = fmaxf(mx[x], __shfl_xor_sync(tl::FULL_MASK, mx[x], 1));
            mx[x] = fmaxf(mx[x], __shfl_xor_sync(tl::FULL_MASK, mx[x], 2));
            const float m_new = fmaxf(m[x], mx[x]);
            corr[x] = m[x] == -INFINITY ? 0.0f : expf(m[x] - m_new);
            m[x] = m_new;
        }
#pragma unroll
        for (int nt = 0; nt < MMA_BC / 8; ++nt) {
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const float p = s[nt][j] == -INFINITY ? 0.0f : expf(s[nt][j] - m[j / 2]);
                s[nt][j] = p;
                sum[j / 2] += p;
            }
        }
#pragma unroll
        for (int x = 0; x < 2; ++x) {
            sum[x] += __shfl_xor_sync(tl::FULL_MASK, sum[x], 1);
            sum[x] += __shfl_xor_sync(tl::FULL_MASK, sum[x], 2);
            l[x] = l[x] * corr[x] + sum[x];
        }
#pragma unroll
        for (int dn = 0; dn < HD / 8; ++dn) {
            o[dn][0] *= corr[0];
            o[dn][1] *= corr[0];
            o[dn][2] *= corr[1];
            o[dn][3] *= corr[1];
        }
        // O += P·V: the accumulator layout of two adjacent S tiles is the A layout of
        // one 16-key step; B is V's [16 keys, 8 columns] block.
#pragma unroll
        for (int ks = 0; ks < MMA_BC / 16; ++ks) {
            const uint32_t a[4] = {tl::pack_bf16(s[2 * ks][0], s[2 * ks][1]),
                                   tl::pack_bf16(s[2 * ks][2], s[2 * ks][3]),
                                   tl::pack_bf16(s[2 * ks + 1][0], s[2 * ks + 1][1]),
                                   tl::pack_bf16(s[2 * ks + 1][2], s[2 * ks + 1][3])};
            const __nv_bfloat16* vr = v_s + (16 * ks + 2 * t) * LD + g;
#pragma unroll
            for (int dn = 0; dn < HD / 8; ++dn) {
                const uint32_t b[2] = {tl::pack_bf16(vr[8 * dn], vr[LD + 8 * dn]),
                                       tl::pack_bf16(vr[8 * LD + 8 * dn], vr[9 * LD + 8 * dn])};
                tl::mma_bf16_16816(o[dn], a, b);
            }
        }
    }
#pragma unroll
    for (int x = 0; x < 2; ++x) {
        if (row[x] >= sp.q_len) continue;
        const size_t grow = (size_t)sp.q_start + row[x];
        const float inv = 1.0f / l[x];
#pragma unroll
        for (int dn = 0; dn < HD / 8; ++dn) {
            __nv_bfloat16* dst = out + grow * wq + h * HD + 8 * dn + 2 * t;
            dst[0] = __float2bfloat16_rn(o[dn][2 * x] * inv);
            dst[1] = __float2bfloat16_rn(o[dn][2 * x + 1] * inv);
        }
        if (t == 0) lse[grow * n_heads + h] = m[x] + logf(l[x]);
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

extern "C" __global__ void __launch_bounds__(128)
    attn_fwd_mma_bf16_hd64(__nv_bfloat16* out, float* lse, const __nv_bfloat16* q, const __nv_bfloat16* k,
                           const __nv_bfloat16* v, const int* spans, const int* tiles, int n_heads, int n_kv_heads,
                           float scale) {
    tl_attn::fwd_mma<64>(out, lse, q, k, v, spans, tiles, n_heads, n_kv_heads, scale);
}
extern "C" __global__ void __launch_bounds__(128)
    attn_fwd_mma_bf16_hd128(__nv_bfloat16* out, float* lse, const __nv_bfloat16* q, const __nv_bfloat16* k,
                            const __nv_bfloat16* v, const int* spans, const int* tiles, int n_heads, int n_kv_heads,
                            float scale) {
    tl_attn::fwd_mma<128>(out, lse, q, k, v, spans, tiles, n_heads, n_kv_heads, scale);
}
