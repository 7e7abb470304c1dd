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

from grootl.tree.validation import check_tree_inputs

DISTANCES = ("cosine", "euclidean", "manhattan")
CHAIN = "chain"  # Tree._plan of Tree.chain
_EPS = 1e-12


def work_dtype(x: Tensor) -> torch.dtype:
    """float64 stays float64; everything else (fp32, bf16, fp16) is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class Tree:
    """A rooted spanning tree per row. ``parent[b, L-1] == -1``; ``order`` lists the nodes root first,
    every node after its parent (a DFS preorder), so ``order.flip(-1)`` visits leaves before roots."""

    parent: Tensor  # (batch, L) int64
    order: Tensor  # (batch, L) int64
    # what the native kernels know of the tree, not API: their plan of it when their build made it, or CHAIN
    # for Tree.chain (planned in closed form); either way it needs no checking
    _plan: object = field(default=None, compare=False, repr=False)

    @classmethod
    def chain(cls, batch: int, length: int, device: torch.device | str | None = None) -> "Tree":
        """The plain Mamba chain: ``parent[t] = t + 1``."""
        pos = torch.arange(length, device=device)
        parent = torch.where(pos + 1 < length, pos + 1, -1)
        return cls(parent.expand(batch, length).contiguous(), pos.flip(0).expand(batch, length).contiguous(), CHAIN)


def edge_weights(u: Tensor, delta: Tensor, B: Tensor, k: int = 3, distance: str = "cosine") -> Tensor:
    """Distance between the features ``X[:, :, t] = delta*u (outer) B`` of positions ``t-j`` and ``t``.

    Returns (batch, L, k): entry ``[b, t, j-1]`` is the weight of edge ``(t-j, t)`` (undefined for t < j).
    X is rank-1 over (D, N), so cosine and euclidean factor into sums over D and over N.
    """
    a = delta.to(work_dtype(u)) * u.to(work_dtype(u))  # (b, D, L)
    b = B.to(a.dtype)  # (b, N, L)
    length = a.shape[-1]
    out = torch.zeros(a.shape[0], length, k, dtype=a.dtype, device=a.device)
    if distance == "manhattan":
        for j in range(1, min(k, length - 1) + 1):
            out[:, j:, j - 1] = _manhattan(a, b, j)
        return out
    aa, bb = (a * a).sum(1), (b * b).sum(1)  # squared norms per position, (b, L)
    for j in range(1, min(k, length - 1) + 1):
        dot = (a[..., j:] * a[..., :-j]).sum(1) * (b[..., j:] * b[..., :-j]).sum(1)
        if distance == "cosine":
            norm = (aa[:, j:] * aa[:, :-j] * bb[:, j:] * bb[:, :-j]).sqrt()
            out[:, j:, j - 1] = 1 - dot / norm.clamp_min(_EPS)
        else:  # squared euclidean: same order as euclidean
            out[:, j:, j - 1] = (aa[:, j:] * bb[:, j:] + aa[:, :-j] * bb[:, :-j] - 2 * dot).clamp_min(0)
    return out


def _manhattan(a: Tensor, b: Tensor, j: int, chunk: int = 64) -> Tensor:
    """Sum over (d, n) of |X[t] - X[t-j]|; not separable, so computed in chunks of positions."""
    parts = []
    for s in range(j, a.shape[-1], chunk):
        e = min(s + chunk, a.shape[-1])
        x_t = a[:, :, None, s:e] * b[:, None, :, s:e]
        x_s = a[:, :, None, s - j : e - j] * b[:, None, :, s - j : e - j]
        parts.append((x_t - x_s).abs().sum((1, 2)))
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
        weights = edge_weights(u, delta, B, k, distance)
        mask = edge_mask(context_lens, u.shape[-1], k, start)
        in_tree = minimum_spanning_forest(weights, mask)
        return root_tree(in_tree)


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
    """
    batch, length, k = in_tree.shape
    dev = in_tree.device
    if length == 1:
        return Tree(torch.full((batch, 1), -1, device=dev), torch.zeros((batch, 1), dtype=torch.long, device=dev))
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
    parent = torch.where(is_root, -1, (towards_parent * (v + offset)).sum(-1))
    entered = torch.where(is_root, n_dir, (towards_parent * back).sum(-1))  # tour distance left on entry
    order = torch.argsort(entered, dim=1, descending=True, stable=True)
    return Tree(parent, order)
