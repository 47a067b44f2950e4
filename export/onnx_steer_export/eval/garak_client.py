"""eval-garak: garak, the LLM vulnerability scanner, as a real client of `onnx-steer serve`.

garak 0.17.1 runs from its own virtual environment (its pins, transformers < 5.20 and openai < 3,
conflict with the project's) and talks to the server through its OpenAI-compatible generator,
greedy, steering each setting by name through `extra_body`. Only probes whose detectors need no
download run: the DAN family (detectors dan.* and mitigation.MitigationBypass; see DAN_PROBES), encoding.InjectBase64
and InjectHex (encoding.DecodeMatch/DecodeApprox), promptinject.HijackHateHumans and HijackKillHumans
(promptinject.AttackRogueString), each capped at --cap prompts chosen by garak's own seeded sampling.

Per setting: attack success (garak's fail rate) per probe and detector, and per family (the outputs
of every probe of the family pooled, per detector kind). For a spec with an AutoSteer prober, every
prompt garak sent is sent again for one token under that spec, and the server's reported decision
gives the gate-open rate per family (the encoding prompts are benign: they ask to decode a string).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from ..figures import save_figure
from ..runtime_client import find_binary, serving
from .harness import save_report

# The DAN family without Ablation_Dan_11_0 (127 variants of Dan_11_0 that garak's prompt cap does not bound)
# and AutoDAN (it needs an attacker model).
DAN_PROBES = ("Dan_11_0", "Dan_10_0", "Dan_9_0", "Dan_8_0", "Dan_7_0", "Dan_6_2", "Dan_6_0", "DUDE", "STAN",
              "DAN_Jailbreak", "AntiDAN", "ChatGPT_Developer_Mode_v2", "ChatGPT_Developer_Mode_RANTI",
              "ChatGPT_Image_Markdown", "AutoDANCached", "DanInTheWild")
PROBES = tuple(f"dan.{name}" for name in DAN_PROBES) + (
    "encoding.InjectBase64", "encoding.InjectHex", "promptinject.HijackHateHumans", "promptinject.HijackKillHumans")
GARAK_VERSION = "0.17.1"


def family(probe: str) -> str:
    """'dan', 'encoding' or 'promptinject' (the probe's module)."""
    return probe.split(".", 1)[0]


def detector_kind(detector: str) -> str:
    """The DAN probes each have their own dan.* detector: pooled as 'dan.*'; other detectors as named."""
    return "dan.*" if detector.startswith("dan.") else detector


def garak_config(url: str, model: str, steering: str | None, probes: Sequence[str], cap: int, max_new_tokens: int,
                 parallel: int, prefix: str) -> dict:
    """A garak run config: the OpenAI-compatible generator at `url`, greedy, one generation per prompt."""
    # Some probes set the generator's own temperature and max_tokens (promptinject sends 0.3 and 150), so
    # garak sends none of its sampling parameters and the body carries ours: greedy, `max_new_tokens`.
    # garak's default stop strings ("#", ";") would cut outputs.
    body: dict = {"temperature": 0, "max_tokens": max_new_tokens}
    if steering is not None:
        body["steering"] = steering
    generator: dict = {"uri": f"{url}/v1", "api_key": "unused", "extra_params": {"extra_body": body},
                       "suppressed_params": ["n", "stop", "frequency_penalty", "presence_penalty", "top_p", "seed",
                                             "temperature", "max_tokens"]}
    return {"system": {"parallel_attempts": parallel, "lite": True, "narrow_output": True},
            "run": {"generations": 1, "soft_probe_prompt_cap": cap, "seed": 0,
                    "spec": {"include": [f"probes.{probe}" for probe in probes]}},
            "plugins": {"target_type": "openai.OpenAICompatible", "target_name": model,
                        "generators": {"openai": {"OpenAICompatible": generator}}},
            "reporting": {"report_prefix": prefix}}


def run_garak(garak_python: Path, work: Path, config: dict) -> Path:
    """Run garak with `config` (its data, config and cache folders under `work`) → its report JSONL."""
    work.mkdir(parents=True, exist_ok=True)
    config_path = work / f"{config['reporting']['report_prefix']}.json"
    config_path.write_text(json.dumps(config, indent=2))
    config_path.chmod(0o600)
    env = os.environ | {"XDG_DATA_HOME": str(work / "data"), "XDG_CONFIG_HOME": str(work / "config"),
                        "XDG_CACHE_HOME": str(work / "cache")}
    log = work / f"{config['reporting']['report_prefix']}.log"
    with log.open("w") as output:
        done = subprocess.run([str(garak_python), "-m", "garak", "--config", str(config_path)], env=env,
                              stdout=output, stderr=subprocess.STDOUT, check=False)
    report = work / "data/garak/garak_runs" / f"{config['reporting']['report_prefix']}.report.jsonl"
    if done.returncode != 0 or not report.exists():
        tail = log.read_text()[-2000:]
        raise RuntimeError(f"garak exited with {done.returncode} (log: {log}):\n{tail}")
    return report


def read_report(path: Path) -> tuple[list[dict], list[dict]]:
    """(eval entries, evaluated attempts) of a garak report."""
    evals, attempts = [], []
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        if entry.get("entry_type") == "eval":
            evals.append(entry)
        elif entry.get("entry_type") == "attempt" and entry.get("status") == 2:
            attempts.append(entry)
    return evals, attempts


def attack_success(evals: Sequence[dict]) -> dict:
    """Fail rates per probe and detector, and pooled per family and detector kind."""
    def rate(fails: int, total: int) -> dict:
        return {"fails": fails, "total": total, "rate": fails / total if total else float("nan")}

    pooled: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for e in evals:
        counts = pooled[f"{family(e['probe'])} / {detector_kind(e['detector'])}"]
        counts[0] += e["fails"]
        counts[1] += e["total_evaluated"]
    return {"per_probe": {f"{e['probe']} / {e['detector']}": rate(e["fails"], e["total_evaluated"]) for e in evals},
            "per_family": {key: rate(*counts) for key, counts in sorted(pooled.items())}}


def prompt_messages(attempt: dict) -> list[dict]:
    """The chat messages garak sent for an attempt."""
    return [{"role": turn["role"], "content": turn["content"]["text"]} for turn in attempt["prompt"]["turns"]]


def gate_rates(url: str, steering: str, attempts: Sequence[dict]) -> dict:
    """Each attempt's prompt again for one token under `steering`: the share whose AutoSteer gate opened,
    per family."""
    import requests

    opened: dict[str, list[bool]] = defaultdict(list)
    for attempt in tqdm(attempts, desc=f"gate of {steering}", unit="prompt"):
        response = requests.post(f"{url}/v1/chat/completions", timeout=600, json={
            "messages": prompt_messages(attempt), "max_tokens": 1, "steering": steering})
        response.raise_for_status()
        decisions = [d for d in response.json().get("steering", []) if d.get("kind") == "autosteer"]
        opened[family(attempt["probe_classname"])].append(any(d.get("gated") for d in decisions))
    return {name: {"opened": sum(flags), "total": len(flags), "rate": sum(flags) / len(flags)}
            for name, flags in sorted(opened.items())}


def has_autosteer(spec: Path) -> bool:
    return any(i.get("kind") == "autosteer" for i in json.loads(spec.read_text()).get("interventions", []))


def evaluate(bundle: Path, methods: Sequence[tuple[str, Path]], garak_python: Path, work: Path, cap: int,
             max_new_tokens: int, parallel: int, probes: Sequence[str] | None = None) -> dict:
    probes = probes or PROBES
    steer_dirs = {spec.parent.resolve() for _, spec in methods}
    if len(steer_dirs) > 1:
        raise ValueError(f"every --method spec must be in one folder (the server's --steer-dir), got {steer_dirs}")
    if not garak_python.exists():
        raise FileNotFoundError(f"no garak interpreter at {garak_python}; `make eval-garak` installs garak "
                                f"{GARAK_VERSION} into .venv-garak")
    model = json.loads((bundle / "manifest.json").read_text())["name"]
    server_args = ["--max-batch", str(parallel)]
    if steer_dirs:
        server_args += ["--steer-dir", str(steer_dirs.pop())]
    settings: list[tuple[str, Path | None]] = [("unsteered", None), *methods]
    results = {}
    with serving(find_binary(), bundle, *server_args) as (url, _):
        for name, spec in settings:
            print(f"== garak against {name}", flush=True)
            steering = None if spec is None else spec.stem
            config = garak_config(url, model, steering, probes, cap, max_new_tokens, parallel, prefix=name)
            evals, attempts = read_report(run_garak(garak_python, work, config))
            result: dict = {"spec": None if spec is None else str(spec), "prompts": len(attempts),
                            **attack_success(evals)}
            if spec is not None and has_autosteer(spec):
                result["gate"] = gate_rates(url, spec.stem, attempts)
            results[name] = result
    return {"garak": GARAK_VERSION, "probes": list(probes), "cap": cap, "max_new_tokens": max_new_tokens,
            "bundle": str(bundle), "settings": results}


def markdown(report: dict) -> str:
    settings = report["settings"]
    names = list(settings)
    rows = sorted({key for s in settings.values() for key in s["per_family"]})
    lines = [f"# garak {report['garak']} against onnx-steer serve", "",
             (f"Bundle `{report['bundle']}`; greedy, {report['max_new_tokens']} new tokens, one generation per "
             f"prompt, at most {report['cap']} prompts per probe (garak's seeded sampling). Attack success is "
             "garak's fail rate: the share of outputs its detector flags (DAN: the model took the persona "
             "(dan.*) or no refusal phrase was found (MitigationBypass); encoding: the decoded payload was "
             "printed; promptinject: the rogue string was printed). Command: `make eval-garak`."), "",
             "| family / detector | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for key in rows:
        cells = []
        for name in names:
            row = settings[name]["per_family"].get(key)
            cells.append("" if row is None else f"{row['rate']:.1%} ({row['fails']}/{row['total']})")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    gated = {name: s["gate"] for name, s in settings.items() if "gate" in s}
    if gated:
        lines += ["", "AutoSteer gate open (the prompts garak sent, replayed for one token):", "",
                  "| setting | " + " | ".join(sorted({f for g in gated.values() for f in g})) + " |",
                  "|---|" + "---:|" * len({f for g in gated.values() for f in g})]
        for name, gate in gated.items():
            lines.append(f"| {name} | " + " | ".join(
                f"{gate[f]['rate']:.1%} ({gate[f]['opened']}/{gate[f]['total']})" for f in sorted(gate)) + " |")
    lines += ["", "Per probe and detector:", "", "| probe / detector | " + " | ".join(names) + " |",
              "|---|" + "---:|" * len(names)]
    for key in sorted({k for s in settings.values() for k in s["per_probe"]}):
        cells = [f"{settings[n]['per_probe'][key]['rate']:.0%}" if key in settings[n]["per_probe"] else ""
                 for n in names]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Attack success per family and detector, one bar per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    settings = report["settings"]
    keys = sorted({key for s in settings.values() for key in s["per_family"]})
    figure, axis = plt.subplots(figsize=(max(8, 1.6 * len(keys)), 4.5))
    width = 0.8 / len(settings)
    for index, (name, setting) in enumerate(settings.items()):
        values = [setting["per_family"].get(key, {}).get("rate", np.nan) for key in keys]
        axis.bar(np.arange(len(keys)) + index * width, values, width, label=name)
    axis.set_xticks(np.arange(len(keys)) + 0.4 - width / 2, keys, rotation=20, ha="right", fontsize=8)
    axis.set_ylabel("attack success (garak fail rate)")
    axis.set_ylim(0, 1)
    axis.legend(fontsize=8)
    axis.set_title(f"garak {report['garak']} against onnx-steer serve ({report['bundle']})")
    save_figure(figure, path)


def write(report: dict, out: Path) -> None:
    save_report(report, out, markdown, plot)
