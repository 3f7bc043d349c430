"""Sandbox overhead: run_python against a plain subprocess running the same program with the same interpreter.

Both run `python -I -S program.py` with the interpreter the sandbox uses, capture stdout and stderr, and are
timed end to end (process start to exit, output collected), interleaved in the same run. The sandbox adds
bubblewrap's namespaces and mounts, prlimit's rlimits and the supervisor's capped reads. Then executions per
second with a few threads in parallel, for both. Target: at most 50 ms extra per execution.
Appends the numbers to benchmarks/RESULTS.md under "Sandbox overhead".

    python benchmarks/sandbox_overhead.py [--runs 40] [--seconds 5] [--no-record]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from api_common import append_results

from backend.evaluation.sandbox import run_python, sandbox_interpreter

PROGRAMS = {
    "empty": "pass\n",
    "humaneval-like": (
        "def is_even(n):\n    return n % 2 == 0\n\n"
        "def check(candidate):\n    for i in range(1000):\n        assert candidate(i) == (i % 2 == 0)\n\n"
        "check(is_even)\nprint('ok')\n"
    ),
}


def plain_runner(interpreter: str, folder: Path) -> Callable[[str], float]:
    def run(source: str) -> float:
        path = folder / f"program-{os.getpid()}-{time.monotonic_ns()}.py"
        started = time.perf_counter()
        path.write_text(source)
        subprocess.run([interpreter, "-I", "-S", str(path)], capture_output=True, check=True, env={})
        elapsed = time.perf_counter() - started
        path.unlink()
        return elapsed

    return run


def sandbox_run(source: str) -> float:
    started = time.perf_counter()
    result = run_python(source)
    elapsed = time.perf_counter() - started
    if not result.ok:
        raise RuntimeError(f"sandboxed run failed: {result.stderr[-500:]}")
    return elapsed


def latency(runs: int, plain: Callable[[str], float]) -> list[str]:
    lines = []
    for name, source in PROGRAMS.items():
        plain_times, sandbox_times = [], []
        for _ in range(3):  # warm the page cache and the interpreter probe
            plain(source), sandbox_run(source)
        for _ in range(runs):
            plain_times.append(plain(source))
            sandbox_times.append(sandbox_run(source))
        p50_plain, p50_sandbox = statistics.median(plain_times), statistics.median(sandbox_times)
        pairs = sorted(s - p for s, p in zip(sandbox_times, plain_times, strict=True))
        lines.append(
            f"- {name}: plain {p50_plain * 1000:.1f} ms, sandbox {p50_sandbox * 1000:.1f} ms (medians of {runs}, "
            f"interleaved); extra per execution: {(p50_sandbox - p50_plain) * 1000:.1f} ms median, "
            f"{(min(sandbox_times) - min(plain_times)) * 1000:.1f} ms best-vs-best, "
            f"{statistics.median(pairs) * 1000:.1f} ms median of paired differences (target <= 50 ms)"
        )
    return lines


def throughput(seconds: float, workers: int, run: Callable[[str], float]) -> float:
    source = PROGRAMS["humaneval-like"]
    deadline = time.monotonic() + seconds
    count = 0

    def loop() -> int:
        done = 0
        while time.monotonic() < deadline:
            run(source)
            done += 1
        return done

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        count = sum(pool.map(lambda _: loop(), range(workers)))
    return count / (time.monotonic() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40, help="Timed executions per program and runner.")
    parser.add_argument("--seconds", type=float, default=5.0, help="Length of each throughput measurement.")
    parser.add_argument("--no-record", action="store_true", help="Print only; do not append to RESULTS.md.")
    args = parser.parse_args()
    interpreter = sandbox_interpreter()
    with tempfile.TemporaryDirectory() as folder:
        plain = plain_runner(interpreter, Path(folder))
        load = os.getloadavg()[0]
        lines = [f"- interpreter: {interpreter} (both runners); cpus: {os.cpu_count()}; euid: {os.geteuid()}"]
        lines += latency(args.runs, plain)
        for workers in (1, 2, 4):
            sandboxed = throughput(args.seconds, workers, sandbox_run)
            unconfined = throughput(args.seconds, workers, plain)
            lines.append(
                f"- throughput with {workers} thread(s), humaneval-like: sandbox {sandboxed:.1f} exec/s, "
                f"plain {unconfined:.1f} exec/s"
            )
        lines.append(f"- load average (1 min) before/after: {load:.1f}/{os.getloadavg()[0]:.1f} (a shared machine)")
    print("\n".join(lines))
    if not args.no_record:
        append_results("Sandbox overhead", lines)


if __name__ == "__main__":
    main()
