"""Airflow 3 DAG `cmat_pipeline`: the cmat pipeline weekly, one task per stage, then publish and promote.

    validate_params -> prepare_model -> collect -> filter -> augment -> distill -> general -> mix -> sft
                    -> cmat -> evaluate (DB) -> evaluate_os -> evaluate_kg -> report -> publish (S3 registry)
                    -> promote (`production` alias, only if better on DB)

Every task calls `cmat_pipeline.orchestration`; each run works in its own workspace (code copy + resolved
params), so runs can overlap (max_active_runs=2, e.g. a backfill beside the weekly run). Stages run as
`python -m cmat_pipeline <stage>` processes: the same code as `cmat <stage>` and `dvc repro`.
Trigger with params from the UI form, or:
    airflow dags trigger cmat_pipeline -c '{"base_model": "tiny-random", "db_tasks": 40}'
    airflow backfill create --dag-id cmat_pipeline --from-date 2026-10-01 --to-date 2026-11-01
This file only wires tasks: airflow.sdk and the stdlib-only orchestration module are its sole imports, so
parsing stays well under the dag-processor's budget; models, data and boto3 load inside the tasks.
See docs/ORCHESTRATION.md.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone
from typing import Any

from airflow.sdk import Asset, Param, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException

from cmat_pipeline import orchestration

# Runs do not share files (per-run workspaces), so two may overlap; more would only queue on the GPU.
MAX_ACTIVE_RUNS = 2

DEFAULT_ARGS: dict[str, Any] = {
    "owner": "cmat",
    "retries": 2,
    "retry_delay": timedelta(minutes=5),
    "retry_exponential_backoff": 2.0,  # 5 min, then 10 min: rides out a flaky S3 / OOM-killed worker
    "max_retry_delay": timedelta(hours=1),
    "execution_timeout": timedelta(hours=12),
}

# Produced data, for lineage and for DAGs scheduled on them (e.g. a serving DAG on the adapter).
ASSETS = {
    "mix": Asset(name="cmat_dataset", uri="cmat://pipeline/dataset", group="cmat"),
    "sft": Asset(name="cmat_sft_adapter", uri="cmat://pipeline/sft-adapter", group="cmat"),
    "cmat": Asset(name="cmat_adapter", uri="cmat://pipeline/adapter", group="cmat"),
    "evaluate": Asset(name="cmat_report", uri="cmat://pipeline/report", group="cmat"),
}

PARAMS = {
    "base_model": Param(None, type=["null", "string"], minLength=1, title="Base model (model.base)",
                        description="smollm2-135m-instruct, tiny-random, a HF hub id or a folder; empty: params.yaml"),
    "db_tasks": Param(None, type=["null", "integer"], minimum=0, maximum=1_000_000,
                      title="Data budget (collect.db_tasks)",
                      description="synthetic dbbench tasks collected this run; empty: params.yaml"),
    "domains": Param(None, type=["null", "array"], items={"type": "string", "minLength": 1},
                     title="Table domains (collect.domains)",
                     description='synthetic tasks only from these table domains, e.g. ["flights"]; empty: params.yaml'),
    "method": Param(None, type=["null", "string"], enum=[None, *orchestration.METHODS],
                    title="Tuning method (sft.method)", description="lora or ptuning; empty: params.yaml"),
    "learning_rate": Param(None, type=["null", "number"], exclusiveMinimum=0, maximum=1,
                           title="Learning rate (sft.learning_rate)", description="empty: params.yaml"),
    "actor_lr": Param(None, type=["null", "number"], exclusiveMinimum=0, maximum=1,
                      title="CMAT actor learning rate (cmat.actor_lr)", description="empty: params.yaml"),
    "cmat_iterations": Param(None, type=["null", "integer"], minimum=1, maximum=10_000,
                             title="CMAT iterations (cmat.iterations)", description="empty: params.yaml"),
    "seed": Param(None, type=["null", "integer"], minimum=0, title="Seed",
                  description="sets every *.seed of params.yaml (model, collect, augment, mix, sft); empty: as is"),
    "overrides": Param([], type="array", items={"type": "string", "pattern": r"^[A-Za-z_][\w.]*=.*$"},
                       title="Extra overrides", description="KEY=VALUE lines, as `cmat <stage> --set`"),
}


def _gpu_executor_config(stage: str) -> dict[str, Any]:
    """On Kubernetes, a GPU stage gets a pod on the GPU pool (CMAT_K8S_GPU_NODE_SELECTOR=label=value) with
    CMAT_K8S_GPUS GPUs (CMAT_K8S_GPUS_SFT=8 for a multi-GPU sft). Elsewhere: empty, kubernetes never imported."""
    selector = os.environ.get("CMAT_K8S_GPU_NODE_SELECTOR", "")
    if stage not in orchestration.GPU_STAGES or "=" not in selector:
        return {}
    from kubernetes.client import models as k8s  # ships with the cncf.kubernetes provider (Helm image)

    key, value = selector.split("=", 1)
    gpus = os.environ.get(f"CMAT_K8S_GPUS_{orchestration.task_id(stage).upper()}") or os.environ.get(
        "CMAT_K8S_GPUS", "1")
    return {"pod_override": k8s.V1Pod(spec=k8s.V1PodSpec(
        node_selector={key: value},
        tolerations=[k8s.V1Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")],
        containers=[k8s.V1Container(name="base", resources=k8s.V1ResourceRequirements(
            limits={"nvidia.com/gpu": gpus}, requests={"nvidia.com/gpu": gpus}))]))}


def _fail_without_retry(err: Exception) -> AirflowFailException:
    return AirflowFailException(str(err))  # bad params never get better by retrying


@task
def validate_params() -> list[str]:
    """Reject bad run params before any stage runs; create the run's workspace; return the overrides."""
    from cmat_pipeline.errors import CmatError

    context = get_current_context()
    run_id = context["run_id"]
    shard = orchestration.shard_for(context.get("data_interval_start"), run_id,
                                    getattr(context.get("dag_run"), "run_after", None))
    try:
        overrides = orchestration.validate_run_params(dict(context["params"]), shard=shard)
        workspace = orchestration.run_workspace(run_id, overrides)
    except CmatError as err:
        raise _fail_without_retry(err) from None
    print(f"run {run_id}: shard {shard}, workspace {workspace}, overrides {overrides}")
    return overrides


def stage_task(stage: str) -> Any:
    """The task running `cmat <stage>` in the run's workspace."""

    @task(task_id=orchestration.task_id(stage), outlets=[ASSETS[stage]] if stage in ASSETS else [],
          executor_config=_gpu_executor_config(stage),
          doc_md=f"`cmat {stage}` in the run's workspace (cmat_pipeline.orchestration.run_stage).")
    def run(overrides: list[str]) -> dict[str, Any]:
        from cmat_pipeline.errors import ConfigError

        try:
            return orchestration.run_stage(stage, get_current_context()["run_id"], overrides)
        except ConfigError as err:
            raise _fail_without_retry(err) from None

    return run


@task
def publish() -> dict[str, Any]:
    """Upload the run's params, metrics, dataset card, adapter and report to the S3 registry."""
    return orchestration.publish(get_current_context()["run_id"])


@task
def promote(published: dict[str, Any]) -> dict[str, Any]:
    """Point `production` at this run if its overall_cat_accuracy beats the current production run."""
    decision = orchestration.promote(get_current_context()["run_id"])
    print(decision["reason"])
    return decision


@dag(
    dag_id="cmat_pipeline",
    description="CMAT: data, SFT, actor-critic tuning, AgentBench evaluation; publish to the S3 registry; promote if better",
    schedule="0 0 * * 1",  # Mondays 00:00 UTC: the shard of a scheduled run is that date, e.g. 2026-11-16
    start_date=datetime(2026, 1, 5, tzinfo=timezone.utc),
    catchup=False,  # no burst of old runs on deploy; use `airflow backfill create` for past weeks
    max_active_runs=MAX_ACTIVE_RUNS,
    dagrun_timeout=timedelta(days=2),
    default_args=DEFAULT_ARGS,
    params=PARAMS,
    tags=["cmat", "training", "agentbench"],
    doc_md=__doc__,
)
def cmat_pipeline() -> None:
    overrides = validate_params()
    upstream = overrides
    for stage in orchestration.STAGES:
        current = stage_task(stage)(overrides)
        upstream >> current
        upstream = current
    published = publish()
    upstream >> published
    promote(published)


cmat_pipeline()
