"""One live deployment for the fault tests, whose parts the tests kill, restart and cut off for real.

`fault_stack` (once per package): a fresh PostgreSQL database reached through a TCP proxy this process
controls (so the database can be made unreachable without touching the shared server), Redis db 12 on the
real server, `safetrain api` (uvicorn) and a real Celery worker (tests/reliability/celery_worker.py), both
with a 1 s heartbeat and an 8 s heartbeat expiry, a tiny model, and an artifact store that is a 1 MiB tmpfs
(so one test can fill it). The test process reads the database directly (not through the proxy) and
watches the process table: `trainers_seen` counts, per job, how many trainer processes ever ran at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import redis
from sqlalchemy import Engine, select

from backend.config import Settings, get_settings
from backend.db.migrations import upgrade_to_head
from backend.db.models import Checkpoint, Job, JobEvent
from backend.db.session import make_engine, session_scope, set_engine
from tests.support.data import TRAIN_LINES
from tests.support.network import free_port
from tests.support.waiting import wait_for

POSTGRES_ADMIN_URL = os.environ.get("SAFETRAIN_RELIABILITY_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("SAFETRAIN_RELIABILITY_REDIS", "redis://127.0.0.1:6379/12")  # db 12: this suite's own
REDIS_PORT = 6379
REDIS_START = [
    "redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "-::1", "--port", str(REDIS_PORT), "--save", "",
    "--appendonly", "no", "--dir", "/var/lib/redis", "--logfile", "/var/log/redis/ci.log",
]
HEARTBEAT_SECONDS = 1
HEARTBEAT_EXPIRY_SECONDS = 8
ARTIFACT_STORE_BYTES = 1 << 20
CHILD_MODULE = "backend.workers.jobs.child"


class TcpProxy:
    """127.0.0.1:<port> → the target, until `cut()`: then every connection is dropped and new ones refused
    (accepted and closed at once) until `restore()`."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.open = True
        self.closed = False
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        threading.Thread(target=self._accept, name="db-proxy", daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.open:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets |= {client, upstream}
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                self._drop(sock)

    def _drop(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(sock)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            sock.close()

    def cut(self) -> None:
        """The database becomes unreachable: live connections break, new ones are refused."""
        self.open = False
        with self._lock:
            live = list(self._sockets)
        for sock in live:
            self._drop(sock)

    def restore(self) -> None:
        self.open = True

    def close(self) -> None:
        self.closed = True
        self.cut()
        self.listener.close()


@dataclass
class FaultStack:
    """The live deployment and the handles the fault tests pull."""

    root: Path
    settings: Settings
    engine: Engine
    env: dict[str, str]
    proxy: TcpProxy
    api_port: int
    api_key: str
    file_id: str = ""
    api: subprocess.Popen[bytes] | None = None
    worker: subprocess.Popen[bytes] | None = None
    trainers_seen: dict[str, int] = field(default_factory=dict)
    _watching: threading.Event = field(default_factory=threading.Event)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def data_dir(self) -> Path:
        return self.settings.data_dir

    def logs(self, chars: int = 3000) -> str:
        return "\n".join(f"--- {path.name}\n{path.read_text(errors='replace')[-chars:]}"
                         for path in sorted(self.root.glob("*.log")))

    def worker_log(self) -> str:
        return (self.root / "worker.log").read_bytes().decode(errors="replace")

    # -- processes -------------------------------------------------------------------------------------
    def start_api(self) -> None:
        log = open(self.root / "api.log", "ab")  # noqa: SIM115 - the child owns it until it exits
        self.api = subprocess.Popen(
            [sys.executable, "-m", "backend.cli", "api", "--host", "127.0.0.1", "--port", str(self.api_port)],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )

        def healthy() -> bool:
            assert self.api is not None and self.api.poll() is None, f"the API exited\n{self.logs()}"
            try:
                with urllib.request.urlopen(f"{self.base_url}/healthz", timeout=2) as answer:
                    return bool(answer.status == 200)
            except OSError:
                return False

        wait_for(healthy, 90, "the API's /healthz", logs=self.logs)

    def kill_api(self) -> None:
        """SIGKILL the API (uvicorn): no graceful shutdown, open streams are cut."""
        assert self.api is not None
        os.killpg(self.api.pid, signal.SIGKILL)
        self.api.wait()

    def start_worker(self, *, concurrency: int = 1, visibility_seconds: int | None = None) -> None:
        env = dict(self.env)
        if visibility_seconds is not None:
            env["RELIABILITY_VISIBILITY_SECONDS"] = str(visibility_seconds)
        log_path = self.root / "worker.log"
        offset = log_path.stat().st_size if log_path.exists() else 0
        log = open(log_path, "ab")  # noqa: SIM115
        self.worker = subprocess.Popen(
            [sys.executable, "-m", "tests.reliability.celery_worker", str(concurrency),
             f"reliability-{uuid.uuid4().hex[:6]}"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=Path(__file__).parents[2],
        )
        wait_for(lambda: " ready." in self.worker_log()[offset:], 90, "the worker to be ready", logs=self.logs)

    def stop_worker(self) -> None:
        """Warm shutdown (SIGTERM), as an operator stops a worker; what is left is killed."""
        if self.worker is None or self.worker.poll() is not None:
            return
        self.worker.send_signal(signal.SIGTERM)
        try:
            self.worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.worker.pid, signal.SIGKILL)
            self.worker.wait()

    def worker_tree(self) -> list[int]:
        assert self.worker is not None
        try:
            return [self.worker.pid, *(child.pid for child in psutil.Process(self.worker.pid).children(recursive=True))]
        except psutil.NoSuchProcess:
            return []

    # -- the API ---------------------------------------------------------------------------------------
    def http(self, timeout: float = 30) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers={"Authorization": f"Bearer {self.api_key}"},
                            timeout=timeout)

    def upload(self, lines: list[dict[str, Any]]) -> str:
        body = "".join(json.dumps(line) + "\n" for line in lines).encode()
        with self.http(timeout=120) as client:
            answer = client.post("/v1/files", files={"file": ("train.jsonl", body)}, data={"purpose": "fine-tune"})
        assert answer.status_code == 200, answer.text
        return str(answer.json()["id"])

    def submit(self, *, file_id: str | None = None, **training: Any) -> str:
        fields = {"use_lora": True, "lora_r": 4, "max_steps": 4, "logging_steps": 1, "max_seq_length": 64,
                  "save_steps": 1000, **training}
        with self.http() as client:
            answer = client.post("/v1/fine_tuning/jobs", json={
                "model": "tiny-gpt2", "training_file": file_id or self.file_id,
                "hyperparameters": {"n_epochs": 1, "batch_size": 2}, "training": fields,
            })
        assert answer.status_code == 200, answer.text
        return str(answer.json()["id"])

    def action(self, job_id: str, action: str) -> dict[str, Any]:
        with self.http() as client:
            answer = client.post(f"/v1/fine_tuning/jobs/{job_id}/{action}")
        assert answer.status_code == 200, answer.text
        return dict(answer.json())

    # -- watching trainers -----------------------------------------------------------------------------
    def watch_trainers(self) -> None:
        """Sample the process table every 50 ms: the most trainer processes seen at once, per job."""
        def sample() -> None:
            while not self._watching.wait(0.05):
                counts: dict[str, int] = {}
                for process in psutil.process_iter(["cmdline"]):
                    cmdline = process.info["cmdline"] or []
                    if CHILD_MODULE in cmdline and len(cmdline) > 3:
                        job_id = Path(cmdline[3]).parent.parent.name  # <data>/jobs/<job>/worker/attempt-N.spec.json
                        counts[job_id] = counts.get(job_id, 0) + 1
                for job_id, count in counts.items():
                    self.trainers_seen[job_id] = max(self.trainers_seen.get(job_id, 0), count)

        threading.Thread(target=sample, name="trainer-watch", daemon=True).start()


# -- database reads (direct, never through the proxy) -----------------------------------------------------
def load_job(job_id: str) -> Job:
    with session_scope() as session:
        job = session.scalar(select(Job).where(Job.id == job_id))
        assert job is not None
        session.expunge(job)
        return job


def events(job_id: str) -> list[JobEvent]:
    with session_scope() as session:
        rows = list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.seq)))
        session.expunge_all()
        return rows


def checkpoints(job_id: str) -> list[Checkpoint]:
    with session_scope() as session:
        rows = list(session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.seq)))
        session.expunge_all()
        return rows


def metric_steps(job_id: str, attempt: int | None = None) -> list[int]:
    return [int(event.data["step"]) for event in events(job_id)
            if event.type == "metrics" and event.data and (attempt is None or event.attempt == attempt)]


def trainer_starts(job_id: str) -> list[tuple[int, int]]:
    """(attempt, pid) of every trainer the job's attempts started."""
    return [(event.attempt, int(event.data["pid"])) for event in events(job_id)
            if event.message.startswith("Trainer started") and event.data]


def wait_finished(stack: FaultStack, job_id: str, timeout: float = 120, done: tuple[str, ...] = (
        "succeeded", "failed", "cancelled", "paused")) -> Job:
    def finished() -> Job | None:
        job = load_job(job_id)
        return job if job.status in done else None

    job: Job = wait_for(finished, timeout, f"job {job_id} to reach {done}", logs=stack.logs)
    return job


def assert_attempts_never_overlap(job_id: str) -> None:
    """In the order they were written, a job's events never go back to an older attempt: once attempt n+1
    wrote, attempt n wrote nothing more (two attempts never ran at once)."""
    attempts = [event.attempt for event in events(job_id)]
    assert attempts == sorted(attempts), attempts


def redis_down_then_up(down_seconds: float) -> float:
    """Stop the real Redis server (no save: every queued message is lost) and start it again; its downtime."""
    subprocess.run(["redis-cli", "-p", str(REDIS_PORT), "shutdown", "nosave"], capture_output=True, timeout=10)
    stopped = time.monotonic()
    try:
        wait_for(lambda: not _redis_answers(), 10, "Redis to stop", interval=0.05)
        time.sleep(down_seconds)
    finally:
        start_redis()
    return time.monotonic() - stopped


def start_redis() -> None:
    if not _redis_answers():
        subprocess.run(REDIS_START, capture_output=True, timeout=10)
        wait_for(_redis_answers, 10, "Redis to start", interval=0.05)


def _redis_answers() -> bool:
    """PING answered (a raw socket: redis-py's client retries a refused connection with backoff)."""
    try:
        with socket.create_connection(("127.0.0.1", REDIS_PORT), timeout=0.5) as connection:
            connection.sendall(b"PING\r\n")
            return connection.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture(scope="package")
def fault_stack() -> Iterator[FaultStack]:
    from backend.services.keys import create_key_for_project_name
    from backend.training.tiny_models import make_tiny_model

    start_redis()
    root = Path(tempfile.mkdtemp(prefix="safetrain-reliability-"))
    data_dir = root / "data"
    artifacts = data_dir / "artifacts"
    artifacts.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={ARTIFACT_STORE_BYTES}", "tmpfs", str(artifacts)],
                   check=True, capture_output=True)
    models_dir = root / "models"
    make_tiny_model(models_dir / "tiny-gpt2", hidden=32, layers=1, heads=2, context=128)

    import psycopg

    name = f"safetrain_reliability_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    host_url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    direct_url = f"{host_url}/{name}"
    proxy = TcpProxy(("127.0.0.1", 5432))
    proxied_url = direct_url.replace("@127.0.0.1:5432/", f"@127.0.0.1:{proxy.port}/")
    assert proxied_url != direct_url
    redis.Redis.from_url(REDIS_URL).flushdb()

    settings_env = {
        "SAFETRAIN_DATA_DIR": str(data_dir),
        "SAFETRAIN_MODELS_DIR": str(models_dir),
        "SAFETRAIN_DATABASE_URL": proxied_url,
        "SAFETRAIN_BROKER_URL": REDIS_URL,
        "SAFETRAIN_HEARTBEAT_SECONDS": str(HEARTBEAT_SECONDS),
        "SAFETRAIN_HEARTBEAT_EXPIRY_SECONDS": str(HEARTBEAT_EXPIRY_SECONDS),
        "SAFETRAIN_VISIBILITY_TIMEOUT_SECONDS": "120",
        "SAFETRAIN_MAX_ATTEMPTS": "3",
    }
    env = {key: value for key, value in os.environ.items() if not key.startswith("SAFETRAIN_")}
    env.update(settings_env, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    previous = {key: os.environ.get(key) for key in settings_env}
    os.environ.update({**settings_env, "SAFETRAIN_DATABASE_URL": direct_url})
    get_settings.cache_clear()
    engine = make_engine(direct_url)
    upgrade_to_head(engine)
    set_engine(engine)
    stack = FaultStack(root=root, settings=get_settings(), engine=engine, env=env, proxy=proxy,
                       api_port=free_port(), api_key=create_key_for_project_name("reliability"))
    with session_scope() as session:  # room for the Redis test's jobs at once
        from backend.db.models import Project

        project = session.scalar(select(Project).where(Project.name == "reliability"))
        assert project is not None
        project.max_concurrent_jobs = 20
    try:
        stack.watch_trainers()
        stack.start_worker()
        stack.start_api()
        stack.file_id = stack.upload(TRAIN_LINES)
        yield stack
    finally:
        stack._watching.set()
        start_redis()
        proxy.restore()
        if stack.api is not None and stack.api.poll() is None:
            stack.kill_api()
        stack.stop_worker()
        proxy.close()
        set_engine(None)
        engine.dispose()
        with contextlib.suppress(Exception), psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        subprocess.run(["umount", "-l", str(artifacts)], capture_output=True)
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        get_settings.cache_clear()
        with contextlib.suppress(redis.RedisError):
            redis.Redis.from_url(REDIS_URL).flushdb()
        import shutil

        shutil.rmtree(root, ignore_errors=True)
