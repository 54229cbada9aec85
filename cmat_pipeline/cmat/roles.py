"""The User and the Assistant's self-reflection: who poses CMAT's training tasks, and what the Assistant
learns from a failure.

User: samples tasks from the training pool (never an evaluation split). With the `by_success` curriculum
a task type is drawn with weight (1 - its smoothed success rate) + a floor, so the types the Assistant
fails get more practice while none disappears; then a task of that type, without repetition inside an
iteration. Its statistics persist in checkpoints, so a resumed run samples what the uninterrupted one would.

Self-reflection (long-term memory, eqs. 6-7): after a failed or vetoed episode the Assistant is asked what
it should do differently; a usable answer (one short sentence, no action) is stored, otherwise a lesson
from what went wrong (the Checker's issues, the outcome) is.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from typing import Any, Sequence

from cmat_pipeline.cmat.memory import template_reflection

REFLECT_PROMPT = ("The task was not solved ({why}). In one short sentence, write the lesson you will follow "
                  "next time. Do not write an action.")
FLOOR = 0.1  # every task type keeps at least this weight


class User:
    """Task sampler with a success-based curriculum over task types."""

    def __init__(self, pool: Sequence[dict[str, Any]], curriculum: str = "by_success"):
        self.pool, self.curriculum = list(pool), curriculum
        self.by_type: dict[str, list[int]] = defaultdict(list)
        for i, entry in enumerate(self.pool):
            self.by_type[entry["type"][0]].append(i)
        self.stats: dict[str, list[int]] = {t: [0, 0] for t in self.by_type}  # type -> [successes, episodes]

    def weights(self) -> dict[str, float]:
        if self.curriculum == "uniform":
            return {t: float(len(ix)) for t, ix in self.by_type.items()}
        # Laplace-smoothed success rate: an unseen type starts at 0.5
        return {t: FLOOR + 1.0 - (s + 1) / (n + 2) for t, (s, n) in self.stats.items()}

    def sample(self, n: int, rng: random.Random) -> list[dict[str, Any]]:
        """n distinct tasks (fewer only if the pool is smaller)."""
        left = {t: list(ix) for t, ix in self.by_type.items()}
        chosen: list[int] = []
        while len(chosen) < n and any(left.values()):
            weights = {t: w for t, w in self.weights().items() if left[t]}
            kind = rng.choices(list(weights), weights=list(weights.values()))[0]
            chosen.append(left[kind].pop(rng.randrange(len(left[kind]))))
        return [self.pool[i] for i in chosen]

    def record(self, task_type: str, correct: bool) -> None:
        self.stats[task_type][0] += int(correct)
        self.stats[task_type][1] += 1

    def state(self) -> dict[str, list[int]]:
        return {t: list(v) for t, v in self.stats.items()}

    def load_state(self, stats: dict[str, list[int]]) -> None:
        for t, v in stats.items():
            if t in self.stats:
                self.stats[t] = list(v)


def needs_reflection(result: dict[str, Any]) -> bool:
    return not result["correct"] or any(t.get("vetoed") for t in result["turns"])


def reflection_request(result: dict[str, Any]) -> list[dict[str, str]]:
    """The episode's conversation followed by the request for a lesson."""
    why = result["outcome"] if not result["correct"] else "an action was rejected by the checker"
    if result["outcome"] == "completed" and not result["correct"]:
        why = "the answer was wrong"
    return [*result["messages"], {"role": "user", "content": REFLECT_PROMPT.format(why=why)}]


def usable_reflection(text: str | None) -> str | None:
    """A one-sentence lesson of 4-40 words without an action (dbbench `Action:`, OS `Act:`, KG `Final Answer:`),
    or None."""
    if not text:
        return None
    text = " ".join(text.split())
    words = len(text.split())
    if re.search(r"\bAct(ion)?:|Final Answer:", text) or "```" in text or not 4 <= words <= 40 or not re.search(r"[A-Za-z]", text):
        return None
    return text


def lesson_for(result: dict[str, Any], reflection: str | None) -> tuple[str, str]:
    """(lesson, source): the Assistant's own reflection when usable, else the template for its issues."""
    own = usable_reflection(reflection)
    if own:
        return own, "self"
    issues = [issue for turn in result["turns"] for issue in turn.get("issues", [])]
    return template_reflection(issues, result["outcome"], result.get("domain", "db")), "template"
