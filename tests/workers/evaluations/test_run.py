"""The worker's evaluation path on a real database, a real adapter archive, a real child process and the sandbox.

The silent model ends every completion at once, so its completion is the empty string: the canonical solution
of `tiny/solved` (whose prompt holds the whole body) and a wrong one for `tiny/unsolved`. The recorded pass@1
must therefore be exactly 1.0 and 0.0.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
from sqlalchemy import select

from backend.db.models import Artifact, Evaluation, File, Job, JobEvent
from backend.db.session import session_scope
from backend.evaluation.harness import EvalTask, check_completion
from backend.services import evaluation_runs, evaluations
from backend.services.evaluation_runs import ClaimedEvaluation
from backend.services.evaluations import EvaluationOptions
from backend.services.storage import hash_file
from backend.workers.evaluations.run import EvaluationRun
from tests.evaluation.conftest import SOLVED, UNSOLVED
from tests.workers.evaluations.conftest import Stored


def _evaluate(stored: Stored, **options: object) -> Evaluation:
    with session_scope() as session:
        job = session.scalar(select(Job).where(Job.id == stored.job_id))
        assert job is not None
        row = evaluations.add_evaluation(session=session, job=job,
                                         options=EvaluationOptions(file="file-evals", **options))  # type: ignore[arg-type]
        evaluation_id = row.id
    with session_scope() as session:
        claimed = evaluation_runs.claim_evaluation(session=session, evaluation_id=evaluation_id, worker="test",
                                                   stale_before=0)
    assert isinstance(claimed, ClaimedEvaluation), claimed
    EvaluationRun(claimed, stored.settings).run()
    with session_scope() as session:
        done = session.scalar(select(Evaluation).where(Evaluation.id == evaluation_id))
        assert done is not None
        session.expunge(done)
        return done


def _events(job_id: str, evaluation_id: str) -> list[JobEvent]:
    with session_scope() as session:
        rows = list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.seq)))
        session.expunge_all()
    return [row for row in rows if (row.data or {}).get("evaluation_id") == evaluation_id]


def test_the_canonical_completion_is_recorded_as_pass_at_1_of_one(stored: Stored) -> None:
    # The harness's own check agrees on what is canonical: the empty completion solves one task, not the other.
    assert check_completion(EvalTask(**SOLVED), "") is True
    assert check_completion(EvalTask(**UNSOLVED), "") is False

    evaluation = _evaluate(stored, n_samples=2, k=(1, 2), max_new_tokens=8, temperature=0.0)

    assert evaluation.status == "succeeded", evaluation.error
    results = evaluation.results or {}
    by_task = {task["task_id"]: task for task in results["tasks"]}
    assert by_task["tiny/solved"]["pass_at_k"] == {"pass@1": 1.0, "pass@2": 1.0}
    assert by_task["tiny/unsolved"]["pass_at_k"] == {"pass@1": 0.0, "pass@2": 0.0}
    assert results["pass_at_k"]["pass@1"] == pytest.approx(0.5)
    assert results["n_samples"] == 2 and results["mode"] == "sandbox"
    for task in results["tasks"]:
        assert task["n"] == 2 and len(task["samples"]) == 2
        for sample in task["samples"]:
            assert sample["completion"] == ""
            assert sample["exit_code"] is not None  # the program ran to an exit in the sandbox, every sample
    assert {s["exit_code"] for s in by_task["tiny/solved"]["samples"]} == {0}
    assert all(s["exit_code"] != 0 for s in by_task["tiny/unsolved"]["samples"])  # its tests asserted

    events = _events(stored.job_id, evaluation.id)
    metrics = [event for event in events if event.type == "metrics"]
    assert len(metrics) == 1 and metrics[0].data is not None and metrics[0].data["pass@1"] == pytest.approx(0.5)
    assert any("task tiny/solved: 2 of 2 samples passed" in event.message for event in events)

    with zipfile.ZipFile(stored.adapter_path) as archive:
        manifest = json.loads(archive.read("safetrain.json"))
        weights = archive.read("adapter_model.safetensors")  # the rewrite copied the adapter unchanged
    assert weights == (stored.adapter_dir / "adapter_model.safetensors").read_bytes()
    assert manifest["base_model_name"] == "silent-llama"  # what was there is kept
    assert manifest["evaluations"][evaluation.id]["pass_at_k"]["pass@1"] == pytest.approx(0.5)
    sha256, size = hash_file(stored.adapter_path)
    with session_scope() as session:
        artifact = session.scalar(select(Artifact).where(Artifact.job_id == stored.job_id))
        result_file = session.scalar(select(File).where(File.id == "file-adapter"))
        assert artifact is not None and result_file is not None
        assert (artifact.sha256, artifact.bytes) == (sha256, size) == (result_file.sha256, result_file.bytes)


def test_without_the_sandbox_the_evaluation_fails_closed(stored: Stored, monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path) -> None:
    empty = tmp_path / "no-tools"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # the child finds no bubblewrap, so it must refuse to run anything

    evaluation = _evaluate(stored, n_samples=1, k=(1,), max_new_tokens=4, temperature=0.0)

    assert evaluation.status == "failed"
    assert evaluation.error is not None and "sandbox is unavailable" in evaluation.error
    assert "bwrap" in evaluation.error or "bubblewrap" in evaluation.error
    assert evaluation.results is None
    errors = [event for event in _events(stored.job_id, evaluation.id) if event.level == "error"]
    assert errors and "sandbox is unavailable" in errors[0].message
