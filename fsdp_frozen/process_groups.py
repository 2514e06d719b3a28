"""Process groups of frozen param groups: created once per mesh, reused, released on request.

[Note: why frozen groups have process groups of their own] FSDP 2.12+ keys the param groups of one
module by process group, so a module's frozen group must communicate on groups other than its
trainable group's: the same ranks and layout as the mesh, new groups (`_torch_compat._fresh_mesh`).
Each costs what any process group costs: with gloo a few sockets and threads per group; with NCCL one
communicator, with its own GPU buffers (NCCL_BUFFSIZE, 4 MiB by default, per channel and peer) and
its setup time at first use. So they are created once per rank layout (one per mesh dim, plus one per
int ``frozen_reshard`` N for its post-forward groups) and every `shard_with_freezing` on a mesh of that
layout reuses them (several models: a teacher and a student, a reference model), also when the mesh
was built anew (``init_device_mesh`` makes new sub-groups for a 2-D mesh each call; keyed by identity,
each rebuilt mesh would add communicators). The key is the device type, the backend and the mesh's
ranks in their layout; an entry whose mesh groups were destroyed (a new default process group) is
dropped, not reused. `describe` and `estimate` count these groups (`frozen_process_groups`).
`release_process_groups` destroys them, once no model that uses them is run again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from . import _torch_compat as compat


@dataclass
class _Entry:
    key: tuple[Any, ...]  #: device type, backend, mesh shape and ranks (`_key`)
    mesh_info: Any  #: the frozen groups' FSDP mesh info
    post_forward: dict[int, Any] = field(default_factory=dict)  #: int reshard N -> post-forward mesh info

    def alive(self) -> bool:
        return all(compat.process_group_alive(pg) for info in (self.mesh_info, *self.post_forward.values())
                   for pg in compat.mesh_info_groups(info))


_ENTRIES: list[_Entry] = []


def _key(mesh: DeviceMesh) -> tuple[Any, ...]:
    groups = compat.mesh_groups(mesh)
    return (mesh.device_type, tuple(str(dist.get_backend(g)) for g in groups), tuple(mesh.mesh.shape),
            tuple(mesh.mesh.flatten().tolist()))


def _entry(mesh: DeviceMesh) -> _Entry:
    key = _key(mesh)
    _ENTRIES[:] = [e for e in _ENTRIES if e.alive()]
    for e in _ENTRIES:
        if e.key == key:
            return e
    entry = _Entry(key, compat.make_frozen_mesh_info(mesh))
    _ENTRIES.append(entry)
    return entry


def count(plan: Any, mesh_ndim: int) -> int:
    """Process groups this rank holds for the frozen groups of a model planned as `plan`, beyond the
    mesh's own: one per mesh dim when some frozen group is in FSDP with the per-parameter split (torch
    >= 2.12), plus two per distinct int ``frozen_reshard`` (FSDP builds its post-forward mesh as
    replicate x N; only the N-rank shard group ever communicates). On NCCL a communicator is created
    at a group's first collective (setup time, and its buffers: NCCL_BUFFSIZE, 4 MiB by default, per
    channel and peer), so the unused replicate group costs none. The structural fallback shares the
    mesh's groups: 0; so do merged frozen groups ([Note: merged frozen groups] in plan.py)."""
    managed = [g for g in plan.groups if g.kind == "frozen" and not g.merged
               and any(p not in plan.unmanaged for p in g.params)]
    if not plan.split or not managed:
        return 0
    return mesh_ndim + 2 * len({g.reshard for g in managed if isinstance(g.reshard, int) and not isinstance(g.reshard, bool)})


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
    Models sharded afterwards get new groups (tested on 1-D and HSDP meshes built anew, in the same
    processes; [Note: frozen groups' names] in `_torch_compat`). Not covered: a frozen mesh that is a
    sub-mesh of a TP world (``world["dp"]``) stays equal to the user's sub-mesh (FSDP needs that to join
    it with the TP mesh), so torch's DTensor caches may still hand a model built after a release a spec
    on the released groups there: `shard_with_freezing` then raises a RuntimeError naming the parameter
    (rather than a collective failing later); under TP, release only at the end of the job.
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


__all__ = ["count", "frozen_mesh_info", "post_forward_mesh_info", "release_process_groups"]
