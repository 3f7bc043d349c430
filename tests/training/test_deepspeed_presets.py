"""DeepSpeed presets: the configs Accelerate will accept, and the launch command it will parse."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from accelerate.commands.launch import launch_command_parser
from accelerate.utils import DeepSpeedPlugin

from backend.training.deepspeed_presets import (
    TRAIN_SAFE_PATH,
    accelerate_launch_command,
    deepspeed_available,
    deepspeed_config,
    deepspeed_run_config,
    write_deepspeed_config,
)
from backend.training.options import DEEPSPEED_PRESETS


@pytest.mark.parametrize("preset", DEEPSPEED_PRESETS)
def test_preset_shape(preset):
    config = deepspeed_config(preset)
    zero = config["zero_optimization"]

    assert zero["stage"] == (3 if preset.startswith("zero3") else 2)
    for key in ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps"):
        assert config[key] == "auto"
    assert config["bf16"]["enabled"] == config["fp16"]["enabled"] == "auto"
    offload = preset.endswith("-offload")
    assert ("offload_optimizer" in zero) is offload
    assert ("offload_param" in zero) is (offload and zero["stage"] == 3)  # ZeRO-2 cannot offload parameters
    for section in ("offload_optimizer", "offload_param"):
        if section in zero:
            assert zero[section] == {"device": "cpu", "pin_memory": True}
    assert json.loads(json.dumps(config)) == config


@pytest.mark.parametrize("preset", DEEPSPEED_PRESETS)
def test_accelerate_fills_every_auto_value(preset, tmp_path):
    """Replays what `accelerator.prepare` does with a config file: no "auto" may be left over."""
    plugin = DeepSpeedPlugin(hf_ds_config=str(write_deepspeed_config(preset, tmp_path)))
    plugin.set_mixed_precision("bf16")
    plugin.fill_match("gradient_accumulation_steps", must_match=False, gradient_accumulation_steps=4)
    hidden = 64
    plugin.deepspeed_config_process(
        must_match=False,
        gradient_clipping=1.0,
        train_micro_batch_size_per_gpu=2,
        train_batch_size=2 * 4 * 2,
        **{
            "zero_optimization.reduce_bucket_size": hidden * hidden,
            "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
            "zero_optimization.stage3_param_persistence_threshold": 10 * hidden,
        },
    )
    filled = plugin.deepspeed_config
    assert '"auto"' not in json.dumps(filled)
    assert filled["bf16"]["enabled"] is True and filled["fp16"]["enabled"] is False
    assert filled["gradient_accumulation_steps"] == 4


def test_unknown_preset_is_refused(tmp_path):
    with pytest.raises(ValueError, match="zero2, zero2-offload, zero3, zero3-offload"):
        deepspeed_config("zero1")
    with pytest.raises(ValueError, match="not a preset"):
        write_deepspeed_config("zero4", tmp_path)


def test_launch_command_parses_as_accelerate_launch(tmp_path):
    train_args = ["--model", "tiny", "--output_dir", str(tmp_path / "run"), "--use_lora", "--bf16"]

    command = accelerate_launch_command("zero3-offload", train_args, 4)

    assert Path(command[0]).name.startswith("accelerate") and command[1] == "launch"
    args = launch_command_parser().parse_args(command[2:])
    assert args.use_deepspeed is True
    assert args.num_processes == 4
    assert args.mixed_precision == "bf16"
    assert Path(args.training_script) == TRAIN_SAFE_PATH
    assert args.training_script_args == train_args
    config_file = Path(args.deepspeed_config_file)
    assert config_file == tmp_path / "run" / "deepspeed_zero3-offload.json"
    assert json.loads(config_file.read_text()) == deepspeed_config("zero3-offload")


def test_launch_command_config_dir_and_precision(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    command = accelerate_launch_command("zero2", ["--model", "tiny"], 2, config_dir=tmp_path / "cfg")
    args = launch_command_parser().parse_args(command[2:])
    assert Path(args.deepspeed_config_file) == tmp_path / "cfg" / "deepspeed_zero2.json"
    assert args.mixed_precision == "no"
    with pytest.raises(ValueError, match="num_processes"):
        accelerate_launch_command("zero2", [], 0)


def test_deepspeed_available_matches_what_is_installed():
    assert deepspeed_available() is (importlib.util.find_spec("deepspeed") is not None)


@pytest.mark.parametrize("preset", DEEPSPEED_PRESETS)
def test_run_config_sets_what_accelerate_would_read_off_a_dataloader(preset):
    """The trainer hands Accelerate no DataLoader: the batch sizes and clipping are filled in beforehand."""
    config = deepspeed_run_config(preset, micro_batch_size=2, gradient_accumulation_steps=4, world_size=8)

    assert config["train_micro_batch_size_per_gpu"] == 2
    assert config["gradient_accumulation_steps"] == 4
    assert config["train_batch_size"] == 2 * 4 * 8
    assert config["gradient_clipping"] == 1.0
    plugin = DeepSpeedPlugin(hf_ds_config=config)
    plugin.set_mixed_precision("bf16")
    assert plugin.deepspeed_config["train_batch_size"] == 64 and plugin.is_auto("zero_optimization.reduce_bucket_size")
