"""--tiled_mlp: each layer's MLP computed a tile of tokens at a time, recomputed tile by tile in the backward.

At long context the MLP's intermediates (gate, act(gate), up: 3 x 14,336 values a token for Llama-3-8B, and the
adapters' inputs) are most of what one layer keeps for its backward. `TiledMLP` runs the MLP over slices of the
sequence without keeping anything but its input; the backward recomputes one slice with autograd on, pushes that
slice of the output gradient through it (the input gradient's slice is written, the parameters' gradients, such as
the LoRA adapters', are summed over the tiles) and frees it before the next. Only one tile's intermediates exist
at a time, in the spirit of Arctic Long Sequence Training's TiledMLP (DeepSpeed). The summed parameter gradients
are the Function's own gradients for the parameters it takes as inputs, so autograd accumulates each into `.grad`
once a backward, as for any layer (DDP's reducer and gradient hooks see one gradient, not one per tile).

The random-number state is saved before each tile and restored for its recompute, so dropout inside the MLP
(GPT-2's residual dropout, LoRA's dropout) draws the same masks: the gradients equal the plain MLP's.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

MIN_TILE_TOKENS = 256


def tile_tokens_for(hidden_size: int) -> int:
    """Tokens per tile: a quarter of the hidden size (1,024 for a 4,096-wide model), at least 256.

    The tile's intermediates (tile x intermediate) then stay well under one weight matrix, and each tile's
    matmuls (tile x hidden x intermediate) are still large enough to run at full speed on a GPU.
    """
    return max(MIN_TILE_TOKENS, hidden_size // 4)


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class TiledMLP(torch.autograd.Function):
    """The MLP over tiles of the sequence (dim -2), keeping only its input for the backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, mlp: Callable[[torch.Tensor], torch.Tensor], tile: int, x: torch.Tensor, *params: torch.Tensor
    ) -> torch.Tensor:
        ctx.mlp, ctx.tile, ctx.params = mlp, tile, params
        ctx.autocast = _autocast_state(x.device)
        ctx.rng_states = []
        with torch.no_grad():
            output = _mlp_by_tiles(mlp, x, tile, before_tile=lambda: ctx.rng_states.append(_rng_state(x.device)))
        ctx.save_for_backward(x)
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        params = [param for param, needed in zip(ctx.params, ctx.needs_input_grad[3:], strict=True) if needed]
        x_grad = torch.empty_like(x) if ctx.needs_input_grad[2] else None
        param_grads: list[torch.Tensor | None] = [None] * len(params)
        for index, (start, piece) in enumerate(zip(range(0, x.shape[-2], ctx.tile), _tiles(x, ctx.tile), strict=True)):
            piece = piece.detach().requires_grad_(x_grad is not None)
            wrt = [piece, *params] if x_grad is not None else params
            grads = _tile_gradients(ctx, index, piece, wrt, grad_output[..., start:start + ctx.tile, :].contiguous())
            if x_grad is not None:
                piece_grad, grads = grads[0], grads[1:]
                assert piece_grad is not None  # the MLP's output depends on its input
                x_grad[..., start:start + ctx.tile, :] = piece_grad
            param_grads = [_accumulate(total, grad) for total, grad in zip(param_grads, grads, strict=True)]
        # Returned, not accumulated into `.grad` tile by tile: DDP's reducer marks a parameter ready once a backward.
        by_param = iter(param_grads)
        return (None, None, x_grad, *(next(by_param) if needed else None for needed in ctx.needs_input_grad[3:]))


def _tile_gradients(
    ctx: Any, index: int, piece: torch.Tensor, wrt: list[torch.Tensor], grad_output: torch.Tensor
) -> tuple[torch.Tensor | None, ...]:
    """One tile recomputed with autograd on (the forward's random state and autocast), and its gradients."""
    devices = [piece.device] if piece.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.enable_grad(), torch.autocast(**ctx.autocast):
        _set_rng_state(ctx.rng_states[index], piece.device)
        output = ctx.mlp(piece)
    return torch.autograd.grad(output, wrt, grad_output, allow_unused=True)


def _accumulate(total: torch.Tensor | None, grad: torch.Tensor | None) -> torch.Tensor | None:
    if total is None or grad is None:
        return grad if total is None else total
    return total.add_(grad)


def _tiles(x: torch.Tensor, tile: int) -> Iterator[torch.Tensor]:
    """The sequence's slices, each made contiguous only when its turn comes (GPT-2's Conv1D views its input flat)."""
    return (piece.contiguous() for piece in x.split(tile, dim=-2))


def _mlp_by_tiles(
    mlp: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, before_tile: Callable[[], None]
) -> torch.Tensor:
    """The MLP's output, each tile written into it as computed (a list of tiles and a cat would hold it twice)."""
    output: torch.Tensor | None = None
    for start, piece in zip(range(0, x.shape[-2], tile), _tiles(x, tile), strict=True):
        before_tile()
        result = mlp(piece)
        if output is None:  # the output's dtype is the MLP's (autocast may change it), its shape the input's
            output = result.new_empty((*x.shape[:-1], result.shape[-1]))
        output[..., start:start + tile, :] = result
    assert output is not None
    return output


def _autocast_state(device: torch.device) -> dict[str, Any]:
    """The forward's autocast, for the recompute (the backward runs outside it)."""
    kind = device.type if device.type in ("cuda", "cpu") else "cpu"
    return {"device_type": kind, "dtype": torch.get_autocast_dtype(kind), "enabled": torch.is_autocast_enabled(kind)}


def tile_mlp_forward(module: nn.Module, tile: int) -> None:
    """Replace `module.forward` (an MLP taking [..., tokens, hidden]) by its tiled form; short inputs run it whole."""
    plain = module.forward

    def tiled_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.shape[-2] <= tile:
            return plain(hidden_states)
        if not torch.is_grad_enabled():  # no backward: the tiles alone, one at a time
            return _mlp_by_tiles(plain, hidden_states, tile, before_tile=lambda: None)
        trainable = [param for param in self.parameters() if param.requires_grad]
        return TiledMLP.apply(plain, tile, hidden_states, *trainable)

    module.forward = types.MethodType(tiled_forward, module)  # type: ignore[method-assign]


def decoder_mlps(model: nn.Module) -> list[nn.Module]:
    """Each decoder layer's MLP module (Llama-family `mlp`, GPT-2's `GPT2MLP`), found by name and class."""
    return [
        module for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] == "mlp" and type(module).__name__.endswith("MLP")
    ]


def apply_tiled_mlp(model: nn.Module, tile_tokens: int | None = None) -> int:
    """Tile every decoder layer's MLP of `model`; returns how many were tiled (none found is an error)."""
    config = getattr(model, "config", None)
    hidden = config.get_text_config().hidden_size if config is not None else 0
    tile = tile_tokens or tile_tokens_for(hidden)
    mlps = decoder_mlps(model)
    if not mlps:
        raise ValueError(f"--tiled_mlp found no decoder-layer MLP in {type(model).__name__}: drop --tiled_mlp")
    for module in mlps:
        tile_mlp_forward(module, tile)
    return len(mlps)
