"""`refreeze`: change what is frozen during a run, in place, without a checkpoint on disk.

[Note: how refreeze rebuilds] FSDP2 cannot regroup parameters, and it cannot be re-applied to a
module that has it. So `refreeze`:
1. plans the new policy and checks it (patterns, units, NF4, the optimizer) before touching anything;
2. removes FSDP2 and this package's hooks from the model (`apply.unshard_with_freezing`), keeping
   each parameter's old shard;
3. registers meta parameters of the original shapes and dtypes, and shards the model again with
   `shard_with_freezing` (the meta path `load_pretrained` uses; nothing is allocated there);
4. allocates this rank's new shards and copies each one from the old shard of the same rank. The
   layout is the same (the same mesh, dim 0 of the same global shape), so the copy is local: a
   dtype cast where the storage dtype changes, a local dequantization of an NF4 shard that becomes
   trainable. An NF4 weight newly frozen under ``frozen_dtype="nf4"`` is the one exception: it is
   quantized whole (torchao's double quantization is not local), gathered one weight at a time;
5. rebinds the optimizer. Its param groups stay the same dicts (lr, weight decay, and schedulers
   bound to them keep working) and every parameter it lists (as its new object). Kept parameters keep
   their state and ``.grad``; newly frozen ones lose both; newly trainable ones it does not list join
   ``param_group`` with no state.

Peak memory beyond the step's is this rank's old and new shards together (every shard is allocated
before the copies), plus one whole weight per NF4 weight newly quantized. Communication: only for
newly quantized NF4 weights (one all-gather each, in canonical-name order on every rank).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from . import _torch_compat as compat
from . import _torchao_compat as ao
from .apply import check_supported, shard_with_freezing, sharded_state, sync_requires_grad, unshard_with_freezing
from .errors import PolicyError
from .plan import build_plan
from .policy import FreezePolicy
from .storage import is_nf4, materialize_meta, shard_device


def refreeze(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    policy: FreezePolicy,
    *,
    dequantize: bool = False,
    param_group: int = 0,
) -> nn.Module:
    """Re-plan a sharded model under `policy` and rebuild its param groups in place (collective).

    `policy` is applied on top of the current frozen set, as `shard_with_freezing` applies a policy
    to the ``requires_grad`` it finds: ``unfreeze=["layers.2.**"]`` opens block 2, ``freeze=[...]``
    closes parameters. Frozen storage, reshard policies and trainable grouping come from `policy`.

    * Newly trainable parameters get trainable storage in their original dtype (converted once from
      the frozen shard), a place in ``optimizer.param_groups[param_group]`` and fresh optimizer state.
      An NF4 weight becomes trainable only with ``dequantize=True`` (its dequantized values; a warning
      names it).
    * Newly frozen parameters lose their optimizer state and gradient, move to frozen storage and take
      the frozen policy.
    * Every other parameter keeps its values, its gradient and its optimizer state bitwise.
    * `describe` and checkpoints follow the new layout; a ``frozen="auto"`` save writes a new frozen
      base only if the frozen set or its values changed (the fingerprint decides).

    Args:
        model: sharded by `shard_with_freezing`; the same object is returned.
        optimizer: the optimizer over `model`'s trainable parameters, or None.
        policy: the new `FreezePolicy`; ``units`` must equal the current ones (to change units, save,
            rebuild and `load_checkpoint(allow_freezing_change=True)`).
        dequantize: allow NF4 weights to become trainable.
        param_group: index of the optimizer param group newly trainable parameters join.

    Raises:
        PolicyError: bad policy (a pattern matching nothing, other units), an NF4 weight to unfreeze
            without ``dequantize``, a call between a forward and its backward, an optimizer holding a
            parameter the model does not have, a bad `param_group`. Nothing is changed then.
    """
    state = sharded_state(model)
    old_plan = state.plan
    if not isinstance(policy, FreezePolicy):
        raise PolicyError(f"policy must be a FreezePolicy, got {type(policy).__name__}")
    check_supported(policy, state.mesh)
    if state.backward_pending:
        raise PolicyError(
            "refreeze was called after a forward whose backward has not run: the autograd graph holds the "
            "current parameters. Call it after backward and optimizer.step() (or run that forward under "
            "torch.no_grad())"
        )
    sync_requires_grad(model)  # before the reshard: [Note: stale requires_grad]
    for module in model.modules():  # kept-gathered groups show their shards (values unchanged)
        if compat.has_fsdp_state(module):
            module.reshard()
    new_plan = build_plan(model, policy, shard_size=old_plan.shard_size,  # patterns and values checked here
                          tensor_parallel=old_plan.tensor_parallel)
    if new_plan.units != old_plan.units:
        raise PolicyError(
            f"refreeze keeps the units: FreezePolicy.units gives {list(new_plan.units[:-1])}, the model was "
            f"sharded with {list(old_plan.units[:-1])}. To change units, save_checkpoint, rebuild and shard "
            f"the model with the new policy, and load_checkpoint(..., allow_freezing_change=True)"
        )
    unfrozen = sorted(old_plan.frozen - new_plan.frozen)
    quantized_unfrozen = [f for f in unfrozen if f in old_plan.quantized]
    if quantized_unfrozen and not dequantize:
        raise PolicyError(
            f"refreeze would make NF4 weights trainable: {quantized_unfrozen}. Their 4-bit values are all that is "
            f"left of them; pass dequantize=True to train from the dequantized values, or keep them frozen"
        )
    params = {fqn: model.get_parameter(old_plan.path(fqn)) for fqn in old_plan.names.params}
    fqn_of = {id(p): fqn for fqn, p in params.items()}
    if optimizer is not None:
        _check_optimizer(optimizer, fqn_of, param_group)
    if quantized_unfrozen:
        warnings.warn(f"refreeze: NF4 weights {quantized_unfrozen} become trainable from their dequantized values "
                      f"(the original weights are not recoverable from NF4)", stacklevel=2)

    # -- from here on the model changes ----------------------------------------------------------
    original_dtypes = dict(state.original_dtypes)
    unshard_with_freezing(model)
    _meta_parameters(model, old_plan, params, original_dtypes, state.mesh)
    shard_with_freezing(model, state.mesh, policy)
    new_state = sharded_state(model)
    materialize_meta(model, shard_device(state.mesh))
    new_params = {fqn: model.get_parameter(new_state.plan.path(fqn)) for fqn in params}
    if optimizer is not None:
        _rebind_optimizer(optimizer, new_params, fqn_of, new_state.plan.frozen, param_group, unfrozen)
    with torch.no_grad():
        for fqn in sorted(params):  # the same order on every rank: NF4 quantization gathers
            old = params.pop(fqn)
            _copy_shard(new_params[fqn], old, fqn)
    return model


def _check_optimizer(optimizer: torch.optim.Optimizer, fqn_of: dict[int, str], param_group: int) -> None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise PolicyError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
    n = len(optimizer.param_groups)
    if isinstance(param_group, bool) or not isinstance(param_group, int) or not 0 <= param_group < n:
        raise PolicyError(f"param_group={param_group!r} is not an index of the optimizer's {n} param group(s)")
    foreign = [tuple(p.shape) for g in optimizer.param_groups for p in g["params"] if id(p) not in fqn_of]
    if foreign:
        raise PolicyError(
            f"the optimizer holds {len(foreign)} parameter(s) that are not the model's (shapes {foreign[:5]}); "
            f"refreeze can only rebind an optimizer built over this model's parameters"
        )


def _meta_parameters(model: nn.Module, plan: Any, params: dict[str, nn.Parameter],
                     dtypes: dict[str, torch.dtype], mesh: Any) -> None:
    """Replace every parameter by a meta one of its global shape and original dtype (ties kept); a
    tensor-parallel one by a meta DTensor of its TP layout (`compat.tp_meta_like`)."""
    names = plan.names
    paths: dict[int, list[str]] = {}
    for path, p in model.named_parameters(remove_duplicate=False):
        paths.setdefault(id(p), []).append(path)
    for fqn, old in params.items():
        dtype = dtypes.get(fqn, old.dtype)
        value = compat.tp_meta_like(old, mesh, dtype) if fqn in plan.tensor_parallel else \
            torch.empty(old.shape, dtype=dtype, device="meta")
        meta = nn.Parameter(value, requires_grad=old.requires_grad)
        for path in paths.get(id(old), [names.params[fqn]]):
            parent, _, leaf = path.rpartition(".")
            compat.swap_parameter(model.get_submodule(parent), leaf, meta)


def _copy_shard(new: torch.Tensor, old: torch.Tensor, fqn: str) -> None:
    """Fill `new` (this rank's new shard) from `old` (this rank's old shard of the same layout)."""
    new_local, old_local = compat.local_tensor(new), compat.local_tensor(old)
    if is_nf4(new_local):
        same = (is_nf4(old_local) and old_local.block_size == new_local.block_size
                and old_local.scaler_block_size == new_local.scaler_block_size and old_local.shape == new_local.shape)
        if same:
            new_local.copy_(old_local)
        else:  # quantized whole: torchao's double quantization depends on every scaler of the weight
            whole = old.full_tensor() if isinstance(old, DTensor) else old
            if is_nf4(compat.local_tensor(whole)):
                whole = ao.nf4_dequantize(compat.local_tensor(whole))
            ao.nf4_copy_chunk_(new, whole)
        return
    source = ao.nf4_dequantize(old_local) if is_nf4(old_local) else old_local
    if isinstance(old, DTensor) != isinstance(new, DTensor):  # to or from trainable_grouping="replicate"
        source = compat.local_tensor(relayout(source if not isinstance(old, DTensor) else _as_dtensor(source, old), new))
    if source.shape != new_local.shape:
        raise RuntimeError(f"refreeze: the shard of {fqn!r} changed shape ({tuple(source.shape)} -> "
                           f"{tuple(new_local.shape)}); the mesh and the parameter's shape must stay the same")
    new_local.copy_(source)


def _like_param(value: Any, param: torch.Tensor) -> bool:
    return isinstance(value, torch.Tensor) and value.shape == param.shape and value.dim() > 0


def _as_dtensor(local: torch.Tensor, like: DTensor) -> DTensor:
    return DTensor.from_local(local, like.device_mesh, like.placements, run_check=False, shape=like.shape,
                              stride=like.stride())


def relayout(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`value` (a parameter's global shape: a DTensor, or whole) in the layout of `like`: this rank's
    chunk as a DTensor of `like`'s spec, or the whole tensor (``full_tensor``: a collective, so every
    rank must call it in the same order). Used where a parameter moves between an FSDP group and
    ``trainable_grouping="replicate"``; values in the same layout are returned as they are."""
    if isinstance(value, DTensor) == isinstance(like, DTensor):
        return value
    if isinstance(value, DTensor):
        return value.full_tensor()
    out = torch.empty_like(like, dtype=value.dtype)
    local = compat.local_tensor(out)
    chunks = compat.chunk_list(like)
    if chunks and local.numel():
        index = tuple(slice(o, o + n) for o, n in zip(chunks[0].offsets, chunks[0].sizes))
        local.copy_(value[index])
    return out


def _rebind_optimizer(optimizer: torch.optim.Optimizer, new: dict[str, nn.Parameter], fqn_of: dict[int, str],
                      frozen: frozenset[str], param_group: int, unfrozen: list[str]) -> None:
    """Every param group keeps its parameters (their new objects) and options; state and gradients
    move with them, except a newly frozen parameter's, which are dropped (it stays listed, as a frozen
    parameter an optimizer was given is: without a gradient it is skipped). Newly trainable
    parameters no group holds join `param_group`."""
    listed = set()
    for group in optimizer.param_groups:
        moved = []
        for p in group["params"]:
            fqn = fqn_of[id(p)]
            state = optimizer.state.pop(p, None)
            target = new[fqn]
            if fqn not in frozen:
                if state:  # moments like the parameter follow its layout (a grouping change); "step" stays
                    optimizer.state[target] = {k: relayout(v, target) if _like_param(v, p) else v
                                               for k, v in state.items()}
                if p.grad is not None:
                    target.grad = relayout(p.grad, target)
            listed.add(fqn)
            moved.append(target)
        group["params"][:] = moved
    optimizer.param_groups[param_group]["params"].extend(new[f] for f in unfrozen if f not in listed)
