"""Gold-SQL oracle for dbbench: plays each task with its own gold SQL through the real environment.

It proves the environment end to end (execution, observation format, table hash, scoring): on the dev
split it must score 100 except where the upstream data itself is defective (see docs/BENCHMARKS.md).
"""

from __future__ import annotations

import ast
import json
from typing import Sequence

from cmat_pipeline.envs.dbbench import DBTask
from cmat_pipeline.errors import CmatError
from cmat_pipeline.runtime.policy import Conversation, PolicyOutput


def _values(observation: str) -> list[str]:
    """Flatten an observation such as "[('a',), ('b',)]" into ['a', 'b']."""
    try:
        rows = ast.literal_eval(observation)
    except (ValueError, SyntaxError):
        return [observation]
    values = [str(cell) for row in rows for cell in row]
    # dbbench labels write an empty result as ["none"]
    return values or ["none"]


class GoldSQLPolicy:
    """Runs the task's gold statements one per turn, then answers with the last result's values."""

    name = "oracle:gold-sql"

    def __init__(self, tasks: Sequence[DBTask]):
        self.by_question = {task.question: task for task in tasks}

    def _turn(self, conversation: Conversation) -> str:
        # The question is turn 2 after AgentBench's prompt, or turn 0 without one (evaluate.prompt: none).
        q = next((i for i, m in enumerate(conversation) if m["content"] in self.by_question), None)
        if q is None:
            raise CmatError(f"{self.name}: the conversation holds none of the oracle's task questions")
        task = self.by_question[conversation[q]["content"]]
        statements_run = (len(conversation) - q - 1) // 2
        if statements_run < len(task.gold_sql):
            sql = task.gold_sql[statements_run].strip().replace("\n", " ")
            return f"I will run the gold statement.\nAction: Operation\n```sql\n{sql}\n```"
        answer = [] if task.is_modification or not statements_run else _values(conversation[-1]["content"])
        return f"Done.\nAction: Answer\nFinal Answer: {json.dumps(answer, ensure_ascii=False)}"

    def generate(self, conversations: Sequence[Conversation]) -> list[PolicyOutput]:
        return [PolicyOutput(self._turn(c)) for c in conversations]
