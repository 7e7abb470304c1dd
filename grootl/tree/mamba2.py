"""The GrootL tree scan for Mamba-2 mixers: a scalar decay per head, B and C shared by groups of heads.

Layout (that of mamba_ssm's ``mamba_chunk_scan_combined``): x (batch, L, H, P) with P the head dim;
dt (batch, L, H) after softplus (and any clamp); A (H,) negative; B, C (batch, L, G, N); H a multiple
of G, head h reads group ``g(h) = h // (H // G)``. Per row, head h, head-dim p and state n:

1. ``Ā[t,h] = exp(dt[t,h]·A[h])``, ``X[t,h,p,n] = dt[t,h]·x[t,h,p]·B[t,g(h),n]``.
2. The graph of ``grootl.tree.graph`` (chain, plus ``(t-j, t)`` for ``2 <= j <= k`` inside the prompt);
   edge weight = distance of the two positions' X flattened over (h, p, n). Per group X is rank 1
   (``a_g ⊗ B_g`` with ``a_g = dt·x`` over the group's heads), so ``X·X' = Σ_g (a_g·a'_g)(B_g·B'_g)``
   and the norms likewise: X is never built (except for the manhattan distance, chunked).
3. The same minimum spanning tree rooted at ``L - 1``; ``H[v] = X[v] + Σ_children Ā[c+1]·H[c]``;
   ``y_tree[t,h,p] = Σ_n C[t,g(h),n]·H[t,h,p,n]``. A mixer adds ``λ·y_tree`` to its chain output
   before its D skip, gate and norm; after the prompt one state decodes:
   ``S[t] = Ā[t]·S[t-1] + (1+λ)·X[t]``.

The fast path is the Mamba-1 scan of ``grootl.tree.scan`` (native kernels included): groups fold into
the batch, each head's channels are its P head dims, and the scalar decay becomes Mamba-1's
``exp(delta·A)`` with ``delta = -dt·A``, ``A = -1`` and ``u = x / -A`` (so ``delta·u = dt·x``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from grootl.tree import graph, scan
from grootl.tree.graph import Tree, work_dtype
from grootl.tree.validation import NonFiniteInputError, check_tree_inputs

_EPS = 1e-12  # as grootl.tree.graph: a zero-norm position has cosine distance 1 to everything
_MANHATTAN_CHUNK = 16  # positions per block when X has to be built


def _shape(x) -> str:
    return "x".join(map(str, x.shape)) if isinstance(x, Tensor) else type(x).__name__


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def check_features(x: Tensor, dt: Tensor, B: Tensor) -> tuple[int, int, int, int, int, int]:
    """x (batch, L, H, P), dt (batch, L, H), B (batch, L, G, N); returns (batch, L, H, P, G, N)."""
    for name, t, dims in (("x", x, 4), ("dt", dt, 3), ("B", B, 4)):
        _require(isinstance(t, Tensor) and t.dim() == dims, f"{name} must be a {dims}-D tensor, got shape {_shape(t)}")
        _require(t.is_floating_point(), f"{name} must be a floating tensor, got {t.dtype}")
    batch, length, heads, head_dim = x.shape
    _require(length >= 1, f"sequences must have at least one position; got x {_shape(x)}")
    _require(dt.shape == (batch, length, heads), f"dt must be (batch, L, H) = ({batch}, {length}, {heads}); got {_shape(dt)}")
    _require(B.shape[:2] == (batch, length), f"B must be (batch, L, G, N) = ({batch}, {length}, G, N); got {_shape(B)}")
    groups = B.shape[2]
    _require(groups >= 1 and heads % groups == 0, f"the {heads} heads of x must split evenly into B's {groups} groups")
    return batch, length, heads, head_dim, groups, B.shape[3]


def _check_finite(**tensors: Tensor) -> None:
    for name, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise NonFiniteInputError(f"{name} contains NaN or inf (shape {_shape(t)})")


def check_scan_inputs(x, dt, A, B, C, tree, check_values: bool = True) -> None:
    """Shapes and types always; with ``check_values`` also finite inputs."""
    batch, length, heads, _, _, _ = check_features(x, dt, B)
    _require(isinstance(A, Tensor) and A.shape == (heads,), f"A must be (H,) = ({heads},), one per head; got {_shape(A)}")
    _require(isinstance(C, Tensor) and C.shape == B.shape, f"C must have B's shape {_shape(B)}; got {_shape(C)}")
    _require(isinstance(tree, Tree), f"tree must be a grootl.tree.Tree; got {type(tree).__name__}")
    _require(
        tree.parent.shape == (batch, length) and tree.order.shape == (batch, length),
        f"tree must be for (batch, L) = ({batch}, {length}); got parent {_shape(tree.parent)}, order {_shape(tree.order)}",
    )
    if check_values:
        _check_finite(x=x, dt=dt, A=A, B=B, C=C)


def _group_features(x: Tensor, dt: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """a = dt·x per group (batch, L, G, heads per group·P) and B (batch, L, G, N), in the work dtype."""
    f = work_dtype(x)
    batch, length, heads, head_dim = x.shape
    groups = B.shape[2]
    a = (dt.to(f)[..., None] * x.to(f)).reshape(batch, length, groups, heads // groups * head_dim)
    return a, B.to(f)


def edge_weights(x: Tensor, dt: Tensor, B: Tensor, k: int = 3, distance: str = "cosine") -> Tensor:
    """Distance between the X features of positions ``t-j`` and ``t``: (batch, L, k), laid out as
    :func:`grootl.tree.edge_weights` (entry ``[b, t, j-1]`` is edge ``(t-j, t)``, undefined for t < j)."""
    a, b = _group_features(x, dt, B)
    length = a.shape[1]
    out = torch.zeros(a.shape[0], length, k, dtype=a.dtype, device=a.device)
    if distance == "manhattan":
        for j in range(1, min(k, length - 1) + 1):
            out[:, j:, j - 1] = _manhattan(a, b, j)
        return out
    sq = ((a * a).sum(-1) * (b * b).sum(-1)).sum(-1)  # |X[t]|², (batch, L)
    for j in range(1, min(k, length - 1) + 1):
        dot = ((a[:, j:] * a[:, :-j]).sum(-1) * (b[:, j:] * b[:, :-j]).sum(-1)).sum(-1)
        if distance == "cosine":
            out[:, j:, j - 1] = 1 - dot / (sq[:, j:] * sq[:, :-j]).sqrt().clamp_min(_EPS)
        else:  # squared euclidean: orders edges as euclidean does
            out[:, j:, j - 1] = (sq[:, j:] + sq[:, :-j] - 2 * dot).clamp_min(0)
    return out


def _manhattan(a: Tensor, b: Tensor, j: int) -> Tensor:
    """Σ |X[t] - X[t-j]| over (h, p, n): not separable, so X is built a few positions at a time."""
    parts = []
    for s in range(j, a.shape[1], _MANHATTAN_CHUNK):
        e = min(s + _MANHATTAN_CHUNK, a.shape[1])
        x_t = a[:, s:e, :, :, None] * b[:, s:e, :, None, :]
        x_s = a[:, s - j : e - j, :, :, None] * b[:, s - j : e - j, :, None, :]
        parts.append((x_t - x_s).abs().sum((2, 3, 4)))
    return torch.cat(parts, 1)


def build_tree(
    x: Tensor,
    dt: Tensor,
    B: Tensor,
    context_lens: Tensor,
    k: int = 3,
    distance: str = "cosine",
    start: Tensor | None = None,
    *,
    check_values: bool = True,
) -> Tree:
    """Minimum spanning tree of each row's token graph, rooted at ``L - 1`` (see the module docstring).

    context_lens: (batch,) prompt length per row in [0, L]; start: optional (batch,) left-padding count,
    kept out of the k-neighbour edges. Not differentiable. ``check_values=False`` skips the checks that
    read values (finite inputs, lengths in range), as in :func:`grootl.tree.build_tree`.
    With one group X is rank 1 over (h, p, n) and :func:`grootl.tree.build_tree` (native kernels
    included) builds the tree from ``dt·x`` and B directly.
    """
    batch, length, heads, head_dim, groups, n = check_features(x, dt, B)
    if check_values:
        _check_finite(x=x, dt=dt, B=B)
    with torch.no_grad():
        a, b = _group_features(x, dt, B)
        if groups == 1:
            u = a[:, :, 0].transpose(1, 2)  # (batch, H·P, L)
            return graph.build_tree(u, torch.ones_like(u), b[:, :, 0].transpose(1, 2), context_lens, k, distance,
                                    start, check_values=check_values)
        # lengths and settings checked as the Mamba-1 build checks them
        u = a.reshape(batch, length, -1).transpose(1, 2)
        context_lens, start = check_tree_inputs(u, u, b.reshape(batch, length, -1).transpose(1, 2), context_lens, k,
                                                distance, start, check_values=check_values)
        weights = edge_weights(x, dt, B, k, distance)
        in_tree = graph.minimum_spanning_forest(weights, graph.edge_mask(context_lens, length, k, start))
        return graph.root_tree(in_tree)


def tree_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, tree: Tree, return_root_state: bool = False,
              *, check_values: bool = True):
    """Single-root tree scan contracted with C: y_tree (batch, L, H, P) in x's dtype, without the D skip.

    With ``return_root_state`` also the root's state (batch, H, P, N), float32 (float64 for float64
    inputs). Differentiable in x, dt, A, B, C. Runs as the Mamba-1 :func:`grootl.tree.tree_scan`
    (see the module docstring), so it takes the native kernels where they serve N.
    """
    check_scan_inputs(x, dt, A, B, C, tree, check_values)
    batch, length, heads, head_dim = x.shape
    groups, n = B.shape[2], B.shape[3]
    f = work_dtype(x)
    rate = -A.to(f)  # > 0
    delta = dt.to(f) * rate  # (batch, L, H): exp(delta * -1) = Ā
    u = x.to(f) / rate[:, None]

    def fold(t: Tensor) -> Tensor:  # (batch, L, G, c) -> (batch·G, c, L)
        return t.permute(0, 2, 3, 1).reshape(batch * groups, t.shape[3], length)

    channels = heads // groups * head_dim
    u1 = fold(u.reshape(batch, length, groups, channels))
    delta1 = fold(delta[..., None].expand(-1, -1, -1, head_dim).reshape(batch, length, groups, channels))
    A1 = torch.full((channels, n), -1.0, dtype=f, device=x.device)
    if groups > 1:
        tree = Tree(tree.parent.repeat_interleave(groups, 0), tree.order.repeat_interleave(groups, 0))
    y, root = scan.tree_scan(u1, delta1, A1, fold(B.to(f)), fold(C.to(f)), tree, return_root_state=True,
                             check_values=False)
    y = y.reshape(batch, groups, heads // groups, head_dim, length).permute(0, 4, 1, 2, 3)
    y = y.reshape(batch, length, heads, head_dim).to(x.dtype)
    if not return_root_state:
        return y
    return y, root.reshape(batch, heads, head_dim, n)


def chain_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, return_last_state: bool = False,
               *, check_values: bool = True):
    """The plain Mamba-2 scan without the D skip (the tree scan on :meth:`Tree.chain`)."""
    tree = Tree.chain(x.shape[0], x.shape[1], x.device)
    return tree_scan(x, dt, A, B, C, tree, return_root_state=return_last_state, check_values=check_values)


def tree_scan_ref(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, tree: Tree, return_root_state: bool = False):
    """:func:`tree_scan` written as plainly as possible in the Mamba-2 layout: the test oracle (slow)."""
    check_scan_inputs(x, dt, A, B, C, tree)
    f, out_dtype = work_dtype(x), x.dtype
    x, dt, A, B, C = (t.to(f) for t in (x, dt, A, B, C))
    batch, length, heads, head_dim = x.shape
    group = torch.arange(heads, device=x.device) // (heads // B.shape[2])  # g(h)
    ys, roots = [], []
    for b in range(batch):
        parent = tree.parent[b].tolist()
        Bh, Ch = B[b][:, group], C[b][:, group]  # (L, H, N): each head's group
        pending = [torch.zeros(heads, head_dim, B.shape[3], dtype=f, device=x.device) for _ in range(length)]
        H = [None] * length
        for v in reversed(tree.order[b].tolist()):
            H[v] = pending[v] + (dt[b, v, :, None] * x[b, v])[:, :, None] * Bh[v][:, None, :]
            if parent[v] >= 0:
                pending[parent[v]] = pending[parent[v]] + torch.exp(dt[b, v + 1] * A)[:, None, None] * H[v]
        ys.append(torch.stack([torch.einsum("hpn,hn->hp", H[v], Ch[v]) for v in range(length)]))
        roots.append(H[length - 1])
    y = torch.stack(ys).to(out_dtype)
    return (y, torch.stack(roots)) if return_root_state else y
