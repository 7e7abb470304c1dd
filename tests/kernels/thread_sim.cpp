// Test harness: runs the shared algorithms the way kernels/cuda.cu does, but on CPU threads, so that their
// parallel paths are tested without a GPU. float64 only.
//   scan:  a channel's N states spread over `lanes` threads, `per` states each, scratch interleaved across
//          the lanes, per-channel results written by the leader lane; the lanes meet at a barrier for every
//          sum over n (the GPU's shuffles).
//   build: tree_build.h's phases on `threads` threads that share each phase's items and meet at a barrier
//          after it (the GPU's block), racing as a block's threads do.
#include <torch/extension.h>

#include <atomic>
#include <barrier>
#include <thread>
#include <vector>

#include "tree_build.h"
#include "tree_scan.h"

namespace {

struct Meeting {  // the lanes of one channel
  explicit Meeting(int lanes) : sync(lanes), vals(lanes) {}
  std::barrier<> sync;
  std::vector<double> vals;
};

struct ThreadLanes {
  int per, lane, lanes;
  Meeting* meet;
  int first() const { return lane; }
  int count() const { return lanes; }
  bool leader() const { return lane == 0; }
  double sum(double x) const {
    meet->vals[lane] = x;
    meet->sync.arrive_and_wait();
    double total = 0;
    for (double v : meet->vals) total += v;
    meet->sync.arrive_and_wait();  // nobody overwrites vals before every lane has read them
    return total;
  }
};

struct RowSink {  // the channel's terms added straight into the row's (L, N) dB and dC
  double* dB;
  double* dC;
  int64_t N;
  void add(int, int n, int64_t v, double b_term, double c_term) {
    dB[v * N + n] += b_term;  // lanes own distinct n: no two threads touch one element
    dC[v * N + n] += c_term;
  }
  void commit(int64_t) {}
  void finish() {}
};

using Channel = grootl::Channel<double, double>;

Channel channel(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                const at::Tensor& C, const at::Tensor& parent, const at::Tensor& order, const at::Tensor& flags,
                int64_t b, int64_t d) {
  const int64_t D = u.size(1), L = u.size(2), N = B.size(2);
  return {u.data_ptr<double>() + (b * D + d) * L, delta.data_ptr<double>() + (b * D + d) * L,
          A.data_ptr<double>() + d * N,           B.data_ptr<double>() + b * L * N,
          C.data_ptr<double>() + b * L * N,       parent.data_ptr<int64_t>() + b * L,
          order.data_ptr<int64_t>() + b * L,      flags.data_ptr<uint8_t>() + b * L,
          (int)L,                                 (int)N};
}

// Runs body(lane_policy, slots_base) on `lanes` threads for one channel; slots interleaved by lane.
template <typename Body>
void on_lanes(int lanes, int per, int64_t entries, Body body) {
  Meeting meet(lanes);
  std::vector<double> scratch(std::max<int64_t>(entries, 1) * per * lanes);
  std::vector<std::thread> threads;
  for (int lane = 0; lane < lanes; ++lane)
    threads.emplace_back([&, lane] {
      body(ThreadLanes{per, lane, lanes, &meet}, grootl::Slots<double>{scratch.data() + lane, lanes, per});
    });
  for (auto& t : threads) t.join();
}

void forward(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
             const at::Tensor& C, const at::Tensor& parent, const at::Tensor& order, const at::Tensor& flags,
             int64_t h_depth, int64_t lanes, at::Tensor y, at::Tensor root) {
  const int64_t batch = u.size(0), D = u.size(1), L = u.size(2), N = B.size(2);
  const int per = (int)((N + lanes - 1) / lanes);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t d = 0; d < D; ++d) {
      const Channel ch = channel(u, delta, A, B, C, parent, order, flags, b, d);
      on_lanes((int)lanes, per, grootl::forward_scratch_entries((int)h_depth),
               [&](const ThreadLanes& ln, const grootl::Slots<double>& slots) {
                 std::vector<double> cur(per);
                 grootl::tree_scan_forward(ch, ln, slots, cur.data(), y.data_ptr<double>() + (b * D + d) * L,
                                           root.data_ptr<double>() + (b * D + d) * N);
               });
    }
}

void backward(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
              const at::Tensor& C, const at::Tensor& parent, const at::Tensor& order, const at::Tensor& flags,
              const at::Tensor& ckpt_offset, const at::Tensor& sizes, const at::Tensor& gy, const at::Tensor& g_root,
              int64_t lanes, at::Tensor du, at::Tensor d_delta, at::Tensor dA, at::Tensor dB, at::Tensor dC) {
  const int64_t batch = u.size(0), D = u.size(1), L = u.size(2), N = B.size(2);
  const int64_t chunks = grootl::num_chunks((int)L);
  const int per = (int)((N + lanes - 1) / lanes);
  dB.zero_();
  dC.zero_();
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t d = 0; d < D; ++d) {
      const Channel ch = channel(u, delta, A, B, C, parent, order, flags, b, d);
      const int32_t* sz = sizes.data_ptr<int32_t>() + b * 3;
      const int64_t bd = b * D + d;
      on_lanes((int)lanes, per, grootl::backward_scratch_entries(sz[0], sz[1], sz[2]),
               [&](const ThreadLanes& ln, const grootl::Slots<double>& slots) {
                 std::vector<double> regs(3 * per);
                 RowSink sink{dB.data_ptr<double>() + b * L * N, dC.data_ptr<double>() + b * L * N, N};
                 grootl::tree_scan_backward(ch, ln, gy.data_ptr<double>() + bd * L, g_root.data_ptr<double>() + bd * N,
                                            ckpt_offset.data_ptr<int32_t>() + b * (chunks + 1), sz[0], sz[1], slots,
                                            grootl::BackwardRegs<double>{regs.data(), regs.data() + per,
                                                                         regs.data() + 2 * per},
                                            du.data_ptr<double>() + bd * L, d_delta.data_ptr<double>() + bd * L,
                                            dA.data_ptr<double>() + bd * N, sink);
               });
    }
}

struct ThreadPar {  // one thread of a simulated block
  int tid, threads;
  std::barrier<>* sync;
  std::atomic<bool>* flag;
  template <typename F>
  void each(int n, F&& body) {
    for (int i = tid; i < n; i += threads) body(i);
    sync->arrive_and_wait();
  }
  bool any(bool x) {
    if (x) flag->store(true);
    sync->arrive_and_wait();
    const bool result = flag->load();
    sync->arrive_and_wait();
    if (tid == 0) flag->store(false);
    sync->arrive_and_wait();
    return result;
  }
};

// weights: (batch, L * k) by edge id (only existing edges are read).
void build_tree(const at::Tensor& weights, const at::Tensor& context_lens, const at::Tensor& start, int64_t L,
                int64_t k, int64_t threads, at::Tensor parent, at::Tensor order) {
  const int64_t batch = weights.size(0);
  for (int64_t b = 0; b < batch; ++b) {
    std::vector<int32_t> ints(grootl::build_scratch_ints((int)L, (int)k));
    std::vector<uint8_t> bytes(L * k);
    const auto scratch = grootl::build_scratch(ints.data(), bytes.data(), (int)L, (int)k);
    std::barrier<> sync(threads);
    std::atomic<bool> flag{false};
    std::vector<std::thread> pool;
    for (int tid = 0; tid < threads; ++tid)
      pool.emplace_back([&, tid] {
        ThreadPar par{tid, (int)threads, &sync, &flag};
        grootl::build_row(par, weights.data_ptr<double>() + b * L * k, (int)L, (int)k,
                          context_lens.data_ptr<int64_t>()[b], start.data_ptr<int64_t>()[b], scratch,
                          parent.data_ptr<int64_t>() + b * L, order.data_ptr<int64_t>() + b * L);
      });
    for (auto& t : pool) t.join();
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "tree scan forward on lanes of CPU threads (float64; B, C as (batch, L, N))");
  m.def("backward", &backward, "tree scan backward on lanes of CPU threads (float64)");
  m.def("build_tree", &build_tree, "tree build phases on a block of CPU threads (float64 weights)");
}
