"""The supervisor that runs *inside* an OS sandbox (bubblewrap or a Docker container).

It is not imported by cmat: `sandbox.py` sends this file's source to `python3 -I -c BOOT` inside the
sandbox, then talks to it with one JSON object per line on stdin/stdout (only the standard library,
Python >= 3.8, so it runs on the host's /usr/bin/python3 or any Ubuntu image):

    {"op": "shell", "cmd": "...", "timeout": 10}      -> the episode's persistent bash (state persists)
    {"op": "exec", "argv": [...], "timeout": 30}       -> an independent process (init, checks), cwd /
    {"op": "ping"}
Every reply: {"output", "exit_code", "timed_out", "truncated", "shell_restarted"}.

Under bubblewrap it is PID 1 of the sandbox's PID namespace (`--as-pid-1`), so the agent cannot kill it
(`kill -9 -1` spares it) and it reaps orphans; when it exits, the kernel kills everything in the sandbox.
Limits (CPU seconds, address space, processes, file size) are set on every process it starts.
"""

from __future__ import annotations

import json
import os
import re
import resource
import select
import signal
import subprocess
import sys
import time

CONFIG: dict = {}
MARK_SLACK = 64  # bytes kept past the output cap so a sentinel split across reads is still found


def _limits() -> None:
    """preexec_fn: resource limits for every process started in the sandbox."""
    for name, value in CONFIG["rlimits"].items():
        resource.setrlimit(getattr(resource, name), (value, value))
    os.setsid()  # its own session: terminal signals aimed at the supervisor never reach it


def _proc_table() -> dict[int, int]:
    """pid -> parent pid of every process visible here."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry, "rb") as f:
                    stat = f.read()
                table[int(entry)] = int(stat[stat.rindex(b")") + 2:].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    return table


def _descendants(root: int, table: dict[int, int]) -> set[int]:
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, parent in table.items() if parent in frontier and pid not in found}
        found |= frontier
    return found


def _kill_new(root: int, before: set[int]) -> None:
    """SIGKILL every descendant of `root` that did not exist before the command (repeat: forks race)."""
    for _ in range(20):
        victims = _descendants(root, _proc_table()) - before
        if not victims:
            return
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        _reap()
        time.sleep(0.02)


def _reap(keep: tuple[int, ...] = ()) -> None:
    """As PID 1, collect orphans that exited (never the children Popen is waiting for)."""
    if os.getpid() != 1:
        return
    for pid, parent in _proc_table().items():
        if parent == 1 and pid not in keep:
            try:
                with open("/proc/%d/stat" % pid, "rb") as f:
                    zombie = f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
                if zombie:
                    os.waitpid(pid, os.WNOHANG)
            except (OSError, ChildProcessError, IndexError):
                continue


class Reader:
    """Reads a pipe with a deadline, keeping at most `cap` bytes (plus slack to find a sentinel)."""

    def __init__(self, fd: int, cap: int):
        self.fd, self.cap = fd, cap
        self.data = bytearray()
        self.dropped = 0
        self.eof = False

    def read(self, until: float, stop=None):
        """Read until EOF, `until` (monotonic time) or `stop(data, start)` returns a match."""
        while not self.eof:
            remaining = until - time.monotonic()
            if remaining <= 0:
                return None
            ready, _, _ = select.select([self.fd], [], [], min(remaining, 0.5))
            if not ready:
                _reap()
                continue
            chunk = os.read(self.fd, 65536)
            if not chunk:
                self.eof = True
                break
            start = max(0, len(self.data) - MARK_SLACK)
            self.data += chunk
            if stop is not None:
                found = stop(self.data, start)
                if found:
                    return found
            if len(self.data) > self.cap + 2 * MARK_SLACK:
                self.dropped += len(self.data) - self.cap - MARK_SLACK
                self.data = self.data[:self.cap] + self.data[-MARK_SLACK:]
        return None

    def text(self, end: int | None = None) -> tuple[str, bool]:
        body = bytes(self.data[:end] if end is not None else self.data)
        truncated = bool(self.dropped) or len(body) > self.cap
        return body[:self.cap].decode("utf-8", "replace"), truncated


class Shell:
    """The episode's persistent bash. Commands are written to a file and sourced with stdin from
    /dev/null, then a sentinel line carries the exit status, so a command cannot desynchronise the
    protocol (unclosed quotes stay inside the file, reads of stdin get EOF)."""

    def __init__(self):
        self.proc = None
        self.token = CONFIG["token"]
        self.mark = re.compile(b"\n" + self.token.encode() + b" (\\d+)\n")
        self.path = os.path.join(CONFIG["workdir"], "cmd")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["/bin/bash", "--login", "-s"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, cwd=CONFIG["cwd"], env=CONFIG["env"], preexec_fn=_limits)

    def run(self, cmd: str, timeout: float) -> dict:
        restarted = self.proc is not None and not self.alive()  # the last command ended the shell
        if restarted:
            self.proc.wait()
        if not self.alive():
            self.start()
        with open(self.path, "w") as f:
            f.write(cmd + "\n")
        before = set(_proc_table())
        line = ". %s < /dev/null; printf '\\n%s %%d\\n' \"$?\"\n" % (self.path, self.token)
        reader = Reader(self.proc.stdout.fileno(), CONFIG["max_output_bytes"])
        try:
            self.proc.stdin.write(line.encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        found = reader.read(time.monotonic() + timeout, lambda data, start: self.mark.search(data, start))
        timed_out = found is None and not reader.eof
        if timed_out:  # kill what the command started; a loop in the shell itself needs the shell killed
            _kill_new(self.proc.pid, before)
            found = reader.read(time.monotonic() + 2, lambda data, start: self.mark.search(data, start))
        if found is None:
            if self.alive():
                self.proc.kill()
            self.proc.wait()
            output, truncated = reader.text()
            return {"output": output, "exit_code": None, "timed_out": timed_out, "truncated": truncated,
                    "shell_restarted": restarted}
        output, truncated = reader.text(found.start())
        return {"output": output, "exit_code": int(found.group(1)), "timed_out": timed_out,
                "truncated": truncated, "shell_restarted": restarted}


def run_exec(argv: list, timeout: float) -> dict:
    """An independent process (AgentBench's `execute_independent`): fresh environment, cwd /."""
    before = set(_proc_table())
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            cwd="/", env=CONFIG["env"], preexec_fn=_limits)
    reader = Reader(proc.stdout.fileno(), CONFIG["max_output_bytes"])
    deadline = time.monotonic() + timeout
    # A background process it started may hold the pipe open: stop reading once the process exits.
    while proc.poll() is None and time.monotonic() < deadline:
        reader.read(min(deadline, time.monotonic() + 0.1))
        if reader.eof:
            break
    timed_out = proc.poll() is None and not _wait(proc, deadline)
    if timed_out:
        _kill_new(proc.pid, before)
        proc.kill()
    proc.wait()
    reader.read(time.monotonic() + 0.05)
    proc.stdout.close()
    output, truncated = reader.text()
    return {"output": output, "exit_code": None if timed_out else proc.returncode, "timed_out": timed_out,
            "truncated": truncated, "shell_restarted": False}


def _wait(proc, deadline: float) -> bool:
    try:
        proc.wait(max(0.0, deadline - time.monotonic()))
        return True
    except subprocess.TimeoutExpired:
        return False


def serve(config: dict, requests, replies) -> None:
    CONFIG.update(config)
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # as PID 1, a default disposition makes it unkillable
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    os.makedirs(CONFIG["workdir"], mode=0o700, exist_ok=True)
    shell = Shell()
    replies.write(json.dumps({"ready": True}) + "\n")
    replies.flush()
    for line in requests:
        request = json.loads(line)
        op = request["op"]
        try:
            if op == "shell":
                reply = shell.run(request["cmd"], request["timeout"])
            elif op == "exec":
                reply = run_exec(request["argv"], request["timeout"])
            else:
                reply = {"output": "", "exit_code": 0, "timed_out": False, "truncated": False, "shell_restarted": False}
        except OSError as err:  # e.g. the sandbox's filesystem is full: the command cannot even be written
            reply = {"output": "%s: %s\n" % (op, err.strerror or err), "exit_code": None, "timed_out": False,
                     "truncated": False, "shell_restarted": False}
        _reap(keep=(shell.proc.pid,) if shell.proc else ())
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


if __name__ == "__main__":  # started by sandbox.BOOT: source, then config, then requests on stdin
    serve(json.loads(sys.stdin.readline()), sys.stdin, sys.stdout)
