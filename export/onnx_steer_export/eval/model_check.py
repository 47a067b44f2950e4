"""Check a bundle of any checkpoint against HF transformers, and time it beside HF eager.

What a user bringing a new checkpoint wants to know before steering it, in one report:
  segments   every segment fed HF's own input (errors do not compound), max scaled error
  tokens     greedy generations of the runtime equal HF `generate`, token for token
  logprobs   the runtime's `score` log-probabilities of prompt and continuation tokens against HF's
  speed      prefill and decode tokens/s of `onnx-steer bench` and of HF eager on the same prompt ids,
             measured in the same run, as ratios
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import cast

import torch

from ..export.parity import segment_parity
from ..export.source import LoadedModel
from ..runtime_client import bench, run_binary, score
from ..train.reference import greedy, token_logprobs

PROMPTS = [
    "Write a Python function that reverses a string.",
    "What is the capital of France?",
    "Explain in one sentence why the sky is blue.",
    "Give me three tips for a job interview.",
    "Translate 'good morning' into Spanish.",
    "What is 17 times 23?",
    "Describe a cat to someone who has never seen one.",
]
# Longer than Gemma 3's 512-token sliding window and the runtime's 512-token prefill chunk, so the
# local-attention window and the chunked prefill both decide its greedy tokens. One line: the
# runtime's prompts file holds one prompt per line.
LONG_PROMPT = ("Read the inventory log, then answer the question. "
               + " ".join(f"Entry {i}: the {colour} crate on shelf {i % 9} holds {i * 7 % 50} apples."
                           for i, colour in enumerate(["red", "green", "blue", "grey", "white"] * 8, start=1))
               + " Question: how many apples does the crate of entry 3 hold? Answer:")
PROMPTS.append(LONG_PROMPT)
CONTINUATIONS = [" Sure", " I cannot help with that.", " The answer is"]
# The tolerances the default bundle meets (scaled segment error, log-probabilities).
SEGMENT_TOLERANCE = 1e-4
LOGPROB_TOLERANCE = 1e-4


@dataclass
class SpeedFigures:
    prompt_tokens: int
    new_tokens: int
    runtime_prefill_tps: float
    runtime_decode_tps: float
    hf_prefill_tps: float
    hf_decode_tps: float

    @property
    def prefill_ratio(self) -> float:
        return self.runtime_prefill_tps / self.hf_prefill_tps

    @property
    def decode_ratio(self) -> float:
        return self.runtime_decode_tps / self.hf_decode_tps


def uses_chat(loaded: LoadedModel) -> bool:
    """Chat-template the prompts when the checkpoint has a template (a base model gets raw text)."""
    return bool(getattr(loaded.tokenizer, "chat_template", None))


def prompt_ids(loaded: LoadedModel, prompt: str, chat: bool) -> list[int]:
    if chat:
        rendered = loaded.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                        add_generation_prompt=True, tokenize=True, return_dict=False)
        return list(cast(list[int], rendered))
    return list(loaded.tokenizer(prompt).input_ids)


def segment_errors(loaded: LoadedModel, bundle: Path, chat: bool) -> dict[str, float]:
    """Max scaled error per segment on one left-padded batch of four prompts."""
    rows = [prompt_ids(loaded, p, chat) for p in PROMPTS[:4]]
    width = max(map(len, rows))
    pad = loaded.tokenizer.pad_token_id or 0
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return {e.segment: e.scaled for e in segment_parity(bundle, loaded.model, input_ids, mask)}


def greedy_agreement(loaded: LoadedModel, bundle: Path, chat: bool, new_tokens: int,
                     binary: Path | None) -> list[dict]:
    """Per prompt: the runtime's and HF's greedy tokens and where they first differ (None: equal)."""
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.txt"
        prompts.write_text("\n".join(PROMPTS) + "\n")
        args = ["generate", "--bundle", str(bundle), "--greedy", "--json", "--max-new-tokens", str(new_tokens),
                "--prompts-file", str(prompts)] + (["--chat"] if chat else [])
        done = run_binary(args, binary, capture_output=True, text=True)
    records = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    rows = []
    for prompt, record in zip(PROMPTS, records, strict=True):
        expected = greedy(loaded.model, prompt_ids(loaded, prompt, chat), new_tokens, loaded.tokenizer.pad_token_id)
        got = record["token_ids"]
        first = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b),
                     None if len(got) == len(expected) else min(len(got), len(expected)))
        rows.append({"prompt": prompt, "tokens": len(expected), "first_difference": first,
                     "runtime": loaded.tokenizer.decode(got), "hf": loaded.tokenizer.decode(expected)})
    return rows


def logprob_error(loaded: LoadedModel, bundle: Path, chat: bool, binary: Path | None) -> float:
    """Worst |runtime - HF| log-probability over every prompt and continuation token."""
    items = [{"prompt": p, "continuations": CONTINUATIONS} for p in PROMPTS]
    records = score(bundle, items, chat=chat, binary=binary, echo=True)
    worst = 0.0
    for prompt, record in zip(PROMPTS, records, strict=True):
        ids = prompt_ids(loaded, prompt, chat)
        echoed = torch.tensor([p["logprob"] for p in record["prompt_logprobs"]], dtype=torch.float64)
        worst = max(worst, (echoed - token_logprobs(loaded.model, ids)).abs().max().item())
        for scored in record["continuations"]:
            reference = token_logprobs(loaded.model, ids + scored["token_ids"])[len(ids) - 1:]
            got = torch.tensor(scored["token_logprobs"], dtype=torch.float64)
            worst = max(worst, (got - reference).abs().max().item())
    return worst


def hf_eager_speed(loaded: LoadedModel, ids: list[int], new_tokens: int, repeats: int) -> tuple[float, float]:
    """Best-of-`repeats` prefill and decode tokens/s of HF eager with its KV cache, greedy."""
    best_prefill, best_decode = float("inf"), float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            started = time.perf_counter()
            out = loaded.model(torch.tensor([ids]), use_cache=True)
            prefill = time.perf_counter() - started
            past, token = out.past_key_values, out.logits[0, -1].argmax()
            started = time.perf_counter()
            for _ in range(new_tokens - 1):
                out = loaded.model(token.view(1, 1), past_key_values=past, use_cache=True)
                past, token = out.past_key_values, out.logits[0, -1].argmax()
            best_prefill, best_decode = min(best_prefill, prefill), min(best_decode, time.perf_counter() - started)
    return len(ids) / best_prefill, (new_tokens - 1) / best_decode


def speed(loaded: LoadedModel, bundle: Path, prompt_tokens: int, new_tokens: int, repeats: int,
          binary: Path | None) -> SpeedFigures:
    report = bench(bundle, "--prompt-tokens", str(prompt_tokens), "--new-tokens", str(new_tokens), "--repeats",
                   str(repeats), "--no-monolithic", binary=binary)
    workload = report["workloads"][0]
    variant = next(v for v in workload["variants"] if v["variant"] == "segmented")
    hf_prefill, hf_decode = hf_eager_speed(loaded, workload["prompt_ids"], new_tokens, repeats)
    return SpeedFigures(prompt_tokens, new_tokens, variant["prefill_tokens_per_s"]["max"],
                        variant["decode_tokens_per_s"]["max"], hf_prefill, hf_decode)


def check_model(loaded: LoadedModel, bundle: Path, binary: Path | None = None, new_tokens: int = 32,
                speed_prompt_tokens: int = 128, repeats: int = 3) -> dict:
    """Every check of the module docstring for `bundle`, exported from `loaded`; the report as a dict."""
    chat = uses_chat(loaded)
    segments = segment_errors(loaded, bundle, chat)
    tokens = greedy_agreement(loaded, bundle, chat, new_tokens, binary)
    worst_logprob = logprob_error(loaded, bundle, chat, binary)
    figures = speed(loaded, bundle, speed_prompt_tokens, new_tokens, repeats, binary)
    manifest = json.loads((Path(bundle) / "manifest.json").read_text())
    return {
        "bundle": str(bundle),
        "source": loaded.source,
        "model": manifest["model"],
        "dtype": manifest["dtype"],
        "chat": chat,
        "segments": segments,
        "worst_segment_error": max(segments.values()),
        "greedy": tokens,
        "greedy_equal": sum(row["first_difference"] is None for row in tokens),
        "worst_logprob_error": worst_logprob,
        "speed": {**asdict(figures), "prefill_ratio": figures.prefill_ratio, "decode_ratio": figures.decode_ratio},
    }


def passed(report: dict) -> bool:
    return (report["worst_segment_error"] < SEGMENT_TOLERANCE and report["greedy_equal"] == len(report["greedy"])
            and report["worst_logprob_error"] < LOGPROB_TOLERANCE)


def shortened(prompt: str, width: int = 60) -> str:
    """A table cell for a prompt: long ones cut to their start and their length in characters."""
    return prompt if len(prompt) <= width else f"{prompt[:width]}… ({len(prompt):,} characters)"


def markdown(report: dict) -> str:
    model, figures = report["model"], report["speed"]
    greedy_rows = "\n".join(
        f"| {shortened(row['prompt'])} | {row['tokens']} | {'equal' if row['first_difference'] is None else row['first_difference']} |"
        for row in report["greedy"])
    lines = [
        f"# {Path(report['bundle']).name}: HF parity and speed",
        "",
        (f"{model['architecture']}, {model['num_layers']} layers, d={model['hidden_size']}, {report['dtype']}; "
        f"source `{report['source']}`; prompts {'chat-templated' if report['chat'] else 'raw (no chat template)'}."),
        "Written by `make check-model` (`python -m onnx_steer_export check-model`).",
        "",
        "| check | figure | tolerance |",
        "| --- | --- | --- |",
        f"| worst segment error (scaled, HF input per segment) | {report['worst_segment_error']:.2e} | {SEGMENT_TOLERANCE:g} |",
        f"| greedy generations equal to HF `generate` | {report['greedy_equal']} / {len(report['greedy'])} | all |",
        f"| worst log-probability error, `score` vs HF | {report['worst_logprob_error']:.2e} | {LOGPROB_TOLERANCE:g} |",
        "",
        (f"Speed, batch 1, {figures['prompt_tokens']}-token prompt, {figures['new_tokens']} new tokens, "
        "best of the repeats, same run:"),
        "",
        "| runtime | prefill tok/s | decode tok/s |",
        "| --- | --- | --- |",
        f"| onnx-steer (segmented) | {figures['runtime_prefill_tps']:.1f} | {figures['runtime_decode_tps']:.2f} |",
        f"| HF transformers eager | {figures['hf_prefill_tps']:.1f} | {figures['hf_decode_tps']:.2f} |",
        f"| ratio | {figures['prefill_ratio']:.2f}x | {figures['decode_ratio']:.2f}x |",
        "",
        "| prompt | greedy tokens | first difference |",
        "| --- | --- | --- |",
        greedy_rows,
        "",
    ]
    return "\n".join(lines)
