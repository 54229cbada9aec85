"""Great Expectations suites that guard every data boundary of the pipeline.

Each stage flattens its records (`records.flatten`) and validates the frame before writing it:

    from cmat_pipeline.data.expectations import SuiteSpec, raise_for_failures, validate_frame

    frame = flatten(rows)
    result = validate_frame(frame, SuiteSpec("filtered", require_correct=True,
                                             eval_question_keys=eval_keys), docs_dir="reports/gx/filtered")
    bad = result.row_reasons            # frame position -> failed expectation names: quarantine these
    raise_for_failures(result, "data/filtered.jsonl")   # or stop the stage on any failure

One GX suite per boundary is built from a `SuiteSpec` (table shape, non-null fields, value sets and
ranges, id uniqueness, conversation structure, task-type balance, zero overlap with evaluation sets)
and run through a GX Checkpoint against an in-memory pandas batch. Row-level expectations run with
result_format COMPLETE so every failing row is known by its frame position. With `docs_dir`, GX's own
HTML Data Docs for the suite and this validation are written there (`<docs_dir>/index.html`); a docs
dir reused within one process lists its last KEEP_RESULTS validations (GX's index drops pages whose
result left the in-memory store, so give each process or boundary its own dir).

GX is imported lazily (about 3 s) and one ephemeral context is shared by the whole process; a warm
call on 10,000 rows takes well under a second (the evaluation-question set is the main cost).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cmat_pipeline.data.records import DOMAINS, FRAME_COLUMNS, normalize_question
from cmat_pipeline.errors import DataError

# Record fields every row must carry (the derived columns are always filled by `flatten`).
NOT_NULL_COLUMNS = ("id", "domain", "source", "teacher", "task_type", "question", "reward", "correct")
MAX_EXAMPLES = 5
# Validation results kept in the in-memory store: Data Docs index pages list only results still in the
# store, so recent ones stay visible while a long-lived process does not grow without bound.
KEEP_RESULTS = 32


class DataValidationError(DataError):
    """A batch of records failed its boundary's expectation suite."""


@dataclass(frozen=True)
class SuiteSpec:
    """What one data boundary must satisfy; `boundary` names the suite, the docs page and errors."""

    boundary: str
    min_rows: int = 1
    min_chars: int = 1
    max_chars: int = 60_000
    max_messages: int = 64
    domains: tuple[str, ...] = DOMAINS
    reward_range: tuple[float, float] = (-1.0, 1.0)
    require_correct: bool = False
    type_share: tuple[float, float] | None = None
    eval_question_keys: frozenset[str] = frozenset()


@dataclass
class ExpectationFailure:
    """One failed expectation: `count` unexpected rows, up to MAX_EXAMPLES example row ids.

    `detail` explains table-level failures and expectations GX could not evaluate (count 0)."""

    expectation: str
    count: int
    examples: list[str]
    detail: str = ""

    def describe(self) -> str:
        if self.detail:
            return f"{self.expectation}: {self.detail}"
        return f"{self.expectation}: {self.count} rows, e.g. {', '.join(self.examples)}"


@dataclass
class SuiteResult:
    boundary: str
    rows: int
    success: bool
    failures: list[ExpectationFailure] = field(default_factory=list)
    row_reasons: dict[int, list[str]] = field(default_factory=dict)
    docs_index: Path | None = None

    def summary(self) -> dict[str, Any]:
        return {"boundary": self.boundary, "rows": self.rows, "success": self.success,
                "failures": [asdict(f) for f in self.failures],
                "docs_index": str(self.docs_index) if self.docs_index else None}


def raise_for_failures(result: SuiteResult, what: str) -> None:
    """Raise DataValidationError naming every failed expectation of `result`; no-op on success."""
    if result.success:
        return
    reasons = "; ".join(f.describe() for f in result.failures) or "no expectation reported why"
    raise DataValidationError(f"{what}: {result.boundary} validation failed: {reasons}")


# ------------------------------------------------------------------------------------------- GX


@dataclass
class _GX:
    gx: Any
    context: Any
    batch_definition: Any
    # suite name -> (spec, saved Checkpoint, expectation order)
    checkpoints: dict[str, tuple[Any, Any, dict[str, int]]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


_STATE: _GX | None = None
_STATE_LOCK = threading.Lock()


def _gx() -> _GX:
    """The process-wide GX context with one pandas dataframe asset (created on first use)."""
    global _STATE
    with _STATE_LOCK:
        if _STATE is None:
            _STATE = _make_gx()
        return _STATE


def _make_gx() -> _GX:
    # Before the import: GX reads it to decide whether to send usage statistics (no network here).
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    # GX logs its plugin registry at DEBUG/INFO on import; keep warnings and errors only.
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig, InMemoryStoreBackendDefaults, ProgressBarsConfig)

    config = DataContextConfig(store_backend_defaults=InMemoryStoreBackendDefaults(), analytics_enabled=False,
                               progress_bars=ProgressBarsConfig(globally=False))  # tqdm bars per metric run
    context = gx.get_context(mode="ephemeral", project_config=config)
    asset = context.data_sources.add_pandas("cmat").add_dataframe_asset("records")
    return _GX(gx, context, asset.add_batch_definition_whole_dataframe("frame"))


def expectation_name(kind: str, kwargs: dict[str, Any]) -> str:
    """"expect_x(column)" for column expectations, the bare type for table-level ones."""
    column = kwargs.get("column")
    return f"{kind}({column})" if column else kind


def suite_name(boundary: str) -> str:
    return "cmat-" + (re.sub(r"[^\w-]+", "_", boundary).strip("_") or "batch")


def build_expectations(spec: SuiteSpec) -> list[Any]:
    """The suite's expectations for `spec`, as GX 1.x expectation objects."""
    E = _gx().gx.expectations
    lo_reward, hi_reward = spec.reward_range
    items = [
        E.ExpectTableRowCountToBeBetween(min_value=spec.min_rows),
        *(E.ExpectColumnToExist(column=c) for c in FRAME_COLUMNS),
        *(E.ExpectColumnValuesToNotBeNull(column=c) for c in NOT_NULL_COLUMNS),
        E.ExpectColumnValuesToBeInSet(column="domain", value_set=list(spec.domains)),
        # in_set alone lets 1 and 1.0 pass as True; the type check keeps `correct` a real boolean.
        E.ExpectColumnValuesToBeInTypeList(column="correct", type_list=["bool"]),
        E.ExpectColumnValuesToBeInSet(column="correct", value_set=[True] if spec.require_correct else [True, False]),
        # A text reward makes the range check raise for the whole column; this one names the rows.
        E.ExpectColumnValuesToBeInTypeList(column="reward", type_list=["int", "float", "int64", "float64"]),
        E.ExpectColumnValuesToBeBetween(column="reward", min_value=lo_reward, max_value=hi_reward),
        E.ExpectColumnValuesToBeUnique(column="id"),
        E.ExpectColumnValuesToBeNull(column="role_problem"),
        E.ExpectColumnValuesToBeNull(column="action_problem"),
        E.ExpectColumnValuesToBeBetween(column="n_chars", min_value=spec.min_chars, max_value=spec.max_chars),
        E.ExpectColumnValuesToBeBetween(column="n_messages", min_value=2, max_value=spec.max_messages),
        E.ExpectColumnValuesToBeBetween(column="n_assistant_turns", min_value=1),
    ]
    if spec.type_share is not None:
        lo, hi = spec.type_share
        items.append(E.ExpectColumnValuesToBeBetween(column="type_share", min_value=lo, max_value=hi))
    if spec.eval_question_keys:
        # Normalizing again is idempotent and protects against callers passing raw questions.
        keys = sorted({normalize_question(k) for k in spec.eval_question_keys})
        items.append(E.ExpectColumnValuesToNotBeInSet(column="question_key", value_set=keys))
    return items


def _docs_site(context: Any, docs_dir: Path) -> str:
    """Name of a local filesystem Data Docs site writing to `docs_dir` (added on first use)."""
    name = "cmat_" + hashlib.sha1(str(docs_dir).encode()).hexdigest()[:12]
    if name not in context.list_data_docs_sites():
        context.add_data_docs_site(name, {
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder", "show_cta_footer": False},
        })
    return name


def _checkpoint(state: _GX, spec: SuiteSpec) -> tuple[Any, dict[str, int]]:
    """The saved Checkpoint running `spec`'s suite, and the suite's expectation names in order.

    Reused while the spec is unchanged: GX's add_or_update compares expectations pairwise through
    pydantic, which takes about a second with a few thousand evaluation questions."""
    name = suite_name(spec.boundary)
    cached = state.checkpoints.get(name)
    if cached and cached[0] == spec:
        return cached[1], cached[2]
    gx, context = state.gx, state.context
    expectations = build_expectations(spec)
    order = {expectation_name(e.expectation_type, e.configuration.kwargs): i for i, e in enumerate(expectations)}
    suite = context.suites.add_or_update(gx.ExpectationSuite(name=name, expectations=expectations))
    definition = context.validation_definitions.add_or_update(
        gx.ValidationDefinition(name=name, data=state.batch_definition, suite=suite))
    checkpoint = context.checkpoints.add_or_update(gx.Checkpoint(
        name=name, validation_definitions=[definition],
        result_format={"result_format": "COMPLETE"}))  # COMPLETE: unexpected_index_list for every row
    state.checkpoints[name] = (spec, checkpoint, order)
    return checkpoint, order


def _run_checkpoint(state: _GX, spec: SuiteSpec, frame: Any, docs_dir: Path | None) -> tuple[Any, dict[str, int]]:
    """Run the boundary's suite on `frame`: GX's ExpectationSuiteValidationResult and the expectation order."""
    from great_expectations.data_context.data_context.context_factory import project_manager
    from great_expectations.data_context.types.resource_identifiers import ExpectationSuiteIdentifier

    # GX resolves stores through one process-global "current" context; a get_context() elsewhere in
    # the process would otherwise receive our suites and results.
    project_manager.set_project(state.context)
    checkpoint, order = _checkpoint(state, spec)
    run = checkpoint.run(batch_parameters={"dataframe": frame})
    ((result_id, result),) = run.run_results.items()
    if docs_dir is not None:
        # What UpdateDataDocsAction does, but for this call's site only (sites differ per call, and an
        # action would tie the saved Checkpoint to one of them).
        state.context.build_data_docs(site_names=[_docs_site(state.context, docs_dir)], resource_identifiers=[
            result_id, ExpectationSuiteIdentifier(name=result.suite_name)])
    _trim_results_store(state.context)
    return result, order


def _trim_results_store(context: Any) -> None:
    store = context.validation_results_store
    keys = sorted(store.list_keys(), key=lambda k: k.run_id.run_time)
    for key in keys[:-KEEP_RESULTS]:
        store.remove_key(key)


# -------------------------------------------------------------------------------------- results


def _exception_message(info: Any) -> str | None:
    """The message of an exception GX caught while evaluating an expectation (None when none)."""
    if not isinstance(info, dict):
        return None
    entries = [info] if "raised_exception" in info else list(info.values())
    for entry in entries:
        if isinstance(entry, dict) and entry.get("raised_exception"):
            return str(entry.get("exception_message") or "unknown error").splitlines()[0]
    return None


def _row_label(frame: Any, position: int) -> str:
    value = frame["id"].iat[position] if "id" in frame.columns else None
    return value if isinstance(value, str) and value else f"row {position}"


def _table_detail(kind: str, result: dict[str, Any], spec: SuiteSpec) -> str:
    if kind == "expect_table_row_count_to_be_between":
        return f"{result.get('observed_value')} rows, expected at least {spec.min_rows}"
    if kind == "expect_column_to_exist":
        return "column missing"
    return f"observed {result.get('observed_value')!r}"


def _collect(validation: Any, frame: Any, spec: SuiteSpec, order: dict[str, int]) -> SuiteResult:
    missing = set(FRAME_COLUMNS) - set(frame.columns)
    failures: list[ExpectationFailure] = []
    row_reasons: dict[int, list[str]] = {}
    for item in validation.results:
        if item.success:
            continue
        kind, kwargs = item.expectation_config.type, item.expectation_config.kwargs
        name = expectation_name(kind, kwargs)
        if kwargs.get("column") in missing and kind != "expect_column_to_exist":
            continue  # already reported once as the missing column
        error = _exception_message(item.exception_info)
        rows = item.result.get("unexpected_index_list")
        if error:
            failures.append(ExpectationFailure(name, 0, [], f"could not be evaluated: {error}"))
        elif rows is None:
            failures.append(ExpectationFailure(name, 0, [], _table_detail(kind, item.result, spec)))
        else:
            rows = sorted(int(r) for r in rows)  # RangeIndex labels are frame positions
            failures.append(ExpectationFailure(name, len(rows), [_row_label(frame, r) for r in rows[:MAX_EXAMPLES]]))
            for r in rows:
                row_reasons.setdefault(r, []).append(name)
    failures.sort(key=lambda f: order.get(f.expectation, len(order)))
    for reasons in row_reasons.values():
        reasons.sort(key=lambda n: order.get(n, len(order)))
    return SuiteResult(spec.boundary, len(frame), bool(validation.success), failures, dict(sorted(row_reasons.items())))


def validate_frame(frame: Any, spec: SuiteSpec, docs_dir: str | Path | None = None) -> SuiteResult:
    """Validate a `records.flatten` frame against `spec`'s suite, writing Data Docs to `docs_dir` if given."""
    import pandas as pd

    index = frame.index
    if not (isinstance(index, pd.RangeIndex) and index.start == 0 and index.step == 1):
        frame = frame.reset_index(drop=True)  # row positions must equal GX's unexpected index labels
    docs = Path(docs_dir).resolve() if docs_dir is not None else None
    state = _gx()
    with state.lock:  # one context, several stages may share it from threads
        validation, order = _run_checkpoint(state, spec, frame, docs)
    result = _collect(validation, frame, spec, order)
    result.docs_index = docs / "index.html" if docs else None
    return result
