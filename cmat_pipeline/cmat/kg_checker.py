"""The Checker for the knowledge-graph environment: verifies each KG tool call *before* it runs.

For every proposed assistant turn (AgentBench KG format) it checks, in order:
  format            the turn has an `Action: tool(...)` line naming one of the seven tools, or `Final Answer: #k`;
  premature_answer  an answer comes only after some call produced a variable;
  unknown_variable  every `#k` (arguments and the answer) is a variable the episode already produced;
  arity             the tool gets as many arguments as AgentBench's API takes;
  unknown_entity    an argument that is not a variable is one of the question's entities (or a Freebase id);
  needs_variable    intersection, get_attributes, argmax, argmin and count take variables only;
  unseen_relation   get_neighbors uses a relation that get_relations returned for the same argument;
  unseen_attribute  argmax / argmin use an attribute that get_attributes returned for the same variable;
  type_mismatch     intersection joins two variables of the same type.
A failed check is a veto: the call does not run, the feedback (with a did-you-mean where one is close) becomes
the observation, the turn gets `veto_reward`. Repeating a call that already ran passes with a warning.
The history is what the episode ran: (action line, observation) of each call that succeeded.

    checker = KGChecker()
    verdict = checker.check(task, response, history=[("Action: get_relations(Paris)", "Observation: [...]")])
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Sequence

from cmat_pipeline.cmat.checker import CheckerInTheLoop, Verdict
from cmat_pipeline.envs.kg import (FINAL_RE, ID_RE, KGEpisode, KGTask, action_kind, first_call, split_arguments)

FORMAT_HINT = ("Reply with 'Thought: ...' and then one line 'Action: tool(arguments)' with one of get_relations, "
               "get_neighbors, intersection, get_attributes, argmax, argmin, count; or 'Final Answer: #k'.")
ARITY = {"get_relations": 1, "get_neighbors": 2, "intersection": 2, "get_attributes": 1, "argmax": 2, "argmin": 2,
         "count": 1}
VARIABLES_ONLY = ("intersection", "get_attributes", "argmax", "argmin", "count")
NEW_VARIABLE = re.compile(r"variable #(\d+), which (?:are instances of (\S+)|is a number)")
LISTED = re.compile(r"^Observation: \[(.*)\]$", re.S)

Call = tuple[str, str]  # (action line, observation) of a call that ran


@dataclass
class EpisodeState:
    """What the calls that ran so far produced: variable types, and the lists get_relations / get_attributes
    returned per (resolved) argument."""

    types: list[str]
    relations: dict[str, list[str]]
    attributes: dict[str, list[str]]
    calls: set[str]

    @classmethod
    def of(cls, task: KGTask, history: Sequence[Call]) -> "EpisodeState":
        state = cls([], {}, {}, set())
        for line, observation in history:
            found = first_call(line)
            if found is None:
                continue
            name, _ = found
            args = [resolve(a, task) for a in split_arguments(line, name)]
            state.calls.add(f"{name}({', '.join(args)})")
            made = NEW_VARIABLE.search(observation)
            listed = LISTED.match(observation.strip())
            if made:
                state.types.append(made.group(2) or "type.int")
            elif listed and name in ("get_relations", "get_attributes"):
                values = [v.strip() for v in listed.group(1).split(",") if v.strip()]
                (state.relations if name == "get_relations" else state.attributes)[args[0]] = values
        return state


def resolve(argument: str, task: KGTask) -> str:
    """An argument as the environment uses it: `#k`, or an entity's id for its name."""
    argument = argument.strip()
    return argument if argument.startswith("#") else task.entities.get(argument, argument)


def _did_you_mean(value: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(value, list(options), n=1, cutoff=0.6)
    return f" Did you mean {close[0]}?" if close else ""


@dataclass
class KGChecker:
    """Rule-based verification of AgentBench KG actions against what the episode has seen (nothing runs)."""

    veto_reward: float = -0.5

    def veto(self, issue: str, feedback: str) -> Verdict:
        return Verdict(False, feedback, [issue], self.veto_reward)

    def check(self, task: KGTask, response: str, history: Sequence[Call] = ()) -> Verdict:
        """Judge `response` given the calls this episode already ran (in order)."""
        kind = action_kind(response)
        if kind == "invalid":
            return self.veto("format", f"Your reply has no action to run. {FORMAT_HINT}")
        state = EpisodeState.of(task, history)
        if kind == "answer":
            return self._check_answer(int(FINAL_RE.findall(response)[0]), state)
        name, line = first_call(response)  # type: ignore[misc]  # action_kind found a tool call
        try:
            raw = split_arguments(line, name)
        except ValueError:
            return self.veto("format", f"`{name}(` has no closing parenthesis. {FORMAT_HINT}")
        args = [resolve(a, task) for a in raw]
        return self._check_call(task, name, args, state)

    def _check_answer(self, variable: int, state: EpisodeState) -> Verdict:
        if not state.types:
            return self.veto("premature_answer", "No variable exists yet: call get_neighbors (after get_relations) "
                                                 "to produce one before you answer.")
        if variable >= len(state.types):
            return self.veto("unknown_variable", f"#{variable} does not exist; the variables so far are "
                                                 f"#0 to #{len(state.types) - 1}.")
        return Verdict(True)

    def _check_call(self, task: KGTask, name: str, args: list[str], state: EpisodeState) -> Verdict:
        if len(args) != ARITY[name]:
            return self.veto("arity", f"{name} takes {ARITY[name]} argument(s), not {len(args)}. {FORMAT_HINT}")
        first = args[0]
        for arg in args[:1] if name in ("get_neighbors", "argmax", "argmin") else args:
            if arg.startswith("#"):
                if not arg[1:].isdigit() or int(arg[1:]) >= len(state.types):
                    return self.veto("unknown_variable", f"{arg} does not exist; " + (
                        f"the variables so far are #0 to #{len(state.types) - 1}." if state.types else "no variable exists yet."))
            elif name in VARIABLES_ONLY:
                return self.veto("needs_variable", f"{name} takes variables (e.g. #0), not {arg}.")
            elif not ID_RE.match(arg):
                names = list(task.entities)
                return self.veto("unknown_entity", f"{arg} is not an entity of this question; use one of "
                                                   f"[{', '.join(names)}] or a variable.{_did_you_mean(arg, names)}")
        if name == "get_neighbors" and args[1] not in state.relations.get(first, ()):
            seen = state.relations.get(first)
            if seen is None:
                return self.veto("unseen_relation", f"Call get_relations({first}) first and pick one of its relations.")
            return self.veto("unseen_relation", f"{args[1]} is not a relation of {first}; get_relations returned "
                                                f"[{', '.join(seen)}].{_did_you_mean(args[1], seen)}")
        if name in ("argmax", "argmin") and args[1] not in state.attributes.get(first, ()):
            seen = state.attributes.get(first)
            if seen is None:
                return self.veto("unseen_attribute", f"Call get_attributes({first}) first and pick one of its attributes.")
            return self.veto("unseen_attribute", f"{args[1]} is not an attribute of {first}; get_attributes returned "
                                                 f"[{', '.join(seen)}].{_did_you_mean(args[1], seen)}")
        if name == "intersection":
            left, right = (state.types[int(a[1:])] for a in args)
            if left != right:
                return self.veto("type_mismatch", f"{args[0]} holds {left} and {args[1]} holds {right}: intersection "
                                                  "needs two variables of the same type.")
        if f"{name}({', '.join(args)})" in state.calls:
            return Verdict(True, f"Note: {name}({', '.join(args)}) already ran; its result is above.", ["repeated_call"])
        return Verdict(True)


@dataclass
class CheckedKGEpisode(CheckerInTheLoop, KGEpisode):
    """A KG episode with the Checker in the loop: a vetoed call never reaches the SPARQL endpoint."""

    def parse(self, response: str):
        return SimpleNamespace(kind=action_kind(response))

    def ran(self, turn: dict) -> Call | None:
        observation = turn.get("observation", "")
        if turn["action"] != "tool" or not observation.startswith("Observation:"):
            return None
        found = first_call(turn["response"])
        return (found[1], observation) if found else None
