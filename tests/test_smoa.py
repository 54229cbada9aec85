"""Sparse Mixture-of-Agents with scripted proposers: top-k selection, early stopping on agreement, dense and
single baselines, cost accounting, the final turn's format, evaluation end to end and SMoA as a teacher."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import pytest

from cmat_pipeline.cmat.checker import SQLChecker
from cmat_pipeline.config import build, deep_merge, Params
from cmat_pipeline.envs.dbbench import DBTask, parse_action
from cmat_pipeline.envs.sql_backends import SQLiteBackend, TableSpec
from cmat_pipeline.errors import ConfigError
from cmat_pipeline.runtime.policy import Conversation, PolicyOutput, Timed
from cmat_pipeline.runtime.smoa import (CheckedModelJudge, CheckerJudge, ModelJudge, Proposer, SMoAPolicy,
                                        action_key, build_smoa_policy, executed_statements)

TABLE = TableSpec("Race Results", ("Round", "Driver"), (("1", "Ann Lee"), ("2", "Bo Chan"), ("3", "Ann Lee")))
TASK = DBTask(index=0, type="counting", description="How many rounds did Ann Lee win?", add_description="",
              table=TABLE, label=("2",), answer_md5=None, gold_sql=())
GOOD = "I count her wins.\nAction: Operation\n```sql\nSELECT COUNT(*) FROM `Race Results` WHERE Driver = 'Ann Lee';\n```"
GOOD_RESPACED = "Counting.\nAction: Operation\n```sql\nselect count(*)  from `Race Results` where Driver = 'Ann Lee'\n```"
OTHER = "Let me look first.\nAction: Operation\n```sql\nSELECT * FROM `Race Results`;\n```"
BAD_COLUMN = "Query.\nAction: Operation\n```sql\nSELECT COUNT(*) FROM `Race Results` WHERE Drivers = 'Ann Lee';\n```"
PROSE = "The answer is probably 2."


class Scripted:
    """A fake Policy: a fixed reply (or one computed from the conversation); records every call and output."""

    def __init__(self, name: str, reply: str | Callable[[Conversation], str]):
        self.name, self.reply, self.calls, self.outputs = name, reply, [], []

    def generate(self, conversations: Sequence[Conversation]) -> list[PolicyOutput]:
        self.calls.append([list(c) for c in conversations])
        out = []
        for conversation in conversations:
            text = self.reply(conversation) if callable(self.reply) else self.reply
            out.append(PolicyOutput(text, sum(len(m["content"]) for m in conversation) // 4, len(text.split())))
        self.outputs += out
        return out


def without_notes(conversation: Conversation) -> Conversation:
    """What AgentBench sent, for scripted experts that look tasks up by the question and read observations."""
    return [dict(m, content=m["content"].split("\n\n[Replies")[0].split("below.\n", 1)[-1]) for m in conversation]


def conversation(task: DBTask = TASK) -> Conversation:
    return task.initial_messages()


def mixture(replies: Sequence[str], mode: str = "sparse", layers: int = 3, top_k: int = 2, judge="checker",
            aggregator=None, roles: Sequence[str] = ()) -> tuple[SMoAPolicy, list[Scripted]]:
    fakes = [Scripted(f"p{i}", r) for i, r in enumerate(replies)]
    if judge == "checker":
        judge = CheckerJudge(SQLChecker(SQLiteBackend(5.0, 800)), [TASK])
    roles = list(roles) or [f"agent {i}" for i in range(len(fakes))]
    return SMoAPolicy([Proposer(f, role) for f, role in zip(fakes, roles)], mode=mode, layers=layers, top_k=top_k,
                      judge=judge, aggregator=aggregator), fakes


def references_seen(fake: Scripted, call: int) -> str:
    """The note with other agents' replies that `fake` saw on its `call`-th call (first conversation)."""
    last = fake.calls[call][0][-1]["content"]
    return last.split("[Replies other agents proposed", 1)[1] if "[Replies other agents" in last else ""


def test_judge_keeps_exactly_the_top_k():
    policy, fakes = mixture([PROSE, GOOD, BAD_COLUMN, OTHER], top_k=2, layers=2)
    [out] = policy.generate([conversation()])
    # layer 2 saw only the two replies the Checker passed (GOOD and OTHER), never the vetoed ones
    refs = references_seen(fakes[0], 1)
    assert refs.count("Reply ") == 2 and GOOD in refs and OTHER in refs
    assert PROSE not in refs and BAD_COLUMN not in refs
    assert out.text == GOOD  # ties broken by proposer order; the final turn is the best kept reply
    assert all(len(f.calls) == 2 for f in fakes)  # the kept replies disagree: no early stop


def test_moderator_stops_on_agreement_with_fewer_layers_and_calls():
    sparse, fakes = mixture([GOOD, PROSE, GOOD_RESPACED], layers=3, top_k=2)
    [out] = sparse.generate([conversation()])
    assert out.text == GOOD and [len(f.calls) for f in fakes] == [1, 1, 1]  # stopped after layer 1
    usage = sparse.usage()
    assert usage["early_stops"] == 1 and usage["conversation_layers"] == 1 and usage["calls"] == 3
    assert action_key(GOOD) == action_key(GOOD_RESPACED) != action_key(OTHER)

    no_moderator, fakes = mixture([GOOD, PROSE, GOOD_RESPACED], layers=3, top_k=2)
    no_moderator.moderator = "none"
    no_moderator.generate([conversation()])
    assert [len(f.calls) for f in fakes] == [3, 3, 3] and no_moderator.usage()["early_stops"] == 0


def test_moderator_stops_each_conversation_on_its_own():
    other_task = DBTask(index=1, type="counting", description="How many rounds are there?", add_description="",
                        table=TABLE, label=("3",), answer_md5=None, gold_sql=())
    count_all = OTHER.replace("*", "COUNT(*)")
    policy, fakes = mixture([lambda c, alt=alt: GOOD if "Ann Lee" in c[2]["content"] else alt
                             for alt in (OTHER, count_all, BAD_COLUMN)], layers=3)
    policy.judge.by_question[other_task.question] = other_task
    outs = policy.generate([conversation(), conversation(other_task)])
    # the first conversation agrees in layer 1 and leaves; the second plays on, alone, in one call per proposer
    assert [len(call) for call in fakes[0].calls] == [2, 1, 1]
    assert [o.text for o in outs] == [GOOD, OTHER]


def test_dense_passes_everything_and_never_stops_early():
    dense, fakes = mixture([GOOD, PROSE, GOOD_RESPACED], mode="dense", layers=3, top_k=1)
    [out] = dense.generate([conversation()])
    assert [len(f.calls) for f in fakes] == [3, 3, 3]  # everyone agrees, still every layer runs
    refs = references_seen(fakes[1], 2)
    assert refs.count("Reply ") == 3 and PROSE in refs  # all replies, even the vetoed one, are passed on
    assert dense.usage()["early_stops"] == 0 and dense.usage()["checker_checks"] == 3  # judged once, to pick
    assert parse_action(out.text).kind == "operation"


def test_single_is_one_proposer_one_call():
    single, fakes = mixture([OTHER, GOOD, GOOD], mode="single", layers=3, judge=None)
    [out] = single.generate([conversation()])
    assert out.text == OTHER and len(fakes[0].calls) == 1 and not fakes[1].calls and not fakes[2].calls
    assert single.usage()["calls"] == 1 and single.usage()["checker_checks"] == 0
    seen = fakes[0].calls[0][0]
    assert seen[0]["content"].startswith("Role note: you are agent 0.") and "[Replies" not in seen[-1]["content"]


def test_role_notes_keep_the_protocol():
    policy, fakes = mixture([GOOD, OTHER], roles=["a careful analyst", "a terse engineer"], layers=1)
    original = conversation()
    policy.generate([original])
    for fake, role in zip(fakes, ["a careful analyst", "a terse engineer"]):
        seen = fake.calls[0][0]
        assert [m["role"] for m in seen] == ["user", "assistant", "user"]
        assert seen[0]["content"] == f"Role note: you are {role}. Keep exactly to the reply format described below.\n" \
            + original[0]["content"]
        assert seen[1:] == original[1:]
    assert original == conversation()  # the episode's own messages are never touched


def test_accounting_adds_up_over_proposers_judge_and_aggregator():
    judge_model = Scripted("judge", lambda c: "Score: 9" if "COUNT" in c[-1]["content"].split("proposed for the next")[1]
                           else "Score: 3")
    aggregator = Scripted("aggregator", lambda c: "Both count.\n" + GOOD.split("\n", 1)[1])
    judge = CheckedModelJudge(CheckerJudge(SQLChecker(SQLiteBackend(5.0, 800)), [TASK]), ModelJudge(Timed(judge_model)))
    policy, fakes = mixture([GOOD, OTHER, PROSE], layers=2, top_k=2, judge=judge, aggregator=aggregator)
    timed = Timed(policy)
    outs = timed.generate([conversation(), conversation()])
    outs += timed.generate([conversation()])
    stats = timed.stats()
    usage = stats["usage"]
    everyone = fakes + [judge_model, aggregator]
    expected_prompt = sum(o.prompt_tokens for f in everyone for o in f.outputs)
    expected_completion = sum(o.completion_tokens for f in everyone for o in f.outputs)
    assert usage["prompt_tokens"] == stats["prompt_tokens"] == sum(o.prompt_tokens for o in outs) == expected_prompt
    assert usage["completion_tokens"] == stats["completion_tokens"] == expected_completion
    assert usage["calls"] == sum(len(f.calls) for f in everyone) == sum(r["generate_calls"] for r in usage["roles"].values())
    assert set(usage["roles"]) == {"proposer0", "proposer1", "proposer2", "judge", "aggregator"}
    # per turn: 3 proposers x 2 layers, the model judge once per layer (only on unvetoed replies), one aggregation
    assert [t["calls"] for t in usage["per_turn"]] == [{"proposer0": 2, "proposer1": 2, "proposer2": 2, "judge": 2,
                                                        "aggregator": 1}] * 2
    assert usage["roles"]["judge"]["generate_requests"] == 3 * 2 * 2  # PROSE is vetoed, never sent to the judge
    assert sum(t["prompt_tokens"] for t in usage["per_turn"]) == usage["prompt_tokens"]
    assert usage["checker_checks"] == 3 * 2 * 3 and usage["conversation_turns"] == 3
    assert all(o.text.startswith("Both count.") and parse_action(o.text).kind == "operation" for o in outs)


def test_final_turn_is_an_action_even_when_the_aggregator_rambles():
    aggregator = Scripted("aggregator", PROSE)
    policy, _ = mixture([PROSE, GOOD, OTHER], layers=1, aggregator=aggregator)
    [out] = policy.generate([conversation()])
    assert parse_action(out.text).kind == "operation" and out.text == GOOD
    assert policy.usage()["aggregator_fallbacks"] == 1


def test_model_judge_ranks_and_unreadable_scores_are_low():
    judge_model = Scripted("judge", lambda c: "Score: 8" if "SELECT *" in c[-1]["content"] else "no idea")
    policy, _ = mixture([GOOD, OTHER], layers=1, top_k=1, judge=ModelJudge(Timed(judge_model)))
    [out] = policy.generate([conversation()])
    assert out.text == OTHER and policy.usage()["judge_unparsed"] == 1


def test_executed_statements_skip_errors_and_vetoes():
    messages = conversation() + [{"role": "assistant", "content": OTHER}, {"role": "user", "content": "[('1', 'Ann')]"},
                                 {"role": "assistant", "content": BAD_COLUMN},
                                 {"role": "user", "content": "Checker: There is no column `Drivers`."},
                                 {"role": "assistant", "content": GOOD}, {"role": "user", "content": "no such table"}]
    assert executed_statements(messages) == ["SELECT * FROM `Race Results`;"]


def test_config_validation_names_the_key():
    with pytest.raises(ConfigError, match="smoa.top_k"):
        build(Params, {"smoa": {"top_k": 5}})
    with pytest.raises(ConfigError, match="smoa.layers"):
        build(Params, {"smoa": {"layers": 0}})
    with pytest.raises(ConfigError, match=r"smoa.proposers\[\].temperature"):
        build(Params, {"smoa": {"proposers": [{"temperature": -1}]}})


# ------------------------------------------------------------------------------ evaluate and collect


def _gold_or(fallback: str, tasks: Sequence[DBTask]):
    from cmat_pipeline.envs.dbbench_oracle import GoldSQLPolicy

    gold = GoldSQLPolicy(tasks)
    return [Scripted("junk", fallback), Scripted("gold", lambda c: gold.generate([without_notes(c)])[0].text)]


def test_evaluate_end_to_end_with_scripted_proposers(tmp_path, db_dev_file):
    from cmat_pipeline.envs.dbbench import load_tasks
    from cmat_pipeline.evaluate import evaluate

    lines = db_dev_file.read_text().splitlines()
    three = tmp_path / "dev3.jsonl"  # one SELECT, INSERT and UPDATE task whose gold SQL is sound (docs/BENCHMARKS.md)
    three.write_text("\n".join(lines[i] for i in (3, 20, 40)) + "\n")
    tasks = load_tasks(three)
    metrics = {}
    for mode in ("single", "sparse"):
        params = build(Params, {"evaluate": {"tasks": str(three), "policy": "smoa",
                                             "out_dir": str(tmp_path / mode)},
                                "smoa": {"mode": mode, "proposers": [{"policy": "model"}, {"policy": "openai"},
                                                                     {"policy": "openai", "role": "a checker"}]}})
        junk, gold = _gold_or(PROSE, tasks)
        policy = build_smoa_policy(params, tasks, backbones={"model": junk, "openai": gold})
        # proposers: junk first (the single agent), then two gold ones through the `openai` backbone
        assert policy.name.startswith(f"smoa:{mode}")
        metrics[mode] = evaluate(params, policy=policy, progress=False)
    assert metrics["single"]["overall_cat_accuracy"] == 0.0
    assert metrics["single"]["outcomes"]["invalid_format"] == 3
    assert metrics["sparse"]["overall_cat_accuracy"] == 100.0 and metrics["sparse"]["outcomes"]["completed"] == 3
    usage = json.loads((tmp_path / "sparse" / "metrics.json").read_text())["usage"]
    assert usage["early_stops"] >= 1 and usage["calls"] > metrics["single"]["usage"]["calls"]


@pytest.fixture()
def teacher_smoa():
    """SMoA proposers 0 and 2 on the `openai` backbone, so tests can script it."""
    return {"smoa": {"proposers": [{"policy": "openai", "role": "a careful analyst"},
                                   {"policy": "model", "role": "a rambler"},
                                   {"policy": "openai", "role": "a terse engineer"}]}}


def test_smoa_as_teacher_passes_raw_validation(tmp_path, db_dev_file, teacher_smoa):
    from cmat_pipeline.collect import build_pool, collect
    from cmat_pipeline.data.expectations import SuiteSpec, validate_frame
    from cmat_pipeline.data.records import flatten, read_jsonl
    from cmat_pipeline.data.teachers import ReActOracle
    from cmat_pipeline.envs.dbbench import task_from_entry

    params = build(Params, deep_merge(teacher_smoa, {"collect": {"db_tasks": 12, "teacher": "smoa",
                                                                     "out_dir": str(tmp_path / "raw")}}))
    pool = build_pool(params)
    tasks = [task_from_entry(p["task"], i, "pool") for i, p in enumerate(pool)]
    oracle = ReActOracle(tasks, seed=1, explore_rate=0.5, error_rate=0.0)
    expert = Scripted("oracle", lambda c: oracle.turn(without_notes(c)))
    policy = build_smoa_policy(params, tasks, backbones={"openai": expert, "model": Scripted("rambler", PROSE)})
    report = collect(params, policy=policy, progress=False)
    assert report["teacher"].startswith("smoa:sparse") and report["trajectories"] == 12 and report["correct"] == 12
    rows = read_jsonl(Path(params.collect.out_dir, "trajectories", "dev.jsonl"))
    assert validate_frame(flatten(rows), SuiteSpec("raw")).success
    assert not any("Role note" in m["content"] or "[Replies" in m["content"] for r in rows for m in r["messages"])


def test_build_teacher_and_evaluate_policy_build_smoa_on_a_real_model(tmp_path, db_dev_file, tiny_model_dir):
    """The factory path with a (tiny) local model: one set of weights shared by roles at different temperatures."""
    from cmat_pipeline.collect import build_teacher
    from cmat_pipeline.evaluate import evaluate

    params = build(Params, {
        "model": {"dir": str(tiny_model_dir), "device": "cpu"}, "generation": {"max_new_tokens": 8, "batch_size": 3},
        "evaluate": {"tasks": str(db_dev_file), "limit": 3, "policy": "smoa", "out_dir": str(tmp_path / "eval")},
        "collect": {"teacher": "smoa"}, "smoa": {"mode": "dense", "layers": 2}})
    teacher = build_teacher(params, [])
    hf = [p.policy.policy for p in teacher.proposers]
    assert len({id(p.model) for p in hf}) == 1 and [p.gen.temperature for p in hf] == [0.0, 0.7, 0.7]
    metrics = evaluate(params, progress=False)
    usage = metrics["usage"]
    assert metrics["tasks"] == 3 and metrics["policy"].startswith("smoa:dense(n=3,L=2")
    assert usage["prompt_tokens"] == metrics["prompt_tokens"] and usage["completion_tokens"] == metrics["completion_tokens"]
    assert all(t["calls"] == {"proposer0": 2, "proposer1": 2, "proposer2": 2} for t in usage["per_turn"])
