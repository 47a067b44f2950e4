"""The one place that runs the onnx-steer binary: generations, continuation scores, state capture,
perplexity, bench reports and the server, plus the steer-spec rewriting the runs need (scales, absolute paths).

Everything here talks to the Rust runtime through its command line and files; nothing imports the
exporter, the trainers or the evals.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file

from . import REPO

# Intervention fields that hold a file path, relative to the spec's folder: the Rust side's FILE_FIELDS
# (src/steer/spec.rs), which a Rust test compares with the next line.
SPEC_PATH_KEYS = ("path", "router", "bank", "prober", "head")


def find_binary() -> Path:
    """$ONNX_STEER_BIN, else the release build of this checkout."""
    path = Path(os.environ.get("ONNX_STEER_BIN", REPO / "target" / "release" / "onnx-steer"))
    if not path.is_file():
        raise FileNotFoundError(f"onnx-steer binary not found at {path}; run `make build` or set ONNX_STEER_BIN")
    return path


def run_binary(args: list[str], binary: Path | None = None, **options: Any) -> subprocess.CompletedProcess:
    """`onnx-steer ARGS`, which must succeed; `options` go to `subprocess.run`."""
    return subprocess.run([str(binary or find_binary()), *args], check=True, **options)


def set_strength(intervention: dict, scale: float) -> None:
    """Set an intervention's strength: its `scale` (AutoSteer's is `strength`)."""
    intervention["strength" if intervention["kind"] == "autosteer" else "scale"] = scale


def compose_spec(parts: Sequence[tuple[Path, float | None]], out: Path) -> Path:
    """One spec holding the interventions of every `(spec, scale)` part, each with its strength set to
    `scale` (unchanged for None; AutoSteer's is `strength`) and its paths made absolute."""
    interventions = []
    for spec, scale in parts:
        for intervention in json.loads(spec.read_text())["interventions"]:
            if scale is not None:
                set_strength(intervention, scale)
            for key in SPEC_PATH_KEYS:
                if key in intervention:
                    intervention[key] = str((spec.parent / intervention[key]).resolve())
            interventions.append(intervention)
    out.write_text(json.dumps({"interventions": interventions}))
    return out


def with_scale(spec: Path, scale: float, out: Path) -> Path:
    """A copy of `spec` with every intervention's scale set to `scale` and paths made absolute."""
    return compose_spec([(spec, scale)], out)


def generate(bundle: Path, prompts: list[str], spec: Path | None, max_new_tokens: int,
             binary: Path | None = None, batch: int = 32, chat: bool = True) -> list[dict]:
    """Greedy generations from the runtime (`onnx-steer generate --json`), `batch` prompts per call,
    chat-templated unless `chat` is false (a base model without a template)."""
    records: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for start in range(0, len(prompts), batch):
            chunk = Path(tmp) / "prompts.txt"
            chunk.write_text("\n".join(p.replace("\n", " ") for p in prompts[start:start + batch]) + "\n")
            args = ["generate", "--bundle", str(bundle), "--greedy", "--json", "--max-new-tokens",
                    str(max_new_tokens), "--prompts-file", str(chunk)] + ["--chat"] * chat
            if spec is not None:
                args += ["--steer", str(spec)]
            done = run_binary(args, binary, capture_output=True, text=True)
            records += [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    return records


def score(bundle: Path, items: Sequence[dict], specs: Sequence[Path] = (), chat: bool = True,
          binary: Path | None = None, echo: bool = False) -> list[dict]:
    """Log-probabilities of continuations from the runtime (`onnx-steer score`), in one batched call: for
    each `{"prompt", "continuations": [...]}` item, in order, its record `{"index", "prompt_tokens",
    "continuations": [{"text", "token_ids", "tokens", "token_logprobs", "logprob"}, ...]}` (`logprob`:
    the continuation's summed natural-log probability given the prompt). `chat` renders each prompt as
    one user turn with the generation prompt, the continuation starting the assistant's answer; `specs`
    steer every row (several compose, as with `generate`). `echo` also scores each prompt's own tokens
    (from the second on): the record's `prompt_logprobs`, `[{"token", "id", "logprob"}, ...]`; an item may
    then have no continuations."""
    if not items:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        jsonl = Path(tmp) / "score.jsonl"
        jsonl.write_text("".join(json.dumps({"prompt": item["prompt"], "continuations": list(item["continuations"])})
                                 + "\n" for item in items))
        out = Path(tmp) / "scored.jsonl"
        args = ["score", "--bundle", str(bundle), "--jsonl", str(jsonl), "--out", str(out)]
        if chat:
            args.append("--chat")
        if echo:
            args.append("--echo")
        for spec in specs:
            args += ["--steer", str(spec)]
        run_binary(args, binary)
        records = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    records.sort(key=lambda r: r["index"])
    if [r["index"] for r in records] != list(range(len(items))):
        raise RuntimeError(f"onnx-steer score returned {len(records)} records for {len(items)} inputs")
    for item, record in zip(items, records):
        if len(record["continuations"]) != len(item["continuations"]):
            raise RuntimeError(f"onnx-steer score returned {len(record['continuations'])} continuations for "
                               f"{len(item['continuations'])} in input {record['index']}")
    return records


def capture(bundle: Path, sequences: list[list[int]], layers: list[int], tokens: str = "last",
            binary: Path | None = None) -> dict[int, np.ndarray]:
    """States read through the runtime (`onnx-steer capture`): per layer, [N, d] for each sequence's
    last token (`tokens="last"`) or the mean over its tokens (`"mean"`), or [sum of lengths, d] for every
    token, sequence after sequence (`"all"`).
    Layer L is the output of decoder block L."""
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"input_ids": ids}) + "\n" for ids in sequences))
        out = Path(tmp) / "acts.safetensors"
        run_binary(["capture", "--bundle", str(bundle), "--prompts-file", str(prompts), "--layers",
                    ",".join(map(str, layers)), "--tokens", tokens, "--out", str(out)], binary)
        tensors = load_file(str(out))
    return {layer: tensors[f"layer.{layer}"] for layer in layers}


def capture_last_token(bundle: Path, sequences: list[list[int]], layers: list[int],
                       binary: Path | None = None) -> dict[int, np.ndarray]:
    """Last-token states [N, d] per layer, read through the runtime."""
    return capture(bundle, sequences, layers, "last", binary)


def perplexity(bundle: Path, text: Path, max_tokens: int, binary: Path | None = None) -> dict:
    """`onnx-steer perplexity --json` of `text` (teacher-forced): its parsed report."""
    done = run_binary(["perplexity", "--bundle", str(bundle), "--text", str(text), "--max-tokens", str(max_tokens),
                       "--json"], binary, capture_output=True, text=True)
    return json.loads(done.stdout)


def bench(bundle: Path, *args: str, binary: Path | None = None, **options: Any) -> dict:
    """`onnx-steer bench --bundle BUNDLE ARGS --json`: its parsed report; `options` go to `subprocess.run`."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        run_binary(["bench", "--bundle", str(bundle), *args, "--json", str(out)], binary, **options)
        return json.loads(out.read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(binary: Path, bundle: Path, *args: str, stderr: int | None = subprocess.PIPE,
                 startup_s: float = 120.0) -> tuple[str, subprocess.Popen]:
    """`onnx-steer serve --bundle BUNDLE ARGS` on a free loopback port, once /health answers: its URL and
    process. `stderr` is the server's (piped by default, and quoted if it does not come up)."""
    import requests  # only the server needs an HTTP client

    port = free_port()
    process = subprocess.Popen([str(binary), "serve", "--bundle", str(bundle), "--port", str(port), *args],
                               stderr=stderr, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + startup_s
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if requests.get(f"{url}/health", timeout=1).ok:
                return url, process
        except requests.ConnectionError:
            time.sleep(0.5)
    process.kill()
    log = process.stderr.read() if process.stderr is not None else ""
    raise RuntimeError(f"the server did not start: {log}")


@contextmanager
def serving(binary: Path, bundle: Path, *args: str, stderr: int | None = subprocess.PIPE,
            stop_s: float = 60.0) -> Iterator[tuple[str, subprocess.Popen]]:
    """`start_server` for the duration of the block; SIGTERM and a wait of up to `stop_s` after it."""
    url, process = start_server(binary, bundle, *args, stderr=stderr)
    try:
        yield url, process
    finally:
        process.terminate()
        process.wait(timeout=stop_s)
