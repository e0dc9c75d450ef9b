"""Host snapshots for background checkpoint saves: copy a rank's state to host memory (pinned and
non-blocking on GPUs), reusing the buffers of the previous save (slowmo_train/checkpoint.py).
"""

from __future__ import annotations

import copy
from typing import Any

import torch


# --- host snapshots (background saves) -------------------------------------------------------------
def _as_bytes(storage: torch.UntypedStorage) -> torch.Tensor:
    """A flat uint8 tensor over the whole of ``storage``."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


class HostStaging:
    """Copies of a state in host memory, whose buffers are reused from one save to the next.

    Copies are made per storage, not per tensor, so that what ``torch.save`` writes is what it would
    have written from the live state: tensors that share memory (tied embeddings, views into a flat
    buffer) still share it, and each storage is stored once. Device storages go to pinned buffers
    through non-blocking copies followed by one synchronize per device. (PyTorch's pinned allocator
    rounds each buffer up to a power of two: transformer weights are powers of two already, ResNet
    convolutions are not and may take up to twice their size in pinned memory.)"""

    def __init__(self):
        self._free: dict[tuple[int, bool], list[torch.UntypedStorage]] = {}

    def copy(self, state: Any) -> tuple[Any, list[tuple[tuple[int, bool], torch.UntypedStorage]]]:
        """(the copy, the host buffers it uses: hand them to :meth:`release` once it is written)."""
        copies: dict[tuple, tuple[tuple[int, bool], torch.UntypedStorage]] = {}
        devices: set[torch.device] = set()

        def host(storage: torch.UntypedStorage) -> torch.UntypedStorage:
            key = (storage.device, storage.data_ptr(), storage.nbytes())
            if key not in copies:
                pinned = storage.device.type == "cuda"
                size = (storage.nbytes(), pinned)
                free = self._free.get(size)
                buffer = (
                    free.pop()
                    if free
                    else torch.empty(storage.nbytes(), dtype=torch.uint8, pin_memory=pinned).untyped_storage()
                )
                _as_bytes(buffer).copy_(_as_bytes(storage), non_blocking=pinned)
                if pinned:
                    devices.add(storage.device)
                copies[key] = (size, buffer)
            return copies[key][1]

        seen: dict[int, Any] = {}  # an object met twice is copied once, as pickle stores it once

        def walk(obj: Any) -> Any:
            if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes, torch.dtype, torch.device)):
                return obj
            if id(obj) not in seen:
                seen[id(obj)] = copy_of(obj)
            return seen[id(obj)]

        def copy_of(obj: Any) -> Any:
            if isinstance(obj, torch.Tensor):
                t = obj.detach()
                if (
                    t.layout != torch.strided
                    or type(t) is not torch.Tensor
                    or t.is_quantized
                    or t.is_conj()
                    or t.is_neg()
                ):
                    return t.to("cpu", copy=True)  # rare kinds: a plain (synchronous) copy
                out = torch.empty(0, dtype=t.dtype)
                return out.set_(host(t.untyped_storage()), t.storage_offset(), t.size(), t.stride())
            if isinstance(obj, dict):
                out = copy.copy(obj)  # keeps the type and attributes (a module state_dict's _metadata)
                for key, value in obj.items():
                    out[key] = walk(value)
                return out
            if isinstance(obj, list):
                return [walk(x) for x in obj]
            if isinstance(obj, tuple):
                items = [walk(x) for x in obj]
                return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
            return copy.deepcopy(obj)

        snapshot = walk(state)
        for device in devices:
            torch.cuda.synchronize(device)
        self._free.clear()  # buffers this state no longer needs (a shape changed) go back to the system
        return snapshot, list(copies.values())

    def clear(self) -> None:
        self._free.clear()

    def release(self, buffers: list[tuple[tuple[int, bool], torch.UntypedStorage]]) -> None:
        """Keep ``buffers`` (written and no longer referenced by a writer) for the next copy."""
        for size, buffer in buffers:
            self._free.setdefault(size, []).append(buffer)


def state_bytes(state: Any) -> int:
    """Bytes of the tensor storages in ``state`` (each counted once): what a rank file holds."""
    seen: dict[tuple, int] = {}

    def walk(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            if obj.layout == torch.strided:
                storage = obj.untyped_storage()
                seen[(obj.device, storage.data_ptr(), storage.nbytes())] = storage.nbytes()
            else:
                seen[(id(obj),)] = obj.element_size() * obj.numel()
        elif isinstance(obj, dict):
            for value in obj.values():
                walk(value)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                walk(value)

    walk(state)
    return sum(seen.values())
