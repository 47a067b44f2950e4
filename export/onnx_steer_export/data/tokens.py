"""Token ids exactly as the runtime makes them: the bundle's own tokenizer and chat template, the text
as is, no extra special tokens."""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

from transformers import PreTrainedTokenizerFast


def bundle_tokenizer(bundle: Path) -> PreTrainedTokenizerFast:
    """The bundle's own tokenizer and chat template, as an HF tokenizer."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    files = manifest["tokenizer"]
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(bundle / files["file"]),
                                        bos_token=files.get("bos_token"), eos_token=files.get("eos_token"))
    if files.get("chat_template"):
        tokenizer.chat_template = (bundle / files["chat_template"]).read_text()
    return tokenizer


def chat_prefix(tokenizer: PreTrainedTokenizerFast, prompt: str, chat: bool) -> str:
    if not chat:
        return prompt
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)
    return cast(str, text)


def encode(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    """Token ids as the runtime makes them: the text as is, no extra special tokens."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def chat_ids(tokenizer: PreTrainedTokenizerFast, prompt: str) -> list[int]:
    """A user prompt in the chat template, tokenized as `onnx-steer generate --chat` does."""
    return encode(tokenizer, chat_prefix(tokenizer, prompt, True))
