// The GrootL single-root tree scan, one (batch row, channel) at a time. Written once for host and device:
// kernels/cpu.cpp runs it under at::parallel_for, kernels/cuda.cu with one thread per channel.
//
// For one row and channel d, with a = exp(delta * A[d]) and X[v] = delta[v] * u[v] * B[:, v]:
//     H[v] = X[v] + sum over children c of v of a(c + 1) * H[c],      y[v] = C[:, v] . H[v]
// The forward visits nodes leaves-to-root (reversed DFS preorder) and keeps the pending child sums on a
// stack: in that order the only open sums belong to ancestors of the current node, and the parent's is on
// top. The backward runs root-to-leaves (preorder) with a stack of the gradients G of nodes that still have
// children to visit, and recomputes H chunk by chunk from stack checkpoints, so per channel it needs
// O((stack depth + L / kChunk) * N) scratch instead of O(L * N).
#pragma once

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

// Plan errors (returned by plan_row).
constexpr int kPlanOk = 0;
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

// Builds the plan of one row and checks that (parent, order) is a rooted tree in DFS preorder.
//   flags[i]            flags of node order[i]
//   ckpt_offset[j]      prefix sums (in stack entries) of the forward stack depth when the reverse sweep
//                       reaches the last step of chunk j; ckpt_offset has num_chunks(L) + 1 entries
//   sizes[0..2]         max forward stack depth, max backward stack depth, total checkpoint entries
//   work                3 * L ints of scratch
GROOTL_HD int plan_row(const int64_t* parent, const int64_t* order, int L, uint8_t* flags, int32_t* ckpt_offset,
                       int32_t* sizes, int32_t* work) {
  int32_t* remaining = work;      // children not yet visited by the reverse sweep
  int32_t* node_flags = work + L;  // flags by node, plus bit 4 = "a child was seen", bit 8 = "visited"
  int32_t* stack = work + 2 * L;
  for (int v = 0; v < L; ++v) remaining[v] = node_flags[v] = 0;
  for (int v = 0; v < L; ++v) {
    int64_t p = parent[v];
    if (v == L - 1 ? p != -1 : (p < 0 || p >= L || p == v)) return kBadParent;
    if (p >= 0) {
      remaining[p] += 1;
      node_flags[p] |= kHasChildren;
    }
  }
  if (order[0] != L - 1) return kBadOrder;
  int sp = 0, h_depth = 0, chunks = num_chunks(L);
  ckpt_offset[chunks] = 0;
  for (int i = L - 1; i >= 0; --i) {
    if (i == L - 1 || i % kChunk == kChunk - 1) ckpt_offset[i / kChunk] = sp;  // depth, summed below
    int64_t v = order[i];
    if (v < 0 || v >= L || (node_flags[v] & 8) || remaining[v] != 0) return kBadOrder;
    node_flags[v] |= 8;
    if (node_flags[v] & kHasChildren) {
      if (sp == 0 || stack[sp - 1] != v) return kBadOrder;
      --sp;
    }
    int64_t p = parent[v];
    if (p >= 0) {
      if (!(node_flags[p] & 4)) {
        node_flags[p] |= 4;
        node_flags[v] |= kLastChild;
        stack[sp++] = (int32_t)p;
        if (sp > h_depth) h_depth = sp;
      } else if (sp == 0 || stack[sp - 1] != p) {
        return kBadOrder;
      }
      remaining[p] -= 1;
    }
  }
  int total = 0;
  for (int j = 0; j < chunks; ++j) {
    int depth = ckpt_offset[j];
    ckpt_offset[j] = total;
    total += depth;
  }
  ckpt_offset[chunks] = total;
  int g_sp = 0, g_depth = 0;
  for (int i = 0; i < L; ++i) {
    int f = node_flags[order[i]] & (kHasChildren | kLastChild);
    flags[i] = (uint8_t)f;
    if (f & kLastChild) --g_sp;
    if (f & kHasChildren && ++g_sp > g_depth) g_depth = g_sp;
  }
  sizes[0] = h_depth;
  sizes[1] = g_depth;
  sizes[2] = total;
  return kPlanOk;
}

// Entries of N accumulators a channel's backward needs as scratch, given the row plan's sizes.
GROOTL_HD int64_t backward_scratch_entries(int h_depth, int g_depth, int ckpt_total) {
  return (int64_t)h_depth + g_depth + ckpt_total + 2 * kChunk + 2;
}

// One row and channel of the inputs; every pointer is already offset to that row/channel, L contiguous.
template <typename scalar_t, typename acc_t>
struct Channel {
  const scalar_t* u;      // (L)
  const scalar_t* delta;  // (L)
  const acc_t* A;         // (N)
  const scalar_t* B;      // (N, L)
  const scalar_t* C;      // (N, L)
  const int64_t* parent;  // (L)
  const int64_t* order;   // (L)
  const uint8_t* flags;   // (L), by preorder step
  int L, N;
};

// Reverse-sweep step i: computes H of node order[i] into cur and passes a(v+1) * H[v] to the parent's entry;
// a_out (N) receives a(v+1).
template <typename scalar_t, typename acc_t>
GROOTL_HD int64_t h_step(const Channel<scalar_t, acc_t>& ch, int i, acc_t* stack, int& sp, acc_t* cur, acc_t* a_out) {
  const int L = ch.L, N = ch.N;
  const int64_t v = ch.order[i];
  const uint8_t f = ch.flags[i];
  const acc_t x = (acc_t)ch.delta[v] * (acc_t)ch.u[v];
  if (f & kHasChildren) {
    const acc_t* top = stack + (int64_t)(--sp) * N;
    for (int n = 0; n < N; ++n) cur[n] = x * (acc_t)ch.B[n * L + v] + top[n];
  } else {
    for (int n = 0; n < N; ++n) cur[n] = x * (acc_t)ch.B[n * L + v];
  }
  if (ch.parent[v] >= 0) {
    const acc_t dn = (acc_t)ch.delta[v + 1];
    for (int n = 0; n < N; ++n) a_out[n] = fast_exp(dn * ch.A[n]);
    if (f & kLastChild) {
      acc_t* top = stack + (int64_t)(sp++) * N;
      for (int n = 0; n < N; ++n) top[n] = a_out[n] * cur[n];
    } else {
      acc_t* top = stack + (int64_t)(sp - 1) * N;
      for (int n = 0; n < N; ++n) top[n] += a_out[n] * cur[n];
    }
  }
  return v;
}

// Entries of N accumulators a channel's forward needs as scratch.
GROOTL_HD int64_t forward_scratch_entries(int h_depth) { return (int64_t)h_depth + 2; }

// Forward: y[v] = C[:, v] . H[v] for every node; root (N, may be null) = H[L-1].
// scratch: forward_scratch_entries(h_depth) * N accumulators.
template <typename scalar_t, typename acc_t>
GROOTL_HD void tree_scan_forward(const Channel<scalar_t, acc_t>& ch, acc_t* scratch, scalar_t* y, acc_t* root) {
  const int L = ch.L, N = ch.N;
  acc_t* cur = scratch;
  acc_t* a = cur + N;
  acc_t* stack = a + N;
  int sp = 0;
  for (int i = L - 1; i >= 0; --i) {
    const int64_t v = h_step(ch, i, stack, sp, cur, a);
    acc_t out = 0;
    for (int n = 0; n < N; ++n) out += (acc_t)ch.C[n * L + v] * cur[n];
    y[v] = (scalar_t)out;
  }
  if (root != nullptr)
    for (int n = 0; n < N; ++n) root[n] = cur[n];  // the root is the last node of the reverse sweep
}

// Backward of one channel. gy: (L); g_root: (N) or null. Writes du (L) and d_delta (L, acc_t), sets
// dA (N) to this channel's part, and hands the per-channel terms of dB[n, v] and dC[n, v] to
// sink.add(n, v, dB_term, dC_term) once per (node, n), in the same order for every channel of a row.
// ckpt_offset: the row plan's; scratch: backward_scratch_entries(...) * N accumulators.
template <typename scalar_t, typename acc_t, typename Sink>
GROOTL_HD void tree_scan_backward(const Channel<scalar_t, acc_t>& ch, const scalar_t* gy, const acc_t* g_root,
                                  const int32_t* ckpt_offset, int h_depth, int g_depth, acc_t* scratch,
                                  scalar_t* du, acc_t* d_delta, acc_t* dA, Sink& sink) {
  const int L = ch.L, N = ch.N, chunks = num_chunks(L);
  acc_t* h_stack = scratch;
  acc_t* g_stack = h_stack + (int64_t)h_depth * N;
  acc_t* ckpt = g_stack + (int64_t)g_depth * N;
  acc_t* hbuf = ckpt + (int64_t)ckpt_offset[chunks] * N;  // H of the current chunk's nodes, by step
  acc_t* abuf = hbuf + (int64_t)kChunk * N;                // and a(v + 1) on their parent edges
  acc_t* cur = abuf + (int64_t)kChunk * N;
  acc_t* g = cur + N;
  for (int v = 0; v < L; ++v) d_delta[v] = 0;
  for (int n = 0; n < N; ++n) dA[n] = 0;

  // 1. Reverse sweep, saving the forward stack as each chunk's last step is reached.
  int sp = 0;
  for (int i = L - 1; i >= 0; --i) {
    if (i == L - 1 || i % kChunk == kChunk - 1) {
      acc_t* dst = ckpt + (int64_t)ckpt_offset[i / kChunk] * N;
      for (int e = 0; e < sp * N; ++e) dst[e] = h_stack[e];
    }
    h_step(ch, i, h_stack, sp, cur, g);
  }

  // 2. Chunks in preorder: recompute the chunk's H from its checkpoint, then walk it root-to-leaves.
  int g_sp = 0;
  for (int j = 0; j < chunks; ++j) {
    const int s = j * kChunk, e = (s + kChunk < L ? s + kChunk : L) - 1;
    sp = ckpt_offset[j + 1] - ckpt_offset[j];
    const acc_t* src = ckpt + (int64_t)ckpt_offset[j] * N;
    for (int q = 0; q < sp * N; ++q) h_stack[q] = src[q];
    for (int i = e; i >= s; --i) {
      h_step(ch, i, h_stack, sp, cur, abuf + (i - s) * N);
      for (int n = 0; n < N; ++n) hbuf[(i - s) * N + n] = cur[n];
    }
    for (int i = s; i <= e; ++i) {
      const int64_t v = ch.order[i];
      const uint8_t f = ch.flags[i];
      const acc_t* H = hbuf + (i - s) * N;
      const acc_t gyv = (acc_t)gy[v];
      for (int n = 0; n < N; ++n) g[n] = gyv * (acc_t)ch.C[n * L + v];
      if (g_root != nullptr && v == L - 1)
        for (int n = 0; n < N; ++n) g[n] += g_root[n];
      if (ch.parent[v] >= 0) {  // edge v -> parent, transition a(v + 1)
        const acc_t* gp = g_stack + (int64_t)(g_sp - 1) * N;
        const acc_t* av = abuf + (i - s) * N;
        const acc_t dn = (acc_t)ch.delta[v + 1];
        acc_t dd = 0;
        for (int n = 0; n < N; ++n) {
          const acc_t a = av[n];
          const acc_t t = gp[n] * H[n] * a;  // d loss / d log a
          dd += t * ch.A[n];
          dA[n] += t * dn;
          g[n] += a * gp[n];
        }
        d_delta[v + 1] += dd;
        if (f & kLastChild) --g_sp;
      }
      const acc_t dv = (acc_t)ch.delta[v], uv = (acc_t)ch.u[v], x = dv * uv;
      acc_t gx = 0;  // d loss / d (delta[v] * u[v])
      for (int n = 0; n < N; ++n) {
        gx += g[n] * (acc_t)ch.B[n * L + v];
        sink.add(n, v, g[n] * x, gyv * H[n]);
      }
      du[v] = (scalar_t)(gx * dv);
      d_delta[v] += gx * uv;
      if (f & kHasChildren) {
        acc_t* top = g_stack + (int64_t)(g_sp++) * N;
        for (int n = 0; n < N; ++n) top[n] = g[n];
      }
    }
  }
}

}  // namespace grootl
