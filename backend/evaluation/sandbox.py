"""Run untrusted Python in a bubblewrap sandbox with rlimits and a wall-clock kill; refuse where that is impossible.

Isolation comes from the operating system, never from Python-level guards:
- bubblewrap gives the program its own user, PID, network, IPC, UTS and cgroup namespaces, no further user
  namespaces, a fresh session (no terminal to inject into) and death with its parent;
- the filesystem is an empty read-only root with only /usr/lib(64), the interpreter and `prlimit` bound in
  read-only, a fresh /proc for the new PID namespace, a minimal /dev (null, zero, random, ...; no GPUs) and
  size-capped private tmpfs folders for /tmp and /dev/shm; the program itself arrives as a read-only file;
- the environment is cleared and rebuilt from a handful of harmless variables;
- `prlimit` sets CPU time, address space, process count, file size, open files and core size inside the new
  user namespace before the interpreter starts, so the process count is this sandbox's alone;
- when the service runs as root, `setpriv` starts bwrap as an unprivileged host uid (nobody by default), because
  the kernel never applies RLIMIT_NPROC to uid 0; the user namespace is then an unprivileged one, as for any user;
- a wall-clock deadline and output caps kill the sandbox's PID 1, which takes every process inside with it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Literal

Popen = subprocess.Popen[bytes]
StopReason = Literal["timeout", "memory", "output_limit", "process_limit", "file_size", "killed"]

SANDBOX_PROGRAM = "/sandbox/main.py"
SANDBOX_WORKDIR = "/tmp"
NOBODY = 65534
# bwrap reports a child killed by signal N as exit status 128 + N.
_SIGNAL_EXIT_BASE = 128
# How much of the end of stderr is kept (besides its capped head) to tell why a program died.
_STDERR_TAIL_BYTES = 4096
_READ_CHUNK = 65536
# A program's streams close when every process inside is gone; past this grace after the exit we stop waiting.
_DRAIN_GRACE_S = 1.0


class SandboxUnavailable(RuntimeError):
    """The isolation the sandbox needs cannot be set up here, so nothing was run."""


@dataclass(frozen=True)
class SandboxConfig:
    """Where the sandbox's tools are and whom it runs as; the defaults suit a Debian host or image."""

    bwrap: str | None = None  # bubblewrap binary; found on PATH when None
    prlimit: str | None = None  # util-linux prlimit; found on PATH when None
    setpriv: str | None = None  # util-linux setpriv, used to drop root; found on PATH when None
    python: str | None = None  # interpreter; this service's base interpreter or /usr/bin/python3 when None
    uid: int = NOBODY  # host uid the sandbox runs as when the service is root (ignored otherwise)
    gid: int = NOBODY
    tmpfs_mb: int = 64  # size of the private /tmp and /dev/shm, each


@dataclass(frozen=True)
class SandboxResult:
    """What one sandboxed run did: exit status, capped output, and why it was stopped, if it was."""

    exit_code: int | None  # the program's exit status (128 + N after signal N); None when the sandbox was killed
    stdout: str
    stderr: str
    stopped_reason: StopReason | None
    duration_s: float
    stdout_truncated: bool = False
    stderr_truncated: bool = False

    @property
    def ok(self) -> bool:
        """True when the program ran to completion and exited 0."""
        return self.exit_code == 0 and self.stopped_reason is None


@dataclass(frozen=True)
class _Interpreter:
    executable: str
    lib_dirs: tuple[str, ...]


@dataclass
class _Capture:
    limit: int
    head: bytearray = field(default_factory=bytearray)
    tail: bytearray = field(default_factory=bytearray)
    total: int = 0

    def add(self, chunk: bytes) -> None:
        room = self.limit - len(self.head)
        if room > 0:
            self.head += chunk[:room]
        self.total += len(chunk)
        self.tail = (self.tail + chunk)[-_STDERR_TAIL_BYTES:]

    @property
    def overflowed(self) -> bool:
        return self.total > self.limit

    def text(self) -> str:
        return bytes(self.head).decode("utf-8", errors="replace")


def run_python(
    source: str,
    *,
    stdin: str | bytes | None = None,
    timeout_s: float = 10.0,
    memory_mb: int = 512,
    max_output_bytes: int = 1024 * 1024,
    max_processes: int = 8,
    config: SandboxConfig | None = None,
) -> SandboxResult:
    """Run `source` as `__main__` in the sandbox; raise SandboxUnavailable instead of ever running it unconfined.

    `memory_mb` caps each process's address space and `max_processes` counts processes and threads together,
    so the program's memory is bounded by their product (4 GiB by default) plus the two tmpfs folders.
    """
    config = config or SandboxConfig()
    if timeout_s <= 0 or memory_mb <= 0 or max_output_bytes <= 0 or max_processes <= 0:
        raise ValueError("timeout_s, memory_mb, max_output_bytes and max_processes must be positive")
    command = _sandbox_command(config, timeout_s=timeout_s, memory_mb=memory_mb, max_processes=max_processes)
    program = source.encode("utf-8")
    stdin_data = stdin.encode("utf-8") if isinstance(stdin, str) else stdin
    stdin_fd = _memory_file(stdin_data, "stdin") if stdin_data else None
    program_fd = _memory_file(program, "program")
    status_read, status_write = os.pipe()
    try:
        argv = _with_fds(command, program_fd=program_fd, status_fd=status_write)
        process = _start(argv, config, stdin_fd, pass_fds=(program_fd, status_write))
    finally:
        # The child holds its own copies; ours would keep the status pipe open forever.
        os.close(program_fd)
        os.close(status_write)
        if stdin_fd is not None:
            os.close(stdin_fd)
    try:
        return _supervise(process, status_read, timeout_s=timeout_s, max_output_bytes=max_output_bytes)
    finally:
        os.close(status_read)


def check_sandbox(config: SandboxConfig | None = None) -> None:
    """Run a trivial program in the sandbox; raise SandboxUnavailable saying why if isolation does not work."""
    result = run_python("print('sandbox ok')", timeout_s=10.0, config=config)
    if result.stdout.strip() != "sandbox ok":
        raise SandboxUnavailable(f"the sandbox started but a trivial program failed: {result.stderr.strip()[-500:]}")


def sandbox_interpreter(config: SandboxConfig | None = None) -> str:
    """The interpreter the sandbox runs programs with (also the fair baseline for benchmarks)."""
    config = config or SandboxConfig()
    return _find_interpreter(config.python, _runs_as_other_uid(config)).executable


def _sandbox_command(config: SandboxConfig, *, timeout_s: float, memory_mb: int, max_processes: int) -> list[str]:
    bwrap = _find_tool(config.bwrap, "bwrap", "install the Debian package bubblewrap")
    prlimit = _find_tool(config.prlimit, "prlimit", "install the Debian package util-linux")
    interpreter = _find_interpreter(config.python, _runs_as_other_uid(config))
    tmpfs_bytes = str(config.tmpfs_mb * 1024 * 1024)
    cpu_s = math.ceil(timeout_s) + 1
    limits = [
        f"--cpu={cpu_s}:{cpu_s + 1}",
        f"--as={memory_mb * 1024 * 1024}",
        f"--nproc={max_processes}",
        f"--fsize={tmpfs_bytes}",
        "--nofile=64",
        "--core=0",
    ]
    return [
        bwrap,
        "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session",
        "--hostname", "sandbox",
        *_library_binds(),
        "--ro-bind", prlimit, "/usr/bin/prlimit",
        *_interpreter_binds(interpreter),
        "--proc", "/proc",
        "--dev", "/dev",
        "--size", tmpfs_bytes, "--tmpfs", "/dev/shm",
        "--size", tmpfs_bytes, "--tmpfs", SANDBOX_WORKDIR,
        "--dir", os.path.dirname(SANDBOX_PROGRAM),
        "--ro-bind-data", "{program_fd}", SANDBOX_PROGRAM,
        "--remount-ro", "/dev",
        "--remount-ro", "/",
        "--clearenv",
        "--setenv", "PATH", "/usr/bin:/bin",
        "--setenv", "LANG", "C.UTF-8",
        "--setenv", "HOME", SANDBOX_WORKDIR,
        "--setenv", "TMPDIR", SANDBOX_WORKDIR,
        "--setenv", "PYTHONDONTWRITEBYTECODE", "1",
        "--setenv", "PYTHONIOENCODING", "utf-8",
        "--chdir", SANDBOX_WORKDIR,
        "--json-status-fd", "{status_fd}",
        "--",
        "/usr/bin/prlimit", *limits, "--",
        interpreter.executable, "-I", "-S", SANDBOX_PROGRAM,
    ]


def _with_fds(command: list[str], *, program_fd: int, status_fd: int) -> list[str]:
    values = {"{program_fd}": str(program_fd), "{status_fd}": str(status_fd)}
    return [values.get(arg, arg) for arg in command]


def _start(argv: list[str], config: SandboxConfig, stdin_fd: int | None, *, pass_fds: tuple[int, ...]) -> Popen:
    if _runs_as_other_uid(config):
        # setpriv drops to the sandbox uid after exec; Popen(user=...) would fork the whole (large) parent
        # instead of vfork-ing it, which costs ~150 ms in a worker holding a model.
        setpriv = _find_tool(config.setpriv, "setpriv", "install the Debian package util-linux")
        argv = [setpriv, f"--reuid={config.uid}", f"--regid={config.gid}", "--clear-groups", "--", *argv]
    try:
        return subprocess.Popen(
            argv,
            stdin=stdin_fd if stdin_fd is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=pass_fds,
            env={},  # bwrap itself sees no service secrets either (its PID 1 shows its environment in /proc/1/environ)
            cwd="/",
            start_new_session=True,
        )
    except OSError as error:
        raise SandboxUnavailable(f"could not start bubblewrap ({argv[0]}): {error}") from error


def _supervise(process: Popen, status_read: int, *, timeout_s: float, max_output_bytes: int) -> SandboxResult:
    started = time.monotonic()
    stdout, stderr = _Capture(max_output_bytes), _Capture(max_output_bytes)
    status = bytearray()
    reason = _pump(process, stdout, stderr, status, status_read, deadline=started + timeout_s)
    exit_code = process.wait()
    duration = time.monotonic() - started
    child_pid, reported_exit = _parse_status(bytes(status))
    if child_pid is None:
        message = stderr.text().strip() or f"bwrap exited with status {exit_code}"
        raise SandboxUnavailable(f"bubblewrap could not set up the sandbox: {message}")
    final_exit = None if reason is not None else (reported_exit if reported_exit is not None else exit_code)
    return SandboxResult(
        exit_code=final_exit,
        stdout=stdout.text(),
        stderr=stderr.text(),
        stopped_reason=_classify(reason, final_exit, stderr),
        duration_s=duration,
        stdout_truncated=stdout.overflowed,
        stderr_truncated=stderr.overflowed,
    )


def _pump(
    process: Popen,
    stdout: _Capture,
    stderr: _Capture,
    status: bytearray,
    status_read: int,
    *,
    deadline: float,
) -> StopReason | None:
    """Read output and status until the streams close; kill the sandbox on timeout or overflow."""
    assert process.stdout is not None and process.stderr is not None
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ, stdout)
    selector.register(process.stderr, selectors.EVENT_READ, stderr)
    selector.register(status_read, selectors.EVENT_READ, status)
    reason: StopReason | None = None
    exited_at: float | None = None
    while any(key.data is not status for key in selector.get_map().values()):
        now = time.monotonic()
        if reason is None and now >= deadline:
            reason = "timeout"
            _kill_sandbox(process, status)
        if exited_at is None and process.poll() is not None:
            exited_at = now
        if exited_at is not None and now - exited_at > _DRAIN_GRACE_S:
            break
        wait = 0.1 if reason is not None else min(0.1, max(0.0, deadline - now))
        for key, _ in selector.select(timeout=wait):
            chunk = os.read(key.fd, _READ_CHUNK)
            if not chunk:
                selector.unregister(key.fileobj)
            elif key.data is status:
                status += chunk
            else:
                key.data.add(chunk)
                if reason is None and key.data.overflowed:
                    reason = "output_limit"
                    _kill_sandbox(process, status)
    selector.close()
    process.stdout.close()
    process.stderr.close()
    _read_remaining(status_read, status)
    if process.poll() is None:
        _kill_sandbox(process, status)
    return reason


def _read_remaining(fd: int, into: bytearray) -> None:
    os.set_blocking(fd, False)
    try:
        while chunk := os.read(fd, _READ_CHUNK):
            into += chunk
    except BlockingIOError:
        pass


def _kill_sandbox(process: Popen, status: bytearray) -> None:
    """SIGKILL the sandbox's PID 1 (the kernel then kills everything in its PID namespace) and bwrap itself."""
    child_pid, _ = _parse_status(bytes(status))
    if child_pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child_pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    # bwrap waits for its PID 1, whose exit waits until every process in the namespace is gone.
    process.wait()


def _parse_status(data: bytes) -> tuple[int | None, int | None]:
    """bwrap's --json-status-fd stream: {"child-pid": N, ...} once set up, {"exit-code": N} at the end."""
    child_pid: int | None = None
    exit_code: int | None = None
    decoder = json.JSONDecoder()
    text = data.decode("utf-8", errors="replace")
    index = 0
    while index < len(text):
        while index < len(text) and text[index].isspace():
            index += 1
        if index >= len(text):
            break
        try:
            document, index = decoder.raw_decode(text, index)
        except json.JSONDecodeError:
            break
        if isinstance(document, dict):
            child_pid = document.get("child-pid", child_pid)
            exit_code = document.get("exit-code", exit_code)
    return child_pid, exit_code


def _classify(killed_for: StopReason | None, exit_code: int | None, stderr: _Capture) -> StopReason | None:
    """Why the run stopped: the limit the program hit, else what the supervisor killed it for."""
    failed = killed_for is not None or exit_code != 0
    if not failed:
        return None
    tail = bytes(stderr.head[:_STDERR_TAIL_BYTES] + stderr.tail)
    if b"BlockingIOError: [Errno 11]" in tail or b"can't start new thread" in tail:
        return "process_limit"
    if killed_for is not None:
        return killed_for
    if exit_code == _SIGNAL_EXIT_BASE + signal.SIGXCPU:
        return "timeout"
    if exit_code == _SIGNAL_EXIT_BASE + signal.SIGXFSZ:
        return "file_size"
    last_line = stderr.tail.decode("utf-8", errors="replace").strip().splitlines()[-1:] or [""]
    if last_line[0].startswith("MemoryError") or exit_code == _SIGNAL_EXIT_BASE + signal.SIGSEGV:
        return "memory"
    if exit_code == _SIGNAL_EXIT_BASE + signal.SIGKILL:
        return "killed"
    return None


def _memory_file(data: bytes, name: str) -> int:
    """An anonymous in-memory file holding `data`, positioned at its start (nothing touches the disk)."""
    fd = os.memfd_create(f"safetrain-sandbox-{name}", os.MFD_CLOEXEC)  # only the bwrap child gets it (pass_fds)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _find_tool(configured: str | None, name: str, hint: str) -> str:
    path = configured or shutil.which(name)
    if not path or not os.path.isfile(path) or not os.access(path, os.X_OK):
        where = f"at {configured}" if configured else "on PATH"
        raise SandboxUnavailable(f"{name} was not found {where}; the sandbox refuses to run code without it ({hint})")
    return os.path.realpath(path)


def _runs_as_other_uid(config: SandboxConfig) -> bool:
    return os.geteuid() == 0 and config.uid != 0


def _find_interpreter(configured: str | None, as_other_uid: bool) -> _Interpreter:
    """The configured interpreter, else this service's base interpreter, else /usr/bin/python3."""
    base = getattr(sys, "_base_executable", sys.executable)
    candidates = [configured] if configured else [base, "/usr/bin/python3"]
    refused: list[str] = []
    for candidate in candidates:
        assert candidate is not None
        real = os.path.realpath(candidate)
        if not os.path.isfile(real):
            refused.append(f"{candidate}: not found")
            continue
        interpreter = _describe_interpreter(real)
        if interpreter is None:
            refused.append(f"{candidate}: does not run as Python")
            continue
        unreadable = [p for p in (real, *interpreter.lib_dirs) if as_other_uid and not _world_readable(p)]
        if unreadable:
            refused.append(f"{candidate}: {unreadable[0]} is not readable by the unprivileged sandbox user")
            continue
        return interpreter
    raise SandboxUnavailable("no Python interpreter usable inside the sandbox: " + "; ".join(refused))


@lru_cache(maxsize=8)
def _describe_interpreter(executable: str) -> _Interpreter | None:
    """Ask a trusted interpreter where its standard library and shared libraries live."""
    probe = "import sys,sysconfig;print(sysconfig.get_paths()['stdlib']);print(sysconfig.get_config_var('LIBDIR'))"
    try:
        answer = subprocess.run([executable, "-I", "-S", "-c", probe], capture_output=True, text=True,
                                timeout=30, env={}, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    stdlib, libdir = (answer.stdout.splitlines() + ["", ""])[:2]
    dirs = tuple(dict.fromkeys(d for d in (stdlib, libdir) if d and d != "None" and os.path.isdir(d)))
    return _Interpreter(executable=executable, lib_dirs=dirs)


def _world_readable(path: str) -> bool:
    """True when a uid with no groups can reach and read `path` (others' permission bits all the way down)."""
    current = Path(path)
    for parent in reversed(current.parents):
        if not os.stat(parent).st_mode & stat.S_IXOTH:
            return False
    return bool(os.stat(current).st_mode & stat.S_IROTH)


def _library_binds() -> list[str]:
    """Read-only /usr/lib and /usr/lib64, with /lib and /lib64 as the host has them (links or folders)."""
    args: list[str] = []
    for folder in ("/usr/lib", "/usr/lib64"):
        if os.path.isdir(folder):
            args += ["--ro-bind", folder, folder]
    for folder in ("/lib", "/lib64"):
        if os.path.islink(folder):
            args += ["--symlink", os.readlink(folder), folder]
        elif os.path.isdir(folder):
            args += ["--ro-bind", folder, folder]
    return args


def _interpreter_binds(interpreter: _Interpreter) -> list[str]:
    args = ["--ro-bind", interpreter.executable, interpreter.executable]
    for folder in interpreter.lib_dirs:
        if not _is_under(folder, "/usr/lib") and not _is_under(folder, "/usr/lib64"):
            args += ["--ro-bind", folder, folder]
    return args


def _is_under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")

