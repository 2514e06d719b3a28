"""`PeakTensorMemory`: the peak bytes of tensor storage alive on this rank during a region, any device.

Why not torch's own tools (torch 2.13): ``FSDPMemTracker`` supports one param group per FSDP module
and refuses models sharded by `shard_with_freezing` (several groups per module); ``MemTracker`` fails
on frozen parameters; on CPU there are no allocator statistics (``torch.cuda.max_memory_allocated``
is the reference on CUDA). This counts storages rather than allocator blocks, the same way for plain
FSDP2 and for split models, so benchmark variants compare like with like.

What it counts: every storage an op reads or writes while the mode is active (seen through a
``TorchDispatchMode``; wrapper subclasses such as DTensor and torchao's NF4Tensor count their inner
tensors), plus the `baseline` tensors given at entry (model and optimizer state that a step may not
touch), at each storage's *current* size after every op, until the storage is freed. The current
size matters: FSDP2 frees and re-allocates unsharded parameters by resizing their storage in place,
outside the dispatcher. Not counted: storages that no op touches and that are not in the baseline,
memory an op allocates and frees internally, allocator caching and fragmentation.

Cost: after every op, a sum over the live storages it knows (use it for one measured step).
"""

from __future__ import annotations

import heapq
import weakref
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

from .. import _torch_compat as compat


class PeakTensorMemory(compat.TorchDispatchMode):
    """``with PeakTensorMemory(baseline) as m: step()``; then ``m.peak`` (bytes) and ``m.current``.

    Args:
        baseline: tensors alive before the region that count even if no op touches them (see
            `state_tensors`).
        top: with N > 0, `peak_top` lists the N largest storages alive at the peak as (bytes, the op
            that first touched them, "baseline" for those given, shape, dtype), largest first: what
            a peak is made of (how the first GPU run's QLoRA excess, torchao's int64 codes of the
            dequantized head, was found); and `peak_by_origin`, every storage alive at the peak summed
            per (op, shape, dtype) as ``{key: (bytes, count)}``, largest first, where a peak of many
            small activations shows that the largest few (the weights) hide (how the second GPU run's
            LoRA peak was split into state, checkpointed inputs and one block's backward). Costs a
            snapshot of the live storages' sizes at each new peak; both are computed when read.
    """

    def __init__(self, baseline: Iterable[torch.Tensor] = (), *, top: int = 0) -> None:
        super().__init__()
        self._live: dict[int, weakref.ref] = {}
        self.peak = 0
        self.current = 0
        self.top = top
        self._origin: dict[int, tuple[str, tuple[int, ...], str]] = {}  #: storage -> (op, shape, dtype); with `top`
        self._op = "baseline"
        self._at_peak: list[tuple[int, str, tuple[int, ...], str]] = []  #: with `top`: (bytes, op, shape, dtype)
        for t in baseline:
            self._track(t)
        self._sample()

    def _track(self, t: torch.Tensor) -> None:
        if compat.is_traceable_wrapper_subclass(t):
            for name in t.__tensor_flatten__()[0]:
                inner = getattr(t, name)
                if isinstance(inner, torch.Tensor):
                    self._track(inner)
            return
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # pragma: no cover - sparse and other storage-less tensors
            return
        key = id(storage)
        if key not in self._live:
            self._live[key] = weakref.ref(storage, lambda _, k=key: self._forget(k))
            if self.top:
                self._origin[key] = (self._op, tuple(t.shape), str(t.dtype).removeprefix("torch."))

    def _forget(self, key: int) -> None:
        self._live.pop(key, None)
        self._origin.pop(key, None)

    def _sample(self) -> None:
        self.current = sum(s.nbytes() for ref in list(self._live.values()) if (s := ref()) is not None)
        if self.current > self.peak and self.top:
            self._at_peak = [(s.nbytes(), *self._origin.get(k, ("?", (), "?"))) for k, ref in list(self._live.items())
                             if (s := ref()) is not None]
        self.peak = max(self.peak, self.current)

    @property
    def peak_top(self) -> list[tuple[int, str, tuple[int, ...], str]]:
        """The `top` largest storages alive at the peak, largest first (empty without `top`)."""
        return heapq.nlargest(self.top, self._at_peak, key=lambda x: x[0])

    @property
    def peak_by_origin(self) -> dict[tuple[str, tuple[int, ...], str], tuple[int, int]]:
        """Every storage alive at the peak summed per (op, shape, dtype): ``{key: (bytes, count)}``, largest
        first (empty without `top`)."""
        groups: dict[tuple[str, tuple[int, ...], str], list[int]] = {}
        for nbytes, *key in self._at_peak:
            group = groups.setdefault(tuple(key), [0, 0])
            group[0] += nbytes
            group[1] += 1
        return {k: (b, n) for k, (b, n) in sorted(groups.items(), key=lambda kv: -kv[1][0])}

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if self.top:
            self._op = str(func)
        out = func(*args, **(kwargs or {}))
        for t in compat.tree_leaves((args, kwargs, out)):
            if isinstance(t, torch.Tensor):
                self._track(t)
        self._sample()
        return out


def state_tensors(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> list[torch.Tensor]:
    """A step's baseline: the model's parameters and buffers, FSDP's sharded parameters (hidden
    behind groups kept gathered), and the optimizer's state tensors."""
    out = [*model.parameters(), *model.buffers()]
    out += [compat.sharded_param(p) for _, _, p in compat.iter_all_fsdp_params(model)]
    if optimizer is not None:
        out += [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return out


__all__ = ["PeakTensorMemory", "state_tensors"]


def rss_bytes(field: str = "VmRSS") -> int:
    """This process's resident memory from ``/proc/self/status`` (Linux): ``VmRSS`` now, or ``VmHWM``
    (the high-water mark since the process started or since `reset_rss_peak`)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field} line")


def reset_rss_peak() -> None:
    """Reset ``VmHWM`` to the current RSS (Linux ``/proc/self/clear_refs``), to measure one phase's peak."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
