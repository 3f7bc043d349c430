"""One live `safetrain up --demo-model` (SQLite, tiny model) and one headless Debian chromium for every dashboard
test; screenshots of each page go to SAFETRAIN_DASHBOARD_SHOTS (a temp folder by default)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import START_TIMEOUT, Stack, base_env, free_port, make_huge_model, wait_for

pytest.importorskip("playwright.sync_api")
from playwright.sync_api import Browser, BrowserContext, Page, sync_playwright  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
# Small runs: a handful of steps on the demo model, one metrics event and one telemetry sample a step.
SMALL_RUN = {"use_lora": True, "lora_r": 4, "max_steps": 4, "save_steps": 2, "logging_steps": 1}
JOB_TIMEOUT = 150.0


@dataclass
class Dashboard:
    """The live deployment, its keys, and a JSON client for checking what the browser shows."""

    stack: Stack
    key: str
    other_key: str
    shots: Path

    @property
    def url(self) -> str:
        return self.stack.base_url

    def api(self, method: str, path: str, key: str | None = None, **kwargs: Any) -> Any:
        """One call to the public API; the decoded JSON answer (asserting success)."""
        headers = {"Authorization": f"Bearer {key or self.key}"}
        answer = httpx.request(method, f"{self.url}{path}", headers=headers, timeout=30, **kwargs)
        assert answer.status_code < 400, answer.text
        return answer.json()

    def upload(self, path: Path, name: str | None = None) -> str:
        with path.open("rb") as handle:
            files = {"file": (name or path.name, handle, "application/jsonl")}
            return str(self.api("POST", "/v1/files", files=files, data={"purpose": "fine-tune"})["id"])

    def submit(self, file_id: str, training: dict[str, Any] | None = None, **body: Any) -> str:
        job = self.api("POST", "/v1/fine_tuning/jobs", json={
            "model": "tiny-gpt2", "training_file": file_id, "hyperparameters": {"n_epochs": 1, "batch_size": 2},
            "training": training or SMALL_RUN, **body,
        })
        return str(job["id"])

    def job(self, job_id: str) -> dict[str, Any]:
        return dict(self.api("GET", f"/v1/fine_tuning/jobs/{job_id}"))

    def wait_status(self, job_id: str, wanted: set[str], timeout: float = JOB_TIMEOUT) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            job = self.job(job_id)
            return job if job["status"] in wanted else None

        return dict(wait_for(reached, timeout, f"{job_id} to be {'/'.join(sorted(wanted))}", interval=0.5))

    def events(self, job_id: str) -> list[dict[str, Any]]:
        """Every event of the job, newest first."""
        return list(self.api("GET", f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 10000})["data"])

    def screenshot(self, page: Page, name: str) -> None:
        page.screenshot(path=str(self.shots / f"{name}.png"), full_page=True)


def start_stack(tmp: Path) -> Stack:
    """`safetrain up --demo-model` as the end-to-end tests start it, with its inference engine on a port of its own
    (the default port is shared by every `safetrain up` on the machine, and this one lives for the whole session)."""
    port = free_port()
    models_dir = tmp / "models"
    make_huge_model(models_dir / "huge-llama")
    env = base_env(tmp / "data", models_dir)
    env["SAFETRAIN_INFERENCE_PORT"] = str(free_port())
    stack = Stack("dashboard", f"http://127.0.0.1:{port}", env, models_dir, tmp)
    up = stack.start("up", "up", "--host", "127.0.0.1", "--port", str(port), "--demo-model")

    def started() -> bool:
        assert up.poll() is None, f"safetrain up exited {up.returncode}:\n{stack.logs()}"
        return "Stop with Ctrl-C." in (tmp / "up.log").read_text(errors="replace")

    wait_for(started, START_TIMEOUT, "the banner of safetrain up")
    return stack


@pytest.fixture(scope="session")
def training_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small learnable prompt/completion dataset."""
    path = tmp_path_factory.mktemp("dashboard-data") / "count.jsonl"
    rows = [{"prompt": f"Count from {i}:", "completion": " " + " ".join(str(i + k) for k in range(1, 6))}
            for i in range(16)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="session")
def dashboard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dashboard]:
    """`safetrain up --demo-model` in a temp folder, with keys for two projects."""
    stack = start_stack(tmp_path_factory.mktemp("dashboard-stack"))
    shots = Path(os.environ.get("SAFETRAIN_DASHBOARD_SHOTS") or tmp_path_factory.mktemp("dashboard-shots"))
    shots.mkdir(parents=True, exist_ok=True)
    try:
        key = stack.safetrain("keys", "create", "--project", "dash").strip()
        other = stack.safetrain("keys", "create", "--project", "dash-other").strip()
        yield Dashboard(stack, key, other, shots)
    finally:
        stack.stop()


@pytest.fixture(scope="session")
def first_job(dashboard: Dashboard, training_file: Path) -> str:
    """A small job submitted through the API as the session starts; it trains while the first tests run."""
    return dashboard.submit(dashboard.upload(training_file), suffix="first")


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (.ci/run installs it)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def new_page(browser: Browser, dashboard: Dashboard) -> Iterator[Callable[..., Page]]:
    """Pages in fresh browser contexts, signed in with `key` (the first project's by default) unless None; the test
    fails if a script of the page threw."""
    contexts: list[BrowserContext] = []
    errors: list[str] = []

    def make(key: str | None = "", width: int = 1440, height: int = 1000) -> Page:
        context = browser.new_context(viewport={"width": width, "height": height})
        contexts.append(context)
        if key is not None:
            stored = json.dumps(key or dashboard.key)
            context.add_init_script(f"localStorage.setItem('safetrain.apiKey', {stored});")
        page = context.new_page()
        page.set_default_timeout(20_000)
        page.on("pageerror", lambda error: errors.append(str(error)))
        return page

    yield make
    for context in contexts:
        context.close()
    assert not errors, f"uncaught errors in the page: {errors}"
