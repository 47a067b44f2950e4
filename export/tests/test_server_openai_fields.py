"""The OpenAI fields clients send on every request behave as OpenAI's do on `onnx-steer serve`:
log-probabilities (HF-exact, unsteered and steered), `echo` with `max_tokens: 0`, `n`, the
penalties and `model`."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import requests
import torch
from safetensors.numpy import save_file

from onnx_steer_export.export.source import LoadedModel
from onnx_steer_export.runtime_client import serving
from onnx_steer_export.train.reference import added

from conftest import run_generate

MODEL = "smollm2-135m-instruct"
LAYER, SCALE = 12, 6.0
PROMPTS = ["The capital of France is", "Water boils at", "Once upon a time, there was a",
           "Q: What colour is the sky?\nA:", "def fibonacci(n):", "The best way to learn a language is",
           "My favourite fruit is", "In 1969, astronauts"]


def direction() -> np.ndarray:
    vector = np.random.default_rng(11).standard_normal(576).astype(np.float32)
    return vector / np.linalg.norm(vector)


@pytest.fixture(scope="module")
def server(binary: Path, bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[str, subprocess.Popen]]:
    steer_dir = tmp_path_factory.mktemp("fields_steer")
    save_file({f"direction.{LAYER}": direction()}, str(steer_dir / "random.safetensors"))
    (steer_dir / "push.json").write_text(json.dumps({"interventions": [
        {"kind": "vector", "path": "random.safetensors", "layers": [LAYER], "scale": SCALE}]}))
    with serving(binary, bundle_dir, "--steer-dir", str(steer_dir), "--max-batch", "8") as running:
        yield running


def post(url: str, endpoint: str, **body: Any) -> requests.Response:
    return requests.post(f"{url}/v1/{endpoint}", json=body, timeout=120)


def hf_prompt_logprobs(model: LoadedModel, prompt: str, steered: bool) -> torch.Tensor:
    ids = model.tokenizer(prompt).input_ids
    with torch.no_grad():
        if steered:
            with added(model.model, {LAYER: torch.from_numpy(SCALE * direction())}):
                logits = model.model(torch.tensor([ids])).logits
        else:
            logits = model.model(torch.tensor([ids])).logits
    logprobs = torch.log_softmax(logits[0].double(), dim=-1)
    return logprobs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]


@pytest.mark.parametrize("steered", [False, True], ids=["unsteered", "vector"])
def test_echoed_prompt_logprobs_equal_hf(steered: bool, server: tuple[str, subprocess.Popen],
                                         default_model: LoadedModel) -> None:
    """What evaluation harnesses send for log-likelihoods: echo, max_tokens 0, logprobs."""
    url, _ = server
    extra = {"steering": "push"} if steered else {}
    worst = 0.0
    for prompt in PROMPTS:
        reply = post(url, "completions", model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=1,
                     temperature=0, **extra)
        assert reply.status_code == 200, reply.text
        choice = reply.json()["choices"][0]
        assert choice["text"] == prompt and reply.json()["usage"]["completion_tokens"] == 0
        logprobs = choice["logprobs"]
        assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
        assert len(logprobs["tokens"]) == len(logprobs["text_offset"]) == len(logprobs["token_logprobs"])
        expected = hf_prompt_logprobs(default_model, prompt, steered)
        got = torch.tensor(logprobs["token_logprobs"][1:], dtype=torch.float64)
        worst = max(worst, (got - expected).abs().max().item())
        assert all(len(top) == 1 for top in logprobs["top_logprobs"][1:])
    print(f"{'steered' if steered else 'unsteered'}: worst |server - HF| log-prob {worst:.2e}")
    assert worst < 1e-4


def test_token_prompts_in_a_batch_as_evaluation_harnesses_send_them(server: tuple[str, subprocess.Popen],
                                                                    default_model: LoadedModel) -> None:
    """lm-evaluation-harness's `local-completions` sends token-id prompts, several per request."""
    url, _ = server
    ids = [default_model.tokenizer(p).input_ids for p in PROMPTS[:4]]
    reply = post(url, "completions", model=MODEL, prompt=ids, max_tokens=0, echo=True, logprobs=1)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["usage"]["prompt_tokens"] == sum(map(len, ids))
    for prompt, tokens, choice in zip(PROMPTS, ids, body["choices"]):
        assert choice["text"] == prompt
        text = post(url, "completions", model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=1).json()
        batched, alone = choice["logprobs"]["token_logprobs"], text["choices"][0]["logprobs"]["token_logprobs"]
        assert batched[0] is None and alone[0] is None
        assert np.allclose(batched[1:], alone[1:], atol=1e-5), "a batched prompt scores as it does alone"
        assert len(choice["logprobs"]["tokens"]) == len(tokens)
    two = post(url, "completions", model=MODEL, prompt=PROMPTS[:2], max_tokens=3, n=2)
    assert [c["index"] for c in two.json()["choices"]] == [0, 1, 2, 3]
    for body_fields, says in (({"prompt": [[1, 99999999]]}, "outside the model's vocabulary"),
                              ({"prompt": ["a"] * 17}, "1 to 16 prompts"),
                              ({"prompt": ["a", "b"], "stream": True}, "send one prompt"),
                              ({"prompt": ["a"] * 9, "n": 2}, "more than 16 choices"),
                              ({"prompt": []}, "prompt is empty")):
        bad = post(url, "completions", max_tokens=2, **body_fields)
        assert bad.status_code == 400 and says in bad.json()["error"]["message"], (body_fields, bad.text)


def test_chat_logprobs_equal_the_cli_and_stream(server: tuple[str, subprocess.Popen], binary: Path,
                                                bundle_dir: Path) -> None:
    url, _ = server
    client: Any = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")  # responses are read as OpenAI documents them
    prompt = "Name three fruits."
    reply = client.chat.completions.create(model=MODEL, max_tokens=12, logprobs=True, top_logprobs=3,
                                           messages=[{"role": "user", "content": prompt}])
    content = reply.choices[0].logprobs.content
    assert "".join(t.token for t in content) == reply.choices[0].message.content
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token for t in content)
    cli = run_generate(binary, bundle_dir, "--chat", "--max-new-tokens", "12", "--logprobs", "3", "--prompt",
                       prompt)[0]["logprobs"]
    assert np.allclose([t.logprob for t in content], [p["logprob"] for p in cli], atol=1e-5)
    chunks = client.chat.completions.create(model=MODEL, max_tokens=12, logprobs=True, stream=True,
                                            messages=[{"role": "user", "content": prompt}])
    streamed = [t for chunk in chunks if chunk.choices and chunk.choices[0].logprobs
                for t in chunk.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content]
    assert np.allclose([t.logprob for t in streamed], [t.logprob for t in content], atol=1e-6)


def test_n_choices_each_with_its_seed(server: tuple[str, subprocess.Popen]) -> None:
    url, _ = server
    client: Any = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")  # responses are read as OpenAI documents them
    messages = [{"role": "user", "content": "Write a word."}]
    reply = client.chat.completions.create(model=MODEL, max_tokens=10, n=4, temperature=1.0, seed=5,
                                           messages=messages)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    texts = [c.message.content for c in reply.choices]
    assert len(set(texts)) > 1, texts
    again = client.chat.completions.create(model=MODEL, max_tokens=10, n=4, temperature=1.0, seed=5,
                                           messages=messages)
    assert [c.message.content for c in again.choices] == texts
    single = client.chat.completions.create(model=MODEL, max_tokens=10, messages=messages)
    assert reply.usage.prompt_tokens == single.usage.prompt_tokens
    assert 4 <= reply.usage.completion_tokens <= 40
    streamed: dict[int, str] = {}
    for chunk in client.chat.completions.create(model=MODEL, max_tokens=10, n=4, temperature=1.0, seed=5,
                                                messages=messages, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + (choice.delta.content or "")
    assert [streamed[i] for i in range(4)] == texts
    greedy = client.chat.completions.create(model=MODEL, max_tokens=10, n=2, messages=messages)
    assert greedy.choices[0].message.content == greedy.choices[1].message.content


def repetition(text: str) -> float:
    """The share of words that repeat an earlier one."""
    words = re.findall(r"\w+", text)
    return 1 - len(set(words)) / max(len(words), 1)


def test_penalties_change_repetitive_text(server: tuple[str, subprocess.Popen]) -> None:
    url, _ = server
    body = {"model": MODEL, "prompt": "one one one one one one", "max_tokens": 16}
    plain = post(url, "completions", **body).json()["choices"][0]["text"]
    zero = post(url, "completions", presence_penalty=0, frequency_penalty=0, **body).json()["choices"][0]["text"]
    assert zero == plain
    for penalty in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        penalised = post(url, "completions", **penalty, **body).json()["choices"][0]["text"]
        assert penalised != plain, penalty
        assert repetition(penalised) < repetition(plain), (penalised, plain)


@pytest.mark.parametrize(("body", "status", "says"), [
    ({"model": "gpt-4o"}, 404, "does not exist"),
    ({"max_tokens": 0}, 400, "only with echo"),
    ({"n": 0}, 400, "n must be"),
    ({"n": 17}, 400, "n must be"),
    ({"presence_penalty": 3}, 400, "presence penalty"),
    ({"frequency_penalty": -2.5}, 400, "frequency penalty"),
    ({"logprobs": True}, 400, "number of alternatives"),
    ({"logprobs": 21}, 400, "0 to 20"),
    ({"top_logprobs": 2}, 400, "chat field"),
    ({"echo": True, "logprobs": 1, "stream": True}, 400, "stream"),
])
def test_wrong_fields_are_openai_errors(body: dict, status: int, says: str,
                                        server: tuple[str, subprocess.Popen]) -> None:
    url, _ = server
    reply = post(url, "completions", prompt="Hello", **{"max_tokens": 4, **body})
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert says in error["message"], error
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


def test_chat_field_rules(server: tuple[str, subprocess.Popen]) -> None:
    url, _ = server
    messages = [{"role": "user", "content": "Hi"}]
    for body, says in (({"logprobs": 2}, "true or false"), ({"top_logprobs": 2}, "needs logprobs"),
                       ({"echo": True}, "completions field")):
        reply = post(url, "chat/completions", messages=messages, max_tokens=4, **body)
        assert reply.status_code == 400 and says in reply.json()["error"]["message"], reply.text
    assert post(url, "chat/completions", messages=messages, max_tokens=4).status_code == 200
