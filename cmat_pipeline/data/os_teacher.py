"""OS tasks for data collection: pooled os_interaction entries played by a teacher, as trajectory records.

`collect` calls this for the pool's `os` entries (AgentBench os_interaction files in `collect.import_tasks`):
the `oracle` teacher is the example-solution oracle (`ExampleOraclePolicy`), any other teacher plays them
as it plays DB tasks. Each task runs in its own sandbox (`os` params: driver, limits); unsupported tasks
(a script file that is not shipped) are skipped and counted by the caller.

    records = play_os_tasks(entries, ExampleOraclePolicy(tasks), params.os, concurrency=8, source="agentbench")
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from cmat_pipeline.config import OSConfig
from cmat_pipeline.data.records import make_record
from cmat_pipeline.envs.os_interaction import ExampleOraclePolicy, OSTask, task_from_entry
from cmat_pipeline.runtime.policy import Policy

QUESTION_TURN = 6  # the task's own question, after AgentBench's prompt and the one-shot example


def os_tasks(entries: Sequence[dict[str, Any]], cfg: OSConfig, where: str = "pool") -> list[OSTask]:
    """OSTasks for pool entries (the index is the entry's position)."""
    return [task_from_entry(entry, i, f"{where}:item {i}", cfg.scripts_dir) for i, entry in enumerate(entries)]


def os_record(entry: dict[str, Any], result: dict[str, Any], teacher: str, source: str) -> dict[str, Any]:
    """A trajectory record from one played os_interaction entry."""
    return make_record(
        domain="os", source=entry.get("source") or source, teacher=teacher, task_type=result["checker"], task=entry,
        question=result["messages"][QUESTION_TURN]["content"], messages=result["messages"],
        outcome=result["outcome"], correct=result["correct"], reward=1.0 if result["correct"] else 0.0,
        meta={"task_id": entry.get("id"), "rounds": result["rounds"],
              "turn_actions": [t["action"] for t in result["turns"]], "init_failed": result["init_failed"]},
    )


def os_teacher(teacher: Policy, tasks: Sequence[OSTask], oracle: bool) -> Policy:
    """The example-solution oracle when collect.teacher is `oracle` (the DB oracle cannot play OS tasks)."""
    return ExampleOraclePolicy(tasks) if oracle else teacher


def play_os_tasks(entries: Sequence[dict[str, Any]], policy: Policy, cfg: OSConfig, *, concurrency: int, source: str,
                  on_record: Callable[[dict[str, Any]], None] = lambda r: None, where: str = "pool",
                  tasks: Sequence[OSTask] | None = None) -> list[dict[str, Any]]:
    """Play every supported entry; each finished episode becomes a record passed to `on_record`."""
    from cmat_pipeline.evaluate_os import start_episode
    from cmat_pipeline.runtime.rollout import run_episodes

    tasks = list(tasks) if tasks is not None else os_tasks(entries, cfg, where)
    records: list[dict[str, Any]] = []

    def finish(result: dict[str, Any]) -> None:
        records.append(os_record(entries[result["index"]], result, policy.name, source))
        on_record(records[-1])

    run_episodes((lambda t=t: start_episode(t, cfg, policy) for t in tasks if not t.unsupported), policy,
                 concurrency, close=lambda episode: episode.sandbox.close(), on_result=finish)
    return records
