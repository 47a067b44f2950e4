"""The default bundle (SmolLM2-135M-Instruct, fp32) against HF transformers."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import pytest

from onnx_steer_export.export.parity import segment_parity
from onnx_steer_export.export.source import LoadedModel

from conftest import hf_greedy, run_generate

TOLERANCE = 1e-4

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain photosynthesis to a ten-year-old.",
    "List three prime numbers greater than 50.",
    "How do I reverse a list in Python?",
    "Translate 'good morning' into Spanish and German.",
    "Why is the sky blue?",
    "Give me a short motivational quote for Monday.",
]


def test_every_segment_matches_hf_hidden_states(bundle_dir: Path, default_model: LoadedModel) -> None:
    tokenizer = default_model.tokenizer
    batch = tokenizer(["The quick brown fox jumps over the lazy dog.", "Hello there"],
                      return_tensors="pt", padding=True, padding_side="left")
    errors = segment_parity(bundle_dir, default_model.model, batch["input_ids"], batch["attention_mask"])
    assert len(errors) == 33  # embed + 30 layers + norm + head
    worst = max(errors, key=lambda e: e.scaled)
    for error in errors:
        print(f"{error.segment}: abs {error.abs:.2e} scaled {error.scaled:.2e}")
    assert worst.scaled < TOLERANCE, worst
    # Where activations are of ordinary size (embed, head logits), the plain max abs holds too.
    assert errors[0].abs < TOLERANCE and errors[-1].abs < TOLERANCE


def test_greedy_chat_generation_matches_hf_generate(binary: Path, bundle_dir: Path,
                                                    default_model: LoadedModel, tmp_path: Path) -> None:
    tokenizer = default_model.tokenizer
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(CHAT_PROMPTS) + "\n")
    batched = run_generate(binary, bundle_dir, "--chat", "--greedy", "--max-new-tokens", "48",
                           "--prompts-file", str(prompts_file))
    assert [r["prompt"] for r in batched] == CHAT_PROMPTS
    for prompt, record in zip(CHAT_PROMPTS, batched):
        input_ids = cast(list[int], tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                                  add_generation_prompt=True, tokenize=True,
                                                                  return_dict=False))
        expected = hf_greedy(default_model, list(input_ids), 48)
        assert record["prompt_tokens"] == len(input_ids), prompt
        assert record["token_ids"] == expected, prompt
        assert record["text"].strip(), prompt


@pytest.mark.parametrize("prompt", CHAT_PROMPTS[:3])
def test_batch_rows_equal_single_prompt_runs(binary: Path, bundle_dir: Path, tmp_path: Path, prompt: str) -> None:
    """Rows of different lengths in one left-padded batch give what each prompt gives alone."""
    prompts = [prompt, "Hi", "Describe, in two sentences, how a bicycle gear system makes climbing hills easier."]
    prompts_file = tmp_path / "batch.txt"
    prompts_file.write_text("\n".join(prompts))
    batched = run_generate(binary, bundle_dir, "--chat", "--max-new-tokens", "24", "--prompts-file", str(prompts_file))
    lengths = {r["prompt_tokens"] for r in batched}
    assert len(lengths) == 3, "the batch must mix prompt lengths"
    for text, record in zip(prompts, batched):
        alone = run_generate(binary, bundle_dir, "--chat", "--max-new-tokens", "24", "--prompt", text)[0]
        assert record["token_ids"] == alone["token_ids"], text


def test_layer_graphs_append_to_their_kv_buffer_in_place(bundle_dir: Path) -> None:
    """Each layer's past_key/past_value feed only GroupQueryAttention, which returns them as the
    presents: no Concat of past and new. Bound to one buffer, a prefill then a decode step write it
    in place and give what the same steps give with separate past and present buffers."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    for index in range(30):
        graph = onnx.load(str(bundle_dir / f"layer_{index:02d}.onnx"), load_external_data=False).graph
        readers = {name: [n.op_type for n in graph.node if name in n.input] for name in ("past_key", "past_value")}
        assert readers == {"past_key": ["GroupQueryAttention"], "past_value": ["GroupQueryAttention"]}, index
        producers = [n.op_type for n in graph.node if "present_key" in n.output or "present_value" in n.output]
        assert producers == ["GroupQueryAttention"], index

    session = ort.InferenceSession(str(bundle_dir / "layer_00.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    capacity, heads, head_dim, width = 16, 3, 64, 576
    buffers = [np.zeros((1, heads, capacity, head_dim), np.float32) for _ in range(2)]
    separate = [np.zeros((1, heads, capacity, head_dim), np.float32) for _ in range(2)]
    past = 0
    for tokens in (5, 1, 1):
        total = past + tokens
        feeds = {"hidden_in": rng.standard_normal((1, tokens, width)).astype(np.float32),
                 "attention_bias": np.where(np.arange(total)[None, :] <= np.arange(past, total)[:, None], 0.0,
                                            np.finfo(np.float32).min).astype(np.float32)[None, None],
                 "cos": np.ones((1, tokens, head_dim), np.float32), "sin": np.zeros((1, tokens, head_dim), np.float32),
                 "seqlens_k": np.array([total - 1], np.int32), "total_sequence_length": np.array(total, np.int32),
                 "steer_delta": np.zeros((1, 1, width), np.float32)}
        binding = session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for name, buffer in zip(("key", "value"), buffers):
            binding.bind_ortvalue_input(f"past_{name}", ort.OrtValue.ortvalue_from_numpy(buffer))
            binding.bind_ortvalue_output(f"present_{name}", ort.OrtValue.ortvalue_from_numpy(buffer))
        binding.bind_output("hidden_out")
        session.run_with_iobinding(binding)
        in_place = binding.get_outputs()[-1].numpy()
        reference, *separate = session.run(None, {**feeds, "past_key": separate[0], "past_value": separate[1]})
        np.testing.assert_allclose(in_place, reference, rtol=1e-6, atol=1e-6)
        for buffer, present in zip(buffers, separate):
            np.testing.assert_array_equal(buffer, present)
        assert np.abs(buffers[0][:, :, :total]).max() > 0 and not buffers[0][:, :, total:].any()
        past = total
