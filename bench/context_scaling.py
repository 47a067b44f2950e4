"""Prefill and decode speed against prompt length, one run (`make context-scaling`).

For each prompt length, in turn: onnx-steer's segment chain (`onnx-steer bench`), optionally a
baseline build of onnx-steer (the previous commit's binary with a bundle it reads), and llama.cpp F32
on the same weights (llama-cpp-python, if installed), all on the same prompt token ids and the same
number of greedy new tokens. Lengths are interleaved so the host's drift hits every runtime alike.
Writes bench/results/cpu_context_scaling.{json,md}.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "export"))
sys.path.insert(0, str(REPO / "bench"))

from onnx_steer_export.runtime_client import bench

from peers import LlamaCpp, default_gguf


def onnx_steer(binary: Path, bundle: Path, tokens: int, args: argparse.Namespace) -> dict:
    """The segment chain's figures at `tokens` prompt tokens: p50 prefill and decode tok/s, peak RSS
    of the bench process, and the prompt ids it used."""
    report = bench(bundle, "--no-monolithic", "--prompt-tokens", str(tokens), "--new-tokens", str(args.new_tokens),
                   "--repeats", str(args.repeats), "--warmup", "1", binary=binary, stderr=subprocess.DEVNULL)
    workload = report["workloads"][0]
    variant = next(v for v in workload["variants"] if v["variant"] == "segmented")
    return {"prefill_tokens_per_s": variant["prefill_tokens_per_s"]["p50"],
            "decode_tokens_per_s": variant["decode_tokens_per_s"]["p50"],
            "peak_rss_mib": report["peak_rss_mib"], "prompt_ids": workload["prompt_ids"]}


def llama_cpp(peer: LlamaCpp, ids: list[int], args: argparse.Namespace) -> dict:
    runs = [peer.run(ids, args.new_tokens) for _ in range(args.repeats)]
    return {"prefill_tokens_per_s": statistics.median(len(ids) / prefill for prefill, _, _ in runs),
            "decode_tokens_per_s": statistics.median((args.new_tokens - 1) / decode for _, decode, _ in runs)}


def write_markdown(path: Path, result: dict) -> None:
    names = [name for name in ("onnx-steer", "baseline", "llama.cpp F32") if name in result["rows"][0]]
    header = "| prompt tokens | " + " | ".join(f"{n} prefill | {n} decode" for n in names)
    ratios = [n for n in names if n != "onnx-steer"]
    header += "".join(f" | prefill / {n} | decode / {n}" for n in ratios) + " |"
    title = (f"# Prefill and decode against prompt length ({result['new_tokens']} new tokens, batch 1, "
             f"p50 of {result['repeats']})")
    lines = [title, "", header, "|" + " ---: |" * (header.count("|") - 1)]
    for row in result["rows"]:
        cells = [str(row["prompt_tokens"])]
        for name in names:
            cells += [f"{row[name]['prefill_tokens_per_s']:.0f}", f"{row[name]['decode_tokens_per_s']:.1f}"]
        for name in ratios:
            cells += [f"{row['onnx-steer']['prefill_tokens_per_s'] / row[name]['prefill_tokens_per_s']:.2f}x",
                      f"{row['onnx-steer']['decode_tokens_per_s'] / row[name]['decode_tokens_per_s']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    first, last = result["rows"][0], result["rows"][-1]
    kept = last["onnx-steer"]["decode_tokens_per_s"] / first["onnx-steer"]["decode_tokens_per_s"]
    lines += ["", f"onnx-steer decode at {last['prompt_tokens']} tokens keeps {kept:.2f}x of its speed at "
              f"{first['prompt_tokens']}; peak RSS of the bench process: "
              + ", ".join(f"{r['prompt_tokens']}: {r['onnx-steer']['peak_rss_mib']:.0f} MiB" for r in result["rows"])]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--binary", type=Path, default=REPO / "target/release/onnx-steer")
    parser.add_argument("--bundle", type=Path, default=REPO / "onnx/smollm2-135m-instruct", help="fp32 bundle")
    parser.add_argument("--baseline-binary", type=Path, help="another onnx-steer build to compare (the previous commit's)")
    parser.add_argument("--baseline-bundle", type=Path, help="the bundle the baseline build reads")
    parser.add_argument("--prompt-tokens", default="128,2048,6000", help="comma-separated prompt lengths")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--gguf-dir", type=Path, default=REPO / "target/gguf", help="where the F32 GGUF is written")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/cpu_context_scaling", help="path stem")
    args = parser.parse_args()
    if (args.baseline_binary is None) != (args.baseline_bundle is None):
        parser.error("--baseline-binary and --baseline-bundle go together")
    lengths = [int(n) for n in args.prompt_tokens.split(",")]

    peer = None
    if importlib.util.find_spec("llama_cpp"):
        peer = LlamaCpp(default_gguf(args.gguf_dir, "F32"), os.cpu_count() or 1, max(lengths) + args.new_tokens + 8)
    else:
        print("llama-cpp-python is not installed: llama.cpp columns skipped", flush=True)

    rows = []
    for tokens in lengths:
        print(f"== {tokens}-token prompt", flush=True)
        row: dict = {"prompt_tokens": tokens, "onnx-steer": onnx_steer(args.binary, args.bundle, tokens, args)}
        ids = row["onnx-steer"].pop("prompt_ids")
        if args.baseline_binary:
            row["baseline"] = onnx_steer(args.baseline_binary, args.baseline_bundle, tokens, args)
            row["baseline"].pop("prompt_ids")
        if peer is not None:
            peer.run(ids, 2)  # warm-up at this length
            row["llama.cpp F32"] = llama_cpp(peer, ids, args)
        print("   " + json.dumps({k: v for k, v in row.items() if k != "prompt_tokens"}), flush=True)
        rows.append(row)
    result = {"new_tokens": args.new_tokens, "repeats": args.repeats, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(args.out.with_suffix(".md"), result)
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
