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
