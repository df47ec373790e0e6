"""Memory of a forward pass: measuring it, what the machine has left, and the model that sizes tiles.

* :class:`TensorPeakMemory` / :func:`measure_peak_memory`: the peak bytes a call needs, on any device (CUDA: the
  caching allocator's peak; elsewhere the tensors' bytes, tracked op by op).
* :func:`available_memory`: what tensors on a device can still use (CUDA: free plus what the caching allocator
  holds unused; CPU: MemAvailable, psutil when installed, capped by the cgroup limit).
* :class:`MemoryModel`: ``peak(t) = fixed + per_pixel * t^2`` for a ``t x t`` LR tile, because everything HAT holds
  while running (features, qkv, window attention maps of a fixed size per window) grows with the number of pixels.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode


def _tensors(obj: Any) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item)


class TensorPeakMemory(TorchDispatchMode):
    """Peak number of bytes held at once by the tensors that the operations run inside this context create.

    Every operation that allocates its outputs (whose schema does not declare them aliases of an input, as views and
    in-place operations do) has them recorded by their storage with a weak reference; a storage counts from the
    operation that created it until it is freed. Storages that exist before (``known``: the weights, the input, and
    anything reached only through views, such as cached attention biases) are not counted. Works on any device,
    including ``meta``; memory that kernels use internally and release before returning is not seen.
    """

    def __init__(self, known: Sequence[Tensor] = ()) -> None:
        super().__init__()
        self._known = {t.untyped_storage()._cdata: StorageWeakRef(t.untyped_storage()) for t in known}
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Drop freed storages first: while a weak reference is held, no new storage can take the same address.
        for key in [k for k, (ref, _) in self._live.items() if ref.expired()]:
            self.current -= self._live.pop(key)[1]
        if any(r.alias_info is not None for r in func._schema.returns):
            return out  # a view or an in-place result: no new memory
        for tensor in _tensors(out):
            storage = tensor.untyped_storage()
            key = storage._cdata
            if key not in self._live and key not in self._known:
                self._live[key] = (StorageWeakRef(storage), storage.nbytes())
                self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def measure_peak_memory(run: Callable[[], Any], *, device: torch.device, known: Sequence[Tensor] = ()) -> int:
    """Bytes of ``device`` memory that ``run()`` needs on top of what is already allocated.

    CUDA: the caching allocator's peak (everything, including kernel workspaces). Other devices: the tensor peak of
    :class:`TensorPeakMemory`.
    """
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with TensorPeakMemory(known) as tracker:
        run()
    return tracker.peak


def _cgroup_available() -> int | None:
    """Memory left under the cgroup limit (containers), if there is one."""
    for limit_file, usage_file in (('/sys/fs/cgroup/memory.max', '/sys/fs/cgroup/memory.current'),
                                   ('/sys/fs/cgroup/memory/memory.limit_in_bytes',
                                    '/sys/fs/cgroup/memory/memory.usage_in_bytes')):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:  # 'max' or a huge number: no limit
            return max(int(limit) - usage, 0)
    return None


def available_ram() -> int:
    """Bytes of RAM that can be allocated without swapping: psutil if installed, else /proc/meminfo, capped by the
    cgroup limit."""
    available = None
    try:
        import psutil  # optional; not a dependency
        available = int(psutil.virtual_memory().available)
    except ImportError:
        try:
            match = re.search(r'^MemAvailable:\s+(\d+) kB', Path('/proc/meminfo').read_text(), re.MULTILINE)
            available = int(match.group(1)) * 1024 if match else None
        except OSError:
            pass
    if available is None:
        try:
            available = os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
        except (ValueError, OSError, AttributeError):
            raise RuntimeError('cannot tell how much memory is available on this system; pass --max-memory '
                               'or --tile') from None
    cgroup = _cgroup_available()
    return min(available, cgroup) if cgroup is not None else available


def available_memory(device: torch.device) -> int:
    """Bytes that tensors on ``device`` can still use."""
    if device.type == 'cuda':
        free, _ = torch.cuda.mem_get_info(device)
        # What the caching allocator holds but does not use is free for this process too.
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return available_ram()


@dataclass(frozen=True)
class MemoryModel:
    """Estimated peak memory of one forward pass over a ``h x w`` LR tile: ``fixed + per_pixel * h * w`` bytes."""

    fixed: float
    per_pixel: float

    def peak(self, height: int, width: int) -> float:
        return self.fixed + self.per_pixel * height * width

    def largest_side(self, budget: float, multiple: int) -> int:
        """The largest multiple of ``multiple`` whose square tile fits ``budget`` (0 when not even one window)."""
        if budget <= self.fixed:
            return 0
        side = math.isqrt(int((budget - self.fixed) / max(self.per_pixel, 1e-9)))
        return side // multiple * multiple


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` says that memory ran out (host or device)."""
    if isinstance(error, (MemoryError, getattr(torch, 'OutOfMemoryError', MemoryError))):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ('out of memory' in text or "can't allocate memory" in text)
