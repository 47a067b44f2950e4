"""Auto-tuning (`tune`): which method, layer and scale steer a behaviour best, on the user's own data.

Methods, each trained once from --pairs (A candidate is (method, layers, scale)):
  vector   the mean difference of the pairs' states (train.vectors), at one layer, times the scale; with
           `spans`, also at every layer of each span at once (each layer its own mean difference), as
           hand-made specs often steer a band of layers. A span's scale is spread evenly over its layers
           (each gets scale / the span's length), so one scale means the same total push at one layer or
           over a band, and one list of scales serves both.
  pca      the first principal component of their differences (unit length), likewise. Both come from one
           capture of the pairs' states at every requested layer and span layer.
  l2s      an L2S net per layer L, reading layer L - read_gap and steering L (train.l2s); scale multiplies
           its output. Needs completion pairs ({prompt, positive, negative}).
  svf      one SVF concept scorer over all requested layers (train.svf); a candidate's field steers its
           one layer, the scale being the step per token.
  w2s      a W2S router over all requested layers, reading min(layers) - read_gap (train.w2s); its bank is
           the mean-difference vectors and its labels are scored at the median of its scales. Its candidates
           are (w2s, routed, scale). Needs completion pairs.
A method may have its own scales (`scales_by_method`), as their units differ: a mean difference has the
states' length, a PCA direction unit length, an L2S output the targets' length, an SVF step its own.

Data: EVAL is split once, deterministically (a seeded shuffle of its distinct prompts, so rows sharing a
prompt fall on one side; harmful and benign prompts split separately), into a validation part, on which every
candidate is scored and the winner chosen, and a held-out rest, on which only the winner, unsteered and any
reference specs are scored afterwards, so the winner's held-out figure comes from data the choice never saw.

Metrics, all from the runtime (log-probabilities from `onnx-steer score`, generations from `generate`);
higher is better in each:
  ab         mean p(match) over a CAA-format EVAL file, as `eval-ab` scores it, on one seed (seed 0: the
             questions shuffled and the matching letter balanced between A and B by swapping choices).
  logprob    mean [log p(positive) - log p(negative)] over a pairs-format EVAL file ({prompt, positive,
             negative}, positive = the behaviour), each side's summed log-probability as the chat answer.
  refusal    refusal rate on the EVAL prompts (harmful) minus the refusal rate on the --benign prompts
             (over-refusal), from greedy generations and the eval harness's refusal-phrase matcher.
  sentiment  mean VADER compound score of greedy generations for the EVAL prompts.

Fluency bound: for ab and logprob, the mean NLL per token of a neutral reference text (its first N tokens,
scored as plain text with `score --echo`), steered, against unsteered. For refusal and sentiment, the mean
NLL per token of the steered generations under the unsteered model (the log of the eval harness's perplexity),
against that of the unsteered generations. A candidate whose NLL rises by more than `max_nll_increase` nats
per token is not fluent and cannot win; the bound may instead be the first reference spec's own rise on
validation (`bound_from_reference`: at most that spec's perplexity). The unsteered model is a candidate too:
a steered winner must beat it on validation (a tie goes to unsteered).

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
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..data.ab import ABQuestion, load_questions
from ..data.datasets import numbered_records, read_prompts
from ..data.pairs import PairsError
from ..data.tokens import bundle_tokenizer
from ..figures import save_figure
from ..runtime_client import generate, score
from ..train.l2s import train_l2s
from ..train.svf import train_svf
from ..train.vectors import train_vectors
from ..train.w2s import train_w2s
from .ab import score_setting, seed_variants
from .harness import save_report
from .metrics import Perplexity, is_refusal, sentiment

# Vector method name → train.vectors method.
VECTOR_METHODS = {"vector": "mean", "pca": "pca"}
METHODS = ("vector", "pca", "l2s", "svf", "w2s")
# Methods that learn from completion pairs only.
COMPLETION_METHODS = ("l2s", "w2s")
METRICS = {"ab": "p(match)", "logprob": "log p(positive) − log p(negative)",
           "refusal": "refusal on harmful − refusal on benign", "sentiment": "mean VADER compound"}
# Metrics scored on generations (the rest on log-probabilities).
GENERATION_METRICS = ("refusal", "sentiment")
AB_SEED = 0
ROUTED = "routed"


class TuneError(ValueError):
    """The tune inputs cannot be used (the message names the file or setting)."""


@dataclass(frozen=True)
class Candidate:
    method: str
    layers: tuple[int, ...] | None  # the layers it steers; None: the router picks one per input (w2s)
    scale: float

    @property
    def label(self) -> str:
        return f"{self.method} layer {layer_label(self.layers)} scale {self.scale:g}"


def layer_label(layers: Sequence[int] | None) -> str:
    """"routed", "12", "10-14" (a contiguous span) or "8,12"."""
    if layers is None:
        return ROUTED
    if len(layers) > 1 and list(layers) == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))


def candidate_grid(methods: Sequence[str], layers: Sequence[int], scales: Sequence[float],
                   scales_by_method: dict[str, Sequence[float]] | None = None,
                   spans: Sequence[Sequence[int]] = ()) -> list[Candidate]:
    """Every (method, layers, scale), in that nesting order, duplicates dropped: one layer at a time, then
    (vector and pca only) each span; w2s has one routed candidate per scale. A method in `scales_by_method`
    uses its own scales."""
    grid = []
    for method in methods:
        own = (scales_by_method or {}).get(method) or scales
        method_layers: list[tuple[int, ...] | None] = (
            [None] if method == "w2s" else [(layer,) for layer in layers]
            + ([tuple(span) for span in spans] if method in VECTOR_METHODS else []))
        grid += [Candidate(method, steered, float(s)) for steered, s in itertools.product(method_layers, own)]
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


@dataclass(frozen=True)
class Prompted:
    """A prompt of a generation metric; `benign` ones count against the refusal metric (over-refusal)."""

    prompt: str
    benign: bool = False


EvalItem = ABQuestion | Contrast | Prompted


def load_eval(path: Path, metric: str, benign: Path | None = None) -> list[EvalItem]:
    if metric not in METRICS:
        raise TuneError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if metric == "ab":
        return list(load_questions(path))
    if metric == "logprob":
        return list(load_contrasts(path))
    if metric == "refusal" and benign is None:
        raise TuneError("the refusal metric needs --benign prompts (their refusals count against a candidate)")
    if metric == "sentiment" and benign is not None:
        raise TuneError("--benign belongs to the refusal metric; sentiment scores the --eval prompts only")
    items: list[EvalItem] = []
    for source, is_benign in ((path, False), (benign, True)):
        if source is None:
            continue
        try:
            prompts = read_prompts(source)
        except (ValueError, KeyError, TypeError) as e:
            raise TuneError(f"{source}: one prompt per line (.txt) or {{\"prompt\": ...}} per line (.jsonl) ({e})")
        if not prompts:
            raise TuneError(f"{source} has no prompts")
        items += [Prompted(prompt, is_benign) for prompt in prompts]
    return items


def item_key(item: EvalItem) -> str:
    if isinstance(item, ABQuestion):
        return item.question
    return item.prompt


def item_stratum(item: EvalItem) -> bool:
    """Harmful and benign prompts split separately, so each side keeps both."""
    return isinstance(item, Prompted) and item.benign


def evenly_spaced(items: Sequence[Any], limit: int | None) -> list[Any]:
    """At most `limit` items, evenly spaced over the list (all of them without a limit)."""
    if not limit or limit >= len(items):
        return list(items)
    return [items[i * len(items) // limit] for i in range(limit)]


def split_indices(keys: Sequence[str], fraction: float, seed: int = 0,
                  strata: Sequence[Any] | None = None) -> tuple[list[int], list[int]]:
    """(validation, held-out) row indices: per stratum (one without `strata`), the distinct keys in a seeded
    order, the first `fraction` of them (rounded, at least one, leaving at least one) for validation. Rows with
    equal keys stay together."""
    if not 0 < fraction < 1:
        raise TuneError(f"the validation fraction must lie strictly between 0 and 1, got {fraction}")
    by_stratum: dict[Any, dict[str, list[int]]] = {}
    for index, key in enumerate(keys):
        stratum = strata[index] if strata is not None else None
        by_stratum.setdefault(stratum, {}).setdefault(key, []).append(index)
    validation: list[int] = []
    held_out: list[int] = []
    for groups in by_stratum.values():
        if len(groups) < 2:
            raise TuneError(f"a validation and a held-out part need at least 2 distinct prompts, got {len(groups)}")
        order = list(groups)
        random.Random(f"tune-split:{seed}").shuffle(order)
        n_validation = min(len(order) - 1, max(1, round(fraction * len(order))))
        validation += [i for key in order[:n_validation] for i in groups[key]]
        held_out += [i for key in order[n_validation:] for i in groups[key]]
    return sorted(validation), sorted(held_out)


def metric_value(bundle: Path, metric: str, items: Sequence[EvalItem], specs: Sequence[Path],
                 binary: Path | None = None) -> float:
    """The metric of one steering setting over `items` (log-probability metrics), in one batched `score` call."""
    if metric == "ab":
        questions = [item for item in items if isinstance(item, ABQuestion)]
        summary = score_setting(bundle, [seed_variants(questions, AB_SEED)], specs, binary)
        return float(summary["p_match"]["mean"])
    contrasts = [item for item in items if isinstance(item, Contrast)]
    records = score(bundle, [{"prompt": c.prompt, "continuations": [c.positive, c.negative]} for c in contrasts],
                    specs, chat=True, binary=binary)
    return statistics.mean(float(r["continuations"][0]["logprob"]) - float(r["continuations"][1]["logprob"])
                           for r in records)


def generation_figures(bundle: Path, metric: str, items: Sequence[EvalItem], spec: Path | None,
                       max_new_tokens: int, perplexity: Perplexity, binary: Path | None = None) -> dict:
    """A generation metric of one setting: `value`, `nll` (mean NLL per token of the generations under the
    unsteered model) and the metric's parts (refusal rates, or the mean sentiment)."""
    prompted = [item for item in items if isinstance(item, Prompted)]
    prompts = [item.prompt for item in prompted]
    records = generate(bundle, prompts, spec, max_new_tokens, binary)
    nll = math.log(perplexity(prompts, records))
    if metric == "sentiment":
        value = statistics.mean(sentiment(r["text"]) for r in records)
        return {"value": value, "nll": nll, "sentiment": value}
    refused = [is_refusal(r["text"]) for r in records]
    harmful = statistics.mean(r for r, item in zip(refused, prompted, strict=True) if not item.benign)
    benign = statistics.mean(r for r, item in zip(refused, prompted, strict=True) if item.benign)
    return {"value": harmful - benign, "nll": nll, "refusal": harmful, "benign_refusal": benign}


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


def check_pairs(pairs: Path, methods: Sequence[str]) -> None:
    """l2s and w2s read a prompt and score or contrast two completions: prompt-contrast pairs cannot train them."""
    needing = [m for m in methods if m in COMPLETION_METHODS]
    if not needing:
        return
    for number, record in numbered_records(pairs, pairs.read_text(), PairsError):
        if not isinstance(record, dict) or not all(isinstance(record.get(k), str)
                                                   for k in ("prompt", "positive", "negative")):
            raise TuneError(f"{pairs}:{number}: {' and '.join(needing)} learn from completion pairs "
                            "({prompt, positive, negative}); this is not one")


def train_methods(bundle: Path, pairs: Path, methods: Sequence[str], layers: Sequence[int], w2s_scale: float,
                  read_gap: int, w2s_limit: int | None, out: Path, binary: Path | None,
                  log: Callable[[str], None], spans: Sequence[Sequence[int]] = ()) -> dict[str, dict]:
    """Train every method into `out`; per method its summary and the interventions its candidates start from
    (`base` for one shared artifact, `by_layer` for one per layer). Vectors cover the span layers too."""
    trained: dict[str, dict] = {}
    vector_outs = {VECTOR_METHODS[m]: out / f"{m}.safetensors" for m in methods if m in VECTOR_METHODS}
    if "w2s" in methods:
        vector_outs.setdefault("mean", out / "vector.safetensors")  # the router's bank
    if vector_outs:
        vector_layers = sorted({*layers, *(layer for span in spans for layer in span)})
        vectors = train_vectors(bundle, pairs, vector_outs, vector_layers, chat=True, binary=binary)
        for name in (m for m in methods if m in VECTOR_METHODS):
            trained[name] = {"file": f"{name}.safetensors", "base": {"kind": "vector", "path": f"{name}.safetensors"},
                             "norms": {str(layer): float((v.astype("float64") ** 2).sum() ** 0.5)
                                       for layer, v in vectors[VECTOR_METHODS[name]].items()}}
    if "l2s" in methods:
        by_layer, summaries = {}, {}
        for layer in layers:
            if layer - read_gap < 0:
                raise TuneError(f"l2s at layer {layer} would read layer {layer - read_gap}: lower --read-gap or "
                                "drop the layer")
            summary = train_l2s(bundle, pairs, layer - read_gap, layer, out, name=f"l2s_{layer}", binary=binary)
            by_layer[layer] = json.loads((out / f"l2s_{layer}.json").read_text())["interventions"][0]
            summaries[str(layer)] = {"read_layer": layer - read_gap,
                                     "validation_cosine": summary["validation_cosine"],
                                     "target_norm": summary["target_norm"]}
        trained["l2s"] = {"by_layer": by_layer, "layers": summaries}
    if "svf" in methods:
        summary = train_svf(bundle, pairs, list(layers), out, "svf", binary=binary)
        trained["svf"] = {"base": json.loads((out / "svf.json").read_text())["interventions"][0],
                          "validation_accuracy": summary.get("validation_accuracy")}
    if "w2s" in methods:
        read_layer = min(layers) - read_gap
        if read_layer < 0:
            raise TuneError(f"w2s would read layer {read_layer} (below the lowest layer {min(layers)} by --read-gap "
                            f"{read_gap}): lower --read-gap or raise the layers")
        summary = train_w2s(bundle, pairs, out / "vector.safetensors", sorted(layers), read_layer, out,
                            scale=w2s_scale, limit=w2s_limit, name="w2s", binary=binary)
        trained["w2s"] = {"base": json.loads((out / "w2s.json").read_text())["interventions"][0],
                          "read_layer": read_layer, "label_scale": w2s_scale, "label_counts": summary["label_counts"],
                          "validation_accuracy": summary["validation_accuracy"]}
    log(f"trained {', '.join(methods)} on {pairs} at layers {','.join(map(str, layers))}")
    return trained


def candidate_spec(candidate: Candidate, trained: dict[str, dict]) -> dict:
    """The spec of one candidate (paths relative to the tune folder, where the trained files are)."""
    method = trained[candidate.method]
    steered = list(candidate.layers or ())
    if "by_layer" in method and len(steered) != 1:
        raise TuneError(f"{candidate.method} steers one layer per candidate, got {layer_label(candidate.layers)}")
    base = method["by_layer"][steered[0]] if "by_layer" in method else method["base"]
    intervention = {**base, "scale": candidate.scale}
    if candidate.method in VECTOR_METHODS or candidate.method == "svf":
        intervention["layers"] = steered
    if candidate.method in VECTOR_METHODS:
        intervention["scale"] = candidate.scale / len(steered)
    return {"interventions": [intervention]}


def tuned_spec(winner: Candidate | None, trained: dict[str, dict]) -> dict:
    """The winning spec; no interventions when unsteered won."""
    return {"interventions": []} if winner is None else candidate_spec(winner, trained)


def tune(bundle: Path, pairs: Path, eval_path: Path, metric: str, methods: Sequence[str], layers: Sequence[int],
         scales: Sequence[float], out: Path, validation_fraction: float = 0.5, seed: int = 0,
         fluency_text: Path | None = None, fluency_tokens: int = 256, max_nll_increase: float = 0.5,
         budget_minutes: float | None = None, limit: int | None = None, binary: Path | None = None,
         clock: Callable[[], float] = time.monotonic, log: Callable[[str], None] = tqdm.write, *,
         benign: Path | None = None, scales_by_method: dict[str, Sequence[float]] | None = None,
         read_gap: int = 2, w2s_limit: int | None = 180, max_new_tokens: int = 48,
         references: Sequence[Path] = (), bound_from_reference: bool = False,
         spans: Sequence[Sequence[int]] = ()) -> dict:
    """The whole sweep; writes OUT/{tuned.json, tune.json, tune.md, tune.png} and the trained artifacts, and
    returns the report."""
    from .. import REPO

    budget = Budget(budget_minutes, clock)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise TuneError(f"methods are {', '.join(METHODS)}; got {', '.join(unknown) or 'none'}")
    if not layers or not scales:
        raise TuneError("tune needs at least one layer and one scale")
    if fluency_tokens < 2:
        raise TuneError(f"the fluency text needs at least 2 tokens, got {fluency_tokens}")
    if bound_from_reference and not references:
        raise TuneError("--bound-from-reference needs a --reference spec")
    check_pairs(pairs, methods)
    all_items = load_eval(eval_path, metric, benign)
    items = evenly_spaced(all_items, limit)
    validation_rows, held_out_rows = split_indices([item_key(i) for i in items], validation_fraction, seed,
                                                   [item_stratum(i) for i in items])
    validation = [items[i] for i in validation_rows]
    held_out = [items[i] for i in held_out_rows]
    generated = metric in GENERATION_METRICS
    text_path = fluency_text or REPO / "data" / "perplexity.txt"
    text = "" if generated else fluency_prefix(bundle, text_path, fluency_tokens)
    perplexity = Perplexity(bundle, binary)
    if any(not span for span in spans):
        raise TuneError("a span needs at least one layer")
    grid = candidate_grid(methods, layers, scales, scales_by_method, spans)
    w2s_scales = sorted((scales_by_method or {}).get("w2s") or scales)
    out.mkdir(parents=True, exist_ok=True)
    span_note = "".join(f", span {layer_label(span)}" for span in spans)
    log(f"tune: {len(grid)} candidates ({', '.join(methods)}; layers {','.join(map(str, layers))}{span_note}); "
        f"{len(validation)} validation and {len(held_out)} held-out items of {eval_path}"
        + (f" and {benign}" if benign else ""))

    def figures(part: Sequence[EvalItem], spec: Path | None) -> dict:
        """The metric (`value`) and fluency (`nll`) of one setting on one part of EVAL."""
        if generated:
            return generation_figures(bundle, metric, part, spec, max_new_tokens, perplexity, binary)
        specs = [spec] if spec else []
        nll, scored = fluency(bundle, text, specs, binary)
        return {"value": metric_value(bundle, metric, part, specs, binary), "nll": nll, "fluency_tokens": scored}

    started = clock()
    trained = train_methods(bundle, pairs, methods, layers, w2s_scales[len(w2s_scales) // 2], read_gap, w2s_limit,
                            out, binary, log, spans)
    train_seconds = clock() - started

    started = clock()
    base = {**figures(validation, None), "seconds": 0.0}
    base["seconds"] = clock() - started
    base["validation"] = base["value"]
    base_metric, base_nll = base["value"], base["nll"]
    log(f"unsteered: validation {METRICS[metric]} {base_metric:.4f}, fluency NLL {base_nll:.4f} per token "
        f"in {base['seconds']:.1f} s")
    reference_rows: list[dict[str, Any]] = []
    for reference in references:
        row: dict[str, Any] = {"spec": str(reference), "validation": figures(validation, reference)}
        row["validation"]["nll_increase"] = row["validation"]["nll"] - base_nll
        reference_rows.append(row)
        log(f"reference {reference}: validation {row['validation']['value']:.4f}, fluency "
            f"{row['validation']['nll_increase']:+.4f}")
    if bound_from_reference:
        max_nll_increase = max(0.0, reference_rows[0]["validation"]["nll_increase"])
        log(f"fluency bound from {references[0]}: {max_nll_increase:.4f} nats per token")

    candidate_file = out / "candidate.json"

    def evaluate(candidate: Candidate) -> dict:
        candidate_file.write_text(json.dumps(candidate_spec(candidate, trained)))
        result = figures(validation, candidate_file)
        increase = result["nll"] - base_nll
        return {"method": candidate.method, "layers": None if candidate.layers is None else list(candidate.layers),
                "scale": candidate.scale,
                **{k: v for k, v in result.items() if k != "value"}, "validation": result["value"],
                "delta": result["value"] - base_metric, "nll_increase": increase,
                "eligible": is_fluent(increase, max_nll_increase)}

    def estimate(first_s: float) -> None:
        left = (len(grid) - 1) * first_s
        log(f"time estimate: unsteered {base['seconds']:.1f} s, first candidate {first_s:.1f} s -> about "
            f"{left / 60:.1f} min for the other {len(grid) - 1} candidates, "
            f"{(budget.elapsed() + left + (2 + len(references)) * base['seconds']) / 60:.1f} min in all")

    with tqdm(total=len(grid), desc="tune", unit="candidate") as bar:
        results, skipped = sweep(grid, evaluate, budget, base["seconds"], estimate, lambda: bar.update())
    candidate_file.unlink(missing_ok=True)
    if skipped:
        log(f"budget of {budget_minutes:g} min reached after {len(results)} candidates; {len(skipped)} skipped")

    winner_index = select_winner(base_metric, results)
    winner = results[winner_index] if winner_index is not None else None
    winner_candidate = None if winner is None else Candidate(
        winner["method"], None if winner["layers"] is None else tuple(winner["layers"]), winner["scale"])
    tuned = tuned_spec(winner_candidate, trained)
    (out / "tuned.json").write_text(json.dumps(tuned, indent=2) + "\n")
    started = clock()
    base_held = figures(held_out, None)
    winner_held = base_held if winner is None else figures(held_out, out / "tuned.json")
    for row in reference_rows:
        row["held_out"] = figures(held_out, Path(row["spec"]))
    held_seconds = clock() - started

    for n, result in enumerate(results):
        result["winner"] = n == winner_index
    report = {
        "bundle": str(bundle), "pairs": str(pairs), "eval": str(eval_path), "benign": str(benign) if benign else None,
        "metric": metric, "metric_name": METRICS[metric], "same_file": pairs.resolve() == eval_path.resolve(),
        "methods": list(methods), "layers": list(layers), "spans": [list(span) for span in spans],
        "scales": [float(s) for s in scales],
        "scales_by_method": {m: [float(s) for s in v] for m, v in (scales_by_method or {}).items()},
        "read_gap": read_gap, "max_new_tokens": max_new_tokens if generated else None,
        "n_eval": len(all_items), "limit": limit, "n_used": len(items), "validation_fraction": validation_fraction,
        "seed": seed, "ab_seed": AB_SEED if metric == "ab" else None,
        "n_validation": len(validation), "n_held_out": len(held_out),
        "fluency": {"kind": "generations" if generated else "text", "text": None if generated else str(text_path),
                    "tokens": fluency_tokens, "scored": base.get("fluency_tokens"),
                    "max_nll_increase": max_nll_increase, "from_reference": bound_from_reference},
        "trained": {m: {k: v for k, v in t.items() if k not in ("base", "by_layer")} for m, t in trained.items()},
        "train_seconds": train_seconds,
        "unsteered": base,
        "references": reference_rows,
        "candidates": results,
        "n_candidates": len(grid),
        "skipped": [{"method": c.method, "layers": None if c.layers is None else list(c.layers), "scale": c.scale}
                    for c in skipped],
        "budget_minutes": budget_minutes,
        "winner": None if winner is None else {k: winner[k] for k in ("method", "layers", "scale", "validation",
                                                                       "delta", "nll_increase")},
        "held_out": {"unsteered": base_held["value"], "winner": winner_held["value"],
                     "delta": winner_held["value"] - base_held["value"], "unsteered_figures": base_held,
                     "winner_figures": winner_held, "seconds": held_seconds},
        "tuned_spec": str(out / "tuned.json"),
        "seconds": budget.elapsed(),
    }
    save_report(report, out / "tune", markdown, plot)
    return report


def _fmt(value: float) -> str:
    return f"{value:+.4f}"


METHOD_NOTES = {"vector": "mean difference; a span's scale is spread evenly over its layers",
                "pca": "first principal component, unit length",
                "l2s": "an L2S net per layer, reading {gap} layers below", "svf": "one SVF scorer over the layers",
                "w2s": "a W2S router over the layers' mean-difference vectors, labels at scale {w2s}"}


def parts(figures: dict) -> str:
    """The metric's parts of a generation metric, for the tables."""
    if "refusal" in figures:
        return f"{figures['refusal']:.3f} / {figures['benign_refusal']:.3f}"
    return ""


def markdown(report: dict) -> str:
    base, held, winner = report["unsteered"], report["held_out"], report["winner"]
    fl = report["fluency"]
    refusal = report["metric"] == "refusal"
    notes = "; ".join(f"{m} = " + METHOD_NOTES[m].format(gap=report["read_gap"], w2s=report["trained"].get(
        "w2s", {}).get("label_scale")) for m in report["methods"])
    lines = [
        f"# tune: {report['metric_name']} on `{report['eval']}`" + (f" and `{report['benign']}`" if refusal else ""),
        "",
        (f"Bundle `{report['bundle']}`; trained on `{report['pairs']}` ({notes}). {report['n_used']} of "
         f"{report['n_eval']} eval items, split (seed {report['seed']}) into {report['n_validation']} for "
         f"validation, on which every candidate was scored and the winner chosen, and {report['n_held_out']} held "
         "out, scored only for the winner, unsteered and the references. Higher is better."),
        "",
    ]
    if fl["kind"] == "text":
        lines.append(f"Fluency: mean NLL per token of the first {fl['scored'] + 1} tokens of `{fl['text']}` (plain "
                     "text), steered minus unsteered")
    else:
        lines.append(f"Fluency: mean NLL per token of each setting's greedy generations ({report['max_new_tokens']} "
                     "tokens at most) under the unsteered model, minus that of the unsteered generations (the log of "
                     "the perplexity ratio)")
    bound = (f"the first reference's own rise on validation, {fl['max_nll_increase']:.4f}" if fl["from_reference"]
             else f"{fl['max_nll_increase']:g}")
    lines[-1] += f"; above {bound} nats per token a candidate is not fluent and cannot win."
    lines.append("")
    if report["same_file"]:
        lines += ["Note: the eval file is the training file, so validation and held-out figures are on training data.",
                  ""]
    if winner is None:
        lines.append("**Winner: unsteered** (no fluent candidate beat it on validation); `tuned.json` has no "
                     "interventions.")
    else:
        lines.append(f"**Winner: {winner['method']}, layer {layer_label(winner['layers'])}, scale {winner['scale']:g}**"
                     f" (`tuned.json`), fluency {_fmt(winner['nll_increase'])} nats per token.")
    detail = " (refusal harmful / benign)" if refusal else ""
    lines += ["", f"| | validation | held out | held-out fluency ΔNLL/token | held out{detail} |", "|---|---|---|---|---|",
              (f"| unsteered | {base['validation']:.4f} | {held['unsteered']:.4f} | 0 | "
               f"{parts(held['unsteered_figures'])} |"),
              (f"| winner | {winner['validation'] if winner else base['validation']:.4f} | {held['winner']:.4f} | "
               f"{_fmt(held['winner_figures']['nll'] - held['unsteered_figures']['nll'])} | "
               f"{parts(held['winner_figures'])} |")]
    for row in report["references"]:
        lines.append(f"| reference `{row['spec']}` | {row['validation']['value']:.4f} | {row['held_out']['value']:.4f} "
                     f"| {_fmt(row['held_out']['nll'] - held['unsteered_figures']['nll'])} | "
                     f"{parts(row['held_out'])} |")
    lines += [f"| winner − unsteered | {_fmt(winner['delta'] if winner else 0.0)} | {_fmt(held['delta'])} | | |", ""]
    if report["skipped"]:
        lines += [f"The --budget of {report['budget_minutes']:g} min stopped the sweep after "
                  f"{len(report['candidates'])} of {report['n_candidates']} candidates: {len(report['skipped'])} "
                  "skipped (" + ", ".join(f"{c['method']} {layer_label(c['layers'])} {c['scale']:g}"
                                          for c in report["skipped"]) + ").", ""]
    lines += ["| method | layer | scale | validation | vs unsteered | fluency ΔNLL/token | eligible | s |"
              + (" harmful / benign |" if refusal else ""),
              "|---|---|---|---|---|---|---|---|" + ("---|" if refusal else ""),
              f"| unsteered | | | {base['validation']:.4f} | | 0 | yes | {base['seconds']:.1f} |"
              + (f" {parts(base)} |" if refusal else "")]
    for r in report["candidates"]:
        mark = "**" if r["winner"] else ""
        lines.append(f"| {mark}{r['method']}{mark} | {layer_label(r['layers'])} | {r['scale']:g} | "
                     f"{mark}{r['validation']:.4f}{mark} | {_fmt(r['delta'])} | {_fmt(r['nll_increase'])} | "
                     f"{'yes' if r['eligible'] else 'not fluent'} | {r['seconds']:.1f} |"
                     + (f" {parts(r)} |" if refusal else ""))
    vectors = {m: t for m, t in report["trained"].items() if "norms" in t}
    if vectors:
        lines += ["", "Vector lengths per layer: " + "; ".join(
            f"{m}: " + ", ".join(f"{layer} {n:.2f}" for layer, n in t["norms"].items()) for m, t in vectors.items())
            + "."]
    lines += ["", (f"Time: training {report['train_seconds']:.1f} s, held-out scoring {held['seconds']:.1f} s, "
                   f"{report['seconds'] / 60:.1f} min in all.")]
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
        bottom.axhline(bound, ls=":", color="C3", label=f"bound {bound:.3g}")
        bottom.axhline(0.0, ls="--", color="gray")
        runs = [r for r in report["candidates"] if r["method"] == method]
        for n, label in enumerate(dict.fromkeys(layer_label(r["layers"]) for r in runs)):
            line = sorted((r for r in runs if layer_label(r["layers"]) == label), key=lambda r: r["scale"])
            color = f"C{n % 10}"
            scales = [r["scale"] for r in line]
            label = f"layer {label}"
            top.plot(scales, [r["validation"] for r in line], "o-", color=color, label=label)
            bottom.plot(scales, [r["nll_increase"] for r in line], "o-", color=color, label=label)
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
    save_figure(fig, path)
