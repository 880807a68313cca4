// Helpers shared by every kernel file.
//
// build.rs compiles all kernels/*.cu as ONE translation unit (a generated file that
// #includes each of them), so this header is seen once per build and every file-local
// helper in a .cu file must have a name no other .cu file uses (or live in its own
// namespace). Kernel entry points are `extern "C"` so their names are not mangled and
// the Rust side can look them up by the names in src/kernels.rs::KERNEL_NAMES.
//
// Conventions for the kernels built on these helpers:
//  * outputs first, then inputs, then sizes, then scalars (as in llm.c);
//  * `T` is the storage type of activations and weights (float or __nv_bfloat16);
//    arithmetic and every reduction run in f32;
//  * block sizes are multiples of 32 and at most 1024 (block_reduce_sum relies on it).
#ifndef TUNELOOP_COMMON_CUH
#define TUNELOOP_COMMON_CUH

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

// Dynamic shared memory, `extern __shared__ T name[]`; a macro so that the test suite's
// CPU emulator of the kernels (tests/emu) can provide it.
#ifndef TL_DYNAMIC_SHARED
#define TL_DYNAMIC_SHARED(T, name) extern __shared__ T name[]
#endif

// Static shared memory, `__shared__ T name dims` (dims `[n]`, `[n][m]`, or empty for one
// value); a macro so that the emulator can fill it with NaNs before every block, as a
// GPU's shared memory holds anything when a block starts. Kernels declare their static
// shared memory with it only (the emulator rejects a bare `__shared__`).
#ifndef TL_SHARED
#define TL_SHARED(T, name, dims) __shared__ T name dims
#endif

namespace tl {

constexpr unsigned FULL_MASK = 0xffffffffu;
constexpr int WARP_SIZE = 32;

// ---- loads and stores: storage type <-> f32 --------------------------------------

__device__ __forceinline__ float load_f32(const float* p) { return *p; }
__device__ __forceinline__ float load_f32(const __nv_bfloat16* p) { return __bfloat162float(*p); }

__device__ __forceinline__ void store_f32(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_f32(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// ---- 16-byte vectors: 8 bf16 or 4 f32 in one load or store --------------------------

template <typename T> struct alignas(16) Vec16 {
    T v[16 / sizeof(T)];
};

// A vector access of BYTES at p must be BYTES-aligned on a GPU (it faults otherwise); the
// test suite's CPU emulator, which would not, checks it.
template <unsigned BYTES> __device__ __forceinline__ void assert_aligned(const void* p) {
#if defined(__CUDACC__)
    (void)p;
#else
    ::tl_emu::check_aligned(p, BYTES);
#endif
}

// v = the 8 values at p, as f32 (p 16-byte aligned: one load in bf16, two in f32).
template <typename T> __device__ __forceinline__ void load8(float (&v)[8], const T* p) {
    constexpr int N = 16 / sizeof(T);
    assert_aligned<16>(p);
#pragma unroll
    for (int h = 0; h < 8 / N; ++h) {
        const Vec16<T> x = reinterpret_cast<const Vec16<T>*>(p)[h];
#pragma unroll
        for (int j = 0; j < N; ++j) v[h * N + j] = load_f32(&x.v[j]);
    }
}

// The 8 values v at p, rounded once to T (p 16-byte aligned).
template <typename T> __device__ __forceinline__ void store8(T* p, const float (&v)[8]) {
    constexpr int N = 16 / sizeof(T);
    assert_aligned<16>(p);
#pragma unroll
    for (int h = 0; h < 8 / N; ++h) {
        Vec16<T> x;
#pragma unroll
        for (int j = 0; j < N; ++j) store_f32(&x.v[j], v[h * N + j]);
        reinterpret_cast<Vec16<T>*>(p)[h] = x;
    }
}

// N = 1 or 8 values at p as f32, and back: one scalar, or load8/store8.
template <int N, typename T> __device__ __forceinline__ void load_n(float (&v)[N], const T* p) {
    static_assert(N == 1 || N == 8, "1 or 8 values");
    if constexpr (N == 1) {
        v[0] = load_f32(p);
    } else {
        load8(v, p);
    }
}
template <int N, typename T> __device__ __forceinline__ void store_n(T* p, const float (&v)[N]) {
    static_assert(N == 1 || N == 8, "1 or 8 values");
    if constexpr (N == 1) {
        store_f32(p, v[0]);
    } else {
        store8(p, v);
    }
}

__device__ __forceinline__ bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// ---- grid-stride loops over a row-major [rows, cols] index space ---------------------

// Whether a grid-stride loop over n indices can count in 32 bits: n and n plus a grid's
// stride (at most 65535 blocks of 1024) both fit. A 64-bit division costs tens of
// instructions, more than an element-wise kernel's bytes take to move.
__device__ __forceinline__ bool fits_u32(size_t n) { return n <= 0x7fffffffu; }

// Calls f(i, r, c) for every i < rows * cols, r = i / cols and c = i % cols, over the
// grid (any grid), in 32-bit arithmetic where the space allows.
template <typename F> __device__ __forceinline__ void for_each_rc(size_t rows, size_t cols, F f) {
    const size_t total = rows * cols;
    if (cols == 0) return;
    if (fits_u32(total)) {
        const unsigned n = (unsigned)total, w = (unsigned)cols;
        for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
            const unsigned r = i / w;
            f((size_t)i, (size_t)r, (size_t)(i - r * w));
        }
    } else {
        for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
             i += (size_t)gridDim.x * blockDim.x) {
            const size_t r = i / cols;
            f(i, r, i - r * cols);
        }
    }
}

// ---- reductions -------------------------------------------------------------------

// Sum over the 32 lanes of a warp; every lane gets the total. All 32 lanes must call it.
__device__ __forceinline__ float warp_reduce_sum(float v) {
    #pragma unroll
    for (int offset = WARP_SIZE / 2; offset > 0; offset /= 2) {
        v += __shfl_xor_sync(FULL_MASK, v, offset);
    }
    return v;
}

// Max over the 32 lanes of a warp; every lane gets the result.
__device__ __forceinline__ float warp_reduce_max(float v) {
    #pragma unroll
    for (int offset = WARP_SIZE / 2; offset > 0; offset /= 2) {
        v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, offset));
    }
    return v;
}

// Sum over the whole (1-D) block; every thread gets the total. Every thread of the block
// must call it (it contains __syncthreads), and blockDim.x must be a multiple of 32.
// Safe to call repeatedly in a loop: the leading barrier keeps a call from overwriting
// the scratch while slow threads still read the previous call's result.
__device__ __forceinline__ float block_reduce_sum(float v) {
    TL_SHARED(float, warp_sums, [WARP_SIZE]);
    TL_SHARED(float, total, );
    const int lane = threadIdx.x % WARP_SIZE;
    const int warp = threadIdx.x / WARP_SIZE;
    const int num_warps = blockDim.x / WARP_SIZE;

    v = warp_reduce_sum(v);
    __syncthreads();
    if (lane == 0) warp_sums[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float s = lane < num_warps ? warp_sums[lane] : 0.0f;
        s = warp_reduce_sum(s);
        if (lane == 0) total = s;
    }
    __syncthreads();
    return total;
}

// out[c] += sum over r < rows of in[r, c]   (in [rows, d] of f32 or bf16; f32 sums)
//
// Launch: grid = ceil(d / 32), 1-D blocks of a multiple of 32 threads (at most 1024).
// Each block owns 32 adjacent columns; its warps split the rows between them (every warp
// reads 32 consecutive values a row: coalesced) and then add their sums in a fixed
// order, so the result is deterministic.
template <typename T>
__device__ __forceinline__ void col_sum_acc(float* __restrict__ out, const T* __restrict__ in, int rows, int d) {
    TL_SHARED(float, warp_sums, [WARP_SIZE][WARP_SIZE]);
    const int lane = threadIdx.x % WARP_SIZE;
    const int warp = threadIdx.x / WARP_SIZE;
    const int num_warps = blockDim.x / WARP_SIZE;
    const int c = blockIdx.x * WARP_SIZE + lane;

    float s = 0.0f;
    if (c < d) {
        for (int r = warp; r < rows; r += num_warps) s += load_f32(in + (size_t)r * d + c);
    }
    warp_sums[warp][lane] = s;
    __syncthreads();
    if (warp == 0 && c < d) {
        float total = 0.0f;
        for (int k = 0; k < num_warps; ++k) total += warp_sums[k][lane];
        out[c] += total;
    }
}

// Max over the whole (1-D) block; same contract as block_reduce_sum.
__device__ __forceinline__ float block_reduce_max(float v) {
    TL_SHARED(float, warp_maxes, [WARP_SIZE]);
    TL_SHARED(float, result, );
    const int lane = threadIdx.x % WARP_SIZE;
    const int warp = threadIdx.x / WARP_SIZE;
    const int num_warps = blockDim.x / WARP_SIZE;

    v = warp_reduce_max(v);
    __syncthreads();
    if (lane == 0) warp_maxes[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float m = lane < num_warps ? warp_maxes[lane] : -INFINITY;
        m = warp_reduce_max(m);
        if (lane == 0) result = m;
    }
    __syncthreads();
    return result;
}

// ---- tensor cores (sm_80+) ----------------------------------------------------------

// Two bf16 in one 32-bit register, `lo` in the low half: an mma fragment register.
__device__ __forceinline__ uint32_t pack_bf16(__nv_bfloat16 lo, __nv_bfloat16 hi) {
    return uint32_t(__bfloat16_as_ushort(lo)) | (uint32_t(__bfloat16_as_ushort(hi)) << 16);
}
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    return pack_bf16(__float2bfloat16_rn(lo), __float2bfloat16_rn(hi));
}

// d += a·b over one warp: mma.sync.m16n8k16.row.col.f32.bf16.bf16.f32. With group
// g = lane / 4 and t = lane % 4, a[j] holds row g (+8 for odd j), columns 2t, 2t+1 (+8
// for j >= 2) of the 16x16 A; b[j] rows 2t, 2t+1 (+8 for j = 1), column g of the 16x8 B;
// d[j] row g (+8 for j >= 2), column 2t + j % 2 of the 16x8 accumulator. Every lane of
// the warp must call it. The test suite's CPU emulator (tests/emu) provides its own.
#if defined(__CUDACC__)
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#else
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    ::tl_emu::mma_m16n8k16_bf16(d, a, b);
}
#endif

// ---- shared-memory fragments and asynchronous copies (sm_80+) ----------------------
//
// ldmatrix_x4 (ldmatrix.sync.aligned.m8n8.x4.shared.b16): lane l passes `row`, the
// address of row l % 8 of the 8x8 bf16 matrix l / 8 in shared memory (16-byte aligned);
// r[i] gets, for g = lane / 4 and t = lane % 4, row g, columns 2t, 2t+1 of matrix i: an
// mma A or B register. ldmatrix_x4_trans (.trans) gets rows 2t, 2t+1 of column g instead.
// Every lane of the warp must call them.
//
// cp_async_16 starts copying 16 bytes from global to shared memory (both 16-byte
// aligned), or writes 16 zero bytes when !valid; cp_async_commit closes the group of
// copies started since the last one; cp_async_wait<N> waits until at most the N most
// recent groups are still in flight. A copy is visible to other threads after the wait
// and a __syncthreads. The test suite's CPU emulator (tests/emu) provides its own.
#if defined(__CUDACC__)
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const __nv_bfloat16* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(row)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const __nv_bfloat16* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(row)));
}
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
                 "r"(valid ? 16 : 0)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
#else
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const __nv_bfloat16* row) {
    ::tl_emu::ldmatrix_x4(r, row, false);
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const __nv_bfloat16* row) {
    ::tl_emu::ldmatrix_x4(r, row, true);
}
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
    ::tl_emu::cp_async_16(dst, src, valid ? 16 : 0);
}
__device__ __forceinline__ void cp_async_commit() { ::tl_emu::cp_async_commit(); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    ::tl_emu::cp_async_wait(N);
}
#endif

}  // namespace tl

#endif  // TUNELOOP_COMMON_CUH
