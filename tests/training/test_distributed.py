"""The multi-process path: two real ranks under `accelerate launch` (DDP over gloo on the CPU), a tiny Llama.

The ranks run train_safe.py through a small driver that records, per rank, the token ids each micro-batch
carried (a spy around the trainer's `collate`, nothing replaced): that is how the tests see the shards.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from backend.training import trainer
from backend.training.checkpoints import COMPLETE_MARKER, read_trainer_state
from backend.training.datasets import TokenizedExample, collate
from backend.training.distributed import Processes, shard
from backend.training.options import TrainingOptions
from backend.training.trainer import run_training

REPO_ROOT = Path(__file__).resolve().parents[2]
ACCELERATE = Path(sys.executable).parent / "accelerate"
STEPS, SAVE_STEPS, PER_RANK_BATCH, RANKS = 6, 3, 2, 2
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "safetrain.json"}

DRIVER = '''
import json, os, sys
from backend.training import train_safe, trainer

log = open(os.path.join(os.environ["SHARD_LOG_DIR"], "rank%s.jsonl" % os.environ["RANK"]), "a")
real_collate = trainer.collate

def recording_collate(examples, pad_token_id):
    log.write(json.dumps([example.input_ids for example in examples]) + "\\n")
    log.flush()
    return real_collate(examples, pad_token_id)

trainer.collate = recording_collate
sys.exit(train_safe.main(sys.argv[1:]))
'''


@dataclass
class Launch:
    returncode: int
    output: str
    output_dir: Path
    shard_logs: Path

    def micro_batches(self, rank: int) -> list[list[list[int]]]:
        lines = (self.shard_logs / f"rank{rank}.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _training_flags(model: Path, data: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--model", str(model), "--data", str(data), "--output_dir", str(output_dir),
        "--use_lora", "--lora_dropout", "0", "--learning_rate", "5e-3", "--max_seq_length", "32",
        "--per_device_train_batch_size", str(PER_RANK_BATCH), "--max_steps", str(STEPS),
        "--save_steps", str(SAVE_STEPS), "--logging_steps", "1", "--seed", "7", *extra,
    ]


def _launch(work: Path, flags: list[str], output_dir: Path) -> Launch:
    """`accelerate launch` two CPU ranks (torch.distributed over gloo) running train_safe.py with `flags`."""
    driver, logs = work / "driver.py", work / f"shards-{output_dir.name}"
    driver.write_text(DRIVER)
    logs.mkdir()
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",  # one thread a rank: the machine is small and shared
        "PYTHONPATH": str(REPO_ROOT),
        "HF_HOME": str(work / "hf-home"),  # no accelerate default config from the user's cache
        "SHARD_LOG_DIR": str(logs),
    }
    # --multi_gpu picks accelerate's torch.distributed launcher; with no GPU the trainer's Accelerator runs on
    # the CPU (gloo). `--cpu --num_processes 2` would start a single process: accelerate only runs several CPU
    # processes through MPI.
    command = [
        str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", str(RANKS), "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        str(driver), *flags,
    ]
    done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    return Launch(done.returncode, done.stdout + done.stderr, output_dir, logs)


@pytest.fixture(scope="module")
def learnable_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """32 distinct short texts with an easy pattern to learn."""
    path = tmp_path_factory.mktemp("data") / "counting.jsonl"
    rows = [{"text": f"Item {i}: {i} {i + 1} {i + 2} {i + 3} {i + 4} come in order."} for i in range(32)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def two_rank_run(tiny_llama: Path, learnable_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Launch:
    work = tmp_path_factory.mktemp("two-ranks")
    output_dir = work / "run"
    launch = _launch(work, _training_flags(tiny_llama, learnable_data, output_dir), output_dir)
    assert launch.returncode == 0, launch.output[-4000:]
    return launch


@pytest.fixture(scope="module")
def one_process_run(tiny_llama: Path, learnable_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The same run in one process with the same effective batch (2 micro-batches of 2 per step)."""
    output_dir = tmp_path_factory.mktemp("one-process") / "run"
    seen: list[list[list[int]]] = []

    def recording_collate(examples: list[TokenizedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
        seen.append([example.input_ids for example in examples])
        return collate(examples, pad_token_id)

    options = TrainingOptions(
        model=str(tiny_llama), data=str(learnable_data), output_dir=str(output_dir), use_lora=True, lora_dropout=0.0,
        learning_rate=5e-3, max_seq_length=32, per_device_train_batch_size=PER_RANK_BATCH,
        gradient_accumulation_steps=RANKS, max_steps=STEPS, save_steps=SAVE_STEPS, logging_steps=1, seed=7,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer, "collate", recording_collate)
        result = run_training(options)
    torch.set_num_threads(threads)
    assert result.status == "succeeded", result.error_message
    return {"output_dir": output_dir, "micro_batches": seen}


def _losses(output_dir: Path) -> list[float]:
    return read_trainer_state(output_dir / f"checkpoint-{STEPS}").recent_losses


def test_two_ranks_train_and_write_one_adapter(two_rank_run, tiny_llama):
    output_dir = two_rank_run.output_dir
    assert {path.name for path in output_dir.iterdir()} >= ADAPTER_FILES
    assert not any(path.name.startswith((".tmp-", ".saving-")) for path in output_dir.iterdir())
    # Events and telemetry come from rank 0 alone: one summary, one telemetry line per step.
    assert two_rank_run.output.count("Done: 6 steps") == 1
    telemetry = [json.loads(line) for line in (output_dir / "telemetry.jsonl").read_text().splitlines()]
    assert [record["step"] for record in telemetry] == list(range(1, STEPS + 1))

    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), output_dir)
    input_ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        assert not torch.allclose(base(input_ids).logits, tuned(input_ids).logits, atol=1e-4)


def test_ranks_train_on_disjoint_slices_of_the_seeded_order(two_rank_run, one_process_run):
    rank0, rank1 = two_rank_run.micro_batches(0), two_rank_run.micro_batches(1)
    assert len(rank0) == len(rank1) == STEPS  # one micro-batch of 2 per rank and step

    as_set = lambda batches: {tuple(ids) for batch in batches for ids in batch}  # noqa: E731
    assert as_set(rank0).isdisjoint(as_set(rank1))
    assert len(as_set(rank0)) == len(as_set(rank1)) == STEPS * PER_RANK_BATCH
    # Step by step, rank 0 took the first half of what one process trained on in that step, rank 1 the second.
    single = one_process_run["micro_batches"]
    assert [single[2 * step] for step in range(STEPS)] == rank0
    assert [single[2 * step + 1] for step in range(STEPS)] == rank1


def test_two_ranks_match_one_process_with_the_same_effective_batch(two_rank_run, one_process_run):
    distributed, single = _losses(two_rank_run.output_dir), _losses(one_process_run["output_dir"])

    assert len(distributed) == len(single) == STEPS
    assert distributed == pytest.approx(single, abs=1e-4)
    assert sum(distributed[-2:]) < 0.98 * sum(distributed[:2]), distributed  # and it learns


def test_checkpoint_is_complete_and_two_ranks_resume_from_it(two_rank_run, tiny_llama, learnable_data, tmp_path):
    checkpoint = two_rank_run.output_dir / f"checkpoint-{SAVE_STEPS}"
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pt", COMPLETE_MARKER} <= {
        path.name for path in checkpoint.iterdir()
    }
    assert read_trainer_state(checkpoint).step == SAVE_STEPS
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(checkpoint, resumed_dir / checkpoint.name)

    flags = _training_flags(tiny_llama, learnable_data, resumed_dir, "--resume_from_checkpoint", "latest")
    resumed = _launch(tmp_path, flags, resumed_dir)

    assert resumed.returncode == 0, resumed.output[-4000:]
    assert f"at step {SAVE_STEPS}" in resumed.output
    assert len(resumed.micro_batches(0)) == STEPS - SAVE_STEPS  # only the steps after the checkpoint ran
    assert _losses(resumed_dir) == pytest.approx(_losses(two_rank_run.output_dir), abs=1e-5)
    adapter = load_file(resumed_dir / "adapter_model.safetensors")
    uninterrupted = load_file(two_rank_run.output_dir / "adapter_model.safetensors")
    assert all(torch.allclose(adapter[name], uninterrupted[name], atol=1e-5) for name in uninterrupted)


def test_shard_gives_each_rank_a_contiguous_disjoint_slice():
    step = list(range(8))
    assert [shard(step, rank, 2) for rank in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [shard(step[:3], rank, 2) for rank in range(2)] == [[0, 1], [2]]  # a short last step
    assert shard(step, 0, 1) == step


def test_one_process_has_no_ranks():
    processes = Processes()
    assert (processes.rank, processes.world_size, processes.is_main, processes.deepspeed) == (0, 1, True, False)
    assert processes.sum([1.5, 2.0]) == [1.5, 2.0] and processes.any(True) and not processes.any(False)
