"""Static steering vectors: training matches HF hidden states, steered generation matches HF with a
forward hook, and GGUF control vectors in repeng's layout interoperate exactly."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import cast

import gguf
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from onnx_steer_export.__main__ import main
from onnx_steer_export.data.pairs import load_pairs
from onnx_steer_export.data.tokens import bundle_tokenizer
from onnx_steer_export.export.source import LoadedModel
from onnx_steer_export.train.vectors import direction, train_vector

from conftest import REPO, hf_greedy, run_generate

PAIRS = REPO / "data" / "sentiment_pairs_small.jsonl"
LAYERS = [6, 12, 20]


@pytest.fixture(scope="module")
def trained(bundle_dir: Path, binary: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("vectors") / "sentiment_mean.safetensors"
    vectors = train_vector(bundle_dir, PAIRS, "mean", LAYERS, out, binary=binary)
    return out, vectors


def hf_last_token_states(model: LoadedModel, sequences: list[list[int]], layer: int) -> np.ndarray:
    states = []
    with torch.no_grad():
        for ids in sequences:
            out = model.model(torch.tensor([ids]), output_hidden_states=True)
            states.append(out.hidden_states[layer + 1][0, -1].numpy())
    return np.stack(states)


@pytest.mark.parametrize("method", ["mean", "pca"])
def test_trained_vectors_equal_hf_computed(method: str, bundle_dir: Path, binary: Path, default_model: LoadedModel,
                                           tmp_path: Path, trained: tuple[Path, dict]) -> None:
    if method == "mean":
        vectors = trained[1]
    else:
        vectors = train_vector(bundle_dir, PAIRS, method, LAYERS, tmp_path / "pca.safetensors", binary=binary)
    pairs = load_pairs(PAIRS, bundle_tokenizer(bundle_dir))
    for layer in LAYERS:
        # Layer 20 is not the last: hidden_states[L+1] is pre-norm there.
        pos = hf_last_token_states(default_model, [p.positive for p in pairs], layer)
        neg = hf_last_token_states(default_model, [p.negative for p in pairs], layer)
        expected = direction(pos, neg, method)
        error = np.abs(vectors[layer] - expected).max()
        print(f"{method} layer {layer}: max abs {error:.2e}, |v| {np.linalg.norm(expected):.2f}")
        assert error < 1e-4, (method, layer, error)


def write_repeng_gguf(path: Path, directions: dict[int, np.ndarray]) -> None:
    """What repeng's ControlVector.export_gguf writes."""
    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", "llama")
    writer.add_uint32("controlvector.layer_count", len(directions))
    for layer, vector in directions.items():
        writer.add_tensor(f"direction.{layer}", vector.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_control_vectors_round_trip_exactly(binary: Path, tmp_path: Path, trained: tuple[Path, dict]) -> None:
    directions = trained[1]
    repeng = tmp_path / "repeng.gguf"
    write_repeng_gguf(repeng, directions)
    as_st = tmp_path / "from_gguf.safetensors"
    back = tmp_path / "back.gguf"
    for src, dst in [(repeng, as_st), (as_st, back)]:
        subprocess.run([str(binary), "vector", "convert", str(src), str(dst)], check=True)
    loaded = load_file(str(as_st))
    reader = gguf.GGUFReader(str(back))
    assert reader.fields["general.architecture"].contents() == "controlvector"
    rewritten = {t.name: np.array(t.data) for t in reader.tensors}
    for layer, vector in directions.items():
        assert np.array_equal(loaded[f"direction.{layer}"], vector)
        assert np.array_equal(rewritten[f"direction.{layer}"], vector)


def hf_steered_greedy(model: LoadedModel, ids: list[int], layer: int, delta: np.ndarray, tokens: int) -> list[int]:
    """repeng-style steering in HF: a forward hook adds the delta to decoder block `layer`'s output."""
    added = torch.from_numpy(delta)
    hook = model.model.model.layers[layer].register_forward_hook(lambda _m, _i, out: out + added)
    try:
        return hf_greedy(model, ids, tokens)
    finally:
        hook.remove()


def test_steered_generation_matches_hf_hook(binary: Path, bundle_dir: Path, default_model: LoadedModel,
                                            tmp_path: Path, trained: tuple[Path, dict]) -> None:
    vector_file, directions = trained
    layer, scale = 12, -4.0
    gguf_file = tmp_path / "sentiment.gguf"
    write_repeng_gguf(gguf_file, {layer: directions[layer]})
    cases = [
        ("Describe your favourite city in two sentences.", vector_file),
        ("How was your day at school?", vector_file),
        ("Write one sentence about the ocean.", vector_file),
        ("What do you think about rainy weekends?", gguf_file),
    ]
    tokenizer = default_model.tokenizer
    changed = 0
    for prompt, path in cases:
        spec = tmp_path / f"spec_{path.suffix[1:]}.json"
        spec.write_text(json.dumps({"interventions": [
            {"kind": "vector", "path": str(path), "scale": scale, "layers": [layer]}]}))
        record = run_generate(binary, bundle_dir, "--chat", "--max-new-tokens", "48", "--steer", str(spec),
                              "--prompt", prompt)[0]
        ids = cast(list[int], tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                            add_generation_prompt=True, tokenize=True,
                                                            return_dict=False))
        expected = hf_steered_greedy(default_model, list(ids), layer, scale * directions[layer], 48)
        assert record["token_ids"] == expected, prompt
        changed += record["token_ids"] != hf_greedy(default_model, list(ids), 48)
    assert changed >= 3, "a scale of -4 at layer 12 should change most generations"


def test_mixed_specs_in_one_batch(binary: Path, bundle_dir: Path, tmp_path: Path, trained: tuple[Path, dict]) -> None:
    """--steer-per-line: a steered row and an unsteered row in one batch each equal their single runs."""
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"interventions": [
        {"kind": "vector", "path": str(trained[0]), "scale": -4.0, "layers": [12]}]}))
    prompt = "Describe your favourite city in two sentences."
    lines = tmp_path / "lines.txt"
    lines.write_text(f"{prompt}\t{spec}\n{prompt}\n")
    batch = run_generate(binary, bundle_dir, "--chat", "--max-new-tokens", "24", "--steer-per-line",
                         "--prompts-file", str(lines))
    steered = run_generate(binary, bundle_dir, "--chat", "--max-new-tokens", "24", "--steer", str(spec),
                           "--prompt", prompt)[0]
    plain = run_generate(binary, bundle_dir, "--chat", "--max-new-tokens", "24", "--prompt", prompt)[0]
    assert batch[0]["token_ids"] == steered["token_ids"]
    assert batch[1]["token_ids"] == plain["token_ids"]
    assert steered["token_ids"] != plain["token_ids"]


def test_prompt_contrast_pairs_tokenize_like_the_chat_runtime(bundle_dir: Path, tmp_path: Path) -> None:
    pairs_file = tmp_path / "pairs.jsonl"
    pairs_file.write_text(json.dumps({"positive_prompt": "Be cheerful.", "negative_prompt": "Be gloomy."}) + "\n")
    tokenizer = bundle_tokenizer(bundle_dir)
    (pair,) = load_pairs(pairs_file, tokenizer)
    expected = tokenizer.apply_chat_template([{"role": "user", "content": "Be cheerful."}],
                                             add_generation_prompt=True, tokenize=True, return_dict=False)
    assert pair.positive == list(expected)
    assert pair.negative != pair.positive


def test_capture_all_tokens_agrees_with_last_token(binary: Path, bundle_dir: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello there\nA somewhat longer prompt about the sea\n")
    outputs = {}
    for mode in ("last", "all"):
        out = tmp_path / f"{mode}.safetensors"
        subprocess.run([str(binary), "capture", "--bundle", str(bundle_dir), "--prompts-file", str(prompts),
                        "--layers", "3,7", "--tokens", mode, "--out", str(out)], check=True)
        outputs[mode] = load_file(str(out))
    lengths = outputs["all"]["lengths"].astype(int)
    assert outputs["all"]["layer.7"].shape == (lengths.sum(), 576)
    ends = np.cumsum(lengths) - 1
    for layer in ("layer.3", "layer.7"):
        np.testing.assert_allclose(outputs["all"][layer][ends], outputs["last"][layer], atol=1e-4)


def test_capture_batches_by_length_and_keeps_the_prompts_order(binary: Path, bundle_dir: Path, tmp_path: Path,
                                                               default_model: LoadedModel) -> None:
    """Prompts of mixed lengths, 2 per batch (formed from the length order), stopping after layer 5: each
    prompt's states are HF's, in the file's order, for the last token and for every token."""
    texts = ["A much longer prompt about the sea, the wind and the ships that sail on both of them",
             "Hi", "A prompt of middling length here", "Short one"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(texts) + "\n")
    tokenizer = bundle_tokenizer(bundle_dir)
    for mode in ("last", "all"):
        out = tmp_path / f"{mode}.safetensors"
        subprocess.run([str(binary), "capture", "--bundle", str(bundle_dir), "--prompts-file", str(prompts),
                        "--layers", "5,2", "--tokens", mode, "--batch-size", "2", "--out", str(out)], check=True)
        captured = load_file(str(out))
        start = 0
        for text in texts:
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            with torch.no_grad():
                states = default_model.model(ids, output_hidden_states=True).hidden_states
            for layer in (2, 5):
                expected = states[layer + 1][0].numpy()
                rows = captured[f"layer.{layer}"][start:start + len(expected)] if mode == "all" else \
                    captured[f"layer.{layer}"][texts.index(text)][None]
                np.testing.assert_allclose(rows, expected if mode == "all" else expected[-1:], atol=1e-4, rtol=1e-5,
                                           err_msg=f"{mode} {text!r} layer {layer}")
            start += ids.shape[1]


def test_compose_specs_sets_a_validation_scale_in_place(tmp_path: Path) -> None:
    """`compose-specs SPEC --scale S --out SPEC` rescales a spec where it lies (AutoSteer's strength too)."""
    vector = tmp_path / "refusal.json"
    vector.write_text(json.dumps({"interventions": [
        {"kind": "vector", "path": "refusal.safetensors", "scale": 1.0, "layers": [12]}]}))
    gate = tmp_path / "autosteer.json"
    gate.write_text(json.dumps({"interventions": [{"kind": "autosteer", "prober": "p.onnx", "strength": 1.0}]}))
    assert main(["compose-specs", str(vector), str(gate), "--scale", "0.25", "--out", str(vector)]) == 0
    interventions = json.loads(vector.read_text())["interventions"]
    assert [i.get("scale", i.get("strength")) for i in interventions] == [0.25, 0.25]
    assert interventions[0]["path"] == "refusal.safetensors", "paths stay relative to the spec's folder"
    assert "scale" not in interventions[1]
