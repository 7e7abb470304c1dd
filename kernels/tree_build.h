// The GrootL token graph, its minimum spanning tree and the rooting at L-1, one row at a time, for host and
// device. Matches grootl/tree/graph.py: edge (t-j, t), 1 <= j <= k, has the id t*k + (j-1) and the weight
// slot [t, j-1]; ties in weight break towards the smaller id (a strict total order, so the tree is unique);
// the order is the heavy-last DFS preorder (children by subtree size, the largest last, ties by position), as
// graph.heavy_last_preorder; edge weights are formed in one defined order and compared on a grid, as
// graph.grouped_edge_weights (Mamba-1's rank-one features are its one-group case), so every path builds the same
// tree.
//
// The tree is built by data-parallel phases over the rows of a batch, `par.each(n, body)` running body(row, i)
// for every row and every edge, node or directed edge i < n: the CPU runs them one after another for one row
// on one thread (SerialRows), the GPU launches each phase as a grid over all rows' elements (GridRows in
// cuda.cu: many blocks per row, the launch boundary the barrier). Borůvka finds the spanning tree in at most
// ceil(log2 L) rounds, an Euler tour ranked by pointer jumping roots it; the loops run fixed counts that depend
// on L alone, so the GPU needs no host round trip (the CPU stops a loop early once nothing changes: the same
// result). The same code runs, and is tested, on the CPU.
#pragma once

#include <cstring>

#include "tree_scan.h"

namespace grootl {

constexpr int kCosine = 0, kEuclidean = 1, kManhattan = 2;

GROOTL_HD bool edge_exists(int t, int j, int L, int64_t context_len, int64_t start) {
  if (t >= L || t < j) return false;
  return j == 1 || (t < context_len && t - j >= start);
}

GROOTL_HD int64_t feature_index(int d, int L, int t) { return (int64_t)d * L + t; }

// a * b rounded on its own, never fused into a following add: the device's edge weights must round exactly as
// the CPU's (built with -ffp-contract=off) for the trees to be equal, while the scans keep fused multiply-adds.
GROOTL_HD float mul(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
GROOTL_HD double mul(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

// A sum in one defined order, the same on every path (grootl.tree.graph.pairwise_sum): the terms zero-padded to a
// power of two and added in neighbouring pairs, level by level, kept as a stack of finished blocks.
template <typename acc_t>
struct PairwiseSum {
  acc_t part[32];
  int top = 0;
  uint32_t count = 0;
  GROOTL_HD void add(acc_t x) {
    for (uint32_t c = count; c & 1; c >>= 1) x = part[--top] + x;
    part[top++] = x;
    ++count;
  }
  GROOTL_HD acc_t total() const {
    if (top == 0) return acc_t(0);
    acc_t x = part[top - 1];
    for (int i = top - 2; i >= 0; --i) x = part[i] + x;
    return x;
  }
};

// Weights are compared on a grid so that ties in real arithmetic stay ties whatever the rounding (see
// grootl.tree.graph.quantize): cosine distances in steps of 2^-bits, the others to `bits` significant bits.
template <typename acc_t>
GROOTL_HD int grid_bits() { return sizeof(acc_t) == 4 ? 16 : 40; }
template <typename acc_t>
GROOTL_HD acc_t pow2(int e) { return (acc_t)ldexp(1.0, e); }
template <typename acc_t>
GROOTL_HD acc_t quantize(acc_t w, int distance) {
  const int bits = grid_bits<acc_t>();
  if (distance == kCosine) return mul((acc_t)rint(mul(w, pow2<acc_t>(bits))), pow2<acc_t>(-bits));
  int e;
  const acc_t m = (acc_t)frexp(w, &e);
  return mul((acc_t)rint(mul(m, pow2<acc_t>(bits))), pow2<acc_t>(e - bits));
}

// A row's features as G rank-one blocks: X[t] = (a_g[:, t] (outer) b_g[:, t] for g < G), a_g of C values and
// b_g of N values per position, read (as acc_t) by a(g, c, t) and b(g, n, t). Mamba-1 has one block, a = delta * u
// (ScaledFeatures); Mamba-2 has one per group of heads, a_g = dt * x over the group's heads (GroupedFeatures).
// Made for row 0 of a batch laid out row after row; row(b) gives row b's.
template <typename scalar_t, typename acc_t>
struct ScaledFeatures {
  const scalar_t* u;      // (D, L)
  const acc_t* delta;     // (D, L), in the accumulation type
  const scalar_t* B;      // (N, L)
  int C, N, L;            // C = D
  GROOTL_HD ScaledFeatures row(int64_t b) const { return {u + b * C * L, delta + b * C * L, B + b * N * L, C, N, L}; }
  GROOTL_HD int groups() const { return 1; }
  GROOTL_HD acc_t a(int, int c, int t) const {
    const int64_t i = feature_index(c, L, t);
    return mul((acc_t)delta[i], (acc_t)u[i]);
  }
  GROOTL_HD acc_t b(int, int n, int t) const { return (acc_t)B[feature_index(n, L, t)]; }
};

template <typename scalar_t, typename acc_t>
struct GroupedFeatures {
  const scalar_t* a_;  // (G, C, L)
  const scalar_t* b_;  // (G, N, L)
  int G, C, N, L;
  GROOTL_HD GroupedFeatures row(int64_t b) const {
    return {a_ + b * G * C * L, b_ + b * G * N * L, G, C, N, L};
  }
  GROOTL_HD int groups() const { return G; }
  GROOTL_HD acc_t a(int g, int c, int t) const { return (acc_t)a_[feature_index(g * C + c, L, t)]; }
  GROOTL_HD acc_t b(int g, int n, int t) const { return (acc_t)b_[feature_index(g * N + n, L, t)]; }
};

// The pairwise sums of X[t] . X[s] (s = t: the squared norm) are formed by the callers, CPU (cpu.cpp's
// feature_dots) and GPU (cuda.cu's feature_kernel), with the bits of graph.grouped_edge_weights: sum over g of
// (a_g[t] . a_g[s]) * (b_g[t] . b_g[s]), each sum a PairwiseSum (over c, over n, then over g).

// Manhattan's sum over (g, c, n) of |X[t] - X[s]| for s = t - j: the term of channel c of group g is a PairwiseSum
// over n; the terms are summed by a PairwiseSum over c, then the groups' sums by one over g.
template <typename acc_t, typename Features>
GROOTL_HD acc_t manhattan_term(const Features& f, int g, int c, int t, int s) {
  const acc_t at = f.a(g, c, t), as = f.a(g, c, s);
  PairwiseSum<acc_t> row;
  for (int n = 0; n < f.N; ++n) {
    const acc_t diff = mul(at, f.b(g, n, t)) - mul(as, f.b(g, n, s));
    row.add(diff < 0 ? -diff : diff);
  }
  return row.total();
}
template <typename acc_t, typename Features>
GROOTL_HD acc_t manhattan_sum(const Features& f, int t, int s) {
  PairwiseSum<acc_t> total;
  for (int g = 0; g < f.groups(); ++g) {
    PairwiseSum<acc_t> group;
    for (int c = 0; c < f.C; ++c) group.add(manhattan_term<acc_t>(f, g, c, t, s));
    total.add(group.total());
  }
  return total.total();
}

// Weight of edge (s, t) from X[t] . X[s] and the squared norms (before quantize): cosine distance, its norm clamp
// relative to the pair's own scale, or squared euclidean distance (same edge order as euclidean), exactly zero
// within the rounding of its terms.
template <typename acc_t>
GROOTL_HD acc_t dot_weight(acc_t dot, acc_t sq_t, acc_t sq_s, int distance) {
  const acc_t total = sq_t + sq_s;
  if (distance == kCosine) {
    const acc_t prod = mul((acc_t)sqrt(sq_t), (acc_t)sqrt(sq_s)), floor = mul(pow2<acc_t>(-40), total);
    const acc_t den = prod > floor ? prod : floor;
    return den > 0 ? 1 - dot / den : acc_t(1);
  }
  const acc_t sq = total - mul(acc_t(2), dot);
  return sq > mul(total, pow2<acc_t>(-grid_bits<acc_t>())) ? sq : acc_t(0);
}

// Weight of edge (t - j, t) on the comparison grid from a row's features: sq[t] = |X[t]|^2 and
// dots[t*k + j-1] = X[t] . X[t-j] for cosine and euclidean; for manhattan dots[t*k + j-1] = manhattan_sum(t, t-j).
template <typename acc_t>
GROOTL_HD acc_t edge_weight(int k, int t, int j, const acc_t* sq, const acc_t* dots, int distance) {
  const acc_t x = dots[(int64_t)t * k + j - 1];
  return quantize(distance == kManhattan ? x : dot_weight(x, sq[t], sq[t - j], distance), distance);
}

// Order-preserving integer key of a weight; equal weights (+0 and -0 too) get equal keys.
template <typename acc_t>
GROOTL_HD uint64_t weight_key(acc_t w) {
  w = w + acc_t(0);  // -0 -> +0
  if constexpr (sizeof(acc_t) == 4) {
    uint32_t bits;
    memcpy(&bits, &w, 4);
    return bits ^ ((bits >> 31) ? 0xffffffffu : 0x80000000u);
  } else {
    uint64_t bits;
    memcpy(&bits, &w, 8);
    return bits ^ ((bits >> 63) ? ~uint64_t(0) : uint64_t(1) << 63);
  }
}

// Scratch of one row's build: ints unless noted.
struct BuildScratch {
  int32_t* comp;    // L: component label (its root node)
  int32_t* best;    // L: cheapest edge out of each component
  int32_t* next;    // L: the component across it
  uint64_t* key;    // L: that edge's weight key
  int32_t* changed;  // 2: did a Borůvka round find a live edge; did a pointer jump
  uint8_t* in_tree;  // L * k: edges of the tree
  int32_t* succ;    // 2 * L * k, and the five below: the Euler tour's successor of each directed edge
  int32_t* succ0;   //   (kept: each tour is ranked from it)
  int32_t* val;     //   values summed to the tour's end by pointer jumping
  int32_t* succ_tmp;
  int32_t* val_tmp;
  int32_t* plan_work;  // plan_work_ints(L)
};
GROOTL_HD int64_t build_scratch_ints(int L, int k) {  // even, so that rows laid end to end stay 8-byte aligned
  const int64_t n = 5 * (int64_t)L + 2 + 10 * (int64_t)L * k + plan_work_ints(L);
  return n + (n & 1);
}
// Carves BuildScratch out of build_scratch_ints(L, k) int32s (8-byte aligned) and L * k bytes.
GROOTL_HD BuildScratch build_scratch(int32_t* ints, uint8_t* bytes, int L, int k) {
  const int64_t dir = 2 * (int64_t)L * k;
  BuildScratch s;
  s.key = reinterpret_cast<uint64_t*>(ints);
  s.comp = ints + 2 * L;
  s.best = s.comp + L;
  s.next = s.best + L;
  s.changed = s.next + L;
  s.succ = s.changed + 2;
  s.succ0 = s.succ + dir;
  s.val = s.succ0 + dir;
  s.succ_tmp = s.val + dir;
  s.val_tmp = s.succ_tmp + dir;
  s.plan_work = s.val_tmp + dir;
  s.in_tree = bytes;
  return s;
}

// Where the build of each row of a batch reads and writes: row r's features sq, dots (see edge_weight), weights
// (L * k each but sq, L) and scratch (build_scratch_ints(L, k) ints, L * k bytes) at r * stride times their
// size (stride 1: rows end to end; 0: every row on the same buffers, built one at a time), its prompt
// context_lens[r], start[r] and its tree parent, order (L each) always its own.
template <typename acc_t>
struct BuildRows {
  int L, k;
  int64_t stride;
  acc_t* sq;
  acc_t* dots;
  acc_t* weights;
  int32_t* ints;
  uint8_t* bytes;
  const int64_t* context_lens;
  const int64_t* start;
  int64_t* parent;
  int64_t* order;
  GROOTL_HD BuildScratch scratch(int r) const {
    return build_scratch(ints + r * stride * build_scratch_ints(L, k), bytes + r * stride * L * k, L, k);
  }
  GROOTL_HD const acc_t* sq_of(int r) const { return sq + r * stride * L; }
  GROOTL_HD const acc_t* dots_of(int r) const { return dots + r * stride * L * k; }
  GROOTL_HD acc_t* weights_of(int r) const { return weights + r * stride * L * k; }
  GROOTL_HD bool exists(int r, int t, int j) const { return edge_exists(t, j, L, context_lens[r], start[r]); }
};

// The phases' lambdas: by value, and on the GPU callable in device code (nvcc --extended-lambda).
#ifdef __CUDACC__
#define GROOTL_PHASE [=] __host__ __device__
#else
#define GROOTL_PHASE [=]
#endif

// Phases on one thread for one row (the CPU's); `settled` lets a loop stop once the row's flag says nothing
// changed. GridRows in cuda.cu runs them over all rows at once and never stops a loop early.
struct SerialRows {
  int row;
  template <typename F>
  void each(int n, F&& body) {
    for (int i = 0; i < n; ++i) body(row, i);
  }
  template <typename acc_t>
  bool settled(const BuildRows<acc_t>& rows, int flag) const {
    return rows.scratch(row).changed[flag] == 0;
  }
};

// ceil(log2 n): enough Borůvka rounds for n nodes (each round at least halves the components), and enough
// pointer-jumping steps for a chain of n nodes (n >= 1).
inline int log2_ceil(int n) {
  int r = 0;
  while ((1 << r) < n) ++r;
  return r;
}

// The edge's two ends' components, or false when it does not exist or is inside one component.
GROOTL_HD bool live_edge(const BuildScratch& s, int e, int L, int k, int64_t context_len, int64_t start, int& a,
                         int& b) {
  const int t = e / k, j = e % k + 1;
  if (!edge_exists(t, j, L, context_len, start)) return false;
  a = s.comp[t - j];
  b = s.comp[t];
  return a != b;
}

// Each row's edge weights (see edge_weight), then its minimum spanning tree into in_tree, by Borůvka's algorithm.
template <typename acc_t, typename Par>
void spanning_tree(Par& par, const BuildRows<acc_t>& rows, int distance) {
  const int L = rows.L, k = rows.k, E = L * k;
  par.each(E, GROOTL_PHASE(int r, int e) {
    const int t = e / k, j = e % k + 1;
    if (rows.exists(r, t, j)) rows.weights_of(r)[e] = edge_weight(k, t, j, rows.sq_of(r), rows.dots_of(r), distance);
    rows.scratch(r).in_tree[e] = 0;
  });
  par.each(L, GROOTL_PHASE(int r, int v) { rows.scratch(r).comp[v] = v; });
  for (int round = 0; round < log2_ceil(L); ++round) {
    par.each(L, GROOTL_PHASE(int r, int v) {
      const BuildScratch s = rows.scratch(r);
      s.key[v] = ~uint64_t(0);
      s.best[v] = E;
      if (v == 0) s.changed[0] = 0;
    });
    par.each(E, GROOTL_PHASE(int r, int e) {  // each component's cheapest weight ...
      const BuildScratch s = rows.scratch(r);
      int a, b;
      if (!live_edge(s, e, L, k, rows.context_lens[r], rows.start[r], a, b)) return;
      atomic_max(&s.changed[0], 1);
      const uint64_t w = weight_key(rows.weights_of(r)[e]);
      atomic_min(&s.key[a], w);
      atomic_min(&s.key[b], w);
    });
    if (par.settled(rows, 0)) break;
    par.each(E, GROOTL_PHASE(int r, int e) {  // ... and the smallest id among its edges of that weight
      const BuildScratch s = rows.scratch(r);
      int a, b;
      if (!live_edge(s, e, L, k, rows.context_lens[r], rows.start[r], a, b)) return;
      const uint64_t w = weight_key(rows.weights_of(r)[e]);
      if (w == s.key[a]) atomic_min(&s.best[a], e);
      if (w == s.key[b]) atomic_min(&s.best[b], e);
    });
    // every component joins the one across its cheapest edge; two that chose each other chose the same edge
    // (the cheapest between them in the (weight, id) order): the smaller label stays a root and adds the edge
    par.each(L, GROOTL_PHASE(int r, int c) {
      const BuildScratch s = rows.scratch(r);
      if (s.comp[c] != c) return;
      const int e = s.best[c];
      if (e == E) {
        s.next[c] = c;
        return;
      }
      const int t = e / k, j = e % k + 1, a = s.comp[t - j], b = s.comp[t];
      const int n = a == c ? b : a;
      const bool mutual = s.best[n] == e;
      s.next[c] = mutual && c < n ? c : n;
      if (!mutual || c < n) s.in_tree[e] = 1;
    });
    // pointer jumping to the roots, double-buffered through best (free until the next round): no thread reads
    // a pointer another thread writes in the same phase; a round starts with at most L >> round components (each
    // round at least halves them), so its pointer chains are shorter than that
    for (int step = 0; step < log2_ceil(L >> round); ++step) {
      par.each(L, GROOTL_PHASE(int r, int c) {
        const BuildScratch s = rows.scratch(r);
        if (c == 0) s.changed[1] = 0;
        if (s.comp[c] == c) s.best[c] = s.next[s.next[c]];
      });
      par.each(L, GROOTL_PHASE(int r, int c) {
        const BuildScratch s = rows.scratch(r);
        if (s.comp[c] != c || s.best[c] == s.next[c]) return;
        s.next[c] = s.best[c];
        atomic_max(&s.changed[1], 1);
      });
      if (par.settled(rows, 1)) break;
    }
    par.each(L, GROOTL_PHASE(int r, int v) {
      const BuildScratch s = rows.scratch(r);
      s.comp[v] = s.next[s.comp[v]];
    });
  }
}

// Tree slot s of node v (s < k: offset s - k; else offset s - k + 1): the neighbour, or -1.
GROOTL_HD int slot_neighbour(const uint8_t* in_tree, int L, int k, int v, int s) {
  const int off = s < k ? s - k : s - k + 1;
  const int w = v + off;
  if (w < 0 || w >= L) return -1;
  const int hi = off < 0 ? v : w, j = off < 0 ? -off : off;
  return in_tree[hi * k + j - 1] ? w : -1;
}

// The first tree slot of v strictly after slot r, cyclically (r itself when it is v's only one).
GROOTL_HD int next_slot(const uint8_t* in_tree, int L, int k, int v, int r) {
  const int slots = 2 * k;
  for (int i = 1; i <= slots; ++i) {
    const int s = (r + i) % slots;
    if (slot_neighbour(in_tree, L, k, v, s) >= 0) return s;
  }
  return r;
}

// val[a] = the sum of val over a and its successors to the tour's end (whose successor is itself, val 0);
// n directed edges, `length` of them on the tour.
template <typename acc_t, typename Par>
void rank_tour(Par& par, const BuildRows<acc_t>& rows, int n, int length) {
  par.each(n, GROOTL_PHASE(int r, int a) {
    const BuildScratch s = rows.scratch(r);
    s.succ[a] = s.succ0[a];
  });
  for (int step = 1; step < length; step *= 2) {
    par.each(n, GROOTL_PHASE(int r, int a) {
      const BuildScratch s = rows.scratch(r);
      s.val_tmp[a] = s.val[a] + s.val[s.succ[a]];
      s.succ_tmp[a] = s.succ[s.succ[a]];
    });
    par.each(n, GROOTL_PHASE(int r, int a) {
      const BuildScratch s = rows.scratch(r);
      s.val[a] = s.val_tmp[a];
      s.succ[a] = s.succ_tmp[a];
    });
  }
}

// The slot of v's neighbour at v + off (see slot_neighbour).
GROOTL_HD int slot_of(int k, int off) { return off < 0 ? off + k : off + k - 1; }

// Children are visited by (subtree size, position), the largest last (heavy-last: see grootl.tree.graph).
GROOTL_HD bool visits_before(const int32_t* size, int a, int b) { return size[a] != size[b] ? size[a] < size[b] : a < b; }

// The child of v visited after child c (c = -1: the first), or -1.
GROOTL_HD int next_child(const uint8_t* in_tree, int L, int k, const int64_t* parent, const int32_t* size, int v,
                         int c) {
  int best = -1;
  for (int slot = 0; slot < 2 * k; ++slot) {
    const int w = slot_neighbour(in_tree, L, k, v, slot);
    if (w < 0 || parent[w] != v || (c >= 0 && !visits_before(size, c, w))) continue;
    if (best < 0 || visits_before(size, w, best)) best = w;
  }
  return best;
}

// Roots each row's in_tree at L-1: parent, and order = the heavy-last DFS preorder. Directed edge a = v * 2k + slot
// goes from v to its neighbour across slot. A first tour (leaving a node by the next tree slot after the one it
// arrived by; the root from slot 0), ranked by pointer jumping, gives each edge's direction (an edge walked
// before its reverse points to a child) and each subtree's size; a second tour visits children heavy-last, and a
// node's preorder position counts the child-pointing edges walked before the one into it.
template <typename acc_t, typename Par>
void root_tree(Par& par, const BuildRows<acc_t>& rows) {
  const int L = rows.L, k = rows.k, slots = 2 * k, n = L * slots;
  if (L == 1) {
    par.each(1, GROOTL_PHASE(int r, int) {
      rows.parent[r] = -1;
      rows.order[r] = 0;
    });
    return;
  }
  par.each(n, GROOTL_PHASE(int r, int a) {
    const BuildScratch s = rows.scratch(r);
    const int first = (L - 1) * slots + next_slot(s.in_tree, L, k, L - 1, slots - 1);
    const int v = a / slots, slot = a % slots, w = slot_neighbour(s.in_tree, L, k, v, slot);
    int succ = a;
    if (w >= 0) {
      succ = w * slots + next_slot(s.in_tree, L, k, w, slots - 1 - slot);
      if (succ == first) succ = a;  // back at the start: the tour ends here
    }
    s.succ0[a] = succ;
    s.val[a] = succ != a;
  });
  rank_tour(par, rows, n, 2 * (L - 1));
  par.each(L, GROOTL_PHASE(int r, int v) {
    const BuildScratch s = rows.scratch(r);
    int32_t* size = s.comp;  // free after the spanning tree
    int p = -1, sz = L;
    for (int slot = 0; slot < slots; ++slot) {
      const int w = slot_neighbour(s.in_tree, L, k, v, slot);
      if (w < 0) continue;
      const int in = w * slots + slots - 1 - slot, out = v * slots + slot;  // w -> v, v -> w
      if (s.val[in] > s.val[out]) {
        p = w;
        sz = (s.val[in] - s.val[out] + 1) / 2;  // the edges walked inside v's subtree: 2 (size - 1)
      }
    }
    rows.parent[(int64_t)r * L + v] = p;
    size[v] = sz;
  });
  par.each(n, GROOTL_PHASE(int r, int a) {  // the heavy-last tour; 1 on the edges that point to a child
    const BuildScratch s = rows.scratch(r);
    const int64_t* parent = rows.parent + (int64_t)r * L;
    const int v = a / slots, slot = a % slots, w = slot_neighbour(s.in_tree, L, k, v, slot);
    int succ = a;
    bool down = false;
    if (w >= 0) {
      down = parent[w] == v;
      const int c = next_child(s.in_tree, L, k, parent, s.comp, w, down ? -1 : v);
      const int to = c >= 0 ? c : down ? v : (int)parent[w];
      if (to >= 0) succ = w * slots + slot_of(k, to - w);  // else: the last edge into the root, the tour's end
    }
    s.succ0[a] = succ;
    s.val[a] = down;
  });
  rank_tour(par, rows, n, 2 * (L - 1));
  par.each(n, GROOTL_PHASE(int r, int a) {
    const BuildScratch s = rows.scratch(r);
    const int64_t* parent = rows.parent + (int64_t)r * L;
    int64_t* order = rows.order + (int64_t)r * L;
    const int v = a / slots, w = slot_neighbour(s.in_tree, L, k, v, a % slots);
    if (w >= 0 && parent[w] == v) order[L - s.val[a]] = w;  // 1 + the (L - 1) - val[a] child edges walked before
    if (a == 0) order[0] = L - 1;
  });
}

// The trees (parent, order) of the rows from their features: edge weights, spanning tree, rooting. The caller then
// plans them (plan_phases in tree_scan.h, with each row's scratch plan_work).
template <typename acc_t, typename Par>
void build_trees(Par& par, const BuildRows<acc_t>& rows, int distance) {
  spanning_tree(par, rows, distance);
  root_tree(par, rows);
}

}  // namespace grootl
