"""Real checkpoints beyond the default, against HF transformers: Qwen2.5-Coder-0.5B-Instruct (chat
prompts) and Gemma 3 270M (a base model: raw prompts, sliding-window layers). `make test-models`
fetches and exports them into onnx/NAME first; Qwen2.5-Coder-1.5B is too big for the test budget
and has its own `make check-model MODEL=qwen2.5-1.5b-instruct` with committed figures."""

from __future__ import annotations

from pathlib import Path

import pytest

from onnx_steer_export import REPO
from onnx_steer_export.eval.model_check import (
    LOGPROB_TOLERANCE,
    PROMPTS,
    SEGMENT_TOLERANCE,
    greedy_agreement,
    logprob_error,
    segment_errors,
    uses_chat,
)
from onnx_steer_export.export.fetch import gguf_path
from onnx_steer_export.export.source import LoadedModel, load

TEST_MODELS = ["qwen2.5-0.5b-instruct", "gemma3-270m"]


@pytest.fixture(scope="module", params=TEST_MODELS)
def real_model(request: pytest.FixtureRequest) -> tuple[LoadedModel, Path]:
    """(HF model loaded from the fetched GGUF, its fp32 bundle)."""
    name = request.param
    bundle = REPO / "onnx" / name
    source = gguf_path(name)
    assert source.is_file() and (bundle / "manifest.json").is_file(), \
        f"{name} is not fetched and exported; run `make test-models`"
    return load(f"gguf:{source}"), bundle


def test_segments_match_hf(real_model: tuple[LoadedModel, Path]) -> None:
    loaded, bundle = real_model
    errors = segment_errors(loaded, bundle, uses_chat(loaded))
    assert max(errors.values()) < SEGMENT_TOLERANCE, errors


def test_greedy_generations_equal_hf_generate(real_model: tuple[LoadedModel, Path], binary: Path) -> None:
    loaded, bundle = real_model
    # Gemma 3 270M has no chat template: its prompts stay raw, and the long one passes its 512-token window.
    assert uses_chat(loaded) == (loaded.model.config.model_type == "qwen2")
    if loaded.model.config.model_type == "gemma3_text":
        assert len(loaded.tokenizer(PROMPTS[-1]).input_ids) > loaded.model.config.sliding_window
    rows = greedy_agreement(loaded, bundle, uses_chat(loaded), 24, binary)
    assert [row for row in rows if row["first_difference"] is not None] == []


def test_logprobs_match_hf(real_model: tuple[LoadedModel, Path], binary: Path) -> None:
    loaded, bundle = real_model
    assert logprob_error(loaded, bundle, uses_chat(loaded), binary) < LOGPROB_TOLERANCE
