"""Benchmark: does the CMAT stage improve on SFT only? Seeds and ablations on AgentBench DB dev.

    .venv/bin/python bench/cmat_ablation.py --out artifacts/bench/cmat           # every variant below
    .venv/bin/python bench/cmat_ablation.py --only sft_only cmat_s0 --set cmat.iterations=1

Each variant runs the real `cmat` stage (its own out_dir, starting from the same SFT adapter) and then
the `evaluate` stage on params.yaml's evaluate.tasks (the dev split) with that actor; `sft_only`
evaluates the SFT adapter itself, `cmat_s0+memory` evaluates cmat_s0's actor with its long-term memory
recalled into the prompts. A variant whose metrics exist is not rerun (an interrupted benchmark
continues). Writes results.json and prints the markdown table for docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ABLATIONS = {
    "no_veto": ["cmat.veto=false"],
    "no_value_function": ["cmat.value_function=false"],
    "no_memory": ["cmat.memory=false"],
    "no_reflection_loss": ["cmat.reflection_loss_weight=0"],
    "no_kl": ["cmat.kl_coef=0"],
}
SEEDS = (0, 1, 2)


def variants() -> dict[str, dict]:
    table: dict[str, dict] = {"sft_only": {"tune": None}}
    for seed in SEEDS:
        table[f"cmat_s{seed}"] = {"tune": [f"cmat.seed={seed}"]}
    table["cmat_s0+memory"] = {"tune": None, "actor_of": "cmat_s0", "memory": True}
    for name, overrides in ABLATIONS.items():
        table[name] = {"tune": overrides}
    return table


def stage(module: str, overrides: list[str], log: Path) -> float:
    cmd = [sys.executable, "-m", module, "--no-progress", *[a for o in overrides for a in ("--set", o)]]
    start = time.perf_counter()
    with log.open("a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"{module} failed (exit {rc}); see {log}")
    return time.perf_counter() - start


def run_variant(name: str, spec: dict, out: Path, common: list[str]) -> dict:
    folder = out / name.replace("+", "_")
    metrics_file = folder / "eval" / "metrics.json"
    if metrics_file.is_file():
        return json.loads((folder / "summary.json").read_text())
    folder.mkdir(parents=True, exist_ok=True)
    log, tune_seconds = folder / "log.txt", 0.0
    actor = "artifacts/sft"
    if spec["tune"] is not None:
        actor = str(folder / "cmat")
        tune_seconds = stage("cmat_pipeline.tune", [*common, *spec["tune"], f"cmat.out_dir={actor}"], log)
    if spec.get("actor_of"):
        actor = str(out / spec["actor_of"] / "cmat")
    evaluation = [*common, f"evaluate.adapter={actor}", f"evaluate.out_dir={folder / 'eval'}"]
    if spec.get("memory"):
        evaluation.append(f"evaluate.memory={actor}/memory.sqlite")
    eval_seconds = stage("cmat_pipeline.evaluate", evaluation, log)
    metrics = json.loads(metrics_file.read_text())
    tuned = json.loads((Path(actor) / "metrics.json").read_text()) if spec["tune"] is not None else {}
    summary = {"variant": name, "overall_cat_accuracy": metrics["overall_cat_accuracy"],
               "SELECT": metrics["SELECT_accuracy"], "INSERT": metrics["INSERT_accuracy"],
               "UPDATE": metrics["UPDATE_accuracy"], "first_turn_valid_format": metrics["first_turn_valid_format"],
               "completed": metrics["outcomes"]["completed"], "tune_seconds": round(tune_seconds, 1),
               "eval_seconds": round(eval_seconds, 1),
               "train_success_first": tuned.get("success_rate_first"), "train_success_last": tuned.get("success_rate_last")}
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def table(rows: list[dict]) -> str:
    lines = ["| variant | overall_cat_accuracy | SELECT | INSERT | UPDATE | first-turn valid | completed | "
             "train success first → last iteration | cmat wall | eval wall |", "|---" * 10 + "|"]
    for r in rows:
        train = (f"{r['train_success_first']} → {r['train_success_last']}" if r["train_success_first"] is not None
                 else "—")
        lines.append(f"| {r['variant']} | {r['overall_cat_accuracy']} | {r['SELECT']} | {r['INSERT']} | {r['UPDATE']} | "
                     f"{r['first_turn_valid_format']} % | {r['completed']} | {train} | {r['tune_seconds']} s | "
                     f"{r['eval_seconds']} s |")
    seeds = [r["overall_cat_accuracy"] for r in rows if r["variant"] in {f"cmat_s{s}" for s in SEEDS}]
    if len(seeds) > 1:
        lines.append(f"\nfull CMAT over {len(seeds)} seeds: mean {statistics.mean(seeds):.2f}, "
                     f"sd {statistics.stdev(seeds):.2f}, min {min(seeds)}, max {max(seeds)}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="artifacts/bench/cmat")
    parser.add_argument("--only", nargs="*", help="variants to run (default: all)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="applied to every stage run")
    args = parser.parse_args()
    out = Path(args.out)
    chosen = {k: v for k, v in variants().items() if not args.only or k in args.only}
    for name, spec in chosen.items():
        print(json.dumps(run_variant(name, spec, out, args.set)), flush=True)
    # Every finished variant in the folder (several instances may run different --only lists side by side).
    order = list(variants())
    rows = sorted((json.loads(p.read_text()) for p in out.glob("*/summary.json")), key=lambda r: order.index(r["variant"]))
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
