"""Contrastive pairs, tokenized as the runtime sees them.

Pairs JSONL, one object per line, either
  {"prompt": P, "positive": A, "negative": B}       completion contrast: chat(P)+A vs chat(P)+B
  {"positive_prompt": P1, "negative_prompt": P2}    prompt contrast: chat(P1) vs chat(P2)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .datasets import numbered_records
from .tokens import chat_prefix, encode

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast


class PairsError(ValueError):
    """The pairs file is unusable."""


@dataclass
class Pair:
    positive: list[int]
    negative: list[int]
    # "completion": one prompt, two completions; "prompt": two prompts (the sides differ in context).
    contrast: str = "completion"


def load_pairs(path: Path, tokenizer: PreTrainedTokenizerFast, chat: bool = True) -> list[Pair]:
    """Tokenize every pair exactly as the runtime sees it (template text, no extra special tokens)."""
    pairs = []
    for number, record in numbered_records(path, path.read_text(), PairsError):
        if {"prompt", "positive", "negative"} <= record.keys():
            prefix = chat_prefix(tokenizer, record["prompt"], chat)
            pairs.append(Pair(encode(tokenizer, prefix + record["positive"]),
                              encode(tokenizer, prefix + record["negative"])))
        elif {"positive_prompt", "negative_prompt"} <= record.keys():
            pairs.append(Pair(encode(tokenizer, chat_prefix(tokenizer, record["positive_prompt"], chat)),
                              encode(tokenizer, chat_prefix(tokenizer, record["negative_prompt"], chat)), "prompt"))
        else:
            raise PairsError(f"{path}:{number}: needs prompt/positive/negative or positive_prompt/negative_prompt")
    if not pairs:
        raise PairsError(f"{path} has no pairs")
    return pairs
