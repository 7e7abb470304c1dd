// The GrootL token graph, its minimum spanning tree and the rooting at L-1, one row at a time, for host and
// device. Matches grootl/tree/graph.py: edge (t-j, t), 1 <= j <= k, has the id t*k + (j-1) and the weight
// slot [t, j-1]; ties in weight break towards the smaller id; children are visited in the Euler-tour order
// of graph.root_tree (slots -k..-1, 1..k around a node, cyclically after the slot towards the parent).
#pragma once

#include "tree_scan.h"

namespace grootl {

constexpr int kCosine = 0, kEuclidean = 1, kManhattan = 2;

GROOTL_HD bool edge_exists(int t, int j, int L, int64_t context_len, int64_t start) {
  if (t >= L || t < j) return false;
  return j == 1 || (t < context_len && t - j >= start);
}

GROOTL_HD int64_t feature_index(int d, int L, int t) { return (int64_t)d * L + t; }

// Squared norm over N of B[:, t] (B: (N, L)).
template <typename scalar_t, typename acc_t>
GROOTL_HD acc_t norm_b(const scalar_t* B, int N, int L, int t) {
  acc_t total = 0;
  for (int n = 0; n < N; ++n) {
    const acc_t b = (acc_t)B[feature_index(n, L, t)];
    total += b * b;
  }
  return total;
}

// sum over D of a[t] * a[s] with a = delta * u (u, delta: (D, L)), in order of d; s == t gives |a[t]|^2.
template <typename scalar_t, typename acc_t>
GROOTL_HD acc_t dot_a(const scalar_t* u, const scalar_t* delta, int D, int L, int t, int s) {
  acc_t total = 0;
  for (int d = 0; d < D; ++d) {
    const acc_t at = (acc_t)delta[feature_index(d, L, t)] * (acc_t)u[feature_index(d, L, t)];
    const acc_t as = (acc_t)delta[feature_index(d, L, s)] * (acc_t)u[feature_index(d, L, s)];
    total += at * as;
  }
  return total;
}

// Weight of edge (s, t) from the dot products of its rank-one features X = a (outer) B: cosine distance or
// squared euclidean distance (same edge order as euclidean).
template <typename acc_t>
GROOTL_HD acc_t rank_one_weight(acc_t dot_a, acc_t dot_b, acc_t aa_t, acc_t aa_s, acc_t bb_t, acc_t bb_s,
                                int distance) {
  const acc_t dot = dot_a * dot_b;
  if (distance == kCosine) {
    const acc_t norm = sqrt(aa_t * aa_s * bb_t * bb_s);
    const acc_t eps = (acc_t)1e-12;
    return 1 - dot / (norm > eps ? norm : eps);
  }
  const acc_t sq = aa_t * bb_t + aa_s * bb_s - 2 * dot;
  return sq > 0 ? sq : 0;
}

// Weight of edge (t - j, t): rank-one distances from dot products, manhattan summed over (d, n).
template <typename scalar_t, typename acc_t>
GROOTL_HD acc_t edge_weight(const scalar_t* u, const scalar_t* delta, const scalar_t* B, int D, int N, int L, int t,
                            int j, const acc_t* aa, const acc_t* bb, acc_t da, int distance) {
  const int s = t - j;
  if (distance == kManhattan) {
    acc_t total = 0;
    for (int d = 0; d < D; ++d) {
      const acc_t at = (acc_t)delta[feature_index(d, L, t)] * (acc_t)u[feature_index(d, L, t)];
      const acc_t as = (acc_t)delta[feature_index(d, L, s)] * (acc_t)u[feature_index(d, L, s)];
      for (int n = 0; n < N; ++n) {
        const acc_t diff = at * (acc_t)B[feature_index(n, L, t)] - as * (acc_t)B[feature_index(n, L, s)];
        total += diff < 0 ? -diff : diff;
      }
    }
    return total;
  }
  acc_t db = 0;
  for (int n = 0; n < N; ++n) db += (acc_t)B[feature_index(n, L, t)] * (acc_t)B[feature_index(n, L, s)];
  return rank_one_weight(da, db, aa[t], aa[s], bb[t], bb[s], distance);
}

// Sort order of edges: by weight, then by id.
template <typename acc_t>
GROOTL_HD bool edge_before(acc_t wa, int32_t ida, acc_t wb, int32_t idb) {
  return wa < wb || (wa == wb && ida < idb);
}

GROOTL_HD int32_t find_root(int32_t* comp, int32_t x) {
  while (comp[x] != x) {
    comp[x] = comp[comp[x]];
    x = comp[x];
  }
  return x;
}

// Kruskal over the row's edges, given their ids sorted by (weight, id) (n_sorted of them, all existing):
// marks in_tree[id]. comp: L ints of scratch.
GROOTL_HD void kruskal(const int32_t* sorted_ids, int n_sorted, int L, int k, uint8_t* in_tree, int32_t* comp) {
  for (int v = 0; v < L; ++v) comp[v] = v;
  for (int e = 0; e < L * k; ++e) in_tree[e] = 0;
  int joined = 0;
  for (int e = 0; e < n_sorted && joined < L - 1; ++e) {
    const int32_t id = sorted_ids[e];
    const int32_t t = id / k, j = id % k + 1;
    const int32_t ra = find_root(comp, t - j), rb = find_root(comp, t);
    if (ra == rb) continue;
    comp[ra < rb ? rb : ra] = ra < rb ? ra : rb;
    in_tree[id] = 1;
    ++joined;
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

// Roots the tree at L-1: parent and DFS preorder, children in the Euler-tour order. work: 3 * L ints.
GROOTL_HD void root_tree(const uint8_t* in_tree, int L, int k, int64_t* parent, int64_t* order, int32_t* work) {
  int32_t* st_node = work;
  int32_t* st_in = work + L;
  int32_t* st_it = work + 2 * L;
  const int slots = 2 * k;
  int sp = 0, pos = 0;
  parent[L - 1] = -1;
  order[pos++] = L - 1;
  st_node[sp] = L - 1;
  st_in[sp] = slots - 1;  // the root scans every slot, starting at 0
  st_it[sp++] = 0;
  while (sp > 0) {
    const int top = sp - 1, v = st_node[top];
    const int it = ++st_it[top];
    if (it > (v == L - 1 ? slots : slots - 1)) {
      --sp;
      continue;
    }
    const int s = (st_in[top] + it) % slots;
    const int w = slot_neighbour(in_tree, L, k, v, s);
    if (w < 0) continue;
    parent[w] = v;
    order[pos++] = w;
    st_node[sp] = w;
    st_in[sp] = slots - 1 - s;
    st_it[sp++] = 0;
  }
}

}  // namespace grootl
