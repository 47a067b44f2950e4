"""Crafted hostile inputs for the runtime and the server: files a downloaded control vector or net
could be, and requests an attacker could send. `export/tests/test_hostile.py` performs each attack
once and asserts the clean outcome; `bench/hostile.py` interleaves them with normal traffic for
minutes (`make hostile`).

Every builder writes into a folder the caller owns (a server's --steer-dir); nothing here touches
files elsewhere.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import requests
from onnx import TensorProto, helper
from safetensors.numpy import save_file

GGUF_ARRAY = 9
GGUF_UINT32 = 4
OPSET = 17


def nested_gguf(levels: int) -> bytes:
    """A GGUF whose one metadata value is `levels` arrays nested in each other (a recursive reader
    overflows its stack: 55,000 levels aborted the CLI, 20,000 a tokio worker)."""
    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, 0, 1))
    out += struct.pack("<Q", 1) + b"k" + struct.pack("<I", GGUF_ARRAY)
    for _ in range(levels):
        out += struct.pack("<IQ", GGUF_ARRAY, 1)
    out += struct.pack("<IQI", GGUF_UINT32, 1, 7)
    return bytes(out)


def _net(nodes: list[onnx.NodeProto], hidden: int, output: str, declared_width: int,
         initializers: list[onnx.TensorProto] | None = None) -> bytes:
    """A `state [batch, hidden] -> output [batch, declared_width]` graph; what it really computes is
    up to `nodes`."""
    graph = helper.make_graph(
        nodes, "hostile",
        [helper.make_tensor_value_info("state", TensorProto.FLOAT, ["batch", hidden])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["batch", declared_width])],
        initializer=initializers or [],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    return model.SerializeToString()


def _int64(name: str, values: list[int]) -> onnx.TensorProto:
    return helper.make_tensor(name, TensorProto.INT64, [len(values)], values)


def width_from_data(hidden: int, output: str, declared_width: int, divisor: int) -> bytes:
    """A net that declares `[batch, declared_width]` but returns `state[:, :n / divisor]`, where n
    counts the state's non-zero entries: a width no load-time check can see (a `Slice` whose end
    comes from a `ReduceSum`)."""
    nodes = [
        helper.make_node("Sign", ["state"], ["sign"]),
        helper.make_node("Abs", ["sign"], ["nonzero"]),
        helper.make_node("ReduceSum", ["nonzero"], ["count"], keepdims=0),
        helper.make_node("Cast", ["count"], ["count_i"], to=TensorProto.INT64),
        helper.make_node("Div", ["count_i", "divisor"], ["end"]),
        helper.make_node("Reshape", ["end", "one"], ["ends"]),
        helper.make_node("Slice", ["state", "starts", "ends", "axes"], [output]),
    ]
    constants = [_int64("divisor", [divisor]), _int64("one", [1]), _int64("starts", [0]),
                 _int64("axes", [1])]
    return _net(nodes, hidden, output, declared_width, constants)


def raw_slice(hidden: int, output: str, width: int, factor: float = 1.0, padding_mb: int = 0) -> bytes:
    """`state[:, :width] * factor`: as a router or prober, values that are not probabilities
    (negative, not summing to 1); with a huge factor, an L2S vector that overflows. `padding_mb`
    adds an unused initializer of that size, for a net that is large on disk."""
    nodes = [
        helper.make_node("Slice", ["state", "starts", "ends", "axes"], ["part"]),
        helper.make_node("Mul", ["part", "factor"], [output]),
    ]
    constants = [_int64("starts", [0]), _int64("ends", [width]), _int64("axes", [1]),
                 helper.make_tensor("factor", TensorProto.FLOAT, [], [factor])]
    if padding_mb:
        padding = np.zeros(padding_mb << 18, dtype=np.float32)
        constants.append(helper.make_tensor("padding", TensorProto.FLOAT, [padding.size], padding.tobytes(),
                                            raw=True))
    return _net(nodes, hidden, output, width, constants)


@dataclass(frozen=True)
class HostileFiles:
    """The crafted files of `write_hostile_files`, by attack, relative to the steer dir."""

    nested_gguf: str = "nested.gguf"
    shape_lying_l2s: str = "shape_lying_l2s.onnx"
    overflowing_l2s: str = "overflowing_l2s.onnx"
    improbable_router: str = "improbable_router.onnx"
    large_l2s: str = "large_l2s.onnx"
    bank: str = "bank.safetensors"
    vector: str = "v.safetensors"
    fifo: str = "fifo.safetensors"
    sparse: str = "sparse.safetensors"


def write_hostile_files(steer_dir: Path, hidden: int, num_layers: int) -> HostileFiles:
    """Write every crafted file into `steer_dir` (a FIFO and a 2 GB sparse file among them)."""
    files = HostileFiles()
    rng = np.random.default_rng(0)
    (steer_dir / files.nested_gguf).write_bytes(nested_gguf(20_000))
    (steer_dir / files.shape_lying_l2s).write_bytes(width_from_data(hidden, "vector", hidden, 2))
    (steer_dir / files.overflowing_l2s).write_bytes(raw_slice(hidden, "vector", hidden, 1e30))
    (steer_dir / files.improbable_router).write_bytes(raw_slice(hidden, "probs", 2))
    (steer_dir / files.large_l2s).write_bytes(raw_slice(hidden, "vector", hidden, 1e-3, padding_mb=10))
    layers = [num_layers // 2, num_layers // 2 + 1]
    save_file({f"direction.{layer}": rng.normal(size=hidden).astype(np.float32) for layer in layers},
              str(steer_dir / files.bank))
    save_file({f"direction.{layer}": rng.normal(size=hidden).astype(np.float32) for layer in range(num_layers)},
              str(steer_dir / files.vector))
    fifo = steer_dir / files.fifo
    if not fifo.exists():
        os.mkfifo(fifo)
    with open(steer_dir / files.sparse, "wb") as sparse:
        sparse.truncate(2 << 30)
    return files


def vector_spec(path: str, layer: int, scale: float = 1.0, entries: int = 1) -> dict:
    return {"interventions": [{"kind": "vector", "path": path, "layers": [layer], "scale": scale}] * entries}


def l2s_spec(path: str, layer: int) -> dict:
    return {"interventions": [{"kind": "l2s", "path": path, "read_layer": layer - 2, "layer": layer}]}


def w2s_spec(files: HostileFiles, layer: int) -> dict:
    return {"interventions": [{"kind": "w2s", "router": files.improbable_router, "bank": files.bank,
                               "read_layer": layer - 2}]}


# --- Attacks on a running server: each returns (attack name, outcome ok?, detail). -------------

Outcome = tuple[str, bool, str]


def chat_body(steering: dict | str | None = None, max_tokens: int = 4) -> dict:
    body: dict = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": max_tokens}
    if steering is not None:
        body["steering"] = steering
    return body


def expect_error(name: str, response: requests.Response, status: int, words: str) -> Outcome:
    ok = response.status_code == status and words in response.text
    return name, ok, f"{response.status_code} {response.text[:160]}"


def attack_inline(url: str, name: str, steering: dict, status: int, words: str) -> Outcome:
    response = requests.post(f"{url}/v1/chat/completions", json=chat_body(steering), timeout=120)
    return expect_error(name, response, status, words)


def attack_idle_socket(url: str, header_timeout_s: float) -> Outcome:
    """Open a socket and send nothing: the server must close it after the header timeout."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=header_timeout_s + 10) as sock:
        started = time.monotonic()
        try:
            closed = sock.recv(1) == b""
        except (ConnectionResetError, TimeoutError):
            closed = False
        waited = time.monotonic() - started
    return "idle socket", closed and waited < header_timeout_s + 5, f"closed after {waited:.1f} s"


def attack_trickled_headers(url: str, header_timeout_s: float) -> Outcome:
    """Send the request head one byte a second, never finishing: closed after the header timeout."""
    host, port = url.removeprefix("http://").split(":")
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=header_timeout_s + 10) as sock:
        try:
            for byte in head:
                sock.sendall(bytes([byte]))
                time.sleep(1.0)
                if time.monotonic() - started > header_timeout_s + 10:
                    break
        except (BrokenPipeError, ConnectionResetError):
            pass
        waited = time.monotonic() - started
    return "trickled headers", waited < header_timeout_s + 5, f"cut after {waited:.1f} s"


def attack_slow_body(url: str, body_timeout_s: float) -> Outcome:
    """Announce a body and send it a byte every 2 s: 408 after the body timeout."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps(chat_body()).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=body_timeout_s + 10) as sock:
        sock.sendall(head)
        sock.settimeout(2.0)
        reply = b""
        for byte in body:
            try:
                sock.sendall(bytes([byte]))
                reply += sock.recv(4096)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
            if reply:
                break
    waited = time.monotonic() - started
    status = reply.split(b" ", 2)[1].decode() if reply.count(b" ") >= 2 else "none"
    return "slow body", status == "408" and waited < body_timeout_s + 5, f"{status} after {waited:.1f} s"


def attacks(url: str, files: HostileFiles, num_layers: int, header_timeout_s: float,
            body_timeout_s: float, admin_token: str) -> list[Callable[[], Outcome]]:
    """Every request-borne attack, each a call that performs it once against `url` (a server
    started with `--admin-token-file` holding `admin_token`)."""
    layer = num_layers // 2
    admin = {"Authorization": f"Bearer {admin_token}"}
    # The body: 20,600 short entries naming one file, under the 1 MiB body limit.
    amplified: dict[str, Any] = {"name": "amplified", "spec": {"interventions": [{"kind": "vector", "path": files.vector}] * 20_600}}
    return [
        lambda: attack_inline(url, "nested GGUF", vector_spec(files.nested_gguf, layer), 400, "nested deeper"),
        lambda: attack_inline(url, "net with a data-dependent width", l2s_spec(files.shape_lying_l2s, layer),
                              500, "expected [1,"),
        lambda: attack_inline(url, "L2S vector that overflows", l2s_spec(files.overflowing_l2s, layer),
                              500, "overflows"),
        lambda: attack_inline(url, "router outputs that are not probabilities", w2s_spec(files, layer),
                              500, "probabilit"),
        lambda: attack_inline(url, "scale 1e20", vector_spec(files.vector, layer, 1e20), 400, "overflows"),
        lambda: attack_inline(url, "FIFO as a vector", vector_spec(files.fifo, layer), 400, "FIFO"),
        lambda: attack_inline(url, "2 GB sparse vector", vector_spec(files.sparse, layer), 400,
                              "more than the limit"),
        lambda: expect_error("20,600-entry registration",
                             requests.post(f"{url}/v1/steering", json=amplified, headers=admin, timeout=60),
                             400,
                             "more than the limit of 64"),
        lambda: expect_error("registration without the admin token",
                             requests.post(f"{url}/v1/steering",
                                           json={"name": "refusal", "spec": vector_spec(files.vector, layer)},
                                           timeout=60), 401, "admin token"),
        lambda: attack_idle_socket(url, header_timeout_s),
        lambda: attack_trickled_headers(url, header_timeout_s),
        lambda: attack_slow_body(url, body_timeout_s),
    ]
