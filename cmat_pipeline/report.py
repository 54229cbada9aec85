"""`report` stage: the run's sft, cmat and evaluation results as small git-tracked files (after the evaluations).

Run it:
    python -m cmat_pipeline.report                   # reads params.yaml
    cmat report --set report.out_dir=/tmp/report
sft.out_dir and cmat.out_dir are DVC-cached folders: a clone without the cache has neither their metrics.json
nor their plots. This stage copies what `dvc metrics diff` and `dvc plots diff` compare into report.out_dir,
which dvc.yaml declares `cache: false` (committed to git, so any clone can diff it):
    metrics.json         {"sft": ..., "cmat": ..., "evaluate": ..., "os": ..., "kg": ...}: the numbers of each
                         stage's metrics.json (evaluate = DB dev, os = evaluate_os, kg = evaluate_kg)
                         (nested mappings kept; strings, flags and lists such as cmat's history left out)
    plots/sft/*.tsv      train_loss, val_loss, learning_rate per step (sft's plots/)
    plots/cmat/*.tsv     one curve per iteration metric (cmat's plots/)
    report.md            base model, adapter, the key numbers of each stage; resolved_params.yaml
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cmat_pipeline.config import Params, save_resolved
from cmat_pipeline.errors import DataError

SECTIONS = ("sft", "cmat", "evaluate", "os", "kg")
"""metrics.json sections, one per stage read (params section of its out_dir)."""
STAGE_OF = {"os": "evaluate_os", "kg": "evaluate_kg"}
"""The dvc.yaml stage behind a section, where the names differ (for the "run it first" errors)."""
PLOT_X = {"sft": "step", "cmat": "iteration"}
"""Stages whose plots/*.tsv are copied, and the x column their files start with."""
SFT_PLOTS = ("train_loss", "val_loss", "learning_rate")
"""The curves sft.write_plots writes; dvc.yaml names each (its y column differs)."""
SFT_KEYS = ("method", "steps", "train_loss", "val_loss", "tokens_per_second", "wall_seconds")
CMAT_KEYS = ("iterations", "episodes", "success_rate_first", "success_rate_last", "wall_seconds")
CMAT_FINAL_KEYS = ("mean_reward", "veto_rate", "kl")
EVAL_KEYS = ("tasks", "overall_cat_accuracy", "first_turn_valid_format", "tasks_per_minute", "wall_seconds")
OS_KEYS = ("tasks", "supported", "accuracy", "accuracy_all_tasks", "first_turn_valid_format", "wall_seconds")
KG_KEYS = ("tasks", "f1", "em", "executability", "wall_seconds")


@dataclass(frozen=True)
class StageOutputs:
    """What the report reads from the run: each stage's metrics.json and its plots."""

    metrics: dict[str, dict[str, Any]]
    """Section (sft, cmat, evaluate, os, kg) -> its parsed metrics.json."""
    plots: dict[str, dict[str, str]]
    """Section (sft, cmat) -> {curve name: TSV text} from its plots/ folder."""


@dataclass(frozen=True)
class Report:
    """The stage's outputs, as text, before anything is written."""

    metrics: dict[str, Any]
    """metrics.json: {section: scalars}."""
    plots: dict[str, str]
    """Path under out_dir (plots/<section>/<curve>.tsv) -> TSV text."""
    markdown: str
    """report.md."""


def read_outputs(folders: dict[str, Path]) -> StageOutputs:
    """Read metrics.json of every section's folder and plots/*.tsv of sft and cmat; a missing file is a DataError
    naming it and the stage that writes it."""
    metrics, plots = {}, {}
    for section in SECTIONS:
        metrics[section] = _read_json(folders[section] / "metrics.json", STAGE_OF.get(section, section))
    for section, x in PLOT_X.items():
        folder = folders[section] / "plots"
        names = list(SFT_PLOTS) if section == "sft" else sorted(p.stem for p in folder.glob("*.tsv"))
        if not names:
            raise DataError(f"{folder}: no plots/*.tsv; run the {section} stage first (`dvc repro {section}`)")
        plots[section] = {name: _read_tsv(folder / f"{name}.tsv", section, x) for name in names}
    return StageOutputs(metrics, plots)


def _read_json(path: Path, stage: str) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"{path}: no such file; run the {stage} stage first (`dvc repro {stage}`)")
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object of metrics, got {type(data).__name__}")
    return data


def _read_tsv(path: Path, stage: str, x: str) -> str:
    if not path.is_file():
        raise DataError(f"{path}: no such file; run the {stage} stage first (`dvc repro {stage}`)")
    text = path.read_text()
    header = text.split("\n", 1)[0].split("\t")
    if len(header) != 2 or header[0] != x:
        raise DataError(f"{path}: header {header!r} is not `{x}<TAB><value>`; the {stage} stage wrote another format")
    return text


def scalars(data: Any) -> Any:
    """The numbers of a metrics mapping, nesting kept: strings, booleans, None and lists (histories) are dropped,
    and so are mappings left empty."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            value = scalars(value)
            if value:
                out[key] = value
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = value
    return out


def build_report(outputs: StageOutputs, base_model: str, adapter: str) -> Report:
    """The pure core: metrics.json, plot files and report.md from the stages' outputs."""
    metrics = {section: scalars(outputs.metrics[section]) for section in SECTIONS}
    plots = {f"plots/{section}/{name}.tsv": text for section, curves in outputs.plots.items()
             for name, text in curves.items()}
    return Report(metrics, plots, render_markdown(outputs.metrics, base_model, adapter))


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _row(name: str, data: dict[str, Any], keys: tuple[str, ...]) -> str:
    return f"| {name} | " + ", ".join(f"{k} {_fmt(data.get(k))}" for k in keys) + " |"


def render_markdown(metrics: dict[str, dict[str, Any]], base_model: str, adapter: str) -> str:
    sft, cmat, evaluation, os_eval, kg_eval = (metrics[s] for s in SECTIONS)
    final = cmat.get("final") if isinstance(cmat.get("final"), dict) else {}
    cmat_view = {**cmat, **{f"final_{k}": final.get(k) for k in CMAT_FINAL_KEYS}}
    lines = ["# Run report", "",
             f"Base model `{base_model}`; evaluated adapter `{adapter or '(none: the base model)'}` "
             f"(policy `{evaluation.get('policy', 'n/a')}`) on {_fmt(evaluation.get('tasks'))} tasks of "
             f"`{evaluation.get('task_file', 'n/a')}`.", "",
             f"**DB overall_cat_accuracy: {_fmt(evaluation.get('overall_cat_accuracy'))}**; "
             f"OS accuracy {_fmt(os_eval.get('accuracy'))} ({_fmt(os_eval.get('supported'))} supported tasks); "
             f"KG F1 {_fmt(kg_eval.get('f1'))}", "",
             "| stage | key metrics |", "|---|---|",
             _row("sft", sft, SFT_KEYS),
             _row("cmat", cmat_view, CMAT_KEYS + tuple(f"final_{k}" for k in CMAT_FINAL_KEYS)),
             _row("evaluate (DB)", evaluation, EVAL_KEYS),
             _row("evaluate_os", os_eval, OS_KEYS),
             _row("evaluate_kg", kg_eval, KG_KEYS), ""]
    accuracy = {k.removesuffix("_accuracy"): v for k, v in evaluation.items()
                if k.endswith("_accuracy") and k != "overall_cat_accuracy"}
    if accuracy:
        lines += ["| DB task type | accuracy % |", "|---|---|", *(f"| {k} | {_fmt(v)} |" for k, v in accuracy.items()), ""]
    outcomes = evaluation.get("outcomes")
    if isinstance(outcomes, dict) and outcomes:
        lines += ["| DB outcome | episodes |", "|---|---|", *(f"| {k} | {v} |" for k, v in outcomes.items()), ""]
    lines += ["Curves: plots/sft/*.tsv (per step), plots/cmat/*.tsv (per iteration); `dvc plots show`."]
    return "\n".join(lines) + "\n"


def write_report(result: Report, out_dir: Path) -> None:
    """Write metrics.json, report.md and plots/ (replaced whole: curves gone from a stage are gone here)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out_dir / "plots", ignore_errors=True)
    for rel, text in result.plots.items():
        (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (out_dir / rel).write_text(text)
    (out_dir / "metrics.json").write_text(json.dumps(result.metrics, indent=2) + "\n")
    (out_dir / "report.md").write_text(result.markdown)


def report(params: Params) -> dict[str, Any]:
    """Read the sft, cmat and evaluation outputs params names, write report.out_dir; returns the metrics."""
    folders = {section: Path(getattr(params, section).out_dir) for section in SECTIONS}
    result = build_report(read_outputs(folders), params.model.base, params.evaluate.adapter)
    out_dir = Path(params.report.out_dir)
    write_report(result, out_dir)
    save_resolved(params, out_dir)
    return result.metrics


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from cmat_pipeline.cli import stage_args

    params, _ = stage_args(__doc__.splitlines()[0], argv)
    metrics = report(params)
    print(json.dumps({"out_dir": params.report.out_dir,
                      "overall_cat_accuracy": metrics["evaluate"].get("overall_cat_accuracy")}))
    return metrics


if __name__ == "__main__":
    import sys

    from cmat_pipeline.cli import main as cli_main

    sys.exit(cli_main(["report", *sys.argv[1:]]))
