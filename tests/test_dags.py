"""The Airflow DAG and the orchestration functions its tasks call.

Fast (about 40 s): DagBag integrity and parse time, params validation (UI schema and params.yaml), shard
keys, per-run workspaces, an idempotent stage run, publishing a workspace to S3 (moto on loopback).
Slow (`-m slow`, a few minutes each on CPU with the tiny model): a full `dag.test()` run, and a run
triggered through the REST API of a real `airflow standalone`.
    .venv/bin/python -m pytest -q tests/test_dags.py
    .venv/bin/python -m pytest -q -m slow tests/test_dags.py
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

# Airflow reads its home when first imported: point it at a throw-away folder, never a real deployment.
AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="cmat-airflow-home-"))
atexit.register(shutil.rmtree, AIRFLOW_HOME, ignore_errors=True)
os.environ["AIRFLOW_HOME"] = str(AIRFLOW_HOME)
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(Path(__file__).resolve().parents[1] / "dags")  # dag.test syncs it

from cmat_pipeline import orchestration  # noqa: E402
from cmat_pipeline.config import CollectConfig, load_params  # noqa: E402
from cmat_pipeline.errors import ConfigError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DAG_FILE = REPO / "dags" / "cmat_pipeline_dag.py"
DAG_ID = "cmat_pipeline"
HEAVY = ("torch", "transformers", "peft", "boto3", "datasketch", "great_expectations", "kubernetes",
         "cmat_pipeline.config", "cmat_pipeline.registry")
# A pipeline run small enough for CPU in ~2 minutes.
TINY = ["mix.self_distill_prompts=4", "mix.general_max_new_tokens=16", "mix.type_share=[0,1]", "sft.max_steps=2",
        "sft.warmup_steps=0", "sft.save_steps=1", "sft.eval_steps=0", "sft.val_samples=2", "evaluate.limit=3",
        "generation.max_new_tokens=32", "cmat.iterations=1", "cmat.episodes=2", "cmat.max_new_tokens=16",
        "cmat.max_vetoes=1"]
TINY_CONF = {"base_model": "tiny-random", "db_tasks": 40, "method": "lora", "learning_rate": 0.001, "seed": 0,
             "overrides": TINY}


@pytest.fixture(scope="module")
def dag():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAG_FILE))
    assert bag.import_errors == {}
    return bag.dags[DAG_ID]


@pytest.fixture
def workspaces(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("CMAT_WORKSPACES", str(tmp_path / "runs"))
    return tmp_path / "runs"


def test_dag_file_parses_fast_without_heavy_imports():
    """Parse cost as the dag-processor pays it (Airflow itself already imported), in a fresh interpreter."""
    probe = f"""
import json, runpy, sys, time
import airflow.sdk
from airflow.dag_processing.dagbag import DagBag
start = time.perf_counter()
bag = DagBag(dag_folder={str(DAG_FILE)!r})
seconds = time.perf_counter() - start
print(json.dumps({{"seconds": seconds, "errors": {{k: str(v) for k, v in bag.import_errors.items()}},
                  "dags": list(bag.dags), "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["errors"] == {} and result["dags"] == [DAG_ID]
    assert result["heavy"] == [], "the DAG file must only wire tasks"
    assert result["seconds"] < 2.0, f"parse took {result['seconds']:.2f} s"
    print(f"DAG parse: {result['seconds'] * 1000:.0f} ms")


def test_dag_shape_retries_tags_schedule_assets(dag):
    stage_ids = [orchestration.task_id(s) for s in orchestration.STAGES]
    assert [t.task_id for t in dag.tasks] == ["validate_params", *stage_ids, "publish", "promote"]
    chain = ["validate_params", *stage_ids, "publish", "promote"]
    for before, after in zip(chain, chain[1:]):
        assert before in dag.get_task(after).upstream_task_ids, f"{before} must run before {after}"
    assert dag.get_task("validate_params").upstream_task_ids == set()
    for t in dag.tasks:
        assert t.retries >= 1 and t.retry_delay >= timedelta(minutes=1), f"{t.task_id} needs retries with a delay"
        assert t.execution_timeout is not None
    assert {"cmat"} <= set(dag.tags)
    assert dag.schedule == "0 0 * * 1" and dag.catchup is False
    assert dag.timetable.__class__.__name__ == "CronTriggerTimetable"  # a logical date per tick: backfillable
    assert dag.max_active_runs >= 2, "runs are isolated by workspace, so they may overlap"
    outlets = {t.task_id: [a.name for a in t.outlets] for t in dag.tasks if t.outlets}
    assert outlets == {"mix": ["cmat_dataset"], "sft": ["cmat_sft_adapter"], "cmat": ["cmat_adapter"],
                       "evaluate": ["cmat_report"]}

    from airflow.serialization.serialized_objects import DagSerialization

    restored = DagSerialization.from_dict(DagSerialization.to_dict(dag))  # what the dag-processor stores
    assert [t.task_id for t in restored.tasks] == [t.task_id for t in dag.tasks]


@pytest.mark.parametrize("name, value", [("method", "adam"), ("db_tasks", -5), ("db_tasks", "many"),
                                         ("learning_rate", 0), ("seed", -1), ("base_model", ""),
                                         ("overrides", ["no equals sign"])])
def test_trigger_form_rejects_bad_values(dag, name, value):
    from airflow.sdk.exceptions import ParamValidationError

    with pytest.raises(ParamValidationError):
        dag.params.get_param(name).resolve(value)


def test_trigger_form_defaults_mean_params_yaml(dag):
    assert dag.params.validate() == {"base_model": None, "db_tasks": None, "domains": None, "method": None,
                                     "learning_rate": None, "actor_lr": None, "cmat_iterations": None,
                                     "seed": None, "overrides": []}
    assert orchestration.validate_run_params(dag.params.validate()) == []


def test_validate_run_params_builds_overrides_that_params_yaml_accepts():
    overrides = orchestration.validate_run_params(
        {"base_model": "tiny-random", "db_tasks": 40, "method": "ptuning", "learning_rate": 0.003, "seed": 7,
         "domains": ["flights"], "actor_lr": 1e-4, "cmat_iterations": 3,
         "overrides": ["evaluate.limit=5", "collect.shard=my-shard"]}, shard="2026-11-16")
    params = load_params(REPO / "params.yaml", overrides)
    assert (params.model.base, params.collect.db_tasks, params.sft.method, params.sft.learning_rate) == \
        ("tiny-random", 40, "ptuning", 0.003)
    assert (params.collect.domains, params.cmat.actor_lr, params.cmat.iterations) == (["flights"], 1e-4, 3)
    assert params.cmat.seed == 7
    assert params.collect.seed == params.mix.seed == params.sft.seed == params.augment.seed == 7
    assert params.collect.shard == "my-shard", "an explicit override beats the computed shard"
    assert params.evaluate.limit == 5
    numeric_name = orchestration.validate_run_params({"base_model": "123"})
    assert load_params(REPO / "params.yaml", numeric_name).model.base == "123"


def test_validate_run_params_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as err:
        orchestration.validate_run_params({"db_tasks": -1, "method": "adam", "temperature": 2,
                                           "learning_rate": 0,
                                           "overrides": ["db.backend=postgres", 'collect.domains=["weather"]']})
    message = str(err.value)
    for fragment in ("temperature: unknown run param", "method: 'adam' is not allowed",
                     "collect.db_tasks: must be >= 0", "sft.learning_rate: must be > 0",
                     "db.backend: 'postgres' is not allowed", "collect.domains: unknown domain(s) ['weather']"):
        assert fragment in message, message
    with pytest.raises(ConfigError, match="warmup_steps"):  # a cross-field rule, broken only by the combination
        orchestration.validate_run_params({"overrides": ["sft.max_steps=2", "sft.warmup_steps=2"]})
    assert orchestration.validate_run_params({"overrides": ["sft.max_steps=2", "sft.warmup_steps=0"]})


def test_shard_for_scheduled_backfill_and_manual_runs():
    monday = datetime(2026, 11, 16, tzinfo=timezone.utc)
    assert orchestration.shard_for(monday, "scheduled__2026-11-16T00:00:00+00:00") == "2026-11-16"
    assert orchestration.shard_for(monday + timedelta(hours=3), "backfill__2026-11-16T03:00:00+00:00") == \
        "2026-11-16T03:00"
    local = datetime(2026, 11, 16, 1, 0, tzinfo=timezone(timedelta(hours=2)))  # = 2026-11-15 23:00 UTC
    assert orchestration.shard_for(local, "x") == "2026-11-15T23:00"
    manual = orchestration.shard_for(None, "manual__2026-11-16T10:00:00.123456+00:00")
    assert manual == "manual__2026-11-16T10:00:00.123456+00:00"
    assert orchestration.shard_for(None, "my run/with spaces") == "my-run-with-spaces"
    after = datetime(2026, 11, 16, 10, 0, tzinfo=timezone.utc)
    assert orchestration.shard_for(None, "", run_after=after) == "manual__2026-11-16T10:00:00"
    for shard in ("2026-11-16", "2026-11-16T03:00", manual, "my-run-with-spaces"):
        CollectConfig(shard=shard)  # collect accepts every key we make


def test_run_keys_are_safe_and_distinct():
    a = orchestration.run_key("scheduled__2026-11-16T00:00:00+00:00")
    b = orchestration.run_key("scheduled__2026-11-16T00-00-00-00-00")
    assert a != b and all(c.isalnum() or c in "._-" for c in a)
    assert orchestration.run_key("plain-id_1.2") == "plain-id_1.2"


def test_each_run_gets_its_own_workspace(workspaces):
    one = orchestration.run_workspace("manual__1", ["model.base=tiny-random"])
    two = orchestration.run_workspace("manual__2", ["collect.db_tasks=3"])
    assert one != two and one.parent == two.parent == workspaces
    assert (one / "cmat_pipeline" / "cli.py").is_file() and not (one / "artifacts").exists()
    assert not list(one.rglob("__pycache__"))
    params = load_params(one / "params.yaml")
    assert params.model.base == "tiny-random" and load_params(two / "params.yaml").collect.db_tasks == 3
    assert Path(params.evaluate.tasks).is_absolute() and Path(params.evaluate.tasks).exists(), \
        "inputs outside the project are pinned so they resolve from the workspace"
    assert params.evaluate.out_dir == "artifacts/eval" and params.evaluate.adapter.startswith("artifacts/"), \
        "outputs (and the adapter a stage of the run makes) stay inside the workspace"
    marker = json.loads((one / orchestration.MARKER).read_text())
    assert marker["run_id"] == "manual__1" and marker["overrides"] == ["model.base=tiny-random"]
    (one / "params.yaml").write_text((one / "params.yaml").read_text() + "\n")
    assert orchestration.run_workspace("manual__1", ["model.base=tiny-random"]) == one, "created once, reused"
    assert orchestration.run_workspace("manual__1") == one
    with pytest.raises(ConfigError, match="keeps one configuration"):
        orchestration.run_workspace("manual__1", ["model.base=other"])
    with pytest.raises(ConfigError, match="collect.db_tasks"):
        orchestration.run_workspace("manual__3", ["collect.db_tasks=-1"])
    assert not (workspaces / "manual__3").exists() and not list(workspaces.glob(".*tmp"))


def test_run_stage_twice_does_not_duplicate_data(workspaces):
    overrides = orchestration.validate_run_params({"db_tasks": 6}, shard="2026-11-16")
    first = orchestration.run_stage("collect", "scheduled__a", overrides)
    workspace = Path(first["workspace"])
    shard = workspace / "artifacts/data/raw/trajectories/2026-11-16.jsonl"
    before = shard.read_text()
    orchestration.run_stage("collect", "scheduled__a", overrides)  # a retry, or a cleared task
    rows = [json.loads(line) for line in shard.read_text().splitlines()]
    assert len(rows) == 6 and len({r["id"] for r in rows}) == 6 and shard.read_text() == before
    assert [p.name for p in (workspace / "artifacts/data/raw/trajectories").glob("*.jsonl")] == ["2026-11-16.jsonl"]
    assert json.loads((workspace / ".cmat/stages/collect.json").read_text())["returncode"] == 0

    with pytest.raises(orchestration.StageFailed, match=r"cmat evaluate failed \(exit 1\)") as err:
        orchestration.run_stage("evaluate", "scheduled__a", overrides)  # no model prepared in this workspace
    assert "error" in str(err.value).lower()
    with pytest.raises(ConfigError, match="unknown stage 'train'"):
        orchestration.run_stage("train", "scheduled__a", overrides)


def test_failed_validation_fails_the_task_naming_expectation_count_and_rows(workspaces):
    """A boundary suite that fails makes `cmat mix` exit 1, and so the Airflow task fail, with the failed
    expectation, how many rows broke it and example row ids in the task log."""
    from cmat_pipeline.data.dbgen import generate_db_tasks
    from cmat_pipeline.data.records import write_jsonl
    from cmat_pipeline.data.teachers import ReActOracle, play_db_tasks
    from cmat_pipeline.envs.dbbench import task_from_entry
    from cmat_pipeline.envs.sql_backends import SQLiteBackend

    overrides = orchestration.validate_run_params(
        {"overrides": ["mix.general_ratio=0", "mix.type_share=[0,0.3]"]}, shard="2026-11-16")
    workspace = orchestration.run_workspace("scheduled__unbalanced", overrides)
    entries = generate_db_tasks(40, seed=13, shard="unbalanced", types=["counting", "INSERT"])  # 50 % each
    tasks = [task_from_entry(e, i, "t") for i, e in enumerate(entries)]
    records = play_db_tasks(entries, ReActOracle(tasks), SQLiteBackend(5.0, 800), max_rounds=5, concurrency=8,
                            source="test")
    write_jsonl(workspace / load_params(workspace / "params.yaml").distill.out_dir / "trajectories.jsonl", records)
    with pytest.raises(orchestration.StageFailed, match=r"cmat mix failed \(exit 1\)") as err:
        orchestration.run_stage("mix", "scheduled__unbalanced", overrides)
    found = re.search(r"train\.jsonl: train validation failed: expect_column_values_to_be_between\(type_share\): "
                      r"(\d+) rows, e\.g\. ([^;\n]+)", str(err.value))
    assert found, str(err.value)
    examples = found.group(2).split(", ")
    assert 0 < int(found.group(1)) <= 40 and len(examples) == 5  # every training row breaks the 30 % cap
    assert set(examples) <= {r["id"] for r in records}, "the examples name real rows"


def test_a_retry_on_another_worker_continues_from_the_registry(tmp_path, moto_registry, monkeypatch):
    """Stage outputs are checkpointed to S3; a worker without the run's workspace restores them and goes on."""
    for key, value in moto_registry.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("CMAT_WORKSPACES", str(tmp_path / "worker-a"))
    overrides = orchestration.validate_run_params({"db_tasks": 6}, shard="2026-11-16")
    first = Path(orchestration.run_stage("collect", "scheduled__r", overrides)["workspace"])
    shard = "artifacts/data/raw/trajectories/2026-11-16.jsonl"

    monkeypatch.setenv("CMAT_WORKSPACES", str(tmp_path / "worker-b"))  # the retry lands elsewhere
    second = Path(orchestration.run_stage("filter", "scheduled__r", overrides)["workspace"])
    assert second != first and (second / shard).read_text() == (first / shard).read_text()
    assert json.loads((second / ".cmat/stages/collect.json").read_text())["returncode"] == 0
    assert (second / "artifacts/data/filtered/trajectories.jsonl").is_file()


def test_publish_and_promote_a_workspace(workspaces, tmp_path, monkeypatch):
    """publish() finds the run's files through its params and sends them to the registry (moto on loopback)."""
    import boto3
    from moto.server import ThreadedMotoServer

    from cmat_pipeline.registry import Registry, RegistryConfig

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        endpoint = "http://%s:%d" % server.get_host_and_port()
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="cmat-test")
        registry = Registry(RegistryConfig(bucket="cmat-test", prefix="p", endpoint_url=endpoint, max_attempts=2))
        run_id = "scheduled__2026-11-16T00:00:00+00:00"
        workspace = orchestration.run_workspace(run_id, [])
        with pytest.raises(Exception, match="nothing to publish"):
            orchestration.publish(run_id, registry)
        fake_outputs(workspace, accuracy=12.5)
        result = orchestration.publish(run_id, registry)
        files = registry.read_manifest(result["run_id"])["files"]
        assert {"params.yaml", "run.json", "metrics/evaluate.json", "metrics/sft.json", "report/report.md",
                "adapter/adapter_model.safetensors", "dataset/card.json", "dataset/train.jsonl"} <= set(files)
        assert not any("checkpoints" in f for f in files), "resume checkpoints are not part of the adapter"
        assert result["metrics"]["evaluate"]["overall_cat_accuracy"] == 12.5
        assert orchestration.promote(run_id, registry=registry)["promoted"] is True
        assert registry.resolve_alias("production") == orchestration.run_key(run_id)
    finally:
        server.stop()


def fake_outputs(workspace: Path, accuracy: float) -> None:
    """What evaluate, sft and mix leave in a workspace (their real runs are the slow tests' business)."""
    for rel, text in {"artifacts/eval/metrics.json": json.dumps({"overall_cat_accuracy": accuracy}),
                      "artifacts/eval/report.md": "# report\n",
                      "artifacts/sft/adapter_model.safetensors": "weights",
                      "artifacts/sft/adapter_config.json": "{}",
                      "artifacts/sft/metrics.json": json.dumps({"train_loss": 1.0}),
                      "artifacts/sft/checkpoints/checkpoint-1/optimizer.pt": "state",
                      "artifacts/data/final/card.json": "{}", "artifacts/data/final/card.md": "# card\n",
                      "artifacts/data/final/train.jsonl": "{}\n"}.items():
        (workspace / rel).parent.mkdir(parents=True, exist_ok=True)
        (workspace / rel).write_text(text)


# ---- slow: whole runs ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def moto_registry():
    """An S3 endpoint on loopback with the registry bucket, and the env a worker would have."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = "http://%s:%d" % server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "CMAT_S3_ENDPOINT": endpoint, "CMAT_REGISTRY": "s3://cmat-registry/cmat"}
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test",
                 aws_secret_access_key="test").create_bucket(Bucket="cmat-registry")
    yield env
    server.stop()


def _migrate_db(env: dict) -> None:
    done = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_dag_test_runs_the_whole_pipeline(dag, moto_registry, workspaces, monkeypatch):
    """`dag.test()` runs every task in this process on the tiny model, then publishes to S3 and promotes."""
    from cmat_pipeline.registry import Registry

    for name, value in {**moto_registry, "CMAT_REGISTRY": "s3://cmat-registry/dag-test"}.items():
        monkeypatch.setenv(name, value)  # its own prefix: its run is the first, so it becomes production
    _migrate_db(dict(os.environ))
    for t in dag.tasks:
        t.retries = 0  # fail fast here; the retry policy itself is checked above
    start = time.perf_counter()
    run = dag.test(logical_date=datetime(2026, 11, 16, tzinfo=timezone.utc), run_conf=TINY_CONF)
    print(f"dag.test: {time.perf_counter() - start:.0f} s")
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert run.state == "success", states
    registry = Registry.from_env()
    key = orchestration.run_key(run.run_id)
    assert registry.resolve_alias("production") == key == registry.resolve_alias("latest")
    manifest = registry.read_manifest(key)
    assert {"adapter/adapter_model.safetensors", "metrics/evaluate.json", "dataset/card.json"} <= set(manifest["files"])
    shard = workspaces / key / "artifacts/data/raw/trajectories/2026-11-16.jsonl"
    assert shard.is_file(), "a run with a logical date collects into that date's shard"


@pytest.mark.slow
def test_backfill_create_plans_one_run_per_monday():
    """`airflow backfill create` (the CLI behind the UI's backfill dialog) on the serialized DAG: one run per
    weekly logical date in the window, each of which collects into its own shard (shard_for)."""
    env = dict(os.environ)
    _migrate_db(env)
    for args in (["dags", "reserialize"],
                 # weeks no other test ran: dag.test's 2026-11-16 run would (rightly) be skipped as done
                 ["backfill", "create", "--dag-id", DAG_ID, "--from-date", "2026-10-05", "--to-date", "2026-10-21",
                  "--dry-run"]):
        done = subprocess.run([sys.executable, "-m", "airflow", *args], env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    planned = sorted(set(re.findall(r"(2026-\d\d-\d\d) 00:00:00\+00:00 \|", done.stdout)))
    assert planned == ["2026-10-05", "2026-10-12", "2026-10-19"], done.stdout[-2000:]
    assert [orchestration.shard_for(datetime.fromisoformat(d).replace(tzinfo=timezone.utc), f"backfill__{d}")
            for d in planned] == planned


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except OSError:
            pass
        time.sleep(2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.mark.slow
def test_standalone_run_triggered_through_the_rest_api(moto_registry, tmp_path, monkeypatch):
    """A real `airflow standalone` (api-server, scheduler, dag-processor, triggerer) on loopback: a run with
    bad params fails in validate_params before any stage; a good one runs every stage and promotes."""
    import requests

    moto_registry = {**moto_registry, "CMAT_REGISTRY": "s3://cmat-registry/standalone"}  # first run: production
    for name, value in moto_registry.items():
        monkeypatch.setenv(name, value)
    port = _free_port()
    home = tmp_path / "airflow"
    env = {**os.environ, **moto_registry,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # it spawns `airflow`
           "AIRFLOW_HOME": str(home),
           "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "AIRFLOW__API__PORT": str(port),
           "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
           "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",  # GET /auth/token hands out a token
           "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
           "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",  # no scheduled run of the full default pipeline
           "CMAT_WORKSPACES": str(tmp_path / "runs")}
    _migrate_db(env)
    log = (tmp_path / "standalone.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "airflow", "standalone"], env=env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_for(lambda: requests.get(f"{base}/api/v2/monitor/health", timeout=5).ok, 180, "the api-server")
        token = requests.get(f"{base}/auth/token", timeout=10).json()["access_token"]
        api = requests.Session()
        api.headers["Authorization"] = f"Bearer {token}"
        _wait_for(lambda: api.get(f"{base}/api/v2/dags/{DAG_ID}", timeout=10).ok, 180, "the DAG to be parsed")
        assert api.patch(f"{base}/api/v2/dags/{DAG_ID}", json={"is_paused": False}, timeout=10).ok

        def trigger(conf: dict) -> str:
            response = api.post(f"{base}/api/v2/dags/{DAG_ID}/dagRuns", json={"logical_date": None, "conf": conf},
                                timeout=10)
            assert response.ok, response.text
            return response.json()["dag_run_id"]

        def finished(run_id: str) -> str | None:
            state = api.get(f"{base}/api/v2/dags/{DAG_ID}/dagRuns/{run_id}", timeout=10).json()["state"]
            return state if state in ("success", "failed") else None

        def task_states(run_id: str) -> dict:
            tis = api.get(f"{base}/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances", timeout=10).json()
            return {ti["task_id"]: ti["state"] for ti in tis["task_instances"]}

        bad = trigger({"db_tasks": 10, "overrides": ["db.backend=postgres"]})
        assert _wait_for(lambda: finished(bad), 300, "the bad run") == "failed"
        states = task_states(bad)
        assert states["validate_params"] == "failed" and states["prepare_model"] in ("upstream_failed", None)

        good = trigger(TINY_CONF)
        assert _wait_for(lambda: finished(good), 900, "the pipeline run") == "success", task_states(good)
        from cmat_pipeline.registry import Registry, RegistryConfig

        registry = Registry(RegistryConfig.from_env())
        key = orchestration.run_key(good)
        assert registry.resolve_alias("production") == key == registry.resolve_alias("latest")
        manifest = registry.read_manifest(key)
        for rel in ("params.yaml", "run.json", "metrics/evaluate.json", "dataset/card.json",
                    "dataset/train.jsonl", "adapter/adapter_model.safetensors", "report/report.md"):
            assert rel in manifest["files"], f"{rel} not published: {sorted(manifest['files'])}"
        pulled = registry.pull(run_id=key, dest=tmp_path / "pulled")  # every object there, checksums verified
        assert pulled["files"] == len(manifest["files"])
        run_record = json.loads((tmp_path / "pulled" / "run.json").read_text())
        assert "collect.db_tasks=40" in run_record["overrides"], "the trigger's params reached the run"
    finally:
        os.killpg(server.pid, 15)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
        log.close()
