"""The GrootL branch of a Mamba-2 mixer (scalar decay per head, grouped B and C, gated RMSNorm).

transformers' Mamba-2 mixers (``Mamba2Mixer``, Bamba's, Granite-4.0-H's, Nemotron-H's, Zamba2's) share
one forward; :class:`GrootLSSDMixer` replaces it, keeping every parameter and name. Per block::

    gate, xBC, dt = in_proj(h);  x, B, C = act(conv1d(xBC));  dt = clamp(softplus(dt + dt_bias))
    y = y_chain + λ·y_tree + D·x;  out = out_proj(norm(y, gate))

``y_chain`` is the family's chunked (SSD) scan: mamba-ssm's ``mamba_chunk_scan_combined`` for CUDA
tensors where installed, else transformers' own PyTorch version of it. ``y_tree`` is
:func:`grootl.tree.mamba2.tree_scan` over each row's prompt (``context_lens``; left padding ``start``
kept out of the tree). After a prefill the cache holds ``S = h_last + λ·H_root`` and each later position
updates ``S = Ā·S + (1+λ)·X`` (mamba-ssm's ``selective_state_update`` where installed, B scaled by 1+λ).
"""

from __future__ import annotations

import inspect
from functools import cache
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.integrations.accelerate import force_accelerate_hooks
from transformers.models.mamba2 import modeling_mamba2
from transformers.models.mamba2.modeling_mamba2 import apply_mask_to_padding_states

from grootl.model.config import GrootLConfig
from grootl.model.mixer import GrootLMixer
from grootl.tree import mamba2 as tree2


class SSDKernels(NamedTuple):
    """The Mamba-2 chain over a sequence and the one-position state update (mamba_ssm's signatures)."""

    chunk_scan: Callable
    state_update: Callable


# transformers' PyTorch versions, unwrapped from the hub/mamba-ssm dispatch that is bound once at import
# regardless of device (a CPU forward must never reach a CUDA kernel)
TORCH_KERNELS = SSDKernels(
    inspect.unwrap(modeling_mamba2.mamba2_chunk_scan), inspect.unwrap(modeling_mamba2.mamba2_selective_state_update)
)


@cache
def _installed_kernels() -> SSDKernels | None:
    """mamba_ssm's Triton kernels where they import."""
    try:
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except (ImportError, OSError):
        return None
    return SSDKernels(mamba_chunk_scan_combined, selective_state_update)


def ssd_kernels(x: Tensor) -> SSDKernels:
    """The installed kernels for CUDA tensors below float64, transformers' PyTorch ones otherwise."""
    if x.is_cuda and x.dtype != torch.float64:
        return _installed_kernels() or TORCH_KERNELS
    return TORCH_KERNELS


class GrootLSSDMixer:
    """Put before a transformers Mamba-2 mixer class (``class M(GrootLSSDMixer, Mamba2Mixer)``): its
    forward merges the tree scan. ``grootl`` holds the :class:`GrootLConfig`; ``tree_inputs`` the
    (context_lens, start) of the current forward, set by the model (None: no prompt, so the tree is
    the chain and ``y_tree = y_chain``)."""

    grootl: GrootLConfig = GrootLConfig()
    tree_inputs: tuple[Tensor | None, Tensor | None] = (None, None)

    _conv = GrootLMixer._conv  # causal depthwise conv1d + activation over the new positions, cache-aware

    @force_accelerate_hooks(["conv1d"])  # conv1d's weight is read directly on the fused path (offloading)
    def forward(self, hidden_states: Tensor, cache=None, attention_mask: Tensor | None = None, cache_params=None,
                **kwargs) -> Tensor:
        cache = cache if cache is not None else cache_params
        batch, length, _ = hidden_states.shape
        dtype = hidden_states.dtype
        state = cache.get_recurrent_state(self.layer_idx) if cache is not None else None

        hidden_states = apply_mask_to_padding_states(hidden_states, attention_mask)
        gate, xBC, dt = self._in_proj(hidden_states).split([self.intermediate_size, self.conv_dim, self.num_heads], -1)
        xBC = apply_mask_to_padding_states(self._conv(xBC.transpose(1, 2), cache).transpose(1, 2), attention_mask)
        groups_n = self.n_groups * self.ssm_state_size
        x, B, C = xBC.split([self.intermediate_size, groups_n, groups_n], -1)
        x = x.reshape(batch, length, self.num_heads, self.head_dim)
        B = B.reshape(batch, length, self.n_groups, self.ssm_state_size)
        C = C.reshape(batch, length, self.n_groups, self.ssm_state_size)
        dt = F.softplus(dt + self.dt_bias.to(dt.dtype)).clamp(*self.time_step_limit)
        A = -torch.exp(self.A_log.float())

        if state is None:
            y = self._prefill(x, dt, A, B, C, cache)
        else:
            y = self._continue(state, x, dt, A, B, C, cache)
        y = y + self.D[:, None] * x.float()
        return self.out_proj(self._gate_and_norm(y.reshape(batch, length, -1), gate).to(dtype))

    def _in_proj(self, hidden_states: Tensor) -> Tensor:
        """in_proj's output (gate, xBC, dt); a family may scale it (Falcon-H1's µP multipliers)."""
        return self.in_proj(hidden_states)

    def _gate_and_norm(self, y: Tensor, gate: Tensor) -> Tensor:
        """The gated RMSNorm after the scan; a family may gate without the norm (Falcon-H1)."""
        return self.norm(y, gate)

    def _prefill(self, x, dt, A, B, C, cache) -> Tensor:
        """Chain + λ·tree over whole sequences (no D skip); stores ``h_last + λ·H_root`` in the cache."""
        keep_state = cache is not None
        out = ssd_kernels(x).chunk_scan(x, dt, A, B, C, self.chunk_size, return_final_states=keep_state)
        y, h_last = out if keep_state else (out, None)
        y = y.float()  # mamba-ssm returns x's dtype (bf16 under autocast); the sum and the skip run in float32
        if self.grootl.active:
            lam = self.grootl.modulation
            context_lens, start = self.tree_inputs
            if context_lens is None:  # no prompt: the tree is the chain
                y_tree, h_root = y, h_last
            else:
                # values unchecked (no per-layer passes or host syncs): the model checks context_lens once
                tree = tree2.build_tree(x.detach(), dt.detach(), B.detach(), context_lens, self.grootl.k,
                                        self.grootl.distance, start, check_values=False)
                y_tree, h_root = tree2.tree_scan(x, dt, A, B, C, tree, return_root_state=True, check_values=False)
            y = y + lam * y_tree.to(y.dtype)
            if keep_state:
                h_last = h_last + lam * h_root.to(h_last.dtype)
        if keep_state:
            cache.update_recurrent_state(h_last, self.layer_idx)
        return y

    def _continue(self, state, x, dt, A, B, C, cache) -> Tensor:
        """Positions after a cached state, all on the chain: ``S = Ā·S + (1+λ)·X``, ``y = C·S`` (no D skip)."""
        B = B * (1 + self.grootl.modulation if self.grootl.active else 1.0)
        kernels = ssd_kernels(x)
        if x.shape[1] == 1 and not torch.is_grad_enabled():  # updates the cached state in place
            p, n = self.head_dim, self.ssm_state_size
            y = kernels.state_update(state, x[:, 0], dt[:, 0, :, None].expand(-1, -1, p),
                                     A[:, None, None].expand(-1, p, n), B[:, 0], C[:, 0])
            return y[:, None].float()
        y, state = kernels.chunk_scan(x, dt, A, B, C, self.chunk_size, initial_states=state, return_final_states=True)
        cache.update_recurrent_state(state, self.layer_idx)
        return y.float()


class GrootLFalconH1MixerBase(GrootLSSDMixer):
    """Falcon-H1: µP multipliers on in_proj's input and output; the gated RMSNorm only when
    ``mamba_rms_norm`` (else ``y·SiLU(gate)``)."""

    def _in_proj(self, hidden_states: Tensor) -> Tensor:
        return self.in_proj(hidden_states * self.ssm_in_multiplier) * self.mup_vector

    def _gate_and_norm(self, y: Tensor, gate: Tensor) -> Tensor:
        return self.norm(y, gate) if self.mamba_rms_norm else y * F.silu(gate)
