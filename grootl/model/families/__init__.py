"""GrootL for the Mamba families of transformers beyond Mamba-1: one :class:`Family` entry each.

``load_model`` dispatches on a checkpoint's ``model_type`` (stock, e.g. ``mamba2``, or GrootL, e.g.
``grootl_mamba2``); importing this package registers the GrootL model types with transformers' Auto
classes. Mamba-1 (``mamba``) lives in ``grootl.model``.
"""

from __future__ import annotations

from transformers import (AutoConfig, AutoModelForCausalLM, BambaConfig, BambaForCausalLM, FalconH1Config,
                          FalconH1ForCausalLM, FalconMambaConfig, FalconMambaForCausalLM, JambaConfig, JambaForCausalLM, GraniteMoeHybridConfig, GraniteMoeHybridForCausalLM, Mamba2Config,
                          Mamba2ForCausalLM, NemotronHConfig, NemotronHForCausalLM, Zamba2Config, Zamba2ForCausalLM,
                          ZambaConfig, ZambaForCausalLM)
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.models.bamba.modeling_bamba import BambaMixer
from transformers.models.falcon_h1.modeling_falcon_h1 import FalconH1Mixer
from transformers.models.falcon_mamba.modeling_falcon_mamba import FalconMambaMixer
from transformers.models.granitemoehybrid.modeling_granitemoehybrid import GraniteMoeHybridMambaLayer
from transformers.models.jamba.modeling_jamba import JambaMambaMixer
from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer
from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMamba2Mixer
from transformers.models.zamba.modeling_zamba import ZambaMambaMixer
from transformers.models.zamba2.modeling_zamba2 import Zamba2MambaMixer

from grootl.model.config import GrootLConfig
from grootl.model.families.base import Family, GrootLCausalLMMixin, GrootLConfigMixin, make_family
from grootl.model.families.mamba1 import GrootLFalconMambaMixerBase
from grootl.model.families.ssd import GrootLFalconH1MixerBase, GrootLSSDMixer
from grootl.model.families.zamba import GrootLZambaMixerBase

_ATTENTION_MLP = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

FAMILIES: dict[str, Family] = {
    family.model_type: family
    for family in (
        make_family(Mamba2Config, Mamba2ForCausalLM, Mamba2Mixer, GrootLSSDMixer,
                    lora_targets=("embeddings", "in_proj", "out_proj"),
                    examples=("AntonV/mamba2-130m-hf", "AntonV/mamba2-2.7b-hf", "mistralai/Mamba-Codestral-7B-v0.1")),
        make_family(FalconMambaConfig, FalconMambaForCausalLM, FalconMambaMixer, GrootLFalconMambaMixerBase,
                    lora_targets=("embeddings", "in_proj", "x_proj", "out_proj"),
                    examples=("tiiuae/falcon-mamba-7b",)),
        make_family(JambaConfig, JambaForCausalLM, JambaMambaMixer, GrootLFalconMambaMixerBase,  # same norms
                    lora_targets=("embed_tokens", "in_proj", "x_proj", "out_proj", "q_proj", "k_proj", "v_proj",
                                  "o_proj"),
                    examples=("ai21labs/Jamba-tiny-dev",)),
        make_family(BambaConfig, BambaForCausalLM, BambaMixer, GrootLSSDMixer,
                    lora_targets=("embed_tokens", "in_proj", "out_proj") + _ATTENTION_MLP,
                    examples=("ibm-ai-platform/Bamba-9B-v2",)),
        make_family(GraniteMoeHybridConfig, GraniteMoeHybridForCausalLM, GraniteMoeHybridMambaLayer, GrootLSSDMixer,
                    lora_targets=("embed_tokens", "in_proj", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj"),
                    examples=("ibm-granite/granite-4.0-h-350m", "ibm-granite/granite-4.0-h-micro",
                              "ibm-granite/granite-4.0-h-tiny")),
        make_family(NemotronHConfig, NemotronHForCausalLM, NemotronHMamba2Mixer, GrootLSSDMixer,
                    lora_targets=("embeddings", "in_proj", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj",
                                  "up_proj", "down_proj"),
                    examples=("nvidia/NVIDIA-Nemotron-Nano-9B-v2",)),
        make_family(FalconH1Config, FalconH1ForCausalLM, FalconH1Mixer, GrootLFalconH1MixerBase,
                    lora_targets=("embed_tokens", "in_proj", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj",
                                  "gate_proj", "up_proj", "down_proj"),
                    examples=("tiiuae/Falcon-H1-0.5B-Base", "tiiuae/Falcon-H1-0.5B-Instruct")),
        # Zamba2 and Zamba: not the embeddings (tied to the output layer) nor the shared attention block: its weights
        # are tied across the hybrid layers, and one adapter per layer could not merge into them; `linear` (per
        # layer) maps its output
        make_family(Zamba2Config, Zamba2ForCausalLM, Zamba2MambaMixer, GrootLSSDMixer,
                    lora_targets=("in_proj", "out_proj", "linear"),
                    examples=("Zyphra/Zamba2-1.2B", "Zyphra/Zamba2-2.7B")),
        make_family(ZambaConfig, ZambaForCausalLM, ZambaMambaMixer, GrootLZambaMixerBase,
                    lora_targets=("in_proj", "out_proj", "linear"),
                    examples=("Zyphra/Zamba-7B-v1",)),
    )
}
_BY_MODEL_TYPE = {t: f for f in FAMILIES.values() for t in (f.model_type, f.grootl_model_type)}
# each family's GrootL classes by name, as module attributes (``GrootLMamba2Config``, ``GrootLMamba2ForCausalLM``)
CLASSES = {cls.__name__: cls for f in FAMILIES.values() for cls in (f.config, f.causal_lm)}
globals().update(CLASSES)

for _family in FAMILIES.values():
    # >>> grootl package only: a trust_remote_code copy must not take these model types over from grootl
    AutoConfig.register(_family.grootl_model_type, _family.config, exist_ok=True)
    AutoModelForCausalLM.register(_family.config, _family.causal_lm, exist_ok=True)
    # <<< grootl package only
    # transformers renames some families' weights between the checkpoint layout and the modules, by model type
    _weights = get_checkpoint_conversion_mapping(_family.model_type)
    if _weights is not None:
        register_checkpoint_conversion_mapping(_family.grootl_model_type, _weights, overwrite=True)


def family_of(model_type: str) -> Family | None:
    """The family of a stock or GrootL ``model_type``, or None."""
    return _BY_MODEL_TYPE.get(model_type)


def from_config(config, grootl: GrootLConfig | dict | None = None) -> GrootLCausalLMMixin:
    """A randomly initialised GrootL model of a stock or GrootL config of a supported family."""
    family = _require_family(config, "this config")
    return family.causal_lm(family.config.from_stock(config, grootl))


def _require_family(config, what: str) -> Family:
    family = family_of(getattr(config, "model_type", None))
    if family is None:
        raise ValueError(
            f"{what} has model_type={getattr(config, 'model_type', None)!r}, not a supported family: "
            f"{sorted(_BY_MODEL_TYPE)}"
        )
    return family


TINY_CONFIGS = {
    "falcon_mamba": lambda: FalconMambaConfig(hidden_size=32, num_hidden_layers=2, state_size=8, vocab_size=512,
                                              expand=2, conv_kernel=4,
                                              tie_word_embeddings=False),
    "mamba2": lambda: Mamba2Config(hidden_size=32, num_heads=8, head_dim=8, expand=2, n_groups=2, state_size=16,
                                   num_hidden_layers=2, vocab_size=512, conv_kernel=4, chunk_size=8,
                                   tie_word_embeddings=False),
    "bamba": lambda: BambaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3, attn_layer_indices=[1],
                                 num_attention_heads=4, num_key_value_heads=2, mamba_n_heads=8, mamba_d_head=8,
                                 mamba_expand=2, mamba_n_groups=2, mamba_d_state=16, mamba_chunk_size=8,
                                 vocab_size=512, tie_word_embeddings=False, initializer_range=0.2),
    "falcon_h1": lambda: FalconH1Config(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        mamba_d_ssm=64, mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=2, mamba_d_state=16, mamba_chunk_size=8,
        vocab_size=512, initializer_range=0.2, ssm_in_multiplier=0.5, ssm_multipliers=[0.5, 1.5, 0.7, 1.2, 0.9]),
    "jamba": lambda: JambaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=4, attn_layer_period=2, attn_layer_offset=1,
        expert_layer_period=2, expert_layer_offset=1, num_experts=4, num_experts_per_tok=2, num_attention_heads=4,
        num_key_value_heads=2, mamba_d_state=8, mamba_dt_rank=4, mamba_expand=2, vocab_size=512,
        initializer_range=0.2),
    "granitemoehybrid": lambda: GraniteMoeHybridConfig(
        hidden_size=32, intermediate_size=48, shared_intermediate_size=48, num_hidden_layers=3,
        layer_types=["mamba", "attention", "mamba"], num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=4, num_experts_per_tok=2, mamba_n_heads=8, mamba_d_head=8, mamba_expand=2,
        mamba_n_groups=2, mamba_d_state=16, mamba_chunk_size=8, vocab_size=512, initializer_range=0.2),
    "nemotron_h": lambda: NemotronHConfig(
        hidden_size=32, layers_block_type=["mamba", "attention", "mlp", "mamba"], num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, intermediate_size=48, mamba_num_heads=8, mamba_head_dim=8, expand=2,
        n_groups=2, ssm_state_size=16, chunk_size=8, vocab_size=512, initializer_range=0.2),
    "zamba2": lambda: Zamba2Config(
        hidden_size=32, num_hidden_layers=4, layers_block_type=["mamba", "hybrid", "mamba", "hybrid"],
        mamba_d_state=16, mamba_expand=2, mamba_ngroups=2, n_mamba_heads=8, chunk_size=8, num_attention_heads=4,
        num_key_value_heads=4, intermediate_size=48, vocab_size=512, initializer_range=0.2),  # tied, as the real ones
    "zamba": lambda: ZambaConfig(
        hidden_size=32, num_hidden_layers=4, layers_block_type=["linear_attention", "hybrid", "linear_attention", "hybrid"],
        n_mamba_heads=2, mamba_d_state=8, mamba_dt_rank=4, mamba_expand=2, num_attention_heads=4,
        num_key_value_heads=4, intermediate_size=48, vocab_size=512, initializer_range=0.2),
}


def tiny_config(model_type: str, **overrides):
    """A tiny stock config of a family (hidden 32, a few layers, vocab 512) for tests and CPU demos."""
    if model_type not in TINY_CONFIGS:
        raise ValueError(f"no tiny config for model_type={model_type!r}; known: {sorted(TINY_CONFIGS)}")
    config = TINY_CONFIGS[model_type]()
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


__all__ = [*CLASSES, "FAMILIES", "Family", "GrootLCausalLMMixin", "GrootLConfigMixin", "family_of", "from_config", "tiny_config"]
