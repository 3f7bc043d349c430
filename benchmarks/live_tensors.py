"""Live tensor memory on any device: what torch.cuda.max_memory_allocated counts, measured on the CPU too.

A TorchDispatchMode sees every tensor an operator returns (custom ops such as bitsandbytes' included) and
counts each new storage until Python's weak reference to it dies, so the peak is the largest sum of
storages alive at once: the caching allocator's view less its 512-byte rounding, with no heap effects.
A storage an operator received as input (a view, `detach`, an in-place op) is not new, so storages made
before the mode was entered (the weights) are not counted; `storage_bytes` sums those.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorPeak(TorchDispatchMode):
    """Tracks the bytes of storages created inside the mode; `peak` is their high-water mark."""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._alive: dict[int, weakref.ref[Any]] = {}

    def reset_peak(self) -> None:
        """Start a new high-water mark from what is alive now."""
        self.peak = self.current

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        inputs = {storage._cdata for storage in _storages((args, kwargs))}
        result = func(*args, **(kwargs or {}))
        for storage in _storages(result):
            if storage._cdata not in inputs:  # views, detach and in-place ops return an input's storage
                self._track(storage)
        return result

    def _track(self, storage: torch.UntypedStorage) -> None:
        key = storage._cdata
        if key in self._alive and self._alive[key]() is not None:
            return  # a view, or an in-place op's output: storage already counted
        size = storage.nbytes()
        self._alive[key] = weakref.ref(storage, lambda _ref, key=key, size=size: self._free(key, size))
        self.current += size
        self.peak = max(self.peak, self.current)

    def _free(self, key: int, size: int) -> None:
        self._alive.pop(key, None)
        self.current -= size


def _storages(tree: Any) -> list[torch.UntypedStorage]:
    tensors = [value for value in tree_flatten(tree)[0] if isinstance(value, torch.Tensor)]
    return [tensor.untyped_storage() for tensor in tensors if tensor.device.type != "meta"]


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """The bytes of the distinct storages behind these tensors (shared weights counted once)."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        seen[storage._cdata] = storage.nbytes()
    return sum(seen.values())
