"""Pure planning: which parameters are frozen, which unit owns each, and the groups to build.

Nothing here calls torch.distributed, so a plan can be built and printed in one process.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from . import _torch_compat as compat
from ._globs import glob_match
from .errors import PolicyError
from .names import ModelNames, model_names
from .policy import FreezePolicy
from .storage import NF4, nf4_dtype, nf4_ineligible, nf4_nbytes

#: The two kinds of param group (and of parameter); the one definition, used by the checkpoint keys too.
GroupKind = Literal["frozen", "trainable"]
FROZEN: GroupKind = "frozen"
TRAINABLE: GroupKind = "trainable"
_FROZEN_GATHERS = {"after_forward": 2, "after_backward": 1, "never": 0}
#: The reshard label of the replicated trainable group (``trainable_grouping="replicate"``).
REPLICATED = "replicated"


@dataclass(frozen=True)
class GroupPlan:
    """One param group to build: only frozen or only trainable parameters of one unit."""

    unit: str  #: unit FQN ("" is the root)
    kind: GroupKind  #: "frozen" or "trainable"
    params: tuple[str, ...]  #: canonical parameter FQNs (DCP's names, wrapper prefixes stripped)
    numel: int
    storage_dtype: str  #: dtype of the shards ("mixed" if the params differ)
    gathered_dtype: str  #: dtype all-gathered and computed with
    reshard: str | int | bool  #: frozen: policy name or int; trainable: FSDP reshard_after_forward
    all_gathers_per_step: int  #: expected in steady state (0 at shard size 1)
    unsharded_bytes: int  #: bytes of the gathered parameters
    #: reduce-scatters per step (one per trainable group at shard size > 1, none for frozen groups;
    #: HSDP adds one all-reduce over the replicas per reduce-scatter)
    reduce_scatters_per_step: int = 0
    #: all-reduces per step over the shard dim (the replicated trainable group, at shard size > 1;
    #: HSDP adds one over the replicas)
    all_reduces_per_step: int = 0
    modules: tuple[str, ...] = ()  #: canonical FQNs of frozen-only submodules (structural fallback, torch < 2.12)
    why: str = ""  #: why the group got its reshard (the policy field, the root rule, auto's budget)
    #: a frozen group FSDP runs inside its unit's trainable group: the same reshard and gathered dtype, so
    #: its bytes ride the trainable group's all-gathers (`all_gathers_per_step` counts them) and it
    #: launches none of its own ([Note: merged frozen groups])
    merged: bool = False

    @property
    def own_all_gathers_per_step(self) -> int:
        """All-gather collectives this group launches per step (a merged frozen group: none)."""
        return 0 if self.merged else self.all_gathers_per_step


@dataclass(frozen=True)
class ShardingPlan:
    """Every decision `shard_with_freezing` takes, in canonical names (see `names.py`)."""

    units: tuple[str, ...]  #: bottom-up: deeper units first, root ("") last
    groups: tuple[GroupPlan, ...]
    frozen: frozenset[str]  #: FQNs of frozen parameters after freeze/unfreeze
    ignored: dict[str, tuple[str, ...]] = field(default_factory=dict)  #: unit -> tied params it must not take
    unsplit: tuple[str, ...] = ()  #: frozen params left in a trainable group (torch < 2.12 fallback)
    shard_size: int = 1
    split: bool = True  #: True: per-parameter groups (2.12+); False: structural fallback
    quantized: frozenset[str] = frozenset()  #: frozen params stored as NF4 (frozen_dtype="nf4")
    not_quantized: dict[str, str] = field(default_factory=dict)  #: frozen params NF4 cannot hold -> why
    names: ModelNames | None = None  #: canonical names of the model and the module paths behind them
    #: Frozen parameters FSDP must not manage (``ignored_params``), kept whole on every rank: NF4
    #: weights at shard size 1 (torchao's NF4 all-gather hooks fail there, torch 2.13 / torchao 0.18,
    #: and nothing would be communicated anyway), every frozen group stored as it computes at shard
    #: size 1, and every such ``"never"`` group under ``trainable_grouping="replicate"`` ([Note: whole
    #: frozen groups]).
    unmanaged: frozenset[str] = frozenset()
    #: Each unit's ``reshard_after_forward`` for its fully_shard call (its trainable group's, FSDP's root rule).
    unit_reshard: dict[str, bool | int] = field(default_factory=dict)
    trainable_grouping: str = "per_unit"  #: "per_unit", "root" or "replicate", as planned ("auto" resolved)
    grouping_why: str = ""  #: why trainable parameters got that grouping
    #: trainable parameters no FSDP group manages (``trainable_grouping="replicate"``): whole on
    #: every rank, reduced by `fsdp_frozen.replicate` ([Note: replicated trainables])
    replicated: frozenset[str] = frozenset()
    #: trainable parameters FSDP shards on dim 1, not 0 ([Note: adapters without padding])
    shard_dim1: frozenset[str] = frozenset()
    #: tensor-parallel parameters (DTensors placed by ``parallelize_module`` before sharding) -> the
    #: elements a rank holds once all-gathered over the data-parallel ranks (its TP-local part)
    tensor_parallel: dict[str, int] = field(default_factory=dict)

    @functools.cached_property  # read per fully_shard call at sharding time; the plan is immutable
    def units_without_fsdp(self) -> frozenset[str]:
        """Units (never the root) whose every parameter stays out of FSDP (`unmanaged` or
        `replicated`): no fully_shard call, so none of FSDP2's per-unit hooks run for them."""
        outside = self.unmanaged | self.replicated
        return frozenset(u for u in self.units[:-1]
                         if self.groups_of(u) and all(f in outside for g in self.groups_of(u) for f in g.params))

    @property
    def apply_order(self) -> tuple[str, ...]:
        """Units in the order fully_shard is applied. [Note: root grouping] FSDP2 collects a
        module's parameters by walking its submodules and stops at modules already sharded, so
        the root can only take the trainable parameters inside other units if it is sharded first:
        with ``trainable_grouping="root"`` the root goes first, ignoring every parameter other units
        own (`ignored`), and the units follow bottom-up, ignoring their trainable parameters. Only
        the public ``ignored_params`` is used; FSDP2 needs no bottom-up order when every parameter
        has exactly one owner. Under ``"replicate"`` every fully_shard call ignores the trainable
        parameters, so the usual bottom-up order holds."""
        if self.trainable_grouping == "root":
            return ("", *self.units[:-1])
        return self.units

    def path(self, fqn: str) -> str:
        """The path (``get_submodule`` / ``get_parameter`` name) of a canonical parameter or module FQN."""
        if self.names is None:
            return fqn
        return self.names.params.get(fqn) or self.names.modules.get(fqn, fqn)

    def frozen_params(self, group: GroupPlan) -> tuple[str, ...]:
        """The frozen parameters of `group`: all of a frozen group's; of a trainable group, those the
        structural fallback left in it (`unsplit`), which are gathered with it but get no gradient."""
        if group.kind == FROZEN:
            return group.params
        return tuple(f for f in group.params if f in self.unsplit)

    def groups_of(self, unit: str) -> list[GroupPlan]:
        return [g for g in self.groups if g.unit == unit]

    def frozen_group(self, unit: str) -> GroupPlan | None:
        return next((g for g in self.groups if g.unit == unit and g.kind == FROZEN), None)


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def _within(name: str, unit: str) -> bool:
    return unit == "" or name == unit or name.startswith(unit + ".")


def resolve_units(model: nn.Module, patterns: tuple[str, ...], names: ModelNames | None = None) -> list[str]:
    """Canonical unit FQNs matched by `patterns` (FQN globs or class names), deepest first, root last.

    A glob is matched against canonical module names; a class name against every module, wrapped
    ones included, and names the outermost module of that canonical name (see `names.py`). A module
    ``fully_shard`` has made ``FSDP<Cls>`` still matches ``Cls``: the same policy names the same
    units before and after sharding (`refreeze`).
    """
    names = names or model_names(model)
    named = [(names.canonical(n), m) for n, m in model.named_modules() if n]
    units: set[str] = set()
    for pattern in patterns:
        hits = {n for n, m in named if glob_match(pattern, n) or compat.user_class(m).__name__ == pattern}
        if not hits:
            raise PolicyError(
                f"FreezePolicy.units pattern {pattern!r} matches no submodule of {type(model).__name__} "
                f"(neither a dotted FQN glob such as 'layers.*' nor a module class name)"
            )
        units |= hits
    return sorted(units, key=lambda n: (-n.count("."), n)) + [""]


def _enclosing_unit(module_fqn: str, units: list[str]) -> str:
    return max((u for u in units if _within(module_fqn, u)), key=len)


def _resolve_frozen(holders: dict[nn.Parameter, list[str]], policy: FreezePolicy, paths: dict[str, str]) -> set[str]:
    """Canonical FQNs of the frozen parameters; patterns match canonical names or module paths."""
    frozen = {names[0] for p, names in holders.items() if not p.requires_grad}
    for key, value in (("freeze", True), ("unfreeze", False)):
        for pattern in getattr(policy, key):
            hits = [names[0] for names in holders.values()
                    if any(glob_match(pattern, n) or glob_match(pattern, paths.get(n, n)) for n in names)]
            if not hits:
                raise PolicyError(f"FreezePolicy.{key} pattern {pattern!r} matches no parameter")
            (frozen.update if value else frozen.difference_update)(hits)
    return frozen


def _check_int_reshard(key: str, value: object, shard_size: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        return
    if not (1 < value < shard_size and shard_size % value == 0):
        divisors = [d for d in range(2, shard_size) if shard_size % d == 0]
        raise PolicyError(
            f"FreezePolicy.{key}={value} must be a divisor of the mesh's shard size {shard_size} "
            f"other than 1 and {shard_size}; allowed here: {divisors or 'none (use a named policy)'}"
        )


def _frozen_why(unit: str, reshard: str | int) -> str:
    """Why a frozen group got `reshard` from the policy (auto's groups say more, see `_resolve_auto`)."""
    if unit == "" and reshard == "after_forward":
        return "frozen_reshard='after_forward'; the root's is kept until backward ends (FSDP's root rule)"
    return f"frozen_reshard={reshard!r}"


def _trainable_why(policy: FreezePolicy, unit: str, grouping_why: str) -> str:
    grouped = f"{grouping_why}; " if grouping_why else ""
    if policy.trainable_reshard is not None:
        return grouped + f"trainable_reshard={policy.trainable_reshard!r}"
    return grouped + ("FSDP's default: resharded after forward, except the root's"
                      + (" (this is the root)" if unit == "" else ""))


def _frozen_reshard(unit: str, reshard: str | int) -> str | int:
    """The frozen policy a unit's frozen group gets. [Note: root rule] Like FSDP's root, the root's
    frozen group is not resharded after forward: backward needs it right away, so "after_forward"
    there would only add a gather; it behaves as "after_backward". Applied here only (also to the
    groups "auto" does not keep gathered)."""
    return "after_backward" if (unit == "" and reshard == "after_forward") else reshard


def _gathers(kind: str, reshard: str | int | bool, shard_size: int) -> int:
    if shard_size == 1:
        return 0
    if kind == FROZEN:
        return _FROZEN_GATHERS.get(reshard, 2)  # type: ignore[arg-type]
    return 1 if reshard is False else 2


def _dtype_label(dtypes: set[torch.dtype]) -> str:
    return str(next(iter(dtypes))).removeprefix("torch.") if len(dtypes) == 1 else "mixed"


def _label(names: list[str]) -> str:
    """"bfloat16", or "nf4+bfloat16" for a group of NF4 weights and dense leftovers, or "mixed"."""
    unique = sorted(set(names), key=lambda n: (n != NF4, n))
    if len(unique) == 1 or (len(unique) == 2 and unique[0] == NF4):
        return "+".join(unique)
    return "mixed"


def _frozen_only_modules(
    model: nn.Module, unit: str, units: list[str], owned: set[str], frozen: set[str], names: ModelNames
) -> list[str]:
    """Maximal submodules of `unit` holding no nested unit whose parameters are all frozen."""
    nested = [u for u in units if u != unit and _within(u, unit)]
    result: list[str] = []
    # a tied parameter counts under its first name (the one ownership uses): a head tied to a frozen
    # embedding makes the head frozen-only too, so both modules share one fully_shard call and the tie holds
    primary = {name: first for first, tied in names.tied.items() for name in tied}

    def visit(prefix: str, module: nn.Module) -> None:
        for child_name, child in module.named_children():
            path = f"{prefix}.{child_name}" if prefix else child_name
            name = names.canonical(path)
            if name in nested:
                continue
            params = [primary.get(c, c) for n, _ in child.named_parameters(remove_duplicate=False)
                      for c in (names.canonical(f"{path}.{n}"),)]
            # a module holding a unit is never chosen, only its other children: its forward may be
            # bypassed (PEFT's LoraModel is called through .model.forward, so hooks on it never run)
            # nor the module a wrapper holds under the unit's own name (checkpoint_wrapper, compile):
            # the unit's fully_shard goes to that name's outermost module, the same object
            holds_unit = name == unit or any(_within(u, name) for u in nested)
            if params and not holds_unit and all(p in owned and p in frozen for p in params):
                if name not in result:
                    result.append(name)
            else:
                visit(path, child)

    unit_path = names.modules.get(unit, unit)
    visit(unit_path, model.get_submodule(unit_path))

    def shared_outside(module_name: str) -> bool:  # a tied parameter also used by a module not chosen
        path = names.modules.get(module_name, module_name)
        names_here = [names.canonical(f"{path}.{n}")
                      for n, _ in model.get_submodule(path).named_parameters(remove_duplicate=False)]
        return any(not any(_within(use, m) for m in result)
                   for c in names_here for use in names.tied.get(primary.get(c, c), ()))

    while (drop := next((m for m in result if shared_outside(m)), None)) is not None:
        result.remove(drop)  # its parameters stay in the unit's group, with the other user of the tie
    return result


def build_plan(model: nn.Module, policy: FreezePolicy, *, shard_size: int, split: bool | None = None,
               tensor_parallel: dict[str, int] | None = None) -> ShardingPlan:
    """Plan the frozen/trainable param groups of `model` under `policy` for a given shard size.

    Steps, each a function below: names and units, the frozen set, ownership (tied parameters
    included), NF4 eligibility, then the groups (and ``"auto"``'s choice among them).

    Args:
        shard_size: ranks a parameter is sharded over (the mesh's last dim).
        split: per-parameter groups (torch >= 2.12); default: what this torch supports.
        tensor_parallel: `ShardingPlan.tensor_parallel` of a model already sharded (`refreeze`, whose
            FSDP parameters are all DTensors); default: the DTensor parameters of the unsharded model.
    """
    split = compat.split_groups_supported() if split is None else split
    for key in ("frozen_reshard", "trainable_reshard"):
        _check_int_reshard(key, getattr(policy, key), shard_size)
    names = model_names(model)
    units = resolve_units(model, policy.units, names)
    holders: dict[nn.Parameter, list[str]] = {}
    for path, param in model.named_parameters(remove_duplicate=False):
        name = names.canonical(path)
        if name not in holders.setdefault(param, []):
            holders[param].append(name)
    frozen = _resolve_frozen(holders, policy, names.params)
    if tensor_parallel is None:
        tensor_parallel = {names[0]: p.to_local().numel() for p, names in holders.items() if isinstance(p, DTensor)}
    grouping, grouping_why = _resolve_grouping(policy, units, holders, frozen, tensor_parallel)
    def plan_groups(grouping: str) -> tuple:
        params, owner, ignored = _ownership(holders, units, frozen if grouping != "per_unit" else None,
                                            replicate=grouping == "replicate")
        quantized, not_quantized = _quantization(model, policy, names, holders, params, frozen, shard_size,
                                                 tensor_parallel)
        groups, unsplit = _groups(model, policy, names, units, params, owner, frozen, quantized, shard_size, split,
                                  tensor_parallel,
                                  grouping_why, replicate=grouping == "replicate")
        return params, owner, ignored, quantized, not_quantized, groups, unsplit

    try:
        params, owner, ignored, quantized, not_quantized, groups, unsplit = plan_groups(grouping)
    except PolicyError:
        if not (grouping == "replicate" and policy.trainable_grouping == "auto" and not split):
            raise
        # the structural fallback (torch < 2.12) cannot split the root's frozen parameters off a
        # replicated set (`_groups` refuses it): "auto" takes the next choice, one root group (the
        # state fits replicated, so it fits gathered)
        grouping = "root"
        mixed = _root_mixed_modules(model, units, frozen, names)
        what = f"the frozen parameters of the root's modules {mixed}" if mixed else "the root's frozen parameters"
        grouping_why = (grouping_why.removesuffix(": replicated") + f"; but the structural fallback (torch < "
                        f"2.12) cannot split {what} off a replicated set: one root group")
        params, owner, ignored, quantized, not_quantized, groups, unsplit = plan_groups(grouping)
    if policy.frozen_reshard == "auto":
        groups = _resolve_auto(groups, policy.frozen_budget_bytes or 0, shard_size)
    groups, whole = _whole_frozen(groups, grouping, split, shard_size)
    if policy.coalesce_frozen:
        groups = _merge_frozen(groups, whole)
    return ShardingPlan(
        units=tuple(units), groups=tuple(groups), frozen=frozenset(frozen),
        ignored={u: tuple(v) for u, v in ignored.items()}, unsplit=tuple(unsplit),
        shard_size=shard_size, split=split, quantized=frozenset(quantized), not_quantized=not_quantized,
        names=names, unmanaged=frozenset(quantized if shard_size == 1 else ()) | whole,
        unit_reshard={u: _trainable_reshard(policy, u) for u in units},
        trainable_grouping=grouping, grouping_why=grouping_why,
        replicated=frozenset(set(params) - frozen) if grouping == "replicate" else frozenset(),
        tensor_parallel=dict(tensor_parallel),
        shard_dim1=_shard_dim1(params, frozen, tensor_parallel, shard_size) if grouping != "replicate" else frozenset(),
    )


#: dim-0 padding above this fraction of a trainable matrix's rows moves its sharding to dim 1
PADDING_LIMIT = 1 / 8


def _padding(n: int, shard_size: int) -> float:
    return (-n % shard_size) / n


def _shard_dim1(params: dict[str, nn.Parameter], frozen: set[str], tensor_parallel: dict[str, int],
                shard_size: int) -> frozenset[str]:
    """[Note: adapters without padding] FSDP shards every parameter on dim 0, padding it to a multiple
    of the shard count: a LoRA ``lora_A`` of rank 8 (8 rows) on 64 ranks is gathered as 64 rows, 8x
    its bytes, and every all-gather and reduce-scatter of it sends the padding. A trainable matrix
    whose dim-0 padding exceeds `PADDING_LIMIT` of its rows and whose dim 1 pads less is sharded on
    dim 1 instead (``Shard(1)`` through ``shard_placement_fn``, as torchtitan shards MoE experts):
    ``lora_A`` is rank x in_features, and in_features divides by the shard count in every real
    model. Values and gradients are the same elements as under dim 0, in other positions of FSDP's
    buffers (the parity tests compare with plain FSDP2 given the same placement). Tensor-parallel
    parameters keep dim 0 (their TP placement already cuts a dim); frozen ones too (NF4 needs dim 0)."""
    out = set()
    for fqn, p in params.items():
        if fqn in frozen or fqn in tensor_parallel or p.dim() != 2 or shard_size == 1:
            continue
        rows, cols = p.shape
        if _padding(rows, shard_size) > PADDING_LIMIT and _padding(cols, shard_size) < _padding(rows, shard_size):
            out.add(fqn)
    return frozenset(out)


def _root_mixed_modules(model: nn.Module, units: list[str], frozen: set[str], names: ModelNames) -> list[str]:
    """Canonical names of modules outside every non-root unit that hold frozen and trainable
    parameters directly (what the structural fallback cannot split from a replicated set)."""
    inner = [u for u in units if u != ""]
    out = []
    for path, module in model.named_modules():
        name = names.canonical(path)
        if any(_within(name, u) for u in inner):
            continue
        kinds = {names.canonical(f"{path}.{n}" if path else n) in frozen for n, _ in module.named_parameters(recurse=False)}
        if kinds == {True, False}:
            out.append(name or "<root>")
    return out


def _whole_frozen(groups: list[GroupPlan], grouping: str, split: bool,
                  shard_size: int) -> tuple[list[GroupPlan], frozenset[str]]:
    """[Note: whole frozen groups] A ``"never"`` frozen group is gathered once and kept: every rank
    holds it whole, and FSDP adds only a 1/N shard copy beside it and its per-unit hooks (0.4-1 ms
    per unit per step on the benchmark's CPU, measured). Under ``trainable_grouping="replicate"``
    such groups leave FSDP as the trainable parameters did: whole on every rank from the start,
    never communicated, and a unit left with nothing for FSDP gets no fully_shard call at all.

    At shard size 1 (one rank, or HSDP with one rank per shard group) every frozen group leaves FSDP,
    whatever its ``frozen_reshard`` and grouping, on either torch path: there is nothing to shard or
    gather, but FSDP2 still "all-gathers" at world size 1 by copying each parameter into its unsharded
    buffer (``FSDPParamGroup.wait_for_unshard``; seen on 2.11 and 2.13). That copy is a second full
    copy of the frozen weights for as long as the group stays gathered: for ``"never"`` (and
    ``"after_backward"`` at the turn of forward to backward) the whole frozen model twice. Llama-3.1-8B
    LoRA on one H200 (torch 2.11, ``"never"``) peaked 15.4 GiB above its 16.8 GiB estimate, about its
    14.96 GiB of frozen weights (docs/benchmark.md); the 2.11 fallback's frozen groups stayed in FSDP
    there (tests/test_peak_memory.py reproduces the doubling on the CPU). Outside FSDP the weights are
    used in place: the same values, so the same results as plain FSDP2 (tested bitwise).

    Only what needs no per-step work leaves: a group stored in the dtype it computes in (no
    mixed-precision cast; FSDP's copy is then the cast the user asked for) whose NF4 weights, if any,
    are already outside FSDP (NF4 at shard size 1, `_quantization`); under ``"replicate"`` at shard
    size > 1, only ``"never"`` groups without NF4 (dequantized through FSDP's hooks), on the split path
    (the structural fallback keeps them in FSDP there). Frozen parameters the fallback leaves in a
    trainable group (`ShardingPlan.unsplit`) stay in it. Returns the groups (their ``why`` says so)
    and the parameters kept whole."""
    if shard_size > 1 and (grouping != "replicate" or not split):
        return groups, frozenset()
    out, whole = [], set()
    for g in groups:
        # the dense part of "nf4+bfloat16" (NF4 weights and the leftovers NF4 cannot hold) is what FSDP would cast
        stored, gathered = ([d for d in label.split("+") if d != NF4] for label in (g.storage_dtype, g.gathered_dtype))
        in_place = g.kind == FROZEN and stored == gathered and "mixed" not in stored
        if in_place and shard_size == 1:
            why = "kept whole outside FSDP (shard size 1: nothing to shard, and FSDP would copy it into an unsharded buffer)"
        elif in_place and g.reshard == "never" and NF4 not in g.storage_dtype:
            why = "kept whole on every rank outside FSDP (trainable_grouping='replicate')"
        else:
            out.append(g)
            continue
        whole |= set(g.params)
        out.append(replace(g, all_gathers_per_step=0, why=f"{g.why}; {why}"))
    return out, frozenset(whole)


def _merge_frozen(groups: list[GroupPlan], whole: frozenset[str]) -> list[GroupPlan]:
    """[Note: merged frozen groups] (``FreezePolicy.coalesce_frozen``) A unit's frozen group earns
    its own FSDP param group by behaving differently from the trainable one: another reshard
    (``"never"``, ``"after_backward"`` beside trainable parameters resharded after forward, an int),
    or NF4 storage. Where it behaves the same (``"after_forward"`` beside FSDP's default
    ``reshard_after_forward=True``, or the root's frozen group, ``"after_backward"`` by the root rule,
    beside the root's trainable ``False``), gathered in the same dtype, its own group costs a
    collective: each mixed unit all-gathers twice in forward and twice in backward, with a second set
    of FSDP hooks. At Llama-3-70B's structure with tiny widths (80 blocks, LoRA r=8 on every linear, 2
    ranks, `recipes/benchmark_structure.py`) that is 1.21-1.29x plain FSDP2's step (321 all-gathers per step
    against 161); merged, 0.94-0.97x. But the split is also what keeps the peak low: FSDP2 keeps the
    latest all-gather's output buffer alive until the next group's all-gather (``all_gather_state``,
    for stream safety), and with the split the latest is the unit's small trainable group, gathered
    after its frozen group, whose buffer the trainable all-gather frees. Merged, as in plain FSDP2, the
    whole unit's buffer stays until the next unit gathers: one unit's gathered bytes more at peak
    (`recipes/benchmark.py`'s model, 4 blocks of width 512: 28.05 -> 33.53 MiB per rank, the peak of
    plain FSDP2 with the same bf16 frozen storage; a Llama-3-70B block: 1.6 GiB in bf16). Memory is
    what this package is for, so the split is the default and merging is asked for with
    ``coalesce_frozen=True``: the merged group's parameters go into the unit's trainable FSDP group, as
    plain FSDP2 holds them (no gradient is reduce-scattered for them: FSDP reduces only parameters
    that got one), stored in their frozen dtype; the plan keeps the group (its parameters, bytes, and
    the checkpoint, `describe` and `estimate` figures), marked ``merged``, launching no all-gather of
    its own. FSDP's ``set_reshard_after_forward`` / ``..._after_backward`` on the unit then reach the
    merged frozen parameters too, as in plain FSDP2 ([Note: setters] guards separate frozen groups).
    NF4 groups stay apart (torchao's packed all-gather), and so do groups kept out of FSDP."""
    trainable = {g.unit: g for g in groups if g.kind == TRAINABLE and g.reshard != REPLICATED}
    out = []
    for g in groups:
        t = trainable.get(g.unit)
        same = t is not None and g.kind == FROZEN and (
            (g.reshard == "after_forward" and t.reshard is True) or (g.reshard == "after_backward" and t.reshard is False))
        if (same and g.gathered_dtype == t.gathered_dtype and g.gathered_dtype != "mixed" and NF4 not in g.storage_dtype
                and not whole.intersection(g.params)):
            g = replace(g, merged=True, why=f"{g.why}; merged into the unit's trainable FSDP group (the same reshard "
                                            f"and gathered dtype: one all-gather for both, not two)")
        out.append(g)
    return out


def _resolve_grouping(policy: FreezePolicy, units: list[str], holders: dict[nn.Parameter, list[str]],
                      frozen: set[str], tensor_parallel: dict[str, int]) -> tuple[str, str]:
    """("per_unit", "root" or "replicate", why). [Note: auto grouping] ``"auto"`` lets the trainable
    parameters cost at most about one more block (the largest unit other than the root, gathered):

    * ``"replicate"`` when their whole state on every rank (parameters, gradients and AdamW's two
      moments in their dtype, plus the ``param_dtype`` copies) fits: the fastest layout (one
      all-reduce, no FSDP work per parameter, measured in ``recipes/benchmark.py``);
    * else ``"root"`` when they fit gathered: one all-gather and one reduce-scatter per step, the
      state sharded;
    * else ``"per_unit"``: a large trainable set (full fine-tuning, trained blocks), where the
      per-unit overlap of gathers and reductions with compute matters.

    The root is left out of the comparison: it often holds the embedding and the head, larger than
    several blocks. Gathered bytes are counted in the gathered dtype (``param_dtype``, else the
    parameter's), frozen weights at their stored size (NF4: a 2-D frozen weight's packed size; the
    few NF4 cannot hold count the same)."""
    choice = policy.trainable_grouping
    needs = "fully_shard(ignored_params=...), torch >= 2.7"
    if choice in ("root", "replicate") and not compat.IGNORED_PARAMS_SUPPORTED:
        raise PolicyError(f"FreezePolicy.trainable_grouping={choice!r} needs {needs} (found {torch.__version__}); "
                          f"use trainable_grouping='per_unit' or 'auto'")
    if choice == "root":
        return "root", "trainable_grouping='root': every unit's trainable parameters in the root's group"
    tp_trainable = sorted(n for n in tensor_parallel if n not in frozen)
    if choice == "replicate" and tp_trainable:
        raise PolicyError(
            f"FreezePolicy.trainable_grouping='replicate' keeps trainable parameters out of FSDP, whole on every rank, "
            f"which does not take tensor-parallel (DTensor) ones: {tp_trainable[:4]}{' ...' if len(tp_trainable) > 4 else ''}; "
            f"use trainable_grouping='root' (one all-gather and one reduce-scatter per step) or 'per_unit'"
        )
    if choice == "auto" and tp_trainable:
        return "root", (f"trainable_grouping='auto': one root group ('replicate' does not take tensor-parallel "
                        f"trainable parameters such as {tp_trainable[0]!r})")
    if choice == "replicate":
        return "replicate", ("trainable_grouping='replicate': every trainable parameter whole on every rank, "
                             "gradients all-reduced once per step")
    if choice == "per_unit" or len(units) == 1:
        return "per_unit", ""
    if not compat.IGNORED_PARAMS_SUPPORTED:
        return "per_unit", f"trainable_grouping='auto': per unit (one root group needs {needs})"
    mp = policy.torch_param_dtype
    frozen_dtype = policy.torch_frozen_dtype
    unit_bytes: dict[str, int] = {}
    gathered = state = 0
    for param, tied in holders.items():
        dtype = param.dtype
        if tied[0] in frozen and frozen_dtype is not None and param.is_floating_point():
            dtype = frozen_dtype
        cast = mp is not None and param.is_floating_point()
        nbytes = param.numel() * (mp.itemsize if cast else dtype.itemsize)
        if tied[0] in frozen and policy.frozen_dtype == NF4 and param.dim() == 2:
            nbytes = nf4_nbytes(param.numel(), policy.nf4_block_size, policy.nf4_scaler_block_size,
                                nf4_dtype(mp, param.dtype))
        unit = _enclosing_unit(_parent(tied[0]), units)
        unit_bytes[unit] = unit_bytes.get(unit, 0) + nbytes
        if tied[0] not in frozen:
            gathered += nbytes
            state += param.numel() * (4 * param.dtype.itemsize + (mp.itemsize if cast and mp != param.dtype else 0))
    blocks = {u: b for u, b in unit_bytes.items() if u != ""} or unit_bytes
    largest = max(blocks, key=blocks.get)
    block = f"the largest unit's gathered bytes ({largest or '<root>'}: {blocks[largest]:,})"
    whole = (f"trainable_grouping='auto': the trainable parameters' whole state per rank (parameters, gradients, "
             f"AdamW moments, {str(mp).removeprefix('torch.') if mp else 'no'} copies: {state:,} bytes)")
    if state <= blocks[largest]:
        return "replicate", f"{whole} fits within {block}: replicated"
    if gathered <= blocks[largest]:
        return "root", f"{whole} exceeds {block}; gathered ({gathered:,} bytes) they fit: one root group"
    return "per_unit", f"{whole} and their gathered bytes ({gathered:,}) exceed {block}: per unit"


def _trainable_reshard(policy: FreezePolicy, unit: str) -> bool | int:
    """A unit's trainable ``reshard_after_forward``: the policy's, else FSDP's rule (False for the root)."""
    return policy.trainable_reshard if policy.trainable_reshard is not None else unit != ""


def _ownership(
    holders: dict[nn.Parameter, list[str]], units: list[str], root_grouping_frozen: set[str] | None = None,
    replicate: bool = False,
) -> tuple[dict[str, nn.Parameter], dict[str, str], dict[str, list[str]]]:
    """(canonical FQN -> Parameter, FQN -> owning unit, unit -> params its fully_shard must ignore).

    A tied parameter is owned by the innermost unit that holds every module using it; the inner
    units that use it get it through ``ignored_params``. With ``trainable_grouping="root"``
    (`root_grouping_frozen` is then the frozen set) every trainable parameter is owned by the root,
    and the root, sharded first, ignores what the other units own (see [Note: root grouping]).
    With `replicate` as well, no fully_shard call takes a trainable parameter: every unit ignores
    its own, the root all of them.
    """
    owner: dict[str, str] = {}
    ignored: dict[str, list[str]] = {}
    params: dict[str, nn.Parameter] = {}
    for param, tied in holders.items():
        fqn = tied[0]
        if param.dim() == 0:
            raise PolicyError(f"parameter {fqn!r} is a scalar; FSDP shards dim 0, reshape it to shape [1]")
        params[fqn] = param
        enclosing = {_enclosing_unit(_parent(n), units) for n in tied}
        outer = min(enclosing, key=len)
        if root_grouping_frozen is not None and fqn not in root_grouping_frozen:
            outer = ""
        elif not all(_within(u, outer) for u in enclosing):
            raise PolicyError(
                f"tied parameter {fqn!r} is used under units {sorted(enclosing)}, none of which contains "
                f"the others; make one unit hold every module that uses it (names: {tied})"
            )
        owner[fqn] = outer
        for u in enclosing - {outer}:
            if not compat.IGNORED_PARAMS_SUPPORTED:
                raise PolicyError(
                    f"tied parameter {fqn!r} is used in unit {u!r} and owned by {outer!r}; this needs "
                    f"fully_shard(ignored_params=...), torch >= 2.7 (found {torch.__version__})"
                )
            ignored.setdefault(u, []).append(fqn)
    if replicate:
        ignored[""] = [f for f in owner if f not in root_grouping_frozen]
    elif root_grouping_frozen is not None and any(o != "" for o in owner.values()):
        ignored[""] = [f for f, o in owner.items() if o != ""]
    return params, owner, ignored


def _quantization(
    model: nn.Module, policy: FreezePolicy, names: ModelNames, holders: dict[nn.Parameter, list[str]],
    params: dict[str, nn.Parameter], frozen: set[str], shard_size: int, tensor_parallel: dict[str, int],
) -> tuple[set[str], dict[str, str]]:
    """(frozen params stored as NF4, frozen params NF4 cannot hold -> why); empty unless frozen_dtype="nf4"."""
    quantized: set[str] = set()
    not_quantized: dict[str, str] = {}
    if policy.frozen_dtype != NF4:
        return quantized, not_quantized
    if shard_size == 1 and not compat.IGNORED_PARAMS_SUPPORTED:
        raise PolicyError(
            f"FreezePolicy.frozen_dtype='nf4' at shard size 1 keeps NF4 weights out of FSDP "
            f"(ignored_params), which needs torch >= 2.7 (found {torch.__version__})"
        )
    tp = sorted(f for f in frozen & set(params) if f in tensor_parallel)
    if tp:
        raise PolicyError(
            f"FreezePolicy.frozen_dtype='nf4' with tensor-parallel frozen weights {tp[:4]}{' ...' if len(tp) > 4 else ''}: "
            f"torchao's NF4Tensor cannot be the local tensor of a TP DTensor (its all-gather and dequantization "
            f"are per whole weight); use frozen_dtype='bfloat16' under TP, or NF4 without TP"
        )
    for fqn in sorted(frozen & set(params)):
        why = nf4_ineligible(model, names.params[fqn], params[fqn], shard_size, policy.nf4_block_size,
                             policy.nf4_scaler_block_size)
        if why is None and len(holders[params[fqn]]) == 1:
            quantized.add(fqn)
        else:
            not_quantized[fqn] = why or "tied to another module"
    return quantized, not_quantized


def _groups(
    model: nn.Module, policy: FreezePolicy, names: ModelNames, units: list[str], params: dict[str, nn.Parameter],
    owner: dict[str, str], frozen: set[str], quantized: set[str], shard_size: int, split: bool,
    tensor_parallel: dict[str, int], grouping_why: str = "", replicate: bool = False,
) -> tuple[list[GroupPlan], list[str]]:
    """Each unit's frozen and trainable groups (frozen first), and the frozen params left unsplit
    (structural fallback, torch < 2.12)."""
    frozen_dtype, mp_dtype = policy.torch_frozen_dtype, policy.torch_param_dtype

    def make_group(unit: str, kind: GroupKind, fqns: list[str], reshard, modules=()) -> GroupPlan:
        storage = [frozen_dtype if (kind == FROZEN and frozen_dtype and params[f].is_floating_point())
                   else params[f].dtype for f in fqns]
        gathered = [mp_dtype if (mp_dtype and s.is_floating_point) else s for s in storage]
        labels = [NF4 if f in quantized else _dtype_label({d}) for f, d in zip(fqns, storage)]
        gathered_labels = [NF4 if f in quantized else _dtype_label({d}) for f, d in zip(fqns, gathered)]
        nbytes = [nf4_nbytes(params[f].numel(), policy.nf4_block_size, policy.nf4_scaler_block_size,
                             nf4_dtype(mp_dtype, params[f].dtype))
                  if f in quantized else tensor_parallel.get(f, params[f].numel()) * d.itemsize
                  for f, d in zip(fqns, gathered)]
        return GroupPlan(
            unit=unit, kind=kind, params=tuple(fqns), numel=sum(params[f].numel() for f in fqns),
            storage_dtype=_label(labels), gathered_dtype=_label(gathered_labels),
            reshard=reshard, all_gathers_per_step=_gathers(kind, reshard, shard_size),
            unsharded_bytes=sum(nbytes), modules=tuple(modules),
            # a trainable group holding only frozen params (torch < 2.12 fallback) has no gradient to reduce
            reduce_scatters_per_step=int(kind != FROZEN and shard_size > 1 and any(f not in frozen for f in fqns)),
        )

    groups: list[GroupPlan] = []
    unsplit: list[str] = []
    for unit in units:
        owned = [f for f in params if owner[f] == unit]
        frozen_fqns = [f for f in owned if f in frozen]
        trainable_fqns = [f for f in owned if f not in frozen]
        modules: list[str] = []
        if frozen_fqns and not split:
            modules = _frozen_only_modules(model, unit, units, set(owned), frozen, names)
            in_modules = [f for f in frozen_fqns if any(_within(f, m) for m in modules)]
            unsplit += [f for f in frozen_fqns if f not in in_modules]
            trainable_fqns = [f for f in owned if f not in in_modules]
            frozen_fqns = in_modules
        if frozen_fqns:
            group = make_group(unit, FROZEN, frozen_fqns, _frozen_reshard(unit, policy.frozen_reshard), modules)
            groups.append(replace(group, why=_frozen_why(unit, policy.frozen_reshard)))
        if trainable_fqns and replicate and unit == "":
            kept_frozen = [f for f in trainable_fqns if f in frozen]
            if kept_frozen:
                raise PolicyError(
                    f"FreezePolicy.trainable_grouping='replicate': the root's frozen parameters {kept_frozen} "
                    f"share a module with trainable ones and torch {torch.__version__} cannot split them off "
                    f"(needs >= 2.12); use trainable_grouping='root' or 'per_unit', or put those modules in a unit"
                )
            group = make_group(unit, TRAINABLE, trainable_fqns, REPLICATED)
            groups.append(replace(group, all_gathers_per_step=0, reduce_scatters_per_step=0,
                                  all_reduces_per_step=int(shard_size > 1), why=grouping_why))
        elif trainable_fqns:
            group = make_group(unit, TRAINABLE, trainable_fqns, _trainable_reshard(policy, unit))
            groups.append(replace(group, why=_trainable_why(policy, unit, grouping_why)))
    return groups, unsplit


def _resolve_auto(groups: list[GroupPlan], budget: int, shard_size: int) -> list[GroupPlan]:
    """Keep gathered the frozen groups that fit in `budget`, largest saving (= largest group) first.

    Trainable groups kept gathered for the whole step (``reshard_after_forward=False``: the root's,
    which holds every adapter under ``trainable_grouping="root"``) are charged to the budget first;
    the other trainable groups are gathered one unit at a time, like FSDP's own working set.
    """
    total = budget
    reserved = sum(g.unsharded_bytes for g in groups
                   if g.kind == TRAINABLE and (g.reshard is False or g.reshard == REPLICATED)) if shard_size > 1 else 0
    budget = max(budget - reserved, 0)
    charged = f" after {reserved:,} of trainable groups kept gathered for the step" if reserved else ""
    keep: set[int] = set()
    frozen = sorted((i for i, g in enumerate(groups) if g.kind == FROZEN), key=lambda i: -groups[i].unsharded_bytes)
    left_at: dict[int, int] = {}
    for i in frozen:
        left_at[i] = budget
        if groups[i].unsharded_bytes <= budget:
            keep.add(i)
            budget -= groups[i].unsharded_bytes
    out = []
    for i, g in enumerate(groups):
        if g.kind == FROZEN:
            reshard = "never" if i in keep else _frozen_reshard(g.unit, "after_forward")
            need = f"{g.unsharded_bytes:,} unsharded bytes"
            left = f"the {left_at[i]:,} left of frozen_budget_bytes={total:,}{charged}"
            why = (f"auto: kept gathered, {need} fit {left}" if i in keep else
                   f"auto: {need} exceed {left}; " + _frozen_why(g.unit, "after_forward").replace("frozen_reshard=", "as "))
            g = replace(g, reshard=reshard, all_gathers_per_step=_gathers(FROZEN, reshard, shard_size), why=why)
        out.append(g)
    return out
