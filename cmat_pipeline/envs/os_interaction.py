"""AgentBench OS environment ("os_interaction"), as of the CMAT era, played in a fresh sandbox per task.

Protocol (AgentBench's OS task, text kept where the model sees it):
  user: INSTRUCTION + one-shot problem / assistant, user, ...: the one-shot example /
  user: "Now, I will start a new problem in a new OS. My problem is:\\n\\n" + description
  assistant: "Think: ...\\n\\nAct: bash\\n\\n```bash\\n...\\n```"  -> runs in the episode's persistent shell
  assistant: "Act: answer(...)" or "Act: finish"                   -> the episode ends and is judged
At most `max_rounds` (8) assistant turns. Output over 800 characters is cut to 780 and marked.

Task files are read as AgentBench ships them (dev.json, training.json): `create.init` scripts (text, or
{code} / {file} with a language, or a list) run as independent processes before the episode, `start`
runs in the shell (background jobs), `evaluation` is `match` ({answer, strip} or {regex}, or plain text)
or `check`: a list whose entries are null (= run the `example` script with the answer as argument, its
output becomes the next argument), a checker script, or code. AgentBench's standard checkers
(integer-match, string-match, size-match, containing, in) are built in; a task that needs a script file
which is not in `os.scripts_dir` (a custom checker, an init file) is `unsupported`: counted, not played.

    tasks = load_os_tasks("../shared/agentbench/os_interaction/dev.json")
    episode = OSEpisode(tasks[0], BwrapSandbox(cfg).start(), cfg)
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Sequence

from cmat_pipeline.config import OSConfig
from cmat_pipeline.envs.dbbench import Outcome
from cmat_pipeline.envs.sandbox import CommandResult, Sandbox, Script
from cmat_pipeline.errors import DataError
from cmat_pipeline.runtime.policy import Conversation, PolicyOutput

INSTRUCTION = """You are an assistant that will act like a person, I will play the role of linux(ubuntu) operating system. Your goal is to implement the operations required by me or answer to the question proposed by me. For each of your turn, you should first think what you should do, and then take exact one of the three actions: "bash", "finish" or "answer". 

1. If you think you should execute some bash code, take bash action, and you should print like this:

Think: put your thought here.

Act: bash

```bash
# put your bash code here
```

2. If you think you have finished the task, take finish action, and you should print like this:

Think: put your thought here.

Act: finish

3. If you think you have got the answer to the question, take answer action, and you should print like this:

Think: put your thought here.

Act: answer(Your answer to the question should be put in this pair of parentheses)

If the output is too long, I will truncate it. The truncated output is not complete. You have to deal with the truncating problem by yourself. Attention, your bash code should not contain any input operation. Once again, you should take only exact one of the three actions in each turn.

"""
ONE_SHOT = [
    {"role": "user", "content": 'tell me how many files are in the directory "/etc"?'},
    {"role": "assistant", "content": "Think: To count the files in /etc, I need to print all the files in it.\n\n"
                                     "Act: bash\n\n```bash\nls /etc\n```"},
    {"role": "user", "content": "The output of the OS:\ncpi cron.hourly fuse.conf iproute2 lvm networkd-dispatcher "
                                "protocols selinux tmpfiles.d [truncated because the output is too long]"},
    {"role": "assistant", "content": "Think: The output has been truncated because it is too long, so I need to "
                                     "count files by script directly.\n\nAct: bash\n\n```bash\nls -1 /etc | wc -l\n```"},
    {"role": "user", "content": "The output of the OS:\n220"},
    {"role": "assistant", "content": "Think: Now I get the answer, it is 220.\n\nAct: answer(220)"},
]
NEW_PROBLEM = "Now, I will start a new problem in a new OS. My problem is:\n\n"
OBSERVATION = "The output of the OS:\n\n"
EMPTY_OBSERVATION = "The output of the OS is empty."
TRUNCATED = "\n[truncated because the output is too long]"

ACT_RE = re.compile(r"Act:\s*(.+)")
BASH_BLOCK_RE = re.compile(r"```bash\n(.*?)\n```", re.DOTALL)


# ------------------------------------------------------------------------------------- checkers


def _norm_newline(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


SIZE_UNITS = {"B": 1, "Byte": 1, "K": 1 << 10, "KB": 1 << 10, "M": 1 << 20, "MB": 1 << 20, "G": 1 << 30,
              "GB": 1 << 30, "T": 1 << 40, "TB": 1 << 40, "P": 1 << 50, "PB": 1 << 50}


def parse_size(text: str) -> float:
    """'4.0K' -> 4096.0. AgentBench parses with int() and tries 'B' before 'KB', which rejects du -h's
    own output ('8.0K') and '12KB'; here the longest unit matches first and the number may be decimal."""
    text = text.strip()
    for unit in sorted(SIZE_UNITS, key=len, reverse=True):
        if text.endswith(unit):
            return float(text[:-len(unit)]) * SIZE_UNITS[unit]
    return float(text)


def _integer_match(a: str, b: str) -> bool:
    return int(a) == int(b)


def _string_match(a: str, b: str) -> bool:
    return _norm_newline(a).strip() == _norm_newline(b).strip()


def _size_match(a: str, b: str) -> bool:
    return parse_size(a) == parse_size(b)


def _containing(a: str, b: str) -> bool:
    return _norm_newline(b).strip() in _norm_newline(a).strip()


def _in(a: str, b: str) -> bool:
    return _norm_newline(a).strip() in _norm_newline(b).strip()


# AgentBench's checker scripts, by file stem: called with argv[1] = the answer, argv[2] = the example's output.
STANDARD_CHECKERS: dict[str, Callable[[str, str], bool]] = {
    "integer-match": _integer_match, "string-match": _string_match, "size-match": _size_match,
    "containing": _containing, "in": _in,
}


def run_standard_checker(name: str, params: Sequence[str]) -> bool:
    """A standard checker as its script would exit: any error (a missing argument, a non-number) fails."""
    try:
        return bool(STANDARD_CHECKERS[name](params[0], params[1]))
    except (ValueError, IndexError, OverflowError):
        return False


# ------------------------------------------------------------------------------------- tasks

CheckStep = None | str | Script  # None: the example script; str: a standard checker; Script: custom code


@dataclass(frozen=True)
class OSTask:
    """One os_interaction task."""

    index: int
    description: str
    init: tuple[Script, ...] = ()
    start: Script | None = None
    match: dict[str, Any] | None = None
    check: tuple[CheckStep, ...] = ()
    example: Script | None = None
    image: str = ""
    labels: tuple[str, ...] = ()
    unsupported: str = ""  # why this task cannot be played here ('' = supported)
    source_file: str = ""

    @property
    def checker(self) -> str:
        """The evaluation kind: match, a standard checker name, or custom."""
        if self.match is not None:
            return "match"
        named = [step for step in self.check if step in STANDARD_CHECKERS]
        return named[0] if named and all(s is None or s in STANDARD_CHECKERS for s in self.check) else "custom"

    @property
    def question(self) -> str:
        return NEW_PROBLEM + self.description

    @property
    def type(self) -> str:
        """The task type the cmat User's curriculum and long-term memory group OS tasks under."""
        return "os"

    def initial_messages(self) -> list[dict[str, str]]:
        first = {"role": "user", "content": INSTRUCTION + "Now, my problem is:\n\n" + ONE_SHOT[0]["content"]}
        return [first, *(dict(m) for m in ONE_SHOT[1:]), {"role": "user", "content": self.question}]


def protocol_turns(messages: Sequence[dict[str, str]]) -> int:
    """6 when `messages` open with AgentBench's OS prompt and one-shot example (the same for every task:
    context, never a training target), else 0."""
    fixed = OSTask(0, "").initial_messages()[:6]
    return 6 if [dict(m) for m in messages[:6]] == fixed and len(messages) > 6 else 0


class _Missing(Exception):
    """A script file the task needs is not available; the message names it."""


def _load_script(obj: Any, scripts_dir: str, where: str, key: str) -> Script | None:
    """AgentBench's load_script: text is bash; an object has a language (default bash) and code or a file."""
    if obj is None:
        return None
    if isinstance(obj, str):
        return Script("bash", obj)
    if not isinstance(obj, dict):
        raise DataError(f"{where}: `{key}` must be a script (text or an object with code or file), got {obj!r}")
    language = obj.get("language", "bash")
    if "code" in obj:
        return Script(language, str(obj["code"]))
    if "file" not in obj:
        raise DataError(f"{where}: `{key}` has neither `code` nor `file`: {obj!r}")
    path = Path(scripts_dir, obj["file"]) if scripts_dir else None
    if path is None or not path.is_file():
        raise _Missing(f"{key} file {obj['file']} not shipped" + (f" (not in {scripts_dir})" if scripts_dir else ""))
    return Script(language, path.read_text(encoding="utf-8"))


def _load_check_step(obj: Any, scripts_dir: str, where: str) -> CheckStep:
    if isinstance(obj, dict) and "file" in obj:
        stem = PurePosixPath(obj["file"]).stem
        if stem in STANDARD_CHECKERS:
            return stem
    return _load_script(obj, scripts_dir, where, "evaluation.check")


def task_from_entry(entry: Any, index: int, where: str, scripts_dir: str = "") -> OSTask:
    """An OSTask from one entry, following AgentBench's loader; a missing script file makes it unsupported."""
    if not isinstance(entry, dict):
        raise DataError(f"{where}: a task must be a JSON object, got {type(entry).__name__}")
    description = entry.get("description")
    if not isinstance(description, str) or not description.strip():
        raise DataError(f"{where}: `description` must be non-empty text")
    evaluation = entry.get("evaluation")
    if not isinstance(evaluation, dict) or not ("match" in evaluation or "check" in evaluation):
        raise DataError(f"{where}: `evaluation` must be an object with `match` or `check`")
    # AgentBench reads `create` only when it is an object (dev.json item 10 has a list there: no init).
    create = entry.get("create") if isinstance(entry.get("create"), dict) else {}
    fields: dict[str, Any] = {"image": str(create.get("image", "")), "labels": tuple(entry.get("labels", ()))}
    missing = []

    def attempt(load: Callable[[], Any], default: Any = None) -> Any:
        try:
            return load()
        except _Missing as err:
            missing.append(str(err))
            return default

    init = create.get("init")
    fields["init"] = tuple(s for s in (attempt(lambda obj=obj: _load_script(obj, scripts_dir, where, "create.init"))
                                       for obj in (init if isinstance(init, list) else [init])) if s is not None)
    fields["start"] = attempt(lambda: _load_script(entry.get("start"), scripts_dir, where, "start"))
    if "match" in evaluation:
        match = evaluation["match"]
        fields["match"] = {"answer": match, "strip": True} if isinstance(match, str) else match
        if not isinstance(fields["match"], dict) or not ({"answer", "regex"} & set(fields["match"])):
            raise DataError(f"{where}: `evaluation.match` must be text or an object with `answer` or `regex`")
    else:
        check = evaluation["check"]
        fields["check"] = tuple(attempt(lambda obj=obj: _load_check_step(obj, scripts_dir, where), "?")
                                for obj in (check if isinstance(check, list) else [check]))
        fields["example"] = attempt(lambda: _load_script(evaluation.get("example"), scripts_dir, where,
                                                         "evaluation.example"))
        if None in fields["check"] and fields["example"] is None and not missing:
            missing.append("evaluation.check runs the example script, but the task has no example")
    return OSTask(index=index, description=description, unsupported="; ".join(missing),
                  source_file=where.split(":")[0], **fields)


def load_os_tasks(path: str | Path, scripts_dir: str = "", limit: int = 0) -> list[OSTask]:
    """Read an os_interaction task file (.json list or object, or .jsonl). Errors name the file and item."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: os_interaction task file not found. Point os.tasks at AgentBench's "
                        "data/os_interaction dev.json (e.g. ../shared/agentbench/os_interaction/dev.json)")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            items = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            items = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON: {err}") from None
    items = [items] if isinstance(items, dict) else items
    if not isinstance(items, list) or not items:
        raise DataError(f"{path}: must hold a non-empty list of tasks")
    tasks = [task_from_entry(e, i, f"{path}:item {i}", scripts_dir) for i, e in enumerate(items)]
    return tasks[:limit] if limit else tasks


# ------------------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class OSAction:
    """What an assistant turn asks for, by AgentBench's own rules."""

    kind: str  # "bash" | "answer" | "finish" | "invalid_action" | "invalid_format"
    content: str | None = None  # the bash code, or the answer


def parse_action(text: str) -> OSAction:
    """AgentBench's extract_action: the last `Act:` line that is bash, finish or answer(...) decides; bash
    runs every ```bash block of the turn. No `Act:` line at all is invalid_format; `Act:` lines none of
    which is usable are invalid_action (AgentBench counts both as invalid action)."""
    acts = ACT_RE.findall(text)
    for act in reversed(acts):
        lowered = act.lower()
        if lowered.startswith("bash"):
            return OSAction("bash", "\n\n".join(BASH_BLOCK_RE.findall(text)))
        if lowered.startswith("finish"):
            return OSAction("finish")
        if lowered.startswith("answer"):
            content = act[6:].strip()
            left, right = content.find("("), content.rfind(")")
            if left != -1 and right != -1:
                return OSAction("answer", content[left + 1:right])
    return OSAction("invalid_action" if acts else "invalid_format")


def observation(result: CommandResult, max_chars: int, timeout_s: float) -> str:
    """The next user turn after a bash action, as AgentBench writes it."""
    text = result.output
    if result.timed_out:
        text += f"\n[the command was killed after {timeout_s:g} s]"
    if len(text) > max_chars:
        text = text[:max_chars - 20] + TRUNCATED
    return OBSERVATION + text if text else EMPTY_OBSERVATION


# ------------------------------------------------------------------------------------- episodes


def prepare(task: OSTask, sandbox: Sandbox) -> list[dict[str, Any]]:
    """Run the task's init scripts (independent processes) and its start command (in the shell)."""
    log = []
    for script in task.init:
        result = sandbox.run_script(script)
        log.append({"step": "init", "exit_code": result.exit_code, "output": result.output[-300:]})
    if task.start is not None:
        result = sandbox.shell(task.start.code)
        log.append({"step": "start", "exit_code": result.exit_code, "output": result.output[-300:]})
    return log


def judge(task: OSTask, sandbox: Sandbox, answer: str | None) -> tuple[bool, list[dict[str, Any]]]:
    """AgentBench's judgement of a committed answer (None for `finish`), with a log of each check step."""
    if task.match is not None:
        if isinstance(answer, str) and task.match.get("strip", False):
            answer = answer.strip()
        if "answer" in task.match:
            return answer == task.match["answer"], []
        return isinstance(answer, str) and re.search(task.match["regex"], answer) is not None, []
    params, log = [str(answer)], []
    for step in task.check:
        if isinstance(step, str):
            ok = run_standard_checker(step, params)
            log.append({"step": step, "ok": ok})
            if not ok:
                return False, log
            params.append("")
            continue
        result = sandbox.run_script(task.example if step is None else step, params)
        log.append({"step": "example" if step is None else "script", "exit_code": result.exit_code,
                    "output": result.output[-300:]})
        if result.exit_code != 0:
            return False, log
        params.append(result.output)
    return True, log


@dataclass
class OSEpisode:
    """One task in its own sandbox. Feed it assistant turns with `step` until `done`; it is judged when it
    ends (while the sandbox still runs), so close the sandbox only after `result()`."""

    task: OSTask
    sandbox: Sandbox
    cfg: OSConfig
    messages: list[dict[str, str]] = field(default_factory=list)
    rounds: int = 0
    done: bool = False
    outcome: Outcome | None = None
    answer: str | None = None
    correct: bool = False
    turns: list[dict[str, Any]] = field(default_factory=list)
    setup_log: list[dict[str, Any]] = field(default_factory=list)
    judge_log: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.messages:
            self.messages = self.task.initial_messages()
        self.setup_log = prepare(self.task, self.sandbox)

    def step(self, response: str | None) -> None:
        """Apply one assistant turn; `None` means the policy hit its context limit."""
        if response is None:
            self._finish(Outcome.CONTEXT_LIMIT)
            return
        self.messages.append({"role": "assistant", "content": response})
        action = parse_action(response)
        self.turns.append({"response": response, "action": action.kind})
        self.rounds += 1
        if action.kind == "bash":
            self.run_command(action.content or "")
            if self.rounds >= self.cfg.max_rounds:
                self._finish(Outcome.TASK_LIMIT)
        elif action.kind in ("answer", "finish"):
            self.answer = action.content
            self._finish(Outcome.COMPLETED)
        else:
            self._finish(Outcome.INVALID_ACTION if action.kind == "invalid_action" else Outcome.INVALID_FORMAT)

    def run_command(self, command: str) -> None:
        result = self.sandbox.shell(command)
        seen = observation(result, self.cfg.max_observation_chars, self.cfg.command_timeout_s)
        self.turns[-1].update(command=command, observation=seen, exit_code=result.exit_code,
                              timed_out=result.timed_out)
        self.messages.append({"role": "user", "content": seen})

    def _finish(self, outcome: Outcome) -> None:
        self.outcome, self.done = outcome, True
        if outcome == Outcome.COMPLETED:
            self.correct, self.judge_log = judge(self.task, self.sandbox, self.answer)

    def result(self) -> dict[str, Any]:
        return {
            "index": self.task.index, "checker": self.task.checker, "outcome": self.outcome.value if self.outcome else None,
            "answer": self.answer, "correct": self.correct, "rounds": self.rounds, "turns": self.turns,
            "setup": self.setup_log, "judge": self.judge_log, "messages": self.messages,
            "init_failed": any(s["exit_code"] != 0 for s in self.setup_log if s["step"] == "init"),
        }


def unsupported_result(task: OSTask) -> dict[str, Any]:
    """The row an unsupported task gets instead of an episode."""
    return {"index": task.index, "checker": task.checker, "outcome": "unsupported", "unsupported": task.unsupported,
            "answer": None, "correct": False, "rounds": 0, "turns": [], "messages": []}


def compute_os_metrics(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy (x100) over the supported tasks and over all, by checker; outcomes; unsupported reasons."""
    played = [r for r in results if r["outcome"] != "unsupported"]

    def accuracy(rows: list[dict[str, Any]]) -> float:
        return round(100.0 * sum(r["correct"] for r in rows) / len(rows), 2) if rows else 0.0

    reasons = Counter(r["unsupported"] for r in results if r["outcome"] == "unsupported")
    metrics: dict[str, Any] = {
        "tasks": len(results), "supported": len(played), "unsupported": len(results) - len(played),
        "accuracy": accuracy(played), "accuracy_all_tasks": accuracy(results),
    }
    for checker in sorted({r["checker"] for r in played}):
        metrics[f"{checker}_accuracy"] = accuracy([r for r in played if r["checker"] == checker])
    metrics["outcomes"] = {o.value: sum(r["outcome"] == o.value for r in played) for o in Outcome}
    metrics["init_failed"] = sum(r.get("init_failed", False) for r in played)
    valid = [r["turns"][0]["action"] in ("bash", "answer", "finish") for r in played if r["turns"]]
    metrics["first_turn_valid_format"] = round(100.0 * sum(valid) / max(len(played), 1), 2)
    metrics["unsupported_reasons"] = dict(reasons)
    return metrics


# ------------------------------------------------------------------------------------- oracle


def _as_bash(script: Script) -> str:
    """A bash action that runs the script (task files only hold bash and python)."""
    return script.code if script.language == "bash" else f"python3 - <<'CMAT_EOF'\n{script.code}\nCMAT_EOF"


class ExampleOraclePolicy:
    """The example-solution teacher: runs a check task's `example` script as one bash turn, then answers with
    its output (custom checks: finish); answers a match task with its expected answer. Identifies the task
    by its description, or by the conversation object where descriptions repeat (`register`)."""

    name = "oracle:os-example"

    def __init__(self, tasks: Sequence[OSTask]):
        counts = Counter(t.description for t in tasks)
        self.by_question = {t.question: t for t in tasks if counts[t.description] == 1}
        self.by_conversation: dict[int, OSTask] = {}

    def register(self, conversation: Conversation, task: OSTask) -> None:
        self.by_conversation[id(conversation)] = task

    def task_of(self, conversation: Conversation) -> OSTask:
        task = self.by_conversation.get(id(conversation)) or self.by_question.get(conversation[6]["content"])
        if task is None:
            raise DataError("os oracle: this conversation's task is unknown or ambiguous (its description repeats); "
                            "register(conversation, task) when the episode starts")
        return task

    def turn(self, conversation: Conversation) -> str:
        task = self.task_of(conversation)
        ran = len(conversation) > 7
        if task.match is not None:
            return f"Think: The expected answer is known.\n\nAct: answer({task.match.get('answer', '')})"
        if not ran and task.example is not None:
            return ("Think: I will run the reference solution and read its output.\n\n"
                    f"Act: bash\n\n```bash\n{_as_bash(task.example)}\n```")
        if task.checker == "custom":
            return "Think: The reference solution has run, so the task is done.\n\nAct: finish"
        seen = conversation[-1]["content"] if ran else ""
        output = seen[len(OBSERVATION):] if seen.startswith(OBSERVATION) else ""
        return f"Think: The output is the answer.\n\nAct: answer({output.strip()})"

    def generate(self, conversations: Sequence[Conversation]) -> list[PolicyOutput]:
        return [PolicyOutput(self.turn(c)) for c in conversations]
