"""Run the libFuzzer targets of fuzz/ for a bounded time each and report what they did.

Each target starts from its committed seeds (fuzz/seeds/TARGET) and grows a working corpus in
fuzz/corpus/TARGET (ignored by git). A crash, a timeout or a leak leaves its input in
fuzz/artifacts/TARGET/ and makes this script exit non-zero. `--out` writes the figures (executions,
coverage, corpus size, crashes) as JSON.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

FUZZ_DIR = Path(__file__).resolve().parent.parent / "fuzz"
# libFuzzer's status lines: "#123456	DONE   cov: 812 ft: 2301 corp: 140/9Kb exec/s: 4100 ..."
STATUS = re.compile(r"#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)/")
EXECUTED = re.compile(r"stat::number_of_executed_units: (\d+)")
# The largest input a target is given: real control vectors, manifests and specs fit easily.
MAX_LEN = 16384


def run_target(bin_dir: Path, target: str, seconds: int) -> dict[str, object]:
    corpus = FUZZ_DIR / "corpus" / target
    seeds = FUZZ_DIR / "seeds" / target
    artifacts = FUZZ_DIR / "artifacts" / target
    for folder in (corpus, artifacts):
        folder.mkdir(parents=True, exist_ok=True)
    before = set(artifacts.iterdir())
    command = [
        str(bin_dir / target),
        str(corpus),
        str(seeds),
        f"-max_total_time={seconds}",
        f"-max_len={MAX_LEN}",
        "-timeout=10",
        "-rss_limit_mb=2048",
        "-print_final_stats=1",
        f"-artifact_prefix={artifacts}/",
    ]
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    wall = time.monotonic() - started
    log = done.stderr
    statuses = STATUS.findall(log)
    executed = EXECUTED.findall(log)
    crashes = sorted(str(p.relative_to(FUZZ_DIR)) for p in set(artifacts.iterdir()) - before)
    report: dict[str, object] = {
        "target": target,
        "seconds": round(wall, 1),
        "executions": int(executed[-1]) if executed else None,
        "coverage_edges": int(statuses[-1][1]) if statuses else None,
        "features": int(statuses[-1][2]) if statuses else None,
        "corpus_inputs": sum(1 for _ in corpus.iterdir()),
        "seed_inputs": sum(1 for _ in seeds.iterdir()),
        "exit_code": done.returncode,
        "new_crash_inputs": crashes,
    }
    if done.returncode != 0:
        tail = "\n".join(log.splitlines()[-40:])
        print(f"== {target} failed (exit {done.returncode}):\n{tail}", file=sys.stderr)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="+", help="fuzz targets (binaries in --bin-dir)")
    parser.add_argument("--bin-dir", type=Path, required=True, help="where the built targets are")
    parser.add_argument("--seconds", type=int, default=600, help="time per target")
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = parser.parse_args()
    reports = []
    for target in args.targets:
        report = run_target(args.bin_dir, target, args.seconds)
        reports.append(report)
        print(
            f"{target:20} {report['seconds']:>7}s  {report['executions']} executions  "
            f"cov {report['coverage_edges']}  corpus {report['corpus_inputs']}  "
            f"exit {report['exit_code']}"
        )
    if args.out:
        args.out.write_text(json.dumps({"targets": reports}, indent=2) + "\n")
    return 0 if all(r["exit_code"] == 0 for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
