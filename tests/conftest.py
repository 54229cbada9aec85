"""Shared fixtures: the AgentBench dev data path, a real MariaDB on loopback, a tiny random model, the bwrap check."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
AGENTBENCH = Path(os.environ.get("CMAT_AGENTBENCH_DIR", REPO.parent / "shared" / "agentbench"))
DB_DEV = AGENTBENCH / "dbbench" / "dev.jsonl"


def bwrap_works() -> bool:
    """True when bubblewrap runs here and may create the namespaces the OS sandbox uses."""
    if shutil.which("bwrap") is None:
        return False
    probe = subprocess.run(["bwrap", "--unshare-all", "--unshare-user", "--ro-bind", "/", "/", "true"],
                           capture_output=True)
    return probe.returncode == 0


def require_bwrap() -> None:
    """Skip a test that plays OS tasks where bubblewrap cannot run; under CI that is a failure."""
    if not bwrap_works():
        if os.environ.get("CI"):
            pytest.fail("bubblewrap is missing or cannot create namespaces; .ci/apt.sh installs it")
        pytest.skip("bubblewrap not usable here (apt-get install bubblewrap; unprivileged user namespaces)")


def failed_episode(opening: list[dict], *turns: tuple[str, str | None]) -> dict:
    """A failed episode's record from (response, observation) turns after `opening` (None: no observation)."""
    messages, records = list(opening), []
    for response, seen in turns:
        messages.append({"role": "assistant", "content": response})
        records.append({"response": response, "vetoed": False})
        if seen is not None:
            messages.append({"role": "user", "content": seen})
    return {"correct": False, "turns": records, "messages": messages}


@pytest.fixture(scope="session")
def db_dev_file() -> Path:
    if not DB_DEV.exists():
        pytest.fail(f"AgentBench dev data missing at {DB_DEV}; set CMAT_AGENTBENCH_DIR to an AgentBench data folder")
    return DB_DEV


@pytest.fixture(scope="session")
def mariadb(tmp_path_factory):
    """A real MariaDB server on 127.0.0.1 for the whole session (Debian's mariadb-server)."""
    from cmat_pipeline.envs.local_mariadb import local_mariadb

    if not (shutil.which("mariadbd") or os.path.exists("/usr/sbin/mariadbd")):
        if os.environ.get("CI"):
            pytest.fail("mariadb-server is not installed; .ci/run installs it")
        pytest.skip("mariadb-server not installed (apt-get install mariadb-server)")
    with local_mariadb(tmp_path_factory.mktemp("mariadb")) as server:
        yield server


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with SmolLM2's real tokenizer and chat template."""
    from cmat_pipeline.prepare_model import prepare_model

    return prepare_model("tiny-random", tmp_path_factory.mktemp("tiny") / "model", seed=0)
