"""GrootL in other people's training loops: TRL's SFTTrainer (prompt/completion data, completion-only loss,
a PEFT config) and transformers' Trainer (label smoothing, which drops the labels before the forward).
On each route the forward the trainer makes must give the tree exactly each row's prompt: no later
token changes an earlier position, and the prompt's tree is on (not the empty-prompt chain)."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoTokenizer, Trainer, TrainingArguments

from grootl.data import SFTCollator
from grootl.integrations import PromptLengthCollator, give_prompts
from grootl.model import GrootLMambaForCausalLM, families, tiny_model

trl = pytest.importorskip("trl")

from conftest import ASSETS  # noqa: E402

PROMPTS = ["### Instruction:\nName a colour.\n\n### Response:", "### Instruction:\nSay hi twice, please.\n\n### Response:"]
COMPLETIONS = [" Red, like the sky at dusk.", " Hi. Hi."]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ASSETS / "tokenizer")


def prompt_lens(tokenizer) -> torch.Tensor:
    return torch.tensor([len(tokenizer(p)["input_ids"]) for p in PROMPTS])


def tiny(tokenizer, model_type: str):
    """A tiny GrootL model of ``model_type`` (``mamba``, or a family of grootl.model.families) for the tokenizer."""
    if model_type == "mamba":
        return tiny_model(vocab_size=len(tokenizer))
    return families.from_config(families.tiny_config(model_type, vocab_size=len(tokenizer)))


def lora_targets(model) -> list[str]:
    family = families.family_of(model.config.model_type)
    return ["x_proj", "in_proj", "out_proj"] if family is None else list(family.lora_targets)


class BackboneSpy:
    """Records the prompt lengths the mixers were given and the output of each forward of the backbone (the forward
    the trainer makes; TRL's fused LM head calls the backbone itself)."""

    def __init__(self, model):
        self.calls = []
        self.model = model
        model.base_model.register_forward_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs, output):
        if isinstance(self.model, GrootLMambaForCausalLM):  # its backbone takes context_lens
            context_lens = kwargs.get("context_lens")
        else:  # a family's mixers are given them before the stock backbone runs
            context_lens = self.model.grootl_mixers()[0].tree_inputs[0]
        self.calls.append((context_lens, output.last_hidden_state.detach()))


def sft_trainer(tokenizer, tmp_path, model_type="mamba", **config):
    model = tiny(tokenizer, model_type)
    args = trl.SFTConfig(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3, report_to=[],
        save_strategy="no", logging_steps=1, use_cpu=True, completion_only_loss=True, dataloader_num_workers=0,
        **config,
    )
    data = Dataset.from_dict({"prompt": PROMPTS, "completion": COMPLETIONS})
    peft = LoraConfig(r=4, lora_alpha=8, target_modules=lora_targets(model))
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=peft)
    return give_prompts(trainer), model


def route_hidden_states(trainer, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The backbone's context_lens and output in the trainer's own loss computation on ``batch``."""
    spy = BackboneSpy(model)
    trainer.model.eval()
    with torch.no_grad():
        trainer.compute_loss(trainer.model, dict(batch))
    (context_lens, hidden), *_ = spy.calls
    return context_lens, hidden


def check_route(trainer, model, batch, tokenizer):
    lens = prompt_lens(tokenizer)
    context_lens, hidden = route_hidden_states(trainer, model, batch)
    assert context_lens.tolist() == lens.tolist()  # exactly each row's prompt
    # no look-ahead: change the last completion token of every row, nothing before it moves
    edited = dict(batch, input_ids=batch["input_ids"].clone())
    last = batch["attention_mask"].sum(1) - 1
    rows = torch.arange(len(last))
    edited["input_ids"][rows, last] = (batch["input_ids"][rows, last] + 7) % len(tokenizer)
    _, hidden_edited = route_hidden_states(trainer, model, edited)
    for row, end in enumerate(last.tolist()):
        assert torch.equal(hidden[row, :end], hidden_edited[row, :end])
        assert not torch.equal(hidden[row, end], hidden_edited[row, end])
    # the tree is on: the same as the model told the prompt, unlike the empty prompt or λ = 0
    with torch.no_grad():
        told = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], context_lens=lens,
                             output_hidden_states=True).hidden_states[-1]
        empty = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              context_lens=torch.zeros_like(lens), output_hidden_states=True).hidden_states[-1]
        model.set_grootl({"modulation": 0.0})
        _, no_tree = route_hidden_states(trainer, model, batch)
        model.set_grootl({"modulation": 0.3})
    torch.testing.assert_close(hidden, told, rtol=1e-5, atol=1e-6)
    for other in (empty, no_tree):
        assert (hidden[:, : int(lens.min())] - other[:, : int(lens.min())]).abs().max() > 1e-5


@pytest.mark.parametrize("model_type", ["mamba", "mamba2"])  # Mamba-1, and a family (its mixers take no arguments)
def test_trl_sft_trainer_gives_the_tree_each_rows_prompt(tokenizer, tmp_path, model_type):
    trainer, model = sft_trainer(tokenizer, tmp_path, model_type)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    assert batch["labels"][0, : prompt_lens(tokenizer)[0]].eq(-100).all()  # TRL left the prompt out of the loss
    check_route(trainer, model, batch, tokenizer)
    trainer.model.train()
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))


def test_trl_packing_is_refused_in_one_line(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="one example per row.*packing=False"):
        sft_trainer(tokenizer, tmp_path, packing=True, max_length=64)
    packed = {"input_ids": torch.ones(1, 6, dtype=torch.long), "position_ids": torch.tensor([[0, 1, 2, 0, 1, 2]]),
              "labels": torch.ones(1, 6, dtype=torch.long)}
    with pytest.raises(ValueError, match="packs several"):
        PromptLengthCollator(lambda rows: packed)([{}])
    # right-padded position_ids (zeros where attention_mask is 0, as TRL pads them) are one example per row
    padded = {"input_ids": torch.ones(2, 5, dtype=torch.long), "position_ids": torch.tensor([[0, 1, 2, 0, 0], [0, 1, 2, 3, 4]]),
              "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]),
              "labels": torch.tensor([[-100, 5, 5, -100, -100], [-100, -100, 5, 5, 5]])}
    assert PromptLengthCollator(lambda rows: padded)([{}])["context_lens"].tolist() == [1, 2]
    packed_padded = dict(padded, position_ids=torch.tensor([[0, 1, 0, 0, 0], [0, 1, 2, 3, 4]]))
    with pytest.raises(ValueError, match="packs several"):
        PromptLengthCollator(lambda rows: packed_padded)([{}])


def test_hf_trainer_with_label_smoothing_gives_the_tree_each_rows_prompt(tokenizer, tmp_path):
    model = tiny_model(vocab_size=len(tokenizer))
    lens = prompt_lens(tokenizer)
    rows = [{"input_ids": tokenizer(p + c)["input_ids"], "context_len": int(n)}
            for p, c, n in zip(PROMPTS, COMPLETIONS, lens)]
    collator = SFTCollator(pad_token_id=tokenizer.pad_token_id)
    plain = {k: v for k, v in collator(rows).items() if k != "context_lens"}  # what a stock collator gives
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to=[],
                             save_strategy="no", use_cpu=True, label_smoothing_factor=0.1, learning_rate=1e-3,
                             remove_unused_columns=False)
    trainer = give_prompts(Trainer(model=model, args=args, train_dataset=rows, data_collator=lambda r: dict(plain)))
    assert trainer.label_smoother is not None  # the labels are popped before the forward
    batch = trainer.data_collator(rows)
    check_route(trainer, model, batch, tokenizer)
    trainer.model.train()
    assert torch.isfinite(torch.tensor(trainer.train().training_loss))


def test_training_forward_without_a_prompt_warns():
    model = tiny_model().train()
    with pytest.warns(UserWarning, match="give_prompts"):
        model(torch.ones(1, 5, dtype=torch.long))
