"""`CommCounter`: count the c10d collectives FSDP issues (calls and bytes, per process group).

Used by the tests (counts per step) and the benchmark (bytes per step). Intercepts the c10d ops
with a `TorchDispatchMode`, so it sees what FSDP2 really launches; checked on torch 2.13.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .. import _torch_compat as compat

#: c10d op name -> (kind, index of the argument whose bytes are counted: the gathered output, or
#: the reduce-scatter input, i.e. the full unsharded gradients).
_OPS = {
    "_allgather_base_": ("all_gather", 0),
    "allgather_into_tensor_coalesced_": ("all_gather", 0),
    "_reduce_scatter_base_": ("reduce_scatter", 1),
    "reduce_scatter_tensor_coalesced_": ("reduce_scatter", 1),
    "allreduce_": ("all_reduce", 0),
}


class CommCounter(compat.TorchDispatchMode):
    """``with CommCounter() as c: step()`` records ``(kind, process_group_name, bytes)`` per collective."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[str, str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        op = _OPS.get(compat.op_name(func))
        if op is not None:
            kind, index = op
            tensors = args[index] if isinstance(args[index], (list, tuple)) else [args[index]]
            nbytes = sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
            self.records.append((kind, compat.group_name_in(args), nbytes))
        return func(*args, **(kwargs or {}))

    def total(self, kind: str, groups: set[str] | None = None, *, count: bool = False) -> int:
        """Bytes (or calls, with ``count=True``) of `kind`, optionally only on process groups `groups`."""
        hits = [b for k, g, b in self.records if k == kind and (groups is None or g in groups)]
        return len(hits) if count else sum(hits)

    def clear(self) -> None:
        self.records = []


def frozen_group_names(model: nn.Module) -> set[str]:
    """Names of the process groups that the frozen param groups `shard_with_freezing` built on
    `model` communicate on (read from the groups it recorded, not re-found)."""
    from ..apply import sharded_state

    names = set()
    for group, _ in sharded_state(model).frozen_settings:
        for info in compat.group_mesh_infos(group):
            names.add(compat.mesh_info_groups(info)[0].group_name)  # the shard group
    return names


def merged_frozen_all_gather_bytes(model: nn.Module) -> int:
    """All-gather output bytes per step of the frozen parameters that ride their unit's trainable
    group's all-gathers ([Note: merged frozen groups] in plan.py): a `CommCounter` sees them on the
    trainable groups' process groups. `fsdp_frozen.estimate.gathered_bytes` of each merged group (what
    FSDP puts in the gathered buffer) times its gathers per step."""
    from ..apply import sharded_state
    from ..estimate import gathered_bytes

    plan = sharded_state(model).plan
    return sum(gathered_bytes(model, g) * g.all_gathers_per_step for g in plan.groups if g.merged)
