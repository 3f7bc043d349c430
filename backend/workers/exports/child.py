"""The export's own process: `python -m backend.workers.exports.child <spec.json> <event_fd>`.

It merges the job's adapter into the base (backend/training/merge.py: the base unquantized on the CPU, at
16-bit) and writes the model folder, then reports its manifest (or why it failed) on `event_fd`. Around it,
backend/workers/child_entry.py reads the spec and makes the process die with its worker.
"""

from __future__ import annotations

import traceback
from typing import Any

from backend.workers.child_entry import EventPipe, run_child


def run(spec: dict[str, Any], pipe: EventPipe) -> int:
    """Merge the spec's adapter into its base into `out_dir`; report on `pipe`; return the exit code."""
    from backend.training.merge import merge_adapter

    try:
        manifest = merge_adapter(
            spec["base_model"], spec["adapter_dir"], spec["out_dir"], spec["dtype"],
            max_shard_size=spec["max_shard_size"], base_model_name=spec["base_model_name"],
            extra_manifest=spec["manifest"],
        )
    except Exception as error:
        traceback.print_exc()
        pipe.send({"type": "error", "message": f"{type(error).__name__}: {error}"})
        return 1
    pipe.send({"type": "result", "manifest": manifest})
    return 0


if __name__ == "__main__":
    run_child(run)
