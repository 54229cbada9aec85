"""`evaluate-os` stage: score a policy on AgentBench OS (os_interaction) tasks, each in a fresh sandbox.

Run it:
    cmat evaluate-os                                  # model.dir (+ os.adapter) on os.tasks, bubblewrap sandboxes
    cmat evaluate-os --set os.policy=oracle           # the example solutions: checks the environment end to end
    cmat evaluate-os --set os.driver=docker           # AgentBench's ubuntu images (infra/os_images/)
Writes to `os.out_dir`: metrics.json (accuracy over supported tasks, over all tasks, by checker, outcomes,
the unsupported count and reasons), trajectories.jsonl (one row per task), report.md, resolved_params.yaml.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

from cmat_pipeline.config import OSConfig, Params
from cmat_pipeline.envs.os_interaction import (ExampleOraclePolicy, OSEpisode, OSTask, compute_os_metrics,
                                               load_os_tasks, unsupported_result)
from cmat_pipeline.envs.sandbox import make_sandbox
from cmat_pipeline.runtime.evaluation import section_policy, write_eval_outputs
from cmat_pipeline.runtime.policy import Policy, Timed
from cmat_pipeline.runtime.rollout import run_episodes


def build_os_policy(params: Params, tasks: Sequence[OSTask]) -> Policy:
    """The policy `os.policy` names."""
    return section_policy(params, "os", oracle=lambda: ExampleOraclePolicy(tasks))


def start_episode(task: OSTask, cfg: OSConfig, policy: Any = None, episode_cls: type = OSEpisode,
                  **extra: Any) -> OSEpisode:
    """A started sandbox and the episode in it (the sandbox is closed again if set-up fails)."""
    sandbox = make_sandbox(cfg, task.image).start()
    try:
        episode = episode_cls(task, sandbox, cfg, **extra)
    except BaseException:
        sandbox.close()
        raise
    if hasattr(policy, "register"):  # the oracle tells apart tasks whose descriptions repeat
        policy.register(episode.messages, task)
    return episode


def play_os(tasks: Sequence[OSTask], policy: Policy, cfg: OSConfig, concurrency: int,
            progress: bool = True) -> list[dict[str, Any]]:
    """Play every supported task (unsupported ones get their row without an episode), in task order."""
    from tqdm import tqdm

    supported = [t for t in tasks if not t.unsupported]
    oracle = getattr(policy, "policy", policy)  # through Timed
    bar = tqdm(total=len(supported), desc="os", unit="task", disable=not progress)
    try:
        played = run_episodes((lambda t=t: start_episode(t, cfg, oracle) for t in supported), policy, concurrency,
                              close=lambda episode: episode.sandbox.close(), on_result=lambda _: bar.update())
    finally:
        bar.close()
    rows = {r["index"]: r for r in played} | {t.index: unsupported_result(t) for t in tasks if t.unsupported}
    return [rows[t.index] for t in tasks]


def evaluate_os(params: Params, policy: Policy | None = None, progress: bool = True) -> dict[str, Any]:
    """Evaluate and write every output; returns the metrics."""
    cfg = params.os
    tasks = load_os_tasks(cfg.tasks, cfg.scripts_dir, cfg.limit)
    timed = Timed(policy or build_os_policy(params, tasks))
    start = time.perf_counter()
    results = play_os(tasks, timed, cfg, params.generation.batch_size, progress)
    wall = time.perf_counter() - start
    metrics = compute_os_metrics(results)
    metrics.update(policy=timed.name, driver=cfg.driver, task_file=str(cfg.tasks), wall_seconds=round(wall, 2),
                   **timed.stats())
    write_eval_outputs(Path(cfg.out_dir), params, metrics, results, render_os_report(metrics, results))
    return metrics


def render_os_report(metrics: dict[str, Any], results: list[dict[str, Any]]) -> str:
    lines = [
        "# AgentBench OS evaluation", "",
        f"Policy `{metrics['policy']}`, driver `{metrics['driver']}`, tasks `{metrics['task_file']}`: "
        f"{metrics['tasks']} tasks, {metrics['supported']} supported, {metrics['unsupported']} unsupported "
        f"({metrics['wall_seconds']} s).", "",
        f"**accuracy: {metrics['accuracy']}** on the supported tasks ({metrics['accuracy_all_tasks']} over all tasks)", "",
        "| outcome | episodes |", "|---|---|", *[f"| {k} | {v} |" for k, v in metrics["outcomes"].items()], "",
        "| task | checker | outcome | correct | answer / reason |", "|---|---|---|---|---|",
    ]
    for row in results:
        detail = row.get("unsupported") or json.dumps(row["answer"], ensure_ascii=False)
        lines.append(f"| {row['index']} | {row['checker']} | {row['outcome']} | {row['correct']} | "
                     f"{detail.replace('|', '/')[:80]} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from cmat_pipeline.cli import stage_args

    params, args = stage_args(__doc__.splitlines()[0], argv)
    metrics = evaluate_os(params, progress=not args.no_progress)
    print(json.dumps({k: metrics[k] for k in ("accuracy", "accuracy_all_tasks", "supported", "unsupported",
                                              "outcomes")}))
    return metrics


if __name__ == "__main__":
    import sys

    from cmat_pipeline.cli import main as cli_main

    sys.exit(cli_main(["evaluate-os", *sys.argv[1:]]))
