"""Convert on load: weights read whole, then quantized, dequantized or resharded into the model's storage.

Three cases need a weight's whole saved value rather than DCP's usual shard-to-shard copy:

* **quantize** (plain in the checkpoint, NF4 in the model): torchao's NF4 quantization is global per
  weight (its double quantization subtracts the mean of all block scalers), so a shard cannot be
  quantized from its own rows. The whole weight is quantized with torchao's ``to_nf4`` at the model's
  block sizes and each rank keeps its dim-0 chunk, exactly as ``fully_shard`` chunks an NF4 weight:
  bitwise the storage of a model sharded from those weights.
* **reshard NF4** (same NF4 format, other shard count): torchao's NF4Tensor cannot be sliced at DCP's
  boundaries, but its saved shards are equal dim-0 chunks of every packed tensor. They are read whole,
  laid end to end into the packed weight and chunked again: bitwise, no re-quantization.
* **dequantize / re-quantize** (NF4 in the checkpoint, plain or other block sizes or dtype in the model; only
  with ``cast=True``): the whole packed weight is dequantized with torchao, then cast or re-quantized.

Reads go through DCP (a custom load plan for NF4 shards). Cost: every rank reads each such weight in
full (NF4: about 0.53 bytes per element); peak extra memory per rank is one batch of whole weights
(at most `BATCH_BYTES` of saved bytes, or one weight if larger), plus, when quantizing, one
full-precision copy of the weight being converted.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

from .. import _torchao_compat as ao
from .. import _torch_compat as compat
from .._torch_compat import local_tensor
from ..errors import CheckpointLayoutError
from ..storage import is_nf4
from .checksum import local_checksum

#: Whole saved weights read per DCP load when converting on load (bytes as saved).
BATCH_BYTES = 1 << 30


def load_converted(
    src_path: str,
    metadata: Metadata,
    targets: dict[str, tuple[str, torch.Tensor]],
    saved_nf4: dict[str, tuple[int, int]],
    expected_checksums: dict[str, str],
) -> None:
    """Fill each target from the whole saved weight in the checkpoint at `src_path` (collective).

    Args:
        targets: saved key -> (name for messages, staged tensor or DTensor), filled in place.
        saved_nf4: saved keys stored as NF4 shards -> their (block_size, scaler_block_size).
        expected_checksums: saved key -> the manifest's checksum of the saved weight, where known.
    """
    for batch in _batches(metadata, list(targets), saved_nf4):
        whole = _read_plain(src_path, metadata, [k for k in batch if k not in saved_nf4])
        whole.update(_read_nf4(src_path, metadata, {k: saved_nf4[k] for k in batch if k in saved_nf4}))
        for key in batch:
            name, target = targets[key]
            want = expected_checksums.get(key)
            if want and local_checksum(whole[key]) != want:
                raise CheckpointLayoutError(
                    f"checksum mismatch: data of {name!r} in checkpoint {src_path!r} differs from what was "
                    f"saved (corrupted file?); the model was not changed"
                )
            _fill(target, whole.pop(key))


def _batches(metadata: Metadata, keys: list[str], saved_nf4: dict[str, Any]) -> list[list[str]]:
    out: list[list[str]] = [[]]
    size = 0
    for key in keys:
        md = metadata.state_dict_metadata[key]
        nbytes = md.size.numel() * md.properties.dtype.itemsize
        if key in saved_nf4:  # packed: ~0.53 bytes per element, about 1/7 of fp32
            nbytes //= 7
        if out[-1] and size + nbytes > BATCH_BYTES:
            out.append([])
            size = 0
        out[-1].append(key)
        size += nbytes
    return [b for b in out if b]


def _read_plain(src_path: str, metadata: Metadata, keys: list[str]) -> dict[str, torch.Tensor]:
    if not keys:
        return {}
    whole = {}
    for key in keys:
        md = metadata.state_dict_metadata[key]
        whole[key] = torch.empty(tuple(md.size), dtype=md.properties.dtype)
    dcp.load(whole, checkpoint_id=src_path)
    return whole


class _NF4ShardReader(DefaultLoadPlanner):
    """Reads every saved shard of some NF4 weights, each whole into an NF4 tensor of its own."""

    def __init__(self, shards: dict[str, list[tuple[Any, torch.Tensor]]]) -> None:
        super().__init__()
        self.shards = shards  # saved key -> [(ChunkStorageMetadata, target NF4Tensor)]

    def create_local_plan(self) -> LoadPlan:
        items = []
        for key, chunks in self.shards.items():
            for i, (chunk, _) in enumerate(chunks):
                index = MetadataIndex(key, chunk.offsets, i)
                zeros = torch.Size([0] * len(chunk.sizes))
                items.append(ReadItem(type=LoadItemType.TENSOR, dest_index=index, dest_offsets=zeros,
                                      storage_index=index, storage_offsets=zeros, lengths=chunk.sizes))
        return LoadPlan(items)

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        return self.shards[read_item.dest_index.fqn][read_item.dest_index.index][1]

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass  # read in place


def _read_nf4(src_path: str, metadata: Metadata, keys: dict[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
    """Each NF4 weight whole: its saved shards read, their packed tensors laid end to end."""
    if not keys:
        return {}
    shards = {}
    for key, (block, scaler_block) in keys.items():
        md = metadata.state_dict_metadata[key]
        assert isinstance(md, TensorStorageMetadata)
        chunks = sorted(md.chunks, key=lambda c: tuple(c.offsets))
        shards[key] = list(zip(chunks, _placeholders(key, md, chunks, block, scaler_block)))
    dcp.load({}, checkpoint_id=src_path, planner=_NF4ShardReader(shards))
    return {key: ao.nf4_concat([t for _, t in parts]) for key, parts in shards.items()}


def _placeholders(key: str, md: TensorStorageMetadata, chunks: list[Any], block: int,
                  scaler_block: int) -> list[torch.Tensor]:
    """Read targets for the saved shards `chunks` of the NF4 weight `key`: what torchao's dim-0 split of
    the quantized weight gives (each shard's shape, the whole weight's block count: torchao copies inner
    tensors only between NF4Tensors of equal block sizes and block count), allocated without quantizing
    (`nf4_empty`). The read overwrites every inner tensor: a saved shard is the whole NF4Tensor, its
    replicated ``scaler_mean`` and ``nf4`` table included."""
    size, n = tuple(md.size), len(chunks)
    part = (size[0] // n, *size[1:]) if size else ()
    if not size or size[0] % n or [(tuple(c.offsets)[0], tuple(c.sizes)) for c in chunks] != [
        (i * part[0], part) for i in range(n)
    ]:
        raise CheckpointLayoutError(
            f"NF4 weight {key!r} of shape {size} is saved in shards of unequal sizes or other than dim-0 chunks "
            f"(sizes {[tuple(c.sizes) for c in chunks]}); cannot read it"
        )
    numel = math.prod(part)
    if numel % (block * scaler_block):
        raise CheckpointLayoutError(
            f"NF4 weight {key!r} is saved in shards of shape {part}, which do not hold whole scaler blocks of "
            f"block_size={block} x scaler_block_size={scaler_block} elements; cannot read it"
        )
    return [ao.nf4_empty(part, md.properties.dtype, block, scaler_block, n_blocks=numel * n // block) for _ in chunks]


def _fill(target: torch.Tensor, whole: torch.Tensor) -> None:
    """Copy this rank's part of `whole`, converted to the target's storage, into `target`."""
    local = local_tensor(target)
    if is_nf4(local):
        same = is_nf4(whole) and (whole.block_size, whole.scaler_block_size, whole.dtype) == (
            local.block_size, local.scaler_block_size, local.dtype)
        if is_nf4(whole) and not same:  # dequantized, then quantized at the model's block sizes and dtype
            whole = whole.get_original_weight()  # ([Note: NF4 in the compute dtype]: never a cast of its factors)
        ao.nf4_copy_chunk_(target, whole)
        return
    plain = whole.get_original_weight() if is_nf4(whole) else whole
    if hasattr(target, "device_mesh"):
        if not local.numel():
            return
        (chunk,) = compat.chunk_list(target)
        plain = plain[tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes))]
    local.copy_(plain.to(local.dtype))


__all__ = ["BATCH_BYTES", "load_converted"]
