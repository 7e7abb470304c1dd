"""GrootL models in other people's training loops: TRL's ``SFTTrainer`` and transformers' ``Trainer``."""

from grootl.integrations.hf import PromptLengthCollator, give_prompts

__all__ = ["PromptLengthCollator", "give_prompts"]
