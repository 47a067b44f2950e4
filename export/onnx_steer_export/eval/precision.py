"""Quality and speed of lower-precision bundles against the fp32 bundle they came from.

For each bundle, through the Rust runtime:
  perplexity      on a fixed text (`onnx-steer perplexity`, teacher-forced), and its change vs fp32;
  greedy match    of generations on held-out prompts (chat-templated when the model has a template):
                  the share of token positions equal to the fp32 bundle's, the share of whole
                  generations equal, and the mean first divergence;
  speed           prefill and decode tokens/s and the share of the memory-bandwidth limit reached
                  (`onnx-steer bench`, batch 1, segment chain).
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import REPO
from ..data.datasets import read_prompts
from ..figures import save_figure
from ..runtime_client import bench, generate, perplexity
from .harness import save_report


def shown(path: Path) -> str:
    """`path` relative to the repository where it lies inside it (reports are committed)."""
    resolved = path.resolve()
    return str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else str(path)


def speed(bundle: Path, repeats: int) -> dict:
    """Batch-1 speed of the segment chain (`onnx-steer bench`) and the share of the bandwidth limit reached."""
    report = bench(bundle, "--no-monolithic", "--repeats", str(repeats), capture_output=True)
    workload = report["workloads"][0]
    segmented = workload["variants"][0]
    return {"prefill_tokens_per_s": segmented["prefill_tokens_per_s"]["p50"],
            "decode_tokens_per_s": segmented["decode_tokens_per_s"]["p50"],
            "bandwidth_fraction": workload["bandwidth_fraction"]["segmented"],
            "decode_weight_mb": report["decode_weight_bytes"] / 1e6,
            "memory_read_gb_per_s": report["memory_read_gb_per_s"]}


def greedy_match(ids: list[list[int]], reference: list[list[int]]) -> dict:
    """Position-wise and whole-sequence agreement of greedy generations with the reference's."""
    same_positions = total_positions = exact = 0
    divergences = []
    for mine, theirs in zip(ids, reference):
        length = max(len(mine), len(theirs))
        same = sum(a == b for a, b in zip(mine, theirs))
        same_positions += same
        total_positions += length
        exact += mine == theirs
        divergences.append(next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs))))
    return {"token_agreement": same_positions / max(total_positions, 1), "exact_match": exact / max(len(reference), 1),
            "mean_first_divergence": sum(divergences) / max(len(divergences), 1)}


def evaluate_precision(reference: Path, bundles: list[Path], text: Path, prompts_path: Path, limit: int,
                       max_new_tokens: int, max_tokens: int, repeats: int) -> dict:
    prompts = read_prompts(prompts_path, limit)
    rows = []
    reference_ids: list[list[int]] = []
    reference_perplexity = None
    # A base model without a chat template (Gemma 3 270M) generates from the raw prompts.
    chat = json.loads((reference / "manifest.json").read_text())["tokenizer"].get("chat_template") is not None
    for bundle in [reference, *bundles]:
        manifest = json.loads((bundle / "manifest.json").read_text())
        weights = manifest.get("weights", {}).get("format", manifest["dtype"])
        print(f"== {bundle.name} ({weights})", flush=True)
        score = perplexity(bundle, text, max_tokens)
        ids = [record["token_ids"] for record in generate(bundle, prompts, None, max_new_tokens, chat=chat)]
        if bundle == reference:
            reference_ids, reference_perplexity = ids, score["perplexity"]
        rows.append({"bundle": bundle.name, "weights": weights, "perplexity": score["perplexity"],
                     "perplexity_change": score["perplexity"] / reference_perplexity - 1,
                     "tokens_scored": score["tokens"], **greedy_match(ids, reference_ids), **speed(bundle, repeats)})
    return {"reference": reference.name, "text": shown(text), "prompts": shown(prompts_path), "chat": chat,
            "prompt_count": len(prompts),
            "max_new_tokens": max_new_tokens, "rows": rows}


def markdown(report: dict) -> str:
    lines = [
        f"# Precision: quality and speed against {report['reference']}",
        "",
        (f"Perplexity: `{report['text']}` ({report['rows'][0]['tokens_scored']} tokens, teacher-forced). Greedy match: "
         f"{report['prompt_count']} held-out {'chat' if report.get('chat', True) else 'raw'} prompts of `{report['prompts']}`, {report['max_new_tokens']} new tokens. "
         "Speed: `onnx-steer bench`, batch 1, 128-token prompt, 128 new tokens, segment chain. "
         "Command: `make eval-precision`."),
        "",
        ("| bundle | weights | perplexity | Δ perplexity | token agreement | exact match | first divergence "
         "| MB read/token | prefill tok/s | decode tok/s | bandwidth limit reached |"),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['bundle']} | {r['weights']} | {r['perplexity']:.3f} | {r['perplexity_change']:+.1%} | "
            f"{r['token_agreement']:.1%} | {r['exact_match']:.0%} | {r['mean_first_divergence']:.1f} | "
            f"{r['decode_weight_mb']:.0f} | {r['prefill_tokens_per_s']:.0f} | {r['decode_tokens_per_s']:.1f} | "
            f"{r['bandwidth_fraction']:.0%} |")
    bandwidth = report["rows"][0]["memory_read_gb_per_s"]
    lines += ["", f"Memory read bandwidth measured in the same runs: {bandwidth:.1f} GB/s.", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for r in report["rows"]:
        axis.scatter(r["decode_tokens_per_s"], r["perplexity"], s=60)
        axis.annotate(f" {r['weights']}", (r["decode_tokens_per_s"], r["perplexity"]))
    axis.set_xlabel("decode tokens/s (batch 1)")
    axis.set_ylabel("perplexity on the fixed text")
    axis.set_title("precision: speed against quality")
    save_figure(figure, path)


def run(reference: Path, bundles: list[Path], text: Path, prompts: Path, limit: int, max_new_tokens: int,
        max_tokens: int, repeats: int, out: Path) -> dict:
    report = evaluate_precision(reference, bundles, text, prompts, limit, max_new_tokens, max_tokens, repeats)
    save_report(report, out, markdown, plot)
    return report
