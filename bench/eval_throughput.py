"""Benchmark: dbbench evaluation throughput, batched rollouts vs one conversation at a time.

Run (after `cmat prepare-model`):
    .venv/bin/python bench/eval_throughput.py --limit 24 --batch-sizes 1 8
Both runs use the same model, tasks and greedy decoding; prints tasks/min and the speed-up as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from cmat_pipeline.config import load_params
from cmat_pipeline.evaluate import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--limit", type=int, default=24)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--out", default="artifacts/bench/eval_throughput")
    args = parser.parse_args()
    runs = []
    for batch in args.batch_sizes:
        params = load_params(args.params, [f"evaluate.limit={args.limit}", f"generation.batch_size={batch}",
                                           f"evaluate.out_dir={args.out}/batch{batch}"])
        metrics = evaluate(params, progress=False)
        runs.append({"batch_size": batch, "tasks": metrics["tasks"], "wall_seconds": metrics["wall_seconds"],
                     "tasks_per_minute": metrics["tasks_per_minute"], "generate_calls": metrics["generate_calls"],
                     "completion_tokens": metrics["completion_tokens"],
                     "overall_cat_accuracy": metrics["overall_cat_accuracy"], "outcomes": metrics["outcomes"]})
    base = runs[0]["tasks_per_minute"]
    report = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
              "runs": runs, "speedup_vs_first": [round(r["tasks_per_minute"] / base, 2) for r in runs]}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
