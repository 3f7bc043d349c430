"""--offload_activations: each checkpointed layer's saved input waits for the backward in host memory.

With gradient checkpointing a layer keeps only its input (layers x tokens x hidden in all), which is what is
left of the activations at long context. `ActivationOffloader` wraps each layer's checkpoint function in
`torch.autograd.graph.saved_tensors_hooks`: the tensors the checkpoint saves for its recompute (the layer's
inputs; the layer's own tensors are the checkpoint's business, under its inner hooks) are packed into host
memory and unpacked back for the recompute.

On CUDA the copies go to pinned memory on a side stream, so the forward does not wait for them, and the
backward fetches the input of the layer it will recompute next while the current one runs. On the CPU the
tensors already live in host memory: the same path runs (a host copy is made and the original freed), which
is how the tests check it.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(eq=False)
class _Offloaded:
    """One saved tensor's host copy, and its device copy once fetched for the backward."""

    host: torch.Tensor
    device: torch.device
    version: int = 0  # the source tensor's version when copied: an in-place change after it needs a new copy
    copied: torch.cuda.Event | None = None  # the device-to-host copy (CUDA)
    fetched: torch.Tensor | None = None
    ready: torch.cuda.Event | None = None  # the host-to-device copy (CUDA)


class ActivationOffloader:
    """Saved-tensor hooks that hold checkpoint inputs in host memory; one per model."""

    def __init__(self) -> None:
        self.stream = torch.cuda.Stream() if torch.cuda.is_available() else None
        # Forward order, weakly: the autograd graph owns the entries, so a freed graph frees its host copies.
        self._order: list[weakref.ref[_Offloaded]] = []
        # A tensor handed to every layer (rotary cos/sin, a packed 4D mask) is copied once while it lives. Keyed by
        # the tensor object itself (weakly), never by its address: a freed layer input's memory is soon reused.
        self._by_tensor: dict[int, tuple[weakref.ref[torch.Tensor], weakref.ref[_Offloaded]]] = {}
        self.offloaded_bytes = 0  # host bytes packed so far (what the plan's host term counts), for the tests

    def wrap(self, checkpoint_function: Callable[..., Any]) -> Callable[..., Any]:
        """The checkpoint function with this offloader's hooks around it."""

        def offloaded_checkpoint(*args: Any, **kwargs: Any) -> Any:
            with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
                return checkpoint_function(*args, **kwargs)

        return offloaded_checkpoint

    def pack(self, tensor: torch.Tensor) -> _Offloaded:
        """Copy a saved tensor to host memory (async on CUDA); the device copy is freed with the caller's."""
        shared = self._shared_copy(tensor)
        if shared is not None:
            return shared
        entry = self._copy_to_host(tensor)
        self._by_tensor = {key: refs for key, refs in self._by_tensor.items() if refs[0]() is not None}
        self._by_tensor[id(tensor)] = (weakref.ref(tensor), weakref.ref(entry))
        self._order = [ref for ref in self._order if ref() is not None]
        self._order.append(weakref.ref(entry))
        self.offloaded_bytes += tensor.numel() * tensor.element_size()
        return entry

    def _shared_copy(self, tensor: torch.Tensor) -> _Offloaded | None:
        """The host copy already made of this very tensor (unchanged since), if any."""
        source, entry = self._by_tensor.get(id(tensor), (None, None))
        if source is None or entry is None or source() is not tensor:
            return None
        copy = entry()
        return copy if copy is not None and copy.version == tensor._version else None

    def unpack(self, entry: _Offloaded) -> torch.Tensor:
        """The tensor back on its device for the recompute; the next layer's input starts coming meanwhile."""
        if self.stream is None or entry.device.type != "cuda":
            return entry.host
        self._fetch(entry)
        self._prefetch_before(entry)
        assert entry.ready is not None and entry.fetched is not None
        torch.cuda.current_stream().wait_event(entry.ready)
        fetched = entry.fetched
        fetched.record_stream(torch.cuda.current_stream())  # made on the side stream, used on this one
        entry.fetched = None  # the graph's recompute holds it now; a second unpack fetches again
        return fetched

    def _copy_to_host(self, tensor: torch.Tensor) -> _Offloaded:
        if self.stream is None or tensor.device.type != "cuda":
            host = torch.empty_like(tensor, device="cpu")
            host.copy_(tensor.detach())
            return _Offloaded(host, tensor.device, tensor._version)
        host = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream())  # the tensor is complete before it is copied
        with torch.cuda.stream(self.stream):
            host.copy_(tensor.detach(), non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self.stream)
        tensor.record_stream(self.stream)  # its memory is not reused until the copy has read it
        return _Offloaded(host, tensor.device, tensor._version, copied=copied)

    def _fetch(self, entry: _Offloaded) -> None:
        if entry.fetched is not None or self.stream is None:
            return
        with torch.cuda.stream(self.stream):
            if entry.copied is not None:
                self.stream.wait_event(entry.copied)
            entry.fetched = entry.host.to(entry.device, non_blocking=True)
            entry.ready = torch.cuda.Event()
            entry.ready.record(self.stream)

    def _prefetch_before(self, entry: _Offloaded) -> None:
        """Start fetching the tensor packed just before this one: the backward recomputes layers last to first."""
        live = [ref() for ref in self._order]
        if entry in live:
            index = live.index(entry)
            previous = live[index - 1] if index > 0 else None
            if previous is not None:
                self._fetch(previous)


def offload_checkpointed_activations(model: torch.nn.Module) -> ActivationOffloader:
    """Wrap every checkpointed layer's checkpoint function of `model` with one offloader's hooks."""
    offloader = ActivationOffloader()
    wrapped = 0
    for module in model.modules():
        function = getattr(module, "_gradient_checkpointing_func", None)
        if getattr(module, "gradient_checkpointing", False) and function is not None:
            setattr(module, "_gradient_checkpointing_func", offloader.wrap(function))  # noqa: B010 (not a Module)
            wrapped += 1
    if wrapped == 0:
        raise ValueError("--offload_activations found no checkpointed layer: it needs --gradient_checkpointing")
    return offloader


# ---------------------------------------------------------------------------------------------------------
# --offload_embeddings: the frozen input embedding table stays in host memory.
#
# A forward reads one row of the table per token, so the table (vocab x hidden: 1 GiB in bf16 for Llama-3's
# 128,256 tokens) need not occupy the GPU: the rows are gathered on the host and only they are copied over.
# The table must be frozen (LoRA) and untied from lm_head, which needs the whole matrix on the device.


TIED_HEAD_PROBLEM = ("--offload_embeddings needs an lm_head untied from the input embeddings: this model ties "
                     "them (lm_head reads the whole table on the device); drop --offload_embeddings")


def embeddings_on_host_problem(model: torch.nn.Module) -> str | None:
    """Why the input embeddings cannot move to the host, or None when they can."""
    embedding = model.get_input_embeddings()  # type: ignore[operator]
    head = model.get_output_embeddings()  # type: ignore[operator]
    if embedding.weight.requires_grad:
        return "--offload_embeddings needs a frozen embedding table (--use_lora, embeddings not trained)"
    if head is not None and head.weight is embedding.weight:
        return TIED_HEAD_PROBLEM
    return None


def keep_input_embeddings_on_host(model: torch.nn.Module) -> torch.device:
    """Move the input embedding table to host memory; its output still arrives on the layers' device.

    Returns the device the layers compute on (where the table was). On a machine without a GPU the table is
    already in host memory and stays where it is.
    """
    problem = embeddings_on_host_problem(model)
    if problem is not None:
        raise ValueError(problem)
    embedding = model.get_input_embeddings()  # type: ignore[operator]
    device = embedding.weight.device
    embedding.compute_device = device  # read by compute_device(): the table no longer says where layers run
    if device.type == "cpu":
        return device
    embedding.to("cpu")
    # Prepended so that the rows are on the device before enable_input_require_grads' hook marks them.
    embedding.register_forward_pre_hook(lambda _module, args: (args[0].to("cpu"), *args[1:]))
    embedding.register_forward_hook(lambda _module, _args, rows: rows.to(device, non_blocking=True), prepend=True)
    return device


def compute_device(model: torch.nn.Module) -> torch.device:
    """The device the model's layers run on: where its input embeddings are, or were before going to the host."""
    embedding = model.get_input_embeddings()  # type: ignore[operator]
    return getattr(embedding, "compute_device", embedding.weight.device)
