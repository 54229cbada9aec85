"""`evaluate-kg` stage: score a policy on AgentBench knowledge-graph (KG) questions with AgentBench's KG metric.

Run it:
    cmat evaluate-kg                                  # model.dir (+ kg.adapter) on the 7 generated questions, embedded graph
    cmat evaluate-kg --set kg.policy=oracle           # each question's gold actions: checks the environment end to end
    cmat evaluate-kg --set kg.endpoint=http://host:3001/sparql --set kg.tasks=path/to/AgentBench/kg/dev.json
The embedded pyoxigraph store with the generated graph and its questions are the default (kg.endpoint '' and
kg.tasks ''); a SPARQL endpoint (AgentBench's Virtuoso with Freebase) and an AgentBench KG task file replace them.
Metrics as AgentBench's KG task reports them, x100: F1 (its main metric) and EM over all questions (a question
without an answer scores 0), executability (share of questions answered with a non-empty variable).
Writes to `kg.out_dir`: metrics.json, trajectories.jsonl (one row per question), report.md, resolved_params.yaml.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from cmat_pipeline.config import KGConfig, Params
from cmat_pipeline.envs.kg import (KGOraclePolicy, KGTask, compute_kg_metrics, generated_tasks, load_kg_tasks,
                                   make_client, play_kg)
from cmat_pipeline.runtime.evaluation import section_policy, write_eval_outputs
from cmat_pipeline.runtime.policy import Policy, Timed

GENERATED = "generated questions (embedded graph)"


def task_source(cfg: KGConfig) -> str:
    """The task file, or what stands for the generated questions."""
    return cfg.tasks or GENERATED


def kg_tasks(cfg: KGConfig) -> list[KGTask]:
    """`kg.tasks`' questions, or the generated ones; the first `kg.limit` of them when set."""
    if cfg.tasks:
        return load_kg_tasks(cfg.tasks, cfg.limit)
    tasks = generated_tasks()
    return tasks[:cfg.limit] if cfg.limit else tasks


def build_kg_policy(params: Params, tasks: list[KGTask]) -> Policy:
    """The policy `kg.policy` names (the oracle needs every question's `actions`)."""
    cfg = params.kg
    return section_policy(params, "kg", oracle=lambda: KGOraclePolicy(tasks, task_source(cfg)))


def evaluate_kg(params: Params, policy: Policy | None = None, progress: bool = True) -> dict[str, Any]:
    """Evaluate and write every output; returns the metrics."""
    from tqdm import tqdm

    cfg = params.kg
    tasks = kg_tasks(cfg)
    timed = Timed(policy or build_kg_policy(params, tasks))
    start = time.perf_counter()
    with tqdm(total=len(tasks), desc="kg", unit="question", disable=not progress) as bar:
        results = play_kg(tasks, timed, make_client(cfg), cfg.namespace, cfg.max_rounds,
                          params.generation.batch_size, on_result=lambda _: bar.update())
    wall = time.perf_counter() - start
    metrics = compute_kg_metrics(results)
    metrics.update(policy=timed.name, endpoint=cfg.endpoint or "embedded", task_file=task_source(cfg),
                   wall_seconds=round(wall, 2), **timed.stats())
    write_eval_outputs(Path(cfg.out_dir), params, metrics, results, render_kg_report(metrics, results))
    return metrics


def _cell(values: list[str]) -> str:
    text = ", ".join(values).replace("|", "/")
    return text if len(text) <= 60 else text[:57] + "..."


def render_kg_report(metrics: dict[str, Any], results: list[dict[str, Any]]) -> str:
    lines = [
        "# AgentBench KG evaluation", "",
        f"Policy `{metrics['policy']}`, endpoint `{metrics['endpoint']}`, tasks `{metrics['task_file']}`: "
        f"{metrics['tasks']} questions ({metrics['wall_seconds']} s).", "",
        f"**F1: {metrics['f1']}** (AgentBench's main KG metric), EM {metrics['em']}, "
        f"executability {metrics['executability']} (x100, over all questions)", "",
        "| outcome | episodes |", "|---|---|", *[f"| {k} | {v} |" for k, v in metrics["outcomes"].items()], "",
        "| question | outcome | rounds | F1 | EM | prediction | expected |", "|---|---|---|---|---|---|---|",
    ]
    for row in results:
        lines.append(f"| {row['index']} | {row['outcome']} | {row['rounds']} | {round(row['f1'], 3)} | {row['em']} | "
                     f"{_cell(row['prediction'])} | {_cell(row['expected'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from cmat_pipeline.cli import stage_args

    params, args = stage_args(__doc__.splitlines()[0], argv)
    metrics = evaluate_kg(params, progress=not args.no_progress)
    print(json.dumps({k: metrics[k] for k in ("f1", "em", "executability", "tasks", "outcomes")}))
    return metrics


if __name__ == "__main__":
    import sys

    from cmat_pipeline.cli import main as cli_main

    sys.exit(cli_main(["evaluate-kg", *sys.argv[1:]]))
