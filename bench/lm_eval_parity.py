"""EleutherAI's lm-evaluation-harness against `onnx-steer serve` (`make lm-eval`).

The same local multiple-choice tasks (bench/lm_eval_tasks, over the repo's data files) run twice through the
`lm-eval` CLI: once with its `local-completions` model pointed at the server (token-id prompts, `echo` +
`logprobs`, as the harness sends them), once with its own `hf` model on the bundle's source checkpoint
(the GGUF, as the project's HF reference loads it). Both use the source's tokenizer, so they score the same
token ids. Writes OUT.json and OUT.md with each
task's accuracy under both models, their difference in points, and per request the largest difference of
the log-likelihoods and how many choices the two models pick differently.
"""

from __future__ import annotations

import argparse
import glob
import importlib.metadata
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "export"))

from onnx_steer_export.runtime_client import find_binary, serving

TASKS_DIR = REPO / "bench" / "lm_eval_tasks"
TASKS = ("onnx_steer_optimism_ab", "onnx_steer_sentiment")
# The harness must never reach a hub: the tasks' data are local JSON files, the checkpoint a local folder.
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def hf_model_args(bundle: Path) -> str:
    """lm-eval `hf` model_args loading the bundle's own source checkpoint (a GGUF file or an HF folder) in fp32."""
    from onnx_steer_export.export.source import parse_source

    kind, path = parse_source(json.loads((bundle / "manifest.json").read_text())["source"])
    location = f"pretrained={path.parent},gguf_file={path.name}" if kind == "gguf" else f"pretrained={path}"
    return f"{location},dtype=float32"


def tokenizer_folder(bundle: Path, folder: Path) -> Path:
    """The source's tokenizer saved as an HF tokenizer folder (once), for `local-completions`, which cannot read
    one out of a GGUF file; `hf` loads the same tokenizer from the source itself."""
    if (folder / "tokenizer_config.json").is_file():
        return folder
    from onnx_steer_export.export.source import load

    load(json.loads((bundle / "manifest.json").read_text())["source"]).tokenizer.save_pretrained(folder)
    return folder


def run_harness(model: str, model_args: str, tasks: list[str], out: Path, limit: int | None,
                batch_size: int) -> tuple[dict, float]:
    """`lm-eval run` with --log_samples into `out`; the results JSON it wrote and the seconds it took."""
    command = [str(Path(sys.executable).with_name("lm-eval")), "run", "--model", model, "--model_args", model_args,
               "--tasks", ",".join(tasks), "--include_path", str(TASKS_DIR), "--batch_size", str(batch_size),
               "--output_path", str(out), "--log_samples", "--seed", "0", "--device", "cpu"]
    if limit is not None:
        command += ["--limit", str(limit)]
    started = time.monotonic()
    subprocess.run(command, check=True, cwd=REPO, env={**os.environ, **OFFLINE})
    seconds = time.monotonic() - started
    results = sorted(glob.glob(str(out / "**" / "results_*.json"), recursive=True))
    if not results:
        raise RuntimeError(f"lm-eval wrote no results under {out}")
    return json.loads(Path(results[-1]).read_text()), seconds


def loglikelihoods(out: Path, task: str) -> dict[int, list[float]]:
    """Per document, the log-likelihood of each choice, from the harness's samples file."""
    files = sorted(glob.glob(str(out / "**" / f"samples_{task}_*.jsonl"), recursive=True))
    if not files:
        raise RuntimeError(f"lm-eval wrote no samples for {task} under {out}")
    docs = {}
    for line in Path(files[-1]).read_text().splitlines():
        sample = json.loads(line)
        docs[sample["doc_id"]] = [float(resp[0][0]) for resp in sample["resps"]]
    return docs


def compare(tasks: list[str], server: dict, hf: dict, server_out: Path, hf_out: Path) -> list[dict]:
    rows = []
    for task in tasks:
        ours, theirs = loglikelihoods(server_out, task), loglikelihoods(hf_out, task)
        if ours.keys() != theirs.keys():
            raise RuntimeError(f"{task}: the two runs scored different documents")
        differences = [abs(a - b) for doc in ours for a, b in zip(ours[doc], theirs[doc], strict=True)]
        picks = sum(max(range(len(ours[d])), key=ours[d].__getitem__)
                    != max(range(len(theirs[d])), key=theirs[d].__getitem__) for d in ours)
        row = {"task": task, "docs": len(ours), "requests": len(differences),
               "max_loglikelihood_difference": max(differences), "different_picks": picks}
        for metric in ("acc", "acc_norm"):
            a, b = server["results"][task][f"{metric},none"], hf["results"][task][f"{metric},none"]
            row[metric] = {"server": a, "hf": b, "difference_points": 100 * (a - b),
                           "stderr_hf": hf["results"][task].get(f"{metric}_stderr,none")}
        rows.append(row)
    return rows


def shown(path: Path) -> str:
    """A path as the report shows it: relative to the repo when inside it."""
    resolved = path.resolve()
    return str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else str(path)


def markdown(report: dict) -> str:
    documents = "all documents" if report["limit"] is None else f"{report['limit']} documents per task"
    lines = [
        "# lm-evaluation-harness: `onnx-steer serve` against lm-eval's own `hf` model", "",
        (f"lm-eval {report['lm_eval_version']}; bundle `{report['bundle']}`; the same local tasks "
         f"(`bench/lm_eval_tasks`), {documents}"
         f", zero-shot. Server: `local-completions` (token-id prompts, `echo`, `logprobs`), batch "
         f"{report['batch_size']}, {report['server_seconds']:.0f} s. hf: float32 on CPU, batch "
         f"{report['batch_size']}, {report['hf_seconds']:.0f} s."), "",
        ("| task | docs | acc server | acc hf | points | acc_norm server | acc_norm hf | points | max abs "
         "Δ log-likelihood | different picks |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["tasks"]:
        acc, norm = row["acc"], row["acc_norm"]
        lines.append(f"| {row['task']} | {row['docs']} | {acc['server']:.4f} | {acc['hf']:.4f} | "
                     f"{acc['difference_points']:+.2f} | {norm['server']:.4f} | {norm['hf']:.4f} | "
                     f"{norm['difference_points']:+.2f} | {row['max_loglikelihood_difference']:.2e} | "
                     f"{row['different_picks']} |")
    verdict = "within" if report["within_tolerance"] else "NOT within"
    lines += ["", (f"Largest accuracy difference {report['max_difference_points']:.2f} points: {verdict} the "
                   f"{report['tolerance_points']:g}-point tolerance.")]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=REPO / "onnx" / "smollm2-135m-instruct")
    parser.add_argument("--tokenizer", type=Path,
                        help="HF tokenizer folder for `local-completions` (default: BUNDLE-tokenizer, written once "
                        "from the bundle's source)")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma list of tasks in bench/lm_eval_tasks")
    parser.add_argument("--limit", type=int, help="documents per task (default: all)")
    parser.add_argument("--batch-size", type=int, default=8, help="requests per call, both models")
    parser.add_argument("--tolerance", type=float, default=1.0, help="largest accuracy difference, in points")
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "lm_eval",
                        help="writes OUT.json and OUT.md; the harness's own outputs go to OUT/ (not committed)")
    args = parser.parse_args()

    tasks = [t for t in args.tasks.split(",") if t]
    tokenizer = tokenizer_folder(args.bundle, args.tokenizer or args.bundle.with_name(args.bundle.name + "-tokenizer"))
    runs = args.out
    with serving(find_binary(), args.bundle, "--max-batch", str(args.batch_size)) as (url, _):
        served = requests.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
        server, server_seconds = run_harness(
            "local-completions", f"model={served},base_url={url}/v1/completions,tokenizer_backend=huggingface,"
            f"tokenizer={tokenizer},tokenized_requests=True,max_retries=1", tasks, runs / "server", args.limit,
            args.batch_size)
    hf_args = hf_model_args(args.bundle)
    hf, hf_seconds = run_harness("hf", hf_args, tasks, runs / "hf", args.limit, args.batch_size)
    rows = compare(tasks, server, hf, runs / "server", runs / "hf")
    worst = max(abs(r[m]["difference_points"]) for r in rows for m in ("acc", "acc_norm"))
    report = {"lm_eval_version": importlib.metadata.version("lm-eval"), "bundle": shown(args.bundle), "hf_model_args": hf_args.replace(str(REPO) + "/", ""), "tokenizer": shown(tokenizer),
              "limit": args.limit, "batch_size": args.batch_size, "server_seconds": server_seconds,
              "hf_seconds": hf_seconds, "tasks": rows, "max_difference_points": worst,
              "tolerance_points": args.tolerance, "within_tolerance": worst <= args.tolerance}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    if not report["within_tolerance"]:
        sys.exit(f"lm-eval: the server's accuracy differs from hf's by {worst:.2f} points (> {args.tolerance:g})")


if __name__ == "__main__":
    main()
