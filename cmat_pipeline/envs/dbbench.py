"""AgentBench DB environment ("dbbench"), as of the CMAT era (AgentBench v0.2 text action format).

Protocol (kept byte-for-byte where it matters for scoring):
  user: SYSTEM_PROMPT / assistant: "Ok." / user: description + "\\n" + add_description
  assistant: "Action: Operation\\n```sql\\n...\\n```"  -> the statement runs, its result is the next user turn
  assistant: "Action: Answer\\nFinal Answer: [...]"   -> the episode ends
At most `max_rounds` statements run. SELECT-type tasks are scored on the final answer; INSERT/UPDATE/DELETE
on AgentBench's hash of the table after the episode. Outcomes follow the paper's Table IV.
Task files are read as AgentBench ships them (dev.jsonl, standard.jsonl, or any file of that format).
The opening prompt is AgentBench's (`full`); `terse` (a low-quality prompt) and `none` (the question alone)
exist for the prompt-quality evaluation (the paper's Table III, `prompt_eval.py`).
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

from cmat_pipeline.envs.sql_backends import SQLBackend, TableSpec, TaskDatabase
from cmat_pipeline.errors import DataError

SYSTEM_PROMPT = """
I will ask you a question, then you should help me operate a MySQL database with SQL to answer the question.
You have to explain the problem and your solution to me and write down your thoughts.
After thinking and explaining thoroughly, every round you can choose to operate or to answer.
your operation should be like this:
Action: Operation
```sql
SELECT * FROM table WHERE condition;
```
You MUST put SQL in markdown format without any other comments. Your SQL should be in one line.
Every time you can only execute one SQL statement. I will only execute the statement in the first SQL code block. Every time you write a SQL, I will execute it for you and give you the output.
If you are done operating, and you want to commit your final answer, then write down:
Action: Answer
Final Answer: ["ANSWER1", "ANSWER2", ...]
DO NOT write this pattern unless you are sure about your answer. I expect an accurate and correct answer.
Your answer should be accurate. Your answer must be exactly the same as the correct answer.
If the question is about modifying the database, then after done operation, your answer field can be anything.
If your response cannot match any pattern I mentioned earlier, you will be judged as FAIL immediately.
Your input will be raw MySQL response, you have to deal with it by yourself.
"""
FIRST_REPLY = "Ok."
# A low-quality prompt for the paper's Table III: the same action format, said tersely and sloppily, with none
# of the rules (one statement, the first block only, exact answers, raw MySQL output).
TERSE_PROMPT = """database question. use sql for it
to run sql: Action: Operation and the sql in a ```sql block
when done: Action: Answer and Final Answer: [answers]
"""
PROMPTS = {"full": SYSTEM_PROMPT, "terse": TERSE_PROMPT, "none": None}  # none: the question alone

MODIFICATION_TYPES = ("INSERT", "DELETE", "UPDATE")
SELECT_SUBTYPES = (
    "other", "counting", "comparison", "ranking",
    "aggregation-SUM", "aggregation-MIN", "aggregation-MAX", "aggregation-AVG",
)
CATEGORIES = ("SELECT", "INSERT", "UPDATE")  # overall_cat_accuracy averages these three

ACTION_RE = re.compile(r"Action: (.*?)\n")
SQL_BLOCK_RE = re.compile(r"```sql\n([\s\S]*?)\n```")
FINAL_ANSWER_RE = re.compile(r"\nFinal Answer:(.*)")


class Outcome(str, Enum):
    """How an episode ended (the paper's Table IV)."""

    COMPLETED = "completed"
    CONTEXT_LIMIT = "context_limit_exceeded"
    INVALID_FORMAT = "invalid_format"
    INVALID_ACTION = "invalid_action"
    TASK_LIMIT = "task_limit_exceeded"


@dataclass(frozen=True)
class DBTask:
    """One dbbench task."""

    index: int
    type: str
    description: str
    add_description: str
    table: TableSpec
    label: tuple[Any, ...]
    answer_md5: str | None
    gold_sql: tuple[str, ...]
    source_file: str = ""
    prompt: str = "full"
    """Which of PROMPTS opens the episode (evaluate.prompt)."""

    def __post_init__(self) -> None:
        if self.prompt not in PROMPTS:
            raise ValueError(f"prompt {self.prompt!r} is unknown; choose one of {', '.join(PROMPTS)}")

    @property
    def is_modification(self) -> bool:
        return self.type in MODIFICATION_TYPES

    @property
    def question(self) -> str:
        return self.description + "\n" + self.add_description

    @property
    def expected(self) -> Any:
        """What the answer is compared with: the table hash or the label list."""
        return self.answer_md5 if self.is_modification else list(self.label)

    def initial_messages(self) -> list[dict[str, str]]:
        question = {"role": "user", "content": self.question}
        if PROMPTS[self.prompt] is None:
            return [question]
        return [{"role": "user", "content": PROMPTS[self.prompt]}, {"role": "assistant", "content": FIRST_REPLY}, question]


def task_from_entry(entry: dict[str, Any], index: int, where: str) -> DBTask:
    """A DBTask from one dbbench entry; errors name `where` (file:line) and the missing key."""
    if not isinstance(entry, dict):
        raise DataError(f"{where}: a task must be a JSON object, got {type(entry).__name__}")

    def need(obj: dict[str, Any], key: str, path: str) -> Any:
        if not isinstance(obj, dict) or key not in obj:
            raise DataError(f"{where}: missing key `{path}{key}`")
        return obj[key]

    kinds = need(entry, "type", "")
    if not (isinstance(kinds, list) and kinds and isinstance(kinds[0], str)):
        raise DataError(f"{where}: `type` must be a non-empty list of strings, got {kinds!r}")
    table = need(entry, "table", "")
    info = need(table, "table_info", "table.")
    columns = [need(c, "name", "table.table_info.columns[].") for c in need(info, "columns", "table.table_info.")]
    rows = need(info, "rows", "table.table_info.")
    for r, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != len(columns):
            raise DataError(f"{where}: table.table_info.rows[{r}] has {len(row) if isinstance(row, list) else row!r} "
                            f"cells, expected {len(columns)} (one per column)")
    kind = kinds[0]
    label = need(entry, "label", "")
    label = label if isinstance(label, list) else [label]
    if kind in MODIFICATION_TYPES:
        answer_md5 = need(entry, "answer_md5", "")
        gold = tuple(str(s) for s in label)
    else:
        answer_md5 = None
        sql = entry.get("sql")
        gold = (sql["query"],) if isinstance(sql, dict) and sql.get("query") else ()
    return DBTask(
        index=index, type=kind, description=str(need(entry, "description", "")),
        add_description=str(entry.get("add_description", "")),
        table=TableSpec(str(need(table, "table_name", "table.")), tuple(map(str, columns)), tuple(map(tuple, rows))),
        label=tuple(label), answer_md5=answer_md5, gold_sql=gold, source_file=where.split(":")[0],
    )


def load_tasks(path: str | Path, limit: int = 0, prompt: str = "full") -> list[DBTask]:
    """Read a dbbench task file (.jsonl, or .json holding a list), each task opened by PROMPTS[prompt].
    Errors name the file and line."""
    path = Path(path)
    if not path.exists():
        raise DataError(
            f"{path}: dbbench task file not found. Point evaluate.tasks at AgentBench's "
            "data/dbbench/dev.jsonl (or standard.jsonl) from an AgentBench checkout, e.g. ../shared/agentbench/dbbench/dev.jsonl"
        )
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: not valid JSON: {err}") from None
        if not isinstance(items, list):
            raise DataError(f"{path}: a .json task file must hold a list of tasks, got {type(items).__name__}")
        entries = [(f"{path}:item {i}", e) for i, e in enumerate(items)]
    else:
        entries = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entries.append((f"{path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: not valid JSON: {err}") from None
    tasks = [replace(task_from_entry(entry, i, where), prompt=prompt) for i, (where, entry) in enumerate(entries)]
    if not tasks:
        raise DataError(f"{path}: holds no tasks")
    return tasks[:limit] if limit else tasks


# ------------------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class ParsedAction:
    """What an assistant turn asks for, by AgentBench's own regular expressions."""

    kind: str  # "operation" | "answer" | "invalid_format" | "invalid_action"
    sql: str = ""
    answer: str = ""


def parse_action(text: str) -> ParsedAction:
    """Parse one assistant turn. Mirrors AgentBench: the first `Action: X` line decides, an Operation
    needs a ```sql block (its newlines become spaces), an Answer needs a `Final Answer:` line."""
    action = ACTION_RE.search(text)
    if action and action.group(1) == "Operation":
        block = SQL_BLOCK_RE.search(text)
        if not block:
            return ParsedAction("invalid_format")
        return ParsedAction("operation", sql=block.group(1).strip().replace("\n", " "))
    answer = FINAL_ANSWER_RE.search(text)
    if answer:
        return ParsedAction("answer", answer=answer.group(1))
    name = action.group(1).strip() if action else ""
    if re.fullmatch(r"\w+", name) and name not in ("Answer", "Operation"):  # well-formed, but no such action
        return ParsedAction("invalid_action")
    return ParsedAction("invalid_format")


# ------------------------------------------------------------------------------------- episodes


@dataclass
class DBEpisode:
    """One task played in a fresh database. Feed it assistant turns with `step` until `done`."""

    task: DBTask
    db: TaskDatabase
    max_rounds: int = 5
    messages: list[dict[str, str]] = field(default_factory=list)
    rounds: int = 0
    done: bool = False
    outcome: Outcome | None = None
    answer: str = ""
    turns: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.messages:
            self.messages = self.task.initial_messages()

    def step(self, response: str | None) -> None:
        """Apply one assistant turn; `None` means the policy hit its context limit."""
        if response is None:
            self._finish(Outcome.CONTEXT_LIMIT)
            return
        self.messages.append({"role": "assistant", "content": response})
        action = parse_action(response)
        turn: dict[str, Any] = {"response": response, "action": action.kind}
        self.turns.append(turn)
        if action.kind == "operation" and self.rounds < self.max_rounds:
            observation = self.db.execute(action.sql)
            turn.update(sql=action.sql, observation=observation)
            self.messages.append({"role": "user", "content": observation})
            self.rounds += 1
        elif action.kind == "answer":
            self.answer = action.answer
            self._finish(Outcome.COMPLETED)
        elif self.rounds >= self.max_rounds:
            self._finish(Outcome.TASK_LIMIT)
        else:
            self._finish(Outcome.INVALID_ACTION if action.kind == "invalid_action" else Outcome.INVALID_FORMAT)

    def _finish(self, outcome: Outcome) -> None:
        self.outcome, self.done = outcome, True
        if self.task.is_modification:  # AgentBench scores the table, whatever the agent said
            self.answer = self.db.table_hash()

    def result(self) -> dict[str, Any]:
        correct = is_correct(self.task, self.answer)
        return {
            "index": self.task.index, "type": self.task.type, "outcome": self.outcome.value if self.outcome else None,
            "answer": self.answer, "expected": self.task.expected, "correct": correct, "rounds": self.rounds,
            "turns": self.turns, "messages": self.messages,
        }


# ------------------------------------------------------------------------------------- scoring


def is_correct(task: DBTask, answer: str) -> bool:
    """AgentBench's comparison. `ast.literal_eval` replaces its bare `eval` (same result on literals)."""
    if task.is_modification:
        return answer == task.answer_md5
    try:
        given = list(ast.literal_eval(answer.strip()))
    except Exception:  # not a literal, or not iterable: AgentBench falls back to the raw text
        given = [answer]
    gold = list(task.label)
    if len(given) == 1 and len(gold) == 1:
        try:
            return float(given[0]) == float(gold[0])
        except (ValueError, TypeError):
            return given[0] == gold[0]
    try:
        return set(given) == set(gold)
    except TypeError:
        return False


def category(task_type: str) -> str:
    """AgentBench's category: INSERT and UPDATE are their own, everything else counts as SELECT."""
    return task_type if task_type in ("INSERT", "UPDATE") else "SELECT"


def compute_metrics(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-type and per-category accuracy, overall_cat_accuracy (x100, as the paper reports) and outcomes."""

    def accuracy(rows: list[dict[str, Any]]) -> float | None:
        return round(100.0 * sum(r["correct"] for r in rows) / len(rows), 2) if rows else None

    metrics: dict[str, Any] = {"tasks": len(results)}
    for typ in SELECT_SUBTYPES + MODIFICATION_TYPES:
        value = accuracy([r for r in results if r["type"] == typ])
        if value is not None:
            metrics[f"{typ}_accuracy"] = value
    categories = {c: accuracy([r for r in results if category(r["type"]) == c]) for c in CATEGORIES}
    for name, value in categories.items():
        metrics[f"{name}_accuracy"] = value if value is not None else 0.0
    # AgentBench averages the three categories, counting an absent one as 0.
    metrics["overall_cat_accuracy"] = round(sum(v or 0.0 for v in categories.values()) / len(CATEGORIES), 2)
    metrics["outcomes"] = {o.value: sum(r["outcome"] == o.value for r in results) for o in Outcome}
    first_turn_valid = [r["turns"][0]["action"] in ("operation", "answer") for r in results if r["turns"]]
    metrics["first_turn_valid_format"] = round(100.0 * sum(first_turn_valid) / max(len(results), 1), 2)
    return metrics
