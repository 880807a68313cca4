// Token embedding: forward gather, backward scatter-add.
//
//   embedding_fwd:  out[i, :] = table[ids[i], :]; an id >= vocab writes zeros to its row
//                   (the host checks the ids before the launch and fails; this guard
//                   only keeps the read in bounds, so the host never waits for a flag).
//   embedding_bwd:  dtable[ids[i], :] += dy[i, :] (f32 table gradient); only full
//                   fine-tuning with a trainable embedding needs it. No atomics: the host
//                   groups the positions by id (uniq[u], the positions of uniq[u] at
//                   pos[start[u] .. start[u + 1]] in increasing order), and one thread
//                   adds a column's values of an id's positions in that order, into the
//                   gradient as it was: the same bits on every run, whatever order the
//                   blocks run in (and the CPU backend's order: i increasing).
//
// Layout: table/dtable [vocab, d], out/dy [n, d], ids [n] u32. Launch: 1-D, any grid
// (grid-stride over n * d elements, bwd: n_uniq * d), blockDim.x a multiple of 32.

#include "common.cuh"

namespace tl_embedding {

template <typename T>
__device__ void fwd(T* out, const T* table, const unsigned* ids, int n, int d, int vocab) {
    tl::for_each_rc((size_t)n, (size_t)d, [&](size_t i, size_t row, size_t c) {
        const unsigned id = ids[row];
        if (id >= (unsigned)vocab) {
            out[i] = T(0.0f);
        } else {
            out[i] = table[(size_t)id * d + c];
        }
    });
}

template <typename T>
__device__ void bwd(float* dtable, const T* dy, const unsigned* uniq, const unsigned* start, const unsigned* pos,
                    int n_uniq, int d, int vocab) {
    tl::for_each_rc((size_t)n_uniq, (size_t)d, [&](size_t, size_t u, size_t c) {
        const unsigned id = uniq[u];
        if (id >= (unsigned)vocab) return;
        float* g = dtable + (size_t)id * d + c;
        float acc = *g;
        for (unsigned k = start[u]; k < start[u + 1]; ++k) acc += tl::load_f32(dy + (size_t)pos[k] * d + c);
        *g = acc;
    });
}

}  // namespace tl_embedding

extern "C" __global__ void embedding_fwd_f32(float* out, const float* table, const unsigned* ids, int n, int d,
                                             int vocab) {
    tl_embedding::fwd(out, table, ids, n, d, vocab);
}
extern "C" __global__ void embedding_fwd_bf16(__nv_bfloat16* out, const __nv_bfloat16* table, const unsigned* ids,
                                              int n, int d, int vocab) {
    tl_embedding::fwd(out, table, ids, n, d, vocab);
}
extern "C" __global__ void embedding_bwd_f32(float* dtable, const float* dy, const unsigned* uniq,
                                             const unsigned* start, const unsigned* pos, int n_uniq, int d,
                                             int vocab) {
    tl_embedding::bwd(dtable, dy, uniq, start, pos, n_uniq, d, vocab);
}
extern "C" __global__ void embedding_bwd_bf16(float* dtable, const __nv_bfloat16* dy, const unsigned* uniq,
                                              const unsigned* start, const unsigned* pos, int n_uniq, int d,
                                              int vocab) {
    tl_embedding::bwd(dtable, dy, uniq, start, pos, n_uniq, d, vocab);
}
