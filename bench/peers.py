"""onnx-steer against its peers on one machine, in one run (`make peers`).

Every runtime gets the same prompt token ids (from the onnx-steer bench report), the same prompt
length and the same number of greedy new tokens, and the same weights:

  (a) onnx-steer, segment chain, unsteered and with a static steering vector (the fp32 bundle and a
      weight-quantized copy: int4 for the default model, int8 for the others);
  (b) the monolithic full.onnx through the same Rust runtime, where the bundle has one;
  (c) HF transformers, eager attention, fp32 on CPU, unsteered and with the vector added by a forward
      hook on the decoder layer (the way repeng steers);
  (d) llama.cpp through llama-cpp-python, if it is installed (`make peers` installs it): the GGUF as
      shipped (Q4_1 for the default model, Q4_K_M for the fetched ones) and F16/F32 GGUFs dequantized
      from it, unsteered and with the same vector applied through llama.cpp's control-vector API.

Prefill tokens/s is the prompt over the time to the first token; decode tokens/s is the remaining
new tokens over their time. The configurations take turns, round after round, so that the host's
drift (its memory bandwidth moves by tens of percent over minutes) hits all of them alike.
Writes bench/results/cpu_peers.{json,md,png} (`make peers`), or bench/results/cpu_peers_MODEL.* for
another checkpoint (`make peers MODEL=qwen2.5-0.5b-instruct`).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "export"))

from onnx_steer_export.export.gguf_convert import dequantize_gguf
from onnx_steer_export.export.source import default_gguf_path, load, parse_source
from onnx_steer_export.runtime_client import bench

# (prefill seconds, decode seconds, generated ids) of one greedy run.
Run = tuple[float, float, list[int]]
# New tokens of a warm-up run: enough for each runtime's first-call allocations.
WARM_UP_TOKENS = 8


def onnx_steer(binary: Path, bundle: Path, args: argparse.Namespace) -> dict:
    """One round of `onnx-steer bench` on `bundle` (segmented, steered with `args.steer` if any, monolithic,
    after its own warm-up run) → its parsed JSON report."""
    steer = ("--steer", str(args.steer)) if args.steer else ()
    return bench(bundle, *steer, "--prompt-tokens", str(args.prompt_tokens), "--new-tokens",
                 str(args.new_tokens), "--repeats", "1", binary=binary, stderr=subprocess.DEVNULL)


def shipped_gguf(source: str) -> Path:
    """The GGUF the bundle was exported from: the default model's, or the one a gguf:PATH source names."""
    if source == "default":
        return default_gguf_path()
    kind, path = parse_source(source)
    if kind != "gguf":
        raise SystemExit(f"--source {source}: llama.cpp needs a GGUF source (gguf:PATH or default)")
    return path


def file_type(path: Path) -> str:
    """The GGUF's weight type as llama.cpp names it ("Q4_1", "Q4_K_M")."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return gguf.LlamaFileType(reader.fields[gguf.Keys.General.FILE_TYPE].contents()).name.removeprefix("MOSTLY_")


def dequantized_gguf(shipped: Path, gguf_dir: Path, weights: str) -> Path:
    """`shipped` dequantized to "F16" or "F32" in `gguf_dir` (written the first time it is asked for), named
    as shipped with its own weight type replaced ("SmolLM2-135M-Instruct.Q4_1" → "SmolLM2-135M-Instruct.F32")."""
    name = re.sub(rf"[.-]{re.escape(file_type(shipped))}$", "", shipped.stem, flags=re.IGNORECASE)
    path = gguf_dir / f"{name}.{weights}.gguf"
    if not path.exists():
        gguf_dir.mkdir(parents=True, exist_ok=True)
        dequantize_gguf(shipped, path, weights.lower())
    return path


def default_gguf(gguf_dir: Path, weights: str) -> Path:
    """The default model's GGUF as shipped ("Q4_1"), or dequantized from it ("F16", "F32") in `gguf_dir`."""
    shipped = default_gguf_path()
    return shipped if weights == file_type(shipped) else dequantized_gguf(shipped, gguf_dir, weights)


def steering_vector(spec_path: Path) -> dict[int, np.ndarray]:
    """Layer → scaled vector of a static-vector steer spec (the only kind every peer can apply)."""
    from safetensors.numpy import load_file

    spec = json.loads(spec_path.read_text())
    vectors: dict[int, np.ndarray] = {}
    for intervention in spec["interventions"]:
        if intervention["kind"] != "vector":
            raise SystemExit(f"{spec_path}: peers can only apply static vectors, not {intervention['kind']}")
        tensors = load_file(str(spec_path.parent / intervention["path"]))
        for layer in intervention["layers"]:
            vectors[layer] = intervention["scale"] * tensors[f"direction.{layer}"].astype(np.float32)
    return vectors


class HfEager:
    """HF transformers, eager attention, fp32: the model the bundles were exported from."""

    def __init__(self, source: str, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = load(source).model  # eager attention, eval mode
        self.hooks: list = []

    def steer(self, vectors: dict[int, np.ndarray] | None) -> None:
        """Add `vectors[L]` to decoder layer L's output at every position (repeng's way), or stop."""
        for hook in self.hooks:
            hook.remove()
        self.hooks = []
        for layer, vector in (vectors or {}).items():
            delta = self.torch.from_numpy(vector)

            def add(_module, _inputs, output, delta=delta):
                if isinstance(output, tuple):
                    return (output[0] + delta, *output[1:])
                return output + delta

            self.hooks.append(self.model.model.layers[layer].register_forward_hook(add))

    def run(self, ids: list[int], new_tokens: int) -> Run:
        torch = self.torch
        with torch.inference_mode():
            started = time.perf_counter()
            out = self.model(input_ids=torch.tensor([ids]), use_cache=True)
            token = int(out.logits[0, -1].argmax())
            first = time.perf_counter()
            generated = [token]
            past = out.past_key_values
            for _ in range(new_tokens - 1):
                out = self.model(input_ids=torch.tensor([[token]]), past_key_values=past, use_cache=True)
                past, token = out.past_key_values, int(out.logits[0, -1].argmax())
                generated.append(token)
            return first - started, time.perf_counter() - first, generated


class LlamaCpp:
    """llama.cpp (llama-cpp-python) on one GGUF file, with the control-vector API for steering."""

    def __init__(self, path: Path, threads: int, context: int) -> None:
        from llama_cpp import Llama, llama_cpp

        self.api = llama_cpp
        self.llm = Llama(model_path=str(path), n_ctx=context, n_batch=context, n_ubatch=context,
                         n_threads=threads, n_threads_batch=threads, verbose=False)

    def steer(self, vectors: dict[int, np.ndarray] | None) -> None:
        """Apply `vectors` as a control vector (or clear it). llama.cpp's buffer starts at layer 1
        and row L-1 is added to block L's output, which is where onnx-steer's layer L adds too."""
        llm, api = self.llm, self.api
        if not vectors:
            api.llama_set_adapter_cvec(llm.ctx, None, 0, llm.n_embd(), 0, 0)
            return
        layers = api.llama_model_n_layer(llm.model)
        if 0 in vectors:
            raise SystemExit("llama.cpp's control vectors cannot steer layer 0")
        data = np.zeros((layers - 1, llm.n_embd()), dtype=np.float32)
        for layer, vector in vectors.items():
            data[layer - 1] = vector
        pointer = data.ctypes.data_as(api.ctypes.POINTER(api.ctypes.c_float))
        code = api.llama_set_adapter_cvec(llm.ctx, pointer, data.size, llm.n_embd(), min(vectors), max(vectors))
        if code != 0:
            raise SystemExit(f"llama_set_adapter_cvec failed with {code}")
        self.control = data  # llama.cpp copies the data; kept alive anyway until the next call

    def next_token(self) -> int:
        logits = self.api.llama_get_logits_ith(self.llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(self.llm.n_vocab(),))))

    def run(self, ids: list[int], new_tokens: int) -> Run:
        llm = self.llm
        llm.reset()
        started = time.perf_counter()
        llm.eval(ids)
        token = self.next_token()
        first = time.perf_counter()
        generated = [token]
        for _ in range(new_tokens - 1):
            llm.eval([token])
            token = self.next_token()
            generated.append(token)
        return first - started, time.perf_counter() - first, generated


Peer = HfEager | LlamaCpp


def peer_factories(args: argparse.Namespace, shipped_path: Path, shipped: str, context: int,
                   threads: int) -> list[tuple[str, str, Callable[[], Peer]]]:
    """(runtime, weights, loader) of every peer: HF eager, then llama.cpp on the shipped GGUF and its
    F16/F32 dequantizations when llama-cpp-python is installed."""
    factories: list[tuple[str, str, Callable[[], Peer]]] = [
        ("HF transformers eager", "fp32", partial(HfEager, args.source, threads))]
    if not importlib.util.find_spec("llama_cpp"):
        print("   llama-cpp-python is not installed: llama.cpp rows skipped (make peers installs it)", flush=True)
        return factories
    for weights in (shipped, "F16", "F32"):
        path = shipped_path if weights == shipped else dequantized_gguf(shipped_path, args.gguf_dir, weights)
        factories.append(("llama.cpp", weights, partial(LlamaCpp, path, threads, context)))
    return factories


# Steered or not → the vectors a peer applies (None: unsteered); only False without a steer spec.
SteeringStates = dict[bool, dict[int, np.ndarray] | None]


def warmed_up(peer: Peer, ids: list[int], states: SteeringStates) -> Peer:
    """`peer` after a short greedy run in every steering state it will be measured in."""
    for state in states.values():
        peer.steer(state)
        peer.run(ids, WARM_UP_TOKENS)
    peer.steer(None)
    return peer


class Samples:
    """Per-round measurements of every runtime configuration, in the order first seen."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str, bool], dict] = {}

    def add(self, runtime: str, weights: str, steered: bool, prefill_tps: float, decode_tps: float,
            greedy_ids: list[int]) -> None:
        row = self.rows.setdefault((runtime, weights, steered), {"prefill": [], "decode": []})
        row["prefill"].append(prefill_tps)
        row["decode"].append(decode_tps)
        row["greedy_ids"] = greedy_ids

    def add_bench(self, report: dict, weights: str) -> None:
        """The variants of one `onnx-steer bench --repeats 1` report."""
        for variant in report["workloads"][0]["variants"]:
            name = variant["variant"]
            runtime = "onnx-steer monolithic" if name == "monolithic" else "onnx-steer segmented"
            self.add(runtime, weights, "+" in name, variant["prefill_tokens_per_s"]["p50"],
                     variant["decode_tokens_per_s"]["p50"], variant["generated_ids"])

    def summary(self) -> list[dict]:
        return [{"runtime": runtime, "weights": weights, "steered": steered,
                 "prefill_tokens_per_s": statistics.median(row["prefill"]),
                 "prefill_std": statistics.pstdev(row["prefill"]),
                 "decode_tokens_per_s": statistics.median(row["decode"]),
                 "decode_std": statistics.pstdev(row["decode"]),
                 "rounds": len(row["decode"]), "greedy_ids": row["greedy_ids"]}
                for (runtime, weights, steered), row in self.rows.items()]


def add_agreement(rows: list[dict]) -> None:
    """Share of each row's greedy ids equal to HF's at the same position (steered rows vs steered HF)."""
    hf = {r["steered"]: r["greedy_ids"] for r in rows if r["runtime"] == "HF transformers eager"}
    for row in rows:
        reference = hf.get(row["steered"])
        row["greedy_agreement_with_hf"] = (
            None if reference is None else sum(a == b for a, b in zip(row["greedy_ids"], reference)) / len(reference))


def machine(report: dict) -> dict:
    memory = next((line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal")), "0")
    versions = {}
    for package in ("torch", "transformers", "onnxruntime", "llama_cpp"):
        if importlib.util.find_spec(package):
            versions[package] = getattr(__import__(package), "__version__", "?")
    return {"cpu_model": report.get("cpu_model"), "cpus": os.cpu_count(), "memory_gib": int(memory) / 2**20,
            "memory_read_gb_per_s": report.get("memory_read_gb_per_s"), "platform": platform.platform(),
            "python": platform.python_version(), "versions": versions}


def write_markdown(path: Path, result: dict) -> None:
    rows = result["rows"]
    hf = {r["steered"]: r for r in rows if r["runtime"] == "HF transformers eager"}
    lines = [
        (f"# onnx-steer vs peers: {result['bundle']} ({result['prompt_tokens']}-token prompt, "
         f"{result['new_tokens']} new tokens, batch 1)"),
        "",
        f"Machine: {result['machine']['cpu_model']}, {result['machine']['cpus']} CPUs, "
        f"{result['machine']['memory_gib']:.0f} GiB, memory read {result['machine']['memory_read_gb_per_s']:.1f} GB/s; "
        f"{result['machine']['platform']}. Versions: "
        + ", ".join(f"{k} {v}" for k, v in result["machine"]["versions"].items()) + ".",
        (f"Steering: {f'`{steer}`' if (steer := result['steer']) else 'none (unsteered rows only)'}. "
         f"{result['repeats']} rounds; each round runs every configuration once, after a warm-up "
         f"({'each peer loaded for its turn and freed after' if result.get('low_memory') else 'peers loaded once'}); "
         f"medians ± standard deviation over rounds. Command: `{result['command']}`."),
        "",
        "| runtime | weights | steered | prefill tok/s | decode tok/s | decode vs HF | greedy = HF |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        base = hf.get(r["steered"])
        versus = f"{r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}x" if base else ""
        agree = "" if r["greedy_agreement_with_hf"] is None else f"{r['greedy_agreement_with_hf']:.0%}"
        lines.append(f"| {r['runtime']} | {r['weights']} | {'yes' if r['steered'] else 'no'} | "
                     f"{r['prefill_tokens_per_s']:.0f} ± {r['prefill_std']:.0f} | "
                     f"{r['decode_tokens_per_s']:.1f} ± {r['decode_std']:.1f} | {versus} | {agree} |")
    lines += ["", "Ratios in this run:", ""]
    lines += [f"- {name}: {value:.3f}" for name, value in result["ratios"].items()]
    path.write_text("\n".join(lines) + "\n")


def plot(path: Path, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [f"{r['runtime']}\n{r['weights']}{' +steer' if r['steered'] else ''}" for r in rows]
    colours = ["tab:blue" if r["runtime"].startswith("onnx-steer") else
               "tab:orange" if r["runtime"].startswith("llama") else "tab:gray" for r in rows]
    figure, axes = plt.subplots(1, 2, figsize=(14, 0.45 * len(rows) + 1.8))
    for axis, key, title in ((axes[0], "decode", "decode tokens/s"), (axes[1], "prefill", "prefill tokens/s")):
        values = [r[f"{key}_tokens_per_s"] for r in rows]
        errors = [r[f"{key}_std"] for r in rows]
        axis.barh(range(len(rows)), values, xerr=errors, color=colours)
        axis.set_yticks(range(len(rows)), labels if key == "decode" else [""] * len(rows), fontsize=7)
        axis.invert_yaxis()
        axis.set_title(title)
        for index, value in enumerate(values):
            axis.text(value, index, f" {value:.0f}", va="center", fontsize=7)
    figure.suptitle(f"batch 1, {result['prompt_tokens']}-token prompt, {result['new_tokens']} new tokens — "
                    f"{result['machine']['cpu_model']}, {result['machine']['cpus']} CPUs")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def ratios(rows: list[dict], quantized: str, shipped: str) -> dict[str, float]:
    """Speed ratios of this run; `quantized` names the onnx-steer quantized bundle ("int4"), `shipped`
    the GGUF's own weight type ("Q4_1")."""
    def find(runtime: str, weights: str, steered: bool = False) -> dict | None:
        return next((r for r in rows if r["runtime"] == runtime and r["weights"] == weights
                     and r["steered"] == steered), None)

    pairs = {
        "fp32_segmented_over_monolithic": (find("onnx-steer segmented", "fp32"), find("onnx-steer monolithic", "fp32")),
        f"{quantized}_segmented_over_monolithic": (find("onnx-steer segmented", quantized),
                                                   find("onnx-steer monolithic", quantized)),
        "fp32_segmented_over_hf": (find("onnx-steer segmented", "fp32"), find("HF transformers eager", "fp32")),
        "fp32_segmented_steered_over_hf_steered": (find("onnx-steer segmented", "fp32", True),
                                                   find("HF transformers eager", "fp32", True)),
        f"{quantized}_segmented_over_hf": (find("onnx-steer segmented", quantized), find("HF transformers eager", "fp32")),
        "fp32_segmented_over_llama_cpp_f32": (find("onnx-steer segmented", "fp32"), find("llama.cpp", "F32")),
        "fp32_segmented_steered_over_llama_cpp_f32_steered": (find("onnx-steer segmented", "fp32", True),
                                                               find("llama.cpp", "F32", True)),
        f"{quantized}_segmented_over_llama_cpp_{shipped.lower()}": (find("onnx-steer segmented", quantized),
                                                                   find("llama.cpp", shipped)),
        "fp32_steered_over_unsteered": (find("onnx-steer segmented", "fp32", True), find("onnx-steer segmented", "fp32")),
    }
    out = {}
    for name, (a, b) in pairs.items():
        if a and b:
            out[f"decode_{name}"] = a["decode_tokens_per_s"] / b["decode_tokens_per_s"]
            out[f"prefill_{name}"] = a["prefill_tokens_per_s"] / b["prefill_tokens_per_s"]
    return out


def quantized_label(bundle: Path) -> str:
    """A quantized bundle's weight format from its manifest ("int4", "int8")."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    if not manifest.get("weights"):
        raise SystemExit(f"{bundle}: not a weight-quantized bundle (its manifest has no weights section)")
    return str(manifest["weights"]["format"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--binary", type=Path, default=REPO / "target/release/onnx-steer")
    parser.add_argument("--source", default="default",
                        help="what the bundle was exported from (as for export): HF and llama.cpp load it")
    parser.add_argument("--bundle", type=Path, default=REPO / "onnx/smollm2-135m-instruct", help="fp32 bundle")
    parser.add_argument("--quantized", type=Path, default=REPO / "onnx/smollm2-135m-instruct-int4",
                        help="its weight-quantized copy (skipped when absent)")
    parser.add_argument("--steer", type=Path,
                        help="a static-vector steer spec, applied by every runtime (without it, unsteered rows only)")
    parser.add_argument("--low-memory", action="store_true",
                        help="load each peer for its turn in a round and free it after, for checkpoints whose "
                             "copies do not fit in memory together (the same measurements, slower)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gguf-dir", type=Path, default=REPO / "target/gguf", help="where F32/F16 GGUFs are written")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/cpu_peers", help="path stem of the results")
    parser.add_argument("--command", default="make peers", help="the command the report names as its source")
    args = parser.parse_args()
    threads = os.cpu_count() or 1
    states: SteeringStates = {False: None}
    if args.steer:
        states[True] = steering_vector(args.steer)

    bundles = [("fp32", args.bundle)]
    quantized = "int4"  # without the bundle this only names ratios that find no rows
    if (args.quantized / "manifest.json").exists():
        quantized = quantized_label(args.quantized)
        bundles.append((quantized, args.quantized))
    first = onnx_steer(args.binary, args.bundle, args)
    ids = first["workloads"][0]["prompt_ids"]

    shipped_path = shipped_gguf(args.source)
    shipped = file_type(shipped_path)
    factories = peer_factories(args, shipped_path, shipped, 2 * (len(ids) + args.new_tokens), threads)
    loaded: list[Peer] = []
    if not args.low_memory:
        print("== loading HF transformers eager fp32 and llama.cpp", flush=True)
        loaded = [warmed_up(load_peer(), ids, states) for _, _, load_peer in factories]

    # Rounds: every configuration runs once per round, so the host's drift spreads over all of them.
    samples = Samples()
    for round_index in range(args.repeats):
        print(f"== round {round_index + 1}/{args.repeats}", flush=True)
        for weights, bundle in bundles:
            report = first if (round_index, weights) == (0, "fp32") else onnx_steer(args.binary, bundle, args)
            samples.add_bench(report, weights)
        for index, (runtime, weights, load_peer) in enumerate(factories):
            peer = loaded[index] if loaded else warmed_up(load_peer(), ids, states)
            for steered, state in states.items():
                peer.steer(state)
                prefill_s, decode_s, generated = peer.run(ids, args.new_tokens)
                samples.add(runtime, weights, steered, len(ids) / prefill_s, (args.new_tokens - 1) / decode_s, generated)
            peer.steer(None)
            if args.low_memory:  # free this peer before the next one loads
                del peer
                gc.collect()
    rows = samples.summary()
    for row in rows:
        print(f"   {row['runtime']} {row['weights']}{' steered' if row['steered'] else ''}: "
              f"prefill {row['prefill_tokens_per_s']:.0f} tok/s, decode {row['decode_tokens_per_s']:.1f} tok/s")
    add_agreement(rows)
    steer = None if args.steer is None else str(args.steer.relative_to(REPO) if args.steer.is_relative_to(REPO) else args.steer)
    result = {"prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "repeats": args.repeats,
              "low_memory": args.low_memory, "steer": steer,
              "bundle": args.bundle.name, "source": args.source, "command": args.command, "prompt_ids": ids, "machine": machine(first), "rows": rows,
              "ratios": ratios(rows, quantized, shipped)}
    # The stem may hold dots ("cpu_peers_qwen2.5-0.5b-instruct"): suffixes are appended, not swapped.
    out = {suffix: args.out.parent / f"{args.out.name}{suffix}" for suffix in (".json", ".md", ".png")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    out[".json"].write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(out[".md"], result)
    plot(out[".png"], result)
    print(out[".md"].read_text())


if __name__ == "__main__":
    main()
