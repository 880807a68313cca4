// Small utilities the CUDA backend needs between the real ops: element-wise add and
// scale, casts between f32 and bf16, row gathers, the bias broadcast of a
// linear layer and the column sum that is its bias gradient.
//
// Layout: row-major [rows, cols]; n counts elements. Launch: 1-D, any grid (every kernel
// strides over its index space), blockDim.x a multiple of 32.

#include "common.cuh"

namespace tl_util {

__device__ __forceinline__ size_t global_tid() { return (size_t)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ size_t grid_stride() { return (size_t)gridDim.x * blockDim.x; }

// a[i] += b[i], in f32, rounded once to a's type (a and b may differ in type)
template <typename TA, typename TB> __device__ void add_assign(TA* a, const TB* b, size_t n) {
    for (size_t i = global_tid(); i < n; i += grid_stride()) {
        tl::store_f32(a + i, tl::load_f32(a + i) + tl::load_f32(b + i));
    }
}

// a[i] *= s
template <typename T> __device__ void scale(T* a, size_t n, float s) {
    for (size_t i = global_tid(); i < n; i += grid_stride()) tl::store_f32(a + i, tl::load_f32(a + i) * s);
}

// out[i] = in[i], converted (f32 -> bf16 rounds to nearest even; bf16 -> f32 is exact)
template <typename TO, typename TI> __device__ void cast(TO* out, const TI* in, size_t n) {
    for (size_t i = global_tid(); i < n; i += grid_stride()) tl::store_f32(out + i, tl::load_f32(in + i));
}

// out[r, :] = x[rows[r], :]; rows are checked on the host.
template <typename T>
__device__ void gather_rows(T* out, const T* x, const int* rows, int n_rows, int cols) {
    tl::for_each_rc((size_t)n_rows, (size_t)cols,
                    [&](size_t i, size_t r, size_t c) { out[i] = x[(size_t)rows[r] * cols + c]; });
}

// dst[r, c] = src[r, c] for c < cols, rows `ld_dst` and `ld_src` elements apart (a
// tensor with room after its rows made dense, or given room)
template <typename T> __device__ void copy_2d(T* dst, int ld_dst, const T* src, int ld_src, int rows, int cols) {
    tl::for_each_rc((size_t)rows, (size_t)cols,
                    [&](size_t, size_t r, size_t c) { dst[r * ld_dst + c] = src[r * ld_src + c]; });
}

// y[r, c] += b[c]
template <typename T> __device__ void add_bias_rows(T* y, const T* b, int rows, int cols) {
    tl::for_each_rc((size_t)rows, (size_t)cols, [&](size_t i, size_t, size_t c) {
        tl::store_f32(y + i, tl::load_f32(y + i) + tl::load_f32(b + c));
    });
}

}  // namespace tl_util

extern "C" __global__ void add_assign_f32(float* a, const float* b, size_t n) { tl_util::add_assign(a, b, n); }
extern "C" __global__ void add_assign_bf16(__nv_bfloat16* a, const __nv_bfloat16* b, size_t n) {
    tl_util::add_assign(a, b, n);
}
// Mixed: an f32 accumulator plus a bf16 tensor, and the other way round.
extern "C" __global__ void add_assign_f32_bf16(float* a, const __nv_bfloat16* b, size_t n) {
    tl_util::add_assign(a, b, n);
}
extern "C" __global__ void add_assign_bf16_f32(__nv_bfloat16* a, const float* b, size_t n) {
    tl_util::add_assign(a, b, n);
}

extern "C" __global__ void scale_f32(float* a, size_t n, float s) { tl_util::scale(a, n, s); }
extern "C" __global__ void scale_bf16(__nv_bfloat16* a, size_t n, float s) { tl_util::scale(a, n, s); }

// The casts between the two storage types: bf16 activations <-> f32 (LoRA weights, KV
// caches or weights made by `upload`, which are f32 in every mode).
extern "C" __global__ void cast_f32_to_bf16(__nv_bfloat16* out, const float* in, size_t n) {
    tl_util::cast(out, in, n);
}
extern "C" __global__ void cast_bf16_to_f32(float* out, const __nv_bfloat16* in, size_t n) {
    tl_util::cast(out, in, n);
}

extern "C" __global__ void gather_rows_f32(float* out, const float* x, const int* rows, int n_rows, int cols) {
    tl_util::gather_rows(out, x, rows, n_rows, cols);
}
extern "C" __global__ void gather_rows_bf16(__nv_bfloat16* out, const __nv_bfloat16* x, const int* rows,
                                           int n_rows, int cols) {
    tl_util::gather_rows(out, x, rows, n_rows, cols);
}

extern "C" __global__ void copy_2d_f32(float* dst, int ld_dst, const float* src, int ld_src, int rows, int cols) {
    tl_util::copy_2d(dst, ld_dst, src, ld_src, rows, cols);
}
extern "C" __global__ void copy_2d_bf16(__nv_bfloat16* dst, int ld_dst, const __nv_bfloat16* src, int ld_src,
                                        int rows, int cols) {
    tl_util::copy_2d(dst, ld_dst, src, ld_src, rows, cols);
}

extern "C" __global__ void add_bias_rows_f32(float* y, const float* b, int rows, int cols) {
    tl_util::add_bias_rows(y, b, rows, cols);
}
extern "C" __global__ void add_bias_rows_bf16(__nv_bfloat16* y, const __nv_bfloat16* b, int rows, int cols) {
    tl_util::add_bias_rows(y, b, rows, cols);
}

// db[c] += sum over rows of dy[r, c] (the bias gradient of full fine-tuning, Qwen2's
// q/k/v): tl::col_sum_acc, deterministic. Launch: grid = ceil(cols / 32), 1-D blocks of a
// multiple of 32 threads (at most 1024).
extern "C" __global__ void __launch_bounds__(1024) col_sum_acc_f32(float* db, const float* dy, int rows, int cols) {
    tl::col_sum_acc(db, dy, rows, cols);
}
extern "C" __global__ void __launch_bounds__(1024)
col_sum_acc_bf16(float* db, const __nv_bfloat16* dy, int rows, int cols) {
    tl::col_sum_acc(db, dy, rows, cols);
}

// Many tensors in one launch (a training step's LoRA tensors are a few hundred small
// ones): `tensors` is a device array of descriptors; blockIdx.y picks the tensor and its
// blocks grid-stride over it along x, so any grid.x is correct. Launch: grid (blocks_x,
// n_tensors), blockDim.x a multiple of 32.
//
// cast_f32_to_bf16_multi: out = in rounded to nearest even, as cast_f32_to_bf16 (the same
//   bits). zero_multi: n 16-bit words of zeros from ptr (f32 and bf16 tensors alike).
struct CastTensor {
    __nv_bfloat16* out;
    const float* in;
    unsigned long long n;
};

extern "C" __global__ void cast_f32_to_bf16_multi(const CastTensor* tensors, int n_tensors) {
    if ((int)blockIdx.y >= n_tensors) return;
    const CastTensor t = tensors[blockIdx.y];
    tl_util::cast(t.out, t.in, t.n);
}

struct ZeroTensor {
    unsigned short* ptr;
    unsigned long long n;
};

extern "C" __global__ void zero_multi(const ZeroTensor* tensors, int n_tensors) {
    if ((int)blockIdx.y >= n_tensors) return;
    const ZeroTensor t = tensors[blockIdx.y];
    for (size_t i = tl_util::global_tid(); i < t.n; i += tl_util::grid_stride()) t.ptr[i] = 0;
}
