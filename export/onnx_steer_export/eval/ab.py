"""A/B behaviour eval (`eval-ab`), after CAA: how much probability the model puts on the
behaviour-matching answer letter of two-choice questions, unsteered and steered.

Scoring: each question is the user turn of the chat template, and the runtime (`onnx-steer score
--chat`) scores the two continuations `(A` and `(B` as the start of the assistant's answer. With the
default tokenizer both are `(` + the letter (no leading space: the template's generation prompt ends
in a newline), so the shared `(` cancels and the comparison is between the letter tokens:
  p(match) = exp(lp_match) / (exp(lp_A) + exp(lp_B))
per question, averaged over the questions. `choice_mass` = mean exp(lp_A) + exp(lp_B), the probability
the answer starts with either choice (how well the model follows the format), and `match_share` the
share of questions with p(match) > 0.5.

Seeds: each seed k shuffles the question order and reassigns which letter the matching answer takes
(exactly half A, half B, chosen at random by swapping the choices' texts in the question), so the
spread over seeds measures what letter bias and order do to the mean. Every setting is scored on the
same variants. A setting's `vs_unsteered` is `above` when its lowest seed exceeds the unsteered
run's highest, `below` when its highest is under the unsteered lowest, `within` otherwise.

Settings: unsteered; each `--steer` spec as written (or at each `--scales` value); and with `--vector`
a single-layer spec per layer and scale (`{"kind": "vector", "layers": [L], "scale": s}`): a
mean-difference vector trained on the pairs of `data/ab_*_pairs.jsonl` (positive = matching letter)
steers toward the behaviour at positive scales.
"""

from __future__ import annotations

import json
import math
import random
import statistics
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ..data.ab import LETTERS, ABQuestion, load_questions, with_matching
from ..figures import save_figure
from ..runtime_client import score, with_scale
from .harness import save_report

CONTINUATIONS = ("(A", "(B")


def p_match(logprobs: dict[str, float], matching: str) -> float:
    """exp(lp_match) / (exp(lp_A) + exp(lp_B)), computed stably."""
    other = "B" if matching == "A" else "A"
    margin = logprobs[matching] - logprobs[other]
    if margin >= 0:
        return 1.0 / (1.0 + math.exp(-margin))
    odds = math.exp(margin)
    return odds / (1.0 + odds)


def choice_mass(logprobs: dict[str, float]) -> float:
    return sum(math.exp(logprobs[letter]) for letter in LETTERS)


def letter_logprobs(record: dict) -> dict[str, float]:
    """The summed log-probability of `(A` and `(B` from one `score` record (continuations in that order)."""
    continuations = record["continuations"]
    for expected, continuation in zip(CONTINUATIONS, continuations):
        if continuation.get("text", expected) != expected:
            raise ValueError(f"score record {record.get('index')}: continuation {continuation['text']!r} where "
                             f"{expected!r} was sent")
    return {letter: float(c["logprob"]) for letter, c in zip(LETTERS, continuations)}


@dataclass(frozen=True)
class Variant:
    """A question as one seed asks it: its index in the file and the (possibly swapped) question."""

    index: int
    question: ABQuestion
    swapped: bool


def seed_variants(questions: Sequence[ABQuestion], seed: int) -> list[Variant]:
    """The questions in a seeded order, the matching answer under A for exactly half of them (a random
    half; with an odd count the extra one's letter is random too). Questions whose choices cannot be
    swapped keep their letter."""
    rng = random.Random(f"eval-ab:{seed}")
    order = list(range(len(questions)))
    rng.shuffle(order)
    letters = [LETTERS[k % 2] for k in range(len(order))]
    if len(letters) % 2:
        letters[-1] = rng.choice(LETTERS)
    rng.shuffle(letters)
    variants = []
    for index, letter in zip(order, letters):
        question = questions[index]
        changed = with_matching(question, letter)
        variants.append(Variant(index, changed or question, changed is not None and changed is not question))
    return variants


def unswappable(questions: Sequence[ABQuestion]) -> int:
    """How many questions keep their letter under every seed (no `(A)` then `(B)` choice lines)."""
    return sum(with_matching(q, q.other) is None for q in questions)


def spread(values: Sequence[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.pstdev(values), "min": min(values),
            "max": max(values), "per_seed": list(values)}


def summarise(variants_by_seed: Sequence[Sequence[Variant]], records: Sequence[dict]) -> dict:
    """Per seed: mean p(match), mean choice mass and the share of questions with p(match) > 0.5; then the
    spread of each over seeds. `records` are the score records of every seed's variants, seed after seed."""
    per_seed: dict[str, list[float]] = {"p_match": [], "choice_mass": [], "match_share": []}
    per_question: dict[int, list[float]] = {}
    offset = 0
    for variants in variants_by_seed:
        seed_records = records[offset:offset + len(variants)]
        offset += len(variants)
        scores = []
        for variant, record in zip(variants, seed_records):
            logprobs = letter_logprobs(record)
            p = p_match(logprobs, variant.question.matching)
            scores.append((p, choice_mass(logprobs)))
            per_question.setdefault(variant.index, []).append(p)
        per_seed["p_match"].append(statistics.mean(p for p, _ in scores))
        per_seed["choice_mass"].append(statistics.mean(m for _, m in scores))
        per_seed["match_share"].append(statistics.mean(float(p > 0.5) for p, _ in scores))
    if offset != len(records):
        raise ValueError(f"{len(records)} score records for {offset} questions")
    summary: dict = {key: spread(values) for key, values in per_seed.items()}
    summary["per_question"] = [statistics.mean(per_question[i]) for i in sorted(per_question)]
    return summary


def score_setting(bundle: Path, variants_by_seed: Sequence[Sequence[Variant]], specs: Sequence[Path],
                  binary: Path | None = None) -> dict:
    """One steering setting: every seed's variants in one batched `score` call, summarised."""
    items = [{"prompt": v.question.question, "continuations": list(CONTINUATIONS)}
             for variants in variants_by_seed for v in variants]
    return summarise(variants_by_seed, score(bundle, items, specs, chat=True, binary=binary))


def vector_spec(vector: Path, layer: int, scale: float, out: Path) -> Path:
    """A spec steering one layer with `vector`'s direction for that layer at `scale` (absolute path)."""
    out.write_text(json.dumps({"interventions": [{"kind": "vector", "path": str(vector.resolve()), "scale": scale,
                                                  "layers": [layer]}]}))
    return out


@dataclass(frozen=True)
class Setting:
    label: str
    spec: Path | None = None  # the spec it comes from (as written, or the vector file)
    layer: int | None = None
    scale: float | None = None


def settings(steer: Sequence[Path], vector: Path | None, layers: Sequence[int], scales: Sequence[float]
             ) -> list[Setting]:
    """Unsteered, each spec (as written, or at each scale), and the vector at each layer and scale."""
    out = [Setting("unsteered")]
    for spec in steer:
        out += [Setting(spec.stem, spec, None, s) for s in scales] if scales else [Setting(spec.stem, spec)]
    if vector is not None:
        out += [Setting(f"layer {layer}", vector, layer, s) for layer in layers for s in scales]
    return out


def verdict(run: dict, base: dict) -> str:
    """`above` / `below` the unsteered p(match) beyond the seed spread of both, else `within`."""
    if run["p_match"]["min"] > base["p_match"]["max"]:
        return "above"
    if run["p_match"]["max"] < base["p_match"]["min"]:
        return "below"
    return "within"


def best_layer(runs: Sequence[dict]) -> dict | None:
    """For vector runs: the layer whose largest positive scale raises p(match) most above its most negative
    scale (or, with scales of one sign, moves it furthest from unsteered), with both runs."""
    base = runs[0]
    by_layer: dict[int, list[dict]] = {}
    for run in runs:
        if run["layer"] is not None and run["scale"] is not None:
            by_layer.setdefault(run["layer"], []).append(run)
    best = None
    for layer, layer_runs in by_layer.items():
        toward = max(layer_runs, key=lambda r: r["scale"])
        away = min(layer_runs, key=lambda r: r["scale"])
        if toward["scale"] > 0 > away["scale"]:
            effect = toward["p_match"]["mean"] - away["p_match"]["mean"]
        else:
            effect = max(abs(r["p_match"]["mean"] - base["p_match"]["mean"]) for r in layer_runs)
        if best is None or effect > best["effect"]:
            best = {"layer": layer, "effect": effect,
                    "toward": {"scale": toward["scale"], "p_match": toward["p_match"]["mean"],
                               "vs_unsteered": toward["vs_unsteered"]},
                    "away": {"scale": away["scale"], "p_match": away["p_match"]["mean"],
                             "vs_unsteered": away["vs_unsteered"]}}
    return best


def evaluate_ab(bundle: Path, questions_path: Path, steer: Sequence[Path] = (), vector: Path | None = None,
                layers: Sequence[int] = (), scales: Sequence[float] = (), seeds: int = 3, limit: int | None = None,
                binary: Path | None = None) -> dict:
    """Every setting on every seed's variants of the questions; returns the report."""
    if seeds < 1:
        raise ValueError("seeds must be at least 1")
    if vector is not None and (not layers or not scales):
        raise ValueError("a vector needs layers and scales")
    questions = load_questions(questions_path)
    if limit and limit < len(questions):
        questions = [questions[i * len(questions) // limit] for i in range(limit)]
    variants = [seed_variants(questions, seed) for seed in range(seeds)]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for n, setting in enumerate(tqdm(settings(steer, vector, layers, scales), desc="eval-ab", unit="setting")):
            specs: list[Path] = []
            if setting.spec is not None and setting.layer is not None and setting.scale is not None:
                specs = [vector_spec(setting.spec, setting.layer, setting.scale, Path(tmp) / f"spec_{n}.json")]
            elif setting.spec is not None:
                specs = [with_scale(setting.spec, setting.scale, Path(tmp) / f"spec_{n}.json")
                         if setting.scale is not None else setting.spec]
            result = score_setting(bundle, variants, specs, binary)
            runs.append({"label": setting.label, "spec": str(setting.spec or ""), "layer": setting.layer,
                         "scale": setting.scale, **result})
    for run in runs:
        run["vs_unsteered"] = "" if run is runs[0] else verdict(run, runs[0])
    first = variants[0][0].question if variants and variants[0] else None
    return {"bundle": str(bundle), "questions": str(questions_path), "n_questions": len(questions),
            "seeds": seeds, "continuations": list(CONTINUATIONS), "chat": True,
            "unswappable": unswappable(questions), "vector": str(vector or ""), "runs": runs,
            "best_layer": best_layer(runs),
            "sample": {"question": first.question, "matching": first.matching} if first else None}


def _cell(stats: dict) -> str:
    return f"{stats['mean']:.3f} ± {stats['std']:.3f} ({stats['min']:.3f}–{stats['max']:.3f})"


def markdown(report: dict) -> str:
    intro = (f"A/B eval of `{report['questions']}` ({report['n_questions']} questions, {report['seeds']} seeds of "
             "question order and matching letter). p(match) = p(matching letter) / (p(A) + p(B)) per question, "
             "averaged; mean ± std over seeds (min–max).")
    lines = [intro, ""]
    if report["unswappable"]:
        lines += [f"{report['unswappable']} questions have no (A)/(B) choice lines and keep their letter.", ""]
    lines += ["| setting | layer | scale | p(match) | vs unsteered | matching share | choice mass |",
              "|---|---|---|---|---|---|---|"]
    for run in report["runs"]:
        layer = "" if run["layer"] is None else str(run["layer"])
        scale = "" if run["scale"] is None else f"{run['scale']:g}"
        lines.append(f"| {run['label']} | {layer} | {scale} | {_cell(run['p_match'])} | {run['vs_unsteered']} | "
                     f"{run['match_share']['mean']:.3f} | {run['choice_mass']['mean']:.3f} |")
    best = report.get("best_layer")
    if best:
        away, toward = best["away"], best["toward"]
        lines += ["", (f"Best layer: {best['layer']} (p(match) {away['p_match']:.3f} at scale {away['scale']:g} "
                       f"({away['vs_unsteered']}), {toward['p_match']:.3f} at scale {toward['scale']:g} "
                       f"({toward['vs_unsteered']}); unsteered {report['runs'][0]['p_match']['mean']:.3f}).")]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """p(match) against scale, one line per layer (and per swept spec), error bars the min–max over seeds,
    the unsteered mean as a dashed line over its seed range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    base = report["runs"][0]["p_match"]
    ax.axhspan(base["min"], base["max"], color="gray", alpha=0.2)
    ax.axhline(base["mean"], ls="--", color="gray", label=f"unsteered {base['mean']:.3f}")
    swept = [r for r in report["runs"][1:] if r["scale"] is not None]
    for label in dict.fromkeys(r["label"] for r in swept):
        runs = sorted((r for r in swept if r["label"] == label), key=lambda r: r["scale"])
        means = [r["p_match"]["mean"] for r in runs]
        errors = [[m - r["p_match"]["min"] for m, r in zip(means, runs)],
                  [r["p_match"]["max"] - m for m, r in zip(means, runs)]]
        ax.errorbar([r["scale"] for r in runs], means, yerr=errors, marker="o", capsize=3, label=label)
    ax.set_xlabel("scale (positive: toward the behaviour)")
    ax.set_ylabel("p(match) / (p(A) + p(B))")
    # Zoomed to the data (small effects must be visible), never beyond [0, 1].
    values = [v for r in report["runs"] for v in (r["p_match"]["min"], r["p_match"]["max"])]
    margin = max(0.01, 0.15 * (max(values) - min(values)))
    ax.set_ylim(max(0.0, min(values) - margin), min(1.0, max(values) + margin))
    ax.set_title(f"{Path(report['questions']).name}: {report['n_questions']} questions, {report['seeds']} seeds")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def write(report: dict, out: Path) -> None:
    """`out`.json, `out`.md and `out`.png."""
    save_report(report, out, markdown, plot)
