"""`collect` stage: build this shard's task pool and play it with a teacher, recording trajectories.

Run it:
    python -m cmat_pipeline.collect                                  # reads params.yaml
    cmat collect --set collect.shard=2026-11-16 --set collect.db_tasks=10000
    cmat collect --set collect.teacher=openai --set openai.model=my-vllm-model
The pool is synthetic dbbench tasks (`collect.db_tasks`, deterministic in seed and shard) plus any
AgentBench task files in `collect.import_tasks` (OS tasks are played with `collect.play_os`) plus
`collect.kg_tasks` knowledge-graph questions over the embedded graph (never those `evaluate-kg` asks);
conversation files in `collect.import_conversations` become trajectories directly. Under `collect.out_dir`,
per shard:
    tasks/<shard>.jsonl          the pool (every task, all domains)
    trajectories/<shard>.jsonl   one record per played task or imported conversation (records.py)
    quarantine/<shard>.jsonl     imported items that could not be read, with the reason
    reports/<shard>.json         counts, success by type, teacher, wall time
Interrupted? Run it again: finished episodes are kept and only the rest is played (same pool and teacher).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

from cmat_pipeline.config import Params, save_resolved
from cmat_pipeline.data.records import iter_jsonl, repair_tail, write_jsonl
from cmat_pipeline.runtime.policy import Policy

GENERATED_SOURCE = "synth"
KG_SOURCE = "synth-kg"


def shard_paths(out_dir: str | Path, shard: str) -> dict[str, Path]:
    root = Path(out_dir)
    return {"tasks": root / "tasks" / f"{shard}.jsonl", "trajectories": root / "trajectories" / f"{shard}.jsonl",
            "manifest": root / "trajectories" / f"{shard}.manifest.json",
            "quarantine": root / "quarantine" / f"{shard}.jsonl", "reports": root / "reports" / f"{shard}.json"}


def pool_entry(entry: dict[str, Any], domain: str = "db") -> dict[str, Any]:
    """A generated dbbench entry in the task-pool shape the importers also produce."""
    return {"id": entry["id"], "domain": domain, "source": entry["source"], "task_type": entry["type"][0],
            "question": entry["description"] + "\n" + entry["add_description"], "task": entry}


def build_pool(params: Params) -> list[dict[str, Any]]:
    """Generated tasks for this shard, then every imported AgentBench task file."""
    from cmat_pipeline.data.dbgen import generate_db_tasks
    from cmat_pipeline.data.importers import import_agentbench_tasks

    cfg = params.collect
    generated = generate_db_tasks(cfg.db_tasks, cfg.seed, cfg.shard, domains=cfg.domains) if cfg.db_tasks else []
    pool = [pool_entry(e) for e in generated]
    for path in cfg.import_tasks:
        pool.extend(import_agentbench_tasks(path))
    if cfg.kg_tasks:
        pool.extend(kg_pool(params))
    return pool


def kg_pool(params: Params) -> list[dict[str, Any]]:
    """The first `collect.kg_tasks` training questions over the embedded graph, as task-pool entries."""
    from cmat_pipeline.data.records import content_id
    from cmat_pipeline.envs.kg import task_entry, training_tasks
    from cmat_pipeline.errors import ConfigError

    n = params.collect.kg_tasks
    if params.kg.endpoint:
        raise ConfigError(f"collect.kg_tasks: the generated questions are about the embedded graph; set kg.endpoint "
                          f"to '' (it is {params.kg.endpoint}) or collect.kg_tasks to 0")
    tasks = training_tasks()
    if n > len(tasks):
        raise ConfigError(f"collect.kg_tasks: {n} asked, the embedded graph has {len(tasks)} training questions")
    entries = [task_entry(t) for t in tasks[:n]]
    return [{"id": content_id("kg", e), "domain": "kg", "source": KG_SOURCE, "task_type": "kg",
             "question": e["question"], "task": e} for e in entries]


def build_teacher(params: Params, db_entries: list[dict[str, Any]]) -> Policy:
    from cmat_pipeline.envs.dbbench import task_from_entry

    cfg = params.collect
    tasks = [task_from_entry(e, i, f"pool item {i}") for i, e in enumerate(db_entries)]
    if cfg.teacher == "oracle":
        from cmat_pipeline.data.teachers import ReActOracle

        return ReActOracle(tasks, seed=cfg.seed, explore_rate=cfg.explore_rate, error_rate=cfg.error_rate)
    if cfg.teacher == "smoa":
        from cmat_pipeline.runtime.smoa import build_smoa_policy

        return build_smoa_policy(params, tasks)
    if cfg.teacher == "openai":
        from cmat_pipeline.runtime.policy import OpenAIPolicy

        return OpenAIPolicy(params.openai, params.generation)
    from cmat_pipeline.runtime.policy import HFPolicy

    return HFPolicy(params.model.dir, params.generation, adapter=cfg.adapter, device=params.model.device,
                    dtype=params.model.dtype)


def _fingerprint(pool: list[dict[str, Any]], teacher: str) -> str:
    digest = hashlib.sha256(teacher.encode())
    for entry in pool:
        digest.update(entry["id"].encode())
    return digest.hexdigest()


def _resume_state(paths: dict[str, Path], fingerprint: str) -> set[str]:
    """Task ids already played in this shard; an unfinished shard of another pool or teacher starts over."""
    manifest, trajectories = paths["manifest"], paths["trajectories"]
    same = manifest.exists() and json.loads(manifest.read_text()).get("fingerprint") == fingerprint
    if not same:
        trajectories.unlink(missing_ok=True)
        manifest.parent.mkdir(parents=True, exist_ok=True)
        manifest.write_text(json.dumps({"fingerprint": fingerprint}))
        return set()
    repair_tail(trajectories)
    return {obj.get("meta", {}).get("task_id") or obj.get("id")
            for _, obj in iter_jsonl(trajectories) if isinstance(obj, dict)} if trajectories.exists() else set()


def _import_conversations(params: Params, done: set[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    from cmat_pipeline.data.importers import import_conversations

    records, rejected = [], []
    for path in params.collect.import_conversations:
        got, bad = import_conversations(path)
        records.extend(r for r in got if r["id"] not in done)
        rejected.extend({"stage": "collect", "reason": b.reason, "where": b.where, "raw": b.raw} for b in bad)
    return records, rejected


def collect(params: Params, policy: Policy | None = None, progress: bool = True) -> dict[str, Any]:
    """Collect this shard (resuming if it was interrupted); returns the shard report."""
    from tqdm import tqdm

    from cmat_pipeline.data.teachers import play_db_tasks
    from cmat_pipeline.envs.sql_backends import make_backend

    cfg, start = params.collect, time.perf_counter()
    paths = shard_paths(cfg.out_dir, cfg.shard)
    pool = build_pool(params)
    write_jsonl(paths["tasks"], pool)
    db_entries = [dict(p["task"], id=p["id"], source=p["source"]) for p in pool if p["domain"] == "db"]
    teacher = policy or build_teacher(params, db_entries)
    done = _resume_state(paths, _fingerprint(pool, teacher.name))
    todo = [e for e in db_entries if e["id"] not in done]
    os_todo = [dict(p["task"], id=p["id"], source=p["source"]) for p in pool
               if p["domain"] == "os" and cfg.play_os and p["id"] not in done]
    kg_todo = [dict(p["task"], id=p["id"], source=p["source"]) for p in pool
               if p["domain"] == "kg" and p["id"] not in done]
    imported, rejected = _import_conversations(params, done)
    write_jsonl(paths["quarantine"], rejected)

    paths["trajectories"].parent.mkdir(parents=True, exist_ok=True)
    with paths["trajectories"].open("a", encoding="utf-8") as sink, \
            tqdm(total=len(todo) + len(os_todo) + len(kg_todo), desc=f"collect {cfg.shard}", unit="task", disable=not progress) as bar:
        def keep(record: dict[str, Any]) -> None:
            sink.write(json.dumps(record, ensure_ascii=False) + "\n")
            sink.flush()  # a kill loses at most the episode being written
            bar.update()

        for record in imported:
            sink.write(json.dumps(record, ensure_ascii=False) + "\n")
        backend = make_backend(params.db)
        try:
            concurrency = 64 if cfg.teacher == "oracle" and policy is None else params.generation.batch_size
            play_db_tasks(todo, teacher, backend, max_rounds=params.db.max_rounds, concurrency=concurrency,
                          source=f"{GENERATED_SOURCE}:{cfg.shard}", on_record=keep, where=str(paths["tasks"]))
        finally:
            backend.close()
        oracle = policy is None and cfg.teacher == "oracle"
        os_skipped = _play_os(params, os_todo, teacher, oracle, keep, bar)
        _play_kg(params, kg_todo, teacher, oracle, keep)
    report = shard_report(params, pool, paths, teacher.name, resumed=len(done), rejected=len(rejected),
                          wall=time.perf_counter() - start)
    played = ["db", *["os"] * cfg.play_os, *["kg"] * bool(cfg.kg_tasks)]
    if played != ["db"]:
        report.update(played_domains=played,
                      pooled_not_played={d: n for d, n in report["pooled_not_played"].items() if d not in played})
    if cfg.play_os:
        report["os_unsupported"] = os_skipped
    paths["reports"].parent.mkdir(parents=True, exist_ok=True)
    paths["reports"].write_text(json.dumps(report, indent=2) + "\n")
    save_resolved(params, Path(cfg.out_dir) / "reports", f"{cfg.shard}.params.yaml")
    return report


def _play_os(params: Params, entries: list[dict[str, Any]], teacher: Policy, oracle: bool, keep, bar) -> int:
    """Play the pool's OS entries (collect.play_os); returns how many are unsupported here (not played)."""
    if not entries:
        return 0
    from cmat_pipeline.data.os_teacher import os_tasks, os_teacher, play_os_tasks

    tasks = os_tasks(entries, params.os, "os pool")
    skipped = sum(bool(t.unsupported) for t in tasks)
    bar.update(skipped)
    play_os_tasks(entries, os_teacher(teacher, tasks, oracle), params.os, concurrency=params.generation.batch_size,
                  source=f"agentbench:{params.collect.shard}", on_record=keep, tasks=tasks)
    return skipped


def _play_kg(params: Params, entries: list[dict[str, Any]], teacher: Policy, oracle: bool, keep) -> None:
    """Play the pool's KG questions against the embedded graph; `oracle` plays their gold action programs."""
    if not entries:
        return
    from cmat_pipeline.envs.kg import KGOraclePolicy, make_client, play_kg, task_from_entry

    tasks = [task_from_entry(e, i, f"kg pool:item {i}") for i, e in enumerate(entries)]
    player = KGOraclePolicy(tasks, "kg pool") if oracle else teacher
    play_kg(tasks, player, make_client(params.kg), params.kg.namespace, params.kg.max_rounds,
            params.generation.batch_size, on_result=lambda result: keep(kg_record(entries[result["index"]], result,
                                                                                  player.name)))


def kg_record(entry: dict[str, Any], result: dict[str, Any], teacher: str) -> dict[str, Any]:
    """A trajectory record from one played KG question: correct is AgentBench's exact match, reward its F1."""
    from cmat_pipeline.data.records import make_record
    from cmat_pipeline.envs.kg import question_kind

    return make_record(
        domain="kg", source=entry["source"], teacher=teacher, task_type="kg", task=entry, question=entry["question"],
        messages=result["messages"], outcome=result["outcome"], correct=result["em"], reward=result["f1"],
        meta={"task_id": entry["id"], "rounds": result["rounds"], "turn_actions": [t["action"] for t in result["turns"]],
              "kind": question_kind(entry.get("actions", ())), "prediction": result["prediction"]},
    )


def shard_report(params: Params, pool: list[dict[str, Any]], paths: dict[str, Path], teacher: str, *,
                 resumed: int, rejected: int, wall: float) -> dict[str, Any]:
    rows = [obj for _, obj in iter_jsonl(paths["trajectories"]) if isinstance(obj, dict)]
    by_type: dict[str, Counter] = {}
    for row in rows:
        by_type.setdefault(row["task_type"], Counter())[row["correct"]] += 1
    pooled = Counter(p["domain"] for p in pool)
    return {
        "shard": params.collect.shard, "teacher": teacher, "pool_tasks": dict(pooled),
        "played_domains": ["db"], "pooled_not_played": {d: n for d, n in pooled.items() if d != "db"},
        "trajectories": len(rows), "correct": sum(r["correct"] for r in rows), "resumed_from": resumed,
        "imported_rejected": rejected,
        "success_by_type": {t: round(c[True] / (c[True] + c[False]), 4) for t, c in sorted(by_type.items())},
        "wall_seconds": round(wall, 2),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from cmat_pipeline.cli import stage_args

    params, args = stage_args(__doc__.splitlines()[0], argv)
    report = collect(params, progress=not args.no_progress)
    print(json.dumps({k: report[k] for k in ("shard", "teacher", "trajectories", "correct", "pooled_not_played",
                                             "wall_seconds")}))
    return report


if __name__ == "__main__":
    import sys

    from cmat_pipeline.cli import main as cli_main

    sys.exit(cli_main(["collect", *sys.argv[1:]]))
