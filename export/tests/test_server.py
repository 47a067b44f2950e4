"""`onnx-steer serve` driven by real clients: the official `openai` package and raw HTTP. Chat,
completion, streaming, steering by name, inline and registered at run time, parity with the CLI,
a bounded concurrent load with mixed steering, and a fuzz run of malformed and hostile requests."""

from __future__ import annotations

import json
import random
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import requests
from safetensors.numpy import save_file

from onnx_steer_export.runtime_client import serving, start_server

from conftest import rss_kib, run_generate

PROMPT = "What is the capital of France?"

@pytest.fixture(scope="module")
def steer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("steer")
    rng = np.random.default_rng(0)
    save_file({f"direction.{layer}": rng.normal(size=576).astype(np.float32) for layer in (8, 12)},
              str(out / "random.safetensors"))
    (out / "push.json").write_text(json.dumps({"interventions": [
        {"kind": "vector", "path": "random.safetensors", "layers": [12], "scale": 4.0}]}))
    return out


@pytest.fixture(scope="module")
def server(binary: Path, bundle_dir: Path, steer_dir: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    with serving(binary, bundle_dir, "--steer-dir", str(steer_dir), "--max-batch", "4", "--max-queue", "16",
                 "--max-body-bytes", "65536") as running:
        yield running


def chat(url: str, prompt: str, **extra: Any) -> requests.Response:
    return requests.post(f"{url}/v1/chat/completions", timeout=120,
                         json={"messages": [{"role": "user", "content": prompt}], "max_tokens": 12, **extra})


def test_openai_client_chat_stream_and_completion(server: tuple[str, subprocess.Popen]) -> None:
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == ["smollm2-135m-instruct"]
    reply = client.chat.completions.create(model="smollm2-135m-instruct", max_tokens=12,
                                           messages=[{"role": "user", "content": PROMPT}])
    assert "Paris" in reply.choices[0].message.content and reply.usage.completion_tokens > 0
    pieces = client.chat.completions.create(model="smollm2-135m-instruct", max_tokens=12, stream=True,
                                            messages=[{"role": "user", "content": PROMPT}])
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in pieces if chunk.choices)
    assert streamed == reply.choices[0].message.content
    text = client.completions.create(model="smollm2-135m-instruct", prompt="Once upon a time", max_tokens=8)
    assert text.choices[0].text and text.usage.prompt_tokens > 0
    steered = client.chat.completions.create(model="smollm2-135m-instruct", max_tokens=12,
                                             messages=[{"role": "user", "content": PROMPT}],
                                             extra_body={"steering": "push"})
    assert steered.choices[0].message.content != reply.choices[0].message.content


def test_served_greedy_equals_the_cli(server: tuple[str, subprocess.Popen], binary: Path, bundle_dir: Path,
                                      steer_dir: Path) -> None:
    url, _ = server
    for spec in (None, "push"):
        served = chat(url, PROMPT, **({"steering": spec} if spec else {})).json()
        args = ["--steer", str(steer_dir / f"{spec}.json")] if spec else []
        cli = run_generate(binary, bundle_dir, "--chat", "--greedy", "--max-new-tokens", "12", "--prompt", PROMPT,
                           *args)[0]
        assert served["choices"][0]["message"]["content"] == cli["text"], spec


def test_steering_registered_at_run_time_and_confined(server: tuple[str, subprocess.Popen]) -> None:
    url, _ = server
    spec: dict[str, Any] = {"interventions": [{"kind": "vector", "path": "random.safetensors", "layers": [8],
                                               "scale": 6.0}]}
    assert requests.post(f"{url}/v1/steering", json={"name": "mine", "spec": spec}, timeout=30).ok
    listed = {s["id"]: s for s in requests.get(f"{url}/v1/steering", timeout=30).json()["data"]}
    assert listed["mine"]["source"] == "api" and listed["push"]["source"] == "steer_dir"
    assert len(listed["mine"]["sha256"]) == 64
    assert chat(url, PROMPT, steering="mine").ok
    assert chat(url, PROMPT, steering=spec).ok
    assert requests.delete(f"{url}/v1/steering/mine", timeout=30).ok
    assert chat(url, PROMPT, steering="mine").status_code == 404
    traversal: dict[str, Any] = {"interventions": [{"kind": "vector", "path": "../../../etc/passwd", "layers": [8]}]}
    rejected = requests.post(f"{url}/v1/steering", json={"name": "evil", "spec": traversal}, timeout=30)
    assert rejected.status_code == 400 and "steering directory" in rejected.json()["error"]["message"]


def hostile_bodies(rng: random.Random) -> Iterator[bytes]:
    base = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    variants = [
        b"", b"{", b"not json", b"[]", b"null", b"\xff\xfe\xfa", json.dumps({"messages": "hi"}).encode(),
        json.dumps({"messages": []}).encode(), json.dumps({**base, "max_tokens": -1}).encode(),
        json.dumps({**base, "max_tokens": 10**12}).encode(), json.dumps({**base, "max_tokens": "four"}).encode(),
        json.dumps({**base, "temperature": "hot"}).encode(), json.dumps({**base, "temperature": -1}).encode(),
        json.dumps({**base, "top_p": 7}).encode(), json.dumps({**base, "steering": "no-such-spec"}).encode(),
        json.dumps({**base, "steering": {"interventions": [{"kind": "vector", "path": "random.safetensors",
                                                           "layers": [8], "scale": "NaN"}]}}).encode(),
        json.dumps({**base, "steering": {"interventions": [{"kind": "vector", "path": "/etc/passwd",
                                                           "layers": [8]}]}}).encode(),
        json.dumps({**base, "steering": {"interventions": [{"kind": "magic"}]}}).encode(),
        json.dumps({**base, "stop": 5}).encode(), json.dumps({**base, "stop": [""]}).encode(),
        json.dumps({"messages": [{"role": "user", "content": "x" * 100_000}]}).encode(),
        b'{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1e999}',
    ]
    for i in range(1000):
        body = variants[i % len(variants)]
        if i % 7 == 3:
            body = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
        yield body


def test_a_thousand_malformed_requests_get_json_4xx(server: tuple[str, subprocess.Popen]) -> None:
    url, process = server
    session = requests.Session()
    before = rss_kib(process)
    for body in hostile_bodies(random.Random(0)):
        response = session.post(f"{url}/v1/chat/completions", data=body, timeout=60,
                                headers={"content-type": "application/json"})
        assert 400 <= response.status_code < 500, (body[:80], response.status_code, response.text[:200])
        assert "error" in response.json(), body[:80]
    assert requests.get(f"{url}/health", timeout=10).ok
    assert rss_kib(process) - before < 200_000, "memory grew by more than 200 MB"


def test_concurrent_mixed_steering_matches_single_requests_while_registering(
        server: tuple[str, subprocess.Popen]) -> None:
    url, _ = server
    prompts = [f"Name one fact about the number {i}." for i in range(6)]
    kinds = [None, "push"]
    expected = {(p, k): chat(url, p, **({"steering": k} if k else {})).json()["choices"][0]["message"]["content"]
                for p in prompts for k in kinds}
    results: list[tuple[tuple[str, str | None], requests.Response]] = []
    lock = threading.Lock()
    spec: dict[str, Any] = {"interventions": [{"kind": "vector", "path": "random.safetensors", "layers": [8],
                                               "scale": 2.0}]}
    stop = threading.Event()

    def register() -> None:
        while not stop.is_set():
            requests.post(f"{url}/v1/steering", json={"name": "churn", "spec": spec}, timeout=60)

    def client(worker: int) -> None:
        for i in range(4):
            key = (prompts[(worker + i) % len(prompts)], kinds[(worker + i) % 2])
            for _ in range(20):
                response = chat(url, key[0], **({"steering": key[1]} if key[1] else {}))
                if response.status_code != 429:
                    break
                time.sleep(float(response.headers.get("retry-after", "1")))
            with lock:
                results.append((key, response))

    registrar = threading.Thread(target=register)
    registrar.start()
    workers = [threading.Thread(target=client, args=(w,)) for w in range(12)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    stop.set()
    registrar.join()
    assert len(results) == 48
    for key, response in results:
        assert response.ok, response.text
        assert response.json()["choices"][0]["message"]["content"] == expected[key], key


def wait_for_batch(url: str, size: int, seconds: float = 5.0) -> bool:
    """Poll /health until the running batch has `size` rows."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if requests.get(f"{url}/health", timeout=10).json()["batch_size"] == size:
            return True
        time.sleep(0.05)
    return False


def test_a_client_that_leaves_mid_stream_frees_its_row(server: tuple[str, subprocess.Popen]) -> None:
    url, _ = server
    with requests.post(f"{url}/v1/chat/completions", stream=True, timeout=60,
                       json={"messages": [{"role": "user", "content": "Tell me a long story."}],
                             "max_tokens": 400, "stream": True}) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith(b"data:"))
        assert wait_for_batch(url, 1), "the streaming row should be decoding"
    assert wait_for_batch(url, 0), "the row of a client that left is still decoding"


def test_sigterm_finishes_requests_in_flight(binary: Path, bundle_dir: Path) -> None:
    url, process = start_server(binary, bundle_dir)
    outcome: dict[str, requests.Response] = {}
    worker = threading.Thread(target=lambda: outcome.update(r=chat(url, "Tell me a long story.", max_tokens=48)))
    worker.start()
    assert wait_for_batch(url, 1)
    process.terminate()
    worker.join()
    assert process.wait(timeout=60) == 0
    assert outcome["r"].ok and outcome["r"].json()["usage"]["completion_tokens"] == 48


def test_sigterm_drains_readiness_before_closing(binary: Path, bundle_dir: Path) -> None:
    """With --drain-grace-s, SIGTERM turns /ready to 503 at once while requests are still served, so that
    a load balancer stops routing to the replica before its listener closes."""
    url, process = start_server(binary, bundle_dir, "--drain-grace-s", "3")
    assert requests.get(f"{url}/ready", timeout=10).json() == {"status": "ready"}
    process.terminate()
    deadline = time.monotonic() + 2
    while requests.get(f"{url}/ready", timeout=10).status_code != 503:
        assert time.monotonic() < deadline, "/ready still 200 after SIGTERM"
        time.sleep(0.05)
    assert requests.get(f"{url}/ready", timeout=10).json() == {"status": "draining"}
    assert chat(url, PROMPT).ok, "a request during the grace period is served"
    assert process.wait(timeout=60) == 0


def test_the_queue_is_first_come_first_served_with_a_timeout_and_retry_after(binary: Path, bundle_dir: Path) -> None:
    """One row at a time and one waiting: a third request is refused (429) with a Retry-After, and the
    waiting one leaves the queue after --queue-timeout-s with 503 and a Retry-After."""
    with serving(binary, bundle_dir, "--max-batch", "1", "--max-queue", "1", "--queue-timeout-s", "1") as (url, _):
        outcome: dict[str, requests.Response] = {}
        # Counting keeps the one row busy for about a hundred tokens or more: seconds, past the timeout.
        long = threading.Thread(target=lambda: outcome.update(long=chat(
            url, "Count from 1 to 500, separated by commas.", max_tokens=200)))
        long.start()
        assert wait_for_batch(url, 1)
        waiting = threading.Thread(target=lambda: outcome.update(waiting=chat(url, PROMPT)))
        waiting.start()
        deadline = time.monotonic() + 5
        while requests.get(f"{url}/health", timeout=10).json()["queue_depth"] < 1:
            assert time.monotonic() < deadline, "the second request never queued"
            time.sleep(0.02)
        refused = chat(url, PROMPT)
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
        waiting.join()
        expired = outcome["waiting"]
        assert expired.status_code == 503, expired.text
        assert "queue timeout" in expired.json()["error"]["message"] and int(expired.headers["Retry-After"]) >= 1
        long.join()
        assert outcome["long"].ok


def test_a_request_deadline_takes_it_out_of_the_queue(binary: Path, bundle_dir: Path) -> None:
    """deadline_s bounds a request from when it is queued: one still waiting at its deadline leaves the
    queue at once (504, it never runs) while the running row goes on; a bad deadline is a 400."""
    with serving(binary, bundle_dir, "--max-batch", "1", "--max-queue", "4") as (url, _):
        for bad in ("0", "-1", '"soon"', "1e999"):
            refused = requests.post(f"{url}/v1/chat/completions", timeout=10, headers={"content-type": "application/json"},
                                    data=f'{{"messages": [{{"role": "user", "content": "Hi"}}], "deadline_s": {bad}}}')
            assert refused.status_code == 400, (bad, refused.text)
            assert bad.startswith(('"', "1e")) or "deadline_s must be a positive" in refused.text, refused.text
        outcome: dict[str, requests.Response] = {}
        long = threading.Thread(target=lambda: outcome.update(long=chat(
            url, "Count from 1 to 500, separated by commas.", max_tokens=200)))
        long.start()
        assert wait_for_batch(url, 1)
        started = time.monotonic()
        late = chat(url, PROMPT, deadline_s=0.5)
        waited = time.monotonic() - started
        assert late.status_code == 504 and "took longer than" in late.json()["error"]["message"], late.text
        assert waited < 3, f"a request with a 0.5 s deadline was answered after {waited:.1f} s"
        deadline = time.monotonic() + 2
        while requests.get(f"{url}/health", timeout=10).json()["queue_depth"] != 0:
            assert time.monotonic() < deadline, "the expired request is still queued"
            time.sleep(0.02)
        assert long.is_alive(), "the running row should still be decoding when the queued one left"
        long.join()
        assert outcome["long"].ok and outcome["long"].json()["usage"]["completion_tokens"] > 0


def metric(url: str, name: str) -> float:
    """The value of the unlabelled series `onnx_steer_NAME` in /metrics."""
    for line in requests.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(f"onnx_steer_{name} "):
            return float(line.split()[1])
    raise AssertionError(f"no onnx_steer_{name} in /metrics")


def test_kv_slots_and_the_prefix_cache_are_reported_and_reuse_keeps_outputs(
        binary: Path, bundle_dir: Path) -> None:
    """Slots are reserved at start; a second prompt that shares the chat template's head and a
    context reuses its KV, and answers as a server without the prefix cache does."""
    context = "The lighthouse keeper lights the lamp at dusk and writes the weather in a log. " * 3
    questions = ["When is the lamp lit?", "What goes in the log?", "When is the lamp lit?"]
    answers = {}
    for cache_mb in ("0", "64"):
        with serving(binary, bundle_dir, "--max-batch", "2", "--max-context", "1024",
                     "--prefix-cache-mb", cache_mb) as (url, _):
            health = requests.get(f"{url}/health", timeout=10).json()
            assert (health["kv_slots"], health["kv_positions_per_slot"], health["kv_slots_used"]) == (2, 1024, 0)
            answers[cache_mb] = [chat(url, context + q).json()["choices"][0]["message"]["content"] for q in questions]
            hit, looked_up = metric(url, "prefix_cache_hit_tokens"), metric(url, "prefix_cache_lookup_tokens")
            if cache_mb == "0":
                assert hit == looked_up == 0
            else:
                assert hit >= 2 * 64, f"{hit} of {looked_up} prompt tokens reused"
                assert metric(url, "prefix_cache_hit_rate") == pytest.approx(hit / looked_up)
                assert metric(url, "kv_cache_bytes") > 0
    assert answers["64"] == answers["0"]
    too_long = "word " * 1100
    with serving(binary, bundle_dir, "--max-context", "1024") as (url, _):
        response = chat(url, too_long)
        assert response.status_code == 400 and "--max-context" in response.json()["error"]["message"]
