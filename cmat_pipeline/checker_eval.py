"""`checker-eval` stage (the paper's Table I): how well a model corrects a faulty SQL query, given the error.

Run it:
    python -m cmat_pipeline.checker_eval                                # model.dir, base model
    cmat checker-eval --set checker_eval.adapter=artifacts/sft
    cmat checker-eval --set checker_eval.policy=copy                    # baseline: the faulty query unchanged
    cmat checker-eval --set checker_eval.policy=openai --set openai.model=qwen2.5-72b
The held-out set comes from the data pipeline's own parts, never from AgentBench data: synthetic dbbench tasks
(`data/dbgen.py`) of shard checker_eval.shard (not the training shard; questions found in collect's task pools
are dropped too), each task's gold SQL broken by `teachers.corrupt_sql` (a wrong table name, an unquoted or a
misspelled column) and run in the SQLite environment, so the error is the one the database really gives.
The model sees the question (with table name and headers), the faulty query and the error, and writes the fix
in a ```sql block. Scores against the gold SQL: BLEU-4 (sacrebleu, corpus level, 0-100) and ROUGE-1/2/L F1
(rouge-score, mean, 0-1), both over sacrebleu's 13a tokens (a missing backtick counts), and exec_match: the
share of fixes whose result (rows, or the table after a modification) equals the gold query's.
Writes checker_eval.out_dir: metrics.json, predictions.jsonl (the set with every prediction), report.md,
resolved_params.yaml.
"""

from __future__ import annotations

import json
import re
import statistics
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

from cmat_pipeline.config import Params
from cmat_pipeline.errors import ConfigError
from cmat_pipeline.runtime.policy import Conversation, Policy, PolicyOutput

PROMPT = """You check SQL for a MySQL database. The query below was written for this task and failed.
Read the error, find the mistake and write the corrected query.

Task: {question}

Faulty query:
```sql
{faulty}
```
Error: {error}

Reply with the corrected query only, in one ```sql block."""
CODE_BLOCK_RE = re.compile(r"```(?:sql|mysql)?[ \t]*\n?([\s\S]*?)```", re.IGNORECASE)


# ------------------------------------------------------------------------------------- the held-out set


def build_correction_set(n: int, seed: int, shard: str, exclude_questions: Iterable[str] = ()) -> list[dict[str, Any]]:
    """n correction examples (faulty SQL, the database's error, gold fix), deterministic in (n, seed, shard).
    Tasks whose question is in `exclude_questions` (the training pools) are skipped."""
    from cmat_pipeline.data.dbgen import generate_db_tasks
    from cmat_pipeline.data.teachers import _rng, corrupt_sql, is_error
    from cmat_pipeline.envs.dbbench import task_from_entry
    from cmat_pipeline.envs.sql_backends import SQLiteBackend

    excluded, backend = set(exclude_questions), SQLiteBackend(timeout_s=5.0, max_chars=800)
    examples: list[dict[str, Any]] = []
    done, size = 0, n + n // 2 + 8  # most tasks give an example; grow the (prefix-stable) task list if not
    while len(examples) < n:
        for i, entry in enumerate(generate_db_tasks(size, seed, shard)[done:], start=done):
            task = task_from_entry(entry, i, f"{shard}:task {i}")
            if task.question in excluded or not task.gold_sql:
                continue
            wrong = corrupt_sql(task.gold_sql[0], task, _rng(seed, "checker-eval", entry["id"]))
            if wrong is None:
                continue
            error = _run(backend, task, wrong[0])
            if not is_error(error):  # a corruption the database accepts is not a correction example
                continue
            examples.append({"id": f"fix-{entry['id']}", "type": task.type, "mistake": wrong[1]["kind"],
                             "question": task.question, "faulty_sql": wrong[0], "error": error,
                             "gold_sql": task.gold_sql[0], "task": entry})
            if len(examples) == n:
                break
        done, size = size, size * 2
    return examples


def _run(backend: Any, task: Any, sql: str) -> str:
    db = backend.open(task.table)
    try:
        return db.execute(sql)
    finally:
        db.close()


def _result(backend: Any, task: Any, sql: str) -> str:
    """What a query does: its rows (or error text), or for a modification the table hash after it."""
    db = backend.open(task.table)
    try:
        observation = db.execute(sql)
        return db.table_hash() if task.is_modification and observation == "[]" else observation
    finally:
        db.close()


def training_questions(params: Params) -> set[str]:
    """Every question in collect's task pools (all shards): the set must not contain them."""
    questions: set[str] = set()
    for path in sorted((Path(params.collect.out_dir) / "tasks").glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                questions.add(json.loads(line).get("question", ""))
    return questions


# ------------------------------------------------------------------------------------- policies and scoring


def conversation(example: dict[str, Any]) -> Conversation:
    return [{"role": "user", "content": PROMPT.format(question=example["question"], faulty=example["faulty_sql"],
                                                      error=example["error"])}]


def extract_sql(reply: str | None) -> str:
    """The first code block of the reply (else the whole reply), on one line."""
    if reply is None:
        return ""
    block = CODE_BLOCK_RE.search(reply)
    return " ".join((block.group(1) if block else reply).split())


class CopyPolicy:
    """The baseline: answers with the faulty query unchanged."""

    name = "copy-faulty-query"

    def __init__(self, examples: Sequence[dict[str, Any]]):
        self.faulty = {conversation(e)[0]["content"]: e["faulty_sql"] for e in examples}

    def generate(self, conversations: Sequence[Conversation]) -> list[PolicyOutput]:
        return [PolicyOutput(f"```sql\n{self.faulty[c[-1]['content']]}\n```") for c in conversations]


def text_scores(predictions: Sequence[str], golds: Sequence[str]) -> dict[str, float]:
    """BLEU-4 (corpus, 0-100) and mean ROUGE-1/2/L F1 (0-1), all over sacrebleu's 13a tokens."""
    import sacrebleu
    from rouge_score import rouge_scorer
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    class CodeTokens:  # rouge-score's own tokenizer drops punctuation; quoting mistakes would not count
        def __init__(self):
            self.base = Tokenizer13a()

        def tokenize(self, text: str) -> list[str]:
            return self.base(text).split()

    bleu = sacrebleu.corpus_bleu(list(predictions), [list(golds)], tokenize="13a")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=CodeTokens())
    rouge = [scorer.score(gold, pred) for pred, gold in zip(predictions, golds)]
    means = {k: round(statistics.fmean(r[k].fmeasure for r in rouge), 4) for k in ("rouge1", "rouge2", "rougeL")}
    return {"bleu4": round(bleu.score, 2), **means}


def build_policy(params: Params, examples: Sequence[dict[str, Any]]) -> Policy:
    from cmat_pipeline.runtime.evaluation import section_policy

    return section_policy(params, "checker_eval", copy=lambda: CopyPolicy(examples))


# ------------------------------------------------------------------------------------- the stage


def checker_eval(params: Params, policy: Policy | None = None, progress: bool = True) -> dict[str, Any]:
    """Build the held-out set, let the policy fix every query, score the fixes; writes every output."""
    from tqdm import tqdm

    from cmat_pipeline.envs.dbbench import task_from_entry
    from cmat_pipeline.envs.sql_backends import SQLiteBackend

    cfg = params.checker_eval
    if (cfg.shard, cfg.seed) == (params.collect.shard, params.collect.seed):
        raise ConfigError(f"checker_eval.shard: {cfg.shard!r} with seed {cfg.seed} is the training shard "
                          "(collect.shard, collect.seed); the correction set must be held out")
    seen = training_questions(params)
    examples = build_correction_set(cfg.examples, cfg.seed, cfg.shard, seen)
    policy = policy or build_policy(params, examples)
    start, outputs = time.perf_counter(), []
    step = params.generation.batch_size
    for k in tqdm(range(0, len(examples), step), desc="checker-eval", unit="batch", disable=not progress):
        outputs.extend(policy.generate([conversation(e) for e in examples[k:k + step]]))
    wall = time.perf_counter() - start
    backend = SQLiteBackend(timeout_s=params.db.statement_timeout_s, max_chars=params.db.max_observation_chars)
    rows = []
    for example, out in zip(examples, outputs):
        task = task_from_entry(example["task"], 0, example["id"])
        fix = extract_sql(out.text)
        rows.append({**example, "reply": out.text, "prediction": fix, "unchanged": fix == example["faulty_sql"],
                     "exec_match": bool(fix) and _result(backend, task, fix) == _result(backend, task, example["gold_sql"])})
    metrics = {"examples": len(rows), "policy": policy.name, "shard": cfg.shard, "seed": cfg.seed,
               **text_scores([r["prediction"] for r in rows], [r["gold_sql"] for r in rows]),
               "exec_match": _pct(rows, "exec_match"), "unchanged": _pct(rows, "unchanged"),
               "context_limit": sum(r["reply"] is None for r in rows),
               "by_mistake": {kind: {"examples": len(group), "exec_match": _pct(group, "exec_match")}
                              for kind, group in _group(rows, "mistake").items()},
               "wall_seconds": round(wall, 2)}
    write_outputs(Path(cfg.out_dir), params, metrics, rows)
    return metrics


def _pct(rows: Sequence[dict[str, Any]], key: str) -> float:
    return round(100.0 * sum(bool(r[key]) for r in rows) / max(len(rows), 1), 2)


def _group(rows: Sequence[dict[str, Any]], key: str) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row[key], []).append(row)
    return dict(sorted(groups.items()))


def write_outputs(out: Path, params: Params, metrics: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    from cmat_pipeline.runtime.evaluation import write_eval_outputs

    lines = ["# Checker evaluation: SQL correction (paper Table I)", "",
             f"Policy `{metrics['policy']}`, {metrics['examples']} held-out examples (shard `{metrics['shard']}`, "
             f"seed {metrics['seed']}), {metrics['wall_seconds']} s.", "",
             "| BLEU-4 | ROUGE-1 | ROUGE-2 | ROUGE-L | exec match % | unchanged % |", "|---|---|---|---|---|---|",
             f"| {metrics['bleu4']} | {metrics['rouge1']} | {metrics['rouge2']} | {metrics['rougeL']} | "
             f"{metrics['exec_match']} | {metrics['unchanged']} |", "",
             "| mistake | examples | exec match % |", "|---|---|---|",
             *[f"| {k} | {v['examples']} | {v['exec_match']} |" for k, v in metrics["by_mistake"].items()], ""]
    write_eval_outputs(out, params, metrics, rows, "\n".join(lines), rows_name="predictions.jsonl")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from cmat_pipeline.cli import stage_args

    params, args = stage_args(__doc__.splitlines()[0], argv)
    metrics = checker_eval(params, progress=not args.no_progress)
    print(json.dumps({k: metrics[k] for k in ("policy", "examples", "bleu4", "rouge1", "rouge2", "rougeL",
                                              "exec_match", "unchanged")}))
    return metrics


if __name__ == "__main__":
    import sys

    from cmat_pipeline.cli import main as cli_main

    sys.exit(cli_main(["checker-eval", *sys.argv[1:]]))
