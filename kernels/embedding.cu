// Token embedding: forward gather, backward scatter-add.
//
//   embedding_fwd:  out[i, :] = table[ids[i], :]; an id >= vocab writes zeros to its row
//                   and sets *err = 1 (the host checks ids first too; the flag is the
//                   device-side guard, never an out-of-bounds read).
//   embedding_bwd:  dtable[ids[i], :] += dy[i, :] with atomics (f32 table gradient);
//                   only full fine-tuning with a trainable embedding needs it.
//
// Layout: table/dtable [vocab, d], out/dy [n, d], ids [n] u32. Launch: 1-D, any grid
// (grid-stride over n * d elements), blockDim.x a multiple of 32.

#include "common.cuh"

namespace tl_embedding {

template <typename T>
__device__ void fwd(T* out, int* err, const T* table, const unsigned* ids, int n, int d, int vocab) {
    tl::for_each_rc((size_t)n, (size_t)d, [&](size_t i, size_t row, size_t c) {
        const unsigned id = ids[row];
        if (id >= (unsigned)vocab) {
            out[i] = T(0.0f);
            if (c == 0) *err = 1;
        } else {
            out[i] = table[(size_t)id * d + c];
        }
    });
}

template <typename T>
__device__ void bwd(float* dtable, int* err, const T* dy, const unsigned* ids, int n, int d, int vocab) {
    tl::for_each_rc((size_t)n, (size_t)d, [&](size_t i, size_t row, size_t c) {
        const unsigned id = ids[row];
        if (id >= (unsigned)vocab) {
            if (c == 0) *err = 1;
        } else {
            atomicAdd(dtable + (size_t)id * d + c, tl::load_f32(dy + i));
        }
    });
}

}  // namespace tl_embedding

extern "C" __global__ void embedding_fwd_f32(float* out, int* err, const float* table, const unsigned* ids,
                                             int n, int d, int vocab) {
    tl_embedding::fwd(out, err, table, ids, n, d, vocab);
}
extern "C" __global__ void embedding_fwd_bf16(__nv_bfloat16* out, int* err, const __nv_bfloat16* table,
                                              const unsigned* ids, int n, int d, int vocab) {
    tl_embedding::fwd(out, err, table, ids, n, d, vocab);
}
extern "C" __global__ void embedding_bwd_f32(float* dtable, int* err, const float* dy, const unsigned* ids,
                                             int n, int d, int vocab) {
    tl_embedding::bwd(dtable, err, dy, ids, n, d, vocab);
}
extern "C" __global__ void embedding_bwd_bf16(float* dtable, int* err, const __nv_bfloat16* dy,
                                              const unsigned* ids, int n, int d, int vocab) {
    tl_embedding::bwd(dtable, err, dy, ids, n, d, vocab);
}
