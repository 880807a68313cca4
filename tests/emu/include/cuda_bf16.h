// Stand-in for CUDA's <cuda_bf16.h> when the test suite's emulator builds kernels/*.cu
// with the host compiler (see ../simt.hpp): the bf16 storage type and its conversions,
// f32 -> bf16 rounding to nearest even as the GPU's cvt.rn.bf16.f32 does.
#ifndef TUNELOOP_EMU_CUDA_BF16_H
#define TUNELOOP_EMU_CUDA_BF16_H

#include <stdint.h>
#include <string.h>

struct __nv_bfloat16;
inline float __bfloat162float(__nv_bfloat16 b);
inline __nv_bfloat16 __float2bfloat16_rn(float f);

// As CUDA's type: constructible from float (rounding to nearest even) and converting
// back to float.
struct __nv_bfloat16 {
    uint16_t __x;
    __nv_bfloat16() = default;
    inline __nv_bfloat16(float f);
    inline operator float() const;
};

inline float __bfloat162float(__nv_bfloat16 b) {
    const uint32_t u = uint32_t(b.__x) << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    __nv_bfloat16 b;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        b.__x = uint16_t((u >> 16) | 0x0040u);  // NaN stays a (quiet) NaN
    } else {
        u += 0x7fffu + ((u >> 16) & 1u);
        b.__x = uint16_t(u >> 16);
    }
    return b;
}

inline __nv_bfloat16::__nv_bfloat16(float f) : __x(__float2bfloat16_rn(f).__x) {}
inline __nv_bfloat16::operator float() const { return __bfloat162float(*this); }

inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }

inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }

#endif
