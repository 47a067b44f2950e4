"""Prefill time and peak memory against prompt length, whole against chunked (`make prefill-chunks`).

For each prompt length, `onnx-steer generate --json` runs the same prompt (the fixed text of
`data/perplexity.txt`, cut to length) with `--prefill-chunk 0` (the whole prompt through each layer
at once) and with each chunk size, interleaved so drift hits all alike; the child's peak RSS comes
from GNU time. Writes bench/results/cpu_prefill_chunks.{json,md} and checks that every setting
generates the same tokens.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "export"))

from onnx_steer_export.data.tokens import bundle_tokenizer
from onnx_steer_export.export.graph_file import chain_weight_bytes
from onnx_steer_export.runtime_client import find_binary


def prompt_of(tokens: int, bundle: Path) -> str:
    """The fixed text, repeated and cut to `tokens` tokens of the bundle's tokenizer."""
    tokenizer = bundle_tokenizer(bundle)
    text = (REPO / "data" / "perplexity.txt").read_text()
    ids: list[int] = []
    while len(ids) < tokens:
        ids += tokenizer.encode(text, add_special_tokens=False)
    return str(tokenizer.decode(ids[:tokens]))


def kv_bytes_per_token(bundle: Path) -> int:
    """Bytes of keys and values a token adds to the cache, over every layer, in the bundle's dtype."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    model = manifest["model"]
    width = 4 if manifest["dtype"] == "fp32" else 2
    return model["num_layers"] * 2 * model["num_key_value_heads"] * model["head_dim"] * width


def run(binary: Path, bundle: Path, prompt: str, chunk: int, new_tokens: int) -> dict[str, Any]:
    """One generation; its peak RSS from GNU time (`%M`, KB)."""
    done = subprocess.run(
        ["/usr/bin/time", "-f", "PEAK_RSS_KB %M", str(binary), "generate", "--bundle", str(bundle), "--json",
         "--prompt", prompt, "--max-new-tokens", str(new_tokens), "--prefill-chunk", str(chunk)],
        capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(done.stderr)
    peak = next(line for line in done.stderr.splitlines() if line.startswith("PEAK_RSS_KB"))
    record = json.loads(done.stdout.strip().splitlines()[-1])
    return {"prefill_ms": record["prefill_ms"], "prompt_tokens": record["prompt_tokens"],
            "text": record["text"], "peak_rss_mb": int(peak.split()[1]) / 1024}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=REPO / "onnx" / "smollm2-135m-instruct")
    parser.add_argument("--prompt-tokens", default="128,2048,6000,8000", help="comma-separated lengths")
    parser.add_argument("--chunks", default="256,512", help="chunk sizes to compare with 0 (whole), comma-separated")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "cpu_prefill_chunks")
    args = parser.parse_args(argv)
    binary = find_binary()
    settings = [0] + [int(c) for c in args.chunks.split(",")]
    rows = []
    for tokens in [int(t) for t in args.prompt_tokens.split(",")]:
        prompt = prompt_of(tokens, args.bundle)
        results = {chunk: run(binary, args.bundle, prompt, chunk, args.new_tokens) for chunk in settings}
        texts = {r["text"] for r in results.values()}
        row = {"prompt_tokens": results[0]["prompt_tokens"], "same_text": len(texts) == 1,
               "runs": {str(chunk): {k: v for k, v in r.items() if k != "text"} for chunk, r in results.items()}}
        rows.append(row)
        print(json.dumps(row))
    weights_mb = chain_weight_bytes(args.bundle) / 2**20
    kv_mb_per_token = kv_bytes_per_token(args.bundle) / 2**20
    report = {"new_tokens": args.new_tokens, "rows": rows, "weights_mb": weights_mb,
              "kv_mb_per_token": kv_mb_per_token}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [(f"Peak RSS against the weights ({weights_mb:.0f} MiB) plus the KV cache of the prompt and the "
              f"{args.new_tokens} new tokens ({kv_mb_per_token * 1024:.1f} KiB a token)."), "",
             "| prompt tokens | setting | prefill tok/s | peak RSS (MiB) | peak / (weights + KV) | same tokens |",
             "| ---: | --- | ---: | ---: | ---: | --- |"]
    for row in rows:
        for chunk, run_ in row["runs"].items():
            rate = row["prompt_tokens"] / (run_["prefill_ms"] / 1e3)
            name = "whole prompt" if chunk == "0" else f"chunks of {chunk}"
            bound = weights_mb + kv_mb_per_token * (row["prompt_tokens"] + args.new_tokens)
            lines.append(f"| {row['prompt_tokens']} | {name} | {rate:.0f} | {run_['peak_rss_mb']:.0f} | "
                         f"{run_['peak_rss_mb'] / bound:.2f} | {'yes' if row['same_text'] else 'NO'} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(row["same_text"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
