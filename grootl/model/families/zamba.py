"""The GrootL branch of Zamba (v1)'s Mamba mixer: Mamba-1 split into ``n_mamba_heads`` heads.

transformers' ``ZambaMambaMixer`` splits in_proj's output (interleaved: even channels x, odd the gate)
into H heads of P = intermediate_size / H channels; each head has its own x_proj (-> time_step, B, C),
dt_proj, A_log (P, N) and D (P), runs its own Mamba-1 scan, and the heads are concatenated before
out_proj. GrootL semantics, per row, head h, channel p and state n:

1. ``Ā[t,h,p,n] = exp(Δ[t,h,p]·A[h,p,n])``, ``X[t,h,p,n] = Δ[t,h,p]·u[t,h,p]·B[t,h,n]`` over all heads.
2. The graph of ``grootl.tree.graph`` (chain, plus ``(t-j, t)`` for ``2 <= j <= k`` inside the prompt);
   edge weight = distance of X flattened over (h, p, n). Per head X is rank 1 (``Δ·u ⊗ B``), so this is
   :func:`grootl.tree.graph.grouped_edge_weights` with the heads as groups (as Mamba-2's groups in
   ``grootl.tree.mamba2``): X is never built. One tree per row, shared by all heads.
3. Per head, the Mamba-1 tree scan on that tree with the head's A, B, C (:func:`grootl.tree.tree_scan`):
   ``y = y_chain + λ·y_tree + D·u``, then ``y·SiLU(gate)`` and out_proj over the concatenated heads.
   After a prefill the cache holds ``S = h_last + λ·H_root`` (batch, H, P, N) and each later position
   updates ``S = Ā·S + (1+λ)·X``, ``y = C·S + D·u``.

The conv is :class:`grootl.model.GrootLMixer`'s (causal-conv1d where installed); the chain per head is
mamba-ssm's ``selective_scan_fn`` on CUDA where installed, else :func:`grootl.tree.chain_scan`; the decode
is mamba-ssm's multi-head ``selective_state_update`` (B scaled by 1+λ) where installed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.integrations.accelerate import force_accelerate_hooks
from transformers.models.zamba.modeling_zamba import apply_mask_to_padding_states

from grootl.model.config import GrootLConfig
from grootl.model import mixer
from grootl.tree import Tree, graph
from grootl.tree.graph import work_dtype


def edge_weights(u: Tensor, delta: Tensor, B: Tensor, k: int = 3, distance: str = "cosine") -> Tensor:
    """Distance between the X features of positions ``t-j`` and ``t`` (see the module docstring), on the
    comparison grid: u, delta (batch, H, P, L), B (batch, H, N, L); returns (batch, L, k) laid out as
    :func:`grootl.tree.edge_weights`."""
    f = work_dtype(u)
    return graph.grouped_edge_weights(delta.to(f) * u.to(f), B.to(f), k, distance)


def build_tree(u: Tensor, delta: Tensor, B: Tensor, context_lens: Tensor, k: int = 3, distance: str = "cosine",
               start: Tensor | None = None) -> Tree:
    """The minimum spanning tree of each row under :func:`edge_weights`, rooted at ``L - 1``; context_lens and
    start (batch,) as in :func:`grootl.tree.build_tree`, already checked (the model checks them once per
    forward). Not differentiable; native kernels where they serve the device (:func:`graph.build_grouped_tree`)."""
    with torch.no_grad():
        return graph.build_grouped_tree(delta * u, B, context_lens, k, distance, start, check_values=False)


class GrootLZambaMixerBase:
    """Put before ``ZambaMambaMixer``: its forward merges the tree scan (see the module docstring).
    ``grootl`` holds the :class:`GrootLConfig`; ``tree_inputs`` the (context_lens, start) of the current
    forward, set by the model (None: no prompt, so the tree is the chain)."""

    grootl: GrootLConfig = GrootLConfig()
    tree_inputs: tuple[Tensor | None, Tensor | None] = (None, None)

    _conv = mixer.GrootLMixer._conv  # causal depthwise conv1d + activation over the new positions, cache-aware

    @force_accelerate_hooks(["conv1d"])  # conv1d's weight is read directly on the fused path (offloading)
    def forward(self, hidden_states: Tensor, cache=None, attention_mask: Tensor | None = None, **kwargs) -> Tensor:
        dtype = hidden_states.dtype
        heads, head_dim = self.n_mamba_heads, self.mamba_head_dim
        state = cache.get_recurrent_state(self.layer_idx) if cache is not None else None

        hidden_states = apply_mask_to_padding_states(hidden_states, attention_mask)
        x, gate = self.in_proj(hidden_states).transpose(1, 2).unflatten(1, (-1, 2)).unbind(2)  # interleaved
        u = apply_mask_to_padding_states(self._conv(x, cache).transpose(1, 2), attention_mask).transpose(1, 2)
        u = u.unflatten(1, (heads, head_dim))  # (batch, H, P, L)
        time_step, B, C = torch.split(self.x_proj_weight @ u, [self.time_step_rank, self.ssm_state_size,
                                                               self.ssm_state_size], dim=2)
        dt = self.dt_proj_weight @ time_step  # (batch, H, P, L), before bias and softplus
        ct = work_dtype(hidden_states)  # float64 stays float64 throughout, else float32
        dt_bias = self.dt_proj_bias.to(ct)
        delta = F.softplus(dt.to(ct) + dt_bias[..., None])
        A, D = -torch.exp(self.A_log.to(ct)), self.D.to(ct)

        if state is None:
            y = self._prefill(u, dt, dt_bias, delta, A, B, C, D, cache)
        else:
            y = self._continue(state, u, delta, A, B, C, D, cache)
        y = y * F.silu(gate.unflatten(1, (heads, head_dim)))
        return self.out_proj(y.flatten(1, 2).transpose(1, 2).to(dtype))

    def _prefill(self, u, dt, dt_bias, delta, A, B, C, D, cache) -> Tensor:
        """Chain + D skip + λ·tree over whole sequences, per head on one tree; stores ``h_last + λ·H_root``."""
        keep_state = cache is not None
        context_lens, start = self.tree_inputs
        tree = None
        if self.grootl.active and context_lens is not None:
            tree = build_tree(u.detach(), delta.detach(), B.detach(), context_lens, self.grootl.k,
                              self.grootl.distance, start)
        heads = [mixer.scan_sequence(u[:, h], dt[:, h], dt_bias[h], delta[:, h], A[h], B[:, h], C[:, h], D[h], tree,
                                     self.grootl, keep_state) for h in range(self.n_mamba_heads)]
        f = work_dtype(u)
        if keep_state:
            cache.update_recurrent_state(torch.stack([state for _, state in heads], 1).to(f), self.layer_idx)
        return torch.stack([y for y, _ in heads], 1).to(f)

    def _continue(self, state: Tensor, u, delta, A, B, C, D, cache) -> Tensor:
        """Positions after a cached state, all heads at once (:func:`grootl.model.mixer.decode_steps`)."""
        y, state = mixer.decode_steps(state, u, delta, A, B, C, D, self.grootl)
        cache.update_recurrent_state(state, self.layer_idx)
        return y
