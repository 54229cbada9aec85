"""S3 artifact registry and DVC S3 remote against a real S3 HTTP endpoint on loopback (moto's server).

boto3 and DVC talk HTTP to 127.0.0.1 exactly as they would to AWS or MinIO. A TCP proxy in front of the
server plays an outage: it drops its listener and every open connection in the middle of a transfer.
Runs in about 20 s: `.venv/bin/python -m pytest -q tests/test_registry.py`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import traceback
import uuid
from pathlib import Path

import boto3
import pytest

from cmat_pipeline import cli
from cmat_pipeline.registry import Registry, RegistryConfig, RegistryError

SECRET = "sEcReT-never-print-me-7f3a"
ACCESS_KEY = "AKIACMATTEST00000001"
MIB = 1 << 20


@pytest.fixture(scope="module")
def s3_endpoint():
    """One moto S3 server per module on a free loopback port."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(autouse=True)
def credentials(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "CMAT_S3_ENDPOINT", "CMAT_REGISTRY"):
        monkeypatch.delenv(name, raising=False)


def _config(endpoint: str, bucket: str, **kw) -> RegistryConfig:
    settings = {"max_attempts": 2, "connect_timeout": 2, "read_timeout": 20, **kw}
    return RegistryConfig(bucket=bucket, prefix="cmat", endpoint_url=endpoint, **settings)


@pytest.fixture
def bucket(s3_endpoint) -> str:
    """A fresh bucket per test: the server's state is shared by the whole module."""
    name = f"reg-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture
def registry(s3_endpoint, bucket) -> Registry:
    return Registry(_config(s3_endpoint, bucket))


def make_run(root: Path, accuracy: float = 40.0, adapter_bytes: int = 300_000, tasks: int = 60) -> dict:
    """A run's outputs as the pipeline lays them out: params, metrics, dataset card, adapter, report."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text("model:\n  base: tiny-random\n")
    (root / "metrics.json").write_text(json.dumps({"overall_cat_accuracy": accuracy, "tasks": tasks, "policy": "hf",
                                                   "task_file": "../shared/agentbench/dbbench/dev.jsonl"}))
    card = root / "card"
    card.mkdir(exist_ok=True)
    (card / "card.json").write_text(json.dumps({"train": 10, "val": 2}))
    (card / "card.md").write_text("# Dataset card\n")
    adapter = root / "adapter"
    (adapter / "sub").mkdir(parents=True, exist_ok=True)
    (adapter / "adapter_model.safetensors").write_bytes(os.urandom(adapter_bytes))
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (adapter / "sub" / "tokenizer.json").write_text("{}")
    report = root / "report"
    report.mkdir(exist_ok=True)
    (report / "report.md").write_text(f"accuracy {accuracy}\n")
    return {"params": root / "params.yaml", "metrics": {"evaluate.json": root / "metrics.json"},
            "dataset": [card / "card.json", card / "card.md"], "adapter": adapter, "report": report}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def remote_objects(registry: Registry, run_id: str) -> dict[str, bytes]:
    prefix = registry.run_key(run_id) + "/"
    listed = registry.client.list_objects_v2(Bucket=registry.config.bucket, Prefix=prefix).get("Contents", [])
    bucket = registry.config.bucket
    return {o["Key"][len(prefix):]: registry.client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
            for o in listed}


def assert_one_complete_copy(registry: Registry, run_id: str, local: dict[str, Path]) -> None:
    """The run folder holds exactly the manifest's files, each byte-identical to the local file, and nothing
    half-uploaded is left behind."""
    manifest = registry.read_manifest(run_id)
    objects = remote_objects(registry, run_id)
    assert set(objects) == set(manifest["files"]) | {"manifest.json"}
    for rel, entry in manifest["files"].items():
        assert sha256(objects[rel]) == entry["sha256"] == sha256(local[rel].read_bytes()), rel
        head = registry.client.head_object(Bucket=registry.config.bucket, Key=registry.run_key(run_id, rel))
        assert head["Metadata"]["sha256"] == entry["sha256"] and head["ContentLength"] == entry["size"]
    uploads = registry.client.list_multipart_uploads(Bucket=registry.config.bucket, Prefix=registry.run_key(run_id))
    assert not uploads.get("Uploads"), "a dangling multipart upload holds partial data"


def local_files(artifacts: dict) -> dict[str, Path]:
    from cmat_pipeline.registry import collect_files

    return {f.rel: f.path for f in collect_files(artifacts)}


def test_publish_and_pull_round_trip_with_checksums(registry, tmp_path, s3_endpoint, monkeypatch, capsys):
    artifacts = make_run(tmp_path / "run")
    manifest = registry.publish_run("run-1", artifacts)
    assert set(manifest["files"]) == {"params.yaml", "metrics/evaluate.json", "dataset/card.json", "dataset/card.md",
                                      "adapter/adapter_model.safetensors", "adapter/adapter_config.json",
                                      "adapter/sub/tokenizer.json", "report/report.md"}
    assert manifest["metrics"] == {"evaluate": {"overall_cat_accuracy": 40.0, "tasks": 60}}
    assert_one_complete_copy(registry, "run-1", local_files(artifacts))
    assert registry.resolve_alias("latest") == "run-1"
    assert registry.publish_run("run-1", artifacts) == manifest, "re-publishing the same files is a no-op"

    got = registry.pull(run_id="run-1", what="adapter", dest=tmp_path / "pulled")
    pulled = tmp_path / "pulled"
    assert (pulled / "adapter" / "sub" / "tokenizer.json").exists() and not (pulled / "report").exists()
    assert (pulled / "params.yaml").exists() and json.loads((pulled / "manifest.json").read_text()) == manifest
    assert (pulled / "adapter/adapter_model.safetensors").read_bytes() == \
        (tmp_path / "run/adapter/adapter_model.safetensors").read_bytes()
    assert got["downloaded_bytes"] > 300_000
    assert registry.pull(run_id="run-1", what="adapter", dest=pulled)["downloaded_bytes"] == 0, "verified files stay"
    (pulled / "adapter/adapter_config.json").write_text("tampered")
    again = registry.pull(run_id="run-1", what="adapter", dest=pulled)
    assert again["downloaded_bytes"] == len('{"peft_type": "LORA"}')
    assert json.loads((pulled / "adapter/adapter_config.json").read_text()) == {"peft_type": "LORA"}

    # the `cmat pull` command, configured only through the environment
    monkeypatch.setenv("CMAT_REGISTRY", f"s3://{registry.config.bucket}/cmat")
    monkeypatch.setenv("CMAT_S3_ENDPOINT", s3_endpoint)
    assert cli.main(["pull", "--alias", "latest", "--what", "report", "--dest", str(tmp_path / "cli")]) == 0
    assert json.loads(capsys.readouterr().out)["run_id"] == "run-1"
    assert (tmp_path / "cli/report/report.md").read_text() == "accuracy 40.0\n"


def test_published_runs_are_immutable_and_corruption_is_caught(registry, tmp_path):
    artifacts = make_run(tmp_path / "run")
    registry.publish_run("run-1", artifacts)
    (tmp_path / "run/report/report.md").write_text("changed\n")
    with pytest.raises(RegistryError, match="already published .* immutable"):
        registry.publish_run("run-1", artifacts)
    registry.publish_run("run-1", artifacts, overwrite=True)
    assert remote_objects(registry, "run-1")["report/report.md"] == b"changed\n"

    key = registry.run_key("run-1", "report/report.md")  # bit rot on the server, metadata intact
    head = registry.client.head_object(Bucket=registry.config.bucket, Key=key)
    registry.client.put_object(Bucket=registry.config.bucket, Key=key, Body=b"changeD\n", Metadata=head["Metadata"])
    with pytest.raises(RegistryError, match="checksum mismatch .*report/report.md"):
        registry.pull(run_id="run-1", what="report", dest=tmp_path / "pulled")
    assert not list((tmp_path / "pulled/report").glob("report.md*")), "nothing unverified is left behind"


def test_promotion_only_when_strictly_better(registry, tmp_path):
    decisions = {}
    for run_id, accuracy in [("r1", 30.0), ("r2", 25.0), ("r3", 30.0), ("r4", 31.5)]:
        registry.publish_run(run_id, make_run(tmp_path / run_id, accuracy, adapter_bytes=100))
        decisions[run_id] = registry.promote_if_better(run_id)
        assert registry.resolve_alias("latest") == run_id
    assert [decisions[r]["promoted"] for r in ("r1", "r2", "r3", "r4")] == [True, False, False, True]
    assert decisions["r1"]["reason"] == "first run"
    assert decisions["r3"]["previous_run"] == "r1" and "not better" in decisions["r3"]["reason"]
    assert registry.resolve_alias("production") == "r4"
    assert registry.read_alias("production")["previous_run"] == "r1"
    assert registry.promote_if_better("r4")["promoted"] is False
    registry.publish_run("r5", make_run(tmp_path / "r5", 99.0, adapter_bytes=100, tasks=3))  # e.g. evaluate.limit=3
    decision = registry.promote_if_better("r5")
    assert decision["promoted"] is False and registry.resolve_alias("production") == "r4"
    assert "not comparable: r5 was evaluated on 3 tasks of dev.jsonl, production (r4) on 60 tasks" in decision["reason"]
    with pytest.raises(RegistryError, match="no numeric metric 'nope'"):
        registry.promote_if_better("r4", metric="nope")


def test_latest_follows_publish_time_and_survives_a_crash_before_the_alias(registry, tmp_path):
    one, two = make_run(tmp_path / "one", adapter_bytes=10), make_run(tmp_path / "two", adapter_bytes=10)
    registry.publish_run("one", one)
    registry.publish_run("two", two)
    registry.publish_run("one", one)  # a retried old publish (idempotent) does not pull `latest` back
    assert registry.resolve_alias("latest") == "two"
    registry.client.delete_object(Bucket=registry.config.bucket, Key=registry.alias_key("latest"))
    registry.publish_run("two", two)  # the first attempt died after the manifest, before the alias
    assert registry.resolve_alias("latest") == "two"


def test_missing_run_alias_and_incomplete_run_errors(registry, tmp_path, s3_endpoint, monkeypatch, capsys):
    with pytest.raises(RegistryError, match="run 'ghost' not found .*no runs yet"):
        registry.pull(run_id="ghost")
    with pytest.raises(RegistryError, match="alias 'production' not found .*first promoted run"):
        registry.pull(alias="production")
    with pytest.raises(RegistryError, match="run 'ghost' not found"):
        registry.set_alias("production", "ghost")
    registry.publish_run("real", make_run(tmp_path / "real", adapter_bytes=10))
    with pytest.raises(RegistryError, match="known runs: real"):
        registry.pull(run_id="ghost")
    registry.client.put_object(Bucket=registry.config.bucket, Key=registry.run_key("half", "params.yaml"), Body=b"x")
    with pytest.raises(RegistryError, match="run 'half' .* is incomplete"):
        registry.pull(run_id="half")
    with pytest.raises(RegistryError, match="run id '../etc'"):
        registry.pull(run_id="../etc")

    monkeypatch.setenv("CMAT_REGISTRY", f"s3://{registry.config.bucket}/cmat")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    assert cli.main(["pull", "--alias", "production"]) == 1
    assert "cmat pull: error: alias 'production' not found" in capsys.readouterr().err
    monkeypatch.delenv("CMAT_REGISTRY")
    assert cli.main(["pull", "--run", "real"]) == 1
    assert "set CMAT_REGISTRY=s3://bucket/prefix" in capsys.readouterr().err


def _all_text(err: BaseException) -> str:
    return "".join(traceback.format_exception(err))


def test_wrong_endpoint_and_bad_credentials_are_clear_and_keep_the_secret(registry, s3_endpoint, bucket, tmp_path,
                                                                         monkeypatch, capsys):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    with pytest.raises(RegistryError) as err:
        Registry(_config(dead, bucket, max_attempts=1)).pull(alias="production")
    assert f"cannot reach the S3 endpoint {dead}" in str(err.value) and "CMAT_S3_ENDPOINT" in str(err.value)
    assert SECRET not in _all_text(err.value)

    with pytest.raises(RegistryError, match="bucket 'no-such-bucket' does not exist"):
        Registry(_config(s3_endpoint, "no-such-bucket")).pull(alias="production")

    import requests

    requests.post(f"{s3_endpoint}/moto-api/reset-auth", data=b"0", timeout=5)  # enforce IAM auth from now on
    try:
        with pytest.raises(RegistryError) as err:
            registry.publish_run("run-1", make_run(tmp_path / "run", adapter_bytes=10))
        message = str(err.value)
        assert "S3 refused the credentials (InvalidAccessKeyId)" in message and "…0001" in message
        assert SECRET not in _all_text(err.value) and ACCESS_KEY not in message

        monkeypatch.setenv("CMAT_REGISTRY", f"s3://{bucket}/cmat")
        monkeypatch.setenv("CMAT_S3_ENDPOINT", s3_endpoint)
        assert cli.main(["pull", "--alias", "production"]) == 1
        out = capsys.readouterr()
        assert "refused the credentials" in out.err and SECRET not in out.out + out.err
    finally:
        requests.post(f"{s3_endpoint}/moto-api/reset-auth", data=b"inf", timeout=5)


class Interrupted(Exception):
    """Stands in for a killed process or a dropped connection in the middle of a download."""


def test_interrupted_download_resumes_with_a_ranged_get(registry, tmp_path):
    artifacts = make_run(tmp_path / "run", adapter_bytes=3 * MIB + 123)
    registry.publish_run("run-1", artifacts)
    target = tmp_path / "pulled/adapter/adapter_model.safetensors"

    def stop_after_first_mib(key: str, done: int, total: int) -> None:
        if key.endswith(".safetensors") and done >= MIB:
            raise Interrupted

    with pytest.raises(Interrupted):
        registry.pull(run_id="run-1", what="adapter", dest=tmp_path / "pulled", on_progress=stop_after_first_mib)
    part = target.with_name(target.name + ".part")
    kept = part.stat().st_size
    assert MIB <= kept < 3 * MIB and not target.exists()

    seen = []
    result = registry.pull(run_id="run-1", what="adapter", dest=tmp_path / "pulled",
                           on_progress=lambda key, done, total: seen.append(done) if key.endswith("tensors") else None)
    size = 3 * MIB + 123
    small = sum(len(p.read_bytes()) for p in (tmp_path / "run").rglob("*") if p.is_file() and p.stat().st_size < 100)
    assert size - kept <= result["downloaded_bytes"] <= size - kept + small  # + the small files still missing
    assert min(seen) > kept, "the second pull starts where the first stopped"
    assert target.read_bytes() == (tmp_path / "run/adapter/adapter_model.safetensors").read_bytes()
    assert not part.exists()

    target.unlink()  # a stale .part with other bytes (e.g. from an older object) is detected and replaced
    part.write_bytes(b"\0" * MIB)
    registry.pull(run_id="run-1", what="adapter", dest=tmp_path / "pulled")
    assert sha256(target.read_bytes()) == registry.read_manifest("run-1")["files"][
        "adapter/adapter_model.safetensors"]["sha256"]


class OutageProxy:
    """A TCP forwarder on 127.0.0.1 in front of the S3 server. `down()` is a server crash as clients see it:
    the listener and every open connection go away mid-request; `up()` serves again on the same port."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", self.port))
        self._listener.listen(32)
        self._listener.settimeout(0.05)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            client.settimeout(None)
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self._sockets |= {client, upstream}
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def down(self) -> None:
        self._stop.set()
        self._thread.join()
        self._listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


def behind_a_proxy(s3_endpoint: str, bucket: str) -> tuple[OutageProxy, Registry, Registry]:
    """(proxy, a registry talking through it with 5 MiB parts, a registry talking to the server directly)."""
    proxy = OutageProxy(int(s3_endpoint.rsplit(":", 1)[1]))
    proxy.up()
    registry = Registry(_config(proxy.endpoint, bucket, multipart_threshold=5 * MIB, multipart_chunksize=5 * MIB))
    return proxy, registry, Registry(_config(s3_endpoint, bucket))


def crash_once(proxy: OutageProxy, suffix: str, after: int, crashed: list[int]):
    """A progress callback that takes the server down once a `suffix` file has moved `after` bytes."""
    def on_progress(key: str, done: int, total: int) -> None:
        if key.endswith(suffix) and done >= after and not crashed:
            crashed.append(done)
            proxy.down()
    return on_progress


def test_s3_outage_during_publish_then_retry_leaves_one_complete_copy(s3_endpoint, bucket, tmp_path):
    """The server goes away in the middle of a multipart upload: the publish fails with a clear error and the
    run stays invisible (no manifest). Once the server is back, the same publish finishes the run: the remote
    holds exactly one complete, byte-identical copy and no partial multipart data."""
    proxy, registry, direct = behind_a_proxy(s3_endpoint, bucket)
    artifacts = make_run(tmp_path / "run", adapter_bytes=12 * MIB + 7)  # 3 parts
    crashed: list[int] = []

    try:
        with pytest.raises(RegistryError) as err:
            registry.publish_run("run-1", artifacts, on_progress=crash_once(proxy, ".safetensors", 6 * MIB, crashed))
        assert crashed, "the outage happened during the upload"
        assert f"cannot reach the S3 endpoint {proxy.endpoint}" in str(err.value)
        assert "run the same command again" in str(err.value) and SECRET not in _all_text(err.value)
        with pytest.raises(RegistryError, match="is incomplete"):
            direct.pull(run_id="run-1")
        assert direct.client.list_multipart_uploads(Bucket=bucket).get("Uploads"), "the crash left partial parts"
        assert direct._get_json(direct.config.key("aliases", "latest.json")) is None

        proxy.up()
        manifest = registry.publish_run("run-1", artifacts)
    finally:
        try:
            proxy.down()
        except Exception:
            pass
    assert manifest["files"]["adapter/adapter_model.safetensors"]["size"] == 12 * MIB + 7
    assert_one_complete_copy(direct, "run-1", local_files(artifacts))
    assert direct.resolve_alias("latest") == "run-1"
    direct.pull(run_id="run-1", dest=tmp_path / "pulled")
    assert (tmp_path / "pulled/adapter/adapter_model.safetensors").read_bytes() == \
        (tmp_path / "run/adapter/adapter_model.safetensors").read_bytes()


def make_stage_outputs(root: Path) -> list[str]:
    """What a finished `collect` leaves in a workspace: a folder of shards and the attempt record."""
    shards = root / "artifacts/data/raw/trajectories"
    shards.mkdir(parents=True, exist_ok=True)
    (shards / "2026-11-16.jsonl").write_bytes(os.urandom(7 * MIB + 3))  # multipart
    (shards / "2026-11-16.manifest.json").write_text('{"fingerprint": "abc"}')
    (root / ".cmat/stages").mkdir(parents=True, exist_ok=True)
    (root / ".cmat/stages/collect.json").write_text('{"returncode": 0}')
    return ["artifacts/data/raw", ".cmat/stages/collect.json"]


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_stage_checkpoint_restores_on_another_machine_and_survives_an_outage(s3_endpoint, bucket, tmp_path):
    """A finished stage's outputs go to the registry so a retry on another worker (an empty workspace) gets
    them back byte for byte; a push cut by an outage leaves no checkpoint, and pushing again completes it."""
    proxy, registry, direct = behind_a_proxy(s3_endpoint, bucket)
    worker_a, worker_b = tmp_path / "a", tmp_path / "b"
    paths = make_stage_outputs(worker_a)
    crashed: list[int] = []

    try:
        with pytest.raises(RegistryError, match="cannot reach the S3 endpoint"):
            registry.push_checkpoint("run-1", "collect", worker_a, paths,
                                     on_progress=crash_once(proxy, ".jsonl", 5 * MIB, crashed))
        assert crashed and direct.list_checkpoints("run-1") == []
        assert direct.restore_checkpoint("run-1", "collect", worker_b) is None, "half a push is never restored"
        proxy.up()
        registry.push_checkpoint("run-1", "collect", worker_a, paths)
    finally:
        try:
            proxy.down()
        except Exception:
            pass
    assert direct.list_checkpoints("run-1") == ["collect"] and direct.list_runs() == [], "not a published run"
    restored = direct.restore_checkpoint("run-1", "collect", worker_b)
    assert restored["files"] == 3 and tree(worker_b) == tree(worker_a)
    uploads = direct.client.list_multipart_uploads(Bucket=bucket).get("Uploads")
    assert not uploads, "no partial multipart data left"

    sent = []
    direct.push_checkpoint("run-1", "collect", worker_a, paths, on_progress=lambda *a: sent.append(a))
    assert sent == [], "an unchanged checkpoint uploads nothing"
    (worker_a / "artifacts/data/raw/trajectories/2026-11-16.manifest.json").unlink()  # a retry changed the outputs
    (worker_a / ".cmat/stages/collect.json").write_text('{"returncode": 0, "attempt": 2}')
    direct.push_checkpoint("run-1", "collect", worker_a, paths)
    fresh = tmp_path / "c"
    direct.restore_checkpoint("run-1", "collect", fresh)
    assert tree(fresh) == tree(worker_a), "files gone since the last push are gone from the checkpoint"
    with pytest.raises(RegistryError, match="cannot checkpoint .*missing"):
        direct.push_checkpoint("run-1", "sft", worker_a, ["artifacts/missing"])


def _dvc(repo: Path, *args: str, env: dict) -> str:
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, f"dvc {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def _dvc_repo(tmp_path: Path, env: dict) -> tuple[Path, Path]:
    """A git + DVC repository with one tracked data file; returns (repo, data file)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True, env=env)
    _dvc(repo, "init", "-q", env=env)
    data = repo / "data" / "sample.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps({"id": i, "text": "x" * i}) + "\n" for i in range(200)))
    _dvc(repo, "add", "data/sample.jsonl", env=env)
    return repo, data


def _clean_env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DVC_", "CMAT_"))}
    env.update(DVC_NO_ANALYTICS="1", DVC_SITE_CACHE_DIR=str(tmp_path / "site-cache"), HOME=str(tmp_path / "home"),
               GIT_CONFIG_NOSYSTEM="1")
    return env


def _push_lose_pull(repo: Path, data: Path, s3_endpoint: str, bucket: str, prefix: str, env: dict) -> None:
    """dvc push lands the file's content in the bucket; after losing data and cache, dvc pull restores it."""
    original = data.read_bytes()
    _dvc(repo, "push", env=env)
    listed = boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(Bucket=bucket, Prefix=prefix + "/")
    md5 = hashlib.md5(original).hexdigest()
    assert any(o["Key"].endswith(md5[2:]) for o in listed.get("Contents", [])), listed.get("Contents")
    data.unlink()
    shutil.rmtree(repo / ".dvc" / "cache")
    _dvc(repo, "pull", env=env)
    assert data.read_bytes() == original


def test_dvc_push_and_pull_through_an_s3_remote(s3_endpoint, tmp_path):
    """The documented remote set-up: the remote URL in .dvc/config (committed), endpoint and credentials only
    in .dvc/config.local (git-ignored). Then push, lose the data and the cache, pull it back."""
    env = _clean_env(tmp_path)
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="dvc-remote")
    repo, data = _dvc_repo(tmp_path, env)
    _dvc(repo, "remote", "add", "-d", "storage", "s3://dvc-remote/cmat", env=env)
    _dvc(repo, "remote", "modify", "--local", "storage", "endpointurl", s3_endpoint, env=env)
    _dvc(repo, "remote", "modify", "--local", "storage", "access_key_id", ACCESS_KEY, env=env)
    _dvc(repo, "remote", "modify", "--local", "storage", "secret_access_key", SECRET, env=env)
    committed = (repo / ".dvc/config").read_text()
    assert SECRET not in committed and "s3://dvc-remote/cmat" in committed
    assert SECRET in (repo / ".dvc/config.local").read_text()
    ignored = subprocess.run(["git", "check-ignore", "-q", ".dvc/config.local"], cwd=repo, env=env)
    assert ignored.returncode == 0, "config.local (credentials) must be git-ignored"
    _push_lose_pull(repo, data, s3_endpoint, "dvc-remote", "cmat", env)


def test_dvc_s3_remote_from_environment_variables_only(s3_endpoint, tmp_path):
    """The other documented set-up: one `dvc remote add` command; endpoint and credentials from the
    environment only (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), nothing in any file."""
    env = _clean_env(tmp_path)
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="dvc-env-remote")
    repo, data = _dvc_repo(tmp_path, env)
    _dvc(repo, "remote", "add", "-d", "storage", "s3://dvc-env-remote/cmat", env=env)
    assert not (repo / ".dvc/config.local").exists()
    env.update(AWS_ENDPOINT_URL=s3_endpoint, AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET,
               AWS_DEFAULT_REGION="us-east-1")
    _push_lose_pull(repo, data, s3_endpoint, "dvc-env-remote", "cmat", env)
    for name in (".dvc/config", ".dvc/config.local"):
        assert not (repo / name).exists() or SECRET not in (repo / name).read_text()


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_a_run_publishes_its_dvc_lock_and_pull_fetches_it(registry, tmp_path, s3_endpoint, monkeypatch, capsys,
                                                          db_dev_file):
    """Airflow runs the stages without dvc; publish writes the run's dvc.lock with DVC's own hashing: the very
    file `dvc commit -f` writes in a git copy of the workspace, for the stages that finished, and nothing goes
    into a DVC cache. `cmat pull --what lock` fetches it with the run's params."""
    import yaml

    from cmat_pipeline import orchestration

    monkeypatch.setenv("CMAT_WORKSPACES", str(tmp_path / "runs"))
    run_id = "manual__2026-12-04T10:00:00+00:00"
    workspace = orchestration.run_workspace(run_id, [])
    for rel, text in {"artifacts/model/config.json": "{}", "artifacts/model/model.safetensors": "weights",
                      "artifacts/sft/metrics.json": json.dumps({"method": "lora", "steps": 2, "train_loss": 1.0}),
                      "artifacts/sft/plots/train_loss.tsv": "step\tloss\n1\t1.0\n",
                      "artifacts/sft/plots/val_loss.tsv": "step\tval_loss\n",
                      "artifacts/sft/plots/learning_rate.tsv": "step\tlearning_rate\n1\t0.001\n",
                      "artifacts/cmat/adapter_model.safetensors": "actor",
                      "artifacts/cmat/metrics.json": json.dumps({"iterations": 1, "history": [{"iteration": 1}]}),
                      "artifacts/cmat/plots/mean_reward.tsv": "iteration\tmean_reward\n1\t0.5\n",
                      "artifacts/eval/metrics.json": json.dumps({"overall_cat_accuracy": 25.0, "tasks": 4}),
                      "artifacts/eval/trajectories.jsonl": "{}\n", "artifacts/eval/report.md": "# eval\n",
                      "artifacts/eval/report.png": "png", "artifacts/eval/resolved_params.yaml": "{}\n",
                      "artifacts/eval_os/metrics.json": json.dumps({"tasks": 2, "supported": 2, "accuracy": 50.0}),
                      "artifacts/eval_kg/metrics.json": json.dumps({"tasks": 2, "f1": 10.0}),
                      ".cmat/stages/evaluate.json": '{"stage": "evaluate", "returncode": 0}',
                      ".cmat/stages/sft.json": '{"stage": "sft", "returncode": 1}'}.items():  # a failed attempt
        (workspace / rel).parent.mkdir(parents=True, exist_ok=True)
        (workspace / rel).write_text(text)
    orchestration.run_stage("report", run_id, [])  # the real stage, as the DAG's report task runs it

    published = orchestration.publish(run_id, registry)
    manifest = registry.read_manifest(published["run_id"])
    assert manifest["files"]["dvc.lock"]["kind"] == "dvc_lock"
    assert not (workspace / ".dvc/cache").exists(), "locking copies nothing into a DVC cache"
    assert orchestration.publish(run_id, registry)["files"] == published["files"], "the same lock: a no-op"

    monkeypatch.setenv("CMAT_REGISTRY", f"s3://{registry.config.bucket}/cmat")
    monkeypatch.setenv("CMAT_S3_ENDPOINT", s3_endpoint)
    dest = tmp_path / "pulled"
    assert cli.main(["pull", "--run", published["run_id"], "--what", "lock", "--dest", str(dest)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["files"] == 3
    assert sorted(p.name for p in dest.iterdir()) == ["dvc.lock", "manifest.json", "params.yaml", "run.json"]
    lock = yaml.safe_load((dest / "dvc.lock").read_text())
    assert lock["schema"] == "2.0" and list(lock["stages"]) == ["evaluate", "report"], "finished stages only"
    evaluate = lock["stages"]["evaluate"]
    assert evaluate["cmd"] == "python -m cmat_pipeline.evaluate --no-progress"
    deps = {d["path"]: d for d in evaluate["deps"]}
    code = workspace / "cmat_pipeline/evaluate.py"
    assert deps["cmat_pipeline/evaluate.py"] == {"path": "cmat_pipeline/evaluate.py", "hash": "md5",
                                                 "md5": _md5(code), "size": code.stat().st_size}
    assert deps["artifacts/model"]["md5"].endswith(".dir") and deps["artifacts/model"]["nfiles"] == 2
    assert deps[str(db_dev_file.resolve())]["md5"] == _md5(db_dev_file)
    assert evaluate["params"]["params.yaml"]["evaluate"]["adapter"] == "artifacts/cmat"
    outs = {o["path"]: o for o in lock["stages"]["report"]["outs"]}
    assert outs["artifacts/report/metrics.json"]["md5"] == _md5(workspace / "artifacts/report/metrics.json")
    assert outs["artifacts/report/plots/cmat"]["nfiles"] == 1

    env = _clean_env(tmp_path)
    copy = tmp_path / "git-copy"
    shutil.copytree(workspace, copy, symlinks=True)
    (copy / "dvc.lock").unlink()
    subprocess.run(["git", "init", "-q"], cwd=copy, check=True, env=env)
    _dvc(copy, "commit", "-f", "evaluate", "report", env=env)
    assert yaml.safe_load((copy / "dvc.lock").read_text()) == lock, "what `dvc commit -f` writes"

    (workspace / "artifacts/report/metrics.json").unlink()  # a finished stage's output lost: no silent lock
    with pytest.raises(Exception, match="cannot lock stage report of .*artifacts/report/metrics.json"):
        orchestration.write_run_lock(workspace)
