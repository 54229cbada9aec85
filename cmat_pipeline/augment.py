"""`augment` stage: perturbed copies of DB tasks, with labels recomputed and the oracle replaying them.

Run it:
    python -m cmat_pipeline.augment          # or: cmat augment [--set augment.rate=1.0]
For a share (`augment.rate`) of the filtered DB trajectories, the task is copied and perturbed: the
table and its columns renamed (in the table, the question and the gold SQL, through sqlglot's parse
tree), rows reordered, values of columns the gold SQL does not read shuffled, and optionally the question
paraphrased by the `openai` teacher. Labels and table hashes are recomputed by executing the gold SQL
on the new table; the ReAct oracle then plays the copy in the real environment.
Writes to augment.out_dir: trajectories.jsonl (inputs + copies), quarantine.jsonl (copies that could
not be made, with the reason), report.json, docs/ (Data Docs of the `augmented` suite), resolved_params.yaml.
"""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path
from typing import Any

from cmat_pipeline.config import AugmentConfig, Params, save_resolved
from cmat_pipeline.data.boundaries import EvalIndex, check_boundary, quarantine_entry, write_stage_outputs
from cmat_pipeline.data.records import content_id, read_jsonl

STAGE = "augment"
PARAPHRASE_PROMPT = (
    "Rewrite the following request in different words. Keep every name, number, date and quoted value "
    "exactly as written, keep its meaning, and reply with the rewritten request only.\n\n{question}"
)


class AugmentSkipped(Exception):
    """This task cannot be perturbed safely; the reason goes to the quarantine."""


def rename_style(name: str, rng: random.Random) -> str:
    """Another realistic spelling of an identifier: snake_case, Title Case or CompactCase
    (a one-word name can only change case, which MySQL treats as the same column)."""
    words = re.findall(r"[A-Za-z0-9]+", name) or ["col"]
    styles = [
        "_".join(w.lower() for w in words),
        " ".join(w[:1].upper() + w[1:] for w in words),
        "".join(w[:1].upper() + w[1:] for w in words),
    ]
    options = [s for s in styles if s.lower() != name.lower()]
    if not options:
        options = [s for s in (name.lower(), name.upper(), name.capitalize()) if s != name]
    return rng.choice(options) if options else name


def _gold(entry: dict[str, Any]) -> list[str]:
    if entry["type"][0] in ("INSERT", "UPDATE", "DELETE"):
        return [str(s) for s in entry["label"]]
    return [entry["sql"]["query"]]


def _rewrite_sql(sql: str, table: str, columns: dict[str, str]) -> str:
    import sqlglot
    from sqlglot import exp

    tree = sqlglot.parse_one(sql, read="mysql")
    for node in tree.find_all(exp.Table):
        node.set("this", exp.to_identifier(table, quoted=True))
    for node in tree.find_all(exp.Column):
        new = columns.get(node.name.lower())
        if new is not None:
            node.set("this", exp.to_identifier(new, quoted=True))
    schema = tree.find(exp.Schema)
    if schema is not None:  # INSERT's column list holds bare identifiers
        schema.set("expressions", [exp.to_identifier(columns.get(i.name.lower(), i.name), quoted=True)
                                   for i in schema.expressions])
    return tree.sql("mysql")


def _read_columns(sqls: list[str]) -> set[str]:
    import sqlglot
    from sqlglot import exp

    names: set[str] = set()
    for sql in sqls:
        tree = sqlglot.parse_one(sql, read="mysql")
        names |= {c.name.lower() for c in tree.find_all(exp.Column)}
        names |= {i.name.lower() for s in tree.find_all(exp.Schema) for i in s.expressions}
    return names


def _replace_words(text: str, mapping: dict[str, str]) -> str:
    for old in sorted(mapping, key=len, reverse=True):
        text = re.sub(rf"(?<![\w`]){re.escape(old)}(?![\w`])", lambda _m, new=mapping[old]: new, text)
    return text


def perturb(entry: dict[str, Any], cfg: AugmentConfig, rng: random.Random) -> tuple[dict[str, Any], list[str]]:
    """A perturbed deep copy of a dbbench entry (labels still to be recomputed) and what was changed."""
    import copy

    new = copy.deepcopy(entry)
    info = new["table"]["table_info"]
    names = [c["name"] for c in info["columns"]]
    gold, changes = _gold(entry), []
    try:
        read = _read_columns(gold)
    except Exception as err:
        raise AugmentSkipped(f"gold SQL does not parse: {err}") from None
    if cfg.rename:
        table = rename_style(new["table"]["table_name"], rng)
        columns = {n.lower(): rename_style(n, rng) for n in names}
        if len({c.lower() for c in columns.values()}) < len(columns):
            raise AugmentSkipped("renamed columns would collide")
        gold = [_rewrite_sql(s, table, columns) for s in gold]
        mapping = {new["table"]["table_name"]: table} | {n: columns[n.lower()] for n in names}
        new["description"] = _replace_words(new["description"], mapping)
        new["table"]["table_name"] = table
        for column in info["columns"]:
            column["name"] = columns[column["name"].lower()]
        changes.append("rename")
    if cfg.reorder_rows:
        rng.shuffle(info["rows"])
        changes.append("reorder_rows")
    if cfg.change_values:
        for c, name in enumerate(names):
            if name.lower() not in read:
                values = [row[c] for row in info["rows"]]
                rng.shuffle(values)
                for row, value in zip(info["rows"], values):
                    row[c] = value
        changes.append("change_values")
    headers = [c["name"] for c in info["columns"]]
    new["add_description"] = (f"The name of this table is {new['table']['table_name']}, and the headers of this "
                              f"table are {','.join(headers)}.")
    new["heads"] = headers
    if entry["type"][0] in ("INSERT", "UPDATE", "DELETE"):
        new["label"] = gold
    else:
        new["sql"] = dict(new.get("sql") or {}, query=gold[0])
    return new, changes


def recompute_labels(entry: dict[str, Any], backend) -> dict[str, Any]:
    """Execute the gold SQL on the entry's table: the SELECT label, or the table hash after a modification."""
    from cmat_pipeline.envs.dbbench import task_from_entry
    from cmat_pipeline.envs.dbbench_oracle import _values
    from cmat_pipeline.data.teachers import is_error

    task = task_from_entry(dict(entry, answer_md5=entry.get("answer_md5", "")), 0, "augmented entry")
    db = backend.open(task.table)
    try:
        observation = ""
        for sql in task.gold_sql:
            observation = db.execute(sql)
            if is_error(observation):
                raise AugmentSkipped(f"gold SQL fails on the perturbed table: {observation[:120]}")
        if task.is_modification:
            entry["answer_md5"] = db.table_hash()
        else:
            entry["label"] = _values(observation)
    finally:
        db.close()
    return entry


def paraphrase_questions(entries: list[dict[str, Any]], params: Params) -> int:
    """Replace descriptions by the teacher's paraphrase when it keeps every number and quoted value."""
    from cmat_pipeline.runtime.policy import OpenAIPolicy

    policy = OpenAIPolicy(params.openai, params.generation)
    prompts = [[{"role": "user", "content": PARAPHRASE_PROMPT.format(question=e["description"])}] for e in entries]
    accepted = 0
    for entry, output in zip(entries, policy.generate(prompts)):
        text = (output.text or "").strip()
        must_keep = re.findall(r"'[^']*'|\"[^\"]*\"|\d+(?:\.\d+)?", entry["description"])
        if text and all(token.strip("'\"") in text for token in must_keep):
            entry["meta"] = dict(entry.get("meta", {}), original_description=entry["description"])
            entry["description"] = text
            accepted += 1
    return accepted


def make_copies(records: list[dict[str, Any]], params: Params, backend) -> tuple[list[dict], list[dict]]:
    """Perturbed task entries for a `rate` share of the DB records, and quarantine entries for failures."""
    cfg = params.augment
    rng = random.Random(cfg.seed)
    copies, failed = [], []
    for record in records:
        if record["domain"] != "db" or not isinstance(record.get("task"), dict) or rng.random() >= cfg.rate:
            continue
        source = record["task"]
        try:
            entry, changes = perturb(source, cfg, random.Random(f"{cfg.seed}:{record['id']}"))
            recompute_labels(entry, backend)
        except AugmentSkipped as err:
            failed.append(quarantine_entry(STAGE, f"copy not made: {err}", record))
            continue
        group = record.get("meta", {}).get("task_id") or record["id"]
        entry["id"] = content_id("task", entry["description"], entry["table"])
        entry["source"] = f"augment:{record['source']}"
        entry["meta"] = dict(source.get("meta", {}), augmented_from=group, perturbations=changes)
        copies.append(entry)
    return copies, failed


def augment(params: Params) -> dict[str, Any]:
    """Augment the filtered trajectories; returns the report."""
    from cmat_pipeline.data.expectations import SuiteSpec
    from cmat_pipeline.data.teachers import ReActOracle, play_db_tasks
    from cmat_pipeline.envs.dbbench import task_from_entry
    from cmat_pipeline.envs.sql_backends import make_backend

    cfg, start = params.augment, time.perf_counter()
    out = Path(cfg.out_dir)
    records = read_jsonl(Path(params.filter.out_dir) / "trajectories.jsonl")
    backend = make_backend(params.db)
    try:
        copies, not_made = make_copies(records, params, backend)
        paraphrased = paraphrase_questions(copies, params) if cfg.paraphrase and copies else 0
        tasks = [task_from_entry(e, i, f"augmented item {i}") for i, e in enumerate(copies)]
        oracle = ReActOracle(tasks, seed=cfg.seed, explore_rate=params.collect.explore_rate,
                             error_rate=params.collect.error_rate)
        played = play_db_tasks(copies, oracle, backend, max_rounds=params.db.max_rounds, concurrency=64,
                               source="augment")
    finally:
        backend.close()
    for record in played:
        record["meta"]["group"] = record["meta"]["augmented_from"]
    new = [r for r in played if r["correct"]]
    failed = not_made + [quarantine_entry(STAGE, f"copy failed replay: outcome {r['outcome']}", r)
                         for r in played if not r["correct"]]
    kept = records + new
    evals = EvalIndex.from_files(params.filter.decontaminate)
    spec = SuiteSpec("augmented", max_chars=params.filter.max_chars,
                     require_correct=params.filter.require_correct,
                     eval_question_keys=evals.frozen_keys())
    report = write_stage_outputs(out, kept, failed, {
        "inputs": len(records), "copies_attempted": len(copies) + len(not_made),
        "copies_kept": len(new), "paraphrased": paraphrased, "paraphrase": cfg.paraphrase,
        "wall_seconds": round(time.perf_counter() - start, 2)},
        check=lambda rows: check_boundary(rows, spec, out / "docs", f"{out}/trajectories.jsonl"),
        rows_in=len(records) + len(copies) + len(not_made))  # every input and every attempted copy
    save_resolved(params, out)
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from cmat_pipeline.cli import stage_args

    params, _ = stage_args(__doc__.splitlines()[0], argv)
    report = augment(params)
    print(json.dumps({k: report[k] for k in ("inputs", "copies_kept", "quarantined", "paraphrased")}))
    return report


if __name__ == "__main__":
    import sys

    from cmat_pipeline.cli import main as cli_main

    sys.exit(cli_main(["augment", *sys.argv[1:]]))
