// What the CUDA emulator's parts share: the grid runner (simt.cpp) and the driver
// (driver.cpp).
#ifndef TUNELOOP_EMU_EMU_HPP
#define TUNELOOP_EMU_EMU_HPP

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <string>

#include "simt.hpp"

namespace tl_emu {

// The pattern fresh device memory, dynamic shared memory and allocation padding are
// filled with: a NaN as f32 whose halves are bf16 NaNs too.
constexpr uint32_t POISON = 0x7FC07FC0u;

// Fills [p, p + bytes) with POISON, laid out by address (the byte at address a is
// byte a % 4 of POISON), so any part of it can be checked on its own.
inline void fill_poison(void* p, size_t bytes) {
    unsigned char* b = static_cast<unsigned char*>(p);
    unsigned char* end = b + bytes;
    for (; b < end && reinterpret_cast<uintptr_t>(b) % 4; ++b) {
        *b = static_cast<unsigned char>(POISON >> (8 * (reinterpret_cast<uintptr_t>(b) % 4)));
    }
    for (; end - b >= 4; b += 4) memcpy(b, &POISON, 4);  // x86-64: little-endian
    for (; b < end; ++b) *b = static_cast<unsigned char>(POISON >> (8 * (reinterpret_cast<uintptr_t>(b) % 4)));
}

// Runs `kernel` over the grid; an empty string on success, else what went wrong. With
// `shuffle`, the blocks run and the threads of a block resume in orders drawn from `seed`.
std::string run_grid(const Kernel& kernel, dim3 grid, dim3 block, size_t dynamic_shared, void** params,
                     uint64_t seed, bool shuffle);

}  // namespace tl_emu

#endif
