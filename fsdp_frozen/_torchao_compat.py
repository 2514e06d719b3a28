"""The only module that touches torchao's NF4Tensor beyond its public ``to_nf4`` (the torchao twin
of `_torch_compat`).

Checked on torchao 0.18.0 (torch 2.13, CPU), the range ``pyproject.toml`` allows (``>=0.18,<0.19``:
its lower bound is what CI installs): ``NF4Tensor.__tensor_flatten__`` names the inner
tensors ``quantized_data``, ``quantized_scalers``, ``quantization_factor`` (packed, split in equal
dim-0 chunks by FSDP), ``scaler_mean`` and ``nf4`` (replicated in every chunk).
"""

from __future__ import annotations

import functools
import logging
import math

import torch
from torch.distributed.tensor import DTensor

class _QuietSoFailures(logging.Filter):
    """Drops torchao's "Failed to load .../_C*.so: ..." warnings, and only those: a CPU build of
    torch cannot load torchao's CUDA extensions, which NF4 does not use (torchao 0.18 ``__init__``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Failed to load ") and ".so" in message)


# Installed when fsdp_frozen is imported, before anything (PEFT, transformers, us) imports torchao.
logging.getLogger("torchao").addFilter(_QuietSoFailures())


def to_nf4(tensor: torch.Tensor, block_size: int, scaler_block_size: int) -> torch.Tensor:
    """torchao's public ``to_nf4`` (imported on first use: torchao is only needed for NF4). Every
    NF4Tensor this package makes comes from here (`nf4_on_meta` too), so the first call also
    installs `_PeftDequantize`."""
    from torchao.quantization import to_nf4 as _to_nf4

    out = _to_nf4(tensor, block_size, scaler_block_size)
    _PeftDequantize.install(type(out))
    return out


class _PeftDequantize:
    """[Note: QDoRA] PEFT's DoRA forward needs the dense base weight and asks a torchao tensor for it
    with ``weight.dequantize()`` (``peft.utils.integrations.dequantize_module_weight``, PEFT 0.21).
    torchao 0.18's ``NF4Tensor.dequantize(value, nf4)`` is a static helper of another meaning (a
    lookup of 4-bit codes, called with two arguments by torchao itself), so QDoRA on NF4 storage
    failed there with a TypeError. This descriptor keeps the two-argument call as it was and gives the
    no-argument call on an instance what PEFT means: the dense values (`nf4_dequantize`, exact, in the
    tensor's dtype; PEFT casts to the compute dtype). Installed on the class once, by `to_nf4`."""

    def __init__(self, static) -> None:
        self.static = static

    def __get__(self, obj, cls=None):
        if obj is None:
            return self.static

        def dequantize(*args):
            return self.static(*args) if args else nf4_dequantize(obj)

        return dequantize

    @classmethod
    def install(cls, nf4_class: type) -> None:
        if not isinstance(nf4_class.__dict__.get("dequantize"), cls):
            nf4_class.dequantize = cls(nf4_class.__dict__["dequantize"].__func__)


#: The packed inner tensors of an NF4Tensor, which FSDP (torchao's split) cuts into equal dim-0 chunks;
#: the others (``scaler_mean``, the ``nf4`` lookup table) are replicated in every chunk (torchao 0.18).
NF4_PACKED = ("quantized_data", "quantized_scalers", "quantization_factor")


def inner_names(t: torch.Tensor) -> list[str]:
    return list(t.__tensor_flatten__()[0])


def nf4_is_meta(t: torch.Tensor) -> bool:
    """True if any inner tensor of the NF4Tensor `t` is on the meta device."""
    return any(getattr(t, n).is_meta for n in inner_names(t))


def nf4_materialize_(t: torch.Tensor, device: torch.device) -> None:
    """Allocate the inner tensors ``to_empty`` left on meta (the replicated ones: torchao's
    ``empty_like`` allocates only the packed tensors). Their values are set by the next copy."""
    for name in inner_names(t):
        inner = getattr(t, name)
        if inner.is_meta:
            setattr(t, name, torch.empty_like(inner, device=device))


def nf4_on_meta(weight: torch.Tensor, block_size: int, scaler_block_size: int,
                dtype: torch.dtype | None = None) -> torch.Tensor:
    """The NF4Tensor ``to_nf4`` would give for the meta tensor `weight` (cast to `dtype` if given), without running torchao's
    quantization on meta (it loops over blocks: ~25 s for a 70B model): `nf4_empty` on the meta device
    (packed data numel/2 uint8, one int8 scaler per block, one factor per scaler block)."""
    return nf4_empty(tuple(weight.shape), dtype or weight.dtype, block_size, scaler_block_size, device="meta")


@functools.lru_cache(maxsize=None)
def _nf4_probe(dtype: torch.dtype, block_size: int, scaler_block_size: int) -> torch.Tensor:
    """torchao's quantization of the smallest zero weight it takes at these block sizes (one scaler
    block: ``block_size * scaler_block_size`` elements), on the CPU: `nf4_empty`'s source of inner
    tensor names, dtypes and context, and of the replicated inner tensors' values. Never mutated."""
    return to_nf4(torch.zeros(block_size * scaler_block_size, dtype=dtype), block_size, scaler_block_size)


def nf4_empty(shape: tuple[int, ...], dtype: torch.dtype, block_size: int, scaler_block_size: int,
              device: torch.device | str | None = None, *, n_blocks: int | None = None) -> torch.Tensor:
    """An NF4Tensor with the layout ``to_nf4`` gives a weight of `shape` and `dtype`, built without
    quantizing anything of that size (torchao's quantization loops over blocks: minutes per 8B model):
    a target for a copy that overwrites every inner tensor, such as DCP's read of a saved NF4 shard.

    The packed inner tensors are allocated, not initialized (``torch.empty``: ``numel / 2`` uint8 codes,
    one int8 scaler per block, one factor per scaler block). The replicated ones are copies of what
    ``to_nf4`` gives a zero weight at these block sizes and dtype (the ``nf4`` lookup table, the same
    for every weight; ``scaler_mean`` 0): the values the placeholders quantized from a zero weight had.

    Args:
        n_blocks: the context's block count, where it is not the shape's: torchao's split (FSDP's dim-0
            chunks of an NF4 weight) keeps the whole weight's in every chunk, and torchao copies the
            inner tensors of an NF4Tensor only into one of equal block sizes and block count.
    """
    numel = math.prod(shape)
    if numel % (block_size * scaler_block_size):
        raise ValueError(
            f"nf4_empty: a weight of shape {tuple(shape)} ({numel} elements) does not split into whole scaler "
            f"blocks of block_size={block_size} x scaler_block_size={scaler_block_size} elements (torchao's NF4 needs it)"
        )
    device = torch.device(device if device is not None else "cpu")
    probe = _nf4_probe(dtype, block_size, scaler_block_size)
    names, ctx = probe.__tensor_flatten__()
    sizes = {"quantized_data": numel // 2, "quantized_scalers": numel // block_size,
             "quantization_factor": numel // block_size // scaler_block_size}
    inner = {}
    for name in names:
        like = getattr(probe, name)
        if name in NF4_PACKED:
            inner[name] = torch.empty(sizes[name], dtype=like.dtype, device=device)
        else:  # replicated: the lookup table and scaler_mean, copied from the probe
            inner[name] = like.to(device=device, copy=True)
    stride = torch.empty(shape, device="meta").stride()
    meta = ctx["tensor_meta"]
    ctx = dict(ctx, n_blocks=numel // block_size if n_blocks is None else n_blocks,
               tensor_meta=type(meta)(torch.Size(shape), stride, 0, dtype, device, False))
    return type(probe).__tensor_unflatten__(inner, ctx, torch.Size(shape), stride)


def nf4_copy_chunk_(target: torch.Tensor, whole: torch.Tensor) -> None:
    """Copy this rank's dim-0 chunk of the whole weight `whole` (as ``fully_shard`` chunks an NF4
    weight) into `target` (an NF4Tensor or a DTensor of one). A plain `whole` is first quantized with
    torchao at `target`'s block sizes, on `target`'s device: bitwise the storage sharding a model that
    holds `whole` there would give. An NF4 `whole` must have `target`'s block sizes."""
    from ._torch_compat import local_tensor

    local = local_tensor(target)
    if type(whole).__name__ == "NF4Tensor":
        quantized = whole
    else:
        quantized = to_nf4(whole.to(device=local.device, dtype=local.dtype).contiguous(), local.block_size,
                           local.scaler_block_size)
    if isinstance(target, DTensor):
        (dim,) = [i for i, p in enumerate(target.placements) if p.is_shard()]
        chunks = torch.chunk(quantized, target.device_mesh.size(dim), dim=0)
        quantized = chunks[target.device_mesh.get_coordinate()[dim]]
    local.copy_(quantized)  # every inner tensor (same shape and block sizes)


def nf4_quantize_chunk_(target: torch.Tensor, rows: torch.Tensor) -> None:
    """Quantize `rows`, this rank's dim-0 chunk of a weight, into `target` (a DTensor of an NF4Tensor,
    sharded on one mesh dimension): bitwise the chunk ``to_nf4(whole)`` would give, without any rank
    reading or quantizing the whole weight. Collective over the shard dimension's process group.

    [Note: NF4 from row chunks]
    torchao 0.18's quantization is local per block except one global value: the mean of every block's
    absmax (``scaler_mean``), subtracted before the scalers are quantized. Each rank computes its
    blocks' absmax (exact), the ranks all-gather them (``numel / block_size`` values, 1/32 of the
    weight's bf16 bytes at block 64), and every rank takes the mean of the same gathered vector, as
    torchao does of the whole one; the rest (double-quantized scalers per scaler block, 4-bit codes per
    block) is torchao's own code on the chunk, whose blocks and scaler blocks are whole (`nf4_ineligible`).
    """
    from ._torch_compat import all_gather_single, local_tensor

    local = local_tensor(target)
    nf4_class = type(local)
    block, scaler_block = local.block_size, local.scaler_block_size
    (dim,) = [i for i, p in enumerate(target.placements) if p.is_shard()]
    group = target.device_mesh.get_group(dim)
    flat = rows.to(device=local.device, dtype=local.dtype).contiguous().flatten()
    if flat.numel() != local.numel() or flat.numel() % (block * scaler_block):
        raise ValueError(f"nf4_quantize_chunk_: {tuple(rows.shape)} rows for an NF4 shard of shape {tuple(local.shape)} "
                         f"(blocks of {block} x {scaler_block} elements)")
    absmax = flat.view(-1, block).abs().max(dim=1).values  # torchao's get_block_absmax
    gathered = absmax.new_empty(absmax.numel() * group.size())
    all_gather_single(gathered, absmax, group=group)
    mean = gathered.mean()
    # torchao 0.18 NF4Tensor.double_quantize_scalers, on this chunk's scaler blocks with the global mean
    scaler_blocks = (absmax - mean).view(-1, scaler_block)
    scaler_absmax = scaler_blocks.abs().max(dim=1).values.unsqueeze(-1).expand_as(scaler_blocks)
    factor = 256 / (2 * scaler_absmax)
    scalers = (scaler_blocks * factor).round().clamp(-128, 127).flatten().to(torch.int8)
    names, ctx = local.__tensor_flatten__()
    # the lookup table torchao builds for this dtype (the target's may be a placeholder, e.g. after a meta build)
    table = _nf4_probe(local.dtype, block, scaler_block).nf4.to(local.device)
    inner = dict(
        quantized_scalers=scalers, quantization_factor=factor[:, 0].contiguous(), scaler_mean=mean, nf4=table,
        quantized_data=nf4_class.convert_to_norm_float_weight(flat, flat.numel() // block, block, table),
    )
    if set(inner) != set(names):  # a torchao whose NF4Tensor holds other inner tensors than 0.18's
        raise NotImplementedError(f"nf4_quantize_chunk_: NF4Tensor's inner tensors are {sorted(names)}, "
                                  f"checked on torchao 0.18's {sorted(inner)}")
    local.copy_(nf4_class.__tensor_unflatten__(inner, ctx, local.size(), local.stride()))


def nf4_concat(parts: list[torch.Tensor]) -> torch.Tensor:
    """The NF4Tensor whose equal dim-0 chunks are `parts` (torchao's split, inverted)."""
    first = parts[0]
    names, ctx = first.__tensor_flatten__()
    inner = {n: (torch.cat([getattr(p, n) for p in parts]) if n in NF4_PACKED else getattr(first, n)) for n in names}
    size = torch.Size([sum(p.shape[0] for p in parts), *first.shape[1:]])
    stride = torch.empty(size, device="meta").stride()
    meta = ctx["tensor_meta"]
    ctx = dict(ctx, tensor_meta=type(meta)(size, stride, 0, meta.dtype, meta.device, meta.requires_grad))
    return type(first).__tensor_unflatten__(inner, ctx, size, stride)


def nf4_clone(t: torch.Tensor) -> torch.Tensor:
    """A copy of an NF4Tensor (or a DTensor of one) with its packed tensors cloned as they are.

    (NF4Tensor's own ``clone`` re-quantizes the dequantized values with default block sizes.)
    """
    local = t.to_local() if isinstance(t, DTensor) else t
    names, ctx = local.__tensor_flatten__()
    copy = type(local).__tensor_unflatten__(
        {n: getattr(local, n).clone() for n in names}, ctx, local.size(), local.stride()
    )
    if isinstance(t, DTensor):
        return DTensor.from_local(copy, t.device_mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride())
    return copy


def nf4_dequantize(t: torch.Tensor) -> torch.Tensor:
    """The dense values of an NF4Tensor (``get_original_weight``, torchao 0.18), in its dtype. On a
    shard it is exact and local: each element needs only its own block's scaler and the stored
    factors, which every shard carries."""
    return t.get_original_weight()
