// CPU extension: the tree_scan.h / tree_build.h algorithms under at::parallel_for.
// Outputs are passed in preallocated (grootl/tree/native.py allocates them) and every element is written.
#include <torch/extension.h>

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "scan_layouts.h"
#include "tree_build.h"
#include "tree_scan.h"

namespace {

using grootl::mamba1_layout;
using grootl::mamba2_decay;
using grootl::mamba2_layout;

constexpr int64_t kGroup = 16;  // channels per task; dB/dC partial sums are kept per (row, group)

int64_t channel_group(int64_t /*N*/) { return kGroup; }
int64_t chunk_size() { return grootl::kChunk; }
int64_t max_state() { return std::numeric_limits<int32_t>::max(); }

// Checks each row's tree, then plans it (flags, checkpoint offsets, sizes); returns the largest (forward stack
// depth, backward stack depth, checkpoint entries) over the rows.
std::vector<int64_t> plan(const at::Tensor& parent, const at::Tensor& order, at::Tensor flags, at::Tensor ckpt_offset,
                          at::Tensor sizes) {
  const int64_t batch = parent.size(0), L = parent.size(1);
  const int64_t* p = parent.data_ptr<int64_t>();
  const int64_t* o = order.data_ptr<int64_t>();
  uint8_t* f = flags.data_ptr<uint8_t>();
  int32_t* ck = ckpt_offset.data_ptr<int32_t>();
  int32_t* sz = sizes.data_ptr<int32_t>();
  const int64_t chunks = grootl::num_chunks((int)L);
  std::vector<int> status(batch);
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> work(std::max<int64_t>(3 * L, grootl::plan_work_ints((int)L)));
    grootl::SerialPar par;
    for (int64_t b = begin; b < end; ++b) {
      status[b] = grootl::check_row(p + b * L, o + b * L, (int)L, work.data());
      if (status[b] == grootl::kTreeOk)
        grootl::plan_phases(par, p + b * L, o + b * L, (int)L, f + b * L, ck + b * (chunks + 1), sz + b * 3,
                            work.data());
    }
  });
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(status[b] == grootl::kTreeOk, grootl::check_field(status[b]), " row ", b, grootl::check_problem(status[b]));
  }
  std::vector<int64_t> largest(3, 0);
  for (int64_t b = 0; b < batch; ++b)
    for (int q = 0; q < 3; ++q) largest[q] = std::max<int64_t>(largest[q], sz[b * 3 + q]);
  return largest;
}

// Every channel of every row on its own; h_depth: a bound on the plan's forward stack depth
// (grootl.tree.graph.stack_bound).
template <typename scalar_t, typename acc_t, typename Layout>
void forward_rows(const Layout& lay, int64_t batch, int64_t h_depth, scalar_t* y, acc_t* root) {
  const int64_t D = (int64_t)lay.groups() * lay.group_channels(), N = lay.N;
  at::parallel_for(0, batch * D, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(grootl::forward_scratch_entries(h_depth) * N), cur(N);
    const grootl::SerialLanes lanes{(int)N};
    for (int64_t bd = begin; bd < end; ++bd) {
      const int b = bd / D, d = bd % D;
      grootl::tree_scan_forward(lay.channel(b, d), lanes, grootl::Slots<acc_t>{scratch.data(), 1, (int)N},
                                cur.data(), y + lay.u_offset(b, d), root ? root + bd * N : nullptr);
    }
  });
}

// B, C: (batch, L, N).
void forward(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
             const at::Tensor& C, const at::Tensor& parent, const at::Tensor& order, const at::Tensor& flags,
             int64_t h_depth, at::Tensor y, c10::optional<at::Tensor> root) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "grootl_tree_scan_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_rows(mamba1_layout<scalar_t, acc_t>(u, delta, A, B, C, parent, order, flags.data_ptr<uint8_t>()),
                 u.size(0), h_depth, y.data_ptr<scalar_t>(), root.has_value() ? root->data_ptr<acc_t>() : nullptr);
  });
}

// y (batch, L, H, P); root (batch, H, P, N).
void mamba2_forward(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
                    const at::Tensor& C, const at::Tensor& parent, const at::Tensor& order, const at::Tensor& flags,
                    int64_t h_depth, at::Tensor y, c10::optional<at::Tensor> root) {
  const at::Tensor decay = mamba2_decay(dt, A);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "grootl_mamba2_tree_scan_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_rows(mamba2_layout<scalar_t, acc_t>(x, dt, decay, A, B, C, parent, order, flags, 1), x.size(0), h_depth,
                 y.data_ptr<scalar_t>(), root.has_value() ? root->data_ptr<acc_t>() : nullptr);
  });
}

template <typename acc_t>
struct GroupSink {  // sums the task's channels into its (L, N) partials of dB and dC
  acc_t* dB;
  acc_t* dC;
  int64_t N;
  void add(int, int n, int64_t v, acc_t b_term, acc_t c_term) {
    dB[v * N + n] += b_term;
    dC[v * N + n] += c_term;
  }
  void commit(int64_t) {}
  void finish() {}
};

// Tasks of `per_task` channels of one group of one row, run in turn; the dB/dC partials (batch, groups, parts,
// L, N) are per task. d_delta and dA (zeroed here) as the layout places them. Scratch is sized per row (sizes).
template <typename scalar_t, typename acc_t, typename Layout>
void backward_rows(const Layout& lay, int64_t batch, int64_t per_task, const at::Tensor& ckpt_offset,
                   const at::Tensor& sizes, const scalar_t* gy, const acc_t* g_root, scalar_t* du, at::Tensor d_delta,
                   at::Tensor dA, at::Tensor dB_part, at::Tensor dC_part) {
  const int64_t G = lay.groups(), per_group = lay.group_channels(), D = G * per_group, N = lay.N, L = lay.L;
  const int64_t parts = (per_group + per_task - 1) / per_task, chunks = grootl::num_chunks((int)L);
  d_delta.zero_();
  dA.zero_();
  const int32_t* sz = sizes.data_ptr<int32_t>();
  const int32_t* ck = ckpt_offset.data_ptr<int32_t>();
  at::parallel_for(0, batch * G * parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch, regs(3 * N);
    const grootl::SerialLanes lanes{(int)N};
    const grootl::BackwardRegs<acc_t> r{regs.data(), regs.data() + N, regs.data() + 2 * N};
    for (int64_t task = begin; task < end; ++task) {
      const int b = task / (G * parts), g = task / parts % G, part = task % parts;
      const int32_t* row_sizes = sz + b * 3;
      scratch.resize(grootl::backward_scratch_entries(row_sizes[0], row_sizes[1], row_sizes[2]) * N);
      GroupSink<acc_t> sink{dB_part.data_ptr<acc_t>() + task * N * L, dC_part.data_ptr<acc_t>() + task * N * L, N};
      std::fill(sink.dB, sink.dB + N * L, acc_t(0));
      std::fill(sink.dC, sink.dC + N * L, acc_t(0));
      for (int64_t c = part * per_task; c < std::min(per_group, (part + 1) * per_task); ++c) {
        const int d = g * per_group + c;
        grootl::tree_scan_backward(lay.channel(b, d), lanes, gy + lay.u_offset(b, d),
                                   g_root ? g_root + (b * D + d) * N : nullptr, ck + b * (chunks + 1), row_sizes[0],
                                   row_sizes[1], grootl::Slots<acc_t>{scratch.data(), 1, (int)N}, r,
                                   du + lay.u_offset(b, d), d_delta.data_ptr<acc_t>() + lay.delta_out(b, d),
                                   dA.data_ptr<acc_t>() + lay.dA_out(b, d), sink);
      }
    }
  });
}

// d_delta is in the accumulation type; dA (batch, D, N) per channel; dB_part, dC_part (batch, groups, L, N) per
// channel group (kGroup channels). The caller sums the partials.
void backward(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
              const at::Tensor& C, const at::Tensor& parent, const at::Tensor& order, const at::Tensor& flags,
              const at::Tensor& ckpt_offset, const at::Tensor& sizes, const std::vector<int64_t>& /*max_sizes*/,
              const at::Tensor& gy, c10::optional<at::Tensor> g_root, at::Tensor du, at::Tensor d_delta,
              at::Tensor dA_part, at::Tensor dB_part, at::Tensor dC_part) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "grootl_tree_scan_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    backward_rows(mamba1_layout<scalar_t, acc_t>(u, delta, A, B, C, parent, order, flags.data_ptr<uint8_t>()),
                  u.size(0), kGroup, ckpt_offset, sizes, gy.data_ptr<scalar_t>(),
                  g_root.has_value() ? g_root->data_ptr<acc_t>() : nullptr, du.data_ptr<scalar_t>(), d_delta, dA_part,
                  dB_part, dC_part);
  });
}

// The partial sums of the Mamba-2 backward: dB and dC per head (H / G per group), d_dt and dA summed in place.
std::vector<int64_t> mamba2_parts(int64_t heads_per_group, int64_t /*P*/, int64_t /*N*/) { return {heads_per_group, 1}; }

// dx (batch, L, H, P); d_dt (batch, 1, L, H) and dA (batch, 1, H) in the accumulation type; dB_part, dC_part
// (batch, G, H / G, L, N) per head. The caller sums the partials.
void mamba2_backward(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
                     const at::Tensor& C, const at::Tensor& parent, const at::Tensor& order, const at::Tensor& flags,
                     const at::Tensor& ckpt_offset, const at::Tensor& sizes, const std::vector<int64_t>& /*max_sizes*/,
                     const at::Tensor& gy, c10::optional<at::Tensor> g_root, at::Tensor dx, at::Tensor d_dt,
                     at::Tensor dA_part, at::Tensor dB_part, at::Tensor dC_part) {
  const at::Tensor decay = mamba2_decay(dt, A);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "grootl_mamba2_tree_scan_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    backward_rows(mamba2_layout<scalar_t, acc_t>(x, dt, decay, A, B, C, parent, order, flags, 1), x.size(0),
                  x.size(3), ckpt_offset, sizes, gy.data_ptr<scalar_t>(),
                  g_root.has_value() ? g_root->data_ptr<acc_t>() : nullptr, dx.data_ptr<scalar_t>(), d_dt, dA_part,
                  dB_part, dC_part);
  });
}

// The chain scan plus modulation * the tree scan (tree_scan.h's chain_tree_forward), one channel per task step.
// B, C: (batch, L, N); order: any DFS preorder from the root L-1. state (batch, D, N) may be absent.
void chain_tree_forward_cpu(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                            const at::Tensor& C, const at::Tensor& parent, const at::Tensor& order, double modulation,
                            at::Tensor y, c10::optional<at::Tensor> state) {
  const int64_t batch = u.size(0), D = u.size(1), L = u.size(2), N = B.size(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "grootl_chain_tree_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* y_ptr = y.data_ptr<scalar_t>();
    acc_t* state_ptr = state.has_value() ? state->data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, batch * D, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> scratch(grootl::kChainTreeForwardBuffers * L * N + N);
      for (int64_t bd = begin; bd < end; ++bd) {
        const auto ch = mamba1_layout<scalar_t, acc_t>(u, delta, A, B, C, parent, order, nullptr).channel(bd / D, bd % D);
        grootl::chain_tree_forward(ch, (acc_t)modulation, scratch.data(), y_ptr + bd * L,
                                   state_ptr ? state_ptr + bd * N : nullptr);
      }
    });
  });
}

// Backward of chain_tree_forward_cpu: du; d_delta in the accumulation type; dA_part (batch, D, N) per channel;
// dB_part, dC_part (batch, groups, L, N) per channel group (the caller sums the partials).
void chain_tree_backward_cpu(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                             const at::Tensor& C, const at::Tensor& parent, const at::Tensor& order, double modulation,
                             const at::Tensor& gy, c10::optional<at::Tensor> g_state, at::Tensor du,
                             at::Tensor d_delta, at::Tensor dA_part, at::Tensor dB_part, at::Tensor dC_part) {
  const int64_t batch = u.size(0), D = u.size(1), L = u.size(2), N = B.size(2);
  const int64_t groups = (D + kGroup - 1) / kGroup;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "grootl_chain_tree_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gy_ptr = gy.data_ptr<scalar_t>();
    const acc_t* g_state_ptr = g_state.has_value() ? g_state->data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, batch * groups, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> scratch(grootl::kChainTreeBackwardBuffers * L * N + N);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / groups, grp = task % groups;
        GroupSink<acc_t> sink{dB_part.data_ptr<acc_t>() + task * N * L, dC_part.data_ptr<acc_t>() + task * N * L, N};
        std::fill(sink.dB, sink.dB + N * L, acc_t(0));
        std::fill(sink.dC, sink.dC + N * L, acc_t(0));
        for (int64_t d = grp * kGroup; d < std::min(D, (grp + 1) * kGroup); ++d) {
          const int64_t bd = b * D + d;
          const auto ch = mamba1_layout<scalar_t, acc_t>(u, delta, A, B, C, parent, order, nullptr).channel(b, d);
          grootl::chain_tree_backward(ch, (acc_t)modulation, gy_ptr + bd * L,
                                      g_state_ptr ? g_state_ptr + bd * N : nullptr, scratch.data(),
                                      du.data_ptr<scalar_t>() + bd * L, d_delta.data_ptr<acc_t>() + bd * L,
                                      dA_part.data_ptr<acc_t>() + bd * N, sink);
        }
      }
    });
  });
}

// For one row, sq[t] = |X[t]|^2 and dots[t*k + j-1] = X[t] . X[t-j] (graph.grouped_edge_weights' bits: sums over
// c and over n, then over g, each a grootl::PairwiseSum), here for chunks of positions with each factor's rows
// outer and positions inner (contiguous reads); for manhattan dots[t*k + j-1] = grootl::manhattan_sum(t, t-j).
template <typename acc_t, typename Features>
void feature_dots(const Features& f, int64_t k, int distance, acc_t* sq, acc_t* dots) {
  const int64_t L = f.L, per = k + 1;  // per position: the norm, then the k dots
  if (distance == grootl::kManhattan) {
    at::parallel_for(0, L, 16, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        for (int64_t j = 1; j <= k; ++j)
          dots[t * k + j - 1] = j <= t ? grootl::manhattan_sum<acc_t>(f, (int)t, (int)(t - j)) : acc_t(0);
    });
    return;
  }
  at::parallel_for(0, L, 64, [&](int64_t t0, int64_t t1) {
    const int64_t lo = std::max<int64_t>(0, t0 - k), n = (t1 - t0) * per;
    std::vector<acc_t> x(t1 - lo), a_sums(n), b_sums(n);
    std::vector<grootl::PairwiseSum<acc_t>> sums(n), total(n);
    // sums over one factor's rows (a_g's C or b_g's N) of its products at (t, t) and (t, t - j), into out
    auto factor_sums = [&](int rows, auto&& value, acc_t* out) {
      std::fill(sums.begin(), sums.end(), grootl::PairwiseSum<acc_t>{});
      for (int r = 0; r < rows; ++r) {
        for (int64_t t = lo; t < t1; ++t) x[t - lo] = value(r, (int)t);
        for (int64_t t = t0; t < t1; ++t) {
          const acc_t xt = x[t - lo];
          grootl::PairwiseSum<acc_t>* sum = &sums[(t - t0) * per];
          sum[0].add(xt * xt);
          for (int64_t j = 1; j <= std::min(k, t); ++j) sum[j].add(xt * x[t - j - lo]);
        }
      }
      for (int64_t i = 0; i < n; ++i) out[i] = sums[i].total();
    };
    for (int g = 0; g < f.groups(); ++g) {
      factor_sums(f.C, [&](int c, int t) { return f.a(g, c, t); }, a_sums.data());
      factor_sums(f.N, [&](int m, int t) { return f.b(g, m, t); }, b_sums.data());
      for (int64_t i = 0; i < n; ++i) total[i].add(a_sums[i] * b_sums[i]);
    }
    for (int64_t t = t0; t < t1; ++t) {
      sq[t] = total[(t - t0) * per].total();
      for (int64_t j = 1; j <= k; ++j) dots[t * k + j - 1] = total[(t - t0) * per + j].total();
    }
  });
}

// The trees of a batch's rows from their features (grootl::ScaledFeatures or grootl::GroupedFeatures of row 0) and
// their plans; parent, order, flags, ckpt_offset, sizes as plan() makes them. A row at a time per thread, on
// buffers the thread reuses (grootl::BuildRows with stride 0).
template <typename acc_t, typename Features>
void build_rows(const Features& features, int64_t batch, const at::Tensor& context_lens, const at::Tensor& start,
                int64_t k, int64_t distance, at::Tensor parent, at::Tensor order, at::Tensor flags,
                at::Tensor ckpt_offset, at::Tensor sizes) {
  const int L = features.L;
  const int64_t chunks = grootl::num_chunks(L);
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sq(L), dots(L * k), weight(L * k);
    std::vector<int32_t> ints(grootl::build_scratch_ints(L, (int)k));
    std::vector<uint8_t> bytes(L * k);
    const grootl::BuildRows<acc_t> rows{L, (int)k, 0, sq.data(), dots.data(), weight.data(), ints.data(),
                                        bytes.data(), context_lens.data_ptr<int64_t>(), start.data_ptr<int64_t>(),
                                        parent.data_ptr<int64_t>(), order.data_ptr<int64_t>()};
    grootl::SerialPar plan_par;
    for (int64_t b = begin; b < end; ++b) {
      feature_dots(features.row(b), k, (int)distance, sq.data(), dots.data());
      grootl::SerialRows par{(int)b};
      grootl::build_trees(par, rows, (int)distance);
      grootl::plan_phases(plan_par, rows.parent + b * L, rows.order + b * L, L, flags.data_ptr<uint8_t>() + b * L,
                          ckpt_offset.data_ptr<int32_t>() + b * (chunks + 1), sizes.data_ptr<int32_t>() + b * 3,
                          rows.scratch(0).plan_work);
    }
  });
}

// Mamba-1 features: u, delta (batch, D, L; delta in the accumulation type), B (batch, N, L).
void build_tree(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& B, const at::Tensor& context_lens,
                const at::Tensor& start, int64_t k, int64_t distance, at::Tensor parent, at::Tensor order,
                at::Tensor flags, at::Tensor ckpt_offset, at::Tensor sizes) {
  const int D = u.size(1), L = u.size(2), N = B.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "grootl_build_tree", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const grootl::ScaledFeatures<scalar_t, acc_t> f{u.data_ptr<scalar_t>(), delta.data_ptr<acc_t>(),
                                                    B.data_ptr<scalar_t>(), D, N, L};
    build_rows<acc_t>(f, u.size(0), context_lens, start, k, distance, parent, order, flags, ckpt_offset, sizes);
  });
}

// Grouped (Mamba-2) features: a (batch, G, C, L), b (batch, G, N, L).
void build_grouped_tree(const at::Tensor& a, const at::Tensor& b, const at::Tensor& context_lens,
                        const at::Tensor& start, int64_t k, int64_t distance, at::Tensor parent, at::Tensor order,
                        at::Tensor flags, at::Tensor ckpt_offset, at::Tensor sizes) {
  const int G = a.size(1), C = a.size(2), L = a.size(3), N = b.size(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "grootl_build_grouped_tree", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const grootl::GroupedFeatures<scalar_t, acc_t> f{a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), G, C, N, L};
    build_rows<acc_t>(f, a.size(0), context_lens, start, k, distance, parent, order, flags, ckpt_offset, sizes);
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "GrootL tree scan, CPU";
  m.def("channel_group", &channel_group, "channels per dB/dC partial sum");
  m.def("max_state", &max_state, "largest N the scan kernels take");
  m.def("chunk_size", &chunk_size, "nodes per backward recompute chunk");
  m.def("plan", &plan, "row plans of a tree; returns the largest stack sizes over the rows");
  m.def("forward", &forward, "tree scan forward (B, C as (batch, L, N))");
  m.def("backward", &backward, "tree scan backward (partial sums for dA, dB, dC)");
  m.def("mamba2_forward", &mamba2_forward, "tree scan forward, Mamba-2 layout (scalar decay per head, grouped B, C)");
  m.def("mamba2_backward", &mamba2_backward, "its backward (partial sums for d_dt, dA, dB, dC)");
  m.def("mamba2_parts", &mamba2_parts, "(dB/dC partials per group, d_dt/dA partials) of the Mamba-2 backward");
  m.def("chain_tree_forward", &chain_tree_forward_cpu, "chain scan + modulation * tree scan (B, C as (batch, L, N))");
  m.def("chain_tree_backward", &chain_tree_backward_cpu, "its backward (partial sums for dA, dB, dC)");
  m.def("build_tree", &build_tree, "minimum spanning tree of the token graph, rooted at L-1, and its plan");
  m.def("build_grouped_tree", &build_grouped_tree, "build_tree from grouped (Mamba-2) features a_g (outer) b_g");
}
