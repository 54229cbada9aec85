"""Static checks of infra/: docker-compose, Helm values, Dockerfile. No Docker or cluster needed (< 1 s).

They catch what breaks a deployment silently: a missing service, an env name the code does not read, a
floating image tag, a secret typed into a file, versions drifting from constraints.txt.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from cmat_pipeline import registry

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
REGISTRY_ENV = {registry.ENV_REGISTRY, registry.ENV_ACCESS_KEY, registry.ENV_SECRET_KEY}
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "AIRFLOW__CORE__FERNET_KEY",
              "AIRFLOW__API_AUTH__JWT_SECRET")


def pinned_version(package: str) -> str:
    match = re.search(rf"^{re.escape(package)}==(\S+)$", (REPO / "constraints.txt").read_text(), re.M)
    assert match, f"{package} is not pinned in constraints.txt"
    return match.group(1)


def code_text() -> str:
    return "\n".join(p.read_text() for p in [*(REPO / "cmat_pipeline").rglob("*.py"), *(REPO / "dags").glob("*.py")])


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((INFRA / "docker-compose.yaml").read_text())


@pytest.fixture(scope="module")
def helm() -> dict:
    return yaml.safe_load((INFRA / "helm" / "values.yaml").read_text())


def assert_pinned(image: str) -> None:
    name, _, tag = image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "")
    assert tag and tag != "latest", f"{image}: pin a tag"
    assert re.search(r"\d+\.\d+|RELEASE\.\d{4}-", tag), f"{image}: {tag!r} floats; pin a full version"


def test_compose_has_every_service_with_the_right_command(compose):
    services = compose["services"]
    commands = {name: " ".join(s.get("command", [])) if isinstance(s.get("command"), list) else s.get("command", "")
                for name, s in services.items()}
    assert commands["airflow-apiserver"] == "api-server"
    assert commands["airflow-scheduler"] == "scheduler"
    assert commands["airflow-dag-processor"] == "dag-processor"
    assert commands["airflow-triggerer"] == "triggerer"
    assert commands["airflow-worker"].startswith("celery worker")
    assert commands["airflow-init"] == "db migrate"
    assert {"postgres", "redis", "minio", "minio-init"} <= set(services)
    env = services["airflow-scheduler"]["environment"]
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://airflow:${POSTGRES_PASSWORD")
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-apiserver:8080/execution/"
    for name, service in services.items():
        if name.startswith("airflow-") and name != "airflow-init":
            depends = service["depends_on"]
            assert depends["airflow-init"]["condition"] == "service_completed_successfully", name
            assert service.get("restart") == "unless-stopped", name


def test_compose_references_resolve(compose):
    """What `docker compose config` would reject or start wrongly: a dependency on a missing service, a
    health condition on a service without a healthcheck, a one-shot job that restarts, an undeclared named
    volume, a host port used twice."""
    services = compose["services"]
    declared = set(compose.get("volumes") or {})
    ports: list[str] = []
    for name, service in services.items():
        for target, rule in (service.get("depends_on") or {}).items():
            assert target in services, f"{name} depends on unknown service {target}"
            if rule["condition"] == "service_healthy":
                assert "healthcheck" in services[target], f"{name} waits for {target}'s health, which has no check"
            if rule["condition"] == "service_completed_successfully":
                assert services[target].get("restart") == "no", f"{target} is a one-shot job: restart must be 'no'"
        for volume in service.get("volumes") or []:
            source = volume.split(":", 1)[0]
            if not source.startswith(("/", ".", "$", "~")):  # a named volume, not a bind mount
                assert source in declared, f"{name} mounts undeclared volume {source}"
        ports += [str(p).split(":")[0] for p in service.get("ports") or []]
    assert len(ports) == len(set(ports)), f"a host port is published twice: {ports}"
    assert declared <= {v.split(":", 1)[0] for s in services.values() for v in s.get("volumes") or []}, \
        "a declared volume nothing mounts"


def test_compose_gpu_worker_and_minio_bucket(compose):
    worker = compose["services"]["airflow-worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    init = compose["services"]["minio-init"]
    script = init["command"][0]
    assert "mc mb --ignore-existing" in script and init["depends_on"]["minio"]["condition"] == "service_healthy"
    assert worker["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    bucket_default = re.search(r"\$\{CMAT_BUCKET:-([\w.-]+)\}", init["environment"]["CMAT_BUCKET"]).group(1)
    registry_uri = worker["environment"]["CMAT_REGISTRY"].replace("${CMAT_BUCKET:-cmat}", bucket_default)
    assert registry.parse_s3_uri(registry_uri)[0] == bucket_default, "the registry lives in the bucket minio-init makes"


def test_compose_env_names_are_the_ones_the_code_reads(compose):
    env = compose["services"]["airflow-worker"]["environment"]
    assert REGISTRY_ENV <= set(env)
    assert set(registry.ENV_ENDPOINTS) & set(env), "an S3 endpoint variable registry.py reads"
    assert env["CMAT_S3_ENDPOINT"] == "http://minio:9000"
    text = code_text()
    for name in env:
        if name.startswith("CMAT_"):
            assert name in text, f"{name} is set in compose but nothing in cmat_pipeline/ or dags/ reads it"


def test_compose_pins_images_and_types_no_secrets(compose):
    services = compose["services"]
    for name, service in services.items():
        assert_pinned(service["image"])
    assert services["airflow-init"]["build"]["dockerfile"] == "infra/Dockerfile"
    required = set()
    for service in services.values():
        for key, value in (service.get("environment") or {}).items():
            if key in SECRET_ENV:
                assert re.fullmatch(r"\$\{\w+(:\?[^}]*)?\}", str(value)), f"{key} must come from infra/.env"
            required |= set(re.findall(r"\$\{(\w+):\?", str(value)))
    example = (INFRA / ".env.example").read_text()
    for name in required:
        assert re.search(rf"^{name}=", example, re.M), f"{name} is required by compose but not in .env.example"
    assert ".env" in (INFRA / ".gitignore").read_text().split()


def test_helm_values_kubernetes_executor_gpu_pool_and_secrets(helm):
    assert helm["executor"] == "KubernetesExecutor"
    assert helm["airflowVersion"] == pinned_version("apache-airflow")
    assert_pinned(f"{helm['images']['airflow']['repository']}:{helm['images']['airflow']['tag']}")
    assert helm["images"]["airflow"]["tag"] == helm["defaultAirflowTag"]
    env = {e["name"]: e["value"] for e in helm["env"]}
    secrets = {s["envName"]: s for s in helm["secret"]}
    assert {registry.ENV_ACCESS_KEY, registry.ENV_SECRET_KEY} <= set(secrets), "credentials come from a Secret"
    assert not ({registry.ENV_ACCESS_KEY, registry.ENV_SECRET_KEY} & set(env)), "never credentials in values"
    assert registry.ENV_REGISTRY in env and registry.parse_s3_uri(env[registry.ENV_REGISTRY])
    assert env["CMAT_S3_ENDPOINT"].startswith("http")
    label, value = env["CMAT_K8S_GPU_NODE_SELECTOR"].split("=")
    assert helm["workers"]["nodeSelector"] != {label: value}, "CPU stages stay off the GPU pool"
    mounts = {m["mountPath"]: m["name"] for m in helm["workers"]["extraVolumeMounts"]}
    assert mounts[env["CMAT_WORKSPACES"]] == "workspaces", "task pods share the run workspaces"
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in helm["workers"]["extraVolumes"]}
    pvcs = [d for d in yaml.safe_load_all((INFRA / "helm" / "workspaces-pvc.yaml").read_text())]
    assert {p["metadata"]["name"] for p in pvcs} == set(claims.values())
    assert all("ReadWriteMany" in p["spec"]["accessModes"] for p in pvcs)
    assert helm["dagProcessor"]["enabled"] and helm["triggerer"]["enabled"] and not helm["redis"]["enabled"]
    text = code_text()
    for name in env:
        if name.startswith("CMAT_"):
            assert name in text, f"{name} is set in values.yaml but nothing reads it"


def test_gpu_stages_get_a_gpu_pod_on_kubernetes(monkeypatch):
    """With the Helm env, the DAG asks for a GPU pod on the GPU pool for GPU stages only."""
    pytest.importorskip("kubernetes", reason="the cncf.kubernetes provider's client is only in the Helm image")
    import importlib.util

    monkeypatch.setenv("CMAT_K8S_GPU_NODE_SELECTOR", "cmat.dev/pool=gpu")
    monkeypatch.setenv("CMAT_K8S_GPUS_SFT", "8")
    spec = importlib.util.spec_from_file_location("cmat_dag_k8s", REPO / "dags" / "cmat_pipeline_dag.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    pod = module._gpu_executor_config("sft")["pod_override"]
    assert pod.spec.node_selector == {"cmat.dev/pool": "gpu"}
    assert pod.spec.containers[0].resources.limits == {"nvidia.com/gpu": "8"}
    assert module._gpu_executor_config("collect") == {}


def test_dockerfile_pins_versions_and_installs_the_project():
    text = (INFRA / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    assert args["AIRFLOW_VERSION"] == pinned_version("apache-airflow")
    assert re.search(r"^FROM apache/airflow:\$\{AIRFLOW_VERSION\}-python\$\{PYTHON_VERSION\}$", text, re.M)
    assert args["PYTHON_VERSION"] == "3.11"
    assert re.search(r"^TORCH_SPEC \?= torch==" + re.escape(args["TORCH_VERSION"]), (REPO / "Makefile").read_text(),
                     re.M), "the image's torch matches the Makefile's"
    assert "latest" not in text
    assert "-c /opt/cmat/constraints.txt /opt/cmat" in text
    assert re.search(r"^COPY .*cmat_pipeline /opt/cmat/cmat_pipeline$", text, re.M)
    assert re.search(r"^COPY .*dags /opt/airflow/dags$", text, re.M)
    assert "CMAT_PROJECT_DIR=/opt/cmat" in text
    compose_env = yaml.safe_load((INFRA / "docker-compose.yaml").read_text())["x-airflow-common"]["environment"]
    assert compose_env["CMAT_PROJECT_DIR"] == "/opt/cmat"
