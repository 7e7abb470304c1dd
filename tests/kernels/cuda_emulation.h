// Test harness: just enough of CUDA to run kernels/cuda.cu, host code and kernels alike, on CPU tensors and CPU
// threads (included by cuda.cu when GROOTL_CUDA_EMULATION is defined; tests/kernels/cuda_emulated.cpp builds
// it). A launch runs its blocks one after another, each block's threads on a pool of OS threads: __syncthreads is a
// barrier, a warp shuffle a rendezvous of exactly the lanes its mask names, __shared__ memory a static (one
// block at a time; the dynamic part a buffer of the launch's size per block), atomics std::atomic_ref. What this
// cannot show is what only hardware does (timing, memory ordering beyond these barriers, the compiled device code).
#pragma once

#include <ATen/ATen.h>

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <condition_variable>
#include <cstring>
#include <functional>
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
    uint64_t data[2][kWarp] = {};  // by parity of the shuffle's count
    int arrived[2] = {};           // lanes that posted the shuffle in progress, by parity
    uint64_t done = 0;             // the last shuffle every lane of the mask posted
  };
  std::mutex m;
  std::condition_variable cv;
  std::map<unsigned, Round> rounds;
};

struct Block {
  Block(int threads, size_t shared_bytes)
      : sync(threads),
        warps((threads + kWarp - 1) / kWarp),
        shared((shared_bytes + sizeof(std::max_align_t) - 1) / sizeof(std::max_align_t)) {}
  std::barrier<> sync;
  std::atomic<bool> flag{false};
  std::vector<Warp> warps;
  std::vector<std::max_align_t> shared;  // the launch's dynamic shared memory, poisoned (NaN bytes)
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
  if (++round.arrived[n & 1] == __builtin_popcount(mask)) {  // the last lane in wakes the others, once
    round.arrived[n & 1] = 0;
    round.done = n;
    warp.cv.notify_all();
  } else {
    warp.cv.wait(lock, [&] { return round.done >= n; });
  }
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

// The OS threads that play a block's threads, started once and reused by every block of every launch (starting
// a thread per emulated thread per block made the emulated tests, and the sanitizer runs most of all, slow).
// Blocks run one at a time: run(n, job) has workers 0..n-1 each call job(i) once and returns when all are done.
class Workers {
 public:
  ~Workers() {
    for (auto& w : workers_) {
      {
        std::lock_guard<std::mutex> lock(w->m);
        w->stop = true;
      }
      w->cv.notify_one();
      w->thread.join();
    }
  }
  void run(unsigned n, const std::function<void(unsigned)>& job) {
    while (workers_.size() < n) workers_.push_back(std::make_unique<Worker>(this, (unsigned)workers_.size()));
    job_ = &job;
    {
      std::lock_guard<std::mutex> lock(m_);
      remaining_ = n;
    }
    for (unsigned i = 0; i < n; ++i) {
      {
        std::lock_guard<std::mutex> lock(workers_[i]->m);
        workers_[i]->go = true;
      }
      workers_[i]->cv.notify_one();
    }
    std::unique_lock<std::mutex> lock(m_);
    done_.wait(lock, [&] { return remaining_ == 0; });
  }

 private:
  struct Worker {
    Worker(Workers* pool, unsigned i) : thread([this, pool, i] { pool->serve(*this, i); }) {}
    std::mutex m;
    std::condition_variable cv;
    bool go = false, stop = false;
    std::thread thread;  // last: it starts once the fields above exist
  };
  void serve(Worker& w, unsigned i) {
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(w.m);
        w.cv.wait(lock, [&] { return w.go || w.stop; });
        if (w.stop) return;
        w.go = false;
      }
      (*job_)(i);
      std::lock_guard<std::mutex> lock(m_);
      if (--remaining_ == 0) done_.notify_one();
    }
  }
  std::vector<std::unique_ptr<Worker>> workers_;
  const std::function<void(unsigned)>* job_ = nullptr;
  std::mutex m_;
  std::condition_variable done_;
  unsigned remaining_ = 0;
};

inline Workers workers;

// GROOTL_LAUNCH(grid, block, stream, kernel)(args...): every block in turn, its threads concurrently.
template <typename Kernel>
struct Launch {
  Kernel* kernel;
  dim3 grid, threads;
  size_t shared_bytes;
  template <typename... Args>
  void operator()(Args... args) const {
    gridDim = grid;
    blockDim = threads;
    for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block b((int)threads.x, shared_bytes);
        std::memset(b.shared.data(), 0xff, b.shared.size() * sizeof(std::max_align_t));
        block = &b;
        workers.run(threads.x, [&](unsigned tx) {
          threadIdx = dim3(tx);
          blockIdx = dim3(bx, by, bz);
          std::map<unsigned, uint64_t> mine;
          my_calls = &mine;
          kernel(args...);
          b.sync.arrive_and_drop();  // a thread that is done (or returned early) no longer holds the others
        });
        block = nullptr;
      }
  }
};

template <typename Kernel>
Launch<Kernel> launch(Kernel* kernel, dim3 grid, dim3 threads, size_t shared_bytes = 0) {
  return {kernel, grid, threads, shared_bytes};
}

}  // namespace grootl_emu

#define GROOTL_LAUNCH(grid, block, stream, ...) \
  ::grootl_emu::launch(__VA_ARGS__, ::grootl_emu::as_dim3(grid), ::grootl_emu::as_dim3(block))
#define GROOTL_LAUNCH_SHARED(grid, block, shared_bytes, stream, ...) \
  ::grootl_emu::launch(__VA_ARGS__, ::grootl_emu::as_dim3(grid), ::grootl_emu::as_dim3(block), (size_t)(shared_bytes))
#define GROOTL_DYNAMIC_SHARED(name) \
  unsigned char* name = reinterpret_cast<unsigned char*>(::grootl_emu::block->shared.data())
#define CHECK_CUDA_INPUT(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")
#define C10_CUDA_KERNEL_LAUNCH_CHECK()

// The sanitizer builds (tests/kernels/sanitizer_check.py) run float32 only: compiling the kernels for one dtype
// instead of four makes those (instrumented) builds several times shorter.
#ifdef GROOTL_EMULATION_FLOAT32_ONLY
#undef AT_DISPATCH_FLOATING_TYPES_AND2
#define AT_DISPATCH_FLOATING_TYPES_AND2(HALF, BFLOAT16, TYPE, NAME, ...) \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__))
#endif

namespace at::cuda {
inline int getCurrentCUDAStream() { return 0; }
}  // namespace at::cuda
namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace c10::cuda
