"""`describe`: what `shard_with_freezing` built, read from the applied plan and FSDP's shards."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch.nn as nn

from . import _torch_compat as compat
from . import process_groups
from .apply import sharded_state
from .plan import FROZEN
from .storage import nf4_dtype, storage_nbytes


@dataclass(frozen=True)
class GroupRecord:
    """One param group of a sharded model."""

    unit: str  #: unit FQN ("" = root)
    kind: str  #: "frozen" or "trainable"
    params: tuple[str, ...]
    numel: int
    storage_dtype: str
    gathered_dtype: str
    reshard: str  #: frozen policy, or the trainable group's reshard_after_forward as FSDP will run it
    sharded_bytes: int  #: bytes of this rank's shards (FSDP's padded storage)
    unsharded_bytes: int  #: bytes of the gathered parameters
    all_gathers_per_step: int  #: expected in steady state
    reduce_scatters_per_step: int = 0  #: expected per step (trainable groups at shard size > 1)
    all_reduces_per_step: int = 0  #: expected per step over the shard dim (the replicated trainable group)
    note: str = ""  #: e.g. frozen parameters a torch < 2.12 could not split off
    why: str = ""  #: why the group got its reshard: the policy field, the root rule, auto's budget, a setter
    #: a frozen group gathered inside its unit's trainable group: `all_gathers_per_step` counts its bytes
    #: gathered, in the trainable group's collectives, none of its own ([Note: merged frozen groups])
    merged: bool = False

    @property
    def own_all_gathers_per_step(self) -> int:
        """All-gather collectives this group launches per step (a merged frozen group: none)."""
        return 0 if self.merged else self.all_gathers_per_step

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Description(list):
    """A list of `GroupRecord`; ``str()`` renders it as a table."""

    #: process groups the frozen groups communicate on beyond the mesh's own (on NCCL, one
    #: communicator each; `fsdp_frozen.process_groups.count`)
    frozen_process_groups: int = 0
    #: tensor parallelism, if the model was parallelized: {"degree", "colwise", "rowwise"} (linears
    #: by their weight's TP placement), else None
    tensor_parallel: dict[str, int] | None = None

    def to_dicts(self) -> list[dict[str, Any]]:
        return [r.to_dict() for r in self]

    def table(self) -> str:
        header = ("unit", "group", "params", "numel", "dtype", "reshard", "bytes/rank", "unsharded", "AG/step", "RS/step", "AR/step")
        rows = [header] + [
            (
                r.unit or "<root>", r.kind + (" (merged)" if r.merged else ""), str(len(r.params)), f"{r.numel:,}",
                r.storage_dtype if r.storage_dtype == r.gathered_dtype else f"{r.storage_dtype}->{r.gathered_dtype}",
                r.reshard, f"{r.sharded_bytes:,}", f"{r.unsharded_bytes:,}", str(r.all_gathers_per_step),
                str(r.reduce_scatters_per_step), str(r.all_reduces_per_step),
            )
            for r in self
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "-+-".join("-" * w for w in widths))
        whys = [f"why ({r.unit or '<root>'} {r.kind}): {r.why}" for r in self if r.why]
        notes = [f"note ({r.unit or '<root>'} {r.kind}): {r.note}" for r in self if r.note]
        pgs = [f"frozen groups add {self.frozen_process_groups} process group(s) of their own (NCCL: one "
               f"communicator each, created at first use)"] if self.frozen_process_groups else []
        tp = self.tensor_parallel
        tps = [f"tensor parallel: degree {tp['degree']}, {tp['colwise']} colwise and {tp['rowwise']} rowwise linears "
               f"(bytes above are per TP rank); the TP plan's own collectives, on the TP group, not counted above: "
               f"about {tp['rowwise']} all-reduces in forward (again in an activation-checkpoint recompute) and "
               f"{tp['colwise']} in backward per step (Replicate layouts; sequence parallel differs)"] if tp else []
        return "\n".join(lines + whys + notes + pgs + tps)

    def __str__(self) -> str:
        return self.table()


def _shard_bytes(fsdp_param: Any) -> int:
    return storage_nbytes(compat.sharded_param(fsdp_param).to_local())


def _effective(g: Any, group: Any, shard_size: int) -> tuple[str, int]:
    """(reshard label, all-gathers per step) of a plan group as its FSDP param group will run it.

    Frozen groups are held to the plan (FSDP's setters cannot change them, see `apply`); a trainable
    group follows FSDP's setters, so it is read from the group itself, and so is a merged frozen
    group (it is the trainable group's; [Note: merged frozen groups] in plan.py), labelled by its
    frozen policy while the group runs as planned.
    """
    if (g.kind == FROZEN and not g.merged) or group is None:
        return str(g.reshard), g.all_gathers_per_step
    after_forward = compat.reshard_after_forward_of(group)
    after_backward = compat.reshard_settings(group)[1]
    if shard_size == 1:
        gathers = 0
    else:  # forward gathers unless still gathered from backward; backward re-gathers after a reshard
        gathers = int(after_backward) + int(after_forward is not False)
    label = str(after_forward) + ("" if after_backward else ", kept after backward")
    if g.merged and after_backward and after_forward is (g.reshard == "after_forward"):
        return str(g.reshard), gathers
    return label, gathers


def _tensor_parallel(model: nn.Module, dp_names: tuple[str, ...]) -> dict[str, int] | None:
    """Degree and colwise/rowwise linear counts of a TP-parallelized model, from its weights' DTensor
    placements on mesh dims other than the data-parallel ones."""
    from torch.distributed.tensor import DTensor

    degree, counts = 1, {0: 0, 1: 0}
    for module in model.modules():
        w = module._parameters.get("weight")
        names = w.device_mesh.mesh_dim_names if isinstance(w, DTensor) else None
        for i, name in enumerate(names or ()):
            if name in dp_names or not w.placements[i].is_shard():
                continue
            degree = max(degree, w.device_mesh.size(i))
            dim = w.placements[i].dim
            if dim in counts:
                counts[dim] += 1
    return {"degree": degree, "colwise": counts[0], "rowwise": counts[1]} if degree > 1 else None


def _nf4_dense(model: nn.Module) -> dict[str, list[int]]:
    """Unit -> bytes of each of its NF4 weights dequantized to the compute dtype (`storage.nf4_dtype`)."""
    state = sharded_state(model)
    plan, mp = state.plan, state.policy.torch_param_dtype
    dense: dict[str, list[int]] = {}
    for g in plan.groups:
        for fqn in g.params:
            if fqn in plan.quantized:
                n = model.get_parameter(plan.path(fqn)).numel() * nf4_dtype(mp, state.original_dtypes[fqn]).itemsize
                dense.setdefault(g.unit, []).append(n)
    return dense


def nf4_dense_bytes(model: nn.Module, unit: str | None = None, *, together: bool = True) -> int:
    """Bytes of a unit's NF4 weights dequantized to the compute dtype; without `unit`, the largest
    non-root unit's (the root's head, dequantized for the loss, is the loss's term). ``together=False``:
    the largest single weight's instead (one dequantized at a time)."""
    dense, pick = _nf4_dense(model), (sum if together else max)
    if unit is not None:
        return pick(dense.get(unit, [0]))
    return max((pick(v) for u, v in dense.items() if u != ""), default=0)


def describe(model: nn.Module) -> Description:
    """Records of every param group `shard_with_freezing` built on `model` (this rank's bytes).

    Local: no communication. ``print(describe(model))`` shows a table.
    """
    state = sharded_state(model)
    plan = state.plan
    records = Description()
    records.frozen_process_groups = process_groups.count(plan, state.mesh.ndim)
    records.tensor_parallel = _tensor_parallel(model, tuple(state.mesh.mesh_dim_names or ()))
    dense_nf4 = _nf4_dense(model) if plan.quantized else {}
    for g in plan.groups:
        unsplit = [p for p in g.params if p in plan.unsplit]
        dense = {p: plan.not_quantized[p] for p in g.params if p in plan.not_quantized}
        notes = [f"frozen but not split off (torch < 2.12): {unsplit}"] if unsplit else []
        notes += [f"not NF4, kept in {g.gathered_dtype.split('+')[-1]}: " + "; ".join(f"{p} ({why})" for p, why in dense.items())] if dense else []
        if g.kind == FROZEN and g.unit in dense_nf4:
            notes.append(f"NF4 dequantized to the compute dtype in each linear: {sum(dense_nf4[g.unit]):,} "
                         f"bytes for all of them, alive together under activation checkpointing with "
                         f"nf4_compute 'fast' (from the recompute until each weight's backward), one weight at a "
                         f"time otherwise (at most {max(dense_nf4[g.unit]):,})")
        reshard, gathers = _effective(g, state.param_groups.get((g.unit, g.kind)), plan.shard_size)
        records.append(
            GroupRecord(
                unit=g.unit, kind=g.kind, params=g.params, numel=g.numel,
                storage_dtype=g.storage_dtype, gathered_dtype=g.gathered_dtype, reshard=reshard,
                sharded_bytes=sum(
                    storage_nbytes(model.get_parameter(plan.path(p)))
                    if p in plan.unmanaged or p in plan.replicated  # kept out of FSDP
                    else _shard_bytes(state.fsdp_params[p])
                    for p in g.params
                ),
                unsharded_bytes=g.unsharded_bytes, all_gathers_per_step=gathers,
                reduce_scatters_per_step=g.reduce_scatters_per_step, all_reduces_per_step=g.all_reduces_per_step,
                why=g.why if reshard == str(g.reshard) else f"set by FSDP's set_reshard_after_* (planned: {g.why})",
                note=" | ".join(notes), merged=g.merged,
            )
        )
    return records
