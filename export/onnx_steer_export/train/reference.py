"""HF transformers reference steering: forward hooks that do what the runtime does, for labels (W2S)
and for parity tests. Layer L is decoder block L's output (HF `hidden_states[L+1]`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel

from ..export.segments import decoder_layers, text_model

if TYPE_CHECKING:
    from .autosteer import Pooling


@contextmanager
def hooked(handles: list[torch.utils.hooks.RemovableHandle]) -> Iterator[None]:
    """Keep forward hooks registered while active."""
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def greedy(model: PreTrainedModel, input_ids: list[int], max_new_tokens: int, pad_id: int | None) -> list[int]:
    """HF `generate(do_sample=False)` new tokens, without the trailing EOS (the runtime drops it too)."""
    ids = torch.tensor([input_ids])
    with torch.no_grad():
        options = {"attention_mask": torch.ones_like(ids), "do_sample": False, "max_new_tokens": max_new_tokens,
                   "pad_token_id": pad_id}
        out = model.generate(ids, **options)  # type: ignore[operator]
    new = out[0, ids.shape[1]:].tolist()
    eos = model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or [])
    for i, token in enumerate(new):
        if token in eos:
            return new[:i]
    return new


def token_logprobs(model: PreTrainedModel, ids: list[int], deltas: dict[int, torch.Tensor] | None = None
                   ) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t = 1.., in float64, from one HF forward (with `deltas[L]` added to
    layer L's output at every position)."""
    with torch.no_grad(), added(model, deltas or {}):
        logits = model(torch.tensor([ids])).logits
    logprobs = torch.log_softmax(logits[0].double(), dim=-1)
    return logprobs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]


@contextmanager
def added(model: PreTrainedModel, deltas: dict[int, torch.Tensor]) -> Iterator[None]:
    """Add `deltas[L]` (shape [d] or [B, 1, d]) to layer L's output at every position while active."""
    hooks = [decoder_layers(model)[layer].register_forward_hook(lambda _m, _i, out, d=delta: out + d)
             for layer, delta in deltas.items()]
    with hooked(hooks):
        yield


@contextmanager
def read_then_add(model: PreTrainedModel, read_layer: int, steer_layer: int,
                  predict: Callable[[torch.Tensor], torch.Tensor], scale: float) -> Iterator[None]:
    """Input-dependent steering as the runtime does it: on the first (prefill) forward, read the last
    token's state at `read_layer`, keep `scale * predict(state)`, and add it at `steer_layer` on every
    forward from then on (prompt and generated tokens)."""
    kept: dict[str, torch.Tensor] = {}

    def read(_module: torch.nn.Module, _inputs: tuple, out: torch.Tensor) -> None:
        if "delta" not in kept:
            with torch.no_grad():
                kept["delta"] = scale * predict(out[:, -1, :]).unsqueeze(1)

    def add(_module: torch.nn.Module, _inputs: tuple, out: torch.Tensor) -> torch.Tensor:
        return out + kept["delta"]

    layers = decoder_layers(model)
    hooks = [layers[read_layer].register_forward_hook(read), layers[steer_layer].register_forward_hook(add)]
    with hooked(hooks):
        yield


def unit_gradient(score: Callable[[torch.Tensor], torch.Tensor], state: torch.Tensor) -> torch.Tensor:
    """∇ score / ‖∇ score‖ at every position of `state`, by autograd (the reference for SVF's closed form)."""
    with torch.enable_grad():
        leaf = state.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(score(leaf).sum(), leaf)
    return grad / torch.sqrt((grad * grad).sum(-1, keepdim=True) + 1e-12)


@contextmanager
def fields(model: PreTrainedModel, terms: dict[int, list[tuple[Callable[[torch.Tensor], torch.Tensor], float]]]
           ) -> Iterator[None]:
    """SVF as the runtime does it: at layer L, add `scale * unit_gradient(score, h)` for every
    (score, scale) of `terms[L]`, all evaluated at L's output, at every position and step."""
    def steer(layer: int) -> Callable:
        def hook(_module: torch.nn.Module, _inputs: tuple, out: torch.Tensor) -> torch.Tensor:
            return out + sum(scale * unit_gradient(score, out) for score, scale in terms[layer])
        return hook

    layers = decoder_layers(model)
    hooks = [layers[layer].register_forward_hook(steer(layer)) for layer in terms]
    with hooked(hooks):
        yield


@contextmanager
def gated_head(model: PreTrainedModel, read_layer: int, p_toxic: Callable[[torch.Tensor], torch.Tensor],
               matrix: torch.Tensor, threshold: float, epsilon: float,
               pool: Pooling = "last") -> Iterator[dict[str, torch.Tensor]]:
    """AutoSteer as the runtime does it: at the first (prefill) forward, gate each row on p(toxic) of
    its state at `read_layer`, the last token or the mean over the prompt (`pool`; unpadded rows); gated
    rows get `n + ε·S·n` after the final norm from then on. Yields the kept p(toxic) and ε per row."""
    kept: dict[str, torch.Tensor] = {}

    def read(_module: torch.nn.Module, _inputs: tuple, out: torch.Tensor) -> None:
        if "epsilon" not in kept:
            with torch.no_grad():
                kept["p_toxic"] = p_toxic(out.mean(dim=1) if pool == "mean" else out[:, -1, :])
            kept["epsilon"] = torch.where(kept["p_toxic"] > threshold, epsilon, 0.0)

    def head(_module: torch.nn.Module, _inputs: tuple, out: torch.Tensor) -> torch.Tensor:
        return out + kept["epsilon"].reshape(-1, 1, 1) * (out @ matrix.T)

    hooks = [decoder_layers(model)[read_layer].register_forward_hook(read),
             text_model(model).norm.register_forward_hook(head)]
    with hooked(hooks):
        yield kept
