"""--tiled_mlp: each MLP over tiles of the sequence, recomputed tile by tile in the backward.

The gradients must be those of the plain MLP (to 1e-5 in fp32) with LoRA and without, with and without
checkpointing (reentrant too), and with dropout inside the MLP the recompute must draw the forward's masks; the
MLP must keep only its input for the backward; and the trainer's losses must not change.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

import backend.training.tiled_mlp as tiled_mlp
from backend.training.memory_estimate import estimate_memory, mlp_tile_tokens
from backend.training.model_shape import load_model_config, model_shape
from backend.training.modeling import load_model_and_tokenizer
from backend.training.options import TrainingOptions
from backend.training.tiled_mlp import apply_tiled_mlp, decoder_mlps
from backend.training.trainer import run_training
from benchmarks.live_tensors import LiveTensorPeak
from tests.support.network import free_port

TILE, TOKENS = 8, 44  # five full tiles and a short one


def _prepared_model(folder: Path, *, tiled: bool, dropout: bool, **settings: object) -> torch.nn.Module:
    options = TrainingOptions(model=str(folder), lora_r=4, lora_dropout=0.1 if dropout else 0.0, **settings)
    torch.manual_seed(0)
    model, _tokenizer = load_model_and_tokenizer(options)
    if not dropout:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    for name, param in model.named_parameters():
        if "lora_B" in name:  # zero at first, which would make every lora_A gradient zero
            torch.nn.init.normal_(param, std=0.05, generator=torch.Generator().manual_seed(3))
    if tiled:
        assert apply_tiled_mlp(model, tile_tokens=TILE) == 2
    elif dropout:  # the reference draws each tile's masks in the same order, through the plain MLP with autograd
        for module in decoder_mlps(model):
            plain = module.forward
            module.forward = lambda x, plain=plain: torch.cat([plain(p.contiguous()) for p in x.split(TILE, -2)], -2)
    return model.train()


def _gradients(
    folder: Path, *, tiled: bool, dropout: bool, wrap: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m,
    **settings: object,
) -> dict[str, torch.Tensor]:
    model = _prepared_model(folder, tiled=tiled, dropout=dropout, **settings)
    ids = torch.randint(1, 400, (2, TOKENS), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    wrap(model)(input_ids=ids, labels=ids).loss.backward()
    return {name: param.grad for name, param in model.named_parameters() if param.requires_grad}


@pytest.mark.parametrize("settings", [
    {"use_lora": True},
    {"use_lora": True, "gradient_checkpointing": True},
    {"use_lora": True, "use_8bit": True, "gradient_checkpointing": True},  # reentrant checkpointing
    {"use_lora": True, "use_4bit": True, "gradient_checkpointing": True},  # non-reentrant, k-bit prepared
    {"use_lora": False, "gradient_checkpointing": True},
], ids=["lora", "lora-checkpointed", "lora-8bit-reentrant", "lora-4bit-checkpointed", "full-checkpointed"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_tiled_mlp_gradients_equal_the_plain_mlps(tiny_model_folders, arch, settings):
    plain = _gradients(tiny_model_folders[arch], tiled=False, dropout=False, **settings)
    tiled = _gradients(tiny_model_folders[arch], tiled=True, dropout=False, **settings)
    assert plain.keys() == tiled.keys() and any(".mlp." in name for name in plain)
    for name, gradient in plain.items():
        assert tiled[name] is not None, f"{name} got no gradient through the tiles"
        torch.testing.assert_close(tiled[name], gradient, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_the_recompute_draws_the_forwards_dropout_masks(tiny_model_folders, arch):
    """GPT-2's residual dropout and LoRA's dropout run inside the MLP: each tile's random state is replayed."""
    reference = _gradients(tiny_model_folders[arch], tiled=False, dropout=True, use_lora=True)
    tiled = _gradients(tiny_model_folders[arch], tiled=True, dropout=True, use_lora=True)
    for name, gradient in reference.items():
        torch.testing.assert_close(tiled[name], gradient, rtol=1e-5, atol=1e-6, msg=name)


def _saved_bytes(mlp: torch.nn.Module, x: torch.Tensor) -> int:
    saved: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = mlp(x)  # what the forward leaves for the backward
    output.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    return sum(saved)


def test_the_tiled_mlp_keeps_only_its_input():
    config = LlamaConfig(hidden_size=64, intermediate_size=1024, hidden_act="silu")
    tokens = 512
    x = torch.randn(1, tokens, 64, requires_grad=True)
    whole = _saved_bytes(LlamaMLP(config), x)
    mlp = LlamaMLP(config)
    tiled_mlp.tile_mlp_forward(mlp, 64)
    tiles = _saved_bytes(mlp, x)
    assert whole >= 3 * tokens * 1024 * 4  # gate, act(gate), up
    assert tiles <= tokens * 64 * 4 + 1024  # the input (and nothing of the intermediates) waits for the backward


def _forward_backward_peak(mlp: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> int:
    with LiveTensorPeak() as live:
        mlp(x).backward(grad)
    return live.peak


def test_the_tiled_mlps_live_peak_is_one_tiles_intermediates():
    config = LlamaConfig(hidden_size=64, intermediate_size=1024, hidden_act="silu")
    tokens, tile = 512, 64
    torch.manual_seed(0)
    mlp = LlamaMLP(config)
    x, grad = torch.randn(1, tokens, 64, requires_grad=True), torch.randn(1, tokens, 64)
    whole = _forward_backward_peak(mlp, x, grad)
    whole_grads = [param.grad.clone() for param in mlp.parameters()]
    mlp.zero_grad(set_to_none=True)
    with torch.no_grad():
        expected_output = mlp(x)
    tiled_mlp.tile_mlp_forward(mlp, tile)
    tiles = _forward_backward_peak(mlp, x, grad)
    assert whole >= 4 * tokens * 1024 * 4  # gate, up, act(gate), their product: the sequence's intermediates
    weights = sum(param.numel() for param in mlp.parameters()) * 4  # the weights' gradients, made in the backward
    # the output and the input's gradient, one tile's intermediates and their gradients, the weights' gradients
    assert tiles <= 3 * tokens * 64 * 4 + 8 * tile * 1024 * 4 + 2 * weights < whole / 2
    for param, expected in zip(mlp.parameters(), whole_grads, strict=True):
        torch.testing.assert_close(param.grad, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # evaluation: the tiles alone, the plain MLP's output
        torch.testing.assert_close(mlp(x), expected_output)


def test_tiled_mlp_gradients_reach_ddp_once_per_backward(tiny_llama):
    """DDP's reducer marks each parameter ready once a backward: the tiles' gradients arrive summed, in one piece."""
    plain = _gradients(tiny_llama, tiled=False, dropout=False, use_lora=True)
    store = torch.distributed.TCPStore("127.0.0.1", free_port(), 1, is_master=True)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        tiled = _gradients(tiny_llama, tiled=True, dropout=False, use_lora=True,
                           wrap=torch.nn.parallel.DistributedDataParallel)
    finally:
        torch.distributed.destroy_process_group()
    for name, gradient in plain.items():
        torch.testing.assert_close(tiled[name], gradient, rtol=1e-5, atol=1e-6, msg=name)


def test_a_tiled_run_trains_the_same_and_the_plan_counts_it(tiny_llama, learnable_data, tmp_path, monkeypatch):
    monkeypatch.setattr(tiled_mlp, "MIN_TILE_TOKENS", 8)  # tiles of 16 tokens for the 64-wide model
    losses: dict[bool, list[float]] = {False: [], True: []}
    for tiled in (False, True):
        options = TrainingOptions(
            model=str(tiny_llama), data=str(learnable_data), output_dir=str(tmp_path / str(tiled)), use_lora=True,
            lora_dropout=0.0, max_steps=6, max_seq_length=48, packing=True, learning_rate=1e-2,
            gradient_checkpointing=True, logging_steps=1, tiled_mlp=tiled,
        )
        record = losses[tiled].append
        result = run_training(
            options, on_event=lambda event, record=record: event.kind == "metrics" and record(event.data["train_loss"]))
        assert result.status == "succeeded", result.error_message
    assert len(losses[True]) == 6 and sum(losses[True][-2:]) < sum(losses[True][:2])
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-6, atol=1e-6)

    config = load_model_config(str(tiny_llama))
    options = TrainingOptions(model=str(tiny_llama), use_lora=True, max_seq_length=48, tiled_mlp=True)
    assert mlp_tile_tokens(options, model_shape(config)) == 16
    plan = estimate_memory(options, config, device="cpu")
    assert plan.savings["tiled_mlp"] > 0 and "tiled_mlp" in plan.techniques
    untiled = estimate_memory(options.model_copy(update={"tiled_mlp": False}), config, device="cpu")
    assert plan.breakdown.activations == untiled.breakdown.activations - plan.savings["tiled_mlp"]


def test_tiled_mlp_with_deepspeed_is_refused():
    with pytest.raises(ValueError, match="--tiled_mlp and --deepspeed"):
        TrainingOptions(use_lora=False, tiled_mlp=True, deepspeed="zero2")
