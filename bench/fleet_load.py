"""onnx-steer serve against llama.cpp's own server under one closed-loop load (`make fleet-load`).

llama-server is built here from the llama.cpp source that the llama-cpp-python sdist vendors (fetched
from PyPI once into models/peers/, then cached), and serves the default model's F32 GGUF with
--parallel 16 and continuous batching; onnx-steer serves the default bundle (the same weights) at
--max-batch 16. Each gets the same load: --clients closed-loop clients send --requests greedy chat
requests whose prompts run from 20 to 1,500 tokens (log-uniform, fixed seed), --new-tokens each,
streamed so that the time to the first token is seen. Then onnx-steer again with a quarter of the
requests each unsteered, with the refusal vector, L2S and AutoSteer (llama-server cannot steer per
request). Reported per run: requests/s, output tokens/s, time to first token and end-to-end p50/p99,
failures, and for a sample of requests whether the output equals the same request sent alone.
Writes bench/results/cpu_fleet_load.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "export"))
sys.path.insert(0, str(REPO / "bench"))

from onnx_steer_export.runtime_client import free_port, serving

from load import closed_loop
from peers import default_gguf

PEERS = REPO / "models/peers"
SDIST = "llama_cpp_python-0.3.36.tar.gz"
LLAMA_SERVER = PEERS / "llama.cpp-build/bin/llama-server"
STEERING = [None, "refusal", "l2s", "autosteer"]


def fetch_sdist() -> Path:
    """The llama-cpp-python 0.3.36 sdist from PyPI's simple index (its JSON form), kept in PEERS."""
    path = PEERS / SDIST
    if not path.exists():
        PEERS.mkdir(parents=True, exist_ok=True)
        index = requests.get("https://pypi.org/simple/llama-cpp-python/", timeout=60,
                             headers={"Accept": "application/vnd.pypi.simple.v1+json"}).json()
        url = next(f["url"] for f in index["files"] if f["filename"] == SDIST)
        path.write_bytes(requests.get(url, timeout=600).content)
    return path


def build_llama_server() -> Path:
    """llama-server from the llama.cpp that the sdist vendors (CPU, native, no curl); built once."""
    if LLAMA_SERVER.exists():
        return LLAMA_SERVER
    source = PEERS / "llama_cpp_python-0.3.36/vendor/llama.cpp"
    if not source.exists():
        with tarfile.open(fetch_sdist()) as archive:
            archive.extractall(PEERS, filter="data")
    build = LLAMA_SERVER.parents[1]
    cmake = shutil.which("cmake") or str(Path(sys.executable).parent / "cmake")
    subprocess.run([cmake, "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                    "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                    "-DLLAMA_BUILD_SERVER=ON", "-DGGML_NATIVE=ON"], check=True)
    subprocess.run([cmake, "--build", str(build), "--target", "llama-server", "-j2"], check=True)
    return LLAMA_SERVER


class LlamaServer:
    """llama-server on a free loopback port while in the block."""

    def __init__(self, binary: Path, gguf: Path, parallel: int, context: int) -> None:
        self.port = free_port()
        self.command = [str(binary), "-m", str(gguf), "--port", str(self.port), "--parallel", str(parallel),
                        "--ctx-size", str(context * parallel), "--cont-batching", "--threads", "2", "--no-webui"]

    def __enter__(self) -> str:
        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{self.port}"
        for _ in range(600):
            try:
                if requests.get(f"{url}/health", timeout=2).ok:
                    return url
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        raise RuntimeError("llama-server did not come up")

    def __exit__(self, *_: object) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


def make_prompts(count: int, seed: int, tokenizer: Path) -> list[str]:
    """`count` user messages of 20 to 1,500 tokens by the bundle's tokenizer (log-uniform), cut from
    data/perplexity.txt."""
    from tokenizers import Tokenizer

    encode = Tokenizer.from_file(str(tokenizer)).encode
    text = (REPO / "data/perplexity.txt").read_text().split()
    words = text * (3000 // len(text) + 2)
    rng = random.Random(seed)
    prompts = []
    for i in range(count):
        target = int(math.exp(rng.uniform(math.log(20), math.log(1500))))
        start = rng.randrange(0, len(words) - 2 * target)
        head = f"Request {i}. Summarise in a few sentences:\n"
        length = max(1, target // 2)
        while len(encode(head + " ".join(words[start:start + length + 1])).ids) <= target:
            length += 1
        prompts.append(head + " ".join(words[start:start + length]))
    return prompts


def one(url: str, prompt: str, steering: str | None, new_tokens: int) -> dict[str, Any]:
    """One streamed greedy chat request: its text, time to first token, total time, tokens, status."""
    body: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}], "max_tokens": new_tokens,
                            "temperature": 0, "stream": True}
    if steering:
        body["steering"] = steering
    started = time.monotonic()
    first, text, tokens = None, [], 0
    try:
        with requests.post(f"{url}/v1/chat/completions", json=body, stream=True, timeout=1800) as response:
            if response.status_code != 200:
                return {"ok": False, "status": f"{response.status_code} {response.text[:200]}"}
            error = False
            for line in response.iter_lines():
                if line == b"event: error":
                    error = True
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                if error:
                    return {"ok": False, "status": f"stream error: {line[6:206].decode(errors='replace')}"}
                choices = json.loads(line[6:]).get("choices") or [{}]
                delta = choices[0].get("delta", {}).get("content")
                if delta:
                    first = first or time.monotonic()
                    text.append(delta)
                    tokens += 1
    except requests.RequestException as error:
        return {"ok": False, "status": str(error)}
    done = time.monotonic()
    return {"ok": True, "text": "".join(text), "tokens": tokens, "ttft": (first or done) - started,
            "e2e": done - started}


def load(url: str, jobs: list[tuple[str, str | None]], clients: int, new_tokens: int) -> dict[str, Any]:
    results, wall = closed_loop(len(jobs), clients, lambda index: one(url, *jobs[index], new_tokens))
    done = [r for r in results if r["ok"]]

    def pct(key: str, q: float) -> float:
        values = sorted(r[key] for r in done)
        return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")

    failures = Counter(str(r["status"]) for r in results if not r["ok"])
    return {"requests": len(jobs), "completed": len(done), "failed": len(jobs) - len(done),
            "failures": dict(failures), "wall_s": wall,
            "requests_per_s": len(done) / wall, "output_tokens_per_s": sum(r["tokens"] for r in done) / wall,
            "ttft_p50_s": pct("ttft", 0.5), "ttft_p99_s": pct("ttft", 0.99),
            "e2e_p50_s": pct("e2e", 0.5), "e2e_p99_s": pct("e2e", 0.99),
            "texts": [r.get("text") for r in results]}


def alone(url: str, jobs: list[tuple[str, str | None]], sample: list[int], new_tokens: int) -> dict[int, str]:
    return {i: one(url, *jobs[i], new_tokens).get("text", "") for i in sample}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--binary", type=Path, default=REPO / "target/release/onnx-steer")
    parser.add_argument("--bundle", type=Path, default=REPO / "onnx/smollm2-135m-instruct")
    parser.add_argument("--steer-dir", type=Path, default=REPO / "onnx/smollm2-135m-instruct/steer")
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--check-alone", type=int, default=32, help="requests whose output is compared with a solo run")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/cpu_fleet_load")
    args = parser.parse_args()
    prompts = make_prompts(args.requests, 0, args.bundle / "tokenizer.json")
    plain: list[tuple[str, str | None]] = [(p, None) for p in prompts]
    mixed = [(p, STEERING[i % len(STEERING)]) for i, p in enumerate(prompts)]
    sample = sorted(random.Random(1).sample(range(args.requests), min(args.check_alone, args.requests)))
    runs: dict[str, dict[str, Any]] = {}

    with LlamaServer(build_llama_server(), default_gguf(PEERS, "F32"), args.batch, 2048) as url:
        runs["llama-server F32, --parallel 16"] = load(url, plain, args.clients, args.new_tokens)
    serve = ["--max-batch", str(args.batch), "--max-queue", str(args.requests), "--max-context", "2048",
             "--steer-dir", str(args.steer_dir), "--timeout-s", "1800"]
    for name, jobs in (("onnx-steer, unsteered", plain), ("onnx-steer, 1/4 each: none, vector, L2S, AutoSteer", mixed)):
        with serving(args.binary, args.bundle, *serve, stderr=subprocess.DEVNULL) as (url, _):
            run = load(url, jobs, args.clients, args.new_tokens)
            solo = alone(url, jobs, sample, args.new_tokens)
            run["equal_alone"] = sum(run["texts"][i] == text for i, text in solo.items())
            run["checked_alone"] = len(solo)
            runs[name] = run
    anchor = runs["llama-server F32, --parallel 16"]
    for run in runs.values():
        run["throughput_vs_llama_server"] = run["output_tokens_per_s"] / anchor["output_tokens_per_s"]
        run.pop("texts")
    report = {"requests": args.requests, "clients": args.clients, "new_tokens": args.new_tokens,
              "prompt_words": [len(p.split()) for p in prompts], "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    header = ("| server | requests/s | output tok/s | vs llama-server | TTFT p50 | TTFT p99 | end-to-end p50 | p99 "
              "| p99/p50 | failed | equal alone |")
    lines = [header, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in runs.items():
        equal = f"{r['equal_alone']}/{r['checked_alone']}" if "equal_alone" in r else "—"
        lines.append(f"| {name} | {r['requests_per_s']:.2f} | {r['output_tokens_per_s']:.1f} | "
                     f"{r['throughput_vs_llama_server']:.2f}x | {r['ttft_p50_s']:.1f} s | {r['ttft_p99_s']:.1f} s | "
                     f"{r['e2e_p50_s']:.1f} s | {r['e2e_p99_s']:.1f} s | {r['e2e_p99_s'] / r['e2e_p50_s']:.1f} | "
                     f"{r['failed']} | {equal} |")
    lines += [f"\n{name} failed: " + "; ".join(f"{count} x {why}" for why, count in r["failures"].items())
              for name, r in runs.items() if r["failures"]]
    median_words = statistics.median(report["prompt_words"])
    lines.append(f"\n{args.requests} requests, {args.clients} clients, {args.new_tokens} new tokens, "
                 f"prompt words median {median_words:.0f}")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
