"""Benchmark: `HFPolicy.generate` with generation.prefix_cache off vs on, over AgentBench DB conversations.

    flock /tmp/cmat-cpu.lock .venv/bin/python bench/prefix_cache.py --conversations 8 --max-tokens 64 --turns 2
    .venv/bin/python bench/prefix_cache.py --model-dir /tmp/tiny/model --max-tokens 8   # smoke run on a tiny model:
    .venv/bin/python -m cmat_pipeline.prepare_model --set model.base=tiny-random --set model.dir=/tmp/tiny/model
The model is model.dir (or --model-dir) + --adapter on params.yaml's model.device/dtype; the conversations are
the first evaluate.tasks tasks opened by evaluate.prompt (AgentBench's DB prompt, ~400 shared tokens), greedy.
Turn 1 is the tasks' first turn; each later turn appends the off run's reply and an observation. Per turn:
seconds per call off (median of --repeats), on for the first call (turn 1: the prefix is computed; later turns:
reused from the turn before) and on (median), and whether on and off wrote the same tokens. Prints JSON and
writes it to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from cmat_pipeline.config import load_params
from cmat_pipeline.envs.dbbench import load_tasks
from cmat_pipeline.runtime.policy import HFPolicy, common_prefix_length

ROOT = Path(__file__).resolve().parents[1]
OBSERVATION = "[('1',)]"  # what a turn's SQL returns, as the DB environment reports it


def timed(policy: HFPolicy, conversations, gen):
    start = time.perf_counter()
    outputs = policy.generate(conversations, gen)
    return time.perf_counter() - start, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--model-dir", default="", help="model folder (default: params' model.dir)")
    parser.add_argument("--adapter", default="", help="PEFT adapter on top of the model ('' = base)")
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--turns", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "artifacts" / "bench" / "prefix_cache" / "results.json"))
    args = parser.parse_args()

    params = load_params(args.params)
    off = dataclasses.replace(params.generation, max_new_tokens=args.max_tokens, batch_size=args.conversations,
                              prefix_cache=False)
    on = dataclasses.replace(off, prefix_cache=True)
    model_dir = args.model_dir or params.model.dir
    policy = HFPolicy(model_dir, off, adapter=args.adapter, device=params.model.device, dtype=params.model.dtype)
    tasks = load_tasks(params.evaluate.tasks, args.conversations, prompt=params.evaluate.prompt)
    conversations = [t.initial_messages() for t in tasks]
    timed(policy, conversations[:1], off)  # warm-up (allocator, lazy imports)
    rows = []
    for turn in range(1, args.turns + 1):
        encoded = [policy.encode(c) for c in conversations]
        off_runs = [timed(policy, conversations, off) for _ in range(args.repeats)]
        on_runs = [timed(policy, conversations, on) for _ in range(args.repeats)]
        reference = [o.text for o in off_runs[0][1]]
        rows.append({
            "turn": turn, "prompt_tokens": f"{min(map(len, encoded))}-{max(map(len, encoded))}",
            "shared_tokens": common_prefix_length(encoded),
            "off_s": round(statistics.median(s for s, _ in off_runs), 3),
            "on_first_s": round(on_runs[0][0], 3), "on_s": round(statistics.median(s for s, _ in on_runs), 3),
            "same_outputs": all([o.text for o in outs] == reference for _, outs in on_runs),
        })
        rows[-1]["speedup"] = round(rows[-1]["off_s"] / rows[-1]["on_s"], 2)
        conversations = [c + [{"role": "assistant", "content": text or ""}, {"role": "user", "content": OBSERVATION}]
                         for c, text in zip(conversations, reference)]
    report = {"date": time.strftime("%Y-%m-%d"), "model": policy.name, "device": policy.device,
              "dtype": params.model.dtype, "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
              "conversations": len(conversations), "max_new_tokens": args.max_tokens,
              "prefix_cache": {"hits": policy.prefix_cache.hits, "misses": policy.prefix_cache.misses}, "turns": rows}
    text = json.dumps(report, indent=2)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
