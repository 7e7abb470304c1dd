// The GrootL tree scan parallel over the sequence, for trees whose edges join positions at most kMaxSpan apart
// (the build's graph with k <= 3, the chain). Written once for host and device; kernels/cuda.cu runs it (and
// tests/kernels/cuda_emulation.h runs cuda.cu on CPU threads). Semantics as tree_scan.h:
//     H[v] = X[v] + sum over children c of v of a(c + 1) * H[c],       y[v] = C[v, :] . H[v]
//     G[v] = gy[v] * C[v, :] + a(v + 1) * G[parent(v)]   (+ g_root at the root L-1)
// A row is cut into chunks of kScanChunk positions. Inside a chunk the tree is a forest: a node whose parent lies
// in another chunk (or the root L-1) is a local root; a node with a child in another chunk is an entry. With
// span <= kMaxSpan both lie within kMaxSpan positions of the chunk's ends, so a chunk keeps its local roots'
// states in 2 * kMaxSpan slots, and finds the edges that cross into it by looking kMaxSpan positions past its
// ends. Per channel and state, three passes:
//   1. per chunk: H_loc, the scan with nothing coming from other chunks, at the local roots; for each local root r
//      of another chunk whose parent w is here, the transfer T[r] = a(r + 1) * (product of a on the path from w
//      up to w's local root); for the backward also Q[r] = a(r + 1) * G_loc[w] (G with nothing coming in).
//   2. per row, over the local roots only (few: <= kMaxSpan * (kMaxSpan + 1) / 2 crossing edges per boundary):
//      leaves to root H[r] = H_loc[r] + sum over local roots r' below r of T[r'] * H[r']; root to leaves the
//      gradient coming into a local root, Ginc[r] = a(r + 1) * G[parent(r)] = Q[r] + T[r] * Ginc[up(r)].
//   3. per chunk: the scan again with a(r' + 1) * H[r'] injected at the parent of each crossing edge, giving
//      every node's final H (and y); for the backward G from Ginc at the local roots, and the gradients.
// Between passes only the slots are stored: O(L / kScanChunk * kMaxSpan * N) per channel.
//
// The row plan (shared by all channels): each chunk's nodes in reversed preorder restricted to the chunk (a parent
// precedes its children in any preorder, so children come first), and the local roots in reversed preorder with the
// slot of the local root above each (the reduced tree, leaves first). Made by chunk_plan_phases in data-parallel
// phases (a Par, as tree_scan.h's plan_phases).
#pragma once

#include "tree_scan.h"

namespace grootl {

#ifdef GROOTL_CUDA_EMULATION  // small chunks: the tests reach many chunks with short rows
constexpr int kScanChunk = 8;
#else
constexpr int kScanChunk = 64;  // positions per chunk
#endif
constexpr int kMaxSpan = 3;             // longest edge |v - parent(v)| the chunked scan takes
constexpr int kSlots = 2 * kMaxSpan;    // local-root slots per chunk

GROOTL_HD int scan_chunks(int L) { return (L + kScanChunk - 1) / kScanChunk; }
GROOTL_HD int chunk_first(int c) { return c * kScanChunk; }
GROOTL_HD int chunk_last(int c, int L) { return (c + 1) * kScanChunk < L ? (c + 1) * kScanChunk - 1 : L - 1; }

// Where a local root r keeps its states: kSlots per chunk, the first kMaxSpan for the chunk's first positions,
// the others for its last ones (a local root lies within kMaxSpan of its chunk's ends).
GROOTL_HD int root_slot(int64_t r, int L) {
  const int c = (int)(r / kScanChunk), s = chunk_first(c), e = chunk_last(c, L);
  return c * kSlots + (r - s < kMaxSpan ? (int)(r - s) : kMaxSpan + (int)(e - r));
}

// Ints of a row's chunk plan: chunk nodes (L), reduced slots (L), their up slots (L), the count of local roots.
GROOTL_HD int64_t chunk_plan_ints(int L) { return 3 * (int64_t)L + 1; }
struct ChunkPlan {
  const int32_t* nodes;    // (L): chunk c's nodes at [chunk_first(c), chunk_last(c)], children first
  const int32_t* red;      // (R): the local roots' slots, leaves first
  const int32_t* red_up;   // (R): slot of the local root above (-1 for the root L-1)
  int R;
  GROOTL_HD static ChunkPlan of(const int32_t* row, int L) { return {row, row + L, row + 2 * L, row[3 * L]}; }
};

// The chunk plan of one row (a valid tree: see check_row, with span <= kMaxSpan). out: chunk_plan_ints(L);
// work: 2 * L ints.
template <typename Par>
GROOTL_HD void chunk_plan_phases(Par& par, const int64_t* parent, const int64_t* order, int L, int32_t* out,
                                 int32_t* work) {
  int32_t* pos = work;       // preorder step of each node
  int32_t* run = work + L;   // local roots counted from the last step down
  int32_t* nodes = out;
  int32_t* red = out + L;
  int32_t* red_up = out + 2 * L;
  par.each(L, [&](int i) { pos[order[i]] = i; });
  par.each(L, [&](int v) {  // rank in the chunk by reversed preorder: children first
    const int c = v / kScanChunk, s = chunk_first(c), e = chunk_last(c, L);
    int rank = 0;
    for (int w = s; w <= e; ++w) rank += pos[w] > pos[v];
    nodes[s + rank] = v;
  });
  par.each(L, [&](int i) {
    const int64_t v = order[i], p = parent[v];
    run[L - 1 - i] = (p < 0 || p / kScanChunk != v / kScanChunk) ? 1 : 0;
  });
  par.scan(run, L);
  par.each(L, [&](int i) {
    const int64_t v = order[i], p = parent[v];
    if (!(p < 0 || p / kScanChunk != v / kScanChunk)) return;
    const int j = run[L - 1 - i] - 1;
    red[j] = root_slot(v, L);
    if (p < 0) {
      red_up[j] = -1;
      return;
    }
    int64_t w = p;  // up to p's local root
    while (parent[w] >= 0 && parent[w] / kScanChunk == w / kScanChunk) w = parent[w];
    red_up[j] = root_slot(w, L);
  });
  par.each(1, [&](int) { out[3 * L] = run[L - 1]; });
}

// Calls f(r) for each local root candidate of chunk [s, e]: its first and last kMaxSpan positions, once each.
template <typename F>
GROOTL_HD void for_ends(int s, int e, F&& f) {
  for (int r = s; r <= e && r < s + kMaxSpan; ++r) f(r);
  for (int r = (e - kMaxSpan + 1 > s + kMaxSpan ? e - kMaxSpan + 1 : s + kMaxSpan); r <= e; ++r) f(r);
}

// Calls f(q, a, slot) for each edge crossing into chunk [s, e] (a local root r of another chunk, within kMaxSpan of
// its ends, whose parent is here): q = parent(r) - s, a = the decay a(r + 1) on the edge, slot = r's slot.
template <typename Ch, typename F>
GROOTL_HD void for_edges_into(const Ch& ch, int s, int e, F&& f) {
  const auto edge = [&](int r) {
    const int64_t p = ch.parent[r];
    if (p >= s && p <= e) f((int)(p - s), ch.decay_at(r + 1), root_slot(r, ch.L));
  };
  for (int r = s - kMaxSpan < 0 ? 0 : s - kMaxSpan; r < s; ++r) edge(r);
  for (int r = e + 1; r <= e + kMaxSpan && r < ch.L; ++r) edge(r);
}

// A channel's per-state slots: kSlots per chunk, N states each (nullptr-free: every pass owns one).
template <typename acc_t>
struct SlotStates {
  acc_t* base;  // this (row, channel)'s (chunks * kSlots, N)
  int N;
  GROOTL_HD acc_t& operator()(int slot, int n) const { return base[(int64_t)slot * N + n]; }
};

// A thread's chunk buffer: entry (v - s, j) of the chunk's nodes, per states.
template <typename acc_t>
struct ChunkBuf {
  acc_t* base;
  int per;
  GROOTL_HD acc_t& operator()(int q, int j) const { return base[q * per + j]; }
};

// buf = H of chunk c's nodes with `inject` (whether the final H of the local roots of other chunks, in Hr, is
// passed in over the crossing edges). Children first: a node's sum is complete when it is reached.
template <typename Ch, typename Lanes, typename acc_t>
GROOTL_HD void chunk_states(const Ch& ch, const Lanes& ln, const ChunkPlan& plan, int c, bool inject,
                            const SlotStates<acc_t>& Hr, const ChunkBuf<acc_t>& buf) {
  const int L = ch.L, N = ch.N, s = chunk_first(c), e = chunk_last(c, L);
  for (int v = s; v <= e; ++v) {
    const acc_t x = ch.delta_at(v) * ch.u_at(v);
    const auto* Bv = ch.B_at(v);
    for (int j = 0; j < ln.per; ++j) {
      const int n = state_of(ln, j);
      if (n >= N) break;
      buf(v - s, j) = x * (acc_t)Bv[n];
    }
  }
  if (inject)
    for_edges_into(ch, s, e, [&](int q, const auto& a, int slot) {
      for (int j = 0; j < ln.per; ++j) {
        const int n = state_of(ln, j);
        if (n >= N) break;
        buf(q, j) += a.value(n) * Hr(slot, n);
      }
    });
  for (int q = 0; q <= e - s; ++q) {
    const int v = plan.nodes[s + q];
    const int64_t p = ch.parent[v];
    if (p < s || p > e) continue;
    const auto a = ch.decay_at(v + 1);
    for (int j = 0; j < ln.per; ++j) {
      const int n = state_of(ln, j);
      if (n >= N) break;
      buf(p - s, j) += a.value(n) * buf(v - s, j);
    }
  }
}

// G of chunk c's nodes into buf, parents first: at a local root the gradient coming in is Ginc (null: nothing,
// pass 1). gy at step_u.
template <typename Ch, typename Lanes, typename acc_t, typename scalar_t>
GROOTL_HD void chunk_grads(const Ch& ch, const Lanes& ln, const ChunkPlan& plan, int c, const scalar_t* gy,
                           const acc_t* Ginc_base, const ChunkBuf<acc_t>& buf) {
  const int L = ch.L, N = ch.N, s = chunk_first(c), e = chunk_last(c, L);
  const SlotStates<acc_t> Ginc{const_cast<acc_t*>(Ginc_base), N};
  for (int q = e - s; q >= 0; --q) {
    const int v = plan.nodes[s + q];
    const int64_t p = ch.parent[v];
    const acc_t g = (acc_t)gy[(int64_t)v * ch.step_u];
    const scalar_t* Cv = ch.C_at(v);
    const bool local = p >= s && p <= e;
    const auto a = ch.decay_at(local ? v + 1 : v);  // read only when local
    const int slot = local ? 0 : root_slot(v, L);
    for (int j = 0; j < ln.per; ++j) {
      const int n = state_of(ln, j);
      if (n >= N) break;
      const acc_t in = local ? a.value(n) * buf(p - s, j) : (Ginc_base != nullptr ? Ginc(slot, n) : acc_t(0));
      buf(v - s, j) = g * (acc_t)Cv[n] + in;
    }
  }
}

// The path products of chunk c: buf(v) = product of a over the edges from v up to its local root (parents first).
template <typename Ch, typename Lanes, typename acc_t>
GROOTL_HD void chunk_paths(const Ch& ch, const Lanes& ln, const ChunkPlan& plan, int c, const ChunkBuf<acc_t>& buf) {
  const int L = ch.L, N = ch.N, s = chunk_first(c), e = chunk_last(c, L);
  for (int q = e - s; q >= 0; --q) {
    const int v = plan.nodes[s + q];
    const int64_t p = ch.parent[v];
    const bool local = p >= s && p <= e;
    const auto a = ch.decay_at(local ? v + 1 : v);
    for (int j = 0; j < ln.per; ++j) {
      const int n = state_of(ln, j);
      if (n >= N) break;
      buf(v - s, j) = local ? a.value(n) * buf(p - s, j) : acc_t(1);
    }
  }
}

// Pass 1 of chunk c. Writes Hr(slot of each local root here) = H_loc, and for each local root r of another
// chunk whose parent w is here T(slot r) = a(r + 1) * path(w) and, with gy (the backward), Q(slot r) =
// a(r + 1) * G_loc(w). buf: 2 * kScanChunk * per entries.
template <typename Ch, typename Lanes, typename acc_t, typename scalar_t>
GROOTL_HD void chunk_pass1(const Ch& ch, const Lanes& ln, const ChunkPlan& plan, int c, const scalar_t* gy,
                           const SlotStates<acc_t>& Hr, const SlotStates<acc_t>& T, const SlotStates<acc_t>& Q,
                           acc_t* scratch) {
  const int L = ch.L, N = ch.N, s = chunk_first(c), e = chunk_last(c, L);
  const ChunkBuf<acc_t> one{scratch, ln.per}, two{scratch + kScanChunk * ln.per, ln.per};
  chunk_states(ch, ln, plan, c, false, Hr, one);
  if (ln.writes())
    for_ends(s, e, [&](int r) {
      const int64_t p = ch.parent[r];
      if (p >= s && p <= e) return;
      const int slot = root_slot(r, L);
      for (int j = 0; j < ln.per; ++j) {
        const int n = state_of(ln, j);
        if (n >= N) break;
        Hr(slot, n) = one(r - s, j);
      }
    });
  chunk_paths(ch, ln, plan, c, one);
  if (gy != nullptr) chunk_grads(ch, ln, plan, c, gy, (const acc_t*)nullptr, two);
  if (ln.writes())
    for_edges_into(ch, s, e, [&](int q, const auto& a, int slot) {
      for (int j = 0; j < ln.per; ++j) {
        const int n = state_of(ln, j);
        if (n >= N) break;
        T(slot, n) = a.value(n) * one(q, j);
        if (gy != nullptr) Q(slot, n) = a.value(n) * two(q, j);
      }
    });
}

// Pass 2 for state n of one channel: Hr from H_loc to the final H of every local root (leaves first); with Q
// (the backward) Q becomes Ginc (root first; g_root: the root's, may be null).
template <typename acc_t>
GROOTL_HD void reduced_pass(const ChunkPlan& plan, int n, const SlotStates<acc_t>& Hr, const SlotStates<acc_t>& T,
                            const SlotStates<acc_t>* Q, const acc_t* g_root) {
  for (int j = 0; j < plan.R; ++j) {
    const int up = plan.red_up[j];
    if (up >= 0) Hr(up, n) += T(plan.red[j], n) * Hr(plan.red[j], n);
  }
  if (Q == nullptr) return;
  for (int j = plan.R - 1; j >= 0; --j) {
    const int up = plan.red_up[j], slot = plan.red[j];
    (*Q)(slot, n) = up < 0 ? (g_root != nullptr ? g_root[n] : acc_t(0)) : (*Q)(slot, n) + T(slot, n) * (*Q)(up, n);
  }
}

// Pass 3 of the forward for chunk c: y (at step_u; the leader writes) and, in the root's chunk, root (N).
template <typename Ch, typename Lanes, typename acc_t, typename scalar_t>
GROOTL_HD void chunk_forward(const Ch& ch, const Lanes& ln, const ChunkPlan& plan, int c, const SlotStates<acc_t>& Hr,
                             acc_t* scratch, scalar_t* y, acc_t* root) {
  const int L = ch.L, N = ch.N, s = chunk_first(c), e = chunk_last(c, L);
  const ChunkBuf<acc_t> H{scratch, ln.per};
  chunk_states(ch, ln, plan, c, true, Hr, H);
  for (int v = s; v <= e; ++v) {
    const scalar_t* Cv = ch.C_at(v);
    acc_t part = 0;
    for (int j = 0; j < ln.per; ++j) {
      const int n = state_of(ln, j);
      if (n >= N) break;
      part += (acc_t)Cv[n] * H(v - s, j);
    }
    const acc_t out = ln.sum(part);
    if (ln.leader()) y[(int64_t)v * ch.step_u] = (scalar_t)out;
  }
  if (root != nullptr && e == L - 1 && ln.writes())
    for (int j = 0; j < ln.per; ++j) {
      const int n = state_of(ln, j);
      if (n >= N) break;
      root[n] = H(L - 1 - s, j);
    }
}

// Pass 3 of the backward for chunk c, given the final Hr and Ginc. The leader writes du (step_u) and d_delta
// (step_delta) at every position of the chunk, except that d_delta at the chunk's first position lacks the term
// of the edge from the previous chunk's last node, which that chunk writes to tail[c - 1] (its own tail[c]: the
// term for position e + 1); the caller adds it. dA_out: this chunk's share of dA (N states, or with a scalar decay
// the channel's one sum by the leader). The dB/dC terms go to sink.add / sink.commit(v) in position order.
template <typename Ch, typename Lanes, typename acc_t, typename scalar_t, typename Sink>
GROOTL_HD void chunk_backward(const Ch& ch, const Lanes& ln, const ChunkPlan& plan, int c, const scalar_t* gy,
                              const SlotStates<acc_t>& Hr, const SlotStates<acc_t>& Ginc, acc_t* scratch,
                              acc_t* dA_acc, scalar_t* du, acc_t* d_delta, acc_t* tail, acc_t* dA_out, Sink& sink) {
  const int L = ch.L, N = ch.N, s = chunk_first(c), e = chunk_last(c, L);
  const ChunkBuf<acc_t> H{scratch, ln.per}, G{scratch + kScanChunk * ln.per, ln.per};
  chunk_states(ch, ln, plan, c, true, Hr, H);
  chunk_grads(ch, ln, plan, c, gy, Ginc.base, G);
  for (int j = 0; j < ln.per; ++j) dA_acc[j] = 0;
  acc_t edge_in = 0;  // d loss / d delta[v] through a(v) on the edge from v - 1
  for (int v = s; v <= e; ++v) {
    const int64_t p = ch.parent[v];
    const acc_t gyv = (acc_t)gy[(int64_t)v * ch.step_u];
    const acc_t dv = ch.delta_at(v), uv = ch.u_at(v), x = dv * uv;
    const scalar_t* Bv = ch.B_at(v);
    acc_t gx = 0;
    for (int j = 0; j < ln.per; ++j) {
      const int n = state_of(ln, j);
      if (n >= N) break;
      gx += G(v - s, j) * (acc_t)Bv[n];
      sink.add(j, n, v, G(v - s, j) * x, gyv * H(v - s, j));
    }
    gx = ln.sum(gx);
    sink.commit(v);
    acc_t edge_out = 0;
    if (p >= 0) {  // edge v -> parent, transition a(v + 1)
      const bool local = p >= s && p <= e;
      const int slot = local ? 0 : root_slot(v, L);
      const acc_t dn = ch.delta_at(v + 1);
      const auto decay = ch.decay_at(v + 1);
      for (int j = 0; j < ln.per; ++j) {
        const int n = state_of(ln, j);
        if (n >= N) break;
        const acc_t a = decay.value(n);
        const acc_t in = local ? a * G(p - s, j) : Ginc(slot, n);  // a(v + 1) * G[parent]
        const acc_t t = in * H(v - s, j);                           // d loss / d log a(v + 1)
        edge_out += t * decay.rate(n);
        dA_acc[j] += t * dn;
      }
      edge_out = ln.sum(edge_out);
    }
    if (ln.leader()) {
      du[(int64_t)v * ch.step_u] = (scalar_t)(gx * dv);
      d_delta[(int64_t)v * ch.step_delta] = gx * uv + edge_in;
    }
    edge_in = edge_out;
  }
  if (ln.leader() && e < L - 1) tail[c] = edge_in;
  if constexpr (Ch::scalar_decay) {
    acc_t total = 0;
    for (int j = 0; j < ln.per; ++j) total += dA_acc[j];  // idle slots hold 0
    total = ln.sum(total);
    if (ln.leader()) dA_out[0] = total;
  } else if (ln.writes()) {
    for (int j = 0; j < ln.per; ++j) {
      const int n = state_of(ln, j);
      if (n >= N) break;
      dA_out[n] = dA_acc[j];
    }
  }
}

}  // namespace grootl
