"""The multi-process path: two real ranks under `accelerate launch` (DDP over gloo on the CPU), a tiny Llama.

The ranks run train_safe.py through a small driver that records, per rank, the token ids each micro-batch
carried (a spy around the trainer's `collate`, nothing replaced): that is how the tests see the shards. With
STOP_RANK set, that rank alone sends itself SIGTERM at its first micro-batch, as a cancel reaching one rank.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from backend.training import trainer
from backend.training.checkpoints import COMPLETE_MARKER, read_trainer_state
from backend.training.datasets import TokenizedExample, collate
from backend.training.deepspeed_presets import deepspeed_available
from backend.training.distributed import Ranks as Processes
from backend.training.distributed import shard
from backend.training.options import TrainingOptions
from backend.training.trainer import run_training
from tests.support.network import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
ACCELERATE = Path(sys.executable).parent / "accelerate"
STEPS, SAVE_STEPS, PER_RANK_BATCH, RANKS = 6, 3, 2, 2
NAN_STEP = 5  # an injected NaN: every rank rolls back to checkpoint-3 together, the lr halved
# Steps as they ran: 1-4, the NaN at 5, then 4-6 again from the checkpoint.
STEPS_RUN = [1, 2, 3, 4, 5, 4, 5, 6]
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "safetrain.json"}

DRIVER = '''
import json, os, signal, sys
from backend.training import train_safe, trainer

log = open(os.path.join(os.environ["SHARD_LOG_DIR"], "rank%s.jsonl" % os.environ["RANK"]), "a")
real_collate = trainer.collate

def recording_collate(examples, pad_token_id):
    log.write(json.dumps([example.input_ids for example in examples]) + "\\n")
    log.flush()
    if os.environ.get("STOP_RANK") == os.environ["RANK"]:
        os.environ.pop("STOP_RANK")
        os.kill(os.getpid(), signal.SIGTERM)
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


def _training_flags(model: Path, data: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--model", str(model), "--data", str(data), "--output_dir", str(output_dir),
        "--use_lora", "--lora_dropout", "0", "--learning_rate", "5e-3", "--max_seq_length", "32",
        "--per_device_train_batch_size", str(PER_RANK_BATCH), "--max_steps", str(STEPS),
        "--save_steps", str(SAVE_STEPS), "--logging_steps", "1", "--seed", "7",
        "--inject_nan_at_step", str(NAN_STEP), *extra,
    ]


def _launch(work: Path, flags: list[str], output_dir: Path, **extra_env: str) -> Launch:
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
        **extra_env,
    }
    # --multi_gpu picks accelerate's torch.distributed launcher; with no GPU the trainer's Accelerator runs on
    # the CPU (gloo). `--cpu --num_processes 2` would start a single process: accelerate only runs several CPU
    # processes through MPI.
    command = [
        str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", str(RANKS), "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        str(driver), *flags,
    ]
    done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    return Launch(done.returncode, done.stdout + done.stderr, output_dir, logs)


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
        inject_nan_at_step=NAN_STEP,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer, "collate", recording_collate)
        result = run_training(options)
    torch.set_num_threads(threads)
    assert result.status == "succeeded", result.error_message
    return {"output_dir": output_dir, "micro_batches": seen}


def _losses_at(checkpoint: Path) -> list[float]:
    return read_trainer_state(checkpoint).recent_losses


def _losses(output_dir: Path) -> list[float]:
    return _losses_at(output_dir / f"checkpoint-{STEPS}")


def test_two_ranks_train_and_write_one_adapter(two_rank_run, tiny_llama):
    output_dir = two_rank_run.output_dir
    assert {path.name for path in output_dir.iterdir()} >= ADAPTER_FILES
    assert not any(path.name.startswith((".tmp-", ".saving-")) for path in output_dir.iterdir())
    # Events and telemetry come from rank 0 alone: one summary, one telemetry line per step.
    assert two_rank_run.output.count("Done: 6 steps") == 1
    assert two_rank_run.output.count(f"Non-finite values at step {NAN_STEP}") == 1
    telemetry = [json.loads(line) for line in (output_dir / "telemetry.jsonl").read_text().splitlines()]
    assert [record["step"] for record in telemetry] == [1, 2, 3, 4, 4, 5, 6]  # step 5's NaN is never logged

    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), output_dir)
    input_ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        assert not torch.allclose(base(input_ids).logits, tuned(input_ids).logits, atol=1e-4)


def test_ranks_train_on_disjoint_slices_of_the_seeded_order(two_rank_run, one_process_run):
    rank0, rank1 = two_rank_run.micro_batches(0), two_rank_run.micro_batches(1)
    assert len(rank0) == len(rank1) == len(STEPS_RUN)  # one micro-batch of 2 per rank and step

    as_set = lambda batches: {tuple(ids) for batch in batches for ids in batch}  # noqa: E731
    assert as_set(rank0).isdisjoint(as_set(rank1))
    assert len(as_set(rank0)) == len(as_set(rank1)) == STEPS * PER_RANK_BATCH
    # Step by step, rank 0 took the first half of what one process trained on in that step, rank 1 the second.
    single = one_process_run["micro_batches"]
    assert [single[2 * step] for step in range(len(STEPS_RUN))] == rank0
    assert [single[2 * step + 1] for step in range(len(STEPS_RUN))] == rank1


def test_two_ranks_match_one_process_with_the_same_effective_batch(two_rank_run, one_process_run):
    distributed, single = _losses(two_rank_run.output_dir), _losses(one_process_run["output_dir"])

    assert len(distributed) == len(single) == STEPS
    assert distributed == pytest.approx(single, abs=1e-4)
    assert sum(distributed[-2:]) < 0.98 * sum(distributed[:2]), distributed  # and it learns


def test_two_ranks_resume_and_stop_together_on_a_signal_to_one(two_rank_run, tiny_llama, learnable_data, tmp_path):
    checkpoint = two_rank_run.output_dir / f"checkpoint-{SAVE_STEPS}"
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pt", COMPLETE_MARKER} <= {
        path.name for path in checkpoint.iterdir()
    }
    assert read_trainer_state(checkpoint).step == SAVE_STEPS
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(checkpoint, resumed_dir / checkpoint.name)

    flags = _training_flags(tiny_llama, learnable_data, resumed_dir, "--resume_from_checkpoint", "latest")
    resumed = _launch(tmp_path, flags, resumed_dir, STOP_RANK="1")  # SIGTERM reaches rank 1 during step 4

    assert f"Resumed from {resumed_dir / checkpoint.name} at step {SAVE_STEPS}" in resumed.output
    stop_step = SAVE_STEPS + 1
    # Rank 0 never got the signal, yet both ranks ran step 4 only and stopped after it, with one checkpoint.
    assert resumed.output.count(f"Stopped at step {stop_step}: checkpoint") == 1, resumed.output[-4000:]
    assert len(resumed.micro_batches(0)) == len(resumed.micro_batches(1)) == 1
    assert resumed.returncode != 0  # the ranks exit 75 (stopped), which accelerate launch reports as a failure
    stopped = resumed_dir / f"checkpoint-{stop_step}"
    assert (stopped / COMPLETE_MARKER).is_file() and read_trainer_state(stopped).step == stop_step
    assert not any(path.name.startswith(".tmp-") for path in resumed_dir.iterdir())
    # The resumed step trained on the same data to the same loss as the uninterrupted run's step 4.
    assert resumed.micro_batches(0) == [two_rank_run.micro_batches(0)[SAVE_STEPS]]
    assert _losses_at(stopped) == pytest.approx(_losses(two_rank_run.output_dir)[:stop_step], abs=1e-5)


def test_shard_gives_each_rank_a_contiguous_disjoint_slice():
    step = list(range(8))
    assert [shard(step, rank, 2) for rank in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [shard(step[:3], rank, 2) for rank in range(2)] == [[0, 1], [2]]  # a short last step
    assert shard(step, 0, 1) == step


def test_one_process_has_no_ranks():
    processes = Processes()
    assert (processes.rank, processes.world_size, processes.is_main, processes.deepspeed) == (0, 1, True, False)
    assert processes.sum([1.5, 2.0]) == [1.5, 2.0] and processes.any(True) and not processes.any(False)


@pytest.mark.skipif(deepspeed_available() and torch.cuda.device_count() > 1, reason="this machine can run DeepSpeed")
def test_deepspeed_in_a_launched_rank_that_cannot_run_it_is_refused_before_loading(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as `accelerate launch` would set it
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)  # DeepSpeed's CPU accelerator would let a CPU rank run it
    options = TrainingOptions(model=str(tmp_path / "never-loaded"), output_dir=str(tmp_path / "out"), deepspeed="zero3")

    result = run_training(options)

    assert result.status == "failed" and result.error_code == "invalid_options"
    message = result.error_message or ""
    assert message.startswith("--deepspeed zero3 needs DeepSpeed and more than one GPU")
    assert f"this machine has {torch.cuda.device_count()} GPU(s)" in message
    assert ("DeepSpeed is not installed" in message) is not deepspeed_available()
    assert not (tmp_path / "out").exists()  # refused before the model folder was even looked for
