"""`estimate`: per-rank memory and per-step communication of a run, from the sharding code itself.

The model is built on the meta device and sharded with `shard_with_freezing` on torch's fake process
group of N ranks, in this one process: nothing is allocated and nothing is sent. Every number is read
from what the sharding built (`describe` records and FSDP's per-parameter shard sizes), not from a
second formula, so it is exactly what a real run of that world size holds and moves (tested against
gloo ranks). Only activations are a formula; their method is stated with them.

    python -m fsdp_frozen estimate --model config.json --world 8 [--peft adapter_config.json] ...

[Note: what is and is not counted] Parameters, gradients (one per trainable element, in its storage
dtype: FSDP reduce-scatters into the sharded gradient) and AdamW state (``exp_avg``, ``exp_avg_sq``
in the parameter's dtype, plus a 4-byte ``step`` per parameter) are exact per rank. The transient
peak adds the root's all-gather output (FSDP keeps it from the root's forward to the end of
backward) and the two largest other units' (FSDP prefetches the next unit, so up to two are alive),
and under ``trainable_grouping="replicate"`` the ``param_dtype`` copies of the whole trainable
parameters (their state is whole on every rank and counted above). Not counted: the CUDA context and allocator fragmentation, NCCL buffers, optimizer
temporaries, the gathered gradients of one unit before reduce-scatter (``reduce_scatter_bytes``
of that unit), and anything the model keeps besides its parameters.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from . import _torch_compat as compat
from . import process_groups
from .apply import shard_with_freezing, sharded_state
from .errors import PolicyError
from .plan import FROZEN, REPLICATED
from .policy import FreezePolicy
from .replicate import fsdp_layout, padded_numels
from .nf4_compute import get_nf4_compute
from .report import describe, nf4_dense_bytes
from .storage import is_nf4, storage_nbytes

#: AdamW's per-parameter state: exp_avg and exp_avg_sq in the parameter's dtype, step as a float32 scalar.
ADAMW_STEP_BYTES = 4


@dataclass
class Estimate:
    """What one rank holds and moves under one policy (bytes; rank 0, whose padded shards every rank has)."""

    world: int
    replicate: int
    frozen_reshard: str
    frozen_dtype: str
    trainable_grouping: str  #: as planned ("auto" resolved: "per_unit", "root" or "replicate")
    frozen_shard_bytes: int  #: this rank's frozen shards, as stored
    trainable_shard_bytes: int
    gradient_bytes: int  #: sharded gradients of the trainable parameters
    optimizer_bytes: int  #: AdamW state of this rank's trainable shards
    kept_gathered_bytes: int  #: unsharded frozen weights kept between steps ("never" groups)
    #: unsharded trainable weights gathered for the whole step (groups with reshard_after_forward=False:
    #: the root's, which holds every adapter under trainable_grouping="root"; the param_dtype copies
    #: under "replicate")
    trainable_step_gathered_bytes: int
    largest_unit_gather_bytes: int  #: the largest all-gather output of one unit (transient)
    largest_unit: str
    persistent_bytes: int  #: shards + gradients + optimizer + kept-gathered
    peak_bytes: int  #: persistent + the root's all-gather (alive all step) + every "after_backward" frozen
    #: group's (all gathered at the turn to backward) + the two largest other units' (FSDP prefetches one
    #: ahead) + the replicated trainable group's param_dtype copies
    all_gather_bytes_per_step: dict[str, int]  #: by group kind ("frozen", "trainable"), output bytes
    reduce_scatter_bytes_per_step: int  #: input bytes (the unsharded gradients)
    #: HSDP: the reduce-scattered gradients, all-reduced over replicas; trainable_grouping="replicate":
    #: the whole gradients (dim 0 padded to the shard size), over the shard dim and then the replicas
    all_reduce_bytes_per_step: int
    checkpoint_full_bytes: int  #: every rank together: parameters + buffers + AdamW state
    checkpoint_trainable_bytes: int  #: trainable parameters + AdamW state (what frozen="auto" writes later)
    activations: dict[str, Any] = field(default_factory=dict)  #: with batch and seq: bytes and the method
    #: process groups the frozen groups add beyond the mesh's (NCCL: one communicator each, its buffers
    #: and setup at first use; `fsdp_frozen.process_groups.count`)
    frozen_process_groups: int = 0
    #: with tp > 1: degree, colwise/rowwise linears, the TP plan's all-reduce bytes per token (forward,
    #: backward; ring all-reduces send about twice that per rank)
    tensor_parallel: dict[str, int] = field(default_factory=dict)
    #: NF4 weights dequantized to the compute dtype beside a recomputed block: under the default
    #: ``nf4_compute("fast")`` the largest non-root unit's, alive together from its recompute until each
    #: weight's backward ([Note: NF4 dequantization reuse]); under "fast_dequant" / "torchao" the largest
    #: single weight (one at a time). Not in `peak_bytes` (it comes with a recomputed block, not at the
    #: loss's peak): ``activation_bytes(..., nf4_dense=)`` adds it there
    nf4_dense_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextlib.contextmanager
def fake_process_group(world: int) -> Iterator[None]:
    """torch's fake process group of `world` ranks in this process (collectives do nothing)."""
    if dist.is_initialized():
        raise PolicyError("estimate() runs its own fake process group: call it in a process without one "
                          "(not inside torchrun)")
    compat.init_fake_process_group(world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _gathered_itemsize(local: torch.Tensor, param_dtype: torch.dtype | None) -> int:
    return (param_dtype if param_dtype is not None and local.is_floating_point() else local.dtype).itemsize


def _reduce_itemsize(local: torch.Tensor, policy: FreezePolicy) -> int:
    dtype = policy.torch_reduce_dtype or policy.torch_param_dtype or local.dtype
    return dtype.itemsize


def gathered_bytes(model: nn.Module, params: Iterable[str]) -> int:
    """The all-gather output bytes of the parameters `params` (FQNs, e.g. a plan group's) of a sharded
    model: each FSDP parameter's padded shard times the shard ranks, in the gathered dtype
    (``param_dtype``; NF4 at its packed size). Parameters FSDP does not manage (NF4 at shard size 1,
    replicated ones) are never gathered."""
    state = sharded_state(model)
    per_rank = 0
    for fqn in params:
        fp = state.fsdp_params.get(fqn)
        if fp is None:
            continue
        local = compat.local_tensor(compat.sharded_param(fp))
        if is_nf4(local):
            per_rank += storage_nbytes(local)
        else:
            per_rank += math.prod(compat.padded_shard_size(fp)) * _gathered_itemsize(local, state.policy.torch_param_dtype)
    return per_rank * state.plan.shard_size


def measure(model: nn.Module) -> Estimate:
    """The numbers of a model already sharded by `shard_with_freezing` (on a fake or a real group)."""
    state = sharded_state(model)
    policy, plan = state.policy, state.plan
    world = state.mesh.size()
    replicate = state.mesh.size(0) if state.mesh.ndim == 2 else 1
    shard_size = plan.shard_size
    records = describe(model)
    # torch < 2.12's structural fallback leaves some frozen parameters in trainable groups (plan.unsplit):
    # frozen bytes, no gradient, no optimizer state, gathered in the trainable group's all-gathers
    unsplit = set(plan.unsplit)
    moved = sum(storage_nbytes(compat.local_tensor(model.get_parameter(plan.path(f)))) for f in unsplit)
    frozen = sum(r.sharded_bytes for r in records if r.kind == FROZEN) + moved
    trainable = sum(r.sharded_bytes for r in records if r.kind != FROZEN) - moved
    trainable_params = [model.get_parameter(plan.path(p)) for g in plan.groups if g.kind != FROZEN
                        for p in g.params if p not in unsplit]
    optimizer = sum(2 * storage_nbytes(compat.local_tensor(p)) + ADAMW_STEP_BYTES for p in trainable_params)

    gather = {(g.unit, g.kind): gathered_bytes(model, g.params) for g in plan.groups}  # all-gather output bytes
    reduce = 0
    for g in plan.groups:
        for fqn in g.params:
            fp = state.fsdp_params.get(fqn)
            if fp is not None and g.kind != FROZEN and fqn not in unsplit:
                local = compat.local_tensor(compat.sharded_param(fp))
                reduce += shard_size * math.prod(compat.padded_shard_size(fp)) * _reduce_itemsize(local, policy)
    by_record = {(r.unit, r.kind): r for r in records}
    all_gather = {"frozen": 0, "trainable": 0}
    kept = 0
    for g in plan.groups:
        r, nbytes = by_record[(g.unit, g.kind)], gather[(g.unit, g.kind)]
        frozen_part = gathered_bytes(model, plan.frozen_params(g))
        all_gather["frozen"] += frozen_part * r.all_gathers_per_step
        all_gather["trainable"] += (nbytes - frozen_part) * r.all_gathers_per_step
        if r.kind == FROZEN and r.reshard == "never":
            kept += nbytes
    units: dict[str, int] = {}
    # "after_backward" frozen groups stay gathered from their unit's forward to its backward: at the turn
    # from forward to backward every one of them is gathered at once
    held_to_backward = 0
    for (unit, kind), nbytes in gather.items():
        reshard = by_record[(unit, kind)].reshard
        if kind == FROZEN and reshard == "after_backward" and unit != "":
            held_to_backward += nbytes
        elif not (kind == FROZEN and reshard == "never"):
            units[unit] = units.get(unit, 0) + nbytes
    step_gathered = sum(nbytes for (unit, kind), nbytes in gather.items()
                        if kind != FROZEN and by_record[(unit, kind)].reshard.startswith("False"))
    # trainable_grouping="replicate": whole parameters (counted as shards above), their param_dtype copies
    # for the step, and one all-reduce of the gradients (dim 0 padded unless replicate.fsdp_layout says flat)
    replicated = [r for r in records if r.reshard == REPLICATED]
    all_reduce = copies = 0
    for r in replicated:
        if r.storage_dtype != r.gathered_dtype:
            copies += r.unsharded_bytes
        group_params = [model.get_parameter(plan.path(fqn)) for fqn in r.params]
        numels, itemsize = [p.numel() for p in group_params], _reduce_itemsize(group_params[0], policy)
        padded = padded_numels([p.shape for p in group_params], shard_size)
        sent = sum(padded) if fsdp_layout(numels, padded, itemsize, shard_size) else sum(numels)
        all_reduce += sent * itemsize * (int(shard_size > 1) + int(replicate > 1))
    largest_unit = max(units, key=units.get) if units else ""
    largest = units.get(largest_unit, 0)
    others = sorted(v for u, v in units.items() if u != "")
    # FSDP's root stays gathered from its forward to the end of backward; two other units may be gathered beside it.
    # At shard size 1 too: FSDP2 copies each parameter it manages into its unsharded buffer there
    # (gathered_bytes counts none of those kept out of FSDP, [Note: whole frozen groups] in plan.py)
    step_gathered += copies
    transient = units.get("", 0) + held_to_backward + sum(others[-2:]) + copies
    persistent = frozen + 2 * trainable + optimizer + kept

    def global_bytes(p: torch.Tensor) -> int:
        local = compat.local_tensor(p)
        if is_nf4(local):
            return storage_nbytes(local) * (shard_size if isinstance(p, torch.distributed.tensor.DTensor) else 1)
        return p.numel() * local.element_size()

    params = dict(model.named_parameters())
    trainable_global = sum(global_bytes(p) for p in trainable_params)
    optimizer_global = sum(2 * global_bytes(p) + ADAMW_STEP_BYTES for p in trainable_params)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    full = sum(global_bytes(p) for p in params.values()) + buffers + optimizer_global
    return Estimate(
        world=world, replicate=replicate, frozen_reshard=str(policy.frozen_reshard),
        frozen_dtype=str(policy.frozen_dtype), trainable_grouping=plan.trainable_grouping, frozen_shard_bytes=frozen, trainable_shard_bytes=trainable,
        gradient_bytes=trainable, optimizer_bytes=optimizer, kept_gathered_bytes=kept,
        trainable_step_gathered_bytes=step_gathered,
        largest_unit_gather_bytes=largest, largest_unit=largest_unit or "<root>",
        persistent_bytes=persistent, peak_bytes=persistent + transient,
        all_gather_bytes_per_step=all_gather, reduce_scatter_bytes_per_step=reduce,
        all_reduce_bytes_per_step=(reduce // shard_size if replicate > 1 else 0) + all_reduce,
        checkpoint_full_bytes=full, checkpoint_trainable_bytes=trainable_global + optimizer_global,
        frozen_process_groups=process_groups.count(plan, state.mesh.ndim),
        nf4_dense_bytes=nf4_dense_bytes(model, together=get_nf4_compute() == "fast"),
    )


#: The recipes' loss (recipes/loss.py): cross-entropy over the output head in this many chunks of tokens
#: (torchtune's default), never the full fp32 logits; 0 models the unchunked loss.
LOSS_CHUNKS = 8
#: recipes/loss.py ``LOG_SOFTMAX_BLOCK``: elements of the fp32 temporary of one in-place log-softmax step
LOSS_LOG_SOFTMAX_BLOCK = 1 << 22


def loss_bytes(tokens: int, hidden: int, vocab: int, dtype_bytes: int = 2, *, chunks: int = LOSS_CHUNKS,
               nf4_head: bool = False) -> dict[str, int]:
    """Peak bytes of the recipes' loss (recipes/loss.py) on top of the blocks' saved activations, by term.

    Chunked (``chunks >= 1``, C = ceil(tokens / chunks) rows a chunk, e = `dtype_bytes`): the head's input
    (N x h x e, alive while the loss runs), the gradient of it that the loss computes in its forward and
    saves for backward (N x h x e), and one chunk at a time: its compute-dtype logits and their fp32
    copy, then the fp32 block and its compute-dtype cast (C x V x (e + 4); with fp32 compute the logits
    are the fp32 block: C x V x 4 plus the log-softmax step's temporary, LOSS_LOG_SOFTMAX_BLOCK fp32
    elements at most). An NF4 head (`nf4_head`) is dequantized to the compute dtype once for the loss:
    V x h x e more. A trainable head would add its fp32 weight-gradient accumulator (V x h x 4; the
    LoRA recipes' head is frozen, not counted). tests/test_chunked_loss.py measures these terms.

    Unchunked (``chunks == 0``, ``F.cross_entropy(logits.float(), y)``): the head's input, and at the
    backward of log-softmax its saved fp32 output, its gradient and the logits' fp32 gradient: 12 N V
    (the forward's e + 8 is less). An NF4 head's dequantized copy is transient there, beside smaller blocks.
    """
    if chunks < 0:
        raise ValueError(f"chunks must be >= 0, got {chunks}")
    e = dtype_bytes
    terms = {"head_input": tokens * hidden * e}
    if chunks == 0:
        terms["logits_fp32_x3"] = 12 * tokens * vocab
        return terms
    rows = math.ceil(tokens / chunks)
    block = rows * vocab
    step_rows = min(rows, max(1, LOSS_LOG_SOFTMAX_BLOCK // vocab))
    terms["saved_hidden_grad"] = tokens * hidden * e
    terms["chunk"] = max(block * (e + 4) if e != 4 else block * 4, block * 4 + step_rows * vocab * 4)
    if nf4_head:
        terms["nf4_head_dequantized"] = vocab * hidden * e
    return terms


def activation_bytes(config: Any, batch: int, seq: int, dtype_bytes: int = 2, *, loss_chunks: int = LOSS_CHUNKS,
                     nf4_head: bool = False, nf4_dense: int = 0, offload: bool = False) -> dict[str, Any]:
    """Activation bytes per rank of a decoder-only transformer (a Hugging Face config) trained the
    recipes' way, with and without activation checkpointing of every block.

    Blocks: Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models"),
    ``34 * s * b * h`` bytes per layer at 2-byte activations with a fused attention kernel (no
    ``5 * a * s^2 * b`` score term); the 34 assumes a 4h MLP and full-width K/V, so a wider MLP or
    grouped K/V shifts it. With checkpointing each layer keeps its input (``s * b * h`` activations)
    and one layer at a time is recomputed in backward. The loss (`loss_bytes`): the recipes' chunked
    cross-entropy (recipes/loss.py, `loss_chunks` chunks; 0: unchunked). Its peak comes at the end of
    the forward, when every block's saved activations are alive and no block is recomputed, and what
    it saves for backward is one N x h gradient: so without checkpointing the peak is all layers plus
    the loss, with it the saved inputs plus the larger of the loss and one recomputed layer. An
    estimate, unlike the other numbers: it ignores LoRA's rank-r intermediates, the gradients in
    flight during a block's backward, and the final norm's own saved tensors. `nf4_dense`
    (`Estimate.nf4_dense_bytes`): a block's NF4 weights dequantized in its recompute and kept for its
    backward ([Note: NF4 dequantization reuse]), added to the recomputed layer. `offload`: the
    checkpointed inputs live in host memory between forward and backward (recipes/offload.py), and
    one comes back with the block it feeds.
    """
    h, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    tokens = batch * seq
    per_layer = 34 * tokens * h * dtype_bytes // 2
    inputs = layers * tokens * h * dtype_bytes
    loss = loss_bytes(tokens, h, vocab, dtype_bytes, chunks=loss_chunks, nf4_head=nf4_head)
    total = sum(loss.values())
    nf4_extra = 0 if nf4_head or not loss_chunks else vocab * h * dtype_bytes
    recomputed = per_layer + nf4_dense
    kept_inputs = inputs
    if offload:  # the saved inputs on the host; the recomputed block's back on the device
        kept_inputs, recomputed = 0, recomputed + tokens * h * dtype_bytes
    with_nf4 = kept_inputs + max(recomputed, total + nf4_extra)
    how = (f"the recipes' chunked cross-entropy (recipes/loss.py), {loss_chunks} chunks of "
           f"{math.ceil(tokens / loss_chunks)} tokens: the head's input, its saved gradient (N*h each) and one "
           f"chunk's logits (C*V*(2+4) at bf16), never the full fp32 logits" if loss_chunks else
           "the unchunked cross-entropy: 12*N*V (fp32 log-softmax, its gradient, the logits' gradient)")
    return {
        "method": f"Korthikanti et al. 2022: 34*s*b*h bytes/layer at bf16, fused attention; AC keeps each layer's "
                  f"input plus one recomputed layer; loss: {how}"
                  + (f"; an NF4 head (frozen_dtype nf4) adds its dequantized copy to the loss (V*h*2 = "
                     f"{nf4_extra / 2**30:.2f} GiB: {with_nf4 / 2**30:.2f} GiB with checkpointing)" if nf4_extra else
                     "; the head's NF4 copy dequantized for the loss (V*h*2) counted" if nf4_head and loss_chunks
                     else "")
                  + (f"; a recomputed block's NF4 weights dequantized for its backward ({nf4_dense / 2**30:.2f} GiB) "
                     f"added to it" if nf4_dense else "")
                  + ("; the checkpointed inputs offloaded to host memory (recipes/offload.py): one back on the "
                     "device with the block it feeds" if offload else ""),
        "batch": batch, "seq": seq, "loss_chunks": loss_chunks, "nf4_head": nf4_head,
        "layer_bytes": per_layer, "checkpointed_inputs_bytes": inputs, "loss_bytes": total, "loss_terms": loss,
        "nf4_head_extra_bytes": nf4_extra,  #: what an NF4 head would add to checkpointing_bytes (not included)
        "no_checkpointing_bytes": layers * per_layer + total,
        "nf4_dense_bytes": nf4_dense, "offload": offload,
        "checkpointing_bytes": kept_inputs + max(recomputed, total),
    }


def estimate(
    build: Callable[[], nn.Module],
    world: int,
    policy: FreezePolicy,
    *,
    replicate: int = 1,
    tp: int = 1,
    tp_plan: dict[str, Any] | None = None,
) -> Estimate:
    """Shard the meta model ``build()`` on a fake process group of `world` ranks and measure it.

    Args:
        build: returns the model built on the meta device (with PEFT adapters if any), unsharded.
        world: ranks in all; with ``replicate > 1`` an HSDP mesh (replicate x shard), with ``tp > 1``
            the data-parallel ranks are ``world // tp`` (``(dp, tp)`` world mesh, FSDP on ``dp``).
        tp: tensor-parallel degree: ``parallelize_module(model, world["tp"], lora_tp_plan(model,
            tp_plan))`` before sharding, as a run would ([tp.md](../docs/tp.md)).
        tp_plan: the base model's TP plan (default for transformers Llama-style models:
            `fsdp_frozen.tp.llama_tp_plan`).
    Collective-free and allocation-free; a 70B model takes seconds.
    """
    if world < 1 or replicate < 1 or tp < 1 or world % (replicate * tp):
        raise PolicyError(f"estimate: world={world} must be a positive multiple of replicate={replicate} x tp={tp}")
    with fake_process_group(world):
        from torch.distributed.device_mesh import init_device_mesh

        dp = world // tp
        shape = (replicate, dp // replicate) if replicate > 1 else (dp,)
        names = ("replicate", "shard") if replicate > 1 else ("dp",)
        if tp > 1:
            world_mesh = init_device_mesh("cpu", (*shape, tp), mesh_dim_names=(*names, "tp"))
            mesh = world_mesh[names] if len(names) > 1 else world_mesh[names[0]]
        else:
            mesh = init_device_mesh("cpu", shape, mesh_dim_names=names if replicate > 1 else None)
        model = build()
        if any(not compat.local_tensor(p).is_meta for p in model.parameters()):
            raise PolicyError("estimate: build() must return a model on the meta device "
                              "(with torch.device('meta'): ...), so that nothing is allocated")
        if tp > 1:
            from torch.distributed.tensor.parallel import parallelize_module

            from .tp import llama_tp_plan, lora_tp_plan

            parallelize_module(model, world_mesh["tp"], lora_tp_plan(model, tp_plan or llama_tp_plan(model)))
        model = shard_with_freezing(model, mesh, policy)
        out = measure(model)
        if tp > 1:
            out.tensor_parallel = _tp_traffic(model, tp, policy)
        return out


def _tp_traffic(model: nn.Module, tp: int, policy: FreezePolicy) -> dict[str, int]:
    """The TP plan's own all-reduces per token (on the TP group; not FSDP's): each rowwise linear's
    output in forward, each colwise linear's input gradient in backward, in the compute dtype (an
    activation-checkpoint recompute repeats the forward ones). From the weights' TP placements."""
    from .report import _tensor_parallel

    itemsize = (policy.torch_param_dtype or torch.float32).itemsize
    forward = backward = 0
    for module in model.modules():
        w = module._parameters.get("weight")
        names = getattr(getattr(w, "device_mesh", None), "mesh_dim_names", None) or ()
        if "tp" not in names:
            continue
        placement = w.placements[names.index("tp")]
        if placement.is_shard(1):
            forward += w.shape[0] * itemsize
        elif placement.is_shard(0):
            backward += w.shape[1] * itemsize
    counts = _tensor_parallel(model, ("dp", "replicate", "shard")) or {}
    return {"degree": tp, **counts, "all_reduce_bytes_per_token_forward": forward,
            "all_reduce_bytes_per_token_backward": backward}


# ------------------------------------------------------------------------------------ Hugging Face
def hf_config(path: str | os.PathLike) -> Any:
    """A transformers config from a ``config.json`` or a directory holding one."""
    from transformers import AutoConfig

    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise PolicyError(f"estimate: no Hugging Face config at {path!r} (pass a config.json or its directory)")
    with open(path) as f:
        data = json.load(f)
    model_type = data.pop("model_type", None)
    if model_type is None:
        raise PolicyError(f"estimate: {path!r} has no 'model_type'; is it a Hugging Face config.json?")
    return AutoConfig.for_model(model_type, **data)


def hf_builder(config: Any, peft: str | os.PathLike | dict | None = None) -> Callable[[], nn.Module]:
    """``build`` for `estimate`: ``AutoModelForCausalLM.from_config`` on meta, PEFT-wrapped when an
    adapter config (``adapter_config.json``, its directory, or a dict) is given."""

    def build() -> nn.Module:
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        if peft is not None:
            from peft import get_peft_config, get_peft_model

            data = peft
            if not isinstance(peft, dict):
                path = os.fspath(peft)
                path = os.path.join(path, "adapter_config.json") if os.path.isdir(path) else path
                with open(path) as f:
                    data = json.load(f)
            model = get_peft_model(model, get_peft_config(dict(data)))
        return model

    return build


def default_units(config: Any) -> list[str]:
    """FSDP units for a Hugging Face model: its ``_no_split_modules`` (the decoder layer classes)."""
    from transformers import AutoModelForCausalLM

    cls = AutoModelForCausalLM._model_mapping[type(config)]
    units = list(getattr(cls, "_no_split_modules", None) or [])
    if not units:
        raise PolicyError(f"estimate: {cls.__name__} names no _no_split_modules; pass a policy with units")
    return units


__all__ = ["LOSS_CHUNKS", "Estimate", "activation_bytes", "default_units", "estimate", "fake_process_group",
           "hf_builder", "hf_config", "loss_bytes", "measure"]
