// The CUDA extension (kernels/cuda.cu + kernels/cuda_bind.cpp) built for CPU tensors and CPU threads through
// tests/kernels/cuda_emulation.h, so the tests can run its host code and kernels without a GPU.
#define GROOTL_CUDA_EMULATION
#include "cuda.cu"
#include "cuda_bind.cpp"
