"""The single-root tree scan (leaves to root) in plain PyTorch, and its plainest-possible twin.

For one row, channel d and state n (``a = Ā``, ``X = delta*u*B``)::

    H[v] = X[v] + sum over children c of v of  exp(delta[c+1] * A) * H[c]
    y[v] = sum_n C[n, v] * H[v]

The transition on the edge from child ``c`` is the one at position ``c + 1``; on the chain this is the
usual selective scan, so :func:`chain_scan` is the same function on :meth:`Tree.chain`.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from grootl.tree.graph import Tree, scan_order, work_dtype
from grootl.tree.validation import check_scan_inputs

_CHUNK = 128  # positions per vectorised block in the backward pass


class _Plan:
    """Index tensors that put a tree in processing order (leaves first) so each step reads slices."""

    def __init__(self, tree: Tree):
        batch, length = tree.parent.shape
        self.steps = scan_order(tree).flip(1)  # step i handles node steps[:, i]; parents come after children
        self.step_of = torch.empty_like(self.steps).scatter_(
            1, self.steps, torch.arange(length, device=self.steps.device).expand(batch, -1)
        )
        parent = tree.parent.gather(1, self.steps)
        # the parent's step, or the spare slot `length` for the root
        self.parent_step = torch.where(parent < 0, length, self.step_of.gather(1, parent.clamp_min(0)))
        self.next_pos = (self.steps + 1).clamp_max(length - 1)  # whose transition the edge uses
        offsets = torch.arange(batch, device=self.steps.device)[:, None] * (length + 1)
        self.flat_parent = (self.parent_step + offsets).T.contiguous()  # (L, batch) rows of a flat buffer

    def take(self, x: Tensor, where: Tensor | None = None) -> Tensor:
        """(batch, C, L) -> (batch, L, C) in processing order (at ``where`` if given)."""
        idx = self.steps if where is None else where
        return x.transpose(1, 2).gather(1, idx[..., None].expand(-1, -1, x.shape[1]))

    def put(self, x_steps: Tensor) -> Tensor:
        """(batch, L, C) in processing order -> (batch, C, L) in position order."""
        return x_steps.gather(1, self.step_of[..., None].expand(-1, -1, x_steps.shape[2])).transpose(1, 2)


def _accumulate(plan: _Plan, du: Tensor, delta_next: Tensor, A: Tensor, B: Tensor) -> Tensor:
    """All states H, in processing order, as a (batch, L + 1, D, N) buffer (slot L is spare)."""
    batch, length, d = du.shape
    acc = du.new_zeros(batch, length + 1, d, A.shape[1])
    flat = acc.view(-1, d, A.shape[1])
    for i in range(length):
        h = acc[:, i]
        h.addcmul_(du[:, i, :, None], B[:, i, None, :])
        flat.index_add_(0, plan.flat_parent[i], torch.exp(delta_next[:, i, :, None] * A) * h)
    return acc


class _TreeScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, plan: _Plan):
        f = work_dtype(u)
        us, ds, dn = plan.take(u.to(f)), plan.take(delta.to(f)), plan.take(delta.to(f), plan.next_pos)
        Bs, Cs = plan.take(B.to(f)), plan.take(C.to(f))
        acc = _accumulate(plan, us * ds, dn, A.to(f), Bs)
        y = plan.put(torch.einsum("bldn,bln->bld", acc[:, :-1], Cs))
        ctx.save_for_backward(u, delta, A, B, C)
        ctx.plan = plan
        return y.to(u.dtype), acc[:, -2].clone()

    @staticmethod
    @once_differentiable  # a second derivative raises instead of silently missing terms
    def backward(ctx, gy, g_root):
        u, delta, A, B, C = ctx.saved_tensors
        plan: _Plan = ctx.plan
        f = work_dtype(u)
        Af = A.to(f)
        us, ds, dn = plan.take(u.to(f)), plan.take(delta.to(f)), plan.take(delta.to(f), plan.next_pos)
        Bs, Cs = plan.take(B.to(f)), plan.take(C.to(f))
        du_s = us * ds
        H = _accumulate(plan, du_s, dn, Af, Bs)
        gys = plan.take(gy.to(f))
        batch, length, d = us.shape
        G = torch.zeros_like(H)
        G_flat = G.view(-1, d, A.shape[1])
        for i in range(length - 1, -1, -1):  # root first: G[v] = gy[v] C[v] + a_edge(v) * G[parent(v)]
            g = G[:, i]
            torch.mul(torch.exp(dn[:, i, :, None] * Af), G_flat.index_select(0, plan.flat_parent[i]), out=g)
            g.addcmul_(gys[:, i, :, None], Cs[:, i, None, :])
            if i == length - 1 and g_root is not None:
                g.add_(g_root.to(f))
        # d loss / d log(a) on each edge v -> parent is G[parent] * a * H[v]; chunked to bound memory
        d_dn = torch.empty_like(dn)  # gradient w.r.t. delta at each edge's transition position
        dA = torch.zeros_like(Af)
        for s in range(0, length, _CHUNK):
            e = min(s + _CHUNK, length)
            t = G_flat[plan.flat_parent[s:e].T] * H[:, s:e] * torch.exp(dn[:, s:e, :, None] * Af)
            d_dn[:, s:e] = (t * Af).sum(-1)
            dA += torch.einsum("bldn,bld->dn", t, dn[:, s:e])
        Gs, Hs = G[:, :-1], H[:, :-1]
        gX_B = torch.einsum("bldn,bln->bld", Gs, Bs)  # d loss / d (delta*u)
        dC = torch.einsum("bldn,bld->bln", Hs, gys)
        dB = torch.einsum("bldn,bld->bln", Gs, du_s)
        d_delta = plan.put(gX_B * us).scatter_add_(2, plan.next_pos[:, None, :].expand(-1, d, -1), d_dn.transpose(1, 2))
        return (
            plan.put(gX_B * ds).to(u.dtype),
            d_delta.to(delta.dtype),
            dA.to(A.dtype),
            plan.put(dB).to(B.dtype),
            plan.put(dC).to(C.dtype),
            None,
        )


def tree_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, tree: Tree, return_root_state: bool = False,
              *, check_values: bool = True):
    """Single-root tree scan contracted with C: (batch, D, L) in u's dtype.

    u, delta (batch, D, L) with delta after softplus; A (D, N); B, C (batch, N, L); tree from
    :func:`build_tree`. With ``return_root_state`` also returns the root's state H (batch, D, N),
    float32 (float64 for float64 inputs). Differentiable in u, delta, A, B, C.
    check_values: False skips the checks that read the values (NaN or inf inputs, lengths outside [0, L]),
    each a pass over the inputs and a host sync on CUDA, for callers that ensure them (the GrootL mixer:
    the model checks context_lens once per forward, and non-finite activations show in the loss).
    """
    check_scan_inputs(u, delta, A, B, C, tree, check_values)
    # >>> native dispatch hook: route to grootl.tree.native when a compiled kernel serves u.device
    from grootl.tree import native

    if u.shape[0] and native.serves_scan(u.device, A.shape[1]):  # an empty batch needs no kernel
        return native._tree_scan(u, delta, A, B, C, tree, return_root_state)
    # <<< native dispatch hook
    y, root = _TreeScan.apply(u, delta, A, B, C, _Plan(tree))
    return (y, root) if return_root_state else y


def chain_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, return_last_state: bool = False,
               *, check_values: bool = True):
    """Plain Mamba selective scan without the D skip (the tree scan on the chain; :func:`chain_tree_scan` with
    modulation 0)."""
    tree = Tree.chain(u.shape[0], u.shape[-1], u.device)
    # >>> native dispatch hook: the one-pass kernel with the tree skipped, where a compiled kernel serves u.device
    from grootl.tree import native

    if u.shape[0] and native.serves_chain_tree(u.device):
        check_scan_inputs(u, delta, A, B, C, tree, check_values)
        return native._chain_tree_scan(u, delta, A, B, C, tree, 0.0, return_last_state)
    # <<< native dispatch hook
    return tree_scan(u, delta, A, B, C, tree, return_root_state=return_last_state, check_values=check_values)


def chain_tree_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, tree: Tree, modulation: float,
                    return_last_state: bool = False, *, check_values: bool = True):
    """``chain_scan + modulation * tree_scan`` (the GrootL mixer's merge, D skip not included), in one native call
    where a kernel serves it (the CPU's: the two scans share one discretisation per channel), else as the two
    scans. With ``return_last_state`` also returns ``h[L-1] + modulation * H[L-1]`` (batch, D, N): the state
    incremental decoding continues from. Arguments and dtypes as :func:`tree_scan`."""
    check_scan_inputs(u, delta, A, B, C, tree, check_values)
    # >>> native dispatch hook: route to grootl.tree.native when a compiled one-call kernel serves u.device
    from grootl.tree import native

    if u.shape[0] and native.serves_chain_tree(u.device):
        return native._chain_tree_scan(u, delta, A, B, C, tree, modulation, return_last_state)
    # <<< native dispatch hook
    y, h_last = chain_scan(u, delta, A, B, C, return_last_state=True, check_values=False)
    y_tree, h_root = tree_scan(u, delta, A, B, C, tree, return_root_state=True, check_values=False)
    y = y + modulation * y_tree
    return (y, h_last + modulation * h_root) if return_last_state else y


def tree_scan_ref(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, tree: Tree, return_root_state: bool = False):
    """:func:`tree_scan` written as plainly as possible: the test oracle (slow)."""
    check_scan_inputs(u, delta, A, B, C, tree)
    f, out_dtype = work_dtype(u), u.dtype
    u, delta, A, B, C = (x.to(f) for x in (u, delta, A, B, C))
    batch, dim, length = u.shape
    ys, roots = [], []
    for b in range(batch):
        parent = tree.parent[b].tolist()
        pending = [torch.zeros(dim, A.shape[1], dtype=f, device=u.device) for _ in range(length)]
        H = [None] * length
        for v in reversed(tree.order[b].tolist()):
            H[v] = pending[v] + (delta[b, :, v] * u[b, :, v])[:, None] * B[b, :, v][None, :]
            if parent[v] >= 0:
                pending[parent[v]] = pending[parent[v]] + torch.exp(delta[b, :, v + 1, None] * A) * H[v]
        ys.append(torch.stack([H[v] @ C[b, :, v] for v in range(length)], -1))
        roots.append(H[length - 1])
    y = torch.stack(ys).to(out_dtype)
    return (y, torch.stack(roots)) if return_root_state else y
