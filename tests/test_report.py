"""The `report` stage: git-tracked metrics, plots and report.md from the sft, cmat and evaluate outputs.

Fast (a few seconds; the last test runs git and dvc in a temporary repository):
    .venv/bin/python -m pytest -q tests/test_report.py
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cmat_pipeline import cli
from cmat_pipeline.config import load_params
from cmat_pipeline.errors import DataError
from cmat_pipeline.report import build_report, read_outputs, report

REPO = Path(__file__).resolve().parents[1]
SFT_METRICS = {"method": "lora", "steps": 4, "train_loss": 1.5, "val_loss": 1.75, "device": "cpu",
               "resumed_from_step": 0, "train_data": {"records": 10, "tokens": 900}, "overall_tag": None}
CMAT_HISTORY = [{"iteration": 1, "mean_reward": 0.1, "success_rate": 0.0, "outcomes": {"completed": 2}},
                {"iteration": 2, "mean_reward": 0.4, "success_rate": 0.5, "outcomes": {"completed": 3}}]
CMAT_METRICS = {"iterations": 2, "episodes": 8, "success_rate_first": 0.0, "success_rate_last": 0.5,
                "final": {"mean_reward": 0.4, "veto_rate": 0.25, "kl": 0.01}, "device": "cpu",
                "ablation": {"veto": True, "memory": False}, "history": CMAT_HISTORY}


def eval_metrics(accuracy: float) -> dict:
    return {"tasks": 6, "SELECT_accuracy": accuracy, "INSERT_accuracy": 50.0, "overall_cat_accuracy": accuracy,
            "outcomes": {"completed": 5, "invalid_format": 1}, "policy": "hf:artifacts/model+artifacts/cmat",
            "task_file": "../shared/agentbench/dbbench/dev.jsonl", "wall_seconds": 3.5}


OS_METRICS = {"tasks": 26, "supported": 23, "accuracy": 8.7, "accuracy_all_tasks": 7.69, "first_turn_valid_format": 100.0,
              "outcomes": {"completed": 12}, "policy": "hf:artifacts/model+artifacts/cmat", "driver": "bwrap",
              "wall_seconds": 501.0}
KG_METRICS = {"tasks": 7, "f1": 14.29, "em": 0.0, "executability": 28.57, "endpoint": "embedded", "wall_seconds": 40.0}


def fake_run(root: Path, accuracy: float = 33.3) -> dict[str, Path]:
    """sft, cmat, evaluate, evaluate_os and evaluate_kg output folders as those stages leave them."""
    folders = {"sft": root / "sft", "cmat": root / "cmat", "evaluate": root / "eval", "os": root / "eval_os",
               "kg": root / "eval_kg"}
    for folder in folders.values():
        (folder / "plots").mkdir(parents=True, exist_ok=True)
    (folders["sft"] / "metrics.json").write_text(json.dumps(SFT_METRICS))
    for name, column in {"train_loss": "loss", "val_loss": "val_loss", "learning_rate": "learning_rate"}.items():
        (folders["sft"] / "plots" / f"{name}.tsv").write_text(f"step\t{column}\n1\t2.5\n2\t{accuracy / 100}\n")
    (folders["cmat"] / "metrics.json").write_text(json.dumps(CMAT_METRICS))
    for name in ("mean_reward", "success_rate"):
        rows = "".join(f"{h['iteration']}\t{h[name]}\n" for h in CMAT_HISTORY)
        (folders["cmat"] / "plots" / f"{name}.tsv").write_text(f"iteration\t{name}\n{rows}")
    (folders["evaluate"] / "metrics.json").write_text(json.dumps(eval_metrics(accuracy)))
    (folders["os"] / "metrics.json").write_text(json.dumps(OS_METRICS))
    (folders["kg"] / "metrics.json").write_text(json.dumps(KG_METRICS))
    return folders


def test_build_report_keeps_numbers_per_stage_and_curves_as_plots(tmp_path):
    result = build_report(read_outputs(fake_run(tmp_path)), "tiny-random", "artifacts/cmat")
    assert result.metrics == {
        "sft": {"steps": 4, "train_loss": 1.5, "val_loss": 1.75, "resumed_from_step": 0,
                "train_data": {"records": 10, "tokens": 900}},
        "cmat": {"iterations": 2, "episodes": 8, "success_rate_first": 0.0, "success_rate_last": 0.5,
                 "final": {"mean_reward": 0.4, "veto_rate": 0.25, "kl": 0.01}},
        "evaluate": {"tasks": 6, "SELECT_accuracy": 33.3, "INSERT_accuracy": 50.0, "overall_cat_accuracy": 33.3,
                     "outcomes": {"completed": 5, "invalid_format": 1}, "wall_seconds": 3.5},
        "os": {"tasks": 26, "supported": 23, "accuracy": 8.7, "accuracy_all_tasks": 7.69,
               "first_turn_valid_format": 100.0, "outcomes": {"completed": 12}, "wall_seconds": 501.0},
        "kg": {"tasks": 7, "f1": 14.29, "em": 0.0, "executability": 28.57, "wall_seconds": 40.0}}
    assert sorted(result.plots) == ["plots/cmat/mean_reward.tsv", "plots/cmat/success_rate.tsv",
                                    "plots/sft/learning_rate.tsv", "plots/sft/train_loss.tsv",
                                    "plots/sft/val_loss.tsv"]
    assert result.plots["plots/cmat/mean_reward.tsv"] == "iteration\tmean_reward\n1\t0.1\n2\t0.4\n"
    md = result.markdown
    assert "Base model `tiny-random`" in md and "adapter `artifacts/cmat`" in md
    assert "**DB overall_cat_accuracy: 33.3**" in md and "| SELECT | 33.3 |" in md and "| invalid_format | 1 |" in md
    assert "OS accuracy 8.7 (23 supported tasks); KG F1 14.29" in md
    assert "| evaluate_os | tasks 26, supported 23, accuracy 8.7" in md and "| evaluate_kg | tasks 7, f1 14.29" in md
    assert "| sft | method lora, steps 4, train_loss 1.5, val_loss 1.75" in md
    assert "success_rate_last 0.5" in md and "final_kl 0.01" in md
    assert "(none: the base model)" in build_report(read_outputs(fake_run(tmp_path)), "m", "").markdown


def test_cmat_report_writes_git_files_and_replaces_stale_plots(tmp_path, capsys):
    folders = fake_run(tmp_path / "run")
    out = tmp_path / "report"
    args = ["report", "--params", str(REPO / "params.yaml"), "--set", f"report.out_dir={out}",
            *(f"--set={s}.out_dir={folders[s]}" for s in ("sft", "cmat", "evaluate", "os", "kg"))]
    (out / "plots/cmat").mkdir(parents=True)
    (out / "plots/cmat/gone.tsv").write_text("iteration\tgone\n")  # a curve an earlier cmat run had
    assert cli.main(args) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["overall_cat_accuracy"] == 33.3
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["metrics.json", "plots/cmat/mean_reward.tsv", "plots/cmat/success_rate.tsv",
                     "plots/sft/learning_rate.tsv", "plots/sft/train_loss.tsv", "plots/sft/val_loss.tsv",
                     "report.md", "resolved_params.yaml"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"sft", "cmat", "evaluate", "os", "kg"} and "history" not in metrics["cmat"]
    assert yaml.safe_load((out / "resolved_params.yaml").read_text())["report"]["out_dir"] == str(out)


@pytest.mark.parametrize("broken, fragment", [
    ("sft/metrics.json", r"sft/metrics.json: no such file; run the sft stage first"),
    ("sft/plots/val_loss.tsv", r"sft/plots/val_loss.tsv: no such file; run the sft stage first"),
    ("cmat/metrics.json", r"cmat/metrics.json: no such file; run the cmat stage first"),
    ("cmat/plots", r"cmat/plots: no plots/\*.tsv; run the cmat stage first"),
    ("eval/metrics.json", r"eval/metrics.json: no such file; run the evaluate stage first"),
    ("eval_os/metrics.json", r"eval_os/metrics.json: no such file; run the evaluate_os stage first"),
    ("eval_kg/metrics.json", r"eval_kg/metrics.json: no such file; run the evaluate_kg stage first"),
])
def test_a_missing_input_names_the_file_and_its_stage(tmp_path, broken, fragment):
    folders = fake_run(tmp_path)
    target = tmp_path / broken
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(DataError, match=re.escape(str(tmp_path)) + "/" + fragment):
        read_outputs(folders)


def test_malformed_inputs_are_named(tmp_path):
    folders = fake_run(tmp_path)
    (folders["cmat"] / "plots/kl.tsv").write_text("step\tkl\n1\t0.1\n")
    with pytest.raises(DataError, match=r"cmat/plots/kl.tsv: header \['step', 'kl'\] is not `iteration<TAB>"):
        read_outputs(folders)
    (folders["cmat"] / "plots/kl.tsv").unlink()
    (folders["evaluate"] / "metrics.json").write_text("[1, 2]")
    with pytest.raises(DataError, match=r"eval/metrics.json: expected a JSON object of metrics, got list"):
        read_outputs(folders)


def _resolve(text: str, params: dict) -> str:
    def lookup(match: re.Match) -> str:
        value = params
        for part in match.group(1).split("."):
            value = value[part]
        return str(value)

    return re.sub(r"\$\{([\w.]+)\}", lookup, text)


def _entries(spec: list) -> dict[str, dict]:
    return {next(iter(e)) if isinstance(e, dict) else e: (next(iter(e.values())) if isinstance(e, dict) else {})
            for e in spec}


def test_dvc_yaml_declares_what_report_writes_outside_the_cached_folders(tmp_path):
    """The report stage's metrics/plots/outs are exactly the files it writes, git-tracked (`cache: false`, not
    git-ignored), and nothing in dvc.yaml points metrics or plots into a cached output folder."""
    params = load_params(REPO / "params.yaml")
    dvc = yaml.safe_load(_resolve((REPO / "dvc.yaml").read_text(), params.to_dict()))
    assert "metrics" not in dvc and "plots" not in dvc, "top-level entries point into cached folders"
    stage = dvc["stages"]["report"]
    declared = {**_entries(stage["outs"]), **_entries(stage["metrics"]), **_entries(stage["plots"])}
    assert all(spec.get("cache") is False for spec in declared.values()), declared
    assert {p for p in declared if p.startswith("artifacts/report/plots/sft/")} == {
        f"artifacts/report/plots/sft/{n}.tsv" for n in ("train_loss", "val_loss", "learning_rate")}
    assert declared["artifacts/report/plots/cmat"]["x"] == "iteration"

    folders = fake_run(tmp_path / "run")
    run = load_params(REPO / "params.yaml", [f"{s}.out_dir={folders[s]}" for s in folders]
                      + [f"report.out_dir={tmp_path / 'artifacts/report'}"])
    report(run)
    written = {p.relative_to(tmp_path).as_posix() for p in (tmp_path / "artifacts/report").rglob("*") if p.is_file()}
    covered = {w for w in written if any(w == d or w.startswith(d + "/") for d in declared)}
    assert covered == written and all(any(w == d or w.startswith(d + "/") for w in written) for d in declared)

    cached = [_resolve(o if isinstance(o, str) else next(iter(o)), params.to_dict())
              for s in dvc["stages"].values() for o in s.get("outs", [])
              if not (isinstance(o, dict) and next(iter(o.values())).get("cache") is False)]
    for path in declared:
        assert not any(path == c or path.startswith(c + "/") for c in cached), f"{path} is inside a cached out"
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *sorted(written)], cwd=REPO,
                             capture_output=True, text=True)
    assert ignored.stdout == "", f"git-ignored, cannot be committed: {ignored.stdout}"


def _run(repo: Path, *args: str, env: dict) -> str:
    done = subprocess.run(list(args), cwd=repo, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_dvc_metrics_and_plots_diff_in_a_clone_without_the_cache(tmp_path, monkeypatch):
    """The project's dvc.yaml in a git + DVC repository: two committed report runs; a fresh clone (no DVC cache,
    no cached outputs) shows and diffs the report's metrics and plots."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "GIT_"))}
    env.update(DVC_NO_ANALYTICS="1", DVC_SITE_CACHE_DIR=str(tmp_path / "site-cache"), HOME=str(tmp_path / "home"),
               GIT_CONFIG_NOSYSTEM="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.com")
    dvc = [sys.executable, "-m", "dvc"]
    origin = tmp_path / "origin"
    origin.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, origin / name)
    _run(origin, "git", "init", "-q", env=env)
    _run(origin, *dvc, "init", "-q", env=env)
    monkeypatch.chdir(origin)  # the stage's paths are relative, as under `dvc repro`
    for accuracy in (20.0, 35.0):
        fake_run(origin / "artifacts", accuracy)  # artifacts/sft, cmat, eval: never committed (cached outputs)
        report(load_params("params.yaml"))
        _run(origin, "git", "add", ".dvc", "dvc.yaml", "params.yaml", "artifacts/report", env=env)
        _run(origin, "git", "commit", "-qm", f"report {accuracy}", env=env)

    clone = tmp_path / "clone"
    _run(tmp_path, "git", "clone", "-q", str(origin), str(clone), env=env)
    assert not (clone / ".dvc/cache").exists() and not (clone / "artifacts/sft").exists()
    shown = json.loads(_run(clone, *dvc, "metrics", "show", "--json", env=env))
    got = shown[""]["data"]["artifacts/report/metrics.json"]["data"]
    assert got["evaluate"]["overall_cat_accuracy"] == 35.0 and got["cmat"]["final"]["kl"] == 0.01
    diff = json.loads(_run(clone, *dvc, "metrics", "diff", "HEAD~1", "--json", env=env))
    assert diff["artifacts/report/metrics.json"]["evaluate.overall_cat_accuracy"] == {
        "old": 20.0, "new": 35.0, "diff": 15.0}
    plots = json.loads(_run(clone, *dvc, "plots", "diff", "HEAD~1", "--json", env=env))
    for name in ("sft/train_loss.tsv", "sft/val_loss.tsv", "sft/learning_rate.tsv", "cmat/mean_reward.tsv"):
        rendered = plots["data"][f"artifacts/report/plots/{name}"]
        assert rendered and set(rendered[0]["revisions"]) == {"HEAD~1", "workspace"}, name
