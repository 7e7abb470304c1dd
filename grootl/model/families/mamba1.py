"""GrootL mixers for the Mamba-1 families beyond ``mamba``: :class:`grootl.model.GrootLMixer` taking its
prompt lengths from ``tree_inputs`` (set by the model, as for the Mamba-2 families)."""

from __future__ import annotations

from torch import Tensor

from grootl.model.mixer import GrootLMixer


class GrootLMamba1Mixer(GrootLMixer):
    """:class:`GrootLMixer` whose ``context_lens`` and ``start`` come from ``tree_inputs``."""

    tree_inputs: tuple[Tensor | None, Tensor | None] = (None, None)

    def forward(self, hidden_states: Tensor, cache=None, attention_mask: Tensor | None = None, **kwargs) -> Tensor:
        context_lens, start = self.tree_inputs
        return super().forward(hidden_states, cache=cache, attention_mask=attention_mask, context_lens=context_lens,
                               start=start)


class GrootLFalconMambaMixerBase(GrootLMamba1Mixer):
    """Falcon-Mamba: Mamba-1 with weightless RMS norms on time_step, B and C after ``x_proj``."""

    def _time_step_B_C(self, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        time_step, B, C = super()._time_step_B_C(u)
        return self.dt_layernorm(time_step), self.b_layernorm(B), self.c_layernorm(C)
