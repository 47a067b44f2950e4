"""tune: pick the steering method, layer and scale for a behaviour on the user's own data."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .. import REPO
from .common import Commands, add_bundle, add_command, existing_file, layer_list, scale_list

METHOD_NAMES = ("vector", "pca")


def method_list(text: str) -> list[str]:
    """Comma-separated method names, e.g. vector,pca."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in METHOD_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"methods are a comma list of {', '.join(METHOD_NAMES)}, got {text!r}")
    return list(dict.fromkeys(names))


def cmd_tune(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from ..eval.tune import tune

    num_layers = json.loads((args.bundle / "manifest.json").read_text()).get("model", {}).get("num_layers")
    bad = [layer for layer in args.layers if layer < 0 or (num_layers is not None and layer >= num_layers)]
    if bad:
        parser.error(f"--layers {','.join(map(str, bad))} out of range: the bundle has layers 0-{num_layers - 1}"
                     if num_layers else f"--layers must not be negative, got {bad}")
    if not 0 < args.validation_fraction < 1:
        parser.error(f"--validation-fraction must lie strictly between 0 and 1, got {args.validation_fraction}")
    if args.fluency_tokens < 2:
        parser.error(f"--fluency-tokens must be at least 2, got {args.fluency_tokens}")
    if args.max_nll_increase < 0:
        parser.error(f"--max-nll-increase must not be negative, got {args.max_nll_increase}")
    if args.budget is not None and args.budget <= 0:
        parser.error(f"--budget must be a positive number of minutes, got {args.budget}")
    if args.limit is not None and args.limit < 2:
        parser.error(f"--limit must be at least 2 (a validation and a held-out item), got {args.limit}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out} exists and is not a folder")
    report = tune(args.bundle, args.pairs, args.eval, args.metric, args.methods, args.layers, args.scales, out,
                  args.validation_fraction, args.seed, args.fluency_text, args.fluency_tokens, args.max_nll_increase,
                  args.budget, args.limit)
    print((out / "tune.md").read_text())
    print(f"wrote {out}/tuned.json, tune.json, tune.md and tune.png ({report['seconds'] / 60:.1f} min)")


def register(commands: Commands) -> None:
    tune = add_command(
        commands, "tune", cmd_tune,
        help="pick method, layer and scale of a steering vector on your own data, under a fluency bound",
        description="Trains each --methods vector (vector: mean difference, pca: first principal component) once "
        "over all --layers from --pairs, then scores every (method, layer, scale) on a validation split of --eval "
        "with the runtime's log-probabilities: --metric ab = mean p(match) over CAA-format questions (one seed, "
        "letters balanced), --metric logprob = mean log p(positive) - log p(negative) over {prompt, positive, "
        "negative} pairs. Candidates whose mean NLL per token on --fluency-text rises more than "
        "--max-nll-increase over unsteered cannot win. The winner (or unsteered, if nothing fluent beats it) is "
        "scored once on the held-out rest. Writes OUT/tuned.json (the winning spec), tune.{json,md,png} and the "
        "trained METHOD.safetensors.",
    )
    add_bundle(tune)
    tune.add_argument("--pairs", required=True, type=existing_file,
                      help="training pairs JSONL ({prompt, positive, negative} or {positive_prompt, negative_prompt})")
    tune.add_argument("--eval", required=True, type=existing_file,
                      help="eval JSONL: CAA questions (--metric ab) or {prompt, positive, negative} (--metric logprob)")
    tune.add_argument("--metric", required=True, choices=["ab", "logprob"], help="what the candidates are ranked by")
    tune.add_argument("--methods", type=method_list, default=list(METHOD_NAMES), help="comma list of vector, pca")
    tune.add_argument("--layers", required=True, type=layer_list, help="A-B or A,B,C")
    tune.add_argument("--scales", required=True, type=scale_list,
                      help="comma-separated scales, e.g. -8,8,16 (write --scales=-8,... when the first is negative)")
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
