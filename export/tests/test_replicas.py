"""Three `onnx-steer serve` replicas behind a real load balancer (nginx, round robin on loopback ports),
sharing one steering directory as Kubernetes replicas share a mounted ConfigMap: a spec file written
there is served by every replica within a bound, and once it is removed every replica answers 404."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest
import requests
from safetensors.numpy import save_file

from onnx_steer_export.runtime_client import free_port, serving

REPLICAS = 3
POLL_MS = 200
# Within this a change of the directory must be served by every replica: a few polls, with room for
# resolving the spec on a busy machine.
CONVERGE_S = 10.0
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def nginx_conf(prefix: Path, port: int, upstreams: list[str]) -> str:
    servers = "\n".join(f"        server {u.removeprefix('http://')};" for u in upstreams)
    return f"""
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    upstream replicas {{
{servers}
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://replicas;
            proxy_read_timeout 120s;
            proxy_next_upstream off;
        }}
    }}
}}
"""


@pytest.fixture(scope="module")
def fleet(binary: Path, bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, list[str], Path]]:
    """(the balancer's URL, each replica's URL, the shared steering directory)."""
    assert Path(NGINX).exists(), "nginx is missing: `apt-get install nginx-light` (.ci/run installs it)"
    steer = tmp_path_factory.mktemp("shared_steer")
    save_file({"direction.12": np.random.default_rng(1).normal(size=576).astype(np.float32)},
              str(steer / "random.safetensors"))
    prefix = tmp_path_factory.mktemp("nginx")
    with ExitStack() as stack:
        urls = [stack.enter_context(serving(binary, bundle_dir, "--steer-dir", str(steer), "--steer-dir-poll-ms",
                                            str(POLL_MS), "--max-batch", "2", "--no-prepack"))[0]
                for _ in range(REPLICAS)]
        port = free_port()
        (prefix / "nginx.conf").write_text(nginx_conf(prefix, port, urls))
        balancer = subprocess.Popen([NGINX, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-g", "daemon off;"],
                                    stderr=subprocess.PIPE, text=True)
        stack.callback(balancer.wait, timeout=30)
        stack.callback(balancer.terminate)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{url}/health", timeout=2).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.2)
        else:
            raise RuntimeError(f"nginx did not come up: {(prefix / 'error.log').read_text()}")
        yield url, urls, steer


def listing(url: str) -> dict[str, dict]:
    return {s["id"]: s for s in requests.get(f"{url}/v1/steering", timeout=10).json()["data"]}


def until(condition: Callable[[], bool], what: str) -> float:
    """Seconds until `condition()` holds; fails after CONVERGE_S."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > CONVERGE_S:
            raise AssertionError(f"not within {CONVERGE_S} s: {what}")
        time.sleep(0.05)
    return time.monotonic() - started


def chat(url: str, steering: str) -> requests.Response:
    return requests.post(f"{url}/v1/chat/completions", timeout=120, json={
        "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 4, "temperature": 0,
        "steering": steering})


def test_a_spec_in_the_shared_directory_reaches_every_replica_and_leaves_them(
        fleet: tuple[str, list[str], Path]) -> None:
    balancer, replicas, steer = fleet
    spec = {"interventions": [{"kind": "vector", "path": "random.safetensors", "layers": [12], "scale": 4.0}]}
    # Written whole and renamed in, as a ConfigMap update swaps its files.
    (steer / "shared.json.tmp").write_text(json.dumps(spec))
    (steer / "shared.json.tmp").rename(steer / "shared.json")
    seconds = until(lambda: all("shared" in listing(u) for u in replicas), "every replica registers shared")
    digests = {listing(u)["shared"]["sha256"] for u in replicas}
    assert len(digests) == 1, f"the replicas disagree on the spec: {digests}"
    assert all(listing(u)["shared"]["source"] == "steer_dir" for u in replicas)
    print(f"registered on all {REPLICAS} replicas within {seconds:.2f} s")
    # Through the balancer, round robin: every replica answers a request naming it.
    served = [chat(balancer, "shared") for _ in range(2 * REPLICAS)]
    assert all(r.ok for r in served), [r.text for r in served if not r.ok]
    texts = {r.json()["choices"][0]["message"]["content"] for r in served}
    assert len(texts) == 1, f"replicas steer differently: {texts}"

    # Changed: every replica swaps to the new version (a new digest).
    spec["interventions"][0]["scale"] = 8.0
    (steer / "shared.json.tmp").write_text(json.dumps(spec))
    (steer / "shared.json.tmp").rename(steer / "shared.json")
    def replaced() -> bool:
        now = {listing(u)["shared"]["sha256"] for u in replicas}
        return len(now) == 1 and now != digests

    until(replaced, "every replica replaces shared")

    (steer / "shared.json").unlink()
    seconds = until(lambda: all("shared" not in listing(u) for u in replicas), "every replica removes shared")
    print(f"removed from all {REPLICAS} replicas within {seconds:.2f} s")
    gone = [chat(balancer, "shared") for _ in range(2 * REPLICAS)]
    assert all(r.status_code == 404 for r in gone), [r.status_code for r in gone]
