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
// The emulator's shared addresses: the offset in the block's dynamic shared memory plus
// a base drawn per block (16-byte aligned, like a GPU's, and no more).
__device__ __forceinline__ uint32_t smem_addr(const void* p) { return ::tl_emu::shared_address(p); }
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

// ---- warpgroup matrix products (wgmma, sm_90a) -------------------------------------
//
// wgmma.mma_async.m64nNk16.f32.bf16.bf16: the 128 threads of a warpgroup (4 warps,
// threads 128w .. 128w + 127 of the block) compute D[64, N] (+)= A[64, 16]·B[16, N]
// together. B, and A unless it comes from registers, lie in shared memory, described
// by a 64-bit descriptor (wgmma_desc). Thread t = 32·w + l of the warpgroup (warp w,
// g = l / 4, q = l % 4) holds in d[i][j] the accumulator of row 16w + g (+8 for j >= 2),
// column 8i + 2q + j % 2, for i < N / 8: as mma_bf16_16816's d of N / 8 8-column tiles.
// An A in registers is the mma.sync A fragment of rows 16w .. 16w + 15.
//
// Shared-memory layouts (offsets in bytes; W = 8, 4 or 2 for the 128-, 64- and 32-byte
// swizzles, which XOR bits 4 .. 4 + log2(W) of each element's shared address with its
// bits 7 .. 7 + log2(W): a swizzled tile starts at a shared address that is a multiple
// of 128·W, so that the same XOR on its offsets stores it):
//  * K-major (A as [64][k], B as [N][k]; k contiguous), element (r, k) of a k16 step:
//      no swizzle: (r % 8)·16 + (r / 8)·SBO + (k / 8)·LBO + (k % 8)·2, i.e. 8x8 "core
//      matrices" of 128 contiguous bytes;
//      swizzled:   (r % 8)·16W + (r / 8)·SBO + (k / 8)·16 + (k % 8)·2, i.e. rows of 16W
//      bytes (LBO unused; the next k16 step starts 32 bytes on);
//  * MN-major (B as [k][N]; N contiguous; tnsp_b = 1), element (k, n):
//      no swizzle: (n % 8)·2 + (n / 8)·SBO + (k % 8)·16 + (k / 8)·LBO;
//      swizzled:   (n % 8)·2 + (n / 8 % W)·16 + (n / 8W)·LBO + (k % 8)·16W + (k / 8)·SBO.
//
// A warpgroup issues wgmma_fence() before its first product and after it writes an
// accumulator or A register a product reads, then its products, wgmma_commit() to
// close them into a group, and wgmma_wait<N>(d) until at most N groups are pending:
// only then may it read d, or overwrite the shared memory the products read. A product
// reads shared memory through the async proxy: each thread that wrote an operand tile
// (with stores, or cp.async copies it has waited for) passes fence_proxy_async() before
// the barrier that hands the tile to the warpgroup (PTX ISA, wgmma.fence). Every
// thread of the warpgroup takes part in each call. The test suite's CPU emulator
// (tests/emu) provides its own; it runs a group's products when they are issued or when
// they are waited for (drawn per block), from the shared memory of that moment.
enum class Swizzle : int { None = 0, B128 = 1, B64 = 2, B32 = 3 };

// The block's dynamic shared memory from its first 1024-byte aligned shared address, where
// 128-byte swizzled tiles may start (the launcher adds 1024 bytes for it).
__device__ __forceinline__ unsigned char* dynamic_shared_1024() {
    TL_DYNAMIC_SHARED(unsigned char, raw);
    return raw + (1024 - smem_addr(raw) % 1024) % 1024;
}

// The descriptor of a shared-memory operand starting at `p` (16-byte aligned), with
// leading and stride byte offsets `lbo` and `sbo` as the layouts above use them.
__device__ __forceinline__ uint64_t wgmma_desc(const void* p, uint32_t lbo, uint32_t sbo, Swizzle swizzle) {
    const uint32_t a = smem_addr(p);
    return uint64_t((a & 0x3FFFFu) >> 4) | uint64_t((lbo & 0x3FFFFu) >> 4) << 16 |
           uint64_t((sbo & 0x3FFFFu) >> 4) << 32 | uint64_t(int(swizzle)) << 62;
}

#if defined(__CUDACC__)
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// the 16 accumulator operands of an m64n32k16 product: placeholders and constraints
#define TL_WGMMA_D32 \
    "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15"
#define TL_WGMMA_D32_OUT(d) \
    "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), \
    "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), \
    "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3])
// the 32 accumulator operands of an m64n64k16 product: placeholders and constraints
#define TL_WGMMA_D64 \
    "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define TL_WGMMA_D64_OUT(d) \
    "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), \
    "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), \
    "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), \
    "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), \
    "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), \
    "+f"(d[7][2]), "+f"(d[7][3])
// the 64 accumulator operands of an m64n128k16 product: placeholders and constraints
#define TL_WGMMA_D128 \
    "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
    "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
    "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define TL_WGMMA_D128_OUT(d) \
    "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), \
    "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), \
    "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), \
    "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), \
    "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), \
    "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), \
    "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), "+f"(d[10][0]), "+f"(d[10][1]), \
    "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]), \
    "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), \
    "+f"(d[13][2]), "+f"(d[13][3]), "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), \
    "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
template <int N> struct Wgmma;
// Wgmma<N>: ss (A and B from shared memory) and rs (A from registers). M = N / 2
// accumulator operands come first, so the others are numbered from M: the macro takes
// those numbers (stringized into the instruction) as M0 .. M6 = M .. M + 6.
#define TL_WGMMA_SPECIALIZATION(N, M0, M1, M2, M3, M4, M5, M6)                                               \
    template <> struct Wgmma<N> {                                                                             \
        template <int TB>                                                                                     \
        static __device__ __forceinline__ void ss(float (&d)[N / 8][4], uint64_t a, uint64_t b, int scale_d) { \
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #M2 ", 0;\n"                                   \
                         "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32.bf16.bf16 {" TL_WGMMA_D##N "}, "      \
                         "%" #M0 ", %" #M1 ", p, 1, 1, 0, %" #M3 ";\n}\n"                                     \
                         : TL_WGMMA_D##N##_OUT(d)                                                             \
                         : "l"(a), "l"(b), "r"(scale_d), "n"(TB));                                            \
        }                                                                                                     \
        template <int TB>                                                                                     \
        static __device__ __forceinline__ void rs(float (&d)[N / 8][4], const uint32_t (&a)[4], uint64_t b,    \
                                                  int scale_d) {                                              \
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #M5 ", 0;\n"                                   \
                         "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32.bf16.bf16 {" TL_WGMMA_D##N "}, "      \
                         "{%" #M0 ", %" #M1 ", %" #M2 ", %" #M3 "}, %" #M4 ", p, 1, 1, %" #M6 ";\n}\n"         \
                         : TL_WGMMA_D##N##_OUT(d)                                                             \
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(scale_d), "n"(TB));        \
        }                                                                                                     \
    };
TL_WGMMA_SPECIALIZATION(32, 16, 17, 18, 19, 20, 21, 22)
TL_WGMMA_SPECIALIZATION(64, 32, 33, 34, 35, 36, 37, 38)
TL_WGMMA_SPECIALIZATION(128, 64, 65, 66, 67, 68, 69, 70)
#undef TL_WGMMA_SPECIALIZATION
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int PENDING, int M> __device__ __forceinline__ void wgmma_wait(float (&d)[M][4]) {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(PENDING) : "memory");
    // the accumulators are final only now: keep the compiler from reading them earlier
#pragma unroll
    for (int i = 0; i < M; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) asm volatile("" : "+f"(d[i][j])::"memory");
    }
}
#else
// Other architectures have no wgmma: the kernels that use it are launched on sm_90a only.
template <int N> struct Wgmma {
    template <int TB> static __device__ void ss(float (&)[N / 8][4], uint64_t, uint64_t, int) { __trap(); }
    template <int TB> static __device__ void rs(float (&)[N / 8][4], const uint32_t (&)[4], uint64_t, int) { __trap(); }
};
__device__ __forceinline__ void wgmma_fence() { __trap(); }
__device__ __forceinline__ void fence_proxy_async() { __trap(); }
__device__ __forceinline__ void wgmma_commit() { __trap(); }
template <int PENDING, int M> __device__ __forceinline__ void wgmma_wait(float (&)[M][4]) { __trap(); }
#endif
#else
template <int N> struct Wgmma {
    template <int TB> static void ss(float (&d)[N / 8][4], uint64_t a, uint64_t b, int scale_d) {
        ::tl_emu::wgmma(&d[0][0], N, a, nullptr, b, scale_d != 0, TB != 0);
    }
    template <int TB> static void rs(float (&d)[N / 8][4], const uint32_t (&a)[4], uint64_t b, int scale_d) {
        ::tl_emu::wgmma(&d[0][0], N, 0, a, b, scale_d != 0, TB != 0);
    }
};
inline void wgmma_fence() { ::tl_emu::wgmma_fence(); }
inline void fence_proxy_async() { ::tl_emu::fence_proxy_async(); }
inline void wgmma_commit() { ::tl_emu::wgmma_commit(); }
template <int PENDING, int M> inline void wgmma_wait(float (&)[M][4]) { ::tl_emu::wgmma_wait(PENDING); }
#endif

}  // namespace tl

#endif  // TUNELOOP_COMMON_CUH
