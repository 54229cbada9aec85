"""OS sandboxes for the AgentBench OS environment: one fresh, isolated Linux per episode.

    with BwrapSandbox(params.os) as box:
        box.shell("cd /tmp && echo hi > x")       # the episode's persistent bash: cwd, files, jobs persist
        box.shell("cat x").output                 # 'hi\\n'
        box.run_script(Script("bash", "ls"))      # an independent process (init scripts, checks)

`BwrapSandbox` (default; Debian's `bubblewrap`): no network (own empty net namespace), own PID, IPC,
UTS and user namespaces, no capabilities, root filesystem = a size-capped tmpfs that dies with the
sandbox, the host's /usr, /etc, /sys (and /bin, /lib* where they are real directories) mounted
read-only, and empty writable /root (HOME), /home, /tmp, /var/log, /var/tmp, /run, /opt, /srv, /mnt.
When cmat runs as root the sandbox runs as an unprivileged host uid (`os.sandbox_uid`), so its "root"
is nobody on the host. Every process started inside gets CPU-seconds, address-space, process-count and
file-size limits; command output is capped.

`DockerSandbox`: the same protocol in a container of AgentBench's images (`infra/os_images/`), with
`--network none`, `--pids-limit` and `--memory`; needs a Docker engine.

Both start `sandbox_agent.py` inside and talk to it with JSON lines (see that module).
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import select
import shutil
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from cmat_pipeline.config import OSConfig
from cmat_pipeline.errors import CmatError

AGENT_SOURCE = (Path(__file__).parent / "sandbox_agent.py").read_text(encoding="utf-8")
# The supervisor's source comes as the first line of stdin, so `ps` inside shows a short command line.
BOOT = ("import json,sys;exec(compile(json.loads(sys.stdin.readline()),'cmat-sandbox','exec'),"
        "{'__name__':'__main__'})")
SANDBOX_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "USER": "root",
    "LOGNAME": "root", "SHELL": "/bin/bash", "LANG": "C.UTF-8", "TERM": "dumb",
}
HOSTNAME = "cmat-os"
READ_ONLY = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc")
EMPTY_DIRS = ("/root", "/home", "/var/log", "/var/tmp", "/run", "/opt", "/srv", "/mnt", "/media")
PROTOCOL_SLACK_S = 15.0  # the supervisor answers within a command's timeout plus its own clean-up


class SandboxError(CmatError):
    """A sandbox could not start, or stopped answering."""


@dataclass(frozen=True)
class Script:
    """A script as AgentBench's task files give it: bash or python source."""

    language: str
    code: str


@dataclass
class CommandResult:
    output: str
    exit_code: int | None  # None: timed out, or the shell died
    timed_out: bool = False
    truncated: bool = False
    shell_restarted: bool = False


class Sandbox:
    """The protocol with the in-sandbox supervisor; subclasses say how the supervisor is launched."""

    def __init__(self, cfg: OSConfig, image: str = ""):
        self.cfg, self.image = cfg, image or cfg.docker_image
        self.proc: subprocess.Popen | None = None
        self._stderr = None

    # --- subclass hooks
    def launch_argv(self) -> list[str]:
        raise NotImplementedError

    def popen_kwargs(self) -> dict[str, Any]:
        return {}

    def _teardown(self) -> None:
        """Anything left after the supervisor process is gone (a container)."""

    # --- lifecycle
    def agent_config(self) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "token": "__CMAT_DONE_" + secrets.token_hex(8), "workdir": "/run/.cmat", "cwd": "/",
            "env": dict(SANDBOX_ENV, HOSTNAME=HOSTNAME), "max_output_bytes": cfg.max_output_bytes,
            "rlimits": {"RLIMIT_CPU": cfg.cpu_seconds, "RLIMIT_AS": cfg.memory_mb << 20,
                        "RLIMIT_NPROC": cfg.max_processes, "RLIMIT_FSIZE": cfg.disk_mb << 20, "RLIMIT_CORE": 0},
        }

    def start(self) -> "Sandbox":
        self._stderr = tempfile.TemporaryFile()
        try:
            self.proc = subprocess.Popen(self.launch_argv(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=self._stderr, cwd="/", **self.popen_kwargs())
        except OSError as err:
            raise SandboxError(f"os.driver {self.cfg.driver}: cannot start the sandbox: {err}") from None
        self._send(json.dumps(AGENT_SOURCE))
        self._send(json.dumps(self.agent_config()))
        if not self._receive(PROTOCOL_SLACK_S).get("ready"):
            raise SandboxError(f"os.driver {self.cfg.driver}: the sandbox did not come up: {self._stderr_tail()}")
        return self

    def close(self) -> None:
        """Stop the sandbox: every process in it dies and its filesystem is gone."""
        if self.proc is None:
            return
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        finally:
            self.proc.stdout.close()
            self._stderr.close()
            self.proc = None
            self._teardown()

    def __enter__(self) -> "Sandbox":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # --- requests
    def shell(self, cmd: str, timeout: float | None = None) -> CommandResult:
        """Run `cmd` in the episode's persistent bash."""
        return self._request({"op": "shell", "cmd": cmd, "timeout": timeout or self.cfg.command_timeout_s})

    def exec(self, argv: Sequence[str], timeout: float | None = None) -> CommandResult:
        """Run an independent process (fresh environment, cwd /), as AgentBench's `execute_independent`."""
        return self._request({"op": "exec", "argv": list(argv), "timeout": timeout or self.cfg.script_timeout_s})

    def run_script(self, script: Script, args: Sequence[str] = ()) -> CommandResult:
        """A task script with AgentBench's calling convention (`bash -c CODE -- ARGS`, `python3 -c CODE ARGS`)."""
        if script.language == "bash":
            argv = ["bash", "-c", script.code, *(["--", *args] if args else [])]
        elif script.language == "python":
            argv = ["python3", "-c", script.code, *args]
        else:
            raise SandboxError(f"script language {script.language!r} is not supported (bash, python)")
        return self.exec(argv)

    def _request(self, message: dict[str, Any]) -> CommandResult:
        if self.proc is None:
            raise SandboxError("the sandbox is not running (start() it, or use it as a context manager)")
        self._send(json.dumps(message))
        return CommandResult(**self._receive(message["timeout"] + PROTOCOL_SLACK_S))

    def _send(self, line: str) -> None:
        try:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            raise SandboxError(f"the sandbox exited: {self._stderr_tail()}") from None

    def _receive(self, timeout: float) -> dict[str, Any]:
        fd, line, deadline = self.proc.stdout.fileno(), b"", time.monotonic() + timeout
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise SandboxError(f"the sandbox did not answer within {timeout:.0f} s")
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise SandboxError(f"the sandbox exited: {self._stderr_tail()}")
            line += chunk
        return json.loads(line)

    def _stderr_tail(self) -> str:
        if self.proc is not None and self.proc.poll() is None:
            return "(still running)"
        self._stderr.seek(0)
        return self._stderr.read()[-2000:].decode("utf-8", "replace").strip() or "(no error output)"


@functools.cache
def unreadable_dirs(uid: int) -> tuple[str, ...]:
    """Host directories under the read-only trees that the sandbox's user cannot read (a 0700 root folder
    such as /etc/ssl/private). They are covered with empty folders so that `find /` inside does not print
    errors a container's real root never sees (scanned once per process, about a second)."""
    found = []
    for top in ("/usr", "/etc"):
        for root, dirs, _ in os.walk(top, onerror=lambda err: found.append(err.filename)):
            for name in dirs:
                path = os.path.join(root, name)
                try:
                    info = os.lstat(path)
                except OSError:
                    continue
                if stat.S_ISDIR(info.st_mode) and info.st_uid != uid and info.st_mode & 0o005 != 0o005:
                    found.append(path)
    return tuple(sorted(set(found)))


class BwrapSandbox(Sandbox):
    """bubblewrap: unprivileged namespaces, nothing to install but Debian's `bubblewrap`."""

    def launch_argv(self) -> list[str]:
        binary = shutil.which("bwrap")
        if binary is None:
            raise SandboxError("os.driver bwrap: bubblewrap is not installed (apt-get install bubblewrap, "
                               "or set os.driver: docker)")
        if not os.path.exists("/usr/bin/python3"):
            raise SandboxError("os.driver bwrap: the sandbox runs the host's /usr/bin/python3, which is missing "
                               "(apt-get install python3)")
        return [binary, *self.bwrap_args(), "/usr/bin/python3", "-I", "-c", BOOT]

    def bwrap_args(self) -> list[str]:
        cfg = self.cfg
        args = ["--unshare-all", "--unshare-user", "--uid", "0", "--gid", "0", "--cap-drop", "ALL",
                "--as-pid-1", "--die-with-parent", "--new-session", "--hostname", HOSTNAME, "--clearenv",
                "--size", str(cfg.disk_mb << 20), "--tmpfs", "/"]
        for name in READ_ONLY:
            path = Path("/", name)
            if path.is_symlink():  # merged /usr: /bin -> usr/bin
                args += ["--symlink", os.readlink(path), str(path)]
            elif path.is_dir():
                args += ["--ro-bind", str(path), str(path)]
        args += ["--ro-bind", "/sys", "/sys", "--proc", "/proc", "--dev", "/dev",
                 "--ro-bind-try", "/var/lib/dpkg", "/var/lib/dpkg"]  # so dpkg -l answers
        uid = cfg.sandbox_uid if os.geteuid() == 0 else os.geteuid()
        for path in (*unreadable_dirs(uid), *(["/proc/tty/driver"] if os.path.isdir("/proc/tty/driver") else [])):
            args += ["--tmpfs", path]
        for path in EMPTY_DIRS:
            args += ["--dir", path]
        # The supervisor's command file lives on its own small tmpfs: a full / must not stop the next command.
        args += ["--perms", "1777", "--dir", "/tmp", "--symlink", "../run", "/var/run",
                 "--size", str(8 << 20), "--tmpfs", "/run/.cmat", "--chdir", "/"]
        return args

    def popen_kwargs(self) -> dict[str, Any]:
        if os.geteuid() != 0:
            return {}
        # Host root would map to root inside: run as an unprivileged host user instead.
        uid = self.cfg.sandbox_uid
        return {"user": uid, "group": uid, "extra_groups": []}


class DockerSandbox(Sandbox):
    """A container of AgentBench's OS images (`docker build` them from infra/os_images/)."""

    def __init__(self, cfg: OSConfig, image: str = ""):
        super().__init__(cfg, image)
        self.container = ""

    def run_argv(self) -> list[str]:
        cfg = self.cfg
        return [cfg.docker_binary, "run", "--detach", "--rm", "--init", "--network", "none",
                "--pids-limit", str(cfg.max_processes), "--memory", f"{cfg.memory_mb}m",
                "--hostname", HOSTNAME, "--label", "created_by=cmat-os", self.image, "sleep", "infinity"]

    def exec_argv(self, container: str) -> list[str]:
        return [self.cfg.docker_binary, "exec", "--interactive", "--workdir", "/", container,
                "python3", "-I", "-c", BOOT]

    def launch_argv(self) -> list[str]:
        if shutil.which(self.cfg.docker_binary) is None:
            raise SandboxError(f"os.driver docker: `{self.cfg.docker_binary}` is not installed (or set os.driver: bwrap)")
        started = subprocess.run(self.run_argv(), capture_output=True, text=True, timeout=120)
        if started.returncode != 0:
            raise SandboxError(f"os.driver docker: cannot start image {self.image!r}: {started.stderr.strip()[-500:]} "
                               "(build it: see infra/os_images/README.md)")
        self.container = started.stdout.strip()
        return self.exec_argv(self.container)

    def _teardown(self) -> None:
        if self.container:
            subprocess.run([self.cfg.docker_binary, "rm", "--force", self.container], capture_output=True, timeout=60)
            self.container = ""


def make_sandbox(cfg: OSConfig, image: str = "") -> Sandbox:
    """The sandbox `os.driver` names (not started)."""
    return DockerSandbox(cfg, image) if cfg.driver == "docker" else BwrapSandbox(cfg, image)
