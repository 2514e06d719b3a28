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
    installs `_PeftDequantize` and `install_nf4_linear`."""
    from torchao.quantization import to_nf4 as _to_nf4

    out = _to_nf4(tensor, block_size, scaler_block_size)
    _PeftDequantize.install(type(out))
    install_nf4_linear(type(out))  # nf4_compute's linear (issue 25, 1): bitwise torchao's, cheaper
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
            return self.static(*args) if args else nf4_dequantize_fast(obj)

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
    reading or quantizing the whole weight. Collective over the shard dimension's process group. A
    plain NF4Tensor `target` (kept out of FSDP at shard size 1) takes the whole weight: no collective.

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
    flat = rows.to(device=local.device, dtype=local.dtype).contiguous().flatten()
    if flat.numel() != local.numel() or flat.numel() % (block * scaler_block):
        raise ValueError(f"nf4_quantize_chunk_: {tuple(rows.shape)} rows for an NF4 shard of shape {tuple(local.shape)} "
                         f"(blocks of {block} x {scaler_block} elements)")
    absmax = flat.new_empty(flat.numel() // block)  # torchao's get_block_absmax, a chunk of blocks at a time
    for start, part in _chunks(flat, block):
        absmax[start // block:(start + part.numel()) // block] = part.view(-1, block).abs().max(dim=1).values
    if isinstance(target, DTensor):
        (dim,) = [i for i, p in enumerate(target.placements) if p.is_shard()]
        group = target.device_mesh.get_group(dim)
        gathered = absmax.new_empty(absmax.numel() * group.size())
        all_gather_single(gathered, absmax, group=group)
    else:  # the whole weight
        gathered = absmax
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
        quantized_data=_norm_float_codes(nf4_class, flat, block, table),
    )
    if set(inner) != set(names):  # a torchao whose NF4Tensor holds other inner tensors than 0.18's
        raise NotImplementedError(f"nf4_quantize_chunk_: NF4Tensor's inner tensors are {sorted(names)}, "
                                  f"checked on torchao 0.18's {sorted(inner)}")
    local.copy_(nf4_class.__tensor_unflatten__(inner, ctx, local.size(), local.stride()))


#: Elements torchao's 4-bit encoding takes at a time in `_norm_float_codes` (its temporaries are ~4
#: bytes per element of a bf16 weight: whole, 2 GiB at Llama-3-70B's head on one rank)
QUANTIZE_CHUNK = 1 << 24


def _norm_float_codes(nf4_class: type, flat: torch.Tensor, block: int, table: torch.Tensor) -> torch.Tensor:
    """torchao 0.18's ``convert_to_norm_float_weight`` of `flat` (whole blocks of `block` elements), run
    on `QUANTIZE_CHUNK` elements at a time: every step of it is local to a block (its absmax, the
    division by it, the nearest code) or to a pair of elements (the packing), so the chunks' codes are
    the whole's, bitwise, with one chunk's temporaries alive."""
    out = torch.empty(flat.numel() // 2, dtype=torch.uint8, device=flat.device)
    for start, part in _chunks(flat, block):
        out[start // 2:(start + part.numel()) // 2] = nf4_class.convert_to_norm_float_weight(
            part, part.numel() // block, block, table)
    return out


def _chunks(flat: torch.Tensor, block: int):
    """(offset, view) of `flat` in pieces of about `QUANTIZE_CHUNK` elements: whole blocks, an even count."""
    step = max(2 * block, QUANTIZE_CHUNK // (2 * block) * (2 * block))
    for start in range(0, flat.numel(), step):
        yield start, flat[start:start + step]


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


# ----------------------------------------------------------------------- fast NF4 compute (issue 25, 1)
# [Note: fast NF4 dequantization]
# torchao 0.18's ``get_original_weight`` splits every packed byte into two int64 codes, indexes the
# 16-entry table twice, multiplies each half by the block scalers and interleaves the halves with a
# stack: ~6 passes over the weight and two int64 index tensors of numel/2 each. Every element it
# returns is ``nf4[code] * scaler[block]``: one product of two values of the tensor's dtype, rounded
# once to that dtype (CPU and CUDA compute a bf16/fp16 product in fp32 and round it, and the product
# of two bf16 values is exact in fp32). `nf4_dequantize_fast` returns the same products:
#   * one gather per packed *pair* of bytes (4 elements) from a 65,536-entry table whose entry k holds
#     the 4 table values of the two bytes whose uint16 view is k, bit-cast to one 8-byte integer
#     (bf16/fp16; a row of two in fp32), so the gather moves whole rows and needs no interleave;
#   * the block scalers as torchao computes them (`nf4_scalers`: the same ops on the same tensors);
#   * one in-place multiply of the gathered values by their block's scaler (broadcast per block).
# Off the CPU, and where the uint16 view is not possible (an odd byte count, an odd storage offset, a
# big-endian host, torch.compile tracing), it uses a 256-entry table of byte pairs (`_nf4_pair_table`):
# one gather per byte instead. (The quad table is shared by value on the CPU, where reading the 16
# values is free; on a GPU that read would be a host sync, and a 512 KiB table per weight too much:
# there the pair table, 1 KiB per weight, whose speed against the quad one is not measured yet.)
# Both are exact table reads, so the result is bitwise ``get_original_weight()``
# (tests/test_nf4_compute.py: fp32 and bf16, several shapes and block sizes, FSDP shard chunks).
# No host syncs: tables are built on the tensor's device from its own ``nf4`` inner tensor, and cached
# per ``nf4`` tensor object (FSDP reuses the sharded parameter's across all-gathers) and its version
# (`_cached_table`).

#: torchao NF4 versions this fast path was checked on (its inner tensors, their meaning, LinearNF4)
_FAST_NF4_CHECKED = ((0, 18),)


def torchao_version() -> tuple[int, int]:
    import torchao

    return tuple(int(p) for p in torchao.__version__.split("+")[0].split(".")[:2])  # type: ignore[return-value]


def nf4_fast_supported() -> bool:
    """True if the installed torchao is one `nf4_dequantize_fast` and the NF4 linear were checked on."""
    try:
        return torchao_version() in _FAST_NF4_CHECKED
    except Exception:  # noqa: BLE001 - an unparsable version: not checked
        return False


def nf4_scalers(t: torch.Tensor) -> torch.Tensor:
    """The per-block scalers of the NF4Tensor `t` (one per ``block_size`` elements), in its dtype:
    torchao 0.18's ``dequantize_scalers``, the same ops on the same inner tensors (so bitwise)."""
    qs, factor, sbs = t.quantized_scalers, t.quantization_factor, t.scaler_block_size
    n_scaler_blocks = qs.numel() // sbs
    return (qs.view(n_scaler_blocks, sbs) / factor.unsqueeze(-1)).flatten().to(t.dtype) + t.scaler_mean


def _nf4_pair_table(nf4: torch.Tensor) -> torch.Tensor:
    """(256, 2): row b holds the table values of byte b's high and low nibble (torchao packs element
    2i in the high nibble). Built on `nf4`'s device, no host sync."""
    codes = torch.arange(256, device=nf4.device)
    return torch.stack([nf4[codes >> 4], nf4[codes & 15]], dim=1)


def _nf4_quad_table(nf4: torch.Tensor) -> torch.Tensor:
    """(65536, 4): row k holds the 4 table values of the two bytes whose int16 view (this host's
    byte order, little-endian) is the index k (its unsigned value: k = byte0 + 256 * byte1)."""
    pairs = _nf4_pair_table(nf4)
    low = pairs.view(1, 256, 2).expand(256, 256, 2)  # byte0 = k % 256 (the first element pair)
    high = pairs.view(256, 1, 2).expand(256, 256, 2)  # byte1 = k // 256 (the second)
    return torch.cat([low, high], dim=2).reshape(65536, 4)


#: kind -> WeakIdKeyDictionary(nf4 tensor -> (its version, its table)); "shared" -> the CPU tables by value
_TABLES: dict = {}


def _cached_table(nf4: torch.Tensor, kind: str) -> torch.Tensor:
    """The `kind` table ("pair" or "quad") of the lookup tensor `nf4`, cached per tensor object (held
    weakly) and its version counter (an in-place copy into it, e.g. a checkpoint load, rebuilds it).

    Every NF4Tensor holds its own ``nf4`` (16 values); a CPU table is shared by all of equal values
    (reading them costs no device sync there), so a model holds one quad table (512 KiB in bf16), not
    one per weight. Elsewhere tables are per tensor object, built without reading values on the host:
    only pair tables (1 KiB in bf16) are used there (`nf4_dequantize_fast`)."""
    from torch.utils.weak import WeakIdKeyDictionary

    cache = _TABLES.get(kind)
    if cache is None:
        cache = _TABLES[kind] = WeakIdKeyDictionary()
    entry = cache.get(nf4)
    if entry is None or entry[0] != nf4._version:
        build = _nf4_quad_table if kind == "quad" else _nf4_pair_table
        values = nf4.detach()
        if values.device.type == "cpu":
            shared = _TABLES.setdefault("shared", {})
            key = (kind, values.dtype, values.contiguous().view(torch.uint8).numpy().tobytes())
            table = shared.get(key)
            if table is None:
                table = shared[key] = build(values.clone())
        else:
            table = build(values)
        entry = cache[nf4] = (nf4._version, table)
    return entry[1]


#: the integer dtype a row of the pair table (2 values) is bit-cast to, per element size
_PAIR_WIDE = {2: torch.int32, 4: torch.int64}


def nf4_traced(t: torch.Tensor) -> bool:
    """True while the NF4Tensor `t` is traced rather than run: by dynamo (``torch.compiler.is_compiling()``)
    or on fake or functional tensors, whose inner tensors are not of type ``torch.Tensor``. The second
    case is dynamo's fake-tensor propagation of ``F.linear`` and AOTAutograd's tracing: on torch 2.11 and
    2.12 ``is_compiling()`` is False there (True on 2.13), and the eager path's host read of the lookup
    table (``.numpy()``) failed every compiled NF4 linear whose weight dynamo sees as a parameter (a
    ``frozen_reshard="never"`` unit, found on real 2.12; tests/test_nf4_compute.py)."""
    return torch.compiler.is_compiling() or type(t.quantized_data) is not torch.Tensor


def nf4_dequantize_fast(t: torch.Tensor) -> torch.Tensor:
    """Bitwise ``t.get_original_weight()`` (torchao 0.18) of the NF4Tensor `t`, faster:
    [Note: fast NF4 dequantization]. A new contiguous tensor of `t`'s shape and dtype."""
    import sys

    data, dtype, block = t.quantized_data, t.dtype, t.block_size
    scalers = nf4_scalers(t).unsqueeze(-1)  # (blocks, 1)
    if nf4_traced(t):  # traceable, no bit-casts or caches: a gather per byte, the multiply
        values = _nf4_pair_table(t.nf4)[data.long()]  # (numel/2, 2)
        return (values.view(-1, block) * scalers).view(t.shape)
    size = dtype.itemsize
    if size in (2, 4) and data.device.type == "cpu" and sys.byteorder == "little" and data.is_contiguous() \
            and data.numel() % 2 == 0 and data.storage_offset() % 2 == 0:
        # a row of the quad table is 8 bytes (bf16/fp16: one int64) or 16 (fp32: two)
        table = _cached_table(t.nf4, "quad").view(torch.int64)
        # k = byte0 + 256 * byte1 (little-endian)
        values = _gather(table.view(-1) if size == 2 else table, data.view(torch.uint16)).view(dtype)
    elif size in _PAIR_WIDE:
        table = _cached_table(t.nf4, "pair").view(_PAIR_WIDE[size]).view(-1)
        values = _gather(table, data).view(dtype)
    else:  # other element sizes (fp64): rows of 2 values
        values = _gather(_cached_table(t.nf4, "pair"), data)
    return values.view(-1, block).mul_(scalers).view(t.shape)


#: Packed entries whose int32 indices one gather takes at a time (64 MiB of indices): a whole weight's
#: would be 2 bytes per element on its own (Llama-3.1-8B's NF4 head: 1 GiB beside its 1 GiB of bf16 values)
GATHER_CHUNK = 1 << 24


def _gather(table: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``table[codes]`` (rows of `table` by the 1-D integer `codes`, uint8 or uint16), in chunks of
    `GATHER_CHUNK` codes, each converted to the int32 indices ``index_select`` takes just before its
    gather: the same rows, with at most one chunk's indices alive."""
    out = table.new_empty((codes.numel(), *table.shape[1:]))
    for start in range(0, codes.numel(), GATHER_CHUNK):
        part = codes[start:start + GATHER_CHUNK]
        torch.index_select(table, 0, part.to(torch.int32), out=out[start:start + part.numel()])
    return out


def _nf4_module():
    from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor

    return nf4_tensor


_TORCHAO_LINEAR: dict = {}


def torchao_nf4_linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """torchao 0.18's own ``F.linear`` of an NF4Tensor weight (its ``LinearNF4``, then the bias added)."""
    handler = _TORCHAO_LINEAR.get("handler")
    if handler is None:
        handler = _nf4_module().NF4_TORCH_FUNCTIONS[torch.nn.functional.linear]
    return handler(input, weight) if bias is None else handler(input, weight, bias)


def _nf4_linear_handler(*args, **kwargs):
    """What torchao's NF4Tensor.__torch_function__ runs for ``F.linear`` once installed: `nf4_linear`
    for a plain input and an NF4Tensor weight (`nf4_compute`'s mode decides), torchao's handler else."""
    from . import nf4_compute

    nf4_class = _TORCHAO_LINEAR["class"]
    if len(args) >= 2 and type(args[1]) is nf4_class and type(args[0]) is not nf4_class \
            and args[1].dim() == 2 and args[1].is_contiguous() and set(kwargs) <= {"bias"}:
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        return nf4_compute.nf4_linear(args[0], args[1], bias)
    return _TORCHAO_LINEAR["handler"](*args, **kwargs)


def install_nf4_linear(nf4_class: type) -> None:
    """Make torchao's NF4 ``F.linear`` handler (``NF4_TORCH_FUNCTIONS[F.linear]``, torchao 0.18) run
    `_nf4_linear_handler`, keeping torchao's for its mode and for what it does not take. Idempotent;
    nothing is installed on a torchao this was not checked on (`nf4_fast_supported`)."""
    if "handler" in _TORCHAO_LINEAR or not nf4_fast_supported():
        return
    module = _nf4_module()
    table = getattr(module, "NF4_TORCH_FUNCTIONS", None)
    linear = torch.nn.functional.linear
    if table is None or linear not in table or module.NF4Tensor is not nf4_class:
        return
    _TORCHAO_LINEAR.update(handler=table[linear], **{"class": nf4_class})
    table[linear] = _nf4_linear_handler
