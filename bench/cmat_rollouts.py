"""Benchmark: CMAT rollout throughput, batched episodes vs one episode at a time, side by side in one run.

    .venv/bin/python bench/cmat_rollouts.py --episodes 16 --batch-sizes 1 16

Both runs play the same training tasks with the same actor (the cmat stage's setup: SFT adapter, Checker
in the loop) and greedy decoding, so they do the same work; the only difference is how many episodes
share one `generate` call. Prints one JSON line per batch size and the speed-up.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile


def main() -> None:
    from cmat_pipeline.config import load_params
    from cmat_pipeline.tune import CMATRecipe

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--episodes", type=int, default=16)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    out = tempfile.mkdtemp(prefix="cmat-rollout-bench-")
    widest = max(args.batch_sizes)
    params = load_params(args.params, [*args.set, "cmat.temperature=0", "cmat.memory=false", f"cmat.out_dir={out}",
                                       f"generation.batch_size={widest}"])
    recipe = CMATRecipe(params, progress=False)
    recipe.setup()
    try:
        tasks = recipe.user.sample(args.episodes, random.Random(0))
        runs = {}
        for size in args.batch_sizes:
            results, stats = recipe.rollout(0, concurrency=size, tasks=tasks)
            runs[size] = stats | {"batch_size": size, "episodes": len(results),
                                  "turns": sum(len(r["turns"]) for r in results),
                                  "correct": sum(r["correct"] for r in results)}
            print(json.dumps(runs[size]), flush=True)
        slow, fast = runs[min(args.batch_sizes)], runs[widest]
        print(json.dumps({"speedup": round(fast["episodes_per_minute"] / slow["episodes_per_minute"], 2),
                          "same_turns": slow["turns"] == fast["turns"]}))
    finally:
        recipe.cleanup(success=False)
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
