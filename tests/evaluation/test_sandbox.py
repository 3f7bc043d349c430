"""The sandbox: hostile programs are contained with the right verdict and the host is unharmed; honest ones pass."""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

from backend.evaluation.sandbox import SandboxConfig, SandboxUnavailable, check_sandbox, run_python

REPO = Path(__file__).resolve().parents[2]


def _processes_mentioning(token: str, *, skip_bwrap: bool = False) -> list[int]:
    """Host PIDs whose command line contains `token` (sandboxed processes are visible from the host)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if skip_bwrap and cmdline.split(b"\0")[0].endswith(b"bwrap"):
            continue
        if token.encode() in cmdline:
            found.append(int(entry.name))
    return found


def _run(code: str, **kwargs: object) -> object:
    return run_python(textwrap.dedent(code), **kwargs)  # type: ignore[arg-type]


# Honest programs.


def test_honest_program_output_stdin_and_exit_code() -> None:
    result = run_python(
        "import sys\nname = input()\nprint(f'hello {name}')\nprint('warn', file=sys.stderr)\nsys.exit(3)",
        stdin="world\n",
    )
    assert result.exit_code == 3
    assert result.stdout == "hello world\n"
    assert result.stderr == "warn\n"
    assert result.stopped_reason is None
    assert not result.ok


def test_honest_program_succeeds_and_an_exception_fails() -> None:
    good = run_python("print(sum(range(10)))")
    assert good.ok and good.stdout == "45\n" and good.exit_code == 0
    bad = run_python("raise ValueError('boom')")
    assert bad.exit_code == 1 and bad.stopped_reason is None
    assert "ValueError: boom" in bad.stderr


def test_honest_program_can_use_tmp_threads_and_subprocess_friendly_stdlib() -> None:
    result = _run(
        """
        import json, tempfile, threading, os
        path = os.path.join(tempfile.gettempdir(), "scratch.json")
        with open(path, "w") as handle:
            json.dump({"ok": True}, handle)
        results = []
        threads = [threading.Thread(target=results.append, args=(i,)) for i in range(4)]
        [t.start() for t in threads]; [t.join() for t in threads]
        print(json.load(open(path))["ok"], sorted(results))
        """
    )
    assert result.ok, result.stderr
    assert result.stdout == "True [0, 1, 2, 3]\n"


# The network.


def test_network_is_unreachable_and_host_listener_gets_nothing() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    port = server.getsockname()[1]
    result = _run(
        f"""
        import socket
        for address in [("127.0.0.1", {port}), ("1.1.1.1", 80), ("8.8.8.8", 53)]:
            try:
                socket.create_connection(address, timeout=2).send(b"hi")
                print("connected", address)
            except OSError as error:
                print("refused", address, error.errno)
        """
    )
    try:
        with pytest.raises(TimeoutError):
            server.accept()
    finally:
        server.close()
    assert "connected" not in result.stdout
    assert result.stdout.count("refused") == 3
    assert "101" in result.stdout  # ENETUNREACH for the outside world


# The filesystem.


def test_writes_to_root_etc_home_and_libraries_fail_and_the_host_is_unchanged(tmp_path: Path) -> None:
    home = Path(os.environ.get("HOME", "/root"))
    targets = ["/evil", "/etc/evil", str(home / "evil"), "/usr/lib/evil", str(tmp_path / "evil")]
    result = _run(
        f"""
        for path in {targets!r}:
            try:
                open(path, "w").write("owned")
                print("wrote", path)
            except OSError as error:
                print("denied", path, type(error).__name__)
        """
    )
    assert result.ok, result.stderr
    assert "wrote" not in result.stdout
    assert result.stdout.count("denied") == len(targets)
    assert not any(Path(path).exists() for path in targets)


def test_only_the_interpreter_and_libraries_are_visible() -> None:
    result = _run(
        """
        import os
        print(sorted(os.listdir("/")))
        print(os.path.exists("/etc/passwd"), os.path.exists("/home"), os.path.exists("/var"), os.path.exists("/work"))
        print(os.listdir("/tmp"))
        """
    )
    assert result.ok, result.stderr
    top, hidden, tmp = result.stdout.splitlines()
    assert set(eval(top)) <= {"dev", "lib", "lib64", "proc", "sandbox", "tmp", "usr", "root", "bin", "opt"}
    assert hidden == "False False False False"
    assert tmp == "[]"


def test_service_data_dir_database_models_and_repo_are_not_readable(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    (data_dir / "files").mkdir(parents=True)
    (data_dir / "safetrain.db").write_text("SECRET-DATABASE-ROW")
    models = tmp_path / "models" / "tiny"
    models.mkdir(parents=True)
    (models / "config.json").write_text("SECRET-MODEL-CONFIG")
    targets = [data_dir / "safetrain.db", models / "config.json", REPO / "pyproject.toml", Path("/etc/shadow")]
    result = _run(
        f"""
        for path in {[str(t) for t in targets]!r}:
            try:
                print("read", open(path).read())
            except OSError as error:
                print("denied", path, type(error).__name__)
        """
    )
    assert result.ok, result.stderr
    assert "SECRET" not in result.stdout and "read" not in result.stdout
    assert result.stdout.count("denied") == len(targets)


# Processes and the environment.


def test_service_environment_and_host_init_are_not_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAFETRAIN_SECRET_KEY", "TOP-SECRET-VALUE")
    result = _run(
        """
        import os
        print(dict(os.environ))
        for name in ("environ", "cmdline"):
            try:
                print(name, open(f"/proc/1/{name}", "rb").read())
            except OSError as error:
                print(name, "denied", error.errno)
        print("pids", sorted(int(p) for p in os.listdir("/proc") if p.isdigit()))
        """
    )
    assert result.ok, result.stderr
    assert "TOP-SECRET-VALUE" not in result.stdout + result.stderr
    assert "SAFETRAIN" not in result.stdout
    environment = eval(result.stdout.splitlines()[0])
    assert set(environment) <= {"PATH", "LANG", "HOME", "TMPDIR", "PWD", "PYTHONDONTWRITEBYTECODE", "PYTHONIOENCODING"}
    lines = result.stdout.splitlines()
    init_environ = eval(lines[1].removeprefix("environ "))
    init_cmdline = eval(lines[2].removeprefix("cmdline "))
    assert init_environ == b""  # the sandbox's PID 1 is bwrap's reaper, started with an empty environment
    assert init_cmdline.split(b"\0")[0].endswith(b"bwrap") and init_cmdline != Path("/proc/1/cmdline").read_bytes()
    # A fresh PID namespace: bwrap's reaper is PID 1 and the program is PID 2; nothing of the host's is listed.
    assert result.stdout.splitlines()[-1] == "pids [1, 2]"


def test_fork_bomb_is_stopped_by_the_process_limit_and_the_host_is_fine() -> None:
    result = _run(
        """
        import os
        while True:
            os.fork()
        """,
        timeout_s=5,
        max_processes=16,
    )
    assert result.stopped_reason == "process_limit"
    assert result.exit_code != 0
    assert result.duration_s < 6.5
    assert _processes_mentioning("/sandbox/main.py") == []
    assert subprocess.run(["true"], check=False).returncode == 0


def test_persistent_fork_bomb_never_exceeds_the_limit_and_is_killed_at_the_deadline() -> None:
    """A bomb that swallows the fork errors keeps trying until the wall clock; the host counts its processes."""
    peak = 0
    running = threading.Event()
    running.set()

    def count_sandbox_processes() -> None:
        nonlocal peak
        while running.is_set():
            peak = max(peak, len(_processes_mentioning("/sandbox/main.py", skip_bwrap=True)))
            time.sleep(0.05)

    sampler = threading.Thread(target=count_sandbox_processes)
    sampler.start()
    try:
        result = _run(
            """
            import os
            while True:
                try:
                    os.fork()
                except OSError:
                    pass
            """,
            timeout_s=2,
            max_processes=8,
        )
    finally:
        running.clear()
        sampler.join()
    assert result.stopped_reason == "timeout" and result.exit_code is None
    assert result.duration_s < 3.5
    assert 2 <= peak <= 8  # the bomb did fork, and never past the limit
    assert _processes_mentioning("/sandbox/main.py") == []
    assert subprocess.run(["true"], check=False).returncode == 0


def test_threads_count_against_the_process_limit() -> None:
    result = _run(
        """
        import threading, time
        threads = []
        for _ in range(100):
            thread = threading.Thread(target=time.sleep, args=(1,))
            thread.start()
            threads.append(thread)
        """,
        max_processes=8,
    )
    assert result.stopped_reason == "process_limit"


def test_allocating_ten_gib_is_stopped_by_the_memory_limit() -> None:
    result = run_python("block = bytearray(10 * 1024**3)\nprint('allocated')", memory_mb=256)
    assert result.stopped_reason == "memory"
    assert "allocated" not in result.stdout
    assert "MemoryError" in result.stderr


def test_endless_loop_is_killed_at_the_wall_clock() -> None:
    started = time.monotonic()
    result = run_python("while True:\n    pass", timeout_s=1.0)
    elapsed = time.monotonic() - started
    assert result.stopped_reason == "timeout"
    assert result.exit_code is None
    assert 1.0 <= result.duration_s < 3.0 and elapsed < 4.0  # killed near its 1 s limit, not left to loop


def test_sleeping_program_is_killed_at_the_wall_clock_although_it_uses_no_cpu() -> None:
    result = run_python("import time\ntime.sleep(60)", timeout_s=1.0)
    assert result.stopped_reason == "timeout" and result.duration_s < 2.0


def test_catastrophic_regex_backtracking_times_out() -> None:
    result = run_python("import re\nre.match(r'(a+)+$', 'a' * 64 + 'b')\nprint('done')", timeout_s=1.0)
    assert result.stopped_reason == "timeout"
    assert "done" not in result.stdout


@pytest.mark.parametrize(
    "attack",
    [
        "import posix\nprint(posix.system('touch {marker}; echo pwned > {marker}'))",
        "import os\nprint(os.system('touch {marker}'))",
        "import ctypes\nlibc = ctypes.CDLL(None)\nprint(libc.system(b'touch {marker}'))\n"
        "fd = libc.open(b'{marker}', 0o101, 0o644)\nprint(fd, ctypes.get_errno())",
        "import importlib, os\nos = importlib.reload(os)\nos.system('touch {marker}')\n"
        "fd = os.open('{marker}', os.O_CREAT | os.O_WRONLY)",
        "import subprocess\nsubprocess.run(['/bin/sh', '-c', 'touch {marker}'])",
    ],
    ids=["posix.system", "os.system", "ctypes", "importlib.reload", "subprocess"],
)
def test_escape_attempts_stay_inside(tmp_path: Path, attack: str) -> None:
    marker = tmp_path / "escaped"
    result = run_python(attack.format(marker=marker))
    assert not marker.exists()
    assert result.stopped_reason is None or result.stopped_reason == "killed"


def test_background_process_does_not_outlive_the_sandbox(tmp_path: Path) -> None:
    marker = tmp_path / "survivor"
    token = f"safetrain-survivor-{os.getpid()}-{time.monotonic_ns()}"
    result = _run(
        f"""
        import os, sys, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                code = "print('survivor started', flush=True); import time; time.sleep(2); open({str(marker)!r}, 'w')"
                os.execv(sys.executable, [sys.executable, "-c", code, {token!r}])
            os._exit(0)
        time.sleep(0.5)
        print("parent done")
        """
    )
    assert result.ok, result.stderr
    assert result.stdout.splitlines() == ["survivor started", "parent done"]  # it really was running
    assert _processes_mentioning(token) == []
    time.sleep(2.5)
    assert not marker.exists()
    assert _processes_mentioning(token) == []


def test_gigabytes_of_output_are_cut_at_the_limit_with_bounded_memory() -> None:
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = _run(
        """
        import sys
        block = b"x" * (1 << 20)
        for _ in range(4096):
            sys.stdout.buffer.write(block)
        """,
        max_output_bytes=256 * 1024,
    )
    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert result.stopped_reason == "output_limit"
    assert result.stdout_truncated and len(result.stdout) == 256 * 1024
    assert result.duration_s < 5
    assert (peak_after - peak_before) < 64 * 1024  # KiB: the 4 GiB never passed through this process's memory


def test_stderr_flood_is_cut_too() -> None:
    result = run_python("import sys\nwhile True:\n    sys.stderr.write('e' * 4096)", max_output_bytes=64 * 1024)
    assert result.stopped_reason == "output_limit" and result.stderr_truncated
    assert len(result.stderr) == 64 * 1024


def test_gpu_devices_are_absent() -> None:
    result = _run(
        """
        import glob, os
        print(glob.glob("/dev/nvidia*"), glob.glob("/dev/dri/*"))
        try:
            os.open("/dev/nvidia0", os.O_RDWR)
        except OSError as error:
            print("denied", error.errno)
        print(sorted(os.listdir("/dev")))
        """
    )
    assert result.ok, result.stderr
    globbed, denied, listing = result.stdout.splitlines()
    assert globbed == "[] []" and denied == "denied 2"
    assert set(eval(listing)) <= {
        "console", "core", "fd", "full", "null", "ptmx", "pts", "random", "shm", "stderr", "stdin", "stdout",
        "tty", "urandom", "zero",
    }


def test_tmp_and_dev_shm_are_size_capped_and_dev_is_read_only() -> None:
    result = _run(
        """
        import os
        for folder in ("/tmp", "/dev/shm"):
            written = 0
            try:
                with open(os.path.join(folder, "fill"), "wb") as handle:
                    while written < 1 << 30:
                        handle.write(b"x" * (1 << 20))
                        written += 1 << 20
            except OSError as error:
                print(folder, "stopped", written >> 20, error.errno)
            os.remove(os.path.join(folder, "fill"))
        try:
            open("/dev/evil", "w")
        except OSError as error:
            print("/dev denied", error.errno)
        """,
        memory_mb=256,
    )
    lines = result.stdout.splitlines()
    assert lines[0].startswith("/tmp stopped") and int(lines[0].split()[2]) <= 64
    assert lines[1].startswith("/dev/shm stopped") and int(lines[1].split()[2]) <= 64
    assert lines[2] == "/dev denied 30"


def test_concurrent_runs_are_independent() -> None:
    results: dict[int, object] = {}

    def work(index: int) -> None:
        results[index] = run_python(f"print({index} * 2)")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    [thread.start() for thread in threads]
    [thread.join() for thread in threads]
    assert {i: r.stdout for i, r in results.items()} == {i: f"{i * 2}\n" for i in range(4)}  # type: ignore[attr-defined]


# Failing closed.


def test_refuses_when_the_configured_bwrap_is_missing() -> None:
    with pytest.raises(SandboxUnavailable, match="bwrap was not found at /nonexistent/bwrap"):
        run_python("print('ran')", config=SandboxConfig(bwrap="/nonexistent/bwrap"))


def test_refuses_when_bwrap_is_not_on_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SandboxUnavailable, match="bwrap was not found on PATH"):
        run_python("print('ran')")


def test_refuses_when_bwrap_does_not_confirm_the_sandbox() -> None:
    """A 'bwrap' that runs without setting up isolation never reports a sandbox, so its output is refused."""
    with tempfile.TemporaryDirectory(dir="/tmp") as folder:
        os.chmod(folder, 0o777)  # reachable by the unprivileged uid the sandbox starts as under root
        marker = Path(folder) / "ran-unconfined"
        impostor = Path(folder) / "bwrap"
        impostor.write_text(f"#!/bin/sh\necho unconfined > {marker}\necho 'bwrap: no namespaces here' >&2\nexit 0\n")
        impostor.chmod(0o755)
        with pytest.raises(SandboxUnavailable, match="no namespaces here"):
            run_python("print('ran')", config=SandboxConfig(bwrap=str(impostor)))
        assert marker.read_text() == "unconfined\n"  # it did run, and its result was still not accepted


def test_refuses_without_a_usable_interpreter() -> None:
    with pytest.raises(SandboxUnavailable, match="no Python interpreter"):
        run_python("print('ran')", config=SandboxConfig(python="/nonexistent/python3"))


def test_check_sandbox_passes_here() -> None:
    check_sandbox()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start the service as another user")
def test_non_root_service_gets_the_same_isolation() -> None:
    """The service running as an ordinary user: the user namespace is unprivileged and the limits still hold."""
    code = textwrap.dedent(
        """
        import os, sys
        from backend.evaluation.sandbox import run_python
        bomb = run_python("import os\\nwhile True:\\n    os.fork()", timeout_s=5, max_processes=8)
        honest = run_python("import os; print(os.getuid())")
        print(os.getuid(), bomb.stopped_reason, honest.stdout.strip(), honest.ok)
        """
    )
    completed = subprocess.run(
        ["/usr/bin/python3", "-c", code], cwd=REPO, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
        user=65534, group=65534, extra_groups=[], capture_output=True, text=True, timeout=60,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.split() == ["65534", "process_limit", "65534", "True"]
    assert sys.executable  # the parent test process is untouched


def test_sandbox_dies_with_the_service_that_started_it() -> None:
    """A worker killed mid-evaluation (OOM killer, SIGKILL) leaves no sandboxed process behind."""
    service_code = (
        "from backend.evaluation.sandbox import run_python\n"
        "run_python('import time\\ntime.sleep(60)', timeout_s=60)\n"
    )
    service = subprocess.Popen(
        [sys.executable, "-c", service_code], cwd=REPO, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    )
    try:
        deadline = time.monotonic() + 20
        while not _processes_mentioning("/sandbox/main.py", skip_bwrap=True) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _processes_mentioning("/sandbox/main.py", skip_bwrap=True), "the sandbox never started"
    finally:
        service.kill()
        service.wait()
    deadline = time.monotonic() + 5
    while _processes_mentioning("/sandbox/main.py") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _processes_mentioning("/sandbox/main.py") == []
