"""Time between tokens of running rows while a long prompt joins (`make join-latency`).

For each setting (the server's paced chunked join, and `--prefill-chunk 0`: the prompt prefilled
whole) it starts `onnx-steer serve`, runs --streams streaming chat requests that generate long
answers, and once each has produced --warm tokens sends one chat request of about --long-tokens
prompt tokens. Each stream's inter-token gaps (between SSE chunks) give the median and p99, overall
and while the long prompt joined; the long request's own latency, and whether every output equals
the same request run alone, are reported beside them.
Writes bench/results/cpu_join_latency.{json,md}.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "export"))

from onnx_steer_export.runtime_client import serving

STREAM_PROMPTS = ["Count from 1 to 400, separated by commas.", "Count from 500 to 900, separated by commas."]
LONG_TEXT = "The lighthouse keeper climbed the spiral stairs each evening to light the lamp above the rocks. "


def chat(url: str, prompt: str, max_tokens: int) -> tuple[str, int]:
    """The reply's text and the prompt's token count."""
    body: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}
    response = requests.post(f"{url}/v1/chat/completions", json=body, timeout=900)
    response.raise_for_status()
    reply = response.json()
    return reply["choices"][0]["message"]["content"], reply["usage"]["prompt_tokens"]


def stream(url: str, prompt: str, max_tokens: int, times: list[float], text: list[str],
           warm: threading.Event, warm_tokens: int) -> None:
    """Stream one chat completion, recording when each chunk arrives; sets `warm` after `warm_tokens`."""
    body: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                            "stream": True}
    with requests.post(f"{url}/v1/chat/completions", json=body, stream=True, timeout=900) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            delta = chunk["choices"][0].get("delta", {}).get("content")
            if delta is None:
                continue
            times.append(time.monotonic())
            text.append(delta)
            if len(times) == warm_tokens:
                warm.set()
    warm.set()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def measure(binary: Path, bundle: Path, extra: list[str], args: argparse.Namespace,
            long_prompt: str, solo: dict[str, str]) -> dict[str, Any]:
    with serving(binary, bundle, "--max-batch", "4", *extra, stderr=subprocess.DEVNULL) as (url, _):
        times: list[list[float]] = [[] for _ in STREAM_PROMPTS]
        texts: list[list[str]] = [[] for _ in STREAM_PROMPTS]
        warm = [threading.Event() for _ in STREAM_PROMPTS]
        threads = [threading.Thread(target=stream, args=(url, p, args.stream_tokens, t, x, w, args.warm))
                   for p, t, x, w in zip(STREAM_PROMPTS, times, texts, warm)]
        for thread in threads:
            thread.start()
        for event in warm:
            event.wait(timeout=600)
        sent = time.monotonic()
        long_text, _ = chat(url, long_prompt, args.long_new_tokens)
        joined = time.monotonic()
        for thread in threads:
            thread.join()
    gaps = [b - a for series in times for a, b in itertools.pairwise(series)]
    during = [b - a for series in times for a, b in itertools.pairwise(series) if b > sent and a < joined]
    ms = [g * 1e3 for g in gaps]
    during_ms = [g * 1e3 for g in during]
    outputs_equal = ["".join(text) == solo[prompt] for prompt, text in zip(STREAM_PROMPTS, texts)]
    outputs_equal.append(long_text == solo["long"])
    median = statistics.median(ms)
    return {
        "tokens_per_stream": [len(series) for series in times],
        "itl_median_ms": median, "itl_p99_ms": percentile(ms, 0.99), "itl_max_ms": max(ms),
        "itl_p99_over_median": percentile(ms, 0.99) / median,
        "during_join_gaps": len(during_ms),
        "during_join_median_ms": statistics.median(during_ms) if during_ms else float("nan"),
        "during_join_p99_ms": percentile(during_ms, 0.99),
        "long_request_s": joined - sent,
        "outputs_equal_alone": all(outputs_equal),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--binary", type=Path, default=REPO / "target/release/onnx-steer")
    parser.add_argument("--bundle", type=Path, default=REPO / "onnx/smollm2-135m-instruct")
    parser.add_argument("--long-tokens", type=int, default=4000, help="prompt tokens of the joining request (about)")
    parser.add_argument("--long-new-tokens", type=int, default=8)
    parser.add_argument("--stream-tokens", type=int, default=1500, help="max_tokens of the running streams")
    parser.add_argument("--warm", type=int, default=16, help="tokens each stream makes before the long prompt is sent")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/cpu_join_latency")
    args = parser.parse_args()
    words = len(LONG_TEXT.split())
    long_prompt = "Summarise this story in one sentence.\n\n" + LONG_TEXT * max(1, int(args.long_tokens / (words * 1.25)))
    with serving(args.binary, args.bundle, "--max-batch", "1", stderr=subprocess.DEVNULL) as (url, _):
        solo = {prompt: chat(url, prompt, args.stream_tokens)[0] for prompt in STREAM_PROMPTS}
        solo["long"], long_tokens = chat(url, long_prompt, args.long_new_tokens)
    settings = {"paced chunks (default)": [], "whole prompt (--prefill-chunk 0)": ["--prefill-chunk", "0"]}
    results = {name: measure(args.binary, args.bundle, extra, args, long_prompt, solo) for name, extra in settings.items()}
    report = {"long_prompt_tokens": long_tokens, "settings": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["| setting | ITL median | ITL p99 | p99 / median | while joining: median | p99 | max | long request | outputs = alone |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['itl_median_ms']:.0f} ms | {r['itl_p99_ms']:.0f} ms | {r['itl_p99_over_median']:.2f} | "
                     f"{r['during_join_median_ms']:.0f} ms | {r['during_join_p99_ms']:.0f} ms | {r['itl_max_ms']:.0f} ms | "
                     f"{r['long_request_s']:.1f} s | {'yes' if r['outputs_equal_alone'] else 'NO'} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"long prompt: {long_tokens} tokens")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
