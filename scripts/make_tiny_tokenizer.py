"""Train the tiny byte-level BPE tokenizer shipped in tests/assets/tokenizer/ (no download needed).

It mirrors GPT-NeoX's tokenizer (byte-level BPE, "<|endoftext|>" = id 0, "<|padding|>" = id 1) at a
vocabulary of 512, trained on the Alpaca-format sample tests/assets/alpaca_tiny.jsonl.

    python scripts/make_tiny_tokenizer.py [--data FILE] [--out DIR] [--vocab-size 512]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

REPO = Path(__file__).resolve().parents[1]
EOS, PAD = "<|endoftext|>", "<|padding|>"


def record_texts(path: Path):
    """Every instruction, input and output string in an Alpaca-format JSONL file."""
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                yield from (record[key] for key in ("instruction", "input", "output") if record.get(key))


def train_tokenizer(texts, vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO / "tests/assets/alpaca_tiny.jsonl")
    parser.add_argument("--out", type=Path, default=REPO / "tests/assets/tokenizer")
    parser.add_argument("--vocab-size", type=int, default=512)
    args = parser.parse_args()

    tokenizer = train_tokenizer(list(record_texts(args.data)), args.vocab_size)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=PAD
    )
    fast.model_max_length = 2048
    args.out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(args.out)
    # transformers 5 writes its own class name and folds the special tokens into tokenizer_config.json;
    # name the portable class and write special_tokens_map.json so older readers load the dir too.
    config_path = args.out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    special = {"bos_token": EOS, "eos_token": EOS, "unk_token": EOS, "pad_token": PAD}
    (args.out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    print(f"wrote {args.out} (vocab {fast.vocab_size})")


if __name__ == "__main__":
    main()
