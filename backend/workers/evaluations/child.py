"""The evaluation's own process: `python -m backend.workers.evaluations.child <spec.json> <event_fd>`.

It loads the base model with the job's adapter and runs the harness (every completion in the sandbox, or
lint only), writing one JSON line per finished task and then the report (or why it failed) on `event_fd`.
Generated code never runs here: the harness hands it to bubblewrap, and refuses (SandboxUnavailable) where
that isolation is missing. Around it, backend/workers/child_entry.py reads the spec and makes the process
die with its worker, as it does for the trainer.
"""

from __future__ import annotations

import traceback
from dataclasses import asdict
from typing import Any

from backend.workers.child_entry import EventPipe, run_child

# A sample's completion kept in the results: enough to read what the model wrote, bounded per sample.
COMPLETION_CHARS = 1000


def _report(report: Any) -> dict[str, Any]:
    data: dict[str, Any] = report.to_dict(include_samples=True)
    for task in data["tasks"]:
        for sample in task["samples"]:
            sample["completion"] = sample["completion"][:COMPLETION_CHARS]
    return data


def run(spec: dict[str, Any], pipe: EventPipe) -> int:
    """Evaluate the spec's adapter on its tasks; report on `pipe`; return the exit code."""
    from backend.evaluation.harness import EvalDataError, evaluate_adapter
    from backend.evaluation.sandbox import SandboxUnavailable

    options = spec["options"]
    try:
        report = evaluate_adapter(
            base_model=spec["base_model"], adapter_dir=spec["adapter_dir"], eval_data=spec["eval_data"],
            n_samples=options["n_samples"], k_values=options["k"], max_new_tokens=options["max_new_tokens"],
            temperature=options["temperature"], timeout_s=options["timeout_s"], mode=options["mode"],
            on_task=lambda task: pipe.send({"type": "task", "task": {**asdict(task), "samples": None}}),
        )
    except SandboxUnavailable as error:  # fails closed: nothing generated ran
        pipe.send({"type": "error", "code": "sandbox_unavailable", "message": f"The sandbox is unavailable: {error}"})
        return 1
    except EvalDataError as error:
        pipe.send({"type": "error", "code": "invalid_evaluation_file", "message": str(error)})
        return 1
    except Exception as error:
        traceback.print_exc()
        pipe.send({"type": "error", "code": "error", "message": f"{type(error).__name__}: {error}"})
        return 1
    pipe.send({"type": "result", "report": _report(report)})
    return 0


if __name__ == "__main__":
    run_child(run)
