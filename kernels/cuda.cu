// CUDA kernels: the tree_scan.h / tree_build.h algorithms on the device. Python bindings: cuda_bind.cpp.
//   plan:     a tree from elsewhere is checked on one thread per row, then planned on a block per row (the
//             phases of tree_scan.h); the host reads the status (one sync: a bad tree raises). Trees from the
//             build come with their plan. The scans size their scratch from L alone (a heavy-last order's
//             stacks hold at most floor(log2 L) + 1 entries), so they never read a plan back.
//   forward:  a channel's N states spread over a group of kLanes lanes of a warp (kPer states per lane);
//             y's sum over n is a butterfly of shuffles inside the group. Stacks live in a global scratch
//             interleaved across the block's threads (coalesced), (max stack depth) * N per channel.
//   backward: the same layout, blocks of kBackwardThreads; the dB/dC terms are summed over the warp's
//             channels with shuffles, staged per warp in shared memory and summed over the block's warps
//             every few nodes (fixed orders: deterministic) into the block's (L, N) partials, which the
//             caller sums. H is recomputed from stack checkpoints every kChunk nodes.
//   build:    per-position norms and neighbour dot products (or manhattan sums) of the features (Mamba-1's, or
//             Mamba-2's grouped ones) by blocks of kTile positions x kSlices slices of each sum over channels;
//             then tree_build.h's data-parallel phases (edge weights, Borůvka, Euler tours ranked by pointer
//             jumping), each one launch over all rows' elements (GridRows: many blocks per row), fixed counts of
//             rounds that depend on L alone; then the plan, a block per row (plan_kernel). No host round trip.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#ifdef GROOTL_CUDA_EMULATION  // tests only: tests/kernels/cuda_emulation.h runs these kernels on CPU threads
#include "cuda_emulation.h"
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#define GROOTL_LAUNCH(grid, block, stream, ...) __VA_ARGS__<<<grid, block, 0, stream>>>
#define GROOTL_LAUNCH_SHARED(grid, block, shared_bytes, stream, ...) __VA_ARGS__<<<grid, block, shared_bytes, stream>>>
#define GROOTL_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#define CHECK_CUDA_INPUT(x) TORCH_CHECK((x).is_cuda() && (x).is_contiguous(), #x " must be a contiguous CUDA tensor")
#endif

#include <limits>
#include <type_traits>
#include <vector>

#include "scan_layouts.h"
#include "tree_build.h"
#include "tree_scan.h"
#include "chunk_scan.h"

namespace {

constexpr int kWarp = 32;
constexpr int kForwardThreads = 128;
constexpr int kBackwardThreads = 512;
constexpr int kBuildThreads = 512;  // plan_kernel
constexpr int kTile = 32, kSlices = 8;  // feature_kernel: positions per block, slices of each sum over channels
constexpr int kPairs = 4;               // feature_kernel: (t, t - j) pairs per pass (j = 0: the norm)
#ifdef GROOTL_CUDA_EMULATION  // few OS threads per launch, and rows spread over several blocks all the same
constexpr int kRowsThreads = 32, kRowsMaxBlocks = 2;
#else
constexpr int kRowsThreads = 256, kRowsMaxBlocks = 8192;  // GridRows: threads per block, blocks at most
#endif
constexpr int kMaxState = 128;  // largest N the scan kernels take (32 lanes x 4 states)

// A channel's N states over kLanes adjacent lanes of a warp (a power of two), kPer states per lane.
// An inactive group (a block's padding channel) runs the channel's steps, shuffles included, but writes nothing.
template <int kLanes, int kPer>
struct WarpLanes {
  static constexpr int per = kPer;
  int lane;       // index inside the group
  unsigned mask;  // the group's lanes in the warp
  bool active;
  __device__ int first() const { return lane; }
  __device__ int count() const { return kLanes; }
  __device__ bool leader() const { return lane == 0 && active; }
  __device__ bool writes() const { return active; }
  template <typename T>
  __device__ T sum(T x) const {  // xor butterfly: every lane adds the same pairs, so all get the same bits
    for (int off = kLanes / 2; off > 0; off /= 2) x += __shfl_xor_sync(mask, x, off);
    return x;
  }
};

template <int kLanes, int kPer>
__device__ WarpLanes<kLanes, kPer> warp_lanes(bool active = true) {
  const int in_warp = threadIdx.x % kWarp;
  const unsigned group = kLanes == kWarp ? 0xffffffffu : ((1u << kLanes) - 1u) << (in_warp & ~(kLanes - 1));
  return {in_warp % kLanes, group, active};
}

// Lanes per channel and states per lane for N states: N <= 32 takes one state per lane.
struct LaneShape {
  int lanes, per;
};
LaneShape lane_shape(int64_t N) {
  TORCH_CHECK(N >= 1 && N <= kMaxState, "the CUDA tree scan takes 1 <= N <= ", kMaxState, " states, got N = ", N);
  int lanes = 4;
  while (lanes < kWarp && lanes < N) lanes *= 2;
  int per = 1;
  while (lanes * per < N) per *= 2;
  return {lanes, per};
}

// Calls f(std::integral_constant<int, kLanes>, std::integral_constant<int, kPer>) for N's lane shape.
template <typename F>
void with_lane_shape(int64_t N, F&& f) {
  const LaneShape s = lane_shape(N);
  using std::integral_constant;
  if (s.per == 1 && s.lanes == 4) return f(integral_constant<int, 4>{}, integral_constant<int, 1>{});
  if (s.per == 1 && s.lanes == 8) return f(integral_constant<int, 8>{}, integral_constant<int, 1>{});
  if (s.per == 1 && s.lanes == 16) return f(integral_constant<int, 16>{}, integral_constant<int, 1>{});
  if (s.per == 1) return f(integral_constant<int, 32>{}, integral_constant<int, 1>{});
  if (s.per == 2) return f(integral_constant<int, 32>{}, integral_constant<int, 2>{});
  return f(integral_constant<int, 32>{}, integral_constant<int, 4>{});
}

__global__ void check_kernel(const int64_t* parent, const int64_t* order, int batch, int L, int32_t* status,
                             int32_t* work) {
  const int b = blockIdx.x * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  status[b] = grootl::check_row(parent + (int64_t)b * L, order + (int64_t)b * L, L, work + (int64_t)b * 3 * L);
}

// This thread's scratch slots: the block's region (entries * kPer * threads), interleaved by thread.
template <typename acc_t, int kPer>
__device__ grootl::Slots<acc_t> thread_slots(acc_t* scratch, int64_t entries) {
  const int64_t block = (int64_t)blockIdx.y * gridDim.x + blockIdx.x;
  return {scratch + block * entries * kPer * blockDim.x + threadIdx.x, (int64_t)blockDim.x, kPer};
}

// kForwardThreads / kLanes channels of one row per block (a layout's channels d of all its groups).
template <typename scalar_t, typename acc_t, typename Layout, int kLanes, int kPer>
__global__ void __launch_bounds__(kForwardThreads)
    forward_kernel(Layout lay, int64_t entries, acc_t* scratch, scalar_t* y, acc_t* root) {
  const int D = lay.groups() * lay.group_channels();
  const int d = blockIdx.x * (kForwardThreads / kLanes) + threadIdx.x / kLanes, b = blockIdx.y;
  const auto slots = thread_slots<acc_t, kPer>(scratch, entries);
  if (d >= D) return;  // whole lane groups leave; the group shuffles name only their own lanes
  acc_t cur[kPer];
  grootl::tree_scan_forward(lay.channel(b, d), warp_lanes<kLanes, kPer>(), slots, cur, y + lay.u_offset(b, d),
                            root ? root + ((int64_t)b * D + d) * lay.N : nullptr);
}

// Sums the block's dB/dC terms over its channels: over a warp's channels with shuffles, then over the
// block's warps through shared memory, kSteps nodes at a time, into the block's (L, N) partials.
template <typename acc_t, int kLanes, int kPer>
struct BlockSink {
  static constexpr int kWarps = kBackwardThreads / kWarp;
  static constexpr int kN = kLanes * kPer;
  static constexpr int kStageBytes = 32 * 1024;
  static constexpr int kPerStep = kWarps * kN * 2 * (int)sizeof(acc_t);
  static constexpr int kSteps = kStageBytes / kPerStep < 1 ? 1 : (kStageBytes / kPerStep > 32 ? 32 : kStageBytes / kPerStep);

  acc_t (*stage)[kWarps][2][kN];  // [kSteps][warp][dB, dC][n]
  int64_t* stage_v;               // [kSteps]: the node of each staged step
  acc_t* dB;
  acc_t* dC;
  int N;
  bool active;  // false on the padding channels past D: they add zeros
  int slot;

  __device__ void add(int, int n, int64_t, acc_t b_term, acc_t c_term) {
    b_term = active ? b_term : acc_t(0);
    c_term = active ? c_term : acc_t(0);
    // the lanes holding state n in each of the warp's channel groups: the same lane of every group
    const int in_warp = threadIdx.x % kWarp;
    unsigned same_n = 0;
    for (int g = 0; g < kWarp; g += kLanes) same_n |= 1u << (g + in_warp % kLanes);
    for (int off = kLanes; off < kWarp; off *= 2) {
      b_term += __shfl_xor_sync(same_n, b_term, off);
      c_term += __shfl_xor_sync(same_n, c_term, off);
    }
    if (in_warp < kLanes) {
      stage[slot][threadIdx.x / kWarp][0][n] = b_term;
      stage[slot][threadIdx.x / kWarp][1][n] = c_term;
    }
  }
  __device__ void commit(int64_t v) {
    if (threadIdx.x == 0) stage_v[slot] = v;
    if (++slot == kSteps) flush();
  }
  __device__ void finish() {
    if (slot > 0) flush();
  }
  __device__ void flush() {
    __syncthreads();
    const int per_term = slot * N;
    for (int q = threadIdx.x; q < 2 * per_term; q += blockDim.x) {
      const int which = q / per_term, s = (q % per_term) / N, n = q % N;
      acc_t total = 0;
      for (int w = 0; w < kWarps; ++w) total += stage[s][w][which][n];
      (which ? dC : dB)[stage_v[s] * N + n] = total;
    }
    __syncthreads();
    slot = 0;
  }
};

// A backward thread's channel d in a block of kBackwardThreads / kLanes channels of one group of row b (gridDim.x =
// groups * blocks per group): channels past the group's last repeat it, inactive (they write nothing and add
// nothing to dB/dC). part: the block's offset in dB_part, dC_part (batch, groups, blocks per group, L, N).
struct BackwardChannel {
  int d;
  bool active;
  int64_t part;
};

template <int kLanes, typename Layout>
__device__ BackwardChannel backward_channel(const Layout& lay, int b) {
  const int per_group = lay.group_channels(), channels = kBackwardThreads / kLanes;
  const int parts = (per_group + channels - 1) / channels, g = blockIdx.x / parts;
  const int c = blockIdx.x % parts * channels + threadIdx.x / kLanes;
  return {g * per_group + (c < per_group ? c : per_group - 1), c < per_group,
          ((int64_t)b * gridDim.x + blockIdx.x) * lay.L * lay.N};
}

// The row-walking backward on blocks of channels as backward_channel's, a row per gridDim.y.
template <typename scalar_t, typename acc_t, typename Layout, int kLanes, int kPer>
__global__ void __launch_bounds__(kBackwardThreads)
    backward_kernel(Layout lay, const int32_t* ckpt_offset, const int32_t* sizes, const scalar_t* gy,
                    const acc_t* g_root, int64_t entries, acc_t* scratch, scalar_t* du, acc_t* d_delta, acc_t* dA,
                    acc_t* dB_part, acc_t* dC_part) {
  using Sink = BlockSink<acc_t, kLanes, kPer>;
  __shared__ acc_t stage[Sink::kSteps][Sink::kWarps][2][Sink::kN];
  __shared__ int64_t stage_v[Sink::kSteps];
  const int D = lay.groups() * lay.group_channels(), N = lay.N, L = lay.L, b = blockIdx.y;
  const BackwardChannel mine = backward_channel<kLanes>(lay, b);
  const int d = mine.d;
  const bool active = mine.active;
  Sink sink{stage, stage_v, dB_part + mine.part, dC_part + mine.part, N, active, 0};
  acc_t cur[kPer], gr[kPer], dA_acc[kPer];
  const int chunks = grootl::num_chunks(L);
  grootl::tree_scan_backward(lay.channel(b, d), warp_lanes<kLanes, kPer>(active), gy + lay.u_offset(b, d),
                             g_root ? g_root + ((int64_t)b * D + d) * N : nullptr,
                             ckpt_offset + (int64_t)b * (chunks + 1), sizes[b * 3], sizes[b * 3 + 1],
                             thread_slots<acc_t, kPer>(scratch, entries), grootl::BackwardRegs<acc_t>{cur, gr, dA_acc},
                             du + lay.u_offset(b, d), d_delta + lay.delta_out(b, d), dA + lay.dA_out(b, d), sink);
}

// Thread `slice` of kSlices adds its share of the pairwise sum of terms term(i, p), i < n, for np pairs p: its block
// of the terms zero-padded to a power of two (one term each, or none, when that width is below kSlices); slice 0's
// threads then add the kSlices block sums in pairs, so out[p] has the bits of one PairwiseSum over all n terms.
// Every thread of the block calls it (two barriers).
template <typename acc_t, typename Term>
__device__ void sliced_sum(int n, int np, Term term, acc_t (*part)[kPairs][kTile], acc_t* out) {
  const int lane = threadIdx.x % kTile, slice = threadIdx.x / kTile;
  int width = 1;
  while (width < n) width *= 2;
  const int per = width > kSlices ? width / kSlices : 1, lo = slice * per, hi = lo + per < n ? lo + per : n;
  grootl::PairwiseSum<acc_t> sum[kPairs];
  for (int i = lo; i < hi; ++i)
    for (int p = 0; p < np; ++p) sum[p].add(term(i, p));
  for (int p = 0; p < np; ++p) part[slice][p][lane] = sum[p].total();
  __syncthreads();
  if (slice == 0) {
    for (int p = 0; p < np; ++p) {
      grootl::PairwiseSum<acc_t> total;
      for (int q = 0; q < kSlices; ++q) total.add(part[q][p][lane]);
      out[p] = total.total();
    }
  }
  __syncthreads();
}

// sq[t] = |X[t]|^2 and dots[t*k + j-1] = X[t] . X[t-j] (for manhattan: grootl::manhattan_sum(t, t-j)) with the
// CPU build's bits, a block per kTile positions of a row: thread (slice, lane) reads channels of its slice at
// position lane (coalesced), the sums over channels are sliced_sum's, over the groups a PairwiseSum.
// features: row 0's (grootl::ScaledFeatures or grootl::GroupedFeatures).
template <typename acc_t, typename Features>
__global__ void __launch_bounds__(kTile * kSlices)
    feature_kernel(Features features, int k, int distance, acc_t* sq, acc_t* dots) {
  __shared__ acc_t part[kSlices][kPairs][kTile];
  const int L = features.L, b = blockIdx.y, t = blockIdx.x * kTile + threadIdx.x % kTile;
  const bool leader = threadIdx.x < kTile && t < L;  // slice 0 holds the sums
  const auto f = features.row(b);
  for (int p0 = 0; p0 <= k; p0 += kPairs) {  // pair p: (t, t - p0 - p)
    const int np = k + 1 - p0 < kPairs ? k + 1 - p0 : kPairs;
    auto has = [&](int p) { return t < L && p0 + p <= t; };
    grootl::PairwiseSum<acc_t> total[kPairs];
    for (int g = 0; g < f.groups(); ++g) {
      acc_t x[kPairs], y[kPairs];
      if (distance == grootl::kManhattan) {
        sliced_sum(f.C, np, [&](int c, int p) {
          return has(p) ? grootl::manhattan_term<acc_t>(f, g, c, t, t - p0 - p) : acc_t(0);
        }, part, x);
      } else {
        sliced_sum(f.C, np, [&](int c, int p) {
          return has(p) ? grootl::mul(f.a(g, c, t), f.a(g, c, t - p0 - p)) : acc_t(0);
        }, part, x);
        sliced_sum(f.N, np, [&](int m, int p) {
          return has(p) ? grootl::mul(f.b(g, m, t), f.b(g, m, t - p0 - p)) : acc_t(0);
        }, part, y);
      }
      if (leader)
        for (int p = 0; p < np; ++p) total[p].add(distance == grootl::kManhattan ? x[p] : grootl::mul(x[p], y[p]));
    }
    if (!leader) continue;
    const int64_t at = (int64_t)b * L + t;
    for (int p = 0; p < np; ++p) {
      const int j = p0 + p;
      if (j == 0)
        sq[at] = total[p].total();
      else
        dots[at * k + j - 1] = j <= t ? total[p].total() : acc_t(0);
    }
  }
}

// tree_build.h's phases over all rows at once: each(n, body) is one launch of body(row, i) over rows * n
// elements (a grid-stride loop), the launch boundary the barrier; loops run their full fixed counts.
template <typename F>
__global__ void __launch_bounds__(kRowsThreads) rows_kernel(F body, int rows, int n) {
  const int64_t total = (int64_t)rows * n, stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t q = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; q < total; q += stride) body((int)(q / n), (int)(q % n));
}

struct GridRows {
  int rows;
  decltype(at::cuda::getCurrentCUDAStream()) stream;
  template <typename F>
  void each(int n, F body) {
    const int64_t blocks = ((int64_t)rows * n + kRowsThreads - 1) / kRowsThreads;
    if (blocks == 0) return;
    GROOTL_LAUNCH((int)std::min<int64_t>(blocks, kRowsMaxBlocks), kRowsThreads, stream, rows_kernel<F>)(body, rows, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  template <typename acc_t>
  bool settled(const grootl::BuildRows<acc_t>&, int) const { return false; }  // nothing read back
};

// Phases on the threads of a block, a barrier after each (see SerialPar in tree_build.h).
struct BlockPar {
  template <typename F>
  __device__ void each(int n, F&& body) {
    for (int i = threadIdx.x; i < n; i += blockDim.x) body(i);
    __syncthreads();
  }
  __device__ bool any(bool x) { return __syncthreads_or(x); }
  __device__ int32_t max(int32_t x) {
    __shared__ int32_t best;
    if (threadIdx.x == 0) best = x;
    __syncthreads();
    atomicMax(&best, x);
    __syncthreads();
    const int32_t result = best;
    __syncthreads();
    return result;
  }
  __device__ void scan(int32_t* a, int n) {  // each thread a contiguous run, then a scan of the runs' sums
    __shared__ int32_t sums[kBuildThreads];
    const int per = (n + blockDim.x - 1) / blockDim.x, lo = threadIdx.x * per, hi = lo + per < n ? lo + per : n;
    int32_t sum = 0;
    for (int i = lo; i < hi; ++i) a[i] = sum += a[i];
    sums[threadIdx.x] = sum;
    __syncthreads();
    for (int off = 1; off < (int)blockDim.x; off *= 2) {
      const int32_t add = threadIdx.x >= (unsigned)off ? sums[threadIdx.x - off] : 0;
      __syncthreads();
      sums[threadIdx.x] += add;
      __syncthreads();
    }
    const int32_t before = threadIdx.x > 0 ? sums[threadIdx.x - 1] : 0;
    for (int i = lo; i < hi; ++i) a[i] += before;
    __syncthreads();
  }
};

// One block per row whose tree passed check_kernel (status null: a built tree), its plan; work: row b's at
// b * work_stride.
__global__ void __launch_bounds__(kBuildThreads)
    plan_kernel(const int64_t* parent, const int64_t* order, const int32_t* status, int L, uint8_t* flags,
                int32_t* ckpt_offset, int32_t* sizes, int32_t* work, int64_t work_stride) {
  const int b = blockIdx.x;
  if (status && status[b] != grootl::kTreeOk) return;  // the whole block
  BlockPar par;
  grootl::plan_phases(par, parent + (int64_t)b * L, order + (int64_t)b * L, L, flags + (int64_t)b * L,
                      ckpt_offset + (int64_t)b * (grootl::num_chunks(L) + 1), sizes + b * 3, work + b * work_stride);
}

// The chunked scan (chunk_scan.h): a block per row makes the chunk plan; passes 1 and 3 run on a grid of (channel
// blocks, chunks, rows), a channel's N states over a group of lanes as above, a chunk's nodes in a per-thread
// buffer (2 * kScanChunk * kPer accumulators: local memory, sized by the threads resident, not launched); pass 2
// runs a thread per (row, channel, state) over the row's local roots. Where a row fits a block, fused_kernel runs
// the forward's three passes in one launch instead, and the backward's three (or its first two) in another.
__global__ void __launch_bounds__(kBuildThreads)
    chunk_plan_kernel(const int64_t* parent, const int64_t* order, int L, int32_t* plans, int32_t* work) {
  const int b = blockIdx.x;
  BlockPar par;
  grootl::chunk_plan_phases(par, parent + (int64_t)b * L, order + (int64_t)b * L, L,
                            plans + b * grootl::chunk_plan_ints(L), work + (int64_t)b * 2 * L);
}

// The slots of (row b, channel d) in a buffer of (batch, D, chunks * kSlots, N).
template <typename acc_t>
__device__ grootl::SlotStates<acc_t> slot_states(acc_t* buf, int b, int d, int D, int L, int N) {
  return {buf + ((int64_t)b * D + d) * grootl::scan_chunks(L) * grootl::kSlots * N, N};
}

// Pass 1 (gy null: the forward's, without Q) or pass 3 of the forward (forward_out: y, root).
template <typename scalar_t, typename acc_t, typename Layout, int kLanes, int kPer, bool kPass3>
__global__ void __launch_bounds__(kForwardThreads)
    chunk_forward_kernel(Layout lay, const int32_t* plans, const scalar_t* gy, acc_t* Hr, acc_t* T, acc_t* Q,
                         scalar_t* y, acc_t* root) {
  const int D = lay.groups() * lay.group_channels(), L = lay.L, N = lay.N;
  const int d = blockIdx.x * (kForwardThreads / kLanes) + threadIdx.x / kLanes, c = blockIdx.y, b = blockIdx.z;
  if (d >= D) return;  // whole lane groups leave; the group shuffles name only their own lanes
  const auto plan = grootl::ChunkPlan::of(plans + b * grootl::chunk_plan_ints(L), L);
  acc_t scratch[2 * grootl::kScanChunk * kPer];
  const auto ch = lay.channel(b, d);
  if constexpr (kPass3) {
    grootl::chunk_forward(ch, warp_lanes<kLanes, kPer>(), plan, c, slot_states(Hr, b, d, D, L, N), scratch,
                          y + lay.u_offset(b, d), root ? root + ((int64_t)b * D + d) * N : nullptr);
  } else {
    grootl::chunk_pass1(ch, warp_lanes<kLanes, kPer>(), plan, c, gy ? gy + lay.u_offset(b, d) : nullptr,
                        slot_states(Hr, b, d, D, L, N), slot_states(T, b, d, D, L, N),
                        slot_states(Q ? Q : T, b, d, D, L, N), scratch);
  }
}

// Pass 2, a thread per (row, channel, state); Q null: the forward's.
template <typename acc_t>
__global__ void __launch_bounds__(kRowsThreads)
    chunk_reduced_kernel(const int32_t* plans, int batch, int D, int N, int L, acc_t* Hr, acc_t* T, acc_t* Q,
                         const acc_t* g_root) {
  const int64_t q = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (q >= (int64_t)batch * D * N) return;
  const int n = q % N, d = q / N % D, b = q / N / D;
  const auto plan = grootl::ChunkPlan::of(plans + b * grootl::chunk_plan_ints(L), L);
  const auto Qs = slot_states(Q ? Q : T, b, d, D, L, N);
  grootl::reduced_pass(plan, n, slot_states(Hr, b, d, D, L, N), slot_states(T, b, d, D, L, N), Q ? &Qs : nullptr,
                       g_root ? g_root + ((int64_t)b * D + d) * N : nullptr);
}

// The chunked scan in one launch where a row fits a block (fused_fits): a lane group per chunk, a block per row and
// `channels` channels in turn (one but for kBackward). A channel's u, delta (and gy) are staged in shared memory, read
// from device memory once; the slots live there too; barriers separate the passes instead of launches. After passes
// 1 and 2, kForward runs the forward's pass 3 (y, root); kRoots writes the final states and incoming gradients of
// the row's local roots (the only slots the backward's pass 3 reads) to out.Hr, out.Ginc for chunk_backward_kernel;
// kBackward runs that pass 3 in the block: du, d_delta and dA whole, and dB/dC summed over the block's channels
// in each lane's own buffers (its chunk's positions, its states), written once as the block's partial (the
// layout of chunk_backward_kernel's). Mamba-1's layout (unit steps).
#ifdef GROOTL_CUDA_EMULATION  // the tests reach the launch-per-pass kernels with short rows too
constexpr int kFusedThreads = 64;
#else
constexpr int kFusedThreads = 1024;
#endif
constexpr int64_t kFusedShared = 160 * 1024;  // bytes of shared memory a fused block may take

enum class Fused { kForward, kRoots, kBackward };

// Shared memory of a fused block: slots (Hr, T; Q for the backward), delta, and for kBackward the chunk tails and
// per-chunk dA; then u (and gy for the backward).
template <typename scalar_t, typename acc_t>
int64_t fused_shared_bytes(Fused mode, int L, int N) {
  const int64_t chunks = grootl::scan_chunks(L), grads = mode != Fused::kForward;
  const int64_t acc = (2 + grads) * chunks * grootl::kSlots * N + L + (mode == Fused::kBackward ? chunks * (1 + N) : 0);
  return acc * sizeof(acc_t) + (1 + grads) * (int64_t)L * sizeof(scalar_t);
}

template <typename scalar_t, typename acc_t>
bool fused_fits(Fused mode, int L, int N) {
  return grootl::scan_chunks(L) * lane_shape(N).lanes <= kFusedThreads &&
         fused_shared_bytes<scalar_t, acc_t>(mode, L, N) <= kFusedShared;
}

// Where a fused launch writes (the pointers its mode uses).
template <typename scalar_t, typename acc_t>
struct FusedOut {
  scalar_t* y = nullptr;  // kForward
  acc_t* root = nullptr;
  acc_t* Hr = nullptr;  // kRoots
  acc_t* Ginc = nullptr;
  scalar_t* du = nullptr;  // kBackward
  acc_t* d_delta = nullptr;
  acc_t* dA = nullptr;
  acc_t* dB_part = nullptr;
  acc_t* dC_part = nullptr;
};

// A lane group's dB/dC terms (chunk_backward's sink): its chunk's positions and its states, added up over the
// block's channels in the thread's own buffers.
template <typename acc_t, int kPer>
struct ChunkSums {
  acc_t dB[grootl::kScanChunk * kPer], dC[grootl::kScanChunk * kPer];
  int s;
  __device__ void add(int j, int, int64_t v, acc_t b_term, acc_t c_term) {
    dB[(v - s) * kPer + j] += b_term;
    dC[(v - s) * kPer + j] += c_term;
  }
  __device__ void commit(int64_t) {}
};

template <Fused kMode, typename scalar_t, typename acc_t, typename Layout, int kLanes, int kPer>
__global__ void __launch_bounds__(kFusedThreads)
    fused_kernel(Layout lay, const int32_t* plans, int channels, const scalar_t* gy, const acc_t* g_root,
                 FusedOut<scalar_t, acc_t> out) {
  static_assert(!Layout::channel_t::scalar_decay, "the fused kernel stages Mamba-1's unit-step channels");
  constexpr bool kGrads = kMode != Fused::kForward, kWhole = kMode == Fused::kBackward;
  GROOTL_DYNAMIC_SHARED(shared);
  const int D = lay.D, L = lay.L, N = lay.N, b = blockIdx.y, c = threadIdx.x / kLanes;
  const int chunks = grootl::scan_chunks(L);
  const int64_t slots = (int64_t)chunks * grootl::kSlots * N;
  acc_t* const Hr = reinterpret_cast<acc_t*>(shared);
  acc_t* const T = Hr + slots;
  acc_t* const Q = T + slots;  // the backward's
  acc_t* const delta = Q + (kGrads ? slots : 0);
  acc_t* const tails = delta + L;  // kBackward: (chunks)
  acc_t* const dA_chunks = tails + (kWhole ? chunks : 0);  // kBackward: (chunks, N)
  scalar_t* const u = reinterpret_cast<scalar_t*>(dA_chunks + (kWhole ? chunks * N : 0));
  scalar_t* const g = u + L;  // the backward's gy
  const auto plan = grootl::ChunkPlan::of(plans + b * grootl::chunk_plan_ints(L), L);
  const auto lanes = warp_lanes<kLanes, kPer>();
  const grootl::SlotStates<acc_t> Hs{Hr, N}, Ts{T, N}, Qs{Q, N};
  acc_t scratch[2 * grootl::kScanChunk * kPer];
  ChunkSums<acc_t, kWhole ? kPer : 1> sums;
  if constexpr (kWhole) {
    sums.s = grootl::chunk_first(c);
    for (int q = 0; q < grootl::kScanChunk * kPer; ++q) sums.dB[q] = sums.dC[q] = 0;
  }
  const int first = blockIdx.x * channels, last = first + channels < D ? first + channels : D;
  for (int d = first; d < last; ++d) {
    auto ch = lay.channel(b, d);
    __syncthreads();  // the previous channel is done with the shared memory
    for (int t = threadIdx.x; t < L; t += blockDim.x) {
      u[t] = ch.u[t];
      delta[t] = ch.delta[t];
      if constexpr (kGrads) g[t] = gy[lay.u_offset(b, d) + t];
    }
    ch.u = u;
    ch.delta = delta;
    __syncthreads();
    grootl::chunk_pass1(ch, lanes, plan, c, kGrads ? (const scalar_t*)g : nullptr, Hs, Ts, Qs, scratch);
    __syncthreads();
    for (int n = threadIdx.x; n < N; n += blockDim.x)
      grootl::reduced_pass(plan, n, Hs, Ts, kGrads ? &Qs : nullptr,
                           g_root != nullptr ? g_root + ((int64_t)b * D + d) * N : nullptr);
    __syncthreads();
    if constexpr (kMode == Fused::kForward) {
      grootl::chunk_forward(ch, lanes, plan, c, Hs, scratch, out.y + lay.u_offset(b, d),
                            out.root != nullptr ? out.root + ((int64_t)b * D + d) * N : nullptr);
    } else if constexpr (kMode == Fused::kRoots) {
      const auto H_out = slot_states(out.Hr, b, d, D, L, N), G_out = slot_states(out.Ginc, b, d, D, L, N);
      for (int q = threadIdx.x; q < plan.R * N; q += blockDim.x) {
        const int slot = plan.red[q / N], n = q % N;
        H_out(slot, n) = Hs(slot, n);
        G_out(slot, n) = Qs(slot, n);
      }
    } else {
      acc_t dA_acc[kPer];
      acc_t* const d_delta = out.d_delta + lay.delta_out(b, d);
      grootl::chunk_backward(ch, lanes, plan, c, (const scalar_t*)g, Hs, Qs, scratch, dA_acc,
                             out.du + lay.u_offset(b, d), d_delta, tails, dA_chunks + (int64_t)c * N, sums);
      __syncthreads();
      if (c > 0 && lanes.leader()) d_delta[grootl::chunk_first(c)] += tails[c - 1];
      for (int n = threadIdx.x; n < N; n += blockDim.x) {
        acc_t total = 0;
        for (int k = 0; k < chunks; ++k) total += dA_chunks[(int64_t)k * N + n];
        out.dA[lay.dA_out(b, d) + n] = total;
      }
    }
  }
  if constexpr (kWhole) {
    const int64_t part = ((int64_t)b * gridDim.x + blockIdx.x) * L * N;
    const int s = grootl::chunk_first(c), e = grootl::chunk_last(c, L);
    for (int v = s; v <= e; ++v)
      for (int j = 0; j < kPer; ++j) {
        const int n = grootl::state_of(lanes, j);
        if (n >= N) break;
        out.dB_part[part + (int64_t)v * N + n] = sums.dB[(v - s) * kPer + j];
        out.dC_part[part + (int64_t)v * N + n] = sums.dC[(v - s) * kPer + j];
      }
  }
}

// Pass 3 of the backward: blocks of channels as backward_channel's, one chunk each (grid: groups * blocks per
// group, chunks, rows). dA_chunks: (chunks, dA's size); tails: (batch, D, chunks).
template <typename scalar_t, typename acc_t, typename Layout, int kLanes, int kPer>
__global__ void __launch_bounds__(kBackwardThreads)
    chunk_backward_kernel(Layout lay, const int32_t* plans, const scalar_t* gy, acc_t* Hr, acc_t* Ginc,
                          int64_t dA_size, scalar_t* du, acc_t* d_delta, acc_t* tails, acc_t* dA_chunks,
                          acc_t* dB_part, acc_t* dC_part) {
  using Sink = BlockSink<acc_t, kLanes, kPer>;
  __shared__ acc_t stage[Sink::kSteps][Sink::kWarps][2][Sink::kN];
  __shared__ int64_t stage_v[Sink::kSteps];
  const int D = lay.groups() * lay.group_channels(), N = lay.N, L = lay.L, chunk = blockIdx.y, b = blockIdx.z;
  const BackwardChannel mine = backward_channel<kLanes>(lay, b);
  const int d = mine.d;
  const bool active = mine.active;
  Sink sink{stage, stage_v, dB_part + mine.part, dC_part + mine.part, N, active, 0};
  const auto plan = grootl::ChunkPlan::of(plans + b * grootl::chunk_plan_ints(L), L);
  acc_t scratch[2 * grootl::kScanChunk * kPer], dA_acc[kPer];
  grootl::chunk_backward(lay.channel(b, d), warp_lanes<kLanes, kPer>(active), plan, chunk,
                         gy + lay.u_offset(b, d), slot_states(Hr, b, d, D, L, N), slot_states(Ginc, b, d, D, L, N),
                         scratch, dA_acc, du + lay.u_offset(b, d), d_delta + lay.delta_out(b, d),
                         tails + ((int64_t)b * D + d) * grootl::scan_chunks(L), dA_chunks + chunk * dA_size + lay.dA_out(b, d),
                         sink);
  sink.finish();
}

// d_delta at each chunk's first position gets the term of the edge from the previous chunk's last node.
template <typename Layout, typename acc_t>
__global__ void __launch_bounds__(kRowsThreads)
    chunk_tails_kernel(Layout lay, int batch, const acc_t* tails, acc_t* d_delta) {
  const int D = lay.groups() * lay.group_channels(), chunks = grootl::scan_chunks(lay.L);
  const int64_t q = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (q >= (int64_t)batch * D * (chunks - 1)) return;
  const int c = 1 + q % (chunks - 1), d = q / (chunks - 1) % D, b = q / (chunks - 1) / D;
  d_delta[lay.delta_out(b, d) + (int64_t)grootl::chunk_first(c) * lay.channel(b, d).step_delta] +=
      tails[((int64_t)b * D + d) * chunks + c - 1];
}

// The trees of a batch's rows from their features (row 0's) and their plans: features by blocks of positions, then
// tree_build.h's phases over the grid of all rows' elements, then a block per row for the plan.
template <typename acc_t, typename Features>
void launch_build(const Features& features, int batch, const at::Tensor& like, const at::Tensor& context_lens,
                  const at::Tensor& start, int64_t k, int64_t distance, at::Tensor parent, at::Tensor order,
                  at::Tensor flags, at::Tensor ckpt_offset, at::Tensor sizes) {
  const int L = features.L;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t row_ints = grootl::build_scratch_ints(L, k);
  auto ints = at::empty({batch * row_ints}, like.options().dtype(at::kInt));
  auto bytes = at::empty({batch, L * k}, like.options().dtype(at::kByte));
  const at::TensorOptions acc_opts = like.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const at::Tensor sq = at::empty({batch, L}, acc_opts), dots = at::empty({batch, L * k}, acc_opts),
                   weights = at::empty({batch, L * k}, acc_opts);
  GROOTL_LAUNCH(dim3((L + kTile - 1) / kTile, batch), kTile * kSlices, stream, feature_kernel<acc_t, Features>)(
      features, (int)k, (int)distance, sq.data_ptr<acc_t>(), dots.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const grootl::BuildRows<acc_t> rows{L, (int)k, 1, sq.data_ptr<acc_t>(), dots.data_ptr<acc_t>(),
                                      weights.data_ptr<acc_t>(), ints.data_ptr<int32_t>(), bytes.data_ptr<uint8_t>(),
                                      context_lens.data_ptr<int64_t>(), start.data_ptr<int64_t>(),
                                      parent.data_ptr<int64_t>(), order.data_ptr<int64_t>()};
  GridRows par{batch, stream};
  grootl::build_trees(par, rows, (int)distance);
  const int64_t plan_work = rows.scratch(0).plan_work - rows.ints;  // each row's plan_work, row_ints apart
  GROOTL_LAUNCH(batch, kBuildThreads, stream, plan_kernel)(
      parent.data_ptr<int64_t>(), order.data_ptr<int64_t>(), nullptr, L, flags.data_ptr<uint8_t>(),
      ckpt_offset.data_ptr<int32_t>(), sizes.data_ptr<int32_t>(), ints.data_ptr<int32_t>() + plan_work, row_ints);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

int64_t channel_group_cuda(int64_t N) { return kBackwardThreads / lane_shape(N).lanes; }

// Blocks of channel_group_cuda(N) channels per group in a backward: its dB/dC partials per group.
template <typename Layout>
int backward_parts(const Layout& lay) {
  return (lay.group_channels() + channel_group_cuda(lay.N) - 1) / channel_group_cuda(lay.N);
}

int64_t max_state_cuda() { return kMaxState; }

std::vector<int64_t> plan_cuda(const at::Tensor& parent, const at::Tensor& order, at::Tensor flags,
                               at::Tensor ckpt_offset, at::Tensor sizes) {
  CHECK_CUDA_INPUT(parent);
  CHECK_CUDA_INPUT(order);
  const c10::cuda::CUDAGuard guard(parent.device());
  const int batch = parent.size(0), L = parent.size(1);
  auto status = at::empty({batch, 1}, parent.options().dtype(at::kInt));
  auto work = at::empty({batch, std::max<int64_t>(3 * L, grootl::plan_work_ints(L))}, parent.options().dtype(at::kInt));
  const auto stream = at::cuda::getCurrentCUDAStream();
  GROOTL_LAUNCH((batch + 63) / 64, 64, stream, check_kernel)(parent.data_ptr<int64_t>(), order.data_ptr<int64_t>(),
                                                            batch, L, status.data_ptr<int32_t>(),
                                                            work.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  GROOTL_LAUNCH(batch, kBuildThreads, stream, plan_kernel)(parent.data_ptr<int64_t>(), order.data_ptr<int64_t>(),
                                                          status.data_ptr<int32_t>(), L, flags.data_ptr<uint8_t>(),
                                                          ckpt_offset.data_ptr<int32_t>(), sizes.data_ptr<int32_t>(),
                                                          work.data_ptr<int32_t>(), work.size(1));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // the one sync: bad trees raise here
  const auto host = at::cat({status, sizes}, 1).cpu();
  const int32_t* h = host.data_ptr<int32_t>();
  std::vector<int64_t> largest(3, 0);
  for (int b = 0; b < batch; ++b) {
    TORCH_CHECK(h[b * 4] == grootl::kTreeOk, grootl::check_field(h[b * 4]), " row ", b, grootl::check_problem(h[b * 4]));
    for (int q = 0; q < 3; ++q) largest[q] = std::max<int64_t>(largest[q], h[b * 4 + 1 + q]);
  }
  return largest;
}

namespace {

template <typename T>
T* data_or_null(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

// A layout's forward on a grid of (channel blocks, rows); like: the input whose size(0) is the batch.
template <typename Layout>
void launch_forward(const Layout& lay, const at::Tensor& like, int64_t h_depth, at::Tensor y,
                    c10::optional<at::Tensor> root) {
  using scalar_t = typename Layout::scalar_type;
  using acc_t = typename Layout::acc_type;
  const int D = lay.groups() * lay.group_channels(), batch = like.size(0);
  const int64_t entries = grootl::forward_scratch_entries(h_depth);
  with_lane_shape(lay.N, [&](auto lanes, auto per) {
    constexpr int kLanes = decltype(lanes)::value, kPer = decltype(per)::value;
    const dim3 grid((D + kForwardThreads / kLanes - 1) / (kForwardThreads / kLanes), batch);
    const at::Tensor scratch = at::empty({(int64_t)grid.x * grid.y * kForwardThreads * entries * kPer},
                             like.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    GROOTL_LAUNCH(grid, kForwardThreads, at::cuda::getCurrentCUDAStream(),
                  forward_kernel<scalar_t, acc_t, Layout, kLanes, kPer>)(lay, entries, scratch.data_ptr<acc_t>(),
                                                                        y.data_ptr<scalar_t>(),
                                                                        data_or_null<acc_t>(root));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Blocks of a layout's channels per (group, row); d_delta and dA zeroed here, then added to.
template <typename Layout>
void launch_backward(const Layout& lay, const at::Tensor& like, const at::Tensor& ckpt_offset,
                     const at::Tensor& sizes, const std::vector<int64_t>& largest, const at::Tensor& gy,
                     c10::optional<at::Tensor> g_root, at::Tensor du, at::Tensor d_delta, at::Tensor dA,
                     at::Tensor dB_part, at::Tensor dC_part) {
  using scalar_t = typename Layout::scalar_type;
  using acc_t = typename Layout::acc_type;
  const int batch = like.size(0);
  const int parts = backward_parts(lay);
  const int64_t entries = grootl::backward_scratch_entries(largest[0], largest[1], largest[2]);
  d_delta.zero_();
  dA.zero_();
  with_lane_shape(lay.N, [&](auto lanes, auto per) {
    constexpr int kLanes = decltype(lanes)::value, kPer = decltype(per)::value;
    const dim3 grid(lay.groups() * parts, batch);
    const at::Tensor scratch = at::empty({(int64_t)grid.x * batch * kBackwardThreads * entries * kPer},
                             like.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    GROOTL_LAUNCH(grid, kBackwardThreads, at::cuda::getCurrentCUDAStream(),
                  backward_kernel<scalar_t, acc_t, Layout, kLanes, kPer>)(
        lay, ckpt_offset.data_ptr<int32_t>(), sizes.data_ptr<int32_t>(), gy.data_ptr<scalar_t>(),
        data_or_null<acc_t>(g_root), entries, scratch.data_ptr<acc_t>(),
        du.data_ptr<scalar_t>(), d_delta.data_ptr<acc_t>(), dA.data_ptr<acc_t>(), dB_part.data_ptr<acc_t>(),
        dC_part.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}


// Each row's chunk plan (chunk_plan_ints(L) ints per row), from a block per row.
at::Tensor chunk_plans(const at::Tensor& parent, const at::Tensor& order) {
  const int batch = parent.size(0), L = parent.size(1);
  auto plans = at::empty({batch, grootl::chunk_plan_ints(L)}, parent.options().dtype(at::kInt));
  auto work = at::empty({batch, 2 * (int64_t)L}, parent.options().dtype(at::kInt));
  GROOTL_LAUNCH(batch, kBuildThreads, at::cuda::getCurrentCUDAStream(), chunk_plan_kernel)(
      parent.data_ptr<int64_t>(), order.data_ptr<int64_t>(), L, plans.data_ptr<int32_t>(), work.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return plans;
}

// Passes 1 and 2 of the chunked scan into the slot buffers (a (3, batch, D, chunks * kSlots, N) tensor: Hr, T,
// Q); with gy the backward's (Q, then Ginc, too).
template <typename scalar_t, typename acc_t, typename Layout>
void launch_chunk_passes(const Layout& lay, int batch, const at::Tensor& plans, const scalar_t* gy,
                         const acc_t* g_root, acc_t* slots) {
  const int D = lay.groups() * lay.group_channels(), L = lay.L, N = lay.N;
  const int64_t size = (int64_t)batch * D * grootl::scan_chunks(L) * grootl::kSlots * N;
  acc_t *Hr = slots, *T = slots + size, *Q = gy ? slots + 2 * size : nullptr;
  const auto stream = at::cuda::getCurrentCUDAStream();
  with_lane_shape(N, [&](auto lanes, auto per) {
    constexpr int kLanes = decltype(lanes)::value, kPer = decltype(per)::value;
    const dim3 grid((D + kForwardThreads / kLanes - 1) / (kForwardThreads / kLanes), grootl::scan_chunks(L), batch);
    GROOTL_LAUNCH(grid, kForwardThreads, stream, chunk_forward_kernel<scalar_t, acc_t, Layout, kLanes, kPer, false>)(
        lay, plans.data_ptr<int32_t>(), gy, Hr, T, Q, (scalar_t*)nullptr, (acc_t*)nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const int64_t threads = (int64_t)batch * D * N;
  GROOTL_LAUNCH((int)((threads + kRowsThreads - 1) / kRowsThreads), kRowsThreads, stream, chunk_reduced_kernel<acc_t>)(
      plans.data_ptr<int32_t>(), batch, D, N, L, Hr, T, Q, g_root);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Lets kernel take `bytes` of dynamic shared memory (above 48 KiB a kernel must opt in).
template <typename Kernel>
void allow_dynamic_shared(Kernel kernel, int64_t bytes) {
#ifndef GROOTL_CUDA_EMULATION
  if (bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
#else
  (void)kernel;
  (void)bytes;
#endif
}

// Blocks the whole fused backward needs to fill the device: two per SM.
int whole_backward_blocks() {
#ifdef GROOTL_CUDA_EMULATION
  return 3;  // the tests reach both fused backwards
#else
  return 2 * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
#endif
}

// The fused kernel's mode for a Mamba-1 layout's rows that fit a block, or none. The backward runs whole
// (kBackward) where its blocks (a row and a channel group's channels each) fill the device, else kRoots.
template <typename Layout>
c10::optional<Fused> fused_mode(const Layout& lay, int batch, bool backward) {
  using scalar_t = typename Layout::scalar_type;
  using acc_t = typename Layout::acc_type;
  if constexpr (Layout::channel_t::scalar_decay) {
    return c10::nullopt;
  } else {
    const auto fits = [&](Fused mode) { return fused_fits<scalar_t, acc_t>(mode, lay.L, lay.N); };
    if (!backward) return fits(Fused::kForward) ? c10::optional<Fused>(Fused::kForward) : c10::nullopt;
    const bool fills = (int64_t)batch * backward_parts(lay) >= whole_backward_blocks();
    if (fills && fits(Fused::kBackward)) return Fused::kBackward;
    return fits(Fused::kRoots) ? c10::optional<Fused>(Fused::kRoots) : c10::nullopt;
  }
}

// fused_kernel in `mode` (from fused_mode) over the rows: a block per channel (kBackward: per channel group).
template <typename scalar_t, typename acc_t, typename Layout>
void launch_fused(Fused mode, const Layout& lay, int batch, const at::Tensor& plans, const scalar_t* gy,
                  const acc_t* g_root, const FusedOut<scalar_t, acc_t>& out) {
  if constexpr (!Layout::channel_t::scalar_decay) {
    const int64_t shared = fused_shared_bytes<scalar_t, acc_t>(mode, lay.L, lay.N);
    const bool whole = mode == Fused::kBackward;
    const int channels = whole ? (int)channel_group_cuda(lay.N) : 1;
    const dim3 grid(whole ? backward_parts(lay) : lay.D, batch);
    with_lane_shape(lay.N, [&](auto lanes, auto per) {
      constexpr int kLanes = decltype(lanes)::value, kPer = decltype(per)::value;
      const auto run = [&](auto kernel) {
        allow_dynamic_shared(kernel, shared);
        GROOTL_LAUNCH_SHARED(grid, grootl::scan_chunks(lay.L) * kLanes, shared, at::cuda::getCurrentCUDAStream(),
                             kernel)(lay, plans.data_ptr<int32_t>(), channels, gy, g_root, out);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (mode == Fused::kForward) run(fused_kernel<Fused::kForward, scalar_t, acc_t, Layout, kLanes, kPer>);
      if (mode == Fused::kRoots) run(fused_kernel<Fused::kRoots, scalar_t, acc_t, Layout, kLanes, kPer>);
      if (mode == Fused::kBackward) run(fused_kernel<Fused::kBackward, scalar_t, acc_t, Layout, kLanes, kPer>);
    });
  }
}

at::Tensor chunk_slots(int64_t parts, int batch, int D, int L, int N, const at::Tensor& like, at::ScalarType acc) {
  return at::empty({parts * batch * D * grootl::scan_chunks(L) * grootl::kSlots * N}, like.options().dtype(acc));
}

// The chunked forward: y and root.
template <typename Layout>
void launch_chunked_forward(const Layout& lay, const at::Tensor& like, const at::Tensor& parent,
                            const at::Tensor& order, at::Tensor y, c10::optional<at::Tensor> root) {
  using scalar_t = typename Layout::scalar_type;
  using acc_t = typename Layout::acc_type;
  const int D = lay.groups() * lay.group_channels(), L = lay.L, N = lay.N, batch = like.size(0);
  const at::Tensor plans = chunk_plans(parent, order);
  if (fused_mode(lay, batch, false)) {
    FusedOut<scalar_t, acc_t> out;
    out.y = y.data_ptr<scalar_t>();
    out.root = data_or_null<acc_t>(root);
    launch_fused<scalar_t, acc_t>(Fused::kForward, lay, batch, plans, nullptr, nullptr, out);
    return;
  }
  const at::Tensor slots = chunk_slots(2, batch, D, L, N, like, c10::CppTypeToScalarType<acc_t>::value);
  acc_t* Hr = slots.data_ptr<acc_t>();
  launch_chunk_passes<scalar_t, acc_t>(lay, batch, plans, (const scalar_t*)nullptr, (const acc_t*)nullptr, Hr);
  with_lane_shape(N, [&](auto lanes, auto per) {
    constexpr int kLanes = decltype(lanes)::value, kPer = decltype(per)::value;
    const dim3 grid((D + kForwardThreads / kLanes - 1) / (kForwardThreads / kLanes), grootl::scan_chunks(L), batch);
    GROOTL_LAUNCH(grid, kForwardThreads, at::cuda::getCurrentCUDAStream(),
                  chunk_forward_kernel<scalar_t, acc_t, Layout, kLanes, kPer, true>)(
        lay, plans.data_ptr<int32_t>(), (const scalar_t*)nullptr, Hr, (acc_t*)nullptr, (acc_t*)nullptr,
        y.data_ptr<scalar_t>(), data_or_null<acc_t>(root));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// The chunked backward: du, d_delta (every element written), dA (summed over chunks), dB/dC partials as
// launch_backward's.
template <typename Layout>
void launch_chunked_backward(const Layout& lay, const at::Tensor& like, const at::Tensor& parent,
                             const at::Tensor& order, const at::Tensor& gy, c10::optional<at::Tensor> g_root,
                             at::Tensor du, at::Tensor d_delta, at::Tensor dA, at::Tensor dB_part, at::Tensor dC_part) {
  using scalar_t = typename Layout::scalar_type;
  using acc_t = typename Layout::acc_type;
  const int D = lay.groups() * lay.group_channels(), L = lay.L, N = lay.N, chunks = grootl::scan_chunks(L);
  const int batch = like.size(0);
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor plans = chunk_plans(parent, order);
  const auto mode = fused_mode(lay, batch, true);
  FusedOut<scalar_t, acc_t> out;
  if (mode == Fused::kBackward) {
    out.du = du.data_ptr<scalar_t>();
    out.d_delta = d_delta.data_ptr<acc_t>();
    out.dA = dA.data_ptr<acc_t>();
    out.dB_part = dB_part.data_ptr<acc_t>();
    out.dC_part = dC_part.data_ptr<acc_t>();
    launch_fused<scalar_t, acc_t>(Fused::kBackward, lay, batch, plans, gy.data_ptr<scalar_t>(),
                                  data_or_null<acc_t>(g_root), out);
    return;
  }
  // Hr and Ginc for pass 3: from the fused kernel (two slot buffers), else from passes 1 and 2 (Hr, T, then Ginc)
  const bool roots = mode == Fused::kRoots;
  const int buffers = roots ? 2 : 3;
  const at::Tensor slots = chunk_slots(buffers, batch, D, L, N, like, acc);
  acc_t* const Hr = slots.data_ptr<acc_t>();
  acc_t* const Ginc = Hr + (buffers - 1) * (slots.numel() / buffers);
  if (roots) {
    out.Hr = Hr;
    out.Ginc = Ginc;
    launch_fused<scalar_t, acc_t>(Fused::kRoots, lay, batch, plans, gy.data_ptr<scalar_t>(),
                                  data_or_null<acc_t>(g_root), out);
  } else {
    launch_chunk_passes<scalar_t, acc_t>(lay, batch, plans, gy.data_ptr<scalar_t>(), data_or_null<acc_t>(g_root), Hr);
  }
  const at::Tensor tails = at::empty({batch, D, chunks}, like.options().dtype(acc));
  const at::Tensor dA_chunks = at::empty({chunks, dA.numel()}, like.options().dtype(acc));
  const int parts = backward_parts(lay);
  with_lane_shape(N, [&](auto lanes, auto per) {
    constexpr int kLanes = decltype(lanes)::value, kPer = decltype(per)::value;
    const dim3 grid(lay.groups() * parts, chunks, batch);
    GROOTL_LAUNCH(grid, kBackwardThreads, stream, chunk_backward_kernel<scalar_t, acc_t, Layout, kLanes, kPer>)(
        lay, plans.data_ptr<int32_t>(), gy.data_ptr<scalar_t>(), Hr, Ginc, dA.numel(),
        du.data_ptr<scalar_t>(), d_delta.data_ptr<acc_t>(), tails.data_ptr<acc_t>(), dA_chunks.data_ptr<acc_t>(),
        dB_part.data_ptr<acc_t>(), dC_part.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const int64_t fix = (int64_t)batch * D * (chunks - 1);
  if (fix > 0) {
    GROOTL_LAUNCH((int)((fix + kRowsThreads - 1) / kRowsThreads), kRowsThreads, stream, chunk_tails_kernel<Layout, acc_t>)(
        lay, batch, tails.data_ptr<acc_t>(), d_delta.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  at::Tensor dA_flat = dA.view({-1});
  at::sum_out(dA_flat, dA_chunks, {0});  // in a fixed order: deterministic
}

// Runs launch(layout) on u's device, with the Mamba-1 layout of the inputs in u's dtype (flags: null for the
// chunked kernels).
template <typename F>
void on_mamba1(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
               const at::Tensor& C, const at::Tensor& parent, const at::Tensor& order, const uint8_t* flags,
               F&& launch) {
  CHECK_CUDA_INPUT(u);
  const c10::cuda::CUDAGuard guard(u.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "grootl_tree_scan_cuda", [&] {
    launch(grootl::mamba1_layout<scalar_t, at::opmath_type<scalar_t>>(u, delta, A, B, C, parent, order, flags));
  });
}

// Runs launch(layout) on x's device, with the Mamba-2 layout of the inputs in x's dtype, d_dt and dA in one
// partial sum per head dim (flags: empty for the chunked kernels).
template <typename F>
void on_mamba2(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
               const at::Tensor& C, const at::Tensor& parent, const at::Tensor& order, const at::Tensor& flags,
               F&& launch) {
  CHECK_CUDA_INPUT(x);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor decay = grootl::mamba2_decay(dt, A);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "grootl_mamba2_tree_scan_cuda", [&] {
    launch(grootl::mamba2_layout<scalar_t, at::opmath_type<scalar_t>>(x, dt, decay, A, B, C, parent, order, flags,
                                                                      (int)x.size(3)));
  });
}

}  // namespace

void forward_cuda(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                  const at::Tensor& C, const at::Tensor& parent, const at::Tensor& order, const at::Tensor& flags,
                  int64_t h_depth, at::Tensor y, c10::optional<at::Tensor> root) {
  on_mamba1(u, delta, A, B, C, parent, order, flags.data_ptr<uint8_t>(),
            [&](const auto& lay) { launch_forward(lay, u, h_depth, y, root); });
}

void backward_cuda(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                   const at::Tensor& C, const at::Tensor& parent, const at::Tensor& order, const at::Tensor& flags,
                   const at::Tensor& ckpt_offset, const at::Tensor& sizes, const std::vector<int64_t>& largest,
                   const at::Tensor& gy, c10::optional<at::Tensor> g_root, at::Tensor du, at::Tensor d_delta,
                   at::Tensor dA_part, at::Tensor dB_part, at::Tensor dC_part) {
  on_mamba1(u, delta, A, B, C, parent, order, flags.data_ptr<uint8_t>(), [&](const auto& lay) {
    launch_backward(lay, u, ckpt_offset, sizes, largest, gy, g_root, du, d_delta, dA_part, dB_part, dC_part);
  });
}

// dB/dC partials: a group's blocks; d_dt and dA: one per head dim (a head's channels run on different warps and
// blocks).
std::vector<int64_t> mamba2_parts_cuda(int64_t heads_per_group, int64_t P, int64_t N) {
  return {(heads_per_group * P + channel_group_cuda(N) - 1) / channel_group_cuda(N), P};
}

void mamba2_forward_cuda(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
                         const at::Tensor& C, const at::Tensor& parent, const at::Tensor& order, const at::Tensor& flags,
                         int64_t h_depth, at::Tensor y, c10::optional<at::Tensor> root) {
  on_mamba2(x, dt, A, B, C, parent, order, flags,
            [&](const auto& lay) { launch_forward(lay, x, h_depth, y, root); });
}

void mamba2_backward_cuda(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
                          const at::Tensor& C, const at::Tensor& parent, const at::Tensor& order,
                          const at::Tensor& flags, const at::Tensor& ckpt_offset, const at::Tensor& sizes,
                          const std::vector<int64_t>& largest, const at::Tensor& gy, c10::optional<at::Tensor> g_root,
                          at::Tensor dx, at::Tensor d_dt, at::Tensor dA_part, at::Tensor dB_part, at::Tensor dC_part) {
  on_mamba2(x, dt, A, B, C, parent, order, flags, [&](const auto& lay) {
    launch_backward(lay, x, ckpt_offset, sizes, largest, gy, g_root, dx, d_dt, dA_part, dB_part, dC_part);
  });
}

void build_tree_cuda(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& B,
                     const at::Tensor& context_lens, const at::Tensor& start, int64_t k, int64_t distance,
                     at::Tensor parent, at::Tensor order, at::Tensor flags, at::Tensor ckpt_offset, at::Tensor sizes) {
  CHECK_CUDA_INPUT(u);
  const c10::cuda::CUDAGuard guard(u.device());
  const int D = u.size(1), L = u.size(2), N = B.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "grootl_build_tree_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const grootl::ScaledFeatures<scalar_t, acc_t> f{u.data_ptr<scalar_t>(), delta.data_ptr<acc_t>(),
                                                    B.data_ptr<scalar_t>(), D, N, L};
    launch_build<acc_t>(f, u.size(0), u, context_lens, start, k, distance, parent, order, flags, ckpt_offset, sizes);
  });
}

void build_grouped_tree_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& context_lens,
                             const at::Tensor& start, int64_t k, int64_t distance, at::Tensor parent, at::Tensor order,
                             at::Tensor flags, at::Tensor ckpt_offset, at::Tensor sizes) {
  CHECK_CUDA_INPUT(a);
  CHECK_CUDA_INPUT(b);
  const c10::cuda::CUDAGuard guard(a.device());
  const int G = a.size(1), C = a.size(2), L = a.size(3), N = b.size(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "grootl_build_grouped_tree_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const grootl::GroupedFeatures<scalar_t, acc_t> f{a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), G, C, N, L};
    launch_build<acc_t>(f, a.size(0), a, context_lens, start, k, distance, parent, order, flags, ckpt_offset, sizes);
  });
}

int64_t max_span_cuda() { return grootl::kMaxSpan; }

std::vector<std::string> chunked_kernels_cuda(int64_t batch, int64_t D, int64_t L, int64_t N, int64_t element_size) {
  TORCH_CHECK(batch >= 1 && D >= 1 && L >= 1, "chunked_kernels takes batch, D, L >= 1");
  std::vector<std::string> kinds;
  const auto name = [](c10::optional<Fused> mode) {
    return !mode ? "per pass" : *mode == Fused::kRoots ? "fused passes 1-2" : "fused";
  };
  const auto ask = [&](auto zero, auto acc_zero) {
    using scalar_t = decltype(zero);
    using acc_t = decltype(acc_zero);
    const grootl::Mamba1Layout<scalar_t, acc_t> lay{nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                                                    nullptr, (int)D, (int)N, (int)L};
    kinds = {name(fused_mode(lay, (int)batch, false)), name(fused_mode(lay, (int)batch, true))};
  };
  if (element_size == 8)
    ask(double(), double());
  else if (element_size == 4)
    ask(float(), float());
  else
    ask(at::Half(), float());
  return kinds;
}

void forward_chunked_cuda(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                          const at::Tensor& C, const at::Tensor& parent, const at::Tensor& order, at::Tensor y,
                          c10::optional<at::Tensor> root) {
  on_mamba1(u, delta, A, B, C, parent, order, nullptr,
            [&](const auto& lay) { launch_chunked_forward(lay, u, parent, order, y, root); });
}

void backward_chunked_cuda(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                           const at::Tensor& C, const at::Tensor& parent, const at::Tensor& order, const at::Tensor& gy,
                           c10::optional<at::Tensor> g_root, at::Tensor du, at::Tensor d_delta, at::Tensor dA,
                           at::Tensor dB_part, at::Tensor dC_part) {
  on_mamba1(u, delta, A, B, C, parent, order, nullptr, [&](const auto& lay) {
    launch_chunked_backward(lay, u, parent, order, gy, g_root, du, d_delta, dA, dB_part, dC_part);
  });
}

void mamba2_forward_chunked_cuda(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
                                 const at::Tensor& C, const at::Tensor& parent, const at::Tensor& order, at::Tensor y,
                                 c10::optional<at::Tensor> root) {
  on_mamba2(x, dt, A, B, C, parent, order, at::empty({0}, parent.options().dtype(at::kByte)),
            [&](const auto& lay) { launch_chunked_forward(lay, x, parent, order, y, root); });
}

void mamba2_backward_chunked_cuda(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
                                  const at::Tensor& C, const at::Tensor& parent, const at::Tensor& order,
                                  const at::Tensor& gy, c10::optional<at::Tensor> g_root, at::Tensor dx,
                                  at::Tensor d_dt, at::Tensor dA_part, at::Tensor dB_part, at::Tensor dC_part) {
  on_mamba2(x, dt, A, B, C, parent, order, at::empty({0}, parent.options().dtype(at::kByte)), [&](const auto& lay) {
    launch_chunked_backward(lay, x, parent, order, gy, g_root, dx, d_dt, dA_part, dB_part, dC_part);
  });
}
