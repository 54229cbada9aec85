import json

import pytest

from cmat_pipeline.envs.dbbench import (
    DBEpisode, DBTask, Outcome, compute_metrics, is_correct, load_tasks, parse_action,
)
from cmat_pipeline.envs.dbbench_oracle import GoldSQLPolicy
from cmat_pipeline.envs.sql_backends import MySQLBackend, SQLiteBackend, TableSpec, agentbench_table_hash
from cmat_pipeline.errors import DataError
from cmat_pipeline.evaluate import play

# SELECT-type dev tasks whose gold `sql` cannot reproduce the `label`: an upstream data defect each
# (docs/BENCHMARKS.md lists why). Index 7 quotes its table name with single quotes, which SQLite accepts.
DEFECTIVE_SELECT = {
    "sqlite": {0, 1, 2, 5, 6, 8, 11, 12, 13, 15, 16, 17, 18, 19},
    "mysql": {0, 1, 2, 5, 6, 7, 8, 11, 12, 13, 15, 16, 17, 18, 19},
}


def task(kind="other", label=("x",), answer_md5=None, rows=(("a", "1"), ("b", "2"))):
    return DBTask(0, kind, "q?", "table t", TableSpec("t", ("name", "n"), rows), tuple(label), answer_md5, ())


# ----------------------------------------------------------------------------------- parser


@pytest.mark.parametrize(
    "text, kind, payload",
    [
        ("Let me look.\nAction: Operation\n```sql\nSELECT *\nFROM t;\n```", "operation", "SELECT * FROM t;"),
        ("Action: Answer\nFinal Answer: [\"7\"]", "answer", ' ["7"]'),
        ("I know.\nFinal Answer: [\"7\"]", "answer", ' ["7"]'),  # AgentBench accepts a bare final answer
        ("Action: Operation\nSELECT * FROM t;", "invalid_format", ""),  # no ```sql block
        ("Action: Operation\n```\nSELECT 1\n```", "invalid_format", ""),  # block not tagged sql
        ("Action: Operation```sql\nSELECT 1\n```", "invalid_format", ""),  # no newline after the action
        ("Action: Answer\nthe answer is 7", "invalid_format", ""),
        ("Action: Delete\nDROP TABLE t", "invalid_action", ""),
        ("", "invalid_format", ""),
        ("Final Answer: [1]", "invalid_format", ""),  # AgentBench wants a newline before Final Answer
    ],
)
def test_parse_action(text, kind, payload):
    action = parse_action(text)
    assert action.kind == kind
    assert (action.sql or action.answer) == payload


def test_only_first_sql_block_runs():
    text = "Action: Operation\n```sql\nSELECT 1;\n```\n```sql\nDROP TABLE t;\n```"
    assert parse_action(text).sql == "SELECT 1;"


# ----------------------------------------------------------------------------------- scoring


@pytest.mark.parametrize(
    "label, answer, ok",
    [
        (["7"], ' ["7"]', True),
        (["7"], " [7.0]", True),  # numbers compare as floats
        (["1.0"], " 1", True),  # a bare number is a one-item answer
        (["March 19, 1998"], ' ["March 19, 1998"]', True),
        (["March 19, 1998"], " March 19, 1998", False),  # raw text keeps its leading space, as upstream
        (["a", "b"], ' ["b", "a"]', True),  # several items compare as sets
        (["a", "b"], ' ["a"]', False),
        (["a"], " [[1, 2]]", False),
        (["a", "b"], " [[1], [2]]", False),  # unhashable: wrong, not a crash
        (["x"], " __import__('os').system('true')", False),  # never evaluated as code
    ],
)
def test_select_scoring(label, answer, ok):
    assert is_correct(task(label=label), answer) is ok


def test_modification_scoring_uses_table_hash():
    t = task(kind="INSERT", label=("INSERT ...",), answer_md5="[('abc',)]")
    assert is_correct(t, "[('abc',)]") and not is_correct(t, "(('abc',),)")


def test_metrics_follow_agentbench_categories():
    rows = [
        {"type": "counting", "correct": True, "outcome": "completed", "turns": [{"action": "operation"}]},
        {"type": "ranking", "correct": False, "outcome": "invalid_format", "turns": [{"action": "invalid_format"}]},
        {"type": "INSERT", "correct": True, "outcome": "completed", "turns": [{"action": "answer"}]},
    ]
    m = compute_metrics(rows)
    assert m["SELECT_accuracy"] == 50.0 and m["INSERT_accuracy"] == 100.0 and m["UPDATE_accuracy"] == 0.0
    assert m["overall_cat_accuracy"] == 50.0  # (50 + 100 + 0) / 3, an absent category counts 0
    assert m["outcomes"]["invalid_format"] == 1 and m["first_turn_valid_format"] == pytest.approx(66.67)


# ----------------------------------------------------------------------------------- episodes


def test_episode_state_machine_and_round_limit():
    db = SQLiteBackend().open(task().table)
    episode = DBEpisode(task(label=("2",)), db, max_rounds=2)
    op = "Action: Operation\n```sql\nSELECT n FROM t WHERE name = 'b';\n```"
    episode.step(op)
    assert episode.messages[-1] == {"role": "user", "content": "[('2',)]"} and not episode.done
    episode.step(op)
    assert episode.rounds == 2 and not episode.done
    episode.step(op)  # a third statement is over the limit
    assert episode.done and episode.outcome is Outcome.TASK_LIMIT


def test_answer_after_last_round_is_accepted():
    episode = DBEpisode(task(label=("2",)), SQLiteBackend().open(task().table), max_rounds=1)
    episode.step("Action: Operation\n```sql\nSELECT 1;\n```")
    episode.step("Action: Answer\nFinal Answer: [\"2\"]")
    assert episode.outcome is Outcome.COMPLETED and episode.result()["correct"]


@pytest.mark.parametrize(
    "response, outcome",
    [(None, Outcome.CONTEXT_LIMIT), ("no idea", Outcome.INVALID_FORMAT), ("Action: Drop\n", Outcome.INVALID_ACTION)],
)
def test_failure_outcomes(response, outcome):
    episode = DBEpisode(task(), SQLiteBackend().open(task().table))
    episode.step(response)
    assert episode.done and episode.outcome is outcome and not episode.result()["correct"]


def test_modification_is_scored_on_the_table_even_after_a_format_error():
    table = task().table
    after = agentbench_table_hash([("a", "1"), ("b", "2"), ("c", "3")])
    t = task(kind="INSERT", label=("INSERT INTO t VALUES ('c', '3')",), answer_md5=after)
    episode = DBEpisode(t, SQLiteBackend().open(table))
    episode.step("Action: Operation\n```sql\nINSERT INTO t VALUES ('c', '3');\n```")
    episode.step("done!")  # invalid format, but the table is right
    assert episode.outcome is Outcome.INVALID_FORMAT and episode.result()["correct"]


# ----------------------------------------------------------------------------------- task files


def test_load_dev_split(db_dev_file):
    tasks = load_tasks(db_dev_file)
    assert len(tasks) == 60
    assert sum(t.type == "INSERT" for t in tasks) == 20 and sum(t.type == "UPDATE" for t in tasks) == 20
    assert all(t.answer_md5 for t in tasks if t.is_modification)
    assert len(load_tasks(db_dev_file, limit=5)) == 5


def test_bad_task_files_name_file_and_line(tmp_path, db_dev_file):
    good = db_dev_file.read_text().splitlines()[0]
    path = tmp_path / "tasks.jsonl"
    path.write_text(good + "\n{not json\n")
    with pytest.raises(DataError, match=rf"{path}:2: not valid JSON"):
        load_tasks(path)
    entry = json.loads(good)
    del entry["table"]["table_info"]["rows"]
    path.write_text(good + "\n" + json.dumps(entry) + "\n")
    with pytest.raises(DataError, match=rf"{path}:2: missing key `table.table_info.rows`"):
        load_tasks(path)
    entry = json.loads(good)
    entry["table"]["table_info"]["rows"][3] = ["only one cell"]
    path.write_text(json.dumps(entry) + "\n")
    with pytest.raises(DataError, match=r":1: table.table_info.rows\[3\] has 1 cells, expected 5"):
        load_tasks(path)
    with pytest.raises(DataError, match="dbbench task file not found"):
        load_tasks(tmp_path / "missing.jsonl")


# ----------------------------------------------------------------------------------- backends


@pytest.fixture(params=["sqlite", "mysql"])
def backend(request):
    if request.param == "sqlite":
        return SQLiteBackend(timeout_s=1.0, max_chars=800)
    server = request.getfixturevalue("mariadb")
    return MySQLBackend(host=server.host, port=server.port, user="root", timeout_s=1.0, max_chars=800)


def test_gold_modifications_reproduce_answer_md5(backend, db_dev_file):
    """Executing the gold SQL of every dev INSERT/UPDATE task yields its AgentBench `answer_md5`."""
    for t in load_tasks(db_dev_file):
        if not t.is_modification:
            continue
        db = backend.open(t.table)
        try:
            assert db.table_hash() != t.answer_md5, f"task {t.index}: untouched table already matches"
            for sql in t.gold_sql:
                db.execute(sql)
            assert db.table_hash() == t.answer_md5, f"task {t.index} ({t.type})"
        finally:
            db.close()


def test_errors_become_observations(backend):
    db = backend.open(task().table)
    try:
        assert "nope" in db.execute("SELECT nope FROM t")
        assert "syntax" in db.execute("SELEC 1").lower()
        assert db.execute("SELECT name FROM t WHERE n > 1") == "[('b',)]"
        assert db.execute("SELECT name FROM t WHERE name = 'A'") == "[('a',)]"  # case-insensitive, as MySQL
    finally:
        db.close()


def test_unquoted_numbers_in_update_assignments(backend):
    """`SET n = 7` is an assignment: the numeric-comparison cast must not touch it (it did, on SQLite)."""
    db = backend.open(task().table)
    try:
        assert db.execute("UPDATE t SET n = 7 WHERE n = 2") == "[]"
        assert db.execute("SELECT name FROM t WHERE n = 7") == "[('b',)]"
    finally:
        db.close()


def test_results_are_truncated(backend):
    rows = tuple((f"name-{i:04d}", str(i)) for i in range(500))
    db = backend.open(TableSpec("t", ("name", "n"), rows))
    try:
        text = db.execute("SELECT * FROM t")
        assert text.endswith("[TRUNCATED]") and len(text) == 800 + len("[TRUNCATED]")
    finally:
        db.close()


@pytest.mark.parametrize(
    "sql",
    [
        "ATTACH DATABASE '/tmp/cmat-escape.db' AS x",
        "SELECT load_extension('/tmp/evil.so')",
        "VACUUM INTO '/tmp/cmat-escape.db'",
        "SELECT name FROM t INTO OUTFILE '/tmp/cmat-escape.txt'",
        "LOAD DATA INFILE '/etc/passwd' INTO TABLE t",
        "SELECT LOAD_FILE('/etc/passwd')",
    ],
)
def test_file_access_is_refused(backend, sql, tmp_path):
    db = backend.open(task().table)
    try:
        assert "refused" in db.execute(sql)
    finally:
        db.close()


def test_sqlite_authorizer_blocks_attach_even_when_hidden_from_the_filter():
    db = SQLiteBackend().open(task().table)
    assert "not authorized" in db.execute("PRAGMA database_list")


def test_slow_statements_time_out(backend):
    db = backend.open(task().table)
    try:
        if isinstance(backend, SQLiteBackend):
            slow = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"
        else:
            slow = "SELECT SLEEP(5) FROM t"
        observation = db.execute(slow)
        assert "timed out" in observation.lower() or "interrupted" in observation.lower() or "max_statement_time" in observation
        assert db.execute("SELECT count(*) FROM t") in ("[(2,)]",)  # the connection survives
    finally:
        db.close()


def test_mysql_agent_cannot_reach_other_databases(mariadb):
    backend = MySQLBackend(host=mariadb.host, port=mariadb.port, user="root")
    db = backend.open(task().table)
    try:
        assert "denied" in db.execute("SELECT user FROM mysql.user").lower()
        assert "denied" in db.execute("CREATE DATABASE other").lower()
    finally:
        db.close()


def test_gold_sql_oracle_on_dev(backend, db_dev_file):
    """The oracle scores 100 on INSERT/UPDATE; its SELECT misses are exactly the known upstream defects."""
    tasks = load_tasks(db_dev_file)
    results = play(tasks, GoldSQLPolicy(tasks), backend, max_rounds=5, concurrency=8, progress=False)
    metrics = compute_metrics(results)
    assert metrics["INSERT_accuracy"] == 100.0 and metrics["UPDATE_accuracy"] == 100.0
    name = "sqlite" if isinstance(backend, SQLiteBackend) else "mysql"
    assert {r["index"] for r in results if not r["correct"]} == DEFECTIVE_SELECT[name]
    assert metrics["outcomes"]["completed"] == 60


def test_mysql_backends_have_their_own_agent_accounts(mariadb):
    import pymysql

    first = MySQLBackend(host=mariadb.host, port=mariadb.port, user="root")
    second = MySQLBackend(host=mariadb.host, port=mariadb.port, user="root")
    db = first.open(task().table)  # the second backend must not have changed the first one's password
    try:
        assert db.execute("SELECT count(*) FROM t") == "[(2,)]"
    finally:
        db.close()
    first.close()
    second.close()
    conn = pymysql.connect(host=mariadb.host, port=mariadb.port, user="root", password="")
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM mysql.user WHERE user IN (%s, %s)", (first._agent_user, second._agent_user))
        remaining = cur.fetchone()[0]
    conn.close()
    assert first._agent_user != second._agent_user and remaining == 0  # closed backends drop their accounts


def test_json_task_file_must_hold_a_list_of_objects(tmp_path):
    path = tmp_path / "tasks.json"
    path.write_text('{"type": ["INSERT"]}')
    with pytest.raises(DataError, match=r"tasks.json: a .json task file must hold a list of tasks, got dict"):
        load_tasks(path)
    path.write_text('["not a task"]')
    with pytest.raises(DataError, match=r"tasks.json:item 0: a task must be a JSON object, got str"):
        load_tasks(path)
