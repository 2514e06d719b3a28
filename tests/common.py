"""Helpers shared by the distributed tests: reference sharding, a training loop, comm counting."""

from __future__ import annotations

import collections
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from fsdp_frozen.plan import resolve_units

from .models import batch


def mesh_1d(world_size: int):
    return init_device_mesh("cpu", (world_size,))


def plain_fsdp(model: nn.Module, mesh, units: tuple[str, ...], mp: MixedPrecisionPolicy | None = None) -> nn.Module:
    """Reference: plain FSDP2 with the same units (one mixed group per unit).

    A tied parameter used in a nested unit is ignored there, so the outer unit owns it (as ours does).
    """
    mp = mp or MixedPrecisionPolicy()
    holders: dict[nn.Parameter, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        holders.setdefault(p, []).append(name)
    tied = [p for p, names in holders.items() if len(names) > 1]
    for unit in resolve_units(model, units):
        module = model.get_submodule(unit)
        inner = {p for p in tied if unit and any(n.startswith(unit + ".") for n in holders[p])
                 and not all(n.startswith(unit + ".") for n in holders[p])}
        extra = {"ignored_params": inner} if inner else {}
        fully_shard(module, mesh=mesh, mp_policy=mp, reshard_after_forward=unit != "", **extra)
    return model


def train(model: nn.Module, steps: int, rank: int, lr: float = 1e-2, on_step=None) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        x, y = batch(step, rank)
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach().item())
        if on_step is not None:
            on_step(step, model, opt)
    model._test_optimizer = opt  # type: ignore[attr-defined]
    return losses


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded copies of every parameter, on every rank (collective)."""
    out = {}
    for name, p in model.named_parameters():
        t = p.full_tensor() if isinstance(p, DTensor) else p
        out[name] = t.detach().float().clone()
    return out


class CommCounter(TorchDispatchMode):
    """Counts c10d all-gathers and reduce-scatters (calls and bytes), keyed by process group name."""

    OPS = {
        "_allgather_base_": "all_gather",
        "allgather_into_tensor_coalesced_": "all_gather",
        "_reduce_scatter_base_": "reduce_scatter",
        "reduce_scatter_tensor_coalesced_": "reduce_scatter",
        "allreduce_": "all_reduce",
    }

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter = collections.Counter()
        self.bytes: collections.Counter = collections.Counter()
        self.records: list[tuple[str, str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kind = self.OPS.get(func._schema.name.split("::")[-1])
        if kind is not None:
            out = args[0] if kind != "reduce_scatter" else args[1]
            tensors = out if isinstance(out, (list, tuple)) else [out]
            nbytes = sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
            pg = _group_name(args)
            self.calls[kind] += 1
            self.bytes[kind] += nbytes
            self.records.append((kind, pg, nbytes))
        return func(*args, **(kwargs or {}))


def _group_name(args: Any) -> str:
    for a in args:
        if isinstance(a, torch.ScriptObject):
            return dist.ProcessGroup.unbox(a).group_name
        if isinstance(a, dist.ProcessGroup):
            return a.group_name
        name = getattr(a, "group_name", None)
        if isinstance(name, str):
            return name
    return "?"


def frozen_group_names(model: nn.Module) -> set[str]:
    """Names of the process groups that frozen param groups communicate on."""
    from fsdp_frozen import _torch_compat as compat

    names = set()
    for _, group, _ in compat.iter_all_fsdp_params(model):
        if all(not compat.sharded_param(fp).requires_grad for fp in compat.fsdp_params(group)):
            for info in (group.mesh_info, group.post_forward_mesh_info):
                if info is not None:
                    names.add(info.shard_process_group.group_name)
    return names
