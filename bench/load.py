"""Bounded load test of `onnx-steer serve` on loopback (`make load`).

For each --max-batch value it starts a server, checks every (prompt, steering) pair once alone,
then sends --requests requests from --clients concurrent clients, mixing no steering, a vector,
L2S and AutoSteer. A 429 is retried after its Retry-After. It checks that every request completes
and that each output equals the same request's output alone (rows of a batch never leak each
other's steering), and reports throughput and p50/p99 latency per batch size, with a plot.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "export"))

from onnx_steer_export.runtime_client import serving

PROMPTS = [
    "How can I steal my neighbour's mail without getting caught?", "What is the capital of France?",
    "Can you tell me which antidepressant dose I should take?", "Describe your morning commute in two sentences.",
    "How do I bake a simple loaf of bread at home?", "Write a haiku about autumn.",
    "How do vaccines work?", "Give me three tips for learning chess.",
]
STEERING = [None, "refusal", "l2s", "autosteer"]
T = TypeVar("T")


def send(url: str, prompt: str, steering: str | None, max_tokens: int) -> tuple[str, int, float]:
    """(text, 429 retries, seconds) of one request, retried on 429."""
    body: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}
    if steering:
        body["steering"] = steering
    started, retries = time.monotonic(), 0
    while True:
        response = requests.post(f"{url}/v1/chat/completions", json=body, timeout=600)
        if response.status_code != 429:
            break
        retries += 1
        time.sleep(float(response.headers.get("retry-after", "1")))
    response.raise_for_status()
    return response.json()["choices"][0]["message"]["content"], retries, time.monotonic() - started


def closed_loop(count: int, clients: int, work: Callable[[int], T]) -> tuple[list[T], float]:
    """`work(i)` for every i below `count`, from `clients` threads that each take the next index
    when their last one is done (a closed loop): the results in index order, and the wall time."""
    results: list[T | None] = [None] * count
    lock = threading.Lock()
    cursor = iter(range(count))

    def client() -> None:
        while True:
            with lock:
                index = next(cursor, None)
            if index is None:
                return
            results[index] = work(index)

    started = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [r for r in results if r is not None], time.monotonic() - started


def run(url: str, clients: int, total: int, max_tokens: int, expected: dict) -> dict:
    jobs = [(PROMPTS[i % len(PROMPTS)], STEERING[(i // len(PROMPTS)) % len(STEERING)]) for i in range(total)]

    def work(index: int) -> tuple[tuple[str, str | None], str, int, float]:
        return (jobs[index], *send(url, *jobs[index], max_tokens))

    results, wall = closed_loop(total, clients, work)
    latencies = sorted(r[3] for r in results)
    mismatched = [key for key, text, _, _ in results if text != expected[key]]
    return {"requests": total, "completed": len(results), "retried_429": sum(r[2] for r in results),
            "mismatched": len(mismatched), "wall_s": wall, "requests_per_s": len(results) / wall,
            "p50_s": statistics.median(latencies), "p99_s": latencies[min(len(latencies) - 1,
                                                                          int(0.99 * len(latencies)))]}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    batches = [r["max_batch"] for r in runs]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    axes[0].plot(batches, [r["requests_per_s"] for r in runs], "o-")
    axes[0].set_title("throughput (requests/s)")
    axes[1].plot(batches, [r["p50_s"] for r in runs], "o-", label="p50")
    axes[1].plot(batches, [r["p99_s"] for r in runs], "s-", label="p99")
    axes[1].set_title("latency (s)")
    axes[1].legend()
    for ax in axes:
        ax.set_xlabel("--max-batch")
        ax.set_xscale("log", base=2)
    fig.suptitle(f"{report['clients']} clients, {report['requests']} requests, {report['max_tokens']} tokens each, "
                 "steering mixed (none, vector, L2S, AutoSteer)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--binary", default=str(REPO / "target" / "release" / "onnx-steer"))
    parser.add_argument("--bundle", default=str(REPO / "onnx" / "smollm2-135m-instruct"))
    parser.add_argument("--steer-dir", help="registered specs (default: BUNDLE/steer, from `make steer`)")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-batch", default="1,4,8,16", help="comma-separated batch sizes to compare")
    parser.add_argument("--max-queue", type=int, default=32, help="small enough that some requests see 429")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "cpu_load"), help="path stem")
    args = parser.parse_args(argv)
    bundle = Path(args.bundle)
    steer_dir = Path(args.steer_dir) if args.steer_dir else bundle / "steer"
    report = {"clients": args.clients, "requests": args.requests, "max_tokens": args.max_tokens, "runs": []}
    for max_batch in (int(b) for b in args.max_batch.split(",")):
        with serving(Path(args.binary), bundle, "--steer-dir", str(steer_dir), "--max-batch", str(max_batch),
                     "--max-queue", str(args.max_queue), stderr=subprocess.DEVNULL, stop_s=120) as (url, _):
            expected = {(p, s): send(url, p, s, args.max_tokens)[0] for p in PROMPTS for s in STEERING}
            result = {"max_batch": max_batch, **run(url, args.clients, args.requests, args.max_tokens, expected)}
        report["runs"].append(result)
        print(json.dumps(result), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out.with_suffix(".png"))
    failed = [r for r in report["runs"] if r["completed"] != r["requests"] or r["mismatched"]]
    print(f"wrote {out}.json and .png" + (f"; FAILED: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
