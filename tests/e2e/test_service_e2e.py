"""The whole service through the official `openai` SDK, on Redis + PostgreSQL and on `safetrain up`."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from openai import NotFoundError, OpenAI
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.e2e.conftest import Stack
from tests.support.waiting import wait_for

TERMINAL = {"succeeded", "failed", "cancelled"}
JOB_TIMEOUT = 90.0
SMALL_RUN = {"use_lora": True, "lora_r": 4, "max_steps": 6, "save_steps": 3, "logging_steps": 1}
# Long enough never to finish on its own: cancel and pause must stop it.
LONG_RUN = {"use_lora": True, "lora_r": 4, "max_steps": 100_000, "save_steps": 10_000, "logging_steps": 5}


def upload(client: OpenAI, path: Path) -> str:
    with path.open("rb") as handle:
        uploaded = client.files.create(file=handle, purpose="fine-tune")
    assert uploaded.status == "processed"
    return uploaded.id


def submit(client: OpenAI, file_id: str, training: dict[str, Any], model: str = "tiny-gpt2") -> str:
    job = client.fine_tuning.jobs.create(
        model=model,
        training_file=file_id,
        hyperparameters={"n_epochs": 1, "batch_size": 2},
        extra_body={"training": training},
    )
    assert job.object == "fine_tuning.job"
    return job.id


def wait_status(client: OpenAI, job_id: str, wanted: set[str], timeout: float = JOB_TIMEOUT) -> Any:
    def reached() -> Any:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in wanted:
            return job
        assert job.status not in TERMINAL, f"{job_id} ended {job.status} ({job.error}) waiting for {wanted}"
        return None

    return wait_for(reached, timeout, f"{job_id} to be {'/'.join(sorted(wanted))}")


def metrics_steps(client: OpenAI, job_id: str) -> dict[str, int]:
    """event id -> step of every metrics event (the SDK follows the pages)."""
    events = client.fine_tuning.jobs.list_events(job_id, limit=50)
    return {event.id: int(event.data["step"]) for event in events if event.type == "metrics"}


def logits_of(model: torch.nn.Module, tokenizer: Any) -> torch.Tensor:
    batch = tokenizer(["Count from 3: 4 5 6"], return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


def test_fine_tune_end_to_end(stack: Stack, client: OpenAI, training_jsonl: Path, tmp_path: Path) -> None:
    job_id = submit(client, upload(client, training_jsonl), SMALL_RUN)

    job = wait_status(client, job_id, {"succeeded"})
    assert job.fine_tuned_model.startswith("ft:tiny-gpt2:") and job.fine_tuned_model.endswith(job_id)
    assert job.finished_at >= job.created_at and job.trained_tokens > 0
    metrics = [e for e in client.fine_tuning.jobs.list_events(job_id, limit=50) if e.type == "metrics"]
    assert {int(e.data["step"]) for e in metrics} >= set(range(1, 7))
    assert all(e.data["train_loss"] > 0 and "peak_memory_bytes" in e.data for e in metrics)
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job_id).data
    assert checkpoints and checkpoints[0].step_number == 6
    assert all(c.fine_tuning_job_id == job_id for c in checkpoints)

    adapter_zip = client.files.content(job.result_files[0]).content
    adapter_dir = tmp_path / "adapter"
    zipfile.ZipFile(io.BytesIO(adapter_zip)).extractall(adapter_dir)
    assert (adapter_dir / "adapter_model.safetensors").is_file()
    assert json.loads((adapter_dir / "safetrain.json").read_text())["base_model"]
    base_dir = stack.models_dir / "tiny-gpt2"
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    before = logits_of(base, tokenizer)
    tuned = PeftModel.from_pretrained(base, adapter_dir)
    after = logits_of(tuned, tokenizer)
    assert not torch.allclose(before, after), "the adapter does not change the output"

    other = stack.client(stack.safetrain("keys", "create", "--project", "p2").strip())
    for fetch in (lambda: other.fine_tuning.jobs.retrieve(job_id), lambda: other.files.retrieve(job.result_files[0])):
        with pytest.raises(NotFoundError):
            fetch()
    assert not other.fine_tuning.jobs.list().data


def test_plan_that_cannot_fit_fails_early_with_out_of_memory(client: OpenAI, training_jsonl: Path) -> None:
    job_id = submit(client, upload(client, training_jsonl), {"use_lora": True, "max_steps": 2}, model="huge-llama")

    job = wait_status(client, job_id, {"failed"})
    assert job.error.code == "out_of_memory", job.error
    assert "GiB" in job.error.message or "GB" in job.error.message, job.error.message
    assert not metrics_steps(client, job_id), "a plan that cannot fit must fail before training"
    assert not client.fine_tuning.jobs.checkpoints.list(job_id).data


def test_cancel_queued_pause_resume_cancel_running(stack: Stack, client: OpenAI, training_jsonl: Path) -> None:
    file_id = upload(client, training_jsonl)
    idle = stack.descendants()
    running_id = submit(client, file_id, LONG_RUN)
    wait_for(lambda: metrics_steps(client, running_id), JOB_TIMEOUT, "the first metrics of the long job")
    trainers = stack.descendants() - idle
    queued_id = submit(client, file_id, LONG_RUN)  # one worker, one training at a time: this one waits

    assert client.fine_tuning.jobs.retrieve(queued_id).status == "queued"
    assert client.fine_tuning.jobs.cancel(queued_id).status == "cancelled"
    assert trainers, "the trainer must run in a child process of the worker"

    client.fine_tuning.jobs.pause(running_id)
    wait_status(client, running_id, {"paused"})
    wait_for(lambda: not any(_alive(pid) for pid in trainers), 30, "the trainer to exit")
    paused_at = max(c.step_number for c in client.fine_tuning.jobs.checkpoints.list(running_id).data)
    before_resume = metrics_steps(client, running_id)
    assert max(before_resume.values()) <= paused_at

    client.fine_tuning.jobs.resume(running_id)
    resumed = wait_for(
        lambda: {k: v for k, v in metrics_steps(client, running_id).items() if k not in before_resume},
        JOB_TIMEOUT,
        "metrics after resume",
    )
    assert paused_at < min(resumed.values()) <= paused_at + LONG_RUN["logging_steps"], (paused_at, resumed)
    assert client.fine_tuning.jobs.retrieve(running_id).status == "running"
    trainers = stack.descendants() - idle

    assert client.fine_tuning.jobs.cancel(running_id).status in {"running", "cancelled"}
    job = wait_status(client, running_id, {"cancelled"})
    assert job.finished_at is not None
    wait_for(lambda: not any(_alive(pid) for pid in trainers), 30, "the trainer to exit")
    assert client.fine_tuning.jobs.retrieve(queued_id).status == "cancelled"
    assert not metrics_steps(client, queued_id), "a job cancelled while queued must never start"


@pytest.mark.stops_stack
def test_stops_cleanly_and_keeps_its_key(stack: Stack, client: OpenAI) -> None:
    """Last on its stack (stops_stack): SIGTERM stops all its processes; a later `up` would print no new key."""
    first_page = client.fine_tuning.jobs.list(limit=2)
    assert first_page.has_more
    every_job = [job.id for job in client.fine_tuning.jobs.list(limit=2)]  # the SDK follows `after` cursors
    assert len(every_job) == len(set(every_job)) >= 4
    assert every_job[:2] == [job.id for job in first_page.data]
    tree = stack.descendants()
    # uvicorn re-raises the SIGTERM it handled once its graceful shutdown is done; `safetrain up` exits 0.
    clean = {0, -signal.SIGTERM} if stack.name != "embedded" else {0}
    codes = stack.stop()
    assert set(codes) <= clean, (codes, stack.logs())
    assert not any(_alive(pid) for pid in tree), "children outlived their parent"
    if stack.name != "embedded":
        return
    assert stack.printed_key and stack.printed_key != client.api_key
    # What the next `safetrain up` on this data folder decides (the project row is the marker), checked
    # without paying for a second API and worker start.
    check = "from backend.workers.embedded import ensure_default_project; print(ensure_default_project())"
    done = subprocess.run([sys.executable, "-c", check], env=stack.env, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "None", done.stderr[-2000:]


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
