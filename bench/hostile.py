"""The server under a hostile mix (`make hostile`): every attack of issue 21 interleaved with normal
traffic on loopback for --seconds.

It starts `onnx-steer serve` on the default bundle with explicit budgets (steering memory, prefill
tokens, queue, header and body timeouts, an admin token), then runs, all at once:
- normal clients: chat requests with and without steering, a 429 retried after its Retry-After;
- attackers: the crafted files and requests of `onnx_steer_export.eval.hostile`, in random order,
  each outcome checked (the clean error, the closed connection);
- a long-prompt attacker: a burst of three 3,000-token prompts every LONG_PROMPT_PERIOD_S (prefill
  memory grew with rows x tokens²; the prefill token budget makes them join one by one and chunked
  prefill bounds each one's attention memory);
- a sampler: the server's RSS every second, and whether the process is still there.

It writes bench/results/hostile_mix.{json,png} and exits non-zero if the server exited, a normal
request failed, an attack got anything but its clean outcome, or RSS passed the bound.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "export"))

from onnx_steer_export.eval import hostile
from onnx_steer_export.runtime_client import find_binary, serving

PROMPTS = ["What is the capital of France?", "Write a haiku about autumn.", "How do vaccines work?",
           "Give me three tips for learning chess.", "Describe your morning commute in two sentences."]
# Budgets the server runs with; RSS is judged against them.
STEERING_MEMORY_MB = 64
PREFILL_TOKENS = 4096
HEADER_TIMEOUT_S = 5
BODY_TIMEOUT_S = 5
# Working memory of one prefill group at the token budget (activations, chunked attention scores)
# and the allocator's slack, on top of the weights and the KV cache.
PREFILL_ALLOWANCE_MB = 1024
MAX_BATCH = 8
# The longest row the mix sends: the long-prompt attacker's prompt plus its tokens. Rows of a
# running batch share one KV length (the shorter are left-padded), so the KV cache is bounded by
# --max-batch rows of it.
LONGEST_ROW_TOKENS = 3100
TOKEN = "hostile-mix-admin-token"
# A prefill blocks the running rows while it lasts (interleaving it with decode steps is issue 22),
# so a constant stream of long prompts would measure that, not robustness: they come in bursts.
LONG_PROMPT_PERIOD_S = 20.0


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS"))) / 1024


class Mix:
    """Shared counters of one run."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds
        self.lock = threading.Lock()
        self.normal: list[dict[str, Any]] = []
        self.attacks: dict[str, Counter[str]] = defaultdict(Counter)
        self.failures: list[str] = []

    def running(self) -> bool:
        return time.monotonic() < self.deadline

    def record_attack(self, name: str, ok: bool, detail: str) -> None:
        with self.lock:
            self.attacks[name]["clean" if ok else "not clean"] += 1
            if not ok:
                self.failures.append(f"attack {name}: {detail}")


def normal_client(url: str, mix: Mix, seed: int) -> None:
    rng = random.Random(seed)
    while mix.running():
        body: dict[str, Any] = hostile.chat_body(rng.choice([None, "plain_vector"]), max_tokens=16)
        body["messages"][0]["content"] = rng.choice(PROMPTS)
        started, retries = time.monotonic(), 0
        try:
            response = requests.post(f"{url}/v1/chat/completions", json=body, timeout=300)
            while response.status_code == 429:
                retries += 1
                time.sleep(float(response.headers.get("retry-after", "1")))
                response = requests.post(f"{url}/v1/chat/completions", json=body, timeout=300)
        except requests.RequestException as e:
            with mix.lock:
                mix.failures.append(f"normal request: {e}")
            continue
        with mix.lock:
            mix.normal.append({"status": response.status_code, "seconds": time.monotonic() - started,
                               "retries": retries})
            if not response.ok:
                mix.failures.append(f"normal request: {response.status_code} {response.text[:120]}")


def attacker(url: str, mix: Mix, files: hostile.HostileFiles, seed: int) -> None:
    rng = random.Random(seed)
    calls = hostile.attacks(url, files, 30, HEADER_TIMEOUT_S, BODY_TIMEOUT_S, TOKEN)
    while mix.running():
        name, ok, detail = rng.choice(calls)()
        mix.record_attack(name, ok, detail)


def long_prompts(url: str, mix: Mix) -> None:
    prompt = " ".join(["The quick brown fox jumps over the lazy dog."] * 300)  # about 3,000 tokens

    def one(results: list[requests.Response]) -> None:
        results.append(requests.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": 2},
                                     timeout=300))

    while mix.running():
        results: list[requests.Response] = []
        threads = [threading.Thread(target=one, args=(results,)) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for response in results:
            mix.record_attack("three 3,000-token prompts at once", response.ok, response.text[:120])
        pause = time.monotonic() + LONG_PROMPT_PERIOD_S
        while mix.running() and time.monotonic() < pause:
            time.sleep(0.5)


def sampler(process: subprocess.Popen, mix: Mix, samples: list[tuple[float, float]], started: float) -> None:
    while mix.running():
        if process.poll() is not None:
            with mix.lock:
                mix.failures.append(f"the server exited with {process.returncode}")
            return
        samples.append((time.monotonic() - started, rss_mb(process.pid)))
        time.sleep(1.0)


def plot(report: dict[str, Any], samples: list[tuple[float, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.4))
    ax.plot([t for t, _ in samples], [m for _, m in samples], label="server RSS")
    ax.axhline(report["rss_bound_mb"], color="red", linestyle="--",
               label="bound: baseline + steering budget + KV of --max-batch longest rows + prefill")
    ax.axhline(report["rss_baseline_mb"], color="grey", linestyle=":", label="baseline (after start-up)")
    ax.set_xlabel("seconds")
    ax.set_ylabel("MB")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8, loc="lower right")
    attacks = sum(sum(c.values()) for c in report["attacks"].values())
    ax.set_title(f"{attacks} attacks interleaved with {report['normal']['requests']} normal requests: "
                 f"{report['server_exits']} exits, {len(report['failures'])} failures", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=REPO / "onnx" / "smollm2-135m-instruct")
    parser.add_argument("--seconds", type=float, default=300.0, help="length of the mix")
    parser.add_argument("--clients", type=int, default=4, help="normal clients")
    parser.add_argument("--attackers", type=int, default=2, help="clients cycling through the attacks")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "hostile_mix",
                        help="path stem of the JSON and PNG")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        steer = Path(scratch) / "steer"
        steer.mkdir()
        files = hostile.write_hostile_files(steer, hidden=576, num_layers=30)
        (steer / "plain_vector.json").write_text(json.dumps(hostile.vector_spec(files.vector, 12, 0.5)))
        token_file = Path(scratch) / "token"
        token_file.write_text(TOKEN)
        log = open(Path(scratch) / "server.log", "w")  # noqa: SIM115 (closed below)
        server_args = ["--steer-dir", str(steer), "--max-batch", str(MAX_BATCH), "--max-queue", "32",
                       "--admin-token-file", str(token_file), "--steering-memory-mb", str(STEERING_MEMORY_MB),
                       "--prefill-tokens", str(PREFILL_TOKENS), "--header-timeout-s", str(HEADER_TIMEOUT_S),
                       "--body-timeout-s", str(BODY_TIMEOUT_S)]
        with serving(find_binary(), args.bundle, *server_args, stderr=log.fileno()) as (url, process):
            # Warm up so that the baseline holds the sessions' working memory.
            for prompt in PROMPTS:
                requests.post(f"{url}/v1/chat/completions", json=hostile.chat_body(), timeout=300)
            baseline = rss_mb(process.pid)
            mix = Mix(args.seconds)
            samples: list[tuple[float, float]] = []
            started = time.monotonic()
            threads = [threading.Thread(target=normal_client, args=(url, mix, i)) for i in range(args.clients)]
            threads += [threading.Thread(target=attacker, args=(url, mix, files, 100 + i))
                        for i in range(args.attackers)]
            threads += [threading.Thread(target=long_prompts, args=(url, mix)),
                        threading.Thread(target=sampler, args=(process, mix, samples, started))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            alive = process.poll() is None
            healthy = alive and requests.get(f"{url}/health", timeout=10).ok
        log.close()
    latencies = sorted(r["seconds"] for r in mix.normal)
    peak = max(m for _, m in samples)
    model = json.loads((args.bundle / "manifest.json").read_text())["model"]
    kv_per_token = model["num_layers"] * 2 * model["num_key_value_heads"] * model["head_dim"] * 4
    kv_bound = MAX_BATCH * LONGEST_ROW_TOKENS * kv_per_token / 2**20
    bound = baseline + STEERING_MEMORY_MB + kv_bound + PREFILL_ALLOWANCE_MB
    report: dict[str, Any] = {
        "seconds": args.seconds,
        "server_args": server_args[2:],
        "server_exits": 0 if alive else 1,
        "healthy_at_end": healthy,
        "normal": {"requests": len(mix.normal), "ok": sum(r["status"] == 200 for r in mix.normal),
                   "retried_429": sum(r["retries"] for r in mix.normal),
                   "p50_s": statistics.median(latencies) if latencies else None,
                   "p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else None},
        "attacks": {name: dict(counts) for name, counts in sorted(mix.attacks.items())},
        "rss_baseline_mb": round(baseline, 1),
        "rss_peak_mb": round(peak, 1),
        "rss_end_mb": round(samples[-1][1], 1),
        "rss_bound_mb": round(bound, 1),
        "rss_bound_terms_mb": {"baseline": round(baseline, 1), "steering_memory": STEERING_MEMORY_MB,
                               "kv_cache": round(kv_bound, 1), "prefill_allowance": PREFILL_ALLOWANCE_MB},
        "failures": mix.failures[:50],
    }
    if peak > bound:
        report["failures"].append(f"RSS peaked at {peak:.0f} MB, over the bound of {bound:.0f} MB")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, samples, args.out.with_suffix(".png"))
    print(json.dumps({k: report[k] for k in ("server_exits", "healthy_at_end", "normal", "rss_baseline_mb",
                                             "rss_peak_mb", "rss_bound_mb")}, indent=2))
    for name, counts in report["attacks"].items():
        print(f"  {name:45} {counts}")
    for failure in report["failures"]:
        print("FAIL", failure)
    return 0 if alive and healthy and not report["failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
