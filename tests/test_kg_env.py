"""The knowledge-graph environment: AgentBench's seven tools on the generated graph (answers worked out by
hand from the generator: city i lies in country i % 4, film i is directed by person 4*i + 1, ...), the same
through a real SPARQL HTTP endpoint on loopback, the episode loop and the oracle."""

from __future__ import annotations

import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyoxigraph
import pytest

from cmat_pipeline.config import KGConfig
from cmat_pipeline.envs.dbbench import Outcome
from cmat_pipeline.envs.kg import (EmbeddedSPARQLClient, HTTPSPARQLClient, KGEpisode, KGError, KGOraclePolicy,
                                   KGSession, compute_kg_metrics, demo_graph, demo_store, f1_em, generated_tasks,
                                   graph_triples, load_kg_tasks, make_client, play_kg)

CASTAVIA, DUNMORE, WRITER, GLASS_ORCHARD = "m.0cou02", "m.0cit03", "m.0pro02", "m.0fil03"


@pytest.fixture(scope="module")
def store():
    return demo_store()


@pytest.fixture(scope="module")
def endpoint(store):
    """The store behind a SPARQL 1.1 protocol endpoint (GET ?query= or POST form), on 127.0.0.1."""

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, query: str) -> None:
            try:
                body = store.query(query).serialize(format=pyoxigraph.QueryResultsFormat.JSON)
                status = 200
            except (SyntaxError, ValueError, OSError) as err:
                body, status = str(err).encode(), 400
            self.send_response(status)
            self.send_header("Content-Type", "application/sparql-results+json")
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):  # noqa: N802
            self._answer(urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)["query"][0])

        def do_POST(self):  # noqa: N802
            form = self.rfile.read(int(self.headers["Content-Length"])).decode()
            self._answer(urllib.parse.parse_qs(form)["query"][0])

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/sparql"
    server.shutdown()


@pytest.fixture(params=["embedded", "http"])
def client(request, store, endpoint):
    return EmbeddedSPARQLClient(store) if request.param == "embedded" else HTTPSPARQLClient(endpoint, 10)


def test_generated_graph_is_small_and_deterministic():
    triples = graph_triples(demo_graph())
    assert triples == graph_triples(demo_graph()) and 300 <= len(triples.splitlines()) <= 500
    assert graph_triples(demo_graph(seed=1)) != triples


def test_every_tool_on_the_graph(client):
    kb = KGSession(client)
    assert kb.call("get_relations", [CASTAVIA]) == "Observation: [location.location.contains]"
    assert kb.call("get_neighbors", [CASTAVIA, "location.location.contains"]) == \
        "Observation: variable #0, which are instances of location.citytown"
    cities = kb.variables[0]
    assert kb.execute(cities) == ["m.0cit02", "m.0cit06", "m.0cit10"]  # cities 2, 6, 10: i % 4 == 2
    assert kb.call("get_attributes", [cities]) == "Observation: [location.location.population]"
    kb.call("argmax", [cities, "location.location.population"])  # population grows with the city's number
    kb.call("argmin", [cities, "location.location.population"])
    assert kb.execute(kb.variables[1]) == ["m.0cit10"] and kb.execute(kb.variables[2]) == ["m.0cit02"]
    assert kb.call("count", [cities]) == "Observation: variable #3, which is a number"
    assert kb.execute(kb.variables[3]) == ["3"]
    kb.call("get_relations", [DUNMORE])
    kb.call("get_neighbors", [DUNMORE, "location.location.people_born_here"])
    kb.call("get_relations", [WRITER])
    kb.call("get_neighbors", [WRITER, "people.profession.people_with_this_profession"])
    assert kb.call("intersection", [kb.variables[4], kb.variables[5]]).startswith("Observation: variable #6")
    assert kb.execute(kb.variables[6]) == ["m.0per02", "m.0per14"]
    # A variable used on both sides is two independent sub-queries, not one shared binding.
    kb.call("intersection", [cities, cities])
    assert kb.execute(kb.variables[7]) == kb.execute(cities)
    assert kb.call("get_relations", [GLASS_ORCHARD]) == "Observation: [film.film.directed_by, film.film.starring]"
    kb.call("get_neighbors", [GLASS_ORCHARD, "film.film.directed_by"])
    assert kb.execute(kb.variables[8]) == ["m.0per13"]  # film 3 -> director 4*3 + 1


def test_tools_refuse_what_agentbench_refuses(client):
    kb = KGSession(client)
    with pytest.raises(ValueError, match="get_relations first"):
        kb.call("get_neighbors", [CASTAVIA, "location.location.contains"])
    with pytest.raises(ValueError, match="variable or an entity"):
        kb.call("get_relations", ["Castavia"])  # a name that is not resolved to an id
    kb.call("get_relations", [CASTAVIA])
    kb.call("get_neighbors", [CASTAVIA, "location.location.contains"])
    with pytest.raises(ValueError, match="get_attributes first"):
        kb.call("argmax", [kb.variables[0], "location.location.population"])
    kb.call("get_relations", [WRITER])
    kb.call("get_neighbors", [WRITER, "people.profession.people_with_this_profession"])
    with pytest.raises(ValueError, match="same type"):
        kb.call("intersection", [kb.variables[0], kb.variables[1]])
    with pytest.raises(ValueError, match="not a tool"):
        kb.call("print", ["x"])


def test_episode_loop_messages(store):
    task = generated_tasks()[3]
    episode = KGEpisode(task, KGSession(EmbeddedSPARQLClient(store)), max_rounds=4)
    assert episode.messages[-1]["content"] == "A new question: which writers were born in Dunmore?\nEntities: [Dunmore, Writer]"
    replies = []
    for response in ("Thought: x\nAction: get_neighbors(Dunmore, location.location.people_born_here)",
                     "I am thinking.", "Final Answer: #5",
                     "Action: get_relations(Dunmore)\nObservation: [made.up]"):
        episode.step(response)
        replies.append(episode.messages[-1]["content"])
    assert replies[0] == ("get_neighbors(Dunmore, location.location.people_born_here) cannot be executed. "
                          "You may make a mistake and need to fix it.")
    assert replies[1] == "No executable function found! Need to recheck the action."
    assert replies[2] == "Invalid variable id! Need to recheck the action."
    assert replies[3].startswith("Observation: [") and "made.up" not in replies[3]
    assert episode.messages[-2]["content"] == "Action: get_relations(Dunmore)\n"  # the invented observation is dropped
    assert episode.done and episode.outcome == Outcome.TASK_LIMIT and episode.result()["f1"] == 0.0


def test_oracle_solves_the_generated_questions_over_http(endpoint):
    tasks = generated_tasks()
    results = play_kg(tasks, KGOraclePolicy(tasks), make_client(KGConfig(endpoint=endpoint)), concurrency=3)
    metrics = compute_kg_metrics(results)
    assert metrics["f1"] == metrics["em"] == 100.0 and metrics["outcomes"]["completed"] == len(tasks)
    assert [r["prediction"] for r in results][:3] == [["m.0per13"], sorted(tasks[1].answers), ["6"]]


def test_scores_task_files_and_errors(tmp_path):
    assert f1_em(["a", "b"], frozenset({"a"})) == (2 / 3, False) and f1_em([], frozenset({"a"})) == (0.0, False)
    path = tmp_path / "kg.json"
    path.write_text(json.dumps([{"question": "q", "entities": {"Castavia": CASTAVIA},
                                 "answer": [{"answer_argument": "m.0cit10", "entity_name": "Kestrel"}]}]))
    (task,) = load_kg_tasks(path)
    assert task.answers == {"m.0cit10"} and task.entities == {"Castavia": CASTAVIA}
    with pytest.raises(KGError, match="127.0.0.1:9"):
        HTTPSPARQLClient("http://127.0.0.1:9/sparql", 2).select("SELECT * WHERE { ?s ?p ?o }")
