// Stand-in for CUDA's <cuda_runtime.h> when the test suite's emulator builds kernels/*.cu
// with the host compiler (see ../simt.hpp).
#ifndef TUNELOOP_EMU_CUDA_RUNTIME_H
#define TUNELOOP_EMU_CUDA_RUNTIME_H
#include "../simt.hpp"
#endif
