"""Segment-by-segment parity of a bundle against the HF model it came from.

Each ONNX segment is fed the HF input of that segment (so errors do not compound) and its
output is compared with the HF output at real (unpadded) positions. Two figures per segment:
  abs     max |onnx - hf|
  scaled  max over tokens of max|onnx - hf| / max(1, max|hf|) for that token.
SmolLM2's residual stream carries outliers above 10^4, where one fp32 ulp is already ~2e-3;
the scaled figure is the one a 1e-4 tolerance is meaningful for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from transformers import PreTrainedModel

from .segments import VisionSegment, decoder_layers, text_model


@dataclass
class SegmentError:
    segment: str
    abs: float
    scaled: float


def _errors(name: str, got: np.ndarray, ref: np.ndarray, valid: np.ndarray) -> SegmentError:
    diff = np.abs(got - ref)[valid]
    scale = np.maximum(1.0, np.abs(ref)[valid].max(axis=-1, keepdims=True))
    return SegmentError(name, float(diff.max()), float((diff / scale).max()))


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def vision_parity(bundle: Path, model: PreTrainedModel, pixel_values: torch.Tensor) -> list[SegmentError]:
    """Errors of vision.onnx (against the selected vision-tower features) and projector.onnx (against
    HF's image features) for a batch of preprocessed images."""
    vision = VisionSegment(model)
    with torch.no_grad():
        features = vision(pixel_values)
        embeds = torch.stack(list(model.model.get_image_features(pixel_values=pixel_values).pooler_output))
    got_features = _session(bundle / "vision.onnx").run(None, {"pixel_values": pixel_values.numpy()})[0]
    got_embeds = _session(bundle / "projector.onnx").run(None, {"image_features": features.numpy()})[0]
    everywhere = np.ones(features.shape[:2], bool)
    return [_errors("vision", got_features, features.numpy(), everywhere),
            _errors("projector", got_embeds, embeds.numpy(), everywhere)]


def segment_parity(bundle: Path, model: PreTrainedModel, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor, pixel_values: torch.Tensor | None = None) -> list[SegmentError]:
    """Errors of embed, every layer (fed by the bundle's positions graph), the final norm and the head
    for one left-padded batch. With `pixel_values` (a vision-language model), the layers run on HF's
    spliced embeddings and the embed graph is checked at the text positions."""
    layer_outputs: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda _m, _i, out: layer_outputs.append(out[0] if isinstance(out, tuple) else out))
             for layer in decoder_layers(model)]
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    try:
        with torch.no_grad():
            out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        pixel_values=pixel_values, output_hidden_states=True)
    finally:
        for hook in hooks:
            hook.remove()
    embedded = out.hidden_states[0].numpy()
    mask = attention_mask.numpy()
    valid = mask.astype(bool)
    image_token = getattr(model.config, "image_token_id", None)
    text = valid & (input_ids.numpy() != image_token) if pixel_values is not None else valid
    dims = model.config.get_text_config()
    kv_heads = getattr(dims, "num_key_value_heads", None) or dims.num_attention_heads
    head_dim = getattr(dims, "head_dim", None) or dims.hidden_size // dims.num_attention_heads
    batch, tokens = mask.shape
    # The KV buffers hold exactly this step: GroupQueryAttention writes it at positions 0..T-1.
    buffer = np.zeros((batch, kv_heads, tokens, head_dim), dtype=embedded.dtype)
    lengths = {"seqlens_k": np.full(batch, tokens - 1, np.int32), "total_sequence_length": np.array(tokens, np.int32)}

    results = [_errors("embed", _session(bundle / "embed.onnx").run(None, {"input_ids": input_ids.numpy()})[0],
                       embedded, text)]
    positions = _session(bundle / "positions.onnx")
    tables = dict(zip([o.name for o in positions.get_outputs()],
                      positions.run(None, {"position_ids": position_ids.numpy(), "attention_mask": mask})))
    hidden_in = embedded
    for index, reference in enumerate(layer_outputs):
        layer = _session(bundle / f"layer_{index:02d}.onnx")
        step = {"hidden_in": hidden_in, "past_key": buffer, "past_value": buffer, **lengths,
                "steer_delta": np.zeros((batch, 1, embedded.shape[-1]), dtype=embedded.dtype), **tables}
        # Each layer reads the bias and its own rotary pair of the positions graph's tables.
        got = layer.run(None, {i.name: step[i.name] for i in layer.get_inputs()})[0]
        results.append(_errors(f"layer_{index:02d}", got, reference.numpy(), valid))
        hidden_in = reference.numpy()
    normed = _session(bundle / "norm.onnx").run(None, {"hidden_in": hidden_in})[0]
    with torch.no_grad():
        reference_normed = text_model(model).norm(torch.from_numpy(hidden_in[:, -1])).numpy()
    results.append(_errors("norm", normed, reference_normed, np.ones(normed.shape[0], bool)))
    logits = _session(bundle / "head.onnx").run(None, {"normed": normed})[0]
    results.append(_errors("head", logits, out.logits[:, -1].float().numpy(), np.ones(logits.shape[0], bool)))
    return results
