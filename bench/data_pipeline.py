"""Benchmark: the data pipeline at scale, one process per stage, as `dvc repro` runs it.

    .venv/bin/python bench/data_pipeline.py --tasks 10000 --target-size 5000
Generates `--tasks` DB tasks and collects them with the ReAct oracle (collect), then runs filter,
augment and distill (embedding-based selection to `--target-size`). Every stage runs as its own
`python -m cmat_pipeline.<stage>` process (imports included in its time) on a params file whose outputs
live under artifacts/bench/data. Prints a Markdown table of wall time and row counts per stage, and
writes it with the reports to artifacts/bench/data/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "artifacts" / "bench" / "data"
STAGES = [("collect", "collect", "reports/bench.json"), ("filter", "filtering", "report.json"),
          ("augment", "augment", "report.json"), ("distill", "distill", "report.json")]


def bench_params(tasks: int, target_size: int) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["collect"].update(shard="bench", db_tasks=tasks, out_dir=str(OUT / "raw"))
    params["filter"]["out_dir"] = str(OUT / "filtered")
    params["augment"]["out_dir"] = str(OUT / "augmented")
    params["distill"].update(out_dir=str(OUT / "distilled"), target_size=target_size)
    path = OUT / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def run_stage(module: str, params: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", f"cmat_pipeline.{module}", "--params", str(params), "--no-progress"],
                   cwd=ROOT, check=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--target-size", type=int, default=5_000)
    args = parser.parse_args()
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    params = bench_params(args.tasks, args.target_size)
    rows = []
    for stage, module, report in STAGES:
        seconds = run_stage(module, params)
        folder = {"collect": "raw"}.get(stage, {"filter": "filtered", "augment": "augmented", "distill": "distilled"}.get(stage))
        rows.append({"stage": stage, "seconds": round(seconds, 1),
                     "report": json.loads((OUT / folder / report).read_text())})
    total = sum(r["seconds"] for r in rows)
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; tasks {args.tasks}")
    print("| stage | wall s | rows in | rows out | notes |\n|---|---|---|---|---|")
    for r in rows:
        rep = r["report"]
        rows_in = rep.get("rows_in", rep.get("pool_tasks", {}).get("db"))
        rows_out = rep.get("kept", rep.get("trajectories"))
        notes = rep.get("quarantine_reasons") or {"correct": rep.get("correct")}
        print(f"| {r['stage']} | {r['seconds']} | {rows_in} | {rows_out} | {json.dumps(notes)} |")
    print(f"| **total** | **{total:.1f}** | | | |")
    (OUT / "results.json").write_text(json.dumps({"tasks": args.tasks, "total_seconds": round(total, 1),
                                                  "stages": rows}, indent=2))


if __name__ == "__main__":
    main()
