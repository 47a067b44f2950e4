"""Tiny random-config models of other architectures, built here (never downloaded), exported and
checked segment by segment and by greedy generation through the Rust binary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, GemmaConfig, LlamaConfig, PretrainedConfig, Qwen2Config

from onnx_steer_export.export.bundle import export_bundle
from onnx_steer_export.export.parity import segment_parity
from onnx_steer_export.export.quantize import QuantizeError, quantize_bundle
from onnx_steer_export.export.source import LoadedModel, load

from conftest import hf_greedy, run_generate

SMALL: dict[str, Any] = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 512, "bos_token_id": 1, "eos_token_id": 2,
         "pad_token_id": 2,
         # Large weights make the logits peaked, so greedy choices are not decided by float noise.
         "initializer_range": 0.2}

CONFIGS: dict[str, PretrainedConfig] = {
    "qwen2": Qwen2Config(**SMALL, tie_word_embeddings=False),
    "gemma": GemmaConfig(**SMALL, head_dim=16),
    # A sliding layer with a window shorter than the test prompts and its own rotary base, then a global one.
    "gemma3_text": Gemma3TextConfig(**SMALL, head_dim=16, sliding_window=4,
                                    layer_types=["sliding_attention", "full_attention"],
                                    rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                                                     "full_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
    "llama": LlamaConfig(**SMALL, tie_word_embeddings=True),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def tiny(request: pytest.FixtureRequest, default_model: LoadedModel, tmp_path_factory: pytest.TempPathFactory):
    """(loaded HF model, bundle dir) for a tiny random model that uses the default tokenizer."""
    arch = request.param
    config = CONFIGS[arch]
    config.vocab_size = len(default_model.tokenizer)
    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(config)
    checkpoint = tmp_path_factory.mktemp(f"{arch}-hf")
    model.save_pretrained(checkpoint)
    default_model.tokenizer.save_pretrained(checkpoint)
    loaded = load(f"hf:{checkpoint}")
    bundle = tmp_path_factory.mktemp(f"{arch}-bundle")
    manifest = export_bundle(loaded, bundle)
    assert manifest["model"]["architecture"] == arch
    return loaded, bundle


def test_tiny_segments_match_hf(tiny: tuple[LoadedModel, Path]) -> None:
    loaded, bundle = tiny
    batch = loaded.tokenizer(["A tiny model says hello to the world", "Hi"], return_tensors="pt",
                             padding=True, padding_side="left")
    errors = segment_parity(bundle, loaded.model, batch["input_ids"], batch["attention_mask"])
    assert len(errors) == 5  # embed, 2 layers, norm, head
    for error in errors:
        assert error.abs < 1e-4, error


def test_tiny_greedy_generation_matches_hf(tiny: tuple[LoadedModel, Path], binary: Path) -> None:
    loaded, bundle = tiny
    for prompt in ["Once upon a time", "The weather today is", "def fibonacci(n):"]:
        records = run_generate(binary, bundle, "--greedy", "--max-new-tokens", "20", "--prompt", prompt)
        ids = loaded.tokenizer(prompt)["input_ids"]
        assert records[0]["token_ids"] == hf_greedy(loaded, ids, 20), prompt


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_tiny_quantized_bundle_runs_and_keeps_an_int8_head(tiny: tuple[LoadedModel, Path], binary: Path,
                                                          tmp_path: Path, weights: str) -> None:
    _, bundle = tiny
    out = tmp_path / f"{bundle.name}-{weights}"
    manifest = quantize_bundle(bundle, out, weights)
    assert manifest["weights"]["format"] == weights and manifest["weights"]["head"] == "int8"
    head = onnx.load(str(out / "head.onnx"))
    assert [a.i for n in head.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"] == [8]
    layer = onnx.load(str(out / "layer_00.onnx"))
    assert not [n for n in layer.graph.node if n.op_type == "MatMul" and n.input[1] in
                {i.name for i in layer.graph.initializer}], "every constant-weight MatMul is quantized"
    prompt = "Once upon a time"
    want = run_generate(binary, bundle, "--greedy", "--max-new-tokens", "8", "--prompt", prompt)[0]["token_ids"]
    got = run_generate(binary, out, "--greedy", "--max-new-tokens", "8", "--prompt", prompt)[0]["token_ids"]
    assert len(got) == len(want)
    if weights == "int8":  # random tiny models have flat logits: only the first choice is robust
        assert got[0] == want[0], "int8 weights keep the first greedy token"
    with pytest.raises(QuantizeError, match="already quantized"):
        quantize_bundle(out, tmp_path / "again", weights)
