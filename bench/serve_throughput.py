"""Benchmark: `cmat serve` throughput, N concurrent requests (batched by the server) vs the same N one at a time.

    flock /tmp/cmat-cpu.lock .venv/bin/python bench/serve_throughput.py --requests 8 --max-tokens 64
The server runs in this process on loopback (model.dir + --adapter, params.yaml's generation section); the
requests are AgentBench DB dev first turns (AgentBench's prompt + a question, ~500 tokens), greedy, sent with
the `openai` client. Rows: sequential (one request in flight), concurrent (all in flight, the server batches
them), and a direct `HFPolicy.generate` of the same batch without HTTP (the server's overhead). Prints a
Markdown table and writes artifacts/bench/serve/results.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import threading
import time
from pathlib import Path

import httpx
import openai

from cmat_pipeline.config import load_params
from cmat_pipeline.envs.dbbench import load_tasks
from cmat_pipeline.runtime.policy import HFPolicy
from cmat_pipeline.serve import create_app, running_server

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "artifacts" / "bench" / "serve"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--adapter", default="", help="PEFT adapter on top of model.dir ('' = base)")
    parser.add_argument("--window-ms", type=float, default=None, help="serve.batch_window_ms (default: params.yaml's)")
    args = parser.parse_args()

    params = load_params(ROOT / "params.yaml")
    gen = dataclasses.replace(params.generation, max_new_tokens=args.max_tokens, batch_size=args.requests)
    policy = HFPolicy(params.model.dir, gen, adapter=args.adapter, device=params.model.device, dtype=params.model.dtype)
    conversations = [t.initial_messages() for t in load_tasks(params.evaluate.tasks, args.requests)]
    window = params.serve.batch_window_ms if args.window_ms is None else args.window_ms
    cfg = dataclasses.replace(params.serve, adapter=args.adapter, max_batch_size=args.requests, batch_window_ms=window)
    rows = []
    with running_server(create_app(policy, cfg)) as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)

        def ask(messages):
            return client.chat.completions.create(model=cfg.model_name, messages=messages, max_tokens=args.max_tokens)

        ask(conversations[0])  # warm-up
        for mode in ("sequential", "concurrent"):
            before = httpx.get(url.removesuffix("/v1") + "/stats").json()
            start, replies = time.perf_counter(), [None] * len(conversations)
            if mode == "sequential":
                replies = [ask(c) for c in conversations]
            else:
                barrier = threading.Barrier(len(conversations))

                def run(k):
                    barrier.wait()  # all requests leave together, as from a client with N workers
                    replies[k] = ask(conversations[k])
                threads = [threading.Thread(target=run, args=(k,)) for k in range(len(conversations))]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
            wall = time.perf_counter() - start
            after = httpx.get(url.removesuffix("/v1") + "/stats").json()
            tokens = sum(r.usage.completion_tokens for r in replies)
            sizes = {k: v - before["batch_sizes"].get(k, 0) for k, v in after["batch_sizes"].items()}
            rows.append({"mode": mode, "requests": len(replies), "wall_s": round(wall, 2), "completion_tokens": tokens,
                         "tokens_per_s": round(tokens / wall, 1),
                         "batch_sizes": {k: v for k, v in sizes.items() if v}})
    start = time.perf_counter()
    outs = policy.generate(conversations)
    wall = time.perf_counter() - start
    tokens = sum(o.completion_tokens for o in outs)
    rows.append({"mode": "direct generate (no HTTP)", "requests": len(outs), "wall_s": round(wall, 2),
                 "completion_tokens": tokens, "tokens_per_s": round(tokens / wall, 1),
                 "batch_sizes": {str(len(outs)): 1}})
    OUT.mkdir(parents=True, exist_ok=True)
    result = {"model": policy.name, "max_tokens": args.max_tokens, "batch_window_ms": window, "rows": rows}
    (OUT / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"model {policy.name}, max_tokens {args.max_tokens}, batch window {window} ms, greedy, DB dev first turns\n")
    print("| mode | requests | wall (s) | completion tokens | tokens/s | generate calls by batch size |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        sizes = ", ".join(f"{v}x{k}" for k, v in r["batch_sizes"].items())
        print(f"| {r['mode']} | {r['requests']} | {r['wall_s']} | {r['completion_tokens']} | {r['tokens_per_s']} | {sizes} |")


if __name__ == "__main__":
    main()
