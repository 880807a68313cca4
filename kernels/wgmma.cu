// The warpgroup matrix product (wgmma, sm_90a) on its own, in each shared-memory layout
// kernels/common.cuh describes, for the test that holds the CPU emulator's wgmma to a
// GPU's: the layouts, the descriptors and the accumulator fragments are what the
// tensor-core kernels built on it rely on.
//
//   wgmma_probe_n64_bf16 / wgmma_probe_n128_bf16(d, a, b, k, mode)
//     d [64, N] f32 = a [64, k] · b [k, N], a and b row-major bf16, k a multiple of 16 up
//     to 64; one block of 128 threads (one warpgroup), dynamic shared memory
//     1024 + (64 + N)·128 bytes (1024 to align the tiles). `mode`: bit 0 takes A from registers (else from
//     shared memory, K-major), bit 1 lays B out MN-major ([k][N], as a V tile; else
//     K-major, [N][k], as a K tile), bit 2 swizzles the shared tiles by 128 bytes (else
//     8x8 core matrices). Launched on sm_90a only (other architectures trap).

#include "common.cuh"

namespace tl_wgmma {

// A [rows][cols] bf16 tile in shared memory, from a 1024-byte aligned start; cols is the
// contiguous index: k for a K-major tile ([64][k] A, [N][k] B), n for an MN-major one
// ([k][N] B). No swizzle: 8x8 core matrices of 128 bytes, a row of them (8 rows, all
// cols) after another, so along cols they are 128 bytes apart and along rows cols·16;
// 128-byte swizzle: rows of 64 elements (128 bytes), the 16-byte chunk c of row r at
// chunk c ^ (r % 8), a tile wider than 64 split into 64-wide slabs one after another.
struct Layout {
    int rows, cols;
    bool swizzle, mn_major;

    __device__ uint32_t bytes() const { return uint32_t(swizzle ? (cols + 63) / 64 * rows * 128 : rows * cols * 2); }

    // The byte offset of element (r, c).
    __device__ uint32_t offset(int r, int c) const {
        if (!swizzle) return uint32_t((r / 8) * (cols / 8) * 128 + (c / 8) * 128 + (r % 8) * 16 + (c % 8) * 2);
        // slab of 64 contiguous columns; in it, row r at 128·r, the 16-byte chunk XORed
        // with r % 8
        const int slab = c / 64, cc = c % 64;
        const uint32_t off = uint32_t(slab * rows * 128 + r * 128 + cc * 2);
        return off ^ (((off >> 7) & 7) << 4);
    }

    // The descriptor of the k16 step `s` of this tile at `base`.
    __device__ uint64_t desc(const unsigned char* base, int s) const {
        if (!swizzle) {
            if (!mn_major) {
                // k-step s: core-matrix columns 2s, 2s + 1 (LBO 128 apart); 8-row groups SBO apart
                return tl::wgmma_desc(base + s * 256, 128, uint32_t(cols / 8 * 128), tl::Swizzle::None);
            }
            // k-step s: k rows 16s .. 16s + 15, k-groups (LBO) cols/8·128 apart; n-groups (SBO) 128
            return tl::wgmma_desc(base + s * 2 * (cols / 8) * 128, uint32_t(cols / 8 * 128), 128, tl::Swizzle::None);
        }
        if (!mn_major) {
            // k-step s: slab s / 4, 32 bytes on for each step in it; 8-row atoms 1024 apart
            return tl::wgmma_desc(base + (s / 4) * rows * 128 + (s % 4) * 32, 0, 1024, tl::Swizzle::B128);
        }
        // k-step s: k rows 16s .. (two 8-row atoms, SBO 1024 apart); 64-wide n slabs LBO apart
        return tl::wgmma_desc(base + s * 16 * 128, uint32_t(rows * 128), 1024, tl::Swizzle::B128);
    }
};

template <int N, int TB>
__device__ void probe(float* d, const __nv_bfloat16* a, const __nv_bfloat16* b, int k, int mode) {
    unsigned char* smem = tl::dynamic_shared_1024();
    const bool reg_a = mode & 1, swizzle = mode & 4;
    const Layout la{64, k, swizzle, false};
    // B: K-major [N][k] (element (n, kk)), or MN-major [k][N] (element (kk, n))
    const Layout lb = TB ? Layout{k, N, swizzle, true} : Layout{N, k, swizzle, false};
    unsigned char* sa = smem;
    unsigned char* sb = smem + la.bytes();
    const int t = threadIdx.x;
    for (int i = t; i < 64 * k; i += 128) {
        const int r = i / k, c = i % k;
        *reinterpret_cast<__nv_bfloat16*>(sa + la.offset(r, c)) = a[i];
    }
    for (int i = t; i < k * N; i += 128) {
        const int kk = i / N, n = i % N;
        const uint32_t off = TB ? lb.offset(kk, n) : lb.offset(n, kk);
        *reinterpret_cast<__nv_bfloat16*>(sb + off) = b[i];
    }
    tl::fence_proxy_async();  // the products read the tiles through the async proxy
    __syncthreads();

    const int w = t / 32, g = t % 32 / 4, q = t % 4;
    float acc[N / 8][4];
    for (int i = 0; i < N / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
    for (int s = 0; s < k / 16; ++s) {
        tl::wgmma_fence();
        if (reg_a) {
            // the mma.sync A fragment of rows 16w .. 16w + 15, columns 16s ..
            uint32_t fa[4];
            for (int j = 0; j < 4; ++j) {
                const int r = 16 * w + g + 8 * (j % 2), c = 16 * s + 2 * q + 8 * (j / 2);
                fa[j] = tl::pack_bf16(a[r * k + c], a[r * k + c + 1]);
            }
            tl::Wgmma<N>::template rs<TB>(acc, fa, lb.desc(sb, s), 1);
            // the product reads fa until it completes: wait before fa is written again
            tl::wgmma_commit();
            tl::wgmma_wait<0>(acc);
        } else {
            tl::Wgmma<N>::template ss<TB>(acc, la.desc(sa, s), lb.desc(sb, s), 1);
        }
    }
    tl::wgmma_commit();
    tl::wgmma_wait<0>(acc);
    for (int i = 0; i < N / 8; ++i) {
        for (int j = 0; j < 4; ++j) d[(16 * w + g + 8 * (j / 2)) * N + 8 * i + 2 * q + j % 2] = acc[i][j];
    }
}

template <int N>
__device__ void probe_any(float* d, const __nv_bfloat16* a, const __nv_bfloat16* b, int k, int mode) {
    if (mode & 2) {
        probe<N, 1>(d, a, b, k, mode);
    } else {
        probe<N, 0>(d, a, b, k, mode);
    }
}

}  // namespace tl_wgmma

extern "C" __global__ void __launch_bounds__(128)
    wgmma_probe_n64_bf16(float* d, const __nv_bfloat16* a, const __nv_bfloat16* b, int k, int mode) {
    tl_wgmma::probe_any<64>(d, a, b, k, mode);
}
extern "C" __global__ void __launch_bounds__(128)
    wgmma_probe_n128_bf16(float* d, const __nv_bfloat16* a, const __nv_bfloat16* b, int k, int mode) {
    tl_wgmma::probe_any<128>(d, a, b, k, mode);
}
