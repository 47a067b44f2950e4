"""Torch modules that wrap one HF causal LM as exportable segments.

Each wrapper reuses the HF submodules (norms, projections, MLP, rotary embedding) so
architecture quirks (Qwen2 biases, Gemma's scaled embedding and (1+w) norm) come from
transformers itself. Only the KV cache and the attention mask are made explicit, so the
ONNX graphs have a plain tensor interface:

  embed:     input_ids [B,T]                                -> hidden [B,T,d]
  positions: position_ids [B,T], attention_mask [B,P+T]     -> attention_bias [B,1,T,P+T], cos/sin [B,T,hd]
                                                               (+ cos_sliding/sin_sliding, see below)
  layer:     hidden_in [B,T,d], attention_bias, cos, sin,
             past_key/past_value [B,kv,C,hd] (a buffer of C >= P+T positions), seqlens_k [B] (P+T-1, int32),
             total_sequence_length [] (P+T, int32), steer_delta [B,1|T,d]
                                                            -> hidden_out, present_key/present_value [B,kv,C,hd]
  norm:      hidden_in [B,T,d]                              -> normed [B,d] (final norm, last position)
  head:      normed [B,d]                                   -> logits [B,V] (fp32)
  full:      the same chain in one graph (the benchmark baseline)

Vision-language models (LLaVA) add two graphs; the runtime splices their output into `hidden`
at the image-token positions before layer 0:
  vision:    pixel_values [B,3,H,W]                         -> image_features [B,N,v] (the config's feature layer)
  projector: image_features [B,N,v]                         -> image_embeds [B,N,d]

The mask and the rotary tables are computed once per step by `positions`, not once per layer:
in a decode step those small graphs cost as much as the layer's own matrix products. A model whose
sliding-window layers rotate with their own base (Gemma 3: `rope_parameters` per layer type) gets a
second pair of tables, `cos_sliding`/`sin_sliding`, which only those layers read. The window itself is
GroupQueryAttention's `local_window_size`, so every layer shares the one causal bias.

Attention is ONNX Runtime's GroupQueryAttention contrib op. Bound with present_key/present_value on
the same memory as past_key/past_value, it writes the step's keys and values into the buffer at
positions P..P+T-1 and attends over it in place: no Concat of past and new, so the bytes a decode
step moves do not grow with the context, and no KV head is repeated for its query heads.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel

if TYPE_CHECKING:
    from torch.onnx._internal.torchscript_exporter.jit_utils import GraphContext


class ExplicitKvCache:
    """Stands in for an HF `Cache` for one layer: hands the step's new keys and values to
    `grouped_attention`, which appends them to the buffer `past_key`/`past_value` in place."""

    def __init__(self, past_key: torch.Tensor, past_value: torch.Tensor, seqlens_k: torch.Tensor,
                 total_sequence_length: torch.Tensor) -> None:
        self.past_key = past_key
        self.past_value = past_value
        self.seqlens_k = seqlens_k
        self.total_sequence_length = total_sequence_length
        self.present_key: torch.Tensor | None = None
        self.present_value: torch.Tensor | None = None

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: object, **kwargs: object):
        return key, value

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


# The cache of the layer being traced: HF passes the attention function the layer's module, not its cache.
_TRACED_CACHE: list[ExplicitKvCache] = []


@contextmanager
def traced_cache(cache: ExplicitKvCache) -> Iterator[ExplicitKvCache]:
    _TRACED_CACHE.append(cache)
    try:
        yield cache
    finally:
        _TRACED_CACHE.pop()


class GroupQueryAttentionOp(torch.autograd.Function):
    """ONNX Runtime's com.microsoft GroupQueryAttention on a KV buffer, with an additive bias.

    `forward` is its reference semantics in torch (what the tracer runs); `symbolic` emits the op,
    whose three empty inputs (cos_cache, sin_cache, position_ids: the rotary embedding is applied
    before, by the HF layer) precede attention_bias."""

    @staticmethod
    def forward(ctx: object, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_key: torch.Tensor,
                past_value: torch.Tensor, seqlens_k: torch.Tensor, total: torch.Tensor, bias: torch.Tensor,
                heads: int, kv_heads: int, scale: float, softcap: float, window: int) -> tuple[torch.Tensor, ...]:
        batch, tokens, _ = query.shape
        head_dim = past_key.shape[-1]
        end = int(total)
        start = end - tokens
        present = []
        for past, new in ((past_key, key), (past_value, value)):
            buffer = past.clone()
            buffer[:, :, start:end] = new.reshape(batch, tokens, kv_heads, head_dim).transpose(1, 2)
            present.append(buffer)
        keys, values = present[0][:, :, :end], present[1][:, :, :end]
        grouped = query.reshape(batch, tokens, kv_heads, heads // kv_heads, head_dim).permute(0, 2, 3, 1, 4)
        scores = torch.matmul(grouped, keys.transpose(2, 3)[:, :, None]) * scale
        if softcap > 0:
            scores = torch.tanh(scores / softcap) * softcap
        scores = scores + bias[:, :, None]
        if window > 0:  # a key at least `window` positions behind the query is out of reach
            behind = torch.arange(start, end)[:, None] - torch.arange(end)[None, :]
            scores = scores.masked_fill(behind >= window, torch.finfo(scores.dtype).min)
        probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        out = torch.matmul(probs, values[:, :, None]).permute(0, 3, 1, 2, 4).reshape(batch, tokens, -1)
        return out, present[0], present[1]

    @staticmethod
    def symbolic(g: GraphContext, query: torch.Value, key: torch.Value, value: torch.Value, past_key: torch.Value,
                 past_value: torch.Value, seqlens_k: torch.Value, total: torch.Value, bias: torch.Value,
                 heads: int, kv_heads: int, scale: float, softcap: float, window: int) -> tuple[torch.Value, ...]:
        # A custom-domain stand-in that `graph_passes.emit_group_query_attention` turns into the contrib
        # op: the TorchScript exporter cannot emit its empty optional inputs.
        out, present_key, present_value = g.op(
            f"{STAND_IN_DOMAIN}::GroupQueryAttention", query, key, value, past_key, past_value, seqlens_k, total, bias,
            num_heads_i=heads, kv_num_heads_i=kv_heads, scale_f=scale, softcap_f=softcap, local_window_size_i=window,
            outputs=3)
        # Typed like the op's inputs, so the exporter's shape inference has nothing to warn about.
        out.setType(query.type())
        present_key.setType(past_key.type())
        present_value.setType(past_value.type())
        return out, present_key, present_value


STAND_IN_DOMAIN = "onnx_steer"


def additive_causal_mask(attention_mask: torch.Tensor, query_len: int, dtype: torch.dtype) -> torch.Tensor:
    """[B,P+T] padding mask -> [B,1,T,P+T] additive mask: 0 where a query may attend, dtype min elsewhere.

    A finite minimum (not -inf) keeps fully padded query rows free of NaN.
    """
    total = attention_mask.shape[1]
    past = total - query_len
    key_pos = torch.arange(total, device=attention_mask.device)
    query_pos = torch.arange(query_len, device=attention_mask.device) + past
    causal = key_pos[None, :] <= query_pos[:, None]
    allowed = causal[None, None, :, :] & attention_mask[:, None, None, :].bool()
    zero = torch.zeros((), dtype=dtype)
    minimum = torch.tensor(torch.finfo(dtype).min, dtype=dtype)
    return torch.where(allowed, zero, minimum)


def eager_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float) -> tuple[torch.Tensor, None]:
    """HF's eager attention for grouped KV heads, without repeating them: the `groups` query heads
    that share a KV head are stacked along the query axis (heads are kv_head * groups + r)."""
    batch, heads, _, head_dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    grouped = query.reshape(batch, kv_heads, -1, head_dim)
    scores = torch.matmul(grouped, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask.repeat(1, 1, groups, 1)
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs, value).reshape(batch, heads, -1, head_dim)
    return out.transpose(1, 2).contiguous(), None


def grouped_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                      sliding_window: int | None = None, **kwargs: object) -> tuple[torch.Tensor, None]:
    """The layer's attention as GroupQueryAttention on the traced layer's KV buffer.

    `query` [B,heads,T,hd] and `key`/`value` [B,kv,T,hd] are the step's, after the rotary embedding;
    the buffer's presents are left on the cache for the segment to return. Logit soft-capping
    (Gemma 2) is the op's `softcap`; a sliding-window layer's window (a query sees the keys fewer than
    `sliding_window` positions behind it, as in HF's mask) is the op's `local_window_size`."""
    if not _TRACED_CACHE:  # a layer without a KV cache: the vision tower of a vision-language model
        return eager_attention(query, key, value, attention_mask, scaling)
    cache = _TRACED_CACHE[-1]
    # Head counts come from the module, not from traced shapes: the op's attributes must be constants.
    heads, kv_heads = query.shape[1], key.shape[1]
    heads, kv_heads = int(heads), int(kv_heads)
    assert attention_mask is not None, "the segments always pass the positions graph's bias"
    softcap = float(getattr(getattr(module, "config", None), "attn_logit_softcapping", None) or 0.0)

    def packed(states: torch.Tensor) -> torch.Tensor:
        """[B,heads,T,hd] -> [B,T,heads*hd], with a reshape target the graph passes make constant."""
        states = states.transpose(1, 2)
        return states.reshape(states.shape[0], states.shape[1], -1)

    out, cache.present_key, cache.present_value = GroupQueryAttentionOp.apply(
        packed(query), packed(key), packed(value),
        cache.past_key, cache.past_value, cache.seqlens_k, cache.total_sequence_length, attention_mask,
        heads, kv_heads, float(scaling), softcap, int(sliding_window or -1))
    # The weights are not returned: export never asks for them.
    return out.reshape(out.shape[0], out.shape[1], heads, -1), None


GROUPED_ATTENTION = "onnx_steer_grouped"
AttentionInterface.register(GROUPED_ATTENTION, grouped_attention)


@contextmanager
def exported_attention(model: PreTrainedModel) -> Iterator[None]:
    """Trace `model` with `grouped_attention`, then restore its attention implementation."""
    before = model.config._attn_implementation
    model.set_attn_implementation(GROUPED_ATTENTION)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


class DecoderStack(Protocol):
    """What the segments use of an HF decoder stack (LlamaModel, Qwen2Model, GemmaModel, ...)."""

    embed_tokens: nn.Module
    rotary_emb: nn.Module
    layers: nn.ModuleList
    norm: nn.Module


def text_model(model: PreTrainedModel) -> DecoderStack:
    """The decoder stack: `model.model` for causal LMs, its `language_model` for vision-language models."""
    return getattr(model.model, "language_model", model.model)


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    return text_model(model).layers


class EmbedSegment(nn.Module):
    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.embed_tokens = text_model(model).embed_tokens

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)


# The layer type whose rotary tables are the plain `cos`/`sin`; other types' tables carry a suffix.
FULL_ATTENTION = "full_attention"


def rotary_layer_types(model: PreTrainedModel) -> list[str | None]:
    """Per decoder layer, the HF layer type whose rotary tables it reads, or None for every layer of a
    model with one rotary embedding (its `forward` takes no `layer_type`)."""
    rotary = text_model(model).rotary_emb
    if "layer_type" not in inspect.signature(rotary.forward).parameters:
        return [None] * len(decoder_layers(model))
    return list(model.config.get_text_config().layer_types)


def rotary_suffix(layer_type: str | None) -> str:
    """'' for the plain tables, '_sliding' for "sliding_attention" layers' (`cos_sliding`, `sin_sliding`)."""
    if layer_type in (None, FULL_ATTENTION):
        return ""
    assert layer_type is not None
    return "_" + layer_type.removesuffix("_attention")


class PositionsSegment(nn.Module):
    """The additive attention mask and the rotary cos/sin tables of one step, shared by every layer:
    one pair per rotary layer type, plain first."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.rotary_emb = text_model(model).rotary_emb
        self.dtype = model.dtype
        self.layer_types = sorted(set(rotary_layer_types(model)), key=rotary_suffix)

    def forward(self, position_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        like = torch.zeros((), dtype=self.dtype)  # the rotary module only reads its dtype and device
        tables: list[torch.Tensor] = []
        for layer_type in self.layer_types:
            per_type = {} if layer_type is None else {"layer_type": layer_type}
            tables += self.rotary_emb(like, position_ids, **per_type)
        return additive_causal_mask(attention_mask, position_ids.shape[1], self.dtype), *tables


class LayerSegment(nn.Module):
    def __init__(self, model: PreTrainedModel, index: int) -> None:
        super().__init__()
        self.layer = decoder_layers(model)[index]

    def forward(
        self,
        hidden_in: torch.Tensor,
        attention_bias: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        past_key: torch.Tensor,
        past_value: torch.Tensor,
        seqlens_k: torch.Tensor,
        total_sequence_length: torch.Tensor,
        steer_delta: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`steer_delta` is added to the layer output on the provider, so steering a static or
        predicted vector costs one Add and never moves activations to the host; zeros leave it unsteered."""
        with traced_cache(ExplicitKvCache(past_key, past_value, seqlens_k, total_sequence_length)) as cache:
            hidden_out = self.layer(
                hidden_in,
                attention_mask=attention_bias,
                past_key_values=cache,
                use_cache=True,
                position_embeddings=(cos, sin),
            )
        assert cache.present_key is not None and cache.present_value is not None
        return hidden_out + steer_delta, cache.present_key, cache.present_value


class NormSegment(nn.Module):
    """Final norm of the last position. A graph of its own so that interventions between the norm
    and the LM head (AutoSteer's refusal head) can run without a second copy of the LM head."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.norm = text_model(model).norm

    def forward(self, hidden_in: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden_in[:, -1, :])


class HeadSegment(nn.Module):
    """LM head on the normed last position; logits always leave as fp32."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.lm_head = model.lm_head
        self.softcap = getattr(model.config, "final_logit_softcapping", None)

    def forward(self, normed: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(normed).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


class VisionSegment(nn.Module):
    """The vision tower up to the configured feature layer(s), CLS dropped under the "default" strategy,
    as `LlavaModel.get_image_features` selects them."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        config = model.config
        self.tower = model.model.vision_tower
        layer = config.vision_feature_layer
        self.layers = [layer] if isinstance(layer, int) else list(layer)
        self.drop_cls = config.vision_feature_select_strategy == "default"

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        states = self.tower(pixel_values, output_hidden_states=True).hidden_states
        selected = [states[layer][:, 1:] if self.drop_cls else states[layer] for layer in self.layers]
        return torch.cat(selected, dim=-1)


class ProjectorSegment(nn.Module):
    """Image features → language-model embeddings (LLaVA's MLP projector)."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.projector = model.model.multi_modal_projector

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.projector(image_features)


class FullModel(nn.Module):
    """Embed, every layer and the head in one graph, with the same KV interface per layer."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.embed = EmbedSegment(model)
        self.positions = PositionsSegment(model)
        self.layers = nn.ModuleList(LayerSegment(model, i) for i in range(len(decoder_layers(model))))
        # Which of the positions graph's rotary pairs each layer reads.
        self.table_of_layer = [self.positions.layer_types.index(t) for t in rotary_layer_types(model)]
        self.norm = NormSegment(model)
        self.head = HeadSegment(model)

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
        seqlens_k: torch.Tensor, total_sequence_length: torch.Tensor, *past: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        hidden = self.embed(input_ids)
        bias, *tables = self.positions(position_ids, attention_mask)
        no_steer = torch.zeros_like(hidden[:, :1, :])
        presents: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            table = self.table_of_layer[i]
            cos, sin = tables[2 * table], tables[2 * table + 1]
            hidden, key, value = layer(hidden, bias, cos, sin, past[2 * i], past[2 * i + 1], seqlens_k,
                                       total_sequence_length, no_steer)
            presents += [key, value]
        return (self.head(self.norm(hidden)), *presents)
