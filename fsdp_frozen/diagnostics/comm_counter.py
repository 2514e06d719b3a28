"""`CommCounter`: count the c10d collectives FSDP issues (calls and bytes, per process group).

Used by the tests (counts per step) and the benchmark (bytes per step); `frozen_group_names` and
`shared_frozen_all_gathers` tell frozen traffic from trainable traffic. Intercepts the c10d ops
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


def _names(group) -> set[str]:
    """The names of the process groups an FSDP param group all-gathers on (its shard group, and its
    post-forward mesh's under an int reshard)."""
    return {compat.mesh_info_groups(info)[0].group_name for info in compat.group_mesh_infos(group)}


def frozen_group_names(model: nn.Module) -> set[str]:
    """Names of the process groups that only `model`'s frozen param groups communicate on (those
    `shard_with_freezing` made for them; read from the groups it recorded, not re-found): what a
    `CommCounter` counts there is frozen traffic. Frozen bytes gathered on process groups trainable
    parameters use too are not there (torch < 2.12's structural fallback keeps its frozen groups on the
    user's mesh; merged groups ride the trainable all-gathers): `shared_frozen_all_gathers` counts them."""
    from ..apply import sharded_state

    frozen = {id(group) for group, _ in sharded_state(model).frozen_settings}
    names: dict[bool, set[str]] = {True: set(), False: set()}
    for group in {id(g): g for _, g, _ in compat.iter_all_fsdp_params(model)}.values():
        names[id(group) in frozen] |= _names(group)
    return names[True] - names[False]


def shared_frozen_all_gathers(model: nn.Module) -> tuple[int, int]:
    """(calls, output bytes) per step of the frozen all-gathers that a `CommCounter` sees on process
    groups trainable parameters use too, which `frozen_group_names` leaves out:

    * merged frozen groups ([Note: merged frozen groups] in plan.py): bytes only, their parameters ride
      their unit's trainable group's all-gathers;
    * torch < 2.12's structural fallback: every frozen group (its own calls, on the user's mesh) and the
      frozen parameters it leaves in a trainable group (``plan.unsplit``: bytes only).

    Bytes are `fsdp_frozen.estimate.gathered_bytes` (what FSDP puts in the gathered buffer) times the
    plan's gathers per step. (0, 0) on torch >= 2.12 without merged groups."""
    from ..apply import sharded_state
    from ..estimate import gathered_bytes
    from ..plan import FROZEN

    state = sharded_state(model)
    own = frozen_group_names(model)
    calls = nbytes = 0
    for g in state.plan.groups:
        group = state.param_groups.get((g.unit, g.kind))
        if g.kind == FROZEN and not (g.merged or (group is not None and not _names(group) & own)):
            continue  # on its own process groups: the counter sees it apart
        calls += g.own_all_gathers_per_step if g.kind == FROZEN else 0
        nbytes += gathered_bytes(model, state.plan.frozen_params(g)) * g.all_gathers_per_step
    return calls, nbytes
