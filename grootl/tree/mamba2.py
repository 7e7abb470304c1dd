"""The GrootL tree scan for Mamba-2 mixers: a scalar decay per head, B and C shared by groups of heads.

Layout (that of mamba_ssm's ``mamba_chunk_scan_combined``): x (batch, L, H, P) with P the head dim;
dt (batch, L, H) after softplus (and any clamp); A (H,) negative; B, C (batch, L, G, N); H a multiple
of G, head h reads group ``g(h) = h // (H // G)``. Per row, head h, head-dim p and state n:

1. ``Ā[t,h] = exp(dt[t,h]·A[h])``, ``X[t,h,p,n] = dt[t,h]·x[t,h,p]·B[t,g(h),n]``.
2. The graph of ``grootl.tree.graph`` (chain, plus ``(t-j, t)`` for ``2 <= j <= k`` inside the prompt);
   edge weight = distance of the two positions' X flattened over (h, p, n). Per group X is rank 1
   (``a_g ⊗ B_g`` with ``a_g = dt·x`` over the group's heads), so ``X·X' = Σ_g (a_g·a'_g)(B_g·B'_g)``
   and the norms likewise: X is never built (the manhattan distance sums |X - X'| entry by entry, in
   chunks of positions on the PyTorch path). The sums, the cosine's relative norm clamp and the comparison
   grid are graph's (:func:`grootl.tree.graph.build_grouped_tree`; the native kernels form them in the same
   order), so ties in real arithmetic (repeated tokens, proportional or zero features) give one tree in
   every dtype, on every path.
3. The same minimum spanning tree rooted at ``L - 1``; ``H[v] = X[v] + Σ_children Ā[c+1]·H[c]``;
   ``y_tree[t,h,p] = Σ_n C[t,g(h),n]·H[t,h,p,n]``. A mixer adds ``λ·y_tree`` to its chain output
   before its D skip, gate and norm; after the prompt one state decodes:
   ``S[t] = Ā[t]·S[t-1] + (1+λ)·X[t]``.

The native kernels (``grootl::mamba2_tree_scan``: kernels/tree_scan.h's scan with a scalar decay) take this
layout as it is: one tree per row for all heads, ``Ā`` formed once per (row, t, head) and shared by the
head's P·N states, the sums over a group's heads and a head's dims done in the kernel. The PyTorch path
(``GROOTL_NATIVE=0``, a device or N no kernel serves, the portable copy) folds onto the Mamba-1 scan of
``grootl.tree.scan``: groups into the batch, each head's channels its P head dims, the scalar decay as
Mamba-1's ``exp(delta·A)`` with ``delta = -dt·A``, ``A = -1`` and ``u = x / -A`` (so ``delta·u = dt·x``), the
tree's rows repeated over the groups once per tree (:func:`grootl.tree.graph.repeat_rows`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from grootl.tree import graph, scan
from grootl.tree.graph import Tree, work_dtype
from grootl.tree.validation import (
    _check_device, _check_finite, _check_floating, _require, _shape, check_prompt, check_tree_settings, check_tree_shape,
)


def check_features(x: Tensor, dt: Tensor, B: Tensor) -> tuple[int, int, int, int, int, int]:
    """x (batch, L, H, P), dt (batch, L, H), B (batch, L, G, N), floating, on one device; returns
    (batch, L, H, P, G, N)."""
    for name, t, dims in (("x", x, 4), ("dt", dt, 3), ("B", B, 4)):
        _require(isinstance(t, Tensor) and t.dim() == dims, lambda: f"{name} must be a {dims}-D tensor, got shape {_shape(t)}")
        _check_floating(name, t)
        _check_device(name, t, x, "x")
    batch, length, heads, head_dim = x.shape
    _require(length >= 1, lambda: f"sequences must have at least one position; got x {_shape(x)}")
    _require(dt.shape == (batch, length, heads),
             lambda: f"dt must be (batch, L, H) = ({batch}, {length}, {heads}); got {_shape(dt)}")
    _require(B.shape[:2] == (batch, length),
             lambda: f"B must be (batch, L, G, N) = ({batch}, {length}, G, N); got {_shape(B)}")
    groups = B.shape[2]
    _require(groups >= 1 and heads % groups == 0,
             lambda: f"the {heads} heads of x must split evenly into B's {groups} groups")
    return batch, length, heads, head_dim, groups, B.shape[3]


def check_scan_inputs(x, dt, A, B, C, tree, check_values: bool = True) -> None:
    """Shapes and types always; with ``check_values`` also finite inputs (skipped while torch.compile traces)."""
    batch, length, heads, _, _, _ = check_features(x, dt, B)
    _require(isinstance(A, Tensor) and A.shape == (heads,),
             lambda: f"A must be (H,) = ({heads},), one per head; got {_shape(A)}")
    _require(isinstance(C, Tensor) and C.shape == B.shape, lambda: f"C must have B's shape {_shape(B)}; got {_shape(C)}")
    for name, t in (("A", A), ("C", C)):
        _check_floating(name, t)
        _check_device(name, t, x, "x")
    check_tree_shape(tree, batch, length, x, "x")
    if check_values and not torch.compiler.is_compiling():
        _check_finite(x=x, dt=dt, A=A, B=B, C=C)


def _group_features(x: Tensor, dt: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """Per group, a = dt·x over the group's heads (batch, G, heads per group·P, L) and B (batch, G, N, L), in the
    work dtype: the layout of :func:`grootl.tree.graph.grouped_edge_weights`."""
    f = work_dtype(x)
    batch, length, heads, head_dim = x.shape
    groups = B.shape[2]
    a = (dt.to(f)[..., None] * x.to(f)).reshape(batch, length, groups, heads // groups * head_dim)
    return a.permute(0, 2, 3, 1), B.to(f).permute(0, 2, 3, 1)


def edge_weights(x: Tensor, dt: Tensor, B: Tensor, k: int = 3, distance: str = "cosine") -> Tensor:
    """Distance between the X features of positions ``t-j`` and ``t`` on the comparison grid: (batch, L, k), laid
    out as :func:`grootl.tree.edge_weights` (entry ``[b, t, j-1]`` is edge ``(t-j, t)``, undefined for t < j),
    with its summation order, norm clamp and grid (:func:`grootl.tree.graph.grouped_edge_weights`)."""
    return graph.grouped_edge_weights(*_group_features(x, dt, B), k, distance)


def build_tree(
    x: Tensor, dt: Tensor, B: Tensor, context_lens: Tensor, k: int = 3, distance: str = "cosine",
    start: Tensor | None = None, *, check_values: bool = True,
) -> Tree:
    """Minimum spanning tree of each row's token graph, rooted at ``L - 1`` (see the module docstring).

    context_lens: (batch,) prompt length per row in [0, L]; start: optional (batch,) left-padding count,
    kept out of the k-neighbour edges. Not differentiable. ``check_values=False`` skips the checks that
    read values (finite inputs, lengths in range), as in :func:`grootl.tree.build_tree`.
    Built by :func:`grootl.tree.graph.build_grouped_tree` from ``dt·x`` and B per group (native kernels
    included, for any number of groups); with one group this is :func:`grootl.tree.build_tree`'s tree.
    """
    batch, length, _, _, _, _ = check_features(x, dt, B)
    check_tree_settings(k, distance)
    check_values = check_values and not torch.compiler.is_compiling()
    if check_values:
        _check_finite(x=x, dt=dt, B=B)
    context_lens, start = check_prompt(context_lens, start, batch, length, x.device, check_values)
    with torch.no_grad():
        a, b = _group_features(x, dt, B)
        return graph.build_grouped_tree(a, b, context_lens, k, distance, start, check_values=False)


def tree_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, tree: Tree, return_root_state: bool = False,
              *, check_values: bool = True):
    """Single-root tree scan contracted with C: y_tree (batch, L, H, P) in x's dtype, without the D skip.

    With ``return_root_state`` also the root's state (batch, H, P, N), float32 (float64 for float64
    inputs). Differentiable in x, dt, A, B, C. Runs on the native Mamba-2
    kernels where they serve the device and N, else on PyTorch (see the module docstring).
    """
    check_scan_inputs(x, dt, A, B, C, tree, check_values)
    # >>> native dispatch hook: route to grootl.tree.native when a compiled kernel serves x.device and N
    from grootl.tree import native

    if x.shape[0] and native.serves_scan(x.device, B.shape[3]):  # an empty batch needs no kernel
        return native._mamba2_tree_scan(x, dt, A, B, C, tree, return_root_state)
    # <<< native dispatch hook
    return _folded_tree_scan(x, dt, A, B, C, tree, return_root_state)


def _folded_tree_scan(x, dt, A, B, C, tree: Tree, return_root_state: bool):
    """:func:`tree_scan` on checked inputs as the Mamba-1 scan of :func:`grootl.tree.tree_scan` (see the module
    docstring): the PyTorch path."""
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
    y, root = scan.tree_scan(u1, delta1, A1, fold(B.to(f)), fold(C.to(f)), graph.repeat_rows(tree, groups),
                             return_root_state=True, check_values=False)
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
