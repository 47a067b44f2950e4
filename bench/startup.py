"""Start-up to the first token and peak memory, onnx-steer against llama.cpp on the same weights (`make startup`).

Each configuration runs in a fresh process, taking turns round after round (the page cache is warm
for all of them after an untimed first round):

  (a) `onnx-steer generate --max-new-tokens 1` on the bundle: the process's whole wall time (exec, ONNX
      Runtime loading, tokenizer, every session, the prompt's prefill, the first token) and its peak RSS,
      with the weights prepacked for ONNX Runtime's GEMM (the default) and as mapped (`--no-prepack`);
  (b) the same on a baseline binary and bundle, when given (the previous commit's build and export);
  (c) llama.cpp through llama-cpp-python on the F32 GGUF of the same weights: the time from `Llama(...)`
      to its first sampled token, measured inside the process (Python's start-up and the import of
      llama_cpp are left out, which favours llama.cpp), and the process's peak RSS (which includes
      the Python interpreter).

Peak RSS is also given over the weight bytes the run loads (the bundle's segment graphs and weights
files; the GGUF file). Writes bench/results/cpu_startup.{json,md}.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "export"))

from onnx_steer_export.export.graph_file import chain_weight_bytes

from peers import default_gguf

PROMPT = "Describe your morning commute in two sentences."
LLAMA = "llama.cpp F32"

LLAMA_CHILD = """
import json, sys, time
from llama_cpp import Llama
path, threads, prompt = sys.argv[1], int(sys.argv[2]), sys.argv[3]
started = time.perf_counter()
llm = Llama(model_path=path, n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)
ids = llm.tokenize(prompt.encode(), add_bos=True)
llm.eval(ids)
token = llm.sample(temp=0.0)
print(json.dumps({"seconds": time.perf_counter() - started, "token": int(token), "prompt_tokens": len(ids)}))
"""


def run(command: list[str]) -> tuple[float, int, str]:
    """Run `command` to its end under GNU time → (wall seconds, peak RSS bytes, stdout). GNU time forks
    the command from its own small process: a child of this (large) Python process would count
    this process's memory in its peak RSS, as Linux carries the peak across exec."""
    with tempfile.NamedTemporaryFile("r") as measures:
        done = subprocess.run(["/usr/bin/time", "-f", "%e %M", "-o", measures.name, *command],
                              check=False, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(command[:3])} … failed with {done.returncode}")
        seconds, kib = measures.read().split()[-2:]
        return float(seconds), int(kib) * 1024, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--binary", type=Path, default=REPO / "target/release/onnx-steer")
    parser.add_argument("--bundle", type=Path, default=REPO / "onnx/smollm2-135m-instruct")
    parser.add_argument("--baseline-binary", type=Path, help="the previous commit's build")
    parser.add_argument("--baseline-bundle", type=Path, help="a bundle the baseline build reads")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--gguf-dir", type=Path, default=REPO / "target/gguf", help="where the F32 GGUF is written")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/cpu_startup", help="path stem")
    args = parser.parse_args()
    if (args.baseline_binary is None) != (args.baseline_bundle is None):
        parser.error("--baseline-binary and --baseline-bundle go together")
    threads = os.cpu_count() or 1

    def generate(binary: Path, bundle: Path, *flags: str) -> list[str]:
        return [str(binary), "generate", "--bundle", str(bundle), *flags, "--max-new-tokens", "1", "--prompt", PROMPT]

    weights = chain_weight_bytes(args.bundle)
    configs: dict[str, tuple[list[str], int]] = {
        "onnx-steer": (generate(args.binary, args.bundle), weights),
        "onnx-steer --no-prepack": (generate(args.binary, args.bundle, "--no-prepack"), weights)}
    if args.baseline_binary:
        configs["onnx-steer baseline"] = (generate(args.baseline_binary, args.baseline_bundle),
                                          chain_weight_bytes(args.baseline_bundle))
    if importlib.util.find_spec("llama_cpp"):
        gguf = default_gguf(args.gguf_dir, "F32")
        configs[LLAMA] = ([sys.executable, "-c", LLAMA_CHILD, str(gguf), str(threads), PROMPT], gguf.stat().st_size)
    else:
        print("llama-cpp-python is not installed: the llama.cpp row is skipped (make startup installs it)")

    # Per config and round: (first token s, whole process s, peak RSS bytes).
    samples: dict[str, list[tuple[float, float, int]]] = {name: [] for name in configs}
    for round_index in range(args.repeats + 1):  # round 0 warms the page cache, untimed
        for name, (command, _) in configs.items():
            process, peak, stdout = run(command)
            first = json.loads(stdout.strip().splitlines()[-1])["seconds"] if name == LLAMA else process
            if round_index:
                samples[name].append((first, process, peak))
        print(f"round {round_index}/{args.repeats}: " + ", ".join(
            f"{name} {s[-1][0]:.2f} s {s[-1][2] / 2**20:.0f} MiB" for name, s in samples.items() if s), flush=True)

    rows: list[dict] = []
    for name, (_, weight_bytes) in configs.items():
        firsts = [f for f, _, _ in samples[name]]
        peak = max(p for _, _, p in samples[name])
        rows.append({"config": name, "first_token_s_median": statistics.median(firsts),
                     "first_token_s_min": min(firsts), "first_token_s_max": max(firsts),
                     "process_s_median": statistics.median(s for _, s, _ in samples[name]),
                     "peak_rss_bytes": peak, "weight_bytes": weight_bytes, "peak_rss_over_weights": peak / weight_bytes})
    by_name = {r["config"]: r for r in rows}
    ratios = {}
    for ours in ("onnx-steer", "onnx-steer --no-prepack"):
        for other, key in ((LLAMA, "first_token_s_median"), ("onnx-steer baseline", "first_token_s_median"),
                           ("onnx-steer baseline", "peak_rss_bytes")):
            if other in by_name:
                ratios[f"{key} {ours} / {other}"] = by_name[ours][key] / by_name[other][key]
    if LLAMA in by_name:
        ratios["process_s_median onnx-steer --no-prepack / llama.cpp F32 process"] = (
            by_name["onnx-steer --no-prepack"]["process_s_median"] / by_name[LLAMA]["process_s_median"])
    result = {"prompt": PROMPT, "repeats": args.repeats, "threads": threads, "rows": rows, "ratios": ratios}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Start-up to the first token and peak memory ({args.repeats} rounds after a warm one; medians)", "",
             ("Command: `make startup`. onnx-steer: the whole `generate --max-new-tokens 1` process (exec, ONNX "
              "Runtime, tokenizer, every session, prefill, first token). llama.cpp: `Llama(...)` to its first token, "
              "timed inside a Python process that has already imported llama_cpp; its whole process (Python and "
              "the import included) in the next column. Peak RSS of llama.cpp includes the interpreter."), "",
             "| config | first token s (median) | min–max | whole process s | peak RSS MiB | weights MiB | RSS / weights |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['first_token_s_median']:.2f} | {r['first_token_s_min']:.2f}–"
                     f"{r['first_token_s_max']:.2f} | {r['process_s_median']:.2f} | {r['peak_rss_bytes'] / 2**20:.0f} | "
                     f"{r['weight_bytes'] / 2**20:.0f} | {r['peak_rss_over_weights']:.2f} |")
    lines += ["", "Ratios in this run:", ""] + [f"- {k}: {v:.3f}" for k, v in ratios.items()]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
