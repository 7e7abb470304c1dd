// Test harness: just enough of CUDA to run kernels/cuda.cu, host code and kernels alike, on CPU tensors and CPU
// threads (included by cuda.cu when GROOTL_CUDA_EMULATION is defined; tests/kernels/cuda_emulated.cpp builds
// it). A launch runs its blocks one after another, each block's threads as std::threads: __syncthreads is a
// barrier, a warp shuffle a rendezvous of exactly the lanes its mask names, __shared__ memory a static (one
// block at a time), atomics std::atomic_ref. What this cannot show is what only hardware does (timing,
// memory ordering beyond these barriers, the compiled device code).
#pragma once

#include <ATen/ATen.h>

#include <atomic>
#include <barrier>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace grootl_emu {

constexpr int kWarp = 32;

struct Warp {  // rendezvous of the lanes a shuffle's mask names, separately per mask
  struct Round {
    uint64_t posted[kWarp] = {};  // per lane: how many shuffles with this mask it has posted
    uint64_t data[2][kWarp] = {};  // by parity of that count
  };
  std::mutex m;
  std::condition_variable cv;
  std::map<unsigned, Round> rounds;
};

struct Block {
  explicit Block(int threads) : sync(threads), warps((threads + kWarp - 1) / kWarp) {}
  std::barrier<> sync;
  std::atomic<bool> flag{false};
  std::vector<Warp> warps;
};

inline Block* block = nullptr;
inline thread_local std::map<unsigned, uint64_t>* my_calls = nullptr;  // this thread's shuffles, per mask

}  // namespace grootl_emu

inline dim3 blockDim, gridDim;
inline thread_local dim3 threadIdx, blockIdx;

inline void __syncthreads() { grootl_emu::block->sync.arrive_and_wait(); }

inline bool __syncthreads_or(bool x) {
  auto* b = grootl_emu::block;
  if (x) b->flag.store(true);
  b->sync.arrive_and_wait();
  const bool result = b->flag.load();
  b->sync.arrive_and_wait();
  if (threadIdx.x == 0) b->flag.store(false);
  b->sync.arrive_and_wait();
  return result;
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask) {
  static_assert(sizeof(T) <= 8, "emulated shuffles move at most 8 bytes");
  auto& warp = grootl_emu::block->warps[threadIdx.x / grootl_emu::kWarp];
  const int lane = threadIdx.x % grootl_emu::kWarp;
  const uint64_t n = ++(*grootl_emu::my_calls)[mask];
  std::unique_lock<std::mutex> lock(warp.m);
  auto& round = warp.rounds[mask];
  std::memcpy(&round.data[n & 1][lane], &value, sizeof(T));
  round.posted[lane] = n;
  warp.cv.notify_all();
  warp.cv.wait(lock, [&] {
    for (int l = 0; l < grootl_emu::kWarp; ++l)
      if ((mask >> l & 1u) && round.posted[l] < n) return false;
    return true;
  });
  T out;
  std::memcpy(&out, &round.data[n & 1][lane ^ lane_mask], sizeof(T));
  return out;
}

inline int atomicMin(int* p, int v) {
  std::atomic_ref<int> ref(*p);
  int cur = ref.load();
  while (v < cur && !ref.compare_exchange_weak(cur, v)) {
  }
  return cur;
}

inline int atomicMax(int* p, int v) {
  std::atomic_ref<int> ref(*p);
  int cur = ref.load();
  while (v > cur && !ref.compare_exchange_weak(cur, v)) {
  }
  return cur;
}

inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
  std::atomic_ref<unsigned long long> ref(*p);
  unsigned long long cur = ref.load();
  while (v < cur && !ref.compare_exchange_weak(cur, v)) {
  }
  return cur;
}

inline float __expf(float x) { return std::exp(x); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dmul_rn(double a, double b) { return a * b; }

namespace grootl_emu {

inline dim3 as_dim3(dim3 d) { return d; }
inline dim3 as_dim3(int x) { return dim3((unsigned)x); }

// GROOTL_LAUNCH(grid, block, stream, kernel)(args...): every block in turn, its threads concurrently.
template <typename Kernel>
struct Launch {
  Kernel* kernel;
  dim3 grid, threads;
  template <typename... Args>
  void operator()(Args... args) const {
    gridDim = grid;
    blockDim = threads;
    for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block b((int)threads.x);
        block = &b;
        std::vector<std::thread> pool;
        for (unsigned tx = 0; tx < threads.x; ++tx)
          pool.emplace_back([&, tx] {
            threadIdx = dim3(tx);
            blockIdx = dim3(bx, by, bz);
            std::map<unsigned, uint64_t> mine;
            my_calls = &mine;
            kernel(args...);
            b.sync.arrive_and_drop();  // a thread that is done (or returned early) no longer holds the others
          });
        for (auto& t : pool) t.join();
        block = nullptr;
      }
  }
};

template <typename Kernel>
Launch<Kernel> launch(Kernel* kernel, dim3 grid, dim3 threads) {
  return {kernel, grid, threads};
}

}  // namespace grootl_emu

#define GROOTL_LAUNCH(grid, block, stream, ...) \
  ::grootl_emu::launch(__VA_ARGS__, ::grootl_emu::as_dim3(grid), ::grootl_emu::as_dim3(block))
#define CHECK_CUDA_INPUT(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")
#define C10_CUDA_KERNEL_LAUNCH_CHECK()

namespace at::cuda {
inline int getCurrentCUDAStream() { return 0; }
}  // namespace at::cuda
namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace c10::cuda
