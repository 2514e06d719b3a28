"""`shard_with_freezing`: turn a plan into fully_shard calls. The only module that applies FSDP2."""

from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Shard

from . import _torch_compat as compat
from . import process_groups
from .errors import DISABLED_ADAPTER_HINT, FreezingChangedError, PolicyError
from .plan import FROZEN, ShardingPlan, build_plan
from .policy import FreezePolicy
from .replicate import ReplicatedTrainables
from .storage import cast_frozen, quantize_nf4, shard_device
from .tp import check_tp

_STATE_ATTR = "_fsdp_frozen_state"
_REQUIRES_GRAD = operator.attrgetter("requires_grad")


@dataclass
class ShardedModelState:
    """What `shard_with_freezing` leaves on the model for `describe` and the checkpoint planners."""

    policy: FreezePolicy
    plan: ShardingPlan
    mesh: DeviceMesh  #: the mesh the model was sharded on (its device type is where shards live)
    fsdp_params: dict[str, Any]  #: canonical parameter FQN -> FSDP's per-parameter record
    param_groups: dict[tuple[str, str], Any]  #: (unit, kind) -> the FSDPParamGroup built for that plan group
    frozen_settings: list[tuple[Any, Any]]  #: (frozen FSDPParamGroup, its reshard settings as applied)
    #: canonical FQN -> dtype the parameter had before frozen storage (what it becomes if unfrozen)
    original_dtypes: dict[str, torch.dtype] = field(default_factory=dict)
    hooks: list[Any] = field(default_factory=list)  #: handles of the hooks shard_with_freezing registered
    #: True from a forward run with grad enabled until its backward starts (`refreeze` refuses then)
    backward_pending: bool = False
    #: the trainable parameters kept out of FSDP under trainable_grouping="replicate" (else None)
    replicated: ReplicatedTrainables | None = None
    #: the root's forward pre-hook and forward hook (`register_forward_method` runs them around a method)
    root_hooks: tuple[Any, Any] | None = None

    def restore_frozen_policy(self) -> None:
        """Undo whatever FSDP's public setters did to the frozen groups (see [Note: setters]).

        Runs before every forward: per frozen group it compares the two group-level attributes the
        setters write (a few attribute reads), and restores everything only on a difference.
        """
        for group, settings in self.frozen_settings:
            if compat.reshard_settings(group, per_param=False) != settings[:2]:
                compat.set_reshard_settings(group, settings)


def state_or_none(model: nn.Module) -> ShardedModelState | None:
    """The state `shard_with_freezing` attached to `model`, or None for a model it did not shard."""
    return getattr(model, _STATE_ATTR, None)


def sharded_state(model: nn.Module) -> ShardedModelState:
    """The state `shard_with_freezing` attached to `model`; PolicyError if there is none."""
    state = state_or_none(model)
    if state is None:
        raise PolicyError(f"{type(model).__name__} was not sharded with fsdp_frozen.shard_with_freezing")
    return state


def shard_with_freezing(model: nn.Module, mesh: DeviceMesh, policy: FreezePolicy) -> nn.Module:
    """Apply FSDP2 so that each unit's frozen parameters form their own no-grad param group.

    Every unit (``policy.units`` plus the root) gets at most two groups: trainable parameters,
    sharded and reduce-scattered as plain FSDP2 does, and frozen parameters, which

    * are stored in ``policy.frozen_dtype`` (converted once here; no per-step cast),
    * follow ``policy.frozen_reshard``: two all-gathers per step (``"after_forward"``), one
      (``"after_backward"``: the unsharded frozen weights live from forward to the end of
      backward), none in steady state (``"never"``: they stay unsharded, costing their full
      bytes on every rank), or a partial reshard to N ranks (int),
    * get no ``.grad`` and no optimizer state, and never appear in a reduce-scatter.

    On torch >= 2.12 the split is per parameter (a module with a frozen weight and a trainable
    bias is split too), using a second set of process groups over the same ranks for frozen
    groups. On older torch, frozen-only submodules are grouped structurally and frozen parameters
    of mixed modules stay in the trainable group, with a warning naming them.

    Args:
        model: an unsharded module, its parameters real or on the meta device (then nothing is
            allocated; `fsdp_frozen.checkpoint.load_pretrained` fills the shards); sharded in place
            and returned.
        mesh: 1-D (FSDP) or 2-D (HSDP: replicate x shard) device mesh. The frozen groups' process
            groups are created on the first call for a mesh and reused by later ones
            (`fsdp_frozen.process_groups`; `release_process_groups` frees them).
        policy: a `FreezePolicy`.

    Raises:
        PolicyError: bad policy for this model/mesh, before anything is changed.
    """
    if not isinstance(policy, FreezePolicy):
        raise PolicyError(f"policy must be a FreezePolicy, got {type(policy).__name__}")
    if not isinstance(mesh, DeviceMesh) or mesh.ndim not in (1, 2):
        raise PolicyError(f"mesh must be a 1-D (FSDP) or 2-D (HSDP) DeviceMesh, got {mesh!r}")
    if getattr(model, _STATE_ATTR, None) is not None:
        raise PolicyError(f"{type(model).__name__} is already sharded by shard_with_freezing")
    for name, module in model.named_modules():
        if compat.has_fsdp_state(module):
            raise PolicyError(
                f"module {name or '<root>'!r} already has fully_shard applied; pass an unsharded model"
            )
    check_tp(model, mesh)  # FSDP x TP: one world mesh, adapters placed ([Note: LoRA under TP])
    check_supported(policy, mesh)
    plan = build_plan(model, policy, shard_size=mesh.size(mesh.ndim - 1))
    if plan.unsplit:
        warnings.warn(
            f"torch {compat.TORCH_VERSION[0]}.{compat.TORCH_VERSION[1]} cannot hold two param groups in "
            f"one module (needs >= 2.12): frozen parameters {list(plan.unsplit)} share their unit's "
            f"trainable group and are gathered like trainable ones",
            stacklevel=2,
        )

    original_dtypes = {plan.names.canonical(path): p.dtype for path, p in model.named_parameters()}
    for path, param in model.named_parameters():
        param.requires_grad_(plan.names.canonical(path) not in plan.frozen)
    if plan.quantized:
        quantize_nf4(model, [plan.path(f) for f in sorted(plan.quantized)], policy.nf4_block_size,
                     policy.nf4_scaler_block_size, policy.torch_param_dtype)
    if policy.torch_frozen_dtype is not None:
        cast_frozen(model, [plan.path(f) for f in sorted(plan.frozen - plan.quantized)], policy.torch_frozen_dtype)

    mp_policy = MixedPrecisionPolicy(param_dtype=policy.torch_param_dtype, reduce_dtype=policy.torch_reduce_dtype)
    apply = _apply_split if plan.split else _apply_structural
    unit_hooks = apply(model, mesh, plan, mp_policy)

    names = {id(p): plan.names.canonical(n) for n, p in model.named_parameters()}
    fsdp_params, group_of = {}, {}
    for _, group, fp in compat.iter_all_fsdp_params(model):
        fqn = names[id(compat.sharded_param(fp))]
        fsdp_params[fqn], group_of[fqn] = fp, group
        released = compat.released_groups(compat.sharded_param(fp))
        if released:  # [Note: frozen groups' names]: the case it does not cover
            raise RuntimeError(
                f"parameter {fqn!r} was sharded onto process group(s) {released} that release_process_groups() "
                f"destroyed: torch's DTensor caches take meshes of the same ranks and dim names for one, and a "
                f"frozen mesh under TP must equal your data-parallel sub-mesh. Shard the models you need before "
                f"calling release_process_groups(), or call it only at the end of the job")
    param_groups = {(g.unit, g.kind): group_of[p] for g in plan.groups for p in g.params[:1] if p in group_of}
    frozen_settings = [(group, compat.reshard_settings(group)) for (unit, kind), group in param_groups.items()
                       if kind == FROZEN and not plan.frozen_group(unit).merged]  # [Note: merged frozen groups]
    state = ShardedModelState(policy=policy, plan=plan, mesh=mesh, fsdp_params=fsdp_params, param_groups=param_groups,
                              frozen_settings=frozen_settings, original_dtypes=original_dtypes)
    _move_unmanaged(model, plan, shard_device(mesh))
    if plan.replicated:
        group = next(g for g in plan.groups if g.params and g.params[0] in plan.replicated)
        whole = sorted(plan.unmanaged - plan.quantized)  # "never" frozen groups kept whole ([Note: whole frozen groups])
        state.replicated = ReplicatedTrainables(model, group.params, [plan.path(f) for f in group.params], mesh,
                                                mp_policy, shard_device(mesh),
                                                frozen_paths=tuple(plan.path(f) for f in whole))
    setattr(model, _STATE_ATTR, state)
    _guard_setters(model, state)
    state.root_hooks = (_freezing_check(state, model), _track_backward(state))
    state.hooks = [*unit_hooks, model.register_forward_pre_hook(state.root_hooks[0], prepend=True),
                   model.register_forward_hook(state.root_hooks[1])]
    _cast_inputs_outside_fsdp(model, state, mp_policy)
    if not fsdp_params:
        _dormant_root(model, state, mp_policy)
    return model


def _move_unmanaged(model: nn.Module, plan: ShardingPlan, device: torch.device) -> None:
    """Move the parameters the plan keeps out of FSDP (`ShardingPlan.unmanaged`: NF4 weights at shard
    size 1, frozen groups kept whole) to the mesh's device, as ``fully_shard`` moves the ones it
    manages: it leaves its ``ignored_params`` where they are, so a model built on the CPU would compute
    with CPU weights on a GPU mesh. Plain tensors move in place; an NF4Tensor cannot take
    ``.data =`` across devices, so its moved Parameter takes every slot of the old one (as a plain one does
    to the meta device, which the tests use as a stand-in for an accelerator). Meta ones stay
    (`load_pretrained` allocates them on the device)."""
    if not plan.unmanaged:
        return
    slots: dict[int, list[tuple[nn.Module, str]]] = {}
    for path, param in model.named_parameters(remove_duplicate=False):
        parent, _, leaf = path.rpartition(".")
        slots.setdefault(id(param), []).append((model.get_submodule(parent), leaf))
    with torch.no_grad():
        for fqn in sorted(plan.unmanaged):
            param = model.get_parameter(plan.path(fqn))
            if param.device.type == "meta" or param.device == device:
                continue
            if type(param.data) is torch.Tensor and device.type != "meta":  # .data cannot turn a tensor into meta
                param.data = param.data.to(device)
                continue
            moved = nn.Parameter(param.detach().to(device), requires_grad=param.requires_grad)
            for module, leaf in slots[id(param)]:
                compat.swap_parameter(module, leaf, moved)


def _input_hook(device: torch.device | None, mp_policy: MixedPrecisionPolicy):
    """A forward pre-hook (``with_kwargs=True``) doing to a module's inputs what FSDP2's pre-forward
    does at an FSDP module: on an accelerator and for the root only (`device`), the move to the
    device; then the cast of floating-point inputs to ``param_dtype`` under
    ``MixedPrecisionPolicy.cast_forward_inputs`` (`compat.forward_inputs`, FSDP2's own rule)."""
    param_dtype = mp_policy.param_dtype if mp_policy.cast_forward_inputs else None
    prepare = compat.forward_inputs(device, param_dtype)

    def inputs(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return prepare(args, kwargs)

    return inputs


def _cast_inputs_outside_fsdp(model: nn.Module, state: ShardedModelState, mp_policy: MixedPrecisionPolicy) -> None:
    """[Note: units outside FSDP] A unit the plan leaves without ``fully_shard`` (every parameter
    kept out of FSDP: ``trainable_grouping="replicate"`` with its ``"never"`` frozen group whole, or at
    shard size 1 a unit whose trainable parameters are replicated or the root's, [Note: whole frozen
    groups]) would lose the one thing FSDP2 does to its inputs: the cast of
    floating-point tensors to ``param_dtype``. Without it an activation promoted to fp32 between
    units (an fp32 buffer added at the root, a scale) reaches bf16 weights and the unit fails
    ('mixed dtype'), or computes in another dtype than plain FSDP2 does. So each such unit gets
    the cast as a pre-hook, prepended as FSDP2 prepends its own: a unit behaves the same whether
    or not FSDP manages it (tested against plain FSDP2 in `tests/test_matrix.py`)."""
    if mp_policy.param_dtype is None or not mp_policy.cast_forward_inputs:
        return
    hook = _input_hook(None, mp_policy)
    for unit in sorted(state.plan.units_without_fsdp):
        module = model.get_submodule(state.plan.path(unit))
        state.hooks.append(module.register_forward_pre_hook(hook, with_kwargs=True, prepend=True))


def _dormant_root(model: nn.Module, state: ShardedModelState, mp_policy: MixedPrecisionPolicy) -> None:
    """[Note: dormant root] When no parameter is left to FSDP (``trainable_grouping="replicate"`` with
    every frozen group kept whole, [Note: whole frozen groups]), the root's fully_shard is the only
    one and manages nothing. It is kept: the model stays an FSDPModule (its methods,
    ``set_requires_gradient_sync`` included, work and do nothing FSDP-side), and fully_shard moved
    the buffers to the mesh's device. But its forward hooks would run FSDP2's per-step root
    bookkeeping for no group (lazy init, stream waits, pre-backward hooks on the outputs and a
    final backward callback: 0.3-0.4 ms per step on the benchmark's CPU, ~2% of its LoRA step at
    1 x 16), so they are taken off, and this pre-hook does what of them still matters: the inputs
    moved to the device on an accelerator and floating-point inputs cast to ``param_dtype``
    (``MixedPrecisionPolicy.cast_forward_inputs``), as FSDP2's root does."""
    if not compat.remove_forward_hooks(model):
        return
    hook = _input_hook(shard_device(state.mesh), mp_policy)
    state.hooks.append(model.register_forward_pre_hook(hook, with_kwargs=True, prepend=True))


def check_supported(policy: FreezePolicy, mesh: DeviceMesh) -> None:
    """Refuse what validates as a policy but cannot be built on this mesh (before anything changes)."""
    if policy.frozen_dtype == "float8_e4m3fn":
        backend = dist.get_backend(mesh.get_group(mesh.ndim - 1))
        raise PolicyError(
            "FreezePolicy.frozen_dtype='float8_e4m3fn' is not supported: "
            + (f"the {backend} backend cannot all-gather float8 tensors (it fails with 'Invalid scalar type' "
               f"inside the collective); " if backend == "gloo" else "")
            + "float8 frozen storage is not implemented (torchao's float8 FSDP2 support targets trainable "
            "weights); use frozen_dtype='bfloat16' or 'nf4'"
        )


def _track_backward(state: ShardedModelState):
    """Root forward hook: mark a forward whose backward has not started yet (`refreeze` refuses to
    regroup then: the autograd graph holds the current parameters). Under
    ``trainable_grouping="replicate"`` the same signal queues the replicated group's reduction, and a
    forward no backward follows (no output requires grad) puts its parameters back at once."""

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        replicated = state.replicated
        tensors = [t for t in compat.tree_leaves(output) if isinstance(t, torch.Tensor) and t.requires_grad]
        if not tensors:
            if replicated is not None:
                replicated.swap_back()
            return
        state.backward_pending = True

        def started(_grad: Any) -> None:
            state.backward_pending = False
            if replicated is not None:
                replicated.backward_started()

        torch.autograd.graph.register_multi_grad_hook(tensors, started, mode="any")

    return hook


def register_forward_method(model: nn.Module, method_name: str) -> None:
    """Run `model.<method_name>` (``"generate"``) as its forward runs: FSDP2's root pre- and
    post-forward (``register_fsdp_forward_method``), and this package's root hooks around them.

    transformers' ``generate`` (through PEFT's wrapper too) calls the inner model's forward, never the
    root's, so the root's hooks would not run: under FSDP2 the root's own parameters stay sharded
    (torch's ``register_fsdp_forward_method`` is for that), and under
    ``trainable_grouping="replicate"`` the ``param_dtype`` copies of the adapters would not be
    refreshed and put in place: the rollouts would compute with the fp32 adapters, unlike every
    forward. Use this instead of torch's function (it calls it). Idempotent per method name.
    """
    from torch.distributed.fsdp import register_fsdp_forward_method

    state = sharded_state(model)
    if compat.has_fsdp_state(model):
        register_fsdp_forward_method(model, method_name)
    method = getattr(model, method_name)
    if getattr(method, "_fsdp_frozen_wrapped", False):
        return
    pre, post = state.root_hooks

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        pre(model, args)
        if state.replicated is not None:
            state.replicated._pre_forward(model, args)
        out = method(*args, **kwargs)
        post(model, args, out)
        return out

    wrapped._fsdp_frozen_wrapped = True  # type: ignore[attr-defined]
    object.__setattr__(model, method_name, wrapped)


def unshard_with_freezing(model: nn.Module) -> ShardedModelState:
    """Remove what `shard_with_freezing` applied (FSDP2 and this package's hooks and setters), leaving
    the sharded parameters registered; returns the state it had. Used by `refreeze` only."""
    state = sharded_state(model)
    for handle in state.hooks:
        handle.remove()
    if state.replicated is not None:
        state.replicated.remove()
    for module in model.modules():
        for name in _RESHARD_SETTERS:
            module.__dict__.pop(name, None)
    compat.remove_fully_shard(model)
    delattr(model, _STATE_ATTR)
    return state


#: FSDP setters that rewrite the reshard behaviour of every param group of the modules they reach.
_RESHARD_SETTERS = ("set_reshard_after_forward", "set_reshard_after_backward")


def _guard_setters(model: nn.Module, state: ShardedModelState) -> None:
    """[Note: setters] FSDP's public ``set_reshard_after_forward`` / ``set_reshard_after_backward``
    set every param group of a module (recursively by default), so on their own they would give a
    ``"never"`` frozen group two all-gathers per step while the plan (and `describe`) say 0. Here they
    change the trainable groups only: each FSDP module under `model` gets the setters as instance
    attributes that call FSDP's and then restore the frozen groups' settings as applied. A call that
    bypasses the instance (``FSDPModule.set_reshard_after_forward(m, ...)``) is undone at the next
    forward by the root's pre-hook. Other setters (prefetching, gradient sync, ...) are left alone:
    they either do not touch frozen groups or mean the same for them.
    """
    for module in model.modules():
        if not compat.has_fsdp_state(module):
            continue
        for name in _RESHARD_SETTERS:
            original = getattr(module, name)

            def guarded(*args: Any, _original: Any = original, **kwargs: Any) -> None:
                _original(*args, **kwargs)
                state.restore_frozen_policy()

            guarded.__doc__ = f"{original.__doc__ or ''}\n\nfsdp_frozen: frozen param groups keep their policy."
            object.__setattr__(module, name, guarded)


def _unmanaged(plan: ShardingPlan, unit: str) -> list[str]:
    """The unit's frozen parameters the plan keeps out of FSDP (`ShardingPlan.unmanaged`): in its
    frozen group, or (torch < 2.12 fallback) left in its trainable group with a trainable neighbour."""
    return [f for g in plan.groups_of(unit) for f in g.params if f in plan.unmanaged]


def _ignored(model: nn.Module, plan: ShardingPlan, unit: str) -> dict[str, Any]:
    names = [*plan.ignored.get(unit, ()), *_unmanaged(plan, unit)]
    # a unit without fully_shard leaves its parameters to the enclosing call, which must ignore them too
    names += [f for u in plan.units_without_fsdp if u != unit and (unit == "" or u.startswith(unit + "."))
              for g in plan.groups_of(u) for f in g.params]
    ignored = {model.get_parameter(plan.path(f)) for f in names}
    return {"ignored_params": ignored} if ignored else {}


def _dim1_placement(model: nn.Module, plan: ShardingPlan) -> Any:
    """``shard_placement_fn`` giving ``Shard(1)`` to `ShardingPlan.shard_dim1` (None: FSDP's dim 0),
    or None when there are none ([Note: adapters without padding] in plan.py)."""
    if not plan.shard_dim1:
        return None
    ids = {id(model.get_parameter(plan.path(f))) for f in plan.shard_dim1}
    return lambda p: Shard(1) if id(p) in ids else None


def _apply_split(model: nn.Module, mesh: DeviceMesh, plan: ShardingPlan, mp_policy: MixedPrecisionPolicy) -> list[Any]:
    """torch >= 2.12: one fully_shard per unit; frozen params go to a param group on their own PGs (which
    FSDP enters at the unit's forward: no hooks of ours, an empty list)."""
    frozen_mesh_info = None
    if any(g.kind == FROZEN and not g.merged for g in plan.groups):
        frozen_mesh_info = process_groups.frozen_mesh_info(mesh)  # created once per mesh, then reused

    dim1 = _dim1_placement(model, plan)
    for unit in plan.apply_order:  # root first under trainable_grouping='root' ([Note: root grouping])
        module = model.get_submodule(plan.path(unit))
        frozen_group = plan.frozen_group(unit)
        if unit in plan.units_without_fsdp:  # [Note: whole frozen groups]
            continue
        if frozen_group is not None and frozen_group.merged:  # in the trainable group ([Note: merged frozen groups])
            frozen_group = None
        unmanaged = set(_unmanaged(plan, unit))
        frozen_ids = (
            {id(model.get_parameter(plan.path(f))) for f in frozen_group.params if f not in unmanaged}
            if frozen_group else set()
        )
        placement = compat.placement_on(frozen_mesh_info) if frozen_ids else None
        fully_shard(
            module,
            mesh=mesh,
            reshard_after_forward=plan.unit_reshard[unit],
            shard_placement_fn=(lambda p: placement if id(p) in frozen_ids else dim1 and dim1(p)) if frozen_ids else dim1,
            mp_policy=mp_policy,
            **_ignored(model, plan, unit),
        )
        if not frozen_ids:
            continue
        group = next(g for g in compat.param_groups(module) if compat.group_mesh_info(g) is frozen_mesh_info)
        reshard = frozen_group.reshard
        if reshard == "after_forward":
            post_forward = frozen_mesh_info
        elif reshard in ("after_backward", "never"):
            post_forward = None
        else:
            post_forward = process_groups.post_forward_mesh_info(mesh, reshard)
        compat.configure_group(group, post_forward, reshard_after_backward=reshard != "never")
    return []


def _apply_structural(model: nn.Module, mesh: DeviceMesh, plan: ShardingPlan,
                      mp_policy: MixedPrecisionPolicy) -> list[Any]:
    """torch < 2.12: frozen-only submodules of each unit become one extra FSDP group, entered at the
    unit's forward; the handles of the hooks that do so.

    [Note: frozen group entered at its unit] FSDP wraps a group's inputs in one identity autograd node
    (``RegisterPostBackwardFunction``) at the group's pre-forward. Entered at its first module (a
    block's input norm), the frozen group put that node between the block's input and the norm, so the
    gradients of the block input's consumers were summed in two steps (the residual's, then the norm's
    two: an fp32 RMSNorm's ``.to(float32)`` returns its input, consumed by ``pow`` and ``mul``) where
    plain FSDP2 sums all three in one buffer: other rounding, up to 5e-6 in fp32 parameters after three
    steps on transformers models. Entered at the unit (`_torch_compat.enter_at_unit`), its node sits on
    the unit's input beside the unit's own, and an identity chain changes no sum: bitwise plain FSDP2
    (tests/test_matrix.py's fallback cases). The frozen weights are gathered at the unit's start rather
    than at their first module's, and resharded after the unit's backward (when the gradient reaches its
    input) rather than the first module's: a few modules' time longer, as the unit's trainable group."""
    dim1 = _dim1_placement(model, plan)
    hooks: list[Any] = []
    for unit in plan.apply_order:  # root first under trainable_grouping='root' ([Note: root grouping])
        if unit in plan.units_without_fsdp:  # [Note: whole frozen groups]
            continue
        frozen_group = plan.frozen_group(unit)
        if frozen_group is not None and (frozen_group.merged or all(f in plan.unmanaged for f in frozen_group.params)):
            frozen_group = None  # in the unit's trainable group ([Note: merged frozen groups]), or kept whole
        if frozen_group is not None:
            modules = [model.get_submodule(plan.path(m)) for m in frozen_group.modules]
            reshard = frozen_group.reshard
            # what the plan keeps out of FSDP (NF4 weights at shard size 1) is out of this call too
            unmanaged = {model.get_parameter(plan.path(f)) for f in frozen_group.params if f in plan.unmanaged}
            fully_shard(
                modules,
                mesh=mesh,
                reshard_after_forward=reshard if isinstance(reshard, int) else reshard == "after_forward",
                mp_policy=mp_policy,
                **({"ignored_params": unmanaged} if unmanaged else {}),
            )
            if reshard == "never":
                modules[0].set_reshard_after_backward(False, recurse=False)
        unit_module = model.get_submodule(plan.path(unit))
        fully_shard(
            unit_module,
            mesh=mesh,
            reshard_after_forward=plan.unit_reshard[unit],
            shard_placement_fn=dim1,
            mp_policy=mp_policy,
            **_ignored(model, plan, unit),
        )
        if frozen_group is not None:
            hooks += compat.enter_at_unit(unit_module, modules)
    return hooks


def _freezing_entries(state: ShardedModelState) -> list[tuple[str, Any, bool]]:
    """(canonical FQN, FSDP's record, whether the plan made it trainable) of every FSDP parameter."""
    return [(fqn, fp, fqn not in state.plan.frozen) for fqn, fp in state.fsdp_params.items()]


def _sync_flags(entries: list[tuple[str, Any, bool]]) -> list[tuple[str, bool]]:
    """[Note: stale requires_grad] PEFT's ``disable_adapter()`` (and anything else that calls
    ``module.requires_grad_``) sets the flag on the tensor registered on the module at that
    moment: the sharded parameter, or FSDP's unsharded one while the group is gathered (a root or
    ``"never"`` group after a forward no backward followed). A round trip can so leave the other
    tensor with the old flag, and once it is registered again plain FSDP2 trains the adapter on (the
    unsharded flag rules the autograd graph, the sharded one nothing) or silently stops training it,
    and a `refreeze` would read the stale flag as a freeze. Here the registered tensor says what
    the user wants: where it agrees with the plan, a stale flag on the other tensor is put back;
    where it does not, the parameter is returned (the forward check raises for it). Run before every
    grad-enabled forward and before anything that reshards (checkpoints, `refreeze`,
    `load_pretrained`), while the registered tensor still tells."""
    changed = []
    for fqn, fp, want in entries:
        for tensor in (compat.sharded_param(fp), compat.unsharded_param_if_any(fp)):
            if tensor is not None and tensor.requires_grad != want:
                if compat.registered_param(fp).requires_grad != want:
                    changed.append((fqn, want))
                    break
                tensor.requires_grad_(want)
    return changed


def sync_requires_grad(model: nn.Module) -> None:
    """Put back stale ``requires_grad`` flags of a sharded model's FSDP parameters ([Note: stale
    requires_grad]); a no-op for a model `shard_with_freezing` did not shard."""
    state = state_or_none(model)
    if state is not None:
        _sync_flags(_freezing_entries(state))


def _freezing_check(state: ShardedModelState, model: nn.Module):
    """Root forward pre-hook: refuse to run on after a parameter's requires_grad was flipped, and put
    back the frozen groups' reshard settings if an FSDP setter was called around the guard.

    [Note: no-grad forwards] A forward under ``torch.no_grad()`` (or inference mode) builds no
    graph, so no gradient can reach a group that was built for the other side of the split: the
    check is skipped there. That is the reference-model forward of DPO/GRPO trainers on a PEFT model:
    ``with model.disable_adapter():`` sets ``requires_grad=False`` on every adapter for the duration
    (PEFT's ``enable_adapters(False)``) and puts it back on exit ([Note: stale requires_grad]).

    [Note: the check's steady state] Every flag as planned is what almost every forward finds, and
    then `_sync_flags` changes nothing and returns nothing. So the hook first asks exactly that (every
    sharded and unsharded tensor of the trainable records requires grad, none of the frozen ones'
    does) in C-level maps over two tuples made once here, `compat.requires_grad_all`, and runs
    `_sync_flags`' Python loop only when some flag differs. Still one read per tensor: torch has no
    hook or version counter for ``requires_grad``, so catching every flip means reading every flag.
    At 1,843 FSDP parameters (80 LoRA'd Llama blocks, `recipes/benchmark_structure.py`) on a 2-core
    CPU: 1.33 ms -> 1.0 ms per forward, most of it the reads themselves (~170 ns for a DTensor)."""
    entries = _freezing_entries(state)
    trainable = tuple(fp for _, fp, want in entries if want)
    frozen = tuple(fp for _, fp, want in entries if not want)
    # frozen parameters kept out of FSDP ([Note: whole frozen groups], NF4 at shard size 1): one tensor
    # each, read from the module slot it is registered in (load_pretrained and refreeze register new objects)
    outside = sorted(state.plan.unmanaged)
    paths = [state.plan.path(f).rpartition(".") for f in outside]
    dicts = tuple(model.get_submodule(parent)._parameters for parent, _, _ in paths)
    leaves = tuple(leaf for _, _, leaf in paths)

    def check(module: nn.Module, args: Any) -> None:
        state.restore_frozen_policy()
        if not torch.is_grad_enabled():  # [Note: no-grad forwards]
            return
        if any(map(_REQUIRES_GRAD, map(operator.getitem, dicts, leaves))):  # C-level maps, no frame per parameter
            fqn = next(f for f, d, leaf in zip(outside, dicts, leaves) if d[leaf].requires_grad)
            raise FreezingChangedError(
                f"requires_grad of parameter {fqn!r} changed from False to True after shard_with_freezing, "
                f"which kept it frozen, whole outside FSDP. Set requires_grad (or FreezePolicy.freeze/unfreeze) "
                f"before sharding, use fsdp_frozen.refreeze to unfreeze it, or restore requires_grad=False.")
        if compat.requires_grad_all(trainable, True) and compat.requires_grad_all(frozen, False):
            return  # [Note: the check's steady state]: _sync_flags would do nothing
        for fqn, want in _sync_flags(entries)[:1]:
            raise FreezingChangedError(
                f"requires_grad of parameter {fqn!r} changed from {want} to {not want} after "
                f"shard_with_freezing; its param group was built as "
                f"{'trainable' if want else 'frozen'}. Set requires_grad (or FreezePolicy.freeze/"
                f"unfreeze) before sharding: rebuild the model, shard it with the new policy and "
                f"load your checkpoint into it, use fsdp_frozen.refreeze, or restore "
                f"requires_grad={want}.{DISABLED_ADAPTER_HINT if want else ''}"
            )

    return check
