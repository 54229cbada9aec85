"""Prompt-quality evaluation (paper Table III): the three prompt variants, through the shared evaluate path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cmat_pipeline.config import load_params
from cmat_pipeline.envs.dbbench import FIRST_REPLY, SYSTEM_PROMPT, TERSE_PROMPT, load_tasks
from cmat_pipeline.evaluate import evaluate
from cmat_pipeline.prompt_eval import prompt_eval

REPO = Path(__file__).resolve().parents[1]


def test_variants_open_with_the_expected_messages(db_dev_file):
    full, terse, none = (load_tasks(db_dev_file, 1, prompt=p)[0] for p in ("full", "terse", "none"))
    question = {"role": "user", "content": full.question}
    assert full.initial_messages() == [{"role": "user", "content": SYSTEM_PROMPT},
                                       {"role": "assistant", "content": FIRST_REPLY}, question]
    assert terse.initial_messages() == [{"role": "user", "content": TERSE_PROMPT},
                                        {"role": "assistant", "content": FIRST_REPLY}, question]
    assert none.initial_messages() == [question]
    assert len(TERSE_PROMPT) < len(SYSTEM_PROMPT) / 4 and "Action: Operation" in TERSE_PROMPT
    with pytest.raises(ValueError, match="prompt 'fancy'"):
        load_tasks(db_dev_file, 1, prompt="fancy")


def test_oracle_plays_without_a_prompt(db_dev_file, tmp_path):
    scores = {}
    for prompt in ("full", "none"):
        params = load_params(REPO / "params.yaml", [
            "evaluate.policy=oracle", f"evaluate.tasks={db_dev_file}", "evaluate.limit=6", f"evaluate.prompt={prompt}",
            f"evaluate.out_dir={tmp_path / prompt}"])
        scores[prompt] = evaluate(params, progress=False)["overall_cat_accuracy"]
    assert scores["none"] == scores["full"]


def test_prompt_eval_end_to_end_on_the_tiny_model(db_dev_file, tiny_model_dir, tmp_path):
    params = load_params(REPO / "params.yaml", [
        f"model.dir={tiny_model_dir}", "model.device=cpu", "evaluate.adapter=''", f"evaluate.tasks={db_dev_file}",
        "evaluate.limit=2", "generation.max_new_tokens=8", f"prompt_eval.out_dir={tmp_path}"])
    result = prompt_eval(params, progress=False)
    variants = result["variants"]
    assert list(variants) == ["full", "terse", "none"] and all(v["tasks"] == 2 for v in variants.values())
    # the variant reached the model: prompt sizes are ordered full > terse > none
    assert variants["full"]["prompt_tokens"] > variants["terse"]["prompt_tokens"] > variants["none"]["prompt_tokens"]
    questions = [t.question for t in load_tasks(db_dev_file, 2)]
    for variant, opening in (("full", SYSTEM_PROMPT), ("terse", TERSE_PROMPT), ("none", None)):
        rows = [json.loads(line) for line in (tmp_path / variant / "trajectories.jsonl").read_text().splitlines()]
        assert [r["messages"][0]["content"] for r in rows] == [opening or q for q in questions]
        assert json.loads((tmp_path / variant / "metrics.json").read_text())["tasks"] == 2
    assert json.loads((tmp_path / "metrics.json").read_text())["variants"].keys() == variants.keys()
    report = (tmp_path / "report.md").read_text()
    assert all(f"| {v} |" in report for v in variants)
