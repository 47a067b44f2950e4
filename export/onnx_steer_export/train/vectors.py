"""Static steering vectors (mean difference / PCA) from contrastive pairs.

Hidden states come from the bundle itself through `onnx-steer capture`, so a vector is trained
on exactly the activations the runtime will steer. Layer L is the output of decoder block L.

Pairs JSONL, one object per line, either
  {"prompt": P, "positive": A, "negative": B}       completion contrast: chat(P)+A vs chat(P)+B
  {"positive_prompt": P1, "negative_prompt": P2}    prompt contrast: chat(P1) vs chat(P2)
The state read is each sequence's last token.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file
from transformers import PreTrainedTokenizerFast

from . import REPO



class PairsError(ValueError):
    """The pairs file is unusable."""


@dataclass
class Pair:
    positive: list[int]
    negative: list[int]
    # "completion": one prompt, two completions; "prompt": two prompts (the sides differ in context).
    contrast: str = "completion"


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
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)


def encode(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    """Token ids as the runtime makes them: the text as is, no extra special tokens."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def chat_ids(tokenizer: PreTrainedTokenizerFast, prompt: str) -> list[int]:
    """A user prompt in the chat template, tokenized as `onnx-steer generate --chat` does."""
    return encode(tokenizer, chat_prefix(tokenizer, prompt, True))


def load_pairs(path: Path, tokenizer: PreTrainedTokenizerFast, chat: bool = True) -> list[Pair]:
    """Tokenize every pair exactly as the runtime sees it (template text, no extra special tokens)."""
    pairs = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise PairsError(f"{path}:{number}: not JSON ({err})") from err
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


def parse_layers(text: str) -> list[int]:
    if "-" in text:
        first, last = (int(x) for x in text.split("-", 1))
        return list(range(first, last + 1))
    return [int(x) for x in text.split(",")]


def find_binary() -> Path:
    path = Path(os.environ.get("ONNX_STEER_BIN", REPO / "target" / "release" / "onnx-steer"))
    if not path.is_file():
        raise FileNotFoundError(f"onnx-steer binary not found at {path}; run `make build` or set ONNX_STEER_BIN")
    return path


def capture(bundle: Path, sequences: list[list[int]], layers: list[int], tokens: str = "last",
            binary: Path | None = None) -> dict[int, np.ndarray]:
    """States read through the runtime (`onnx-steer capture`): per layer, [N, d] for each sequence's
    last token (`tokens="last"`) or [sum of lengths, d] for every token, sequence after sequence (`"all"`)."""
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"input_ids": ids}) + "\n" for ids in sequences))
        out = Path(tmp) / "acts.safetensors"
        subprocess.run([str(binary or find_binary()), "capture", "--bundle", str(bundle), "--prompts-file",
                        str(prompts), "--layers", ",".join(map(str, layers)), "--tokens", tokens,
                        "--out", str(out)], check=True)
        tensors = load_file(str(out))
    return {layer: tensors[f"layer.{layer}"] for layer in layers}


def capture_last_token(bundle: Path, sequences: list[list[int]], layers: list[int],
                       binary: Path | None = None) -> dict[int, np.ndarray]:
    """Last-token states [N, d] per layer, read through the runtime."""
    return capture(bundle, sequences, layers, "last", binary)


def direction(positive: np.ndarray, negative: np.ndarray, method: str) -> np.ndarray:
    """Mean difference, or the first principal component of the differences with positives projecting higher."""
    if method == "mean":
        return (positive.mean(0) - negative.mean(0)).astype(np.float32)
    if method == "pca":
        diffs = positive - negative
        _, _, vt = np.linalg.svd(diffs - diffs.mean(0), full_matrices=False)
        component = vt[0]
        if (positive @ component).mean() < (negative @ component).mean():
            component = -component
        return component.astype(np.float32)
    raise ValueError(f"method must be mean or pca, got {method!r}")


def train_vector(bundle: Path, pairs_path: Path, method: str, layers: list[int], out: Path,
                 chat: bool = True, binary: Path | None = None) -> dict[int, np.ndarray]:
    """Compute one direction per layer and write `direction.{L}` tensors to `out` (safetensors)."""
    pairs = load_pairs(pairs_path, bundle_tokenizer(bundle), chat)
    states = capture_last_token(bundle, [p.positive for p in pairs] + [p.negative for p in pairs], layers, binary)
    n = len(pairs)
    vectors = {layer: direction(states[layer][:n], states[layer][n:], method) for layer in layers}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({f"direction.{layer}": v for layer, v in vectors.items()}, str(out),
              metadata={"method": method, "pairs": str(n), "bundle": bundle.name})
    return vectors
