"""`evaluate` stage: score a policy on AgentBench DB (dbbench) tasks.

Run it:
    python -m cmat_pipeline.evaluate                          # reads params.yaml
    cmat evaluate --set evaluate.policy=oracle --set db.backend=mysql
Writes to `evaluate.out_dir`: metrics.json (DVC metrics), trajectories.jsonl (one episode per line),
report.md + report.png (accuracy by type, outcome distribution) and resolved_params.yaml.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

from cmat_pipeline.config import Params
from cmat_pipeline.envs.dbbench import DBEpisode, DBTask, compute_metrics, load_tasks
from cmat_pipeline.envs.sql_backends import SQLBackend, make_backend
from cmat_pipeline.runtime.evaluation import section_policy, write_eval_outputs
from cmat_pipeline.runtime.policy import Policy, Timed
from cmat_pipeline.runtime.rollout import run_episodes


def build_policy(params: Params, tasks: Sequence[DBTask]) -> Policy:
    """The policy `evaluate.policy` names."""
    def oracle() -> Policy:
        from cmat_pipeline.envs.dbbench_oracle import GoldSQLPolicy

        return GoldSQLPolicy(tasks)

    def smoa() -> Policy:
        from cmat_pipeline.runtime.smoa import build_smoa_policy

        return build_smoa_policy(params, tasks)

    return section_policy(params, "evaluate", oracle=oracle, smoa=smoa)


def play(tasks: Sequence[DBTask], policy: Policy, backend: SQLBackend, max_rounds: int, concurrency: int,
         progress: bool = True, memory: Any = None, memory_k: int = 2) -> list[dict[str, Any]]:
    """Play every task to its end, `concurrency` episodes per generate call; with a ReflectionMemory, each
    question is led by the lessons recalled for it."""
    from tqdm import tqdm

    from cmat_pipeline.cmat.memory import prompt_with_lessons

    bar = tqdm(total=len(tasks), desc="dbbench", unit="task", disable=not progress)

    def starter(task: DBTask):
        return lambda: DBEpisode(task, backend.open(task.table), max_rounds,
                                 messages=prompt_with_lessons(task, memory, memory_k))

    try:
        return run_episodes(
            (starter(t) for t in tasks), policy, concurrency,
            close=lambda episode: episode.db.close(), on_result=lambda _: bar.update(),
        )
    finally:
        bar.close()


def open_memory(path: str) -> Any:
    """The long-term memory evaluate.memory names (None when unset); a missing file is an error, not no memory."""
    if not path:
        return None
    from cmat_pipeline.cmat.memory import ReflectionMemory
    from cmat_pipeline.errors import ConfigError

    if not Path(path).is_file():
        raise ConfigError(f"evaluate.memory: {path} does not exist; point it at the cmat stage's memory.sqlite "
                          "(e.g. artifacts/cmat/memory.sqlite) or set it to '' for no memory")
    return ReflectionMemory(path)


def evaluate(params: Params, policy: Policy | None = None, progress: bool = True) -> dict[str, Any]:
    """Evaluate and write every output; returns the metrics."""
    cfg = params.evaluate
    tasks = load_tasks(cfg.tasks, cfg.limit, prompt=cfg.prompt)
    timed = Timed(policy or build_policy(params, tasks))
    backend = make_backend(params.db)
    memory = open_memory(cfg.memory)
    start = time.perf_counter()
    try:
        results = play(tasks, timed, backend, params.db.max_rounds, params.generation.batch_size, progress,
                       memory, cfg.memory_k)
    finally:
        backend.close()
        if memory is not None:
            memory.close()
    wall = time.perf_counter() - start
    metrics = compute_metrics(results)
    metrics.update(policy=timed.name, backend=params.db.backend, task_file=str(cfg.tasks), memory=cfg.memory or None,
                   wall_seconds=round(wall, 2), tasks_per_minute=round(60 * len(tasks) / wall, 2), **timed.stats())
    write_outputs(Path(cfg.out_dir), params, metrics, results)
    return metrics


def write_outputs(out: Path, params: Params, metrics: dict[str, Any], results: list[dict[str, Any]]) -> None:
    write_eval_outputs(out, params, metrics, results, render_report(metrics, results))
    plot_report(metrics, out / "report.png")


def render_report(metrics: dict[str, Any], results: list[dict[str, Any]]) -> str:
    acc_rows = [(k.removesuffix("_accuracy"), v) for k, v in metrics.items() if k.endswith("_accuracy")]
    lines = [
        "# AgentBench DB evaluation", "",
        f"Policy `{metrics['policy']}`, backend `{metrics['backend']}`, tasks `{metrics['task_file']}` "
        f"({metrics['tasks']} tasks, {metrics['wall_seconds']} s, {metrics['tasks_per_minute']} tasks/min).", "",
        f"**overall_cat_accuracy: {metrics['overall_cat_accuracy']}** (mean of SELECT, INSERT, UPDATE; x100)", "",
        "![accuracy and outcomes](report.png)", "",
        "| type | accuracy |", "|---|---|", *[f"| {name} | {value} |" for name, value in acc_rows], "",
        "| outcome | episodes |", "|---|---|", *[f"| {k} | {v} |" for k, v in metrics["outcomes"].items()], "",
        "## Failed tasks", "", "| index | type | outcome | answer | expected |", "|---|---|---|---|---|",
    ]
    for row in results:
        if not row["correct"]:
            lines.append(f"| {row['index']} | {row['type']} | {row['outcome']} | "
                         f"{_cell(row['answer'])} | {_cell(row['expected'])} |")
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= 80 else text[:77] + "..."


def plot_report(metrics: dict[str, Any], target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    accuracy = {k.removesuffix("_accuracy"): v for k, v in metrics.items() if k.endswith("_accuracy")}
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    left.barh(list(accuracy), list(accuracy.values()), color="tab:blue")
    left.set_xlim(0, 100)
    left.set_xlabel("accuracy (%)")
    left.set_title(f"accuracy by type (overall_cat {metrics['overall_cat_accuracy']})")
    outcomes = metrics["outcomes"]
    right.bar(range(len(outcomes)), list(outcomes.values()), color="tab:orange")
    right.set_xticks(range(len(outcomes)), [o.replace("_", "\n") for o in outcomes], fontsize=8)
    right.set_ylabel("episodes")
    right.set_title("outcomes")
    fig.tight_layout()
    fig.savefig(target, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from cmat_pipeline.cli import stage_args

    params, args = stage_args(__doc__.splitlines()[0], argv)
    metrics = evaluate(params, progress=not args.no_progress)
    summary = {k: metrics[k] for k in ("overall_cat_accuracy", "SELECT_accuracy", "INSERT_accuracy",
                                       "UPDATE_accuracy", "tasks_per_minute")}
    print(json.dumps(summary | {"outcomes": metrics["outcomes"]}))
    return metrics


if __name__ == "__main__":
    import sys

    from cmat_pipeline.cli import main as cli_main

    sys.exit(cli_main(["evaluate", *sys.argv[1:]]))
