"""eval, eval-behaviour, eval-svf, eval-autosteer, eval-safety, eval-garak, eval-precision, eval-ab, plot-behaviour: reports
on what the runtime generates or scores."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .. import REPO
from .common import (
    Commands,
    add_bundle,
    add_command,
    add_generation,
    add_methods,
    add_report_out,
    existing_file,
    layer_list,
    scale_list,
)


def cmd_eval(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from ..eval.harness import evaluate, plot

    report = evaluate(args.bundle, args.task, args.prompts, args.spec, args.sweep_scale, args.benign,
                      args.max_new_tokens, args.limit)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot(report, Path(args.plot))
    metric = "refusal_rate" if args.task == "refusal" else "sentiment"
    for run in [report["baseline"], *report["steered"]]:
        extra = f", benign refusal {run['benign_refusal_rate']:.3f}" if run.get("benign_refusal_rate") is not None else ""
        label = "unsteered" if run is report["baseline"] else f"scale {run['scale']}"
        print(f"{label:>12}: {metric} {run[metric]:.3f}{extra}, perplexity {run['perplexity']:.2f}")
    print(f"wrote {args.out}" + (f" and {args.plot}" if args.plot else ""))


def cmd_eval_behaviour(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from ..eval.behaviour import evaluate_methods, markdown_table, plot_sweep, write_report
    from ..eval.harness import report_file

    scales = args.sweep_scale
    report = evaluate_methods(args.bundle, dict(args.method), scales, args.style, args.limit, args.max_new_tokens)
    out = Path(args.out)
    write_report(report, out)
    if scales:
        plot_sweep(report, report_file(out, ".png"))
    print(markdown_table(report))
    print(f"wrote {report_file(out, '.json')}, {report_file(out, '.md')}" + (" and .png" if scales else ""))


def cmd_eval_svf(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from ..eval.concepts import eval_svf, markdown, write

    report = eval_svf(args.bundle, args.field, args.vector, args.second, args.sweep_scale, args.long_scale,
                      args.second_scale, args.limit, args.long_limit, args.max_new_tokens, args.long_tokens,
                      args.multi_tokens)
    write(report, Path(args.out))
    print(markdown(report))
    print(f"wrote {args.out}.json, .md and .png")


def cmd_eval_garak(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from ..eval.garak_client import evaluate, markdown, write

    try:
        report = evaluate(args.bundle, args.method, Path(args.garak), Path(args.work), args.cap, args.max_new_tokens,
                          args.parallel, args.probes or None)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    write(report, Path(args.out))
    print(markdown(report))
    print(f"wrote {args.out}.json, .md and .png")


def cmd_eval_safety(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from ..eval.cross_safety import check_comparable, eval_safety, markdown, updated, write

    previous = None
    if args.update:
        try:
            previous = json.loads(Path(f"{args.out}.json").read_text())
            # Before the generations, what can be checked without them.
            check_comparable(previous, {"bundle": str(args.bundle), "limit": args.limit,
                                        "max_new_tokens": args.max_new_tokens})
        except (OSError, json.JSONDecodeError, ValueError) as error:
            parser.error(f"--update needs a comparable report {args.out}.json: {error}")
    report = eval_safety(args.bundle, dict(args.method), args.limit, args.max_new_tokens)
    if previous is not None:
        try:
            report = updated(previous, report)
        except ValueError as error:
            parser.error(f"--update: {error}")
    write(report, Path(args.out))
    print(markdown(report))
    print(f"wrote {args.out}.json, .md and .png")


def cmd_eval_autosteer(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from ..eval.safety import eval_autosteer, markdown, write

    report = eval_autosteer(args.bundle, dict(args.method), args.limit, args.max_new_tokens)
    write(report, Path(args.out))
    print(markdown(report))
    print(f"wrote {args.out}.json, .md and .png")


def cmd_eval_precision(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from ..eval.harness import report_file
    from ..eval.precision import run

    run(args.reference, args.bundle, args.text, args.prompts, args.limit, args.max_new_tokens, args.max_tokens,
        args.repeats, Path(args.out))
    print(report_file(Path(args.out), ".md").read_text())


def cmd_check_model(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from ..eval.harness import save_report
    from ..eval.model_check import check_model, markdown, passed
    from ..export.source import load

    report = check_model(load(args.source), args.bundle, new_tokens=args.max_new_tokens,
                         speed_prompt_tokens=args.prompt_tokens, repeats=args.repeats)
    save_report(report, Path(args.out), markdown)
    print(markdown(report))
    if not passed(report):
        parser.exit(1, "check-model: the bundle does not match HF within the tolerances above\n")


def cmd_eval_ab(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from ..data.ab import ABError
    from ..eval.ab import evaluate_ab, markdown, write

    if args.vector is not None and (not args.layers or not args.scales):
        parser.error("--vector needs --layers and --scales")
    if args.layers and args.vector is None:
        parser.error("--layers needs --vector")
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    try:
        report = evaluate_ab(args.bundle, args.questions, args.steer, args.vector, args.layers or [],
                             args.scales or [], args.seeds, args.limit)
    except ABError as err:
        parser.error(str(err))
    write(report, Path(args.out))
    print(markdown(report))
    print(f"wrote {args.out}.json, .md and .png")


def cmd_plot_behaviour(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from ..eval.behaviour import plot_styles

    plot_styles([json.loads(path.read_text()) for path in args.report], Path(args.out))
    print(f"wrote {args.out}")


def register(commands: Commands) -> None:
    evaluation = add_command(
        commands, "eval", cmd_eval,
        help="score steered generations: refusal rates, VADER sentiment, perplexity, sweeps and plots",
        description="Greedy --chat generations through the Rust binary, unsteered and with the spec (or once per "
        "--sweep-scale value, which replaces every intervention's scale). Refusals are flagged by a documented "
        "phrase matcher (metrics.REFUSAL_PHRASES), sentiment is mean VADER compound, fluency is the perplexity "
        "of the outputs under the unsteered HF model.",
    )
    add_bundle(evaluation)
    evaluation.add_argument("--task", required=True, choices=["refusal", "sentiment"])
    evaluation.add_argument("--prompts", required=True, type=existing_file,
                            help="held-out prompts: .txt (one per line) or .jsonl")
    evaluation.add_argument("--benign", type=existing_file, help="benign prompts for over-refusal (refusal task)")
    evaluation.add_argument("--spec", type=existing_file, help="steer spec JSON (omit for an unsteered report)")
    evaluation.add_argument("--sweep-scale", type=scale_list, help="comma-separated scales, e.g. -8,-4,0,4,8")
    add_generation(evaluation, "use only the first N prompts of each file")
    evaluation.add_argument("--out", required=True, help="report JSON")
    evaluation.add_argument("--plot", help="PNG of behaviour and perplexity against scale (with --sweep-scale)")

    behaviour = add_command(
        commands, "eval-behaviour", cmd_eval_behaviour,
        help="score input-dependent behaviour: refuse harmful, refer advice questions, answer benign",
        description="Greedy --chat generations on the held-out split: harmful_test (refuse, or refer when it asks "
        "for medical/legal/financial advice) and benign_prompts.txt. Reports per-category rates, benign "
        "over-refusal and the combined score (mean of refuse and refer rates minus over-refusal), per method "
        "and scale, with a seed summary for methods named NAME_seedK.",
    )
    add_bundle(behaviour)
    add_methods(behaviour)
    behaviour.add_argument("--sweep-scale", type=scale_list,
                           help="comma-separated scales replacing every intervention's scale")
    behaviour.add_argument("--style", choices=["plain", "roleplay"], default="plain",
                           help="roleplay wraps every prompt in a held-out role-play phrasing")
    add_generation(behaviour, "use at most N prompts per category, evenly spaced (faster)")
    add_report_out(behaviour, ".json, .md (and .png)")

    svf = add_command(
        commands, "eval-svf", cmd_eval_svf,
        help="SVF vs a static vector of matched strength: backfire rate, mean effect, long and multi-attribute",
        description="On the held-out benign prompts: both methods at each --sweep-scale (backfire rate, mean VADER "
        "effect, perplexity), long generations at --long-scale (VADER of each text's second half), and with "
        "--second, two SVF concepts at once (sentiment at --long-scale, the second at --second-scale).",
    )
    add_bundle(svf)
    svf.add_argument("--field", required=True, type=existing_file,
                     help="SVF spec of the sentiment concept (train-svf NAME.json)")
    svf.add_argument("--vector", required=True, type=existing_file,
                     help="the matched static vector spec (NAME_vector.json)")
    svf.add_argument("--second", type=existing_file,
                     help="SVF spec of a second concept (verbosity) for the multi-attribute test")
    svf.add_argument("--sweep-scale", type=scale_list, default="-8,-4,4,8", help="comma-separated step lengths")
    svf.add_argument("--long-scale", type=float, default=4.0, help="scale of the long and multi runs")
    svf.add_argument("--second-scale", type=float, default=8.0, help="scale of the second concept")
    add_generation(svf, "use at most N held-out prompts, evenly spaced")
    svf.add_argument("--long-limit", type=int, default=32, help="prompts of the long-generation run")
    svf.add_argument("--long-tokens", type=int, default=256)
    svf.add_argument("--multi-tokens", type=int, default=128)
    add_report_out(svf)

    autosteer = add_command(
        commands, "eval-autosteer", cmd_eval_autosteer,
        help="AutoSteer vs unsteered and a refusal vector: attack success, over-refusal, benign exact match, AUROC",
        description="Greedy generations on harmful_test and the held-out benign prompts, unsteered and per --method.",
    )
    add_bundle(autosteer)
    add_methods(autosteer)
    add_generation(autosteer, "use at most N prompts per set, evenly spaced")
    add_report_out(autosteer)

    safety = add_command(
        commands, "eval-safety", cmd_eval_safety,
        help="safety steering across datasets: attack success on Do-Not-Answer and HarmBench, over-refusal per "
        "XSTest type, referral on advice prompts, outputs unchanged, the AutoSteer prober's ROC",
        description="Greedy generations on the test splits only (data/harmful_test, harmbench_test, "
        "overrefusal_{safe,unsafe}_test, advice_test and benign_prompts), unsteered and per --method; writes "
        "OUT.{json,md,png} (the plot: attack success against over-refusal per setting, and each prober's ROC).",
    )
    add_bundle(safety)
    add_methods(safety)
    add_generation(safety, "use at most N prompts per set, evenly spaced")
    add_report_out(safety)
    safety.add_argument("--update", action="store_true",
                        help="rerun only the --method settings (and unsteered, which must reproduce OUT.json's) "
                        "and keep OUT.json's other methods")

    garak = add_command(
        commands, "eval-garak", cmd_eval_garak,
        help="garak (the LLM vulnerability scanner) as a client of onnx-steer serve, unsteered and per --method",
        description="Serves the bundle, runs garak's download-free probes (the DAN family, encoding.InjectBase64 and "
        "InjectHex, promptinject.HijackHateHumans and HijackKillHumans) through its OpenAI-compatible generator, "
        "steering each --method by name through extra_body, and reports garak's attack success per probe family "
        "and, for AutoSteer specs, the gate-open rate on the prompts garak sent. Every --method spec must be in "
        "one folder (served as --steer-dir). Writes OUT.{json,md,png}.",
    )
    add_bundle(garak)
    add_methods(garak)
    garak.add_argument("--garak", default=str(REPO / ".venv-garak/bin/python"),
                       help="the Python interpreter that has garak 0.17.1 (make eval-garak installs it)")
    garak.add_argument("--work", default=str(REPO / "target/garak"), help="garak's data, config and report folder")
    garak.add_argument("--cap", type=int, default=20, help="most prompts per probe (garak's soft_probe_prompt_cap)")
    garak.add_argument("--max-new-tokens", type=int, default=48)
    garak.add_argument("--parallel", type=int, default=8, help="garak's parallel attempts, and the server's --max-batch")
    garak.add_argument("--probes", nargs="+", metavar="PROBE", help="garak probes (module.Class) instead of the default set")
    add_report_out(garak)

    precision = add_command(
        commands, "eval-precision", cmd_eval_precision,
        help="perplexity, greedy agreement and speed of lower-precision bundles against fp32",
        description="For the reference and each --bundle: perplexity on a fixed text, greedy chat generations "
        "compared token by token with the reference's, and onnx-steer bench speed. Writes OUT.{json,md,png}.",
    )
    add_bundle(precision, "--reference", help="the fp32 bundle")
    add_bundle(precision, action="append", help="a bundle to compare (repeatable)")
    precision.add_argument("--text", type=existing_file, default=str(REPO / "data/perplexity.txt"),
                           help="text for perplexity")
    precision.add_argument("--prompts", type=existing_file, default=str(REPO / "data/benign_prompts.txt"),
                           help="held-out chat prompts")
    add_generation(precision, "prompts used", limit=32, max_new_tokens=32)
    precision.add_argument("--max-tokens", type=int, default=512, help="tokens of the text scored")
    precision.add_argument("--repeats", type=int, default=3, help="timed bench runs per bundle")
    precision.add_argument("--out", default=str(REPO / "reports/precision"), help="report path stem")

    check = add_command(
        commands, "check-model", cmd_check_model,
        help="check a bundle against the HF model it came from: segments, greedy tokens, log-probs, speed",
        description="For a bundle and its --source: the scaled error of every segment on HF's own inputs, "
        "greedy generations against HF generate, `onnx-steer score` log-probabilities against HF's, and "
        "prefill/decode speed beside HF eager in the same run. Writes OUT.{json,md}; exits 1 when a check fails.",
    )
    add_bundle(check)
    check.add_argument("--source", required=True, help="what the bundle was exported from (as for export)")
    check.add_argument("--max-new-tokens", type=int, default=32, help="greedy tokens per prompt")
    check.add_argument("--prompt-tokens", type=int, default=128, help="prompt length of the speed run")
    check.add_argument("--repeats", type=int, default=3, help="timed runs per runtime")
    add_report_out(check, ".json and .md")

    ab = add_command(
        commands, "eval-ab", cmd_eval_ab,
        help="CAA-style A/B eval: p(matching answer) / (p(A) + p(B)), unsteered, per spec and per layer and scale",
        description="Each question (CAA format: question with (A)/(B) choices, answer_matching_behavior, "
        "answer_not_matching_behavior) is the chat user turn; onnx-steer score gives the log-probabilities of the "
        "answers starting '(A' and '(B', and p(match) is averaged over the questions. Each of --seeds seeds "
        "shuffles the order and reassigns the matching letter (half A, half B, by swapping the choices), and the "
        "report gives the spread over seeds. Settings: unsteered, each --steer spec (as written, or at each "
        "--scales value), and with --vector a one-layer spec per --layers entry and scale. Writes OUT.{json,md,png} "
        "(p(match) against scale, one line per layer).",
    )
    add_bundle(ab)
    ab.add_argument("--questions", type=existing_file, default=str(REPO / "data/ab_optimism_test.jsonl"),
                    help="CAA-format JSONL (default: the shipped optimism test split)")
    ab.add_argument("--steer", action="append", default=[], type=existing_file, metavar="SPEC",
                    help="a steer spec to evaluate (repeatable; swept over --scales when given)")
    ab.add_argument("--vector", type=existing_file,
                    help="a vector file (direction.{L} tensors, e.g. from train-vector) to sweep over --layers")
    ab.add_argument("--layers", type=layer_list, help="layers of the --vector sweep, A-B or A,B,C")
    ab.add_argument("--scales", type=scale_list, help="comma-separated scales, e.g. -2,-1,1,2")
    ab.add_argument("--seeds", type=int, default=3, help="seeds of the question order and matching letter")
    ab.add_argument("--limit", type=int, help="use at most N questions, evenly spaced (faster)")
    add_report_out(ab)

    bars = add_command(
        commands, "plot-behaviour", cmd_plot_behaviour,
        help="bar chart of eval-behaviour reports side by side (e.g. plain vs role-play prompts)",
        description="One panel per report: refuse, refer, over-refusal and combined score per method.",
    )
    bars.add_argument("--report", action="append", required=True, type=existing_file,
                      help="an eval-behaviour JSON (repeatable)")
    bars.add_argument("--out", required=True, help="PNG to write")
