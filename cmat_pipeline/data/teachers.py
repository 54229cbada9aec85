"""Teachers: policies that play dbbench tasks in the real environment and leave training trajectories.

- `ReActOracle`: knows each task's gold SQL and writes ReAct turns (a thought, then the action).
  Per task, deterministically from the seed, it may first explore the table, and may make a realistic
  mistake (a wrong table name, a misspelled or unquoted column), read the database error, reflect on
  it and run the fix. Answers are read from the observations, so every trajectory is what the
  environment really returned.
- Any `Policy` (the local model, an OpenAI-compatible endpoint) is a teacher too: `play_db_tasks`
  runs whichever it is given through the same batched episode loop as evaluation.
- `ReplayPolicy`: replays recorded assistant turns, to prove trajectories reproduce in the environment.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from typing import Any, Callable, Iterable, Sequence

from cmat_pipeline.data.rationales import explain_sql
from cmat_pipeline.data.records import content_id, make_record
from cmat_pipeline.envs.dbbench import DBEpisode, DBTask, task_from_entry
from cmat_pipeline.envs.dbbench_oracle import _values
from cmat_pipeline.envs.sql_backends import SQLBackend
from cmat_pipeline.runtime.policy import Conversation, Policy, PolicyOutput
from cmat_pipeline.runtime.rollout import run_episodes

PREAMBLE = 3  # prompt, "Ok.", question
EXPLORE_THOUGHTS = (
    "Before writing the query, let me look at a few rows of {table} to see how the values are written.",
    "First I want to see what {table} looks like.",
    "Let me check the format of the data in {table} first.",
)
REFLECTIONS = {
    "wrong_table": "The table is called {table}, not `{wrong}`; I have to use the exact name from the task.",
    "unquoted_column": "The column name `{column}` contains spaces or symbols, so it must be quoted with backticks.",
    "misspelled_column": "There is no column `{wrong}`; the headers say the column is `{column}`.",
}


def _rng(*parts: Any) -> random.Random:
    return random.Random(int(hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16], 16))


def _quote(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def is_error(observation: str) -> bool:
    """Rows render as a Python list; anything else is the database's error text."""
    return not observation.startswith("[")


def corrupt_sql(sql: str, task: DBTask, rng: random.Random) -> tuple[str, dict[str, str]] | None:
    """A plausible wrong version of `sql` that the database rejects, and what was wrong (None if none fits)."""
    import sqlglot
    from sqlglot import exp

    try:
        tree = sqlglot.parse_one(sql, read="mysql")
    except Exception:
        return None
    columns = {c.lower() for c in task.table.columns}
    referenced = [c for c in tree.find_all(exp.Column) if c.name.lower() in columns]
    options = ["wrong_table"]
    if any(not re.fullmatch(r"\w+", c.name) for c in referenced):
        options.append("unquoted_column")
    if any(re.fullmatch(r"\w+", c.name) for c in referenced):
        options.append("misspelled_column")
    kind = rng.choice(options)
    if kind == "wrong_table":
        wrong = re.sub(r"\W+", "_", task.table.name).strip("_").lower()
        wrong = wrong if wrong != task.table.name.lower() else wrong + "s"
        for table in tree.find_all(exp.Table):
            table.set("this", exp.to_identifier(wrong, quoted=False))
        return tree.sql("mysql"), {"kind": kind, "wrong": wrong, "table": _quote(task.table.name)}
    if kind == "unquoted_column":
        column = rng.choice([c.name for c in referenced if not re.fullmatch(r"\w+", c.name)])
        return sql.replace(_quote(column), column), {"kind": kind, "column": column}
    column = rng.choice([c.name for c in referenced if re.fullmatch(r"\w+", c.name)])
    wrong = column[:-1] if column.endswith("s") and len(column) > 3 else column + "s"
    if wrong.lower() in columns:
        wrong = column + "_name"
    for node in tree.find_all(exp.Column):
        if node.name == column:
            node.set("this", exp.to_identifier(wrong, quoted=False))
    return tree.sql("mysql"), {"kind": kind, "wrong": wrong, "column": column}


def _action(thought: str, sql: str) -> str:
    return f"{thought}\nAction: Operation\n```sql\n{sql.strip().replace(chr(10), ' ')}\n```"


def _answer(thought: str, values: list[str]) -> str:
    return f"{thought}\nAction: Answer\nFinal Answer: {json.dumps(values, ensure_ascii=False)}"


def final_answer(task: DBTask, last_observation: str | None) -> str:
    """The answer turn once every gold statement ran: the last result's values (None: nothing ran)."""
    if task.is_modification:
        return _answer("The statement ran without an error, so the table is now changed as asked.", [])
    last = last_observation or ""
    values = _values(last) if last_observation is not None else []
    shown = last if len(last) <= 120 else last[:117] + "..."
    return _answer(f"The query returned {shown}, so the answer is {', '.join(values)}.", values)


class ReActOracle:
    """Gold-SQL teacher writing ReAct turns with exploration and error recovery."""

    def __init__(self, tasks: Sequence[DBTask], seed: int = 0, explore_rate: float = 0.3, error_rate: float = 0.25):
        self.by_question = {task.question: task for task in tasks}
        self.seed, self.explore_rate, self.error_rate = seed, explore_rate, error_rate
        self.name = f"oracle:react(explore={explore_rate},error={error_rate})"

    def plan(self, task: DBTask) -> list[dict[str, Any]]:
        """The statements this teacher runs for `task`, in order (then it answers)."""
        rng = _rng(self.seed, task.question)
        steps: list[dict[str, Any]] = []
        if rng.random() < self.explore_rate:
            steps.append({"kind": "explore", "sql": f"SELECT * FROM {_quote(task.table.name)} LIMIT 3;",
                          "thought": rng.choice(EXPLORE_THOUGHTS).format(table=_quote(task.table.name))})
        gold = list(task.gold_sql)
        wrong = corrupt_sql(gold[0], task, rng) if gold and rng.random() < self.error_rate else None
        if wrong is not None:
            steps.append({"kind": "error", "sql": wrong[0], "thought": explain_sql(gold[0], rng), "mistake": wrong[1]})
        for i, sql in enumerate(gold):
            fix = wrong is not None and i == 0  # the reflection leads in, no opener after it
            steps.append({"kind": "fix" if fix else "gold", "sql": sql, "thought": explain_sql(sql, rng, opener=not fix)})
        return steps

    def turn(self, conversation: Conversation) -> str:
        task = self.by_question[conversation[PREAMBLE - 1]["content"]]
        steps = self.plan(task)
        done = (len(conversation) - PREAMBLE) // 2
        last = conversation[-1]["content"] if done else ""
        if done < len(steps):
            step = steps[done]
            thought = step["thought"]
            if step["kind"] == "fix":
                thought = self._reflection(steps[done - 1]["mistake"], last) + " " + thought
            return _action(thought, step["sql"])
        return final_answer(task, last if done else None)

    @staticmethod
    def _reflection(mistake: dict[str, str], observation: str) -> str:
        reason = REFLECTIONS[mistake["kind"]].format(**{k: v for k, v in mistake.items() if k != "kind"})
        if is_error(observation):
            first_line = observation.splitlines()[0] if observation else ""
            return f"The database answered with an error: {first_line[:160]}. {reason} Let me fix it."
        return f"That result cannot be right. {reason} Let me fix it."

    def generate(self, conversations: Sequence[Conversation]) -> list[PolicyOutput]:
        return [PolicyOutput(self.turn(c)) for c in conversations]


class ReplayPolicy:
    """Replays each record's assistant turns (after the preamble) in order."""

    name = "replay"

    def __init__(self, records: Iterable[dict[str, Any]]):
        self.turns = {r["question"]: [m["content"] for m in r["messages"][PREAMBLE:] if m["role"] == "assistant"]
                      for r in records}

    def generate(self, conversations: Sequence[Conversation]) -> list[PolicyOutput]:
        out = []
        for conversation in conversations:
            turns = self.turns[conversation[PREAMBLE - 1]["content"]]
            done = (len(conversation) - PREAMBLE) // 2
            out.append(PolicyOutput(turns[done] if done < len(turns) else None))
        return out


def db_record(entry: dict[str, Any], result: dict[str, Any], teacher: str, source: str) -> dict[str, Any]:
    """A trajectory record from one played dbbench entry."""
    task_id = entry.get("id") or content_id("task", entry.get("description"), entry.get("table"))
    return make_record(
        domain="db", source=entry.get("source") or source, teacher=teacher, task_type=result["type"], task=entry,
        question=result["messages"][PREAMBLE - 1]["content"], messages=result["messages"],
        outcome=result["outcome"], correct=result["correct"], reward=1.0 if result["correct"] else 0.0,
        meta={"task_id": task_id, "rounds": result["rounds"], "turn_actions": [t["action"] for t in result["turns"]],
              **entry.get("meta", {})},
    )


def play_db_tasks(entries: Sequence[dict[str, Any]], policy: Policy, backend: SQLBackend, *, max_rounds: int,
                  concurrency: int, source: str, on_record: Callable[[dict[str, Any]], None] = lambda r: None,
                  where: str = "tasks") -> list[dict[str, Any]]:
    """Play every dbbench entry with `policy`; each finished episode becomes a record passed to `on_record`."""
    tasks = [task_from_entry(entry, i, f"{where}:item {i}") for i, entry in enumerate(entries)]
    records: list[dict[str, Any]] = []

    def finish(result: dict[str, Any]) -> None:
        record = db_record(entries[result["index"]], result, policy.name, source)
        records.append(record)
        on_record(record)

    def starter(task: DBTask):
        return lambda: DBEpisode(task, backend.open(task.table), max_rounds)

    run_episodes((starter(t) for t in tasks), policy, concurrency, close=lambda e: e.db.close(), on_result=finish)
    return records
