"""The boundary expectation suites: a clean batch passes, each injected fault is caught by the right
expectation at the right row positions, errors name the failure, and Data Docs are written."""

from __future__ import annotations

import json

import pytest

from cmat_pipeline.data.expectations import (
    DataValidationError, SuiteSpec, raise_for_failures, validate_frame)
from cmat_pipeline.data.records import flatten, make_record, normalize_question
from cmat_pipeline.envs.dbbench import FIRST_REPLY, SYSTEM_PROMPT
from cmat_pipeline.errors import DataError

EVAL_QUESTION = "How many rows does the table 'Employees' have?"
OPERATION = "thought\nAction: Operation\n```sql\nSELECT 1;\n```"
ANSWER = 'thought\nAction: Answer\nFinal Answer: ["1"]'


def conversation(question: str) -> list[dict[str, str]]:
    """A valid AgentBench DB episode: prompt, "Ok.", question, one SQL round, the answer."""
    return [
        {"role": "user", "content": SYSTEM_PROMPT}, {"role": "assistant", "content": FIRST_REPLY},
        {"role": "user", "content": question}, {"role": "assistant", "content": OPERATION},
        {"role": "user", "content": "[('1',)]"}, {"role": "assistant", "content": ANSWER},
    ]


def batch(n: int = 10) -> list[dict]:
    """n distinct clean records, task types alternating counting/other."""
    rows = []
    for i in range(n):
        question = f"What is the value number {i} in the table?"
        rows.append(make_record(domain="db", source="synth:test", teacher="oracle",
                                task_type=("counting", "other")[i % 2], question=question,
                                messages=conversation(question), outcome="completed", correct=True, reward=1.0))
    return rows


SPEC = SuiteSpec("raw", type_share=(0.2, 0.6), eval_question_keys=frozenset({normalize_question(EVAL_QUESTION)}))


def failed(result) -> dict[str, list[int]]:
    """expectation name -> the frame positions it flagged (from row_reasons)."""
    out: dict[str, list[int]] = {}
    for position, names in result.row_reasons.items():
        for name in names:
            out.setdefault(name, []).append(position)
    return out


def test_clean_batch_passes():
    result = validate_frame(flatten(batch()), SPEC)
    assert result.success, result.summary()
    assert (result.rows, result.failures, result.row_reasons, result.docs_index) == (10, [], {}, None)


def _null_teacher(rows):
    rows[2]["teacher"] = None


def _duplicate_id(rows):
    rows[4]["id"] = rows[1]["id"]


def _roles_out_of_order(rows):
    msgs = rows[3]["messages"]
    msgs[2], msgs[3] = msgs[3], msgs[2]


def _unparseable_turn(rows):
    rows[5]["messages"][-1]["content"] = "I believe the answer is 1."


def _reward_out_of_range(rows):
    rows[6]["reward"] = 2.5


def _too_many_chars(rows):
    rows[7]["messages"][4]["content"] = "x" * 61_000


def _too_many_messages(rows):
    rows[8]["messages"] += [{"role": "user", "content": "[('1',)]"}, {"role": "assistant", "content": OPERATION}] * 30


def _eval_question(rows):
    rows[9]["question"] = "how many ROWS does the table Employees have"  # same key, other case/punctuation


def _type_share(rows):
    for i in (1, 3, 5):
        rows[i]["task_type"] = "counting"  # counting: 8 of 10 rows, above 0.6


def _not_correct(rows):
    rows[0]["correct"] = False


def _text_reward(rows):
    rows[3]["reward"] = "high"


@pytest.mark.parametrize("inject, expectation, positions, spec", [
    (_null_teacher, "expect_column_values_to_not_be_null(teacher)", [2], SPEC),
    (_duplicate_id, "expect_column_values_to_be_unique(id)", [1, 4], SPEC),
    (_roles_out_of_order, "expect_column_values_to_be_null(role_problem)", [3], SPEC),
    (_unparseable_turn, "expect_column_values_to_be_null(action_problem)", [5], SPEC),
    (_reward_out_of_range, "expect_column_values_to_be_between(reward)", [6], SPEC),
    (_too_many_chars, "expect_column_values_to_be_between(n_chars)", [7], SPEC),
    (_too_many_messages, "expect_column_values_to_be_between(n_messages)", [8], SPEC),
    (_eval_question, "expect_column_values_to_not_be_in_set(question_key)", [9], SPEC),
    (_type_share, "expect_column_values_to_be_between(type_share)", [0, 1, 2, 3, 4, 5, 6, 8], SPEC),
    (_not_correct, "expect_column_values_to_be_in_set(correct)", [0], SuiteSpec("filtered", require_correct=True)),
    (_text_reward, "expect_column_values_to_be_in_type_list(reward)", [3], SPEC),
], ids=lambda v: v.__name__.strip("_") if callable(v) else None)
def test_fault_is_caught_at_its_rows(inject, expectation, positions, spec):
    rows = batch()
    inject(rows)
    result = validate_frame(flatten(rows), spec)
    assert not result.success
    assert failed(result) == {expectation: positions}, result.summary()
    failure = next(f for f in result.failures if f.expectation == expectation)
    assert failure.count == len(positions)
    assert failure.examples == [rows[p]["id"] for p in positions[:5]]


def test_correct_false_is_fine_without_require_correct():
    rows = batch()
    _not_correct(rows)
    assert validate_frame(flatten(rows), SPEC).success


def test_text_reward_reports_the_range_check_as_not_evaluable():
    rows = batch()
    _text_reward(rows)
    result = validate_frame(flatten(rows), SPEC)
    between = next(f for f in result.failures if f.expectation == "expect_column_values_to_be_between(reward)")
    assert between.count == 0 and between.detail.startswith("could not be evaluated")


def test_missing_column_is_a_table_level_failure():
    frame = flatten(batch()).drop(columns=["question_key"])
    result = validate_frame(frame, SPEC)
    assert not result.success and result.row_reasons == {}
    assert [f.expectation for f in result.failures] == ["expect_column_to_exist(question_key)"]
    with pytest.raises(DataValidationError, match=r"expect_column_to_exist\(question_key\): column missing"):
        raise_for_failures(result, "raw.jsonl")


def test_too_few_rows_is_a_table_level_failure():
    result = validate_frame(flatten(batch(3)), SuiteSpec("train", min_rows=5))
    assert not result.success and result.row_reasons == {}
    (failure,) = result.failures
    assert failure.expectation == "expect_table_row_count_to_be_between"
    assert failure.detail == "3 rows, expected at least 5"


def test_row_positions_ignore_the_frame_index():
    rows = batch()
    _reward_out_of_range(rows)
    frame = flatten(rows).set_index("id", drop=False)
    assert failed(validate_frame(frame, SPEC)) == {"expect_column_values_to_be_between(reward)": [6]}


def test_raise_for_failures_names_expectation_count_and_example():
    rows = batch()
    _duplicate_id(rows)
    _reward_out_of_range(rows)
    result = validate_frame(flatten(rows), SPEC)
    with pytest.raises(DataValidationError) as err:
        raise_for_failures(result, "data/raw.jsonl")
    message = str(err.value)
    assert isinstance(err.value, DataError)
    assert message.startswith("data/raw.jsonl: raw validation failed: ")
    assert f"expect_column_values_to_be_unique(id): 2 rows, e.g. {rows[1]['id']}, {rows[1]['id']}" in message
    assert f"expect_column_values_to_be_between(reward): 1 rows, e.g. {rows[6]['id']}" in message
    raise_for_failures(validate_frame(flatten(batch()), SPEC), "clean")  # success: no error


def test_summary_is_json():
    rows = batch()
    _null_teacher(rows)
    summary = json.loads(json.dumps(validate_frame(flatten(rows), SPEC).summary()))
    assert summary["boundary"] == "raw" and summary["rows"] == 10 and summary["success"] is False
    assert summary["failures"][0]["expectation"] == "expect_column_values_to_not_be_null(teacher)"


def test_data_docs_written_per_call(tmp_path):
    rows = batch()
    _duplicate_id(rows)
    for name in ("docs_a", "docs_b"):
        result = validate_frame(flatten(rows), SuiteSpec("distilled"), docs_dir=tmp_path / name)
        assert result.docs_index == (tmp_path / name / "index.html").resolve()
        (page,) = (tmp_path / name / "validations").rglob("*.html")  # this validation, and only it
        assert page.relative_to(tmp_path / name).as_posix() in result.docs_index.read_text()  # linked from the index
        assert "values must be unique" in page.read_text() and "Failed" in page.read_text()
