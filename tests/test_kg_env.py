"""The knowledge-graph environment: AgentBench's seven tools on the generated graph (answers worked out by
hand from the generator: city i lies in country i % 4, film i is directed by person 4*i + 1, ...), the same
through a real SPARQL HTTP endpoint on loopback, the episode loop and the oracle."""

from __future__ import annotations

import json
import re
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyoxigraph
import pytest

from cmat_pipeline.config import KGConfig
from cmat_pipeline.envs.dbbench import Outcome
from cmat_pipeline.errors import ModelPreparationError
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


# ------------------------------------------------------------------------------------- evaluate-kg


def _params(tmp_path, **kg):
    from cmat_pipeline.config import Params

    params = Params()
    params.kg = KGConfig(out_dir=str(tmp_path / "eval_kg"), **kg)
    return params


def test_evaluate_kg_oracle_scores_100_on_the_embedded_questions(tmp_path):
    from cmat_pipeline.evaluate_kg import evaluate_kg

    metrics = evaluate_kg(_params(tmp_path, policy="oracle"), progress=False)
    out = tmp_path / "eval_kg"
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert metrics["f1"] == metrics["em"] == metrics["executability"] == 100.0 and metrics["tasks"] == 7
    assert metrics["endpoint"] == "embedded" and metrics["policy"] == "oracle:kg-actions"
    rows = [json.loads(line) for line in (out / "trajectories.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in rows] == [sorted(t.answers) for t in generated_tasks()]
    assert "**F1: 100.0**" in (out / "report.md").read_text()
    assert "policy: oracle" in (out / "resolved_params.yaml").read_text()


def test_evaluate_kg_on_a_task_file_and_an_endpoint(tmp_path, endpoint):
    from cmat_pipeline.envs.kg import task_entry
    from cmat_pipeline.evaluate_kg import evaluate_kg

    path = tmp_path / "kg.json"
    entries = [task_entry(t) for t in generated_tasks()[:3]]
    entries[1]["answer"].append({"answer_argument": "m.0fil99"})  # a gold answer the program cannot reach
    path.write_text(json.dumps(entries))
    metrics = evaluate_kg(_params(tmp_path, policy="oracle", endpoint=endpoint, tasks=str(path)), progress=False)
    films = generated_tasks()[1].answers
    f1_partial = f1_em(sorted(films), films | {"m.0fil99"})[0]
    assert metrics["task_file"] == str(path) and metrics["endpoint"] == endpoint and metrics["tasks"] == 3
    assert metrics["em"] == round(100 * 2 / 3, 2) and metrics["f1"] == round(100 * (2 + f1_partial) / 3, 2)


def test_evaluate_kg_bad_task_files_name_the_file_and_row(tmp_path):
    from cmat_pipeline.errors import DataError
    from cmat_pipeline.evaluate_kg import evaluate_kg

    path = tmp_path / "kg.json"
    good = {"question": "q", "entities": {"Castavia": CASTAVIA}, "answer": [{"answer_argument": "m.0cit10"}]}
    path.write_text(json.dumps([good, {"question": "r", "entities": {}, "answer": [{"entity_name": "x"}]}]))
    with pytest.raises(DataError, match=rf"{path}:item 1: every `answer` item needs an `answer_argument`"):
        evaluate_kg(_params(tmp_path, policy="oracle", tasks=str(path)), progress=False)
    path.write_text(json.dumps([good]))  # well formed, but AgentBench's files carry no actions to replay
    with pytest.raises(DataError, match=rf"{path}:item 0: no `actions` to play for the oracle"):
        evaluate_kg(_params(tmp_path, policy="oracle", tasks=str(path)), progress=False)
    assert not (tmp_path / "eval_kg").exists()


def test_evaluate_kg_with_a_local_model(tmp_path, tiny_model_dir):
    from cmat_pipeline.config import GenerationConfig, ModelConfig
    from cmat_pipeline.evaluate_kg import evaluate_kg

    params = _params(tmp_path, policy="model", limit=2, max_rounds=2)
    params.model = ModelConfig(dir=str(tiny_model_dir), device="cpu")
    params.kg.adapter = str(tmp_path / "no-adapter")  # the default names the cmat stage's actor
    with pytest.raises(ModelPreparationError, match=r"no-adapter: no PEFT adapter here .* --set kg.adapter=''"):
        evaluate_kg(params, progress=False)
    params.kg.adapter = ""
    params.generation = GenerationConfig(max_new_tokens=8, batch_size=2, max_context_tokens=4096)
    metrics = evaluate_kg(params, progress=False)
    assert metrics["policy"].startswith("hf:") and metrics["tasks"] == 2 and metrics["generate_calls"] >= 1
    assert sum(metrics["outcomes"].values()) == 2 and 0 <= metrics["f1"] <= 100


def test_training_questions_never_ask_what_evaluation_asks():
    from cmat_pipeline.envs.kg import question_kind, task_entry, task_from_entry, training_tasks

    evaluation, training = generated_tasks(), training_tasks()
    asked = {e for t in evaluation for e in t.entities.values() if e != WRITER}
    assert len(training) == 53 and not asked & {e for t in training for e in t.entities.values()}
    assert all(t.answers for t in training) and len({t.question for t in training}) == len(training)
    assert {question_kind(t.actions) for t in training[:7]} == {"one-hop", "multi-hop", "count", "superlative",
                                                                "intersection"}
    assert task_from_entry(task_entry(training[5]), 5, "x") == training[5]
    results = play_kg(training, KGOraclePolicy(training), make_client(KGConfig()))
    assert compute_kg_metrics(results)["em"] == 100.0
    assert results[0]["turns"][0]["response"].startswith("Thought: I need to find the relations connected to")


# ------------------------------------------------------------------------------------- collect.kg_tasks


def _collect_params(tmp_path, **collect):
    from cmat_pipeline.config import Params, build

    return build(Params, {"collect": {"out_dir": str(tmp_path / "raw"), **collect}})


@pytest.fixture(scope="module")
def kg_records(tmp_path_factory):
    """A shard of 9 KG questions played by the oracle (no DB tasks), and its report."""
    from cmat_pipeline.collect import collect
    from cmat_pipeline.data.records import read_jsonl

    tmp_path = tmp_path_factory.mktemp("collect_kg")
    params = _collect_params(tmp_path, db_tasks=0, kg_tasks=9)
    report = collect(params, progress=False)
    return params, report, read_jsonl(tmp_path / "raw" / "trajectories" / "dev.jsonl")


def test_collect_plays_kg_questions_with_the_oracle(kg_records):
    from cmat_pipeline.collect import collect
    from cmat_pipeline.envs.kg import question_kind, training_tasks

    params, report, rows = kg_records
    assert report["pool_tasks"] == {"kg": 9} and report["played_domains"] == ["db", "kg"]
    assert report["trajectories"] == report["correct"] == 9 and report["pooled_not_played"] == {}
    assert {(r["domain"], r["task_type"], r["source"], r["reward"]) for r in rows} == {("kg", "kg", "synth-kg", 1.0)}
    assert sorted(r["question"] for r in rows) == sorted(t.question for t in training_tasks()[:9])  # finish order
    assert not {r["question"] for r in rows} & {t.question for t in generated_tasks()}  # nothing evaluate-kg asks
    assert {r["meta"]["kind"] for r in rows} == {question_kind(t.actions) for t in training_tasks()[:9]}
    directed = next(r for r in rows if r["question"] == "who directed The Quiet Harbor?")
    assert directed["meta"]["turn_actions"] == ["tool", "tool", "answer"] and directed["meta"]["prediction"] == ["m.0per01"]
    assert directed["messages"][-1] == {"role": "assistant",
                                        "content": "Thought: #0 is the final answer to the question.\nFinal Answer: #0"}
    again = collect(params, progress=False)  # resumable: nothing is played twice
    assert again["resumed_from"] == 9 and again["trajectories"] == 9


def test_kg_records_pass_every_expectation_but_the_domain_set(kg_records):
    from cmat_pipeline.data.expectations import SuiteSpec, validate_frame
    from cmat_pipeline.data.records import DOMAINS, flatten

    frame = flatten(kg_records[2])
    with_kg = (*DOMAINS, "kg")
    for spec in (SuiteSpec("raw", min_chars=0, max_chars=10**9, domains=with_kg),
                 SuiteSpec("filtered", max_chars=12000, require_correct=True, domains=with_kg)):
        result = validate_frame(frame, spec)
        assert result.success, [f.describe() for f in result.failures]


def test_kg_records_pass_the_default_raw_suite_and_a_broken_turn_does_not(kg_records):
    import copy

    from cmat_pipeline.data.expectations import SuiteSpec, validate_frame
    from cmat_pipeline.data.records import action_problem, flatten

    result = validate_frame(flatten(kg_records[2]), SuiteSpec("raw", min_chars=0, max_chars=10**9))
    assert result.success, [f.describe() for f in result.failures]
    broken = copy.deepcopy(kg_records[2][0])
    last = max(i for i, m in enumerate(broken["messages"]) if m["role"] == "assistant")
    broken["messages"][last]["content"] = "I think the answer is obvious."
    assert action_problem(broken) == f"message {last}: assistant turn does not parse as an AgentBench KG action (invalid)"


@pytest.mark.parametrize("collect, kg, fragment", [
    ({"kg_tasks": 54}, {}, "collect.kg_tasks: 54 asked, the embedded graph has 53 training questions"),
    ({"kg_tasks": 1}, {"endpoint": "http://127.0.0.1:9/sparql"}, "collect.kg_tasks: the generated questions are about"),
])
def test_collect_kg_tasks_errors_name_the_key(tmp_path, collect, kg, fragment):
    from cmat_pipeline.collect import collect as run_collect
    from cmat_pipeline.config import KGConfig
    from cmat_pipeline.errors import ConfigError

    params = _collect_params(tmp_path, db_tasks=0, **collect)
    params.kg = KGConfig(**kg)
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        run_collect(params, progress=False)


def test_default_collect_is_byte_identical_to_before_kg_collection(tmp_path):
    """collect.kg_tasks 0 (the default) leaves collect as it was: the digest of a 24-task shard (pool, trajectories,
    quarantine, manifest, report without wall time) computed at 706f9c3, before KG collection existed. If the DB
    generator or oracle change on purpose, recompute it."""
    import hashlib

    from cmat_pipeline.collect import collect

    report = collect(_collect_params(tmp_path, db_tasks=24), progress=False)
    report.pop("wall_seconds")
    digest = hashlib.sha256()
    for name in ("tasks/dev.jsonl", "trajectories/dev.jsonl", "quarantine/dev.jsonl", "trajectories/dev.manifest.json"):
        digest.update((tmp_path / "raw" / name).read_bytes())
    digest.update(json.dumps(report, sort_keys=True).encode())
    assert report["played_domains"] == ["db"] and "kg" not in report["pool_tasks"]
    assert digest.hexdigest() == "cd304217383625e61d5c598ea49a4890b55e89e45f7e9f3405eb741637ea9b91"
