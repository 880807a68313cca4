// Causal grouped-query attention over packed sequences, flash-style: the forward keeps
// only the output and the log-sum-exp per (query row, head); the backward recomputes the
// probabilities from them. No [S, S] matrix is ever stored.
//
// Geometry (as ops::AttnShape / ops::AttnLayout):
//   q, out, dout, dq [Nq, H * hd];  k, v, dk, dv [Nk, Hkv * hd];  lse, D [Nq, H] f32
//   The forward's output `out` has rows `ldo` elements apart (>= its width: room for the
//   LoRA path of o_proj, lora.cu), and so has attn_bwd_dot's input `out`. The backward's
//   outputs dq (attn_bwd_dq*) and dk, dv (attn_bwd_dkdv*) have rows `ldg` elements apart
//   (room for the LoRA paths of q/k/v_proj).
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
// Rows outside every span are not written: where a layout leaves such rows, the host
// zeroes out/dq/dk/dv first (AttnLayout::covers_rows), and it fills lse with -inf; that is
// what the CPU backend returns for them.
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
                    int n_heads, int n_kv_heads, int hd, float scale, int ldo) {
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
        if (c < hd) tl::store_f32(out + row * ldo + h * hd + c, acc[dd] / l);
    }
    if (lane == 0) lse[row * n_heads + h] = m + logf(l);
}

template <typename T>
__device__ void bwd_dot(float* D, const T* dout, const T* out, int nq, int n_heads, int hd, int ldo) {
    const int lane = threadIdx.x % tl::WARP_SIZE;
    const size_t warps = (size_t)gridDim.x * blockDim.x / tl::WARP_SIZE;
    const size_t total = (size_t)nq * n_heads;
    for (size_t w = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) / tl::WARP_SIZE; w < total; w += warps) {
        const T* a = dout + w * hd;  // row-major [nq, H*hd]: (row, h) is at (row*H + h)*hd
        const T* b = out + w / n_heads * ldo + w % n_heads * hd;
        float s = 0.0f;
        for (int c = lane; c < hd; c += tl::WARP_SIZE) s += tl::load_f32(a + c) * tl::load_f32(b + c);
        s = tl::warp_reduce_sum(s);
        if (lane == 0) D[w] = s;
    }
}

template <typename T, int BC>
__device__ void bwd_dq(T* dq, const T* dout, const T* q, const T* k, const T* v, const float* lse, const float* D,
                       const int* spans, const int* tiles, int n_heads, int n_kv_heads, int hd, float scale,
                       int ldg) {
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
        if (c < hd) tl::store_f32(dq + row * ldg + h * hd + c, acc[dd]);
    }
}

template <typename T, int BC>
__device__ void bwd_dkdv(T* dk, T* dv, const T* dout, const T* q, const T* k, const T* v, const float* lse,
                         const float* D, const int* spans, const int* tiles, int n_heads, int n_kv_heads, int hd,
                         float scale, int ldg) {
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
            tl::store_f32(dk + row * ldg + kvh * hd + c, acc_k[dd]);
            tl::store_f32(dv + row * ldg + kvh * hd + c, acc_v[dd]);
        }
    }
}


// ---- tensor cores (bf16, head_dim 64 or 128) -----------------------------------------
//
// A block has MMA_WARPS warps and takes rows of one side: query rows in attn_fwd_mma and
// attn_bwd_dq_mma, key rows in attn_bwd_dkdv_mma, MI 16-row m-tiles a warp (2: warp w
// owns rows 32w .. 32w+31 of 128, in the forward and at head_dim 64 in the backward; 1:
// 16w .. 16w+15 of 64, in dq at head_dim 128; see fwd_mma and bwd_dq_mma; dkdv at
// head_dim 128 has 8 warps and 128 keys a block, see bwd_dkdv_mma8); `tiles` counts in
// those steps. The other side streams through
// shared memory in tiles of 64 rows, as bf16 with row stride HD + 8 elements (the 8 rows
// one ldmatrix reads then fall in different banks), double-buffered: cp.async copies the
// next tile while the warps compute on this one. Fragments come out of shared memory
// with ldmatrix (.trans for a B operand stored [k][n]). Every product is an mma.sync
// m16n8k16 (bf16 in, f32 accumulation); probabilities and dS are rounded to bf16 for the
// products that take them, as FlashAttention does, while softmax sums, the log-sum-exp
// and dS = P (dP - D) are f32. The softmax runs in base 2 (scores times scale·log2 e,
// exp2); lse is stored in base e. Lane (g = lane / 4, t = lane % 4) of a warp holds rows
// g and g + 8 of each m-tile (see tl::mma_bf16_16816 for the fragment layouts). The
// causal mask is only evaluated where a warp's rows and a tile's columns cross the
// diagonal or a span's end.
//
// Dynamic shared memory (bf16 elements, LD = HD + 8, TILE = 64 * LD):
//   attn_fwd_mma:      Q of the block's 64 MI rows + 2 stages x (K, V)  = (MI + 4) * TILE
//   attn_bwd_dq_mma:   2 stages x (K, V)                                = 4 * TILE
//   attn_bwd_dkdv_mma: K, V of the block's 64 MI keys + 2 stages x (Q, dO)
//                                                                       = (2 MI + 4) * TILE,
//                      then 2 stages x (lse, D) of 64 rows              (4 * 64 f32)
//   (bwd_dkdv_mma8 at head_dim 128: see there)

constexpr int MMA_WARPS = 4, MMA_TILE = 64;
constexpr float LOG2E = 1.4426950408889634f, LN2 = 0.6931471805599453f;

// 16 bytes: 8 bf16, moved with one vector load or store.
struct alignas(16) Bf16x8 {
    uint32_t w[4];
};

// Starts copying rows row0 .. row0 + MMA_TILE of columns col0 .. col0 + HD of a [*, width]
// matrix into shared memory, the 16-byte chunk c (columns 8c .. 8c + 7) of row r to
// `chunk(r, c)`: with cp.async, 16 bytes a thread at a time, when the source rows are
// 16-byte aligned (as whole-buffer tensors are), else with plain loads and stores. Rows
// at or past `valid` become zeros (a NaN there would survive a zero probability in a
// product). The caller commits the cp.async group, and the tile may be read after
// tl::cp_async_wait and a barrier.
template <int HD, typename Chunk>
__device__ __forceinline__ void load_tile_chunks(Chunk chunk, const __nv_bfloat16* src, int row0, int valid,
                                                 int width, int col0) {
    const bool aligned = (reinterpret_cast<uintptr_t>(src) % 16 == 0) && width % 8 == 0 && col0 % 8 == 0;
    for (int idx = threadIdx.x; idx < MMA_TILE * HD / 8; idx += blockDim.x) {
        const int r = idx / (HD / 8), c = idx % (HD / 8);
        void* d = chunk(r, c);
        const __nv_bfloat16* p = r < valid ? src + (size_t)(row0 + r) * width + col0 + 8 * c : src;
        if (aligned) {
            tl::cp_async_16(d, p, r < valid);
        } else {
            Bf16x8 v = {{0u, 0u, 0u, 0u}};
            if (r < valid) {
#pragma unroll
                for (int j = 0; j < 4; ++j) v.w[j] = tl::pack_bf16(p[2 * j], p[2 * j + 1]);
            }
            tl::assert_aligned<16>(d);
            *reinterpret_cast<Bf16x8*>(d) = v;
        }
    }
}

// load_tile_chunks into rows HD + 8 elements apart (mma.sync's tiles).
template <int HD>
__device__ __forceinline__ void mma_load_tile(__nv_bfloat16* dst, const __nv_bfloat16* src, int row0, int valid,
                                              int width, int col0) {
    load_tile_chunks<HD>([=](int r, int c) { return static_cast<void*>(dst + r * (HD + 8) + 8 * c); }, src, row0,
                         valid, width, col0);
}

// The A fragment of rows r0 .. r0 + 15, columns c0 .. c0 + 15 of a row-major bf16 matrix
// in shared memory (row stride ld): the four 8x8 quarters in the order of a[0..3].
__device__ __forceinline__ void mma_a_rows(uint32_t (&a)[4], const __nv_bfloat16* m, int ld, int r0, int c0) {
    const int lane = threadIdx.x % tl::WARP_SIZE;
    tl::ldmatrix_x4(a, m + (r0 + 8 * (lane / 8 % 2) + lane % 8) * ld + c0 + 8 * (lane / 16));
}

// The B fragments of Mᵀ for a row-major M in shared memory (B[k][n] = M[n][k]), for the
// two 8-column tiles n0 and n0 + 8 at the k-step k0 .. k0 + 15.
__device__ __forceinline__ void mma_b_transposed(uint32_t (&b0)[2], uint32_t (&b1)[2], const __nv_bfloat16* m,
                                                 int ld, int n0, int k0) {
    const int lane = threadIdx.x % tl::WARP_SIZE;
    uint32_t r[4];
    tl::ldmatrix_x4(r, m + (n0 + 8 * (lane / 16) + lane % 8) * ld + k0 + 8 * (lane / 8 % 2));
    b0[0] = r[0];
    b0[1] = r[1];
    b1[0] = r[2];
    b1[1] = r[3];
}

// The B fragments of a row-major M itself (B[k][n] = M[k][n]) for the two 8-column tiles
// n0 and n0 + 8 at the k-step k0 .. k0 + 15: ldmatrix .trans.
__device__ __forceinline__ void mma_b_rows(uint32_t (&b0)[2], uint32_t (&b1)[2], const __nv_bfloat16* m, int ld,
                                           int k0, int n0) {
    const int lane = threadIdx.x % tl::WARP_SIZE;
    uint32_t r[4];
    tl::ldmatrix_x4_trans(r, m + (k0 + 8 * (lane / 8 % 2) + lane % 8) * ld + n0 + 8 * (lane / 16));
    b0[0] = r[0];
    b0[1] = r[1];
    b1[0] = r[2];
    b1[1] = r[3];
}

// The A fragment of a 16 x 16 block whose two 16 x 8 halves are accumulators `lo` and
// `hi` (the accumulator layout of two adjacent n-tiles is the A layout of one k-step).
__device__ __forceinline__ void mma_a_from_acc(uint32_t (&a)[4], const float (&lo)[4], const float (&hi)[4]) {
    a[0] = tl::pack_bf16(lo[0], lo[1]);
    a[1] = tl::pack_bf16(lo[2], lo[3]);
    a[2] = tl::pack_bf16(hi[0], hi[1]);
    a[3] = tl::pack_bf16(hi[2], hi[3]);
}

// d0 += a·b0 and d1 += a·b1: one A fragment against the two 8-column B tiles that one
// mma_b_transposed or mma_b_rows gives.
__device__ __forceinline__ void mma_2n(float (&d0)[4], float (&d1)[4], const uint32_t (&a)[4],
                                       const uint32_t (&b0)[2], const uint32_t (&b1)[2]) {
    tl::mma_bf16_16816(d0, a, b0);
    tl::mma_bf16_16816(d1, a, b1);
}

// acc[mi][nt] += Ma[ra + 16 mi + .., :] · Mb[rb + 8 nt + .., :]ᵀ over the HD columns of two
// row-major bf16 matrices in shared memory (row stride HD + 8): MI m-tiles of Ma's rows
// against N / 8 column tiles of Mb's rows, the scores of a warp (S = Q·Kᵀ, Sᵀ = K·Qᵀ,
// dPᵀ = V·dOᵀ). Each B fragment read feeds MI products, each A fragment N / 8.
template <int HD, int MI, int N>
__device__ __forceinline__ void mma_rows_by_rows(float (&acc)[MI][N / 8][4], const __nv_bfloat16* ma, int ra,
                                                 const __nv_bfloat16* mb, int rb) {
    constexpr int LD = HD + 8;
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) {
        uint32_t a[MI][4];
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) mma_a_rows(a[mi], ma, LD, ra + 16 * mi, 16 * kk);
#pragma unroll
        for (int np = 0; np < N / 16; ++np) {
            uint32_t b0[2], b1[2];
            mma_b_transposed(b0, b1, mb, LD, rb + 16 * np, 16 * kk);
#pragma unroll
            for (int mi = 0; mi < MI; ++mi) mma_2n(acc[mi][2 * np], acc[mi][2 * np + 1], a[mi], b0, b1);
        }
    }
}

// The A fragments of 16 rows (rows past `valid` zero) of one head of a [*, width] matrix
// in global memory, straight into registers.
template <int HD>
__device__ __forceinline__ void mma_a_global(uint32_t (&a)[HD / 16][4], const __nv_bfloat16* m, int row0, int valid,
                                             int width, int col0) {
    const int g = threadIdx.x % tl::WARP_SIZE / 4, t = threadIdx.x % 4;
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int r = g + 8 * (j % 2), c = 16 * kk + 2 * t + 8 * (j / 2);
            const __nv_bfloat16* p = m + (size_t)(row0 + r) * width + col0 + c;
            a[kk][j] = r < valid ? tl::pack_bf16(p[0], p[1]) : 0u;
        }
    }
}

// Stores this lane's columns of a warp's 16 x HD accumulator (times `mul`) for row `x`
// (0: g, 1: g + 8) at `dst`, the row's first column: bf16 pairs, one 32-bit store each.
template <int HD>
__device__ __forceinline__ void mma_store_row(__nv_bfloat16* dst, const float (&acc)[HD / 8][4], int x, float mul) {
    const int t = threadIdx.x % 4;
#pragma unroll
    for (int dn = 0; dn < HD / 8; ++dn) {
        tl::assert_aligned<4>(dst + 8 * dn + 2 * t);
        *reinterpret_cast<uint32_t*>(dst + 8 * dn + 2 * t) =
            tl::pack_bf16(acc[dn][2 * x] * mul, acc[dn][2 * x + 1] * mul);
    }
}

template <int N>
__device__ __forceinline__ void zero_acc(float (&acc)[N][4]) {
#pragma unroll
    for (int i = 0; i < N; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
}

// The geometry of a block of a query-side kernel (attn_fwd_mma with RPW = 32 rows a
// warp, attn_bwd_dq_mma with 16; the wgmma kernels with 64 a warpgroup, UNIT = 128
// threads, and two of them): its span and head, its rows and the calling warp's (or
// warpgroup's), and the keys they see.
struct MmaQueryBlock {
    Span sp;
    int h, kvh;    // query head, its K/V head
    int wq, wk;    // row widths of q and of k/v
    int shift;     // k_len - q_len: query i sees keys 0 ..= i + shift
    int i0;        // the block's first row, in the span
    int r0;        // the warp's first row, in the span
    int nv_block;  // keys the block's last row sees
    int nv_warp;   // keys the warp's last row sees
};

template <int HD, int RPW, int UNIT = tl::WARP_SIZE, int UNITS = MMA_WARPS>
__device__ __forceinline__ MmaQueryBlock mma_query_block(const int* spans, const int* tiles, int n_heads,
                                                         int n_kv_heads) {
    MmaQueryBlock b;
    b.sp = load_span(spans, tiles[2 * blockIdx.x]);
    b.i0 = tiles[2 * blockIdx.x + 1];
    b.h = blockIdx.y;
    b.kvh = b.h / (n_heads / n_kv_heads);
    b.wq = n_heads * HD;
    b.wk = n_kv_heads * HD;
    b.shift = b.sp.k_len - b.sp.q_len;
    b.r0 = b.i0 + RPW * (threadIdx.x / UNIT);
    b.nv_block = min(b.i0 + RPW * UNITS, b.sp.q_len) + b.shift;
    b.nv_warp = min(b.r0 + RPW, b.sp.q_len) + b.shift;
    return b;
}

// Starts the copy of key tile `it` (K and V rows 64 it .. of the block's span and K/V
// head) into stage it % 2 of a query-side kernel's K/V buffers, as one cp.async group.
template <int HD>
__device__ __forceinline__ void mma_load_kv(__nv_bfloat16* kv_s, const MmaQueryBlock& blk, const __nv_bfloat16* k,
                                            const __nv_bfloat16* v, int it) {
    constexpr int TILE = MMA_TILE * (HD + 8);
    const int j0 = it * MMA_TILE;
    __nv_bfloat16* k_s = kv_s + 2 * (it % 2) * TILE;
    mma_load_tile<HD>(k_s, k, blk.sp.k_start + j0, blk.nv_block - j0, blk.wk, blk.kvh * HD);
    mma_load_tile<HD>(k_s + TILE, v, blk.sp.k_start + j0, blk.nv_block - j0, blk.wk, blk.kvh * HD);
    tl::cp_async_commit();
}

// Waits for tile `it` of `n_tiles` (leaving the next one, already started, in flight)
// and makes it visible to the block; with ASYNC_PROXY (the wgmma kernels) also to the
// async proxy, through which wgmma products read shared memory: each thread fences its
// landed copies (and any plain stores of the unaligned fallback) before the barrier.
template <bool ASYNC_PROXY = false>
__device__ __forceinline__ void mma_wait_tile(int it, int n_tiles) {
    if (it + 1 < n_tiles) {
        tl::cp_async_wait<1>();
    } else {
        tl::cp_async_wait<0>();
    }
    if constexpr (ASYNC_PROXY) tl::fence_proxy_async();
    __syncthreads();
}

// The top of a query-side kernel's loop over its `n_tiles` key tiles: starts the copy of
// tile it + 1, waits for tile `it` and makes it visible; returns where K of tile `it` is
// (V follows it, a tile on).
template <int HD>
__device__ __forceinline__ const __nv_bfloat16* mma_next_kv(__nv_bfloat16* kv_s, const MmaQueryBlock& blk,
                                                            const __nv_bfloat16* k, const __nv_bfloat16* v,
                                                            int it, int n_tiles) {
    if (it + 1 < n_tiles) mma_load_kv<HD>(kv_s, blk, k, v, it + 1);
    mma_wait_tile(it, n_tiles);
    return kv_s + 2 * (it % 2) * MMA_TILE * (HD + 8);
}

// One step of the online softmax for a 16-row m-tile: `s` holds the lane's scores of
// NT * 8 keys (base 2, masked ones -inf) for its rows g and g + 8, whose scores sit in
// the 4 lanes of a group. Updates the rows' running maximum `m` and sum `l`, rescales the
// output accumulator `o`, and leaves the probabilities in `s`.
template <int HD, int NT>
__device__ __forceinline__ void online_softmax(float (&s)[NT][4], float (&m)[2], float (&l)[2],
                                               float (&o)[HD / 8][4]) {
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int j = 0; j < 4; ++j) mx[j / 2] = fmaxf(mx[j / 2], s[nt][j]);
    }
    float corr[2], sum[2] = {0.0f, 0.0f};
#pragma unroll
    for (int x = 0; x < 2; ++x) {
        mx[x] = fmaxf(mx[x], __shfl_xor_sync(tl::FULL_MASK, mx[x], 1));
        mx[x] = fmaxf(mx[x], __shfl_xor_sync(tl::FULL_MASK, mx[x], 2));
        const float m_new = fmaxf(m[x], mx[x]);
        corr[x] = m[x] == -INFINITY ? 0.0f : exp2f(m[x] - m_new);
        m[x] = m_new;
    }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const float p = s[nt][j] == -INFINITY ? 0.0f : exp2f(s[nt][j] - m[j / 2]);
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
}

// The forward: a warp takes MI 16-row m-tiles of query rows, so that every K and V
// fragment it reads from shared memory feeds MI products (at one m-tile, reading them
// takes longer than the products). The scores of a key tile are taken SUB keys at a time,
// each sub-step with its own online-softmax update: at head_dim 128 the output
// accumulator alone is 128 registers at two m-tiles, and 64 keys of scores on top of it
// made ptxas spill, so head_dim 128 takes 32 keys a sub-step (64 takes the whole tile).
// Q of the block's MMA_WARPS * 16 * MI rows sits in shared memory beside the two stages
// of K and V, its fragments read per k-step.
template <int HD, int MI, int SUB>
__device__ void fwd_mma(__nv_bfloat16* out, float* lse, const __nv_bfloat16* q, const __nv_bfloat16* k,
                        const __nv_bfloat16* v, const int* spans, const int* tiles, int n_heads, int n_kv_heads,
                        float scale, int ldo) {
    constexpr int LD = HD + 8, TILE = MMA_TILE * LD, FWD_RPW = 16 * MI, FWD_ROWS = FWD_RPW * MMA_WARPS;
    static_assert(FWD_ROWS % MMA_TILE == 0, "Q is loaded in tiles");
    static_assert(MMA_TILE % SUB == 0 && SUB % 16 == 0, "sub-steps of whole k-steps");
    TL_DYNAMIC_SHARED(float, smem);
    __nv_bfloat16* q_s = reinterpret_cast<__nv_bfloat16*>(smem);
    __nv_bfloat16* kv_s = q_s + FWD_ROWS * LD;
    const int warp = threadIdx.x / tl::WARP_SIZE, g = threadIdx.x % tl::WARP_SIZE / 4, t = threadIdx.x % 4;
    const MmaQueryBlock blk = mma_query_block<HD, FWD_RPW>(spans, tiles, n_heads, n_kv_heads);
    const Span& sp = blk.sp;
    const int h = blk.h, shift = blk.shift, r0 = blk.r0, nv_warp = blk.nv_warp;
    const float sl2 = scale * LOG2E;
    // the warp's rows all lie in the span: only sub-steps crossing the diagonal need the mask
    const bool rows_full = r0 + FWD_RPW <= sp.q_len;

    // Q of the block goes with the first key tile's group
#pragma unroll
    for (int part = 0; part < FWD_ROWS / MMA_TILE; ++part) {
        const int row0 = blk.i0 + part * MMA_TILE;
        mma_load_tile<HD>(q_s + part * TILE, q, sp.q_start + row0, sp.q_len - row0, blk.wq, h * HD);
    }
    float o[MI][HD / 8][4], m[MI][2], l[MI][2];  // m in base 2
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) {
        zero_acc(o[mi]);
        m[mi][0] = m[mi][1] = -INFINITY;
        l[mi][0] = l[mi][1] = 0.0f;
    }

    const int n_tiles = (blk.nv_block + MMA_TILE - 1) / MMA_TILE;
    if (n_tiles > 0) {
        mma_load_kv<HD>(kv_s, blk, k, v, 0);
    } else {
        tl::cp_async_commit();
    }
    for (int it = 0; it < n_tiles; ++it) {
        const __nv_bfloat16* k_s = mma_next_kv<HD>(kv_s, blk, k, v, it, n_tiles);
        const __nv_bfloat16* v_s = k_s + TILE;
#pragma unroll
        for (int c0 = 0; c0 < MMA_TILE; c0 += SUB) {
            const int j0 = it * MMA_TILE + c0;                  // the sub-step's first key
            if (r0 >= sp.q_len || j0 >= nv_warp) continue;  // warp-uniform
            float s[MI][SUB / 8][4];
#pragma unroll
            for (int mi = 0; mi < MI; ++mi) zero_acc(s[mi]);
            mma_rows_by_rows<HD, MI, SUB>(s, q_s, FWD_RPW * warp, k_s, c0);
            // Scale and mask (causal, bottom-right aligned; rows past the span see
            // nothing), then the online softmax of each m-tile.
            const bool full = rows_full && j0 + SUB - 1 <= r0 + shift;
#pragma unroll
            for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
                for (int nt = 0; nt < SUB / 8; ++nt) {
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        const int r = r0 + 16 * mi + g + 8 * (j / 2), key = j0 + 8 * nt + 2 * t + j % 2;
                        const bool seen = full || (r < sp.q_len && key <= r + shift);
                        s[mi][nt][j] = seen ? s[mi][nt][j] * sl2 : -INFINITY;
                    }
                }
                online_softmax<HD>(s[mi], m[mi], l[mi], o[mi]);
            }
            // O += P·V, 16 keys a step
#pragma unroll
            for (int ks = 0; ks < SUB / 16; ++ks) {
                uint32_t a[MI][4];
#pragma unroll
                for (int mi = 0; mi < MI; ++mi) mma_a_from_acc(a[mi], s[mi][2 * ks], s[mi][2 * ks + 1]);
#pragma unroll
                for (int dp = 0; dp < HD / 16; ++dp) {
                    uint32_t b0[2], b1[2];
                    mma_b_rows(b0, b1, v_s, LD, c0 + 16 * ks, 16 * dp);
#pragma unroll
                    for (int mi = 0; mi < MI; ++mi) mma_2n(o[mi][2 * dp], o[mi][2 * dp + 1], a[mi], b0, b1);
                }
            }
        }
        __syncthreads();  // the stage is refilled two tiles on
    }
    tl::cp_async_wait<0>();  // Q, when no key tile came
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
        for (int x = 0; x < 2; ++x) {
            const int r = r0 + 16 * mi + g + 8 * x;
            if (r >= sp.q_len) continue;
            const size_t grow = (size_t)sp.q_start + r;
            mma_store_row<HD>(out + grow * ldo + h * HD, o[mi], x, 1.0f / l[mi][x]);
            if (t == 0) lse[grow * n_heads + h] = (m[mi][x] + log2f(l[mi][x])) * LN2;
        }
    }
}

// ---- the forward on wgmma (sm_90a) ------------------------------------------------------
//
// attn_fwd_wgmma_bf16_hd{64,128}: attn_fwd_mma's forward (the same arguments and tiles of
// 128 query rows) with its products on sm_90a's warpgroup instruction (kernels/common.cuh,
// tl::Wgmma). A block is two warpgroups (256 threads), each with 64 of the rows, both
// reading the same K/V tiles. For each 64-key tile a warpgroup takes S = Q·Kᵀ (HD / 16
// wgmma m64n64k16, Q and K from shared memory), the online softmax on the accumulators
// (laid out as mma.sync's: the same code), and O += P·V (4 wgmma m64n{HD}k16, P from
// registers, V from shared memory as an MN-major operand). Tiles are [64 rows][HD] bf16
// in 64-column slabs of 128-byte rows with the 128-byte swizzle, which K-major (Q, K) and
// MN-major (V) operands read alike. Dynamic shared memory: Q of the two warpgroups, then
// two stages of K and V, and 1024 bytes to align them: 1024 + 6 · 64 · HD · 2 bytes.
constexpr int WG_ROWS = 64;
static_assert(WG_ROWS == MMA_TILE, "the wgmma kernels stream the tiles MmaKeyBlock counts");

// The byte offset of the 16-byte chunk c (columns 8c .. 8c + 7) of row r in such a tile.
__device__ __forceinline__ uint32_t wg_chunk(int r, int c) {
    return uint32_t((c / 8) * WG_ROWS * 128 + r * 128 + ((c % 8) ^ (r % 8)) * 16);
}

// load_tile_chunks into a swizzled 64-row tile at `dst` (wg_chunk).
template <int HD>
__device__ __forceinline__ void wg_load_tile(unsigned char* dst, const __nv_bfloat16* src, int row0, int valid,
                                             int width, int col0) {
    load_tile_chunks<HD>([=](int r, int c) { return static_cast<void*>(dst + wg_chunk(r, c)); }, src, row0, valid,
                         width, col0);
}

// The descriptor of columns 16s .. 16s + 15 of a tile as a K-major operand (Q, K).
__device__ __forceinline__ uint64_t wg_desc_k(const unsigned char* tile, int s) {
    return tl::wgmma_desc(tile + (s / 4) * WG_ROWS * 128 + (s % 4) * 32, 0, 1024, tl::Swizzle::B128);
}

// The descriptor of rows 16s .. 16s + 15 of a tile as an MN-major B operand (V: k = key).
__device__ __forceinline__ uint64_t wg_desc_mn(const unsigned char* tile, int s) {
    return tl::wgmma_desc(tile + s * 16 * 128, WG_ROWS * 128, 1024, tl::Swizzle::B128);
}

// acc += P·T for a warpgroup: P its 64 x 64 scores (S accumulators, rounded to bf16 as A
// fragments), T a 64-row tile as an MN-major operand (k = the tile's rows); waits for the
// products, so P's registers and acc may be used again on return.
template <int HD>
__device__ __forceinline__ void wg_scores_times_tile(float (&acc)[HD / 8][4], const float (&p)[WG_ROWS / 8][4],
                                                     const unsigned char* tile) {
    uint32_t a[WG_ROWS / 16][4];
#pragma unroll
    for (int ks = 0; ks < WG_ROWS / 16; ++ks) mma_a_from_acc(a[ks], p[2 * ks], p[2 * ks + 1]);
    tl::wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < WG_ROWS / 16; ++ks) tl::Wgmma<HD>::template rs<1>(acc, a[ks], wg_desc_mn(tile, ks), 1);
    tl::wgmma_commit();
    tl::wgmma_wait<0>(acc);
}

// The geometry of a block of a query-side wgmma kernel (fwd_wgmma, bwd_dq_wgmma): two
// warpgroups of 64 rows (nv_warp: the keys the warpgroup's last row sees).
template <int HD>
__device__ __forceinline__ MmaQueryBlock wg_query_block(const int* spans, const int* tiles, int n_heads,
                                                        int n_kv_heads) {
    return mma_query_block<HD, WG_ROWS, 128, 2>(spans, tiles, n_heads, n_kv_heads);
}

// Starts copying the block's 128 rows of `src` (q or dout: this head's columns) into
// the two tiles at dst, one a warpgroup.
template <int HD>
__device__ __forceinline__ void wg_load_rows(unsigned char* dst, const __nv_bfloat16* src, const MmaQueryBlock& b) {
#pragma unroll
    for (int part = 0; part < 2; ++part) {
        const int row0 = b.i0 + part * WG_ROWS;
        wg_load_tile<HD>(dst + part * WG_ROWS * HD * 2, src, b.sp.q_start + row0, b.sp.q_len - row0, b.wq,
                         b.h * HD);
    }
}

// Starts copying key tile `it` (K and V rows 64·it ..) into stage it % 2 at kv_s (K, then
// V a tile on), as one cp.async group.
template <int HD>
__device__ __forceinline__ void wg_load_kv(unsigned char* kv_s, const MmaQueryBlock& b, const __nv_bfloat16* k,
                                           const __nv_bfloat16* v, int it) {
    constexpr int TILE = WG_ROWS * HD * 2;
    unsigned char* k_s = kv_s + 2 * (it % 2) * TILE;
    const int j0 = it * WG_ROWS;
    wg_load_tile<HD>(k_s, k, b.sp.k_start + j0, b.nv_block - j0, b.wk, b.kvh * HD);
    wg_load_tile<HD>(k_s + TILE, v, b.sp.k_start + j0, b.nv_block - j0, b.wk, b.kvh * HD);
    tl::cp_async_commit();
}

template <int HD>
__device__ void fwd_wgmma(__nv_bfloat16* out, float* lse, const __nv_bfloat16* q, const __nv_bfloat16* k,
                          const __nv_bfloat16* v, const int* spans, const int* tiles, int n_heads, int n_kv_heads,
                          float scale, int ldo) {
    constexpr int TILE = WG_ROWS * HD * 2;  // bytes
    unsigned char* smem = tl::dynamic_shared_1024();
    const int warp = threadIdx.x % 128 / 32, g = threadIdx.x % tl::WARP_SIZE / 4, t = threadIdx.x % 4;
    const MmaQueryBlock blk = wg_query_block<HD>(spans, tiles, n_heads, n_kv_heads);
    const Span& sp = blk.sp;
    const int h = blk.h, shift = blk.shift, r0 = blk.r0;
    const float sl2 = scale * LOG2E;
    const unsigned char* q_s = smem + (threadIdx.x / 128) * TILE;
    unsigned char* kv_s = smem + 2 * TILE;  // stage x: K at kv_s + 2x·TILE, V a tile on

    // Q of both warpgroups goes with the first key tile's group
    wg_load_rows<HD>(smem, q, blk);
    const int n_tiles = (blk.nv_block + WG_ROWS - 1) / WG_ROWS;
    if (n_tiles > 0) {
        wg_load_kv<HD>(kv_s, blk, k, v, 0);
    } else {
        tl::cp_async_commit();
    }
    float o[HD / 8][4], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};  // m in base 2
    zero_acc(o);
    for (int it = 0; it < n_tiles; ++it) {
        if (it + 1 < n_tiles) wg_load_kv<HD>(kv_s, blk, k, v, it + 1);
        mma_wait_tile<true>(it, n_tiles);
        const unsigned char* k_s = kv_s + 2 * (it % 2) * TILE;
        const unsigned char* v_s = k_s + TILE;
        const int j0 = it * WG_ROWS;  // the tile's first key
        if (r0 < sp.q_len && j0 < blk.nv_warp) {  // warpgroup-uniform
            float s[WG_ROWS / 8][4];
            tl::wgmma_fence();
#pragma unroll
            for (int ks = 0; ks < HD / 16; ++ks) {
                tl::Wgmma<WG_ROWS>::template ss<0>(s, wg_desc_k(q_s, ks), wg_desc_k(k_s, ks), ks > 0);
            }
            tl::wgmma_commit();
            tl::wgmma_wait<0>(s);
            // scale and mask as fwd_mma, then the online softmax of the warp's 16 rows
            const bool full = r0 + WG_ROWS <= sp.q_len && j0 + WG_ROWS - 1 <= r0 + shift;
#pragma unroll
            for (int nt = 0; nt < WG_ROWS / 8; ++nt) {
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const int r = r0 + 16 * warp + g + 8 * (j / 2), key = j0 + 8 * nt + 2 * t + j % 2;
                    const bool seen = full || (r < sp.q_len && key <= r + shift);
                    s[nt][j] = seen ? s[nt][j] * sl2 : -INFINITY;
                }
            }
            online_softmax<HD>(s, m, l, o);
            wg_scores_times_tile<HD>(o, s, v_s);  // O += P·V
        }
        __syncthreads();  // the stage is refilled two tiles on
    }
    tl::cp_async_wait<0>();  // Q, when no key tile came
#pragma unroll
    for (int x = 0; x < 2; ++x) {
        const int r = r0 + 16 * warp + g + 8 * x;
        if (r >= sp.q_len) continue;
        const size_t grow = (size_t)sp.q_start + r;
        mma_store_row<HD>(out + grow * ldo + h * HD, o, x, 1.0f / l[x]);
        if (t == 0) lse[grow * n_heads + h] = (m[x] + log2f(l[x])) * LN2;
    }
}

// dq on wgmma (attn_bwd_dq_wgmma_bf16_hd{64,128}): bwd_dq_mma's arguments, with tiles of
// 128 query rows, two warpgroups of 64. Q and dO of the block's rows stay in shared
// memory; for each 64-key tile a warpgroup takes S = Q·Kᵀ and dP = dO·Vᵀ (wgmma
// m64n64k16 from shared memory, one commit group), P = exp(S - lse) and dS = P (dP - D) on
// the accumulators, and dQ += dS·K (dS from registers, K as an MN-major operand).
// Dynamic shared memory: Q and dO of the two warpgroups, two stages of K and V, and 1024
// bytes to align them: 1024 + 8 · 64 · HD · 2 bytes.
template <int HD>
__device__ void bwd_dq_wgmma(__nv_bfloat16* dq, const __nv_bfloat16* dout, const __nv_bfloat16* q,
                             const __nv_bfloat16* k, const __nv_bfloat16* v, const float* lse, const float* D,
                             const int* spans, const int* tiles, int n_heads, int n_kv_heads, float scale,
                             int ldg) {
    constexpr int TILE = WG_ROWS * HD * 2;  // bytes
    unsigned char* smem = tl::dynamic_shared_1024();
    const int warp = threadIdx.x % 128 / 32, g = threadIdx.x % tl::WARP_SIZE / 4, t = threadIdx.x % 4;
    const MmaQueryBlock blk = wg_query_block<HD>(spans, tiles, n_heads, n_kv_heads);
    const Span& sp = blk.sp;
    const int h = blk.h, shift = blk.shift, r0 = blk.r0;
    const float sl2 = scale * LOG2E;
    const unsigned char* q_s = smem + (threadIdx.x / 128) * TILE;
    const unsigned char* o_s = q_s + 2 * TILE;
    unsigned char* kv_s = smem + 4 * TILE;  // stage x: K at kv_s + 2x·TILE, V a tile on

    wg_load_rows<HD>(smem, q, blk);
    wg_load_rows<HD>(smem + 2 * TILE, dout, blk);
    const int n_tiles = (blk.nv_block + WG_ROWS - 1) / WG_ROWS;
    if (n_tiles > 0) {
        wg_load_kv<HD>(kv_s, blk, k, v, 0);
    } else {
        tl::cp_async_commit();
    }
    float row_lse2[2], row_d[2], acc[HD / 8][4];
#pragma unroll
    for (int x = 0; x < 2; ++x) {
        const int r = r0 + 16 * warp + g + 8 * x;
        const bool ok = r < sp.q_len;
        const size_t at = ((size_t)sp.q_start + r) * n_heads + h;
        row_lse2[x] = ok ? lse[at] * LOG2E : 0.0f;
        row_d[x] = ok ? D[at] : 0.0f;
    }
    zero_acc(acc);
    for (int it = 0; it < n_tiles; ++it) {
        if (it + 1 < n_tiles) wg_load_kv<HD>(kv_s, blk, k, v, it + 1);
        mma_wait_tile<true>(it, n_tiles);
        const unsigned char* k_s = kv_s + 2 * (it % 2) * TILE;
        const unsigned char* v_s = k_s + TILE;
        const int j0 = it * WG_ROWS;
        if (r0 < sp.q_len && j0 < blk.nv_warp) {  // warpgroup-uniform
            float s[WG_ROWS / 8][4], dp[WG_ROWS / 8][4];
            tl::wgmma_fence();
#pragma unroll
            for (int ks = 0; ks < HD / 16; ++ks) {
                tl::Wgmma<WG_ROWS>::template ss<0>(s, wg_desc_k(q_s, ks), wg_desc_k(k_s, ks), ks > 0);
                tl::Wgmma<WG_ROWS>::template ss<0>(dp, wg_desc_k(o_s, ks), wg_desc_k(v_s, ks), ks > 0);
            }
            tl::wgmma_commit();
            tl::wgmma_wait<0>(s);
            tl::wgmma_wait<0>(dp);
            const bool full = r0 + WG_ROWS <= sp.q_len && j0 + WG_ROWS - 1 <= r0 + shift;
#pragma unroll
            for (int nt = 0; nt < WG_ROWS / 8; ++nt) {
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const int x = j / 2, r = r0 + 16 * warp + g + 8 * x, key = j0 + 8 * nt + 2 * t + j % 2;
                    const bool seen = full || (r < sp.q_len && key <= r + shift);
                    const float p = seen ? exp2f(s[nt][j] * sl2 - row_lse2[x]) : 0.0f;
                    s[nt][j] = p * (dp[nt][j] - row_d[x]);  // dS
                }
            }
            wg_scores_times_tile<HD>(acc, s, k_s);  // dQ += dS·K
        }
        __syncthreads();  // the stage is refilled two tiles on
    }
    tl::cp_async_wait<0>();  // Q and dO, when no key tile came
#pragma unroll
    for (int x = 0; x < 2; ++x) {
        const int r = r0 + 16 * warp + g + 8 * x;
        if (r >= sp.q_len) continue;
        mma_store_row<HD>(dq + ((size_t)sp.q_start + r) * ldg + h * HD, acc, x, scale);
    }
}

// dq: per warp MI 16-row m-tiles of query rows in registers (Q and dO fragments, the dQ
// accumulator: 2 m-tiles at head_dim 64; at 128 those alone would be 256 registers, so 1); key tiles stream through
// shared memory, 16 keys at a time: S = Q·Kᵀ and dP = dO·Vᵀ for 16 keys, P = exp(S -
// lse), dS = P (dP - D), dQ += dS·K.
template <int HD, int MI>
__device__ void bwd_dq_mma(__nv_bfloat16* dq, const __nv_bfloat16* dout, const __nv_bfloat16* q,
                           const __nv_bfloat16* k, const __nv_bfloat16* v, const float* lse, const float* D,
                           const int* spans, const int* tiles, int n_heads, int n_kv_heads, float scale,
                           int ldg) {
    constexpr int LD = HD + 8, TILE = MMA_TILE * LD, RPW = 16 * MI;
    TL_DYNAMIC_SHARED(float, smem);
    __nv_bfloat16* kv_s = reinterpret_cast<__nv_bfloat16*>(smem);
    const int g = threadIdx.x % tl::WARP_SIZE / 4, t = threadIdx.x % 4;
    const MmaQueryBlock blk = mma_query_block<HD, RPW>(spans, tiles, n_heads, n_kv_heads);
    const Span& sp = blk.sp;
    const int h = blk.h, wq = blk.wq, shift = blk.shift, r0 = blk.r0, nv_warp = blk.nv_warp;
    const float sl2 = scale * LOG2E;
    const bool rows_full = r0 + RPW <= sp.q_len;

    uint32_t qf[MI][HD / 16][4], of[MI][HD / 16][4];
    float row_lse2[MI][2], row_d[MI][2], acc[MI][HD / 8][4];
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) {
        const int m0 = r0 + 16 * mi;
        mma_a_global<HD>(qf[mi], q, sp.q_start + m0, sp.q_len - m0, wq, h * HD);
        mma_a_global<HD>(of[mi], dout, sp.q_start + m0, sp.q_len - m0, wq, h * HD);
#pragma unroll
        for (int x = 0; x < 2; ++x) {
            const int r = m0 + g + 8 * x;
            const bool ok = r < sp.q_len;
            const size_t at = ((size_t)sp.q_start + r) * n_heads + h;
            row_lse2[mi][x] = ok ? lse[at] * LOG2E : 0.0f;
            row_d[mi][x] = ok ? D[at] : 0.0f;
        }
        zero_acc(acc[mi]);
    }

    const int n_tiles = (blk.nv_block + MMA_TILE - 1) / MMA_TILE;
    if (n_tiles > 0) mma_load_kv<HD>(kv_s, blk, k, v, 0);
    for (int it = 0; it < n_tiles; ++it) {
        const int j0 = it * MMA_TILE;
        const __nv_bfloat16* k_s = mma_next_kv<HD>(kv_s, blk, k, v, it, n_tiles);
        const __nv_bfloat16* v_s = k_s + TILE;
        for (int c0 = 0; r0 < sp.q_len && c0 < MMA_TILE && j0 + c0 < nv_warp; c0 += 16) {  // warp-uniform
            float s[MI][2][4], dp[MI][2][4];
#pragma unroll
            for (int mi = 0; mi < MI; ++mi) {
                zero_acc(s[mi]);
                zero_acc(dp[mi]);
            }
#pragma unroll
            for (int kk = 0; kk < HD / 16; ++kk) {
                uint32_t b0[2], b1[2];
                mma_b_transposed(b0, b1, k_s, LD, c0, 16 * kk);
#pragma unroll
                for (int mi = 0; mi < MI; ++mi) mma_2n(s[mi][0], s[mi][1], qf[mi][kk], b0, b1);
                mma_b_transposed(b0, b1, v_s, LD, c0, 16 * kk);
#pragma unroll
                for (int mi = 0; mi < MI; ++mi) mma_2n(dp[mi][0], dp[mi][1], of[mi][kk], b0, b1);
            }
            const bool full = rows_full && j0 + c0 + 15 <= r0 + shift;
            uint32_t a[MI][4];
#pragma unroll
            for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
                for (int half = 0; half < 2; ++half) {
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        const int x = j / 2, r = r0 + 16 * mi + g + 8 * x;
                        const int key = j0 + c0 + 8 * half + 2 * t + j % 2;
                        const bool seen = full || (r < sp.q_len && key <= r + shift);
                        const float p = seen ? exp2f(s[mi][half][j] * sl2 - row_lse2[mi][x]) : 0.0f;
                        s[mi][half][j] = p * (dp[mi][half][j] - row_d[mi][x]);  // dS
                    }
                }
                mma_a_from_acc(a[mi], s[mi][0], s[mi][1]);
            }
#pragma unroll
            for (int dp2 = 0; dp2 < HD / 16; ++dp2) {
                uint32_t b0[2], b1[2];
                mma_b_rows(b0, b1, k_s, LD, c0, 16 * dp2);
#pragma unroll
                for (int mi = 0; mi < MI; ++mi) mma_2n(acc[mi][2 * dp2], acc[mi][2 * dp2 + 1], a[mi], b0, b1);
            }
        }
        __syncthreads();  // the stage is refilled two tiles on
    }
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
        for (int x = 0; x < 2; ++x) {
            const int r = r0 + 16 * mi + g + 8 * x;
            if (r >= sp.q_len) continue;
            mma_store_row<HD>(dq + ((size_t)sp.q_start + r) * ldg + h * HD, acc[mi], x, scale);
        }
    }
}

// The geometry of a block of a key-side kernel (bwd_dkdv_mma, bwd_dkdv_mma8): its span,
// K/V head and first key, and the (query head of the group, query tile) pairs it streams
// through shared memory, `n_tiles` of them.
struct MmaKeyBlock {
    Span sp;
    int j0;       // the block's first key, in the span
    int kvh;      // K/V head
    int group;    // query heads a K/V head
    int shift;    // k_len - q_len: query i sees keys 0 ..= i + shift
    int first_q;  // the first query that sees the block's first key: i + shift >= j0
    int q_tiles;  // query tiles from first_q on
    int n_tiles;  // pairs
    // The first query of pair `it`'s tile.
    __device__ int row(int it) const { return first_q + it % q_tiles * MMA_TILE; }
    // Pair `it`'s query head.
    __device__ int head(int it) const { return kvh * group + it / q_tiles; }
};

__device__ __forceinline__ MmaKeyBlock mma_key_block(const int* spans, const int* tiles, int n_heads,
                                                     int n_kv_heads) {
    MmaKeyBlock b;
    b.sp = load_span(spans, tiles[2 * blockIdx.x]);
    b.j0 = tiles[2 * blockIdx.x + 1];
    b.kvh = blockIdx.y;
    b.group = n_heads / n_kv_heads;
    b.shift = b.sp.k_len - b.sp.q_len;
    b.first_q = max(0, b.j0 - b.shift);
    b.q_tiles = b.sp.q_len > b.first_q ? (b.sp.q_len - b.first_q + MMA_TILE - 1) / MMA_TILE : 0;
    b.n_tiles = b.group * b.q_tiles;
    return b;
}

// A key-side kernel's inputs and the shared memory they stream through: 2 stages of Q
// and dO tiles (stage s: Q at 2 s TILE, dO after it) and of their lse·log2 e and D
// (stage s: at 128 s, D after lse).
struct MmaKeyInputs {
    const __nv_bfloat16 *q, *dout, *k, *v;
    const float *lse, *D;
    int n_heads, n_kv_heads;
    __nv_bfloat16* qo_s;
    float* stats_s;
};

// Loads pair `it`'s lse·log2 e and D (of its 64 queries) into stage it % 2 of
// in.stats_s, with plain loads.
__device__ __forceinline__ void load_pair_stats(const MmaKeyBlock& b, const MmaKeyInputs& in, int it) {
    const int h = b.head(it), i0 = b.row(it);
    float* st = in.stats_s + 2 * MMA_TILE * (it % 2);
    for (int r = threadIdx.x; r < MMA_TILE; r += blockDim.x) {
        const bool ok = i0 + r < b.sp.q_len;
        const size_t at = ((size_t)b.sp.q_start + i0 + r) * in.n_heads + h;
        st[r] = ok ? in.lse[at] * LOG2E : 0.0f;
        st[MMA_TILE + r] = ok ? in.D[at] : 0.0f;
    }
}

// Pᵀ's element of a key-side kernel: exp2(S·scale·log2 e − lse·log2 e) for query qr of the
// tile at i0 (lse2_s: the tile's lse·log2 e, 0 past the span) and key kr where the query
// sees the key, else exp2(−inf) = 0. The mask is computed whole, without a short-circuit,
// and selects the exponent's offset, so no branch goes around the exp2 or lse's load: with
// `full || (...)` and `seen ? exp2f(...) : 0`, nvcc 13.0 put two branches around every
// element's exp2 in all four tensor-core dk/dv kernels (this form also spills nothing in
// attn_bwd_dkdv_mma_bf16_hd64, at 255 registers, where selecting the exp2's result did).
// `on` joins the mask the same way (a warp-uniform condition as a select still pays less
// than the branch nvcc puts around every element for it).
__device__ __forceinline__ float key_side_p(float s, float sl2, const float* lse2_s, int qr, int kr, int i0,
                                           const Span& sp, int shift, bool on = true) {
    const bool seen = on & (i0 + qr < sp.q_len) & (kr < sp.k_len) & (kr <= i0 + qr + shift);
    return exp2f(fmaf(s, sl2, seen ? -lse2_s[qr] : -INFINITY));
}

// Starts the copy of pair `it` into stage it % 2 (lse and D with plain loads).
template <int HD>
__device__ __forceinline__ void mma_load_pair(const MmaKeyBlock& b, const MmaKeyInputs& in, int it) {
    constexpr int TILE = MMA_TILE * (HD + 8);
    const int h = b.head(it), i0 = b.row(it), wq = in.n_heads * HD;
    __nv_bfloat16* q_s = in.qo_s + 2 * (it % 2) * TILE;
    mma_load_tile<HD>(q_s, in.q, b.sp.q_start + i0, b.sp.q_len - i0, wq, h * HD);
    mma_load_tile<HD>(q_s + TILE, in.dout, b.sp.q_start + i0, b.sp.q_len - i0, wq, h * HD);
    load_pair_stats(b, in, it);
}

// Starts copying K and V rows of the block's KEYS keys into k_s and v_s, then pair 0,
// as one cp.async group.
template <int HD, int KEYS>
__device__ __forceinline__ void mma_load_keys(__nv_bfloat16* k_s, __nv_bfloat16* v_s, const MmaKeyBlock& b,
                                              const MmaKeyInputs& in) {
    constexpr int TILE = MMA_TILE * (HD + 8);
    static_assert(KEYS % MMA_TILE == 0, "K and V are loaded in tiles");
    const int wk = in.n_kv_heads * HD;
#pragma unroll
    for (int part = 0; part < KEYS / MMA_TILE; ++part) {
        const int row0 = b.j0 + part * MMA_TILE;
        mma_load_tile<HD>(k_s + part * TILE, in.k, b.sp.k_start + row0, b.sp.k_len - row0, wk, b.kvh * HD);
        mma_load_tile<HD>(v_s + part * TILE, in.v, b.sp.k_start + row0, b.sp.k_len - row0, wk, b.kvh * HD);
    }
    if (b.n_tiles > 0) mma_load_pair<HD>(b, in, 0);
    tl::cp_async_commit();
}

// The top of a key-side kernel's loop over its pairs: starts the copy of pair it + 1,
// waits for pair `it` and makes it visible; returns its stage.
template <int HD>
__device__ __forceinline__ int mma_next_pair(const MmaKeyBlock& b, const MmaKeyInputs& in, int it) {
    if (it + 1 < b.n_tiles) {
        mma_load_pair<HD>(b, in, it + 1);
        tl::cp_async_commit();
    }
    mma_wait_tile(it, b.n_tiles);
    return it % 2;
}

// dk, dv on wgmma (attn_bwd_dkdv_wgmma_bf16_hd{64,128}): bwd_dkdv_mma's arguments and
// tiles of 128 keys, two warpgroups of 64. K and V of the block's keys stay in shared
// memory; for every query head of the group, 64-query tiles of Q and dO stream through
// it with their lse and D, QS queries at a time: Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ (wgmma
// m64n{QS}k16 from shared memory), Pᵀ and dSᵀ on the accumulators, dV += Pᵀ·dO and
// dK += dSᵀ·Q (from registers, dO and Q as MN-major operands). QS is 64 at head_dim 64
// and 32 at 128, where dK and dV alone take 128 registers a thread.
// Dynamic shared memory: K and V of the block's 128 keys, two stages of Q and dO, and
// 1024 bytes to align them (1024 + 8 · 64 · HD · 2 bytes), then two stages of lse·log2 e
// and D of 64 queries (4 · 64 f32).
template <int HD>
__device__ __forceinline__ void wg_load_pair(const MmaKeyBlock& b, const MmaKeyInputs& in, unsigned char* qo_s,
                                             int it) {
    constexpr int TILE = WG_ROWS * HD * 2;
    const int h = b.head(it), i0 = b.row(it), wq = in.n_heads * HD;
    unsigned char* q_s = qo_s + 2 * (it % 2) * TILE;
    wg_load_tile<HD>(q_s, in.q, b.sp.q_start + i0, b.sp.q_len - i0, wq, h * HD);
    wg_load_tile<HD>(q_s + TILE, in.dout, b.sp.q_start + i0, b.sp.q_len - i0, wq, h * HD);
    load_pair_stats(b, in, it);
}

template <int HD, int QS>
__device__ void bwd_dkdv_wgmma(__nv_bfloat16* dk, __nv_bfloat16* dv, const __nv_bfloat16* dout,
                               const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v,
                               const float* lse, const float* D, const int* spans, const int* tiles, int n_heads,
                               int n_kv_heads, float scale, int ldg) {
    constexpr int TILE = WG_ROWS * HD * 2;  // bytes
    static_assert(WG_ROWS % QS == 0 && QS % 16 == 0, "sub-steps of whole k-steps");
    unsigned char* smem = tl::dynamic_shared_1024();
    unsigned char* qo_s = smem + 4 * TILE;  // stage x: Q at qo_s + 2x·TILE, dO a tile on
    const MmaKeyInputs in{q, dout, k, v, lse, D, n_heads, n_kv_heads, nullptr,
                          reinterpret_cast<float*>(smem + 8 * TILE)};
    const int wg = threadIdx.x / 128, warp = threadIdx.x % 128 / 32;
    const int g = threadIdx.x % tl::WARP_SIZE / 4, t = threadIdx.x % 4;
    const MmaKeyBlock blk = mma_key_block(spans, tiles, n_heads, n_kv_heads);
    const Span& sp = blk.sp;
    const int j0 = blk.j0, kvh = blk.kvh, shift = blk.shift;
    const int c0 = WG_ROWS * wg;  // the warpgroup's first key, in the block
    const float sl2 = scale * LOG2E;
    const unsigned char* k_s = smem + wg * TILE;  // the warpgroup's 64 keys
    const unsigned char* v_s = smem + (2 + wg) * TILE;

    // K and V of the block's keys, then pair 0, as one cp.async group
    const int wk = n_kv_heads * HD;
#pragma unroll
    for (int part = 0; part < 2; ++part) {
        const int row0 = j0 + part * WG_ROWS;
        wg_load_tile<HD>(smem + part * TILE, k, sp.k_start + row0, sp.k_len - row0, wk, kvh * HD);
        wg_load_tile<HD>(smem + (2 + part) * TILE, v, sp.k_start + row0, sp.k_len - row0, wk, kvh * HD);
    }
    if (blk.n_tiles > 0) wg_load_pair<HD>(blk, in, qo_s, 0);
    tl::cp_async_commit();
    float dk_acc[HD / 8][4], dv_acc[HD / 8][4];
    zero_acc(dk_acc);
    zero_acc(dv_acc);
    uint32_t pa[QS / 16][4], da[QS / 16][4];  // Pᵀ and dSᵀ as A fragments, read until the next wait

    for (int it = 0; it < blk.n_tiles; ++it) {
        if (it + 1 < blk.n_tiles) {
            wg_load_pair<HD>(blk, in, qo_s, it + 1);
            tl::cp_async_commit();
        }
        mma_wait_tile<true>(it, blk.n_tiles);
        const int i0 = blk.row(it), stage = it % 2;
        const unsigned char* q_s = qo_s + 2 * stage * TILE;
        const unsigned char* o_s = q_s + TILE;
        const float* lse2_s = in.stats_s + 2 * WG_ROWS * stage;
        const float* d_s = lse2_s + WG_ROWS;
        // warpgroup-uniform: no query of this tile sees the warpgroup's first key, or no key
        const bool active = j0 + c0 < sp.k_len && i0 + WG_ROWS - 1 + shift >= j0 + c0;
        for (int q0 = 0; active && q0 < WG_ROWS && i0 + q0 < sp.q_len; q0 += QS) {
            // Sᵀ and dPᵀ as two commit groups, so that Pᵀ is computed while dPᵀ's products
            // run; the wait for Sᵀ also covers the previous sub-step's dV and dK products,
            // so pa and da are free again after it
            float s[QS / 8][4], dp[QS / 8][4];
            tl::wgmma_fence();
#pragma unroll
            for (int ks = 0; ks < HD / 16; ++ks) {
                // rows q0 .. q0 + QS of the Q and dO tiles: 128 bytes a row, whole 8-row atoms
                tl::Wgmma<QS>::template ss<0>(s, wg_desc_k(k_s, ks), wg_desc_k(q_s + q0 * 128, ks), ks > 0);
            }
            tl::wgmma_commit();
#pragma unroll
            for (int ks = 0; ks < HD / 16; ++ks) {
                tl::Wgmma<QS>::template ss<0>(dp, wg_desc_k(v_s, ks), wg_desc_k(o_s + q0 * 128, ks), ks > 0);
            }
            tl::wgmma_commit();
            tl::wgmma_wait<1>(s);
            const int k0 = j0 + c0 + 16 * warp;  // the warp's first key
#pragma unroll
            for (int nt = 0; nt < QS / 8; ++nt) {
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const int qr = q0 + 8 * nt + 2 * t + j % 2;  // query, in the tile
                    const int kr = k0 + g + 8 * (j / 2);
                    s[nt][j] = key_side_p(s[nt][j], sl2, lse2_s, qr, kr, i0, sp, shift);  // Pᵀ
                }
            }
            // dV += Pᵀ·dO (16 queries a product), running while dSᵀ is computed
#pragma unroll
            for (int kq = 0; kq < QS / 16; ++kq) mma_a_from_acc(pa[kq], s[2 * kq], s[2 * kq + 1]);
            tl::wgmma_fence();
#pragma unroll
            for (int kq = 0; kq < QS / 16; ++kq) {
                tl::Wgmma<HD>::template rs<1>(dv_acc, pa[kq], wg_desc_mn(o_s, q0 / 16 + kq), 1);
            }
            tl::wgmma_commit();
            tl::wgmma_wait<1>(dp);
#pragma unroll
            for (int nt = 0; nt < QS / 8; ++nt) {
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const int qr = q0 + 8 * nt + 2 * t + j % 2;
                    dp[nt][j] = s[nt][j] * (dp[nt][j] - d_s[qr]);  // dSᵀ
                }
            }
            // dK += dSᵀ·Q, left running into the next sub-step
#pragma unroll
            for (int kq = 0; kq < QS / 16; ++kq) mma_a_from_acc(da[kq], dp[2 * kq], dp[2 * kq + 1]);
            tl::wgmma_fence();
#pragma unroll
            for (int kq = 0; kq < QS / 16; ++kq) {
                tl::Wgmma<HD>::template rs<1>(dk_acc, da[kq], wg_desc_mn(q_s, q0 / 16 + kq), 1);
            }
            tl::wgmma_commit();
        }
        // the last dV and dK products read this stage's Q and dO
        tl::wgmma_wait<0>(dv_acc);
        tl::wgmma_wait<0>(dk_acc);
        __syncthreads();  // the stage is refilled two tiles on
    }
    tl::cp_async_wait<0>();  // K and V, when no query tile came
#pragma unroll
    for (int x = 0; x < 2; ++x) {
        const int key = j0 + c0 + 16 * warp + g + 8 * x;
        if (key >= sp.k_len) continue;
        const size_t at = ((size_t)sp.k_start + key) * ldg + kvh * HD;
        mma_store_row<HD>(dk + at, dk_acc, x, scale);
        mma_store_row<HD>(dv + at, dv_acc, x, 1.0f);
    }
}

// dk, dv: per warp MI 16-row m-tiles of key rows (as in bwd_dq_mma; K and V of the
// block's 64 MI keys stay in shared memory, dK and dV accumulate in registers); for every
// query head of the group, query tiles stream through shared memory with their lse and
// D, QS queries at a time: Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ, Pᵀ = exp(Sᵀ - lse), dSᵀ = Pᵀ (dPᵀ -
// D), dV += Pᵀ·dO, dK += dSᵀ·Q. Each Q and dO fragment read feeds the warp's MI m-tiles,
// and each K and V fragment (read again for every QS queries: they do not fit in
// registers beside dK and dV) feeds QS / 8 products: QS is 32 at both widths, where 16
// made the A fragments half of the shared-memory reads of Sᵀ and dPᵀ.
template <int HD, int MI, int QS>
__device__ void bwd_dkdv_mma(__nv_bfloat16* dk, __nv_bfloat16* dv, const __nv_bfloat16* dout,
                             const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v,
                             const float* lse, const float* D, const int* spans, const int* tiles, int n_heads,
                             int n_kv_heads, float scale, int ldg) {
    constexpr int LD = HD + 8, TILE = MMA_TILE * LD, KPW = 16 * MI, KEYS = KPW * MMA_WARPS;
    TL_DYNAMIC_SHARED(float, smem);
    __nv_bfloat16* k_s = reinterpret_cast<__nv_bfloat16*>(smem);
    __nv_bfloat16* v_s = k_s + KEYS * LD;
    __nv_bfloat16* qo_s = v_s + KEYS * LD;
    const MmaKeyInputs in{q, dout, k, v, lse, D, n_heads, n_kv_heads, qo_s,
                          reinterpret_cast<float*>(qo_s + 4 * TILE)};
    const int warp = threadIdx.x / tl::WARP_SIZE, lane = threadIdx.x % tl::WARP_SIZE;
    const int g = lane / 4, t = lane % 4;
    const MmaKeyBlock blk = mma_key_block(spans, tiles, n_heads, n_kv_heads);
    const Span& sp = blk.sp;
    const int j0 = blk.j0, kvh = blk.kvh, shift = blk.shift;
    const int c0 = KPW * warp;  // the warp's first key, in the block
    const float sl2 = scale * LOG2E;

    mma_load_keys<HD, KEYS>(k_s, v_s, blk, in);
    float dk_acc[MI][HD / 8][4], dv_acc[MI][HD / 8][4];
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) {
        zero_acc(dk_acc[mi]);
        zero_acc(dv_acc[mi]);
    }

    for (int it = 0; it < blk.n_tiles; ++it) {
        const int i0 = blk.row(it), stage = mma_next_pair<HD>(blk, in, it);
        const __nv_bfloat16* q_s = qo_s + 2 * stage * TILE;
        const __nv_bfloat16* o_s = q_s + TILE;
        const float* lse2_s = in.stats_s + 2 * MMA_TILE * stage;
        const float* d_s = lse2_s + MMA_TILE;
        // warp-uniform: no query of this tile sees the warp's first key, or no key
        const bool active = j0 + c0 < sp.k_len && i0 + MMA_TILE - 1 + shift >= j0 + c0;
        for (int q0 = 0; active && q0 < MMA_TILE && i0 + q0 < sp.q_len; q0 += QS) {
            float s[MI][QS / 8][4], dp[MI][QS / 8][4];
#pragma unroll
            for (int mi = 0; mi < MI; ++mi) {
                zero_acc(s[mi]);
                zero_acc(dp[mi]);
            }
            mma_rows_by_rows<HD, MI, QS>(s, k_s, c0, q_s, q0);
            mma_rows_by_rows<HD, MI, QS>(dp, v_s, c0, o_s, q0);
            // Pᵀ into s, dSᵀ into dp
#pragma unroll
            for (int mi = 0; mi < MI; ++mi) {
                const int k0 = j0 + c0 + 16 * mi;  // the m-tile's first key
#pragma unroll
                for (int nt = 0; nt < QS / 8; ++nt) {
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        const int qr = q0 + 8 * nt + 2 * t + j % 2;  // query, in the tile
                        const int kr = k0 + g + 8 * (j / 2);
                        const float p = key_side_p(s[mi][nt][j], sl2, lse2_s, qr, kr, i0, sp, shift);
                        s[mi][nt][j] = p;
                        dp[mi][nt][j] = p * (dp[mi][nt][j] - d_s[qr]);
                    }
                }
            }
            // dV += Pᵀ·dO and dK += dSᵀ·Q, 16 queries a step
#pragma unroll
            for (int kq = 0; kq < QS / 16; ++kq) {
                uint32_t pa[MI][4], da[MI][4];
#pragma unroll
                for (int mi = 0; mi < MI; ++mi) {
                    mma_a_from_acc(pa[mi], s[mi][2 * kq], s[mi][2 * kq + 1]);
                    mma_a_from_acc(da[mi], dp[mi][2 * kq], dp[mi][2 * kq + 1]);
                }
#pragma unroll
                for (int dp2 = 0; dp2 < HD / 16; ++dp2) {
                    uint32_t b0[2], b1[2];
                    mma_b_rows(b0, b1, o_s, LD, q0 + 16 * kq, 16 * dp2);
#pragma unroll
                    for (int mi = 0; mi < MI; ++mi)
                        mma_2n(dv_acc[mi][2 * dp2], dv_acc[mi][2 * dp2 + 1], pa[mi], b0, b1);
                    mma_b_rows(b0, b1, q_s, LD, q0 + 16 * kq, 16 * dp2);
#pragma unroll
                    for (int mi = 0; mi < MI; ++mi)
                        mma_2n(dk_acc[mi][2 * dp2], dk_acc[mi][2 * dp2 + 1], da[mi], b0, b1);
                }
            }
        }
        __syncthreads();  // the stage is refilled two tiles on
    }
    tl::cp_async_wait<0>();  // K and V, when no query tile came
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
        for (int x = 0; x < 2; ++x) {
            const int key = j0 + c0 + 16 * mi + g + 8 * x;
            if (key >= sp.k_len) continue;
            const size_t at = ((size_t)sp.k_start + key) * ldg + kvh * HD;
            mma_store_row<HD>(dk + at, dk_acc[mi], x, scale);
            mma_store_row<HD>(dv + at, dv_acc[mi], x, 1.0f);
        }
    }
}


// dk, dv at head_dim 128, as FlashAttention-2 splits them: 8 warps and 128 keys a block,
// whose K, V stay in shared memory; query tiles of 64 (with their lse and D) stream
// through it as in bwd_dkdv_mma. For each tile, two phases with a barrier between:
//   1. warp w takes keys 32 (w % 4) .. + 32 and queries 32 (w / 4) .. + 32 of the tile:
//      Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ (each K/V fragment read feeds 4 products, each Q/dO
//      fragment 2), then Pᵀ and dSᵀ, rounded to bf16, into shared memory;
//   2. warp w takes the same 32 keys and head columns 64 (w / 4) .. + 64: dV += Pᵀ·dO and
//      dK += dSᵀ·Q over the tile's 64 queries, Pᵀ and dSᵀ as A fragments out of shared
//      memory.
// dK and dV of a warp's 32 keys x 64 columns are 128 registers, where bwd_dkdv_mma's 16
// keys x 128 columns at one m-tile left its K/V fragments read again for every 32
// queries: 240 shared-memory bytes a product here (P and dS stores included) against 320.
//
// Dynamic shared memory (bf16, LD = HD + 8, PLD = 64 + 8): K, V of the block's 128 keys
// (2 x 128 LD) + 2 stages x (Q, dO) (4 x 64 LD) + Pᵀ, dSᵀ (2 x 128 PLD), then 2 stages x
// (lse, D) of 64 rows (4 x 64 f32).
constexpr int DKDV8_WARPS = 8, DKDV8_KEYS = 128, DKDV8_PLD = MMA_TILE + 8;

template <int HD>
__device__ void bwd_dkdv_mma8(__nv_bfloat16* dk, __nv_bfloat16* dv, const __nv_bfloat16* dout,
                              const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v,
                              const float* lse, const float* D, const int* spans, const int* tiles, int n_heads,
                              int n_kv_heads, float scale, int ldg) {
    constexpr int LD = HD + 8, TILE = MMA_TILE * LD, KEYS = DKDV8_KEYS, PLD = DKDV8_PLD, HALF = HD / 2;
    static_assert(DKDV8_WARPS == 8 && KEYS == 128 && MMA_TILE == 64, "the warp layout below");
    TL_DYNAMIC_SHARED(float, smem);
    __nv_bfloat16* k_s = reinterpret_cast<__nv_bfloat16*>(smem);
    __nv_bfloat16* v_s = k_s + KEYS * LD;
    __nv_bfloat16* qo_s = v_s + KEYS * LD;
    __nv_bfloat16* p_s = qo_s + 4 * TILE;    // Pᵀ [key][query]
    __nv_bfloat16* ds_s = p_s + KEYS * PLD;  // dSᵀ [key][query]
    const MmaKeyInputs in{q, dout, k, v, lse, D, n_heads, n_kv_heads, qo_s,
                          reinterpret_cast<float*>(ds_s + KEYS * PLD)};
    const int warp = threadIdx.x / tl::WARP_SIZE, lane = threadIdx.x % tl::WARP_SIZE;
    const int g = lane / 4, t = lane % 4;
    const int kw = 32 * (warp % 4);    // the warp's first key, in the block (both phases)
    const int qw = 32 * (warp / 4);    // phase 1: its first query, in the tile
    const int cw = HALF * (warp / 4);  // phase 2: its first head column
    const MmaKeyBlock blk = mma_key_block(spans, tiles, n_heads, n_kv_heads);
    const Span& sp = blk.sp;
    const int j0 = blk.j0, kvh = blk.kvh, shift = blk.shift;
    const float sl2 = scale * LOG2E;

    mma_load_keys<HD, KEYS>(k_s, v_s, blk, in);
    float dk_acc[2][HALF / 8][4], dv_acc[2][HALF / 8][4];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi) {
        zero_acc(dk_acc[mi]);
        zero_acc(dv_acc[mi]);
    }
    // warp-uniform: the warp's keys lie in the span
    const bool keys_in = j0 + kw < sp.k_len;

    for (int it = 0; it < blk.n_tiles; ++it) {
        const int i0 = blk.row(it), stage = mma_next_pair<HD>(blk, in, it);
        const __nv_bfloat16* q_s = qo_s + 2 * stage * TILE;
        const __nv_bfloat16* o_s = q_s + TILE;
        const float* lse2_s = in.stats_s + 2 * MMA_TILE * stage;
        const float* d_s = lse2_s + MMA_TILE;

        // Phase 1: Sᵀ and dPᵀ of the warp's 32 keys x 32 queries; Pᵀ and dSᵀ to shared memory.
        {
            float s[2][4][4], dp[2][4][4];
#pragma unroll
            for (int mi = 0; mi < 2; ++mi) {
                zero_acc(s[mi]);
                zero_acc(dp[mi]);
            }
            // warp-uniform: some query of the warp's 32 is in the span and sees its first key
            const bool active = keys_in && i0 + qw < sp.q_len && i0 + qw + 31 + shift >= j0 + kw;
            if (active) {
                mma_rows_by_rows<HD, 2, 32>(s, k_s, kw, q_s, qw);
                mma_rows_by_rows<HD, 2, 32>(dp, v_s, kw, o_s, qw);
            }
#pragma unroll
            for (int mi = 0; mi < 2; ++mi) {
                const int k0 = j0 + kw + 16 * mi;  // the m-tile's first key
#pragma unroll
                for (int nt = 0; nt < 4; ++nt) {
                    float p[4], ds[4];
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        const int qr = qw + 8 * nt + 2 * t + j % 2;  // query, in the tile
                        const int kr = k0 + g + 8 * (j / 2);
                        p[j] = key_side_p(s[mi][nt][j], sl2, lse2_s, qr, kr, i0, sp, shift, active);
                        ds[j] = p[j] * (dp[mi][nt][j] - d_s[qr]);
                    }
#pragma unroll
                    for (int x = 0; x < 2; ++x) {
                        const int at = (kw + 16 * mi + g + 8 * x) * PLD + qw + 8 * nt + 2 * t;
                        tl::assert_aligned<4>(p_s + at);
                        *reinterpret_cast<uint32_t*>(p_s + at) = tl::pack_bf16(p[2 * x], p[2 * x + 1]);
                        tl::assert_aligned<4>(ds_s + at);
                        *reinterpret_cast<uint32_t*>(ds_s + at) = tl::pack_bf16(ds[2 * x], ds[2 * x + 1]);
                    }
                }
            }
        }
        __syncthreads();  // Pᵀ and dSᵀ of the whole tile

        // Phase 2: dV += Pᵀ·dO and dK += dSᵀ·Q for the warp's 32 keys x 64 columns.
        // warp-uniform: some query of the tile sees the warp's first key
        if (keys_in && i0 + MMA_TILE - 1 + shift >= j0 + kw) {
#pragma unroll
            for (int kq = 0; kq < MMA_TILE / 16; ++kq) {
                uint32_t pa[2][4], da[2][4];
#pragma unroll
                for (int mi = 0; mi < 2; ++mi) {
                    mma_a_rows(pa[mi], p_s, PLD, kw + 16 * mi, 16 * kq);
                    mma_a_rows(da[mi], ds_s, PLD, kw + 16 * mi, 16 * kq);
                }
#pragma unroll
                for (int dp2 = 0; dp2 < HALF / 16; ++dp2) {
                    uint32_t b0[2], b1[2];
                    mma_b_rows(b0, b1, o_s, LD, 16 * kq, cw + 16 * dp2);
#pragma unroll
                    for (int mi = 0; mi < 2; ++mi)
                        mma_2n(dv_acc[mi][2 * dp2], dv_acc[mi][2 * dp2 + 1], pa[mi], b0, b1);
                    mma_b_rows(b0, b1, q_s, LD, 16 * kq, cw + 16 * dp2);
#pragma unroll
                    for (int mi = 0; mi < 2; ++mi)
                        mma_2n(dk_acc[mi][2 * dp2], dk_acc[mi][2 * dp2 + 1], da[mi], b0, b1);
                }
            }
        }
        __syncthreads();  // Pᵀ and dSᵀ are rewritten, and the stage refilled two tiles on
    }
    tl::cp_async_wait<0>();  // K and V, when no query tile came
#pragma unroll
    for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
        for (int x = 0; x < 2; ++x) {
            const int key = j0 + kw + 16 * mi + g + 8 * x;
            if (key >= sp.k_len) continue;
            const size_t at = ((size_t)sp.k_start + key) * ldg + kvh * HD + cw;
            mma_store_row<HALF>(dk + at, dk_acc[mi], x, scale);
            mma_store_row<HALF>(dv + at, dv_acc[mi], x, 1.0f);
        }
    }
}

}  // namespace tl_attn

// Entry points, written out (not macro-generated) so their names can be grepped and
// checked against KERNEL_NAMES.
extern "C" __global__ void attn_fwd_f32_bc32(float* out, float* lse, const float* q, const float* k,
                                            const float* v, const int* spans, const int* tiles, int n_heads,
                                            int n_kv_heads, int hd, float scale, int ldo) {
    tl_attn::fwd<float, 32>(out, lse, q, k, v, spans, tiles, n_heads, n_kv_heads, hd, scale, ldo);
}
extern "C" __global__ void attn_bwd_dq_f32_bc32(float* dq, const float* dout, const float* q, const float* k,
                                               const float* v, const float* lse, const float* D,
                                               const int* spans, const int* tiles, int n_heads,
                                               int n_kv_heads, int hd, float scale, int ldg) {
    tl_attn::bwd_dq<float, 32>(dq, dout, q, k, v, lse, D, spans, tiles, n_heads, n_kv_heads, hd, scale, ldg);
}
extern "C" __global__ void attn_bwd_dkdv_f32_bc32(float* dk, float* dv, const float* dout, const float* q,
                                                 const float* k, const float* v, const float* lse,
                                                 const float* D, const int* spans, const int* tiles,
                                                 int n_heads, int n_kv_heads, int hd, float scale, int ldg) {
    tl_attn::bwd_dkdv<float, 32>(dk, dv, dout, q, k, v, lse, D, spans, tiles, n_heads, n_kv_heads, hd, scale, ldg);
}

extern "C" __global__ void attn_fwd_f32_bc16(float* out, float* lse, const float* q, const float* k,
                                            const float* v, const int* spans, const int* tiles, int n_heads,
                                            int n_kv_heads, int hd, float scale, int ldo) {
    tl_attn::fwd<float, 16>(out, lse, q, k, v, spans, tiles, n_heads, n_kv_heads, hd, scale, ldo);
}
extern "C" __global__ void attn_bwd_dq_f32_bc16(float* dq, const float* dout, const float* q, const float* k,
                                               const float* v, const float* lse, const float* D,
                                               const int* spans, const int* tiles, int n_heads,
                                               int n_kv_heads, int hd, float scale, int ldg) {
    tl_attn::bwd_dq<float, 16>(dq, dout, q, k, v, lse, D, spans, tiles, n_heads, n_kv_heads, hd, scale, ldg);
}
extern "C" __global__ void attn_bwd_dkdv_f32_bc16(float* dk, float* dv, const float* dout, const float* q,
                                                 const float* k, const float* v, const float* lse,
                                                 const float* D, const int* spans, const int* tiles,
                                                 int n_heads, int n_kv_heads, int hd, float scale, int ldg) {
    tl_attn::bwd_dkdv<float, 16>(dk, dv, dout, q, k, v, lse, D, spans, tiles, n_heads, n_kv_heads, hd, scale, ldg);
}

extern "C" __global__ void attn_fwd_bf16_bc32(__nv_bfloat16* out, float* lse, const __nv_bfloat16* q, const __nv_bfloat16* k,
                                            const __nv_bfloat16* v, const int* spans, const int* tiles, int n_heads,
                                            int n_kv_heads, int hd, float scale, int ldo) {
    tl_attn::fwd<__nv_bfloat16, 32>(out, lse, q, k, v, spans, tiles, n_heads, n_kv_heads, hd, scale, ldo);
}
extern "C" __global__ void attn_bwd_dq_bf16_bc32(__nv_bfloat16* dq, const __nv_bfloat16* dout, const __nv_bfloat16* q, const __nv_bfloat16* k,
                                               const __nv_bfloat16* v, const float* lse, const float* D,
                                               const int* spans, const int* tiles, int n_heads,
                                               int n_kv_heads, int hd, float scale, int ldg) {
    tl_attn::bwd_dq<__nv_bfloat16, 32>(dq, dout, q, k, v, lse, D, spans, tiles, n_heads, n_kv_heads, hd, scale, ldg);
}
extern "C" __global__ void attn_bwd_dkdv_bf16_bc32(__nv_bfloat16* dk, __nv_bfloat16* dv, const __nv_bfloat16* dout, const __nv_bfloat16* q,
                                                 const __nv_bfloat16* k, const __nv_bfloat16* v, const float* lse,
                                                 const float* D, const int* spans, const int* tiles,
                                                 int n_heads, int n_kv_heads, int hd, float scale, int ldg) {
    tl_attn::bwd_dkdv<__nv_bfloat16, 32>(dk, dv, dout, q, k, v, lse, D, spans, tiles, n_heads, n_kv_heads, hd, scale, ldg);
}

extern "C" __global__ void attn_fwd_bf16_bc16(__nv_bfloat16* out, float* lse, const __nv_bfloat16* q, const __nv_bfloat16* k,
                                            const __nv_bfloat16* v, const int* spans, const int* tiles, int n_heads,
                                            int n_kv_heads, int hd, float scale, int ldo) {
    tl_attn::fwd<__nv_bfloat16, 16>(out, lse, q, k, v, spans, tiles, n_heads, n_kv_heads, hd, scale, ldo);
}
extern "C" __global__ void attn_bwd_dq_bf16_bc16(__nv_bfloat16* dq, const __nv_bfloat16* dout, const __nv_bfloat16* q, const __nv_bfloat16* k,
                                               const __nv_bfloat16* v, const float* lse, const float* D,
                                               const int* spans, const int* tiles, int n_heads,
                                               int n_kv_heads, int hd, float scale, int ldg) {
    tl_attn::bwd_dq<__nv_bfloat16, 16>(dq, dout, q, k, v, lse, D, spans, tiles, n_heads, n_kv_heads, hd, scale, ldg);
}
extern "C" __global__ void attn_bwd_dkdv_bf16_bc16(__nv_bfloat16* dk, __nv_bfloat16* dv, const __nv_bfloat16* dout, const __nv_bfloat16* q,
                                                 const __nv_bfloat16* k, const __nv_bfloat16* v, const float* lse,
                                                 const float* D, const int* spans, const int* tiles,
                                                 int n_heads, int n_kv_heads, int hd, float scale, int ldg) {
    tl_attn::bwd_dkdv<__nv_bfloat16, 16>(dk, dv, dout, q, k, v, lse, D, spans, tiles, n_heads, n_kv_heads, hd, scale, ldg);
}

extern "C" __global__ void attn_bwd_dot_f32(float* D, const float* dout, const float* out, int nq, int n_heads,
                                            int hd, int ldo) {
    tl_attn::bwd_dot(D, dout, out, nq, n_heads, hd, ldo);
}
extern "C" __global__ void attn_bwd_dot_bf16(float* D, const __nv_bfloat16* dout, const __nv_bfloat16* out,
                                             int nq, int n_heads, int hd, int ldo) {
    tl_attn::bwd_dot(D, dout, out, nq, n_heads, hd, ldo);
}

extern "C" __global__ void __launch_bounds__(128)
    attn_fwd_mma_bf16_hd64(__nv_bfloat16* out, float* lse, const __nv_bfloat16* q, const __nv_bfloat16* k,
                           const __nv_bfloat16* v, const int* spans, const int* tiles, int n_heads, int n_kv_heads,
                           int /* hd, always 64 */, float scale, int ldo) {
    tl_attn::fwd_mma<64, 2, 64>(out, lse, q, k, v, spans, tiles, n_heads, n_kv_heads, scale, ldo);
}
extern "C" __global__ void __launch_bounds__(128)
    attn_fwd_mma_bf16_hd128(__nv_bfloat16* out, float* lse, const __nv_bfloat16* q, const __nv_bfloat16* k,
                            const __nv_bfloat16* v, const int* spans, const int* tiles, int n_heads, int n_kv_heads,
                            int /* hd, always 128 */, float scale, int ldo) {
    tl_attn::fwd_mma<128, 2, 32>(out, lse, q, k, v, spans, tiles, n_heads, n_kv_heads, scale, ldo);
}
extern "C" __global__ void __launch_bounds__(256, 2)
    attn_fwd_wgmma_bf16_hd64(__nv_bfloat16* out, float* lse, const __nv_bfloat16* q, const __nv_bfloat16* k,
                             const __nv_bfloat16* v, const int* spans, const int* tiles, int n_heads, int n_kv_heads,
                             int /* hd, always 64 */, float scale, int ldo) {
    tl_attn::fwd_wgmma<64>(out, lse, q, k, v, spans, tiles, n_heads, n_kv_heads, scale, ldo);
}
extern "C" __global__ void __launch_bounds__(256, 2)
    attn_fwd_wgmma_bf16_hd128(__nv_bfloat16* out, float* lse, const __nv_bfloat16* q, const __nv_bfloat16* k,
                              const __nv_bfloat16* v, const int* spans, const int* tiles, int n_heads,
                              int n_kv_heads, int /* hd, always 128 */, float scale, int ldo) {
    tl_attn::fwd_wgmma<128>(out, lse, q, k, v, spans, tiles, n_heads, n_kv_heads, scale, ldo);
}
extern "C" __global__ void __launch_bounds__(256, 2)
    attn_bwd_dq_wgmma_bf16_hd64(__nv_bfloat16* dq, const __nv_bfloat16* dout, const __nv_bfloat16* q,
                                const __nv_bfloat16* k, const __nv_bfloat16* v, const float* lse, const float* D,
                                const int* spans, const int* tiles, int n_heads, int n_kv_heads,
                                int /* hd, always 64 */, float scale, int ldg) {
    tl_attn::bwd_dq_wgmma<64>(dq, dout, q, k, v, lse, D, spans, tiles, n_heads, n_kv_heads, scale, ldg);
}
extern "C" __global__ void __launch_bounds__(256)
    attn_bwd_dq_wgmma_bf16_hd128(__nv_bfloat16* dq, const __nv_bfloat16* dout, const __nv_bfloat16* q,
                                 const __nv_bfloat16* k, const __nv_bfloat16* v, const float* lse, const float* D,
                                 const int* spans, const int* tiles, int n_heads, int n_kv_heads,
                                 int /* hd, always 128 */, float scale, int ldg) {
    tl_attn::bwd_dq_wgmma<128>(dq, dout, q, k, v, lse, D, spans, tiles, n_heads, n_kv_heads, scale, ldg);
}
extern "C" __global__ void __launch_bounds__(256)
    attn_bwd_dkdv_wgmma_bf16_hd64(__nv_bfloat16* dk, __nv_bfloat16* dv, const __nv_bfloat16* dout,
                                  const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v,
                                  const float* lse, const float* D, const int* spans, const int* tiles, int n_heads,
                                  int n_kv_heads, int /* hd, always 64 */, float scale, int ldg) {
    tl_attn::bwd_dkdv_wgmma<64, 64>(dk, dv, dout, q, k, v, lse, D, spans, tiles, n_heads, n_kv_heads, scale, ldg);
}
extern "C" __global__ void __launch_bounds__(256)
    attn_bwd_dkdv_wgmma_bf16_hd128(__nv_bfloat16* dk, __nv_bfloat16* dv, const __nv_bfloat16* dout,
                                   const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v,
                                   const float* lse, const float* D, const int* spans, const int* tiles, int n_heads,
                                   int n_kv_heads, int /* hd, always 128 */, float scale, int ldg) {
    tl_attn::bwd_dkdv_wgmma<128, 32>(dk, dv, dout, q, k, v, lse, D, spans, tiles, n_heads, n_kv_heads, scale, ldg);
}
extern "C" __global__ void __launch_bounds__(128)
    attn_bwd_dq_mma_bf16_hd64(__nv_bfloat16* dq, const __nv_bfloat16* dout, const __nv_bfloat16* q,
                              const __nv_bfloat16* k, const __nv_bfloat16* v, const float* lse, const float* D,
                              const int* spans, const int* tiles, int n_heads, int n_kv_heads,
                              int /* hd, always 64 */, float scale, int ldg) {
    tl_attn::bwd_dq_mma<64, 2>(dq, dout, q, k, v, lse, D, spans, tiles, n_heads, n_kv_heads, scale, ldg);
}
extern "C" __global__ void __launch_bounds__(128)
    attn_bwd_dkdv_mma_bf16_hd64(__nv_bfloat16* dk, __nv_bfloat16* dv, const __nv_bfloat16* dout,
                                const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v,
                                const float* lse, const float* D, const int* spans, const int* tiles,
                                int n_heads, int n_kv_heads, int /* hd, always 64 */, float scale, int ldg) {
    tl_attn::bwd_dkdv_mma<64, 2, 32>(dk, dv, dout, q, k, v, lse, D, spans, tiles, n_heads, n_kv_heads, scale, ldg);
}
extern "C" __global__ void __launch_bounds__(128)
    attn_bwd_dq_mma_bf16_hd128(__nv_bfloat16* dq, const __nv_bfloat16* dout, const __nv_bfloat16* q,
                              const __nv_bfloat16* k, const __nv_bfloat16* v, const float* lse, const float* D,
                              const int* spans, const int* tiles, int n_heads, int n_kv_heads,
                              int /* hd, always 128 */, float scale, int ldg) {
    tl_attn::bwd_dq_mma<128, 1>(dq, dout, q, k, v, lse, D, spans, tiles, n_heads, n_kv_heads, scale, ldg);
}
extern "C" __global__ void __launch_bounds__(256)
    attn_bwd_dkdv_mma_bf16_hd128(__nv_bfloat16* dk, __nv_bfloat16* dv, const __nv_bfloat16* dout,
                                const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v,
                                const float* lse, const float* D, const int* spans, const int* tiles,
                                int n_heads, int n_kv_heads, int /* hd, always 128 */, float scale, int ldg) {
    tl_attn::bwd_dkdv_mma8<128>(dk, dv, dout, q, k, v, lse, D, spans, tiles, n_heads, n_kv_heads, scale, ldg);
}
