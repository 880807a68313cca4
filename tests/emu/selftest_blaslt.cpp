// Self-test of the CPU stand-in for cuBLASLt (cublaslt.cpp, built as libcublasLt.so),
// which the test suite uses to run the CUDA backend without a GPU. It dlopen()s the
// library (path in argv[1], default ./libcublasLt.so) through the C ABI alone and checks:
// GEMMs in the four transpose combinations, f32, bf16 and bf16-in/f32-out, odd sizes and
// padded leading dimensions, against a reference in double (within f32 accumulation error)
// and bit for bit against an f32 fused-multiply-add chain in k order; beta = 0 with a
// NaN-filled C, beta = 1 accumulation, the bias epilogue, in place C == D, strided
// batches, round-to-nearest-even to bf16; and the refusals: mismatched dimensions, a small
// ld, misaligned pointers, TF32, device pointer mode, row order, other epilogues, a missing
// bias pointer, unsupported type combinations, wrong attribute sizes and unknown
// attributes. Prints one line per group and exits non-zero on any failure.

#include <dlfcn.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

namespace {

// ABI values (cudarc 0.19.10, cuda-13000).
constexpr uint32_t ST_SUCCESS = 0, ST_INVALID_VALUE = 7, ST_NOT_SUPPORTED = 15;
constexpr uint32_t R_32F = 0, R_16BF = 14;
constexpr uint32_t COMPUTE_32F = 68, COMPUTE_32F_FAST_TF32 = 77;
constexpr uint32_t OP_N = 0, OP_T = 1;
constexpr uint32_t D_POINTER_MODE = 2, D_TRANSA = 3, D_TRANSB = 4, D_EPILOGUE = 7, D_BIAS_POINTER = 8,
                   D_BIAS_BATCH_STRIDE = 10, D_BIAS_DATA_TYPE = 26;
constexpr uint32_t L_ORDER = 1, L_BATCH_COUNT = 5, L_STRIDED_BATCH_OFFSET = 6;
constexpr uint32_t P_MAX_WORKSPACE_BYTES = 1, P_MIN_ALIGNMENT_A_BYTES = 5, P_MIN_ALIGNMENT_B_BYTES = 6,
                   P_MIN_ALIGNMENT_C_BYTES = 7, P_MIN_ALIGNMENT_D_BYTES = 8;
constexpr uint32_t EPI_DEFAULT = 1, EPI_RELU = 2, EPI_BIAS = 4;

struct Algo {
    uint64_t data[8];
};
struct HeuristicResult {
    Algo algo;
    size_t workspaceSize;
    uint32_t state;
    float wavesCount;
    int reserved[4];
};

using H = void*;
struct Api {
    uint32_t (*Create)(H*);
    uint32_t (*Destroy)(H);
    uint32_t (*DescCreate)(H*, uint32_t, uint32_t);
    uint32_t (*DescDestroy)(H);
    uint32_t (*DescSet)(H, uint32_t, const void*, size_t);
    uint32_t (*LayoutCreate)(H*, uint32_t, uint64_t, uint64_t, int64_t);
    uint32_t (*LayoutDestroy)(H);
    uint32_t (*LayoutSet)(H, uint32_t, const void*, size_t);
    uint32_t (*PrefCreate)(H*);
    uint32_t (*PrefDestroy)(H);
    uint32_t (*PrefSet)(H, uint32_t, const void*, size_t);
    uint32_t (*Heuristic)(H, H, H, H, H, H, H, int, HeuristicResult*, int*);
    uint32_t (*Matmul)(H, H, const void*, const void*, H, const void*, H, const void*, const void*, H, void*, H,
                       const Algo*, void*, size_t, void*);
    size_t (*GetVersion)();
    const char* (*StatusName)(uint32_t);
    const char* (*StatusString)(uint32_t);
};
Api api;
H handle;

int failures = 0;
int checks = 0;
#define CHECK(cond, ...)                                   \
    do {                                                   \
        ++checks;                                          \
        if (!(cond)) {                                     \
            ++failures;                                    \
            printf("FAIL %s:%d: ", __FILE__, __LINE__);    \
            printf(__VA_ARGS__);                           \
            printf("\n");                                  \
        }                                                  \
    } while (0)

float bf2f(uint16_t h) {
    uint32_t u = uint32_t(h) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
uint16_t f2bf(float f) {  // independent of the library's: via nextafter-free bit arithmetic
    uint32_t u;
    memcpy(&u, &f, 4);
    if (std::isnan(f)) return uint16_t((u >> 16) | 0x40);
    uint32_t lower = u & 0xffff, upper = u >> 16;
    if (lower > 0x8000 || (lower == 0x8000 && (upper & 1))) ++upper;
    return uint16_t(upper);
}
uint32_t fbits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

// A matrix buffer of either type in 256-byte aligned memory (plus slack to misalign).
struct Buf {
    uint32_t type;
    size_t n;
    char* raw;
    void* p;
    Buf(uint32_t t, size_t count, size_t misalign = 0) : type(t), n(count) {
        size_t bytes = (count + 8) * 4 + 512;
        raw = static_cast<char*>(aligned_alloc(256, (bytes + 255) / 256 * 256));
        p = raw + misalign;
    }
    ~Buf() { free(raw); }
    Buf(const Buf&) = delete;
    Buf& operator=(const Buf&) = delete;
    float get(size_t i) const {
        return type == R_32F ? static_cast<float*>(p)[i] : bf2f(static_cast<uint16_t*>(p)[i]);
    }
    void set(size_t i, float v) {
        if (type == R_32F)
            static_cast<float*>(p)[i] = v;
        else
            static_cast<uint16_t*>(p)[i] = f2bf(v);
    }
    uint32_t bits(size_t i) const {
        return type == R_32F ? fbits(static_cast<float*>(p)[i]) : static_cast<uint16_t*>(p)[i];
    }
};

struct Case {
    uint32_t ab, cd;  // types
    uint32_t ta, tb;
    uint64_t m, n, k;
    int64_t pad_a = 0, pad_b = 0, pad_c = 0, pad_d = 0;  // ld - rows
    float alpha = 1.0f, beta = 0.0f;
    bool bias = false;
    bool in_place = false;
    int32_t batch = 1;
};

const char* tname(uint32_t t) { return t == R_32F ? "f32" : "bf16"; }

struct Plan {
    H desc = nullptr, la = nullptr, lb = nullptr, lc = nullptr, ld = nullptr;
    ~Plan() {
        if (desc) api.DescDestroy(desc);
        for (H l : {la, lb, lc, ld})
            if (l) api.LayoutDestroy(l);
    }
};

uint32_t make_plan(Plan& pl, uint32_t ab, uint32_t cd, uint32_t ta, uint32_t tb, uint64_t ar, uint64_t ac,
                   int64_t lda, uint64_t br, uint64_t bc, int64_t ldb, uint64_t m, uint64_t n, int64_t ldc,
                   int64_t ldd, uint32_t epi) {
    uint32_t s;
    if ((s = api.DescCreate(&pl.desc, COMPUTE_32F, R_32F))) return s;
    if ((s = api.DescSet(pl.desc, D_TRANSA, &ta, 4))) return s;
    if ((s = api.DescSet(pl.desc, D_TRANSB, &tb, 4))) return s;
    if ((s = api.DescSet(pl.desc, D_EPILOGUE, &epi, 4))) return s;
    if ((s = api.LayoutCreate(&pl.la, ab, ar, ac, lda))) return s;
    if ((s = api.LayoutCreate(&pl.lb, ab, br, bc, ldb))) return s;
    if ((s = api.LayoutCreate(&pl.lc, cd, m, n, ldc))) return s;
    if ((s = api.LayoutCreate(&pl.ld, cd, m, n, ldd))) return s;
    return ST_SUCCESS;
}

uint32_t heuristic(const Plan& pl, H pref, HeuristicResult* r, int* count) {
    return api.Heuristic(handle, pl.desc, pl.la, pl.lb, pl.lc, pl.ld, pref, 1, r, count);
}

std::mt19937 rng(12345);
float rnd() { return std::uniform_real_distribution<float>(-2.0f, 2.0f)(rng); }

// Runs one case; returns the number of element mismatches.
void run_case(const Case& c) {
    const bool tA = c.ta == OP_T, tB = c.tb == OP_T;
    const uint64_t ar = tA ? c.k : c.m, ac = tA ? c.m : c.k;
    const uint64_t br = tB ? c.n : c.k, bc = tB ? c.k : c.n;
    const int64_t lda = int64_t(ar ? ar : 1) + c.pad_a, ldb = int64_t(br ? br : 1) + c.pad_b;
    const int64_t ldc = int64_t(c.m) + (c.in_place ? c.pad_d : c.pad_c), ldd = int64_t(c.m) + c.pad_d;
    const int64_t sa = lda * int64_t(ac) + 5, sb = ldb * int64_t(bc) + 3;
    const int64_t sc = ldc * int64_t(c.n) + 7, sd = c.in_place ? sc : ldd * int64_t(c.n) + 2;
    const int64_t sbias = int64_t(c.m) + 1;
    const int32_t nb = c.batch;

    Buf A(c.ab, size_t(sa * nb)), B(c.ab, size_t(sb * nb)), C(c.cd, size_t(sc * nb)), Dbuf(c.cd, size_t(sd * nb));
    Buf bias(c.cd, size_t(sbias * nb));
    for (size_t i = 0; i < A.n; ++i) A.set(i, rnd());
    for (size_t i = 0; i < B.n; ++i) B.set(i, rnd());
    for (size_t i = 0; i < C.n; ++i) C.set(i, c.beta == 0.0f ? NAN : rnd());
    for (size_t i = 0; i < Dbuf.n; ++i) Dbuf.set(i, -768.0f);
    for (size_t i = 0; i < bias.n; ++i) bias.set(i, rnd());
    Buf& D = c.in_place ? C : Dbuf;
    std::vector<float> c_orig(C.n);
    for (size_t i = 0; i < C.n; ++i) c_orig[i] = C.get(i);

    Plan pl;
    uint32_t s = make_plan(pl, c.ab, c.cd, c.ta, c.tb, ar, ac, lda, br, bc, ldb, c.m, c.n, ldc, ldd,
                           c.bias ? EPI_BIAS : EPI_DEFAULT);
    CHECK(s == ST_SUCCESS, "plan: status %u", s);
    if (c.bias) {
        uint32_t bt = c.cd;
        s = api.DescSet(pl.desc, D_BIAS_DATA_TYPE, &bt, 4);
        CHECK(s == ST_SUCCESS, "BIAS_DATA_TYPE %u", s);
        uint64_t bp = reinterpret_cast<uint64_t>(bias.p);
        s = api.DescSet(pl.desc, D_BIAS_POINTER, &bp, 8);
        CHECK(s == ST_SUCCESS, "BIAS_POINTER %u", s);
        if (nb > 1) {
            int64_t st = sbias;
            s = api.DescSet(pl.desc, D_BIAS_BATCH_STRIDE, &st, 8);
            CHECK(s == ST_SUCCESS, "BIAS_BATCH_STRIDE %u", s);
        }
    }
    if (nb > 1) {
        const struct {
            H l;
            int64_t stride;
        } ls[4] = {{pl.la, sa}, {pl.lb, sb}, {pl.lc, sc}, {pl.ld, sd}};
        for (auto& x : ls) {
            CHECK(api.LayoutSet(x.l, L_BATCH_COUNT, &nb, 4) == ST_SUCCESS, "BATCH_COUNT");
            CHECK(api.LayoutSet(x.l, L_STRIDED_BATCH_OFFSET, &x.stride, 8) == ST_SUCCESS, "STRIDED_BATCH_OFFSET");
        }
    }
    H pref;
    CHECK(api.PrefCreate(&pref) == ST_SUCCESS, "PrefCreate");
    uint64_t ws = 32 << 20;
    CHECK(api.PrefSet(pref, P_MAX_WORKSPACE_BYTES, &ws, 8) == ST_SUCCESS, "MAX_WORKSPACE_BYTES");
    HeuristicResult r;
    memset(&r, 0xab, sizeof r);
    int count = -1;
    s = heuristic(pl, pref, &r, &count);
    api.PrefDestroy(pref);
    CHECK(s == ST_SUCCESS && count == 1 && r.state == ST_SUCCESS && r.workspaceSize == 0 && r.wavesCount == 1.0f,
          "heuristic: status %u count %d state %u ws %zu waves %g", s, count, r.state, r.workspaceSize,
          double(r.wavesCount));
    std::vector<char> workspace(64);
    s = api.Matmul(handle, pl.desc, &c.alpha, A.p, pl.la, B.p, pl.lb, &c.beta, C.p, pl.lc, D.p, pl.ld, &r.algo,
                   workspace.data(), workspace.size(), nullptr);
    CHECK(s == ST_SUCCESS, "matmul status %u (%s)", s, api.StatusName(s));
    if (s != ST_SUCCESS) return;

    int bad_exact = 0, bad_ref = 0, bad_untouched = 0;
    double worst = 0;
    for (int32_t b = 0; b < nb; ++b) {
        for (uint64_t j = 0; j < c.n; ++j) {
            for (uint64_t i = 0; i < c.m; ++i) {
                // f32 FMA chain in k order, then alpha, beta*C, bias, one rounding.
                float acc = 0.0f;
                double ref = 0.0, mag = 0.0;
                for (uint64_t p = 0; p < c.k; ++p) {
                    float a = A.get(size_t(b * sa) + (tA ? p + i * lda : i + p * lda));
                    float bv = B.get(size_t(b * sb) + (tB ? j + p * ldb : p + j * ldb));
                    acc = std::fma(a, bv, acc);
                    ref += double(a) * double(bv);
                    mag += std::fabs(double(a) * double(bv));
                }
                float t = c.alpha * acc;
                ref *= c.alpha;
                mag *= std::fabs(c.alpha);
                if (c.beta != 0.0f) {
                    float cv = c_orig[size_t(b * sc) + i + j * ldc];
                    t = std::fma(c.beta, cv, t);
                    ref += double(c.beta) * cv;
                    mag += std::fabs(double(c.beta) * cv);
                }
                if (c.bias) {
                    float bv = bias.get(size_t(b * sbias) + i);
                    t += bv;
                    ref += bv;
                    mag += std::fabs(bv);
                }
                size_t di = size_t(b * sd) + i + j * ldd;
                uint32_t want = c.cd == R_32F ? fbits(t) : f2bf(t);
                if (D.bits(di) != want) ++bad_exact;
                double got = D.get(di);
                double tol = (double(c.k) + 4) * std::ldexp(mag, -24) + (c.cd == R_16BF ? std::ldexp(std::fabs(ref), -8) : 0) + 1e-30;
                double err = std::fabs(got - ref);
                if (!(err <= tol)) ++bad_ref;
                if (tol > 0 && err / tol > worst) worst = err / tol;
            }
            // padding rows of D untouched
            for (int64_t i = int64_t(c.m); i < ldd && !c.in_place; ++i)
                if (D.get(size_t(b * sd) + size_t(i) + j * ldd) != -768.0f) ++bad_untouched;
        }
    }
    CHECK(bad_exact == 0 && bad_ref == 0 && bad_untouched == 0,
          "%s->%s op(A)=%s op(B)=%s m=%llu n=%llu k=%llu alpha=%g beta=%g bias=%d in_place=%d batch=%d: %d not "
          "bit-exact, %d outside the f32 error bound (worst %.2f of it), %d padding elements written",
          tname(c.ab), tname(c.cd), c.ta ? "T" : "N", c.tb ? "T" : "N", (unsigned long long)c.m,
          (unsigned long long)c.n, (unsigned long long)c.k, double(c.alpha), double(c.beta), c.bias, c.in_place,
          c.batch, bad_exact, bad_ref, worst, bad_untouched);
}

void group(const char* name, int before_fail, int before_checks) {
    printf("%-58s %s (%d checks)\n", name, failures == before_fail ? "ok" : "FAILED", checks - before_checks);
}

#define GROUP(name, ...)                  \
    do {                                  \
        int f0 = failures, c0 = checks;   \
        __VA_ARGS__;                      \
        group(name, f0, c0);              \
    } while (0)

// A minimal valid f32 problem (m x n = op(A) m x k * op(B) k x n) for the refusal tests.
struct Simple {
    Plan pl;
    Buf A, B, C, D;
    HeuristicResult r{};
    int count = 0;
    float alpha = 1.0f, beta = 0.0f;
    Simple(uint64_t m, uint64_t n, uint64_t k, size_t mis_a = 0)
        : A(R_32F, m * k, mis_a), B(R_32F, k * n), C(R_32F, m * n), D(R_32F, m * n) {
        make_plan(pl, R_32F, R_32F, OP_N, OP_N, m, k, int64_t(m), k, n, int64_t(k), m, n, int64_t(m), int64_t(m),
                  EPI_DEFAULT);
        for (size_t i = 0; i < A.n; ++i) A.set(i, 1.0f);
        for (size_t i = 0; i < B.n; ++i) B.set(i, 1.0f);
    }
    uint32_t heur(H pref = nullptr) { return heuristic(pl, pref, &r, &count); }
    uint32_t mm(const Algo* algo) {
        return api.Matmul(handle, pl.desc, &alpha, A.p, pl.la, B.p, pl.lb, &beta, C.p, pl.lc, D.p, pl.ld, algo,
                          nullptr, 0, nullptr);
    }
};

template <class F>
void load_sym(void* lib, F& f, const char* name) {
    void* s = dlsym(lib, name);
    if (!s) {
        printf("missing symbol %s\n", name);
        exit(2);
    }
    memcpy(&f, &s, sizeof s);
}

}  // namespace

int main(int argc, char** argv) {
    setvbuf(stdout, nullptr, _IOLBF, 0);  // keep stdout in order with the library's stderr lines
    const char* path = argc > 1 ? argv[1] : "./libcublasLt.so";
    void* lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        printf("dlopen %s: %s\n", path, dlerror());
        return 2;
    }
    load_sym(lib, api.Create, "cublasLtCreate");
    load_sym(lib, api.Destroy, "cublasLtDestroy");
    load_sym(lib, api.DescCreate, "cublasLtMatmulDescCreate");
    load_sym(lib, api.DescDestroy, "cublasLtMatmulDescDestroy");
    load_sym(lib, api.DescSet, "cublasLtMatmulDescSetAttribute");
    load_sym(lib, api.LayoutCreate, "cublasLtMatrixLayoutCreate");
    load_sym(lib, api.LayoutDestroy, "cublasLtMatrixLayoutDestroy");
    load_sym(lib, api.LayoutSet, "cublasLtMatrixLayoutSetAttribute");
    load_sym(lib, api.PrefCreate, "cublasLtMatmulPreferenceCreate");
    load_sym(lib, api.PrefDestroy, "cublasLtMatmulPreferenceDestroy");
    load_sym(lib, api.PrefSet, "cublasLtMatmulPreferenceSetAttribute");
    load_sym(lib, api.Heuristic, "cublasLtMatmulAlgoGetHeuristic");
    load_sym(lib, api.Matmul, "cublasLtMatmul");
    load_sym(lib, api.GetVersion, "cublasLtGetVersion");
    load_sym(lib, api.StatusName, "cublasLtGetStatusName");
    load_sym(lib, api.StatusString, "cublasLtGetStatusString");
    printf("cublasLtGetVersion() = %zu; status 15 = %s (%s)\n", api.GetVersion(), api.StatusName(15),
           api.StatusString(15));
    if (api.Create(&handle) != ST_SUCCESS) {
        printf("cublasLtCreate failed\n");
        return 1;
    }

    const uint32_t types[3][2] = {{R_32F, R_32F}, {R_16BF, R_16BF}, {R_16BF, R_32F}};
    const uint64_t sizes[][3] = {{7, 13, 5}, {1, 1, 1}, {64, 4, 3}, {70, 9, 33}, {130, 17, 200}, {5, 3, 0}};
    GROUP("4 transposes x 3 type combos x 6 sizes, beta 0 (C NaN)", {
        for (auto& t : types)
            for (uint32_t ta : {OP_N, OP_T})
                for (uint32_t tb : {OP_N, OP_T})
                    for (auto& sz : sizes) {
                        Case c{t[0], t[1], ta, tb, sz[0], sz[1], sz[2]};
                        c.alpha = 1.5f;
                        run_case(c);
                    }
    });
    GROUP("beta 1 (accumulate) and beta 0.5, padded ld", {
        for (auto& t : types)
            for (uint32_t ta : {OP_N, OP_T})
                for (uint32_t tb : {OP_N, OP_T})
                    for (float beta : {1.0f, 0.5f}) {
                        Case c{t[0], t[1], ta, tb, 7, 13, 5, 3, 1, 2, 5};
                        c.beta = beta;
                        c.alpha = -0.75f;
                        run_case(c);
                        Case d{t[0], t[1], ta, tb, 67, 10, 19, 0, 2, 0, 1};
                        d.beta = beta;
                        run_case(d);
                    }
    });
    GROUP("bias epilogue (beta 0 and 1)", {
        for (auto& t : types)
            for (uint32_t ta : {OP_N, OP_T})
                for (uint32_t tb : {OP_N, OP_T})
                    for (float beta : {0.0f, 1.0f}) {
                        Case c{t[0], t[1], ta, tb, 7, 13, 5};
                        c.beta = beta;
                        c.bias = true;
                        run_case(c);
                        Case d{t[0], t[1], ta, tb, 72, 8, 40, 1, 0, 0, 0};
                        d.beta = beta;
                        d.bias = true;
                        run_case(d);
                    }
    });
    GROUP("in place C == D (beta 0, 1; bias)", {
        for (auto& t : types)
            for (float beta : {0.0f, 1.0f}) {
                Case c{t[0], t[1], OP_N, OP_T, 7, 13, 5, 0, 0, 2, 2};
                c.beta = beta;
                c.in_place = true;
                run_case(c);
                c.bias = true;
                run_case(c);
                Case d{t[0], t[1], OP_T, OP_N, 65, 6, 9};
                d.beta = beta;
                d.in_place = true;
                run_case(d);
            }
    });
    GROUP("strided batches (3), with per-batch bias", {
        for (auto& t : types) {
            Case c{t[0], t[1], OP_T, OP_N, 7, 13, 5, 1, 1, 1, 1};
            c.batch = 3;
            c.beta = 1.0f;
            run_case(c);
            c.bias = true;
            c.beta = 0.0f;
            run_case(c);
        }
    });

    GROUP("bf16 rounding: ties to even, NaN stays NaN", {
        // D = a*b with bf16 a, b and D: 1.0078125 * 1.5 = 1.51171875, halfway between
        // bf16 1.5078125 and 1.515625 -> even mantissa 1.515625; -(that) -> -1.515625;
        // 1.0078125 * 1.0078125 = 1.01568603515625 -> 1.015625 (below the halfway point).
        const float as[4] = {1.0078125f, -1.0078125f, 1.0078125f, NAN};
        const float bs[4] = {1.5f, 1.5f, 1.0078125f, 1.0f};
        const float want[4] = {1.515625f, -1.515625f, 1.015625f, NAN};
        for (int i = 0; i < 4; ++i) {
            Plan pl;
            make_plan(pl, R_16BF, R_16BF, OP_N, OP_N, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, EPI_DEFAULT);
            Buf A(R_16BF, 1), B(R_16BF, 1), D(R_16BF, 1);
            A.set(0, as[i]);
            B.set(0, bs[i]);
            HeuristicResult r;
            int n;
            CHECK(heuristic(pl, nullptr, &r, &n) == ST_SUCCESS, "heuristic");
            float alpha = 1, beta = 0;
            CHECK(api.Matmul(handle, pl.desc, &alpha, A.p, pl.la, B.p, pl.lb, &beta, nullptr, pl.lc, D.p, pl.ld,
                             &r.algo, nullptr, 0, nullptr) == ST_SUCCESS,
                  "matmul");
            float got = D.get(0);
            CHECK(std::isnan(want[i]) ? std::isnan(got) : got == want[i], "case %d: got %.9g want %.9g", i,
                  double(got), double(want[i]));
        }
    });

    printf("-- refusals (each prints its own emulator line to stderr) --\n");
    fflush(stdout);
    GROUP("dimension mismatch: k, D rows, C vs D, batch, ld < rows", {
        {  // op(A) 7x5, op(B) 4x13
            Plan pl;
            make_plan(pl, R_32F, R_32F, OP_N, OP_N, 7, 5, 7, 4, 13, 4, 7, 13, 7, 7, EPI_DEFAULT);
            HeuristicResult r;
            int n = 5;
            CHECK(heuristic(pl, nullptr, &r, &n) == ST_INVALID_VALUE && n == 0, "k mismatch in heuristic");
            Simple s(7, 13, 5);
            CHECK(s.heur() == ST_SUCCESS, "simple heuristic");
            float alpha = 1, beta = 0;
            CHECK(api.Matmul(handle, pl.desc, &alpha, s.A.p, pl.la, s.B.p, pl.lb, &beta, s.C.p, pl.lc, s.D.p, pl.ld,
                             &s.r.algo, nullptr, 0, nullptr) == ST_INVALID_VALUE,
                  "k mismatch in matmul");
        }
        {  // transposes make the shapes disagree: A 7x5 with TRANSA=T is 5x7
            Plan pl;
            make_plan(pl, R_32F, R_32F, OP_T, OP_N, 7, 5, 7, 5, 13, 5, 7, 13, 7, 7, EPI_DEFAULT);
            HeuristicResult r;
            int n;
            CHECK(heuristic(pl, nullptr, &r, &n) == ST_INVALID_VALUE, "transposed k mismatch");
        }
        {  // D 8x13 for a 7x13 product
            Plan pl;
            make_plan(pl, R_32F, R_32F, OP_N, OP_N, 7, 5, 7, 5, 13, 5, 8, 13, 8, 8, EPI_DEFAULT);
            HeuristicResult r;
            int n;
            CHECK(heuristic(pl, nullptr, &r, &n) == ST_INVALID_VALUE, "D rows mismatch");
        }
        {  // C 7x12 vs D 7x13
            Plan pl;
            make_plan(pl, R_32F, R_32F, OP_N, OP_N, 7, 5, 7, 5, 13, 5, 7, 13, 7, 7, EPI_DEFAULT);
            api.LayoutDestroy(pl.lc);
            api.LayoutCreate(&pl.lc, R_32F, 7, 12, 7);
            HeuristicResult r;
            int n;
            CHECK(heuristic(pl, nullptr, &r, &n) == ST_INVALID_VALUE, "C vs D mismatch");
        }
        {  // batch counts differ
            Plan pl;
            make_plan(pl, R_32F, R_32F, OP_N, OP_N, 7, 5, 7, 5, 13, 5, 7, 13, 7, 7, EPI_DEFAULT);
            int32_t two = 2;
            api.LayoutSet(pl.la, L_BATCH_COUNT, &two, 4);
            HeuristicResult r;
            int n;
            CHECK(heuristic(pl, nullptr, &r, &n) == ST_INVALID_VALUE, "batch mismatch");
        }
        {  // ld 6 < rows 7
            Plan pl;
            make_plan(pl, R_32F, R_32F, OP_N, OP_N, 7, 5, 6, 5, 13, 5, 7, 13, 7, 7, EPI_DEFAULT);
            HeuristicResult r;
            int n;
            CHECK(heuristic(pl, nullptr, &r, &n) == ST_INVALID_VALUE, "ld < rows");
        }
    });
    GROUP("alignment: default 256 refuses A+4; MIN_ALIGNMENT 4 accepts", {
        Simple s(8, 8, 8, 4);
        CHECK(s.heur() == ST_SUCCESS, "heuristic");
        CHECK(s.r.algo.data[1] == 256 && s.r.algo.data[4] == 256, "algo alignments %llu %llu",
              (unsigned long long)s.r.algo.data[1], (unsigned long long)s.r.algo.data[4]);
        CHECK(s.mm(&s.r.algo) == ST_NOT_SUPPORTED, "misaligned A accepted");
        CHECK(s.mm(nullptr) == ST_NOT_SUPPORTED, "misaligned A accepted with algo NULL");
        H pref;
        api.PrefCreate(&pref);
        uint32_t four = 4;
        for (uint32_t a : {P_MIN_ALIGNMENT_A_BYTES, P_MIN_ALIGNMENT_B_BYTES, P_MIN_ALIGNMENT_C_BYTES,
                           P_MIN_ALIGNMENT_D_BYTES})
            CHECK(api.PrefSet(pref, a, &four, 4) == ST_SUCCESS, "MIN_ALIGNMENT");
        CHECK(s.heur(pref) == ST_SUCCESS, "heuristic with pref");
        api.PrefDestroy(pref);
        CHECK(s.mm(&s.r.algo) == ST_SUCCESS, "4-byte aligned A refused under MIN_ALIGNMENT 4");
        CHECK(s.D.get(0) == 8.0f && s.D.get(63) == 8.0f, "result %g", double(s.D.get(0)));
        Simple t(8, 8, 8);  // D misaligned by 2 bytes: not even element-aligned
        H pref2;
        api.PrefCreate(&pref2);
        uint32_t one = 1;
        api.PrefSet(pref2, P_MIN_ALIGNMENT_D_BYTES, &one, 4);
        CHECK(t.heur(pref2) == ST_SUCCESS, "heuristic");
        api.PrefDestroy(pref2);
        void* saved = t.D.p;
        t.D.p = static_cast<char*>(t.D.p) + 2;
        CHECK(t.mm(&t.r.algo) == ST_NOT_SUPPORTED, "D not element-aligned accepted");
        t.D.p = saved;
        CHECK(t.mm(&t.r.algo) == ST_SUCCESS, "aligned D refused");
    });
    GROUP("TF32, device pointer mode, row order, RELU, types", {
        {
            Simple s(4, 4, 4);
            H d;
            api.DescCreate(&d, COMPUTE_32F_FAST_TF32, R_32F);
            HeuristicResult r;
            int n;
            CHECK(api.Heuristic(handle, d, s.pl.la, s.pl.lb, s.pl.lc, s.pl.ld, nullptr, 1, &r, &n) ==
                      ST_NOT_SUPPORTED,
                  "TF32 accepted");
            api.DescDestroy(d);
        }
        {
            Simple s(4, 4, 4);
            uint32_t dev = 1;
            CHECK(api.DescSet(s.pl.desc, D_POINTER_MODE, &dev, 4) == ST_SUCCESS, "POINTER_MODE set");
            CHECK(s.heur() == ST_NOT_SUPPORTED, "device pointer mode accepted");
        }
        {
            Simple s(4, 4, 4);
            int32_t row = 1;
            CHECK(api.LayoutSet(s.pl.lb, L_ORDER, &row, 4) == ST_SUCCESS, "ORDER set");
            CHECK(s.heur() == ST_NOT_SUPPORTED, "row order accepted");
        }
        {
            Simple s(4, 4, 4);
            uint32_t relu = EPI_RELU;
            CHECK(api.DescSet(s.pl.desc, D_EPILOGUE, &relu, 4) == ST_SUCCESS, "EPILOGUE set");
            CHECK(s.heur() == ST_NOT_SUPPORTED, "RELU accepted");
        }
        {  // f32 A/B with bf16 C/D; bf16 A with f32 B; C type != D type
            const uint32_t combos[3][4] = {
                {R_32F, R_32F, R_16BF, R_16BF}, {R_16BF, R_32F, R_32F, R_32F}, {R_16BF, R_16BF, R_32F, R_16BF}};
            for (auto& t : combos) {
                Plan pl;
                api.DescCreate(&pl.desc, COMPUTE_32F, R_32F);
                api.LayoutCreate(&pl.la, t[0], 4, 4, 4);
                api.LayoutCreate(&pl.lb, t[1], 4, 4, 4);
                api.LayoutCreate(&pl.lc, t[2], 4, 4, 4);
                api.LayoutCreate(&pl.ld, t[3], 4, 4, 4);
                HeuristicResult r;
                int n;
                CHECK(heuristic(pl, nullptr, &r, &n) == ST_NOT_SUPPORTED, "types %u %u %u %u accepted", t[0], t[1],
                      t[2], t[3]);
            }
            Plan pl;  // f64 scale type
            api.DescCreate(&pl.desc, COMPUTE_32F, 1);
            api.LayoutCreate(&pl.la, R_32F, 4, 4, 4);
            api.LayoutCreate(&pl.lb, R_32F, 4, 4, 4);
            api.LayoutCreate(&pl.lc, R_32F, 4, 4, 4);
            api.LayoutCreate(&pl.ld, R_32F, 4, 4, 4);
            HeuristicResult r;
            int n;
            CHECK(heuristic(pl, nullptr, &r, &n) == ST_NOT_SUPPORTED, "f64 scale type accepted");
        }
    });
    GROUP("bias epilogue without a bias pointer; f32 bias on bf16 D", {
        Simple s(4, 4, 4);
        uint32_t epi = EPI_BIAS;
        api.DescSet(s.pl.desc, D_EPILOGUE, &epi, 4);
        CHECK(s.heur() == ST_SUCCESS, "heuristic (the pointer is set later)");
        CHECK(s.mm(&s.r.algo) == ST_INVALID_VALUE, "missing bias pointer accepted");
        Plan pl;
        make_plan(pl, R_16BF, R_16BF, OP_N, OP_N, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, EPI_BIAS);
        uint32_t f32 = R_32F;
        api.DescSet(pl.desc, D_BIAS_DATA_TYPE, &f32, 4);
        HeuristicResult r;
        int n;
        CHECK(heuristic(pl, nullptr, &r, &n) == ST_NOT_SUPPORTED, "f32 bias with bf16 D accepted");
    });
    GROUP("attributes: wrong sizes, unknown ids, NULL buf", {
        Simple s(4, 4, 4);
        uint64_t big = 1;
        uint32_t small = 1;
        CHECK(api.DescSet(s.pl.desc, D_TRANSA, &big, 8) == ST_INVALID_VALUE, "TRANSA with 8 bytes");
        CHECK(api.DescSet(s.pl.desc, D_BIAS_POINTER, &small, 4) == ST_INVALID_VALUE, "BIAS_POINTER with 4 bytes");
        CHECK(api.DescSet(s.pl.desc, 9, &small, 4) == ST_INVALID_VALUE, "desc attribute 9");
        CHECK(api.DescSet(s.pl.desc, 999, &small, 4) == ST_INVALID_VALUE, "desc attribute 999");
        CHECK(api.DescSet(s.pl.desc, D_TRANSA, nullptr, 4) == ST_INVALID_VALUE, "NULL buf");
        CHECK(api.LayoutSet(s.pl.la, L_BATCH_COUNT, &big, 8) == ST_INVALID_VALUE, "BATCH_COUNT with 8 bytes");
        CHECK(api.LayoutSet(s.pl.la, 42, &small, 4) == ST_INVALID_VALUE, "layout attribute 42");
        H pref;
        api.PrefCreate(&pref);
        CHECK(api.PrefSet(pref, P_MAX_WORKSPACE_BYTES, &small, 4) == ST_INVALID_VALUE, "workspace with 4 bytes");
        CHECK(api.PrefSet(pref, 2, &small, 4) == ST_INVALID_VALUE, "pref attribute 2 (gone in CUDA 12)");
        api.PrefDestroy(pref);
        HeuristicResult r;
        int n;
        CHECK(api.Heuristic(handle, s.pl.desc, s.pl.la, s.pl.lb, s.pl.lc, s.pl.ld, nullptr, 0, &r, &n) ==
                  ST_INVALID_VALUE,
              "requestedAlgoCount 0");
    });
    GROUP("overlap: D over A; C partly over D", {
        Simple s(8, 8, 8);
        CHECK(s.heur() == ST_SUCCESS, "heuristic");
        float alpha = 1, beta = 1;
        CHECK(api.Matmul(handle, s.pl.desc, &alpha, s.A.p, s.pl.la, s.B.p, s.pl.lb, &beta, s.C.p, s.pl.lc, s.A.p,
                         s.pl.ld, &s.r.algo, nullptr, 0, nullptr) == ST_INVALID_VALUE,
              "D == A accepted");
        Simple t(16, 16, 16);  // D is 1 KiB; C starts 256 bytes into it
        CHECK(t.heur() == ST_SUCCESS, "heuristic");
        Buf big(R_32F, 1024);
        void* c2 = static_cast<char*>(big.p) + 256;
        CHECK(api.Matmul(handle, t.pl.desc, &alpha, t.A.p, t.pl.la, t.B.p, t.pl.lb, &beta, c2, t.pl.lc, big.p,
                         t.pl.ld, &t.r.algo, nullptr, 0, nullptr) == ST_INVALID_VALUE,
              "C partly over D accepted");
    });

    GROUP("speed: 512^3 f32 and bf16", {
        for (auto& t : types) {
            const uint64_t N = 512;
            Plan pl;
            make_plan(pl, t[0], t[1], OP_N, OP_T, N, N, N, N, N, N, N, N, N, N, EPI_DEFAULT);
            Buf A(t[0], N * N), B(t[0], N * N), D(t[1], N * N);
            for (size_t i = 0; i < N * N; ++i) A.set(i, rnd()), B.set(i, rnd());
            HeuristicResult r;
            int n;
            heuristic(pl, nullptr, &r, &n);
            float alpha = 1, beta = 0;
            auto t0 = std::chrono::steady_clock::now();
            uint32_t st = api.Matmul(handle, pl.desc, &alpha, A.p, pl.la, B.p, pl.lb, &beta, nullptr, pl.lc, D.p,
                                     pl.ld, &r.algo, nullptr, 0, nullptr);
            double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
            CHECK(st == ST_SUCCESS, "status %u", st);
            printf("  %s->%s 512^3: %.3f s (%.2f GFLOP/s)\n", tname(t[0]), tname(t[1]), secs,
                   2.0 * N * N * N / secs / 1e9);
        }
    });

    CHECK(api.Destroy(handle) == ST_SUCCESS, "destroy");
    printf("%s: %d checks, %d failures\n", failures ? "FAILED" : "PASSED", checks, failures);
    return failures ? 1 : 0;
}
