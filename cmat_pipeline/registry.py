"""Artifact registry in S3 (AWS, MinIO, any S3 API): every run's outputs, checksummed, plus aliases.

Layout under `s3://<bucket>/<prefix>/`:
    runs/<run_id>/params.yaml, dvc.lock, run.json     how the run was made (dvc.lock: orchestration.write_run_lock)
    runs/<run_id>/metrics/*.json                       e.g. metrics/evaluate.json
    runs/<run_id>/dataset/card.json, card.md, ...      the dataset card (+ train/val files)
    runs/<run_id>/adapter/...                          the tuned adapter
    runs/<run_id>/report/...                           evaluation report
    runs/<run_id>/manifest.json                        written last: sha256 + size of every file;
                                                       a run without it is incomplete, never pulled
    aliases/<name>.json                                {"run_id": ...}: `latest`, `production`
    checkpoints/<run_id>/<stage>/files/..., manifest.json   a finished stage's outputs, for a retry elsewhere
Every object also carries its sha256 as metadata; each upload is checked (HEAD: size + checksum) before
the next, and `pull` verifies every byte it writes and resumes interrupted downloads from a `.part` file.

Configure with environment variables (credentials never go into params.yaml or git):
    CMAT_REGISTRY=s3://bucket/prefix
    AWS_ACCESS_KEY_ID=...  AWS_SECRET_ACCESS_KEY=...        (or an AWS profile / instance role)
    CMAT_S3_ENDPOINT=http://minio:9000                      (or AWS_ENDPOINT_URL; unset for AWS S3)
Run it:
    cmat pull --alias production --what adapter --dest artifacts/production
    cmat pull --run scheduled__2026-11-16T03-00-00-00-00 --what all
    cmat pull --run scheduled__2026-11-16T03-00-00-00-00 --what lock   # its dvc.lock (+ params.yaml, run.json)
    cmat pull --list
Publishing and promotion are called by the pipeline (`cmat_pipeline.orchestration.publish`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cmat_pipeline.errors import CmatError

ENV_REGISTRY = "CMAT_REGISTRY"
"""Where the registry lives: `s3://bucket/prefix`."""
ENV_ENDPOINTS = ("CMAT_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
"""Endpoint for MinIO / any S3-compatible server, first set wins; none set means AWS S3."""
ENV_ACCESS_KEY, ENV_SECRET_KEY = "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"
ENV_REGION = ("AWS_REGION", "AWS_DEFAULT_REGION")

KINDS = ("params", "dvc_lock", "run", "metrics", "dataset", "adapter", "report")
SINGLE_FILES = {"params": "params.yaml", "dvc_lock": "dvc.lock", "run": "run.json"}
PULL_CHOICES = ("adapter", "dataset", "report", "metrics", "lock", "all")
PULL_KINDS = {"lock": "dvc_lock"}
"""`--what` choices named otherwise than the kind they pull."""
ALWAYS_PULLED = ("params", "run")  # provenance travels with whatever is pulled
MANIFEST = "manifest.json"
DEFAULT_METRIC = "overall_cat_accuracy"
RUN_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
ALIAS_RE = re.compile(r"[a-z][a-z0-9_-]{0,63}")
STAGE_RE = ALIAS_RE
CHUNK = 1 << 20

Progress = Callable[[str, int, int], None]
"""Called as (key, bytes done, total bytes) while a file moves; tests use it to inject faults."""


class RegistryError(CmatError):
    """The registry could not be reached or read, or a run, alias or file is missing or corrupt."""


@dataclass(frozen=True)
class RegistryConfig:
    """Where the registry is and how hard to try; `from_env` reads the standard variables."""

    bucket: str
    """S3 bucket name."""
    prefix: str = ""
    """Key prefix inside the bucket (no leading or trailing slash); empty puts runs/ at the top."""
    endpoint_url: str | None = None
    """S3 API endpoint for MinIO or another S3-compatible server; None means AWS S3."""
    region: str = "us-east-1"
    """Region used to sign requests (MinIO accepts any)."""
    max_attempts: int = 5
    """Attempts per request (botocore standard retry mode, exponential backoff)."""
    connect_timeout: float = 10.0
    """Seconds to open a connection."""
    read_timeout: float = 120.0
    """Seconds to wait for data on an open connection."""
    multipart_threshold: int = 64 * CHUNK
    """Files larger than this (bytes) go up in parts, several at once."""
    multipart_chunksize: int = 16 * CHUNK
    """Part size in bytes (S3 needs at least 5 MiB for all parts but the last)."""

    @classmethod
    def from_env(cls, uri: str | None = None, endpoint_url: str | None = None,
                 env: Mapping[str, str] | None = None, **overrides: Any) -> "RegistryConfig":
        """Build from `uri`/`endpoint_url` or CMAT_REGISTRY, CMAT_S3_ENDPOINT / AWS_ENDPOINT_URL, AWS_REGION."""
        env = os.environ if env is None else env
        uri = uri or env.get(ENV_REGISTRY, "")
        if not uri:
            raise RegistryError(f"no registry configured: set {ENV_REGISTRY}=s3://bucket/prefix (or pass --registry)")
        bucket, prefix = parse_s3_uri(uri)
        endpoint = endpoint_url or next((env[n] for n in ENV_ENDPOINTS if env.get(n)), None)
        region = next((env[n] for n in ENV_REGION if env.get(n)), "us-east-1")
        return cls(bucket=bucket, prefix=prefix, endpoint_url=endpoint, region=region, **overrides)

    def key(self, *parts: str) -> str:
        return "/".join(p.strip("/") for p in (self.prefix, *parts) if p and p.strip("/"))

    def url(self, *parts: str) -> str:
        return f"s3://{self.bucket}/{self.key(*parts)}"


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ("bucket", "some/prefix")."""
    match = re.fullmatch(r"s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:/(.*))?", uri.strip())
    if not match:
        raise RegistryError(f"{ENV_REGISTRY}={uri!r} is not an S3 URI like s3://bucket/prefix "
                            "(bucket: 3-63 lowercase letters, digits, dots, dashes)")
    return match.group(1), (match.group(2) or "").strip("/")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class LocalFile:
    """One file to publish: its key relative to the run folder, where it is, and what it is."""

    rel: str
    path: Path
    kind: str
    size: int
    sha256: str


def collect_files(artifacts: Mapping[str, Any]) -> list[LocalFile]:
    """Expand `{kind: file | folder | [files] | {name: file}}` into the files of a run.

    `params`, `dvc_lock` and `run` are single files stored as params.yaml, dvc.lock and run.json; the other
    kinds go under `<kind>/`, a folder keeping its inner layout. Missing paths are an error: a publish
    must never silently leave something out.
    """
    files: dict[str, LocalFile] = {}
    for kind, spec in artifacts.items():
        if kind not in KINDS:
            raise RegistryError(f"unknown artifact kind {kind!r}; choose from {', '.join(KINDS)}")
        for rel, path in _expand(kind, spec):
            path = Path(path)
            if not path.is_file():
                raise RegistryError(f"cannot publish {kind} file {path}: it does not exist")
            if rel in files:
                raise RegistryError(f"two files would be published as {rel}: {files[rel].path} and {path}")
            files[rel] = LocalFile(rel, path, kind, path.stat().st_size, sha256_file(path))
    return sorted(files.values(), key=lambda f: f.rel)


def _expand(kind: str, spec: Any) -> Iterator[tuple[str, Path]]:
    if kind in SINGLE_FILES:
        yield SINGLE_FILES[kind], Path(spec)
    elif isinstance(spec, Mapping):
        yield from ((f"{kind}/{name}", Path(p)) for name, p in spec.items())
    elif isinstance(spec, (str, Path)) and Path(spec).is_dir():
        root = Path(spec)
        yield from ((f"{kind}/{p.relative_to(root).as_posix()}", p) for p in sorted(root.rglob("*"))
                    if p.is_file() and not p.name.endswith(".part"))
    elif isinstance(spec, (str, Path)):
        yield f"{kind}/{Path(spec).name}", Path(spec)
    elif isinstance(spec, Sequence):
        yield from ((f"{kind}/{Path(p).name}", Path(p)) for p in spec)
    else:
        raise RegistryError(f"{kind}: expected a file, a folder, a list of files or {{name: file}}, got {spec!r}")


def _mask(value: str | None) -> str:
    return f"…{value[-4:]}" if value and len(value) > 8 else "(set)" if value else "(unset)"


class Registry:
    """Operations on one registry; every S3 failure becomes a RegistryError that says what to check."""

    def __init__(self, config: RegistryConfig, client: Any = None):
        self.config = config
        self.client = client or make_client(config)

    @classmethod
    def from_env(cls, **kwargs: Any) -> "Registry":
        return cls(RegistryConfig.from_env(**kwargs))

    # ---- errors ------------------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        return self.config.endpoint_url or f"AWS S3 ({self.config.region})"

    def _redact(self, text: str) -> str:
        secret = os.environ.get(ENV_SECRET_KEY, "")
        return text.replace(secret, "***") if len(secret) >= 4 else text

    @contextmanager
    def _s3(self, doing: str) -> Iterator[None]:
        """Translate botocore failures into one actionable line (never containing the secret key)."""
        from boto3.exceptions import S3UploadFailedError
        from botocore import exceptions as bx

        try:
            yield
        except S3UploadFailedError as err:
            if isinstance(err.__cause__, bx.ClientError):
                raise self._client_error(doing, err.__cause__) from err
            raise RegistryError(self._redact(f"{doing}: upload failed: {err}")) from err
        except bx.ClientError as err:
            raise self._client_error(doing, err) from err
        except (bx.NoCredentialsError, bx.PartialCredentialsError) as err:
            raise RegistryError(f"{doing}: no usable S3 credentials ({type(err).__name__}); set {ENV_ACCESS_KEY} "
                                f"and {ENV_SECRET_KEY}, or an AWS profile") from err
        except (bx.ConnectionError, bx.HTTPClientError) as err:
            raise RegistryError(f"{doing}: cannot reach the S3 endpoint {self.endpoint} ({type(err).__name__}); "
                                f"check {' / '.join(ENV_ENDPOINTS[::2])} and that the server is up. Anything "
                                "interrupted resumes when you run the same command again") from err

    def _client_error(self, doing: str, err: Any) -> RegistryError:
        error = err.response.get("Error", {})
        code, status = str(error.get("Code", "")), err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "AccessDenied",
                    "InvalidSecurity", "Forbidden", "403") or status == 403:
            message = (f"{doing}: S3 refused the credentials ({code or status}) at {self.endpoint} for access key "
                       f"{_mask(os.environ.get(ENV_ACCESS_KEY))}; check {ENV_ACCESS_KEY} / {ENV_SECRET_KEY} and "
                       f"that this key may use bucket {self.config.bucket!r}")
        elif code == "NoSuchBucket":
            message = (f"{doing}: bucket {self.config.bucket!r} does not exist at {self.endpoint}; create it (the "
                       f"compose file's minio-init does) or fix {ENV_REGISTRY}")
        else:
            message = f"{doing}: S3 error {code or status}: {error.get('Message', '')}".rstrip(": ")
        return RegistryError(self._redact(message))

    # ---- low-level helpers ----------------------------------------------------------------------------
    def _head(self, key: str) -> dict[str, Any] | None:
        """Object metadata, or None when there is no such object."""
        from botocore.exceptions import ClientError

        with self._s3(f"checking s3://{self.config.bucket}/{key}"):
            try:
                return self.client.head_object(Bucket=self.config.bucket, Key=key)
            except ClientError as err:
                if err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                    return None
                raise

    def _get_json(self, key: str) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        with self._s3(f"reading s3://{self.config.bucket}/{key}"):
            try:
                body = self.client.get_object(Bucket=self.config.bucket, Key=key)["Body"].read()
            except ClientError as err:
                if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return None
                raise
        try:
            return json.loads(body)
        except ValueError:
            raise RegistryError(f"s3://{self.config.bucket}/{key} is not valid JSON; the registry is damaged "
                                "there (re-publish the run or fix the alias)") from None

    def _put_json(self, key: str, obj: dict[str, Any]) -> None:
        body = (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
        with self._s3(f"writing s3://{self.config.bucket}/{key}"):
            self.client.put_object(Bucket=self.config.bucket, Key=key, Body=body, ContentType="application/json",
                                   Metadata={"sha256": hashlib.sha256(body).hexdigest()})

    def _list(self, prefix: str, delimiter: str | None = None) -> tuple[list[dict[str, Any]], list[str]]:
        objects, folders = [], []
        kwargs = {"Bucket": self.config.bucket, "Prefix": prefix, **({"Delimiter": delimiter} if delimiter else {})}
        with self._s3(f"listing s3://{self.config.bucket}/{prefix}"):
            for page in self.client.get_paginator("list_objects_v2").paginate(**kwargs):
                objects.extend(page.get("Contents", []))
                folders.extend(p["Prefix"] for p in page.get("CommonPrefixes", []))
        return objects, folders

    def run_key(self, run_id: str, rel: str = "") -> str:
        check_run_id(run_id)
        return self.config.key("runs", run_id, rel)

    # ---- runs --------------------------------------------------------------------------------------
    def list_runs(self) -> list[str]:
        _, folders = self._list(self.config.key("runs") + "/", delimiter="/")
        return sorted(f.rstrip("/").rsplit("/", 1)[-1] for f in folders)

    def list_aliases(self) -> dict[str, str]:
        objects, _ = self._list(self.config.key("aliases") + "/")
        names = [o["Key"].rsplit("/", 1)[-1].removesuffix(".json") for o in objects if o["Key"].endswith(".json")]
        return {name: self.resolve_alias(name) for name in sorted(names)}

    def read_manifest(self, run_id: str) -> dict[str, Any]:
        """The run's manifest; a clear error for a run that does not exist or was never completed."""
        manifest = self._get_json(self.run_key(run_id, MANIFEST))
        if manifest is not None:
            return manifest
        objects, _ = self._list(self.run_key(run_id) + "/")
        if objects:
            raise RegistryError(f"run {run_id!r} at {self.config.url('runs', run_id)} is incomplete (its publish was "
                                "interrupted: no manifest.json); publish it again to finish it")
        known = self.list_runs()
        hint = f"; known runs: {', '.join(known[-5:])}" + (f" (and {len(known) - 5} more)" if len(known) > 5 else "")
        raise RegistryError(f"run {run_id!r} not found in {self.config.url('runs')}"
                            + (hint if known else "; the registry has no runs yet"))

    def publish_run(self, run_id: str, artifacts: Mapping[str, Any], *, overwrite: bool = False,
                    on_progress: Progress | None = None) -> dict[str, Any]:
        """Upload a run's files, verified one by one, then its manifest; returns the manifest.

        Idempotent: files already in the registry with the right checksum are not sent again, so a publish
        interrupted by a network or server failure is finished by running it again. A complete run is
        immutable: publishing different content under the same id fails unless `overwrite`.
        """
        files = collect_files(artifacts)
        if not files:
            raise RegistryError(f"nothing to publish for run {run_id!r}")
        entries = {f.rel: {"sha256": f.sha256, "size": f.size, "kind": f.kind} for f in files}
        existing = self._get_json(self.run_key(run_id, MANIFEST))
        if existing is not None:
            if existing.get("files") == entries:
                self._advance_latest(run_id, existing["published_at"])  # in case the first attempt died here
                return existing
            if not overwrite:
                raise RegistryError(f"run {run_id!r} is already published at {self.config.url('runs', run_id)} with "
                                    "different files; runs are immutable: use a new run id (or overwrite=True)")
            with self._s3(f"unpublishing run {run_id}"):  # the run is incomplete until its new manifest lands
                self.client.delete_object(Bucket=self.config.bucket, Key=self.run_key(run_id, MANIFEST))
        self._abort_stale_uploads(self.run_key(run_id) + "/", f"run {run_id}")
        for f in files:
            self._upload_verified(self.run_key(run_id, f.rel), f, on_progress)
        self._delete_strays(self.run_key(run_id) + "/", keep=set(entries) | {MANIFEST}, what=f"run {run_id}")
        manifest = {"format": 1, "run_id": run_id, "published_at": _now(), "files": entries,
                    "metrics": _read_metrics(files), "evaluation": _evaluation(files)}
        self._put_json(self.run_key(run_id, MANIFEST), manifest)
        self._advance_latest(run_id, manifest["published_at"])
        return manifest

    def _advance_latest(self, run_id: str, published_at: str) -> None:
        """`latest` only moves forward in publish time (a retried old publish must not pull it back)."""
        current = self._get_json(self.alias_key("latest"))
        if current is None or current.get("run_id") == run_id or current.get("published_at", "") < published_at:
            self.set_alias("latest", run_id, published_at=published_at)

    def _upload_verified(self, key: str, f: LocalFile, on_progress: Progress | None) -> None:
        if self._matches(self._head(key), f.size, f.sha256):
            return  # already there from an earlier, interrupted attempt
        from boto3.s3.transfer import TransferConfig

        done = 0

        def progress(n: int) -> None:
            nonlocal done
            done += n
            if on_progress:
                on_progress(key, done, f.size)

        with self._s3(f"uploading {f.path} to s3://{self.config.bucket}/{key}"):
            self.client.upload_file(str(f.path), self.config.bucket, key, Callback=progress,
                                    ExtraArgs={"Metadata": {"sha256": f.sha256}},
                                    Config=TransferConfig(multipart_threshold=self.config.multipart_threshold,
                                                          multipart_chunksize=self.config.multipart_chunksize,
                                                          max_concurrency=4))
        head = self._head(key)
        if not self._matches(head, f.size, f.sha256):
            got = (head or {}).get("ContentLength"), (head or {}).get("Metadata", {}).get("sha256")
            raise RegistryError(f"upload of {f.path} to s3://{self.config.bucket}/{key} did not verify: expected "
                                f"{f.size} bytes with sha256 {f.sha256[:12]}…, the server has {got}; publish again")

    @staticmethod
    def _matches(head: dict[str, Any] | None, size: int, sha256: str) -> bool:
        return bool(head) and head.get("ContentLength") == size and head.get("Metadata", {}).get("sha256") == sha256

    def _abort_stale_uploads(self, prefix: str, what: str) -> None:
        """Multipart uploads left by a crashed attempt hold hidden partial data; drop them before retrying."""
        with self._s3(f"cleaning unfinished uploads of {what}"):
            pages = self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.config.bucket,
                                                                                 Prefix=prefix)
            for upload in (u for page in pages for u in page.get("Uploads", [])):
                self.client.abort_multipart_upload(Bucket=self.config.bucket, Key=upload["Key"],
                                                   UploadId=upload["UploadId"])

    def _delete_strays(self, root: str, keep: set[str], what: str) -> None:
        """Objects under `root` of an earlier attempt that this upload does not contain (renamed or removed since)."""
        objects, _ = self._list(root)
        stray = [o["Key"] for o in objects if o["Key"][len(root):] not in keep]
        with self._s3(f"removing stale files of {what}"):
            for start in range(0, len(stray), 1000):
                self.client.delete_objects(Bucket=self.config.bucket, Delete={
                    "Objects": [{"Key": k} for k in stray[start:start + 1000]], "Quiet": True})

    # ---- stage checkpoints -----------------------------------------------------------------------------
    def checkpoint_key(self, run_id: str, stage: str, rel: str = "") -> str:
        check_run_id(run_id)
        if not STAGE_RE.fullmatch(stage):
            raise RegistryError(f"stage name {stage!r}: use lowercase letters, digits, '-' or '_'")
        return self.config.key("checkpoints", run_id, stage, rel)

    def push_checkpoint(self, run_id: str, stage: str, root: str | Path, paths: Sequence[str], *,
                        on_progress: Progress | None = None) -> dict[str, Any]:
        """Upload what `stage` of `run_id` wrote (`paths`: files or folders relative to `root`), so that a retry
        on another machine restores it instead of running the finished stages again.

        Verified file by file like a publish, manifest last: until it lands the checkpoint does not exist, so
        an interrupted push is never restored half. Pushing the same files again uploads nothing; files that
        are gone since an earlier push are removed.
        """
        root = Path(root)
        files = _checkpoint_files(root, paths)
        entries = {f.rel: {"sha256": f.sha256, "size": f.size} for f in files}
        manifest_key = self.checkpoint_key(run_id, stage, MANIFEST)
        existing = self._get_json(manifest_key)
        if existing is not None and existing.get("files") == entries:
            return existing
        what = f"checkpoint {stage} of run {run_id}"
        with self._s3(f"invalidating {what}"):  # the old checkpoint must not be restored while it changes
            self.client.delete_object(Bucket=self.config.bucket, Key=manifest_key)
        files_root = self.checkpoint_key(run_id, stage, "files") + "/"
        self._abort_stale_uploads(files_root, what)
        for f in files:
            self._upload_verified(files_root + f.rel, f, on_progress)
        self._delete_strays(files_root, keep=set(entries), what=what)
        manifest = {"format": 1, "run_id": run_id, "stage": stage, "pushed_at": _now(), "files": entries}
        self._put_json(manifest_key, manifest)
        return manifest

    def restore_checkpoint(self, run_id: str, stage: str, root: str | Path,
                           on_progress: Progress | None = None) -> dict[str, Any] | None:
        """Download `stage`'s checkpoint of `run_id` into `root` (verified, resumable); None if it has none."""
        manifest = self._get_json(self.checkpoint_key(run_id, stage, MANIFEST))
        if manifest is None:
            return None
        files_root = self.checkpoint_key(run_id, stage, "files") + "/"
        downloaded = sum(self._download_verified(files_root + rel, entry, _safe_target(Path(root), rel), on_progress)
                         for rel, entry in sorted(manifest["files"].items()))
        return {"run_id": run_id, "stage": stage, "files": len(manifest["files"]), "downloaded_bytes": downloaded}

    def list_checkpoints(self, run_id: str) -> list[str]:
        """Stages of `run_id` with a complete checkpoint."""
        prefix = self.config.key("checkpoints", check_run_id(run_id)) + "/"
        objects, _ = self._list(prefix)
        parts = [o["Key"][len(prefix):].split("/") for o in objects]
        return sorted(p[0] for p in parts if len(p) == 2 and p[1] == MANIFEST)

    # ---- aliases -----------------------------------------------------------------------------------
    def alias_key(self, name: str) -> str:
        if not ALIAS_RE.fullmatch(name):
            raise RegistryError(f"alias {name!r}: use lowercase letters, digits, '-' or '_' (e.g. production)")
        return self.config.key("aliases", f"{name}.json")

    def set_alias(self, name: str, run_id: str, **extra: Any) -> dict[str, Any]:
        """Point alias `name` at a complete run."""
        self.read_manifest(run_id)  # refuse to point at a missing or incomplete run
        record = {"alias": name, "run_id": run_id, "updated_at": _now(), **extra}
        self._put_json(self.alias_key(name), record)
        return record

    def read_alias(self, name: str) -> dict[str, Any]:
        record = self._get_json(self.alias_key(name))
        if record is None:
            raise RegistryError(f"alias {name!r} not found in {self.config.url('aliases')}"
                                + ("; `production` is set by the first promoted run" if name == "production" else ""))
        if not isinstance(record, dict) or not isinstance(record.get("run_id"), str):
            raise RegistryError(f"alias {name!r} at {self.config.url('aliases', name + '.json')} has no run_id")
        return record

    def resolve_alias(self, name: str) -> str:
        return self.read_alias(name)["run_id"]

    def promote_if_better(self, run_id: str, metric: str = DEFAULT_METRIC, alias: str = "production") -> dict[str, Any]:
        """Move `alias` to `run_id` only if its `metric` is strictly higher than the aliased run's (or no alias yet)."""
        value = metric_value(self.read_manifest(run_id), metric, run_id)
        decision = {"alias": alias, "run_id": run_id, "metric": metric, "value": value,
                    "previous_run": None, "previous_value": None}
        if self._get_json(self.alias_key(alias)) is not None:
            current = self.resolve_alias(alias)
            decision["previous_run"] = current
            if current == run_id:
                return {**decision, "promoted": False, "reason": f"{run_id} already is {alias}"}
            try:
                champion = self.read_manifest(current)
                decision["previous_value"] = metric_value(champion, metric, current)
            except RegistryError:
                champion, decision["previous_value"] = {}, None  # the old run lacks the metric (or is gone): new wins
            mine, theirs = self.read_manifest(run_id).get("evaluation"), champion.get("evaluation")
            if mine and theirs and mine != theirs:
                return {**decision, "promoted": False,
                        "reason": f"not comparable: {run_id} was evaluated on {_describe(mine)}, {alias} ({current}) "
                                  f"on {_describe(theirs)}; evaluate both alike, or set the alias by hand"}
        previous = decision["previous_value"]
        better = previous is None or (not math.isnan(value) and value > previous)
        if not better:
            return {**decision, "promoted": False,
                    "reason": f"{metric} {value} is not better than {alias}'s {previous} ({decision['previous_run']})"}
        self.set_alias(alias, run_id, metric=metric, value=value, previous_run=decision["previous_run"],
                       previous_value=previous)
        return {**decision, "promoted": True, "reason": "first run" if decision["previous_run"] is None
                else f"{metric} {value} > {previous}"}

    # ---- pull --------------------------------------------------------------------------------------
    def pull(self, run_id: str | None = None, alias: str | None = None, what: str = "all",
             dest: str | Path | None = None, on_progress: Progress | None = None) -> dict[str, Any]:
        """Download a run's files of kind `what` into `dest`, verifying each; interrupted files resume."""
        if (run_id is None) == (alias is None):
            raise RegistryError("pull needs exactly one of a run id or an alias")
        if what not in PULL_CHOICES:
            raise RegistryError(f"--what {what!r}: choose one of {', '.join(PULL_CHOICES)}")
        run_id = run_id or self.resolve_alias(alias)  # type: ignore[arg-type]
        manifest = self.read_manifest(run_id)
        dest = Path(dest or Path("artifacts") / "registry" / run_id)
        kind = PULL_KINDS.get(what, what)
        wanted = {k for k in KINDS if what == "all" or k == kind} | set(ALWAYS_PULLED)
        selected = {rel: e for rel, e in manifest["files"].items() if e["kind"] in wanted}
        if what != "all" and not any(e["kind"] == kind for e in selected.values()):
            raise RegistryError(f"run {run_id!r} has no {what} files (it has: "
                                f"{', '.join(sorted({e['kind'] for e in manifest['files'].values()}))})")
        downloaded = 0
        for rel, entry in sorted(selected.items()):
            downloaded += self._download_verified(self.run_key(run_id, rel), entry, _safe_target(dest, rel),
                                                  on_progress)
        (dest / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        return {"run_id": run_id, "alias": alias, "what": what, "dest": str(dest), "files": len(selected),
                "downloaded_bytes": downloaded}

    def _download_verified(self, key: str, entry: dict[str, Any], target: Path, on_progress: Progress | None) -> int:
        """Bring `target` to the manifest's bytes; returns the bytes transferred (0 if already there)."""
        size, expected = int(entry["size"]), entry["sha256"]
        if target.is_file() and target.stat().st_size == size and sha256_file(target) == expected:
            return 0
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(target.name + ".part")
        resumed = part.stat().st_size if part.is_file() else 0
        if resumed > size:
            part.unlink()
            resumed = 0
        if size == 0:
            part.touch()  # nothing to fetch: an empty file (e.g. an empty quarantine) is still a file
        moved = self._fetch(key, part, resumed, size, on_progress)
        if sha256_file(part) != expected and resumed:
            moved += self._fetch(key, part, 0, size, on_progress)  # the old .part held other bytes: start over
        actual = sha256_file(part)
        if actual != expected:
            part.unlink()
            raise RegistryError(f"checksum mismatch for s3://{self.config.bucket}/{key}: expected sha256 "
                                f"{expected[:12]}…, got {actual[:12]}…; the download was discarded. The object in "
                                "the registry is corrupt or was changed: re-publish the run")
        os.replace(part, target)
        return moved

    def _fetch(self, key: str, part: Path, offset: int, size: int, on_progress: Progress | None) -> int:
        """Append bytes [offset, size) of `key` to `part` with a ranged GET; what arrived stays on error."""
        if offset >= size:
            return 0
        moved = 0
        with self._s3(f"downloading s3://{self.config.bucket}/{key} (resume with the same command)"):
            kwargs = {"Range": f"bytes={offset}-"} if offset else {}
            response = self.client.get_object(Bucket=self.config.bucket, Key=key, **kwargs)
            if offset and response["ResponseMetadata"]["HTTPStatusCode"] != 206:
                offset = 0  # the server ignored the range and sent everything: rewrite from the start
            with part.open("ab" if offset else "wb") as fh:
                for chunk in response["Body"].iter_chunks(CHUNK):
                    fh.write(chunk)
                    moved += len(chunk)
                    if on_progress:
                        on_progress(key, offset + moved, size)
        return moved


def make_client(config: RegistryConfig) -> Any:
    """A boto3 S3 client; credentials come from boto3's usual chain (env, profile, instance role)."""
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3", endpoint_url=config.endpoint_url, region_name=config.region,
        config=Config(retries={"max_attempts": config.max_attempts, "mode": "standard"},
                      connect_timeout=config.connect_timeout, read_timeout=config.read_timeout,
                      # MinIO and other self-hosted servers want path-style URLs (no bucket DNS names)
                      s3={"addressing_style": "path"} if config.endpoint_url else {}))


def _checkpoint_files(root: Path, paths: Sequence[str]) -> list[LocalFile]:
    """The files under `root`/`path` for every path (a file, or a folder taken whole); a missing path is an error."""
    files = []
    for rel in paths:
        target = _safe_target(root, rel)
        if not target.exists():
            raise RegistryError(f"cannot checkpoint {target}: it does not exist")
        for path in [target] if target.is_file() else sorted(target.rglob("*")):
            if path.is_file() and not path.name.endswith(".part"):
                files.append(LocalFile(path.relative_to(root).as_posix(), path, "checkpoint", path.stat().st_size,
                                       sha256_file(path)))
    if not files:
        raise RegistryError(f"nothing to checkpoint under {root} for {list(paths)}")
    return files


def check_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not RUN_ID_RE.fullmatch(run_id):
        raise RegistryError(f"run id {run_id!r}: use letters, digits, '.', '_' or '-' (orchestration.run_key makes "
                            "one from an Airflow run id)")
    return run_id


def metric_value(manifest: dict[str, Any], metric: str, run_id: str) -> float:
    """`metric` from the manifest's metrics: `name` (evaluate.json's first) or `file.name`, e.g.
    `evaluate.overall_cat_accuracy`."""
    metrics: dict[str, dict[str, Any]] = manifest.get("metrics", {})
    if "." in metric and metric.split(".", 1)[0] in metrics:
        source, name = metric.split(".", 1)
        value = metrics[source].get(name)
    else:
        order = sorted(metrics, key=lambda s: (s != "evaluate", s))
        value = next((metrics[s][metric] for s in order if metric in metrics[s]), None)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise RegistryError(f"run {run_id!r} has no numeric metric {metric!r} (metrics files: "
                            f"{', '.join(metrics) or 'none'})")
    return float(value)


def _read_metrics(files: list[LocalFile]) -> dict[str, dict[str, Any]]:
    """Top-level numbers of every metrics/*.json, copied into the manifest so promotion needs one GET."""
    out: dict[str, dict[str, Any]] = {}
    for f in files:
        if f.kind == "metrics" and f.rel.endswith(".json"):
            try:
                data = json.loads(f.path.read_text())
            except ValueError:
                raise RegistryError(f"metrics file {f.path} is not valid JSON") from None
            if isinstance(data, dict):
                out[Path(f.rel).stem] = {k: v for k, v in data.items()
                                         if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return out


def _evaluation(files: list[LocalFile]) -> dict[str, Any] | None:
    """What the run was evaluated on (task file name and count, from metrics/evaluate.json): promotion only
    compares runs evaluated alike."""
    source = next((f for f in files if f.rel == "metrics/evaluate.json"), None)
    data = json.loads(source.path.read_text()) if source else {}
    if not isinstance(data, dict) or "tasks" not in data:
        return None
    return {"task_file": Path(str(data.get("task_file", ""))).name, "tasks": data["tasks"]}


def _describe(evaluation: dict[str, Any]) -> str:
    return f"{evaluation['tasks']} tasks of {evaluation['task_file'] or 'an unnamed task file'}"


def _safe_target(dest: Path, rel: str) -> Path:
    if rel.startswith("/") or ".." in Path(rel).parts:
        raise RegistryError(f"manifest entry {rel!r} points outside the destination; refusing to write it")
    return dest / rel


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")  # sortable; orders quick publishes


# ---- module-level shortcuts: the registry from the environment ----------------------------------------
def publish_run(run_id: str, artifacts: Mapping[str, Any], **kwargs: Any) -> dict[str, Any]:
    return Registry.from_env().publish_run(run_id, artifacts, **kwargs)


def set_alias(name: str, run_id: str) -> dict[str, Any]:
    return Registry.from_env().set_alias(name, run_id)


def resolve_alias(name: str) -> str:
    return Registry.from_env().resolve_alias(name)


def pull(run_id: str | None = None, alias: str | None = None, what: str = "all",
         dest: str | Path | None = None) -> dict[str, Any]:
    return Registry.from_env().pull(run_id=run_id, alias=alias, what=what, dest=dest)


def promote_if_better(run_id: str, metric: str = DEFAULT_METRIC, alias: str = "production") -> dict[str, Any]:
    return Registry.from_env().promote_if_better(run_id, metric=metric, alias=alias)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """`cmat pull --run RUN_ID | --alias NAME | --list [--what adapter] [--dest DIR]`."""
    parser = argparse.ArgumentParser(prog="cmat pull", description=__doc__.splitlines()[0])
    ref = parser.add_mutually_exclusive_group(required=True)
    ref.add_argument("--run", help="run id, e.g. scheduled__2026-11-16T03-00-00-00-00")
    ref.add_argument("--alias", help="alias, e.g. production or latest")
    ref.add_argument("--list", action="store_true", help="list runs and aliases")
    parser.add_argument("--what", choices=PULL_CHOICES, default="all", help="which files (default: all)")
    parser.add_argument("--dest", help="target folder (default: artifacts/registry/<run_id>)")
    parser.add_argument("--registry", help=f"s3://bucket/prefix (default: ${ENV_REGISTRY})")
    parser.add_argument("--endpoint-url", help=f"S3 endpoint (default: ${ENV_ENDPOINTS[0]} or ${ENV_ENDPOINTS[2]})")
    args = parser.parse_args(argv)
    registry = Registry.from_env(uri=args.registry, endpoint_url=args.endpoint_url)
    if args.list:
        result: dict[str, Any] = {"registry": registry.config.url(), "aliases": registry.list_aliases(),
                                  "runs": registry.list_runs()}
    else:
        result = registry.pull(run_id=args.run, alias=args.alias, what=args.what, dest=args.dest)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    import sys

    from cmat_pipeline.cli import main as cli_main

    sys.exit(cli_main(["pull", *sys.argv[1:]]))
