// A CPU stand-in for cuBLASLt (built as libcublasLt.so), used by the test suite to run
// the CUDA backend without a GPU: cudarc dlopen()s it instead of NVIDIA's library when its
// folder is on LD_LIBRARY_PATH. "Device" memory is host memory here (the emulated driver
// allocates it in host mappings), streams are ignored and every call is synchronous.
//
// It implements the part of cuBLASLt's C ABI that the backend uses (descriptors,
// preferences, the algorithm heuristic and cublasLtMatmul), with the ABI of cudarc's
// bindings for CUDA 13.0, and computes
//     D = alpha * op(A) * op(B) + beta * C (+ bias)
// column-major, each dot product accumulated in f32 with fused multiply-adds in k order,
// and rounded once to D's type. It follows cuBLASLt's documented rules rather than what
// any caller happens to need, so that misuse fails here as it would on a GPU, or more
// loudly: every dimension is checked (op(A) m x k, op(B) k x n, C and D m x n, ld >= rows,
// equal batch counts), only the combinations cuBLASLt supports for CUBLAS_COMPUTE_32F are
// accepted (A = B = f32 with C = D = f32; A = B = bf16 with C = D = bf16 or f32; no TF32;
// f32 scale type; host pointer mode; column order; the DEFAULT and BIAS epilogues),
// attribute sizes must match, beta == 0 never reads C, C == D needs identical layouts,
// D may not overlap A, B, or (out of place) C, and every pointer must be aligned as the
// algorithm returned by the heuristic assumed (the preference's MIN_ALIGNMENT_*_BYTES,
// 256 by default). A refusal returns the status cuBLASLt would and prints one line
// starting "tuneloop cuBLASLt emulator:" to stderr saying what is wrong.

#include <cmath>
#include <cstddef>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && !defined(TL_LT_SCALAR)
#include <immintrin.h>
#endif

namespace {

// ---- ABI types (values from cudarc 0.19.10's cublaslt bindings, feature cuda-13000) ----

enum cublasStatus_t : uint32_t {
    CUBLAS_STATUS_SUCCESS = 0,
    CUBLAS_STATUS_NOT_INITIALIZED = 1,
    CUBLAS_STATUS_ALLOC_FAILED = 3,
    CUBLAS_STATUS_INVALID_VALUE = 7,
    CUBLAS_STATUS_ARCH_MISMATCH = 8,
    CUBLAS_STATUS_MAPPING_ERROR = 11,
    CUBLAS_STATUS_EXECUTION_FAILED = 13,
    CUBLAS_STATUS_INTERNAL_ERROR = 14,
    CUBLAS_STATUS_NOT_SUPPORTED = 15,
    CUBLAS_STATUS_LICENSE_ERROR = 16,
};

// cudaDataType_t (only the values this file names).
constexpr uint32_t CUDA_R_32F = 0;
constexpr uint32_t CUDA_R_16BF = 14;

// cublasComputeType_t
constexpr uint32_t CUBLAS_COMPUTE_32F = 68;
constexpr uint32_t CUBLAS_COMPUTE_32F_PEDANTIC = 69;
constexpr uint32_t CUBLAS_COMPUTE_32F_FAST_TF32 = 77;

// cublasOperation_t
constexpr uint32_t CUBLAS_OP_N = 0;
constexpr uint32_t CUBLAS_OP_T = 1;
constexpr uint32_t CUBLAS_OP_C = 2;

// cublasFillMode_t
constexpr uint32_t CUBLAS_FILL_MODE_FULL = 2;

// cublasLtPointerMode_t
constexpr uint32_t CUBLASLT_POINTER_MODE_HOST = 0;

// cublasLtOrder_t
constexpr uint32_t CUBLASLT_ORDER_COL = 0;

// cublasLtEpilogue_t
constexpr uint32_t CUBLASLT_EPILOGUE_DEFAULT = 1;
constexpr uint32_t CUBLASLT_EPILOGUE_BIAS = 4;

// cublasLtBatchMode_t
constexpr uint32_t CUBLASLT_BATCH_MODE_STRIDED = 0;

// cublasLtMatmulSearch_t
constexpr uint32_t CUBLASLT_SEARCH_BEST_FIT = 0;

// cublasLtMatmulMatrixScale_t
constexpr uint32_t CUBLASLT_MATMUL_MATRIX_SCALE_SCALAR_32F = 0;

// cublasLtMatmulDescAttributes_t
enum : uint32_t {
    DESC_COMPUTE_TYPE = 0,
    DESC_SCALE_TYPE = 1,
    DESC_POINTER_MODE = 2,
    DESC_TRANSA = 3,
    DESC_TRANSB = 4,
    DESC_TRANSC = 5,
    DESC_FILL_MODE = 6,
    DESC_EPILOGUE = 7,
    DESC_BIAS_POINTER = 8,
    DESC_BIAS_BATCH_STRIDE = 10,
    DESC_EPILOGUE_AUX_POINTER = 11,
    DESC_EPILOGUE_AUX_LD = 12,
    DESC_EPILOGUE_AUX_BATCH_STRIDE = 13,
    DESC_ALPHA_VECTOR_BATCH_STRIDE = 14,
    DESC_SM_COUNT_TARGET = 15,
    DESC_A_SCALE_POINTER = 17,
    DESC_B_SCALE_POINTER = 18,
    DESC_C_SCALE_POINTER = 19,
    DESC_D_SCALE_POINTER = 20,
    DESC_AMAX_D_POINTER = 21,
    DESC_EPILOGUE_AUX_DATA_TYPE = 22,
    DESC_EPILOGUE_AUX_SCALE_POINTER = 23,
    DESC_EPILOGUE_AUX_AMAX_POINTER = 24,
    DESC_FAST_ACCUM = 25,
    DESC_BIAS_DATA_TYPE = 26,
    DESC_A_SCALE_MODE = 31,
    DESC_B_SCALE_MODE = 32,
    DESC_C_SCALE_MODE = 33,
    DESC_D_SCALE_MODE = 34,
    DESC_EPILOGUE_AUX_SCALE_MODE = 35,
    DESC_D_OUT_SCALE_POINTER = 36,
    DESC_D_OUT_SCALE_MODE = 37,
    DESC_EMULATION_DESCRIPTOR = 38,
    DESC_NATTR = 39,
};

// cublasLtMatrixLayoutAttribute_t
enum : uint32_t {
    LAYOUT_TYPE = 0,
    LAYOUT_ORDER = 1,
    LAYOUT_ROWS = 2,
    LAYOUT_COLS = 3,
    LAYOUT_LD = 4,
    LAYOUT_BATCH_COUNT = 5,
    LAYOUT_STRIDED_BATCH_OFFSET = 6,
    LAYOUT_PLANE_OFFSET = 7,
    LAYOUT_BATCH_MODE = 8,
    LAYOUT_NATTR = 9,
};

// cublasLtMatmulPreferenceAttributes_t
enum : uint32_t {
    PREF_SEARCH_MODE = 0,
    PREF_MAX_WORKSPACE_BYTES = 1,
    PREF_REDUCTION_SCHEME_MASK = 3,
    PREF_MIN_ALIGNMENT_A_BYTES = 5,
    PREF_MIN_ALIGNMENT_B_BYTES = 6,
    PREF_MIN_ALIGNMENT_C_BYTES = 7,
    PREF_MIN_ALIGNMENT_D_BYTES = 8,
    PREF_MAX_WAVES_COUNT = 9,
    PREF_IMPL_MASK = 12,
    PREF_NATTR = 13,
};

// Attribute storage: one 64-bit slot per attribute, with the size (in bytes) that
// cuBLASLt's header gives its type; 0 marks an id the enum does not have.
struct AttrInfo {
    uint8_t size;
    uint64_t dflt;
};

constexpr AttrInfo DESC_ATTRS[DESC_NATTR] = {
    /* 0 COMPUTE_TYPE int32 */ {4, CUBLAS_COMPUTE_32F},
    /* 1 SCALE_TYPE int32 */ {4, CUDA_R_32F},
    /* 2 POINTER_MODE int32 */ {4, CUBLASLT_POINTER_MODE_HOST},
    /* 3 TRANSA int32 */ {4, CUBLAS_OP_N},
    /* 4 TRANSB int32 */ {4, CUBLAS_OP_N},
    /* 5 TRANSC int32 */ {4, CUBLAS_OP_N},
    /* 6 FILL_MODE int32 */ {4, CUBLAS_FILL_MODE_FULL},
    /* 7 EPILOGUE uint32 */ {4, CUBLASLT_EPILOGUE_DEFAULT},
    /* 8 BIAS_POINTER void* */ {8, 0},
    /* 9 (none) */ {0, 0},
    /* 10 BIAS_BATCH_STRIDE int64 */ {8, 0},
    /* 11 EPILOGUE_AUX_POINTER void* */ {8, 0},
    /* 12 EPILOGUE_AUX_LD int64 */ {8, 0},
    /* 13 EPILOGUE_AUX_BATCH_STRIDE int64 */ {8, 0},
    /* 14 ALPHA_VECTOR_BATCH_STRIDE int64 */ {8, 0},
    /* 15 SM_COUNT_TARGET int32 */ {4, 0},
    /* 16 (none) */ {0, 0},
    /* 17 A_SCALE_POINTER void* */ {8, 0},
    /* 18 B_SCALE_POINTER void* */ {8, 0},
    /* 19 C_SCALE_POINTER void* */ {8, 0},
    /* 20 D_SCALE_POINTER void* */ {8, 0},
    /* 21 AMAX_D_POINTER void* */ {8, 0},
    /* 22 EPILOGUE_AUX_DATA_TYPE int32 (-1: D's type) */ {4, 0xFFFFFFFFu},
    /* 23 EPILOGUE_AUX_SCALE_POINTER void* */ {8, 0},
    /* 24 EPILOGUE_AUX_AMAX_POINTER void* */ {8, 0},
    /* 25 FAST_ACCUM int8 */ {1, 0},
    /* 26 BIAS_DATA_TYPE int32 (-1: D's type) */ {4, 0xFFFFFFFFu},
    /* 27..30 (none) */ {0, 0},
    {0, 0},
    {0, 0},
    {0, 0},
    /* 31 A_SCALE_MODE int32 */ {4, CUBLASLT_MATMUL_MATRIX_SCALE_SCALAR_32F},
    /* 32 B_SCALE_MODE int32 */ {4, CUBLASLT_MATMUL_MATRIX_SCALE_SCALAR_32F},
    /* 33 C_SCALE_MODE int32 */ {4, CUBLASLT_MATMUL_MATRIX_SCALE_SCALAR_32F},
    /* 34 D_SCALE_MODE int32 */ {4, CUBLASLT_MATMUL_MATRIX_SCALE_SCALAR_32F},
    /* 35 EPILOGUE_AUX_SCALE_MODE int32 */ {4, CUBLASLT_MATMUL_MATRIX_SCALE_SCALAR_32F},
    /* 36 D_OUT_SCALE_POINTER void* */ {8, 0},
    /* 37 D_OUT_SCALE_MODE int32 */ {4, CUBLASLT_MATMUL_MATRIX_SCALE_SCALAR_32F},
    /* 38 EMULATION_DESCRIPTOR (cublasLtEmulationDesc_t, a pointer) */ {8, 0},
};

constexpr AttrInfo LAYOUT_ATTRS[LAYOUT_NATTR] = {
    /* 0 TYPE uint32 */ {4, 0},
    /* 1 ORDER int32 */ {4, CUBLASLT_ORDER_COL},
    /* 2 ROWS uint64 */ {8, 0},
    /* 3 COLS uint64 */ {8, 0},
    /* 4 LD int64 */ {8, 0},
    /* 5 BATCH_COUNT int32 */ {4, 1},
    /* 6 STRIDED_BATCH_OFFSET int64 */ {8, 0},
    /* 7 PLANE_OFFSET int64 */ {8, 0},
    /* 8 BATCH_MODE int32 */ {4, CUBLASLT_BATCH_MODE_STRIDED},
};

constexpr AttrInfo PREF_ATTRS[PREF_NATTR] = {
    /* 0 SEARCH_MODE uint32 */ {4, CUBLASLT_SEARCH_BEST_FIT},
    /* 1 MAX_WORKSPACE_BYTES uint64 */ {8, 0},
    /* 2 (none) */ {0, 0},
    /* 3 REDUCTION_SCHEME_MASK uint32 */ {4, 7},
    /* 4 (none) */ {0, 0},
    /* 5 MIN_ALIGNMENT_A_BYTES uint32 */ {4, 256},
    /* 6 MIN_ALIGNMENT_B_BYTES uint32 */ {4, 256},
    /* 7 MIN_ALIGNMENT_C_BYTES uint32 */ {4, 256},
    /* 8 MIN_ALIGNMENT_D_BYTES uint32 */ {4, 256},
    /* 9 MAX_WAVES_COUNT float */ {4, 0},
    /* 10, 11 (none) */ {0, 0},
    {0, 0},
    /* 12 IMPL_MASK uint64 */ {8, ~0ull},
};

// ---- Objects behind the opaque handles ----

constexpr uint64_t MAGIC_HANDLE = 0x746c4c7448616e64ull;  // "tlLtHand"
constexpr uint64_t MAGIC_DESC = 0x746c4c7444657363ull;    // "tlLtDesc"
constexpr uint64_t MAGIC_LAYOUT = 0x746c4c744c61796full;  // "tlLtLayo"
constexpr uint64_t MAGIC_PREF = 0x746c4c7450726566ull;    // "tlLtPref"
constexpr uint64_t MAGIC_ALGO = 0x746c4c74416c676full;    // "tlLtAlgo"
constexpr uint64_t MAGIC_DEAD = 0xdeaddeaddeaddeadull;

struct Handle {
    uint64_t magic;
};
struct Desc {
    uint64_t magic;
    uint64_t v[DESC_NATTR];
};
struct Layout {
    uint64_t magic;
    uint64_t v[LAYOUT_NATTR];
};
struct Pref {
    uint64_t magic;
    uint64_t v[PREF_NATTR];
};

// cublasLtMatmulAlgo_t and cublasLtMatmulHeuristicResult_t, laid out as in the bindings.
struct Algo {
    uint64_t data[8];
};
struct HeuristicResult {
    Algo algo;
    size_t workspaceSize;
    cublasStatus_t state;
    float wavesCount;
    int reserved[4];
};
static_assert(sizeof(Algo) == 64, "cublasLtMatmulAlgo_t is 64 bytes");
static_assert(sizeof(HeuristicResult) == 96, "cublasLtMatmulHeuristicResult_t is 96 bytes");
static_assert(offsetof(HeuristicResult, workspaceSize) == 64, "layout");
static_assert(offsetof(HeuristicResult, state) == 72, "layout");
static_assert(offsetof(HeuristicResult, wavesCount) == 76, "layout");
static_assert(offsetof(HeuristicResult, reserved) == 80, "layout");

// What the algorithm records: data[0] the tag, data[1..4] the alignments (bytes) of A, B,
// C, D it was chosen for, data[5] the types, transposes and epilogue of its problem.

// ---- Messages ----

void say(const char* fn, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
void say(const char* fn, const char* fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    // One write, so lines from concurrent threads do not interleave.
    fprintf(stderr, "tuneloop cuBLASLt emulator: %s: %s\n", fn, buf);
}

const char* type_name(uint64_t t) {
    switch (t) {
        case 0: return "CUDA_R_32F";
        case 1: return "CUDA_R_64F";
        case 2: return "CUDA_R_16F";
        case 3: return "CUDA_R_8I";
        case 10: return "CUDA_R_32I";
        case 14: return "CUDA_R_16BF";
        case 28: return "CUDA_R_8F_E4M3";
        case 29: return "CUDA_R_8F_E5M2";
        default: return "another cudaDataType";
    }
}

const char* op_name(uint64_t op) {
    switch (op) {
        case CUBLAS_OP_N: return "N";
        case CUBLAS_OP_T: return "T";
        case CUBLAS_OP_C: return "C";
        default: return "?";
    }
}

size_t elem_size(uint64_t t) { return t == CUDA_R_32F ? 4 : t == CUDA_R_16BF ? 2 : 0; }

// ---- Numbers ----

inline float bf16_to_f32(uint16_t h) {
    uint32_t u = uint32_t(h) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x0040u);  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);                                               // to nearest even
    return uint16_t(u >> 16);
}

inline float load(const void* base, uint64_t type, size_t idx) {
    if (type == CUDA_R_32F) return static_cast<const float*>(base)[idx];
    return bf16_to_f32(static_cast<const uint16_t*>(base)[idx]);
}

inline void store(void* base, uint64_t type, size_t idx, float v) {
    if (type == CUDA_R_32F)
        static_cast<float*>(base)[idx] = v;
    else
        static_cast<uint16_t*>(base)[idx] = f32_to_bf16(v);
}

// ---- Problem validation (shared by the heuristic and the matmul) ----

struct Mat {
    uint64_t type, rows, cols;
    int64_t ld, stride;
    int32_t batch;
};

struct Problem {
    uint64_t m, n, k;
    uint64_t transa, transb;
    Mat a, b, c, d;
    uint64_t epilogue, bias_type;
    int64_t bias_stride;
    int32_t batch;
    uint64_t signature;  // what the algorithm records of the problem
};

bool is_desc(const Desc* d) { return d && d->magic == MAGIC_DESC; }
bool is_layout(const Layout* l) { return l && l->magic == MAGIC_LAYOUT; }

cublasStatus_t check_layout(const char* fn, const char* name, const Layout* l, Mat* out) {
    if (!is_layout(l)) {
        say(fn, "the layout of %s is not a live cublasLtMatrixLayout_t (%p)", name, static_cast<const void*>(l));
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    out->type = l->v[LAYOUT_TYPE] & 0xffffffffu;
    out->rows = l->v[LAYOUT_ROWS];
    out->cols = l->v[LAYOUT_COLS];
    out->ld = int64_t(l->v[LAYOUT_LD]);
    out->batch = int32_t(uint32_t(l->v[LAYOUT_BATCH_COUNT]));
    out->stride = int64_t(l->v[LAYOUT_STRIDED_BATCH_OFFSET]);
    uint32_t order = uint32_t(l->v[LAYOUT_ORDER]);
    if (order != CUBLASLT_ORDER_COL) {
        say(fn, "%s has memory order %u; this emulator supports CUBLASLT_ORDER_COL only", name, order);
        return CUBLAS_STATUS_NOT_SUPPORTED;
    }
    if (l->v[LAYOUT_PLANE_OFFSET] != 0) {
        say(fn, "%s has a planar-complex plane offset; real types only", name);
        return CUBLAS_STATUS_NOT_SUPPORTED;
    }
    if (uint32_t(l->v[LAYOUT_BATCH_MODE]) != CUBLASLT_BATCH_MODE_STRIDED) {
        say(fn, "%s uses batch mode %u; this emulator supports strided batches only", name,
            uint32_t(l->v[LAYOUT_BATCH_MODE]));
        return CUBLAS_STATUS_NOT_SUPPORTED;
    }
    if (out->type != CUDA_R_32F && out->type != CUDA_R_16BF) {
        say(fn, "%s is of type %s (%llu); this emulator supports CUDA_R_32F and CUDA_R_16BF only", name,
            type_name(out->type), static_cast<unsigned long long>(out->type));
        return CUBLAS_STATUS_NOT_SUPPORTED;
    }
    if (out->rows > INT32_MAX || out->cols > INT32_MAX) {
        say(fn, "%s is %llux%llu: a dimension does not fit in int32", name,
            static_cast<unsigned long long>(out->rows), static_cast<unsigned long long>(out->cols));
        return CUBLAS_STATUS_NOT_SUPPORTED;
    }
    uint64_t min_ld = out->rows > 0 ? out->rows : 1;
    if (out->ld < 0 || uint64_t(out->ld) < min_ld) {
        say(fn, "%s is %llux%llu with ld %lld: ld must be >= max(1, rows) = %llu", name,
            static_cast<unsigned long long>(out->rows), static_cast<unsigned long long>(out->cols),
            static_cast<long long>(out->ld), static_cast<unsigned long long>(min_ld));
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    if (out->batch < 1) {
        say(fn, "%s has batch count %d; it must be >= 1", name, out->batch);
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    if (out->batch > 1 && out->stride < 0) {
        say(fn, "%s has a negative batch stride %lld", name, static_cast<long long>(out->stride));
        return CUBLAS_STATUS_NOT_SUPPORTED;
    }
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t validate(const char* fn, const Desc* desc, const Layout* la, const Layout* lb,
                        const Layout* lc, const Layout* ld, Problem* p) {
    if (!is_desc(desc)) {
        say(fn, "the operation descriptor is not a live cublasLtMatmulDesc_t (%p)", static_cast<const void*>(desc));
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    cublasStatus_t s;
    if ((s = check_layout(fn, "A", la, &p->a)) || (s = check_layout(fn, "B", lb, &p->b)) ||
        (s = check_layout(fn, "C", lc, &p->c)) || (s = check_layout(fn, "D", ld, &p->d)))
        return s;

    const uint64_t* v = desc->v;
    uint32_t compute = uint32_t(v[DESC_COMPUTE_TYPE]), scale = uint32_t(v[DESC_SCALE_TYPE]);
    if (compute == CUBLAS_COMPUTE_32F_FAST_TF32) {
        say(fn, "compute type CUBLAS_COMPUTE_32F_FAST_TF32 refused: f32 GEMMs must not use TF32");
        return CUBLAS_STATUS_NOT_SUPPORTED;
    }
    if (compute != CUBLAS_COMPUTE_32F && compute != CUBLAS_COMPUTE_32F_PEDANTIC) {
        say(fn, "compute type %u; this emulator supports CUBLAS_COMPUTE_32F (68) only", compute);
        return CUBLAS_STATUS_NOT_SUPPORTED;
    }
    if (scale != CUDA_R_32F) {
        say(fn, "scale type %s (%u); CUBLAS_COMPUTE_32F needs CUDA_R_32F", type_name(scale), scale);
        return CUBLAS_STATUS_NOT_SUPPORTED;
    }
    uint32_t pm = uint32_t(v[DESC_POINTER_MODE]);
    if (pm != CUBLASLT_POINTER_MODE_HOST) {
        say(fn, "pointer mode %u; this emulator supports CUBLASLT_POINTER_MODE_HOST (alpha and beta on the host) only",
            pm);
        return CUBLAS_STATUS_NOT_SUPPORTED;
    }
    uint32_t ta = uint32_t(v[DESC_TRANSA]), tb = uint32_t(v[DESC_TRANSB]), tc = uint32_t(v[DESC_TRANSC]);
    if (ta > CUBLAS_OP_C || tb > CUBLAS_OP_C) {
        say(fn, "TRANSA = %u, TRANSB = %u: each must be CUBLAS_OP_N, _T or _C", ta, tb);
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    if (tc != CUBLAS_OP_N) {
        say(fn, "TRANSC = %u: cuBLASLt supports CUBLAS_OP_N only", tc);
        return CUBLAS_STATUS_NOT_SUPPORTED;
    }
    if (uint32_t(v[DESC_FILL_MODE]) != CUBLAS_FILL_MODE_FULL) {
        say(fn, "fill mode %u; this emulator supports CUBLAS_FILL_MODE_FULL only", uint32_t(v[DESC_FILL_MODE]));
        return CUBLAS_STATUS_NOT_SUPPORTED;
    }
    static const struct {
        uint32_t id;
        const char* name;
    } fp8_only[] = {{DESC_A_SCALE_POINTER, "A_SCALE_POINTER"},
                    {DESC_B_SCALE_POINTER, "B_SCALE_POINTER"},
                    {DESC_C_SCALE_POINTER, "C_SCALE_POINTER"},
                    {DESC_D_SCALE_POINTER, "D_SCALE_POINTER"},
                    {DESC_AMAX_D_POINTER, "AMAX_D_POINTER"},
                    {DESC_D_OUT_SCALE_POINTER, "D_OUT_SCALE_POINTER"},
                    {DESC_A_SCALE_MODE, "A_SCALE_MODE"},
                    {DESC_B_SCALE_MODE, "B_SCALE_MODE"},
                    {DESC_C_SCALE_MODE, "C_SCALE_MODE"},
                    {DESC_D_SCALE_MODE, "D_SCALE_MODE"},
                    {DESC_D_OUT_SCALE_MODE, "D_OUT_SCALE_MODE"}};
    for (const auto& f : fp8_only) {
        if (v[f.id] != DESC_ATTRS[f.id].dflt) {
            say(fn, "CUBLASLT_MATMUL_DESC_%s is set; this emulator does not support scaled (fp8) GEMMs", f.name);
            return CUBLAS_STATUS_NOT_SUPPORTED;
        }
    }
    p->epilogue = uint32_t(v[DESC_EPILOGUE]);
    if (p->epilogue != CUBLASLT_EPILOGUE_DEFAULT && p->epilogue != CUBLASLT_EPILOGUE_BIAS) {
        say(fn, "epilogue %llu; this emulator supports CUBLASLT_EPILOGUE_DEFAULT (1) and _BIAS (4) only",
            static_cast<unsigned long long>(p->epilogue));
        return CUBLAS_STATUS_NOT_SUPPORTED;
    }

    // Types: what cuBLASLt supports for CUBLAS_COMPUTE_32F with scale type CUDA_R_32F.
    const Mat &A = p->a, &B = p->b, &C = p->c, &D = p->d;
    if (C.type != D.type) {
        say(fn, "C is %s but D is %s: they must have the same type", type_name(C.type), type_name(D.type));
        return CUBLAS_STATUS_NOT_SUPPORTED;
    }
    if (A.type != B.type) {
        say(fn, "A is %s but B is %s: they must have the same type", type_name(A.type), type_name(B.type));
        return CUBLAS_STATUS_NOT_SUPPORTED;
    }
    if (A.type == CUDA_R_32F && D.type != CUDA_R_32F) {
        say(fn, "A and B are CUDA_R_32F but C and D are %s: cuBLASLt has no such combination", type_name(D.type));
        return CUBLAS_STATUS_NOT_SUPPORTED;
    }

    // Dimensions.
    p->transa = ta;
    p->transb = tb;
    bool tA = ta != CUBLAS_OP_N, tB = tb != CUBLAS_OP_N;
    uint64_t am = tA ? A.cols : A.rows, ak = tA ? A.rows : A.cols;
    uint64_t bk = tB ? B.cols : B.rows, bn = tB ? B.rows : B.cols;
    auto ull = [](uint64_t x) { return static_cast<unsigned long long>(x); };
    if (ak != bk) {
        say(fn,
            "op(A) is %llux%llu (A stored %llux%llu, TRANSA=%s) but op(B) is %llux%llu (B stored %llux%llu, "
            "TRANSB=%s): k disagrees (%llu vs %llu)",
            ull(am), ull(ak), ull(A.rows), ull(A.cols), op_name(ta), ull(bk), ull(bn), ull(B.rows), ull(B.cols),
            op_name(tb), ull(ak), ull(bk));
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    if (D.rows != am || D.cols != bn) {
        say(fn,
            "D is %llux%llu but op(A)*op(B) is %llux%llu (op(A) %llux%llu from A stored %llux%llu TRANSA=%s, "
            "op(B) %llux%llu from B stored %llux%llu TRANSB=%s)",
            ull(D.rows), ull(D.cols), ull(am), ull(bn), ull(am), ull(ak), ull(A.rows), ull(A.cols), op_name(ta),
            ull(bk), ull(bn), ull(B.rows), ull(B.cols), op_name(tb));
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    if (C.rows != D.rows || C.cols != D.cols) {
        say(fn, "C is %llux%llu but D is %llux%llu: they must have the same dimensions", ull(C.rows), ull(C.cols),
            ull(D.rows), ull(D.cols));
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    if (A.batch != D.batch || B.batch != D.batch || C.batch != D.batch) {
        say(fn, "batch counts disagree: A %d, B %d, C %d, D %d", A.batch, B.batch, C.batch, D.batch);
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    p->m = am;
    p->n = bn;
    p->k = ak;
    p->batch = D.batch;

    p->bias_type = D.type;
    p->bias_stride = int64_t(v[DESC_BIAS_BATCH_STRIDE]);
    if (p->epilogue == CUBLASLT_EPILOGUE_BIAS) {
        uint32_t bt = uint32_t(v[DESC_BIAS_DATA_TYPE]);
        if (bt != 0xFFFFFFFFu) {
            if (bt != D.type) {
                say(fn, "bias data type %s with D of type %s: this emulator supports a bias of D's type only",
                    type_name(bt), type_name(D.type));
                return CUBLAS_STATUS_NOT_SUPPORTED;
            }
            p->bias_type = bt;
        }
        if (p->batch > 1 && p->bias_stride < 0) {
            say(fn, "negative bias batch stride %lld", static_cast<long long>(p->bias_stride));
            return CUBLAS_STATUS_NOT_SUPPORTED;
        }
    }
    p->signature = (A.type & 0xff) | (B.type & 0xff) << 8 | (C.type & 0xff) << 16 | (D.type & 0xff) << 24 |
                   uint64_t(compute & 0xff) << 32 | uint64_t(ta & 0xf) << 40 | uint64_t(tb & 0xf) << 44 |
                   (p->epilogue & 0xffff) << 48;
    return CUBLAS_STATUS_SUCCESS;
}

// Bytes from a matrix's start to one past its last element (0 when it is empty).
uint64_t extent_bytes(const Mat& m) {
    if (m.rows == 0 || m.cols == 0) return 0;
    uint64_t last = (m.cols - 1) * uint64_t(m.ld) + m.rows;
    if (m.batch > 1) last += uint64_t(m.batch - 1) * uint64_t(m.stride);
    return last * elem_size(m.type);
}

bool overlaps(const void* p, uint64_t np, const void* q, uint64_t nq) {
    if (np == 0 || nq == 0) return false;
    uintptr_t a = reinterpret_cast<uintptr_t>(p), b = reinterpret_cast<uintptr_t>(q);
    return a < b + nq && b < a + np;
}

// ---- The GEMM ----

// acc[j][i] for a block of rows [i0, i0+mb) and columns [j0, j0+nb): the f32 dot products
// of op(A) row i (held in at, p-major: at[p*mb + i]) and op(B) column j (bt[j*k + p]),
// each a chain of fused multiply-adds in p order starting from 0.
constexpr size_t MB = 64;  // rows per block
constexpr size_t NB = 4;   // columns per block

void block_scalar(const float* at, size_t mb, const float* bt, size_t k, size_t nb, float acc[NB][MB]) {
    for (size_t c = 0; c < nb; ++c)
        for (size_t i = 0; i < mb; ++i) acc[c][i] = 0.0f;
    for (size_t p = 0; p < k; ++p) {
        const float* a = at + p * mb;
        for (size_t c = 0; c < nb; ++c) {
            float b = bt[c * k + p];
            for (size_t i = 0; i < mb; ++i) acc[c][i] = std::fma(a[i], b, acc[c][i]);
        }
    }
}

#if defined(__x86_64__) && !defined(TL_LT_SCALAR)
// The same chains, eight rows at a time: an FMA instruction rounds exactly as std::fma.
__attribute__((target("avx2,fma"))) void block_avx2(const float* at, size_t mb, const float* bt, size_t k,
                                                    size_t nb, float acc[NB][MB]) {
    if (mb != MB || nb != NB) {
        block_scalar(at, mb, bt, k, nb, acc);
        return;
    }
    for (size_t i0 = 0; i0 < MB; i0 += 16) {
        __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps();
        __m256 c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps();
        __m256 c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps();
        __m256 c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps();
        const float* b0 = bt;
        const float* b1 = bt + k;
        const float* b2 = bt + 2 * k;
        const float* b3 = bt + 3 * k;
        for (size_t p = 0; p < k; ++p) {
            const float* a = at + p * MB + i0;
            __m256 a0 = _mm256_loadu_ps(a), a1 = _mm256_loadu_ps(a + 8);
            __m256 x = _mm256_broadcast_ss(b0 + p);
            c00 = _mm256_fmadd_ps(a0, x, c00);
            c01 = _mm256_fmadd_ps(a1, x, c01);
            x = _mm256_broadcast_ss(b1 + p);
            c10 = _mm256_fmadd_ps(a0, x, c10);
            c11 = _mm256_fmadd_ps(a1, x, c11);
            x = _mm256_broadcast_ss(b2 + p);
            c20 = _mm256_fmadd_ps(a0, x, c20);
            c21 = _mm256_fmadd_ps(a1, x, c21);
            x = _mm256_broadcast_ss(b3 + p);
            c30 = _mm256_fmadd_ps(a0, x, c30);
            c31 = _mm256_fmadd_ps(a1, x, c31);
        }
        _mm256_storeu_ps(acc[0] + i0, c00);
        _mm256_storeu_ps(acc[0] + i0 + 8, c01);
        _mm256_storeu_ps(acc[1] + i0, c10);
        _mm256_storeu_ps(acc[1] + i0 + 8, c11);
        _mm256_storeu_ps(acc[2] + i0, c20);
        _mm256_storeu_ps(acc[2] + i0 + 8, c21);
        _mm256_storeu_ps(acc[3] + i0, c30);
        _mm256_storeu_ps(acc[3] + i0 + 8, c31);
    }
}

bool have_avx2_fma() {
    static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    return yes;
}
#endif

void block(const float* at, size_t mb, const float* bt, size_t k, size_t nb, float acc[NB][MB]) {
#if defined(__x86_64__) && !defined(TL_LT_SCALAR)
    if (have_avx2_fma()) {
        block_avx2(at, mb, bt, k, nb, acc);
        return;
    }
#endif
    block_scalar(at, mb, bt, k, nb, acc);
}

struct Operands {
    const void *a, *b, *c, *bias;
    void* d;
    float alpha, beta;
};

// A scratch buffer of floats (NULL when the allocation failed).
struct Scratch {
    float* p;
    explicit Scratch(size_t n) : p(static_cast<float*>(malloc((n ? n : 1) * sizeof(float)))) {}
    ~Scratch() { free(p); }
    Scratch(const Scratch&) = delete;
    Scratch& operator=(const Scratch&) = delete;
};

// One batch entry; pointers already offset to it. False when out of memory.
bool gemm(const Problem& pr, const Operands& o) {
    const size_t m = pr.m, n = pr.n, k = pr.k;
    const bool tA = pr.transa != CUBLAS_OP_N, tB = pr.transb != CUBLAS_OP_N;
    const size_t lda = size_t(pr.a.ld), ldb = size_t(pr.b.ld), ldc = size_t(pr.c.ld), ldd = size_t(pr.d.ld);
    // op(B) as f32, column j at bt[j*k + p].
    Scratch bt(n * k), at(k * MB);
    if (!bt.p || !at.p) return false;
    for (size_t j = 0; j < n; ++j)
        for (size_t p = 0; p < k; ++p)
            bt.p[j * k + p] = load(o.b, pr.b.type, tB ? j + p * ldb : p + j * ldb);
    float acc[NB][MB];
    for (size_t i0 = 0; i0 < m; i0 += MB) {
        const size_t mb = m - i0 < MB ? m - i0 : MB;
        // op(A) rows [i0, i0+mb) as f32, p-major.
        for (size_t p = 0; p < k; ++p)
            for (size_t i = 0; i < mb; ++i)
                at.p[p * mb + i] = load(o.a, pr.a.type, tA ? p + (i0 + i) * lda : (i0 + i) + p * lda);
        for (size_t j0 = 0; j0 < n; j0 += NB) {
            const size_t nb = n - j0 < NB ? n - j0 : NB;
            block(at.p, mb, bt.p + j0 * k, k, nb, acc);
            for (size_t c = 0; c < nb; ++c) {
                const size_t j = j0 + c;
                for (size_t i = 0; i < mb; ++i) {
                    float t = o.alpha * acc[c][i];
                    if (o.beta != 0.0f) t = std::fma(o.beta, load(o.c, pr.c.type, (i0 + i) + j * ldc), t);
                    if (o.bias) t += load(o.bias, pr.bias_type, i0 + i);
                    store(o.d, pr.d.type, (i0 + i) + j * ldd, t);
                }
            }
        }
    }
    return true;
}

const void* offset(const void* p, int64_t elems, uint64_t type, int32_t b) {
    return static_cast<const char*>(p) + int64_t(b) * elems * int64_t(elem_size(type));
}

uint32_t pref_align(const Pref* pref, uint32_t attr) {
    uint32_t v = uint32_t(pref ? pref->v[attr] : PREF_ATTRS[attr].dflt);
    return v ? v : 1;
}

// Generic Set/GetAttribute over the tables above.
cublasStatus_t set_attr(const char* fn, const char* what, uint64_t* slots, const AttrInfo* info, uint32_t n,
                        uint32_t attr, const void* buf, size_t size) {
    if (attr >= n || info[attr].size == 0) {
        say(fn, "unknown %s attribute %u", what, attr);
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    if (!buf) {
        say(fn, "%s attribute %u: buf is NULL", what, attr);
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    if (size != info[attr].size) {
        say(fn, "%s attribute %u takes %u bytes, not %zu", what, attr, unsigned(info[attr].size), size);
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    uint64_t v = 0;
    memcpy(&v, buf, size);  // little-endian: the low bytes
    slots[attr] = v;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t get_attr(const char* fn, const char* what, const uint64_t* slots, const AttrInfo* info, uint32_t n,
                        uint32_t attr, void* buf, size_t size, size_t* written) {
    if (attr >= n || info[attr].size == 0) {
        say(fn, "unknown %s attribute %u", what, attr);
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    size_t need = info[attr].size;
    if (size == 0) {
        if (!written) return CUBLAS_STATUS_INVALID_VALUE;
        *written = need;
        return CUBLAS_STATUS_SUCCESS;
    }
    if (!buf || size != need) {
        say(fn, "%s attribute %u takes %zu bytes, not %zu", what, attr, need, size);
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    memcpy(buf, &slots[attr], need);
    if (written) *written = need;
    return CUBLAS_STATUS_SUCCESS;
}

template <class T, size_t N>
T* make(uint64_t magic, const AttrInfo (&info)[N]) {
    T* t = static_cast<T*>(calloc(1, sizeof(T)));
    if (!t) return nullptr;
    t->magic = magic;
    for (size_t i = 0; i < N; ++i) t->v[i] = info[i].dflt;
    return t;
}

template <class T>
cublasStatus_t destroy(const char* fn, T* t, uint64_t magic) {
    if (!t) return CUBLAS_STATUS_SUCCESS;
    if (t->magic != magic) {
        say(fn, "%p is not a live object of this kind (destroyed twice?)", static_cast<void*>(t));
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    t->magic = MAGIC_DEAD;
    free(t);
    return CUBLAS_STATUS_SUCCESS;
}

}  // namespace

// ---- The exported C ABI ----

extern "C" {

typedef Handle* cublasLtHandle_t;
typedef Desc* cublasLtMatmulDesc_t;
typedef Layout* cublasLtMatrixLayout_t;
typedef Pref* cublasLtMatmulPreference_t;
typedef void* cudaStream_t;

__attribute__((visibility("default"))) size_t cublasLtGetVersion(void) { return 130000; }

__attribute__((visibility("default"))) size_t cublasLtGetCudartVersion(void) { return 13000; }

__attribute__((visibility("default"))) cublasStatus_t cublasLtGetProperty(uint32_t type, int* value) {
    if (!value) return CUBLAS_STATUS_INVALID_VALUE;
    switch (type) {  // libraryPropertyType_t: MAJOR_VERSION, MINOR_VERSION, PATCH_LEVEL
        case 0: *value = 13; return CUBLAS_STATUS_SUCCESS;
        case 1: *value = 0; return CUBLAS_STATUS_SUCCESS;
        case 2: *value = 0; return CUBLAS_STATUS_SUCCESS;
        default: return CUBLAS_STATUS_INVALID_VALUE;
    }
}

__attribute__((visibility("default"))) const char* cublasLtGetStatusName(cublasStatus_t status) {
    switch (status) {
        case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
        case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
        case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
        case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
        case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
        case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
        case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
        case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
        case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
        case CUBLAS_STATUS_LICENSE_ERROR: return "CUBLAS_STATUS_LICENSE_ERROR";
    }
    return "CUBLAS_STATUS_UNKNOWN";
}

__attribute__((visibility("default"))) const char* cublasLtGetStatusString(cublasStatus_t status) {
    switch (status) {
        case CUBLAS_STATUS_SUCCESS: return "success";
        case CUBLAS_STATUS_NOT_INITIALIZED: return "the library was not initialized";
        case CUBLAS_STATUS_ALLOC_FAILED: return "the resource allocation failed";
        case CUBLAS_STATUS_INVALID_VALUE: return "an invalid numeric value was used as an argument";
        case CUBLAS_STATUS_ARCH_MISMATCH: return "an absent device architectural feature is required";
        case CUBLAS_STATUS_MAPPING_ERROR: return "an access to GPU memory space failed";
        case CUBLAS_STATUS_EXECUTION_FAILED: return "the GPU program failed to execute";
        case CUBLAS_STATUS_INTERNAL_ERROR: return "an internal operation failed";
        case CUBLAS_STATUS_NOT_SUPPORTED: return "the functionality requested is not supported";
        case CUBLAS_STATUS_LICENSE_ERROR: return "error detected trying to check the license";
    }
    return "unknown error";
}

__attribute__((visibility("default"))) cublasStatus_t cublasLtCreate(cublasLtHandle_t* handle) {
    if (!handle) return CUBLAS_STATUS_INVALID_VALUE;
    Handle* h = static_cast<Handle*>(calloc(1, sizeof(Handle)));
    if (!h) return CUBLAS_STATUS_ALLOC_FAILED;
    h->magic = MAGIC_HANDLE;
    *handle = h;
    return CUBLAS_STATUS_SUCCESS;
}

__attribute__((visibility("default"))) cublasStatus_t cublasLtDestroy(cublasLtHandle_t handle) {
    if (!handle) {
        say("cublasLtDestroy", "handle is NULL");
        return CUBLAS_STATUS_NOT_INITIALIZED;
    }
    if (handle->magic != MAGIC_HANDLE) {
        say("cublasLtDestroy", "%p is not a live cublasLtHandle_t (destroyed twice?)", static_cast<void*>(handle));
        return CUBLAS_STATUS_NOT_INITIALIZED;
    }
    handle->magic = MAGIC_DEAD;
    free(handle);
    return CUBLAS_STATUS_SUCCESS;
}

__attribute__((visibility("default"))) cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t* desc,
                                                                               uint32_t computeType,
                                                                               uint32_t scaleType) {
    if (!desc) return CUBLAS_STATUS_INVALID_VALUE;
    Desc* d = make<Desc>(MAGIC_DESC, DESC_ATTRS);
    if (!d) return CUBLAS_STATUS_ALLOC_FAILED;
    d->v[DESC_COMPUTE_TYPE] = computeType;
    d->v[DESC_SCALE_TYPE] = scaleType;
    *desc = d;
    return CUBLAS_STATUS_SUCCESS;
}

__attribute__((visibility("default"))) cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t desc) {
    return destroy("cublasLtMatmulDescDestroy", desc, MAGIC_DESC);
}

__attribute__((visibility("default"))) cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t desc,
                                                                                     uint32_t attr, const void* buf,
                                                                                     size_t sizeInBytes) {
    static const char fn[] = "cublasLtMatmulDescSetAttribute";
    if (!is_desc(desc)) {
        say(fn, "%p is not a live cublasLtMatmulDesc_t", static_cast<void*>(desc));
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    return set_attr(fn, "matmul descriptor", desc->v, DESC_ATTRS, DESC_NATTR, attr, buf, sizeInBytes);
}

__attribute__((visibility("default"))) cublasStatus_t cublasLtMatmulDescGetAttribute(cublasLtMatmulDesc_t desc,
                                                                                     uint32_t attr, void* buf,
                                                                                     size_t sizeInBytes,
                                                                                     size_t* sizeWritten) {
    static const char fn[] = "cublasLtMatmulDescGetAttribute";
    if (!is_desc(desc)) {
        say(fn, "%p is not a live cublasLtMatmulDesc_t", static_cast<void*>(desc));
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    return get_attr(fn, "matmul descriptor", desc->v, DESC_ATTRS, DESC_NATTR, attr, buf, sizeInBytes, sizeWritten);
}

__attribute__((visibility("default"))) cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t* layout,
                                                                                 uint32_t type, uint64_t rows,
                                                                                 uint64_t cols, int64_t ld) {
    if (!layout) return CUBLAS_STATUS_INVALID_VALUE;
    Layout* l = make<Layout>(MAGIC_LAYOUT, LAYOUT_ATTRS);
    if (!l) return CUBLAS_STATUS_ALLOC_FAILED;
    l->v[LAYOUT_TYPE] = type;
    l->v[LAYOUT_ROWS] = rows;
    l->v[LAYOUT_COLS] = cols;
    l->v[LAYOUT_LD] = uint64_t(ld);
    *layout = l;
    return CUBLAS_STATUS_SUCCESS;
}

__attribute__((visibility("default"))) cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t layout) {
    return destroy("cublasLtMatrixLayoutDestroy", layout, MAGIC_LAYOUT);
}

__attribute__((visibility("default"))) cublasStatus_t cublasLtMatrixLayoutSetAttribute(cublasLtMatrixLayout_t layout,
                                                                                       uint32_t attr,
                                                                                       const void* buf,
                                                                                       size_t sizeInBytes) {
    static const char fn[] = "cublasLtMatrixLayoutSetAttribute";
    if (!is_layout(layout)) {
        say(fn, "%p is not a live cublasLtMatrixLayout_t", static_cast<void*>(layout));
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    return set_attr(fn, "matrix layout", layout->v, LAYOUT_ATTRS, LAYOUT_NATTR, attr, buf, sizeInBytes);
}

__attribute__((visibility("default"))) cublasStatus_t cublasLtMatrixLayoutGetAttribute(cublasLtMatrixLayout_t layout,
                                                                                       uint32_t attr, void* buf,
                                                                                       size_t sizeInBytes,
                                                                                       size_t* sizeWritten) {
    static const char fn[] = "cublasLtMatrixLayoutGetAttribute";
    if (!is_layout(layout)) {
        say(fn, "%p is not a live cublasLtMatrixLayout_t", static_cast<void*>(layout));
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    return get_attr(fn, "matrix layout", layout->v, LAYOUT_ATTRS, LAYOUT_NATTR, attr, buf, sizeInBytes,
                    sizeWritten);
}

__attribute__((visibility("default"))) cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t* pref) {
    if (!pref) return CUBLAS_STATUS_INVALID_VALUE;
    Pref* p = make<Pref>(MAGIC_PREF, PREF_ATTRS);
    if (!p) return CUBLAS_STATUS_ALLOC_FAILED;
    *pref = p;
    return CUBLAS_STATUS_SUCCESS;
}

__attribute__((visibility("default"))) cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t pref) {
    return destroy("cublasLtMatmulPreferenceDestroy", pref, MAGIC_PREF);
}

__attribute__((visibility("default"))) cublasStatus_t cublasLtMatmulPreferenceSetAttribute(
    cublasLtMatmulPreference_t pref, uint32_t attr, const void* buf, size_t sizeInBytes) {
    static const char fn[] = "cublasLtMatmulPreferenceSetAttribute";
    if (!pref || pref->magic != MAGIC_PREF) {
        say(fn, "%p is not a live cublasLtMatmulPreference_t", static_cast<void*>(pref));
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    return set_attr(fn, "matmul preference", pref->v, PREF_ATTRS, PREF_NATTR, attr, buf, sizeInBytes);
}

__attribute__((visibility("default"))) cublasStatus_t cublasLtMatmulPreferenceGetAttribute(
    cublasLtMatmulPreference_t pref, uint32_t attr, void* buf, size_t sizeInBytes, size_t* sizeWritten) {
    static const char fn[] = "cublasLtMatmulPreferenceGetAttribute";
    if (!pref || pref->magic != MAGIC_PREF) {
        say(fn, "%p is not a live cublasLtMatmulPreference_t", static_cast<void*>(pref));
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    return get_attr(fn, "matmul preference", pref->v, PREF_ATTRS, PREF_NATTR, attr, buf, sizeInBytes, sizeWritten);
}

__attribute__((visibility("default"))) cublasStatus_t cublasLtMatmulAlgoGetHeuristic(
    cublasLtHandle_t handle, cublasLtMatmulDesc_t desc, cublasLtMatrixLayout_t Adesc, cublasLtMatrixLayout_t Bdesc,
    cublasLtMatrixLayout_t Cdesc, cublasLtMatrixLayout_t Ddesc, cublasLtMatmulPreference_t pref,
    int requestedAlgoCount, HeuristicResult* results, int* returnAlgoCount) {
    static const char fn[] = "cublasLtMatmulAlgoGetHeuristic";
    if (returnAlgoCount) *returnAlgoCount = 0;
    if (!handle || handle->magic != MAGIC_HANDLE) {
        say(fn, "%p is not a live cublasLtHandle_t", static_cast<void*>(handle));
        return CUBLAS_STATUS_NOT_INITIALIZED;
    }
    if (requestedAlgoCount <= 0 || !results || !returnAlgoCount) {
        say(fn, "requestedAlgoCount %d, results %p, returnAlgoCount %p: need a count > 0 and both pointers",
            requestedAlgoCount, static_cast<void*>(results), static_cast<void*>(returnAlgoCount));
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    if (pref && pref->magic != MAGIC_PREF) {
        say(fn, "%p is not a live cublasLtMatmulPreference_t", static_cast<void*>(pref));
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    Problem pr;
    cublasStatus_t s = validate(fn, desc, Adesc, Bdesc, Cdesc, Ddesc, &pr);
    if (s != CUBLAS_STATUS_SUCCESS) return s;
    if (pref && uint32_t(pref->v[PREF_SEARCH_MODE]) != CUBLASLT_SEARCH_BEST_FIT) {
        say(fn, "search mode %u; this emulator supports CUBLASLT_SEARCH_BEST_FIT only",
            uint32_t(pref->v[PREF_SEARCH_MODE]));
        return CUBLAS_STATUS_NOT_SUPPORTED;
    }
    HeuristicResult& r = results[0];
    memset(&r, 0, sizeof r);
    r.algo.data[0] = MAGIC_ALGO;
    r.algo.data[1] = pref_align(pref, PREF_MIN_ALIGNMENT_A_BYTES);
    r.algo.data[2] = pref_align(pref, PREF_MIN_ALIGNMENT_B_BYTES);
    r.algo.data[3] = pref_align(pref, PREF_MIN_ALIGNMENT_C_BYTES);
    r.algo.data[4] = pref_align(pref, PREF_MIN_ALIGNMENT_D_BYTES);
    r.algo.data[5] = pr.signature;
    r.workspaceSize = 0;
    r.state = CUBLAS_STATUS_SUCCESS;
    r.wavesCount = 1.0f;
    *returnAlgoCount = 1;
    return CUBLAS_STATUS_SUCCESS;
}

__attribute__((visibility("default"))) cublasStatus_t cublasLtMatmul(
    cublasLtHandle_t handle, cublasLtMatmulDesc_t desc, const void* alpha, const void* A,
    cublasLtMatrixLayout_t Adesc, const void* B, cublasLtMatrixLayout_t Bdesc, const void* beta, const void* C,
    cublasLtMatrixLayout_t Cdesc, void* D, cublasLtMatrixLayout_t Ddesc, const Algo* algo, void* workspace,
    size_t workspaceSizeInBytes, cudaStream_t stream) {
    static const char fn[] = "cublasLtMatmul";
    (void)workspace;
    (void)workspaceSizeInBytes;
    (void)stream;
    if (!handle || handle->magic != MAGIC_HANDLE) {
        say(fn, "%p is not a live cublasLtHandle_t", static_cast<void*>(handle));
        return CUBLAS_STATUS_NOT_INITIALIZED;
    }
    Problem pr;
    cublasStatus_t s = validate(fn, desc, Adesc, Bdesc, Cdesc, Ddesc, &pr);
    if (s != CUBLAS_STATUS_SUCCESS) return s;
    if (!alpha || !beta) {
        say(fn, "alpha (%p) or beta (%p) is NULL", alpha, beta);
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    float fa, fb;
    memcpy(&fa, alpha, 4);
    memcpy(&fb, beta, 4);

    // The alignments the algorithm was chosen for (with no algorithm, cuBLASLt runs the
    // heuristic with default preferences: 256 bytes each).
    uint64_t align[4] = {256, 256, 256, 256};
    if (algo) {
        if (algo->data[0] != MAGIC_ALGO) {
            say(fn, "the algorithm was not returned by cublasLtMatmulAlgoGetHeuristic (uninitialized?)");
            return CUBLAS_STATUS_INVALID_VALUE;
        }
        if (algo->data[5] != pr.signature) {
            say(fn,
                "the algorithm was chosen for another problem (types, transposes or epilogue differ: "
                "%#llx vs %#llx)",
                static_cast<unsigned long long>(algo->data[5]), static_cast<unsigned long long>(pr.signature));
            return CUBLAS_STATUS_NOT_SUPPORTED;
        }
        for (int i = 0; i < 4; ++i) align[i] = algo->data[1 + i];
    }

    const bool empty = pr.m == 0 || pr.n == 0;
    const void* bias = nullptr;
    if (pr.epilogue == CUBLASLT_EPILOGUE_BIAS) {
        memcpy(&bias, &desc->v[DESC_BIAS_POINTER], sizeof bias);
        if (!bias) {
            say(fn, "epilogue CUBLASLT_EPILOGUE_BIAS without CUBLASLT_MATMUL_DESC_BIAS_POINTER");
            return CUBLAS_STATUS_INVALID_VALUE;
        }
        if (reinterpret_cast<uintptr_t>(bias) % elem_size(pr.bias_type)) {
            say(fn, "the bias vector at %p is not aligned to its %zu-byte elements", bias, elem_size(pr.bias_type));
            return CUBLAS_STATUS_NOT_SUPPORTED;
        }
    }
    if (fb != 0.0f && !C) {
        say(fn, "C is NULL with beta = %g", double(fb));
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    if (!empty && (!D || (pr.k > 0 && (!A || !B)))) {
        say(fn, "a NULL matrix pointer: A %p, B %p, D %p", A, B, static_cast<void*>(D));
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    const struct {
        const char* name;
        const void* ptr;
        const Mat* mat;
        uint64_t align;
    } mats[4] = {{"A", A, &pr.a, align[0]}, {"B", B, &pr.b, align[1]}, {"C", C, &pr.c, align[2]},
                 {"D", D, &pr.d, align[3]}};
    for (const auto& x : mats) {
        if (!x.ptr) continue;
        uintptr_t addr = reinterpret_cast<uintptr_t>(x.ptr);
        if (addr % x.align) {
            say(fn,
                "%s at %p is not %llu-byte aligned, as the algorithm from cublasLtMatmulAlgoGetHeuristic assumed "
                "(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_%s_BYTES)",
                x.name, x.ptr, static_cast<unsigned long long>(x.align), x.name);
            return CUBLAS_STATUS_NOT_SUPPORTED;
        }
        if (addr % elem_size(x.mat->type)) {
            say(fn, "%s at %p is not aligned to its %zu-byte elements", x.name, x.ptr, elem_size(x.mat->type));
            return CUBLAS_STATUS_NOT_SUPPORTED;
        }
    }
    if (C == D && D) {
        if (pr.c.ld != pr.d.ld || (pr.batch > 1 && pr.c.stride != pr.d.stride)) {
            say(fn, "in place (C == D at %p) needs identical C and D layouts: ld %lld vs %lld, batch stride %lld vs %lld",
                D, static_cast<long long>(pr.c.ld), static_cast<long long>(pr.d.ld),
                static_cast<long long>(pr.c.stride), static_cast<long long>(pr.d.stride));
            return CUBLAS_STATUS_INVALID_VALUE;
        }
    }
    if (empty) return CUBLAS_STATUS_SUCCESS;
    const uint64_t nd = extent_bytes(pr.d);
    if (pr.k > 0 && overlaps(A, extent_bytes(pr.a), D, nd)) {
        say(fn, "D [%p, +%llu bytes) overlaps A at %p", static_cast<void*>(D), static_cast<unsigned long long>(nd), A);
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    if (pr.k > 0 && overlaps(B, extent_bytes(pr.b), D, nd)) {
        say(fn, "D [%p, +%llu bytes) overlaps B at %p", static_cast<void*>(D), static_cast<unsigned long long>(nd), B);
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    if (C && C != D && fb != 0.0f && overlaps(C, extent_bytes(pr.c), D, nd)) {
        say(fn, "D [%p, +%llu bytes) partly overlaps C at %p (in place needs C == D)", static_cast<void*>(D),
            static_cast<unsigned long long>(nd), C);
        return CUBLAS_STATUS_INVALID_VALUE;
    }

    // TUNELOOP_EMU_NO_COMPUTE=1: checked, not computed (see driver.cpp)
    static const bool no_compute = [] {
        const char* v = getenv("TUNELOOP_EMU_NO_COMPUTE");
        return v && strcmp(v, "1") == 0;
    }();
    if (no_compute) return CUBLAS_STATUS_SUCCESS;
    for (int32_t b = 0; b < pr.batch; ++b) {
        Operands o;
        o.a = A ? offset(A, pr.a.stride, pr.a.type, b) : nullptr;
        o.b = B ? offset(B, pr.b.stride, pr.b.type, b) : nullptr;
        o.c = (C && fb != 0.0f) ? offset(C, pr.c.stride, pr.c.type, b) : nullptr;
        o.d = const_cast<void*>(offset(D, pr.d.stride, pr.d.type, b));
        o.bias = bias ? offset(bias, pr.bias_stride, pr.bias_type, b) : nullptr;
        o.alpha = fa;
        o.beta = fb;
        if (!gemm(pr, o)) {
            say(fn, "out of host memory for the f32 copies of op(A) and op(B)");
            return CUBLAS_STATUS_ALLOC_FAILED;
        }
    }
    return CUBLAS_STATUS_SUCCESS;
}

}  // extern "C"
