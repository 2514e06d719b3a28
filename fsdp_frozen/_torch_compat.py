"""The only module that touches private torch internals, plus every version gate.

Checked on torch 2.13.0 (CPU, gloo). The names used from 2.6-2.11 were read from those sources:
``FSDPState._fsdp_param_group`` (single group, <= 2.11), ``FSDPParamGroup.post_forward_mesh_info``,
``.reshard_after_backward``, ``.fsdp_params``, ``FSDPParam.sharded_param`` and ``DTensor._local_tensor``
(2.4+).
Several param groups per FSDP state (``state._fsdp_param_groups`` and ``ShardPlacementResult``) exist
from 2.12 on (checked on real 2.12.0 and 2.13.0: the whole suite); older versions fall back to one group per module (see `apply.py`).
DCP save-plan caching (``DefaultSavePlanner(enable_plan_caching=...)`` and its ``_cached_plans_key``)
is used where the signature has it (checked on 2.13; absent from 2.6).
Real torch 2.11.0 runs in CI's second tier, 2.12.0 in its third; the whole suite passed by hand on real 2.10.0,
2.11.0, 2.12.0 and 2.14.1 on 2026-12-04 (2.12 takes the split path; under torch.compile its dynamo, like
2.11's, propagates fake tensors with ``is_compiling()`` False: `_torchao_compat.nf4_traced`); torch 2.9.0 was run by hand on 2026-12-03 (parity, sharding,
checkpoints, TP, refreeze, estimate: pass, except tests needing transformers 5.24 or torchao 0.18, which do
not import on 2.9): `root_mesh` and `keep_requires_grad` come from it. torch 2.6.0's FSDP2 does not run on
the CPU at all (``Stream.record_event`` in ``foreach_all_gather``).
"""

from __future__ import annotations

import copy
import functools
import inspect
import itertools
import operator
import re
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint import DefaultSavePlanner
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

MIN_TORCH = (2, 6)
TORCH_VERSION: tuple[int, int] = tuple(int(x) for x in re.match(r"(\d+)\.(\d+)", torch.__version__).groups())  # type: ignore[assignment]

if TORCH_VERSION < MIN_TORCH:  # pragma: no cover - exercised by test_version_gates via monkeypatch
    raise ImportError(f"fsdp_frozen needs torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]}, found {torch.__version__}")

try:  # 2.12+: several param groups per FSDP state, keyed by process group
    from torch.distributed.fsdp._fully_shard._fsdp_common import (  # noqa: F401
        FSDPMeshInfo,
        HSDPMeshInfo,
        ShardPlacementResult,
    )
    from torch.distributed.fsdp._fully_shard._fsdp_init import _get_post_forward_mesh_info

    SPLIT_GROUPS_SUPPORTED = True
except ImportError:  # pragma: no cover - torch < 2.12
    SPLIT_GROUPS_SUPPORTED = False

#: `ignored_params` of fully_shard (needed to give a tied parameter to an outer unit).
IGNORED_PARAMS_SUPPORTED = TORCH_VERSION >= (2, 7)

#: DCP's `HuggingFaceStorageWriter` with consolidation (safetensors export); public from 2.8 on.
HF_STORAGE_WRITER_SUPPORTED = TORCH_VERSION >= (2, 8)

#: Tensor collectives under their current names: torch 2.13 deprecates ``all_gather_into_tensor`` /
#: ``reduce_scatter_tensor`` for ``all_gather_single`` / ``reduce_scatter_single`` (same arguments).
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

#: DCP save-plan caching: repeated saves of one layout skip DCP's global planning.
SAVE_PLAN_CACHING_SUPPORTED = "enable_plan_caching" in inspect.signature(DefaultSavePlanner.__init__).parameters


def split_groups_supported() -> bool:
    """True when one FSDP module can hold a frozen and a trainable param group (torch >= 2.12)."""
    return SPLIT_GROUPS_SUPPORTED


def param_groups(module: nn.Module) -> list[Any]:
    """The FSDPParamGroups of an FSDP module's state (empty if it holds no parameters)."""
    state = fully_shard.state(module)
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:  # torch <= 2.11
        group = state._fsdp_param_group
        groups = [] if group is None else [group]
    return list(groups)


def has_fsdp_state(module: nn.Module) -> bool:
    try:
        return fully_shard.state(module) is not None
    except (AttributeError, KeyError):
        return False


def fsdp_params(group: Any) -> list[Any]:
    return list(group.fsdp_params)


def sharded_param(fsdp_param: Any) -> nn.Parameter:
    """The sharded DTensor parameter that FSDP keeps (and that the optimizer should see)."""
    return fsdp_param.sharded_param


def unsharded_param_if_any(fsdp_param: Any) -> torch.Tensor | None:
    return getattr(fsdp_param, "_unsharded_param", None)


_REQUIRES_GRAD = operator.attrgetter("requires_grad")
_SHARDED_PARAM = operator.attrgetter("sharded_param")
_NOT_NONE = functools.partial(operator.is_not, None)


def requires_grad_all(fsdp_params: tuple[Any, ...], want: bool) -> bool:
    """Whether every tensor `sharded_param` and `unsharded_param_if_any` give for `fsdp_params` has
    ``requires_grad == want``: the same reads as calling them per parameter, done in C-level maps
    (no Python frame per parameter; the freezing check's steady state, [Note: stale requires_grad]).
    ``FSDPParam.sharded_param`` and ``._unsharded_param``, as the two functions above (2.6-2.13)."""
    flags = map(_REQUIRES_GRAD, map(_SHARDED_PARAM, fsdp_params))
    unsharded = filter(_NOT_NONE, map(getattr, fsdp_params, itertools.repeat("_unsharded_param"),
                                      itertools.repeat(None)))
    flags = itertools.chain(flags, map(_REQUIRES_GRAD, unsharded))
    return all(flags) if want else not any(flags)


def registered_param(fsdp_param: Any) -> torch.Tensor:
    """The tensor registered on the module now: the sharded parameter, or the unsharded one while the
    group is gathered (``FSDPParam._module_info``: module and name, the same in 2.6-2.13)."""
    info = fsdp_param._module_info
    return info.module._parameters[info.param_name]


def group_mesh_info(group: Any) -> Any:
    return group.mesh_info


def group_mesh_infos(group: Any) -> list[Any]:
    """The mesh infos a param group communicates on: its own and its post-forward one (int reshard)."""
    return [info for info in (group.mesh_info, group.post_forward_mesh_info) if info is not None]


def process_group_alive(pg: Any) -> bool:
    """False once `pg` was destroyed (it left c10d's registry ``_world.pg_map``; the same in 2.6-2.13)."""
    from torch.distributed import distributed_c10d as c10d

    return dist.is_initialized() and pg in c10d._world.pg_map


def root_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The world mesh `mesh` was sliced from (`mesh` itself if none): ``DeviceMesh._get_root_mesh()``
    (checked on torch 2.11 and 2.13); before it, ``_mesh_resources.get_root_mesh(mesh)`` (checked on
    2.9, where the method does not exist)."""
    get = getattr(mesh, "_get_root_mesh", None)
    if get is not None:
        return get()
    from torch.distributed.device_mesh import _mesh_resources  # pragma: no cover - torch < 2.11

    return _mesh_resources.get_root_mesh(mesh)


def keep_requires_grad(style: Any) -> Any:
    """A copy of the TP `style` whose ``_apply`` (what ``parallelize_module`` calls) gives each parameter
    it replaces the original's ``requires_grad``. torch 2.11+ does so itself (checked on 2.11 and 2.13);
    torch 2.9's ``ColwiseParallel`` / ``RowwiseParallel`` (checked) made every sharded parameter
    trainable, so a model frozen before ``parallelize_module`` trained its frozen base weights there."""
    apply = style._apply

    def _apply(module: nn.Module, device_mesh: DeviceMesh) -> Any:
        flags = {name: p.requires_grad for name, p in module.named_parameters()}
        out = apply(module, device_mesh)
        for name, p in module.named_parameters():
            if name in flags and p.requires_grad != flags[name]:
                p.requires_grad_(flags[name])
        return out

    kept = copy.copy(style)
    kept._apply = _apply
    return kept


def first_of_replicas(mesh: DeviceMesh) -> bool:
    """True if this rank is at coordinate 0 of every dim of `mesh`'s world (root) mesh that `mesh` is
    not on: a tensor on a sub-mesh (``world["dp"]``) is the same on the ranks that differ only there
    (the TP ranks of a plain parameter). Sub-meshes are matched by dim name (`root_mesh`)."""
    root = root_mesh(mesh)
    if root is mesh or root == mesh:
        return True
    names = root.mesh_dim_names or ()
    if not mesh.mesh_dim_names or any(n not in names for n in mesh.mesh_dim_names):
        raise NotImplementedError(
            f"a tensor on mesh {mesh} whose dims {mesh.mesh_dim_names} are not dims {names} of its world mesh "
            f"(a flattened sub-mesh): fsdp_frozen's checksums take sub-meshes of named world dims"
        )
    coord = root.get_coordinate()
    return all(coord[i] == 0 for i, n in enumerate(names) if n not in mesh.mesh_dim_names)


def mesh_groups(mesh: DeviceMesh) -> tuple[Any, ...]:
    """The process group of each dim of `mesh` (public ``get_group``)."""
    return tuple(mesh.get_group(d) for d in range(mesh.ndim))


def _dim_lines(mesh: DeviceMesh) -> tuple[list[list[list[int]]], bool]:
    """For each dim of `mesh`, the rank lines to create a group for, and whether every rank of the
    world makes the same calls ([Note: frozen groups' names]).

    Collective (True) when `mesh`'s root spans the world and `mesh` is that root or a sub-mesh of named
    root dims: every line of each dim over the whole root, as ``init_device_mesh`` creates its groups.
    Otherwise (a root over part of the world, a flattened sub-mesh) this rank's own lines only."""
    root = root_mesh(mesh)
    full = root.mesh
    if full.numel() == dist.get_world_size():
        if root is mesh:
            dims = list(range(mesh.ndim))
        elif mesh.mesh_dim_names and root.mesh_dim_names and set(mesh.mesh_dim_names) <= set(root.mesh_dim_names):
            dims = [root.mesh_dim_names.index(n) for n in mesh.mesh_dim_names]
        else:
            dims = None
        if dims is not None:
            return [full.movedim(d, -1).reshape(-1, full.shape[d]).tolist() for d in dims], True
    ranks = mesh.mesh
    return [ranks.movedim(d, -1).reshape(-1, ranks.shape[d]).tolist() for d in range(mesh.ndim)], False


def _fresh_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """A mesh over the same ranks as `mesh` with new process groups.

    FSDP 2.12+ groups parameters by process group, so the frozen group needs its own.

    [Note: frozen meshes under TP] A data-parallel sub-mesh of a larger mesh (``world_mesh["dp"]``
    beside ``world_mesh["tp"]``) stays a sub-mesh of that root: FSDP concatenates it with a TP
    parameter's mesh (``DeviceMesh._concatenate``, which needs one root and dim names), so the fresh
    mesh is a copy of `mesh` (same layout, root and names; equal to it) whose dims resolve to the new
    groups (``_dim_group_names``; checked on torch 2.13). A root mesh gets a root mesh of its own.

    [Note: frozen groups' names] A group made with ``use_local_synchronization=True`` is named by a
    hash of its ranks salted with ``len(_world.pg_names)`` (torch <= 2.13, ``_hash_ranks_to_str``),
    which falls when groups are destroyed: after `release_process_groups` the next group over the same
    ranks got the name of a destroyed one (its rendezvous keys still in the store: gloo connected to
    dead peers and hung) or of a live one (the registry entry overwritten: "Could not resolve the
    process group registered under the name ..."). pytorch/pytorch#189073 salts with a monotonic
    counter instead. So where every rank takes part (`_dim_lines`: the mesh's root spans the world) the
    groups are made as ``init_device_mesh`` makes them, every rank calling ``new_group`` for every line
    (not locally synchronized: named by the world's group counter, never reused); only a mesh whose
    root covers part of the world uses locally synchronized groups, with that hazard after a release.
    """
    rank = dist.get_rank()
    lines, collective = _dim_lines(mesh)
    dim_groups = []
    for dim_lines in lines:
        mine = None
        for line in dim_lines:
            if collective or rank in line:
                group = dist.new_group(line, use_local_synchronization=not collective)
                if rank in line:
                    mine = group
        dim_groups.append(mine)
    if root_mesh(mesh) is not mesh:
        fresh = copy.copy(mesh)
        fresh._dim_group_names = [g.group_name for g in dim_groups]
        return fresh
    # Dim names of their own: a DeviceMesh equals any other of the same ranks, layout and names whatever
    # its groups, and DTensor reuses specs by that equality: without names of their own, frozen parameters
    # were found on the user's mesh after sharding, or, after a release, on the released frozen mesh
    # ("Could not resolve the process group"; tests/test_sharding.py); named after the new groups, the
    # frozen mesh equals no other
    names = tuple(f"fsdp_frozen_{g.group_name}" for g in dim_groups)
    return DeviceMesh.from_group(dim_groups if mesh.ndim > 1 else dim_groups[0], mesh.device_type, mesh=mesh.mesh,
                                 mesh_dim_names=names)


def released_groups(t: torch.Tensor) -> list[str]:
    """Names of the process groups of `t`'s DTensor mesh that no longer resolve (destroyed, as
    `release_process_groups` does); [] for a plain tensor or where this torch keeps no group names
    (``DeviceMesh._dim_group_names`` and ``distributed_c10d._resolve_process_group``: checked on 2.11 and 2.13)."""
    names = getattr(getattr(t, "device_mesh", None), "_dim_group_names", None) if isinstance(t, DTensor) else None
    if not names:
        return []
    from torch.distributed.distributed_c10d import _resolve_process_group

    dead = []
    for name in names:
        try:
            _resolve_process_group(name)
        except RuntimeError:
            dead.append(name)
    return dead


def make_frozen_mesh_info(mesh: DeviceMesh) -> Any:
    """An FSDP mesh info for frozen groups: same ranks and layout as `mesh`, own process groups."""
    fresh = _fresh_mesh(mesh)
    if mesh.ndim == 1:
        return FSDPMeshInfo(fresh, shard_mesh_dim=0)
    return HSDPMeshInfo(fresh, shard_mesh_dim=1, replicate_mesh_dim=0)


def mesh_info_groups(mesh_info: Any) -> list[Any]:
    """The process groups of an FSDP mesh info (shard, and replicate for HSDP)."""
    groups = [mesh_info.shard_process_group]
    replicate = getattr(mesh_info, "replicate_process_group", None)
    return groups + ([replicate] if replicate is not None else [])


def placement_on(mesh_info: Any) -> Any:
    return ShardPlacementResult(placement=torch.distributed.tensor.Shard(0), mesh_info=mesh_info)


def post_forward_mesh_info(reshard_after_forward: bool | int, mesh_info: Any) -> Any:
    """FSDP's post-forward mesh for `reshard_after_forward` (an int builds a new N-rank mesh)."""
    return _get_post_forward_mesh_info(reshard_after_forward, mesh_info)


def configure_group(group: Any, post_forward_mesh: Any, reshard_after_backward: bool) -> None:
    """Give one param group its own reshard behaviour (the public setters change every group).

    A partial (int) reshard also needs each FSDPParam's post-forward shard metadata, which FSDP
    computes from the parameter's size only; a meta tensor of that size stands in for the data.
    """
    group.post_forward_mesh_info = post_forward_mesh
    group.reshard_after_backward = reshard_after_backward
    for fp in group.fsdp_params:
        fp.post_forward_mesh_info = post_forward_mesh
        if post_forward_mesh is not None:
            fp._init_sharded_post_forward_param_metadata(torch.empty(fp._orig_size, device="meta"))


def reshard_settings(group: Any, per_param: bool = True) -> tuple[Any, ...]:
    """A param group's reshard behaviour: (post-forward mesh info, reshard after backward[, the
    per-parameter post-forward mesh infos]). Attributes of FSDPParamGroup / FSDPParam, 2.4-2.13; FSDP's
    public setters write the first two."""
    head = (group.post_forward_mesh_info, group.reshard_after_backward)
    return head + (tuple(fp.post_forward_mesh_info for fp in group.fsdp_params),) if per_param else head


def set_reshard_settings(group: Any, settings: tuple[Any, bool, tuple[Any, ...]]) -> None:
    """Put back settings read by `reshard_settings` (the per-parameter shard metadata is unchanged)."""
    group.post_forward_mesh_info, group.reshard_after_backward, per_param = settings
    for fp, info in zip(group.fsdp_params, per_param):
        fp.post_forward_mesh_info = info


def reshard_after_forward_of(group: Any) -> bool | int:
    """What a param group does after forward: True (reshard), False (keep) or N (reshard to N ranks)."""
    info = group.post_forward_mesh_info
    if info is None:
        return False
    if info is group.mesh_info:
        return True
    return info.shard_mesh_size


def iter_all_fsdp_params(root: nn.Module) -> Iterator[tuple[nn.Module, Any, Any]]:
    """(module, group, fsdp_param) for every FSDP module under `root`, each state once."""
    seen: set[int] = set()
    for module in root.modules():
        if not has_fsdp_state(module):
            continue
        state = fully_shard.state(module)
        if id(state) in seen:
            continue
        seen.add(id(state))
        for group in param_groups(module):
            for fp in fsdp_params(group):
                yield module, group, fp


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's local tensor of a DTensor (`t` itself otherwise), without autograd.

    ``DTensor.to_local()`` is an autograd Function (~60 us a call); checkpoint code reads hundreds of
    shards per save, so it reads the private ``_local_tensor`` (the same object; 2.4-2.13).
    """
    return t._local_tensor if isinstance(t, DTensor) else t  # type: ignore[attr-defined]


def set_save_plan_cache_key(planner: DefaultSavePlanner, key: str) -> None:
    """Key under which DCP caches `planner`'s plans (class-level dicts; the class name by default).

    DCP compares a cached plan with a new one by keys, shapes and chunks but not dtypes, so callers
    put everything else a plan depends on into the key.
    """
    planner._cached_plans_key = key  # type: ignore[attr-defined]


#: Wrapper prefixes DCP's state dict strips (activation checkpointing; torch.compile's replacement
#: module), used only where DCP's own name resolution is missing.
WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")

try:  # torch.distributed.checkpoint.state_dict._get_fqns: 2.2-2.13 (checked on 2.6 and 2.13 sources)
    from torch.distributed.checkpoint.state_dict import _get_fqns as _dcp_get_fqns
except ImportError:  # pragma: no cover - a torch that renamed it
    _dcp_get_fqns = None


def canonical_fqn(model: nn.Module, name: str) -> str:
    """The name DCP's ``get_model_state_dict`` gives the parameter, buffer or module at `name`.

    Wrapper segments are dropped: ``_checkpoint_wrapped_module`` (``checkpoint_wrapper``), ``_orig_mod``
    (``torch.compile(module)``), DDP's ``module``. DCP's private ``_get_fqns`` does the walk, so the
    result is exactly DCP's key; a torch without it falls back to stripping `WRAPPER_PREFIXES`.
    """
    if _dcp_get_fqns is not None:
        fqns = _dcp_get_fqns(model, name)
        if len(fqns) == 1:
            name = next(iter(fqns))
    # DCP strips "_checkpoint_wrapped_module." only with its dot: a module path ending in it keeps it.
    wrappers = {prefix.rstrip(".") for prefix in WRAPPER_PREFIXES}
    return ".".join(s for s in name.split(".") if s not in wrappers)


_HOST_STAGED = "_fsdp_frozen_host_staged"


def host_like(t: torch.Tensor) -> torch.Tensor:
    """An uninitialised host (CPU) tensor laid out like `t`: for a DTensor, a DTensor with `t`'s
    mesh, placements and global shape whose local tensor lives on the host (DCP reads into it as into
    `t`; checksums see the same shard offsets). Built with the DTensor constructor and ``t._spec``
    (2.4-2.13): ``DTensor.from_local`` would move the local tensor to the mesh's device."""
    local = local_tensor(t)
    host = torch.empty(local.shape, dtype=local.dtype, device="cpu")
    out = DTensor(host, t._spec, requires_grad=False) if isinstance(t, DTensor) else host  # type: ignore[attr-defined]
    setattr(out, _HOST_STAGED, True)
    return out


def is_host_staged(t: Any) -> bool:
    return getattr(t, _HOST_STAGED, False)


def collective_device(group: Any = None) -> torch.device:
    """The device a tensor must be on for a collective on `group` (default: the default group):
    the CPU for gloo (also when gloo serves CPU tensors of a ``"cpu:gloo,cuda:nccl"`` group), else the
    current CUDA device (NCCL). The CPU when no process group is initialised."""
    if not dist.is_initialized():
        return torch.device("cpu")
    backend = str(dist.get_backend(group))
    if "gloo" in backend or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def padded_shard_size(fsdp_param: Any) -> torch.Size:
    """This rank's padded shard size of an FSDP parameter: what it contributes to an all-gather and
    receives from a reduce-scatter (``FSDPParam.padded_sharded_param_size``, 2.4-2.13)."""
    return fsdp_param.padded_sharded_param_size


def init_fake_process_group(world: int) -> None:
    """torch's fake backend (collectives are no-ops) as the default group of `world` ranks, rank 0:
    ``torch.testing._internal.distributed.fake_pg.FakeStore`` (2.1-2.13, as torchtitan's memory
    estimation uses it)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)


def flatten_state_dict(state_dict: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """DCP's own flattening (``torch.distributed.checkpoint._nested_dict``, 2.2-2.13): flat key -> value,
    and flat key -> the path of keys it came from; the same paths the DCP planners see."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict as _flatten

    return _flatten(state_dict)


def op_name(func: Any) -> str:
    """The bare name of an ATen/c10d op overload (``_allgather_base_``) from its schema (2.4-2.13)."""
    return func._schema.name.split("::")[-1]


def group_name_in(args: tuple) -> str:
    """The process group name among a c10d op's arguments (a boxed ``ScriptObject`` in 2.13) or "?"."""
    for a in args:
        if isinstance(a, torch.ScriptObject):
            return dist.ProcessGroup.unbox(a).group_name
        if isinstance(a, dist.ProcessGroup):
            return a.group_name
    return "?"


def fsdp_mem_tracker(model: nn.Module, optimizer: Any) -> Any:
    """torch's ``FSDPMemTracker`` (private ``torch.distributed._tools``, 2.5-2.13; one param group per
    FSDP module only)."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    return FSDPMemTracker(mod=model, optm=optimizer)


# --- nn.Module, DTensor and dispatch internals the package uses (stable since 2.0; checked on 2.6 and 2.13)
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass  # noqa: E402,F401
from torch.utils._pytree import tree_leaves  # noqa: E402,F401

#: The state-dict suffix of a module's ``get_extra_state`` (``nn.modules.module._EXTRA_STATE_KEY_SUFFIX``).
EXTRA_STATE_SUFFIX: str = nn.modules.module._EXTRA_STATE_KEY_SUFFIX


def chunk_list(t: torch.Tensor) -> list[Any]:
    """This rank's chunks of a DTensor (offsets and sizes in the global tensor): DTensor's
    ``__create_chunk_list__``, the protocol DCP plans with."""
    return t.__create_chunk_list__()  # type: ignore[attr-defined]


def tp_meta_like(sharded: Any, dp_mesh: DeviceMesh, dtype: torch.dtype) -> torch.Tensor:
    """A meta DTensor with the tensor-parallel layout of `sharded` (a parameter FSDP sharded on top of
    TP: a DTensor on the (dp..., tp...) mesh) without the data-parallel dims: what
    ``parallelize_module`` registered before `fully_shard` (`refreeze` rebuilds from it). The TP dims are
    the mesh dims `dp_mesh` does not name; the local shape is DTensor's (checked on torch 2.11 and 2.13)."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh = sharded.device_mesh
    dp_names = set(dp_mesh.mesh_dim_names or ())
    dims = [i for i, n in enumerate(mesh.mesh_dim_names or ()) if n not in dp_names]
    tp_mesh = mesh[tuple(mesh.mesh_dim_names[i] for i in dims)] if len(dims) > 1 else mesh[mesh.mesh_dim_names[dims[0]]]
    placements = tuple(sharded.placements[i] for i in dims)
    local_shape, _ = compute_local_shape_and_global_offset(sharded.shape, tp_mesh, placements)
    local = torch.empty(local_shape, dtype=dtype, device="meta")
    return DTensor.from_local(local, tp_mesh, placements, run_check=False, shape=sharded.shape,
                              stride=sharded.stride())


def swap_parameter(module: nn.Module, name: str, new: nn.Parameter) -> nn.Parameter:
    """Put `new` in ``module._parameters[name]`` (no hooks, no FSDP bookkeeping) and return the old one."""
    old = module._parameters[name]
    module._parameters[name] = new
    return old  # type: ignore[return-value]


def set_buffer(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace a registered buffer in place of its registration (keeps persistence)."""
    module._buffers[name] = tensor


def own_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """The buffers registered on `module` itself (not its children), None entries left out."""
    return {n: b for n, b in module._buffers.items() if b is not None}


def is_persistent_buffer(module: nn.Module, name: str) -> bool:
    """False for a buffer registered with ``persistent=False`` (not in state dicts)."""
    return name not in module._non_persistent_buffers_set


def user_class(module: nn.Module) -> type:
    """The class `module` had before ``fully_shard`` swapped in its ``FSDP<Cls>`` subclass (the
    original sits at ``FSDPModule._orig_cls_mro_index`` of the new class's MRO; 2 where torch does not
    name it, as in 2.6-2.13); other modules' own class. Unit class names match against this, so a
    policy names units the same before and after sharding (`refreeze`, `estimate`)."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(module)
    if issubclass(cls, FSDPModule):
        return cls.__mro__[getattr(FSDPModule, "_orig_cls_mro_index", 2)]
    return cls


def remove_fully_shard(root: nn.Module) -> None:
    """Undo ``fully_shard`` on every module under `root`, leaving each module's *sharded* parameters
    (DTensors) registered on it, so that the caller can replace them and shard again (`refreeze`).

    What ``fully_shard`` adds and this removes (checked on torch 2.13; the same names in the 2.11
    source): the forward hooks (``FSDPState._pre_forward_hook_handle`` / ``_post_forward_hook_handle``),
    each param group's state-dict hooks (``_module_to_pre_save/load_state_dict_hook_handle``), the
    composable API's state and registry entries (``contract.STATE_KEY`` / ``REGISTRY_KEY`` in the
    module ``__dict__``) and its module -> state map (``_composable_state._module_state_mapping``), the
    swapped class (``FSDP<Cls>``: the original is at
    ``FSDPModule._orig_cls_mro_index`` of its MRO) and the ``_is_fsdp_managed_module`` /
    ``_fsdp_use_orig_params`` marks. Groups are resharded first, so no unsharded parameter stays
    registered. Communication state (streams, process groups) is left to the garbage collector.
    """
    import importlib

    from torch.distributed.fsdp import FSDPModule

    contract = importlib.import_module("torch.distributed._composable.contract")  # the module, not the function
    from torch.distributed import _composable_state

    modules = [m for m in root.modules() if has_fsdp_state(m)]
    for module in modules:
        module.reshard()  # type: ignore[operator]
    seen: set[int] = set()
    for module in modules:
        state = fully_shard.state(module)
        if id(state) not in seen:
            seen.add(id(state))
            for attr in ("_pre_forward_hook_handle", "_post_forward_hook_handle"):
                handle = getattr(state, attr, None)
                if handle is not None:
                    handle.remove()
            for group in param_groups(module):
                for attr in ("_module_to_pre_save_state_dict_hook_handle", "_module_to_pre_load_state_dict_hook_handle"):
                    for handle in getattr(group, attr, {}).values():
                        handle.remove()
                    getattr(group, attr, {}).clear()
        all_state = module.__dict__.get(contract.STATE_KEY, {})
        for key in [k for k, v in all_state.items() if v is state]:
            del all_state[key]
        module.__dict__.get(contract.REGISTRY_KEY, {}).pop("fully_shard", None)
        getattr(_composable_state, "_module_state_mapping", {}).pop(module, None)
        module.__class__ = user_class(module)
    for module in root.modules():
        for attr in ("_is_fsdp_managed_module", "_fsdp_use_orig_params"):
            module.__dict__.pop(attr, None)


# --- the structural fallback's frozen group entered at its unit ([Note: frozen group entered at its unit] in
# apply.py; ``FSDPState._pre_forward``, ``_modules_to_run_forward`` and ``_pre_forward_hook_handle``: checked on
# 2.11 and 2.13, the same names in the 2.6-2.10 sources, where ``fully_shard`` takes a list of modules)
def enter_at_unit(unit: nn.Module, modules: list[nn.Module]) -> list[Any]:
    """Run the pre-forward of the FSDP group ``fully_shard(modules)`` at `unit`'s forward (after the
    unit's own FSDP pre-forward) instead of at the first of `modules` to run; the handles of the hooks.

    A group of several modules runs its pre-forward once per forward, at the first module to run, and
    its post-forward at the last (``_register_group_forward_hooks``): marking all of them as to run
    makes their own pre-hooks pass, and the post-forward stays. A group of one module has FSDP's
    pre-hook on that module directly: it is replaced by one that passes when the unit entered."""
    state = fully_shard.state(modules[0])
    to_run = state._modules_to_run_forward
    handles: list[Any] = []
    if len(modules) == 1:
        state._pre_forward_hook_handle.remove()

        @torch.compiler.disable
        def module_pre(module: nn.Module, args: Any, kwargs: Any) -> Any:
            return None if module in to_run else state._pre_forward(module, args, kwargs)

        def module_post(module: nn.Module, args: Any, output: Any) -> None:
            to_run.discard(module)

        handles.append(modules[0].register_forward_pre_hook(module_pre, prepend=True, with_kwargs=True))
        handles.append(modules[0].register_forward_hook(module_post, prepend=True, always_call=True))
        state._pre_forward_hook_handle = handles[0]

    @torch.compiler.disable
    def unit_pre(module: nn.Module, args: Any, kwargs: Any) -> Any:
        to_run.update(modules)
        return state._pre_forward(module, args, kwargs)

    handles.append(unit.register_forward_pre_hook(unit_pre, with_kwargs=True))
    return handles


# --- a root fully_shard that manages nothing ([Note: dormant root] in apply.py; checked on 2.13, the same
# attribute names in the 2.7-2.11 sources; where they are missing the hooks stay and only cost time)
def remove_forward_hooks(module: nn.Module) -> bool:
    """Take ``fully_shard``'s forward pre/post hooks off `module` (its state's
    ``_pre_forward_hook_handle`` / ``_post_forward_hook_handle``), keeping the FSDPModule class, the
    state and its methods. False, and nothing changed, where this torch names them otherwise."""
    state = fully_shard.state(module)
    handles = [getattr(state, attr, None) for attr in ("_pre_forward_hook_handle", "_post_forward_hook_handle")]
    if any(h is None for h in handles):
        return False
    for handle in handles:
        handle.remove()
    return True


def forward_inputs(device: torch.device | None, param_dtype: torch.dtype | None) -> Any:
    """``prepare(args, kwargs) -> (args, kwargs)`` doing what FSDP2's pre-forward does to a module's
    inputs (2.13 ``FSDPState._root_pre_forward`` and ``_pre_forward``): at the root on an accelerator
    (`device` given, not CPU), moved to `device` as DDP moves them (``torch.distributed.utils._to_kwargs``);
    then, with a `param_dtype`, floating-point tensors cast to it with FSDP2's own rule
    (``_apply_to_tensors`` with ``_cast_fp_tensor`` from ``torch.distributed.fsdp._fully_shard._fsdp_common``,
    so the rule cannot drift; checked on 2.11 and 2.13). The helpers are looked up once, here."""
    from torch.distributed.fsdp._fully_shard._fsdp_common import _cast_fp_tensor
    from torch.distributed.utils import _apply_to_tensors, _to_kwargs

    move = device is not None and device.type != "cpu"
    cast = functools.partial(_cast_fp_tensor, param_dtype) if param_dtype is not None else None

    def prepare(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if move and (args or kwargs):
            moved_args, moved_kwargs = _to_kwargs(args, kwargs, device, False)
            args, kwargs = moved_args[0], moved_kwargs[0]
        if cast is not None:
            args, kwargs = _apply_to_tensors(cast, args), _apply_to_tensors(cast, kwargs)
        return args, kwargs

    return prepare


# --- autograd and FSDP-layout internals of the replicated trainable group (`replicate.py`; checked on 2.6 and 2.13)
def queue_backward_callback(callback: Any) -> None:
    """Run `callback` once the current backward pass has finished (FSDP2's root post-backward uses the
    same engine hook: ``Variable._execution_engine.queue_callback``, unchanged since 1.x). Only valid
    while a backward is running (from a tensor or multi-grad hook)."""
    torch.autograd.Variable._execution_engine.queue_callback(callback)  # type: ignore[attr-defined]


def unflatten_dense(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Views of the 1-D `flat` shaped as each tensor of `like`, in order, made in one C++ call
    (``torch._utils._unflatten_dense_tensors``, what DDP and apex use; the same in 2.4-2.13)."""
    from torch._utils import _unflatten_dense_tensors

    return list(_unflatten_dense_tensors(flat, like))


def chunk_cat(tensors: list[torch.Tensor], num_chunks: int, out: torch.Tensor) -> None:
    """FSDP2's reduce-scatter copy-in layout: each tensor padded on dim 0 to a multiple of
    `num_chunks`, cut in `num_chunks` chunks, chunk i of every tensor in row i of `out`
    (``(num_chunks, -1)``, in `out`'s dtype). ``torch._chunk_cat`` (FSDP2 calls it as
    ``torch.ops.fsdp.chunk_cat``; both exist in 2.4-2.13)."""
    torch._chunk_cat(tensors, dim=0, num_chunks=num_chunks, out=out)  # type: ignore[attr-defined]


def in_checkpointed_region() -> bool:
    """True inside an activation-checkpointed forward or its recompute (`nf4_compute`'s cue that the
    dense weight it saves lives at most while the unit computes). Private autograd state, checked on
    torch 2.11 and 2.13: non-reentrant ``torch.utils.checkpoint`` installs saved-tensor hooks whose
    pack is a ``_checkpoint_hook`` (forward) or ``_recomputation_hook`` (recompute) method; a forward
    inside a backward graph task with no such hooks is the reentrant checkpoint's recompute."""
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    if hooks is not None:
        pack = hooks[0]
        return getattr(pack, "__module__", None) == "torch.utils.checkpoint" and getattr(
            pack, "__qualname__", "").startswith(("_checkpoint_hook.", "_recomputation_hook."))
    return torch._C._current_graph_task_id() != -1

