"""The Checker's corrections of failed episodes: eq. 8's supervised targets on the Assistant's own states.

The User poses training tasks, whose reference solution (the gold SQL) the Checker knows. When an episode
fails, the Checker finds the first turn that left the reference plan (a vetoed action, a statement that is
not the next gold one, an early or wrong answer) and writes the corrected action for that state: the next
gold statement, or the answer once every gold statement has run. The reflection loss then trains the actor
on that action in the conversation as it really was (its own earlier turns, recalled lessons included).
Successful episodes that fixed their own mistakes keep their own corrected turns (tune.corrected_turns).

OS tasks (os_correction): the reference plan is the task's `example` solution as the example-solution oracle
plays it (run the script, then answer with its output); the first turn whose action differs from the
oracle's in the same state gets the oracle's action. Tasks judged by `match` get none: their oracle answers
without running anything, which the shell Checker rightly vetoes.

KG questions (kg_correction): the reference plan is the question's recorded action program (the generated
questions have one; AgentBench's files do not, and get no correction); the first turn whose call or answer
differs from the program's gets the program's next step.
"""

from __future__ import annotations

import random
from typing import Any, Sequence

from cmat_pipeline.chat_format import fixed_protocol_turns
from cmat_pipeline.data.rationales import explain_sql
from cmat_pipeline.data.teachers import _action, final_answer
from cmat_pipeline.envs.dbbench import DBTask
from cmat_pipeline.envs.kg import FINAL_RE, KGTask, first_call, oracle_reply, split_arguments
from cmat_pipeline.envs.os_interaction import ExampleOraclePolicy, OSTask, parse_action


def _assistant_positions(messages: Sequence[dict[str, Any]]) -> list[int]:
    """Message index of each assistant turn after the fixed protocol turns (turn t is messages[positions[t]])."""
    skip = fixed_protocol_turns(messages)
    return [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= skip]


def _normal(sql: str) -> str:
    return " ".join(sql.strip().rstrip(";").split()).lower()


def first_deviation(turns: Sequence[dict[str, Any]], gold_sql: Sequence[str]) -> tuple[int, int] | None:
    """(turn index, gold statements run before it) of the first turn off the reference plan, or None when
    every turn followed it (the episode then failed for another reason, e.g. the round limit)."""
    ran = 0
    for t, turn in enumerate(turns):
        follows = (not turn.get("vetoed") and turn["action"] == "operation" and ran < len(gold_sql)
                   and _normal(turn.get("sql", "")) == _normal(gold_sql[ran]))
        if not follows:
            return t, ran
        ran += 1
    return None


def correction(result: dict[str, Any], task: DBTask) -> dict[str, Any] | None:
    """{"turn", "messages"}: the conversation up to the deviating turn followed by the corrected action, for a
    failed episode; None for a correct one, or when nothing can be corrected."""
    if result["correct"] or not result["turns"] or not task.gold_sql:
        return None
    found = first_deviation(result["turns"], task.gold_sql)
    if found is None:
        return None
    turn, ran = found
    prefix = result["messages"][:_assistant_positions(result["messages"])[turn]]
    rng = random.Random(task.question)
    if ran < len(task.gold_sql):
        target = _action(explain_sql(task.gold_sql[ran], rng), task.gold_sql[ran])
    else:  # every gold statement ran: answer (the table for a modification, else the last result's values)
        target = final_answer(task, prefix[-1]["content"])
    return {"turn": turn, "messages": [*prefix, {"role": "assistant", "content": target}]}


def _os_action(response: str) -> tuple[str, str]:
    action = parse_action(response)
    return action.kind, " ".join((action.content or "").split())


def os_correction(result: dict[str, Any], task: OSTask) -> dict[str, Any] | None:
    """The OS counterpart of `correction`: the oracle's action at the first turn that left its plan."""
    if result["correct"] or not result["turns"] or task.example is None or task.match is not None:
        return None
    messages = result["messages"]
    oracle = ExampleOraclePolicy([])
    for turn, position in enumerate(_assistant_positions(messages)):
        prefix = messages[:position]
        oracle.register(prefix, task)
        target = oracle.turn(prefix)
        if result["turns"][turn].get("vetoed") or _os_action(messages[position]["content"]) != _os_action(target):
            return {"turn": turn, "messages": [*prefix, {"role": "assistant", "content": target}]}
    return None


def _kg_action(response: str, task: KGTask) -> tuple[str, ...]:
    """A KG turn as what it does: ("answer", k), (tool, *arguments with entity names as ids) or ("invalid",)."""
    final = FINAL_RE.findall(response)
    if final:
        return "answer", final[0]
    found = first_call(response)
    if found is None:
        return ("invalid",)
    try:
        return found[0], *(task.entities.get(a.strip(), a.strip()) for a in split_arguments(found[1], found[0]))
    except ValueError:
        return ("invalid",)


def kg_correction(result: dict[str, Any], task: KGTask) -> dict[str, Any] | None:
    """The KG counterpart of `correction`: the action program's step at the first turn that left it."""
    if result["correct"] or not result["turns"] or not task.actions:
        return None
    messages = result["messages"]
    for turn, position in enumerate(_assistant_positions(messages)):
        prefix = messages[:position]
        target = oracle_reply(task, prefix)
        if result["turns"][turn].get("vetoed") or _kg_action(messages[position]["content"], task) != _kg_action(target, task):
            return {"turn": turn, "messages": [*prefix, {"role": "assistant", "content": target}]}
    return None
