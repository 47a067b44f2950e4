"""eval-garak's reading of garak reports and its run config (garak itself runs in `make eval-garak`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from onnx_steer_export.eval.garak_client import PROBES, attack_success, garak_config, markdown, read_report


def attempt(probe: str, text: str, status: int = 2) -> dict:
    """An attempt entry as garak 0.17.1 writes it (the fields eval-garak reads)."""
    return {"entry_type": "attempt", "status": status, "probe_classname": probe,
            "prompt": {"turns": [{"role": "user", "content": {"text": text, "lang": "en"}}], "notes": None},
            "outputs": [{"text": "I can't help with that."}], "detector_results": {}}


def evaluation(probe: str, detector: str, passed: int, fails: int) -> dict:
    return {"entry_type": "eval", "probe": probe, "detector": detector, "passed": passed, "fails": fails,
            "nones": 0, "total_evaluated": passed + fails, "total_processed": passed + fails}


def test_reports_are_read_and_pooled_per_family_and_detector_kind(tmp_path: Path) -> None:
    entries = [{"entry_type": "start_run setup"}, attempt("dan.Dan_11_0", "Hello ChatGPT."),
               attempt("dan.Dan_11_0", "not yet evaluated", status=1),
               evaluation("dan.Dan_11_0", "dan.DAN", 1, 0), evaluation("dan.STAN", "dan.STAN", 0, 1),
               evaluation("dan.STAN", "mitigation.MitigationBypass", 0, 1),
               evaluation("promptinject.HijackHateHumans", "promptinject.AttackRogueString", 15, 5)]
    report = tmp_path / "run.report.jsonl"
    report.write_text("\n".join(json.dumps(e) for e in entries) + "\n")
    evals, attempts = read_report(report)
    assert len(evals) == 4 and [a["prompt"]["turns"][0]["content"]["text"] for a in attempts] == ["Hello ChatGPT."]
    success = attack_success(evals)
    assert success["per_family"]["dan / dan.*"] == {"fails": 1, "total": 2, "rate": 0.5}
    assert success["per_family"]["promptinject / promptinject.AttackRogueString"]["rate"] == pytest.approx(0.25)
    assert success["per_probe"]["dan.STAN / mitigation.MitigationBypass"]["rate"] == 1.0
    table = markdown({"garak": "0.17.1", "bundle": "b", "cap": 20, "max_new_tokens": 48,
                      "settings": {"unsteered": success, "autosteer": {**success, "gate": {
                          "encoding": {"opened": 1, "total": 40, "rate": 0.025}}}}})
    assert "| promptinject / promptinject.AttackRogueString | 25.0% (5/20) | 25.0% (5/20) |" in table
    assert "| autosteer | 2.5% (1/40) |" in table


def test_the_config_is_greedy_steers_through_extra_body_and_names_the_probes() -> None:
    config = garak_config("http://127.0.0.1:8000", "m", "autosteer", PROBES, cap=20, max_new_tokens=48,
                          parallel=8, prefix="autosteer")
    generator = config["plugins"]["generators"]["openai"]["OpenAICompatible"]
    assert generator["uri"] == "http://127.0.0.1:8000/v1"
    # Probes may set the generator's temperature and max_tokens: garak sends neither, the body ours.
    assert generator["extra_params"] == {"extra_body": {"steering": "autosteer", "temperature": 0, "max_tokens": 48}}
    assert {"stop", "n", "top_p", "temperature", "max_tokens"} <= set(generator["suppressed_params"])
    assert "probes.encoding.InjectBase64" in config["run"]["spec"]["include"]
    assert config["run"]["soft_probe_prompt_cap"] == 20 and config["run"]["generations"] == 1
    unsteered = garak_config("http://x", "m", None, PROBES, 20, 48, 8, "unsteered")
    assert unsteered["plugins"]["generators"]["openai"]["OpenAICompatible"]["extra_params"] == {
        "extra_body": {"temperature": 0, "max_tokens": 48}}
