// The GrootL single-root tree scan, one (batch row, channel) at a time. Written once for host and device:
// kernels/cpu.cpp runs a channel on one thread (its N states in a loop), kernels/cuda.cu spreads a channel's
// N states over a group of lanes of a warp. The `Lanes` policy says which states a thread owns and how the
// channel's sums over n are formed (SerialLanes below; WarpLanes in cuda.cu). The `Channel` says where a
// channel's inputs live and whether its decay is per state (Mamba-1) or one scalar per head (Mamba-2); a
// layout (Mamba1Layout, Mamba2Layout) makes the channels of a batch.
//
// For one row and channel d, with a = exp(delta * A[d]) and X[v] = delta[v] * u[v] * B[v, :]:
//     H[v] = X[v] + sum over children c of v of a(c + 1) * H[c],      y[v] = C[v, :] . H[v]
// Mamba-1: a channel is one of D, a(t) = exp(delta[t] * A[d, n]) per state. Mamba-2: a channel is a (head h,
// head dim p), u = x[:, h, p], delta = dt[:, h], B and C the head's group's, and a(t) = exp(dt[t, h] * A[h]) one
// scalar for the head's P * N states, read from a table made once per (row, t, head).
// The forward visits nodes leaves-to-root (reversed DFS preorder) and keeps the pending child sums on a
// stack: in that order the only open sums belong to ancestors of the current node, and the parent's is on
// top. The order is heavy-last (each node's largest child subtree last), so both stacks hold at most
// floor(log2 L) + 1 entries for every tree. The backward runs root-to-leaves (preorder) with a stack of the gradients G of nodes that still have
// children to visit, and recomputes H chunk by chunk from stack checkpoints, so per channel it needs
// O((stack depth + L / kChunk) * N) scratch instead of O(L * N).
//
// A tree's plan (flags per step, stack sizes, checkpoint offsets) comes from plan_phases, data-parallel phases
// run by a `Par` (SerialPar below; BlockPar in cuda.cu), after check_row where the tree comes from outside.
#pragma once

#include <atomic>
#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define GROOTL_HD __host__ __device__ __forceinline__
#else
#define GROOTL_HD inline
#endif

namespace grootl {

constexpr int kChunk = 32;  // nodes recomputed per backward chunk

// Per-node flags of a plan, stored by preorder step.
constexpr uint8_t kHasChildren = 1;  // the node has children: it owns a stack entry
constexpr uint8_t kLastChild = 2;    // last child of its parent in preorder: opens (forward) or closes (backward) the parent's entry

// What check_row finds.
constexpr int kTreeOk = 0;
constexpr int kBadParent = 1;  // a parent outside [0, L), or the root L-1 with a parent, or another node without
constexpr int kBadOrder = 2;   // order is not a permutation starting at the root, or not a DFS preorder

GROOTL_HD float fast_exp(float x) {
#ifdef __CUDA_ARCH__
  return __expf(x);
#else
  return std::exp(x);
#endif
}
GROOTL_HD double fast_exp(double x) { return exp(x); }

GROOTL_HD int num_chunks(int L) { return (L + kChunk - 1) / kChunk; }

// Checks that (parent, order) of one row is a tree rooted at L-1 with order a DFS preorder (one sequential
// sweep with a stack, as the forward scan walks it). work: 3 * L ints.
GROOTL_HD int check_row(const int64_t* parent, const int64_t* order, int L, int32_t* work) {
  int32_t* remaining = work;      // children not yet visited by the reverse sweep
  int32_t* seen = work + L;       // bit 1: a child was seen, bit 2: visited
  int32_t* stack = work + 2 * L;  // the nodes whose child sums are open
  for (int v = 0; v < L; ++v) remaining[v] = seen[v] = 0;
  for (int v = 0; v < L; ++v) {
    const int64_t p = parent[v];
    if (v == L - 1 ? p != -1 : (p < 0 || p >= L || p == v)) return kBadParent;
    if (p >= 0) remaining[p] += 1;
  }
  if (order[0] != L - 1) return kBadOrder;
  int sp = 0;
  for (int i = L - 1; i >= 0; --i) {
    const int64_t v = order[i];
    if (v < 0 || v >= L || (seen[v] & 2) || remaining[v] != 0) return kBadOrder;
    seen[v] |= 2;
    if (seen[v] & 1) {  // its children are done: its sum must be the open one
      if (sp == 0 || stack[sp - 1] != v) return kBadOrder;
      --sp;
    }
    const int64_t p = parent[v];
    if (p >= 0) {
      if (!(seen[p] & 1)) {
        seen[p] |= 1;
        stack[sp++] = (int32_t)p;
      } else if (sp == 0 || stack[sp - 1] != p) {
        return kBadOrder;
      }
      remaining[p] -= 1;
    }
  }
  return kTreeOk;
}

// The error message of a failed check_row, in parts: "<field> row <b><problem>".
inline const char* check_field(int status) { return status == kBadParent ? "tree.parent" : "tree.order"; }
inline const char* check_problem(int status) {
  return status == kBadParent ? " is not a tree rooted at L-1: every parent must lie in [0, L) except parent[L-1] == -1"
                              : " is not a DFS preorder of tree.parent starting at the root L-1";
}

// *p = min(*p, v) or max(*p, v), atomically: several threads of a phase may update one element.
#ifndef __CUDA_ARCH__
template <typename T, typename Better>
inline void host_atomic_update(T* p, T v, Better better) {
  std::atomic_ref<T> ref(*p);
  T cur = ref.load(std::memory_order_relaxed);
  while (better(v, cur) && !ref.compare_exchange_weak(cur, v, std::memory_order_relaxed)) {
  }
}
#endif

GROOTL_HD void atomic_min(uint64_t* p, uint64_t v) {
#ifdef __CUDA_ARCH__
  atomicMin(reinterpret_cast<unsigned long long*>(p), (unsigned long long)v);
#else
  host_atomic_update(p, v, [](uint64_t a, uint64_t b) { return a < b; });
#endif
}

GROOTL_HD void atomic_min(int32_t* p, int32_t v) {
#ifdef __CUDA_ARCH__
  atomicMin(reinterpret_cast<int*>(p), (int)v);
#else
  host_atomic_update(p, v, [](int32_t a, int32_t b) { return a < b; });
#endif
}

GROOTL_HD void atomic_max(int32_t* p, int32_t v) {
#ifdef __CUDA_ARCH__
  atomicMax(reinterpret_cast<int*>(p), (int)v);
#else
  host_atomic_update(p, v, [](int32_t a, int32_t b) { return a > b; });
#endif
}

// Data-parallel phases on one thread (the CPU's). A Par runs each(n, body) for every i < n and then waits for
// all its threads; any / max combine a value over its threads; scan is an in-place inclusive prefix sum.
// BlockPar in cuda.cu runs them on a block's threads.
struct SerialPar {
  template <typename F>
  void each(int n, F&& body) {
    for (int i = 0; i < n; ++i) body(i);
  }
  bool any(bool x) { return x; }
  int32_t max(int32_t x) { return x; }
  void scan(int32_t* a, int n) {
    for (int i = 1; i < n; ++i) a[i] += a[i - 1];
  }
};

// The plan of one row's tree (which must be valid: see check_row) for the scans:
//   flags[i]            flags of node order[i]
//   ckpt_offset[c]      where chunk c's checkpoint of the forward stack starts (in entries; the stack as the
//                       reverse sweep reaches the chunk's last step); ckpt_offset[num_chunks(L)] = the total
//   sizes[0..2]         max forward stack depth, max backward stack depth, total checkpoint entries
// in data-parallel phases: flags from each node's children, the stacks' depths as prefix sums over the
// preorder steps. work: plan_work_ints(L).
GROOTL_HD int64_t plan_work_ints(int L) { return 3 * (int64_t)L; }
template <typename Par>
GROOTL_HD void plan_phases(Par& par, const int64_t* parent, const int64_t* order, int L, uint8_t* flags,
                           int32_t* ckpt_offset, int32_t* sizes, int32_t* work) {
  int32_t* pos = work;              // preorder step of each node
  int32_t* last = work + L;         // step of each node's last child (-1: a leaf)
  int32_t* run = work + 2 * L;      // a running sum over the steps
  const int chunks = num_chunks(L);
  par.each(L, [&](int i) {
    pos[order[i]] = i;
    last[i] = -1;
  });
  par.each(L, [&](int v) {
    const int64_t p = parent[v];
    if (p >= 0) atomic_max(&last[p], pos[v]);
  });
  // the forward stack, swept from step L-1 down: a last child opens its parent's entry, a parent closes it
  par.each(L, [&](int i) {
    const int64_t v = order[i], p = parent[v];
    const int f = (last[v] >= 0 ? kHasChildren : 0) | (p >= 0 && last[p] == i ? kLastChild : 0);
    flags[i] = (uint8_t)f;
    run[L - 1 - i] = ((f & kLastChild) ? 1 : 0) - ((f & kHasChildren) ? 1 : 0);
  });
  par.scan(run, L);  // run[L-1-i]: depth after step i
  int32_t deepest = 0;
  par.each(L, [&](int i) { deepest = run[L - 1 - i] > deepest ? run[L - 1 - i] : deepest; });
  const int32_t h_depth = par.max(deepest);
  par.each(chunks, [&](int c) {  // depth as the sweep reaches the chunk's last step
    const int e = (c + 1) * kChunk < L ? (c + 1) * kChunk - 1 : L - 1;
    ckpt_offset[c + 1] = e + 1 < L ? run[L - 2 - e] : 0;
  });
  // the backward stack, from step 0 up: a parent opens its entry, its last child closes it
  par.each(L, [&](int i) {
    const int f = flags[i];
    run[i] = ((f & kHasChildren) ? 1 : 0) - ((f & kLastChild) ? 1 : 0);
  });
  par.scan(run, L);
  deepest = 0;
  par.each(L, [&](int i) { deepest = run[i] > deepest ? run[i] : deepest; });
  const int32_t g_depth = par.max(deepest);
  par.each(1, [&](int) { ckpt_offset[0] = 0; });
  par.scan(ckpt_offset, chunks + 1);  // offsets of each chunk's checkpoint, and the total
  par.each(1, [&](int) {
    sizes[0] = h_depth;
    sizes[1] = g_depth;
    sizes[2] = ckpt_offset[chunks];
  });
}

// All N states of a channel on one thread.
struct SerialLanes {
  int per;  // states per thread: N
  GROOTL_HD int first() const { return 0; }
  GROOTL_HD int count() const { return 1; }
  GROOTL_HD bool leader() const { return true; }   // writes the channel's per-position outputs
  GROOTL_HD bool writes() const { return true; }   // writes its states' outputs
  template <typename T>
  GROOTL_HD T sum(T x) const { return x; }
};

// The state n a thread's j-th slot holds (>= N: the slot is idle).
template <typename Lanes>
GROOTL_HD int state_of(const Lanes& ln, int j) { return ln.first() + j * ln.count(); }

// A thread's scratch: stack entry e, slot j at base[(e * per + j) * stride]. The CPU gives each channel a
// contiguous block (stride 1); the GPU interleaves a block's threads (stride = threads) so that a warp's
// accesses to one (e, j) are contiguous.
template <typename acc_t>
struct Slots {
  acc_t* base;
  int64_t stride;
  int per;
  GROOTL_HD acc_t& operator()(int64_t e, int j) const { return base[(e * per + j) * stride]; }
  GROOTL_HD Slots at(int64_t e) const { return {base + e * per * stride, stride, per}; }
};

// Entries of per-thread slots the forward and the backward need, given the row plan's sizes.
GROOTL_HD int64_t forward_scratch_entries(int h_depth) { return (int64_t)h_depth; }
GROOTL_HD int64_t backward_scratch_entries(int h_depth, int g_depth, int ckpt_total) {
  return (int64_t)h_depth + g_depth + ckpt_total + kChunk;
}

// The decay on an edge, per state: a(n) = exp(delta * A[n]), d log a(n) / d delta = A[n].
template <typename acc_t>
struct StateDecay {
  acc_t delta;
  const acc_t* A;
  GROOTL_HD acc_t value(int n) const { return fast_exp(delta * A[n]); }
  GROOTL_HD acc_t rate(int n) const { return A[n]; }
};

// One decay for all states (a table entry): d log a / d delta = A.
template <typename acc_t>
struct ScalarDecay {
  acc_t a, A;
  GROOTL_HD acc_t value(int) const { return a; }
  GROOTL_HD acc_t rate(int) const { return A; }
};

// One row and channel of the inputs, every pointer already offset to them; position t of u (and of the
// channel's y, gy, du) at u[t * step_u], of delta (and d_delta, decay) at delta[t * step_delta], B's and C's
// N states at B + t * step_bc. kScalarDecay: A is the head's one value and decay the table of exp(delta * A).
template <typename scalar_t, typename acc_t, bool kScalarDecay = false>
struct Channel {
  static constexpr bool scalar_decay = kScalarDecay;
  const scalar_t* u;      // (L)
  const acc_t* delta;     // (L), in the accumulation type (as dt: Mamba-2)
  const acc_t* A;         // (N), or (1) with kScalarDecay
  const scalar_t* B;      // (L, N)
  const scalar_t* C;      // (L, N)
  const int64_t* parent;  // (L)
  const int64_t* order;   // (L)
  const uint8_t* flags;   // (L), by preorder step (the plan's; unused by chain_tree_*)
  int L, N;
  int64_t step_u = 1, step_delta = 1, step_bc = N;
  const acc_t* decay = nullptr;  // (L): exp(delta * A), kScalarDecay only

  GROOTL_HD acc_t u_at(int64_t t) const { return (acc_t)u[t * step_u]; }
  GROOTL_HD acc_t delta_at(int64_t t) const { return (acc_t)delta[t * step_delta]; }
  GROOTL_HD const scalar_t* B_at(int64_t t) const { return B + t * step_bc; }
  GROOTL_HD const scalar_t* C_at(int64_t t) const { return C + t * step_bc; }
  // the transition a(t), which moves a node's H to its parent when the node is t - 1
  GROOTL_HD auto decay_at(int64_t t) const {
    if constexpr (kScalarDecay)
      return ScalarDecay<acc_t>{decay[t * step_delta], A[0]};
    else
      return StateDecay<acc_t>{delta_at(t), A};
  }
};

// Mamba-1's channels: u, delta (batch, D, L), A (D, N), B, C (batch, L, N); one group of D channels. Per
// channel, its u-like sequences (y, gy, du) start at u_offset, d_delta at delta_out (batch, D, L), dA at
// dA_out (batch, D, N).
template <typename scalar_t, typename acc_t>
struct Mamba1Layout {
  using scalar_type = scalar_t;
  using acc_type = acc_t;
  using channel_t = Channel<scalar_t, acc_t>;
  const scalar_t* u;
  const acc_t* delta;
  const acc_t* A;
  const scalar_t* B;
  const scalar_t* C;
  const int64_t* parent;
  const int64_t* order;
  const uint8_t* flags;
  int D, N, L;
  GROOTL_HD int groups() const { return 1; }
  GROOTL_HD int group_channels() const { return D; }
  GROOTL_HD int64_t u_offset(int b, int d) const { return ((int64_t)b * D + d) * L; }
  GROOTL_HD int64_t delta_out(int b, int d) const { return ((int64_t)b * D + d) * L; }
  GROOTL_HD int64_t dA_out(int b, int d) const { return ((int64_t)b * D + d) * N; }
  GROOTL_HD channel_t channel(int b, int d) const {
    const int64_t row = (int64_t)b * L;
    return {u + u_offset(b, d), delta + u_offset(b, d), A + (int64_t)d * N, B + row * N, C + row * N,
            parent + row, order + row, flags != nullptr ? flags + row : nullptr, L, N};
  }
};

// Mamba-2's channels d = h * P + p: x (batch, L, H, P), dt and its decay table (batch, L, H), A (H), B, C
// (batch, L, G, N); G groups of H / G * P channels. d_dt and dA come in dt_parts partial sums (1: summed over a
// head's channels in place, by a caller that runs them in turn; P: one per head dim): d_dt (batch, dt_parts, L,
// H), dA (batch, dt_parts, H).
template <typename scalar_t, typename acc_t>
struct Mamba2Layout {
  using scalar_type = scalar_t;
  using acc_type = acc_t;
  using channel_t = Channel<scalar_t, acc_t, true>;
  const scalar_t* x;
  const acc_t* dt;
  const acc_t* decay;
  const acc_t* A;
  const scalar_t* B;
  const scalar_t* C;
  const int64_t* parent;
  const int64_t* order;
  const uint8_t* flags;
  int H, P, G, N, L, dt_parts;
  GROOTL_HD int groups() const { return G; }
  GROOTL_HD int group_channels() const { return H / G * P; }
  GROOTL_HD int64_t u_offset(int b, int d) const { return (int64_t)b * L * H * P + d; }
  GROOTL_HD int64_t delta_out(int b, int d) const {
    return ((int64_t)b * dt_parts + (dt_parts == 1 ? 0 : d % P)) * L * H + d / P;
  }
  GROOTL_HD int64_t dA_out(int b, int d) const {
    return ((int64_t)b * dt_parts + (dt_parts == 1 ? 0 : d % P)) * H + d / P;
  }
  GROOTL_HD channel_t channel(int b, int d) const {
    const int64_t row = (int64_t)b * L, h = d / P, bc = row * G * N + h / (H / G) * N;
    return {x + u_offset(b, d), dt + row * H + h, A + h, B + bc, C + bc, parent + row, order + row,
            flags + row, L, N, (int64_t)H * P, H, (int64_t)G * N, decay + row * H + h};
  }
};

// Reverse-sweep step i: computes the owned states of H of node order[i] into cur and passes a(v+1) * H[v]
// to the parent's stack entry. Returns the node.
template <typename Ch, typename Lanes, typename acc_t>
GROOTL_HD int64_t h_step(const Ch& ch, const Lanes& ln, int i, const Slots<acc_t>& stack, int& sp, acc_t* cur) {
  const int N = ch.N;
  const int64_t v = ch.order[i];
  const uint8_t f = ch.flags[i];
  const acc_t x = ch.delta_at(v) * ch.u_at(v);
  const auto* Bv = ch.B_at(v);
  if (f & kHasChildren) --sp;
  for (int j = 0; j < ln.per; ++j) {
    const int n = state_of(ln, j);
    if (n >= N) break;
    cur[j] = x * (acc_t)Bv[n] + ((f & kHasChildren) ? stack(sp, j) : acc_t(0));
  }
  if (ch.parent[v] >= 0) {
    const auto a = ch.decay_at(v + 1);
    const bool open = f & kLastChild;
    const int e = open ? sp : sp - 1;
    for (int j = 0; j < ln.per; ++j) {
      const int n = state_of(ln, j);
      if (n >= N) break;
      const acc_t pass = a.value(n) * cur[j];
      stack(e, j) = open ? pass : stack(e, j) + pass;
    }
    if (open) ++sp;
  }
  return v;
}

// Forward: y[v * step_u] = C[v, :] . H[v] for every node (written by the leader lane; y may be null); root (N,
// may be null) = H[L-1], each lane writing its states. stack: forward_scratch_entries(h_depth) entries; cur: per.
template <typename scalar_t, typename acc_t, bool kScalarDecay, typename Lanes>
GROOTL_HD void tree_scan_forward(const Channel<scalar_t, acc_t, kScalarDecay>& ch, const Lanes& ln,
                                 const Slots<acc_t>& stack, acc_t* cur, scalar_t* y, acc_t* root) {
  const int L = ch.L, N = ch.N;
  int sp = 0;
  for (int i = L - 1; i >= 0; --i) {
    const int64_t v = h_step(ch, ln, i, stack, sp, cur);
    const scalar_t* Cv = ch.C_at(v);
    acc_t part = 0;
    for (int j = 0; j < ln.per; ++j) {
      const int n = state_of(ln, j);
      if (n >= N) break;
      part += (acc_t)Cv[n] * cur[j];
    }
    const acc_t out = ln.sum(part);
    if (y != nullptr && ln.leader()) y[v * ch.step_u] = (scalar_t)out;
  }
  if (root != nullptr)  // the root is the last node of the reverse sweep
    for (int j = 0; j < ln.per; ++j) {
      const int n = state_of(ln, j);
      if (n >= N) break;
      root[n] = cur[j];
    }
}

// Per-thread registers of the backward: `per` accumulators each.
template <typename acc_t>
struct BackwardRegs {
  acc_t* cur;  // H of the node being recomputed
  acc_t* g;    // G of the node being visited
  acc_t* dA;   // this channel's dA, summed over nodes
};

// Backward of one channel. gy: (L) at step_u; g_root: (N) or null. The leader lane writes du (L, at step_u) and
// adds to d_delta (L, acc_t, at step_delta); dA gets added each lane's states (N), or with a scalar decay the
// channel's sum (1, by the leader): the caller zeroes d_delta and dA, so channels may share them. The
// per-channel terms of dB[v, n] and dC[v, n] go to sink.add(j, n, v, dB_term, dC_term) for every owned state,
// then sink.commit(v), node by node in the same order on every channel of a row; sink.finish() after the last
// node. ckpt_offset: the row plan's; scratch: backward_scratch_entries(...) entries.
template <typename scalar_t, typename acc_t, bool kScalarDecay, typename Lanes, typename Sink>
GROOTL_HD void tree_scan_backward(const Channel<scalar_t, acc_t, kScalarDecay>& ch, const Lanes& ln, const scalar_t* gy,
                                  const acc_t* g_root, const int32_t* ckpt_offset, int h_depth, int g_depth,
                                  const Slots<acc_t>& scratch, BackwardRegs<acc_t> r, scalar_t* du, acc_t* d_delta,
                                  acc_t* dA, Sink& sink) {
  const int L = ch.L, N = ch.N, chunks = num_chunks(L);
  const Slots<acc_t> h_stack = scratch;
  const Slots<acc_t> g_stack = scratch.at(h_depth);
  const Slots<acc_t> ckpt = g_stack.at(g_depth);
  const Slots<acc_t> hbuf = ckpt.at(ckpt_offset[chunks]);  // H of the current chunk's nodes, by step
  for (int j = 0; j < ln.per; ++j) r.dA[j] = 0;

  // 1. Reverse sweep, saving the forward stack as each chunk's last step is reached.
  int sp = 0;
  for (int i = L - 1; i >= 0; --i) {
    if (i == L - 1 || i % kChunk == kChunk - 1) {
      const Slots<acc_t> dst = ckpt.at(ckpt_offset[i / kChunk]);
      for (int e = 0; e < sp; ++e)
        for (int j = 0; j < ln.per; ++j) dst(e, j) = h_stack(e, j);
    }
    h_step(ch, ln, i, h_stack, sp, r.cur);
  }

  // 2. Chunks in preorder: recompute the chunk's H from its checkpoint, then walk it root-to-leaves.
  int g_sp = 0;
  for (int c = 0; c < chunks; ++c) {
    const int s = c * kChunk, e = (s + kChunk < L ? s + kChunk : L) - 1;
    sp = ckpt_offset[c + 1] - ckpt_offset[c];
    const Slots<acc_t> src = ckpt.at(ckpt_offset[c]);
    for (int q = 0; q < sp; ++q)
      for (int j = 0; j < ln.per; ++j) h_stack(q, j) = src(q, j);
    for (int i = e; i >= s; --i) {
      h_step(ch, ln, i, h_stack, sp, r.cur);
      for (int j = 0; j < ln.per; ++j) hbuf(i - s, j) = r.cur[j];
    }
    for (int i = s; i <= e; ++i) {
      const int64_t v = ch.order[i];
      const uint8_t f = ch.flags[i];
      const Slots<acc_t> H = hbuf.at(i - s);
      const scalar_t* Bv = ch.B_at(v);
      const scalar_t* Cv = ch.C_at(v);
      const acc_t gyv = (acc_t)gy[v * ch.step_u];
      for (int j = 0; j < ln.per; ++j) {
        const int n = state_of(ln, j);
        if (n >= N) break;
        r.g[j] = gyv * (acc_t)Cv[n] + (g_root != nullptr && v == L - 1 ? g_root[n] : acc_t(0));
      }
      if (ch.parent[v] >= 0) {  // edge v -> parent, transition a(v + 1)
        const Slots<acc_t> gp = g_stack.at(g_sp - 1);
        const acc_t dn = ch.delta_at(v + 1);
        const auto decay = ch.decay_at(v + 1);
        acc_t dd = 0;
        for (int j = 0; j < ln.per; ++j) {
          const int n = state_of(ln, j);
          if (n >= N) break;
          const acc_t a = decay.value(n);
          const acc_t t = gp(0, j) * H(0, j) * a;  // d loss / d log a
          dd += t * decay.rate(n);
          r.dA[j] += t * dn;
          r.g[j] += a * gp(0, j);
        }
        dd = ln.sum(dd);
        if (ln.leader()) d_delta[(v + 1) * ch.step_delta] += dd;
        if (f & kLastChild) --g_sp;
      }
      const acc_t dv = ch.delta_at(v), uv = ch.u_at(v), x = dv * uv;
      acc_t gx = 0;  // d loss / d (delta[v] * u[v])
      for (int j = 0; j < ln.per; ++j) {
        const int n = state_of(ln, j);
        if (n >= N) break;
        gx += r.g[j] * (acc_t)Bv[n];
        sink.add(j, n, v, r.g[j] * x, gyv * H(0, j));
      }
      gx = ln.sum(gx);
      sink.commit(v);
      if (ln.leader()) {
        du[v * ch.step_u] = (scalar_t)(gx * dv);
        d_delta[v * ch.step_delta] += gx * uv;
      }
      if (f & kHasChildren) {
        for (int j = 0; j < ln.per; ++j) g_stack(g_sp, j) = r.g[j];
        ++g_sp;
      }
    }
  }
  sink.finish();
  if constexpr (kScalarDecay) {
    acc_t total = 0;
    for (int j = 0; j < ln.per; ++j) total += r.dA[j];  // idle slots hold 0
    total = ln.sum(total);
    if (ln.leader()) dA[0] += total;
  } else if (ln.writes()) {
    for (int j = 0; j < ln.per; ++j) {
      const int n = state_of(ln, j);
      if (n >= N) break;
      dA[n] += r.dA[j];
    }
  }
}

}  // namespace grootl

namespace grootl {

// The chain scan and the tree scan of one channel together, as the GrootL mixer merges them:
//     y[t] = C[t, :] . (h[t] + lam * H[t]),   h[t] = a(t) * h[t-1] + X[t]   (the chain)
// with H the tree scan above. Both share a channel's discretisation a(t) = exp(delta[t] * A), computed once
// per pass into a table, and keep whole-sequence buffers per channel instead of stacks and checkpoints:
// O(L * N) scratch per thread (a CPU holds a few), any DFS preorder from the root L-1, no plan. With lam == 0
// the tree is skipped (parent and order unread): the chain scan alone.
// Scratch in units of L * N: a table, H, and for the backward the chain's h and the tree's G.
constexpr int kChainTreeForwardBuffers = 2;
constexpr int kChainTreeBackwardBuffers = 4;

// a[t * N + n] = exp(delta[t] * A[n]) and, with the tree, H[v * N + n] the tree scan's states.
template <typename scalar_t, typename acc_t>
GROOTL_HD void chain_tree_states(const Channel<scalar_t, acc_t>& ch, bool tree, acc_t* a, acc_t* H) {
  const int L = ch.L, N = ch.N;
  for (int t = 0; t < L; ++t) {
    const acc_t dt = (acc_t)ch.delta[t];
    for (int n = 0; n < N; ++n) a[(int64_t)t * N + n] = fast_exp(dt * ch.A[n]);
  }
  if (!tree) return;
  for (int64_t i = 0; i < (int64_t)L * N; ++i) H[i] = 0;
  for (int i = L - 1; i >= 0; --i) {  // leaves to root: a node's children are done before it
    const int64_t v = ch.order[i], p = ch.parent[v];
    const acc_t x = (acc_t)ch.delta[v] * (acc_t)ch.u[v];
    acc_t* Hv = H + v * N;
    const scalar_t* Bv = ch.B + v * N;
    for (int n = 0; n < N; ++n) Hv[n] = x * (acc_t)Bv[n] + Hv[n];
    if (p >= 0) {
      const acc_t* av = a + (v + 1) * N;
      acc_t* Hp = H + p * N;
      for (int n = 0; n < N; ++n) Hp[n] += av[n] * Hv[n];
    }
  }
}

// Forward: y (L) and, if not null, state (N) = h[L-1] + lam * H[L-1]. scratch: kChainTreeForwardBuffers * L * N
// + N entries.
template <typename scalar_t, typename acc_t>
GROOTL_HD void chain_tree_forward(const Channel<scalar_t, acc_t>& ch, acc_t lam, acc_t* scratch, scalar_t* y,
                                  acc_t* state) {
  const int L = ch.L, N = ch.N;
  acc_t* a = scratch;
  acc_t* H = a + (int64_t)L * N;
  acc_t* h = H + (int64_t)L * N;
  const bool tree = lam != acc_t(0);
  chain_tree_states(ch, tree, a, H);
  for (int n = 0; n < N; ++n) h[n] = 0;
  for (int t = 0; t < L; ++t) {
    const acc_t x = (acc_t)ch.delta[t] * (acc_t)ch.u[t];
    const scalar_t* Bt = ch.B + (int64_t)t * N;
    const scalar_t* Ct = ch.C + (int64_t)t * N;
    const acc_t* at = a + (int64_t)t * N;
    const acc_t* Ht = H + (int64_t)t * N;
    acc_t out = 0;
    for (int n = 0; n < N; ++n) {
      h[n] = at[n] * h[n] + x * (acc_t)Bt[n];
      out += (acc_t)Ct[n] * (tree ? h[n] + lam * Ht[n] : h[n]);
    }
    y[t] = (scalar_t)out;
  }
  if (state != nullptr)
    for (int n = 0; n < N; ++n) state[n] = tree ? h[n] + lam * H[(int64_t)(L - 1) * N + n] : h[n];
}

// Backward of chain_tree_forward. gy (L); g_state (N) or null. Writes du (L), d_delta (L, acc_t) and dA (N);
// the per-channel terms of dB[t, n] and dC[t, n] go to sink.add(n, n, t, dB_term, dC_term), then sink.commit(t),
// positions from L-1 down; sink.finish() at the end. scratch: kChainTreeBackwardBuffers * L * N + N entries.
template <typename scalar_t, typename acc_t, typename Sink>
GROOTL_HD void chain_tree_backward(const Channel<scalar_t, acc_t>& ch, acc_t lam, const scalar_t* gy,
                                   const acc_t* g_state, acc_t* scratch, scalar_t* du, acc_t* d_delta, acc_t* dA,
                                   Sink& sink) {
  const int L = ch.L, N = ch.N;
  const int64_t LN = (int64_t)L * N;
  acc_t* a = scratch;
  acc_t* H = a + LN;
  acc_t* h = H + LN;   // the chain's states, by position
  acc_t* G = h + LN;   // d loss / d H (through lam * y and the tree), by node
  acc_t* gh = G + LN;  // d loss / d h of the position being visited
  const bool tree = lam != acc_t(0);
  chain_tree_states(ch, tree, a, H);
  for (int t = 0; t < L; ++t) {
    const acc_t x = (acc_t)ch.delta[t] * (acc_t)ch.u[t];
    const scalar_t* Bt = ch.B + (int64_t)t * N;
    const acc_t* at = a + (int64_t)t * N;
    const acc_t* prev = h + (int64_t)(t - 1) * N;  // read only for t > 0
    acc_t* ht = h + (int64_t)t * N;
    for (int n = 0; n < N; ++n) ht[n] = (t > 0 ? at[n] * prev[n] : acc_t(0)) + x * (acc_t)Bt[n];
  }
  for (int i = 0; tree && i < L; ++i) {  // root to leaves: G[v] = lam * gy[v] * C[v] + a(v + 1) * G[parent]
    const int64_t v = ch.order[i], p = ch.parent[v];
    const acc_t g = lam * (acc_t)gy[v];
    const scalar_t* Cv = ch.C + v * N;
    acc_t* Gv = G + v * N;
    if (p < 0) {
      for (int n = 0; n < N; ++n) Gv[n] = g * (acc_t)Cv[n] + (g_state != nullptr ? lam * g_state[n] : acc_t(0));
    } else {
      const acc_t* av = a + (v + 1) * N;
      const acc_t* Gp = G + p * N;
      for (int n = 0; n < N; ++n) Gv[n] = g * (acc_t)Cv[n] + av[n] * Gp[n];
    }
  }
  for (int n = 0; n < N; ++n) {
    gh[n] = g_state != nullptr ? g_state[n] : acc_t(0);
    dA[n] = 0;
  }
  for (int t = L - 1; t >= 0; --t) {
    const acc_t gyt = (acc_t)gy[t], dt = (acc_t)ch.delta[t], ut = (acc_t)ch.u[t], x = dt * ut;
    const scalar_t* Bt = ch.B + (int64_t)t * N;
    const scalar_t* Ct = ch.C + (int64_t)t * N;
    const acc_t* next = a + (int64_t)(t + 1) * N;  // a(t + 1), read only below L - 1
    const acc_t* Gt = G + (int64_t)t * N;
    const acc_t* ht = h + (int64_t)t * N;
    const acc_t* Ht = H + (int64_t)t * N;
    acc_t gx = 0;  // d loss / d (delta[t] * u[t])
    for (int n = 0; n < N; ++n) {
      gh[n] = gyt * (acc_t)Ct[n] + (t < L - 1 ? next[n] * gh[n] : gh[n]);
      const acc_t gX = tree ? gh[n] + Gt[n] : gh[n];
      gx += gX * (acc_t)Bt[n];
      sink.add(n, n, t, gX * x, gyt * (tree ? ht[n] + lam * Ht[n] : ht[n]));
    }
    acc_t dd = 0;
    if (t > 0) {  // a(t) moves h[t-1] along the chain and H[t-1] to its parent
      const acc_t* at = a + (int64_t)t * N;
      const acc_t* Gp = tree ? G + ch.parent[t - 1] * N : G;
      const acc_t* hp = h + (int64_t)(t - 1) * N;
      const acc_t* Hc = H + (int64_t)(t - 1) * N;
      for (int n = 0; n < N; ++n) {
        const acc_t dlog = at[n] * (tree ? gh[n] * hp[n] + Gp[n] * Hc[n] : gh[n] * hp[n]);  // d loss / d log a(t)
        dd += dlog * ch.A[n];
        dA[n] += dlog * dt;
      }
    }
    sink.commit(t);
    du[t] = (scalar_t)(gx * dt);
    d_delta[t] = gx * ut + dd;
  }
  sink.finish();
}

}  // namespace grootl
