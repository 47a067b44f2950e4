"""SVF eval: a steering vector field against a static vector of matched strength, on held-out prompts.

Concept measures: sentiment is the VADER compound score of the output (vaderSentiment); verbosity
is the number of generated tokens. Per prompt, the effect of a steered run is its measure minus the
unsteered output's, signed so that positive means "moved the requested way" (the sign of the scale).
  backfire rate  share of prompts whose effect is <= 0: steering moved the wrong way or not at all
  mean effect    mean signed effect
Sections of the report:
  sweep       both methods at each scale (same step length per token), short generations
  long        long generations at one scale: the measure over the second half of each text
  multi       two SVF concepts at once (and each alone): each must move the requested way
"""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from ..data.datasets import benign_prompts
from ..figures import save_figure
from ..runtime_client import compose_spec, generate
from ..train.common import evenly
from .harness import save_report
from .metrics import Perplexity, sentiment


def second_half(text: str) -> str:
    words = text.split()
    return " ".join(words[len(words) // 2:])


MEASURES: dict[str, Callable[[dict], float]] = {
    "sentiment": lambda record: sentiment(record["text"]),
    "verbosity": lambda record: float(len(record["token_ids"])),
    "sentiment_second_half": lambda record: sentiment(second_half(record["text"])),
}


def effect_stats(base: list[float], steered: list[float], sign: float) -> dict[str, float]:
    effects = [sign * (s - b) for s, b in zip(steered, base)]
    return {"mean_effect": statistics.mean(effects), "backfire_rate": statistics.mean(e <= 0 for e in effects),
            "mean": statistics.mean(steered)}


def _sign(scale: float) -> float:
    return 1.0 if scale >= 0 else -1.0


def eval_svf(bundle: Path, field_spec: Path, vector_spec: Path, second_spec: Path | None, scales: list[float],
             long_scale: float, second_scale: float, limit: int | None = None, long_limit: int | None = 32,
             max_new_tokens: int = 48, long_tokens: int = 256, multi_tokens: int = 128,
             binary: Path | None = None) -> dict:
    """Run every section and return the report (see the module docs)."""
    prompts = evenly(benign_prompts(), limit)
    long_prompts = evenly(prompts, long_limit)
    perplexity = Perplexity(bundle, binary)
    methods = {"vector": vector_spec, "svf": field_spec}
    report: dict = {"bundle": str(bundle), "field_spec": str(field_spec), "vector_spec": str(vector_spec),
                    "n_prompts": len(prompts), "n_long_prompts": len(long_prompts), "max_new_tokens": max_new_tokens,
                    "long_tokens": long_tokens}
    with tempfile.TemporaryDirectory() as tmp:
        def run(parts: list[tuple[Path, float]], items: list[str], tokens: int) -> list[dict]:
            spec = compose_spec(parts, Path(tmp) / "spec.json") if parts else None
            return generate(bundle, items, spec, tokens, binary)

        settings = [(name, scale) for scale in scales for name in methods]
        bar = tqdm(total=1 + len(settings) + 3 + (4 if second_spec else 0), desc="eval svf", unit="setting")
        base = run([], prompts, max_new_tokens)
        bar.update()
        base_sentiment = [MEASURES["sentiment"](r) for r in base]
        base_ppl = perplexity(prompts, base)
        report["unsteered"] = {"mean": statistics.mean(base_sentiment), "perplexity": base_ppl}
        report["sweep"] = []
        for name, scale in settings:
            records = run([(methods[name], scale)], prompts, max_new_tokens)
            bar.update()
            report["sweep"].append({"method": name, "scale": scale,
                                    **effect_stats(base_sentiment, [MEASURES["sentiment"](r) for r in records],
                                                   _sign(scale)),
                                    "perplexity_ratio": perplexity(prompts, records) / base_ppl,
                                    "samples": [r["text"] for r in records[:2]]})

        long_runs = {"unsteered": run([], long_prompts, long_tokens)}
        bar.update()
        for name, spec in methods.items():
            long_runs[name] = run([(spec, long_scale)], long_prompts, long_tokens)
            bar.update()
        halves = {name: [MEASURES["sentiment_second_half"](r) for r in records] for name, records in long_runs.items()}
        report["long"] = {"scale": long_scale, **{
            name: {**effect_stats(halves["unsteered"], halves[name], _sign(long_scale)),
                   "generated_tokens": statistics.mean(len(r["token_ids"]) for r in long_runs[name])}
            for name in methods}, "unsteered": {"mean": statistics.mean(halves["unsteered"])}}

        if second_spec is not None:
            concepts = {"sentiment": (field_spec, long_scale), "verbosity": (second_spec, second_scale)}
            combos = {"unsteered": [], "sentiment_only": [concepts["sentiment"]],
                      "verbosity_only": [concepts["verbosity"]], "both": list(concepts.values())}
            outputs = {}
            for combo, parts in combos.items():
                outputs[combo] = run(parts, prompts, multi_tokens)
                bar.update()
            report["multi"] = {"scales": {c: s for c, (_, s) in concepts.items()}, "max_new_tokens": multi_tokens}
            for concept, (_, scale) in concepts.items():
                measure = MEASURES[concept]
                reference = [measure(r) for r in outputs["unsteered"]]
                report["multi"][concept] = {"unsteered": statistics.mean(reference), **{
                    combo: effect_stats(reference, [measure(r) for r in outputs[combo]], _sign(scale))
                    for combo in combos if combo != "unsteered"}}
        bar.close()
    return report


def markdown(report: dict) -> str:
    lines = [f"Unsteered: mean VADER {report['unsteered']['mean']:.3f} over {report['n_prompts']} held-out prompts.",
             "", "| method | scale | backfire rate | mean effect | mean VADER | perplexity / unsteered |",
             "|---|---|---|---|---|---|"]
    for run in report["sweep"]:
        lines.append(f"| {run['method']} | {run['scale']:g} | {run['backfire_rate']:.3f} | {run['mean_effect']:+.3f} "
                     f"| {run['mean']:.3f} | {run['perplexity_ratio']:.2f} |")
    long = report["long"]
    lines += ["",
              (f"Long generations ({report['long_tokens']} tokens, {report['n_long_prompts']} prompts, scale "
               f"{long['scale']:g}): VADER over the second half of each text; unsteered {long['unsteered']['mean']:.3f}."),
              "", "| method | second-half mean VADER | effect | backfire rate | generated tokens |", "|---|---|---|---|---|"]
    for name in ("vector", "svf"):
        r = long[name]
        lines.append(f"| {name} | {r['mean']:.3f} | {r['mean_effect']:+.3f} | {r['backfire_rate']:.3f} | "
                     f"{r['generated_tokens']:.0f} |")
    if "multi" in report:
        multi = report["multi"]
        scales = ", ".join(f"{c} {s:+g}" for c, s in multi["scales"].items())
        lines += ["",
                  (f"Multi-attribute ({scales}; {multi['max_new_tokens']} tokens): effect on each concept "
                   "(VADER for sentiment, generated tokens for verbosity), signed toward the requested direction."), "",
                  "| steered with | sentiment effect | sentiment backfire | verbosity effect | verbosity backfire |",
                  "|---|---|---|---|---|"]
        for combo in ("sentiment_only", "verbosity_only", "both"):
            s, v = multi["sentiment"][combo], multi["verbosity"][combo]
            lines.append(f"| {combo} | {s['mean_effect']:+.3f} | {s['backfire_rate']:.3f} | {v['mean_effect']:+.1f} "
                         f"| {v['backfire_rate']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 + ("multi" in report)
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.6))
    for name in ("vector", "svf"):
        runs = [r for r in report["sweep"] if r["method"] == name]
        axes[0].plot([r["scale"] for r in runs], [r["backfire_rate"] for r in runs], "o-", label=name)
        axes[1].plot([r["scale"] for r in runs], [r["mean_effect"] for r in runs], "o-", label=name)
    axes[0].set_title("backfire rate (lower is better)")
    axes[1].set_title("mean effect toward the request")
    for ax in axes[:2]:
        ax.set_xlabel("scale (step per token)")
        ax.legend(fontsize=8)
    long = report["long"]
    axes[2].bar(["unsteered", "vector", "svf"], [long["unsteered"]["mean"], long["vector"]["mean"], long["svf"]["mean"]],
                color=["gray", "C0", "C1"])
    axes[2].set_title(f"VADER, 2nd half of {report['long_tokens']} tokens")
    if "multi" in report:
        multi = report["multi"]
        combos = ["sentiment_only", "verbosity_only", "both"]
        x = range(len(combos))
        axes[3].bar([i - 0.2 for i in x], [multi["sentiment"][c]["mean_effect"] for c in combos], 0.4,
                    label="sentiment (VADER)")
        twin = axes[3].twinx()
        twin.bar([i + 0.2 for i in x], [multi["verbosity"][c]["mean_effect"] for c in combos], 0.4, color="C2",
                 label="verbosity (tokens)")
        axes[3].set_xticks(list(x), ["sentiment", "verbosity", "both"])
        axes[3].set_title("multi-attribute: effect per concept")
        axes[3].legend(loc="upper left", fontsize=7)
        twin.legend(loc="upper right", fontsize=7)
    save_figure(fig, path)


def write(report: dict, out: Path) -> None:
    """The report as .json, .md and .png."""
    save_report(report, out, markdown, plot)
