"""The server's request path against its promises: a fresh seed per unseeded request (reported in
the response), stop strings that end the row in the engine with usage and metrics counting the tokens
actually kept, streamed or not, and inline specs resolved once per distinct content."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from safetensors.numpy import save_file

from onnx_steer_export.runtime_client import serving

PROMPT = "Name three colours and say something about each."


@pytest.fixture(scope="module")
def steer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("steer")
    rng = np.random.default_rng(1)
    save_file({"direction.12": rng.normal(size=576).astype(np.float32)}, str(out / "v.safetensors"))
    return out


@pytest.fixture(scope="module")
def url(binary: Path, bundle_dir: Path, steer_dir: Path) -> Iterator[str]:
    with serving(binary, bundle_dir, "--steer-dir", str(steer_dir), "--max-batch", "4") as (address, _):
        yield address


def chat(url: str, **fields: Any) -> dict:
    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 24, **fields}
    response = requests.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert response.ok, response.text
    return response.json()


def generated_tokens_total(url: str) -> int:
    text = requests.get(f"{url}/metrics", timeout=10).text
    found = re.search(r"^onnx_steer_generated_tokens_total (\d+)", text, re.MULTILINE)
    assert found, text
    return int(found.group(1))


def test_unseeded_requests_get_fresh_seeds_and_a_given_seed_repeats(url: str) -> None:
    unseeded = [chat(url, temperature=1.0) for _ in range(4)]
    seeds = {reply["seed"] for reply in unseeded}
    assert len(seeds) == 4, seeds
    assert len({reply["choices"][0]["message"]["content"] for reply in unseeded}) > 1
    first, again = chat(url, temperature=1.0, seed=7), chat(url, temperature=1.0, seed=7)
    assert first["seed"] == again["seed"] == 7
    assert first["choices"][0]["message"]["content"] == again["choices"][0]["message"]["content"]
    # Replaying a drawn seed reproduces that request.
    replay = chat(url, temperature=1.0, seed=unseeded[0]["seed"])
    assert replay["choices"][0]["message"]["content"] == unseeded[0]["choices"][0]["message"]["content"]
    assert "seed" not in chat(url), "greedy requests sample nothing"


def stop_word(url: str) -> tuple[dict, str]:
    """The unstopped greedy reply and a word from its middle to stop at."""
    full = chat(url)
    words = full["choices"][0]["message"]["content"].split()
    assert len(words) > 4, full
    return full, words[len(words) // 2]


def test_a_stop_string_ends_the_row_and_usage_counts_the_kept_tokens(url: str) -> None:
    full, stop = stop_word(url)
    text = full["choices"][0]["message"]["content"]
    before = generated_tokens_total(url)
    stopped = chat(url, stop=[stop])
    kept = stopped["choices"][0]["message"]["content"]
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stop not in kept and text.startswith(kept)
    used = stopped["usage"]["completion_tokens"]
    assert 0 < used < full["usage"]["completion_tokens"], (used, full["usage"])
    assert generated_tokens_total(url) - before == used


def test_a_streamed_stop_is_counted_in_the_metrics(url: str) -> None:
    _, stop = stop_word(url)
    before = generated_tokens_total(url)
    body: dict[str, Any] = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 24, "stop": [stop],
                            "stream": True}
    chunks = []
    with requests.post(f"{url}/v1/chat/completions", json=body, stream=True, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith(b"data: {"):
                chunks.append(json.loads(line[len(b"data: "):]))
    last = chunks[-1]
    assert last["choices"][0]["finish_reason"] == "stop"
    text = "".join(c["choices"][0]["delta"]["content"] for c in chunks)
    assert stop not in text
    assert generated_tokens_total(url) - before == last["usage"]["completion_tokens"] > 0


def test_an_inline_spec_is_resolved_once_per_content(url: str, steer_dir: Path) -> None:
    spec: dict[str, Any] = {"interventions": [{"kind": "vector", "path": "v.safetensors", "layers": [12],
                                               "scale": 3.0}]}
    first = chat(url, steering=spec)
    vector = steer_dir / "v.safetensors"
    saved = vector.read_bytes()
    vector.unlink()
    try:
        # The same content is served from the cache without reading the file again ...
        assert chat(url, steering=spec)["choices"] == first["choices"]
        # ... while new content must be resolved, and its file is gone (refused: no such file inside).
        other = {"interventions": [{**spec["interventions"][0], "scale": 2.0}]}
        response = requests.post(f"{url}/v1/chat/completions", timeout=60,
                                 json={"messages": [{"role": "user", "content": PROMPT}], "steering": other})
        message = response.json()["error"]["message"]
        assert response.status_code == 400 and "v.safetensors" in message and "not a file inside" in message
    finally:
        vector.write_bytes(saved)


def test_health_reports_the_engine(url: str) -> None:
    health = requests.get(f"{url}/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_a_prompt_that_fills_the_context_is_refused(url: str, bundle_dir: Path) -> None:
    context = json.loads((bundle_dir / "manifest.json").read_text())["model"]["max_position_embeddings"]
    response = requests.post(f"{url}/v1/completions", timeout=60, json={"prompt": "hello " * (context + 8)})
    assert response.status_code == 400
    assert "room for at least one new token" in response.json()["error"]["message"]


def test_unknown_routes_and_methods_answer_json(url: str) -> None:
    missing = requests.get(f"{url}/v1/nope", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == 404
    wrong = requests.get(f"{url}/v1/chat/completions", timeout=10)
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == 405
