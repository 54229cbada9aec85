"""`filter` stage: every raw shard in, only what is fit to train on out; the rest quarantined with its reason.

Run it:
    python -m cmat_pipeline.filtering          # or: cmat filter [--set filter.require_correct=false]
Steps, in order (a row leaves at the first step that rejects it):
  1. unreadable lines and repeated ids (the first copy is kept);
  2. the raw Great Expectations suite, row by row: nulls, roles out of order, assistant turns that do
     not parse as actions, rewards out of range, unknown domains (reason = the failed expectation);
  3. unsuccessful trajectories (when filter.require_correct);
  4. length limits (filter.min_chars, filter.max_chars);
  5. decontamination against every file in filter.decontaminate: same question, near-copy of a question,
     or the same table (name and headers); an OS question is compared without its fixed lead-in;
  6. exact duplicates (same question and actions), then near-duplicates (MinHash). Both compare the task's own
     question and the assistant's own actions: the prompt, its "Ok." and the one-shot example are left out.
Writes to filter.out_dir: trajectories.jsonl, quarantine.jsonl, report.json (in = kept + quarantined),
docs/ (Great Expectations Data Docs of the raw and the filtered validation: open docs/index.html),
resolved_params.yaml. The kept rows must pass the strict `filtered` suite or the stage fails.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from cmat_pipeline.config import FilterConfig, Params, save_resolved
from cmat_pipeline.data.boundaries import (EvalIndex, check_boundary, quarantine_entry, table_key,
                                           write_stage_outputs)
from cmat_pipeline.data.records import BadLine, action_turns, iter_jsonl, normalize_question, task_question
from cmat_pipeline.errors import DataError

STAGE = "filter"
NO_LIMIT = 10**9


def read_shards(raw_dir: str | Path) -> tuple[list[tuple[str, dict[str, Any]]], list[dict[str, Any]]]:
    """(where, record) for every readable line of every trajectory shard; unreadable lines quarantined."""
    shards = sorted(Path(raw_dir, "trajectories").glob("*.jsonl"))
    if not shards:
        raise DataError(f"{raw_dir}/trajectories: no shards to filter; run the collect stage first (`cmat collect`)")
    rows, bad = [], []
    for shard in shards:
        for lineno, obj in iter_jsonl(shard):
            if isinstance(obj, BadLine):
                bad.append(quarantine_entry(STAGE, f"unreadable line: {obj.reason}", obj.text, f"{shard}:{lineno}"))
            else:
                rows.append((f"{shard}:{lineno}", obj))
    return rows, bad


def _action_text(record: dict[str, Any]) -> str:
    """The assistant's own turns: the protocol and one-shot replies every record of a domain shares would
    otherwise outweigh what tells two tasks apart (9 one-shot replies against a KG task's 3 actions)."""
    return "\n".join(content for _, content in action_turns(record["messages"]))


def _task_text(record: dict[str, Any]) -> str:
    """What near-duplicate dedupe compares: the task's own question and the assistant's own actions."""
    return task_question(record["question"]) + "\n" + _action_text(record)


def _raw_suite_failures(records: list[dict[str, Any]], docs_dir: Path | None) -> dict[int, list[str]]:
    """Row-level failures of the raw suite: at ingestion they quarantine rows instead of failing the stage."""
    from cmat_pipeline.data.expectations import SuiteSpec, validate_frame
    from cmat_pipeline.data.records import flatten

    spec = SuiteSpec("raw", min_chars=0, max_chars=NO_LIMIT)
    return validate_frame(flatten(records), spec, docs_dir=docs_dir).row_reasons


class Filter:
    """Applies the steps in order, moving rejected rows to the quarantine with their reason."""

    def __init__(self, cfg: FilterConfig, evals: EvalIndex, docs_dir: Path | None = None):
        self.cfg, self.evals, self.docs_dir = cfg, evals, docs_dir
        self.quarantined: list[dict[str, Any]] = []

    def reject(self, record: Any, reason: str, where: str = "") -> None:
        self.quarantined.append(quarantine_entry(STAGE, reason, record, where))

    def run(self, rows: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
        rows = self._unique_ids(rows)
        failures = _raw_suite_failures([r for _, r in rows], self.docs_dir)
        kept = []
        for pos, (where, record) in enumerate(rows):
            if pos in failures:
                self.reject(record, "raw validation: " + "; ".join(failures[pos]), where)
            elif self.cfg.require_correct and record["correct"] is not True:
                self.reject(record, f"unsuccessful trajectory: outcome {record.get('outcome')}", where)
            elif (reason := self._length_problem(record)) is not None:
                self.reject(record, reason, where)
            else:
                kept.append((where, record))
        kept = self._decontaminate(kept)
        return self._deduplicate(kept)

    def _unique_ids(self, rows):
        seen: set[Any] = set()
        out = []
        for where, record in rows:
            rid = record.get("id")
            if rid is not None and rid in seen:
                self.reject(record, f"duplicate id: {rid} already kept", where)
                continue
            seen.add(rid)
            out.append((where, record))
        return out

    def _length_problem(self, record: dict[str, Any]) -> str | None:
        from cmat_pipeline.data.records import record_chars

        n = record_chars(record)
        if n > self.cfg.max_chars:
            return f"too long: {n} characters > filter.max_chars {self.cfg.max_chars}"
        if n < self.cfg.min_chars:
            return f"too short: {n} characters < filter.min_chars {self.cfg.min_chars}"
        return None

    def _decontaminate(self, rows):
        from cmat_pipeline.data.similarity import near_duplicates

        evals = self.evals.questions
        texts = [task_question(q) for q, _ in evals] + [task_question(r["question"]) for _, r in rows]
        near = near_duplicates(texts, threshold=self.cfg.decontamination_threshold) if rows else []
        out = []
        for i, (where, record) in enumerate(rows):
            key, table = normalize_question(record["question"]), table_key(record.get("task"))
            match = near[len(evals) + i]
            if key in self.evals.question_keys:
                self.reject(record, f"evaluation overlap: question of {self.evals.question_keys[key]}", where)
            elif match is not None and match < len(evals):
                self.reject(record, f"evaluation overlap: near-copy of a question of {evals[match][1]}", where)
            elif table and table in self.evals.table_keys:
                self.reject(record, f"evaluation overlap: table of {self.evals.table_keys[table]}", where)
            else:
                out.append((where, record))
        return out

    def _deduplicate(self, rows) -> list[dict[str, Any]]:
        from cmat_pipeline.data.similarity import near_duplicates

        first: dict[tuple[str, str], str] = {}
        unique = []
        for where, record in rows:
            key = (normalize_question(record["question"]), _action_text(record))
            if key in first:
                self.reject(record, f"exact duplicate: same question and actions as {first[key]}", where)
            else:
                first[key] = record["id"]
                unique.append((where, record))
        texts = [_task_text(r) for _, r in unique]
        near = near_duplicates(texts, threshold=self.cfg.near_duplicate_threshold) if unique else []
        kept = []
        for (where, record), match in zip(unique, near):
            if match is None:
                kept.append(record)
            else:
                self.reject(record, f"near-duplicate: of {unique[match][1]['id']}", where)
        return kept


def filter_stage(params: Params) -> dict[str, Any]:
    """Filter every raw shard; returns the report (also written to filter.out_dir/report.json)."""
    from cmat_pipeline.data.expectations import SuiteSpec

    cfg, start = params.filter, time.perf_counter()
    out = Path(cfg.out_dir)
    rows, unreadable = read_shards(params.collect.out_dir)
    evals = EvalIndex.from_files(cfg.decontaminate)
    flt = Filter(cfg, evals, out / "docs")
    flt.quarantined.extend(unreadable)
    kept = flt.run(rows)
    spec = SuiteSpec("filtered", max_chars=cfg.max_chars, require_correct=cfg.require_correct,
                     eval_question_keys=evals.frozen_keys())
    report = write_stage_outputs(out, kept, flt.quarantined, {
        "eval_files": list(cfg.decontaminate), "wall_seconds": round(time.perf_counter() - start, 2)},
        check=lambda rows: check_boundary(rows, spec, out / "docs", f"{out}/trajectories.jsonl"),
        rows_in=len(rows) + len(unreadable))
    save_resolved(params, out)
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from cmat_pipeline.cli import stage_args

    params, _ = stage_args(__doc__.splitlines()[0], argv)
    report = filter_stage(params)
    print(json.dumps({k: report[k] for k in ("rows_in", "kept", "quarantined", "quarantine_reasons")}))
    return report


if __name__ == "__main__":
    import sys

    from cmat_pipeline.cli import main as cli_main

    sys.exit(cli_main(["filter", *sys.argv[1:]]))
