"""The data pipeline stages on small data: collect (and resume), filter (fault injection), augment,
distill, general, mix; and the oracle teacher's trajectories replayed through the environment."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

from cmat_pipeline.config import build, Params, profile_params, deep_merge
from cmat_pipeline.data.records import read_jsonl
from cmat_pipeline.envs.dbbench import FIRST_REPLY, SYSTEM_PROMPT, load_tasks, task_from_entry
from cmat_pipeline.envs.sql_backends import SQLiteBackend
from cmat_pipeline.errors import DataError


def small_params(tmp_path: Path, db_dev_file: Path, **sections) -> Params:
    data = tmp_path / "data"
    base = {
        "collect": {"db_tasks": 60, "out_dir": str(data / "raw")},
        "filter": {"out_dir": str(data / "filtered"), "decontaminate": [str(db_dev_file)]},
        "augment": {"out_dir": str(data / "augmented")},
        "distill": {"out_dir": str(data / "distilled")},
        "mix": {"general_dir": str(data / "general"), "out_dir": str(data / "final"), "self_distill_prompts": 4,
                "general_max_new_tokens": 8, "type_share": [0.0, 0.6], "val_fraction": 0.2},
        "evaluate": {"tasks": str(db_dev_file)},
    }
    return build(Params, deep_merge(base, sections))


def oracle_records(entries, **rates):
    from cmat_pipeline.data.teachers import ReActOracle, play_db_tasks

    tasks = [task_from_entry(e, i, "t") for i, e in enumerate(entries)]
    return play_db_tasks(entries, ReActOracle(tasks, **rates), SQLiteBackend(5.0, 800), max_rounds=5,
                         concurrency=16, source="test")


# ------------------------------------------------------------------------------ teacher and replay


def test_oracle_trajectories_replay_to_100_percent():
    from cmat_pipeline.data.dbgen import generate_db_tasks
    from cmat_pipeline.data.teachers import ReplayPolicy, play_db_tasks

    entries = generate_db_tasks(120, seed=3, shard="replay")
    records = oracle_records(entries, explore_rate=0.5, error_rate=0.5)
    assert len(records) == 120 and all(r["correct"] for r in records)
    kinds = {a for r in records for a in r["meta"]["turn_actions"]}
    assert kinds == {"operation", "answer"}
    # exploration and error-recovery turns really happen, with a real database error observed
    assert any("LIMIT 3" in m["content"] for r in records for m in r["messages"] if m["role"] == "assistant")
    recoveries = [r for r in records if any("Let me fix it" in m["content"] for m in r["messages"])]
    assert recoveries and all(r["meta"]["rounds"] >= 2 for r in recoveries)
    assert any("no such" in m["content"] for r in recoveries for m in r["messages"] if m["role"] == "user")
    # every thought precedes its action (ReAct)
    for r in records:
        for m in r["messages"][3:]:
            if m["role"] == "assistant":
                assert len(m["content"].split("Action:")[0].strip()) > 10

    replayed = play_db_tasks(entries, ReplayPolicy(records), SQLiteBackend(5.0, 800), max_rounds=5,
                             concurrency=16, source="replay")
    assert all(r["correct"] for r in replayed)
    by_q = {r["question"]: r["messages"] for r in records}
    assert all(by_q[r["question"]] == r["messages"] for r in replayed)  # same observations, turn by turn


def test_oracle_reads_the_answer_from_the_environment(db_dev_file):
    from cmat_pipeline.data.teachers import ReActOracle

    task = load_tasks(db_dev_file)[1]
    oracle = ReActOracle([task], explore_rate=0.0, error_rate=0.0)
    convo = task.initial_messages()
    first = oracle.turn(convo)
    assert "Action: Operation" in first
    convo += [{"role": "assistant", "content": first}, {"role": "user", "content": "[('42',)]"}]
    assert oracle.turn(convo).endswith('Final Answer: ["42"]')


# ------------------------------------------------------------------------------ collect


class Interrupt(Exception):
    pass


class StopAfter:
    """Wraps a policy and raises after `n` generate calls, like a killed process."""

    def __init__(self, policy, n):
        self.policy, self.n, self.name = policy, n, policy.name

    def generate(self, conversations):
        self.n -= 1
        if self.n < 0:
            raise Interrupt
        return self.policy.generate(conversations)


def test_collect_resumes_without_duplicates_or_losses(tmp_path, db_dev_file):
    from cmat_pipeline.collect import build_pool, build_teacher, collect, shard_paths

    params = small_params(tmp_path / "a", db_dev_file)
    full = collect(params, progress=False)
    assert full["trajectories"] == 60 and full["correct"] == 60

    params_b = small_params(tmp_path / "b", db_dev_file)
    pool = build_pool(params_b)
    teacher = build_teacher(params_b, [dict(p["task"], id=p["id"], source=p["source"]) for p in pool])
    with pytest.raises(Interrupt):
        collect(params_b, policy=StopAfter(teacher, 3), progress=False)
    path = shard_paths(params_b.collect.out_dir, "dev")["trajectories"]
    partial = read_jsonl(path)
    assert 0 < len(partial) < 60
    with path.open("a") as f:
        f.write('{"id": "half a line')  # killed mid-write
    resumed = collect(params_b, policy=teacher, progress=False)
    assert resumed["resumed_from"] == len(partial)
    ids_a = sorted(r["id"] for r in read_jsonl(shard_paths(params.collect.out_dir, "dev")["trajectories"]))
    ids_b = sorted(r["id"] for r in read_jsonl(path))
    assert ids_a == ids_b  # same data as the uninterrupted run, nothing twice


def test_collect_shards_add_data_and_import_files(tmp_path, db_dev_file):
    from cmat_pipeline.collect import collect

    convo = tmp_path / "chats.jsonl"
    convo.write_text(json.dumps({"id": "c1", "conversations": [{"from": "human", "value": "Hi?"},
                                                               {"from": "gpt", "value": "Hello!"}]}) + "\n"
                     + json.dumps({"id": "c2", "conversations": []}) + "\n")
    os_train = db_dev_file.parents[1] / "os_interaction" / "training.json"
    for shard in ("2026-11-09", "2026-11-16"):
        params = small_params(tmp_path, db_dev_file, collect={"shard": shard, "db_tasks": 20,
                                                              "import_tasks": [str(os_train)],
                                                              "import_conversations": [str(convo)]})
        report = collect(params, progress=False)
        assert report["trajectories"] == 21 and report["imported_rejected"] == 1
        assert report["pooled_not_played"] == {"os": 1000}
    shards = sorted(p.name for p in Path(params.collect.out_dir, "trajectories").glob("*.jsonl"))
    assert shards == ["2026-11-09.jsonl", "2026-11-16.jsonl"]
    quarantine = read_jsonl(Path(params.collect.out_dir, "quarantine", "2026-11-16.jsonl"))
    assert len(quarantine) == 1 and "conversation" in quarantine[0]["reason"]


# ------------------------------------------------------------------------------ filter: fault injection


def valid_record(question: str, answer: str = "1"):
    from cmat_pipeline.data.records import make_record

    messages = [{"role": "user", "content": SYSTEM_PROMPT}, {"role": "assistant", "content": FIRST_REPLY},
                {"role": "user", "content": question},
                {"role": "assistant", "content": "I need the count.\nAction: Operation\n```sql\nSELECT COUNT(*) FROM t;\n```"},
                {"role": "user", "content": f"[('{answer}',)]"},
                {"role": "assistant", "content": f"It is {answer}.\nAction: Answer\nFinal Answer: [\"{answer}\"]"}]
    return make_record(domain="db", source="test", teacher="oracle", task_type="counting", question=question,
                       messages=messages, outcome="completed", correct=True, reward=1.0)


def test_fault_injection_every_fault_quarantined_nothing_valid_lost(tmp_path, db_dev_file):
    from cmat_pipeline.data.dbgen import generate_db_tasks
    from cmat_pipeline.filtering import filter_stage

    params = small_params(tmp_path, db_dev_file)
    clean = oracle_records(generate_db_tasks(80, seed=5, shard="faults"))
    assert all(r["correct"] for r in clean)
    dev_question = load_tasks(db_dev_file)[0].question
    faults = {}  # id -> expected reason fragment

    def inject(record, expect):
        faults[record["id"]] = expect
        return record

    bad = []
    r = copy.deepcopy(clean[0]); r["id"] = "f-null-source"; r["source"] = None
    bad.append(inject(r, "source"))
    r = copy.deepcopy(clean[1]); r["id"] = "f-roles"; r["messages"][4]["role"] = "assistant"
    bad.append(inject(r, "role_problem"))
    r = copy.deepcopy(clean[2]); r["id"] = "f-unparseable"
    r["messages"][3]["content"] = "I think I should query SELECT * FROM t"
    bad.append(inject(r, "action_problem"))
    r = copy.deepcopy(clean[3]); r["id"] = "f-empty-turn"; r["messages"][-1]["content"] = "  "
    bad.append(inject(r, "role_problem"))
    r = copy.deepcopy(clean[4]); r["id"] = "f-reward"; r["reward"] = 7.0
    bad.append(inject(r, "reward"))
    r = copy.deepcopy(clean[5]); r["id"] = "f-failed"; r["correct"] = False; r["reward"] = 0.0
    bad.append(inject(r, "unsuccessful"))
    r = copy.deepcopy(clean[6]); r["id"] = "f-null-messages"; r["messages"] = None
    bad.append(inject(r, "raw validation"))
    r = copy.deepcopy(clean[7]); r["id"] = "f-domain"; r["domain"] = "weather"
    bad.append(inject(r, "domain"))
    bad.append(inject(dict(copy.deepcopy(clean[8])), "duplicate id"))  # same id as clean[8]
    r = copy.deepcopy(clean[9]); r["id"] = "f-exact-copy"
    bad.append(inject(r, "exact duplicate"))
    r = valid_record(dev_question); r["id"] = "f-eval-copy"
    bad.append(inject(r, "evaluation overlap: question"))
    r = valid_record(dev_question.upper().replace("?", " ?!") + " please"); r["id"] = "f-eval-near"
    bad.append(inject(r, "evaluation overlap"))
    r = copy.deepcopy(clean[10]); r["id"] = "f-eval-table"; r["question"] = "A question of my own?"
    r["task"] = copy.deepcopy(clean[10]["task"])
    r["task"]["table"] = json.loads(db_dev_file.read_text().splitlines()[3])["table"]
    bad.append(inject(r, "evaluation overlap: table"))
    r = copy.deepcopy(clean[11]); r["id"] = "f-long"; r["messages"][2]["content"] += " x" * 7000
    bad.append(inject(r, "too long"))
    r = copy.deepcopy(clean[12]); r["id"] = "f-near-dup"
    r["messages"][-1]["content"] = "Right. " + r["messages"][-1]["content"]  # one word more: a near-copy
    bad.append(inject(r, "near-duplicate"))

    shard = Path(params.collect.out_dir, "trajectories", "faults.jsonl")
    shard.parent.mkdir(parents=True)
    lines = [json.dumps(x) for x in clean + bad] + ['{"id": "truncated', "[1, 2, 3]"]
    shard.write_text("\n".join(lines) + "\n")

    report = filter_stage(params)
    kept = read_jsonl(Path(params.filter.out_dir, "trajectories.jsonl"))
    quarantine = read_jsonl(Path(params.filter.out_dir, "quarantine.jsonl"))
    assert report["rows_in"] == len(lines) == report["kept"] + report["quarantined"]
    assert sorted(r["id"] for r in kept) == sorted(r["id"] for r in clean)  # nothing valid lost
    reasons = {}
    for q in quarantine:
        reasons.setdefault(q["id"], []).append(q["reason"])
    for fid, expect in faults.items():
        got = reasons.get(fid, [])
        assert any(expect in reason for reason in got), (fid, expect, got)
    assert sum("unreadable line" in q["reason"] for q in quarantine) == 2
    assert Path(params.filter.out_dir, "docs", "index.html").exists()


def test_filter_fails_loudly_on_missing_inputs(tmp_path, db_dev_file):
    from cmat_pipeline.filtering import filter_stage

    with pytest.raises(DataError, match="collect stage first"):
        filter_stage(small_params(tmp_path, db_dev_file))
    params = small_params(tmp_path, db_dev_file, filter={"decontaminate": [str(tmp_path / "standard.jsonl")]})
    shard = Path(params.collect.out_dir, "trajectories", "x.jsonl")
    shard.parent.mkdir(parents=True)
    shard.write_text(json.dumps(valid_record("How many rows?")) + "\n")
    with pytest.raises(DataError, match="standard.jsonl"):
        filter_stage(params)


def _filter_rows(records, eval_files=()):
    """Run the filter's steps on `records` (no files): (kept ids, {id: [quarantine reasons]})."""
    from cmat_pipeline.data.boundaries import EvalIndex
    from cmat_pipeline.filtering import Filter

    flt = Filter(Params().filter, EvalIndex.from_files(list(eval_files)))
    kept = flt.run([(f"row {i}", r) for i, r in enumerate(records)])
    reasons = {}
    for q in flt.quarantined:
        reasons.setdefault(q["id"], []).append(q["reason"])
    return [r["id"] for r in kept], reasons


def test_filter_keeps_every_kg_training_record_and_still_catches_a_near_copy(tmp_path):
    """The 53 KG training questions share AgentBench's prompt and one-shot example (18 turns, 9 of them the
    assistant's): dedupe compares the question and the assistant's own actions only, so none of them is a
    near-duplicate of another, while a copy with one word more still is."""
    from cmat_pipeline.collect import collect

    params = build(Params, {"collect": {"out_dir": str(tmp_path / "raw"), "db_tasks": 0, "kg_tasks": 53}})
    collect(params, progress=False)
    records = read_jsonl(tmp_path / "raw" / "trajectories" / "dev.jsonl")
    assert len(records) == 53 and all(r["correct"] for r in records)
    near = copy.deepcopy(records[7]); near["id"] = "kg-near-copy"
    near["messages"][-1]["content"] = "Right. " + near["messages"][-1]["content"]
    kept, reasons = _filter_rows(records + [near])
    assert sorted(kept) == sorted(r["id"] for r in records), reasons
    assert reasons == {"kg-near-copy": [f"near-duplicate: of {records[7]['id']}"]}


def test_filter_decontaminates_kg_evaluation_questions_of_the_embedded_graph_and_of_a_task_file(tmp_path):
    """`kg:generated` in filter.decontaminate stands for evaluate-kg's questions and an AgentBench KG task file is
    read as one: a copy of either is quarantined, and the training questions (same templates, other entities)
    all pass."""
    from cmat_pipeline.collect import collect
    from cmat_pipeline.data.boundaries import KG_GENERATED
    from cmat_pipeline.envs.kg import generated_tasks, task_entry

    params = build(Params, {"collect": {"out_dir": str(tmp_path / "raw"), "db_tasks": 0, "kg_tasks": 12}})
    collect(params, progress=False)
    records = read_jsonl(tmp_path / "raw" / "trajectories" / "dev.jsonl")
    evaluation = generated_tasks()
    eval_copy = dict(copy.deepcopy(records[0]), id="kg-eval-copy", question=evaluation[2].question + "?")
    task_file = tmp_path / "kg_dev.json"
    task_file.write_text(json.dumps([dict(task_entry(evaluation[0]), question=records[1]["question"])]))
    kept, reasons = _filter_rows(records + [eval_copy], [KG_GENERATED, task_file])
    assert sorted(kept) == sorted(r["id"] for r in records if r is not records[1]), reasons
    assert reasons == {"kg-eval-copy": [f"evaluation overlap: question of {KG_GENERATED}"],
                       records[1]["id"]: [f"evaluation overlap: question of {task_file}"]}
    kept, reasons = _filter_rows(records, [KG_GENERATED])
    assert len(kept) == 12 and not reasons


def test_filter_decontaminates_played_os_tasks_without_their_lead_in():
    """A played OS record's question is the prompt turn, "Now, I will start a new problem in a new OS. My
    problem is:" + the task: the evaluation file holds the task alone, and both overlap checks still match."""
    from cmat_pipeline.data.os_teacher import os_record
    from cmat_pipeline.envs.os_interaction import task_from_entry
    from tests.conftest import AGENTBENCH

    dev_file = AGENTBENCH / "os_interaction" / "dev.json"
    dev = json.loads(dev_file.read_text())

    def played(entry, rid, answer="8"):
        """The record collect writes for `entry` answered at once (no sandbox needed)."""
        task = task_from_entry(entry, 0, rid, "")
        result = {"messages": task.initial_messages() + [{"role": "assistant", "content": f"Act: answer({answer})"}],
                  "checker": task.checker, "outcome": "completed", "correct": True, "rounds": 1,
                  "turns": [{"action": "answer"}], "init_failed": False}
        return dict(os_record(dict(entry, id=rid), result, "oracle", "test"), id=rid)

    reworded = dict(dev[22], description=dev[22]["description"].upper() + " Please.")
    own = dict(dev[6], description="How many directories are there under /usr/share, counting hidden ones too?")
    records = [played(dev[6], "os-eval-copy"), played(reworded, "os-eval-near"), played(own, "os-own", "9")]
    assert records[0]["question"].startswith("Now, I will start a new problem in a new OS")
    kept, reasons = _filter_rows(records, [dev_file])
    assert kept == ["os-own"], reasons
    assert reasons == {"os-eval-copy": [f"evaluation overlap: question of {dev_file}"],
                       "os-eval-near": [f"evaluation overlap: near-copy of a question of {dev_file}"]}


# ------------------------------------------------------------------------------ augment, distill, general, mix


def test_perturbation_renames_consistently_and_recomputes_labels():
    import random

    from cmat_pipeline.augment import perturb, recompute_labels
    from cmat_pipeline.config import AugmentConfig
    from cmat_pipeline.data.dbgen import generate_db_tasks

    backend = SQLiteBackend(5.0, 800)
    for entry in generate_db_tasks(44, seed=9, shard="aug"):
        new, changes = perturb(entry, AugmentConfig(), random.Random(1))
        recompute_labels(new, backend)
        assert changes == ["rename", "reorder_rows", "change_values"]
        old_cols = [c["name"] for c in entry["table"]["table_info"]["columns"]]
        new_cols = [c["name"] for c in new["table"]["table_info"]["columns"]]
        assert [c.lower() for c in new_cols] != [c.lower() for c in old_cols] or new["table"]["table_name"] != entry["table"]["table_name"]
        assert sorted(map(tuple, new["table"]["table_info"]["rows"])) != [] and len(new["table"]["table_info"]["rows"]) == len(entry["table"]["table_info"]["rows"])
        assert new["add_description"].startswith(f"The name of this table is {new['table']['table_name']},")
        records = oracle_records([new])
        assert records[0]["correct"], (entry["description"], new["description"], records[0]["messages"][-3:])
        if entry["type"][0] not in ("INSERT", "UPDATE", "DELETE"):
            # the same question on the same data must give the same answer, whatever the names and row order
            assert sorted(new["label"]) == sorted(entry["label"]) or "change_values" in changes


def test_distill_adds_rationales_and_selects_diverse_subset(tmp_path, db_dev_file, tiny_model_dir):
    from cmat_pipeline.data.dbgen import generate_db_tasks
    from cmat_pipeline.data.records import write_jsonl
    from cmat_pipeline.distill import distill, thoughtless_turns

    params = small_params(tmp_path, db_dev_file, model={"dir": str(tiny_model_dir)},
                          distill={"target_size": 30, "difficulty": "student_loss"})
    records = oracle_records(generate_db_tasks(66, seed=11, shard="distill"), explore_rate=0.0, error_rate=0.0)
    for r in records[:10]:  # strip the thoughts, as an imported terse dataset would have them
        for m in r["messages"][3:]:
            if m["role"] == "assistant":
                m["content"] = "Action:" + m["content"].split("Action:", 1)[1]
    assert all(thoughtless_turns(r) for r in records[:10])
    write_jsonl(Path(params.augment.out_dir, "trajectories.jsonl"), records)
    report = distill(params)
    kept = read_jsonl(Path(params.distill.out_dir, "trajectories.jsonl"))
    assert report["rationales_added"]["template"] == 20 and len(kept) == 30
    assert not any(thoughtless_turns(r) for r in kept)
    assert len({r["task_type"] for r in kept}) == 11  # every type keeps its quota
    assert report["rows_in"] == report["kept"] + report["quarantined"]
    assert report["mean_student_loss_selected"] is not None


def test_general_and_mix_split_by_group_with_card(tmp_path, db_dev_file, tiny_model_dir):
    from cmat_pipeline.data.dbgen import generate_db_tasks
    from cmat_pipeline.data.records import write_jsonl
    from cmat_pipeline.general import general
    from cmat_pipeline.mix import group_of, mix

    params = small_params(tmp_path, db_dev_file, model={"dir": str(tiny_model_dir)},
                          mix={"general_ratio": 0.1})
    gen_report = general(params)
    assert gen_report["rows_in"] == 4 == gen_report["kept"] + gen_report["quarantined"]
    # the tiny random model rambles: its answers are cut at the token limit and quarantined, not taught
    general_rows = read_jsonl(Path(params.mix.general_dir, "general.jsonl"))
    if not general_rows:
        general_rows = [valid_record(f"general {i}") | {"domain": "general", "task_type": "general", "id": f"g{i}",
                                                        "messages": [{"role": "user", "content": f"Say {i}."},
                                                                     {"role": "assistant", "content": f"{i}."}]}
                        for i in range(20)]
        write_jsonl(Path(params.mix.general_dir, "general.jsonl"), general_rows)
    agent = oracle_records(generate_db_tasks(110, seed=12, shard="mix"))
    for r in agent[:30]:  # pretend a third are augmented copies of earlier tasks: they must follow their group
        r["meta"]["group"] = agent[30 + (agent.index(r) % 5)]["meta"]["task_id"]
    write_jsonl(Path(params.distill.out_dir, "trajectories.jsonl"), agent)
    card = mix(params)
    train = read_jsonl(Path(params.mix.out_dir, "train.jsonl"))
    val = read_jsonl(Path(params.mix.out_dir, "val.jsonl"))
    assert card["train"] == len(train) and card["val"] == len(val) and val
    assert not {group_of(r) for r in train} & {group_of(r) for r in val}
    assert card["general_used"] == min(12, len(general_rows))
    assert "rejections" in card and Path(params.mix.out_dir, "card.md").read_text().startswith("# Dataset card")
    assert sum(card["length_histogram"].values()) == card["train"] and len(card["length_histogram"]) <= 12
    assert "### Characters per sample" in Path(params.mix.out_dir, "card.md").read_text()
    assert Path(params.mix.out_dir, "docs", "index.html").exists()


def test_mix_rejects_unbalanced_training_set(tmp_path, db_dev_file):
    from cmat_pipeline.data.dbgen import generate_db_tasks
    from cmat_pipeline.data.expectations import DataValidationError
    from cmat_pipeline.data.records import write_jsonl
    from cmat_pipeline.mix import mix

    params = small_params(tmp_path, db_dev_file, mix={"general_ratio": 0.0, "type_share": [0.0, 0.3]})
    agent = oracle_records(generate_db_tasks(40, seed=13, shard="unbalanced", types=["counting", "INSERT"]))
    write_jsonl(Path(params.distill.out_dir, "trajectories.jsonl"), agent)
    with pytest.raises(DataValidationError, match="type_share"):
        mix(params)


def test_general_file_and_every_table_v_mix(tmp_path, db_dev_file):
    """A general-instruction file is imported by the general stage; mix then builds the three arms of the
    paper's Table V: agent-only, both (here half general, above the per-type cap) and general-only."""
    from cmat_pipeline.data.dbgen import generate_db_tasks
    from cmat_pipeline.data.records import write_jsonl
    from cmat_pipeline.general import general
    from cmat_pipeline.mix import mix

    chats = [{"id": f"chat{i}", "conversations": [{"from": "human", "value": f"Name a colour, please ({i})."},
                                                  {"from": "gpt", "value": f"Blue, number {i}."}]} for i in range(60)]
    chats.append({"id": "empty", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": " "}]})
    general_file = tmp_path / "general.jsonl"
    general_file.write_text("".join(json.dumps(c) + "\n" for c in chats))
    params = small_params(tmp_path, db_dev_file, mix={"general_file": str(general_file)})
    report = general(params)
    assert (report["source"], report["kept"], report["quarantined"]) == (str(general_file), 60, 1)
    agent = oracle_records(generate_db_tasks(44, seed=14, shard="table-v"))  # 11 types x 4
    write_jsonl(Path(params.distill.out_dir, "trajectories.jsonl"), agent)

    arms = {}
    for ratio in (0.0, 0.5, 1.0):
        arm = small_params(tmp_path, db_dev_file, mix={"general_file": str(general_file), "general_ratio": ratio,
                                                       "type_share": [0.02, 0.3],
                                                       "out_dir": str(tmp_path / f"final-{ratio}")})
        arms[ratio] = mix(arm)
    assert (arms[0.0]["agent_used"], arms[0.0]["general_used"]) == (44, 0)
    assert (arms[0.5]["agent_used"], arms[0.5]["general_used"], arms[0.5]["general_ratio"]) == (44, 44, 0.5)
    assert (arms[1.0]["agent_used"], arms[1.0]["general_used"], arms[1.0]["general_ratio"]) == (0, 60, 1.0)
    assert arms[1.0]["by_domain"] == {"general": arms[1.0]["train"]} and arms[1.0]["train"] + arms[1.0]["val"] == 60


# ------------------------------------------------------------------------------ endpoint and model teachers


class TeacherEndpoint:
    """An OpenAI-compatible HTTP server whose 'model' is the ReAct oracle (and answers the paraphrase and
    rationale prompts the augment and distill stages send)."""

    oracle = None

    @classmethod
    def reply(cls, messages):
        text = messages[-1]["content"]
        if text.startswith("Rewrite the following request"):
            return "Please tell me this: " + text.rsplit("\n\n", 1)[1]
        if text.startswith("You are helping an agent"):
            return "The task asks for exactly this, so this statement is the right next step."
        return cls.oracle.turn(messages)


@pytest.fixture()
def teacher_endpoint():
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            body = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": request["model"],
                               "choices": [{"index": 0, "finish_reason": "stop", "message": {
                                   "role": "assistant", "content": TeacherEndpoint.reply(request["messages"])}}],
                               "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_openai_endpoint_teacher_paraphrase_and_rationales(tmp_path, db_dev_file, teacher_endpoint, monkeypatch):
    from cmat_pipeline.augment import augment
    from cmat_pipeline.collect import build_pool, collect
    from cmat_pipeline.data.teachers import ReActOracle
    from cmat_pipeline.distill import distill
    from cmat_pipeline.filtering import filter_stage

    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    params = small_params(tmp_path, db_dev_file, collect={"teacher": "openai", "db_tasks": 30},
                          openai={"base_url": teacher_endpoint, "model": "teacher", "concurrency": 4},
                          augment={"rate": 1.0, "paraphrase": True}, distill={"rationales": "openai"})
    pool = build_pool(params)
    TeacherEndpoint.oracle = ReActOracle([task_from_entry(p["task"], i, "p") for i, p in enumerate(pool)])
    report = collect(params, progress=False)
    assert report["teacher"].startswith("openai:teacher") and report["correct"] == 30
    filter_stage(params)
    # the endpoint teacher paraphrases every copy; the ReAct oracle replays them by their new questions
    TeacherEndpoint.oracle = None
    aug = augment(params)
    assert aug["paraphrased"] == aug["copies_attempted"] == aug["copies_kept"] == 30
    rows = read_jsonl(Path(params.augment.out_dir, "trajectories.jsonl"))
    assert sum(r["question"].startswith("Please tell me this:") for r in rows) == 30
    for r in rows[:5]:  # strip thoughts so the endpoint writes them
        r["messages"][3]["content"] = "Action:" + r["messages"][3]["content"].split("Action:", 1)[1]
    from cmat_pipeline.data.records import write_jsonl
    write_jsonl(Path(params.augment.out_dir, "trajectories.jsonl"), rows)
    out = distill(params)
    assert out["rationales_added"] == {"template": 0, "openai": 5}


def test_local_model_teacher_records_failures_for_the_filter(tmp_path, db_dev_file, tiny_model_dir):
    from cmat_pipeline.collect import collect
    from cmat_pipeline.filtering import filter_stage

    params = small_params(tmp_path, db_dev_file, collect={"teacher": "model", "db_tasks": 6},
                          model={"dir": str(tiny_model_dir)}, generation={"max_new_tokens": 8, "batch_size": 3})
    report = collect(params, progress=False)
    assert report["teacher"].startswith("hf:") and report["trajectories"] == 6
    rows = read_jsonl(Path(params.collect.out_dir, "trajectories", "dev.jsonl"))
    assert all(r["outcome"] in ("invalid_format", "invalid_action", "task_limit_exceeded") for r in rows)
    with pytest.raises(Exception, match="filtered validation failed|row count"):
        filter_stage(params)  # nothing usable is left: the strict suite says so instead of writing an empty set
    # the reasons are kept even though the stage failed, and no training file was written
    quarantine = read_jsonl(Path(params.filter.out_dir, "quarantine.jsonl"))
    assert len(quarantine) == 6 and all(q["reason"].startswith(("raw validation", "unsuccessful")) for q in quarantine)
    assert not Path(params.filter.out_dir, "trajectories.jsonl").exists()


def test_react_oracle_recovers_from_real_mysql_errors(mariadb):
    """On MariaDB the mistakes produce MySQL's own errors; the oracle still reflects, fixes and scores 100."""
    from cmat_pipeline.data.dbgen import generate_db_tasks
    from cmat_pipeline.data.teachers import ReActOracle, play_db_tasks
    from cmat_pipeline.envs.sql_backends import MySQLBackend

    entries = generate_db_tasks(33, seed=21, shard="mysql")
    tasks = [task_from_entry(e, i, "t") for i, e in enumerate(entries)]
    backend = MySQLBackend(host=mariadb.host, port=mariadb.port, user="root", timeout_s=5.0, max_chars=800)
    try:
        records = play_db_tasks(entries, ReActOracle(tasks, explore_rate=1.0, error_rate=1.0), backend,
                                max_rounds=5, concurrency=8, source="mysql")
    finally:
        backend.close()
    assert all(r["correct"] for r in records)
    errors = [m["content"] for r in records for m in r["messages"][3:] if m["role"] == "user" and not m["content"].startswith("[")]
    # one real MySQL error per episode ("1146: Table ... doesn't exist", "1054: Unknown column ...", ...)
    assert len(errors) == 33 and all(re.match(r"\d{4}: ", e) for e in errors), errors
