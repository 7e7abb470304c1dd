"""lm-eval model ``grootl``: lm-eval's HF model that tells a GrootL model where each context ends.

``lm_eval.simple_evaluate(model="grootl", model_args="pretrained=DIR[,peft=ADAPTER][,modulation=0.3]")``
after ``import grootl.evaluation.lm``, or ``grootl eval``. ``pretrained`` is a GrootL model directory, a stock
Mamba checkpoint (run with the tree scan), or a PEFT adapter directory (its base model is loaded).

Every scoring forward gets ``context_lens``: the number of context tokens of each row after lm-eval's
truncation, so the tree covers exactly the context of each request, per row of a batch. Generation
needs nothing extra: the model treats the whole left-padded prompt as context and reads the padding
from the attention mask lm-eval passes to ``generate``.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils_hf import get_dtype

from grootl.model import ADAPTER_SETTINGS, GrootLConfig, load_model

ADAPTER_CONFIG = "adapter_config.json"


def _strip_right_padding(tokens: list[int]) -> tuple[int, ...]:
    """The row's tokens without lm-eval's right padding (zeros), as a lookup key."""
    end = len(tokens)
    while end and tokens[end - 1] == 0:
        end -= 1
    return tuple(tokens[:end])


@register_model("grootl")
class GrootLLM(HFLM):
    """HFLM for GrootL models: per-request context lengths reach the model's ``context_lens``."""

    def __init__(
        self,
        pretrained: str,
        peft: str | None = None,
        tokenizer: str | None = None,
        modulation: float | None = None,
        k: int | None = None,
        distance: str | None = None,
        grootl_enabled: bool | None = None,
        **kwargs,
    ) -> None:
        if not isinstance(pretrained, str):
            raise ValueError("the grootl lm-eval model takes `pretrained` as a path or hub id, not a model object")
        path = Path(pretrained).expanduser()
        if (path / ADAPTER_CONFIG).is_file() and peft is None:
            peft, pretrained = str(path), self.adapter_base(path)
            tokenizer = tokenizer or (str(path) if any(path.glob("tokenizer*.json")) else pretrained)
        overrides = dict(modulation=modulation, k=k, distance=distance, enabled=grootl_enabled)
        self._grootl_overrides = {key: value for key, value in overrides.items() if value is not None}
        self._context_lens_by_input: dict[tuple[int, ...], int] | None = None
        super().__init__(pretrained=pretrained, peft=peft, tokenizer=tokenizer, backend="causal", **kwargs)

    @staticmethod
    def adapter_base(adapter_dir: Path) -> str:
        """The base model an adapter folder names (its base_model_name_or_path)."""
        config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
        base = config.get("base_model_name_or_path")
        if not base:
            raise ValueError(f"{adapter_dir / ADAPTER_CONFIG} names no base_model_name_or_path; pass pretrained=BASE,peft=ADAPTER")
        return base

    def _create_model(self, pretrained: str, revision: str = "main", dtype="auto", peft: str | None = None, **kwargs) -> None:
        """The GrootL model (checkpoint settings with the model_args overrides), then the adapter."""
        for option in ("delta", "autogptq", "gptqmodel", "gguf_file", "parallelize", "tp_plan"):
            if kwargs.get(option):
                raise ValueError(f"the grootl lm-eval model does not support {option}=")
        settings = Path(peft, ADAPTER_SETTINGS) if peft else None
        if settings is not None and settings.is_file():  # a LoRA arm's adapter: its run's tree settings
            own = GrootLConfig.from_dict(json.loads(settings.read_text()))
        else:
            own = getattr(self._config, "grootl_config", None) or GrootLConfig()
        grootl = dataclasses.replace(own, **self._grootl_overrides)
        dtype = None if dtype == "auto" else get_dtype(dtype)
        self._model = load_model(pretrained, grootl=grootl, dtype=dtype, revision=revision)
        if peft:
            from peft import PeftModel

            with warnings.catch_warnings():  # PEFT asks transformers a deprecated question: not the user's to fix
                warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
                self._model = PeftModel.from_pretrained(self._model, peft, revision=revision)

    @property
    def grootl_config(self) -> GrootLConfig:
        """The tree-scan settings the loaded model runs with."""
        return GrootLConfig.coerce(self.model.config.grootl)

    # --- context lengths ------------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        """Score requests in groups where equal model inputs always have equal context lengths, so
        :meth:`_model_call` can look a row's context length up by its tokens (and lm-eval's one-token
        logits cache, which shares one forward between equal inputs, stays exact)."""
        groups: list[tuple[dict[tuple[int, ...], int], list[int]]] = []
        for index, (_, context, continuation) in enumerate(requests):
            model_input = (context + continuation)[-(self.max_length + 1) :][:-1]
            key, context_len = _strip_right_padding(model_input), len(model_input) - len(continuation) + 1
            group = next((g for g in groups if g[0].get(key, context_len) == context_len), None)
            if group is None:
                group = ({}, [])
                groups.append(group)
            group[0][key] = context_len
            group[1].append(index)
        results: list = [None] * len(requests)
        for context_lens, indices in groups:
            self._context_lens_by_input = context_lens
            try:
                scored = super()._loglikelihood_tokens([requests[i] for i in indices], disable_tqdm, override_bs)
            finally:
                self._context_lens_by_input = None
            for index, result in zip(indices, scored, strict=True):
                results[index] = result
        return results

    def _detect_batch_size(self, requests=None, pos: int = 0):
        """lm-eval's batch-size probe feeds made-up rows: score them with the whole row as context."""
        lookup, self._context_lens_by_input = self._context_lens_by_input, None
        try:
            return super()._detect_batch_size(requests, pos)
        finally:
            self._context_lens_by_input = lookup

    def _row_context_lens(self, inputs: torch.Tensor) -> torch.Tensor | None:
        """Context length of each right-padded row of ``inputs``; None (the whole row) outside scoring."""
        if self._context_lens_by_input is None:
            return None
        lens = []
        for row in inputs.tolist():
            key = _strip_right_padding(row)
            if key not in self._context_lens_by_input:
                raise RuntimeError("grootl lm-eval model: a batch row matches no pending request")
            lens.append(self._context_lens_by_input[key])
        return torch.tensor(lens, dtype=torch.long, device=inputs.device)

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        with (
            torch.no_grad(),
            torch.autocast(
                device_type=self.device.type,
                dtype=self.mixed_precision_dtype,
                enabled=self.mixed_precision_dtype is not None,
            ),
        ):
            return self.model(input_ids=inps, context_lens=self._row_context_lens(inps)).logits
