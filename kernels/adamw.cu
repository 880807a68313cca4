// The optimizer's kernels: multi-tensor AdamW in one launch, and the gradients' global
// norm with the clip's coefficient, left on the device for AdamW (two launches). LoRA weights, their gradients and AdamW's moments
// are f32 (DESIGN: f32 master weights and states), so adamw_multi has no bf16 variant.
// The gradients whose norm is taken are f32 too; sum_squares_multi also takes bf16 tensors
// (activations) for a caller that asks for their norm in the bf16 mode.
//
// adamw_multi: torch.optim.AdamW's single-tensor arithmetic, in the CPU backend's order:
//   g  = grad * grad_scale   (the clip's coefficient, 1 without one: clip_grad_norm_'s
//                             in-place scaling folded into the read, the same bits)
//   p *= 1 - lr * wd
//   m += (g - m) * (1 - beta1)
//   v  = v * beta2 + (1 - beta2) * g * g
//   p -= step_size * m / (sqrt(v) / bc2_sqrt + eps)
// with step_size = lr / (1 - beta1^step) and bc2_sqrt = sqrt(1 - beta2^step) computed
// on the host in f64, as the CPU does. `tensors` is a device array of n_tensors
// descriptors. Launch: grid (blocks_x, n_tensors), blockDim.x % 32 == 0; blockIdx.y picks
// the tensor and its blocks grid-stride over it, so any blocks_x is correct.
//
// With `clip` set (not null), adamw_multi takes the coefficient from clip[2] instead of
// grad_scale, and changes nothing when the norm clip[1] is not finite (a NaN or an
// infinity in a gradient): the weights stay as they were, and the host, which reads the
// norm after the step, stops the run.
//
// sum_squares_multi: the sum of x^2 over many tensors in one launch, as f64 partials.
// Tensor t owns blocks first_block .. first_block + blocks of a 1-D grid; each of them
// writes partial[its block], the sum over the elements it grid-strides over with those
// blocks alone. blockDim.x == 256.
//
// clip_norm: the partials' sum in a fixed order (thread i adds partials i, i + 256, ...
// in turn, then a tree over the threads), so the same bits on every run, and from it
// out[0] = the sum, out[1] = its square root (the global norm), out[2] =
// torch.nn.utils.clip_grad_norm_'s coefficient for max_norm, computed as the host's
// clip_scale does: max_norm / (norm + 1e-6) in f64 rounded to f32 when that is below 1,
// else 1 (also without a clip: max_norm < 0). One block of 256 threads.

#include "common.cuh"

struct AdamWTensor {
    float* p;
    const float* g;
    float* m;
    float* v;
    unsigned long long n;
};

extern "C" __global__ void adamw_multi(const AdamWTensor* tensors, int n_tensors, float lr, float beta1,
                                       float beta2, float eps, float weight_decay, float step_size,
                                       float bc2_sqrt, float grad_scale, const double* clip) {
    if ((int)blockIdx.y >= n_tensors) return;
    if (clip != nullptr) {
        if (!isfinite(clip[1])) return;
        grad_scale = (float)clip[2];
    }
    const AdamWTensor t = tensors[blockIdx.y];
    const float decay = 1.0f - lr * weight_decay;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < t.n; i += (size_t)gridDim.x * blockDim.x) {
        const float g = t.g[i] * grad_scale;
        float p = t.p[i] * decay;
        float m = t.m[i];
        m += (g - m) * (1.0f - beta1);
        const float v = t.v[i] * beta2 + (1.0f - beta2) * g * g;
        const float denom = sqrtf(v) / bc2_sqrt + eps;
        p -= step_size * m / denom;
        t.p[i] = p;
        t.m[i] = m;
        t.v[i] = v;
    }
}

namespace tl_adamw {

// partial[block] = the f64 sum of x^2 over elements block, block + blocks, ... (times
// blockDim.x, plus the thread).
template <typename T>
__device__ void sum_squares_partial(double* partial, const T* x, size_t n, unsigned block, unsigned blocks) {
    TL_SHARED(double, s, [256]);
    double acc = 0.0;
    for (size_t i = (size_t)block * blockDim.x + threadIdx.x; i < n; i += (size_t)blocks * blockDim.x) {
        const double v = tl::load_f32(x + i);
        acc += v * v;
    }
    s[threadIdx.x] = acc;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
        if ((int)threadIdx.x < stride) s[threadIdx.x] += s[threadIdx.x + stride];
        __syncthreads();
    }
    if (threadIdx.x == 0) partial[block] = s[0];
}

}  // namespace tl_adamw

struct SumSquaresTensor {
    const void* x;                   // f32, or bf16 when `bf16` is set
    unsigned long long bf16;
    unsigned long long n;
    unsigned long long first_block;  // blocks first_block .. first_block + blocks are its own
    unsigned long long blocks;
};

extern "C" __global__ void __launch_bounds__(256)
sum_squares_multi(double* partial, const SumSquaresTensor* tensors, int n_tensors) {
    // the tensor owning this block: the last whose first block is at or before it
    int lo = 0, hi = n_tensors - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (tensors[mid].first_block <= blockIdx.x) lo = mid; else hi = mid - 1;
    }
    const SumSquaresTensor t = tensors[lo];
    const unsigned block = blockIdx.x - (unsigned)t.first_block;
    if (t.bf16) {
        tl_adamw::sum_squares_partial(partial + t.first_block, static_cast<const __nv_bfloat16*>(t.x), t.n, block,
                                      (unsigned)t.blocks);
    } else {
        tl_adamw::sum_squares_partial(partial + t.first_block, static_cast<const float*>(t.x), t.n, block,
                                      (unsigned)t.blocks);
    }
}

extern "C" __global__ void __launch_bounds__(256) clip_norm(double* out, const double* partial, int n, double max_norm) {
    TL_SHARED(double, s, [256]);
    double acc = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) acc += partial[i];
    s[threadIdx.x] = acc;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
        if ((int)threadIdx.x < stride) s[threadIdx.x] += s[threadIdx.x + stride];
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        const double sum = s[0];
        const double norm = sqrt(sum);
        double scale = 1.0;
        if (max_norm >= 0.0 && max_norm / (norm + 1e-6) < 1.0) scale = (double)(float)(max_norm / (norm + 1e-6));
        out[0] = sum;
        out[1] = norm;
        out[2] = scale;
    }
}
