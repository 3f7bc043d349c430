"""The guide's command line, run from `backend/`: `python training/train_safe.py --model distilgpt2 ...`.

It only turns flags into TrainingOptions (one flag per field, the field's description as its help),
installs the SIGTERM/SIGINT handlers that stop at the next step boundary, and calls `run_training`.
Exit codes (backend/training/events.py): 0 done, 1 failed, 2 refused options, 75 stopped after a checkpoint.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script (`python training/train_safe.py`, or `training\train_safe.py` on Windows), sys.path[0]
    # is this folder: its modules (datasets.py, memory.py, ...) would shadow the libraries of the same names,
    # and `backend` itself is not importable. Swap this folder for the repository root.
    _HERE = Path(__file__).resolve().parent
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _HERE]
    sys.path.insert(0, str(_HERE.parents[1]))

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import types  # noqa: E402
import typing  # noqa: E402
from collections.abc import Iterator, Sequence  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from typing import Any  # noqa: E402

from pydantic import ValidationError  # noqa: E402
from pydantic.fields import FieldInfo  # noqa: E402
from tqdm import tqdm  # noqa: E402

from backend.training.events import (  # noqa: E402
    EXIT_BAD_OPTIONS,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_STOPPED,
    TrainingEvent,
    TrainResult,
)
from backend.training.options import TrainingOptions  # noqa: E402

PROG = "train_safe.py"
EXIT_INTERRUPTED = 130  # the shell's code for a process ended by SIGINT


def build_parser() -> argparse.ArgumentParser:
    """One flag per TrainingOptions field; flags not given stay out, so the options' own defaults apply."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Fine-tune a causal language model without running out of memory (LoRA, 8/4-bit, "
        "gradient checkpointing, a memory plan before loading, self-healing, atomic checkpoints).",
        epilog="Exit codes: 0 done, 1 failed, 2 options refused, 75 stopped by SIGTERM/SIGINT after a checkpoint.",
    )
    for name, info in TrainingOptions.model_fields.items():
        _add_flag(parser, name, info)
    return parser


def _add_flag(parser: argparse.ArgumentParser, name: str, info: FieldInfo) -> None:
    help_text = info.description or ""
    if info.default not in (None, False):
        help_text += f" (default: {info.default})"
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    flag, kind = f"--{name}", _value_type(info.annotation)
    if kind is bool:
        short = [f"--{extra['flag']}"] if "flag" in extra else []  # e.g. --json for --print_json
        parser.add_argument(*short, flag, dest=name, action="store_true", default=argparse.SUPPRESS, help=help_text)
        if info.annotation is not bool:  # tri-state: unset lets the safe defaults decide, --no_X forces it off
            parser.add_argument(f"--no_{name}", dest=name, action="store_false", default=argparse.SUPPRESS,
                                help=f"Force --{name} off (no automatic default).")
        elif info.default is True:  # on by default: --no_X is the way to turn it off
            parser.add_argument(f"--no_{name}", dest=name, action="store_false", default=argparse.SUPPRESS,
                                help=f"Turn --{name} off.")
    elif typing.get_origin(kind) is typing.Literal:
        parser.add_argument(flag, choices=typing.get_args(kind), default=argparse.SUPPRESS, help=help_text)
    elif kind in (int, float, str):
        parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=help_text, metavar=name.upper())
    else:  # lists and mappings arrive as one string the options' validators split
        parser.add_argument(flag, type=str, default=argparse.SUPPRESS, help=help_text, metavar=name.upper())


def _value_type(annotation: Any) -> Any:
    """The type of a field's value, without `| None`."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        present = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return present[0] if len(present) == 1 else str
    return annotation


def parse_options(argv: Sequence[str]) -> TrainingOptions:
    """TrainingOptions from command-line flags; raises SystemExit(2) on bad flags or contradictions."""
    parser = build_parser()
    values = vars(parser.parse_args(list(argv)))
    try:
        return TrainingOptions(**values)
    except ValidationError as error:
        for problem in error.errors():
            where = ".".join(str(part) for part in problem["loc"])
            message = str(problem["msg"]).removeprefix("Value error, ")
            print(f"{PROG}: error: {f'--{where}: ' if where else ''}{message}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_OPTIONS) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags, train, and return the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--"]:  # `safetrain train -- --model ...`
        args = args[1:]
    try:
        options = parse_options(args)
    except SystemExit as exit_request:  # argparse's errors and --help, and refused options
        return exit_request.code if isinstance(exit_request.code, int) else EXIT_BAD_OPTIONS
    if options.num_machines > 1 and not _already_launched():
        return _relaunch_multi_node(options, args)
    if options.deepspeed and _can_launch_deepspeed():
        return _relaunch_under_accelerate(options.deepspeed, args)
    from backend.training.trainer import run_training  # torch loads only once the flags are known to be sane

    try:
        with _stop_on_signals() as stop:
            result = run_training(options, on_event=print_event, stop_requested=stop.is_set)
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once, without a checkpoint
        print("Interrupted without a checkpoint", file=sys.stderr)
        return EXIT_INTERRUPTED
    if options.print_json:
        print(plan_json(result), flush=True)
    return exit_code(result)


def plan_json(result: TrainResult) -> str:
    """--json: the dry run's plan (or why there is none) as one line of JSON."""
    if result.status != "succeeded":
        return json.dumps({"fits": False, "error": result.error_code, "message": result.error_message})
    return json.dumps(result.metrics["plan"], sort_keys=True)


def exit_code(result: TrainResult) -> int:
    """The process exit code that says how a run ended."""
    if result.status == "succeeded":
        return EXIT_OK
    if result.status == "stopped":
        return EXIT_STOPPED
    return EXIT_BAD_OPTIONS if result.error_code == "invalid_options" else EXIT_FAILED


def print_event(event: TrainingEvent) -> None:
    """Print what a person wants to see: messages, the plan, metrics lines and checkpoints (not raw telemetry)."""
    if event.kind == "telemetry" or not event.message:
        return
    prefix = "" if event.level == "info" else f"[{event.level}] "
    stream = sys.stderr if event.level == "error" else sys.stdout
    tqdm.write(prefix + event.message, file=stream)  # keeps the progress bar (on a terminal) below the lines
    stream.flush()


@contextmanager
def _stop_on_signals() -> Iterator[threading.Event]:
    """SIGTERM and SIGINT ask for a checkpoint and a stop at the next step boundary; a second Ctrl-C stops now."""
    stop = threading.Event()

    def ask_to_stop(signum: int, frame: Any) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.set()
        name = signal.Signals(signum).name
        print(f"{name}: stopping after a checkpoint at the next step boundary", file=sys.stderr, flush=True)

    previous = {signum: signal.signal(signum, ask_to_stop) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _can_launch_deepspeed() -> bool:
    """Not yet under `accelerate launch`, DeepSpeed importable, and more than one GPU to shard over."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true" or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return False  # already one of the launched ranks (ours, or the user's own `accelerate launch`)
    import torch

    from backend.training.deepspeed_presets import deepspeed_available

    return deepspeed_available() and torch.cuda.device_count() > 1


def _already_launched() -> bool:
    """One of the ranks `accelerate launch` (ours, or the user's own) started."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true" or int(os.environ.get("WORLD_SIZE", "1")) > 1


def _relaunch_multi_node(options: TrainingOptions, args: list[str]) -> int:
    from backend.training.distributed import multi_node_launch_command

    command = multi_node_launch_command(options, args)
    print(f"Launching machine {options.machine_rank} of {options.num_machines}:", " ".join(command), flush=True)
    return _run_launcher(command)


def _relaunch_under_accelerate(preset: str, args: list[str]) -> int:
    import torch

    from backend.training.deepspeed_presets import accelerate_launch_command

    command = accelerate_launch_command(preset, args, torch.cuda.device_count())
    print("Launching under DeepSpeed:", " ".join(command), flush=True)
    return _run_launcher(command)


def _run_launcher(command: list[str]) -> int:
    launcher = subprocess.Popen(command)
    # A cancel (SIGTERM) sent to this process goes on to the launcher, which passes it to every rank; Ctrl-C
    # reaches the ranks straight from the terminal, so this process only waits for them.
    signal.signal(signal.SIGTERM, lambda signum, frame: launcher.send_signal(signum))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return launcher.wait()


if __name__ == "__main__":
    sys.exit(main())
