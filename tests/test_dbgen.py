"""The synthetic dbbench generator: deterministic, varied, and every gold label right on SQLite and MariaDB."""

import dataclasses
import json
from collections import Counter, defaultdict

import pytest
import sqlglot

from cmat_pipeline.data.dbgen import DB_TASK_TYPES, DOMAINS, generate_db_tasks
from cmat_pipeline.envs.dbbench import MODIFICATION_TYPES, load_tasks
from cmat_pipeline.envs.dbbench_oracle import GoldSQLPolicy
from cmat_pipeline.envs.sql_backends import MySQLBackend, SQLiteBackend
from cmat_pipeline.evaluate import play

PER_TYPE = 40  # 440 tasks, round-robin over the 11 types


@pytest.fixture(scope="module")
def entries():
    return generate_db_tasks(PER_TYPE * len(DB_TASK_TYPES), seed=1, shard="test")


@pytest.fixture(scope="module")
def task_file(entries, tmp_path_factory):
    path = tmp_path_factory.mktemp("dbgen") / "synth.jsonl"
    path.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries), encoding="utf-8")
    return path


def dumps(entries):
    return json.dumps(entries, ensure_ascii=False)


# ----------------------------------------------------------------------------------- determinism


def test_same_arguments_give_identical_json_and_shards_differ():
    first = generate_db_tasks(44, seed=7, shard="a")
    assert dumps(first) == dumps(generate_db_tasks(44, seed=7, shard="a"))
    assert dumps(generate_db_tasks(20, seed=7, shard="a")) == dumps(first[:20])  # a prefix, whatever n
    for other in (generate_db_tasks(44, seed=7, shard="b"), generate_db_tasks(44, seed=8, shard="a")):
        assert {e["id"] for e in other}.isdisjoint(e["id"] for e in first)
        assert {e["description"] for e in other} != {e["description"] for e in first}
    assert generate_db_tasks(0, seed=7, shard="a") == []


# ----------------------------------------------------------------------------------- variety and format


def test_types_are_balanced_and_phrased_several_ways(entries):
    counts = Counter(e["type"][0] for e in entries)
    assert counts == {t: PER_TYPE for t in DB_TASK_TYPES}
    phrasings = defaultdict(set)
    for e in entries:
        phrasings[e["type"][0]].add((e["meta"]["template"], e["meta"]["phrasing"]))
    assert {t: len(p) for t, p in phrasings.items() if len(p) < 3} == {}
    assert len({e["description"] for e in entries}) > 0.95 * len(entries)


def test_domains_and_tables_vary(entries):
    assert len(DOMAINS) >= 20 and len(set(DOMAINS)) == len(DOMAINS)
    assert len({e["meta"]["domain"] for e in entries}) >= 20
    names = [e["table"]["table_name"] for e in entries]
    assert any(" " in n and "(" in n for n in names) and any("_" in n and " " not in n for n in names)
    headers = [h for e in entries for h in e["heads"]]
    assert any("(" in h for h in headers) and any("_" in h for h in headers)
    kinds = Counter(k for e in entries for k in e["meta"]["column_kinds"].values())
    for kind in ("name", "place", "date", "money", "count", "text", "category", "id", "year", "percent"):
        assert kinds[kind] > 0, kind
    cells = [c for e in entries for row in e["table"]["table_info"]["rows"] for c in row]
    assert any("'" in c for c in cells) and any("!" in c for c in cells)
    assert any(len(c) > 8 and c[4] == "-" and c[:4].isdigit() for c in cells)  # ISO dates
    assert any(c.split(" ")[0] in ("March", "July") and "," in c for c in cells)  # "March 19, 1998"
    assert all(c.isascii() and "\\" not in c for c in cells)


def test_entries_follow_the_dbbench_format(entries):
    for e in entries:
        kind, table = e["type"][0], e["table"]
        headers = [c["name"] for c in table["table_info"]["columns"]]
        assert e["heads"] == headers and list(e["meta"]["column_kinds"]) == headers
        assert len(set(h.lower() for h in headers)) == len(headers)  # MySQL column names are case-insensitive
        assert all(0 < len(name) <= 64 and name == name.strip() for name in headers + [table["table_name"]])
        assert 8 <= len(table["table_info"]["rows"]) <= 40
        assert all(len(row) == len(headers) and all(isinstance(c, str) for c in row)
                   for row in table["table_info"]["rows"])
        assert e["add_description"] == (f"The name of this table is {table['table_name']}, "
                                        f"and the headers of this table are {','.join(headers)}.")
        assert e["source"] == "synth:test" and e["id"].startswith("synth-")
        gold = e["label"][0] if kind in MODIFICATION_TYPES else e["sql"]["query"]
        assert "\n" not in gold and f"`{table['table_name']}`" in gold
        sqlglot.parse_one(gold, read="mysql")  # raises on anything MySQL would not parse
        if kind in MODIFICATION_TYPES:
            assert len(e["label"]) == 1 and gold.split()[0] == kind
            assert e["answer_md5"].startswith("[('") and "sql" not in e
        else:
            assert 1 <= len(e["label"]) <= 5 and e["label"] != ["none"] and "None" not in e["label"]
            assert gold.startswith("SELECT ") and e["sql"]["length"] == len(gold)
    assert len({e["id"] for e in entries}) == len(entries)


def test_ranking_answers_are_single_or_top_k(entries):
    for e in entries:
        if e["type"][0] == "ranking":
            query = e["sql"]["query"]
            assert "LIMIT" in query and len(e["label"]) == int(query.split("LIMIT ")[1].split()[0].rstrip(";"))


def test_written_jsonl_loads(entries, task_file):
    tasks = load_tasks(task_file)
    assert len(tasks) == len(entries)
    assert [t.type for t in tasks] == [e["type"][0] for e in entries]
    assert all(t.gold_sql and (t.answer_md5 if t.is_modification else t.label) for t in tasks)


def test_types_can_be_restricted():
    got = generate_db_tasks(6, seed=3, shard="r", types=["ranking", "DELETE"])
    assert [e["type"][0] for e in got] == ["ranking", "DELETE"] * 3


def test_domains_can_be_restricted_and_default_to_all():
    assert generate_db_tasks(12, seed=3, shard="d", domains=[]) == generate_db_tasks(12, seed=3, shard="d")
    got = generate_db_tasks(22, seed=3, shard="d", domains=["flights", "podcasts"])
    assert {e["meta"]["domain"] for e in got} == {"flights", "podcasts"}
    assert {e["type"][0] for e in got} == set(DB_TASK_TYPES), "every type is still generated"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(domains=["flights", "weather"]), r"unknown table domain\(s\) \['weather'\]; allowed: library loans"),
        (dict(n=-1), "n must be a non-negative integer, got -1"),
        (dict(n=2.5), "n must be a non-negative integer"),
        (dict(types=["counting", "JOIN"]), r"unknown dbbench task type\(s\) \['JOIN'\]; allowed: other, counting"),
        (dict(types=[]), "types must name at least one of"),
        (dict(seed="1"), "seed must be an integer"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    args = dict(n=3, seed=0, shard="s") | kwargs
    with pytest.raises(ValueError, match=message):
        generate_db_tasks(**args)


# ----------------------------------------------------------------------------------- gold SQL oracle


def oracle_results(tasks, backend):
    return play(tasks, GoldSQLPolicy(tasks), backend, max_rounds=5, concurrency=8, progress=False)


def failures(results):
    return [(r["index"], r["type"], r["answer"], r["expected"]) for r in results if not r["correct"]]


def test_gold_sql_scores_100_on_sqlite(task_file):
    tasks = load_tasks(task_file)
    results = oracle_results(tasks, SQLiteBackend(timeout_s=5.0, max_chars=800))
    assert failures(results) == []
    assert {r["type"] for r in results} == set(DB_TASK_TYPES)
    assert all(r["outcome"] == "completed" for r in results)


def test_oracle_check_can_fail(task_file):
    """The check above is not vacuous: a wrong label or a wrong hash is scored wrong."""
    tasks = load_tasks(task_file)
    select = next(t for t in tasks if t.type == "other")
    modification = next(t for t in tasks if t.type == "UPDATE")
    broken = [dataclasses.replace(select, label=select.label + ("not an answer",)),
              dataclasses.replace(modification, answer_md5="[('0',)]")]
    results = oracle_results(broken, SQLiteBackend())
    assert [r["correct"] for r in results] == [False, False]


def test_gold_sql_scores_100_on_mariadb(mariadb, task_file):
    """Labels and hashes computed on SQLite hold under MySQL semantics (a sample covering every type)."""
    tasks = load_tasks(task_file, limit=11 * len(DB_TASK_TYPES))
    assert {t.type for t in tasks} == set(DB_TASK_TYPES)
    backend = MySQLBackend(host=mariadb.host, port=mariadb.port, user="root", timeout_s=5.0, max_chars=800)
    try:
        results = oracle_results(tasks, backend)
    finally:
        backend.close()
    assert failures(results) == []
