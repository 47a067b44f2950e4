"""Write a self-contained bundle: one ONNX graph per segment, tokenizer, chat template, manifest.

manifest.json is the contract with the Rust runtime (src/bundle/manifest.rs mirrors it).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import onnxslim
import torch
from torch import nn
from tqdm import tqdm
from transformers import PreTrainedModel

from .. import FORMAT_VERSION
from .graph_file import file_entries, save_graph, segment_files
from .graph_passes import (
    copy_dims_in_reshapes,
    drop_untyped_value_info,
    emit_group_query_attention,
    merge_sibling_matmuls,
)
from .segments import (
    FULL_ATTENTION,
    STAND_IN_DOMAIN,
    EmbedSegment,
    FullModel,
    HeadSegment,
    LayerSegment,
    NormSegment,
    PositionsSegment,
    ProjectorSegment,
    VisionSegment,
    decoder_layers,
    exported_attention,
    rotary_layer_types,
    rotary_suffix,
)
from .source import LoadedModel

OPSET = 17
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output; string dims are dynamic (symbolic), ints are fixed."""

    name: str
    dtype: str
    shape: tuple[str | int, ...]

    def manifest(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    def dynamic_axes(self) -> dict[int, str]:
        return {i: dim for i, dim in enumerate(self.shape) if isinstance(dim, str)}


@dataclass(frozen=True)
class ModelDims:
    hidden: int
    layers: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def of(cls, model: PreTrainedModel) -> ModelDims:
        config = model.config.get_text_config()
        heads = config.num_attention_heads
        return cls(
            hidden=config.hidden_size,
            layers=len(decoder_layers(model)),
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            vocab=config.vocab_size,
        )


def kv_spec(name: str, dims: ModelDims, dtype: str, length: str) -> TensorSpec:
    return TensorSpec(name, dtype, ("batch", dims.kv_heads, length, dims.head_dim))


def rotary_pair(dims: ModelDims, dtype: str, suffix: str) -> list[TensorSpec]:
    return [TensorSpec(f"{name}{suffix}", dtype, ("batch", "tokens", dims.head_dim)) for name in ("cos", "sin")]


def position_io(dims: ModelDims, dtype: str, suffixes: list[str]) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The positions graph: the causal bias, then one rotary pair per suffix (`rotary_suffix`)."""
    inputs = [TensorSpec("position_ids", "int64", ("batch", "tokens")),
              TensorSpec("attention_mask", "int64", ("batch", "total"))]
    tables = [spec for suffix in suffixes for spec in rotary_pair(dims, dtype, suffix)]
    return inputs, [TensorSpec("attention_bias", dtype, ("batch", 1, "tokens", "total")), *tables]


def layer_io(dims: ModelDims, dtype: str, suffix: str) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """A decoder layer that reads the rotary pair `suffix` of the positions graph."""
    hidden = ("batch", "tokens", dims.hidden)
    inputs = [
        TensorSpec("hidden_in", dtype, hidden),
        TensorSpec("attention_bias", dtype, ("batch", 1, "tokens", "total")),
        *rotary_pair(dims, dtype, suffix),
        kv_spec("past_key", dims, dtype, "capacity"),
        kv_spec("past_value", dims, dtype, "capacity"),
        *attention_lengths(),
        TensorSpec("steer_delta", dtype, ("batch", "steer_tokens", dims.hidden)),
    ]
    outputs = [
        TensorSpec("hidden_out", dtype, hidden),
        kv_spec("present_key", dims, dtype, "capacity"),
        kv_spec("present_value", dims, dtype, "capacity"),
    ]
    return inputs, outputs


def attention_lengths() -> list[TensorSpec]:
    """What GroupQueryAttention reads of the step's lengths: each row's P+T-1 and P+T."""
    return [TensorSpec("seqlens_k", "int32", ("batch",)), TensorSpec("total_sequence_length", "int32", ())]


def full_io(dims: ModelDims, dtype: str) -> tuple[list[TensorSpec], list[TensorSpec]]:
    past = [kv_spec(f"past_{kind}.{i}", dims, dtype, "capacity") for i in range(dims.layers)
            for kind in ("key", "value")]
    present = [kv_spec(f"present_{kind}.{i}", dims, dtype, "capacity") for i in range(dims.layers)
               for kind in ("key", "value")]
    inputs = [
        TensorSpec("input_ids", "int64", ("batch", "tokens")),
        TensorSpec("position_ids", "int64", ("batch", "tokens")),
        TensorSpec("attention_mask", "int64", ("batch", "total")),
        *attention_lengths(),
        *past,
    ]
    return inputs, [TensorSpec("logits", "float32", ("batch", dims.vocab)), *present]


TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64, "int32": torch.int32}
DUMMY_SIZES = {"batch": 2, "tokens": 3, "past": 4, "total": 7, "capacity": 9, "steer_tokens": 1, "images": 2}


def dummy(spec: TensorSpec) -> torch.Tensor:
    shape = [DUMMY_SIZES[d] if isinstance(d, str) else d for d in spec.shape]
    if spec.name == "attention_mask":
        return torch.ones(shape, dtype=torch.int64)
    if spec.name == "attention_bias":
        return torch.zeros(shape).to(TORCH_DTYPES[spec.dtype])
    if spec.name == "seqlens_k":
        return torch.full(shape, DUMMY_SIZES["total"] - 1, dtype=torch.int32)
    if spec.name == "total_sequence_length":
        return torch.tensor(DUMMY_SIZES["total"], dtype=torch.int32)
    if spec.dtype == "int64":
        return torch.arange(shape[-1], dtype=torch.int64).expand(shape).contiguous() + DUMMY_SIZES["past"]
    return torch.randn(shape).to(TORCH_DTYPES[spec.dtype])


def export_graph(module: nn.Module, path: Path, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> str | None:
    """Trace `module` to ONNX, then simplify: onnxslim folds the tracer's constant shape arithmetic,
    sibling MatMuls merge, and run-time Reshape targets become constants where they copy dims. In a
    decode step every tiny node costs about as much as a small matrix product. Returns the name of the
    graph's weights file (`graph_file.save_graph`)."""
    args = tuple(dummy(spec) for spec in inputs)
    # Only graphs with a KV cache attend through the stand-in op; the others would warn of an unused domain.
    attends = any(spec.name == "seqlens_k" for spec in inputs)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=[s.name for s in inputs],
            output_names=[s.name for s in outputs],
            dynamic_axes={s.name: s.dynamic_axes() for s in (*inputs, *outputs) if s.dynamic_axes()},
            opset_version=OPSET,
            dynamo=False,
            do_constant_folding=True,
            custom_opsets={STAND_IN_DOMAIN: 1} if attends else None,
        )
    emit_group_query_attention(path)
    model = onnxslim.slim(str(path))
    merge_sibling_matmuls(model)
    copy_dims_in_reshapes(model)
    drop_untyped_value_info(model)
    return save_graph(model, path)


def eos_token_ids(loaded: LoadedModel) -> list[int]:
    ids: Iterable = loaded.model.generation_config.eos_token_id or loaded.tokenizer.eos_token_id or []
    ids = [ids] if isinstance(ids, int) else list(ids)
    return sorted({int(i) for i in ids})


def model_section(loaded: LoadedModel, dims: ModelDims) -> dict:
    config = loaded.model.config.get_text_config()
    rope = getattr(config, "rope_parameters", None) or {}
    rope = rope.get(FULL_ATTENTION, rope)  # per layer type (Gemma 3): the global layers' parameters
    return {
        "architecture": loaded.model.config.model_type,
        "hidden_size": dims.hidden,
        "num_layers": dims.layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": dims.kv_heads,
        "head_dim": dims.head_dim,
        "vocab_size": dims.vocab,
        "max_position_embeddings": config.max_position_embeddings,
        "rope_theta": rope.get("rope_theta", getattr(config, "rope_theta", None)),
        "rope_type": rope.get("rope_type", "default"),
        "bos_token_id": config.bos_token_id,
        "eos_token_ids": eos_token_ids(loaded),
        "pad_token_id": loaded.tokenizer.pad_token_id,
    }


# PIL resampling codes the HF image processors store, by the name the runtime reads.
RESAMPLE = {2: "bilinear", 3: "bicubic"}
PROCESSOR_KEYS = ("do_convert_rgb", "do_pad", "do_resize", "size", "do_center_crop", "crop_size", "do_rescale",
                  "rescale_factor", "do_normalize", "image_mean", "image_std")


class VisionExportError(ValueError):
    """The vision-language model's image processing cannot be expressed in the bundle."""


def vision_io(loaded: LoadedModel, dtype: str) -> tuple[list[TensorSpec], list[TensorSpec], list[TensorSpec]]:
    """pixel_values, image_features, image_embeds: the vision and projector interfaces (sizes from a trial run)."""
    image = processor_settings(loaded)
    height, width = image_size(image)
    pixels = TensorSpec("pixel_values", dtype, ("images", 3, height, width))
    with torch.no_grad():
        features = VisionSegment(loaded.model)(dummy(pixels))
    tokens, width_v = features.shape[1:]
    return ([pixels], [TensorSpec("image_features", dtype, ("images", tokens, width_v))],
            [TensorSpec("image_embeds", dtype, ("images", tokens, ModelDims.of(loaded.model).hidden))])


def processor_settings(loaded: LoadedModel) -> dict:
    assert loaded.processor is not None
    settings = loaded.processor.image_processor.to_dict()
    section = {key: settings.get(key) for key in PROCESSOR_KEYS}
    resample = settings.get("resample")
    if int(resample) not in RESAMPLE:
        raise VisionExportError(f"image processor resample={resample} is not bilinear or bicubic (the runtime reproduces those two)")
    section["resample"] = RESAMPLE[int(resample)]
    return section


def image_size(settings: dict) -> tuple[int, int]:
    """The fixed (height, width) the vision tower sees: the crop, or a fixed resize."""
    size = settings["crop_size"] if settings["do_center_crop"] else settings["size"]
    if not size or "height" not in size:
        raise VisionExportError(f"the image processor must end at a fixed height and width, got {size}")
    return int(size["height"]), int(size["width"])


def vision_section(loaded: LoadedModel, image_tokens: int) -> dict:
    config = loaded.model.config
    return {
        "architecture": config.model_type,
        "image_token_id": int(config.image_token_id),
        "image_tokens": image_tokens,
        # LLaVA's language model counts positions 1-D over text and image tokens alike, so the layer
        # interface is unchanged; M-RoPE models (Qwen2-VL) would declare "mrope" and need 3-row positions.
        "positions": "sequential",
        "processor": processor_settings(loaded),
    }


def write_tokenizer(loaded: LoadedModel, out: Path) -> dict:
    tokenizer = loaded.tokenizer
    tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"))
    section = {"file": "tokenizer.json", "chat_template": None, "bos_token": tokenizer.bos_token,
               "eos_token": tokenizer.eos_token}
    # A vision-language processor's template places the image placeholders; the tokenizer's does not.
    template = (loaded.processor and loaded.processor.chat_template) or tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    if template:
        (out / "chat_template.jinja").write_text(template)
        section["chat_template"] = "chat_template.jinja"
    return section


def export_bundle(loaded: LoadedModel, out: Path, dtype: str = "fp32", monolithic: bool = False) -> dict:
    """Export every segment of `loaded` into `out` and return the manifest that was written."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    # typeshed types transformers' @wraps(nn.Module.to) override as unbound (self expected first).
    model = loaded.model.to(DTYPES[dtype])  # type: ignore[arg-type]
    dims = ModelDims.of(model)
    float_type = "float32" if dtype == "fp32" else "float16"
    out.mkdir(parents=True, exist_ok=True)

    hidden = ("batch", "tokens", dims.hidden)
    positions = PositionsSegment(model)
    pin, pout = position_io(dims, float_type, [rotary_suffix(t) for t in positions.layer_types])
    jobs: list[tuple[dict, nn.Module, list[TensorSpec], list[TensorSpec]]] = [
        ({"kind": "embed", "file": "embed.onnx"}, EmbedSegment(model),
         [TensorSpec("input_ids", "int64", ("batch", "tokens"))], [TensorSpec("hidden", float_type, hidden)]),
        ({"kind": "positions", "file": "positions.onnx"}, positions, pin, pout),
        *(({"kind": "layer", "index": i, "file": f"layer_{i:02d}.onnx"}, LayerSegment(model, i),
           *layer_io(dims, float_type, rotary_suffix(layer_type)))
          for i, layer_type in enumerate(rotary_layer_types(model))),
        ({"kind": "norm", "file": "norm.onnx"}, NormSegment(model),
         [TensorSpec("hidden_in", float_type, hidden)], [TensorSpec("normed", float_type, ("batch", dims.hidden))]),
        ({"kind": "head", "file": "head.onnx"}, HeadSegment(model),
         [TensorSpec("normed", float_type, ("batch", dims.hidden))],
         [TensorSpec("logits", "float32", ("batch", dims.vocab))]),
    ]
    vision = None
    if loaded.processor is not None:
        pixels, features, embeds = vision_io(loaded, float_type)
        vision = vision_section(loaded, int(features[0].shape[1]))
        jobs += [({"kind": "vision", "file": "vision.onnx"}, VisionSegment(model), pixels, features),
                 ({"kind": "projector", "file": "projector.onnx"}, ProjectorSegment(model), features, embeds)]
    if monolithic:
        fin, fout = full_io(dims, float_type)
        jobs.append(({"kind": "full", "file": "full.onnx"}, FullModel(model), fin, fout))

    segments = []
    for entry, module, inputs, outputs in tqdm(jobs, desc=f"exporting {out.name}", unit="segment"):
        with exported_attention(model):
            weights = export_graph(module, out / entry["file"], inputs, outputs)
        segments.append({**entry, **({"weights": weights} if weights else {}),
                         "inputs": [s.manifest() for s in inputs], "outputs": [s.manifest() for s in outputs]})

    tokenizer = write_tokenizer(loaded, out)
    files = [f for s in segments for f in segment_files(s)] + [tokenizer["file"]] + [tokenizer["chat_template"]] * bool(
        tokenizer["chat_template"])
    manifest = {
        "format_version": FORMAT_VERSION,
        "name": out.name,
        "source": loaded.source,
        "dtype": dtype,
        "opset": OPSET,
        "model": model_section(loaded, dims),
        "tokenizer": tokenizer,
        "vision": vision,
        "segments": [s for s in segments if s["kind"] != "full"],
        "monolithic": next((s for s in segments if s["kind"] == "full"), None),
        "files": file_entries(out, files),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
