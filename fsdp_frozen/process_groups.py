"""Process groups of frozen param groups: created once per mesh, reused, released on request.

[Note: why frozen groups have process groups of their own] FSDP 2.13 keys the param groups of one
module by process group, so a module's frozen group must communicate on groups other than its
trainable group's: the same ranks and layout as the mesh, new groups (`_torch_compat._fresh_mesh`).
Each costs what any process group costs: with gloo a few sockets and threads per group; with NCCL one
communicator, with its own GPU buffers (NCCL_BUFFSIZE, 4 MiB by default, per channel and peer) and
its setup time at first use. So they are created once per mesh (one per mesh dim, plus one per int
``frozen_reshard`` N for its post-forward groups) and every `shard_with_freezing` on that mesh reuses
them (several models on one mesh: a teacher and a student, a reference model). `release_process_groups`
destroys them, once no model that uses them is run again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from . import _torch_compat as compat


@dataclass
class _Entry:
    source: tuple[Any, ...]  #: the mesh's own dim groups (held, so identity stays unique)
    mesh_info: Any  #: the frozen groups' FSDP mesh info
    post_forward: dict[int, Any] = field(default_factory=dict)  #: int reshard N -> post-forward mesh info


_ENTRIES: list[_Entry] = []


def _entry(mesh: DeviceMesh) -> _Entry:
    source = compat.mesh_groups(mesh)
    for e in _ENTRIES:
        if len(e.source) == len(source) and all(a is b for a, b in zip(e.source, source)):
            return e
    entry = _Entry(source, compat.make_frozen_mesh_info(mesh))
    _ENTRIES.append(entry)
    return entry


def frozen_mesh_info(mesh: DeviceMesh) -> Any:
    """The FSDP mesh info frozen groups on `mesh` use (created on the first call for this mesh; collective then)."""
    return _entry(mesh).mesh_info


def post_forward_mesh_info(mesh: DeviceMesh, reshard: int) -> Any:
    """The post-forward mesh info of an int `reshard` on `mesh`'s frozen groups (created once)."""
    entry = _entry(mesh)
    if reshard not in entry.post_forward:
        entry.post_forward[reshard] = compat.post_forward_mesh_info(reshard, entry.mesh_info)
    return entry.post_forward[reshard]


def release_process_groups() -> int:
    """Destroy every process group fsdp_frozen created for frozen groups; returns how many.

    Collective (call on every rank). Models sharded before can no longer communicate afterwards: call
    it when they are gone, or before ``dist.destroy_process_group()`` (which would not free ours).
    """
    groups = []
    for e in _ENTRIES:
        for info in (e.mesh_info, *e.post_forward.values()):
            for pg in compat.mesh_info_groups(info):
                if all(pg is not g for g in groups):
                    groups.append(pg)
    _ENTRIES.clear()
    if dist.is_initialized():
        for pg in groups:
            dist.destroy_process_group(pg)
    return len(groups)


__all__ = ["frozen_mesh_info", "post_forward_mesh_info", "release_process_groups"]
