"""Long-term memory: self-reflections written after failed or vetoed episodes, recalled for similar tasks.

CMAT's short-term memory is the trajectory in the prompt; its long-term memory (paper eqs. 6-7) holds
lessons. A reflection is stored with the task's question and type in SQLite (one file, survives
restarts and travels with checkpoints), and recalled by word-set similarity to a new question, same
task type first. Recalled lessons are put before the question as a short "Lessons from earlier tasks"
note, so the Assistant's protocol (AgentBench's prompt and action format) is unchanged.

    memory = ReflectionMemory("artifacts/cmat/memory.sqlite")
    memory.add("How many ...?", "counting", "Quote table names with spaces in backticks.")
    memory.recall("How many ...?", "counting", k=2)   # -> ["Quote table names ..."]
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

WORD = re.compile(r"\w+")


def _words(text: str) -> set[str]:
    return set(WORD.findall(text.lower()))


def _jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 0.0


class ReflectionMemory:
    """Reflections in SQLite, recalled by similarity of the task's question."""

    def __init__(self, path: str | Path = ":memory:", min_similarity: float = 0.2):
        self.path, self.min_similarity = str(path), min_similarity
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(self.path)
        self.conn.execute("CREATE TABLE IF NOT EXISTS reflections (id INTEGER PRIMARY KEY, question TEXT NOT NULL, "
                          "task_type TEXT NOT NULL, reflection TEXT NOT NULL, UNIQUE (question, reflection))")
        self.conn.commit()

    def __len__(self) -> int:
        return self.conn.execute("SELECT COUNT(*) FROM reflections").fetchone()[0]

    def add(self, question: str, task_type: str, reflection: str) -> bool:
        """Store a lesson; the same lesson for the same question is stored once. Returns whether it was new."""
        reflection = " ".join(reflection.split())
        if not reflection:
            return False
        cursor = self.conn.execute("INSERT OR IGNORE INTO reflections (question, task_type, reflection) VALUES (?, ?, ?)",
                                   (question, task_type, reflection))
        self.conn.commit()
        return cursor.rowcount == 1

    def recall(self, question: str, task_type: str, k: int = 2) -> list[str]:
        """Up to k distinct lessons of the most similar stored questions (same task type ranks first)."""
        if k <= 0:
            return []
        query = _words(question)
        scored = []
        for stored, stored_type, reflection in self.conn.execute("SELECT question, task_type, reflection FROM reflections"):
            similarity = _jaccard(query, _words(stored))
            if similarity >= self.min_similarity:
                scored.append((stored_type == task_type, similarity, reflection))
        scored.sort(key=lambda item: (item[0], item[1]), reverse=True)
        lessons: list[str] = []
        for _, _, reflection in scored:
            if reflection not in lessons:
                lessons.append(reflection)
            if len(lessons) == k:
                break
        return lessons

    def close(self) -> None:
        self.conn.close()


def with_lessons(question: str, lessons: list[str]) -> str:
    """The question turn with recalled lessons in front (unchanged when there are none)."""
    if not lessons:
        return question
    notes = "\n".join(f"- {lesson}" for lesson in lessons)
    return f"Lessons from earlier tasks:\n{notes}\n\n{question}"


def prompt_with_lessons(task, memory: "ReflectionMemory | None", k: int) -> list[dict[str, str]]:
    """A task's opening messages (dbbench, OS or KG), its question turn led by up to k recalled lessons."""
    messages = task.initial_messages()
    lessons = memory.recall(task.question, task.type, k) if memory is not None else []
    messages[-1] = {"role": "user", "content": with_lessons(messages[-1]["content"], lessons)}
    return messages


# Per domain: a lesson for each Checker issue (cmat/checker.py, cmat/osbench_checker.py, cmat/kg_checker.py), then
# one for hitting the round limit, then the fallback.
LESSONS = {
    "db": {
        "format": "Always end with 'Action: Operation' and one ```sql block, or 'Action: Answer' and 'Final Answer: [...]'.",
        "unknown_table": "Use the exact table name from the task, in backticks.",
        "unknown_column": "Use the exact column names from the headers, in backticks.",
        "destructive": "Only modify the table when the task asks for it, and always with a WHERE condition.",
        "premature_answer": "Run a query and read its result before answering.",
        "answer_format": "Write the final answer as a list, e.g. Final Answer: [\"x\"].",
        "dry_run_error": "Check the SQL syntax before running it.",
        "parse_error": "Write one valid MySQL statement per turn.",
        "task_limit_exceeded": "Answer as soon as a query gives the result; do not keep querying.",
        None: "Check each result against the question before answering.",
    },
    "os": {
        "format": "Reply with 'Think: ...' and then one of 'Act: bash' with a ```bash block, 'Act: finish' or 'Act: answer(...)'.",
        "premature_answer": "Run a command and read its output before answering.",
        "empty_command": "Put the command in a ```bash block right after 'Act: bash'.",
        "parse_error": "Close every quote in the bash code.",
        "destructive": "Never delete or overwrite system files or whole folders; change only what the task names.",
        "task_limit_exceeded": "Answer as soon as a command prints the result; do not keep exploring.",
        None: "Check the command's output against the question before answering.",
    },
    "kg": {
        "format": "Reply with 'Thought: ...' and one line 'Action: tool(arguments)', or 'Final Answer: #k'.",
        "premature_answer": "Produce a variable with get_neighbors before giving the final answer.",
        "unknown_variable": "Only use variables #k that an observation has already named.",
        "arity": "Give each tool exactly its arguments, e.g. get_neighbors(entity, relation).",
        "unknown_entity": "Use the entity names exactly as the question lists them, or a variable.",
        "needs_variable": "Call get_neighbors first; intersection, count, get_attributes, argmax and argmin take variables.",
        "unseen_relation": "Call get_relations first and copy one of the relations it returns.",
        "unseen_attribute": "Call get_attributes first and copy one of the attributes it returns.",
        "type_mismatch": "Only intersect two variables of the same type.",
        "task_limit_exceeded": "Answer with the variable that holds the result as soon as it exists.",
        None: "Follow the relations the question names, one hop at a time, then answer with the last variable.",
    },
}


def template_reflection(issues: list[str], outcome: str | None, domain: str = "db") -> str:
    """A lesson from what went wrong, for when the Assistant's own reflection is unusable: the first issue
    with a lesson, else the round limit's, else the domain's fallback."""
    lessons = LESSONS[domain]
    for issue in issues:
        if issue in lessons:
            return lessons[issue]
    return lessons["task_limit_exceeded"] if outcome == "task_limit_exceeded" else lessons[None]
