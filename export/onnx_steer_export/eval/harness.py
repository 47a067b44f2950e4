"""Behaviour eval harness (`eval`): drive the Rust binary on held-out prompts, with and without a steer
spec, and score what it generates; and the report writer every eval shares.

Metrics
  refusal      share of outputs the refusal-phrase matcher flags (metrics.REFUSAL_PHRASES), on the
               harmful prompts and, with --benign, on benign prompts (over-refusal).
  sentiment    mean VADER compound score of the outputs (vaderSentiment; lexicon ships inside).
  perplexity   of the generated tokens under the unsteered model (the runtime's log-probabilities),
               pooled over all outputs: exp(mean token NLL). A fluency check.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from ..data.datasets import read_prompts
from ..figures import save_figure
from ..runtime_client import generate, with_scale
from .metrics import REFUSAL_PHRASES, Perplexity, is_refusal, sentiment


@dataclass
class RunMetrics:
    scale: float | None
    perplexity: float
    refusal_rate: float | None = None
    benign_refusal_rate: float | None = None
    sentiment: float | None = None
    samples: list[dict] = field(default_factory=list)


def score(task: str, prompts: list[str], records: list[dict], benign_records: list[dict] | None,
          perplexity: Perplexity, scale: float | None) -> RunMetrics:
    texts = [r["text"] for r in records]
    metrics = RunMetrics(scale=scale, perplexity=perplexity(prompts, records))
    if task == "refusal":
        metrics.refusal_rate = sum(map(is_refusal, texts)) / len(texts)
        if benign_records is not None:
            metrics.benign_refusal_rate = sum(is_refusal(r["text"]) for r in benign_records) / len(benign_records)
    else:
        metrics.sentiment = sum(sentiment(t) for t in texts) / len(texts)
    metrics.samples = [{"prompt": p, "text": t} for p, t in list(zip(prompts, texts))[:5]]
    return metrics


def evaluate(bundle: Path, task: str, prompts_path: Path, spec: Path | None, scales: list[float] | None,
             benign_path: Path | None = None, max_new_tokens: int = 48, limit: int | None = None,
             binary: Path | None = None) -> dict:
    """Unsteered baseline plus the spec as written (or once per sweep scale); returns the report."""
    if task not in ("refusal", "sentiment"):
        raise ValueError(f"--task must be refusal or sentiment, got {task!r}")
    prompts = read_prompts(prompts_path, limit)
    benign = read_prompts(benign_path, limit) if benign_path else None
    perplexity = Perplexity(bundle, binary)
    settings: list[tuple[float | None, bool]] = [(None, False)]
    if spec is not None:
        settings += [(s, True) for s in scales] if scales else [(None, True)]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for scale, steered in tqdm(settings, desc=f"eval {task}", unit="setting"):
            run_spec = None
            if steered and spec is not None:
                run_spec = with_scale(spec, scale, Path(tmp) / "spec.json") if scale is not None else spec
            records = generate(bundle, prompts, run_spec, max_new_tokens, binary)
            benign_records = generate(bundle, benign, run_spec, max_new_tokens, binary) if benign else None
            runs.append((steered, score(task, prompts, records, benign_records, perplexity, scale)))
    baseline = runs[0][1]
    return {
        "task": task, "bundle": str(bundle), "prompts": str(prompts_path), "benign": str(benign_path or ""),
        "spec": str(spec or ""), "max_new_tokens": max_new_tokens, "n_prompts": len(prompts),
        "n_benign": len(benign or []), "refusal_phrases": list(REFUSAL_PHRASES),
        "baseline": asdict(baseline), "steered": [asdict(m) for steered, m in runs if steered],
    }


def report_file(out: Path, extension: str) -> Path:
    """`out` + `extension`: report stems are names like `qwen2.5-0.5b`, whose dots are no suffix."""
    return out.with_name(out.name + extension)


def save_report(report: dict, out: Path, markdown: Callable[[dict], str],
                plot: Callable[[dict, Path], None] | None = None) -> None:
    """Write `out`.json, `out`.md (and `out`.png with `plot`)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    report_file(out, ".json").write_text(json.dumps(report, indent=2) + "\n")
    report_file(out, ".md").write_text(markdown(report))
    if plot is not None:
        plot(report, report_file(out, ".png"))


def plot(report: dict, path: Path) -> None:
    """Behaviour (and perplexity ratio) against scale, with the unsteered baseline dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in report["steered"] if r["scale"] is not None]
    scales = [r["scale"] for r in runs]
    base = report["baseline"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    if report["task"] == "refusal":
        axes[0].plot(scales, [r["refusal_rate"] for r in runs], "o-", label="harmful: refusal rate")
        axes[0].axhline(base["refusal_rate"], ls="--", color="C0", label="harmful, unsteered")
        if report["n_benign"]:
            axes[0].plot(scales, [r["benign_refusal_rate"] for r in runs], "s-", color="C3",
                         label="benign: over-refusal")
            axes[0].axhline(base["benign_refusal_rate"], ls="--", color="C3", label="benign, unsteered")
        axes[0].set_ylabel("share of outputs")
    else:
        axes[0].plot(scales, [r["sentiment"] for r in runs], "o-", label="steered")
        axes[0].axhline(base["sentiment"], ls="--", color="gray", label="unsteered")
        axes[0].set_ylabel("mean VADER compound")
    axes[0].set_xlabel("scale")
    axes[0].legend(fontsize=8)
    axes[0].set_title(f"{report['task']} vs scale ({report['n_prompts']} held-out prompts)")
    axes[1].plot(scales, [r["perplexity"] / base["perplexity"] for r in runs], "o-", color="C2")
    axes[1].axhline(2.0, ls=":", color="red", label="2x unsteered")
    axes[1].set_xlabel("scale")
    axes[1].set_ylabel("perplexity / unsteered")
    axes[1].set_title("fluency")
    axes[1].legend(fontsize=8)
    save_figure(fig, path)
