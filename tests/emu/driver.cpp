// A CPU stand-in for the NVIDIA driver library (libcuda.so), for the test suite: with the
// folder of the built library on LD_LIBRARY_PATH, cudarc loads it instead of a real
// driver, and the CUDA backend runs its launchers and kernels/*.cu (compiled by the host
// compiler against simt.hpp) on the CPU. It implements the driver calls cudarc makes for
// the backend, synchronously: one device, "device" memory in host mappings, every
// launch run to completion before the call returns.
//
// What it checks, each failure a CUresult and one line on stderr naming the kernel:
//  * launches: block size within 1024, the kernel's __launch_bounds__ and the 64K
//    registers of a block (at the registers a thread ptxas compiled the kernel to for
//    sm_90a, allocated 256 a warp, as on Hopper), grid limits, static and dynamic shared
//    memory together within 48 KiB (more only after cuFuncSetAttribute raised the limit,
//    up to 227 KiB with the static part as on Hopper), every pointer parameter null or
//    inside a live allocation;
//  * the SIMT rules of simt.hpp (barriers every thread reaches, complete warp groups;
//    wgmma by all 128 threads of a warpgroup after a wgmma.fence, its operands inside
//    dynamic shared memory, its A registers and accumulators left alone until the wait
//    that covers it);
//  * memory, as compute-sanitizer's memcheck would: each allocation ends 256-byte
//    aligned right below an inaccessible page, with a poisoned gap before it and a
//    poisoned tail after it; reading or writing past that page, or into freed memory,
//    stops the process with a message naming the kernel, block and thread; a write into
//    the tail or gap fails the launch (checked after each one) or the free;
//  * fresh allocations and shared memory (dynamic, and static through TL_SHARED, at the
//    start of every block) read as NaN (f32 and bf16), so an output element a kernel
//    forgets to write, or shared memory read before it is written, shows up;
//  * copies and memsets stay inside one allocation.
// Environment: TUNELOOP_EMU_DEVICES=N shows N devices (default 1), all of them this
// process's one memory, so that one process per GPU can run on one machine;
// TUNELOOP_EMU_ORDER=forward runs a launch's blocks and resumes a block's threads in
// index order instead of shuffled ones; TUNELOOP_EMU_TRACE=1 prints each launch;
// TUNELOOP_EMU_NO_COMPUTE=1 checks each launch (and libcublasLt each product) but runs
// none, and neither poisons nor checks memory: every result is garbage, but the
// allocations are the real ones, so a step's device memory can be counted at shapes far
// too large to compute on a CPU.

#include <signal.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <string>

#include "emu.hpp"

namespace {

using CUresult = int;
using CUdevice = int;
using CUdeviceptr = unsigned long long;
using CUcontext = void*;
using CUmodule = void*;
using CUfunction = void*;
using CUstream = void*;
using CUevent = void*;

constexpr CUresult CUDA_SUCCESS = 0;
constexpr CUresult CUDA_ERROR_INVALID_VALUE = 1;
constexpr CUresult CUDA_ERROR_OUT_OF_MEMORY = 2;
constexpr CUresult CUDA_ERROR_NOT_INITIALIZED = 3;
constexpr CUresult CUDA_ERROR_INVALID_DEVICE = 101;
constexpr CUresult CUDA_ERROR_INVALID_IMAGE = 200;
constexpr CUresult CUDA_ERROR_INVALID_CONTEXT = 201;
constexpr CUresult CUDA_ERROR_INVALID_HANDLE = 400;
constexpr CUresult CUDA_ERROR_NOT_FOUND = 500;
constexpr CUresult CUDA_ERROR_ILLEGAL_ADDRESS = 700;
constexpr CUresult CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES = 701;
constexpr CUresult CUDA_ERROR_LAUNCH_FAILED = 719;
constexpr CUresult CUDA_ERROR_NOT_SUPPORTED = 801;

constexpr size_t PAGE = 4096;
constexpr size_t ALIGN = 256;
constexpr size_t TOTAL_MEMORY = size_t(80) << 30;
constexpr int DEFAULT_DYNAMIC_SHARED = 48 << 10;
constexpr int MAX_DYNAMIC_SHARED = 227 << 10;
constexpr int REGISTERS_PER_BLOCK = 64 << 10;

#define EXPORT extern "C" __attribute__((visibility("default")))

void say(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
void say(const char* fmt, ...) {
    char line[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    fprintf(stderr, "tuneloop CUDA emulator: %s\n", line);
}

// TUNELOOP_EMU_DEVICES, 1 to 64 (default 1).
int device_count() {
    const char* v = getenv("TUNELOOP_EMU_DEVICES");
    const int n = v ? atoi(v) : 1;
    return n < 1 ? 1 : n > 64 ? 64 : n;
}

bool valid_device(CUdevice d) { return d >= 0 && d < device_count(); }

// ---- device memory -----------------------------------------------------------------

struct Alloc {
    char* base;       // the mapping: [guard page][pages...][guard page]
    size_t map_len;
    char* data;       // what cuMemAlloc returned
    size_t size;      // what it asked for
};

// Everything below is guarded by `mu`; launches hold it for their whole run, so kernels
// (and the shared memory they keep in statics) never run concurrently.
std::recursive_mutex mu;
std::map<uintptr_t, Alloc> allocs;  // by data address
size_t in_use = 0;
// Recently freed ranges, to name a use after free.
struct Freed {
    uintptr_t data;
    size_t size;
};
Freed freed[1024];
size_t freed_next = 0;

unsigned char poison_byte(uintptr_t addr) { return static_cast<unsigned char>(tl_emu::POISON >> (8 * (addr % 4))); }

// The first byte of [from, to) that no longer holds the poison, or null.
const char* first_unpoisoned(const char* from, const char* to) {
    const char* p = from;
    for (; p < to && reinterpret_cast<uintptr_t>(p) % 4; ++p) {
        if (static_cast<unsigned char>(*p) != poison_byte(reinterpret_cast<uintptr_t>(p))) return p;
    }
    // Whole words first (the common case: intact), bytes where a word differs.
    for (; to - p >= 4; p += 4) {
        uint32_t w;
        memcpy(&w, p, 4);
        if (w != tl_emu::POISON) break;
    }
    for (; p < to; ++p) {
        if (static_cast<unsigned char>(*p) != poison_byte(reinterpret_cast<uintptr_t>(p))) return p;
    }
    return nullptr;
}

// Why `a`'s padding no longer holds the poison, or empty; re-poisons it.
std::string check_padding(Alloc& a) {
    char* region = a.base + PAGE;
    char* end = a.base + a.map_len - PAGE;
    std::string why;
    if (const char* p = first_unpoisoned(a.data + a.size, end)) {
        char buf[160];
        snprintf(buf, sizeof buf, "wrote at byte %zu past the end of the %zu-byte allocation at %p",
                 size_t(p - (a.data + a.size)), a.size, static_cast<void*>(a.data));
        why = buf;
        tl_emu::fill_poison(a.data + a.size, size_t(end - (a.data + a.size)));
    } else if (const char* q = first_unpoisoned(region, a.data)) {
        char buf[160];
        snprintf(buf, sizeof buf, "wrote %zu byte(s) before the start of the %zu-byte allocation at %p",
                 size_t(a.data - q), a.size, static_cast<void*>(a.data));
        why = buf;
        tl_emu::fill_poison(region, size_t(a.data - region));
    }
    return why;
}

bool env_is(const char* name, const char* value) {
    const char* v = getenv(name);
    return v && strcmp(v, value) == 0;
}

bool no_compute() {
    static const bool on = env_is("TUNELOOP_EMU_NO_COMPUTE", "1");
    return on;
}

CUresult allocate(CUdeviceptr* out, size_t size) {
    if (!out) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::recursive_mutex> lock(mu);
    const size_t data_len = (size == 0 ? 1 : size + ALIGN - 1) / ALIGN * ALIGN;
    const size_t pages = (data_len + PAGE - 1) / PAGE;
    const size_t map_len = (pages + 2) * PAGE;
    if (in_use + size > TOTAL_MEMORY) return CUDA_ERROR_OUT_OF_MEMORY;
    void* m = mmap(nullptr, map_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
    char* base = static_cast<char*>(m);
    mprotect(base, PAGE, PROT_NONE);
    mprotect(base + map_len - PAGE, PAGE, PROT_NONE);
    char* data = base + map_len - PAGE - data_len;
    if (!no_compute()) tl_emu::fill_poison(base + PAGE, map_len - 2 * PAGE);
    allocs[reinterpret_cast<uintptr_t>(data)] = Alloc{base, map_len, data, size};
    in_use += size;
    *out = reinterpret_cast<uintptr_t>(data);
    return CUDA_SUCCESS;
}

CUresult release(CUdeviceptr ptr) {
    std::lock_guard<std::recursive_mutex> lock(mu);
    auto it = allocs.find(ptr);
    if (it == allocs.end()) {
        say("cuMemFree of 0x%llx, which is not the start of a live allocation", ptr);
        return CUDA_ERROR_INVALID_VALUE;
    }
    Alloc a = it->second;
    const std::string bad = no_compute() ? std::string() : check_padding(a);
    allocs.erase(it);
    in_use -= a.size;
    freed[freed_next++ % 1024] = Freed{reinterpret_cast<uintptr_t>(a.data), a.size};
    munmap(a.base, a.map_len);
    if (!bad.empty()) {
        say("on cuMemFree: a kernel %s", bad.c_str());
        return CUDA_ERROR_ILLEGAL_ADDRESS;
    }
    return CUDA_SUCCESS;
}

// The live allocation holding [p, p + n), if any.
const Alloc* find(uintptr_t p, size_t n) {
    auto it = allocs.upper_bound(p);
    if (it == allocs.begin()) return nullptr;
    --it;
    const Alloc& a = it->second;
    const uintptr_t start = reinterpret_cast<uintptr_t>(a.data);
    if (p < start || p + n > start + a.size) return nullptr;
    return &a;
}

CUresult check_range(const char* call, uintptr_t p, size_t n) {
    if (n == 0) return CUDA_SUCCESS;
    if (find(p, n)) return CUDA_SUCCESS;
    say("%s: [0x%lx, +%zu bytes) is not inside one live device allocation", call, (unsigned long)p, n);
    return CUDA_ERROR_INVALID_VALUE;
}

// ---- kernels -----------------------------------------------------------------------

struct Function {
    const tl_emu::Kernel* kernel;
    int max_dynamic_shared;
};

// A warp's registers: its threads' registers, allocated in units of 256.
int registers_per_warp(const tl_emu::Kernel& k) { return (k.registers * 32 + 255) / 256 * 256; }

// The most threads a block of `k` can have (CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK):
// its __launch_bounds__, and the whole warps whose registers fit in a block's.
int max_threads(const tl_emu::Kernel& k) {
    const int per_warp = registers_per_warp(k);
    const int by_registers = per_warp > 0 ? REGISTERS_PER_BLOCK / per_warp * 32 : 1024;
    return std::min(std::min(k.max_threads, by_registers), 1024);
}
std::deque<Function> functions;
uint64_t launches = 0;

// For the fault handler.
const char* running_kernel = nullptr;

void on_fault(int sig, siginfo_t* info, void*) {
    const uintptr_t addr = reinterpret_cast<uintptr_t>(info->si_addr);
    char what[256] = "an address that is not device memory";
    for (const auto& [start, a] : allocs) {
        const uintptr_t base = reinterpret_cast<uintptr_t>(a.base);
        if (addr >= base && addr < base + a.map_len) {
            if (addr >= start) {
                snprintf(what, sizeof what, "byte %zu past the end of the %zu-byte allocation at 0x%lx",
                         size_t(addr - start - a.size), a.size, (unsigned long)start);
            } else {
                snprintf(what, sizeof what, "%zu byte(s) before the %zu-byte allocation at 0x%lx",
                         size_t(start - addr), a.size, (unsigned long)start);
            }
        }
    }
    for (const Freed& f : freed) {
        if (f.size && addr >= f.data && addr < f.data + f.size) {
            snprintf(what, sizeof what, "freed memory (a %zu-byte allocation at 0x%lx)", f.size,
                     (unsigned long)f.data);
        }
    }
    char line[640];
    if (running_kernel && tl_emu::current_block && tl_emu::current_fiber) {
        const uint3 b = tl_emu::current_block->block_idx, t = tl_emu::current_fiber->tid;
        snprintf(line, sizeof line,
                 "tuneloop CUDA emulator: invalid memory access in kernel %s, block (%u,%u,%u) thread "
                 "(%u,%u,%u), at 0x%lx: %s\n",
                 running_kernel, b.x, b.y, b.z, t.x, t.y, t.z, (unsigned long)addr, what);
    } else {
        snprintf(line, sizeof line, "tuneloop CUDA emulator: %s at 0x%lx: %s\n",
                 sig == SIGSEGV ? "segmentation fault" : "bus error", (unsigned long)addr, what);
    }
    ssize_t ignored = write(2, line, strlen(line));
    (void)ignored;
    signal(sig, SIG_DFL);
    abort();
}

void install_fault_handler() {
    static std::once_flag once;
    std::call_once(once, [] {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = on_fault;
        sa.sa_flags = SA_SIGINFO;
        sigaction(SIGSEGV, &sa, nullptr);
        sigaction(SIGBUS, &sa, nullptr);
    });
}

CUresult launch(Function* f, dim3 grid, dim3 block, unsigned shared, void** params, void** extra) {
    const tl_emu::Kernel& k = *f->kernel;
    const size_t threads = size_t(block.x) * block.y * block.z;
    if (threads == 0 || grid.x == 0 || grid.y == 0 || grid.z == 0) {
        say("kernel %s: launch with an empty grid (%u,%u,%u) or block (%u,%u,%u)", k.name, grid.x, grid.y, grid.z,
            block.x, block.y, block.z);
        return CUDA_ERROR_INVALID_VALUE;
    }
    if (block.x > 1024 || block.y > 1024 || block.z > 64 || threads > 1024 || grid.x > 0x7fffffffu ||
        grid.y > 65535 || grid.z > 65535) {
        say("kernel %s: grid (%u,%u,%u) or block (%u,%u,%u) beyond the device's limits", k.name, grid.x, grid.y,
            grid.z, block.x, block.y, block.z);
        return CUDA_ERROR_INVALID_VALUE;
    }
    if (threads > size_t(k.max_threads)) {
        say("kernel %s: %zu threads per block, but its __launch_bounds__ allows %d", k.name, threads,
            k.max_threads);
        return CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES;
    }
    if (int(threads) > max_threads(k)) {
        say("kernel %s: %zu threads per block at %d registers a thread need %zu registers, above a block's "
            "%d (at most %d threads)",
            k.name, threads, k.registers, (threads + 31) / 32 * size_t(registers_per_warp(k)), REGISTERS_PER_BLOCK,
            max_threads(k));
        return CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES;
    }
    if (int(shared) > f->max_dynamic_shared) {
        say("kernel %s: %u bytes of dynamic shared memory (and %d static), above its limit of %d (raise it "
            "with cuFuncSetAttribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES))",
            k.name, shared, k.static_shared, f->max_dynamic_shared);
        return CUDA_ERROR_INVALID_VALUE;
    }
    if (extra) {
        say("kernel %s: the `extra` form of cuLaunchKernel is not emulated", k.name);
        return CUDA_ERROR_NOT_SUPPORTED;
    }
    if (k.n_params > 0 && !params) {
        say("kernel %s: no parameters given for its %d", k.name, k.n_params);
        return CUDA_ERROR_INVALID_VALUE;
    }
    std::lock_guard<std::recursive_mutex> lock(mu);
    for (int i = 0; i < k.n_params; ++i) {
        if (!(k.pointer_params >> i & 1)) continue;
        uintptr_t p;
        memcpy(&p, params[i], sizeof p);
        if (p == 0) continue;
        // A pointer may sit one past the end (an empty tensor), not further.
        auto it = allocs.upper_bound(p);
        bool ok = false;
        if (it != allocs.begin()) {
            --it;
            ok = p <= it->first + it->second.size;
        }
        if (!ok) {
            say("kernel %s: parameter %d (0x%lx) is not an address in device memory", k.name, i, (unsigned long)p);
            return CUDA_ERROR_INVALID_VALUE;
        }
    }
    if (env_is("TUNELOOP_EMU_TRACE", "1")) {
        say("launch %s grid (%u,%u,%u) block (%u,%u,%u) shared %u", k.name, grid.x, grid.y, grid.z, block.x,
            block.y, block.z, shared);
    }
    if (no_compute()) return CUDA_SUCCESS;
    running_kernel = k.name;
    const std::string error =
        tl_emu::run_grid(k, grid, block, shared, params, ++launches, !env_is("TUNELOOP_EMU_ORDER", "forward"));
    running_kernel = nullptr;
    if (!error.empty()) {
        say("kernel %s: %s", k.name, error.c_str());
        return CUDA_ERROR_LAUNCH_FAILED;
    }
    CUresult result = CUDA_SUCCESS;
    for (auto& [start, a] : allocs) {
        const std::string bad = check_padding(a);
        if (!bad.empty()) {
            say("kernel %s %s", k.name, bad.c_str());
            result = CUDA_ERROR_ILLEGAL_ADDRESS;
        }
    }
    return result;
}

// ---- handles -----------------------------------------------------------------------

// One primary context per device.
int context_objects[64];
int module_object, stream_object;

// The device of context `ctx`, or -1.
int context_device(CUcontext ctx) {
    const int* c = static_cast<const int*>(ctx);
    return c >= context_objects && c < context_objects + device_count() ? int(c - context_objects) : -1;
}
thread_local CUcontext current_context = nullptr;
bool initialised = false;

struct Event {
    double ms;
};

double now_ms() {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return double(ts.tv_sec) * 1e3 + double(ts.tv_nsec) * 1e-6;
}

const char* error_name(CUresult r) {
    switch (r) {
    case CUDA_SUCCESS: return "CUDA_SUCCESS";
    case CUDA_ERROR_INVALID_VALUE: return "CUDA_ERROR_INVALID_VALUE";
    case CUDA_ERROR_OUT_OF_MEMORY: return "CUDA_ERROR_OUT_OF_MEMORY";
    case CUDA_ERROR_NOT_INITIALIZED: return "CUDA_ERROR_NOT_INITIALIZED";
    case CUDA_ERROR_INVALID_DEVICE: return "CUDA_ERROR_INVALID_DEVICE";
    case CUDA_ERROR_INVALID_IMAGE: return "CUDA_ERROR_INVALID_IMAGE";
    case CUDA_ERROR_INVALID_CONTEXT: return "CUDA_ERROR_INVALID_CONTEXT";
    case CUDA_ERROR_INVALID_HANDLE: return "CUDA_ERROR_INVALID_HANDLE";
    case CUDA_ERROR_NOT_FOUND: return "CUDA_ERROR_NOT_FOUND";
    case CUDA_ERROR_ILLEGAL_ADDRESS: return "CUDA_ERROR_ILLEGAL_ADDRESS";
    case CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES: return "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES";
    case CUDA_ERROR_LAUNCH_FAILED: return "CUDA_ERROR_LAUNCH_FAILED";
    case CUDA_ERROR_NOT_SUPPORTED: return "CUDA_ERROR_NOT_SUPPORTED";
    default: return nullptr;
    }
}

}  // namespace

// ---- the driver API ----------------------------------------------------------------

EXPORT CUresult cuInit(unsigned flags) {
    if (flags != 0) return CUDA_ERROR_INVALID_VALUE;
    install_fault_handler();
    initialised = true;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDriverGetVersion(int* v) {
    if (!v) return CUDA_ERROR_INVALID_VALUE;
    *v = 13000;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuGetErrorName(CUresult r, const char** s) {
    if (!s) return CUDA_ERROR_INVALID_VALUE;
    *s = error_name(r);
    return *s ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

EXPORT CUresult cuGetErrorString(CUresult r, const char** s) {
    if (!s) return CUDA_ERROR_INVALID_VALUE;
    *s = error_name(r);
    return *s ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

EXPORT CUresult cuDeviceGetCount(int* n) {
    if (!initialised) return CUDA_ERROR_NOT_INITIALIZED;
    if (!n) return CUDA_ERROR_INVALID_VALUE;
    *n = device_count();
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDeviceGet(CUdevice* d, int ordinal) {
    if (!initialised) return CUDA_ERROR_NOT_INITIALIZED;
    if (!d) return CUDA_ERROR_INVALID_VALUE;
    if (!valid_device(ordinal)) return CUDA_ERROR_INVALID_DEVICE;
    *d = ordinal;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDeviceGetName(char* name, int len, CUdevice d) {
    if (!name || len <= 0) return CUDA_ERROR_INVALID_VALUE;
    if (!valid_device(d)) return CUDA_ERROR_INVALID_DEVICE;
    snprintf(name, size_t(len), "tuneloop CUDA emulator on the CPU");
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice d) {
    if (!bytes) return CUDA_ERROR_INVALID_VALUE;
    if (!valid_device(d)) return CUDA_ERROR_INVALID_DEVICE;
    *bytes = TOTAL_MEMORY;
    return CUDA_SUCCESS;
}

// An H100's figures, for the attributes cudarc or the backend may ask about.
EXPORT CUresult cuDeviceGetAttribute(int* v, int attribute, CUdevice d) {
    if (!v) return CUDA_ERROR_INVALID_VALUE;
    if (!valid_device(d)) return CUDA_ERROR_INVALID_DEVICE;
    switch (attribute) {
    case 1: *v = 1024; break;                      // MAX_THREADS_PER_BLOCK
    case 5: *v = 0x7fffffff; break;                // MAX_GRID_DIM_X
    case 8: *v = DEFAULT_DYNAMIC_SHARED; break;    // MAX_SHARED_MEMORY_PER_BLOCK
    case 10: *v = 32; break;                       // WARP_SIZE
    case 16: *v = 132; break;                      // MULTIPROCESSOR_COUNT
    case 41: *v = 1; break;                        // UNIFIED_ADDRESSING
    case 75: *v = 9; break;                        // COMPUTE_CAPABILITY_MAJOR
    case 76: *v = 0; break;                        // COMPUTE_CAPABILITY_MINOR
    case 97: *v = MAX_DYNAMIC_SHARED; break;       // MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
    case 115: *v = 1; break;                       // MEMORY_POOLS_SUPPORTED
    default:
        say("cuDeviceGetAttribute(%d) is not emulated", attribute);
        return CUDA_ERROR_NOT_SUPPORTED;
    }
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDevicePrimaryCtxRetain(CUcontext* ctx, CUdevice d) {
    if (!initialised) return CUDA_ERROR_NOT_INITIALIZED;
    if (!ctx) return CUDA_ERROR_INVALID_VALUE;
    if (!valid_device(d)) return CUDA_ERROR_INVALID_DEVICE;
    *ctx = &context_objects[d];
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDevicePrimaryCtxRelease_v2(CUdevice d) {
    return valid_device(d) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_DEVICE;
}

EXPORT CUresult cuCtxSetCurrent(CUcontext ctx) {
    if (ctx && context_device(ctx) < 0) return CUDA_ERROR_INVALID_HANDLE;
    current_context = ctx;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuCtxGetCurrent(CUcontext* ctx) {
    if (!ctx) return CUDA_ERROR_INVALID_VALUE;
    *ctx = current_context;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuCtxPushCurrent_v2(CUcontext ctx) { return cuCtxSetCurrent(ctx); }

EXPORT CUresult cuCtxPopCurrent_v2(CUcontext* ctx) {
    if (ctx) *ctx = current_context;
    current_context = nullptr;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuCtxGetDevice(CUdevice* d) {
    if (!d) return CUDA_ERROR_INVALID_VALUE;
    if (!current_context) return CUDA_ERROR_INVALID_CONTEXT;
    *d = context_device(current_context);
    return CUDA_SUCCESS;
}

EXPORT CUresult cuCtxSynchronize() { return CUDA_SUCCESS; }

// The image must be a fatbin (what build.rs embeds); the kernels themselves come from
// the host-compiled table.
EXPORT CUresult cuModuleLoadData(CUmodule* module, const void* image) {
    if (!module || !image) return CUDA_ERROR_INVALID_VALUE;
    uint32_t magic;
    memcpy(&magic, image, sizeof magic);
    if (magic != 0xBA55ED50u) {
        say("cuModuleLoadData: the image does not start with a fatbin header (magic 0x%08x)", magic);
        return CUDA_ERROR_INVALID_IMAGE;
    }
    *module = &module_object;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuModuleUnload(CUmodule module) {
    return module == &module_object ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
}

EXPORT CUresult cuModuleGetFunction(CUfunction* f, CUmodule module, const char* name) {
    if (!f || !name) return CUDA_ERROR_INVALID_VALUE;
    if (module != &module_object) return CUDA_ERROR_INVALID_HANDLE;
    std::lock_guard<std::recursive_mutex> lock(mu);
    for (size_t i = 0; i < tl_emu::kernel_count; ++i) {
        if (strcmp(tl_emu::kernel_table[i].name, name) == 0) {
            // Static and dynamic shared memory share the 48 KiB a block gets unasked.
            const tl_emu::Kernel& k = tl_emu::kernel_table[i];
            functions.push_back(Function{&k, DEFAULT_DYNAMIC_SHARED - k.static_shared});
            *f = &functions.back();
            return CUDA_SUCCESS;
        }
    }
    return CUDA_ERROR_NOT_FOUND;
}

EXPORT CUresult cuFuncGetAttribute(int* v, int attribute, CUfunction f) {
    if (!v || !f) return CUDA_ERROR_INVALID_VALUE;
    const Function* fn = static_cast<Function*>(f);
    switch (attribute) {
    case 0: *v = max_threads(*fn->kernel); break;      // MAX_THREADS_PER_BLOCK
    case 1: *v = fn->kernel->static_shared; break;     // SHARED_SIZE_BYTES (static)
    case 4: *v = fn->kernel->registers; break;         // NUM_REGS
    case 8: *v = fn->max_dynamic_shared; break;        // MAX_DYNAMIC_SHARED_SIZE_BYTES
    default:
        say("cuFuncGetAttribute(%d) is not emulated", attribute);
        return CUDA_ERROR_NOT_SUPPORTED;
    }
    return CUDA_SUCCESS;
}

EXPORT CUresult cuFuncSetAttribute(CUfunction f, int attribute, int value) {
    if (!f) return CUDA_ERROR_INVALID_VALUE;
    Function* fn = static_cast<Function*>(f);
    if (attribute == 8) {
        if (value < 0 || value + fn->kernel->static_shared > MAX_DYNAMIC_SHARED) {
            say("kernel %s: %d bytes of dynamic shared memory and %d static are above the %d a block can have",
                fn->kernel->name, value, fn->kernel->static_shared, MAX_DYNAMIC_SHARED);
            return CUDA_ERROR_INVALID_VALUE;
        }
        fn->max_dynamic_shared = value;
        return CUDA_SUCCESS;
    }
    say("cuFuncSetAttribute(%d) is not emulated", attribute);
    return CUDA_ERROR_NOT_SUPPORTED;
}

EXPORT CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                               unsigned bz, unsigned shared, CUstream, void** params, void** extra) {
    if (!f) return CUDA_ERROR_INVALID_HANDLE;
    return launch(static_cast<Function*>(f), dim3(gx, gy, gz), dim3(bx, by, bz), shared, params, extra);
}

EXPORT CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t n) { return allocate(p, n); }
EXPORT CUresult cuMemAllocAsync(CUdeviceptr* p, size_t n, CUstream) { return allocate(p, n); }
EXPORT CUresult cuMemFree_v2(CUdeviceptr p) { return release(p); }
EXPORT CUresult cuMemFreeAsync(CUdeviceptr p, CUstream) { return release(p); }

// The stream-ordered pool: one per device; only its release threshold can be set (the
// emulator's allocations never outlive their free anyway).
int pool_objects[64];

EXPORT CUresult cuDeviceGetDefaultMemPool(void** pool, CUdevice d) {
    if (!pool) return CUDA_ERROR_INVALID_VALUE;
    if (!valid_device(d)) return CUDA_ERROR_INVALID_DEVICE;
    *pool = &pool_objects[d];
    return CUDA_SUCCESS;
}

EXPORT CUresult cuMemPoolSetAttribute(void* pool, int attribute, void* value) {
    const int* p = static_cast<const int*>(pool);
    if (p < pool_objects || p >= pool_objects + device_count() || !value) return CUDA_ERROR_INVALID_VALUE;
    if (attribute == 4) return CUDA_SUCCESS;  // CU_MEMPOOL_ATTR_RELEASE_THRESHOLD
    say("cuMemPoolSetAttribute(%d) is not emulated", attribute);
    return CUDA_ERROR_NOT_SUPPORTED;
}

// Nothing to trim: a freed allocation is unmapped at once.
EXPORT CUresult cuMemPoolTrimTo(void* pool, size_t) {
    const int* p = static_cast<const int*>(pool);
    if (p < pool_objects || p >= pool_objects + device_count()) return CUDA_ERROR_INVALID_VALUE;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
    if (!free_bytes || !total) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::recursive_mutex> lock(mu);
    *total = TOTAL_MEMORY;
    *free_bytes = TOTAL_MEMORY - in_use;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuMemHostAlloc(void** p, size_t n, unsigned) {
    if (!p) return CUDA_ERROR_INVALID_VALUE;
    *p = malloc(n ? n : 1);
    return *p ? CUDA_SUCCESS : CUDA_ERROR_OUT_OF_MEMORY;
}

EXPORT CUresult cuMemFreeHost(void* p) {
    free(p);
    return CUDA_SUCCESS;
}

EXPORT CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) {
    std::lock_guard<std::recursive_mutex> lock(mu);
    if (CUresult r = check_range("cuMemcpyHtoD destination", dst, n)) return r;
    if (n) memcpy(reinterpret_cast<void*>(dst), src, n);
    return CUDA_SUCCESS;
}
EXPORT CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, CUstream) {
    return cuMemcpyHtoD_v2(dst, src, n);
}

EXPORT CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) {
    std::lock_guard<std::recursive_mutex> lock(mu);
    if (CUresult r = check_range("cuMemcpyDtoH source", src, n)) return r;
    if (n) memcpy(dst, reinterpret_cast<const void*>(src), n);
    return CUDA_SUCCESS;
}
EXPORT CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, CUstream) {
    return cuMemcpyDtoH_v2(dst, src, n);
}

EXPORT CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    std::lock_guard<std::recursive_mutex> lock(mu);
    if (CUresult r = check_range("cuMemcpyDtoD destination", dst, n)) return r;
    if (CUresult r = check_range("cuMemcpyDtoD source", src, n)) return r;
    if (n) memmove(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), n);
    return CUDA_SUCCESS;
}
EXPORT CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream) {
    return cuMemcpyDtoD_v2(dst, src, n);
}

EXPORT CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char v, size_t n) {
    std::lock_guard<std::recursive_mutex> lock(mu);
    if (CUresult r = check_range("cuMemsetD8", dst, n)) return r;
    if (n) memset(reinterpret_cast<void*>(dst), v, n);
    return CUDA_SUCCESS;
}
EXPORT CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, CUstream) {
    return cuMemsetD8_v2(dst, v, n);
}

// cuMemsetD16/D32: `n` words of `v`, at an address aligned to the word as the driver
// requires.
template <typename W> CUresult memset_words(const char* call, CUdeviceptr dst, W v, size_t n) {
    std::lock_guard<std::recursive_mutex> lock(mu);
    if (dst % sizeof(W) != 0) {
        say("%s: 0x%lx is not aligned to its %zu-byte words", call, (unsigned long)dst, sizeof(W));
        return CUDA_ERROR_INVALID_VALUE;
    }
    if (CUresult r = check_range(call, dst, n * sizeof(W))) return r;
    W* p = reinterpret_cast<W*>(dst);
    for (size_t i = 0; i < n; ++i) p[i] = v;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuMemsetD16Async(CUdeviceptr dst, unsigned short v, size_t n, CUstream) {
    return memset_words("cuMemsetD16", dst, v, n);
}
EXPORT CUresult cuMemsetD32Async(CUdeviceptr dst, unsigned v, size_t n, CUstream) {
    return memset_words("cuMemsetD32", dst, v, n);
}

EXPORT CUresult cuStreamCreate(CUstream* s, unsigned) {
    if (!s) return CUDA_ERROR_INVALID_VALUE;
    *s = &stream_object;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuStreamCreateWithPriority(CUstream* s, unsigned flags, int) { return cuStreamCreate(s, flags); }
EXPORT CUresult cuStreamDestroy_v2(CUstream) { return CUDA_SUCCESS; }
EXPORT CUresult cuStreamSynchronize(CUstream) { return CUDA_SUCCESS; }
EXPORT CUresult cuStreamQuery(CUstream) { return CUDA_SUCCESS; }
EXPORT CUresult cuStreamWaitEvent(CUstream, CUevent, unsigned) { return CUDA_SUCCESS; }

EXPORT CUresult cuLaunchHostFunc(CUstream, void (*fn)(void*), void* data) {
    if (!fn) return CUDA_ERROR_INVALID_VALUE;
    fn(data);
    return CUDA_SUCCESS;
}

EXPORT CUresult cuEventCreate(CUevent* e, unsigned) {
    if (!e) return CUDA_ERROR_INVALID_VALUE;
    *e = new Event{now_ms()};
    return CUDA_SUCCESS;
}
EXPORT CUresult cuEventDestroy_v2(CUevent e) {
    delete static_cast<Event*>(e);
    return CUDA_SUCCESS;
}
EXPORT CUresult cuEventRecord(CUevent e, CUstream) {
    if (!e) return CUDA_ERROR_INVALID_HANDLE;
    static_cast<Event*>(e)->ms = now_ms();
    return CUDA_SUCCESS;
}
EXPORT CUresult cuEventSynchronize(CUevent e) { return e ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE; }
EXPORT CUresult cuEventQuery(CUevent e) { return e ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE; }
EXPORT CUresult cuEventElapsedTime(float* ms, CUevent start, CUevent end) {
    if (!ms || !start || !end) return CUDA_ERROR_INVALID_VALUE;
    *ms = float(static_cast<Event*>(end)->ms - static_cast<Event*>(start)->ms);
    return CUDA_SUCCESS;
}
EXPORT CUresult cuEventElapsedTime_v2(float* ms, CUevent start, CUevent end) {
    return cuEventElapsedTime(ms, start, end);
}
