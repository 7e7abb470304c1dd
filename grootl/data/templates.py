"""Prompt templates for Alpaca-format records (``instruction``, ``input``, ``output``).

A template turns a record into the *prompt* (the context, no loss); the *response* is always
``output`` followed by the tokenizer's EOS token, appended right after the prompt with no separator
(as the published GrootL code does). Templates by name:

``grootl`` (default; the published GrootL code's prompts, arXiv 2406.02395)::

    ### Instruction:\\n{instruction}\\n\\n### Response:
    ### Instruction:\\n{instruction}\\n\\n### Input:\\n{input}\\n\\n### Response:   (when input is non-empty)

``grootl-inline``: the same without the input block, the input on the line after the instruction::

    ### Instruction:\\n{instruction}\\n{input}\\n\\n### Response:

``alpaca``: the original Stanford Alpaca template, with its one-sentence preamble.

``plain``: ``{instruction}\\n{input}\\n`` (input line only when non-empty).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PromptTemplate:
    """A prompt format with and without an ``input`` field (str.format with instruction/input)."""

    with_input: str
    without_input: str

    def format(self, instruction: str, input: str = "") -> str:
        if input.strip():
            return self.with_input.format(instruction=instruction, input=input)
        return self.without_input.format(instruction=instruction)


_ALPACA_PREAMBLE = "Below is an instruction that describes a task{}. Write a response that appropriately completes the request.\n\n"

TEMPLATES: dict[str, PromptTemplate] = {
    "grootl": PromptTemplate(
        with_input="### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:",
        without_input="### Instruction:\n{instruction}\n\n### Response:",
    ),
    "grootl-inline": PromptTemplate(
        with_input="### Instruction:\n{instruction}\n{input}\n\n### Response:",
        without_input="### Instruction:\n{instruction}\n\n### Response:",
    ),
    "alpaca": PromptTemplate(
        with_input=_ALPACA_PREAMBLE.format(", paired with an input that provides further context")
        + "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        without_input=_ALPACA_PREAMBLE.format("") + "### Instruction:\n{instruction}\n\n### Response:\n",
    ),
    "plain": PromptTemplate(with_input="{instruction}\n{input}\n", without_input="{instruction}\n"),
}


def get_template(name: str) -> PromptTemplate:
    """The template called ``name``; unknown names list the known ones."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown prompt template {name!r}; known: {sorted(TEMPLATES)}") from None
