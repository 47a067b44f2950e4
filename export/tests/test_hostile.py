"""Issue 21's attacks on a real server over the default bundle, each performed and its clean outcome
asserted: the request gets a clear error, memory stays bounded, and the server goes on serving."""

from __future__ import annotations

import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from onnx_steer_export.eval import hostile
from onnx_steer_export.runtime_client import serving

from conftest import rss_kib

TOKEN = "correct horse battery staple"
HEADER_TIMEOUT_S = 2
BODY_TIMEOUT_S = 3


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, hostile.HostileFiles]:
    steer = tmp_path_factory.mktemp("hostile-steer")
    return steer, hostile.write_hostile_files(steer, hidden=576, num_layers=30)


@pytest.fixture(scope="module")
def server_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("log") / "server.log"


@pytest.fixture(scope="module")
def server(binary: Path, bundle_dir: Path, files: tuple[Path, hostile.HostileFiles], server_log: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, subprocess.Popen]]:
    steer, _ = files
    token_file = tmp_path_factory.mktemp("secret") / "token"
    token_file.write_text(TOKEN + "\n")
    with open(server_log, "w") as log, serving(
            binary, bundle_dir, "--steer-dir", str(steer), "--max-batch", "4",
            "--admin-token-file", str(token_file), "--header-timeout-s", str(HEADER_TIMEOUT_S),
            "--body-timeout-s", str(BODY_TIMEOUT_S), "--steering-memory-mb", "64",
            stderr=log.fileno()) as running:
        yield running


def still_serving(url: str) -> None:
    assert requests.get(f"{url}/health", timeout=10).ok
    response = requests.post(f"{url}/v1/chat/completions", json=hostile.chat_body(), timeout=120)
    assert response.ok, response.text


@pytest.mark.parametrize("index", range(9))
def test_each_crafted_file_and_request_gets_a_clean_error(
        server: tuple[str, subprocess.Popen], files: tuple[Path, hostile.HostileFiles], index: int) -> None:
    url, process = server
    attack = hostile.attacks(url, files[1], 30, HEADER_TIMEOUT_S, BODY_TIMEOUT_S, TOKEN)[index]
    before = rss_kib(process)
    name, ok, detail = attack()
    assert ok, f"{name}: {detail}"
    assert rss_kib(process) - before < 100_000, f"{name}: memory grew by more than 100 MB"
    still_serving(url)


@pytest.mark.parametrize("index", range(9, 12))
def test_slow_and_idle_connections_are_closed(
        server: tuple[str, subprocess.Popen], files: tuple[Path, hostile.HostileFiles], index: int) -> None:
    url, _ = server
    name, ok, detail = hostile.attacks(url, files[1], 30, HEADER_TIMEOUT_S, BODY_TIMEOUT_S, TOKEN)[index]()
    assert ok, f"{name}: {detail}"
    still_serving(url)


def test_a_misbehaving_net_fails_only_its_own_row(
        server: tuple[str, subprocess.Popen], files: tuple[Path, hostile.HostileFiles], server_log: Path) -> None:
    """The crafted net used to panic the engine: 503 for it, 429 for every request after. Here it
    joins in one prefill group with two normal requests (registered beforehand, so that the three
    queue together while a long prompt is prefilled), and only its own request fails."""
    url, _ = server
    admin = {"Authorization": f"Bearer {TOKEN}"}
    spec = hostile.l2s_spec(files[1].shape_lying_l2s, 15)
    assert requests.post(f"{url}/v1/steering", json={"name": "lying", "spec": spec}, headers=admin,
                         timeout=60).ok
    results: dict[str, requests.Response] = {}

    def send(key: str, steering: str | None, max_tokens: int) -> None:
        results[key] = requests.post(f"{url}/v1/chat/completions",
                                     json=hostile.chat_body(steering, max_tokens=max_tokens), timeout=120)

    def busy() -> None:
        # A long prompt: its prefill holds the engine for seconds, while the three queue up.
        results["busy"] = requests.post(f"{url}/v1/completions", json={"prompt": "lighthouse " * 1500,
                                                                       "max_tokens": 1}, timeout=120)

    threads = [threading.Thread(target=busy)]
    threads[0].start()
    time.sleep(1.0)
    threads += [threading.Thread(target=send, args=("bad", "lying", 8))]
    threads += [threading.Thread(target=send, args=(f"good{i}", None, 8)) for i in range(2)]
    for thread in threads[1:]:
        thread.start()
    for thread in threads:
        thread.join()
    assert results["bad"].status_code == 500 and "expected [1, 576]" in results["bad"].text, results["bad"].text
    for key in ("busy", "good0", "good1"):
        assert results[key].ok, results[key].text
    assert "joining its requests one by one" in server_log.read_text(), "the three did not share a group"
    assert requests.delete(f"{url}/v1/steering/lying", headers=admin, timeout=60).ok
    still_serving(url)


def test_registration_needs_the_admin_token_and_deleted_specs_leave_the_metrics(
        server: tuple[str, subprocess.Popen], files: tuple[Path, hostile.HostileFiles]) -> None:
    url, _ = server
    admin = {"Authorization": f"Bearer {TOKEN}"}
    body: dict[str, Any] = {"name": "mine", "spec": hostile.vector_spec(files[1].vector, 12, 0.5)}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        refused = requests.post(f"{url}/v1/steering", json=body, headers=headers, timeout=60)
        assert refused.status_code == 401, refused.text
        assert refused.json()["error"]["type"] == "authentication_error"
    assert requests.post(f"{url}/v1/steering", json=body, headers=admin, timeout=60).ok
    assert requests.post(f"{url}/v1/chat/completions", json=hostile.chat_body("mine"), timeout=120).ok
    series = re.compile(r'steering_requests_total\{spec="mine"\}')
    assert series.search(requests.get(f"{url}/metrics", timeout=10).text)
    assert requests.delete(f"{url}/v1/steering/mine", timeout=60).status_code == 401
    assert requests.delete(f"{url}/v1/steering/mine", headers=admin, timeout=60).ok
    assert not series.search(requests.get(f"{url}/metrics", timeout=10).text)
    # Reading the list stays open.
    assert requests.get(f"{url}/v1/steering", timeout=10).ok


def test_registered_specs_are_bounded_in_count_and_memory(
        server: tuple[str, subprocess.Popen], files: tuple[Path, hostile.HostileFiles]) -> None:
    url, process = server
    admin = {"Authorization": f"Bearer {TOKEN}"}
    before = rss_kib(process)
    statuses = []
    for i in range(260):
        spec = hostile.vector_spec(files[1].vector, 12, 0.01 * (i + 1), entries=64)
        response = requests.post(f"{url}/v1/steering", json={"name": f"s{i}", "spec": spec}, headers=admin,
                                 timeout=60)
        statuses.append(response.status_code)
    assert statuses[:256] == [200] * 256 and statuses[256:] == [507] * 4, statuses
    assert rss_kib(process) - before < 200_000, "256 specs of 64 entries grew memory by more than 200 MB"
    for i in range(256):
        requests.delete(f"{url}/v1/steering/s{i}", headers=admin, timeout=60)
    still_serving(url)


def test_trained_tensors_are_readable_by_other_users(tmp_path: Path) -> None:
    """safetensors writes 0600, which the Docker image's unprivileged user cannot read."""
    from onnx_steer_export.train.common import save_tensors

    out = tmp_path / "v.safetensors"
    save_tensors({"direction.1": np.ones(4, dtype=np.float32)}, out)
    assert out.stat().st_mode & 0o777 == 0o644


def test_registration_beyond_the_memory_budget_is_refused_before_reading(
        server: tuple[str, subprocess.Popen], files: tuple[Path, hostile.HostileFiles]) -> None:
    """Each spec names a 10 MB net: the server's 64 MB budget holds six of them."""
    url, _ = server
    admin = {"Authorization": f"Bearer {TOKEN}"}
    statuses = []
    for i in range(8):
        spec = hostile.l2s_spec(files[1].large_l2s, 12)
        spec["interventions"][0]["scale"] = 1.0 + i  # distinct content: no cache hit
        response = requests.post(f"{url}/v1/steering", json={"name": f"big{i}", "spec": spec}, headers=admin,
                                 timeout=60)
        statuses.append((response.status_code, response.text[:200]))
    assert [code for code, _ in statuses[:6]] == [200] * 6, statuses
    assert all(code == 507 and "steering memory budget" in text for code, text in statuses[6:]), statuses
    for i in range(6):
        assert requests.delete(f"{url}/v1/steering/big{i}", headers=admin, timeout=60).ok
    still_serving(url)
