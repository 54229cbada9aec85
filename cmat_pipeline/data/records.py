"""The trajectory record every data stage reads and writes (one JSON object per line).

    {"id": "db-3f2a...", "domain": "db", "source": "synth:2026-11-16", "teacher": "oracle",
     "task_type": "counting", "task": {...dbbench entry...}, "question": "...",
     "messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...],
     "outcome": "completed", "correct": true, "reward": 1.0, "meta": {...}}

`messages` is the whole conversation in the environment's own protocol (for dbbench: the AgentBench
prompt as the first user turn, "Ok.", the question, then assistant actions and observations).
`task` holds the native task (a dbbench entry) so augmentation can rebuild and replay it.
`flatten` turns records into the flat table the Great Expectations suites check.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from cmat_pipeline.errors import DataError

DOMAINS = ("db", "os", "kg", "general")
ROLES = ("system", "user", "assistant")
RECORD_FIELDS = ("id", "domain", "source", "teacher", "task_type", "task", "question", "messages",
                 "outcome", "correct", "reward", "meta")
# Columns of the flat frame the expectation suites read (see `flatten`).
FRAME_COLUMNS = ("id", "domain", "source", "teacher", "task_type", "question", "question_key", "outcome", "correct", "reward",
                 "n_messages", "n_assistant_turns", "n_chars", "role_problem", "action_problem", "type_share")


def content_id(domain: str, *parts: Any) -> str:
    """Stable id from content: the same task or conversation always gets the same id."""
    digest = hashlib.sha1(json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()
    return f"{domain}-{digest[:20]}"


def task_question(text: Any) -> Any:
    """The task's own question: without the lead-in an environment writes before every task of its domain.

    A played OS record's question is its prompt turn, "Now, I will start a new problem in a new OS. My
    problem is:" + the task, while an evaluation file holds the task alone; the shared words would also
    pull every OS question toward every other. Matched on words, so case and punctuation variants go too."""
    if not isinstance(text, str):
        return text
    match = _lead_in().match(text)
    return text[match.end():] if match else text


@functools.lru_cache(maxsize=1)
def _lead_in() -> re.Pattern[str]:
    from cmat_pipeline.envs.os_interaction import NEW_PROBLEM

    # Any spacing and punctuation between the words, then the colon and blank lines, not the task's first character.
    return re.compile(r"\W*" + r"\W+".join(re.findall(r"\w+", NEW_PROBLEM)) + r"\s*:?\s*", re.IGNORECASE)


def normalize_question(text: Any) -> str:
    """The task's question (`task_question`), lower case, punctuation dropped, whitespace collapsed: the key
    for exact-duplicate and evaluation-overlap checks (so "How many rows?" and "how many rows" collide)."""
    text = task_question(text)
    if not isinstance(text, str):
        return ""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def make_record(*, domain: str, source: str, teacher: str, task_type: str, question: str,
                messages: list[dict[str, str]], task: dict[str, Any] | None = None, outcome: str | None = None,
                correct: bool = False, reward: float = 0.0, meta: dict[str, Any] | None = None,
                id: str | None = None) -> dict[str, Any]:
    """A record with every field, id derived from the conversation unless given."""
    return {
        "id": id or content_id(domain, question, messages),
        "domain": domain, "source": source, "teacher": teacher, "task_type": task_type, "task": task,
        "question": question, "messages": messages, "outcome": outcome, "correct": bool(correct),
        "reward": float(reward), "meta": meta or {},
    }


# ------------------------------------------------------------------------------------------ files


@dataclass(frozen=True)
class BadLine:
    """A line of a JSONL file that is not a JSON object (kept verbatim for the quarantine)."""

    path: str
    lineno: int
    text: str
    reason: str


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any] | BadLine]]:
    """(line number, object) for each non-empty line; unreadable lines come back as `BadLine`."""
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                yield lineno, BadLine(str(path), lineno, line.rstrip("\n"), f"not valid JSON: {err.msg}")
                continue
            if not isinstance(obj, dict):
                yield lineno, BadLine(str(path), lineno, line.rstrip("\n"), f"a {type(obj).__name__}, not a JSON object")
                continue
            yield lineno, obj


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Every object of a JSONL file; the first bad line is an error naming file and line."""
    rows = []
    for lineno, obj in iter_jsonl(path):
        if isinstance(obj, BadLine):
            raise DataError(f"{path}:{lineno}: {obj.reason}")
        rows.append(obj)
    return rows


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write atomically (temp file + rename) so a killed stage never leaves half a file; returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    os.replace(tmp, path)
    return count


def repair_tail(path: Path) -> int:
    """Cut a half-written last line left by a killed writer; returns how many bytes were dropped."""
    if not path.exists():
        return 0
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return 0
    keep = data.rfind(b"\n") + 1
    with path.open("r+b") as f:
        f.truncate(keep)
    return len(data) - keep


# ------------------------------------------------------------------------------------- checks


def role_problem(messages: Any) -> str | None:
    """None when `messages` is a list of {role, content} turns: an optional system turn, then user and
    assistant alternating, starting with user and ending with assistant. Otherwise what is wrong."""
    if not isinstance(messages, list) or not messages:
        return "messages must be a non-empty list"
    expected = "user"
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or set(msg) - {"role", "content"} or "role" not in msg:
            return f"message {i} must be an object with `role` and `content`"
        role, content = msg.get("role"), msg.get("content")
        if not isinstance(content, str) or not content.strip():
            return f"message {i} ({role}) has empty or non-text content"
        if i == 0 and role == "system":
            continue
        if role != expected:
            return f"message {i} has role {role!r} where {expected!r} was expected"
        expected = "assistant" if role == "user" else "user"
    if messages[-1].get("role") != "assistant":
        return "the conversation must end with an assistant turn"
    return None


def action_turns(messages: list[dict[str, Any]]) -> list[tuple[int, str]]:
    """(index, content) of the assistant's own turns: its decisions, after the fixed protocol turns (the
    prompt's "Ok." and the one-shot example's replies, the same in every conversation of a domain)."""
    from cmat_pipeline.chat_format import fixed_protocol_turns

    return [(i, messages[i].get("content", "")) for i in range(fixed_protocol_turns(messages), len(messages))
            if messages[i].get("role") == "assistant"]


def _parse_problem(messages: list[dict[str, str]], kind_of: Any, valid: tuple[str, ...], name: str) -> str | None:
    for i, content in action_turns(messages):
        kind = kind_of(content)
        if kind not in valid:
            return f"message {i}: assistant turn does not parse as an AgentBench {name} action ({kind})"
    return None


def _db_action_problem(messages: list[dict[str, str]]) -> str | None:
    from cmat_pipeline.envs.dbbench import parse_action

    return _parse_problem(messages, lambda text: parse_action(text).kind, ("operation", "answer"), "DB")


def _os_action_problem(messages: list[dict[str, str]]) -> str | None:
    from cmat_pipeline.envs.os_interaction import parse_action

    return _parse_problem(messages, lambda text: parse_action(text).kind, ("bash", "answer", "finish"), "OS")


def _kg_action_problem(messages: list[dict[str, str]]) -> str | None:
    from cmat_pipeline.envs.kg import action_kind

    return _parse_problem(messages, action_kind, ("tool", "answer"), "KG")


# Domain -> checker of the assistant turns' action format; domains without one (general chat) pass.
ACTION_CHECKERS = {"db": _db_action_problem, "os": _os_action_problem, "kg": _kg_action_problem}


def action_problem(record: dict[str, Any]) -> str | None:
    """None when every assistant turn parses under the record's environment action format."""
    checker = ACTION_CHECKERS.get(record.get("domain"))
    messages = record.get("messages")
    if checker is None or role_problem(messages) is not None:
        return None  # role problems are reported on their own
    return checker(messages)


def record_chars(record: dict[str, Any]) -> int:
    messages = record.get("messages")
    if not isinstance(messages, list):
        return 0
    return sum(len(m.get("content") or "") for m in messages if isinstance(m, dict) and isinstance(m.get("content"), str))


def flatten(records: list[dict[str, Any]]):
    """The flat pandas frame the expectation suites check: one row per record, FRAME_COLUMNS.

    Derived columns (`role_problem`, `action_problem`: None or the reason; `type_share`: the share of
    the record's task_type among this batch's agent records, None for general-instruction records, whose
    share is `mix.general_ratio`'s business) turn structural rules into simple column expectations.
    Missing or mistyped fields are kept as they are (None, wrong type) so the suite reports them.
    """
    import pandas as pd

    types = [r.get("task_type") for r in records]
    agent = [r.get("domain") != "general" for r in records]
    counts: dict[Any, int] = {}
    for t, is_agent in zip(types, agent):
        counts[t] = counts.get(t, 0) + is_agent
    n_agent = sum(agent)
    rows = []
    for record, task_type, is_agent in zip(records, types, agent):
        messages = record.get("messages")
        turns = messages if isinstance(messages, list) else []
        rows.append({
            "id": record.get("id"), "domain": record.get("domain"), "source": record.get("source"),
            "teacher": record.get("teacher"), "task_type": task_type, "question": record.get("question"),
            "question_key": normalize_question(record.get("question")),
            "outcome": record.get("outcome"), "correct": record.get("correct"), "reward": record.get("reward"),
            "n_messages": len(turns),
            "n_assistant_turns": sum(isinstance(m, dict) and m.get("role") == "assistant" for m in turns),
            "n_chars": record_chars(record),
            "role_problem": role_problem(messages), "action_problem": action_problem(record),
            "type_share": counts[task_type] / n_agent if is_agent else None,
        })
    return pd.DataFrame(rows, columns=list(FRAME_COLUMNS))
