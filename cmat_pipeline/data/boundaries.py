"""What every data stage does at its edges: read the previous stage, validate, write, account for every row.

- `check_boundary` validates a batch with the Great Expectations suite of that boundary, writes the
  Data Docs, and fails the stage (DataValidationError naming expectation, count and example ids).
- `EvalIndex` holds every evaluation set's questions and tables, for decontamination and for the
  suites' zero-overlap expectation.
- `write_stage_outputs` writes trajectories, quarantine and a report whose counts must reconcile.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from cmat_pipeline.data.records import flatten, normalize_question, write_jsonl
from cmat_pipeline.errors import DataError


@dataclass
class EvalIndex:
    """Questions and tables of every evaluation task file, keyed for overlap checks."""

    question_keys: dict[str, str] = field(default_factory=dict)  # normalized question -> file
    questions: list[tuple[str, str]] = field(default_factory=list)  # (question, file)
    table_keys: dict[str, str] = field(default_factory=dict)  # table fingerprint -> file

    @classmethod
    def from_files(cls, files: Sequence[str]) -> "EvalIndex":
        """Index filter.decontaminate's entries: dbbench, os_interaction and AgentBench KG task files, and
        `kg:generated` (the embedded graph's evaluation questions, what `evaluate-kg` asks by default)."""
        index = cls()
        for path in files:
            for question, task in _evaluation_entries(str(path)):
                index.question_keys.setdefault(normalize_question(question), str(path))
                index.questions.append((question, str(path)))
                key = table_key(task)
                if key:
                    index.table_keys.setdefault(key, str(path))
        return index

    def frozen_keys(self) -> frozenset[str]:
        return frozenset(self.question_keys)


KG_GENERATED = "kg:generated"
"""filter.decontaminate entry for the embedded graph's evaluation questions (not a file)."""


def _evaluation_entries(path: str) -> list[tuple[str, Any]]:
    """(question, task entry or None) of one filter.decontaminate entry."""
    from cmat_pipeline.envs.kg import generated_tasks, is_kg_task_file, load_kg_tasks

    if path == KG_GENERATED:
        return [(t.question, None) for t in generated_tasks()]
    if not Path(path).exists():
        raise DataError(f"{path}: evaluation task file for decontamination not found (filter.decontaminate); "
                        f"remove it from the list or point it at the file")
    if is_kg_task_file(path):
        return [(t.question, None) for t in load_kg_tasks(path)]
    from cmat_pipeline.data.importers import import_agentbench_tasks

    return [(e["question"], e.get("task")) for e in import_agentbench_tasks(path)]


def table_key(task: Any) -> str | None:
    """A dbbench table's identity: its normalized name and headers (rows may be edited copies)."""
    if not isinstance(task, dict) or not isinstance(task.get("table"), dict):
        return None
    table = task["table"]
    try:
        columns = [c["name"] for c in table["table_info"]["columns"]]
    except (KeyError, TypeError):
        return None
    return normalize_question(str(table.get("table_name", ""))) + "|" + "|".join(normalize_question(str(c)) for c in columns)


def check_boundary(records: list[dict[str, Any]], spec, docs_dir: Path, what: str):
    """Validate `records` strictly at one boundary (Data Docs under docs_dir); raise on any failure."""
    from cmat_pipeline.data.expectations import raise_for_failures, validate_frame

    result = validate_frame(flatten(records), spec, docs_dir=docs_dir)
    raise_for_failures(result, what)
    return result


def quarantine_entry(stage: str, reason: str, record: Any, where: str = "") -> dict[str, Any]:
    rid = record.get("id") if isinstance(record, dict) else None
    return {"stage": stage, "reason": reason, "id": rid, "where": where, "record": record}


def write_stage_outputs(out_dir: Path, kept: list[dict[str, Any]], quarantined: list[dict[str, Any]],
                        report: dict[str, Any], rows_in: int, kept_name: str = "trajectories.jsonl",
                        check: Callable[[list[dict[str, Any]]], Any] | None = None) -> dict[str, Any]:
    """Write quarantine.jsonl and report.json, run `check` on the kept rows (a boundary suite), then write
    them (trajectories.jsonl). Fails if rows went missing; a failed check leaves the quarantine readable."""
    if rows_in != len(kept) + len(quarantined):
        raise DataError(f"{out_dir}: counts do not reconcile: {rows_in} in != {len(kept)} kept + "
                        f"{len(quarantined)} quarantined (a bug: please report it)")
    reasons: dict[str, int] = {}
    for q in quarantined:
        key = q["reason"].split(":")[0]
        reasons[key] = reasons.get(key, 0) + 1
    report = {"rows_in": rows_in, "kept": len(kept), "quarantined": len(quarantined),
              "quarantine_reasons": dict(sorted(reasons.items())), **report}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "quarantine.jsonl", quarantined)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / kept_name).unlink(missing_ok=True)  # never leave a previous run's rows next to this report
    if check is not None:
        check(kept)
    write_jsonl(out_dir / kept_name, kept)
    return report
