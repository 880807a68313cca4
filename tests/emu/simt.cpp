// The fiber scheduler of the CUDA emulator: runs a launch's blocks one by one, each as
// blockDim fibers synchronised as simt.hpp describes.

#include "simt.hpp"

#include <string.h>
#include <sys/mman.h>

#include <algorithm>
#include <string>
#include <vector>

#include "emu.hpp"

namespace tl_emu {

// Plain globals, not thread-locals: the driver runs one launch at a time (under its
// lock), and a thread-local in a shared library costs a call on every access.
Fiber* current_fiber = nullptr;
BlockState* current_block = nullptr;

namespace {

// Each fiber's stack, with a PROT_NONE page below it so an overflow faults.
constexpr size_t STACK_BYTES = 256 << 10;
constexpr size_t GUARD_BYTES = 4096;

// The poison a warp operation returns when its source lane does not take part (undefined
// in CUDA): a NaN as f32, as both halves' bf16 and as f64.
constexpr uint64_t UNDEFINED = 0x7FF8'7FC0'7FC0'7FC0ull;

#if defined(__x86_64__)
// tl_emu_switch(save, to): saves the callee-saved registers and the stack pointer of the
// running context into *save and continues the context whose stack pointer is `to`.
asm(R"(
    .text
    .globl tl_emu_switch
    .hidden tl_emu_switch
    .type tl_emu_switch, @function
tl_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size tl_emu_switch, .-tl_emu_switch
)");
extern "C" void tl_emu_switch(void** save, void* to);
#else
#error "the CUDA emulator's fibers are written for x86-64"
#endif

struct Launch {
    const Kernel* kernel;
    void** params;
    void* scheduler_sp;
};
Launch* current_launch = nullptr;

[[noreturn]] void fiber_main() {
    Fiber* f = current_fiber;
    current_launch->kernel->invoke(current_launch->kernel->fn, current_launch->params);
    f->done = true;
    f->wait = Wait::None;
    tl_emu_switch(&f->sp, current_launch->scheduler_sp);
    __builtin_unreachable();
}

void start_fiber(Fiber* f) {
    char* top = static_cast<char*>(f->stack) + GUARD_BYTES + STACK_BYTES;
    void** sp = reinterpret_cast<void**>(top);
    *--sp = nullptr;                                      // fiber_main's return address
    *--sp = reinterpret_cast<void*>(&fiber_main);         // where tl_emu_switch returns to
    for (int i = 0; i < 6; ++i) *--sp = nullptr;          // rbp rbx r12 r13 r14 r15
    f->sp = sp;
}

void resume(Fiber* f) {
    current_fiber = f;
    tl_emu_switch(&current_launch->scheduler_sp, f->sp);
    current_fiber = nullptr;
}

struct Rng {
    uint64_t s;
    uint64_t next() {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        return s;
    }
};

// A thread's cp.async copies not yet landed; `group` is the commit group (-1: not yet
// committed), counted from 1 per thread; `chunk` the 16-byte chunk of dynamic shared
// memory at dst.
struct CpCopy {
    void* dst;
    const void* src;
    unsigned src_bytes;
    int group;
    uint32_t chunk;
};
struct CpQueue {
    std::vector<CpCopy> copies;
    int groups;
    // the 16-byte chunks of dynamic shared memory its landed copies wrote since it last
    // passed fence_proxy_async (Pool::chunk_writes says which it still is the writer of)
    std::vector<uint32_t> unfenced;
};

// One wgmma product of a warpgroup, issued and not yet waited for: its operands, each
// thread's accumulators, and its commit group (-1: not yet committed), counted from 1 per
// warpgroup. `done` once it ran (BlockState::wgmma_eager runs it when issued).
// A GPU reads the A registers and the accumulators while the product runs, until the
// wait that covers it, so the kernel must not write them in between: `a` keeps each
// thread's A registers as issued, `d_sum` a checksum of its accumulators, compared when
// the product runs late (and the A registers when it is waited for).
struct WgProduct {
    uint64_t desc_a, desc_b;
    int n;
    bool scale_d, tnsp_b, reg_a, done;
    // whether an earlier product of the same accumulators ran after this one was issued
    // (so they changed, rightly, since)
    bool d_changed;
    int group;
    float* d[128];
    const uint32_t* a_regs[128];
    uint32_t a[128][4];
    uint64_t d_sum[128];
};

uint64_t checksum(const float* d, int n) {
    uint64_t h = 0;
    for (int i = 0; i < n; ++i) {
        uint32_t u;
        memcpy(&u, &d[i], 4);
        h = (h ^ u) * 0x100000001B3ull;
    }
    return h;
}
struct WgState {
    std::vector<WgProduct> products;
    int groups;
};

// Stacks and fibers, kept between launches.
struct Pool {
    std::vector<Fiber> fibers;
    std::vector<void*> stacks;
    std::vector<CpQueue> cp;
    std::vector<WgState> wg;  // per warpgroup of the running block
    size_t group_waiting;     // its threads waiting at a warpgroup operation
    std::vector<unsigned char> dynamic_shared;
    // For each 16-byte chunk of dynamic shared memory, what a wgmma product may read of it
    // (it reads through the async proxy: see tl_emu::fence_proxy_async): 1 + the thread
    // whose cp.async copy landed there last (0: none since the block started), and the
    // block barrier phase in which that thread then passed fence_proxy_async (0: not yet).
    struct ChunkWrite {
        uint32_t writer, fenced_in;
    };
    std::vector<ChunkWrite> chunk_writes;
    // The block barrier phase: 1 when the block starts, one more each time a barrier opens.
    uint32_t phase;
    // run_block's: the stacks no running fiber holds, and the order fibers resume in.
    std::vector<void*> free_stacks;
    std::vector<uint32_t> order;

    bool reserve(size_t n, std::string& error) {
        while (stacks.size() < n) {
            void* m = mmap(nullptr, GUARD_BYTES + STACK_BYTES, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
            if (m == MAP_FAILED) {
                error = "cannot map a fiber stack";
                return false;
            }
            mprotect(m, GUARD_BYTES, PROT_NONE);
            stacks.push_back(m);
        }
        fibers.resize(n);
        if (cp.size() < n) cp.resize(n);
        return true;
    }
};
Pool pool;

// The blocks run so far, for BlockState::serial.
uint64_t blocks_run = 0;

const char* op_name(WarpOp op) {
    switch (op) {
    case WarpOp::Sync: return "__syncwarp";
    case WarpOp::Idx: return "__shfl_sync";
    case WarpOp::Xor: return "__shfl_xor_sync";
    case WarpOp::Down: return "__shfl_down_sync";
    case WarpOp::Up: return "__shfl_up_sync";
    case WarpOp::Ballot: return "__ballot_sync";
    case WarpOp::Mma: return "mma.sync.m16n8k16";
    case WarpOp::Ldmatrix: return "ldmatrix.x4";
    }
    return "?";
}

const char* group_op_name(GroupOp op) {
    switch (op) {
    case GroupOp::Mma: return "wgmma.mma_async";
    case GroupOp::Commit: return "wgmma.commit_group";
    case GroupOp::Wait: return "wgmma.wait_group";
    }
    return "?";
}

// The lane whose value lane `lane` receives, or -1 for its own.
int source_lane(const Fiber& f, int lane) {
    const int w = f.width;
    const int seg = lane & ~(w - 1);
    switch (f.op) {
    case WarpOp::Idx: return seg + (f.arg & (w - 1));
    case WarpOp::Xor: {
        const int s = lane ^ f.arg;
        return s >= seg + w ? -1 : s;
    }
    case WarpOp::Down: {
        const int s = lane + f.arg;
        return s >= seg + w ? -1 : s;
    }
    case WarpOp::Up: {
        const int s = lane - f.arg;
        return s < seg ? -1 : s;
    }
    default: return -1;
    }
}

std::string where(const Fiber& f) {
    return "thread (" + std::to_string(f.tid.x) + "," + std::to_string(f.tid.y) + "," + std::to_string(f.tid.z) +
           ")";
}

float bf16_lo(uint32_t r) {
    const uint32_t u = r << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

float bf16_hi(uint32_t r) {
    const uint32_t u = r & 0xffff0000u;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

// One warp's mma.m16n8k16.row.col.f32.bf16.bf16.f32, with PTX's fragment layouts
// (group g = lane / 4, t = lane % 4): A register j of a lane holds the pair of columns
// 2t, 2t+1 (+8 for j >= 2) of row g (+8 for odd j); B register j the pair of rows 2t, 2t+1
// (+8 for j = 1) of column g; accumulator j row g (+8 for j >= 2), column 2t + j % 2.
// Products are exact in f32 and summed in k order, then added to the accumulator.
void warp_mma(Fiber* warp) {
    float A[16][16], B[16][8];
    for (int lane = 0; lane < 32; ++lane) {
        const int g = lane / 4, t = lane % 4;
        const uint32_t* a = warp[lane].mma_a;
        const uint32_t* b = warp[lane].mma_b;
        for (int j = 0; j < 4; ++j) {
            const int row = g + 8 * (j % 2), col = 2 * t + 8 * (j / 2);
            A[row][col] = bf16_lo(a[j]);
            A[row][col + 1] = bf16_hi(a[j]);
        }
        for (int j = 0; j < 2; ++j) {
            const int row = 2 * t + 8 * j;
            B[row][g] = bf16_lo(b[j]);
            B[row + 1][g] = bf16_hi(b[j]);
        }
    }
    for (int lane = 0; lane < 32; ++lane) {
        const int g = lane / 4, t = lane % 4;
        float* d = warp[lane].mma_d;
        for (int j = 0; j < 4; ++j) {
            const int row = g + 8 * (j / 2), col = 2 * t + j % 2;
            float s = 0.0f;
            for (int k = 0; k < 16; ++k) s += A[row][k] * B[k][col];
            d[j] += s;
        }
    }
}

// Where `p` lies in the block's dynamic shared memory when `bytes` bytes from it are all
// inside and it is 16-byte aligned there; -1 otherwise.
long shared_offset(const void* p, size_t bytes) {
    const uintptr_t base = reinterpret_cast<uintptr_t>(current_block->dynamic_shared);
    const uintptr_t at = reinterpret_cast<uintptr_t>(p);
    if (at < base || at - base + bytes > current_block->dynamic_shared_bytes || (at - base) % 16 != 0) return -1;
    return long(at - base);
}

uint16_t load_u16(uint64_t addr) {
    uint16_t v;
    memcpy(&v, reinterpret_cast<const void*>(uintptr_t(addr)), 2);
    return v;
}

// One warp's ldmatrix.x4 (see tl_emu::ldmatrix_x4), each lane's row address in `value`.
bool warp_ldmatrix(Fiber* warp, std::string& error) {
    for (int lane = 0; lane < 32; ++lane) {
        if (shared_offset(reinterpret_cast<const void*>(uintptr_t(warp[lane].value)), 16) < 0) {
            char buf[160];
            snprintf(buf, sizeof buf,
                     "ldmatrix by %s: row address %p is not a 16-byte aligned row inside the %zu bytes of dynamic "
                     "shared memory",
                     where(warp[lane]).c_str(), reinterpret_cast<void*>(uintptr_t(warp[lane].value)),
                     current_block->dynamic_shared_bytes);
            error = buf;
            return false;
        }
    }
    uint32_t out[32][4];
    for (int lane = 0; lane < 32; ++lane) {
        const int g = lane / 4, t = lane % 4;
        for (int i = 0; i < 4; ++i) {
            uint32_t lo, hi;
            if (warp[lane].arg) {  // .trans: rows 2t, 2t + 1 of column g
                lo = load_u16(warp[8 * i + 2 * t].value + 2 * g);
                hi = load_u16(warp[8 * i + 2 * t + 1].value + 2 * g);
            } else {  // row g, columns 2t, 2t + 1
                lo = load_u16(warp[8 * i + g].value + 4 * t);
                hi = load_u16(warp[8 * i + g].value + 4 * t + 2);
            }
            out[lane][i] = lo | hi << 16;
        }
    }
    for (int lane = 0; lane < 32; ++lane) {
        for (int i = 0; i < 4; ++i) warp[lane].ldm_out[i] = out[lane][i];
    }
    return true;
}

// Releases the warp operations whose every participant has arrived. Returns how many
// lanes it released, or -1 with `error` set when a warp can never complete.
int release_warps(Fiber* fibers, size_t n, std::string& error) {
    int released = 0;
    for (size_t w0 = 0; w0 < n; w0 += 32) {
        const size_t lanes = n - w0 < 32 ? n - w0 : 32;
        Fiber* warp = fibers + w0;
        unsigned handled = 0;
        for (size_t l = 0; l < lanes; ++l) {
            const Fiber& f = warp[l];
            if (f.done || f.wait != Wait::Warp || (handled >> l & 1)) continue;
            if (!(f.mask >> l & 1)) {
                error = op_name(f.op) + std::string(" by ") + where(f) + " with a mask that leaves out its own lane";
                return -1;
            }
            if (f.width < 1 || f.width > 32 || (f.width & (f.width - 1))) {
                error = op_name(f.op) + std::string(" by ") + where(f) + " with width " + std::to_string(f.width);
                return -1;
            }
            // The participants: lanes in the mask that exist and have not exited.
            unsigned members = 0;
            bool complete = true;
            for (size_t m = 0; m < lanes; ++m) {
                if (!(f.mask >> m & 1) || warp[m].done) continue;
                members |= 1u << m;
                const Fiber& g = warp[m];
                if (g.wait == Wait::Warp && g.mask == f.mask) {
                    if (g.op != f.op || g.width != f.width) {
                        error = "lanes of warp " + std::to_string(f.warp) + " meet at different warp operations (" +
                                op_name(f.op) + " and " + op_name(g.op) + ") with the same mask";
                        return -1;
                    }
                } else {
                    complete = false;
                }
            }
            handled |= members;
            if (!complete) continue;
            if (f.op == WarpOp::Mma || f.op == WarpOp::Ldmatrix) {
                if (lanes != 32 || members != 0xffffffffu) {
                    error = op_name(f.op) + std::string(" by ") + where(f) +
                            " in a warp whose 32 lanes do not all take part";
                    return -1;
                }
                if (f.op == WarpOp::Mma) {
                    warp_mma(warp);
                } else if (!warp_ldmatrix(warp, error)) {
                    return -1;
                }
            }
            unsigned ballot = 0;
            for (size_t m = 0; m < lanes; ++m) {
                if ((members >> m & 1) && warp[m].value != 0) ballot |= 1u << m;
            }
            for (size_t m = 0; m < lanes; ++m) {
                if (!(members >> m & 1)) continue;
                Fiber& g = warp[m];
                if (g.op == WarpOp::Ballot) {
                    g.result = ballot;
                } else if (g.op != WarpOp::Sync && g.op != WarpOp::Mma && g.op != WarpOp::Ldmatrix) {
                    const int s = source_lane(g, int(m));
                    if (s < 0) {
                        g.result = g.value;
                    } else {
                        g.result = (members >> s & 1) ? warp[s].value : UNDEFINED;
                    }
                }
                g.wait = Wait::None;
                ++released;
            }
        }
    }
    return released;
}

// The byte of dynamic shared memory at shared address `addr`, or null when `bytes` from
// it are not all inside.
unsigned char* shared_at(uint32_t addr, size_t bytes) {
    const uint32_t base = current_block->shared_base;
    if (addr < base || addr - base + bytes > current_block->dynamic_shared_bytes) return nullptr;
    return static_cast<unsigned char*>(current_block->dynamic_shared) + (addr - base);
}

// Element (r, k) of a wgmma shared-memory operand: r its row (M or N index), k < 16 its
// column, the matrix K-major (k contiguous) or, with `mn_major`, MN-major, laid out as
// the descriptor says (kernels/common.cuh gives the layouts).
bool operand_element(uint64_t desc, bool mn_major, int r, int k, float& out, std::string& error) {
    const uint32_t start = uint32_t(desc & 0x3FFF) << 4;
    const uint32_t lbo = uint32_t(desc >> 16 & 0x3FFF) << 4;
    const uint32_t sbo = uint32_t(desc >> 32 & 0x3FFF) << 4;
    const int mode = int(desc >> 62);
    if ((desc >> 49 & 7) != 0) {
        error = "a wgmma descriptor with a matrix base offset (the emulator takes tiles aligned as their swizzle needs)";
        return false;
    }
    const uint32_t w = mode == 1 ? 8 : mode == 2 ? 4 : mode == 3 ? 2 : 1;  // 16-byte units a swizzled row
    uint32_t addr;
    if (!mn_major) {
        addr = w == 1 ? start + (r % 8) * 16 + (r / 8) * sbo + (k / 8) * lbo + (k % 8) * 2
                      : start + (r % 8) * 16 * w + (r / 8) * sbo + (k / 8) * 16 + (k % 8) * 2;
    } else {
        addr = w == 1 ? start + (r % 8) * 2 + (r / 8) * sbo + (k % 8) * 16 + (k / 8) * lbo
                      : start + (r % 8) * 2 + (r / 8 % w) * 16 + (r / (8 * w)) * lbo + (k % 8) * 16 * w + (k / 8) * sbo;
    }
    if (w > 1) addr ^= ((addr >> 7) & (w - 1)) << 4;
    const unsigned char* p = shared_at(addr, 2);
    if (!p) {
        char buf[224];
        snprintf(buf, sizeof buf,
                 "wgmma operand element (%d, %d) at shared address 0x%x (descriptor 0x%016llx), outside the %zu bytes "
                 "of dynamic shared memory at 0x%x",
                 r, k, addr, static_cast<unsigned long long>(desc), current_block->dynamic_shared_bytes,
                 current_block->shared_base);
        error = buf;
        return false;
    }
    const size_t chunk = size_t(p - static_cast<const unsigned char*>(current_block->dynamic_shared)) / 16;
    const Pool::ChunkWrite cw = pool.chunk_writes[chunk];
    if (cw.writer != 0 && (cw.fenced_in == 0 || cw.fenced_in == pool.phase)) {
        const Fiber& w = pool.fibers[cw.writer - 1];
        char buf[384];
        snprintf(buf, sizeof buf,
                 "wgmma operand element (%d, %d) at shared address 0x%x was written by the cp.async of thread "
                 "(%u,%u,%u), %s: a product reads shared memory through the async proxy, which need not see the "
                 "write until its thread passes fence.proxy.async (tl::fence_proxy_async) and then a barrier",
                 r, k, addr, w.tid.x, w.tid.y, w.tid.z,
                 cw.fenced_in == 0 ? "which passed no fence.proxy.async after the copy landed"
                                   : "which passed fence.proxy.async after the copy landed but no barrier since");
        error = buf;
        return false;
    }
    uint16_t h;
    memcpy(&h, p, 2);
    out = bf16_lo(h);
    return true;
}

// Runs product `i` of warpgroup state `st` (see tl_emu::wgmma).
bool run_product(WgState& st, size_t i, std::string& error) {
    WgProduct& p = st.products[i];
    for (int t = 0; t < 128 && !p.d_changed; ++t) {
        if (checksum(p.d[t], p.n / 2) != p.d_sum[t]) {
            error = "thread " + std::to_string(t) +
                    " of a warpgroup wrote the accumulators of a wgmma product before the wgmma_wait that covers it "
                    "(a GPU writes them until then)";
            return false;
        }
    }
    float A[64][16], B[16][256];
    for (int r = 0; r < 64; ++r) {
        for (int k = 0; k < 16; ++k) {
            if (p.reg_a) {
                // thread 32·(r / 16) + 4g + q holds rows g, g + 8 and columns 2q, 2q + 1, +8
                const int w = r / 16, g = r % 8, q = k % 8 / 2;
                const uint32_t reg = p.a[32 * w + 4 * g + q][(r % 16) / 8 + 2 * (k / 8)];
                A[r][k] = k % 2 ? bf16_hi(reg) : bf16_lo(reg);
            } else if (!operand_element(p.desc_a, false, r, k, A[r][k], error)) {
                return false;
            }
        }
    }
    for (int c = 0; c < p.n; ++c) {
        for (int k = 0; k < 16; ++k) {
            if (!operand_element(p.desc_b, p.tnsp_b, c, k, B[k][c], error)) return false;
        }
    }
    for (int t = 0; t < 128; ++t) {
        const int w = t / 32, g = t % 32 / 4, q = t % 4;
        float* d = p.d[t];
        for (int e = 0; e < p.n / 2; ++e) {
            const int row = 16 * w + g + 8 * (e % 4 / 2), col = 8 * (e / 4) + 2 * q + e % 2;
            float s = 0.0f;
            for (int k = 0; k < 16; ++k) s += A[row][k] * B[k][col];
            d[e] = p.scale_d ? d[e] + s : s;
        }
    }
    p.done = true;
    for (size_t j = i + 1; j < st.products.size(); ++j) {
        if (st.products[j].d[0] == p.d[0]) st.products[j].d_changed = true;
    }
    return true;
}

// Releases the warpgroup operations whose 128 threads have all arrived. Returns how many
// threads it released, or -1 with `error` set when a warpgroup can never complete one.
int release_groups(Fiber* fibers, size_t n, std::string& error) {
    int released = 0;
    for (size_t w0 = 0; w0 < n; w0 += 128) {
        Fiber* wg = fibers + w0;
        const size_t lanes = n - w0 < 128 ? n - w0 : 128;
        size_t waiting = 0, done = 0;
        for (size_t l = 0; l < lanes; ++l) {
            waiting += !wg[l].done && wg[l].wait == Wait::Group;
            done += wg[l].done;
        }
        if (waiting == 0) continue;
        const Fiber& f = wg[0].wait == Wait::Group ? wg[0] : *std::find_if(wg, wg + lanes, [](const Fiber& x) {
            return !x.done && x.wait == Wait::Group;
        });
        if (lanes != 128 || done > 0) {
            error = group_op_name(f.group_op) + std::string(" by ") + where(f) + " in a warpgroup of " +
                    std::to_string(lanes - done) + " live threads (all 128 take part)";
            return -1;
        }
        if (waiting != lanes) continue;
        for (size_t l = 1; l < lanes; ++l) {
            const Fiber& g = wg[l];
            const bool same = g.group_op == f.group_op &&
                              (f.group_op != GroupOp::Mma ||
                               (g.desc_a == f.desc_a && g.desc_b == f.desc_b && g.wg_n == f.wg_n &&
                                g.wg_scale_d == f.wg_scale_d && g.wg_tnsp_b == f.wg_tnsp_b && !g.wg_a == !f.wg_a)) &&
                              (f.group_op != GroupOp::Wait || g.wg_n == f.wg_n);
            if (!same) {
                error = "threads of warpgroup " + std::to_string(w0 / 128) + " meet at different warpgroup operations (" +
                        where(f) + " at " + group_op_name(f.group_op) + ", " + where(g) + " at " +
                        group_op_name(g.group_op) + ", or the same one with other operands)";
                return -1;
            }
        }
        WgState& st = pool.wg[w0 / 128];
        switch (f.group_op) {
        case GroupOp::Mma: {
            if (f.wg_n < 8 || f.wg_n > 256 || f.wg_n % 8) {
                error = "wgmma with N = " + std::to_string(f.wg_n);
                return -1;
            }
            for (size_t l = 0; l < 128; ++l) {
                if (!wg[l].wg_fenced) {
                    error = where(wg[l]) +
                            " issued a wgmma product without a wgmma_fence since it started or last waited for "
                            "products (a GPU may read its registers before the writes before it)";
                    return -1;
                }
            }
            st.products.emplace_back();
            WgProduct& p = st.products.back();
            p.desc_a = f.desc_a;
            p.desc_b = f.desc_b;
            p.n = f.wg_n;
            p.scale_d = f.wg_scale_d;
            p.tnsp_b = f.wg_tnsp_b;
            p.reg_a = f.wg_a != nullptr;
            p.done = false;
            p.group = -1;
            p.d_changed = false;
            for (size_t l = 0; l < 128; ++l) {
                p.d[l] = wg[l].wg_d;
                p.a_regs[l] = wg[l].wg_a;
                if (p.reg_a) memcpy(p.a[l], wg[l].wg_a, sizeof p.a[l]);
                p.d_sum[l] = checksum(p.d[l], p.n / 2);
            }
            if (current_block->wgmma_eager) {
                if (!run_product(st, st.products.size() - 1, error)) return -1;
            }
            break;
        }
        case GroupOp::Commit:
            ++st.groups;
            for (WgProduct& p : st.products) {
                if (p.group < 0) p.group = st.groups;
            }
            break;
        case GroupOp::Wait: {
            size_t kept = 0;
            for (size_t i = 0; i < st.products.size(); ++i) {
                WgProduct& p = st.products[i];
                if (p.group >= 0 && p.group <= st.groups - f.wg_n) {
                    if (!p.done && !run_product(st, i, error)) return -1;
                    for (size_t l = 0; p.reg_a && l < 128; ++l) {
                        if (memcmp(p.a[l], p.a_regs[l], sizeof p.a[l]) != 0) {
                            error = where(wg[l]) +
                                    " wrote the A registers of a wgmma product before the wgmma_wait that covers it "
                                    "(a GPU reads them until then)";
                            return -1;
                        }
                    }
                } else {
                    if (kept != i) st.products[kept] = p;
                    ++kept;
                }
            }
            st.products.resize(kept);
            for (size_t l = 0; l < 128; ++l) wg[l].wg_fenced = false;
            break;
        }
        }
        for (size_t l = 0; l < lanes; ++l) wg[l].wait = Wait::None;
        released += int(lanes);
    }
    return released;
}

std::string describe(Fiber* fibers, size_t n) {
    std::string s;
    size_t at_block = 0, at_warp = 0, at_group = 0, done = 0;
    const Fiber* first_warp = nullptr;
    for (size_t i = 0; i < n; ++i) {
        if (fibers[i].done) {
            ++done;
        } else if (fibers[i].wait == Wait::Block) {
            ++at_block;
        } else if (fibers[i].wait == Wait::Group) {
            ++at_group;
        } else {
            ++at_warp;
            if (!first_warp) first_warp = &fibers[i];
        }
    }
    s = std::to_string(at_block) + " thread(s) wait at __syncthreads, " + std::to_string(at_warp) +
        " at a warp operation, " + std::to_string(at_group) + " at a warpgroup operation, " + std::to_string(done) +
        " exited";
    if (first_warp) {
        char mask[16];
        snprintf(mask, sizeof mask, "%08x", first_warp->mask);
        s += " (first: " + where(*first_warp) + " at " + op_name(first_warp->op) + " mask 0x" + mask + ")";
    }
    return s;
}

// An error a thread ran into (a bad cp.async), with where: the block stops there.
std::string fiber_error;

std::string run_block(size_t n, Rng& rng, bool shuffle) {
    Fiber* fibers = pool.fibers.data();
    const uint3 dim = current_block->block_dim;
    for (size_t i = 0; i < n; ++i) {
        pool.cp[i].copies.clear();
        pool.cp[i].groups = 0;
        pool.cp[i].unfenced.clear();
        Fiber& f = fibers[i];
        f = Fiber{};
        f.tid = uint3{unsigned(i % dim.x), unsigned(i / dim.x % dim.y), unsigned(i / (size_t(dim.x) * dim.y))};
        f.lane = int(i % 32);
        f.warp = int(i / 32);
    }
    pool.group_waiting = 0;
    std::fill(pool.chunk_writes.begin(), pool.chunk_writes.end(), Pool::ChunkWrite{0, 0});
    pool.phase = 1;
    pool.wg.resize((n + 127) / 128);
    for (WgState& w : pool.wg) {
        w.products.clear();
        w.groups = 0;
    }
    // A fiber takes a stack when it first runs and gives it back when it exits, so the
    // threads of a kernel without barriers all run on one stack, warm in the cache.
    std::vector<void*>& free_stacks = pool.free_stacks;
    free_stacks.assign(pool.stacks.rend() - n, pool.stacks.rend());
    std::vector<uint32_t>& order = pool.order;
    order.resize(n);
    for (size_t i = 0; i < n; ++i) order[i] = uint32_t(i);
    for (;;) {
        if (shuffle) {
            // Fisher-Yates with a multiply-shift in place of a division per draw.
            for (size_t i = n; i > 1; --i) {
                std::swap(order[i - 1], order[(uint64_t(uint32_t(rng.next() >> 32)) * i) >> 32]);
            }
        }
        for (size_t i = 0; i < n; ++i) {
            Fiber& f = fibers[order[i]];
            if (f.done || f.wait != Wait::None) continue;
            if (!f.stack) {
                f.stack = free_stacks.back();
                free_stacks.pop_back();
                start_fiber(&f);
            }
            resume(&f);
            if (!fiber_error.empty()) return fiber_error;
            if (f.done) free_stacks.push_back(f.stack);
        }
        std::string error;
        const int released = release_warps(fibers, n, error);
        if (released < 0) return error;
        if (released > 0) continue;
        // (kernels without wgmma never pay for the scan)
        const int released_groups = pool.group_waiting > 0 ? release_groups(fibers, n, error) : 0;
        if (released_groups < 0) return error;
        if (released_groups > 0) {
            pool.group_waiting -= size_t(released_groups);
            continue;
        }
        size_t live = 0, at_block = 0;
        for (size_t i = 0; i < n; ++i) {
            if (fibers[i].done) continue;
            ++live;
            at_block += fibers[i].wait == Wait::Block;
        }
        if (live == 0) {
            for (size_t i = 0; i < n; ++i) {
                if (!pool.cp[i].copies.empty()) {
                    return where(fibers[i]) + " exited with " + std::to_string(pool.cp[i].copies.size()) +
                           " cp.async copies it never waited for";
                }
            }
            for (size_t w = 0; w < pool.wg.size(); ++w) {
                if (!pool.wg[w].products.empty()) {
                    return "warpgroup " + std::to_string(w) + " exited with " +
                           std::to_string(pool.wg[w].products.size()) + " wgmma products it never waited for";
                }
            }
            return {};
        }
        if (at_block == live) {
            for (size_t i = 0; i < n; ++i) fibers[i].wait = Wait::None;
            ++pool.phase;
            continue;
        }
        return "deadlock: " + describe(fibers, n) +
               " (a barrier or warp operation in code that not every thread reaches?)";
    }
}

}  // namespace

std::string run_grid(const Kernel& kernel, dim3 grid, dim3 block, size_t dynamic_shared, void** params,
                     uint64_t seed, bool shuffle) {
    const size_t n = size_t(block.x) * block.y * block.z;
    std::string error;
    if (!pool.reserve(n, error)) return error;
    pool.dynamic_shared.assign(dynamic_shared + 16, 0);
    pool.chunk_writes.assign(dynamic_shared / 16 + 1, Pool::ChunkWrite{0, 0});
    fiber_error.clear();
    Launch launch{&kernel, params, nullptr};
    BlockState state{};
    state.dynamic_shared_bytes = dynamic_shared;
    state.block_dim = uint3{block.x, block.y, block.z};
    state.grid_dim = uint3{grid.x, grid.y, grid.z};
    state.dynamic_shared = pool.dynamic_shared.data();
    current_launch = &launch;
    current_block = &state;
    Rng rng{seed * 0x9E3779B97F4A7C15ull + 1};
    // A GPU runs a launch's blocks in no set order, so with `shuffle` they run in one
    // drawn from `seed`: a block that reads what another block of the same launch writes
    // (without atomics and a way to wait) then sees it missing.
    const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
    std::vector<uint64_t> order;
    if (shuffle) {
        order.resize(blocks);
        for (uint64_t i = 0; i < blocks; ++i) order[i] = i;
        for (uint64_t i = blocks; i > 1; --i) std::swap(order[i - 1], order[rng.next() % i]);
    }
    for (uint64_t i = 0; i < blocks && error.empty(); ++i) {
        const uint64_t b = shuffle ? order[i] : i;
        const unsigned x = unsigned(b % grid.x), y = unsigned(b / grid.x % grid.y), z = unsigned(b / grid.x / grid.y);
        state.block_idx = uint3{x, y, z};
        state.cp_async_eager = shuffle && (rng.next() >> 63) != 0;
        state.wgmma_eager = shuffle && (rng.next() >> 63) != 0;
        state.shared_base = shuffle ? uint32_t(rng.next() >> 58) * 16 : 0;
        fill_poison(pool.dynamic_shared.data(), pool.dynamic_shared.size());
        state.serial = ++blocks_run;
        error = run_block(n, rng, shuffle);
        if (!error.empty()) {
            error = "block (" + std::to_string(x) + "," + std::to_string(y) + "," + std::to_string(z) + "): " + error;
        }
    }
    current_launch = nullptr;
    current_block = nullptr;
    return error;
}

void fresh_shared(void* p, size_t bytes, uint64_t* filled_for) {
    if (*filled_for != current_block->serial) {
        *filled_for = current_block->serial;
        fill_poison(p, bytes);
    }
}

void yield_to_scheduler() { tl_emu_switch(&current_fiber->sp, current_launch->scheduler_sp); }

namespace {

// Stops the calling thread's block with `msg`: the scheduler never resumes it.
[[noreturn]] void fail_in_fiber(const std::string& msg) {
    fiber_error = where(*current_fiber) + ": " + msg;
    current_fiber->wait = Wait::Block;
    for (;;) yield_to_scheduler();
}

// The calling thread's index in the block.
uint32_t my_thread() { return uint32_t(current_fiber - pool.fibers.data()); }

CpQueue& my_cp_queue() { return pool.cp[my_thread()]; }

// Lands copy `c` of the calling thread (cp.async targets dynamic shared memory only).
void land(const CpCopy& c) {
    memcpy(c.dst, c.src, c.src_bytes);
    memset(static_cast<char*>(c.dst) + c.src_bytes, 0, 16 - c.src_bytes);
    pool.chunk_writes[c.chunk] = Pool::ChunkWrite{my_thread() + 1, 0};
    my_cp_queue().unfenced.push_back(c.chunk);
}

}  // namespace

void cp_async_16(void* dst, const void* src, unsigned src_bytes) {
    const long offset = shared_offset(dst, 16);
    if (offset < 0) {
        char buf[128];
        snprintf(buf, sizeof buf, "cp.async to %p, not a 16-byte aligned spot inside the %zu bytes of dynamic shared memory",
                 dst, current_block->dynamic_shared_bytes);
        fail_in_fiber(buf);
    }
    if (src_bytes > 16) fail_in_fiber("cp.async of " + std::to_string(src_bytes) + " source bytes into 16");
    if (src_bytes > 0) check_aligned(src, 16);
    const CpCopy c{dst, src, src_bytes, -1, uint32_t(offset / 16)};
    if (current_block->cp_async_eager) {
        land(c);
    } else {
        my_cp_queue().copies.push_back(c);
    }
}

uint32_t shared_address(const void* p) {
    const uintptr_t base = reinterpret_cast<uintptr_t>(current_block->dynamic_shared);
    const uintptr_t at = reinterpret_cast<uintptr_t>(p);
    if (at < base || at - base > current_block->dynamic_shared_bytes) {
        char buf[128];
        snprintf(buf, sizeof buf, "the shared address of %p, which is not in the block's dynamic shared memory", p);
        fail_in_fiber(buf);
    }
    return current_block->shared_base + uint32_t(at - base);
}

namespace {
void group_op(GroupOp op) {
    Fiber* f = current_fiber;
    f->group_op = op;
    f->wait = Wait::Group;
    ++pool.group_waiting;
    asm volatile("" ::: "memory");
    yield_to_scheduler();
    asm volatile("" ::: "memory");
}
}  // namespace

void wgmma(float* d, int n, uint64_t desc_a, const uint32_t* a, uint64_t desc_b, bool scale_d, bool tnsp_b) {
    Fiber* f = current_fiber;
    f->wg_d = d;
    f->wg_n = n;
    f->desc_a = a ? 0 : desc_a;
    f->wg_a = a;
    f->desc_b = desc_b;
    f->wg_scale_d = scale_d;
    f->wg_tnsp_b = tnsp_b;
    group_op(GroupOp::Mma);
}

void wgmma_commit() { group_op(GroupOp::Commit); }

void wgmma_wait(int pending) {
    current_fiber->wg_n = pending;
    group_op(GroupOp::Wait);
}

void check_aligned(const void* p, unsigned bytes) {
    if (reinterpret_cast<uintptr_t>(p) % bytes != 0) {
        char buf[128];
        snprintf(buf, sizeof buf, "a %u-byte vector access at %p, which is not %u-byte aligned (a GPU faults)", bytes,
                 p, bytes);
        fail_in_fiber(buf);
    }
}

void cp_async_commit() {
    CpQueue& q = my_cp_queue();
    ++q.groups;
    for (CpCopy& c : q.copies) {
        if (c.group < 0) c.group = q.groups;
    }
}

void fence_proxy_async() {
    CpQueue& q = my_cp_queue();
    const uint32_t me = my_thread() + 1;
    for (const uint32_t chunk : q.unfenced) {
        Pool::ChunkWrite& cw = pool.chunk_writes[chunk];
        if (cw.writer == me && cw.fenced_in == 0) cw.fenced_in = pool.phase;
    }
    q.unfenced.clear();
}

void cp_async_wait(int n) {
    CpQueue& q = my_cp_queue();
    std::vector<CpCopy> pending;
    for (const CpCopy& c : q.copies) {
        if (c.group >= 0 && c.group <= q.groups - n) {
            land(c);
        } else {
            pending.push_back(c);
        }
    }
    q.copies.swap(pending);
}

}  // namespace tl_emu
