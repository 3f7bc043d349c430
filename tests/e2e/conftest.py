"""Live safetrain stacks for end-to-end tests: real uvicorn, real Celery worker, real trainer processes.

Two configurations, each started once per session and shared by every module of the suite:
- `redis_postgres`: `safetrain api` + `safetrain worker` on Redis (a dedicated db number) and a fresh
  PostgreSQL database created for the run and dropped after.
- `embedded`: `safetrain up --demo-model` alone, on SQLite and kombu's SQLAlchemy transport in a temp
  data folder (it builds the demo model itself).
A test that stops its stack is marked `stops_stack`; it runs after every other test of that stack.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import torch
from openai import OpenAI
from safetensors.torch import save_file

from backend.training.tiny_models import build_tokenizer, make_tiny_model
from tests.support.models import HUGE_LLAMA
from tests.support.network import free_port
from tests.support.waiting import wait_for

POSTGRES_ADMIN_URL = os.environ.get("SAFETRAIN_E2E_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("SAFETRAIN_E2E_REDIS", "redis://127.0.0.1:6379/13")  # db 13: this suite's own
START_TIMEOUT = 90.0
CLI = [sys.executable, "-m", "backend.cli"]


@dataclass
class Stack:
    """One running safetrain deployment and how to reach it."""

    name: str
    base_url: str
    env: dict[str, str]
    models_dir: Path
    log_dir: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    names: dict[int, str] = field(default_factory=dict)  # pid -> the name start() gave it
    printed_key: str | None = None

    def safetrain(self, *args: str) -> str:
        """Run a `safetrain` subcommand against this deployment; its stdout."""
        done = subprocess.run([*CLI, *args], env=self.env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"safetrain {' '.join(args)} failed:\n{done.stderr[-3000:]}"
        return done.stdout

    def client(self, key: str) -> OpenAI:
        return OpenAI(base_url=f"{self.base_url}/v1", api_key=key, max_retries=0, timeout=30)

    def descendants(self) -> set[int]:
        """Every live process below the processes this stack started."""
        pids: set[int] = set()
        for process in self.processes:
            try:
                pids |= {p.pid for p in psutil.Process(process.pid).children(recursive=True) if _alive(p)}
            except psutil.NoSuchProcess:
                continue
        return pids

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in self.log_dir.glob("*.log"))

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it until it exits
        process = subprocess.Popen([*CLI, *args], env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self.processes.append(process)
        self.names[process.pid] = name
        return process

    def wait_healthy(self) -> None:
        def healthy() -> bool:
            for process in self.processes:
                assert process.poll() is None, f"{process.args} exited {process.returncode}:\n{self.logs()}"
            try:
                with urllib.request.urlopen(f"{self.base_url}/healthz", timeout=2) as answer:
                    return bool(answer.status == 200)
            except OSError:
                return False

        wait_for(healthy, START_TIMEOUT, f"{self.name} /healthz")

    def stop(self, timeout: float = 60.0) -> list[int | None]:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        codes: list[int | None] = []
        for process in self.processes:
            try:
                codes.append(process.wait(timeout=timeout))
            except subprocess.TimeoutExpired:
                for child in _tree(process.pid):
                    child.kill()
                process.kill()
                codes.append(None)
        return codes


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _tree(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def make_huge_model(folder: Path) -> Path:
    """A 400B model folder: its config, a tokenizer and a placeholder weight file that is never loaded."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(HUGE_LLAMA))
    build_tokenizer().save_pretrained(folder)
    # A model folder has safetensors weights; these are a stand-in, as the plan must fail before any load.
    save_file({"placeholder": torch.zeros(1)}, str(folder / "model.safetensors"))
    return folder


@pytest.fixture(scope="session")
def shared_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Models for the Redis + PostgreSQL stack: tiny-gpt2 and a config-only 400B llama."""
    folder = tmp_path_factory.mktemp("models")
    make_tiny_model(folder / "tiny-gpt2", arch="gpt2")
    make_huge_model(folder / "huge-llama")
    return folder


def base_env(data_dir: Path, models_dir: Path) -> dict[str, str]:
    # No W&B key or MLflow server of this machine's: a job's --report_to writes only into its output folder.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAFETRAIN_", "WANDB_", "MLFLOW_"))}
    env.update(
        SAFETRAIN_DATA_DIR=str(data_dir),
        SAFETRAIN_MODELS_DIR=str(models_dir),
        # Cancel and pause are noticed at the next heartbeat: keep it short so tests stay fast.
        SAFETRAIN_HEARTBEAT_SECONDS="1",
        PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
    )
    return env


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """A database of its own for one run, dropped afterwards; its SQLAlchemy URL."""
    import psycopg

    name = f"safetrain_e2e_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    yield f"{base}/{name}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def flush_redis(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()


def start_redis_postgres(tmp: Path, models_dir: Path, database_url: str) -> Stack:
    port = free_port()
    env = base_env(tmp / "data", models_dir)
    env.update(SAFETRAIN_DATABASE_URL=database_url, SAFETRAIN_BROKER_URL=REDIS_URL)
    stack = Stack("redis_postgres", f"http://127.0.0.1:{port}", env, models_dir, tmp)
    flush_redis(REDIS_URL)
    stack.safetrain("migrate")
    stack.start("worker", "worker", "--concurrency", "1")
    stack.start("api", "api", "--host", "127.0.0.1", "--port", str(port))
    stack.wait_healthy()
    return stack


def start_embedded(tmp: Path, data_dir: Path | None = None) -> Stack:
    """`safetrain up --demo-model` in a temp folder; waits for its banner."""
    port = free_port()
    models_dir = tmp / "models"
    if not (models_dir / "huge-llama").exists():
        make_huge_model(models_dir / "huge-llama")
    env = base_env(data_dir or tmp / "data", models_dir)
    stack = Stack("embedded", f"http://127.0.0.1:{port}", env, models_dir, tmp)
    up = stack.start("up", "up", "--host", "127.0.0.1", "--port", str(port), "--demo-model")
    log = tmp / "up.log"

    def banner() -> str | None:
        assert up.poll() is None, f"safetrain up exited {up.returncode}:\n{stack.logs()}"
        text = log.read_text(errors="replace")
        return text if "Stop with Ctrl-C." in text else None

    text = wait_for(banner, START_TIMEOUT, "the banner of safetrain up")
    found = re.search(r"API key of project 'default' \(shown once, keep it\): (\S+)", text)
    stack.printed_key = found[1] if found else None
    return stack


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "stops_stack: the test stops its stack, so it runs last on that stack")


@pytest.hookimpl(trylast=True)  # after pytest grouped the tests by the stack they share
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Each `stops_stack` test moves to just after the last other test of its stack."""
    def stack_of(item: pytest.Item) -> object:
        callspec = getattr(item, "callspec", None)
        return callspec.params.get("stack") if callspec is not None else None

    for stopper in [item for item in items if item.get_closest_marker("stops_stack")]:
        items.remove(stopper)
        same = [index for index, item in enumerate(items) if stack_of(item) == stack_of(stopper)]
        items.insert(same[-1] + 1 if same else len(items), stopper)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed test on a stack carries that stack's logs and which of its processes still run: an SDK
    `Connection error` alone never says why the service stopped answering."""
    report = yield
    running = getattr(item, "funcargs", {}).get("stack")
    if report.failed and isinstance(running, Stack):
        states = ", ".join(f"{running.names[p.pid]}: {'running' if p.poll() is None else f'exited {p.returncode}'}"
                           for p in running.processes)
        report.sections.append((f"{running.name} stack ({states})", running.logs()))
    return report


@pytest.fixture(scope="session", params=["redis_postgres", "embedded"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A live deployment in one of the two configurations, started once for every module of the suite."""
    tmp = tmp_path_factory.mktemp(request.param)
    if request.param == "redis_postgres":
        models_dir = request.getfixturevalue("shared_models_dir")
        database_url = request.getfixturevalue("postgres_database")
        running = start_redis_postgres(tmp, models_dir, database_url)
    else:
        running = start_embedded(tmp)
    try:
        yield running
    finally:
        running.stop()
        if request.param == "redis_postgres":
            flush_redis(REDIS_URL)


@pytest.fixture(scope="module")
def api_key(stack: Stack) -> str:
    """A key for project p1, made by the CLI exactly as a user would."""
    output = stack.safetrain("keys", "create", "--project", "p1")
    lines = output.splitlines()
    assert len(lines) == 1, f"keys create must print only the key, got {output!r}"
    return lines[0].strip()


@pytest.fixture(scope="module")
def client(stack: Stack, api_key: str) -> OpenAI:
    return stack.client(api_key)


@pytest.fixture(scope="session")
def training_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small learnable prompt/completion dataset."""
    path = tmp_path_factory.mktemp("dataset") / "train.jsonl"
    rows = [{"prompt": f"Count from {i}:", "completion": " " + " ".join(str(i + k) for k in range(1, 6))}
            for i in range(16)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
