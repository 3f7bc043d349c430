"""One process or several: the ranks `accelerate launch` starts, seen by the loop through one small interface.

`Ranks` is a run of one rank, this process: every collective is a no-op and the model is used as loaded, so
the single-process run is exactly the loop without any of this. Under `accelerate launch` (WORLD_SIZE > 1)
`AcceleratedRanks` runs the same loop through an `accelerate.Accelerator`: DistributedDataParallel, or a
DeepSpeed ZeRO engine when `--deepspeed PRESET` asks for one (GPUs, or the CPU with DS_ACCELERATOR=cpu).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from backend.training.options import TrainingOptions

DEEPSPEED_STATE_DIR = "deepspeed"  # inside a checkpoint: every rank's shard of weights and optimizer state
T = TypeVar("T")


def launched_world_size() -> int:
    """How many processes `accelerate launch` (or torchrun) started for this run; 1 when run directly."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    """This process's rank among them (0 when run directly)."""
    return int(os.environ.get("RANK", "0"))


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """This rank's contiguous slice of one step's items: the step reads the seeded order, each rank its part."""
    per_rank = -(-len(items) // world_size)
    return list(items[rank * per_rank : (rank + 1) * per_rank])


class Ranks:
    """One rank, this process (rank 0 of 1): collectives are no-ops, the model and optimizer stay as they are."""

    rank = 0
    world_size = 1
    is_main = True
    deepspeed = False
    device: torch.device | None = None  # the ranks' device under accelerate; the model's own otherwise
    zero_stage = 0

    @property
    def gradient_factor(self) -> float:
        """What the loss is multiplied by before backward so the summed gradient is that of the whole step."""
        return 1.0

    def prepare(self, model: Any, optimizer: Any, scheduler: Any) -> tuple[Any, Any, Any]:
        return model, optimizer, scheduler

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def gradient_sync(self, model: Any, sync: bool) -> contextlib.AbstractContextManager[Any]:
        """Around one micro-batch: gradients are exchanged only at the step's last one (`sync`)."""
        return contextlib.nullcontext()

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over the ranks."""
        return values

    def any(self, flag: bool) -> bool:
        """Whether any rank says yes: all ranks then act together (stop at the same step boundary)."""
        return flag

    def barrier(self) -> None:
        """Wait here until every rank arrives."""

    def full_state_dict(self, model: Any) -> dict[str, Any] | None:
        """The whole model's weights gathered from the ZeRO-3 shards (main process only); None when not sharded."""
        return None

    def save_sharded_state(self, folder: Path) -> None:
        """DeepSpeed: every rank writes its shard of weights, optimizer, scheduler and RNG states."""

    def load_sharded_state(self, folder: Path) -> None:
        """DeepSpeed: every rank reads its shard back."""

    def free_memory(self) -> None:
        """Drop references to a failed attempt's prepared objects."""

    def close(self) -> None:
        """Leave the process group (nothing to leave alone)."""


class AcceleratedRanks(Ranks):
    """The ranks of `accelerate launch`: DDP over gloo (CPU) or NCCL (GPUs), or DeepSpeed ZeRO (GPUs, or CPUs)."""

    def __init__(self, accelerator: Any) -> None:
        from accelerate.utils import DistributedType

        self.accelerator = accelerator
        self.rank = accelerator.process_index
        self.world_size = accelerator.num_processes
        self.is_main = accelerator.is_main_process
        self.device = accelerator.device
        self.deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        plugin = accelerator.state.deepspeed_plugin
        self.zero_stage = int(plugin.zero_stage) if self.deepspeed and plugin is not None else 0

    @property
    def gradient_factor(self) -> float:
        # DDP and ZeRO average the ranks' gradients; the loop's losses are already parts of the step's mean, so
        # summing is what it wants. DeepSpeed also divides each micro-batch's loss by its accumulation steps.
        if self.deepspeed:
            return float(self.world_size * self.accelerator.gradient_accumulation_steps)
        return float(self.world_size)

    def prepare(self, model: Any, optimizer: Any, scheduler: Any) -> tuple[Any, Any, Any]:
        # The loop keeps its own data order (resume mid-epoch, OOM re-splits), so no DataLoader is handed over:
        # each rank takes its slice of the seeded order with `shard`, and DeepSpeed's batch sizes are set
        # explicitly in its config instead of being read off a DataLoader.
        prepared = self.accelerator.prepare(model, optimizer, scheduler)
        return prepared[0], prepared[1], prepared[2]

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)  # DeepSpeed: the engine's backward, and its step at the accumulation boundary

    def gradient_sync(self, model: Any, sync: bool) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext() if sync else self.accelerator.no_sync(model)

    def sum(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return [float(value) for value in tensor.tolist()]

    def any(self, flag: bool) -> bool:
        return self.sum([1.0 if flag else 0.0])[0] > 0

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def full_state_dict(self, model: Any) -> dict[str, Any] | None:
        if self.zero_stage != 3:
            return None  # DDP and ZeRO-2 keep whole weights on every rank: the unwrapped model saves as it is
        return self.accelerator.get_state_dict(model)  # a collective: every rank calls it, rank 0 gets the weights

    def save_sharded_state(self, folder: Path) -> None:
        if self.deepspeed:
            self.accelerator.save_state(str(folder / DEEPSPEED_STATE_DIR))

    def load_sharded_state(self, folder: Path) -> None:
        if self.deepspeed:
            self.accelerator.load_state(str(folder / DEEPSPEED_STATE_DIR))

    def free_memory(self) -> None:
        self.accelerator.free_memory()

    def close(self) -> None:
        self.accelerator.end_training()


def machine_flags(options: TrainingOptions) -> list[str]:
    """`accelerate launch`'s multi-node flags, as --num_machines/--machine_rank/--main_process_ip/_port say."""
    flags = ["--num_machines", str(options.num_machines), "--machine_rank", str(options.machine_rank)]
    if options.main_process_ip is not None:
        flags += ["--main_process_ip", options.main_process_ip]
    if options.main_process_port is not None:
        flags += ["--main_process_port", str(options.main_process_port)]
    return flags


def multi_node_launch_command(options: TrainingOptions, train_args: list[str]) -> list[str]:
    """The `accelerate launch` command that starts this machine's ranks of a multi-node run of train_safe.py.

    Each machine runs one rank per GPU (one rank on a machine without GPUs, over gloo); every machine runs the
    same command with its own --machine_rank, and machine 0's address and port join them (torch.distributed's
    static rendezvous). With --deepspeed the preset's config goes along, as on one machine.
    """
    from backend.training.deepspeed_presets import TRAIN_SAFE_PATH, accelerate_executable, accelerate_launch_command

    per_machine = max(torch.cuda.device_count(), 1)
    total = per_machine * options.num_machines
    if options.deepspeed:
        # torch.distributed's launcher on every machine, as without DeepSpeed: accelerate's default for several
        # machines is DeepSpeed's own pdsh launcher, which starts the other machines' ranks over ssh itself.
        flags = [*machine_flags(options), "--deepspeed_multinode_launcher", "standard"]
        return accelerate_launch_command(options.deepspeed, train_args, total, machine_flags=flags)
    precision = "bf16" if options.bf16 else "fp16" if options.fp16 else "no"
    # --multi_gpu picks accelerate's torch.distributed launcher, which also runs CPU ranks (the trainer's
    # Accelerator then uses gloo); its --cpu mode would start CPU ranks only through MPI.
    return [
        accelerate_executable(), "launch", "--multi_gpu", "--num_processes", str(total), *machine_flags(options),
        "--mixed_precision", precision, "--dynamo_backend", "no", str(TRAIN_SAFE_PATH), *train_args,
    ]


def start_ranks(options: TrainingOptions, *, micro_batch_size: int, gradient_accumulation_steps: int) -> Ranks:
    """This process alone, or (under `accelerate launch`) an Accelerator over all the launched ranks."""
    if launched_world_size() <= 1:
        return Ranks()
    from accelerate import Accelerator

    plugin = None
    precision = "no"  # DDP: the loop's own autocast and GradScaler do mixed precision, as in one process
    if options.deepspeed:
        from accelerate.utils import DeepSpeedPlugin

        from backend.training.deepspeed_presets import deepspeed_run_config

        config = deepspeed_run_config(
            options.deepspeed, micro_batch_size=micro_batch_size,
            gradient_accumulation_steps=gradient_accumulation_steps, world_size=launched_world_size(),
        )
        plugin = DeepSpeedPlugin(hf_ds_config=config)
        precision = "bf16" if options.bf16 else "fp16" if options.fp16 else "no"  # DeepSpeed casts the weights
    cpu = not torch.cuda.is_available()
    handlers: list[Any] = []
    if cpu and plugin is not None:
        # DeepSpeed's CPU accelerator (DS_ACCELERATOR=cpu): Accelerate sets DeepSpeed up only when `cpu` is False,
        # and with no GPU it would then find no backend and count each rank as a world of one. Naming gloo makes
        # it start deepspeed.comm over gloo and take the world size and rank from that process group.
        from accelerate.utils import InitProcessGroupKwargs

        cpu = False
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    accelerator = Accelerator(
        cpu=cpu,  # no GPU: DDP over gloo on the CPU (how the tests run it)
        mixed_precision=precision,
        deepspeed_plugin=plugin,
        step_scheduler_with_optimizer=False,  # the loop steps the schedule once per optimizer step, not per rank
        kwargs_handlers=handlers,
    )
    return AcceleratedRanks(accelerator)
