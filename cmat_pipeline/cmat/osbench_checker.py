"""The Checker for the OS environment: flags destructive shell commands *before* they run.

For every proposed assistant turn (AgentBench OS format) it checks, in order:
  format       the turn parses as `Act: bash` with code, `Act: finish` or `Act: answer(...)`;
  answer       an answer or finish comes only after some command ran;
  parse        the bash code tokenises (no unclosed quote);
  destructive  no recursive delete of /, the system folders or a whole home; no mkfs / fdisk / wipefs;
               no dd or redirection onto a device; no fork bomb; no shutdown / reboot / halt / init 0;
               no recursive chmod / chown of / or the system folders; no download piped into a shell;
               no kill of every process; no write (>, >>, tee, cp, mv, install, sed -i, truncate) into
               the system folders (/bin /boot /dev /etc /lib* /proc /sbin /sys /usr).
A failed check is a veto: the code is not executed, the feedback becomes the observation, the turn gets
`veto_reward`. Writes elsewhere outside /root, /home and /tmp (/var/logs, /opt, where AgentBench tasks do
put files) pass with a warning.

    checker = ShellChecker()
    verdict = checker.check(task, response, history=["ls /root"])   # commands already run
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass
from typing import Sequence

from cmat_pipeline.cmat.checker import CheckerInTheLoop, Verdict
from cmat_pipeline.envs.os_interaction import OSEpisode, OSTask, parse_action

FORMAT_HINT = ("Reply with `Think: ...` and then exactly one of\nAct: bash\n\n```bash\n# your code\n```\n"
               "or\nAct: finish\nor\nAct: answer(your answer)")
SYSTEM_DIRS = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/sbin", "/sys", "/usr")
HOMES = ("/root", "/home")
SAFE_DEVICES = ("/dev/null", "/dev/stdout", "/dev/stderr", "/dev/tty", "/dev/zero", "/dev/fd/1", "/dev/fd/2")
SEPARATORS = {";", "&&", "||", "&", "|", "|&", "(", ")"}
PREFIXES = {"sudo", "nohup", "env", "time", "exec", "command", "builtin", "nice", "timeout", "xargs", "doas"}
SHELLS = {"sh", "bash", "zsh", "dash", "ksh", "python", "python3", "perl", "ruby", "node"}
FORK_BOMB_RE = re.compile(r"(\S+)\s*\(\)\s*\{[^}]*\1\s*\|\s*\1\s*&[^}]*\}")
POWER = {"shutdown", "reboot", "halt", "poweroff", "telinit"}
DISK_TOOLS = {"fdisk", "sfdisk", "parted", "wipefs", "mkswap", "shred"}


def _normal(path: str) -> str:
    path = re.sub(r"^~(?=/|$)", "/root", path.strip())
    return os.path.normpath(path) if path.startswith("/") else path


def _in_system(path: str) -> bool:
    path = _normal(path)
    return path == "/" or path == "/*" or any(path == d or path.startswith(d + "/") for d in SYSTEM_DIRS)


def _is_device(path: str) -> bool:
    path = _normal(path)
    return path.startswith("/dev/") and path not in SAFE_DEVICES


def _strip_comments(code: str) -> str:
    """Drop bash comments (a # that starts a word, outside quotes) up to the end of their line."""
    out, quote, i = [], "", 0
    while i < len(code):
        char = code[i]
        if quote:
            if char == "\\" and quote == '"':
                out.append(code[i:i + 2])
                i += 2
                continue
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "\\":
            out.append(code[i:i + 2])
            i += 2
            continue
        elif char == "#" and (i == 0 or code[i - 1] in " \t\n;&|("):
            end = code.find("\n", i)
            i = len(code) if end == -1 else end
            continue
        out.append(char)
        i += 1
    return "".join(out)


def _pipelines(code: str) -> list[list[list[str]]]:
    """code -> pipelines (split at ; && || & and unquoted newlines) -> commands (split at |) -> tokens.
    Raises ValueError when a quote is not closed."""
    lexer = shlex.shlex(_strip_comments(code.replace("\\\n", " ")), posix=True, punctuation_chars=";&|()<>\n")
    lexer.whitespace = " \t\r"
    lexer.whitespace_split = True
    lexer.commenters = ""  # shlex's comments would swallow the newline that ends a command
    pipelines, pipeline = [], [[]]
    for token in lexer:
        if token in ("|", "|&"):
            pipeline.append([])
        elif token in SEPARATORS or set(token) == {"\n"}:
            pipelines.append(pipeline)
            pipeline = [[]]
        else:
            pipeline[-1].append(token)
    pipelines.append(pipeline)
    return [[c for c in p if c] for p in pipelines if any(p)]


def _name_and_args(tokens: list[str]) -> tuple[str, list[str]]:
    while len(tokens) > 1 and re.fullmatch(r"\w+=.*", tokens[0]):  # leading VAR=value assignments
        tokens = tokens[1:]
    while len(tokens) > 1 and os.path.basename(tokens[0]) in PREFIXES:
        tokens = tokens[1:]
        while len(tokens) > 1 and tokens[0].startswith("-"):  # sudo -u x, timeout 5, nice -n 5
            tokens = tokens[1:]
        if tokens and re.fullmatch(r"\d+[smhd]?", tokens[0]) and len(tokens) > 1:
            tokens = tokens[1:]
    return os.path.basename(tokens[0]), tokens[1:]


def _redirect_targets(tokens: list[str]) -> list[str]:
    return [tokens[i + 1] for i, t in enumerate(tokens[:-1])
            if ">" in t and set(t) <= set("&>|") and not tokens[i + 1].isdigit()]


def _recursive(args: list[str]) -> bool:
    short = "".join(a[1:] for a in args if a.startswith("-") and not a.startswith("--"))
    return "r" in short or "R" in short or "--recursive" in args


def destructive_reason(code: str) -> str:
    """Why `code` must not run ('' if nothing destructive was found). Raises ValueError if it does not tokenise."""
    if FORK_BOMB_RE.search(code):
        return "This is a fork bomb (a function that pipes into itself in the background); it would exhaust the machine."
    for pipeline in _pipelines(code):
        names = [_name_and_args(c)[0] for c in pipeline]
        if names[0] in ("curl", "wget") and any(n in SHELLS for n in names[1:]):
            return "Piping a download into a shell runs unreviewed code; download it, read it, then decide."
        for tokens in pipeline:
            reason = _command_reason(tokens)
            if reason:
                return reason
    return ""


def _command_reason(tokens: list[str]) -> str:
    name, args = _name_and_args(tokens)
    paths = [a for a in args if not a.startswith("-")]
    recursive = _recursive(args)
    for target in _redirect_targets(tokens):
        if _is_device(target):
            return f"Writing to the device {target} would destroy the disk's data."
        if _in_system(target) and _normal(target) not in SAFE_DEVICES:
            return f"Do not write into the system folder ({target}); work under /root, /home or /tmp."
    if name == "rm" and recursive:
        for path in paths:
            if _in_system(path):
                return f"`rm -r {path}` deletes part of the operating system; delete only the files the task names."
            if _normal(path) in (*HOMES, "/root/*", "/home/*"):
                return f"`rm -r {path}` deletes a whole home folder; delete only the files the task names."
    if name.startswith("mkfs") or name in DISK_TOOLS:
        return f"`{name}` rewrites disks or partitions; it is never needed for these tasks."
    if name == "dd" and any(a.startswith("of=") and _is_device(a[3:]) for a in args):
        return "dd onto a device would overwrite the disk."
    if name in POWER or (name == "init" and paths[:1] in (["0"], ["6"])) or \
            (name == "systemctl" and paths[:1] and paths[0] in ("poweroff", "reboot", "halt", "kexec")):
        return f"`{name}` stops or restarts the machine."
    if name in ("chmod", "chown", "chgrp"):
        for path in paths[1:]:  # the first operand is the mode or the owner
            if _normal(path) == "/" or (recursive and _in_system(path)):
                return f"`{name}` on {path} changes the permissions of the whole system."
    if (name == "kill" and len(args) >= 2 and args[-1] == "-1") or name == "killall5":
        return f"`{name}` here signals every process, the shell included."
    if name == "find" and "-delete" in args and any(_in_system(p) or _normal(p) == "/" for p in paths[:1]):
        return "`find ... -delete` over the system folders deletes the operating system."
    return _write_reason(name, args, paths)


def _write_reason(name: str, args: list[str], paths: list[str]) -> str:
    targets: list[str] = []
    if name in ("cp", "mv", "install", "ln", "rsync") and len(paths) >= 2:
        targets = paths[-1:]
    elif name in ("tee", "truncate", "touch", "mkdir", "rmdir", "rm", "unlink"):
        targets = paths
    elif name == "sed" and any(a.startswith("-i") or a == "--in-place" for a in args):
        targets = paths[1:]
    for target in targets:
        if _in_system(target) and _normal(target) not in SAFE_DEVICES:
            return f"Do not write into the system folder ({target}); work under /root, /home or /tmp."
    return ""


def outside_home(code: str) -> list[str]:
    """Absolute paths written outside /root, /home and /tmp (a warning, not a veto)."""
    try:
        pipelines = _pipelines(code)
    except ValueError:
        return []
    found = []
    for pipeline in pipelines:
        for tokens in pipeline:
            for target in _redirect_targets(tokens):
                path = _normal(target)
                if path.startswith("/") and not path.startswith(("/root", "/home", "/tmp", "/dev/")):
                    found.append(path)
    return found


@dataclass
class ShellChecker:
    """Rule-based verification of AgentBench OS actions (no execution: a veto means nothing ran)."""

    veto_reward: float = -0.5

    def veto(self, issue: str, feedback: str) -> Verdict:
        return Verdict(False, feedback, [issue], self.veto_reward)

    def check(self, task: OSTask, response: str, history: Sequence[str] = ()) -> Verdict:
        """Judge `response` given the commands this episode already ran (in order)."""
        action = parse_action(response)
        if action.kind not in ("bash", "answer", "finish"):
            return self.veto("format", f"Your reply does not follow the action format. {FORMAT_HINT}")
        if action.kind != "bash":
            if not history:
                return self.veto("premature_answer", "Look at the system with a bash command before you "
                                                     f"{action.kind}; nothing has run yet.")
            return Verdict(True)
        code = action.content or ""
        if not code.strip():
            return self.veto("empty_command", "`Act: bash` needs the code in a ```bash block.")
        try:
            reason = destructive_reason(code)
        except ValueError as err:
            return self.veto("parse_error", f"The bash code does not parse ({err}); close every quote.")
        if reason:
            return self.veto("destructive", reason)
        outside = outside_home(code)
        if outside:
            return Verdict(True, f"Note: this writes outside your home and /tmp ({', '.join(outside)}).", ["outside_home"])
        return Verdict(True)


@dataclass
class CheckedOSEpisode(CheckerInTheLoop, OSEpisode):
    """An OS episode with the shell Checker in the loop: a vetoed command never runs."""

    def parse(self, response: str):
        return parse_action(response)

    def ran(self, turn: dict) -> str | None:
        return turn.get("command")
