"""Tensor parallelism (FSDP x TP): placing LoRA adapters from their base linear, and the checks
`shard_with_freezing` runs on a model already parallelized with ``parallelize_module``.

Usage (torchtitan's order: TP, then AC and compile, then FSDP on the data-parallel sub-mesh)::

    world = init_device_mesh("cuda", (dp, tp), mesh_dim_names=("dp", "tp"))
    base_plan = {"model.layers.*.self_attn.q_proj": ColwiseParallel(), ...,
                 "model.layers.*.self_attn.o_proj": RowwiseParallel(), ...}
    parallelize_module(model, world["tp"], lora_tp_plan(model, base_plan))
    shard_with_freezing(model, world["dp"], FreezePolicy(units=["layers.*"]))

[Note: LoRA under TP] A LoRA layer computes ``base(x) + B(A(x))``. Its adapters are placed from
the base linear, as torchtitan's LoRA does:

* colwise base (output features sharded): ``lora_A`` whole on every TP rank (a plain parameter,
  sharded by FSDP over the data-parallel ranks only), ``lora_B`` colwise like the base, with the
  base's input and output layouts. The gradient reaching ``A``'s output is the sum over the TP
  ranks' output features: ``lora_B``'s colwise input hook (a Replicate DTensor) all-reduces it in
  backward, so ``A``'s gradient is whole and equal on every TP rank.
* rowwise base (input features sharded): ``lora_A`` rowwise like the base (its r-dim output
  all-reduced), ``lora_B`` whole on every TP rank, fed that replicated output.

The bug users report when LoRA is added to a TP model without this (adapters each TP rank trains
on its own, never averaged) is refused at shard time: a LoRA layer whose base weight is
TP-sharded and whose ``lora_B`` (colwise) or ``lora_A`` (rowwise) is a plain tensor raises
`PolicyError` naming it. Only layouts that keep the adapters' inputs whole on every TP rank are
taken (colwise input and rowwise output ``Replicate``; sequence parallel's ``Shard(1)`` would give
the whole adapter a different token slice per rank: refused by name). DoRA (its magnitude needs the
whole weight's row norms) and IA3 (its vector scales the sharded features) are refused too.
"""

from __future__ import annotations

import fnmatch
from typing import Any

import torch.nn as nn
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel

from . import _torch_compat as compat
from .errors import PolicyError

_ADAPTERS = ("lora_A", "lora_B")


def _adapter_modules(layer: nn.Module, part: str) -> dict[str, nn.Module]:
    """``{relative name: module}`` of a LoRA layer's `part` (PEFT's ModuleDict keyed by adapter, or a
    single module as in the tests' own LoRALinear)."""
    mod = getattr(layer, part)
    if isinstance(mod, nn.ModuleDict):
        return {f"{part}.{k}": v for k, v in mod.items()}
    return {part: mod}


def _is_lora_layer(module: nn.Module) -> bool:
    return hasattr(module, "base_layer") and all(isinstance(getattr(module, p, None), nn.Module) for p in _ADAPTERS)


def _whole_layouts(key: str, style: ParallelStyle) -> None:
    layouts = {"input_layouts": style.input_layouts} if isinstance(style, ColwiseParallel) else \
        {"output_layouts": style.output_layouts}
    for what, layout in layouts.items():
        if not all(isinstance(p, Replicate) for p in (layout if isinstance(layout, tuple) else (layout,))):
            raise PolicyError(
                f"lora_tp_plan: {key!r} has {type(style).__name__}({what}={layout}): its LoRA adapters would see a "
                f"different slice of the tokens on each TP rank (sequence parallel); use Replicate() {what} for "
                f"LoRA layers"
            )


def lora_tp_plan(model: nn.Module, plan: dict[str, ParallelStyle]) -> dict[str, ParallelStyle]:
    """The TP plan for `model` with LoRA adapters placed from their base linear ([Note: LoRA under TP]).

    Args:
        model: the model with its LoRA layers in place (PEFT ``get_peft_model``, or any module with
            ``base_layer``, ``lora_A`` and ``lora_B``), not yet parallelized.
        plan: ``parallelize_module``'s plan for the base model: module names or ``fnmatch`` globs ->
            ``ColwiseParallel`` / ``RowwiseParallel`` (others are passed through). A key may name the
            LoRA layer (``...q_proj``) or its base (``...q_proj.base_layer``).

    Returns:
        A plan on concrete module names: each LoRA layer's base gets the base's style, and the adapter
        that is sharded (colwise base: ``lora_B``; rowwise base: ``lora_A``) a copy of it. Every style
        keeps the ``requires_grad`` of the parameters it shards (torch < 2.11 made them all trainable:
        `_torch_compat.keep_requires_grad`).

    Raises:
        PolicyError: a key matches no module; a LoRA layer with a sequence-parallel style, DoRA
            magnitudes or IA3 vectors.
    """
    out: dict[str, ParallelStyle] = {}
    modules = dict(model.named_modules())
    for key, style in plan.items():
        matched = [name for name in modules if name and fnmatch.fnmatchcase(name, key)]
        if not matched:
            raise PolicyError(f"lora_tp_plan: plan key {key!r} matches no module of {type(model).__name__}")
        for name in matched:
            layer_name = name.removesuffix(".base_layer") if name.endswith(".base_layer") else name
            layer = modules[layer_name]
            if not _is_lora_layer(layer) or not isinstance(style, (ColwiseParallel, RowwiseParallel)):
                out[name] = style
                continue
            if any(getattr(layer, attr, None) for attr in ("lora_magnitude_vector", "ia3_l")):
                raise PolicyError(f"lora_tp_plan: {layer_name!r} has DoRA magnitudes or IA3 vectors, which need the "
                                  f"whole weight under TP; use plain LoRA with tensor parallelism")
            _whole_layouts(key, style)
            out[f"{layer_name}.base_layer"] = style
            sharded = "lora_B" if isinstance(style, ColwiseParallel) else "lora_A"
            for rel in _adapter_modules(layer, sharded):
                out[f"{layer_name}.{rel}"] = style  # each entry gets its own copy below
    return {name: compat.keep_requires_grad(style) for name, style in out.items()}


def check_tp(model: nn.Module, mesh: Any) -> bool:
    """Check a model parallelized with ``parallelize_module`` against the data-parallel `mesh`;
    True if it has TP-placed (DTensor) parameters.

    Raises:
        PolicyError: a DTensor parameter on a mesh that is not a sibling sub-mesh of `mesh`'s root
            (FSDP x TP needs ``world_mesh["dp"]`` and ``world_mesh["tp"]`` of one world mesh), or a
            LoRA layer whose base is TP-sharded and whose sharded adapter is not ([Note: LoRA under TP]).
    """
    tp = {n: p for n, p in model.named_parameters() if isinstance(p, DTensor)}
    if not tp:
        return False
    root = compat.root_mesh(mesh)
    for name, p in tp.items():
        if compat.root_mesh(p.device_mesh) != root or p.device_mesh == root:  # equal, maybe not the same object
            raise PolicyError(
                f"parameter {name!r} is a DTensor on {p.device_mesh}, which is not a sub-mesh of the data-parallel "
                f"mesh's world mesh; FSDP x TP needs both from one mesh: parallelize_module(model, world['tp'], ...) "
                f"then shard_with_freezing(model, world['dp'], policy)"
            )
    for layer_name, layer in model.named_modules():
        if not _is_lora_layer(layer):
            continue
        base = getattr(layer.base_layer, "weight", None)
        if not isinstance(base, DTensor) or all(isinstance(pl, Replicate) for pl in base.placements):
            continue
        (dim,) = {pl.dim for pl in base.placements if pl.is_shard()}
        sharded = "lora_B" if dim == 0 else "lora_A"
        for rel, mod in _adapter_modules(layer, sharded).items():
            if not isinstance(getattr(mod, "weight", None), DTensor):
                raise PolicyError(
                    f"LoRA layer {layer_name!r}: its base weight is TP-sharded on dim {dim} but {rel!r} is not "
                    f"placed, so each TP rank would train its own copy of the adapters on partial gradients; "
                    f"parallelize with fsdp_frozen.lora_tp_plan(model, plan)"
                )
    return True


def llama_tp_plan(model: nn.Module) -> dict[str, Any]:
    """torchtitan's Llama plan on a transformers Llama-style model (PEFT-wrapped or not): q, k, v, gate,
    up colwise; o, down rowwise; everything else (embedding, norms, head) left whole on every TP rank."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    layers = next((n for n, m in model.named_modules() if n.endswith("layers") and isinstance(m, nn.ModuleList)), None)
    if layers is None:
        raise PolicyError(f"llama_tp_plan: {type(model).__name__} has no '...layers' ModuleList; write its TP plan")
    return {**{f"{layers}.*.self_attn.{p}": ColwiseParallel() for p in ("q_proj", "k_proj", "v_proj")},
            f"{layers}.*.self_attn.o_proj": RowwiseParallel(),
            **{f"{layers}.*.mlp.{p}": ColwiseParallel() for p in ("gate_proj", "up_proj")},
            f"{layers}.*.mlp.down_proj": RowwiseParallel()}


__all__ = ["check_tp", "llama_tp_plan", "lora_tp_plan"]
