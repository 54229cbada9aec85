"""The Checker in the loop: verifies each DB action *before* it runs and explains what is wrong.

CMAT's critic has two jobs; this is the first (the value function is the second). For every proposed
assistant turn it checks, in order:
  format     the turn parses as an AgentBench action (Operation with a ```sql block, or Answer);
  answer     a SELECT-type task is answered only after a query ran, with a list literal;
  parse      the SQL parses (sqlglot, MySQL dialect), one statement only;
  safety     no file or cross-database access; no DROP / TRUNCATE / ALTER / CREATE; no UPDATE or DELETE
             without WHERE; no modification at all when the task only asks a question;
  schema     every table is the task's table and every column exists (with a did-you-mean);
  dry run    the statement runs without error on a scratch copy of the current table state.
A failed check is a veto: the statement is not executed, the feedback is shown to the Assistant
instead of a database result, and the turn gets `veto_reward` (negative). Warnings (e.g. a query
that returns no rows) pass with feedback.

    checker = SQLChecker(SQLiteBackend(5.0, 800))
    verdict = checker.check(task, response, executed=["INSERT ..."])   # statements already run
"""

from __future__ import annotations

import ast
import difflib
import re
from dataclasses import dataclass, field
from typing import Sequence

from cmat_pipeline.envs.dbbench import DBEpisode, DBTask, parse_action
from cmat_pipeline.envs.sql_backends import SQLBackend, forbidden_reason

FORMAT_HINT = ("Reply with your thought, then either\nAction: Operation\n```sql\nONE SQL STATEMENT;\n```\n"
               "or\nAction: Answer\nFinal Answer: [\"value\", ...]")
SCHEMA_CHANGES = ("Drop", "TruncateTable", "Alter", "AlterTable", "Create", "Command", "Rename")


@dataclass
class Verdict:
    """The Checker's judgement of one proposed turn."""

    ok: bool
    feedback: str = ""
    issues: list[str] = field(default_factory=list)
    reward: float = 0.0

    @property
    def vetoed(self) -> bool:
        return not self.ok


def _is_error(observation: str) -> bool:
    return not observation.startswith("[")


class SQLChecker:
    """Rule- and execution-based verification of AgentBench DB actions."""

    def __init__(self, scratch: SQLBackend, veto_reward: float = -0.5, dry_run: bool = True):
        self.scratch, self.veto_reward, self.dry_run = scratch, veto_reward, dry_run

    def veto(self, issue: str, feedback: str) -> Verdict:
        return Verdict(False, feedback, [issue], self.veto_reward)

    def check(self, task: DBTask, response: str, executed: Sequence[str] = ()) -> Verdict:
        """Judge `response` given the statements this episode already ran (in order)."""
        action = parse_action(response)
        if action.kind not in ("operation", "answer"):
            return self.veto("format", f"Your reply does not follow the action format. {FORMAT_HINT}")
        if action.kind == "answer":
            return self._check_answer(task, action.answer, executed)
        return self._check_sql(task, action.sql, executed)

    def _check_answer(self, task: DBTask, answer: str, executed: Sequence[str]) -> Verdict:
        if task.is_modification:
            if not executed:
                return self.veto("premature_answer", "The task asks to change the table, but no statement has run yet.")
            return Verdict(True)
        if not executed:
            return self.veto("premature_answer", "Query the table before answering; no statement has run yet.")
        try:
            value = ast.literal_eval(answer.strip())
        except (ValueError, SyntaxError):
            value = None
        if not isinstance(value, (list, tuple)):
            return self.veto("answer_format", 'Write the final answer as a list, e.g. Final Answer: ["Paris"] or [3].')
        return Verdict(True)

    def _check_sql(self, task: DBTask, sql: str, executed: Sequence[str]) -> Verdict:
        import sqlglot
        from sqlglot import exp

        refused = forbidden_reason(sql)
        if refused:
            return self.veto("forbidden", refused)
        try:
            statements = [s for s in sqlglot.parse(sql, read="mysql") if s is not None]
        except Exception as err:  # sqlglot's ParseError / TokenError
            return self.veto("parse_error", f"The SQL does not parse: {str(err).splitlines()[0][:200]}")
        if len(statements) != 1:
            return self.veto("multiple_statements", "Write exactly one SQL statement per turn.")
        tree = statements[0]
        verdict = self._check_safety(task, tree) or self._check_schema(task, tree)
        if verdict is not None:
            return verdict
        return self._dry_run(task, sql, executed, isinstance(tree, exp.Select))

    def _check_safety(self, task: DBTask, tree) -> Verdict | None:
        from sqlglot import exp

        kind = type(tree).__name__
        if kind in SCHEMA_CHANGES:
            return self.veto("destructive", f"`{kind.upper()}` statements change the schema; they are not allowed here.")
        modifies = isinstance(tree, (exp.Insert, exp.Update, exp.Delete))
        if modifies and not task.is_modification:
            return self.veto("destructive", "The task only asks a question; do not modify the table. Use SELECT.")
        if isinstance(tree, (exp.Update, exp.Delete)) and tree.args.get("where") is None:
            return self.veto("destructive", f"{kind.upper()} without WHERE would change every row; add a WHERE condition.")
        return None

    def _check_schema(self, task: DBTask, tree) -> Verdict | None:
        from sqlglot import exp

        for table in tree.find_all(exp.Table):
            if table.name != task.table.name:
                return self.veto("unknown_table", _unknown_table_feedback(table.name, task.table.name))
        columns = {c.lower(): c for c in task.table.columns}
        aliases = {a.alias.lower() for a in tree.find_all(exp.Alias)}
        for column in tree.find_all(exp.Column):
            name = column.name
            if name.lower() in columns or name.lower() in aliases or not name:
                continue
            close = difflib.get_close_matches(name.lower(), list(columns), n=1)
            hint = f" Did you mean `{columns[close[0]]}`?" if close else f" The columns are: {', '.join(task.table.columns)}."
            return self.veto("unknown_column", f"There is no column `{name}`.{hint}")
        return None

    def _dry_run(self, task: DBTask, sql: str, executed: Sequence[str], is_select: bool) -> Verdict:
        if not self.dry_run:
            return Verdict(True)
        db = self.scratch.open(task.table)
        try:
            for previous in executed:  # rebuild the episode's current table state
                db.execute(previous)
            observation = db.execute(sql)
        finally:
            db.close()
        if _is_error(observation):
            return self.veto("dry_run_error", f"This statement fails: {observation[:200]}")
        if is_select and observation == "[]":
            return Verdict(True, "Note: the query returns no rows; check the spelling of the values.", ["empty_result"])
        return Verdict(True)


def _unknown_table_feedback(written: str, actual: str) -> str:
    if not written:  # `Name` (`part`) parses as a call with no table name: the model split the name's quoting
        return f"The table name is empty; the table is `{actual}` (write the whole name inside one pair of backticks)."
    return f"There is no table `{written}`; the table is `{actual}` (quote names with spaces in backticks)."


def as_observation(feedback: str) -> str:
    """A veto's feedback as the observation the Assistant sees (marked, so it is never mistaken for data)."""
    return "Checker: " + re.sub(r"\s+", " ", feedback).strip()


@dataclass
class CheckerInTheLoop:
    """Checker-in-the-loop for any episode class (mixed in before it): a vetoed action is not executed and the
    feedback becomes the observation. After `max_vetoes` vetoes the environment judges turns on its own, so a
    stubborn policy still ends (as AgentBench would end it). Subclasses say how to parse a turn and which
    field of a turn record holds what ran."""

    checker: "object | None" = None
    max_vetoes: int = 3
    vetoes: int = 0
    executed: list[str] = field(default_factory=list)

    def parse(self, response: str):
        raise NotImplementedError

    def ran(self, turn: dict) -> str | None:
        """What the environment executed in this turn (kept for dry runs and the Checker's history)."""
        raise NotImplementedError

    def step(self, response: str | None) -> None:
        if response is None or self.checker is None:
            super().step(response)
            return
        verdict = self.checker.check(self.task, response, self.executed)
        if verdict.vetoed and self.vetoes < self.max_vetoes:
            self.vetoes += 1
            self.messages += [{"role": "assistant", "content": response},
                              {"role": "user", "content": as_observation(verdict.feedback)}]
            self.turns.append({"response": response, "action": self.parse(response).kind, "vetoed": True,
                               "issues": verdict.issues, "reward": verdict.reward, "feedback": verdict.feedback})
            return
        super().step(response)
        turn = self.turns[-1]
        turn.update(vetoed=False, issues=verdict.issues, reward=0.0 if verdict.ok else verdict.reward,
                    feedback=verdict.feedback)
        executed = self.ran(turn)
        if executed is not None:
            self.executed.append(executed)


@dataclass
class CheckedDBEpisode(CheckerInTheLoop, DBEpisode):
    """A dbbench episode with the SQL Checker in the loop; statements that ran without error are replayed
    on the scratch copy before each dry run."""

    def parse(self, response: str):
        return parse_action(response)

    def ran(self, turn: dict) -> str | None:
        return turn["sql"] if "sql" in turn and not _is_error(turn["observation"]) else None
