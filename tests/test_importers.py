"""Importers: AgentBench task files -> task pool, conversation files -> trajectory records."""

import json
from collections import Counter

import pandas as pd
import pytest

from cmat_pipeline.data.importers import Rejected, import_agentbench_tasks, import_conversations
from cmat_pipeline.data.records import RECORD_FIELDS, role_problem
from cmat_pipeline.envs.dbbench import FIRST_REPLY, SYSTEM_PROMPT, load_tasks
from cmat_pipeline.errors import DataError
from conftest import AGENTBENCH

OS_TRAIN = AGENTBENCH / "os_interaction" / "training.json"
OS_DEV = AGENTBENCH / "os_interaction" / "dev.json"


def need(path):
    if not path.exists():
        pytest.fail(f"AgentBench data missing at {path}; set CMAT_AGENTBENCH_DIR to an AgentBench data folder")
    return path


def write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


# ---------------------------------------------------------------------------------- task files


def test_dbbench_dev_matches_load_tasks(db_dev_file):
    pool = import_agentbench_tasks(db_dev_file)
    tasks = load_tasks(db_dev_file)
    assert len(pool) == 60
    raw = [json.loads(line) for line in db_dev_file.read_text().splitlines() if line.strip()]
    for entry, task, original in zip(pool, tasks, raw):
        assert entry["domain"] == "db" and entry["source"] == "agentbench:dev.jsonl"
        assert entry["question"] == task.question
        assert entry["task_type"] == task.type
        assert entry["task"] == original
    ids = [e["id"] for e in pool]
    assert len(set(ids)) == 60
    assert ids == [e["id"] for e in import_agentbench_tasks(db_dev_file)]
    assert Counter(e["task_type"] for e in pool)["INSERT"] == 20


def test_os_training_checker_kinds():
    pool = import_agentbench_tasks(need(OS_TRAIN))
    assert len(pool) == 1000
    assert {e["domain"] for e in pool} == {"os"}
    assert Counter(e["task_type"] for e in pool) == {"integer-match": 930, "string-match": 47, "size-match": 23}
    assert all(e["question"] == e["task"]["description"] for e in pool)
    assert len({e["id"] for e in pool}) == len({json.dumps(e["task"], sort_keys=True) for e in pool})


def test_os_dev_match_and_custom_checkers():
    pool = import_agentbench_tasks(need(OS_DEV))
    kinds = Counter(e["task_type"] for e in pool)
    assert kinds == {"integer-match": 17, "match": 5, "custom:check/0.sh": 2, "size-match": 1, "string-match": 1}


def test_dbbench_json_list_is_read(tmp_path, db_dev_file):
    entries = [json.loads(line) for line in db_dev_file.read_text().splitlines()[:3]]
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps(entries))
    pool = import_agentbench_tasks(path)
    assert [e["question"] for e in pool] == [t.question for t in load_tasks(db_dev_file, limit=3)]


@pytest.mark.parametrize("name, content, expected", [
    ("other.jsonl", '{"foo": 1}\n{"bar": 2}\n', "neither a dbbench"),
    ("bad.jsonl", "{table}\n", r"bad.jsonl:line 1: not valid JSON"),
    ("os.json", json.dumps([{"description": "d", "evaluation": {"match": "1"}}, {"description": "d2"}]),
     r"os.json:item 1: missing key `evaluation`"),
    ("os2.json",
     json.dumps([{"description": "d", "evaluation": {"check": [None, {"file": "check/integer-match.py"}]}}]),
     r"os2.json:item 0: missing key `evaluation.example`"),
    ("os3.json", json.dumps([{"description": "d", "evaluation": {"example": "ls"}}]),
     r"os3.json:item 0: missing key `evaluation.match` or `evaluation.check`"),
    ("dict.json", json.dumps({"description": "d"}), "must hold a list"),
    ("mixed.jsonl", json.dumps({"table": {}}) + "\n" + json.dumps({"description": "d", "evaluation": {}}) + "\n",
     r"mixes dbbench entries \(.*mixed.jsonl:line 1\) and os_interaction entries \(.*mixed.jsonl:line 2\)"),
    ("os4.json", json.dumps([{"description": "d", "evaluation": {"match": "1"}}, 5]),
     r"os4.json:item 1: a task must be"),
    ("empty.jsonl", "\n", "holds no tasks"),
])
def test_bad_task_files(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=expected):
        import_agentbench_tasks(path)


def test_bad_dbbench_line_names_line_and_key(tmp_path, db_dev_file):
    lines = db_dev_file.read_text().splitlines()[:3]
    entry = json.loads(lines[1])
    del entry["table"]["table_name"]
    path = write_jsonl(tmp_path / "db.jsonl", [lines[0], json.dumps(entry), lines[2]])
    with pytest.raises(DataError, match=r"db.jsonl:line 2: missing key `table.table_name`"):
        import_agentbench_tasks(path)
    path = write_jsonl(tmp_path / "db2.jsonl", [lines[0], "not json", lines[2]])
    with pytest.raises(DataError, match=r"db2.jsonl:line 2: not valid JSON"):
        import_agentbench_tasks(path)


def test_missing_task_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        import_agentbench_tasks(tmp_path / "nope.jsonl")


# --------------------------------------------------------------------------- conversation files

DB_ACTION = "Let me count.\nAction: Operation\n```sql\nSELECT COUNT(*) FROM t;\n```"
DB_ANSWER = "Action: Answer\nFinal Answer: [\"3\"]"


def sharegpt(*turns, **extra):
    return {"conversations": [{"from": r, "value": v} for r, v in turns], **extra}


def test_sharegpt_json(tmp_path):
    items = [
        sharegpt(("system", "Be brief."), ("human", "  What is 2+2?\n"), ("gpt", "4")),
        sharegpt(("user", "Hi"), ("model", "Hello")),  # no id; other role spellings
        {"id": "x"},  # no conversation key
        sharegpt(("human", "Hi"), ("robot", "beep")),  # unknown role
        sharegpt(("human", "Hi"), ("gpt", "  ")),  # empty turn
        sharegpt(),  # zero turns
        "just text",  # not an object
        sharegpt(("gpt", "I talk alone")),  # nothing to take the question from
    ]
    items[0]["id"] = "chat_7"
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(items))
    records, rejected = import_conversations(path)
    assert len(records) + len(rejected) == len(items)
    assert len(records) == 2
    first = records[0]
    assert set(first) == set(RECORD_FIELDS)
    assert first["messages"] == [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "  What is 2+2?\n"},  # verbatim
                                 {"role": "assistant", "content": "4"}]
    assert first["question"] == "  What is 2+2?\n"
    assert (first["domain"], first["task_type"], first["teacher"]) == ("general", "general", "import")
    assert (first["source"], first["outcome"], first["correct"], first["reward"]) == \
        ("import:chat.json", "completed", True, 1.0)
    assert first["meta"] == {"import_file": str(path), "import_id": "chat_7"}
    assert records[1]["meta"]["import_id"] == "item 1"
    assert [m["role"] for m in records[1]["messages"]] == ["user", "assistant"]
    assert all(role_problem(r["messages"]) is None for r in records)

    reasons = {r.where.rsplit(":", 1)[1]: r.reason for r in rejected}
    assert reasons == {
        "item 2": "no `conversations` or `messages` key",
        "item 3": "turn 1 has unknown role 'robot'",
        "item 4": "turn 1 (gpt) is empty",
        "item 5": "`conversations` has no turns",
        "item 6": "a str, not an object",
        "item 7": "no user turn to take the question from",
    }
    assert all(isinstance(r, Rejected) for r in rejected)
    assert rejected[0].raw == items[2] and rejected[-2].raw == "just text"


def test_agentinstruct_jsonl(tmp_path):
    db_conv = sharegpt(("human", SYSTEM_PROMPT), ("gpt", FIRST_REPLY), ("human", "How many rows?\nTable t"),
                       ("gpt", DB_ACTION), ("human", "[(3,)]"), ("gpt", DB_ANSWER), id="db_1")
    for turn in db_conv["conversations"]:
        turn["loss"] = turn["from"] == "gpt"
    os_conv = sharegpt(("human", "You are an assistant that will act like a person, I will play linux."),
                       ("gpt", "OK."), ("human", "Now, my problem is: count files"), ("gpt", "Act: answer(3)"),
                       id="os_3")
    web_conv = sharegpt(("human", "Find shoes"), ("gpt", "search[shoes]"), id="webshop_12")
    path = write_jsonl(tmp_path / "agentinstruct.jsonl", [db_conv, "{not json", os_conv, "[1, 2]", web_conv])
    records, rejected = import_conversations(path, assume_correct=False)
    assert len(records) + len(rejected) == 5
    db, os_, web = records
    assert (db["domain"], db["task_type"], db["question"]) == ("db", "db", "How many rows?\nTable t")
    assert db["messages"][0] == {"role": "user", "content": SYSTEM_PROMPT}
    assert [m["role"] for m in db["messages"]] == ["user", "assistant"] * 3
    assert (db["correct"], db["reward"]) == (False, 0.0)
    assert (os_["domain"], os_["task_type"], os_["question"]) == ("os", "os", "Now, my problem is: count files")
    assert (web["domain"], web["task_type"], web["question"]) == ("general", "webshop", "Find shoes")
    assert [r.where for r in rejected] == [f"{path}:line 2", f"{path}:line 4"]
    assert rejected[0].raw == "{not json" and "not valid JSON" in rejected[0].reason
    assert "not a JSON object" in rejected[1].reason
    # explicit domain and source win over the id
    forced, _ = import_conversations(path, domain="general", source="agentinstruct")
    assert {r["domain"] for r in forced} == {"general"} and {r["source"] for r in forced} == {"agentinstruct"}
    assert forced[0]["task_type"] == "db"


def test_openai_parquet(tmp_path):
    rows = [
        {"id": "a", "messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "Q1"},
                                 {"role": "assistant", "content": "A1"}]},
        {"id": "db_5", "messages": [{"role": "user", "content": SYSTEM_PROMPT}, {"role": "assistant", "content": "Ok."},
                                    {"role": "user", "content": "Q2"}, {"role": "assistant", "content": DB_ANSWER}]},
        {"id": "b", "messages": []},
        {"id": "c", "messages": [{"role": "user", "content": "Q3"}, {"role": "tool", "content": "x"}]},
        {"id": "d", "messages": None},
    ]
    path = tmp_path / "chat.parquet"
    pd.DataFrame(rows).to_parquet(path, engine="pyarrow")
    assert not isinstance(pd.read_parquet(path)["messages"][0], list)  # pandas hands back numpy arrays
    records, rejected = import_conversations(path)
    assert len(records) + len(rejected) == len(rows)
    assert [r["question"] for r in records] == ["Q1", "Q2"]
    assert records[0]["messages"] == rows[0]["messages"]
    assert (records[1]["domain"], records[1]["task_type"]) == ("db", "db")
    assert [r.reason for r in rejected] == ["`messages` has no turns", "turn 1 has unknown role 'tool'",
                                           "no `conversations` or `messages` key"]
    assert json.dumps([r.raw for r in rejected])  # quarantine-ready: plain JSON


def test_conversations_in_agentbench_os_and_kg_format_take_the_question_after_the_one_shot(tmp_path):
    """An OS or KG conversation opens with AgentBench's prompt and one-shot example (a user turn answered by an
    action, not "Ok."): its question is the task's turn after them, as in a played record, not the prompt every
    such conversation shares (which would make them all near-copies of each other in the filter)."""
    from cmat_pipeline.envs.kg import generated_tasks
    from cmat_pipeline.envs.os_interaction import OSTask

    os_task, kg_task = OSTask(0, "count the files in /tmp"), generated_tasks()[0]
    conversations = [{"id": "os_1", "messages": os_task.initial_messages() + [{"role": "assistant", "content": "Act: answer(3)"}]},
                     {"id": "kg_1", "messages": kg_task.initial_messages() + [{"role": "assistant", "content": "Final Answer: #0"}]}]
    path = write_jsonl(tmp_path / "agentbench.jsonl", conversations)
    records, rejected = import_conversations(path)
    assert not rejected
    assert [r["question"] for r in records] == [os_task.question, kg_task.prompt]


def test_conversation_ids_are_stable(tmp_path):
    path = tmp_path / "c.jsonl"
    write_jsonl(path, [sharegpt(("human", "Q"), ("gpt", "A")), sharegpt(("human", "Q2"), ("gpt", "A"))])
    first, _ = import_conversations(path)
    again, _ = import_conversations(path)
    assert [r["id"] for r in first] == [r["id"] for r in again]
    assert len({r["id"] for r in first}) == 2


def test_conversation_file_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        import_conversations(tmp_path / "missing.jsonl")
    (tmp_path / "c.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported conversation file type"):
        import_conversations(tmp_path / "c.csv")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="broken.parquet: not a readable parquet"):
        import_conversations(tmp_path / "broken.parquet")
    (tmp_path / "c.json").write_text("[1,")
    with pytest.raises(DataError, match="c.json:line 1: not valid JSON"):
        import_conversations(tmp_path / "c.json")
    (tmp_path / "ok.jsonl").write_text("")
    with pytest.raises(DataError, match="domain must be one of"):
        import_conversations(tmp_path / "ok.jsonl", domain="web")
