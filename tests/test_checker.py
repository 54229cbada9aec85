"""The Checker in the loop: each rule vetoes what it must and nothing else; vetoed actions never run."""

from __future__ import annotations

import pytest

from cmat_pipeline.cmat.checker import CheckedDBEpisode, SQLChecker
from cmat_pipeline.envs.dbbench import DBTask, SYSTEM_PROMPT
from cmat_pipeline.envs.sql_backends import SQLiteBackend, TableSpec

TABLE = TableSpec("Race Results", ("Round", "Driver", "Fastest Lap"),
                  (("1", "Ann Lee", "1:31"), ("2", "Bo Chan", "1:29"), ("3", "Ann Lee", "1:30")))


def task(kind: str = "counting") -> DBTask:
    return DBTask(index=0, type=kind, description="How many rounds did Ann Lee win?", add_description="",
                  table=TABLE, label=("2",), answer_md5=None if kind == "counting" else "x", gold_sql=())


def op(sql: str) -> str:
    return f"I will query.\nAction: Operation\n```sql\n{sql}\n```"


@pytest.fixture()
def checker():
    return SQLChecker(SQLiteBackend(5.0, 800), veto_reward=-0.5)


@pytest.mark.parametrize("response, issue", [
    ("I think the answer is 2.", "format"),
    ("Done.\nAction: Answer\nFinal Answer: [\"2\"]", "premature_answer"),
    (op("SELEC COUNT(*) FROM `Race Results`"), "parse_error"),
    (op("SELECT 1; SELECT 2"), "multiple_statements"),
    (op("SELECT * FROM `Race Results` INTO OUTFILE '/tmp/x'"), "forbidden"),
    (op("DROP TABLE `Race Results`"), "destructive"),
    (op("DELETE FROM `Race Results` WHERE Round = '1'"), "destructive"),  # a question: no modification
    (op("SELECT COUNT(*) FROM race_results"), "unknown_table"),
    (op("SELECT COUNT(*) FROM `Race Results` WHERE Drivers = 'Ann Lee'"), "unknown_column"),
    (op("SELECT ABS('a', 'b') FROM `Race Results`"), "parse_error"),  # sqlglot knows ABS takes one argument
    (op("SELECT COUNT(*) FROM `Race Results` WHERE Driver = 'Ann Lee' GROUP BY"), "dry_run_error"),
    (op("SELECT NO_SUCH_FUNC(Round) FROM `Race Results`"), "dry_run_error"),
])
def test_each_rule_vetoes(checker, response, issue):
    verdict = checker.check(task(), response)
    assert verdict.vetoed and verdict.issues == [issue] and verdict.reward == -0.5 and verdict.feedback


def test_good_actions_pass_and_hints_are_useful(checker):
    good = op("SELECT COUNT(*) AS n FROM `Race Results` WHERE `Driver` = 'Ann Lee' ORDER BY n")
    assert checker.check(task(), good).ok
    assert checker.check(task(), "So.\nAction: Answer\nFinal Answer: [\"2\"]", executed=["SELECT 1"]).ok
    bad_col = checker.check(task(), op("SELECT Drivers FROM `Race Results`"))
    assert "Did you mean `Driver`?" in bad_col.feedback
    empty = checker.check(task(), op("SELECT Round FROM `Race Results` WHERE Driver = 'Nobody'"))
    assert empty.ok and empty.issues == ["empty_result"]
    not_list = checker.check(task(), "So.\nAction: Answer\nFinal Answer: 2 rounds", executed=["SELECT 1"])
    assert not_list.vetoed and not_list.issues == ["answer_format"]


def test_split_table_name_is_named_in_the_feedback(checker):
    # `Race` (`Results`) parses as a call with an empty table name; the feedback must say what went wrong
    verdict = checker.check(task(), op("SELECT COUNT(*) FROM `Race` (`Results`)"))
    assert verdict.vetoed and verdict.issues == ["unknown_table"]
    assert "the table is `Race Results`" in verdict.feedback and "one pair of backticks" in verdict.feedback


def test_modification_tasks(checker):
    update = task("UPDATE")
    assert checker.check(update, op("UPDATE `Race Results` SET `Driver` = 'X' WHERE Round = '2'")).ok
    assert checker.check(update, op("UPDATE `Race Results` SET `Driver` = 'X'")).issues == ["destructive"]
    # the dry run sees the episode's current state: the inserted row exists for the follow-up statement
    insert = task("INSERT")
    done = ["INSERT INTO `Race Results` VALUES ('4', 'Cy Dee', '1:28')"]
    assert checker.check(insert, op("UPDATE `Race Results` SET `Fastest Lap` = '1:27' WHERE `Driver` = 'Cy Dee'"), done).ok


def test_vetoed_actions_are_not_executed_and_feedback_is_the_observation(checker):
    backend = SQLiteBackend(5.0, 800)
    update = task("UPDATE")
    episode = CheckedDBEpisode(update, backend.open(TABLE), max_rounds=5, checker=checker, max_vetoes=2)
    episode.step(op("UPDATE `Race Results` SET `Driver` = 'X'"))  # no WHERE: vetoed
    assert not episode.done and episode.rounds == 0
    assert episode.messages[-1]["content"].startswith("Checker: UPDATE without WHERE")
    assert episode.db.execute("SELECT COUNT(*) FROM `Race Results` WHERE Driver = 'X'") == "[(0,)]"
    episode.step(op("UPDATE `Race Results` SET `Driver` = 'X' WHERE Round = '2'"))
    assert episode.rounds == 1 and episode.executed and episode.turns[-1]["vetoed"] is False
    episode.step("Done.\nAction: Answer\nFinal Answer: []")
    assert episode.done and [t["vetoed"] for t in episode.turns] == [True, False, False]
    assert [t["reward"] for t in episode.turns] == [-0.5, 0.0, 0.0]


def test_after_max_vetoes_the_environment_decides(checker):
    episode = CheckedDBEpisode(task(), SQLiteBackend(5.0, 800).open(TABLE), checker=checker, max_vetoes=1)
    episode.step("no format")
    assert not episode.done
    episode.step("still no format")
    assert episode.done and episode.outcome.value == "invalid_format"
    assert episode.messages[0]["content"] == SYSTEM_PROMPT
