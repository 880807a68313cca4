// The CPU emulator of the CUDA execution model that runs kernels/*.cu without a GPU.
//
// The test suite builds the kernels with the host C++ compiler against this header (and
// the stand-ins for <cuda_runtime.h> and <cuda_bf16.h> in include/), links them into a
// stand-in for the NVIDIA driver (driver.cpp, built as libcuda.so) and puts that on
// LD_LIBRARY_PATH, so the CUDA backend's Rust code, its launchers and every kernel run
// unchanged on the CPU. See driver.cpp for what it checks.
//
// Execution model: the blocks of a launch run one after another, in a shuffled order
// (a GPU promises none); the threads of a block are fibers (cooperative user-space
// threads, one stack each) that run until they reach a synchronisation point
// (__syncthreads, a warp shuffle or __syncwarp) and are then resumed in a shuffled
// order, so code that reads what another thread writes without a barrier in between
// sees stale data, as it could on a GPU. Warp operations exchange values only when every
// non-exited lane named in the mask has arrived; warpgroup operations (wgmma) wait for
// all 128 threads of the warpgroup, and its products read shared memory when issued or
// when waited for (drawn per block); a block barrier opens when every non-exited thread
// of the block has arrived. A block in which none of these can ever happen (a barrier in
// divergent code) fails the launch with a message.
//
// Static shared memory (`TL_SHARED` in kernels/common.cuh) becomes function-local
// statics: one copy, shared by the threads of the one block that runs at a time (the
// driver serialises launches). Each is filled with NaNs when the first thread of a block
// passes its declaration, as the per-launch buffer of dynamic shared memory is before
// each block: a GPU's shared memory starts a block holding anything, so a kernel that
// reads it before writing it (or counts on what an earlier block left there) sees NaNs.
#ifndef TUNELOOP_EMU_SIMT_HPP
#define TUNELOOP_EMU_SIMT_HPP

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <type_traits>
#include <utility>

struct uint3 {
    unsigned x, y, z;
};

struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace tl_emu {

// What a fiber waits for.
enum class Wait : int {
    None,
    Block,    // __syncthreads
    Warp,     // a warp operation: see WarpOp
    Group,    // a warpgroup operation (wgmma): see GroupOp
};

// What the 128 threads of a warpgroup do together (kernels/common.cuh's wgmma helpers).
enum class GroupOp : int {
    Mma,     // wgmma.mma_async.m64nNk16.f32.bf16.bf16: see tl_emu::wgmma
    Commit,  // wgmma.commit_group
    Wait,    // wgmma.wait_group
};

enum class WarpOp : int {
    Sync,      // __syncwarp
    Idx,       // __shfl_sync: value of lane `arg`
    Xor,       // __shfl_xor_sync: value of lane (lane ^ arg)
    Down,      // __shfl_down_sync: value of lane (lane + arg), or its own
    Up,        // __shfl_up_sync: value of lane (lane - arg), or its own
    Ballot,    // __ballot_sync: bit per lane whose value is non-zero
    Mma,       // mma.sync.m16n8k16.row.col.f32.bf16.bf16.f32: see mma_m16n8k16_bf16
    Ldmatrix,  // ldmatrix.sync.aligned.m8n8.x4(.trans).shared.b16: see ldmatrix_x4
};

// One emulated thread. Only the scheduler (simt.cpp) writes these fields while the
// fiber is suspended; the fiber reads its own.
struct Fiber {
    uint3 tid;
    int lane, warp;
    bool done;
    Wait wait;
    // The pending warp operation.
    WarpOp op;
    unsigned mask;
    int arg, width;
    uint64_t value;    // what this lane contributes
    uint64_t result;   // what it receives
    // An Mma's fragments, on the fiber's own stack (valid while it waits): A's 4 and B's
    // 2 registers of bf16 pairs, and the 4 f32 accumulators it adds A·B to.
    const uint32_t* mma_a;
    const uint32_t* mma_b;
    float* mma_d;
    // An Ldmatrix's 4 destination registers (the row address is `value`, .trans `arg`).
    uint32_t* ldm_out;
    // The pending warpgroup operation; for an Mma its operands (see tl_emu::wgmma), for a
    // Wait the groups that may stay pending in `wg_n`.
    GroupOp group_op;
    float* wg_d;
    const uint32_t* wg_a;
    uint64_t desc_a, desc_b;
    int wg_n;
    bool wg_scale_d, wg_tnsp_b;
    // Whether the thread passed a wgmma_fence since it started or last waited for
    // products: a product needs one before it (see tl_emu::wgmma_fence).
    bool wg_fenced;
    void* sp;          // saved stack pointer while suspended
    void* stack;       // base of its stack mapping
};

// The block being run.
struct BlockState {
    uint3 block_idx, block_dim, grid_dim;
    void* dynamic_shared;
    size_t dynamic_shared_bytes;
    // Whether this block's cp.async copies land when issued (else when waited for): drawn
    // per block, so a kernel that overwrites a tile other warps still read (a barrier
    // missing after the compute) and one that reads a tile before waiting for it both
    // show up.
    bool cp_async_eager;
    // Whether this block's wgmma products run when issued (else when waited for): drawn
    // per block like cp_async_eager.
    bool wgmma_eager;
    // The shared address of the first byte of dynamic shared memory (a multiple of 16
    // drawn per block below 1024), so that a kernel that lays out a swizzled tile from an
    // offset instead of an address aligned as the swizzle needs sees it scrambled.
    uint32_t shared_base;
    // Which block of the process's run this is (from 1): a static shared variable last
    // filled with NaNs for another block is filled again (TL_SHARED).
    uint64_t serial;
};

// Set while a launch runs; launches never overlap (see simt.cpp).
extern Fiber* current_fiber;
extern BlockState* current_block;

// Suspends the calling fiber until the scheduler resumes it.
void yield_to_scheduler();

// The empty asm with a memory clobber keeps the compiler from caching shared memory
// (function-local statics) in registers across the switch to the other threads.
inline void sync_threads() {
    current_fiber->wait = Wait::Block;
    asm volatile("" ::: "memory");
    yield_to_scheduler();
    asm volatile("" ::: "memory");
}

inline uint64_t warp_op(WarpOp op, unsigned mask, uint64_t value, int arg, int width) {
    Fiber* f = current_fiber;
    f->wait = Wait::Warp;
    f->op = op;
    f->mask = mask;
    f->value = value;
    f->arg = arg;
    f->width = width;
    asm volatile("" ::: "memory");
    yield_to_scheduler();
    asm volatile("" ::: "memory");
    return f->result;
}

// The warp's D += A·B, A 16x16 and B 16x8 in bf16, D 16x8 in f32, each lane holding
// the fragments PTX's mma.m16n8k16 (row.col) layout gives it. Every lane of the warp
// takes part, as the instruction's .aligned requires.
inline void mma_m16n8k16_bf16(float* d, const uint32_t* a, const uint32_t* b) {
    Fiber* f = current_fiber;
    f->mma_a = a;
    f->mma_b = b;
    f->mma_d = d;
    warp_op(WarpOp::Mma, 0xffffffffu, 0, 0, 32);
}

// ldmatrix.sync.aligned.m8n8.x4.shared.b16 (trans: .trans): lane l gives `row`, the
// 16-byte aligned shared-memory address of row l % 8 of the 8x8 bf16 matrix l / 8, and
// gets in r[i], for group g = l / 4 and t = l % 4, row g, columns 2t and 2t + 1 of matrix
// i (trans: rows 2t and 2t + 1 of column g), the lower index in the low half. Every lane
// of the warp takes part.
inline void ldmatrix_x4(uint32_t* r, const void* row, bool trans) {
    current_fiber->ldm_out = r;
    warp_op(WarpOp::Ldmatrix, 0xffffffffu, uint64_t(uintptr_t(row)), trans ? 1 : 0, 32);
}

// cp.async.cg.shared.global [dst], [src], 16, src_bytes: copies src_bytes (0 or 16)
// bytes into shared memory and zero-fills the rest of the 16, asynchronously: the copy
// lands when issued or at the cp_async_wait that covers it (BlockState::cp_async_eager),
// so only a wait and then a barrier make it visible. A thread that exits with copies it
// never waited for fails the launch, as does an unaligned or out-of-range address.
void cp_async_16(void* dst, const void* src, unsigned src_bytes);
// Fails the launch unless `p` is a multiple of `bytes`: a GPU faults on a misaligned
// vector access ("misaligned address"), where the CPU would just read.
void check_aligned(const void* p, unsigned bytes);
// cp.async.commit_group: the copies issued since the last commit form one group.
void cp_async_commit();
// cp.async.wait_group n: waits until at most the n most recent groups are pending.
void cp_async_wait(int n);
// fence.proxy.async.shared::cta: orders the thread's earlier writes to shared memory
// before later reads through the async proxy, which is how a wgmma product reads its
// shared-memory operands (the PTX ISA requires one between writing a matrix and a
// product that reads it; a barrier alone does not order the two proxies). The emulator
// tracks the writes of cp.async: a product that reads a 16-byte chunk whose copy landed
// without its thread passing a fence and then a block barrier since fails the launch.
// Plain stores are not tracked.
void fence_proxy_async();
// The shared address (what __cvta_generic_to_shared gives) of `p`, which must lie in the
// block's dynamic shared memory.
uint32_t shared_address(const void* p);
// wgmma.mma_async.sync.aligned.m64nNk16.f32.bf16.bf16 by the calling thread's warpgroup
// (all 128 threads take part, with the same descriptors): D (+)= A·B, A [64, 16] from the
// K-major shared-memory operand `desc_a` or, when `a` is given, from each thread's mma.sync
// A fragment (rows 16·warp ..), B [16, n] from `desc_b` (K-major, or MN-major with
// tnsp_b), D the thread's n / 2 accumulators `d` (kernels/common.cuh gives the layouts;
// !scale_d: D = A·B). Products are exact in f32 and summed in k order. The product runs
// when issued or when a wgmma_wait covers it (BlockState::wgmma_eager), reading shared
// memory and `d` as they are then.
void wgmma(float* d, int n, uint64_t desc_a, const uint32_t* a, uint64_t desc_b, bool scale_d, bool tnsp_b);
// wgmma.fence: orders the thread's register writes before the products that read them.
// On the CPU products read registers when they run, so it only records that the fence
// was passed: a product issued without one since the thread started or last waited (when
// kernels write accumulators and A fragments) fails the launch.
inline void wgmma_fence() { current_fiber->wg_fenced = true; }
// wgmma.commit_group: the warpgroup's products issued since the last commit form a group.
void wgmma_commit();
// wgmma.wait_group pending: runs the warpgroup's committed products until at most
// `pending` groups are left. A warpgroup that exits with products it never waited for
// fails the launch.
void wgmma_wait(int pending);
// A static shared variable (TL_SHARED), `bytes` at `p`, as the running block first
// sees it: filled with NaNs the first time one of its threads passes the declaration
// (`*filled_for` says for which block it last was). Every thread passes it before it
// can write the variable, so nothing the block wrote is overwritten.
void fresh_shared(void* p, size_t bytes, uint64_t* filled_for);

template <typename T> inline uint64_t to_bits(T v) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "warp operand");
    uint64_t u = 0;
    memcpy(&u, &v, sizeof(T));
    return u;
}

template <typename T> inline T from_bits(uint64_t u) {
    T v;
    memcpy(&v, &u, sizeof(T));
    return v;
}

// ---- the kernel table: name -> a trampoline that unpacks cuLaunchKernel's parameters ----

using AnyFn = void (*)();
using Invoke = void (*)(AnyFn fn, void** params);

struct Kernel {
    const char* name;
    AnyFn fn;
    Invoke invoke;
    int n_params;
    // Which parameters are pointers (bit i), so the driver can check they point into
    // device memory.
    uint64_t pointer_params;
    // __launch_bounds__' maximum threads per block (1024 without one).
    int max_threads;
    // What ptxas compiled the kernel to for sm_90a (build.rs reads its report): registers
    // a thread, and bytes of static shared memory.
    int registers;
    int static_shared;
};

template <typename... A, size_t... I>
inline void call_with(void (*f)(A...), void** params, std::index_sequence<I...>) {
    f(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(params[I])...);
}

template <typename... A> void invoke_as(AnyFn fn, void** params) {
    call_with(reinterpret_cast<void (*)(A...)>(fn), params, std::index_sequence_for<A...>{});
}

template <typename... A> constexpr uint64_t pointer_mask() {
    uint64_t mask = 0;
    int i = 0;
    ((mask |= (std::is_pointer<A>::value ? uint64_t(1) << i : 0), ++i), ...);
    return mask;
}

template <typename... A>
Kernel make_kernel(const char* name, void (*f)(A...), int max_threads, int registers, int static_shared) {
    static_assert(sizeof...(A) <= 64, "too many kernel parameters");
    return Kernel{name, reinterpret_cast<AnyFn>(f), &invoke_as<A...>, int(sizeof...(A)),
                  pointer_mask<A...>(), max_threads, registers, static_shared};
}

// Defined in the generated kernel unit.
extern const Kernel kernel_table[];
extern const size_t kernel_count;

}  // namespace tl_emu

// ---- CUDA's language, as the kernels use it ----------------------------------------

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static_assert(false, "declare static shared memory with TL_SHARED (kernels/common.cuh)");
#define TL_SHARED(T, name, dims)                                                             \
    static T name dims;                                                                       \
    static uint64_t name##_tl_emu_filled_for = 0;                                             \
    ::tl_emu::fresh_shared(&name, sizeof name, &name##_tl_emu_filled_for)
#define TL_DYNAMIC_SHARED(T, name) T* name = static_cast<T*>(::tl_emu::current_block->dynamic_shared)

#define threadIdx (::tl_emu::current_fiber->tid)
#define blockIdx (::tl_emu::current_block->block_idx)
#define blockDim (::tl_emu::current_block->block_dim)
#define gridDim (::tl_emu::current_block->grid_dim)
#define warpSize 32

inline void __syncthreads() { tl_emu::sync_threads(); }

inline void __syncwarp(unsigned mask = 0xffffffffu) { tl_emu::warp_op(tl_emu::WarpOp::Sync, mask, 0, 0, 32); }

template <typename T> inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    return tl_emu::from_bits<T>(tl_emu::warp_op(tl_emu::WarpOp::Idx, mask, tl_emu::to_bits(v), src, width));
}
template <typename T> inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    return tl_emu::from_bits<T>(tl_emu::warp_op(tl_emu::WarpOp::Xor, mask, tl_emu::to_bits(v), lane_mask, width));
}
template <typename T> inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    return tl_emu::from_bits<T>(tl_emu::warp_op(tl_emu::WarpOp::Down, mask, tl_emu::to_bits(v), int(delta), width));
}
template <typename T> inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    return tl_emu::from_bits<T>(tl_emu::warp_op(tl_emu::WarpOp::Up, mask, tl_emu::to_bits(v), int(delta), width));
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
    return unsigned(tl_emu::warp_op(tl_emu::WarpOp::Ballot, mask, pred != 0, 0, 32));
}

// Fibers of one block never run at the same time and launches are serialised, so an
// atomic is a plain read-modify-write.
template <typename T> inline T atomicAdd(T* p, T v) {
    T old = *p;
    *p = old + v;
    return old;
}
template <typename T> inline T atomicMax(T* p, T v) {
    T old = *p;
    *p = old < v ? v : old;
    return old;
}
template <typename T> inline T atomicMin(T* p, T v) {
    T old = *p;
    *p = v < old ? v : old;
    return old;
}
template <typename T> inline T atomicExch(T* p, T v) {
    T old = *p;
    *p = v;
    return old;
}
template <typename T> inline T atomicCAS(T* p, T compare, T v) {
    T old = *p;
    if (old == compare) *p = v;
    return old;
}

inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }

#define TL_EMU_MINMAX(T)                                   \
    inline T min(T a, T b) { return b < a ? b : a; }       \
    inline T max(T a, T b) { return a < b ? b : a; }
TL_EMU_MINMAX(int)
TL_EMU_MINMAX(unsigned)
TL_EMU_MINMAX(long)
TL_EMU_MINMAX(unsigned long)
TL_EMU_MINMAX(long long)
TL_EMU_MINMAX(unsigned long long)
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
#undef TL_EMU_MINMAX

#endif  // TUNELOOP_EMU_SIMT_HPP
