"""A throw-away MariaDB server on loopback, for tests and benchmarks of the `mysql` backend.

Needs Debian's `mariadb-server` (`apt-get install mariadb-server`). Usage:
    with local_mariadb(tmp_dir) as server:
        backend = MySQLBackend(host=server.host, port=server.port, user="root")
Run by hand: `python -m cmat_pipeline.envs.local_mariadb DIR` keeps one up until Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from cmat_pipeline.errors import BackendError


@dataclass(frozen=True)
class LocalServer:
    host: str
    port: int
    socket: str
    datadir: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _binary(*names: str) -> str:
    for name in names:
        found = shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.path.exists(p)), None)
        if found:
            return found
    raise BackendError(f"none of {names} found: install Debian's mariadb-server (`apt-get install -y mariadb-server`)")


@contextlib.contextmanager
def local_mariadb(workdir: str | Path, startup_timeout_s: float = 60.0) -> Iterator[LocalServer]:
    """Initialise a datadir under `workdir`, start mariadbd on a free loopback port, stop it after."""
    workdir = Path(workdir).resolve()
    datadir, sock = workdir / "data", workdir / "mysqld.sock"
    user = ["--user=root"] if os.geteuid() == 0 else []
    if not (datadir / "mysql").exists():
        datadir.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [_binary("mariadb-install-db", "mysql_install_db"), "--no-defaults", f"--datadir={datadir}",
             "--auth-root-authentication-method=normal", "--skip-test-db", *user],
            check=True, capture_output=True,
        )
    port = _free_port()
    log = open(workdir / "mariadbd.log", "ab")
    proc = subprocess.Popen(
        [_binary("mariadbd", "mysqld"), "--no-defaults", f"--datadir={datadir}", f"--socket={sock}",
         f"--port={port}", "--bind-address=127.0.0.1", f"--pid-file={workdir / 'mysqld.pid'}",
         "--skip-log-bin", "--innodb-buffer-pool-size=32M", "--skip-name-resolve", *user],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        _wait_ready(proc, port, startup_timeout_s, workdir / "mariadbd.log")
        yield LocalServer("127.0.0.1", port, str(sock), str(datadir))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _wait_ready(proc: subprocess.Popen, port: int, timeout_s: float, log: Path) -> None:
    import pymysql

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BackendError(f"mariadbd exited with code {proc.returncode}; see {log}")
        try:
            pymysql.connect(host="127.0.0.1", port=port, user="root", password="", connect_timeout=2).close()
            return
        except pymysql.err.OperationalError:
            time.sleep(0.3)
    raise BackendError(f"mariadbd did not accept connections on 127.0.0.1:{port} within {timeout_s:.0f} s; see {log}")


if __name__ == "__main__":
    with local_mariadb(sys.argv[1] if len(sys.argv) > 1 else ".mariadb") as server:
        print(f"MariaDB on {server.host}:{server.port} (root, no password); Ctrl-C stops it", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
