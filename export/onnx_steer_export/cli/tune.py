"""tune: pick the steering method, layer and scale for a behaviour on the user's own data."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .. import REPO
from .common import Commands, add_bundle, add_command, existing_file, layer_list, scale_list

METHOD_NAMES = ("vector", "pca", "l2s", "svf", "w2s")


def method_list(text: str) -> list[str]:
    """Comma-separated method names, e.g. vector,pca,l2s."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in METHOD_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"methods are a comma list of {', '.join(METHOD_NAMES)}, got {text!r}")
    return list(dict.fromkeys(names))


def span_list(text: str) -> list[list[int]]:
    """Comma-separated spans A-B (inclusive), e.g. 10-14,8-12."""
    spans = []
    for item in text.split(","):
        first, sep, last = item.strip().partition("-")
        try:
            span = list(range(int(first), int(last) + 1)) if sep else []
        except ValueError:
            span = []
        if not span:
            raise argparse.ArgumentTypeError(f"spans are A-B[,C-D] with A <= B, got {text!r}")
        spans.append(span)
    return spans


def cmd_tune(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from ..eval.tune import tune

    num_layers = json.loads((args.bundle / "manifest.json").read_text()).get("model", {}).get("num_layers")
    asked = [*args.layers, *(layer for span in args.spans for layer in span)]
    bad = sorted({layer for layer in asked if layer < 0 or (num_layers is not None and layer >= num_layers)})
    if bad:
        parser.error(f"--layers/--spans {','.join(map(str, bad))} out of range: the bundle has layers 0-{num_layers - 1}"
                     if num_layers else f"--layers must not be negative, got {bad}")
    if not 0 < args.validation_fraction < 1:
        parser.error(f"--validation-fraction must lie strictly between 0 and 1, got {args.validation_fraction}")
    if args.fluency_tokens < 2:
        parser.error(f"--fluency-tokens must be at least 2, got {args.fluency_tokens}")
    if args.max_nll_increase < 0:
        parser.error(f"--max-nll-increase must not be negative, got {args.max_nll_increase}")
    if args.budget is not None and args.budget <= 0:
        parser.error(f"--budget must be a positive number of minutes, got {args.budget}")
    if args.read_gap < 1:
        parser.error(f"--read-gap must be at least 1 (a net reads a layer below the one it steers), got {args.read_gap}")
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.bound_from_reference and not args.reference:
        parser.error("--bound-from-reference needs a --reference spec")
    if args.limit is not None and args.limit < 2:
        parser.error(f"--limit must be at least 2 (a validation and a held-out item), got {args.limit}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out} exists and is not a folder")
    scales_by_method = {m: getattr(args, f"{m}_scales") for m in METHOD_NAMES if getattr(args, f"{m}_scales")}
    report = tune(args.bundle, args.pairs, args.eval, args.metric, args.methods, args.layers, args.scales, out,
                  args.validation_fraction, args.seed, args.fluency_text, args.fluency_tokens, args.max_nll_increase,
                  args.budget, args.limit, benign=args.benign, scales_by_method=scales_by_method,
                  read_gap=args.read_gap, w2s_limit=args.w2s_limit, max_new_tokens=args.max_new_tokens,
                  references=args.reference, bound_from_reference=args.bound_from_reference, spans=args.spans)
    print((out / "tune.md").read_text())
    print(f"wrote {out}/tuned.json, tune.json, tune.md and tune.png ({report['seconds'] / 60:.1f} min)")


def register(commands: Commands) -> None:
    tune = add_command(
        commands, "tune", cmd_tune,
        help="pick steering method, layer and scale on your own data, under a fluency bound",
        description="Trains each of --methods once from --pairs (vector: mean difference, pca: first principal "
        "component, l2s: an L2S net per layer, svf: one SVF scorer over the layers, w2s: a router over the layers' "
        "mean-difference vectors), then scores every (method, layer, scale) on a validation split of --eval with the "
        "runtime: --metric ab = mean p(match) over CAA-format questions (one seed, letters balanced); logprob = mean "
        "log p(positive) - log p(negative) over {prompt, positive, negative} pairs; refusal = refusal rate on the "
        "--eval prompts minus that on the --benign prompts, from greedy generations; sentiment = mean VADER "
        "compound of greedy generations. Fluency: for ab and logprob the NLL per token of --fluency-text, for "
        "refusal and sentiment that of the generations under the unsteered model; a candidate whose NLL rises "
        "more than --max-nll-increase (or the first --reference's rise, with --bound-from-reference) cannot win. "
        "The winner (or unsteered, if nothing fluent beats it), unsteered and every --reference are scored once on "
        "the held-out rest. Writes OUT/tuned.json (the winning spec), tune.{json,md,png} and the trained files.",
    )
    add_bundle(tune)
    tune.add_argument("--pairs", required=True, type=existing_file,
                      help="training pairs JSONL ({prompt, positive, negative} or {positive_prompt, negative_prompt})")
    tune.add_argument("--eval", required=True, type=existing_file,
                      help="eval file: CAA questions (--metric ab), {prompt, positive, negative} (logprob), or "
                      "prompts, one per line or {prompt} JSONL (refusal: harmful ones; sentiment)")
    tune.add_argument("--benign", type=existing_file,
                      help="benign prompts for --metric refusal (their refusals count against a candidate)")
    tune.add_argument("--metric", required=True, choices=["ab", "logprob", "refusal", "sentiment"],
                      help="what the candidates are ranked by")
    tune.add_argument("--methods", type=method_list, default=["vector", "pca"],
                      help=f"comma list of {', '.join(METHOD_NAMES)} (default vector,pca)")
    tune.add_argument("--layers", required=True, type=layer_list, help="A-B or A,B,C")
    tune.add_argument("--spans", type=span_list, default=[], metavar="A-B[,C-D]",
                      help="vector and pca also steer every layer of each span at once (e.g. 10-14), the "
                      "scale spread evenly over the span's layers")
    tune.add_argument("--scales", required=True, type=scale_list,
                      help="comma-separated scales, e.g. -8,8,16 (write --scales=-8,... when the first is negative)")
    for method in METHOD_NAMES:
        tune.add_argument(f"--{method}-scales", type=scale_list, metavar="SCALES",
                          help=f"scales for {method} instead of --scales")
    tune.add_argument("--read-gap", type=int, default=2,
                      help="l2s and w2s read this many layers below the (lowest) layer they steer")
    tune.add_argument("--w2s-limit", type=int, default=180, help="pairs the w2s labels are scored on (evenly spaced)")
    tune.add_argument("--max-new-tokens", type=int, default=48, help="generation length for refusal and sentiment")
    tune.add_argument("--reference", type=existing_file, action="append", default=[],
                      help="a hand-picked spec scored beside the winner on validation and held out (repeatable)")
    tune.add_argument("--bound-from-reference", action="store_true",
                      help="the fluency bound is the first --reference's own NLL rise on validation")
    tune.add_argument("--validation-fraction", type=float, default=0.5,
                      help="share of the eval prompts used to choose; the rest is held out for the winner's figure")
    tune.add_argument("--seed", type=int, default=0, help="seed of the validation/held-out split")
    tune.add_argument("--fluency-text", type=existing_file, default=str(REPO / "data/perplexity.txt"),
                      help="neutral reference text for the fluency bound")
    tune.add_argument("--fluency-tokens", type=int, default=256, help="tokens of the fluency text scored")
    tune.add_argument("--max-nll-increase", type=float, default=0.5,
                      help="largest rise of the fluency text's NLL per token (nats) a winner may cause")
    tune.add_argument("--budget", type=float, metavar="MINUTES",
                      help="stop the sweep before a candidate that would end past this many minutes from the start")
    tune.add_argument("--limit", type=int, help="use at most N eval items, evenly spaced (faster)")
    tune.add_argument("--out", required=True, help="output folder")
