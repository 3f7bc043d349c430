"""The evaluation's own process: `python -m backend.workers.evaluation_child <spec.json> <event_fd>`.

It loads the base model with the job's adapter and runs the harness (every completion in the sandbox, or
lint only), writing one JSON line per finished task and then the report (or why it failed) on `event_fd`.
Generated code never runs here: the harness hands it to bubblewrap, and refuses (SandboxUnavailable) where
that isolation is missing. It dies with its parent, like the trainer child.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

from backend.workers.child import EventPipe, die_with_parent

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


def main(argv: list[str]) -> int:
    """Entry point: argv is [spec_path, event_fd]."""
    spec_path, event_fd = argv
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    die_with_parent(int(spec["parent_pid"]))
    with os.fdopen(int(event_fd), "w", encoding="utf-8", buffering=1) as stream:
        return run(spec, EventPipe(stream))


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip torch's slow teardown: the report is on the pipe
