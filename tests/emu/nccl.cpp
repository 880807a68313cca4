// A CPU stand-in for NCCL (built as libnccl.so), used by the test suite to run the CUDA
// backend's collectives without a GPU: cudarc dlopen()s it instead of NVIDIA's library
// when its folder is on LD_LIBRARY_PATH. It implements the C ABI of cudarc's bindings
// (NCCL 2.30) for what cudarc's nccl::result calls. "Device" buffers are host memory here
// (the emulated driver allocates them in host mappings), streams are ignored and every call
// completes before it returns.
//
// Communicators come in three forms:
//  - one rank (ncclCommInitRank with nranks 1, or ncclCommInitAll with one device): every
//    collective is a local copy (a reduction over one rank is the identity);
//  - several processes (or threads) on one machine, over loopback TCP: ncclGetUniqueId
//    opens a listening socket on 127.0.0.1 at an ephemeral port and writes a tag, the port
//    and a random nonce into the 128-byte id; ncclCommInitRank on rank 0 accepts the other
//    nranks-1 ranks (each sends its rank, the nonce and nranks first), the others connect.
//    A collective is a star through rank 0: every rank sends rank 0 a header (which rank 0
//    checks against its own: same collective, count, type, op, root and sequence number)
//    and its data, rank 0 reduces in rank order (so results are deterministic and the same
//    on every rank) and sends each rank its result;
//  - several ranks in one process (ncclCommInitAll with several devices): a collective
//    runs once every rank has posted it, inside ncclGroupStart/End from one thread or from
//    one thread per rank.
//
// Reductions: sum, prod, max, min (fmax/fmin for floating types), avg (the sum divided by
// nranks) over int8, uint8, int32, uint32, int64, uint64, float16, float32, float64 and
// bfloat16, rounding to the element type after each step as NCCL's kernels do; the fp8
// types only for broadcast and all-gather. Errors return NCCL's codes, print one line
// starting "tuneloop NCCL emulator:" to stderr and are kept for ncclGetLastError: a
// mismatched collective is ncclInvalidUsage, a rank that disconnects ncclRemoteError
// naming the rank, a timeout or socket failure ncclSystemError. After such an error the
// communicator is broken: later collectives fail at once, ncclCommGetAsyncError reports
// the error, and ncclCommAbort closes the sockets without blocking. Socket operations time
// out after TUNELOOP_DIST_TIMEOUT seconds (default 600) without progress; the other ranks
// wait for rank 0 a little longer, so that rank 0 names the rank that hangs.

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

namespace {

// ---- ABI (cudarc 0.19.10's nccl bindings, feature nccl-02030) ----

enum ncclResult_t : uint32_t {
    ncclSuccess = 0,
    ncclUnhandledCudaError = 1,
    ncclSystemError = 2,
    ncclInternalError = 3,
    ncclInvalidArgument = 4,
    ncclInvalidUsage = 5,
    ncclRemoteError = 6,
    ncclInProgress = 7,
    ncclTimeout = 8,
    ncclNumResults = 9,
};

enum : uint32_t {
    ncclInt8 = 0,
    ncclUint8 = 1,
    ncclInt32 = 2,
    ncclUint32 = 3,
    ncclInt64 = 4,
    ncclUint64 = 5,
    ncclFloat16 = 6,
    ncclFloat32 = 7,
    ncclFloat64 = 8,
    ncclBfloat16 = 9,
    ncclFloat8e4m3 = 10,
    ncclFloat8e5m2 = 11,
    ncclNumTypes = 12,
};

enum : uint32_t {
    ncclSum = 0,
    ncclProd = 1,
    ncclMax = 2,
    ncclMin = 3,
    ncclAvg = 4,
    ncclNumOps = 5,
};

struct ncclUniqueId {
    char internal[128];
};

// The leading fields of ncclConfig_t (all this file reads).
struct ConfigHead {
    size_t size;
    unsigned magic;
    unsigned version;
    int blocking;
};
constexpr unsigned NCCL_CONFIG_MAGIC = 0xcafebeef;

constexpr int NCCL_VERSION_CODE = 23000;  // 2.30.0: major*10000 + minor*100 + patch

// ---- Errors ----

constexpr size_t MSG = 512;
thread_local char t_last_error[MSG];

const char* result_name(ncclResult_t r) {
    switch (r) {
        case ncclSuccess: return "ncclSuccess";
        case ncclUnhandledCudaError: return "ncclUnhandledCudaError";
        case ncclSystemError: return "ncclSystemError";
        case ncclInternalError: return "ncclInternalError";
        case ncclInvalidArgument: return "ncclInvalidArgument";
        case ncclInvalidUsage: return "ncclInvalidUsage";
        case ncclRemoteError: return "ncclRemoteError";
        case ncclInProgress: return "ncclInProgress";
        case ncclTimeout: return "ncclTimeout";
        default: return "ncclResult?";
    }
}

// ---- Sockets ----

double dist_timeout() {
    const char* s = getenv("TUNELOOP_DIST_TIMEOUT");
    if (s && *s) {
        char* end = nullptr;
        double v = strtod(s, &end);
        if (end != s && v > 0 && std::isfinite(v)) return v;
    }
    return 600.0;
}

using Clock = std::chrono::steady_clock;

Clock::time_point deadline_after(double secs) {
    return Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(secs));
}

int ms_left(Clock::time_point deadline) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
    if (left <= 0) return 0;
    return left > INT32_MAX ? INT32_MAX : int(left);
}

void set_timeouts(int fd, double secs) {
    timeval tv;
    tv.tv_sec = time_t(secs);
    tv.tv_usec = suseconds_t((secs - double(tv.tv_sec)) * 1e6);
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

// What went wrong on a socket: 0 fine, else the errno (ECONNRESET for an orderly close by
// the other side, EAGAIN for a timeout).
int send_all(int fd, const void* buf, size_t n) {
    const char* p = static_cast<const char*>(buf);
    while (n > 0) {
        ssize_t k = send(fd, p, n, MSG_NOSIGNAL);
        if (k < 0) {
            if (errno == EINTR) continue;
            return errno == EWOULDBLOCK ? EAGAIN : errno;
        }
        p += k;
        n -= size_t(k);
    }
    return 0;
}

int recv_all(int fd, void* buf, size_t n) {
    char* p = static_cast<char*>(buf);
    while (n > 0) {
        ssize_t k = recv(fd, p, n, 0);
        if (k == 0) return ECONNRESET;
        if (k < 0) {
            if (errno == EINTR) continue;
            return errno == EWOULDBLOCK ? EAGAIN : errno;
        }
        p += k;
        n -= size_t(k);
    }
    return 0;
}

// ---- The unique id and the listening sockets made for it ----

constexpr char ID_TAG[8] = {'T', 'L', 'N', 'C', 'C', 'L', '0', '1'};

struct IdFields {
    uint16_t port;
    uint64_t nonce;
};

void write_id(ncclUniqueId* id, const IdFields& f) {
    memset(id->internal, 0, sizeof id->internal);
    memcpy(id->internal, ID_TAG, 8);
    memcpy(id->internal + 8, &f.port, 2);
    memcpy(id->internal + 16, &f.nonce, 8);
}

bool read_id(const ncclUniqueId& id, IdFields* f) {
    if (memcmp(id.internal, ID_TAG, 8) != 0) return false;
    memcpy(&f->port, id.internal + 8, 2);
    memcpy(&f->nonce, id.internal + 16, 8);
    return f->port != 0;
}

struct Listener {
    uint16_t port;
    uint64_t nonce;
    int fd;
};
std::mutex g_listeners_mu;
std::vector<Listener> g_listeners;  // ids made in this process, waiting for their rank 0

// ---- Reductions ----

size_t type_size(uint32_t t) {
    switch (t) {
        case ncclInt8:
        case ncclUint8:
        case ncclFloat8e4m3:
        case ncclFloat8e5m2: return 1;
        case ncclFloat16:
        case ncclBfloat16: return 2;
        case ncclInt32:
        case ncclUint32: return 4;
        case ncclInt64:
        case ncclUint64:
        case ncclFloat64: return 8;
        case ncclFloat32: return 4;
        default: return 0;
    }
}

const char* type_name(uint32_t t) {
    static const char* names[] = {"ncclInt8",    "ncclUint8",   "ncclInt32",   "ncclUint32",
                                  "ncclInt64",   "ncclUint64",  "ncclFloat16", "ncclFloat32",
                                  "ncclFloat64", "ncclBfloat16", "ncclFloat8e4m3", "ncclFloat8e5m2"};
    return t < ncclNumTypes ? names[t] : "an unknown ncclDataType_t";
}

const char* op_name(uint32_t op) {
    static const char* names[] = {"ncclSum", "ncclProd", "ncclMax", "ncclMin", "ncclAvg"};
    return op < ncclNumOps ? names[op] : "an unknown ncclRedOp_t";
}

float bf16_to_f32(uint16_t h) {
    uint32_t u = uint32_t(h) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x0040u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return uint16_t(u >> 16);
}

float f16_to_f32(uint16_t h) {
    uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    float f;
    if (exp == 0) {
        f = std::ldexp(float(man), -24);  // zero or subnormal
        uint32_t u;
        memcpy(&u, &f, 4);
        u |= sign;
        memcpy(&f, &u, 4);
        return f;
    }
    uint32_t u = exp == 31 ? (sign | 0x7f800000u | (man << 13)) : (sign | ((exp + 112) << 23) | (man << 13));
    memcpy(&f, &u, 4);
    return f;
}

uint16_t f32_to_f16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint16_t sign = uint16_t((u >> 16) & 0x8000);
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return uint16_t(sign | 0x7e00 | ((a >> 13) & 0x3ff));  // NaN
    if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00);                       // overflow: inf
    if (a < 0x38800000u) {  // subnormal or zero in half: round |f| * 2^24 to an integer, ties to even
        float m = std::nearbyint(std::ldexp(std::fabs(f), 24));
        return uint16_t(sign | uint16_t(m));
    }
    uint32_t r = a + 0xfffu + ((a >> 13) & 1u);  // to nearest even at bit 13
    return uint16_t(sign | uint16_t(((r >> 13) - (112u << 10)) & 0x7fff));
}

template <class T>
T apply_int(T a, T b, uint32_t op) {
    using U = typename std::make_unsigned<T>::type;
    switch (op) {
        case ncclSum:
        case ncclAvg: return T(U(a) + U(b));
        case ncclProd: return T(U(a) * U(b));
        case ncclMax: return a > b ? a : b;
        default: return a < b ? a : b;
    }
}

template <class F>
F apply_float(F a, F b, uint32_t op) {
    switch (op) {
        case ncclSum:
        case ncclAvg: return a + b;
        case ncclProd: return a * b;
        case ncclMax: return std::fmax(a, b);
        default: return std::fmin(a, b);
    }
}

template <class T>
void reduce_int(void* acc, const void* src, size_t n, uint32_t op) {
    T* a = static_cast<T*>(acc);
    const T* s = static_cast<const T*>(src);
    for (size_t i = 0; i < n; ++i) a[i] = apply_int<T>(a[i], s[i], op);
}

// acc[i] = acc[i] (op) src[i], rounded to the element type.
void reduce_into(void* acc, const void* src, size_t n, uint32_t type, uint32_t op) {
    switch (type) {
        case ncclInt8: reduce_int<int8_t>(acc, src, n, op); break;
        case ncclUint8: reduce_int<uint8_t>(acc, src, n, op); break;
        case ncclInt32: reduce_int<int32_t>(acc, src, n, op); break;
        case ncclUint32: reduce_int<uint32_t>(acc, src, n, op); break;
        case ncclInt64: reduce_int<int64_t>(acc, src, n, op); break;
        case ncclUint64: reduce_int<uint64_t>(acc, src, n, op); break;
        case ncclFloat32: {
            float* a = static_cast<float*>(acc);
            const float* s = static_cast<const float*>(src);
            for (size_t i = 0; i < n; ++i) a[i] = apply_float(a[i], s[i], op);
            break;
        }
        case ncclFloat64: {
            double* a = static_cast<double*>(acc);
            const double* s = static_cast<const double*>(src);
            for (size_t i = 0; i < n; ++i) a[i] = apply_float(a[i], s[i], op);
            break;
        }
        case ncclBfloat16: {
            uint16_t* a = static_cast<uint16_t*>(acc);
            const uint16_t* s = static_cast<const uint16_t*>(src);
            for (size_t i = 0; i < n; ++i)
                a[i] = f32_to_bf16(apply_float(bf16_to_f32(a[i]), bf16_to_f32(s[i]), op));
            break;
        }
        case ncclFloat16: {
            uint16_t* a = static_cast<uint16_t*>(acc);
            const uint16_t* s = static_cast<const uint16_t*>(src);
            for (size_t i = 0; i < n; ++i) a[i] = f32_to_f16(apply_float(f16_to_f32(a[i]), f16_to_f32(s[i]), op));
            break;
        }
        default: break;
    }
}

template <class T>
void div_int(void* acc, size_t n, int d) {
    T* a = static_cast<T*>(acc);
    for (size_t i = 0; i < n; ++i) a[i] = T(a[i] / T(d));
}

// ncclAvg's last step: the sum divided by nranks.
void finish_avg(void* acc, size_t n, uint32_t type, int nranks) {
    if (nranks == 1) return;
    switch (type) {
        case ncclInt8: div_int<int8_t>(acc, n, nranks); break;
        case ncclUint8: div_int<uint8_t>(acc, n, nranks); break;
        case ncclInt32: div_int<int32_t>(acc, n, nranks); break;
        case ncclUint32: div_int<uint32_t>(acc, n, nranks); break;
        case ncclInt64: div_int<int64_t>(acc, n, nranks); break;
        case ncclUint64: div_int<uint64_t>(acc, n, nranks); break;
        case ncclFloat32: {
            float* a = static_cast<float*>(acc);
            for (size_t i = 0; i < n; ++i) a[i] /= float(nranks);
            break;
        }
        case ncclFloat64: {
            double* a = static_cast<double*>(acc);
            for (size_t i = 0; i < n; ++i) a[i] /= double(nranks);
            break;
        }
        case ncclBfloat16: {
            uint16_t* a = static_cast<uint16_t*>(acc);
            for (size_t i = 0; i < n; ++i) a[i] = f32_to_bf16(bf16_to_f32(a[i]) / float(nranks));
            break;
        }
        case ncclFloat16: {
            uint16_t* a = static_cast<uint16_t*>(acc);
            for (size_t i = 0; i < n; ++i) a[i] = f32_to_f16(f16_to_f32(a[i]) / float(nranks));
            break;
        }
        default: break;
    }
}

// ---- Collectives ----

enum Kind : uint32_t { ALLREDUCE = 1, BROADCAST, REDUCE, ALLGATHER, REDUCESCATTER };

const char* kind_name(uint32_t k) {
    switch (k) {
        case ALLREDUCE: return "ncclAllReduce";
        case BROADCAST: return "ncclBroadcast";
        case REDUCE: return "ncclReduce";
        case ALLGATHER: return "ncclAllGather";
        case REDUCESCATTER: return "ncclReduceScatter";
        default: return "a collective";
    }
}

bool reduces(uint32_t k) { return k == ALLREDUCE || k == REDUCE || k == REDUCESCATTER; }

struct Coll {
    uint32_t kind;
    const void* send;
    void* recv;
    size_t count;  // per rank: the count argument of the call
    uint32_t type;
    uint32_t op;
    int root;
};

// Elements rank r hands in, and gets back.
size_t contrib_elems(const Coll& c, int r, int n) {
    switch (c.kind) {
        case ALLREDUCE:
        case REDUCE:
        case ALLGATHER: return c.count;
        case REDUCESCATTER: return c.count * size_t(n);
        case BROADCAST: return r == c.root ? c.count : 0;
        default: return 0;
    }
}
size_t result_elems(const Coll& c, int r, int n) {
    switch (c.kind) {
        case ALLREDUCE:
        case REDUCESCATTER: return c.count;
        case REDUCE: return r == c.root ? c.count : 0;
        case ALLGATHER: return c.count * size_t(n);
        case BROADCAST: return c.count;
        default: return 0;
    }
}

// ---- Communicators ----

constexpr uint64_t COMM_MAGIC = 0x746c4e43436c436full;  // "tlNCClCo"
constexpr uint64_t COMM_DEAD = 0xdeaddeaddeaddeadull;

struct Clique;

struct Comm {
    uint64_t magic = COMM_MAGIC;
    enum { SOLO, TCP, LOCAL } form = SOLO;
    int nranks = 1, rank = 0, cudev = 0;
    std::vector<int> fds;  // TCP: on rank 0, fds[r] to rank r (fds[0] = -1); else fds[0] to rank 0
    std::shared_ptr<Clique> clique;
    uint64_t seq = 0;
    double timeout = 600.0;
    std::mutex mu;  // one collective at a time; destroy waits for it
    std::atomic<uint32_t> async_error{ncclSuccess};
    bool finalized = false;
    std::mutex err_mu;
    char last_error[MSG] = {0};
};

// Records an error for ncclGetLastError (thread and communicator) and prints it.
ncclResult_t fail(Comm* comm, ncclResult_t r, const char* fmt, ...) __attribute__((format(printf, 3, 4)));
ncclResult_t fail(Comm* comm, ncclResult_t r, const char* fmt, ...) {
    char buf[MSG];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    snprintf(t_last_error, sizeof t_last_error, "%s", buf);
    if (comm) {
        std::lock_guard<std::mutex> g(comm->err_mu);
        snprintf(comm->last_error, sizeof comm->last_error, "%s", buf);
    }
    fprintf(stderr, "tuneloop NCCL emulator: %s (%s)\n", buf, result_name(r));
    return r;
}

// A failure that leaves the communicator unusable.
ncclResult_t breaks(Comm* comm, ncclResult_t r) {
    uint32_t ok = ncclSuccess;
    comm->async_error.compare_exchange_strong(ok, r);
    return r;
}

const char* sock_err(int e) { return e == ECONNRESET || e == EPIPE ? "connection closed" : strerror(e); }

ncclResult_t sock_result(int e) { return e == EAGAIN || e == ETIMEDOUT ? ncclSystemError : ncclRemoteError; }

bool is_comm(const Comm* c) { return c && c->magic == COMM_MAGIC; }

// ---- Several ranks in one process (ncclCommInitAll) ----

struct Round {
    std::vector<Coll> colls;
    std::vector<bool> posted;
    int nposted = 0, nobserved = 0;
    bool done = false, abandoned = false;
    ncclResult_t status = ncclSuccess;
    char msg[MSG - 64] = {0};
};

struct Clique {
    int n;
    std::mutex mu;
    std::condition_variable cv;
    std::map<uint64_t, Round> rounds;
};

// Runs a round whose every rank has posted (under the clique's lock).
void execute_round(Round& rd, int n) {
    const Coll& c0 = rd.colls[0];
    for (int r = 1; r < n; ++r) {
        const Coll& c = rd.colls[size_t(r)];
        if (c.kind != c0.kind || c.count != c0.count || c.type != c0.type ||
            (reduces(c0.kind) && c.op != c0.op) || ((c0.kind == BROADCAST || c0.kind == REDUCE) && c.root != c0.root)) {
            rd.status = ncclInvalidUsage;
            snprintf(rd.msg, sizeof rd.msg,
                     "mismatched collectives: rank 0 called %s(count %zu, %s, %s, root %d), rank %d %s(count %zu, %s, "
                     "%s, root %d)",
                     kind_name(c0.kind), c0.count, type_name(c0.type), op_name(c0.op), c0.root, r, kind_name(c.kind),
                     c.count, type_name(c.type), op_name(c.op), c.root);
            return;
        }
    }
    const size_t es = type_size(c0.type);
    const size_t in = contrib_elems(c0, c0.kind == BROADCAST ? c0.root : 0, n);
    std::vector<char> acc(in * es);
    if (c0.kind == ALLGATHER) {
        acc.resize(size_t(n) * c0.count * es);
        for (int r = 0; r < n; ++r)
            memcpy(acc.data() + size_t(r) * c0.count * es, rd.colls[size_t(r)].send, c0.count * es);
    } else if (c0.kind == BROADCAST) {
        memcpy(acc.data(), rd.colls[size_t(c0.root)].send, in * es);
    } else {
        memcpy(acc.data(), rd.colls[0].send, in * es);
        for (int r = 1; r < n; ++r) reduce_into(acc.data(), rd.colls[size_t(r)].send, in, c0.type, c0.op);
        if (c0.op == ncclAvg) finish_avg(acc.data(), in, c0.type, n);
    }
    for (int r = 0; r < n; ++r) {
        const Coll& c = rd.colls[size_t(r)];
        size_t out = result_elems(c0, r, n) * es;
        if (out == 0) continue;
        const char* from = c0.kind == REDUCESCATTER ? acc.data() + size_t(r) * out : acc.data();
        memcpy(c.recv, from, out);
    }
}

// Posts this rank's part of its next collective; the last rank to post runs it.
uint64_t post(Comm* comm, const Coll& c) {
    Clique& q = *comm->clique;
    std::lock_guard<std::mutex> g(q.mu);
    uint64_t seq = comm->seq++;
    Round& rd = q.rounds[seq];
    if (rd.colls.empty()) {
        rd.colls.resize(size_t(q.n));
        rd.posted.assign(size_t(q.n), false);
    }
    rd.colls[size_t(comm->rank)] = c;
    rd.posted[size_t(comm->rank)] = true;
    if (++rd.nposted == q.n) {
        if (!rd.abandoned) execute_round(rd, q.n);
        rd.done = true;
        q.cv.notify_all();
    }
    return seq;
}

// Waits for a posted round to finish.
ncclResult_t await(Comm* comm, uint64_t seq, const char* what) {
    Clique& q = *comm->clique;
    std::unique_lock<std::mutex> g(q.mu);
    Round& rd = q.rounds[seq];
    bool ok = q.cv.wait_until(g, deadline_after(comm->timeout), [&] { return rd.done; });
    ncclResult_t st = ncclSuccess;
    char msg[MSG] = {0};
    if (!ok) {
        rd.abandoned = true;
        std::string missing;
        for (int r = 0; r < q.n; ++r)
            if (!rd.posted[size_t(r)]) missing += (missing.empty() ? "" : ", ") + std::to_string(r);
        st = ncclSystemError;
        snprintf(msg, sizeof msg, "rank %d: %s #%llu timed out after %.0f s waiting for rank(s) %s to call it",
                 comm->rank, what, static_cast<unsigned long long>(seq), comm->timeout, missing.c_str());
    } else if (rd.status != ncclSuccess) {
        st = rd.status;
        snprintf(msg, sizeof msg, "rank %d: %s #%llu: %s", comm->rank, what, static_cast<unsigned long long>(seq),
                 rd.msg);
    } else if (rd.abandoned) {
        st = ncclSystemError;
        snprintf(msg, sizeof msg, "rank %d: %s #%llu was abandoned by a rank that timed out", comm->rank, what,
                 static_cast<unsigned long long>(seq));
    }
    if (++rd.nobserved == q.n) q.rounds.erase(seq);
    g.unlock();
    if (st != ncclSuccess) return breaks(comm, fail(comm, st, "%s", msg));
    return ncclSuccess;
}

// Group state: ncclGroupStart/End nest per thread; collectives on in-process
// communicators posted inside a group are waited for at the outermost ncclGroupEnd.
struct PendingOp {
    Comm* comm;
    uint64_t seq;
    uint32_t kind;
};
thread_local int t_group_depth = 0;
thread_local std::vector<PendingOp> t_pending;
thread_local ncclResult_t t_group_error = ncclSuccess;

// ---- Several processes over TCP ----

struct WireHello {
    char tag[8];
    uint64_t nonce;
    int32_t rank, nranks;
};
struct WireAck {
    char tag[8];
    uint32_t status;
    char msg[244];
};
struct WireOp {
    char tag[8];
    uint64_t seq;
    uint64_t count;
    uint32_t kind, type, op;
    int32_t root, rank, pad;
};
struct WireReply {
    char tag[8];
    uint64_t seq;
    uint32_t status;
    char msg[236];
};

void close_all(Comm* comm) {
    for (int& fd : comm->fds)
        if (fd >= 0) {
            close(fd);
            fd = -1;
        }
}

void shutdown_all(Comm* comm) {
    for (int fd : comm->fds)
        if (fd >= 0) shutdown(fd, SHUT_RDWR);
}

// Rank 0 tells every other rank (without blocking) that the collective failed, then
// shuts the sockets so that ranks blocked on them wake up.
void poison(Comm* comm, uint64_t seq, ncclResult_t st, const char* msg) {
    WireReply rep;
    memset(&rep, 0, sizeof rep);
    memcpy(rep.tag, ID_TAG, 8);
    rep.seq = seq;
    rep.status = st;
    snprintf(rep.msg, sizeof rep.msg, "%s", msg);
    for (int fd : comm->fds)
        if (fd >= 0) (void)!send(fd, &rep, sizeof rep, MSG_NOSIGNAL | MSG_DONTWAIT);
    shutdown_all(comm);
}

ncclResult_t tcp_root(Comm* comm, const Coll& c, uint64_t seq) {
    const int n = comm->nranks;
    const size_t es = type_size(c.type);
    const char* what = kind_name(c.kind);
    auto lost = [&](int r, int e, const char* doing) {
        char msg[MSG];
        snprintf(msg, sizeof msg, "rank 0: %s #%llu: rank %d %s (%s)", what, static_cast<unsigned long long>(seq), r,
                 e == EAGAIN ? "did not answer in time" : "disconnected", doing);
        ncclResult_t st = sock_result(e);
        poison(comm, seq, st, msg);
        if (e == EAGAIN)
            return breaks(comm, fail(comm, st, "%s: no data for %.0f s (TUNELOOP_DIST_TIMEOUT)", msg, comm->timeout));
        return breaks(comm, fail(comm, st, "%s: %s", msg, sock_err(e)));
    };
    // Rank 0's own contribution.
    const size_t in = contrib_elems(c, 0, n);
    std::vector<char> acc;
    if (c.kind == ALLGATHER) {
        acc.resize(size_t(n) * c.count * es);
        memcpy(acc.data(), c.send, c.count * es);
    } else if (c.kind == BROADCAST) {
        acc.resize(c.count * es);
        if (c.root == 0) memcpy(acc.data(), c.send, c.count * es);
    } else {
        acc.assign(static_cast<const char*>(c.send), static_cast<const char*>(c.send) + in * es);
    }
    std::vector<char> tmp;
    for (int r = 1; r < n; ++r) {
        int fd = comm->fds[size_t(r)];
        WireOp h;
        int e = recv_all(fd, &h, sizeof h);
        if (e) return lost(r, e, "waiting for its call");
        if (memcmp(h.tag, ID_TAG, 8) != 0 || h.rank != r) {
            char msg[MSG];
            snprintf(msg, sizeof msg, "rank 0: %s #%llu: garbled header from rank %d", what,
                     static_cast<unsigned long long>(seq), r);
            poison(comm, seq, ncclInternalError, msg);
            return breaks(comm, fail(comm, ncclInternalError, "%s", msg));
        }
        if (h.seq != seq || h.kind != c.kind || h.count != c.count || h.type != c.type ||
            (reduces(c.kind) && h.op != c.op) || ((c.kind == BROADCAST || c.kind == REDUCE) && h.root != c.root)) {
            char msg[MSG];
            snprintf(msg, sizeof msg,
                     "mismatched collectives: rank 0 called %s #%llu (count %zu, %s, %s, root %d), rank %d called %s "
                     "#%llu (count %llu, %s, %s, root %d)",
                     what, static_cast<unsigned long long>(seq), c.count, type_name(c.type), op_name(c.op), c.root, r,
                     kind_name(h.kind), static_cast<unsigned long long>(h.seq),
                     static_cast<unsigned long long>(h.count), type_name(h.type), op_name(h.op), h.root);
            poison(comm, seq, ncclInvalidUsage, msg);
            return breaks(comm, fail(comm, ncclInvalidUsage, "%s", msg));
        }
        const size_t k = contrib_elems(c, r, n) * es;
        if (k == 0) continue;
        char* dst;
        if (c.kind == ALLGATHER) {
            dst = acc.data() + size_t(r) * k;
        } else if (c.kind == BROADCAST) {
            dst = acc.data();
        } else {
            tmp.resize(k);
            dst = tmp.data();
        }
        e = recv_all(fd, dst, k);
        if (e) return lost(r, e, "sending its data");
        if (reduces(c.kind)) reduce_into(acc.data(), tmp.data(), k / es, c.type, c.op);
    }
    if (c.op == ncclAvg && reduces(c.kind)) finish_avg(acc.data(), in, c.type, n);
    WireReply ok;
    memset(&ok, 0, sizeof ok);
    memcpy(ok.tag, ID_TAG, 8);
    ok.seq = seq;
    ok.status = ncclSuccess;
    for (int r = 1; r < n; ++r) {
        int fd = comm->fds[size_t(r)];
        int e = send_all(fd, &ok, sizeof ok);
        const size_t out = result_elems(c, r, n) * es;
        if (!e && out) e = send_all(fd, c.kind == REDUCESCATTER ? acc.data() + size_t(r) * out : acc.data(), out);
        if (e) return lost(r, e, "receiving the result");
    }
    const size_t out0 = result_elems(c, 0, n) * es;
    if (out0) memcpy(c.recv, acc.data(), out0);
    return ncclSuccess;
}

ncclResult_t tcp_peer(Comm* comm, const Coll& c, uint64_t seq) {
    const int n = comm->nranks, me = comm->rank;
    const size_t es = type_size(c.type);
    const char* what = kind_name(c.kind);
    const int fd = comm->fds[0];
    auto lost = [&](int e, const char* doing) {
        if (e == EAGAIN)
            return breaks(comm, fail(comm, ncclSystemError,
                                     "rank %d: %s #%llu: no answer from rank 0 for %.0f s while %s "
                                     "(TUNELOOP_DIST_TIMEOUT)",
                                     me, what, static_cast<unsigned long long>(seq), comm->timeout, doing));
        return breaks(comm, fail(comm, ncclRemoteError,
                                 "rank %d: %s #%llu: lost the connection to rank 0 while %s (%s): rank 0 or another "
                                 "rank failed",
                                 me, what, static_cast<unsigned long long>(seq), doing, sock_err(e)));
    };
    WireOp h;
    memset(&h, 0, sizeof h);
    memcpy(h.tag, ID_TAG, 8);
    h.seq = seq;
    h.count = c.count;
    h.kind = c.kind;
    h.type = c.type;
    h.op = c.op;
    h.root = c.root;
    h.rank = me;
    int e = send_all(fd, &h, sizeof h);
    const size_t in = contrib_elems(c, me, n) * es;
    if (!e && in) e = send_all(fd, c.send, in);
    if (e) {
        // Rank 0 may have said why before closing.
        WireReply rep;
        if (e != EAGAIN && recv_all(fd, &rep, sizeof rep) == 0 && memcmp(rep.tag, ID_TAG, 8) == 0 && rep.status != ncclSuccess) {
            rep.msg[sizeof rep.msg - 1] = 0;
            return breaks(comm, fail(comm, ncclResult_t(rep.status), "rank %d: %s #%llu failed: %s", me, what,
                                     static_cast<unsigned long long>(seq), rep.msg));
        }
        return lost(e, "sending");
    }
    WireReply rep;
    e = recv_all(fd, &rep, sizeof rep);
    if (e) return lost(e, "waiting for the result");
    rep.msg[sizeof rep.msg - 1] = 0;
    if (memcmp(rep.tag, ID_TAG, 8) != 0)
        return breaks(comm, fail(comm, ncclInternalError, "rank %d: %s #%llu: garbled reply from rank 0", me, what,
                                 static_cast<unsigned long long>(seq)));
    if (rep.status != ncclSuccess)
        return breaks(comm, fail(comm, ncclResult_t(rep.status), "rank %d: %s #%llu failed: %s", me, what,
                                 static_cast<unsigned long long>(seq), rep.msg));
    const size_t out = result_elems(c, me, n) * es;
    if (out) {
        e = recv_all(fd, c.recv, out);
        if (e) return lost(e, "receiving the result");
    }
    return ncclSuccess;
}

// ---- Entry point of every collective ----

ncclResult_t collective(Comm* comm, Coll c) {
    const char* what = kind_name(c.kind);
    if (!is_comm(comm)) return fail(nullptr, ncclInvalidArgument, "%s: comm %p is not a live communicator", what,
                                    static_cast<void*>(comm));
    std::lock_guard<std::mutex> g(comm->mu);
    if (comm->finalized)
        return fail(comm, ncclInvalidUsage, "rank %d: %s after ncclCommFinalize", comm->rank, what);
    uint32_t broken = comm->async_error.load();
    if (broken != ncclSuccess)
        return fail(comm, ncclResult_t(broken), "rank %d: %s on a communicator that already failed (%s)", comm->rank,
                    what, result_name(ncclResult_t(broken)));
    if (type_size(c.type) == 0)
        return fail(comm, ncclInvalidArgument, "rank %d: %s: invalid datatype %u", comm->rank, what, c.type);
    if (reduces(c.kind)) {
        if (c.op >= ncclNumOps)
            return fail(comm, ncclInvalidArgument, "rank %d: %s: invalid reduction op %u (custom ops are not "
                        "supported)", comm->rank, what, c.op);
        if (c.type == ncclFloat8e4m3 || c.type == ncclFloat8e5m2)
            return fail(comm, ncclInvalidArgument, "rank %d: %s: reductions over %s are not supported", comm->rank,
                        what, type_name(c.type));
    }
    if ((c.kind == BROADCAST || c.kind == REDUCE) && (c.root < 0 || c.root >= comm->nranks))
        return fail(comm, ncclInvalidArgument, "rank %d: %s: root %d outside [0, %d)", comm->rank, what, c.root,
                    comm->nranks);
    if (c.count == 0) return ncclSuccess;
    const size_t in = contrib_elems(c, comm->rank, comm->nranks), out = result_elems(c, comm->rank, comm->nranks);
    if ((in && !c.send) || (out && !c.recv))
        return fail(comm, ncclInvalidArgument, "rank %d: %s: NULL %s buffer", comm->rank, what,
                    in && !c.send ? "send" : "receive");
    const size_t es = type_size(c.type);
    switch (comm->form) {
        case Comm::SOLO:
            memmove(c.recv, c.send, c.count * es);  // one rank: every collective is a copy
            return ncclSuccess;
        case Comm::TCP: {
            uint64_t seq = comm->seq++;
            ncclResult_t r = comm->rank == 0 ? tcp_root(comm, c, seq) : tcp_peer(comm, c, seq);
            if (r != ncclSuccess && t_group_depth > 0 && t_group_error == ncclSuccess) t_group_error = r;
            return r;
        }
        case Comm::LOCAL: {
            uint64_t seq = post(comm, c);
            if (t_group_depth > 0) {
                t_pending.push_back({comm, seq, c.kind});
                return ncclSuccess;
            }
            return await(comm, seq, what);
        }
    }
    return ncclInternalError;
}

Comm* new_comm() { return new (std::nothrow) Comm(); }

void free_comm(Comm* comm) {
    comm->magic = COMM_DEAD;
    delete comm;
}

ncclResult_t init_rank(Comm** out, int nranks, const ncclUniqueId& id, int rank) {
    static const char fn[] = "ncclCommInitRank";
    if (!out) return fail(nullptr, ncclInvalidArgument, "%s: comm is NULL", fn);
    if (nranks < 1 || rank < 0 || rank >= nranks)
        return fail(nullptr, ncclInvalidArgument, "%s: rank %d of %d is out of range", fn, rank, nranks);
    IdFields f;
    if (!read_id(id, &f))
        return fail(nullptr, ncclInvalidArgument, "%s: rank %d: the unique id was not made by ncclGetUniqueId", fn,
                    rank);
    std::unique_ptr<Comm> comm(new_comm());
    if (!comm) return fail(nullptr, ncclSystemError, "%s: out of memory", fn);
    comm->nranks = nranks;
    comm->rank = rank;
    comm->timeout = dist_timeout();
    const double T = comm->timeout;

    if (rank == 0) {
        int lfd = -1;
        {
            std::lock_guard<std::mutex> g(g_listeners_mu);
            for (size_t i = 0; i < g_listeners.size(); ++i)
                if (g_listeners[i].port == f.port && g_listeners[i].nonce == f.nonce) {
                    lfd = g_listeners[i].fd;
                    g_listeners.erase(g_listeners.begin() + long(i));
                    break;
                }
        }
        if (lfd < 0)
            return fail(nullptr, ncclInvalidUsage,
                        "%s: rank 0: the unique id (port %u) was not made by ncclGetUniqueId in this process, or was "
                        "already used: rank 0 must make the id and join with it once",
                        fn, unsigned(f.port));
        if (nranks == 1) {
            close(lfd);
            comm->form = Comm::SOLO;
            *out = comm.release();
            return ncclSuccess;
        }
        comm->form = Comm::TCP;
        comm->fds.assign(size_t(nranks), -1);
        auto deadline = deadline_after(T);
        int joined = 0;
        ncclResult_t st = ncclSuccess;
        char msg[MSG] = {0};
        while (joined < nranks - 1) {
            pollfd p{lfd, POLLIN, 0};
            int k = poll(&p, 1, ms_left(deadline));
            if (k < 0 && errno == EINTR) continue;
            if (k <= 0) {
                std::string missing;
                for (int r = 1; r < nranks; ++r)
                    if (comm->fds[size_t(r)] < 0) missing += (missing.empty() ? "" : ", ") + std::to_string(r);
                st = ncclSystemError;
                snprintf(msg, sizeof msg,
                         "%s: rank 0: rank(s) %s did not join within %.0f s (TUNELOOP_DIST_TIMEOUT)", fn,
                         missing.c_str(), T);
                break;
            }
            int fd = accept(lfd, nullptr, nullptr);
            if (fd < 0) {
                if (errno == EINTR || errno == ECONNABORTED) continue;
                st = ncclSystemError;
                snprintf(msg, sizeof msg, "%s: rank 0: accept: %s", fn, strerror(errno));
                break;
            }
            set_timeouts(fd, T);
            WireHello h;
            int e = recv_all(fd, &h, sizeof h);
            if (e || memcmp(h.tag, ID_TAG, 8) != 0 || h.nonce != f.nonce) {
                fprintf(stderr, "tuneloop NCCL emulator: %s: rank 0: ignored a connection that is not from this "
                        "communicator's ranks\n", fn);
                close(fd);
                continue;
            }
            if (h.nranks != nranks || h.rank < 1 || h.rank >= nranks || comm->fds[size_t(h.rank)] >= 0) {
                WireAck no;
                memset(&no, 0, sizeof no);
                memcpy(no.tag, ID_TAG, 8);
                no.status = ncclInvalidUsage;
                snprintf(no.msg, sizeof no.msg, "rank 0 expects ranks 1..%d of %d once each; got rank %d of %d",
                         nranks - 1, nranks, h.rank, h.nranks);
                (void)send_all(fd, &no, sizeof no);
                close(fd);
                st = ncclInvalidUsage;
                snprintf(msg, sizeof msg, "%s: rank 0: %s", fn, no.msg);
                break;
            }
            comm->fds[size_t(h.rank)] = fd;
            ++joined;
        }
        close(lfd);
        WireAck ack;
        memset(&ack, 0, sizeof ack);
        memcpy(ack.tag, ID_TAG, 8);
        ack.status = st;
        snprintf(ack.msg, sizeof ack.msg, "%s", msg);
        for (int r = 1; r < nranks; ++r) {
            int fd = comm->fds[size_t(r)];
            if (fd < 0) continue;
            int e = send_all(fd, &ack, sizeof ack);
            if (e && st == ncclSuccess) {
                st = sock_result(e);
                snprintf(msg, sizeof msg, "%s: rank 0: rank %d left while joining (%s)", fn, r, sock_err(e));
            }
        }
        if (st != ncclSuccess) {
            close_all(comm.get());
            return fail(nullptr, st, "%s", msg);
        }
        *out = comm.release();
        return ncclSuccess;
    }

    // rank > 0: connect to rank 0 (retrying while it is not listening yet) and wait for
    // everyone to have joined.
    comm->form = Comm::TCP;
    comm->fds.assign(1, -1);
    auto deadline = deadline_after(T);
    sockaddr_in addr;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons(f.port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int fd = -1;
    for (;;) {
        fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0) return fail(nullptr, ncclSystemError, "%s: rank %d: socket: %s", fn, rank, strerror(errno));
        if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0) break;
        int e = errno;
        close(fd);
        fd = -1;
        if ((e == ECONNREFUSED || e == EINTR || e == EAGAIN) && ms_left(deadline) > 0) {
            usleep(20000);
            continue;
        }
        return fail(nullptr, ncclSystemError, "%s: rank %d: cannot connect to rank 0 at 127.0.0.1:%u: %s", fn, rank,
                    unsigned(f.port), strerror(e));
    }
    // A little longer than rank 0 waits for any one rank, so that when a rank hangs, rank 0
    // (which watches them all) reports it first and tells the others which one it was.
    set_timeouts(fd, T + std::max(2.0, 0.1 * T));
    comm->fds[0] = fd;
    WireHello h;
    memset(&h, 0, sizeof h);
    memcpy(h.tag, ID_TAG, 8);
    h.nonce = f.nonce;
    h.rank = rank;
    h.nranks = nranks;
    int e = send_all(fd, &h, sizeof h);
    WireAck ack;
    if (!e) e = recv_all(fd, &ack, sizeof ack);
    if (e) {
        close_all(comm.get());
        if (e == EAGAIN)
            return fail(nullptr, ncclSystemError,
                        "%s: rank %d: rank 0 did not complete the communicator within %.0f s (TUNELOOP_DIST_TIMEOUT)",
                        fn, rank, T);
        return fail(nullptr, ncclRemoteError, "%s: rank %d: rank 0 closed the connection while joining (%s)", fn,
                    rank, sock_err(e));
    }
    ack.msg[sizeof ack.msg - 1] = 0;
    if (memcmp(ack.tag, ID_TAG, 8) != 0 || ack.status != ncclSuccess) {
        close_all(comm.get());
        return fail(nullptr, ack.status != ncclSuccess ? ncclResult_t(ack.status) : ncclInternalError,
                    "%s: rank %d: rank 0 refused: %s", fn, rank, ack.msg);
    }
    *out = comm.release();
    return ncclSuccess;
}

// ncclCommDestroy and ncclCommAbort: an abort first wakes any thread blocked on the
// sockets and waits for it to leave before the communicator is freed.
ncclResult_t release(const char* fn, Comm* comm, bool abort) {
    if (!comm) return ncclSuccess;
    if (!is_comm(comm))
        return fail(nullptr, ncclInvalidArgument, "%s: comm %p is not a live communicator (destroyed twice?)", fn,
                    static_cast<void*>(comm));
    if (abort) {
        breaks(comm, ncclRemoteError);
        shutdown_all(comm);
    }
    {
        std::lock_guard<std::mutex> g(comm->mu);
        close_all(comm);
    }
    free_comm(comm);
    return ncclSuccess;
}

// The communicator queries: *out = field(comm), after checking both.
template <typename T, typename F> ncclResult_t query(const char* fn, Comm* comm, T* out, F field) {
    if (!is_comm(comm) || !out)
        return fail(nullptr, ncclInvalidArgument, "%s: invalid comm %p or NULL output", fn,
                    static_cast<void*>(comm));
    *out = T(field(comm));
    return ncclSuccess;
}

}  // namespace

// ---- The exported C ABI ----

extern "C" {

typedef Comm* ncclComm_t;
typedef void* cudaStream_t;

#define API __attribute__((visibility("default")))

API ncclResult_t ncclGetVersion(int* version) {
    if (!version) return fail(nullptr, ncclInvalidArgument, "ncclGetVersion: version is NULL");
    *version = NCCL_VERSION_CODE;
    return ncclSuccess;
}

API const char* ncclGetErrorString(ncclResult_t result) {
    switch (result) {
        case ncclSuccess: return "no error";
        case ncclUnhandledCudaError: return "unhandled cuda error (run with NCCL_DEBUG=INFO for details)";
        case ncclSystemError: return "unhandled system error (run with NCCL_DEBUG=INFO for details)";
        case ncclInternalError: return "internal error - please report this issue to the NCCL developers";
        case ncclInvalidArgument: return "invalid argument (run with NCCL_DEBUG=WARN for details)";
        case ncclInvalidUsage: return "invalid usage (run with NCCL_DEBUG=WARN for details)";
        case ncclRemoteError: return "remote process exited or there was a network error";
        case ncclInProgress: return "NCCL operation in progress";
        case ncclTimeout: return "NCCL operation timed out";
        default: return "unknown result code";
    }
}

API const char* ncclGetLastError(ncclComm_t comm) {
    if (is_comm(comm)) {
        std::lock_guard<std::mutex> g(comm->err_mu);
        if (comm->last_error[0]) return comm->last_error;
    }
    return t_last_error;
}

API ncclResult_t ncclGetUniqueId(ncclUniqueId* uniqueId) {
    static const char fn[] = "ncclGetUniqueId";
    if (!uniqueId) return fail(nullptr, ncclInvalidArgument, "%s: uniqueId is NULL", fn);
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return fail(nullptr, ncclSystemError, "%s: socket: %s", fn, strerror(errno));
    sockaddr_in addr;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = 0;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof addr;
    if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 || listen(fd, 256) != 0 ||
        getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
        int e = errno;
        close(fd);
        return fail(nullptr, ncclSystemError, "%s: cannot listen on 127.0.0.1: %s", fn, strerror(e));
    }
    IdFields f;
    f.port = ntohs(addr.sin_port);
    std::random_device rd;
    f.nonce = (uint64_t(rd()) << 32) ^ uint64_t(rd()) ^ uint64_t(getpid()) ^
              uint64_t(Clock::now().time_since_epoch().count());
    {
        std::lock_guard<std::mutex> g(g_listeners_mu);
        g_listeners.push_back({f.port, f.nonce, fd});
    }
    write_id(uniqueId, f);
    return ncclSuccess;
}

API ncclResult_t ncclCommInitRank(ncclComm_t* comm, int nranks, ncclUniqueId commId, int rank) {
    return init_rank(comm, nranks, commId, rank);
}

API ncclResult_t ncclCommInitRankConfig(ncclComm_t* comm, int nranks, ncclUniqueId commId, int rank, void* config) {
    if (config) {
        ConfigHead h;
        memcpy(&h, config, sizeof h);
        if (h.magic != NCCL_CONFIG_MAGIC)
            return fail(nullptr, ncclInvalidArgument,
                        "ncclCommInitRankConfig: config was not initialized with NCCL_CONFIG_INITIALIZER (magic %#x)",
                        h.magic);
    }
    // Every call completes before it returns, which a non-blocking communicator allows too.
    return init_rank(comm, nranks, commId, rank);
}

API ncclResult_t ncclCommInitAll(ncclComm_t* comms, int ndev, const int* devlist) {
    static const char fn[] = "ncclCommInitAll";
    if (!comms) return fail(nullptr, ncclInvalidArgument, "%s: comms is NULL", fn);
    if (ndev < 1) return fail(nullptr, ncclInvalidArgument, "%s: ndev %d < 1", fn, ndev);
    std::shared_ptr<Clique> clique;
    if (ndev > 1) {
        clique = std::make_shared<Clique>();
        clique->n = ndev;
    }
    std::vector<Comm*> made;
    for (int r = 0; r < ndev; ++r) {
        Comm* c = new_comm();
        if (!c) {
            for (Comm* m : made) free_comm(m);
            return fail(nullptr, ncclSystemError, "%s: out of memory", fn);
        }
        c->nranks = ndev;
        c->rank = r;
        c->cudev = devlist ? devlist[r] : r;
        c->timeout = dist_timeout();
        c->form = ndev > 1 ? Comm::LOCAL : Comm::SOLO;
        c->clique = clique;
        made.push_back(c);
    }
    for (int r = 0; r < ndev; ++r) comms[r] = made[size_t(r)];
    return ncclSuccess;
}

API ncclResult_t ncclCommFinalize(ncclComm_t comm) {
    if (!is_comm(comm)) return fail(nullptr, ncclInvalidArgument, "ncclCommFinalize: comm %p is not a live "
                                    "communicator", static_cast<void*>(comm));
    std::lock_guard<std::mutex> g(comm->mu);
    comm->finalized = true;  // nothing is ever outstanding
    return ncclSuccess;
}

API ncclResult_t ncclCommDestroy(ncclComm_t comm) { return release("ncclCommDestroy", comm, false); }

API ncclResult_t ncclCommAbort(ncclComm_t comm) { return release("ncclCommAbort", comm, true); }

API ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t* asyncError) {
    return query("ncclCommGetAsyncError", comm, asyncError, [](Comm* c) { return c->async_error.load(); });
}

API ncclResult_t ncclCommCount(ncclComm_t comm, int* count) {
    return query("ncclCommCount", comm, count, [](Comm* c) { return c->nranks; });
}

API ncclResult_t ncclCommCuDevice(ncclComm_t comm, int* device) {
    return query("ncclCommCuDevice", comm, device, [](Comm* c) { return c->cudev; });
}

API ncclResult_t ncclCommUserRank(ncclComm_t comm, int* rank) {
    return query("ncclCommUserRank", comm, rank, [](Comm* c) { return c->rank; });
}

API ncclResult_t ncclAllReduce(const void* sendbuff, void* recvbuff, size_t count, uint32_t datatype, uint32_t op,
                               ncclComm_t comm, cudaStream_t) {
    return collective(comm, Coll{ALLREDUCE, sendbuff, recvbuff, count, datatype, op, 0});
}

API ncclResult_t ncclBroadcast(const void* sendbuff, void* recvbuff, size_t count, uint32_t datatype, int root,
                               ncclComm_t comm, cudaStream_t) {
    return collective(comm, Coll{BROADCAST, sendbuff, recvbuff, count, datatype, ncclSum, root});
}

API ncclResult_t ncclBcast(void* buff, size_t count, uint32_t datatype, int root, ncclComm_t comm,
                           cudaStream_t stream) {
    return ncclBroadcast(buff, buff, count, datatype, root, comm, stream);
}

API ncclResult_t ncclReduce(const void* sendbuff, void* recvbuff, size_t count, uint32_t datatype, uint32_t op,
                            int root, ncclComm_t comm, cudaStream_t) {
    return collective(comm, Coll{REDUCE, sendbuff, recvbuff, count, datatype, op, root});
}

API ncclResult_t ncclAllGather(const void* sendbuff, void* recvbuff, size_t sendcount, uint32_t datatype,
                               ncclComm_t comm, cudaStream_t) {
    return collective(comm, Coll{ALLGATHER, sendbuff, recvbuff, sendcount, datatype, ncclSum, 0});
}

API ncclResult_t ncclReduceScatter(const void* sendbuff, void* recvbuff, size_t recvcount, uint32_t datatype,
                                   uint32_t op, ncclComm_t comm, cudaStream_t) {
    return collective(comm, Coll{REDUCESCATTER, sendbuff, recvbuff, recvcount, datatype, op, 0});
}

API ncclResult_t ncclGroupStart(void) {
    if (t_group_depth++ == 0) t_group_error = ncclSuccess;
    return ncclSuccess;
}

API ncclResult_t ncclGroupEnd(void) {
    if (t_group_depth == 0) return fail(nullptr, ncclInvalidUsage, "ncclGroupEnd without ncclGroupStart");
    if (--t_group_depth > 0) return ncclSuccess;
    ncclResult_t result = t_group_error;
    std::vector<PendingOp> pending;
    pending.swap(t_pending);
    for (const PendingOp& p : pending) {
        ncclResult_t r = await(p.comm, p.seq, kind_name(p.kind));
        if (r != ncclSuccess && result == ncclSuccess) result = r;
    }
    t_group_error = ncclSuccess;
    return result;
}

// What cudarc's nccl::result can also call, but this stand-in does not provide.
#define NOT_PROVIDED(name)                                                                                   \
    fail(nullptr, ncclInvalidUsage, "%s is not implemented by this CPU stand-in for NCCL", name)

API ncclResult_t ncclSend(const void*, size_t, uint32_t, int, ncclComm_t, cudaStream_t) {
    return NOT_PROVIDED("ncclSend");
}
API ncclResult_t ncclRecv(void*, size_t, uint32_t, int, ncclComm_t, cudaStream_t) { return NOT_PROVIDED("ncclRecv"); }
API ncclResult_t ncclCommSplit(ncclComm_t, int, int, ncclComm_t*, void*) { return NOT_PROVIDED("ncclCommSplit"); }
API ncclResult_t ncclRedOpCreatePreMulSum(uint32_t*, void*, uint32_t, uint32_t, ncclComm_t) {
    return NOT_PROVIDED("ncclRedOpCreatePreMulSum");
}
API ncclResult_t ncclRedOpDestroy(uint32_t, ncclComm_t) { return NOT_PROVIDED("ncclRedOpDestroy"); }

}  // extern "C"
