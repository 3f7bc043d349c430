"""A 1 GiB dataset upload: throughput with validation, and how much the server's memory grows.

The client streams a generated JSONL (multipart, known Content-Length) from a generator, so neither side
ever holds the file; the server (one uvicorn process with safetrain's app, embedded SQLite) streams it to
disk, hashes it and validates every line. Targets: >= 100 MB/s, server RSS growth < 100 MiB.

The machine is shared, so wall-clock MB/s moves with everyone else's load: the output also gives the server's
CPU seconds (MB per server CPU second does not depend on the load) and the validator alone on the same lines,
in this process, as a baseline to compare runs by.

    python benchmarks/api_upload.py [--gib 1] [--line-bytes 700] [--record]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

# api_common sits beside this script (run as `python benchmarks/api_upload.py`: benchmarks/ is on sys.path).
from api_common import append_results, free_port, safetrain, stack_env, start_uvicorn, stop

from backend.training.datasets import DatasetValidator

BOUNDARY = "safetrain-benchmark-boundary"
MIB = 1024**2


def line_block(line_bytes: int = 700, target_bytes: int = MIB) -> tuple[bytes, int]:
    """About a MiB of distinct, valid chat lines of about `line_bytes` each; (block, number of lines)."""
    filler = max(1, line_bytes // 60)
    lines: list[bytes] = []
    size = 0
    while size < target_bytes:
        n = len(lines)
        question = f"Question {n}: what is {n} plus {n}? " + "Explain it step by step. " * filler
        answer = f"{n} plus {n} is {2 * n}. " + "Adding a number doubles it. " * filler
        row = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
        line = json.dumps(row).encode() + b"\n"
        lines.append(line)
        size += len(line)
    return b"".join(lines), len(lines)


def multipart(block: bytes, repeats: int) -> tuple[Iterator[bytes], int]:
    """A multipart/form-data body streamed from a generator, and its exact length."""
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n'
        "Content-Type: application/jsonl\r\n\r\n"
    ).encode()
    tail = f"\r\n--{BOUNDARY}--\r\n".encode()

    def body() -> Iterator[bytes]:
        yield head
        for _ in range(repeats):
            yield block
        yield tail

    return body(), len(head) + len(block) * repeats + len(tail)


def upload(port: int, key: str, block: bytes, repeats: int) -> tuple[dict[str, object], float]:
    """POST /v1/files with the generated body; (the FileObject, seconds)."""
    body, length = multipart(block, repeats)
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    headers = {
        "Authorization": f"Bearer {key}",
        "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
        "Content-Length": str(length),
    }
    started = time.perf_counter()
    connection.request("POST", "/v1/files", body=body, headers=headers)
    answer = connection.getresponse()
    payload = answer.read()
    seconds = time.perf_counter() - started
    connection.close()
    if answer.status != 200:
        raise RuntimeError(f"upload answered {answer.status}: {payload[:500]!r}")
    return json.loads(payload), seconds


def validator_alone(block: bytes, lines_per_block: int, repeats: int = 64) -> tuple[float, float]:
    """The validator by itself on `repeats` copies of the block: (MB per wall second, MB per CPU second)."""
    validator = DatasetValidator()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        validator.feed(block)
    summary = validator.finish()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert summary.n_examples == lines_per_block * repeats
    size = len(block) * repeats
    return size / wall / 1e6, size / cpu / 1e6


class PeakRss:
    """Samples a process tree's resident memory every 20 ms in a thread; remembers the peak."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = self.current()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process tree so far."""
        tree = [self.process, *self.process.children(recursive=True)]
        return sum(sum(p.cpu_times()[:2]) for p in tree)

    def current(self) -> int:
        tree = [self.process, *self.process.children(recursive=True)]
        return sum(p.memory_info().rss for p in tree)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.current())

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=1.0, help="upload size in GiB")
    parser.add_argument("--line-bytes", type=int, default=700, help="about how long each chat line is")
    parser.add_argument("--record", action="store_true", help="append the results to benchmarks/RESULTS.md")
    args = parser.parse_args()
    block, lines_per_block = line_block(args.line_bytes)
    alone_wall, alone_cpu = validator_alone(block, lines_per_block)
    load_before = os.getloadavg()[0]
    repeats = max(1, round(args.gib * 1024**3 / len(block)))
    with tempfile.TemporaryDirectory(prefix="safetrain-upload-") as tmp:
        work = Path(tmp)
        env = stack_env(work / "data", work / "models", max_upload_bytes=str(4 * 1024**3))
        safetrain(env, "migrate")
        key = safetrain(env, "keys", "create", "--project", "bench").strip()
        port = free_port()
        server = start_uvicorn("backend.api.app:create_app", port, env, work / "api.log")
        try:
            upload(port, key, block, 2)  # warm-up: every import and code path loaded before the baseline
            baseline = PeakRss(server.pid).current()
            with PeakRss(server.pid) as rss:
                cpu_before, client_before = rss.cpu_seconds(), time.process_time()
                uploaded, seconds = upload(port, key, block, repeats)
                server_cpu, client_cpu = rss.cpu_seconds() - cpu_before, time.process_time() - client_before
        finally:
            stop(server)
    load_after = os.getloadavg()[0]
    size = len(block) * repeats
    throughput = size / seconds / 1e6
    growth_mib = (rss.peak - baseline) / MIB
    examples = lines_per_block * repeats
    ok = (
        throughput >= 100 and growth_mib < 100 and uploaded.get("status") == "processed"
        and uploaded.get("n_examples") == examples and uploaded.get("bytes") == size
    )
    lines = [
        f"- upload: {size / 1024**3:.2f} GiB ({size} bytes, {examples} chat lines of {size // examples} bytes), "
        "streamed from a generator",
        f"- answer: status {uploaded.get('status')}, n_examples {uploaded.get('n_examples')}, "
        f"bytes {uploaded.get('bytes')}",
        f"- {seconds:.1f} s: {throughput:.0f} MB/s with validation (target >= 100); load average "
        f"{load_before:.1f} before, {load_after:.1f} after (2 cores shared with other work)",
        f"- server CPU {server_cpu:.1f} s: {size / server_cpu / 1e6:.0f} MB per server CPU second "
        f"(it had {server_cpu / seconds:.0%} of a core); client CPU {client_cpu:.1f} s",
        f"- validator alone on the same lines, this process: {alone_wall:.0f} MB/s wall, "
        f"{alone_cpu:.0f} MB per CPU second",
        f"- server RSS {baseline / MIB:.0f} MiB before, peak {rss.peak / MIB:.0f} MiB: growth {growth_mib:.1f} MiB "
        "(target < 100)",
        f"- {'PASS' if ok else 'FAIL'}",
    ]
    print("\n".join(lines))
    if args.record:
        append_results("API upload (benchmarks/api_upload.py)", lines)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
