"""GrootL Mamba models on top of transformers' Mamba classes.

Importing this package registers the ``grootl_mamba`` model type with transformers' Auto classes.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from grootl.model.adapters import merge_adapter, untie_output_embeddings
from grootl.model.config import ADAPTER_SETTINGS, GrootLConfig, GrootLMambaConfig, tiny_config
from grootl.model.loading import load_model, tiny_model
from grootl.model.mixer import GrootLMixer
from grootl.model.modeling import GrootLMambaForCausalLM, GrootLMambaModel, context_lens_from_labels

AutoConfig.register(GrootLMambaConfig.model_type, GrootLMambaConfig, exist_ok=True)
AutoModel.register(GrootLMambaConfig, GrootLMambaModel, exist_ok=True)
AutoModelForCausalLM.register(GrootLMambaConfig, GrootLMambaForCausalLM, exist_ok=True)

from grootl.model import families  # noqa: E402  (registers the other families' GrootL model types)

__all__ = [
    "ADAPTER_SETTINGS",
    "GrootLConfig",
    "GrootLMambaConfig",
    "GrootLMambaForCausalLM",
    "GrootLMambaModel",
    "GrootLMixer",
    "context_lens_from_labels",
    "families",
    "load_model",
    "merge_adapter",
    "tiny_config",
    "tiny_model",
    "untie_output_embeddings",
]
