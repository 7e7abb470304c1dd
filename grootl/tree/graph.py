"""Token graph, minimum spanning tree and rooting, vectorised over the batch in plain PyTorch.

Positions of a sequence are nodes. Chain edges ``(t-1, t)`` exist everywhere; edges ``(t-j, t)`` for
``2 <= j <= k`` exist when both ends lie in the prompt (and after any left padding). Edge ``(t-j, t)``
has the id ``t * k + (j - 1)``; ties in weight break towards the smaller id, so the tree is a pure
function of the weights. The MST is found with Borůvka's algorithm and rooted at position ``L - 1``
with an Euler tour, both in O(log L) vectorised rounds, so the build runs on any device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from grootl.tree.validation import check_grouped_tree_inputs, check_tree_inputs

DISTANCES = ("cosine", "euclidean", "manhattan")


def work_dtype(x: Tensor) -> torch.dtype:
    """float64 stays float64; everything else (fp32, bf16, fp16) is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


CHAIN = "chain"  # the payload of Tree.chain's stamp: planned in closed form


class _Stamp:
    """What a Tree knows about itself beyond parent and order: the heavy-last order the scans follow and their
    plan of it (``payload``), valid only for the very tensors it was made from, unedited: ``dataclasses.replace``
    or an in-place edit makes it stale, and the scans then derive it again."""

    def __init__(self, tree_parent: Tensor, tree_order: Tensor, scan_order: Tensor, payload: object = None):
        self.tensors, self.scan_order, self.payload = (tree_parent, tree_order), scan_order, payload
        self.versions = _versions(tree_parent, tree_order)
        self.derived: dict = {}  # other trees made from this one (see repeat_rows), as valid as the plan

    def fits(self, tree: "Tree") -> bool:
        parent, order = self.tensors
        return parent is tree.parent and order is tree.order and self.versions == _versions(parent, order)


def _versions(*tensors: Tensor) -> tuple:
    """In-place edit counters (inference tensors have none: identity alone then)."""
    try:
        return tuple(t._version for t in tensors)
    except RuntimeError:
        return ()


@dataclass(frozen=True)
class Tree:
    """A rooted spanning tree per row. ``parent[b, L-1] == -1``; ``order`` lists the nodes root first,
    every node after its parent (a DFS preorder), so ``order.flip(-1)`` visits leaves before roots.

    ``Tree(parent)`` derives ``order``: the heavy-last preorder (children by subtree size, largest last, ties by
    position), which the scans use whatever ``order`` a Tree holds: their stacks then stay below log2(L) + 1
    entries for every tree, so their time and memory are linear in L.
    """

    parent: Tensor  # (batch, L) int64
    order: Tensor | None = None  # (batch, L) int64; derived from parent when None
    # the scans' plan of this tree (see _Stamp), not API: set by the builds and on first use
    _plan: _Stamp | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.order is None:
            order = heavy_last_preorder(self.parent)
            object.__setattr__(self, "order", order)
            self.remember(order)

    def plan(self) -> _Stamp | None:
        """The stamp made for exactly this parent and order, else None."""
        return self._plan if self._plan is not None and self._plan.fits(self) else None

    def remember(self, scan_order: Tensor, payload: object = None) -> None:
        """Cache the scans' order and plan of this tree (valid while parent and order stay the same tensors).
        Nothing is cached while torch.compile traces (the scans then derive the plan inside the graph)."""
        if not torch.compiler.is_compiling():
            object.__setattr__(self, "_plan", _Stamp(self.parent, self.order, scan_order, payload))

    @classmethod
    def chain(cls, batch: int, length: int, device: torch.device | str | None = None) -> "Tree":
        """The plain Mamba chain: ``parent[t] = t + 1``."""
        pos = torch.arange(length, device=device)
        parent = torch.where(pos + 1 < length, pos + 1, -1).expand(batch, length).contiguous()
        order = pos.flip(0).expand(batch, length).contiguous()
        tree = cls(parent, order)
        tree.remember(order, CHAIN)
        return tree


def stack_bound(length: int) -> int:
    """Most entries either scan stack holds on a heavy-last order: a node's open ancestors are those whose
    heavy child it does not descend from, and each such step at least halves the subtree (floor(log2 L) + 1)."""
    return max(length, 1).bit_length()


def _tour_sums(parent: Tensor, key: Tensor, val_down: Tensor, val_up: Tensor) -> Tensor:
    """Euler tour of each row's tree (children by ascending ``key``, below L * (L + 1)) ranked by pointer
    jumping: the sum of the values from each directed edge to the tour's end. Edge ``c`` goes down into node c,
    edge ``L + c`` up out of it (the root's two are unused). Returns (batch, 2L) sums; O(L log L) work,
    O(log L) rounds."""
    batch, length = parent.shape
    dev = parent.device
    nodes = torch.arange(length, device=dev).expand(batch, -1)
    root = length - 1
    p = parent.clamp_min(0)
    sib = torch.argsort(torch.where(parent < 0, -1, parent) * (length + 1) * length + key, dim=1, stable=True)
    par_sib = parent.gather(1, sib)  # siblings now adjacent, in key order; the root (parent -1) first
    same = torch.cat([par_sib[:, 1:] == par_sib[:, :-1], torch.zeros_like(par_sib[:, :1], dtype=torch.bool)], 1)
    next_sibling = torch.full_like(parent, -1).scatter_(1, sib, torch.where(same, sib.roll(-1, 1), -1))
    first = torch.cat([torch.ones_like(same[:, :1]), ~same[:, :-1]], 1) & (par_sib >= 0)
    first_child = torch.full((batch, length + 1), -1, device=dev, dtype=torch.long)
    first_child.scatter_(1, torch.where(first, par_sib, length), torch.where(first, sib, -1))
    first_child = first_child[:, :length]
    end = 2 * length  # a sentinel: its own successor, value 0
    down_next = torch.where(first_child >= 0, first_child, nodes + length)
    up_next = torch.where(next_sibling >= 0, next_sibling, torch.where(p == root, end, p + length))
    succ = torch.cat([down_next, up_next, torch.full((batch, 1), end, device=dev)], 1)
    succ[:, root], succ[:, length + root] = end, end
    total = torch.cat([val_down, val_up, torch.zeros((batch, 1), dtype=val_down.dtype, device=dev)], 1)
    total[:, root], total[:, length + root] = 0, 0
    for _ in range((2 * length).bit_length()):
        total = total + total.gather(1, succ)
        succ = succ.gather(1, succ)
    return total[:, : 2 * length]


def subtree_sizes(parent: Tensor) -> Tensor:
    """Nodes in each node's subtree, (batch, L); parent must be a tree rooted at L-1."""
    batch, length = parent.shape
    ones = torch.ones_like(parent)
    sums = _tour_sums(parent, torch.arange(length, device=parent.device).expand(batch, -1), ones, ones)
    size = (sums[:, :length] - sums[:, length:] + 1) // 2
    size[:, length - 1] = length
    return size


def heavy_last_preorder(parent: Tensor) -> Tensor:
    """The DFS preorder from the root L-1 whose children come by (subtree size, position), the largest last:
    the order the scans use (see :func:`stack_bound`). parent must be a tree rooted at L-1."""
    batch, length = parent.shape
    nodes = torch.arange(length, device=parent.device).expand(batch, -1)
    if length == 1:
        return nodes.clone()
    key = subtree_sizes(parent) * length + nodes
    sums = _tour_sums(parent, key, torch.ones_like(parent), torch.zeros_like(parent))
    pos = (length - sums[:, :length]).clamp(0, length - 1)
    pos[:, length - 1] = 0
    return torch.empty_like(parent).scatter_(1, pos, nodes)


def check_tree(tree: "Tree") -> None:
    """Raises ValueError naming the first bad row: parent not a tree rooted at L-1, or order not a DFS
    preorder of it. One host sync."""
    parent, order = tree.parent, tree.order
    batch, length = parent.shape
    nodes = torch.arange(length, device=parent.device)
    is_root = nodes == length - 1
    parent_ok = torch.where(is_root, parent == -1, (parent >= 0) & (parent < length) & (parent != nodes))
    up = torch.where(is_root | ~parent_ok, length - 1, parent)
    for _ in range(length.bit_length()):
        up = up.gather(1, up)
    parent_ok = parent_ok.all(1) & (up == length - 1).all(1)  # and no cycle: every node reaches the root
    safe = torch.where(parent_ok[:, None], parent, Tree.chain(1, length, parent.device).parent)
    size = subtree_sizes(safe)
    in_range = (order >= 0) & (order < length)
    o = order.clamp(0, length - 1)
    pos = torch.full_like(order, length).scatter_(1, o, nodes.expand(batch, -1))
    p_pos = pos.gather(1, safe.clamp_min(0))
    nested = (p_pos < pos) & (pos + size <= p_pos + size.gather(1, safe.clamp_min(0)))
    order_ok = in_range.all(1) & (pos < length).all(1) & (order[:, 0] == length - 1) & (nested | is_root).all(1)
    status = torch.stack([parent_ok, order_ok]).cpu()
    for b in range(batch):
        if not status[0, b]:
            raise ValueError(f"tree.parent row {b} is not a tree rooted at L-1: every parent must lie in [0, L) "
                             "except parent[L-1] == -1, and every node must reach L-1")
        if not status[1, b]:
            raise ValueError(f"tree.order row {b} is not a DFS preorder of tree.parent starting at the root L-1")


def scan_order(tree: "Tree") -> Tensor:
    """The heavy-last preorder of ``tree.parent`` that the scans follow: known for trees the builds (or
    ``Tree(parent)``) made, else the tree is checked (one host sync) and the order derived and remembered
    (while torch.compile traces: derived in the graph, unchecked)."""
    stamp = tree.plan()
    if stamp is not None:
        return stamp.scan_order
    if torch.compiler.is_compiling():  # no host reads and nothing cached inside a traced graph
        return heavy_last_preorder(tree.parent)
    check_tree(tree)
    order = heavy_last_preorder(tree.parent)
    tree.remember(order)
    return order


def repeat_rows(tree: Tree, times: int) -> Tree:
    """Each row of ``tree`` ``times`` times over (row b becomes rows b*times to b*times + times - 1), carrying the
    scan order, so the copy needs no check of its own. Made once per tree and kept with its plan (a tree without
    one is checked first, as by the scans); made afresh while torch.compile traces."""
    if times == 1:
        return tree
    if torch.compiler.is_compiling():
        return Tree(tree.parent.repeat_interleave(times, 0), tree.order.repeat_interleave(times, 0))
    order = scan_order(tree)
    stamp = tree.plan()
    key = ("repeat_rows", times)
    if key not in stamp.derived:
        copy = Tree(tree.parent.repeat_interleave(times, 0), tree.order.repeat_interleave(times, 0))
        copy.remember(order.repeat_interleave(times, 0), CHAIN if stamp.payload is CHAIN else None)
        stamp.derived[key] = copy
    return stamp.derived[key]


def pairwise_sum(x: Tensor, dim: int) -> Tensor:
    """Sum over ``dim`` in one defined order, as the kernels' PairwiseSum (kernels/tree_build.h): zero-padded to
    a power of two, then neighbours added in pairs, level by level. Same bits on every device."""
    n = x.shape[dim]
    width = 1 << max(n - 1, 0).bit_length()
    if width != n:
        pad = list(x.shape)
        pad[dim] = width - n
        x = torch.cat([x, x.new_zeros(pad)], dim)
    while x.shape[dim] > 1:
        pairs = x.unflatten(dim, (-1, 2))
        x = pairs.select(dim + 1, 0) + pairs.select(dim + 1, 1)
    return x.squeeze(dim)


# weights are compared on a grid, so that ties in real arithmetic (repeated tokens, proportional or zero
# features) stay ties whatever the rounding: 2^-GRID_BITS for cosine distances (in [0, 2]), GRID_BITS significant
# bits for the others; and the cosine's norm clamp is relative to the pair's own scale (kernels: the same)
GRID_BITS = {torch.float32: 16, torch.float64: 40}
NORM_EPS = 2.0**-40


def quantize(w: Tensor, distance: str) -> Tensor:
    """``w`` rounded to the comparison grid (exactly as kernels/tree_build.h's quantize)."""
    bits = GRID_BITS[w.dtype]
    if distance == "cosine":
        return torch.round(w * 2.0**bits) * 2.0**-bits
    mantissa, exponent = torch.frexp(w)
    return torch.ldexp(torch.round(mantissa * 2.0**bits), (exponent - bits).to(w.dtype))


def edge_weights(u: Tensor, delta: Tensor, B: Tensor, k: int = 3, distance: str = "cosine") -> Tensor:
    """Distance between the features ``X[:, :, t] = delta*u (outer) B`` of positions ``t-j`` and ``t``, on the
    comparison grid (see :func:`quantize`).

    Returns (batch, L, k): entry ``[b, t, j-1]`` is the weight of edge ``(t-j, t)`` (undefined for t < j).
    X is rank-1 over (D, N), so cosine and euclidean factor into sums over D and over N. Every sum is a
    :func:`pairwise_sum` and every product is formed as in kernels/tree_build.h, so all paths get the same bits.
    """
    a = delta.to(work_dtype(u)) * u.to(work_dtype(u))  # (b, D, L)
    return grouped_edge_weights(a[:, None], B.to(a.dtype)[:, None], k, distance)


def grouped_edge_weights(a: Tensor, b: Tensor, k: int = 3, distance: str = "cosine") -> Tensor:
    """:func:`edge_weights` of features made of G rank-1 blocks, ``X[:, t] = (a[:, g, :, t] (outer) b[:, g, :, t])
    for g < G``: a (batch, G, D, L), b (batch, G, N, L), both in the work dtype. Sums run over N (or D), then
    over the G groups, each a :func:`pairwise_sum`; with G = 1 these are the bits of :func:`edge_weights`."""
    length = a.shape[-1]
    out = torch.zeros(a.shape[0], length, k, dtype=a.dtype, device=a.device)
    if distance == "manhattan":
        for j in range(1, min(k, length - 1) + 1):
            out[:, j:, j - 1] = _manhattan(a, b, j)
        return quantize(out, distance)
    sq = pairwise_sum(pairwise_sum(a * a, 2) * pairwise_sum(b * b, 2), 1)  # |X[t]|^2, (b, L)
    norm = sq.sqrt()
    for j in range(1, min(k, length - 1) + 1):
        dot = pairwise_sum(pairwise_sum(a[..., j:] * a[..., :-j], 2) * pairwise_sum(b[..., j:] * b[..., :-j], 2), 1)
        if distance == "cosine":
            den = torch.maximum(norm[:, j:] * norm[:, :-j], NORM_EPS * (sq[:, j:] + sq[:, :-j]))
            out[:, j:, j - 1] = torch.where(den > 0, 1 - dot / den, 1)
        else:  # squared euclidean (same order as euclidean), exact zero within rounding of its terms
            total = sq[:, j:] + sq[:, :-j]
            d2 = total - 2 * dot
            out[:, j:, j - 1] = torch.where(d2 > total * 2.0**-GRID_BITS[a.dtype], d2, 0)
    return quantize(out, distance)


def _manhattan(a: Tensor, b: Tensor, j: int, chunk: int = 64) -> Tensor:
    """Sum over (g, d, n) of |X[t] - X[t-j]| (pairwise over n, then d, then g); not separable, so computed in
    chunks of positions."""
    parts = []
    for s in range(j, a.shape[-1], chunk):
        e = min(s + chunk, a.shape[-1])
        x_t = a[..., :, None, s:e] * b[..., None, :, s:e]
        x_s = a[..., :, None, s - j : e - j] * b[..., None, :, s - j : e - j]
        parts.append(pairwise_sum(pairwise_sum(pairwise_sum((x_t - x_s).abs(), 3), 2), 1))
    return torch.cat(parts, -1)


def edge_mask(context_lens: Tensor, length: int, k: int, start: Tensor | None = None) -> Tensor:
    """Which edges exist: (batch, L, k) bool, laid out like :func:`edge_weights`."""
    t = torch.arange(length, device=context_lens.device)[:, None]
    j = torch.arange(1, k + 1, device=context_lens.device)[None, :]
    lo = torch.zeros_like(context_lens) if start is None else start
    in_prompt = (t[None] < context_lens[:, None, None]) & (t[None] - j[None] >= lo[:, None, None])
    return (t >= j)[None] & ((j == 1)[None] | in_prompt)


def build_tree(
    u: Tensor,
    delta: Tensor,
    B: Tensor,
    context_lens: Tensor,
    k: int = 3,
    distance: str = "cosine",
    start: Tensor | None = None,
    *,
    check_values: bool = True,
) -> Tree:
    """Minimum spanning tree of the token graph of each row, rooted at position ``L - 1``.

    u, delta: (batch, D, L); B: (batch, N, L); context_lens: (batch,) ints in [0, L], positions below it
    form the prompt; start: optional (batch,) number of left-padding positions, kept out of the
    k-neighbour edges. Not differentiable.
    check_values: False skips the checks that read the values (NaN or inf inputs, lengths outside [0, L]),
    each a pass over the inputs and a host sync on CUDA, for callers that ensure them (the GrootL mixer:
    the model checks context_lens once per forward, and non-finite activations show in the loss).
    """
    context_lens, start = check_tree_inputs(u, delta, B, context_lens, k, distance, start, check_values)
    # >>> native dispatch hook: route to grootl.tree.native when a compiled kernel serves u.device
    from grootl.tree import native

    if u.shape[0] and native.available(u.device):  # an empty batch needs no kernel
        return native._build_tree(u, delta, B, context_lens, k, distance, start)
    # <<< native dispatch hook
    with torch.no_grad():
        return spanning_tree(edge_weights(u, delta, B, k, distance), context_lens, start)


def build_grouped_tree(a: Tensor, b: Tensor, context_lens: Tensor, k: int = 3, distance: str = "cosine",
                       start: Tensor | None = None, *, check_values: bool = True) -> Tree:
    """:func:`build_tree` for features made of G rank-one blocks, ``X[:, t] = (a[:, g, :, t] (outer) b[:, g, :, t]
    for g < G)`` (Mamba-2: one block per group of heads): a (batch, G, C, L), b (batch, G, N, L), floating (computed
    in their work dtype). The weights are :func:`grouped_edge_weights`; with G = 1 the tree is :func:`build_tree`'s
    of ``u = a[:, 0]``, ``delta = 1``, ``B = b[:, 0]``. Native kernels where they serve the device, as build_tree."""
    context_lens, start = check_grouped_tree_inputs(a, b, context_lens, k, distance, start, check_values)
    # >>> native dispatch hook: route to grootl.tree.native when a compiled kernel serves a.device
    from grootl.tree import native

    if a.shape[0] and native.available(a.device):
        return native._build_grouped_tree(a, b, context_lens, k, distance, start)
    # <<< native dispatch hook
    with torch.no_grad():
        f = work_dtype(a)
        return spanning_tree(grouped_edge_weights(a.to(f), b.to(f), k, distance), context_lens, start)


def spanning_tree(weights: Tensor, context_lens: Tensor, start: Tensor | None = None) -> Tree:
    """The minimum spanning tree of each row's token graph under ``weights`` (batch, L, k) on the comparison grid
    (as :func:`edge_weights` gives them), rooted at ``L - 1``; context_lens and start as in :func:`build_tree`,
    already checked."""
    _, length, k = weights.shape
    return root_tree(minimum_spanning_forest(weights, edge_mask(context_lens, length, k, start)))


def minimum_spanning_forest(weights: Tensor, mask: Tensor) -> Tensor:
    """Borůvka's algorithm on each row's banded graph. weights, mask: (batch, L, k) as laid out by
    :func:`edge_weights`; returns the (batch, L, k) mask of edges in the minimum spanning forest."""
    batch, length, k = weights.shape
    n_edges = length * k
    w = torch.where(mask, weights, torch.inf).reshape(batch, n_edges)
    # rank = position in a stable sort by weight: unique per row, ties towards the smaller edge id
    by_rank = torch.argsort(w, dim=1, stable=True)  # ties towards the smaller edge id
    rank = torch.empty_like(by_rank).scatter_(1, by_rank, torch.arange(n_edges, device=w.device).expand(batch, -1))
    t = torch.arange(length, device=w.device)[:, None]
    j = torch.arange(1, k + 1, device=w.device)[None, :]
    hi = t.expand(length, k).reshape(-1).expand(batch, -1)
    lo = (t - j).clamp_min(0).reshape(-1).expand(batch, -1)
    valid = mask.reshape(batch, n_edges)
    in_tree = torch.zeros_like(valid)
    nodes = torch.arange(length, device=w.device).expand(batch, -1)
    comp = nodes.clone()
    none = n_edges  # a rank no edge has
    for _ in range(length.bit_length() + 1):
        c_lo, c_hi = comp.gather(1, lo), comp.gather(1, hi)
        live = valid & (c_lo != c_hi)
        if not bool(live.any()):
            break
        key = torch.where(live, rank, none)
        best = torch.full((batch, length), none, device=w.device)
        best.scatter_reduce_(1, c_lo, key, "amin").scatter_reduce_(1, c_hi, key, "amin")
        in_tree |= live & ((key == best.gather(1, c_lo)) | (key == best.gather(1, c_hi)))
        # every component points at the one across its cheapest edge; mutual pairs keep the smaller label
        edge = by_rank.gather(1, best.clamp_max(n_edges - 1))
        e_lo, e_hi = c_lo.gather(1, edge), c_hi.gather(1, edge)
        ptr = torch.where(best < none, torch.where(e_lo == nodes, e_hi, e_lo), nodes)
        ptr = torch.where((ptr.gather(1, ptr) == nodes) & (nodes < ptr), nodes, ptr)
        for _ in range(length.bit_length()):
            ptr = ptr.gather(1, ptr)
        comp = ptr.gather(1, comp)
    return in_tree.reshape(batch, length, k)


def root_tree(in_tree: Tensor) -> Tree:
    """Orient a spanning tree (a (batch, L, k) edge mask) towards the root ``L - 1``.

    Euler tour over the directed edges: node ``v`` has ``2k`` neighbour slots at offsets
    ``-k..-1, 1..k``; after arriving at ``w`` from slot ``r`` the tour leaves by the next tree slot
    after ``r`` (cyclically; the root starts at slot 0). List ranking by pointer jumping gives each
    directed edge its distance to the tour's end; the edge first walked is the one towards the child.
    The order is then the heavy-last preorder of the parents (:func:`heavy_last_preorder`).
    """
    batch, length, k = in_tree.shape
    dev = in_tree.device
    if length == 1:
        return Tree(torch.full((batch, 1), -1, device=dev))
    slots = 2 * k
    offset = torch.cat([torch.arange(-k, 0, device=dev), torch.arange(1, k + 1, device=dev)])
    right = torch.zeros_like(in_tree)
    for j in range(1, min(k, length - 1) + 1):
        right[:, :-j, j - 1] = in_tree[:, j:, j - 1]
    adj = torch.cat([in_tree.flip(-1), right], -1)  # (batch, L, 2k): is slot s of v a tree edge
    # next_slot[b, w, r]: first tree slot of w strictly after r, cyclically
    r = torch.arange(slots, device=dev)
    next_slot = r.expand(batch, length, slots).clone()
    for i in range(slots, 0, -1):
        cand = ((r + i) % slots).expand(batch, length, slots)
        next_slot = torch.where(adj.gather(2, cand), cand, next_slot)
    v = torch.arange(length, device=dev)[:, None]
    w = (v + offset).clamp(0, length - 1)  # (L, 2k) neighbour across each slot
    rev = slots - 1 - r
    n_dir = length * slots
    succ = w[None] * slots + next_slot[:, w, rev]  # (batch, L, 2k)
    ids = torch.arange(n_dir, device=dev).expand(batch, -1)
    valid = adj.reshape(batch, n_dir)
    succ = torch.where(valid, succ.reshape(batch, n_dir), ids)
    first = (length - 1) * slots + next_slot[:, length - 1, slots - 1]  # the tour's first edge, from the root
    last = valid & (succ == first[:, None])
    succ = torch.where(last, ids, succ)
    dist = (valid & ~last).long()
    for _ in range(n_dir.bit_length()):
        dist = dist + dist.gather(1, succ)
        succ = succ.gather(1, succ)
    dist = dist.reshape(batch, length, slots)
    back = dist[:, w, rev]  # distance of the reverse edge (w -> v)
    towards_parent = adj & (back > dist)  # v -> w was walked after w -> v: w is v's parent
    is_root = ~towards_parent.any(-1)
    return Tree(torch.where(is_root, -1, (towards_parent * (v + offset)).sum(-1)))  # order: heavy-last
