"""`safetrain up`: the API and one real Celery worker on one machine, supervised by one process.

With no settings this runs on SQLite and kombu's SQLAlchemy transport (a second SQLite file), so a
newcomer needs no server; with SAFETRAIN_DATABASE_URL and SAFETRAIN_BROKER_URL it runs the same two
processes on PostgreSQL and Redis.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

DEFAULT_PROJECT = "default"
DEMO_MODEL = "tiny-gpt2"
READY_TIMEOUT_SECONDS = 120.0
# A training step can take a while on a big model; the trainer checkpoints at the next step boundary.
STOP_GRACE_SECONDS = 60.0
_PR_SET_PDEATHSIG = 1


@dataclass
class _Children:
    """The processes `safetrain up` supervises: API, worker and (unless SAFETRAIN_INFERENCE_URL names another
    engine) the embedded inference engine."""

    api: subprocess.Popen[bytes]
    worker: subprocess.Popen[bytes]
    engine: subprocess.Popen[bytes] | None = None
    engine_argv: list[str] = field(default_factory=list)
    engine_env: dict[str, str] = field(default_factory=dict)
    engine_restarts: int = 0
    stop_requested: list[int] = field(default_factory=list)

    def all(self) -> tuple[subprocess.Popen[bytes], ...]:
        return (self.api, self.worker) if self.engine is None else (self.api, self.worker, self.engine)


def run_embedded(host: str, port: int, demo_model: bool) -> None:
    """Migrate, make sure a default project and (optionally) the demo model exist, then run API + worker."""
    from backend.config import get_settings
    from backend.db.migrations import upgrade_to_head

    settings = get_settings()
    data_dir = Path(settings.data_dir).resolve()
    models_dir = Path(settings.models_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    upgrade_to_head()
    key = ensure_default_project()
    if demo_model:
        ensure_demo_model(models_dir)
    env = _child_environment(data_dir, models_dir)
    if not settings.inference_url:
        # API and engine agree on the port through the environment; a taken one (another stack) is swapped.
        env["SAFETRAIN_INFERENCE_PORT"] = str(_engine_port(settings.inference_port))
    children = _start_children(host, port, env, engine=not settings.inference_url)
    _install_stop_handlers(children)
    try:
        if _wait_until_ready(children, host, port):
            print(banner(host=host, port=port, key=key, data_dir=data_dir, models_dir=models_dir), flush=True)
            _supervise(children)
    finally:
        stop_children(children)
    codes = [child.returncode for child in children.all()]
    if not children.stop_requested and any(codes):
        raise SystemExit(f"safetrain up: a child process exited unexpectedly (api {codes[0]}, worker {codes[1]})")


def ensure_default_project() -> str | None:
    """Create the default project and return its first key; None when it already exists (printed before)."""
    from sqlalchemy import select

    from backend.db.models import Project
    from backend.db.session import session_scope
    from backend.services.keys import create_key_for_project_name

    # The project row is the marker: it lives with the data, so a restart (or a second machine on the
    # same PostgreSQL) never mints another key just by starting.
    with session_scope() as session:
        exists = session.scalar(select(Project.id).where(Project.name == DEFAULT_PROJECT)) is not None
    if exists:
        return None
    return create_key_for_project_name(DEFAULT_PROJECT)


def ensure_demo_model(models_dir: Path) -> Path:
    """Build the tiny random-weight demo model under models_dir unless it is already there."""
    folder = models_dir / DEMO_MODEL
    if not (folder / "config.json").is_file():
        from backend.training.tiny_models import make_tiny_model

        print(f"Building the demo model {DEMO_MODEL} in {folder} ...", flush=True)
        make_tiny_model(folder, arch="gpt2")
    return folder


def banner(*, host: str, port: int, key: str | None, data_dir: Path, models_dir: Path) -> str:
    """What `safetrain up` prints once the API answers: the URL, the key and a first session with curl."""
    shown_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{shown_host}:{port}"
    models = _model_names(models_dir)
    models_line = ", ".join(models) if models else f"none yet (safetrain models make-tiny {models_dir / DEMO_MODEL})"
    key_lines = (
        [f"API key of project '{DEFAULT_PROJECT}' (shown once, keep it): {key}", f"  export SAFETRAIN_API_KEY={key}"]
        if key
        else [f"The key of project '{DEFAULT_PROJECT}' was printed on the first start; set SAFETRAIN_API_KEY to it."]
    )
    auth = '-H "Authorization: Bearer $SAFETRAIN_API_KEY"'
    first_model = models[0] if models else DEMO_MODEL
    return "\n".join(
        [
            "",
            f"safetrain is running at {url}/v1   (OpenAPI: {url}/docs)",
            *key_lines,
            "Another key: safetrain keys create --project NAME",
            f"Data: {data_dir}   Base models ({models_dir}): {models_line}",
            "Try it:",
            f"  curl -s {url}/v1/files {auth} -F purpose=fine-tune -F file=@{_example_dataset()}",
            f"  curl -s {url}/v1/fine_tuning/jobs {auth} -H 'Content-Type: application/json' \\",
            f"       -d '{{\"model\": \"{first_model}\", \"training_file\": \"<the file id>\"}}'",
            f"  curl -s {url}/v1/fine_tuning/jobs/<the job id>/events {auth}",
            f"Python: OpenAI(base_url=\"{url}/v1\", api_key=os.environ[\"SAFETRAIN_API_KEY\"])",
            "Stop with Ctrl-C.",
            "",
        ]
    )


def _example_dataset() -> Path:
    """The trainer's built-in prompt/completion dataset: a file a newcomer can upload at once."""
    import backend.training

    return Path(backend.training.__file__).resolve().parent / "builtin_dataset.jsonl"


def _model_names(models_dir: Path) -> list[str]:
    if not models_dir.is_dir():
        return []
    return sorted(folder.name for folder in models_dir.iterdir() if (folder / "config.json").is_file())


def stop_children(children: _Children, grace_seconds: float = STOP_GRACE_SECONDS) -> None:
    """Stop the API and the worker: trainers checkpoint, the worker finishes its task, then both exit."""
    _signal(children.api, signal.SIGTERM)
    # SIGTERM is the worker's warm shutdown: it has its trainers checkpoint at the next step, hands their
    # jobs back to the queue (they resume on the next start) and records that before it exits.
    _signal(children.worker, signal.SIGTERM)
    if children.engine is not None:
        _signal(children.engine, signal.SIGTERM)  # a generation in flight is dropped: the API answers 503
    deadline = time.monotonic() + grace_seconds
    for child in children.all():
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _kill_group(child)
            child.wait()
    _kill_group(children.worker)  # leftovers in its session (a trainer that ignored SIGTERM)


def _child_environment(data_dir: Path, models_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    # Absolute paths, so the children agree with this process whatever their working folder.
    env["SAFETRAIN_DATA_DIR"] = str(data_dir)
    env["SAFETRAIN_MODELS_DIR"] = str(models_dir)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _start_children(host: str, port: int, env: dict[str, str], *, engine: bool = True) -> _Children:
    command = [sys.executable, "-m", "backend.cli"]
    api = _spawn([*command, "api", "--host", host, "--port", str(port)], env)
    worker = _spawn([*command, "worker", "--concurrency", "1"], env)
    # The engine listens on 127.0.0.1 only: the API is its one client, and it checks who may use which model.
    engine_argv = [*command, "serve", "--host", "127.0.0.1"] if engine else []
    return _Children(api=api, worker=worker, engine=_spawn(engine_argv, env) if engine else None,
                     engine_argv=engine_argv, engine_env=env)


def _engine_port(wanted: int) -> int:
    """`wanted` if nothing listens on it, else a free port."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", wanted))
        except OSError:
            probe.bind(("127.0.0.1", 0))
            print(f"safetrain up: port {wanted} is taken; the inference engine uses {probe.getsockname()[1]}",
                  file=sys.stderr, flush=True)
        return int(probe.getsockname()[1])


def _spawn(argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    # Its own session: a terminal's Ctrl-C reaches only this supervisor, which stops the children in
    # order (trainer, worker, API) instead of all at once.
    return subprocess.Popen(argv, env=env, start_new_session=True, preexec_fn=_die_with_parent)


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the supervisor dies without stopping us (Linux)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _install_stop_handlers(children: _Children) -> None:
    def request_stop(signum: int, frame: FrameType | None) -> None:
        children.stop_requested.append(signum)

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)


def _wait_until_ready(children: _Children, host: str, port: int) -> bool:
    """Poll /healthz until the API answers; False when a child died or a stop was asked for first."""
    probe_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{probe_host}:{port}/healthz"
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if children.stop_requested or any(child.poll() is not None for child in children.all()):
            return False
        try:
            with urllib.request.urlopen(url, timeout=1.0) as answer:
                if answer.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    print(f"safetrain up: the API did not answer {url} within {READY_TIMEOUT_SECONDS:.0f} s", file=sys.stderr)
    return False


def _supervise(children: _Children) -> None:
    """Return when a stop is asked for or when the API or the worker exits; a dead engine is started again."""
    while not children.stop_requested and children.api.poll() is None and children.worker.poll() is None:
        if children.engine is not None and children.engine.poll() is not None:
            # The engine holds nothing the API cannot give it again (adapters are registered on use).
            # An engine that keeps dying waits longer each time (1 s, 2 s, … 60 s), so it never spins.
            delay = min(60.0, 2.0 ** min(children.engine_restarts, 6))
            print(f"safetrain up: the inference engine exited ({children.engine.returncode}); starting it again "
                  f"in {delay:.0f} s", file=sys.stderr, flush=True)
            if _sleep_unless_stopped(children, delay):
                return
            children.engine_restarts += 1
            children.engine = _spawn(children.engine_argv, children.engine_env)
        time.sleep(0.2)


def _sleep_unless_stopped(children: _Children, seconds: float) -> bool:
    """Sleep; True as soon as a stop is asked for."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if children.stop_requested:
            return True
        time.sleep(0.2)
    return False


def _signal(child: subprocess.Popen[bytes], signum: int) -> None:
    if child.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signum)


def _kill_group(child: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, signal.SIGKILL)
