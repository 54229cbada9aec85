"""Checker evaluation (paper Table I): the held-out correction set, BLEU-4 / ROUGE scoring, the stage end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cmat_pipeline.checker_eval import (CopyPolicy, build_correction_set, checker_eval, conversation, extract_sql,
                                        text_scores)
from cmat_pipeline.config import load_params
from cmat_pipeline.data.dbgen import generate_db_tasks
from cmat_pipeline.errors import ConfigError
from cmat_pipeline.runtime.policy import PolicyOutput

REPO = Path(__file__).resolve().parents[1]


class FixingPolicy:
    """Scripted: answers every example with its gold SQL, in a block after some prose."""

    name = "scripted-gold"

    def __init__(self, examples):
        self.gold = {conversation(e)[0]["content"]: e["gold_sql"] for e in examples}

    def generate(self, conversations):
        return [PolicyOutput(f"The name is wrong.\n```sql\n{self.gold[c[0]['content']]}\n```") for c in conversations]


@pytest.fixture(scope="module")
def examples():
    return build_correction_set(24, seed=0, shard="checker-heldout")


def test_the_set_is_deterministic_and_has_real_errors(examples):
    assert build_correction_set(24, seed=0, shard="checker-heldout") == examples
    assert build_correction_set(10, seed=0, shard="checker-heldout") == examples[:10]
    assert {e["mistake"] for e in examples} == {"wrong_table", "unquoted_column", "misspelled_column"}
    for e in examples:
        assert e["faulty_sql"] != e["gold_sql"] and not e["error"].startswith("[")
        assert e["task"]["source"] == "synth:checker-heldout"
    assert any("no such" in e["error"] for e in examples)  # the database's own words


def test_the_set_does_not_overlap_the_training_shard(examples):
    training = generate_db_tasks(300, seed=0, shard="dev")  # collect's default shard and seed
    train_ids = {t["id"] for t in training}
    train_questions = {t["description"] + "\n" + t["add_description"] for t in training}
    assert not {e["task"]["id"] for e in examples} & train_ids
    assert not {e["question"] for e in examples} & train_questions
    # questions of a training pool are excluded even when a shard collides
    clash = build_correction_set(5, seed=0, shard="checker-heldout", exclude_questions=[examples[0]["question"]])
    assert examples[0]["question"] not in {e["question"] for e in clash}


def test_scores_perfect_and_copy(examples):
    golds = [e["gold_sql"] for e in examples]
    perfect = text_scores(golds, golds)
    assert perfect == {"bleu4": 100.0, "rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    copy = text_scores([e["faulty_sql"] for e in examples], golds)
    assert 0 < copy["bleu4"] < 100 and all(0 < copy[k] < 1 for k in ("rouge1", "rouge2", "rougeL"))
    # a missing backtick is a token: unquoting a column lowers ROUGE
    assert text_scores(["SELECT Total Points FROM t"], ["SELECT `Total Points` FROM t"])["rouge1"] < 1


def test_extract_sql():
    assert extract_sql("Fix:\n```sql\nSELECT 1\nFROM t\n```\nDone") == "SELECT 1 FROM t"
    assert extract_sql("```\nSELECT 2\n```") == "SELECT 2" and extract_sql(" SELECT 3 ") == "SELECT 3"
    assert extract_sql(None) == ""


def stage_params(tmp_path, **extra):
    overrides = [f"checker_eval.out_dir={tmp_path / 'out'}", "checker_eval.examples=24",
                 f"collect.out_dir={tmp_path / 'raw'}", *[f"{k}={v}" for k, v in extra.items()]]
    return load_params(REPO / "params.yaml", overrides)


def test_stage_scores_a_perfect_fixer_above_the_copy_baseline(tmp_path, examples):
    params = stage_params(tmp_path)
    perfect = checker_eval(params, policy=FixingPolicy(examples), progress=False)
    assert (perfect["bleu4"], perfect["rouge1"], perfect["rougeL"], perfect["exec_match"]) == (100.0, 1.0, 1.0, 100.0)
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and all(r["exec_match"] for r in rows)
    baseline = checker_eval(params, policy=CopyPolicy(examples), progress=False)
    assert baseline["bleu4"] < perfect["bleu4"] and baseline["rougeL"] < 1.0
    assert baseline["exec_match"] == 0.0 and baseline["unchanged"] == 100.0
    assert "| BLEU-4 |" in (tmp_path / "out" / "report.md").read_text()


def test_stage_runs_the_local_model(tmp_path, tiny_model_dir):
    params = stage_params(tmp_path, **{"model.dir": tiny_model_dir, "checker_eval.examples": 3,
                                       "generation.max_new_tokens": 8, "model.device": "cpu"})
    metrics = checker_eval(params, progress=False)
    assert metrics["examples"] == 3 and metrics["policy"].startswith("hf:")
    assert 0 <= metrics["bleu4"] <= 100 and metrics["context_limit"] == 0


def test_training_pool_questions_are_dropped(tmp_path, examples):
    pool = tmp_path / "raw" / "tasks" / "2026-11-16.jsonl"
    pool.parent.mkdir(parents=True)
    pool.write_text(json.dumps({"question": examples[0]["question"]}) + "\n")
    fixer = FixingPolicy(build_correction_set(30, seed=0, shard="checker-heldout"))  # the set moves up by one
    metrics = checker_eval(stage_params(tmp_path), policy=fixer, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert metrics["examples"] == 24 and examples[0]["question"] not in {r["question"] for r in rows}


def test_the_training_shard_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="checker_eval.shard"):
        checker_eval(stage_params(tmp_path, **{"checker_eval.shard": "dev", "collect.shard": "dev"}), progress=False)
