"""``trainable_grouping="replicate"``: trainable parameters whole on every rank, outside FSDP.

[Note: replicated trainables] Under ``"root"`` the adapters are one FSDP group: one all-gather and
one reduce-scatter per step, but FSDP2 still runs its per-parameter Python (copy-in, copy-out,
a DTensor per gradient) and the optimizer steps DTensors (a dispatch per op). For adapters that is
most of what a LoRA step spends above the compute floor (measured in ``recipes/benchmark.py``,
docs/benchmark.md). Here no fully_shard call takes a trainable parameter (``ignored_params``, see
`plan._ownership`); this module does what DDP would, in a fixed number of ops per step:

* before the root's forward, one ``_foreach_copy_`` refreshes a ``param_dtype`` copy of every
  trainable parameter (no copy when the dtypes agree: the compute tensor aliases the parameter),
  and the copies are put in the modules' parameter slots (tied slots too), as FSDP2 swaps in its
  unsharded parameters;
* at the end of backward (an autograd engine callback queued when backward starts, as FSDP2's
  root does) the copies' gradients are cast into one ``reduce_dtype`` buffer in one op
  (`compat.chunk_cat`), averaged with one all-reduce over the shard dim (and one over the replicas
  under HSDP) and handed to the parameters as their ``.grad`` (in their dtype), then the parameters
  are put back. Gradient accumulation follows FSDP2: ``set_requires_gradient_sync(False)`` on the
  root skips the reduction and accumulates in ``reduce_dtype``; a ``.grad`` left from an earlier
  step is added to.

The buffer's layout (`fsdp_layout`): an all-reduce sums each element in an order that depends on
its position in the buffer. Beyond two ranks the gradients are laid out as FSDP2 lays out a
reduce-scatter input, where that position is the one a reduce-scatter would give the element, so
on gloo the averages are bitwise those of FSDP2 (tested at 4 ranks against plain FSDP2); they are
then copied back to parameter order. The padding costs what FSDP2's reduce-scatter buffer costs;
where it would add more than an eighth of the bytes (and over 16 MiB: small-rank adapters on many
ranks) the gradients go flat in parameter order instead. With two ranks or fewer in the shard dim
each element's sum has at most two terms, equal in either order, so the flat layout is bitwise
FSDP2's too and is always used: no padding is sent and the ``.grad`` tensors are views of the
buffer, with no copy back (as DDP's ``gradient_as_bucket_view``). Under HSDP the replicas'
all-reduce runs over the whole buffer, where FSDP2's runs over one shard, so beyond two replicas
its order of summation may differ from FSDP2's (the same averages up to rounding; HSDP is tested
bitwise at 2 x 2).
The division follows FSDP2 2.13 (``ReduceOp.AVG`` for fp32/bf16; pre/post-division by powers of
two with a sum for other dtypes).

Costs: every rank holds the whole trainable parameters, their gradients and optimizer state, plus
the ``param_dtype`` copies for the step; one all-reduce of the trainable gradients in
``reduce_dtype`` per step (twice the bytes of a reduce-scatter), and none of the overlap of
per-unit reduction with backward. Right for adapters, wrong for full fine-tuning.

A parameter without a gradient in a step is left out of that step's reduction, as FSDP2 leaves it
out of its reduce-scatter; every rank must then agree on which parameters have one (data-dependent
routing that skips an adapter on some ranks only would desynchronize the all-reduce's layout).

Every rank must hold the same values: `shard_with_freezing` broadcasts rank 0's real values, and
`fsdp_frozen.checkpoint.load_pretrained` initialises missing tensors identically on every rank. A
model built on meta and initialised by other means must seed every rank alike.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy

from . import _torch_compat as compat
from .errors import DISABLED_ADAPTER_HINT, FreezingChangedError


def _divide(reduce_dtype: torch.dtype, size: int) -> tuple[float | None, float | None, Any]:
    """(pre-divide, post-divide, op) of a reduction over `size` ranks in all (shard x replicate), as
    FSDP2 2.13 chooses them (``_get_gradient_divide_factors``): AVG in each collective where the dtype
    cannot overflow, else sums between two divisions by about sqrt(size), before the first collective
    and after the last."""
    if size == 1:
        return None, None, dist.ReduceOp.SUM
    if reduce_dtype in (torch.float32, torch.bfloat16):
        return None, None, dist.ReduceOp.AVG
    pre = 1
    while size % pre == 0 and size / pre > pre:
        pre *= 2
    return float(pre), size / pre, dist.ReduceOp.SUM


#: How much padding FSDP2's layout may add before the flat one is used instead: an eighth of the
#: gradient bytes, or 16 MiB, whichever is more (see `fsdp_layout`).
PADDING_SHARE, PADDING_BYTES = 1 / 8, 16 * 2**20


def padded_numels(shapes: list[torch.Size], world: int) -> list[int]:
    """Elements of each gradient with dim 0 padded to a multiple of `world` (FSDP2's sharding)."""
    return [-(-s[0] // world) * world * (math.prod(s) // max(s[0], 1)) for s in shapes]


def fsdp_layout(numels: list[int], padded: list[int], itemsize: int, world: int) -> bool:
    """Whether the all-reduce uses FSDP2's reduce-scatter layout (bitwise FSDP2's averages) rather
    than the gradients flat in parameter order (the same averages up to the order of summation).

    With at most two ranks (`world`: the shard dim's) every element is a sum of at most two values,
    equal in either order (a + b == b + a in floating point), so the flat layout is bitwise FSDP2's
    too and is always used: it sends no padding, and the averaged gradients are views of the
    all-reduce's buffer (no copy back). Beyond two ranks, FSDP2 pads dim 0 of every gradient to a
    multiple of the shard count, so a LoRA ``lora_A`` with r = 8 rows goes out as 64 rows at 64
    ranks. The padded layout is kept while the padding adds at most `PADDING_SHARE` of the bytes or
    `PADDING_BYTES`; beyond, the flat layout, which sends exactly the gradients."""
    if world <= 2:
        return False
    extra = (sum(padded) - sum(numels)) * itemsize
    return extra <= max(sum(numels) * itemsize * PADDING_SHARE, PADDING_BYTES)


class ReplicatedTrainables:
    """The trainable parameters of a model sharded with ``trainable_grouping="replicate"``.

    Attributes:
        fqns: canonical names, in the plan's order.
        params: the parameters (what the optimizer steps), whole on every rank.
    """

    def __init__(self, model: nn.Module, fqns: tuple[str, ...], paths: list[str], mesh: DeviceMesh,
                 mp_policy: MixedPrecisionPolicy, device: torch.device,
                 frozen_paths: tuple[str, ...] = ()) -> None:
        self.fqns = fqns
        self.params: list[nn.Parameter] = [model.get_parameter(p) for p in paths]
        #: frozen parameters kept whole outside FSDP beside them ([Note: whole frozen groups] in plan.py):
        #: broadcast here (apply's freezing check reads their flags), never swapped or reduced
        self.frozen = [model.get_parameter(p) for p in frozen_paths]
        by_id: dict[int, list[tuple[dict, str]]] = {id(p): [] for p in self.params}
        for path, param in model.named_parameters(remove_duplicate=False):
            if id(param) in by_id:
                parent, _, leaf = path.rpartition(".")
                by_id[id(param)].append((model.get_submodule(parent)._parameters, leaf))
        self.slots = [by_id[id(p)] for p in self.params]
        self.param_dtype = mp_policy.param_dtype
        self.reduce_dtype = mp_policy.reduce_dtype
        self.shard_group = mesh.get_group(mesh.ndim - 1)
        self.replicate_group = mesh.get_group(0) if mesh.ndim == 2 else None
        # gloo's ReduceOp.AVG is recent; a sum then a division is bitwise the same on gloo (checked on
        # 2.13 at 2 and 4 ranks, fp32 and bf16) and works on every torch this package supports
        self.sum_then_divide = dist.get_backend(self.shard_group) == "gloo"
        self.requires_gradient_sync = True
        self.compute: list[nn.Parameter | None] = [None] * len(self.params)
        #: what `_prepare_compute` built for: (id, data_ptr, shape) of each parameter
        self._key: list[tuple[int, int, torch.Size]] | None = None
        self.copy_dsts: list[nn.Parameter] = []  #: the param_dtype copies the pre-forward refreshes...
        self.copy_srcs: list[nn.Parameter] = []  #: ...from these parameters
        self.accumulated: list[torch.Tensor | None] = [None] * len(self.params)
        self.swapped = False
        self.queued = False
        with torch.no_grad():
            for p in self.params:  # the frozen ones: apply._move_unmanaged
                if not p.is_meta and p.device != device:
                    p.data = p.data.to(device)
            self.broadcast()
        # the forward hook that tells when backward starts is apply._track_backward's (one per step)
        self.hooks = [model.register_forward_pre_hook(self._pre_forward, prepend=True)]
        self._patch_gradient_sync(model)

    # --- setup -----------------------------------------------------------------------------------
    def broadcast(self) -> None:
        """Give every rank the values of the mesh's first rank (one flat broadcast per dtype and mesh
        dim), the whole frozen parameters too. Meta parameters are skipped (`load_pretrained` fills
        them alike on every rank), and so are NF4 ones (quantized alike from equal values)."""
        real = [p for p in (*self.params, *self.frozen) if not p.is_meta and type(p.data) is torch.Tensor]
        groups = [g for g in (self.shard_group, self.replicate_group) if g is not None and g.size() > 1]
        for dtype in sorted({p.dtype for p in real}, key=str):
            same = [p for p in real if p.dtype == dtype]
            flat = torch.cat([p.detach().reshape(-1) for p in same])
            for group in groups:
                dist.broadcast(flat, src=dist.get_global_rank(group, 0), group=group)
            for p, part in zip(same, flat.split([p.numel() for p in same])):
                p.detach().copy_(part.view(p.shape))

    def _patch_gradient_sync(self, model: nn.Module) -> None:
        """``model.set_requires_gradient_sync`` also switches this group's reduction (instance
        attribute, removed by `remove`)."""
        original = model.set_requires_gradient_sync  # type: ignore[attr-defined]

        def set_requires_gradient_sync(requires_gradient_sync: bool, *, recurse: bool = True) -> None:
            original(requires_gradient_sync, recurse=recurse)
            self.requires_gradient_sync = requires_gradient_sync

        set_requires_gradient_sync.__doc__ = (f"{original.__doc__ or ''}\n\nfsdp_frozen: also switches the "
                                              f"all-reduce of the replicated trainable parameters.")
        object.__setattr__(model, "set_requires_gradient_sync", set_requires_gradient_sync)
        self._patched = model

    def remove(self) -> None:
        """Take off the hooks and the setter (`refreeze`); the parameters stay registered."""
        self.swap_back()
        for handle in self.hooks:
            handle.remove()
        self._patched.__dict__.pop("set_requires_gradient_sync", None)

    # --- forward ---------------------------------------------------------------------------------
    def _check_freezing(self) -> None:
        """FreezingChangedError if a trainable requires_grad was flipped since `shard_with_freezing` (the
        frozen parameters kept whole beside them: apply's freezing check)."""
        for fqn, p in zip(self.fqns, self.params):
            if not p.requires_grad:
                raise FreezingChangedError(
                    f"requires_grad of parameter {fqn!r} changed from True to False after "
                    f"shard_with_freezing (trainable_grouping='replicate'); restore it, or use "
                    f"fsdp_frozen.refreeze to freeze it.{DISABLED_ADAPTER_HINT}")

    def _prepare_compute(self) -> None:
        """The tensors forward computes with: a ``param_dtype`` copy per parameter (refreshed from
        the parameters with one foreach copy per step, `_pre_forward`), or an alias of the parameter
        when no cast is needed. Rebuilt whenever a parameter or its storage changed."""
        self.copy_dsts, self.copy_srcs = [], []
        for i, p in enumerate(self.params):
            cast = self.param_dtype is not None and p.is_floating_point() and p.dtype != self.param_dtype
            c = self.compute[i]
            if cast:
                if c is None or c.shape != p.shape or c.device != p.device or c.dtype != self.param_dtype:
                    c = self.compute[i] = nn.Parameter(torch.empty_like(p, dtype=self.param_dtype))
                self.copy_dsts.append(c)
                self.copy_srcs.append(p)
            elif c is None or c.data_ptr() != p.data_ptr() or c.shape != p.shape:
                self.compute[i] = nn.Parameter(p.detach())  # shares p's storage: nothing to refresh

    def _pre_forward(self, module: nn.Module, args: Any) -> None:
        if self.swapped:  # a second forward before backward: the copies are current
            return
        # re-read the parameters from their first slot: materialize_meta, refreeze or a user may
        # have registered new objects (or new storage) since the last step; the steady state only
        # compares this key
        self.params = [slots[0][0][slots[0][1]] for slots in self.slots]
        key = [(id(p), p.data_ptr(), p.shape) for p in self.params]
        if key != self._key:
            self._prepare_compute()
            self._key = key
        if torch.is_grad_enabled() and not all(p.requires_grad for p in self.params):
            self._check_freezing()  # not under no_grad: [Note: no-grad forwards] in apply.py
        if self.copy_dsts:
            with torch.no_grad():
                torch._foreach_copy_(self.copy_dsts, self.copy_srcs)
        self._fill_slots(self.compute)
        self.swapped = True

    def _fill_slots(self, tensors: list) -> None:
        """Register `tensors` (one per parameter) in every slot of their parameter, tied ones too."""
        for tensor, slots in zip(tensors, self.slots):
            for params, name in slots:
                params[name] = tensor

    def swap_back(self) -> None:
        """Put the parameters back in their slots (after backward, or after a forward no backward follows)."""
        if not self.swapped:
            return
        self._fill_slots(self.params)
        self.swapped = False

    # --- backward --------------------------------------------------------------------------------
    def backward_started(self) -> None:
        """Called once backward has started (from `apply._track_backward`): queue the reduction."""
        if not self.queued:
            self.queued = True
            compat.queue_backward_callback(self._post_backward)

    def _post_backward(self) -> None:
        self.queued = False
        with torch.no_grad():
            self.reduce()
        self.swap_back()

    def reduce(self) -> None:
        """Average the compute copies' gradients into the parameters' ``.grad`` (see the module
        note); under ``set_requires_gradient_sync(False)`` only accumulate them."""
        indices, grads = [], []
        for i, c in enumerate(self.compute):
            grad = None if c is None else c.grad
            acc = self.accumulated[i]
            if acc is not None and grad is not None:  # FSDP2's accumulate_unsharded_grad_if_needed
                acc += grad
                c.grad = grad = None  # type: ignore[union-attr]
            if not self.requires_gradient_sync:
                if grad is not None and self.reduce_dtype is not None and grad.dtype != self.reduce_dtype:
                    self.accumulated[i] = grad.to(self.reduce_dtype)
                    c.grad = None  # type: ignore[union-attr]
                continue
            if acc is not None:
                indices.append(i)
                grads.append(acc)
                self.accumulated[i] = None
            elif grad is not None:
                indices.append(i)
                grads.append(grad)
                c.grad = None  # type: ignore[union-attr]
        if not grads:
            return
        reduce_dtype = self.reduce_dtype or grads[0].dtype
        world = self.shard_group.size()
        numels = [g.numel() for g in grads]
        padded = padded_numels([g.shape for g in grads], world)
        chunks = world if fsdp_layout(numels, padded, reduce_dtype.itemsize, world) else 1
        if chunks == 1:
            padded = numels
        # one op casts every gradient to reduce_dtype into its place: FSDP2's reduce-scatter input
        # layout (`chunks` = world), or flat in parameter order (1). No 0-d ones: the plan refuses scalars
        buffer = torch.empty((chunks, sum(padded) // chunks), dtype=reduce_dtype, device=grads[0].device)
        compat.chunk_cat(grads, chunks, buffer)
        del grads  # the compute copies' gradients are free before the all-reduce
        params = [self.params[i] for i in indices]  # the gradients' shapes
        groups = [g for g in (self.shard_group, self.replicate_group) if g is not None and g.size() > 1]
        pre, post, op = _divide(reduce_dtype, math.prod(g.size() for g in groups))
        if pre is not None:
            buffer.div_(pre)
        for group in groups:  # AVG divides per group, as FSDP2's reduce-scatter and all-reduce each do
            if op == dist.ReduceOp.AVG and self.sum_then_divide:
                dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
                buffer.div_(group.size())
            else:
                dist.all_reduce(buffer, op=op, group=group)
        if post is not None:
            buffer.div_(post)
        flat = buffer.view(-1)
        if chunks > 1:  # back to each parameter's order: one copy
            flat = torch.empty_like(flat)
            torch.split_with_sizes_copy(buffer, [n // chunks for n in padded], dim=1,
                                        out=[part.view(chunks, -1) for part in flat.split(padded)])
        if padded == numels:  # views of the flat buffer, made in one call
            reduced = compat.unflatten_dense(flat, params)
        else:
            reduced = [part[:p.numel()].view(p.shape) for part, p in zip(flat.split(padded), params)]
        for p, grad in zip(params, reduced):
            if grad.dtype != p.dtype:
                grad = grad.to(p.dtype)
            if p.grad is None:
                p.grad = grad
            else:
                p.grad += grad
            for hook in (getattr(p, "_post_accumulate_grad_hooks", None) or {}).values():
                hook(p)
