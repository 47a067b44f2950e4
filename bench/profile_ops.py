"""Where a decode step's time goes, by ONNX operator, for each bundle (`make profile`).

Runs the bundle's segment chain the way the Rust runtime does (embed → positions → every layer →
norm → head, greedy, KV cache carried between steps) through onnxruntime's Python API with its
profiler on, prefills a 128-token prompt and decodes 64 tokens, then sums kernel time per operator
type over the decode steps. Writes bench/results/cpu_op_profile.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort

REPO = Path(__file__).resolve().parents[1]


def session(path: Path, profile_dir: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(profile_dir / path.stem)
    options.intra_op_num_threads = threads
    # One pool per session here (the Rust runtime shares one): idle pools must sleep, not spin.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class Chain:
    """The segment chain of one bundle, one profiled session per segment."""

    def __init__(self, bundle: Path, profile_dir: Path, threads: int) -> None:
        manifest = json.loads((bundle / "manifest.json").read_text())
        self.config = manifest["model"]
        self.float = np.float16 if manifest["dtype"] == "fp16" else np.float32
        segments = {s["kind"]: s["file"] for s in manifest["segments"] if s["kind"] != "layer"}
        layers = sorted((s for s in manifest["segments"] if s["kind"] == "layer"), key=lambda s: s["index"])
        self.sessions = {kind: session(bundle / file, profile_dir, threads) for kind, file in segments.items()}
        self.layers = [session(bundle / s["file"], profile_dir, threads) for s in layers]

    def step(self, ids: list[int], past: list[tuple[np.ndarray, np.ndarray]], start: int) -> int:
        """Run `ids` at positions start… and return the greedy next id; `past` is updated in place."""
        count = len(ids)
        (hidden,) = self.sessions["embed"].run(None, {"input_ids": np.array([ids], dtype=np.int64)})
        bias, cos, sin = self.sessions["positions"].run(None, {
            "position_ids": np.arange(start, start + count, dtype=np.int64)[None],
            "attention_mask": np.ones((1, start + count), dtype=np.int64)})
        delta = np.zeros((1, 1, self.config["hidden_size"]), dtype=self.float)
        lengths = {"seqlens_k": np.array([start + count - 1], np.int32),
                   "total_sequence_length": np.array(start + count, np.int32)}
        for index, layer in enumerate(self.layers):
            key, value = past[index]
            hidden, key, value = layer.run(None, {
                "hidden_in": hidden, "attention_bias": bias, "cos": cos, "sin": sin,
                "past_key": key, "past_value": value, **lengths, "steer_delta": delta})
            past[index] = (key, value)
        (normed,) = self.sessions["norm"].run(None, {"hidden_in": hidden})
        (logits,) = self.sessions["head"].run(None, {"normed": normed})
        return int(np.argmax(logits[0]))

    def generate(self, prompt: list[int], new_tokens: int) -> int:
        """Prefill and decode; returns the count of kernel events before decoding began (per session)."""
        # KV buffers of the final length: GroupQueryAttention writes each step at its positions.
        shape = (1, self.config["num_key_value_heads"], len(prompt) + new_tokens, self.config["head_dim"])
        past = [(np.zeros(shape, self.float), np.zeros(shape, self.float)) for _ in self.layers]
        token = self.step(prompt, past, 0)
        for step in range(new_tokens - 1):
            token = self.step([token], past, len(prompt) + step)
        return token

    def end(self) -> list[Path]:
        return [Path(s.end_profiling()) for s in [*self.sessions.values(), *self.layers]]


def decode_op_times(profiles: list[Path]) -> tuple[dict[str, float], int]:
    """Kernel microseconds per operator type over every run but the first (the prefill) of each
    session, and the number of decode runs."""
    totals: dict[str, float] = defaultdict(float)
    runs = 0
    for path in profiles:
        events = json.loads(path.read_text())
        run_starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
        if len(run_starts) < 2:
            continue
        decode_from = run_starts[1]
        runs = max(runs, len(run_starts) - 1)
        for event in events:
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] >= decode_from:
                totals[event["args"]["op_name"]] += event["dur"]
    return dict(totals), runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, action="append", help="bundle dirs (repeatable)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/cpu_op_profile")
    args = parser.parse_args()
    bundles = args.bundle or [REPO / "onnx/smollm2-135m-instruct", REPO / "onnx/smollm2-135m-instruct-int4"]
    threads = os.cpu_count() or 1
    prompt = [(1000 + 7 * i) % 40000 for i in range(args.prompt_tokens)]
    report = {"prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "threads": threads,
              "onnxruntime": ort.__version__, "bundles": {}}
    for bundle in bundles:
        with tempfile.TemporaryDirectory() as tmp:
            chain = Chain(bundle, Path(tmp), threads)
            chain.generate(prompt, args.new_tokens)
            times, runs = decode_op_times(chain.end())
        per_step = {op: us / 1e3 / runs for op, us in sorted(times.items(), key=lambda kv: -kv[1])}
        report["bundles"][bundle.name] = {"decode_steps": runs, "kernel_ms_per_step": per_step,
                                          "kernel_ms_total": sum(per_step.values())}
        print(f"{bundle.name}: {sum(per_step.values()):.3f} ms of kernels per decode step", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [(f"# Decode time by operator ({args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, batch 1, "
              f"{threads} threads, onnxruntime {ort.__version__})"), "",
             ("Kernel time per decode step summed over every segment session (ONNX Runtime's profiler; "
              "the profiler's own cost inflates small kernels). Command: `make profile`."), ""]
    for name, entry in report["bundles"].items():
        total = entry["kernel_ms_total"]
        lines += [f"## {name}: {total:.3f} ms of kernels per step", "", "| operator | ms/step | share |", "|---|---:|---:|"]
        lines += [f"| {op} | {ms:.3f} | {ms / total:.1%} |" for op, ms in entry["kernel_ms_per_step"].items()
                  if ms / total >= 0.005]
        lines.append("")
    args.out.with_suffix(".md").write_text("\n".join(lines))
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
