"""Benchmark: CMAT rollout throughput, batched episodes vs one episode at a time, with the prefix cache off and
on, side by side in one run.

    .venv/bin/python bench/cmat_rollouts.py --episodes 16 --batch-sizes 1 16 --prefix-cache off on

Every run plays the same training tasks with the same actor (the cmat stage's setup: SFT adapter, Checker
in the loop) and greedy decoding, so they do the same work; they differ in how many episodes share one
`generate` call and in whether kept prompts' KV is reused (`generation.prefix_cache`, cold at each run's
start). Prints one JSON line per run and the speed-ups over one episode at a time without the cache.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shutil
import tempfile


def main() -> None:
    from cmat_pipeline.config import load_params
    from cmat_pipeline.runtime.policy import PrefixCache
    from cmat_pipeline.tune import CMATRecipe

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--episodes", type=int, default=16)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prefix-cache", nargs="+", choices=["off", "on"], default=["off", "on"])
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
        runs = []
        for cache in args.prefix_cache:
            for size in args.batch_sizes:
                policy = recipe.policy
                policy.gen = dataclasses.replace(policy.gen, prefix_cache=cache == "on")
                policy.prefix_cache = PrefixCache()  # cold at each run's start, counters at 0
                results, stats = recipe.rollout(0, concurrency=size, tasks=tasks)
                runs.append(stats | {"prefix_cache": cache, "batch_size": size, "episodes": len(results),
                                     "turns": sum(len(r["turns"]) for r in results),
                                     "correct": sum(r["correct"] for r in results),
                                     "cache_hits": policy.prefix_cache.hits, "cache_misses": policy.prefix_cache.misses,
                                     "replies": [m["content"] for r in results for m in r["messages"] if m["role"] == "assistant"]})
                print(json.dumps({k: v for k, v in runs[-1].items() if k != "replies"}), flush=True)
        base = runs[0]
        print(json.dumps({"speedup_over_first": {f"{r['prefix_cache']}/{r['batch_size']}": round(
            r["episodes_per_minute"] / base["episodes_per_minute"], 2) for r in runs},
            "same_replies": all(r["replies"] == base["replies"] for r in runs)}))
    finally:
        recipe.cleanup(success=False)
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
