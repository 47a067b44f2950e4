"""Median per-token residual-stream norm of bundles at given layers (`onnx-steer capture --tokens all`).

models.mk scales a model's SVF steps (absolute lengths) by the ratio of these norms to the default
model's at the field's layers:

  .venv/bin/python bench/residual_norms.py onnx/smollm2-135m-instruct:10,12,14 onnx/qwen2.5-0.5b-instruct:8,10,11

Prompts: the first 40 of data/sentiment_pairs.jsonl, chat-wrapped; each prompt's first token (an
attention-sink outlier) is left out.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "export"))

from onnx_steer_export.runtime_client import run_binary


def median_norms(bundle: Path, layers: list[int], prompts: Path, work: Path) -> dict[int, float]:
    out = work / f"{bundle.name}.safetensors"
    run_binary(["capture", "--bundle", str(bundle), "--prompts-file", str(prompts), "--chat", "--layers",
                ",".join(map(str, layers)), "--tokens", "all", "--out", str(out)])
    tensors = load_file(str(out))
    lengths = tensors["lengths"].astype(np.int64)
    first_tokens = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    norms = {}
    for layer in layers:
        states = tensors[f"layer.{layer}"]
        keep = np.ones(len(states), dtype=bool)
        keep[first_tokens] = False
        norms[layer] = float(np.median(np.linalg.norm(states[keep], axis=1)))
    return norms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundles", nargs="+", metavar="BUNDLE:LAYERS", help="a bundle and its layers, A,B,C")
    parser.add_argument("--prompts", type=int, default=40, help="sentiment prompts used")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        prompts = Path(work) / "prompts.txt"
        lines = (REPO / "data/sentiment_pairs.jsonl").read_text().splitlines()[:args.prompts]
        prompts.write_text("".join(json.loads(line)["prompt"] + "\n" for line in lines))
        means = []
        for item in args.bundles:
            bundle, _, layers = item.rpartition(":")
            norms = median_norms(Path(bundle), [int(x) for x in layers.split(",")], prompts, Path(work))
            means.append(float(np.mean(list(norms.values()))))
            print(f"{bundle}: " + ", ".join(f"layer {k} {v:.1f}" for k, v in norms.items()) + f"; mean {means[-1]:.1f}")
        for item, mean in zip(args.bundles[1:], means[1:]):
            print(f"{item.rpartition(':')[0]} / {args.bundles[0].rpartition(':')[0]}: {mean / means[0]:.3f}")


if __name__ == "__main__":
    main()
