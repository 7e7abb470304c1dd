"""The GrootL Mamba mixer: the stock ``MambaMixer`` parameters, a forward that adds the tree scan.

Per block (``../shared/README.md``): ``y = y_chain + Dskip*u + modulation * y_tree``, then
``y * SiLU(z)`` and ``out_proj``. After a prefill the cache holds ``S = h_last + modulation*H_root``
and each decoded token updates ``S = Ā*S + (1 + modulation)*X`` (response positions lie on the chain).
"""

from __future__ import annotations

from functools import cache
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.integrations.accelerate import force_accelerate_hooks
from transformers.models.mamba.modeling_mamba import MambaMixer, apply_mask_to_padding_states
from transformers.utils.deprecation import deprecate_kwarg

from grootl.model.config import GrootLConfig
from grootl.tree import build_tree, chain_scan, tree_scan
from grootl.tree.scan import chain_tree_scan
from grootl.tree.graph import work_dtype


class FusedKernels(NamedTuple):
    """mamba_ssm's and causal-conv1d's CUDA kernels the mixer uses; None where the torch path runs instead."""

    selective_scan: Callable | None = None  # mamba_ssm selective_scan_fn: the chain over a sequence
    causal_conv1d: Callable | None = None  # causal_conv1d_fn
    state_update: Callable | None = None  # mamba_ssm selective_state_update: one decoded position


@cache
def _installed_kernels() -> FusedKernels:
    """The fused kernels importable here."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
    except (ImportError, OSError):
        selective_scan_fn = selective_state_update = None
    try:
        from causal_conv1d import causal_conv1d_fn
    except (ImportError, OSError):
        causal_conv1d_fn = None
    return FusedKernels(selective_scan_fn, causal_conv1d_fn, selective_state_update)


def fast_kernels(x: Tensor) -> FusedKernels:
    """The fused kernels for ``x``: those installed for CUDA tensors below float64, none otherwise, and
    none while torch.compile or torch.export traces (they are not torch custom ops: the graph would break;
    the torch conv and grootl's chain scan, a custom op, run instead)."""
    if not x.is_cuda or x.dtype == torch.float64 or torch.compiler.is_compiling():
        return FusedKernels()
    return _installed_kernels()


class GrootLMixer(MambaMixer):
    """``MambaMixer`` (same parameters and names, so state dicts match) whose forward merges the
    chain scan with the GrootL tree scan. ``grootl`` holds the :class:`GrootLConfig` in use."""

    def __init__(self, config, layer_idx: int, initialize_mixer_weights: bool = True):
        # use_associative_scan (on by default) only picks how stock Mamba's torch path runs the chain under
        # torch.compile; GrootL's chain scan gives the same results, so it is accepted and has no effect
        if getattr(config, "use_mambapy", False):
            raise ValueError(
                "GrootL does not support use_mambapy=True (stock Mamba's mambapy chain scan; GrootL runs its own "
                "chain and tree scans, or mamba-ssm's where installed): set use_mambapy=False"
            )
        super().__init__(config, layer_idx, initialize_mixer_weights=initialize_mixer_weights)
        self.grootl = GrootLConfig.coerce(getattr(config, "grootl", None))

    @force_accelerate_hooks(["conv1d", "dt_proj"])
    @deprecate_kwarg("cache_params", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: Tensor,
        cache=None,
        attention_mask: Tensor | None = None,
        context_lens: Tensor | None = None,
        start: Tensor | None = None,
        **kwargs,
    ) -> Tensor:
        """hidden_states (batch, L, hidden). context_lens (batch,): prompt length per row (default: no
        prompt, the tree is the chain); start (batch,): left-padding count per row. Both only matter where
        the tree runs, i.e. on a sequence without a previous recurrent state in ``cache``."""
        dtype = hidden_states.dtype
        state = cache.get_recurrent_state(self.layer_idx) if cache is not None else None

        hidden_states = apply_mask_to_padding_states(hidden_states, attention_mask)
        x, gate = self.in_proj(hidden_states).transpose(1, 2).chunk(2, dim=1)
        u = apply_mask_to_padding_states(self._conv(x, cache).transpose(1, 2), attention_mask)
        time_step, B, C = self._time_step_B_C(u)
        u, B, C = u.transpose(1, 2), B.transpose(1, 2), C.transpose(1, 2)  # (batch, D|N, L)
        ct = work_dtype(hidden_states)
        dt = self.dt_proj.weight @ time_step.transpose(1, 2)  # (batch, D, L), before bias and softplus
        dt_bias = self.dt_proj.bias.float()
        delta = F.softplus(dt.to(ct) + dt_bias.to(ct)[:, None])
        A = -torch.exp(self.A_log.float())

        if state is not None:
            y = self._recurrent_scan(state, u, delta, A, B, C, cache)
        else:
            y = self._full_scan(u, dt, dt_bias, delta, A, B, C, cache, context_lens, start)
        y = y * F.silu(gate)
        return self.out_proj(y.transpose(1, 2).to(dtype))

    def _time_step_B_C(self, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``x_proj(u)`` split into (time_step, B, C), each (batch, L, ·); a family's mixer may normalise
        them (Falcon-Mamba: RMS norms on all three)."""
        return torch.split(self.x_proj(u), [self.time_step_rank, self.ssm_state_size, self.ssm_state_size], dim=-1)

    def _conv(self, x: Tensor, cache) -> Tensor:
        """Causal depthwise conv1d + activation over the new positions (the cache supplies the past)."""
        length = x.shape[-1]
        if cache is not None:
            x = cache.update_conv_state(x, self.layer_idx, conv_kernel_size=self.conv_kernel_size)
        causal_conv1d_fn = fast_kernels(x).causal_conv1d
        if causal_conv1d_fn is not None and self.activation in ("silu", "swish") and 2 <= self.conv_kernel_size <= 4:
            weight = self.conv1d.weight.squeeze(1)
            return causal_conv1d_fn(x.contiguous(), weight, self.conv1d.bias, activation=self.activation)[..., -length:]
        out = self.conv1d(x.to(self.conv1d.weight.dtype))[..., x.shape[-1] - length : x.shape[-1]]
        return self.act(out).to(x.dtype)

    def _full_scan(self, u, dt, dt_bias, delta, A, B, C, cache, context_lens, start) -> Tensor:
        """Chain scan (+ D skip) plus modulation * tree scan over a whole sequence; fills the cache."""
        tree = None
        if self.grootl.active and context_lens is not None:
            # values unchecked (no per-layer passes or host syncs): the model checks context_lens once per
            # forward and start comes from the attention mask; non-finite activations show in the loss
            tree = build_tree(u.detach(), delta.detach(), B.detach(), context_lens, self.grootl.k,
                              self.grootl.distance, start, check_values=False)
        y, state = scan_sequence(u, dt, dt_bias, delta, A, B, C, self.D.float(), tree, self.grootl, cache is not None)
        if cache is not None:
            cache.update_recurrent_state(state.to(work_dtype(u)), self.layer_idx)
        return y

    def _recurrent_scan(self, state: Tensor, u, delta, A, B, C, cache) -> Tensor:
        """Continue from the cached state (:func:`decode_steps`); stores the new state in the cache."""
        y, state = decode_steps(state, u, delta, A, B, C, self.D.float(), self.grootl)
        cache.update_recurrent_state(state, self.layer_idx)
        return y


def scan_sequence(u, dt, dt_bias, delta, A, B, C, D, tree, grootl: GrootLConfig, keep_state: bool):
    """Chain scan + D skip + modulation * tree scan over whole sequences, in the Mamba-1 layout: u, dt (before
    bias and softplus), delta (batch, channels, L); dt_bias, D (channels,); A (channels, N); B, C (batch, N, L).
    ``tree`` None: no prompt, so the tree is the chain. Returns y (batch, channels, L) and, with ``keep_state``,
    the state to cache, ``h_last + modulation * H_root`` (else None). mamba_ssm's ``selective_scan_fn`` runs the
    chain where installed; otherwise one native call runs both scans where it can."""
    selective_scan_fn = fast_kernels(u).selective_scan
    skip = u * D[:, None]
    lam = grootl.modulation
    if tree is not None and selective_scan_fn is None:  # both scans in one call
        out = chain_tree_scan(u, delta, A, B, C, tree, lam, return_last_state=keep_state, check_values=False)
        y, state = out if keep_state else (out, None)
        return y + skip, state
    if selective_scan_fn is not None:
        chain = selective_scan_fn(u, dt.to(u.dtype), A, B, C, D=D, delta_bias=dt_bias, delta_softplus=True,
                                  return_last_state=keep_state)
    else:
        chain = chain_scan(u, delta, A, B, C, return_last_state=keep_state, check_values=False)
    y, state = chain if keep_state else (chain, None)
    if selective_scan_fn is None:
        y = y + skip
    if tree is not None:
        tree_out = tree_scan(u, delta, A, B, C, tree, return_root_state=keep_state, check_values=False)
        y_tree, h_root = tree_out if keep_state else (tree_out, None)
        y = y + lam * y_tree
        if keep_state:
            state = state.to(h_root.dtype) + lam * h_root
    elif grootl.active:  # no prompt: the tree is the chain, so H = h and y_tree = C·h
        y = y + lam * (y - skip)
        if keep_state:
            state = state + lam * state
    return y, state


def decode_steps(state: Tensor, u, delta, A, B, C, D, grootl: GrootLConfig) -> tuple[Tensor, Tensor]:
    """Positions after a cached state, one at a time: ``S = Ā*S + (1+λ)*X``, ``y = C·S + D*u`` (mamba_ssm's
    ``selective_state_update``, B scaled by 1+λ, where installed; it updates the state in place). Mamba-1's
    layout (state (batch, channels, N), u (batch, channels, L), B (batch, N, L)) or with heads (state (batch, H,
    P, N), u (batch, H, P, L), B (batch, H, N, L), A (H, P, N), D (H, P)). Returns y (u's shape) and the state."""
    scale = 1 + grootl.modulation if grootl.active else 1.0
    state_update = None if torch.is_grad_enabled() else fast_kernels(u).state_update  # in place: no autograd
    ct = state.dtype
    s, A = state, A.to(ct)
    ys = []
    for t in range(u.shape[-1]):
        u_t, d_t = u[..., t].to(ct), delta[..., t].to(ct)
        B_t, C_t = scale * B[..., t].to(ct), C[..., t].to(ct)
        if state_update is not None:  # updates s in place
            ys.append(state_update(s, u_t, d_t, A, B_t, C_t, D=D).to(ct))
            continue
        s = torch.exp(d_t[..., None] * A) * s + (d_t * u_t)[..., None] * B_t.unsqueeze(-2)
        ys.append((s @ C_t[..., None]).squeeze(-1) + D * u_t)
    return torch.stack(ys, -1), s
