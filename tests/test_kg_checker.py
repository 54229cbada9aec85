"""The KG Checker: each AgentBench KG call is judged before it reaches the store; the action program corrects
a failed episode."""

from __future__ import annotations

import pytest

from cmat_pipeline.cmat.corrections import kg_correction
from cmat_pipeline.cmat.kg_checker import CheckedKGEpisode, KGChecker
from cmat_pipeline.envs.kg import (EmbeddedSPARQLClient, KGOraclePolicy, KGSession, KGTask, demo_store,
                                   generated_tasks, training_tasks)
from cmat_pipeline.runtime.rollout import run_episodes
from tests.conftest import failed_episode

TASK = KGTask(0, "which films did the director of Harbor make?", {"Harbor": "m.0fil00", "Ada": "m.0per01"},
              frozenset({"m.0fil01"}), ("get_relations(Harbor)", "get_neighbors(Harbor, film.film.directed_by)"))
RELATIONS = ("Action: get_relations(Harbor)", "Observation: [film.film.directed_by, film.film.country]")
NEIGHBORS = ("Action: get_neighbors(Harbor, film.film.directed_by)",
             "Observation: variable #0, which are instances of people.person")
COUNTRY = ("Action: get_neighbors(m.0fil00, film.film.country)",
           "Observation: variable #1, which are instances of location.country")
ATTRIBUTES = ("Action: get_attributes(#0)", "Observation: [people.person.height_meters]")


def act(call: str) -> str:
    return f"Thought: I take the next step.\nAction: {call}"


@pytest.mark.parametrize("response, history, issue, says", [
    ("I think the answer is Ada.", [], "format", "Action: tool(arguments)"),
    ("Action: get_relations(Harbor", [], "format", "no closing parenthesis"),
    ("Final Answer: #0", [RELATIONS], "premature_answer", "No variable exists yet"),
    ("Final Answer: #1", [RELATIONS, NEIGHBORS], "unknown_variable", "#0 to #0"),
    (act("get_relations(#2)"), [RELATIONS, NEIGHBORS], "unknown_variable", "#2 does not exist"),
    (act("get_neighbors(Harbor)"), [RELATIONS], "arity", "takes 2 argument(s), not 1"),
    (act("get_relations(Harbour)"), [], "unknown_entity", "Did you mean Harbor?"),
    (act("count(Harbor)"), [RELATIONS], "needs_variable", "takes variables"),
    (act("get_neighbors(Ada, film.film.directed_by)"), [RELATIONS], "unseen_relation", "get_relations(m.0per01) first"),
    (act("get_neighbors(Harbor, film.film.directd_by)"), [RELATIONS], "unseen_relation",
     "Did you mean film.film.directed_by?"),
    (act("argmax(#0, height)"), [RELATIONS, NEIGHBORS], "unseen_attribute", "get_attributes(#0) first"),
    (act("argmin(#0, height_meters)"), [RELATIONS, NEIGHBORS, ATTRIBUTES], "unseen_attribute",
     "Did you mean people.person.height_meters?"),
    (act("intersection(#0, #1)"), [RELATIONS, NEIGHBORS, COUNTRY], "type_mismatch", "people.person"),
])
def test_checker_vetoes_a_call_that_cannot_run(response, history, issue, says):
    verdict = KGChecker(veto_reward=-0.25).check(TASK, response, history)
    assert verdict.vetoed and verdict.issues == [issue] and verdict.reward == -0.25
    assert says in verdict.feedback


@pytest.mark.parametrize("response, history", [
    (act("get_relations(Harbor)"), []),
    (act("get_relations(m.0fil00)"), []),  # an id works like the entity's name
    (act("get_neighbors(m.0fil00, film.film.directed_by)"), [RELATIONS]),  # relations seen for the same entity
    (act("argmax(#0, people.person.height_meters)"), [RELATIONS, NEIGHBORS, ATTRIBUTES]),
    (act("count(#0)"), [RELATIONS, NEIGHBORS]),
    ("Thought: done.\nFinal Answer: #0", [RELATIONS, NEIGHBORS]),
])
def test_checker_passes_a_call_that_can_run(response, history):
    assert KGChecker().check(TASK, response, history).ok


def test_repeating_a_call_passes_with_a_warning():
    verdict = KGChecker().check(TASK, act("get_relations(Harbor)"), [RELATIONS])
    assert verdict.ok and verdict.issues == ["repeated_call"] and "already ran" in verdict.feedback


def test_the_oracle_is_never_vetoed_on_any_generated_question():
    """The Checker's rules agree with the environment: every action program runs without a veto and answers."""
    tasks = training_tasks() + generated_tasks()
    client = EmbeddedSPARQLClient(demo_store())
    results = run_episodes((lambda t=t: CheckedKGEpisode(t, KGSession(client), 15, checker=KGChecker())
                            for t in tasks), KGOraclePolicy(tasks), 8)
    assert len(results) == 60 and all(r["correct"] for r in results)
    assert not [t for r in results for t in r["turns"] if t["issues"]]


def test_a_vetoed_call_never_reaches_the_store():
    class Counting(EmbeddedSPARQLClient):
        queries = 0

        def select(self, query):
            Counting.queries += 1
            return super().select(query)

    task = training_tasks()[0]  # who directed The Quiet Harbor?
    episode = CheckedKGEpisode(task, KGSession(Counting(demo_store())), 15, checker=KGChecker())
    episode.step(act("get_neighbors(The Quiet Harbor, film.film.directed_by)"))  # before get_relations
    assert Counting.queries == 0 and episode.turns[0]["vetoed"] and episode.turns[0]["issues"] == ["unseen_relation"]
    assert episode.messages[-1]["content"].startswith("Checker: ")
    episode.step(act("get_relations(The Quiet Harbor)"))
    assert Counting.queries > 0 and episode.executed[0][1].startswith("Observation: [")


def _failed(task: KGTask, *turns: tuple[str, str | None]) -> dict:
    return failed_episode(task.initial_messages(), *turns)


def test_checker_corrects_a_failed_kg_episode_with_the_action_program():
    opening = TASK.initial_messages()
    wrong_relation = kg_correction(_failed(TASK, (act("get_relations(m.0fil00)"), RELATIONS[1]),
                                           (act("get_neighbors(Harbor, film.film.country)"), COUNTRY[1]),
                                           ("Final Answer: #0", None)), TASK)
    assert wrong_relation["turn"] == 1  # the id for the name is the same call as the program's first step
    assert wrong_relation["messages"][:len(opening)] == opening
    assert wrong_relation["messages"][-1]["content"].endswith("Action: get_neighbors(Harbor, film.film.directed_by)")
    wrong_answer = kg_correction(_failed(TASK, (act("get_relations(Harbor)"), RELATIONS[1]),
                                         (act("get_neighbors(Harbor, film.film.directed_by)"), NEIGHBORS[1]),
                                         (act("count(#0)"), "Observation: variable #1, which is a number"),
                                         ("Final Answer: #1", None)), TASK)
    assert wrong_answer["turn"] == 2 and wrong_answer["messages"][-1]["content"].endswith("Final Answer: #0")
    assert kg_correction(_failed(TASK, ("x", None)) | {"correct": True}, TASK) is None
    assert kg_correction(_failed(TASK, ("x", None)), KGTask(1, "q", {}, frozenset({"a"}))) is None  # no program
