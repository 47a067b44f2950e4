"""Auto-tuning (`tune`): which method, layer and scale steer a behaviour best, on the user's own data.

Every method is trained from one capture of the pairs' states at every requested layer: `vector` is the mean
difference of the pairs' states, `pca` the first principal component of their differences (unit length,
signed so positives project higher; train.vectors). A candidate is (method, layer, scale): the method's
direction at that one layer, times the scale, at every position.

Data: EVAL is split once, deterministically (a seeded shuffle of its distinct prompts, so rows sharing a
prompt fall on one side), into a validation part, on which every candidate is scored and the winner
chosen, and a held-out rest, on which only the winner and the unsteered model are scored afterwards, so
the winner's held-out figure comes from data the choice never saw.

Metrics, from the runtime's log-probabilities (`onnx-steer score`); higher is better in both:
  ab       mean p(match) over a CAA-format EVAL file, as `eval-ab` scores it, on one seed (seed 0: the
           questions shuffled and the matching letter balanced between A and B by swapping choices).
  logprob  mean [log p(positive) - log p(negative)] over a pairs-format EVAL file ({prompt, positive,
           negative}, positive = the behaviour), each side's summed log-probability as the assistant's
           answer to the chat prompt.

Fluency bound: the mean log-probability per token of a neutral reference text (its first N tokens, scored
as plain text with `score --echo`, not chat), steered, against unsteered. A candidate whose NLL per token
rises by more than `max_nll_increase` nats is not fluent and cannot win. The unsteered model is a
candidate too: a steered winner must beat it on validation (a tie goes to unsteered).

Budget: the sweep starts a candidate only while the time since the command began plus the mean time of a
candidate so far (before the first: the unsteered baseline's, which scores the same rows) stays within it;
the report says how many candidates it skipped. Candidates run in grid order (method, layer, scale).
"""

from __future__ import annotations

import itertools
import json
import math
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..data.ab import ABQuestion, load_questions
from ..data.datasets import numbered_records
from ..data.pairs import PairsError
from ..data.tokens import bundle_tokenizer
from ..runtime_client import score
from ..train.vectors import train_vectors
from .ab import score_setting, seed_variants, vector_spec
from .harness import save_report

# Method name → train.vectors method.
METHODS = {"vector": "mean", "pca": "pca"}
METRICS = {"ab": "p(match)", "logprob": "log p(positive) − log p(negative)"}
AB_SEED = 0


class TuneError(ValueError):
    """The tune inputs cannot be used (the message names the file or setting)."""


@dataclass(frozen=True)
class Candidate:
    method: str
    layer: int
    scale: float

    @property
    def label(self) -> str:
        return f"{self.method} layer {self.layer} scale {self.scale:g}"


def candidate_grid(methods: Sequence[str], layers: Sequence[int], scales: Sequence[float]) -> list[Candidate]:
    """Every (method, layer, scale), in that nesting order, duplicates dropped."""
    grid = (Candidate(m, layer, float(s)) for m, layer, s in itertools.product(methods, layers, scales))
    return list(dict.fromkeys(grid))


@dataclass(frozen=True)
class Contrast:
    """One row of a pairs-format EVAL file: the prompt and its behaviour (positive) and opposite answers."""

    prompt: str
    positive: str
    negative: str


def load_contrasts(path: Path) -> list[Contrast]:
    """{prompt, positive, negative} per line (the logprob metric needs completions to score)."""
    rows = []
    for number, record in numbered_records(path, path.read_text(), PairsError):
        if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in
                                                   ("prompt", "positive", "negative")):
            raise PairsError(f"{path}:{number}: the logprob metric needs string prompt, positive and negative "
                             "(completion pairs; prompt-contrast pairs have no answer to score)")
        if not record["positive"] or not record["negative"]:
            raise PairsError(f"{path}:{number}: empty positive or negative")
        rows.append(Contrast(record["prompt"], record["positive"], record["negative"]))
    if not rows:
        raise PairsError(f"{path} has no pairs")
    return rows


EvalItem = ABQuestion | Contrast


def load_eval(path: Path, metric: str) -> list[EvalItem]:
    if metric == "ab":
        return list(load_questions(path))
    if metric == "logprob":
        return list(load_contrasts(path))
    raise TuneError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")


def item_key(item: EvalItem) -> str:
    return item.question if isinstance(item, ABQuestion) else item.prompt


def evenly_spaced(items: Sequence[Any], limit: int | None) -> list[Any]:
    """At most `limit` items, evenly spaced over the list (all of them without a limit)."""
    if not limit or limit >= len(items):
        return list(items)
    return [items[i * len(items) // limit] for i in range(limit)]


def split_indices(keys: Sequence[str], fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """(validation, held-out) row indices: the distinct keys in a seeded order, the first `fraction` of them
    (rounded, at least one, leaving at least one) for validation. Rows with equal keys stay together."""
    if not 0 < fraction < 1:
        raise TuneError(f"the validation fraction must lie strictly between 0 and 1, got {fraction}")
    groups: dict[str, list[int]] = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    if len(groups) < 2:
        raise TuneError(f"a validation and a held-out part need at least 2 distinct prompts, got {len(groups)}")
    order = list(groups)
    random.Random(f"tune-split:{seed}").shuffle(order)
    n_validation = min(len(order) - 1, max(1, round(fraction * len(order))))
    validation = sorted(i for key in order[:n_validation] for i in groups[key])
    held_out = sorted(i for key in order[n_validation:] for i in groups[key])
    return validation, held_out


def metric_value(bundle: Path, metric: str, items: Sequence[EvalItem], specs: Sequence[Path],
                 binary: Path | None = None) -> float:
    """The metric of one steering setting over `items`, in one batched `score` call."""
    if metric == "ab":
        questions = [item for item in items if isinstance(item, ABQuestion)]
        summary = score_setting(bundle, [seed_variants(questions, AB_SEED)], specs, binary)
        return float(summary["p_match"]["mean"])
    contrasts = [item for item in items if isinstance(item, Contrast)]
    records = score(bundle, [{"prompt": c.prompt, "continuations": [c.positive, c.negative]} for c in contrasts],
                    specs, chat=True, binary=binary)
    return statistics.mean(float(r["continuations"][0]["logprob"]) - float(r["continuations"][1]["logprob"])
                           for r in records)


def fluency_prefix(bundle: Path, text_path: Path, tokens: int) -> str:
    """The text up to the end of its `tokens`-th token (the bundle's tokenizer, no special tokens)."""
    text = text_path.read_text()
    if not text.strip():
        raise TuneError(f"the fluency text {text_path} is empty")
    offsets = bundle_tokenizer(bundle)(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    if len(offsets) < 2:
        raise TuneError(f"the fluency text {text_path} has fewer than 2 tokens")
    return text[:offsets[min(tokens, len(offsets)) - 1][1]]


def fluency(bundle: Path, text: str, specs: Sequence[Path], binary: Path | None = None) -> tuple[float, int]:
    """(mean NLL per token, tokens scored) of `text` as plain text (not chat), from the second token on."""
    record = score(bundle, [{"prompt": text, "continuations": []}], specs, chat=False, binary=binary, echo=True)[0]
    logprobs = [float(p["logprob"]) for p in record["prompt_logprobs"]]
    return -statistics.mean(logprobs), len(logprobs)


def is_fluent(nll_increase: float, max_nll_increase: float) -> bool:
    return not math.isnan(nll_increase) and nll_increase <= max_nll_increase


def select_winner(baseline: float, results: Sequence[dict]) -> int | None:
    """Index of the eligible result with the highest `validation` metric that beats `baseline`; ties go to
    the smaller NLL increase, then to the earlier candidate. None: unsteered wins."""
    best: int | None = None
    for index, result in enumerate(results):
        if not result["eligible"] or not result["validation"] > baseline:
            continue
        if best is None or (result["validation"], -result["nll_increase"]) > (
                results[best]["validation"], -results[best]["nll_increase"]):
            best = index
    return best


class Budget:
    """Minutes since construction, read from `clock` (seconds; time.monotonic by default)."""

    def __init__(self, minutes: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        if minutes is not None and minutes <= 0:
            raise TuneError(f"the budget must be positive, got {minutes} minutes")
        self.limit_s = None if minutes is None else minutes * 60.0
        self.clock = clock
        self.start = clock()

    def elapsed(self) -> float:
        return self.clock() - self.start

    def allows(self, next_s: float) -> bool:
        """Whether a step expected to take `next_s` seconds still ends within the budget."""
        return self.limit_s is None or self.elapsed() + next_s <= self.limit_s


def sweep(candidates: Sequence[Candidate], evaluate: Callable[[Candidate], dict], budget: Budget,
          first_estimate_s: float, on_first: Callable[[float], None] | None = None,
          progress: Callable[[], None] | None = None) -> tuple[list[dict], list[Candidate]]:
    """Each candidate's `evaluate` result (with its `seconds` added) while the budget allows the next one at
    the mean candidate time so far (`first_estimate_s` before any ran), and the candidates skipped.
    `on_first` gets the first candidate's time (for the time estimate), `progress` is called after each."""
    results: list[dict] = []
    for n, candidate in enumerate(candidates):
        times = [r["seconds"] for r in results]
        if not budget.allows(statistics.mean(times) if times else first_estimate_s):
            return results, list(candidates[n:])
        started = budget.clock()
        result = evaluate(candidate)
        result["seconds"] = budget.clock() - started
        results.append(result)
        if n == 0 and on_first is not None:
            on_first(result["seconds"])
        if progress is not None:
            progress()
    return results, []


def tuned_spec(winner: dict | None, vector_file: str | None) -> dict:
    """The winning spec (vector path relative to the spec's folder); no interventions when unsteered won."""
    if winner is None or vector_file is None:
        return {"interventions": []}
    return {"interventions": [{"kind": "vector", "path": vector_file, "scale": winner["scale"],
                               "layers": [winner["layer"]]}]}


def tune(bundle: Path, pairs: Path, eval_path: Path, metric: str, methods: Sequence[str], layers: Sequence[int],
         scales: Sequence[float], out: Path, validation_fraction: float = 0.5, seed: int = 0,
         fluency_text: Path | None = None, fluency_tokens: int = 256, max_nll_increase: float = 0.5,
         budget_minutes: float | None = None, limit: int | None = None, binary: Path | None = None,
         clock: Callable[[], float] = time.monotonic, log: Callable[[str], None] = tqdm.write) -> dict:
    """The whole sweep; writes OUT/{tuned.json, tune.json, tune.md, tune.png, METHOD.safetensors} and returns
    the report."""
    from .. import REPO

    budget = Budget(budget_minutes, clock)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise TuneError(f"methods are {', '.join(METHODS)}; got {', '.join(unknown) or 'none'}")
    if not layers or not scales:
        raise TuneError("tune needs at least one layer and one scale")
    if fluency_tokens < 2:
        raise TuneError(f"the fluency text needs at least 2 tokens, got {fluency_tokens}")
    all_items = load_eval(eval_path, metric)
    items = evenly_spaced(all_items, limit)
    validation_rows, held_out_rows = split_indices([item_key(i) for i in items], validation_fraction, seed)
    validation = [items[i] for i in validation_rows]
    held_out = [items[i] for i in held_out_rows]
    text_path = fluency_text or REPO / "data" / "perplexity.txt"
    text = fluency_prefix(bundle, text_path, fluency_tokens)
    grid = candidate_grid(methods, layers, scales)
    out.mkdir(parents=True, exist_ok=True)
    log(f"tune: {len(grid)} candidates ({len(methods)} methods x {len(layers)} layers x {len(scales)} scales); "
        f"{len(validation)} validation and {len(held_out)} held-out items of {eval_path}")

    started = clock()
    vectors = train_vectors(bundle, pairs, {METHODS[m]: out / f"{m}.safetensors" for m in methods}, list(layers),
                            chat=True, binary=binary)
    train_seconds = clock() - started
    trained: dict[str, dict[str, Any]] = {
        m: {"file": f"{m}.safetensors", "trainer": METHODS[m],
            "norms": {str(layer): float((v.astype("float64") ** 2).sum() ** 0.5)
                      for layer, v in vectors[METHODS[m]].items()}} for m in methods}
    log(f"trained {', '.join(methods)} on {pairs} at layers {','.join(map(str, layers))} (one capture) in "
        f"{train_seconds:.1f} s")

    started = clock()
    base_metric = metric_value(bundle, metric, validation, (), binary)
    base_nll, fluency_scored = fluency(bundle, text, (), binary)
    base = {"validation": base_metric, "nll": base_nll, "seconds": clock() - started}
    log(f"unsteered: validation {METRICS[metric]} {base_metric:.4f}, fluency NLL {base_nll:.4f} per token "
        f"({fluency_scored} tokens) in {base['seconds']:.1f} s")

    with tempfile.TemporaryDirectory() as tmp:
        def evaluate(candidate: Candidate) -> dict:
            spec = vector_spec(out / trained[candidate.method]["file"], candidate.layer, candidate.scale,
                               Path(tmp) / "candidate.json")
            value = metric_value(bundle, metric, validation, [spec], binary)
            nll, _ = fluency(bundle, text, [spec], binary)
            increase = nll - base_nll
            return {"method": candidate.method, "layer": candidate.layer, "scale": candidate.scale,
                    "validation": value, "delta": value - base_metric, "nll": nll, "nll_increase": increase,
                    "eligible": is_fluent(increase, max_nll_increase)}

        def estimate(first_s: float) -> None:
            left = (len(grid) - 1) * first_s
            log(f"time estimate: unsteered {base['seconds']:.1f} s, first candidate {first_s:.1f} s -> about "
                f"{left / 60:.1f} min for the other {len(grid) - 1} candidates, "
                f"{(budget.elapsed() + left + 2 * base['seconds']) / 60:.1f} min in all")

        with tqdm(total=len(grid), desc="tune", unit="candidate") as bar:
            results, skipped = sweep(grid, evaluate, budget, base["seconds"], estimate, lambda: bar.update())
        if skipped:
            log(f"budget of {budget_minutes:g} min reached after {len(results)} candidates; {len(skipped)} skipped")

        winner_index = select_winner(base_metric, results)
        winner = results[winner_index] if winner_index is not None else None
        started = clock()
        base_held = metric_value(bundle, metric, held_out, (), binary)
        winner_held = base_held
        if winner is not None:
            spec = vector_spec(out / trained[winner["method"]]["file"], winner["layer"], winner["scale"],
                               Path(tmp) / "winner.json")
            winner_held = metric_value(bundle, metric, held_out, [spec], binary)
        held_seconds = clock() - started

    for n, result in enumerate(results):
        result["winner"] = n == winner_index
    tuned = tuned_spec(winner, trained[winner["method"]]["file"] if winner else None)
    (out / "tuned.json").write_text(json.dumps(tuned, indent=2) + "\n")
    report = {
        "bundle": str(bundle), "pairs": str(pairs), "eval": str(eval_path), "metric": metric,
        "metric_name": METRICS[metric], "same_file": pairs.resolve() == eval_path.resolve(),
        "methods": list(methods), "layers": list(layers), "scales": [float(s) for s in scales],
        "n_eval": len(all_items), "limit": limit, "n_used": len(items), "validation_fraction": validation_fraction,
        "seed": seed, "ab_seed": AB_SEED if metric == "ab" else None,
        "n_validation": len(validation), "n_held_out": len(held_out),
        "fluency": {"text": str(text_path), "tokens": fluency_tokens, "scored": fluency_scored,
                    "max_nll_increase": max_nll_increase},
        "trained": trained, "train_seconds": train_seconds,
        "unsteered": base,
        "candidates": results,
        "n_candidates": len(grid),
        "skipped": [{"method": c.method, "layer": c.layer, "scale": c.scale} for c in skipped],
        "budget_minutes": budget_minutes,
        "winner": None if winner is None else {k: winner[k] for k in ("method", "layer", "scale", "validation",
                                                                       "delta", "nll_increase")},
        "held_out": {"unsteered": base_held, "winner": winner_held, "delta": winner_held - base_held,
                     "seconds": held_seconds},
        "tuned_spec": str(out / "tuned.json"),
        "seconds": budget.elapsed(),
    }
    save_report(report, out / "tune", markdown, plot)
    return report


def _fmt(value: float) -> str:
    return f"{value:+.4f}"


def markdown(report: dict) -> str:
    base, held, winner = report["unsteered"], report["held_out"], report["winner"]
    fl = report["fluency"]
    lines = [
        f"# tune: {report['metric_name']} on `{report['eval']}`", "",
        (f"Bundle `{report['bundle']}`; trained on `{report['pairs']}` (vector = mean difference, pca = first "
         f"principal component, unit length). {report['n_used']} of {report['n_eval']} eval items, split "
         f"(seed {report['seed']}) into {report['n_validation']} for validation, on which every candidate was "
         f"scored and the winner chosen, and {report['n_held_out']} held out, scored only for the winner and "
         "unsteered. Higher is better."),
        "",
        (f"Fluency: mean NLL per token of the first {fl['scored'] + 1} tokens of `{fl['text']}` (plain text), "
         f"steered minus unsteered; above {fl['max_nll_increase']:g} nats per token a candidate is not fluent "
         "and cannot win."),
        "",
    ]
    if report["same_file"]:
        lines += ["Note: the eval file is the training file, so validation and held-out figures are on training data.",
                  ""]
    if winner is None:
        lines.append("**Winner: unsteered** (no fluent candidate beat it on validation); `tuned.json` has no "
                     "interventions.")
    else:
        lines.append(f"**Winner: {winner['method']}, layer {winner['layer']}, scale {winner['scale']:g}** "
                     f"(`tuned.json`), fluency {_fmt(winner['nll_increase'])} nats per token.")
    lines += ["", "| | validation | held out |", "|---|---|---|",
              f"| unsteered | {base['validation']:.4f} | {held['unsteered']:.4f} |",
              f"| winner | {winner['validation'] if winner else base['validation']:.4f} | {held['winner']:.4f} |",
              f"| difference | {_fmt(winner['delta'] if winner else 0.0)} | {_fmt(held['delta'])} |", ""]
    if report["skipped"]:
        lines += [f"The --budget of {report['budget_minutes']:g} min stopped the sweep after "
                  f"{len(report['candidates'])} of {report['n_candidates']} candidates: {len(report['skipped'])} "
                  "skipped (" + ", ".join(f"{c['method']} {c['layer']} {c['scale']:g}" for c in report["skipped"])
                  + ").", ""]
    lines += ["| method | layer | scale | validation | vs unsteered | fluency ΔNLL/token | eligible | s |",
              "|---|---|---|---|---|---|---|---|",
              f"| unsteered | | | {base['validation']:.4f} | | 0 | yes | {base['seconds']:.1f} |"]
    for r in report["candidates"]:
        mark = "**" if r["winner"] else ""
        lines.append(f"| {mark}{r['method']}{mark} | {r['layer']} | {r['scale']:g} | {mark}{r['validation']:.4f}{mark} "
                     f"| {_fmt(r['delta'])} | {_fmt(r['nll_increase'])} | {'yes' if r['eligible'] else 'not fluent'} "
                     f"| {r['seconds']:.1f} |")
    lines += ["", "Vector lengths per layer: " + "; ".join(
        f"{m}: " + ", ".join(f"{layer} {n:.2f}" for layer, n in t["norms"].items())
        for m, t in report["trained"].items()) + ".",
        "", (f"Time: training (one capture for all methods) {report['train_seconds']:.1f} s, held-out scoring "
             f"{held['seconds']:.1f} s, {report['seconds'] / 60:.1f} min in all.")]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Per method: the validation metric against scale (one line per layer; not-fluent points crossed, the
    winner starred, unsteered dashed) above the fluency NLL increase against scale (the bound dotted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = report["methods"]
    fig, axes = plt.subplots(2, len(methods), figsize=(5.5 * len(methods), 7), squeeze=False, sharex="col")
    base = report["unsteered"]["validation"]
    bound = report["fluency"]["max_nll_increase"]
    for column, method in enumerate(methods):
        top, bottom = axes[0][column], axes[1][column]
        top.axhline(base, ls="--", color="gray", label=f"unsteered {base:.3f}")
        bottom.axhline(bound, ls=":", color="C3", label=f"bound {bound:g}")
        bottom.axhline(0.0, ls="--", color="gray")
        runs = [r for r in report["candidates"] if r["method"] == method]
        for n, layer in enumerate(dict.fromkeys(r["layer"] for r in runs)):
            line = sorted((r for r in runs if r["layer"] == layer), key=lambda r: r["scale"])
            color = f"C{n % 10}"
            scales = [r["scale"] for r in line]
            top.plot(scales, [r["validation"] for r in line], "o-", color=color, label=f"layer {layer}")
            bottom.plot(scales, [r["nll_increase"] for r in line], "o-", color=color, label=f"layer {layer}")
            bad = [r for r in line if not r["eligible"]]
            if bad:
                top.plot([r["scale"] for r in bad], [r["validation"] for r in bad], "x", color="C3", ms=12, mew=2)
        for r in runs:
            if r["winner"]:
                top.plot([r["scale"]], [r["validation"]], "*", color="gold", ms=18, mec="black", label="winner")
        top.set_title(method)
        top.set_ylabel(f"validation {report['metric_name']}")
        bottom.set_ylabel("fluency: NLL/token increase")
        bottom.set_xlabel("scale")
        top.legend(fontsize=8)
        bottom.legend(fontsize=8)
    if any(not r["eligible"] for r in report["candidates"]):
        fig.text(0.01, 0.01, "x: not fluent (cannot win)", fontsize=8, color="C3")
    fig.suptitle(f"tune: {Path(report['eval']).name}, {report['n_validation']} validation items")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

