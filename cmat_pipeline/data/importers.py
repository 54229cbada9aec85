"""Importers that turn existing agent data into the pipeline's own shapes.

Two kinds of input:

* AgentBench task files -> task-pool entries (`import_agentbench_tasks`). dbbench (`dev.jsonl`,
  `standard.jsonl`, or a .json list of entries with `table`) and os_interaction (`.json` list of
  entries with `description` + `evaluation`); the format is detected from the content. Task files are
  curated inputs, so anything malformed is a `DataError` naming the file, the line/item and the key.

* Conversation files -> trajectory records (`import_conversations`, see records.py). ShareGPT /
  AgentInstruct (`{"conversations": [{"from", "value"}], "id"}`) or OpenAI (`{"messages": [{"role",
  "content"}]}`) items in .json (a list), .jsonl or .parquet. Conversation dumps are noisy, so an item
  that cannot be mapped comes back as a `Rejected` (for the quarantine) instead of stopping the import.

    from cmat_pipeline.data.importers import import_agentbench_tasks, import_conversations
    pool = import_agentbench_tasks("../shared/agentbench/dbbench/dev.jsonl")
    records, rejected = import_conversations("agentinstruct_db.parquet", source="agentinstruct")
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from cmat_pipeline.data.records import DOMAINS, BadLine, content_id, iter_jsonl, make_record
from cmat_pipeline.envs.dbbench import SYSTEM_PROMPT, task_from_entry
from cmat_pipeline.errors import DataError

# Checker scripts AgentBench ships for os_interaction; any other script is task-specific ("custom:<file>").
OS_BUILTIN_CHECKERS = ("integer-match", "string-match", "size-match")

# AgentInstruct id prefix ("db_12") -> our domain. Only db and os have environments here; the other
# AgentInstruct tasks are kept as general agent data.
AGENTINSTRUCT_DOMAINS = {"db": "db", "os": "os", "alfworld": "general", "webshop": "general",
                         "kg": "general", "mind2web": "general"}
AGENTINSTRUCT_ID_RE = re.compile(r"([A-Za-z0-9]+)[_-]")

ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
            "model": "assistant", "system": "system"}
CONVERSATION_KEYS = ("conversations", "messages")
# An agent's acknowledgement of an environment prompt (AgentInstruct: "Ok.", "OK", "OK.").
ACK_RE = re.compile(r"ok\.?", re.IGNORECASE)


@dataclass
class Rejected:
    """An input item that could not be imported; kept for the quarantine, never dropped."""

    where: str  # "file:line N" or "file:item N"
    reason: str
    raw: Any  # the original item (or line text)


# ------------------------------------------------------------------------------------- reading


def _check_exists(path: Path) -> None:
    if not path.is_file():
        raise DataError(f"{path}: file not found")


def _read_json_list(path: Path) -> list[Any]:
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:line {err.lineno}: not valid JSON: {err.msg}") from None
    if not isinstance(items, list):
        raise DataError(f"{path}: a .json file must hold a list of items, got {type(items).__name__}")
    return items


def _iter_items(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, item) for a .json list or a JSONL file; bad JSONL lines come back as `BadLine`."""
    if path.suffix.lower() == ".json":
        for i, item in enumerate(_read_json_list(path)):
            yield f"{path}:item {i}", item
    else:
        for lineno, obj in iter_jsonl(path):
            yield f"{path}:line {lineno}", obj


def _read_parquet(path: Path) -> list[Any]:
    # pyarrow's to_pylist gives plain lists and dicts; pandas would hand nested columns back as numpy arrays.
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ... for a damaged file
        raise DataError(f"{path}: not a readable parquet file: {err}") from None


# ----------------------------------------------------------------------------------- task files


def _task_format(path: Path, items: list[tuple[str, Any]]) -> str:
    """"db" or "os", decided by which format's signature keys the entries carry. dbbench entries also
    have `description` and `evaluation`, so `table` is what tells them apart."""
    dicts = [(w, e) for w, e in items if isinstance(e, dict)]
    db = next((w for w, e in dicts if "table" in e), None)
    os_ = next((w for w, e in dicts if "table" not in e and "description" in e and "evaluation" in e), None)
    if db and os_:
        raise DataError(f"{path}: mixes dbbench entries ({db}) and os_interaction entries ({os_})")
    if db or os_:
        return "db" if db else "os"
    raise DataError(f"{path}: neither a dbbench task file (entries with `table`) nor an os_interaction "
                    "task file (entries with `description` and `evaluation`)")


def _db_entry(entry: dict[str, Any], index: int, where: str) -> tuple[str, str]:
    task = task_from_entry(entry, index, where)  # validates and names the missing key
    return task.type, task.question


def _os_checker(evaluation: dict[str, Any], where: str) -> str:
    if "match" in evaluation:
        return "match"
    if "check" not in evaluation:
        raise DataError(f"{where}: missing key `evaluation.match` or `evaluation.check`")
    check = evaluation["check"]
    scripts = check if isinstance(check, list) else [check]
    files = []
    for script in scripts:
        if script is None:  # placeholder: the checker compares with the example solution's output
            if "example" not in evaluation:
                raise DataError(f"{where}: missing key `evaluation.example` (the check compares with its output)")
        elif isinstance(script, dict) and isinstance(script.get("file"), str):
            files.append(script["file"])
        elif isinstance(script, dict) and "code" in script:
            files.append("<inline>")
        else:
            raise DataError(f"{where}: `evaluation.check` entries must be null or {{file|code}} objects, "
                            f"got {script!r}")
    if not files:
        raise DataError(f"{where}: missing key `evaluation.check[].file`")
    stem = PurePosixPath(files[0]).stem
    if len(files) == 1 and stem in OS_BUILTIN_CHECKERS:
        return stem
    return "custom:" + "+".join(files)


def _os_entry(entry: Any, where: str) -> tuple[str, str]:
    if not isinstance(entry, dict):
        raise DataError(f"{where}: a task must be a JSON object, got {type(entry).__name__}")
    for key in ("description", "evaluation"):
        if key not in entry:
            raise DataError(f"{where}: missing key `{key}`")
    if not isinstance(entry["description"], str) or not entry["description"].strip():
        raise DataError(f"{where}: `description` must be non-empty text")
    if not isinstance(entry["evaluation"], dict):
        raise DataError(f"{where}: `evaluation` must be an object, got {type(entry['evaluation']).__name__}")
    return _os_checker(entry["evaluation"], where), entry["description"]


def import_agentbench_tasks(path: str | Path) -> list[dict[str, Any]]:
    """Task-pool entries from an AgentBench dbbench or os_interaction task file.

    Each entry: {"id", "domain": "db"|"os", "source": "agentbench:<file name>", "task_type" (dbbench
    type, or the OS checker kind: match, integer-match, string-match, size-match, custom:<file>),
    "question" (dbbench: DBTask.question; os: description), "task" (the entry unchanged)}.
    """
    path = Path(path)
    _check_exists(path)
    items = list(_iter_items(path))
    for where, item in items:
        if isinstance(item, BadLine):
            raise DataError(f"{where}: {item.reason}")
    if not items:
        raise DataError(f"{path}: holds no tasks")
    domain = _task_format(path, items)
    pool = []
    for index, (where, entry) in enumerate(items):
        task_type, question = _db_entry(entry, index, where) if domain == "db" else _os_entry(entry, where)
        pool.append({"id": content_id(domain, entry), "domain": domain, "source": f"agentbench:{path.name}",
                     "task_type": task_type, "question": question, "task": entry})
    return pool


# ---------------------------------------------------------------------------- conversation files


class _Unmappable(Exception):
    """An item that becomes a `Rejected`; the message is the reason."""


def _turn(turn: Any, i: int) -> dict[str, str]:
    if not isinstance(turn, dict):
        raise _Unmappable(f"turn {i} is a {type(turn).__name__}, not an object")
    # ShareGPT uses from/value, OpenAI role/content; parquet structs may carry both with nulls.
    role = turn.get("from") if turn.get("from") is not None else turn.get("role")
    content = turn.get("value") if turn.get("value") is not None else turn.get("content")
    if role not in ROLE_MAP:
        raise _Unmappable(f"turn {i} has unknown role {role!r}")
    if not isinstance(content, str):
        raise _Unmappable(f"turn {i} ({role}) has {type(content).__name__} content, not text")
    if not content.strip():
        raise _Unmappable(f"turn {i} ({role}) is empty")
    return {"role": ROLE_MAP[role], "content": content}  # verbatim: training data keeps its whitespace


def _messages(item: Any) -> list[dict[str, str]]:
    if not isinstance(item, dict):
        raise _Unmappable(f"a {type(item).__name__}, not an object")
    key = next((k for k in CONVERSATION_KEYS if item.get(k) is not None), None)
    if key is None:
        raise _Unmappable("no `conversations` or `messages` key")
    turns = item[key]
    if not isinstance(turns, list):
        raise _Unmappable(f"`{key}` is a {type(turns).__name__}, not a list of turns")
    if not turns:
        raise _Unmappable(f"`{key}` has no turns")
    return [_turn(t, i) for i, t in enumerate(turns)]


def _opens_with_env_prompt(messages: list[dict[str, str]], i: int) -> bool:
    """True when user turn i is an environment's protocol prompt, so the task is the next user turn."""
    if messages[i]["content"].strip() == SYSTEM_PROMPT.strip():
        return True
    reply = messages[i + 1] if i + 1 < len(messages) else None
    return reply is not None and reply["role"] == "assistant" and bool(ACK_RE.fullmatch(reply["content"].strip()))


def _question(messages: list[dict[str, str]]) -> str:
    """The task's user turn: after AgentBench's prompt and one-shot example when the conversation opens with
    them (an OS or KG one-shot is answered by actions, not "Ok."), else after an environment's prompt."""
    from cmat_pipeline.chat_format import fixed_protocol_turns

    skip = fixed_protocol_turns(messages)
    users = [i for i, m in enumerate(messages) if m["role"] == "user" and i >= skip]
    if not users:
        raise _Unmappable("no user turn to take the question from")
    if len(users) > 1 and _opens_with_env_prompt(messages, users[0]):
        return messages[users[1]]["content"]
    return messages[users[0]]["content"]


def _id_prefix(import_id: Any) -> str | None:
    """The AgentInstruct task family of an id ("db_12" -> "db"), or None for other ids."""
    match = AGENTINSTRUCT_ID_RE.match(import_id) if isinstance(import_id, str) else None
    prefix = match.group(1).lower() if match else None
    return prefix if prefix in AGENTINSTRUCT_DOMAINS else None


def _record(item: Any, where: str, path: Path, domain: str | None, source: str, assume_correct: bool) -> dict[str, Any]:
    messages = _messages(item)
    question = _question(messages)
    import_id = item.get("id")
    prefix = _id_prefix(import_id)
    return make_record(
        domain=domain or AGENTINSTRUCT_DOMAINS.get(prefix, "general"), source=source, teacher="import",
        task_type=prefix or "general", question=question, messages=messages, outcome="completed",
        correct=assume_correct, reward=1.0 if assume_correct else 0.0,
        # no id in the item: the location still leads back to it
        meta={"import_file": str(path), "import_id": import_id if import_id is not None else where.rsplit(":", 1)[1]},
    )


def import_conversations(path: str | Path, *, domain: str | None = None, source: str | None = None,
                         assume_correct: bool = True) -> tuple[list[dict[str, Any]], list[Rejected]]:
    """Trajectory records (teacher "import") from a ShareGPT/AgentInstruct or OpenAI-style conversation
    file (.json list, .jsonl, .parquet), and the items that could not be mapped.

    `domain` overrides the domain inferred from AgentInstruct ids (db_*, os_*; anything else is
    general); `source` defaults to "import:<file name>". AgentInstruct keeps only successful
    trajectories, hence `assume_correct`. Every item ends up in exactly one of the two lists.
    """
    path = Path(path)
    if domain is not None and domain not in DOMAINS:
        raise DataError(f"domain must be one of {', '.join(DOMAINS)}, got {domain!r}")
    _check_exists(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        items: Iterator[tuple[str, Any]] = ((f"{path}:item {i}", row) for i, row in enumerate(_read_parquet(path)))
    elif suffix in (".json", ".jsonl", ".ndjson"):
        items = _iter_items(path)
    else:
        raise DataError(f"{path}: unsupported conversation file type {path.suffix!r} (use .json, .jsonl or .parquet)")
    source = source or f"import:{path.name}"
    records, rejected = [], []
    for where, item in items:
        if isinstance(item, BadLine):
            rejected.append(Rejected(where, item.reason, item.text))
            continue
        try:
            records.append(_record(item, where, path, domain, source, assume_correct))
        except _Unmappable as err:
            rejected.append(Rejected(where, str(err), item))
    return records, rejected
