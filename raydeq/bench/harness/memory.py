"""Peak memory of a call: the CUDA allocator's peak, or on CPU a tracker of live tensor storages."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class StorageTracker(TorchDispatchMode):
    """Counts the bytes of every storage an operator allocates until that storage is freed.

    An output on the storage of one of the operator's inputs (a view, an in-place or out=
    write) allocated nothing: a tensor made before the tracker started is not counted when an
    operator views it or writes into it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _free(self, pointer: int) -> None:
        self.current -= self.live.pop(pointer, 0)

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        """Run the operator, then register the storages of its outputs that are new."""
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor)
        }
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            pointer = storage.data_ptr()
            if pointer in self.live or pointer in inputs or storage.nbytes() == 0:
                continue
            self.live[pointer] = storage.nbytes()
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._free, pointer)
        return out


def peak_memory(fn: Callable[[], Any], device: torch.device) -> tuple[int, Any]:
    """Bytes allocated at the peak of `fn()` above what was allocated before it, and its value.

    On CUDA this is the caching allocator's peak; on CPU it is the peak of the storages that
    the operators called inside `fn` allocated and still hold (tensors made before are free).
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        value = fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before, value
    with StorageTracker() as tracker:
        value = fn()
    return tracker.peak, value
