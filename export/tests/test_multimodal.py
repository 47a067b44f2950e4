"""Vision-language bundles: a tiny random-config LLaVA (CLIP vision tower → MLP projector → Llama)
built here, exported and checked against HF segment by segment, by greedy generation (plain and
steered) through the Rust binary, and the Rust image preprocessing against HF's image processor on
real photographs shipped by scikit-image."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import zlib
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import requests
import torch
from PIL import Image, ImageOps
from safetensors.numpy import load_file, save_file
from skimage import data as skimage_data
from transformers import (
    AutoTokenizer,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

from onnx_steer_export.export.bundle import export_bundle
from onnx_steer_export.export.parity import segment_parity, vision_parity
from onnx_steer_export.export.source import LoadedModel, load
from onnx_steer_export.runtime_client import serving
from onnx_steer_export.train.reference import added

from conftest import run_generate

# LLaVA-1.5's processor chat template (llava-hf/llava-1.5-7b-hf): images first, then the text.
LLAVA_CHAT = ("{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
              "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
              "{{ '<image>\n' }}{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', "
              "'text') %}{{ content['text'] + ' '}}{% endfor %}{% endfor %}{% if add_generation_prompt %}"
              "{{ 'ASSISTANT:' }}{% endif %}")
PHOTOS = Path(skimage_data.__file__).parent
IMAGE_SIZE = 28


def photo(name: str) -> Image.Image:
    return Image.open(PHOTOS / name)


@pytest.fixture(scope="module")
def llava(default_model: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> tuple[LoadedModel, Path]:
    """(loaded HF LLaVA, bundle dir): CLIP 2 layers on 28x28 images (4 patches), Llama 2 layers, the
    default tokenizer plus an <image> token."""
    checkpoint = tmp_path_factory.mktemp("llava-hf")
    default_model.tokenizer.save_pretrained(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=IMAGE_SIZE, patch_size=14, projection_dim=32)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                       pad_token_id=2, initializer_range=0.2, vocab_size=len(tokenizer))
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=cast(int, tokenizer.convert_tokens_to_ids("<image>")), vision_feature_layer=-2,
                         vision_feature_select_strategy="default")
    torch.manual_seed(1234)
    LlavaForConditionalGeneration(config).save_pretrained(checkpoint)
    image_processor = LlavaImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                             crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                   vision_feature_select_strategy="default", chat_template=LLAVA_CHAT,
                   num_additional_image_tokens=1).save_pretrained(checkpoint)
    loaded = load(f"hf:{checkpoint}")
    bundle = tmp_path_factory.mktemp("llava-bundle")
    manifest = export_bundle(loaded, bundle)
    assert manifest["vision"]["image_tokens"] == 4
    assert {s["kind"] for s in manifest["segments"]} >= {"vision", "projector"}
    return loaded, bundle


def hf_inputs(loaded: LoadedModel, texts: list[str], images: list[list[Image.Image]]) -> dict:
    # A LlavaProcessor; its stub types chat messages as plain strings, not content parts.
    processor: Any = loaded.processor
    prompts = [processor.apply_chat_template([{"role": "user", "content": [
        *({"type": "image"} for _ in row), {"type": "text", "text": text}]}], add_generation_prompt=True,
        tokenize=False) for text, row in zip(texts, images)]
    flat = [image for row in images for image in row]
    return processor(text=prompts, images=flat, return_tensors="pt", padding=True, padding_side="left")


def test_vision_projector_and_layers_match_hf(llava: tuple[LoadedModel, Path]) -> None:
    loaded, bundle = llava
    inputs = hf_inputs(loaded, ["What is in this picture?", "And these two?"],
                       [[photo("chelsea.png")], [photo("coffee.png"), photo("astronaut.png")]])
    for error in vision_parity(bundle, loaded.model, inputs["pixel_values"]):
        assert error.abs < 1e-4, error
    errors = segment_parity(bundle, loaded.model, inputs["input_ids"], inputs["attention_mask"],
                            inputs["pixel_values"])
    assert [e.segment for e in errors] == ["embed", "layer_00", "layer_01", "norm", "head"]
    for error in errors:
        assert error.abs < 1e-4, error


def hf_greedy_multimodal(loaded: LoadedModel, text: str, images: list[Image.Image], new_tokens: int) -> list[int]:
    inputs = hf_inputs(loaded, [text], [images])
    with torch.no_grad():
        out = loaded.model.generate(**inputs, do_sample=False, max_new_tokens=new_tokens,
                                    pad_token_id=loaded.tokenizer.pad_token_id)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    return new[:new.index(2)] if 2 in new else new


@pytest.mark.parametrize("files", [["chelsea.png"], ["rocket.jpg", "camera.png"]])
def test_greedy_image_generation_matches_hf(llava: tuple[LoadedModel, Path], binary: Path, files: list[str]) -> None:
    loaded, bundle = llava
    text = "Describe the image."
    args = [arg for name in files for arg in ("--image", str(PHOTOS / name))]
    got = run_generate(binary, bundle, "--chat", "--greedy", "--max-new-tokens", "16", "--prompt", text, *args)
    want = hf_greedy_multimodal(loaded, text, [photo(name) for name in files], 16)
    assert got[0]["token_ids"] == want
    assert got[0]["prompt_tokens"] == hf_inputs(loaded, [text], [[photo(n) for n in files]])["input_ids"].shape[1]


def test_steered_image_generation_matches_hf_hook(llava: tuple[LoadedModel, Path], binary: Path,
                                                  tmp_path: Path) -> None:
    loaded, bundle = llava
    direction = np.random.default_rng(3).normal(size=64).astype(np.float32)
    save_file({"direction.0": direction}, str(tmp_path / "v.safetensors"))
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"interventions": [{"kind": "vector", "path": "v.safetensors", "layers": [0],
                                                   "scale": 3.0}]}))
    text, image = "What is this?", "chelsea.png"
    steered = run_generate(binary, bundle, "--chat", "--greedy", "--max-new-tokens", "16", "--prompt", text,
                           "--image", str(PHOTOS / image), "--steer", str(spec))[0]["token_ids"]
    with added(loaded.model, {0: torch.from_numpy(3.0 * direction)}):
        want = hf_greedy_multimodal(loaded, text, [photo(image)], 16)
    assert steered == want
    assert steered != hf_greedy_multimodal(loaded, text, [photo(image)], 16), "the vector changes the output"


def test_capture_reads_image_prompts(llava: tuple[LoadedModel, Path], binary: Path, tmp_path: Path) -> None:
    """capture on an image+text prompt records the layer outputs HF computes with the image spliced in
    (HF's last hidden state is after the final norm, so layer 0 is compared)."""
    loaded, bundle = llava
    shutil.copy(PHOTOS / "coffee.png", tmp_path / "coffee.png")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "What is this?", "images": ["coffee.png"]}) + "\n")
    out = tmp_path / "states.safetensors"
    done = subprocess.run([str(binary), "capture", "--bundle", str(bundle), "--prompts-file", str(prompts), "--chat",
                           "--layers", "0", "--out", str(out)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    inputs = hf_inputs(loaded, ["What is this?"], [[photo("coffee.png")]])
    with torch.no_grad():
        hidden = loaded.model(**inputs, output_hidden_states=True).hidden_states
    np.testing.assert_allclose(load_file(str(out))["layer.0"][0], hidden[1][0, -1].numpy(), atol=1e-4)


# --- preprocessing parity on real photographs ---------------------------------------------------

LLAVA_15 = {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}}
PROCESSORS: dict[str, dict[str, Any]] = {
    "llava-1.5": LLAVA_15,
    "llava-1.5-pad": {**LLAVA_15, "do_pad": True},
    "fixed-bilinear": {"size": {"height": 224, "width": 160}, "do_center_crop": False, "resample": 2},
}


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Odd aspect ratios, grey, alpha, JPEG, WebP, and EXIF orientation (a PNG rotated by its tag)."""
    out = tmp_path_factory.mktemp("photos")
    files = {name: PHOTOS / name for name in ("chelsea.png", "rocket.jpg", "camera.png", "logo.png",
                                              "motorcycle_left.png")}
    photo("coffee.png").save(out / "coffee.webp", lossless=True)
    files["coffee.webp"] = out / "coffee.webp"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    photo("chelsea.png").save(out / "chelsea_exif6.png", exif=exif)
    files["chelsea_exif6.png"] = out / "chelsea_exif6.png"
    return files


def with_processor(bundle: Path, settings: dict, out: Path) -> Path:
    """A copy of `bundle` whose manifest carries other image-processor settings."""
    shutil.copytree(bundle, out)
    manifest = json.loads((out / "manifest.json").read_text())
    processor = LlavaImageProcessorPil(**settings)
    manifest["vision"]["processor"].update({key: processor.to_dict()[key] for key in manifest["vision"]["processor"]
                                            if key != "resample"})
    manifest["vision"]["processor"]["resample"] = {2: "bilinear", 3: "bicubic"}[int(processor.resample)]
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.mark.parametrize("name", sorted(PROCESSORS))
def test_preprocessing_matches_hf_image_processor(llava: tuple[LoadedModel, Path], binary: Path,
                                                  photos: dict[str, Path], tmp_path: Path, name: str) -> None:
    _, bundle = llava
    settings = PROCESSORS[name]
    variant = with_processor(bundle, settings, tmp_path / "bundle")
    out = tmp_path / "pixels.safetensors"
    files = list(photos.values())
    done = subprocess.run([str(binary), "preprocess", "--bundle", str(variant), "--out", str(out),
                           *(arg for f in files for arg in ("--image", str(f)))], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr
    got = load_file(str(out))["pixel_values"]
    processor = LlavaImageProcessorPil(**settings)
    for index, (label, path) in enumerate(photos.items()):
        # What the processor sees from a file: the upright image (as transformers' load_image makes it).
        want = processor(images=ImageOps.exif_transpose(Image.open(path)), return_tensors="np")["pixel_values"][0]
        assert got[index].shape == want.shape, label
        assert np.abs(got[index] - want).max() < 1e-3, (label, float(np.abs(got[index] - want).max()))


# --- bad input ----------------------------------------------------------------------------------

def generate_failure(binary: Path, bundle: Path, *args: str) -> str:
    done = subprocess.run([str(binary), "generate", "--bundle", str(bundle), "--max-new-tokens", "2", *args],
                          capture_output=True, text=True, check=False)
    assert done.returncode != 0, done.stdout
    assert "panicked" not in done.stderr
    return done.stderr


def png_declaring(path: Path, width: int, height: int) -> Path:
    """A 1x1 PNG whose header (with a valid CRC) claims `width` x `height`."""
    Image.new("L", (1, 1)).save(path)
    raw = bytearray(path.read_bytes())
    raw[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    raw[29:33] = zlib.crc32(bytes(raw[12:29])).to_bytes(4, "big")
    path.write_bytes(bytes(raw))
    return path


def test_bad_images_get_clear_errors(llava: tuple[LoadedModel, Path], binary: Path, bundle_dir: Path,
                                     tmp_path: Path) -> None:
    _, bundle = llava
    good = (PHOTOS / "chelsea.png").read_bytes()
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good[: len(good) // 3])
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes((PHOTOS / "rocket.jpg").read_bytes()[:600] + bytes(range(256)) * 40)
    gif = PHOTOS / "no_time_for_that_tiny.gif"
    huge = png_declaring(tmp_path / "huge.png", 100_000, 100_000)  # 10^10 pixels in a 70-byte file
    zero = png_declaring(tmp_path / "zero.png", 0, 5)
    chat = ("--chat", "--prompt", "Hi")
    cases = {
        truncated: "could not be decoded",
        corrupt: "could not be decoded",
        gif: "is not PNG, JPEG or WebP",
        huge: "more than the limit",
        zero: "zero.png",
        tmp_path / "missing.png": "could not read image",
    }
    for path, message in cases.items():
        assert message in generate_failure(binary, bundle, *chat, "--image", str(path)), path
    two = ("--image", str(PHOTOS / "chelsea.png"), "--image", str(PHOTOS / "coffee.png"))
    assert "2 image(s) given but the prompt has 1" in generate_failure(
        binary, bundle, "--prompt", "USER: <image>\nHi ASSISTANT:", *two)
    assert "text-only" in generate_failure(binary, bundle_dir, *chat, "--image", str(PHOTOS / "chelsea.png"))


# --- server -------------------------------------------------------------------------------------

def data_url(path: Path) -> str:
    return f"data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}"


def test_server_takes_image_url_parts_and_survives_bad_images(llava: tuple[LoadedModel, Path], binary: Path,
                                                              tmp_path: Path) -> None:
    _, bundle = llava
    with serving(binary, bundle) as (url, _):
        def chat(content: Any) -> requests.Response:
            return requests.post(f"{url}/v1/chat/completions", timeout=120, json={
                "messages": [{"role": "user", "content": content}], "max_tokens": 12, "temperature": 0})

        image = PHOTOS / "chelsea.png"
        reply = chat([{"type": "image_url", "image_url": {"url": data_url(image)}},
                      {"type": "text", "text": "Describe the image."}])
        assert reply.status_code == 200, reply.text
        cli = run_generate(binary, bundle, "--chat", "--greedy", "--max-new-tokens", "12",
                           "--prompt", "Describe the image.", "--image", str(image))[0]
        assert reply.json()["choices"][0]["message"]["content"] == cli["text"]
        assert reply.json()["usage"]["prompt_tokens"] == cli["prompt_tokens"]
        truncated = tmp_path / "truncated.png"
        truncated.write_bytes(image.read_bytes()[:5000])
        bad = {
            "http": ({"url": "http://example.com/cat.png"}, "only data:image"),
            "base64": ({"url": "data:image/png;base64,@@@"}, "invalid base64"),
            "truncated": ({"url": data_url(truncated)}, "could not be decoded"),
        }
        for label, (image_url, message) in bad.items():
            reply = chat([{"type": "image_url", "image_url": image_url}, {"type": "text", "text": "Hi"}])
            assert reply.status_code == 400 and message in reply.json()["error"]["message"], (label, reply.text)
        assert chat("Still there?").status_code == 200
