"""Benchmark: single agent vs dense MoA vs sparse MoA (SMoA) on AgentBench DB dev, and SMoA as a teacher.

Run (after `cmat prepare-model`; uses the SFT adapter in artifacts/sft when it exists, else the base model):
    flock /tmp/cmat-cpu.lock .venv/bin/python bench/smoa.py --limit 20 --max-new-tokens 128 --teacher-tasks 30
The evaluated tasks are every `--stride`-th dev task (dev lists 20 SELECT, then 20 INSERT, then 20 UPDATE
tasks, so a stride mixes the three categories overall_cat_accuracy averages), `--limit` of them.
Every mode uses the same loaded model, proposers (params.yaml's `smoa.proposers`: role descriptions and
temperatures), layers, top_k and judge (the SQL Checker); only `smoa.mode` changes. Prints, as JSON, accuracy
next to cost per task (prompt + completion tokens of every role, model calls, replies generated) and, for the
teacher part, the success rate of trajectories collected on synthetic tasks and whether they pass the
data pipeline's raw validation (the filter stage's first suite). Writes report.json and report.md (tables).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import time
from pathlib import Path
from typing import Any

import torch

from cmat_pipeline.config import Params, load_params
from cmat_pipeline.runtime.policy import HFPolicy, Policy
from cmat_pipeline.runtime.smoa import build_smoa_policy

MODES = ("single", "dense", "sparse")


def cost(usage: dict[str, Any], tasks: int) -> dict[str, Any]:
    tokens = usage["prompt_tokens"] + usage["completion_tokens"]
    return {"tokens_per_task": round(tokens / tasks, 1), "completion_tokens_per_task": round(usage["completion_tokens"] / tasks, 1),
            "model_calls": usage["calls"], "replies_per_task": round(usage["requests"] / tasks, 2),
            "turns_per_task": round(usage["conversation_turns"] / tasks, 2),
            "tokens_per_turn": round(tokens / max(usage["conversation_turns"], 1), 1),
            "layers_per_turn": round(usage["conversation_layers"] / max(usage["conversation_turns"], 1), 2),
            "early_stops": usage["early_stops"]}


def evaluate_mode(params: Params, model: Policy) -> dict[str, Any]:
    from cmat_pipeline.envs.dbbench import load_tasks
    from cmat_pipeline.evaluate import evaluate

    tasks = load_tasks(params.evaluate.tasks, params.evaluate.limit)
    torch.manual_seed(0)
    metrics = evaluate(params, policy=build_smoa_policy(params, tasks, backbones={"model": model}), progress=False)
    return {"mode": params.smoa.mode, "overall_cat_accuracy": metrics["overall_cat_accuracy"],
            "first_turn_valid_format": metrics["first_turn_valid_format"], "outcomes": metrics["outcomes"],
            **cost(metrics["usage"], metrics["tasks"]), "wall_seconds": metrics["wall_seconds"]}


def raw_reasons(rows: list[dict[str, Any]]) -> dict[str, int]:
    """Why rows fail the raw suite's conversation checks, reason text without the message number."""
    from collections import Counter

    from cmat_pipeline.data.records import action_problem, role_problem

    reasons = (role_problem(r.get("messages")) or action_problem(r) for r in rows)
    return dict(Counter(re.sub(r"^message \d+:? ", "", why) for why in reasons if why))


def teach_mode(params: Params, model: Policy) -> dict[str, Any]:
    from cmat_pipeline.collect import build_pool, collect, shard_paths
    from cmat_pipeline.data.expectations import SuiteSpec, validate_frame
    from cmat_pipeline.data.records import flatten, read_jsonl
    from cmat_pipeline.envs.dbbench import task_from_entry
    from cmat_pipeline.filtering import NO_LIMIT

    tasks = [task_from_entry(p["task"], i, "pool") for i, p in enumerate(build_pool(params))]
    policy = build_smoa_policy(params, tasks, backbones={"model": model})
    paths = shard_paths(params.collect.out_dir, params.collect.shard)
    for stale in (paths["trajectories"], paths["manifest"]):  # a fresh run, not a resumed one
        stale.unlink(missing_ok=True)
    torch.manual_seed(0)
    report = collect(params, policy=policy, progress=False)
    rows = read_jsonl(paths["trajectories"])
    # the filter stage's raw suite (row by row); failing rows are quarantined there, never trained on
    raw = validate_frame(flatten(rows), SuiteSpec("raw", min_chars=0, max_chars=NO_LIMIT))
    return {"mode": params.smoa.mode, "trajectories": report["trajectories"], "correct": report["correct"],
            "success_rate": round(report["correct"] / max(report["trajectories"], 1), 4),
            "raw_valid_rows": len(rows) - len(raw.row_reasons),
            "raw_failures": sorted({f.expectation for f in raw.failures}), "raw_reasons": raw_reasons(rows),
            **cost(policy.usage(), len(rows)), "wall_seconds": report["wall_seconds"]}


def markdown(runs: list[dict[str, Any]], teachers: list[dict[str, Any]]) -> str:
    """The two tables for docs/BENCHMARKS.md."""
    lines = ["| mode | overall_cat_accuracy | first-turn valid format | completed / invalid format / task limit | "
             "tokens / task | completion tokens / task | replies / task | model calls | turns / task | layers / turn | "
             "early stops | wall |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        o = r["outcomes"]
        lines.append(f"| {r['mode']} | {r['overall_cat_accuracy']} | {r['first_turn_valid_format']} % | {o['completed']} / "
                     f"{o['invalid_format']} / {o['task_limit_exceeded']} | {r['tokens_per_task']:,.0f} | "
                     f"{r['completion_tokens_per_task']:,.0f} | {r['replies_per_task']} | {r['model_calls']} | "
                     f"{r['turns_per_task']} | {r['layers_per_turn']} | {r['early_stops']} | {r['wall_seconds']} s |")
    lines += ["", "| teacher | trajectories | correct | success rate | rows passing raw validation | why rows fail | "
              "tokens / task | replies / task | wall |", "|---|---|---|---|---|---|---|---|---|"]
    for r in teachers:
        why = "; ".join(f"{k} ({v})" for k, v in r["raw_reasons"].items()) or "-"
        lines.append(f"| {r['mode']} | {r['trajectories']} | {r['correct']} | {r['success_rate']} | {r['raw_valid_rows']} / "
                     f"{r['trajectories']} | {why} | {r['tokens_per_task']:,.0f} | {r['replies_per_task']} | {r['wall_seconds']} s |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--limit", type=int, default=20, help="dev tasks evaluated per mode")
    parser.add_argument("--stride", type=int, default=3, help="evaluate every N-th task of evaluate.tasks")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--teacher-tasks", type=int, default=30, help="synthetic tasks collected per teacher (0 = skip)")
    parser.add_argument("--modes", nargs="*", choices=MODES, default=["single", "sparse", "dense"],
                        help="evaluated modes (none: only the teacher part)")
    parser.add_argument("--adapter", default="artifacts/sft", help="used when it holds adapter_config.json")
    parser.add_argument("--out", default="artifacts/bench/smoa")
    parser.add_argument("--budget-min", type=float, default=0, help="start no further run after this many minutes (0 = no limit)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra params overrides")
    args = parser.parse_args()
    adapter = args.adapter if os.path.isfile(os.path.join(args.adapter, "adapter_config.json")) else ""
    common = [f"generation.max_new_tokens={args.max_new_tokens}", f"smoa.adapter={adapter}", *args.set]
    base = load_params(args.params, common)
    lines = [line for line in Path(base.evaluate.tasks).read_text().splitlines() if line.strip()]
    subset = Path(args.out) / "tasks.jsonl"
    subset.parent.mkdir(parents=True, exist_ok=True)
    subset.write_text("\n".join(lines[::args.stride][:args.limit]) + "\n")
    start = time.perf_counter()
    model = HFPolicy(base.model.dir, base.generation, adapter=adapter, device=base.model.device, dtype=base.model.dtype)
    runs, teachers, skipped = [], [], []

    def over_budget(what: str) -> bool:
        if args.budget_min and time.perf_counter() - start > 60 * args.budget_min:
            skipped.append(what)
        return bool(skipped)

    for mode in args.modes:
        if over_budget(f"evaluate {mode}"):
            continue
        params = load_params(args.params, [*common, f"smoa.mode={mode}", f"evaluate.tasks={subset}",
                                           f"evaluate.out_dir={args.out}/eval-{mode}"])
        runs.append(evaluate_mode(params, model))
        print(json.dumps(runs[-1]), flush=True)
    if args.teacher_tasks:
        for mode in ("single", "sparse"):
            if over_budget(f"teacher {mode}"):
                continue
            params = load_params(args.params, [*common, f"smoa.mode={mode}", f"collect.db_tasks={args.teacher_tasks}",
                                               # one shard name: both teachers get the same generated tasks
                                               "collect.shard=smoa-teacher", f"collect.out_dir={args.out}/raw-{mode}",
                                               "collect.teacher=smoa"])
            teachers.append(teach_mode(params, model))
            print(json.dumps(teachers[-1]), flush=True)
    cfg = base.smoa
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
              "model": model.name, "tasks": f"{base.evaluate.tasks}[::{args.stride}][:{args.limit}]",
              "max_new_tokens": args.max_new_tokens,
              "smoa": {"proposers": [[p.role, p.temperature] for p in cfg.proposers], "layers": cfg.layers,
                       "top_k": cfg.top_k, "judge": cfg.judge, "moderator": cfg.moderator, "aggregator": cfg.aggregator},
              "evaluation": runs, "teacher": teachers, "skipped_over_budget": skipped, "total_wall_seconds": round(time.perf_counter() - start, 1)}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (Path(args.out) / "report.md").write_text(markdown(runs, teachers))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
