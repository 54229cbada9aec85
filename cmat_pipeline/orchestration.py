"""What the Airflow tasks call: per-run workspaces, stage runs, run params, shard keys, publishing.

The DAG (dags/cmat_pipeline_dag.py) only wires these functions, so everything here is plain Python that
tests and people can call without a scheduler:
    python -m cmat_pipeline.orchestration my-run --set model.base=tiny-random --set collect.db_tasks=40
    python -m cmat_pipeline.orchestration my-run --stages evaluate --publish      # one stage, then publish
Each run gets its own workspace under $CMAT_WORKSPACES (default ~/.cache/cmat/runs): a copy of the
project's code and its resolved params.yaml, where every stage runs as `python -m cmat_pipeline <stage>`
(the same entry as `cmat <stage>`) in a fresh process. Concurrent runs therefore never share a file, and
a stage that is run again replaces its own outputs (collect keys its data on the run's shard).

Adding a stage (e.g. the CMAT actor-critic stage) is one line: insert its `cmat` command name in STAGES.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cmat_pipeline.errors import CmatError, ConfigError

STAGES = ["prepare-model", "collect", "filter", "augment", "distill", "general", "mix", "sft", "cmat", "evaluate",
          "evaluate-os", "evaluate-kg", "report"]
"""`cmat <stage>` commands in pipeline order; the DAG makes one task per entry."""
GPU_STAGES = frozenset({"general", "sft", "cmat", "evaluate", "evaluate-os", "evaluate-kg"})
"""Stages that run a model: on Kubernetes they get a GPU pod, elsewhere nothing changes."""
ADAPTER_SECTIONS = ("cmat", "sft")
"""Params sections whose out_dir holds the run's final adapter, latest tuning stage first."""

STAGE_OUTPUTS = {"prepare-model": (), "collect": ("collect.out_dir",), "filter": ("filter.out_dir",),
                 "augment": ("augment.out_dir",), "distill": ("distill.out_dir",), "general": ("mix.general_dir",),
                 "mix": ("mix.out_dir",), "sft": ("sft.out_dir",), "cmat": ("cmat.out_dir",),
                 "evaluate": ("evaluate.out_dir",), "evaluate-os": ("os.out_dir",), "evaluate-kg": ("kg.out_dir",),
                 "report": ("report.out_dir",)}
"""What each stage leaves in the workspace (params keys), pushed to the registry as the stage's checkpoint when
CMAT_REGISTRY is set. prepare-model pushes only its record: the model is rebuilt from $CMAT_CACHE in seconds."""

CODE_PATHS = ("cmat_pipeline", "pyproject.toml", "dvc.yaml", ".dvc/config", ".dvcignore")
"""What a workspace copies from the project (params.yaml is written resolved, outputs start empty)."""
MARKER = ".cmat/workspace.json"

# DAG run params (the Airflow trigger form) -> params.yaml keys. None/empty means "as in params.yaml".
RUN_PARAM_KEYS = {"base_model": "model.base", "db_tasks": "collect.db_tasks", "domains": "collect.domains",
                  "method": "sft.method", "learning_rate": "sft.learning_rate", "actor_lr": "cmat.actor_lr",
                  "cmat_iterations": "cmat.iterations"}
SEED_PARAM, OVERRIDES_PARAM = "seed", "overrides"
METHODS = ("lora", "ptuning")


class StageFailed(CmatError):
    """A stage process exited non-zero; the message carries the end of its output."""


# ---- where things are ---------------------------------------------------------------------------------
def project_dir() -> Path:
    """The checkout whose code and params.yaml runs copy ($CMAT_PROJECT_DIR, default: this package's parent)."""
    return Path(os.environ.get("CMAT_PROJECT_DIR") or Path(__file__).resolve().parents[1])


def workspaces_root() -> Path:
    cache = Path(os.environ.get("CMAT_CACHE", "~/.cache/cmat")).expanduser()
    return Path(os.environ.get("CMAT_WORKSPACES") or cache / "runs").expanduser()


def run_key(run_id: str) -> str:
    """A file- and S3-safe key for an Airflow run id (`scheduled__2026-11-16T00:00:00+00:00` has ':' and '+')."""
    if not run_id:
        raise ConfigError("run id must not be empty")
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", run_id).strip("-.")[:150] or "run"
    return safe if safe == run_id else f"{safe}-{hashlib.sha1(run_id.encode()).hexdigest()[:8]}"


def task_id(stage: str) -> str:
    return stage.replace("-", "_")


# ---- shards and run params ---------------------------------------------------------------------------
def shard_for(data_interval_start: datetime | None, run_id: str, run_after: datetime | None = None) -> str:
    """The `collect.shard` of a run.

    Scheduled runs and backfills have a data interval: the shard is its start (UTC), `2026-11-16`, with the
    time added when it is not midnight, so a backfill of a week rewrites that week's shard only. Manual runs
    in Airflow 3 have no logical date and no data interval: the shard is the run id (unique per trigger,
    `manual__<run_after>`), or `manual__<run_after>` when there is no run id.
    """
    if data_interval_start is not None:
        start = data_interval_start.astimezone(timezone.utc)
        return start.strftime("%Y-%m-%d" if start.time() == datetime.min.time() else "%Y-%m-%dT%H:%M")
    key = run_id or (f"manual__{run_after.astimezone(timezone.utc).strftime('%Y-%m-%dT%H:%M:%S')}" if run_after
                     else "")
    if not key:
        raise ConfigError("a run without a data interval needs a run id or run_after to key its shard")
    return re.sub(r"[^\w.:+-]+", "-", key)[:120]


def _seed_keys() -> list[str]:
    """Every `<section>.seed` in the params schema: one run seed drives them all."""
    import dataclasses

    from cmat_pipeline.config import Params

    return [f"{f.name}.seed" for f in dataclasses.fields(Params)
            if dataclasses.is_dataclass(f.default_factory) and "seed" in {g.name for g in dataclasses.fields(
                f.default_factory)}]  # type: ignore[arg-type]


def _yaml_value(value: Any) -> str:
    return json.dumps(value)  # JSON is YAML: strings stay strings (`--set model.base="123"`), numbers numbers


def validate_run_params(conf: Mapping[str, Any], *, shard: str | None = None,
                        params_file: str | Path | None = None) -> list[str]:
    """Turn a DAG run's params into `--set` overrides, checked against params.yaml's schema.

    Raises ConfigError listing every problem (unknown param, wrong type, out of range, an override that
    params.yaml rejects). The returned list is what every stage of the run gets.
    """
    from cmat_pipeline.config import load_params

    params_file = Path(params_file or project_dir() / "params.yaml")
    errors: list[str] = []
    overrides = [f"collect.shard={_yaml_value(shard)}"] if shard is not None else []  # first: explicit ones win
    allowed = {*RUN_PARAM_KEYS, SEED_PARAM, OVERRIDES_PARAM}
    for name in sorted(set(conf) - allowed):
        errors.append(f"{name}: unknown run param; allowed: {', '.join(sorted(allowed))}")
    for name, key in RUN_PARAM_KEYS.items():
        value = conf.get(name)
        if value is None or value == "":
            continue
        if name == "method" and value not in METHODS:
            errors.append(f"method: {value!r} is not allowed; choose one of {', '.join(METHODS)}")
            continue
        overrides.append(f"{key}={_yaml_value(value)}")
    seed = conf.get(SEED_PARAM)
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            errors.append(f"seed: expected an integer >= 0, got {seed!r}")
        else:
            overrides += [f"{key}={seed}" for key in _seed_keys()]
    extra = conf.get(OVERRIDES_PARAM) or []
    if not isinstance(extra, list) or not all(isinstance(o, str) and "=" in o for o in extra):
        errors.append(f"overrides: expected a list of KEY=VALUE strings, got {extra!r}")
    else:
        overrides += extra
    try:
        load_params(params_file, overrides)
    except ConfigError as err:
        # the file stops at its first error: try each override alone to name every bad value at once;
        # if none fails alone, the combination breaks a cross-field rule (e.g. warmup below max_steps)
        alone = [f"{o}: {_strip(e, params_file)}" for o in overrides if (e := _config_error(params_file, o))]
        errors += alone or [_strip(err, params_file)]
    if errors:
        raise ConfigError("invalid run params:\n  - " + "\n  - ".join(errors))
    return overrides


def _config_error(params_file: Path, override: str) -> ConfigError | None:
    from cmat_pipeline.config import load_params

    try:
        load_params(params_file, [override])
    except ConfigError as err:
        return err
    return None


def _strip(err: Exception, params_file: Path) -> str:
    return str(err).removeprefix(f"{params_file}: ")


# ---- workspaces -----------------------------------------------------------------------------------------
def run_workspace(run_id: str, overrides: Sequence[str] | None = None) -> Path:
    """The run's own folder: code copy + resolved params.yaml; created once, atomically, then reused.

    `overrides` are baked into the workspace's params.yaml when it is created; later calls must pass the
    same ones (or None), so every stage and the published params.yaml describe one configuration.
    """
    target = workspaces_root() / run_key(run_id)
    if not (target / MARKER).exists():
        _create_workspace(target, run_id, list(overrides or []))
        _restore_stages(target, run_id)  # a retry on another worker continues from the finished stages
    marker = json.loads((target / MARKER).read_text())
    if overrides is not None and list(overrides) != marker["overrides"]:
        raise ConfigError(f"run {run_id!r}: its workspace {target} was made with overrides {marker['overrides']}, "
                          f"not {list(overrides)}; a run keeps one configuration (trigger a new run instead)")
    return target


def _create_workspace(target: Path, run_id: str, overrides: list[str]) -> None:
    from cmat_pipeline.config import load_params

    project = project_dir()
    params = load_params(project / "params.yaml", overrides).to_dict()  # fails here, before any copying
    staging = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.tmp"
    staging.mkdir(parents=True)
    try:
        for rel in CODE_PATHS:
            source = project / rel
            if source.is_dir():
                shutil.copytree(source, staging / rel, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            elif source.is_file():
                (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, staging / rel)
        import yaml

        (staging / "params.yaml").write_text(yaml.safe_dump(_pin_inputs(params, project), sort_keys=False))
        marker = {"run_id": run_id, "overrides": overrides, "project": str(project), "created_at": _now(),
                  **_git_state(project)}
        (staging / MARKER).parent.mkdir(parents=True, exist_ok=True)
        (staging / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        staging.rename(target)  # atomic; fails if a concurrent attempt got there first
    except OSError:
        if not (target / MARKER).exists():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _pin_inputs(node: Any, project: Path, key: str = "") -> Any:
    """Make relative input paths that live outside the copy absolute (e.g. ../shared/agentbench/...).

    Output folders (keys ending in `dir`) and anything under artifacts/ stay relative: they belong to the run.
    """
    if isinstance(node, dict):
        return {k: _pin_inputs(v, project, k) for k, v in node.items()}
    if isinstance(node, list):
        return [_pin_inputs(v, project, key) for v in node]
    parts = Path(node).parts if isinstance(node, str) else ()
    if (parts and not key.endswith("dir") and not Path(node).is_absolute() and parts[0] not in ("artifacts", ".")
            and (project / node).exists()):
        return str((project / node).resolve())
    return node


def _git_state(project: Path) -> dict[str, Any]:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *CODE_PATHS, "params.yaml"], cwd=project,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return {"git_commit": commit, "git_dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}


def existing_workspace(run_id: str) -> Path:
    target = workspaces_root() / run_key(run_id)
    if not (target / MARKER).exists():
        raise CmatError(f"run {run_id!r} has no workspace at {target}; its stages have not run on this machine "
                        "(on Kubernetes, CMAT_WORKSPACES must be a volume every task pod mounts)")
    return target


# ---- stages --------------------------------------------------------------------------------------------
def run_stage(stage: str, run_id: str, overrides: Sequence[str] | None = None) -> dict[str, Any]:
    """Run `cmat <stage>` in the run's workspace, in its own process; returns a record of the attempt.

    Safe to repeat: each stage replaces its own outputs (collect resumes, then replaces its shard), so a
    retry or a cleared task never duplicates data. Raises StageFailed with the output's tail on failure.
    """
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    workspace = run_workspace(run_id, overrides)
    with _stage_lock(workspace, stage):
        start = time.perf_counter()
        rc, tail = _run_cmat(workspace, stage, ["--params", "params.yaml", "--no-progress"])
        record = {"stage": stage, "run_id": run_id, "workspace": str(workspace), "returncode": rc,
                  "seconds": round(time.perf_counter() - start, 2), "finished_at": _now()}
        (workspace / ".cmat" / "stages").mkdir(parents=True, exist_ok=True)
        (workspace / ".cmat" / "stages" / f"{stage}.json").write_text(json.dumps(record, indent=2) + "\n")
    if rc != 0:
        raise StageFailed(f"cmat {stage} failed (exit {rc}) for run {run_id} in {workspace}; last output:\n"
                          + "".join(tail))
    _checkpoint_stage(workspace, run_id, stage)
    return record


def _registry() -> Any:
    """The S3 registry when CMAT_REGISTRY is set (workers of a distributed deployment), else None."""
    if not os.environ.get("CMAT_REGISTRY"):
        return None
    from cmat_pipeline.registry import Registry

    return Registry.from_env()


def _checkpoint_stage(workspace: Path, run_id: str, stage: str) -> None:
    """Push what a finished stage wrote, so a task retried on a worker without this workspace continues."""
    registry = _registry()
    if registry is None:
        return
    from cmat_pipeline.config import load_params

    params = load_params(workspace / "params.yaml").to_dict()
    outputs = [_dotted(params, key) for key in STAGE_OUTPUTS[stage]]
    paths = [p for p in outputs if (workspace / p).exists()] + [f".cmat/stages/{stage}.json"]
    registry.push_checkpoint(run_key(run_id), stage, workspace, paths)


def _restore_stages(workspace: Path, run_id: str) -> list[str]:
    """Bring a fresh workspace up to the run's finished stages from their registry checkpoints."""
    registry = _registry()
    if registry is None:
        return []
    done = registry.list_checkpoints(run_key(run_id))
    for stage in done:
        registry.restore_checkpoint(run_key(run_id), stage, workspace)
    if "prepare-model" in done:  # its record came back, its model did not: rebuild it (from the cache)
        rc, tail = _run_cmat(workspace, "prepare-model", ["--params", "params.yaml", "--no-progress"])
        if rc != 0:
            raise StageFailed(f"cmat prepare-model failed (exit {rc}) restoring run {run_id}:\n" + "".join(tail))
    if done:
        print(f"run {run_id}: restored {', '.join(done)} from the registry into {workspace}")
    return done


def _dotted(params: Mapping[str, Any], key: str) -> Any:
    section, name = key.split(".", 1)
    return params[section][name]


def _launcher(stage: str) -> list[str]:
    """`python -m cmat_pipeline`, or e.g. CMAT_SFT_LAUNCHER="accelerate launch --num_processes 8" for multi-GPU."""
    custom = os.environ.get(f"CMAT_{task_id(stage).upper()}_LAUNCHER", "").strip()
    return [*shlex.split(custom), "-m", "cmat_pipeline"] if custom else [sys.executable, "-m", "cmat_pipeline"]


def _run_cmat(workspace: Path, stage: str, args: list[str]) -> tuple[int, list[str]]:
    """Run the workspace's own copy of the code (cwd and PYTHONPATH first); echo output for the task log."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(workspace), os.environ.get("PYTHONPATH", "")) if p)}
    tail: collections.deque[str] = collections.deque(maxlen=40)
    with subprocess.Popen([*_launcher(stage), stage, *args], cwd=workspace, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            tail.append(line)
    sys.stdout.flush()
    return proc.returncode, list(tail)


@contextlib.contextmanager
def _stage_lock(workspace: Path, stage: str) -> Iterator[None]:
    """One attempt of a stage at a time per run (a lost-heartbeat zombie may still be running)."""
    path = workspace / ".cmat" / "locks" / f"{stage}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StageFailed(f"cmat {stage} is already running in {workspace} (another attempt of this task); "
                              "this attempt stops so the two do not write the same files") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ---- publishing ------------------------------------------------------------------------------------------
def run_artifacts(workspace: Path) -> dict[str, Any]:
    """The run's files by registry kind, read from the workspace's params (paths as the stages wrote them)."""
    from cmat_pipeline.config import load_params

    params = load_params(workspace / "params.yaml")
    evaluation = workspace / params.evaluate.out_dir
    if not (evaluation / "metrics.json").is_file():
        raise CmatError(f"nothing to publish: {evaluation / 'metrics.json'} is missing (has `evaluate` run?)")
    artifacts: dict[str, Any] = {"params": workspace / "params.yaml", "run": _write_run_record(workspace),
                                 "report": evaluation, "metrics": {"evaluate.json": evaluation / "metrics.json"}}
    if (workspace / "dvc.lock").is_file():
        artifacts["dvc_lock"] = workspace / "dvc.lock"
    for section, name in (("os", "evaluate_os.json"), ("kg", "evaluate_kg.json")):  # when those stages ran
        if (workspace / getattr(params, section).out_dir / "metrics.json").is_file():
            artifacts["metrics"][name] = workspace / getattr(params, section).out_dir / "metrics.json"
    for section in ADAPTER_SECTIONS:
        out_dir = getattr(getattr(params, section, None), "out_dir", None)
        if out_dir and (workspace / out_dir).is_dir() and any((workspace / out_dir).iterdir()):
            adapter = workspace / out_dir
            artifacts["adapter"] = {p.relative_to(adapter).as_posix(): p for p in sorted(adapter.rglob("*"))
                                    if p.is_file() and "checkpoints" not in p.relative_to(adapter).parts}
            if (adapter / "metrics.json").is_file():
                artifacts["metrics"][f"{section}.json"] = adapter / "metrics.json"
            break
    dataset = workspace / params.mix.out_dir
    names = ("card.json", "card.md", "train.jsonl", "val.jsonl")
    if any((dataset / n).is_file() for n in names):
        artifacts["dataset"] = {n: dataset / n for n in names if (dataset / n).is_file()}
    return artifacts


def _write_run_record(workspace: Path) -> Path:
    stages = sorted((workspace / ".cmat" / "stages").glob("*.json"))
    record = {**json.loads((workspace / MARKER).read_text()),
              "stages": [json.loads(p.read_text()) for p in stages]}
    path = workspace / ".cmat" / "run.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def finished_stages(workspace: Path) -> list[str]:
    """The stages whose last attempt in `workspace` succeeded (their .cmat/stages record), in pipeline order."""
    records = workspace / ".cmat" / "stages"
    return [stage for stage in STAGES if (records / f"{stage}.json").is_file()
            and json.loads((records / f"{stage}.json").read_text()).get("returncode") == 0]


def write_run_lock(workspace: Path) -> Path | None:
    """Write the workspace's dvc.lock for its finished stages; None when no stage has finished.

    Airflow runs the stages directly, not through `dvc repro`, so a run has no lock of its own. DVC itself
    hashes and writes it, from the dvc.yaml and params.yaml the run copied: the entries `dvc commit -f` would
    write (schema 2.0; per stage cmd, deps and outs with md5, size and nfiles for folders, params), but nothing
    is copied into a DVC cache. The file is written whole, so it holds exactly this run's finished stages.
    """
    stages = [task_id(stage) for stage in finished_stages(workspace)]  # dvc.yaml names: prepare_model, ...
    lock = workspace / "dvc.lock"
    lock.unlink(missing_ok=True)
    if not stages:
        return None
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo(str(workspace), config={"core": {"no_scm": True}}) as repo, repo.lock:
            by_name = {stage.name: stage for stage in repo.index.stages}
            if missing := [name for name in stages if name not in by_name]:
                raise CmatError(f"{workspace / 'dvc.yaml'} has no stage {', '.join(missing)}; every entry of "
                                "orchestration.STAGES needs one")
            for name in stages:
                try:
                    by_name[name].save(run_cache=False)  # DVC's hashes of deps and outs; the cache is untouched
                except DvcException as err:
                    raise CmatError(f"cannot lock stage {name} of {workspace}: {err}") from err
            by_name[stages[0]].dvcfile.dump_stages([by_name[n] for n in stages], update_pipeline=False)
    except DvcException as err:
        raise CmatError(f"cannot write {lock}: {err}") from err
    return lock


def publish(run_id: str, registry: Any = None) -> dict[str, Any]:
    """Upload the run's artifacts, with its dvc.lock (write_run_lock), to the S3 registry (verified; re-running
    finishes an interrupted push)."""
    from cmat_pipeline.registry import Registry

    registry = registry or Registry.from_env()
    key = run_key(run_id)
    workspace = existing_workspace(run_id)
    write_run_lock(workspace)
    manifest = registry.publish_run(key, run_artifacts(workspace))
    return {"run_id": key, "registry": registry.config.url("runs", key), "files": len(manifest["files"]),
            "metrics": manifest["metrics"]}


def promote(run_id: str, metric: str | None = None, registry: Any = None) -> dict[str, Any]:
    """Move the `production` alias to this run if its metric is strictly better.

    The metric: `metric`, else params.yaml's `registry.promote_metric` when that section exists, else
    overall_cat_accuracy."""
    from cmat_pipeline.config import load_params
    from cmat_pipeline.registry import DEFAULT_METRIC, Registry

    if metric is None:
        section = getattr(load_params(existing_workspace(run_id) / "params.yaml"), "registry", None)
        metric = getattr(section, "promote_metric", None) or DEFAULT_METRIC
    registry = registry or Registry.from_env()
    return registry.promote_if_better(run_key(run_id), metric=metric)


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cmat_pipeline.orchestration",
                                     description="run pipeline stages in a run's own workspace, like the DAG does")
    parser.add_argument("run_id")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override (repeatable)")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset, in order")
    parser.add_argument("--publish", action="store_true", help="publish and promote when the stages succeed")
    args = parser.parse_args(argv)
    try:
        overrides = validate_run_params({"overrides": args.set}, shard=shard_for(None, args.run_id))
        for stage in [s.strip() for s in args.stages.split(",") if s.strip()]:
            print(json.dumps(run_stage(stage, args.run_id, overrides)))
        if args.publish:
            print(json.dumps(publish(args.run_id)))
            print(json.dumps(promote(args.run_id)))
    except CmatError as err:
        print(f"orchestration: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
