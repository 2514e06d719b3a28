"""Cheap, resharding-invariant checksums of (possibly sharded) tensors.

Each tensor's checksum is two sums, modulo 2**64, over its bytes read as 64-bit words: a plain sum and
one weighted by the word's position in the *global* tensor. Both are linear in the bytes, so the value
does not depend on how the tensor is sharded: every rank adds up its own shard (one pass, no copy of the
data) and one all-reduce combines the shards. A checkpoint saved at world size 4 and loaded at 2
therefore checks against the same figures. It catches flipped, zeroed, truncated or misplaced data;
it is not a cryptographic hash.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate

from .. import _torch_compat as compat
from .._torch_compat import collective_device, local_tensor
from ..storage import NF4_PACKED, is_nf4

_PERIOD = 65521  # word weights cycle through 1..65521 (a prime)
_WEIGHTS: dict[torch.device, torch.Tensor] = {}  # the weight table, one copy per device that sums on it
_MASK = 2**64 - 1


def _weights(device: torch.device) -> torch.Tensor:
    """Word weights 1..P on `device`: shards are summed where they live (no copy to the host)."""
    if device not in _WEIGHTS:
        _WEIGHTS[device] = torch.arange(1, _PERIOD + 1, dtype=torch.int64, device=device)
    return _WEIGHTS[device]


def _local_view(t: torch.Tensor) -> tuple[torch.Tensor, int, int, bool]:
    """(local data, byte offset of its first element in the global tensor, byte stride between its
    dim-0 rows in the global tensor (0: the shard is one contiguous range), whether this rank adds it).

    Shards are contiguous dim-0 ranges (FSDP's ``Shard(0)``, TP's colwise ``Shard(0)`` under it,
    possibly replicated over an HSDP dim) or boxes cut on dims 0 and 1 (TP's rowwise ``Shard(1)``
    under FSDP: one run of bytes per dim-0 row); anything else is refused.
    """
    if not isinstance(t, DTensor):
        counts = not dist.is_initialized() or dist.get_rank() == 0
        return t, 0, 0, counts
    local = local_tensor(t)
    coord = t.device_mesh.get_coordinate()
    # A shard replicated over a mesh dim is counted once: by the ranks at coordinate 0 of that dim, and
    # of every dim of the world mesh its mesh is not on (a plain parameter under TP: on world["dp"] only)
    counts = coord is not None and local.numel() > 0 and all(
        coord[d] == 0 for d, p in enumerate(t.placements) if isinstance(p, Replicate)
    ) and compat.first_of_replicas(t.device_mesh)
    chunks = compat.chunk_list(t)
    row_bytes = math.prod(t.shape[1:]) * t.element_size() if t.dim() else 0
    offsets = chunks[0].offsets if chunks and t.dim() else (0,) * t.dim()
    if is_nf4(local) or not local.dim() or tuple(local.shape[1:]) == tuple(t.shape[1:]):
        return local, offsets[0] * row_bytes, 0, counts
    if tuple(local.shape[2:]) != tuple(t.shape[2:]):
        raise NotImplementedError(
            f"checksums need tensors sharded along dims 0 and 1 (FSDP's and TP's layouts); got placements "
            f"{t.placements} for a tensor of shape {tuple(t.shape)}"
        )
    inner = math.prod(t.shape[2:]) * t.element_size()  # bytes per dim-1 index
    return local, offsets[0] * row_bytes + offsets[1] * inner, row_bytes, counts


def _box_sums(local: torch.Tensor, start: int, row_stride: int) -> torch.Tensor:
    """`_device_sums` of a shard whose dim-0 rows are runs of bytes `row_stride` apart in the global
    tensor, the first at byte `start`. Word-aligned runs (the usual case: TP splits of widths that are
    multiples of 8 bytes) are summed in one pass with their words' global indices; others row by row."""
    rows = local.shape[0]
    run = local[0].numel() * local.element_size() if rows else 0
    if rows == 0 or run == 0:
        return torch.zeros(2, dtype=torch.int64, device=local.device)
    if start % 8 or row_stride % 8 or run % 8:
        return torch.stack([_device_sums(local[i], start + i * row_stride) for i in range(rows)]).sum(0)
    words = local.detach().contiguous().view(torch.uint8).view(rows, run).view(torch.int64)
    first = torch.arange(rows, dtype=torch.int64, device=local.device) * (row_stride // 8) + start // 8
    index = first[:, None] + torch.arange(run // 8, dtype=torch.int64, device=local.device)[None, :]
    return torch.stack([words.sum(), (words * (index % _PERIOD + 1)).sum()])


def _device_sums(data: torch.Tensor, start: int) -> torch.Tensor:
    """(plain, weighted) contribution of bytes ``[start, start + nbytes)`` of a tensor's byte string, as
    an int64 tensor of two on `data`'s device, computed there without a host sync (the values modulo
    2**64, as int64: torch's integer sums wrap).

    The byte string is read as little-endian 64-bit words (zero-padded); plain = sum of words,
    weighted = sum of word * (word index % P + 1), both modulo 2**64. Each is linear in the bytes,
    so any split of the string into shards sums to the same values.
    """
    flat = data.detach().reshape(-1)
    if flat.numel() and flat.stride(0) != 1:  # e.g. a 1-element view with stride 4: "contiguous", yet not viewable
        flat = flat.new_empty(flat.shape).copy_(flat)
    raw = flat.view(torch.uint8)
    n = raw.numel()
    head = min((-start) % 8, n)
    mid = (n - head) // 8 * 8
    terms = [_partial_word(raw[:head], start)] if head else []
    if mid:
        words = raw[head : head + mid]
        words = (words if words.storage_offset() % 8 == 0 else words.clone()).view(torch.int64)
        terms.append(_word_sums(words, (start + head) // 8))
    if n > head + mid:
        terms.append(_partial_word(raw[head + mid :], start + head + mid))
    return torch.stack(terms).sum(0) if terms else torch.zeros(2, dtype=torch.int64, device=raw.device)


def _sums(data: torch.Tensor, start: int) -> tuple[int, int]:
    """`_device_sums` on the host, as non-negative ints below 2**64 (one host sync: for tests and tools)."""
    plain, weighted = _device_sums(data, start).tolist()
    return plain & _MASK, weighted & _MASK


def _nf4_sums(local: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """Checksum contribution of one NF4 shard (as `_device_sums`): its packed tensors, as if laid end to
    end globally.

    FSDP splits each inner tensor of an NF4Tensor into equal dim-0 chunks, so a shard starting at
    row r of R holds the fraction r/R of each; regions follow one another (data, scalers, factors).
    The replicated scalar ``scaler_mean`` is added by the first shard only.
    """
    rows = whole.shape[0]
    first = compat.chunk_list(whole)[0].offsets[0] if isinstance(whole, DTensor) else 0
    terms = []
    base = 0
    for attr in NF4_PACKED:
        inner = getattr(local, attr)
        total = inner.numel() * rows // max(local.shape[0], 1) * inner.element_size()
        terms.append(_device_sums(inner, base + first * total // rows))
        base += total
    if first == 0:
        terms.append(_device_sums(local.scaler_mean.reshape(1), base))
    return torch.stack(terms).sum(0)


def _partial_word(raw: torch.Tensor, start: int) -> torch.Tensor:
    """Contribution of a few (1 to 7) bytes that do not fill a word of their own, all in word ``start // 8``:
    that word, zero-padded around them, times its weight (on `raw`'s device, no host sync)."""
    padded = torch.zeros(8, dtype=torch.uint8, device=raw.device)
    padded[start % 8 : start % 8 + raw.numel()] = raw
    word = padded.view(torch.int64)
    return torch.cat([word, word * ((start // 8) % _PERIOD + 1)])


def _word_sums(words: torch.Tensor, first: int) -> torch.Tensor:
    """(sum(words), sum(words[i] * ((first + i) % P + 1))) in one read of `words`, as `_device_sums`.

    Words P apart share a weight, so the whole periods in the middle are first summed by column (the
    one pass over the bulk); the head up to the next period boundary and the tail are summed as they are.
    """
    n = words.numel()
    head = min((-first) % _PERIOD, n)
    blocks = (n - head) // _PERIOD
    body = words[head : head + blocks * _PERIOD].view(blocks, _PERIOD).sum(0) if blocks else words[:0]
    segments = ((words[:head], first % _PERIOD), (body, 0), (words[head + blocks * _PERIOD :], 0))
    weights = _weights(words.device)
    plain, weighted = [], []
    for part, weight0 in segments:  # (words, index of the first one's weight)
        if part.numel():
            plain.append(part.sum())
            weighted.append((part * weights[weight0 : weight0 + part.numel()]).sum())
    return torch.stack([torch.stack(plain).sum(), torch.stack(weighted).sum()])


def checksums(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """A hex checksum per tensor, equal for equal global tensors however they are sharded.

    Collective when a process group is initialized (one all-reduce of two int64 per tensor): call
    it on every rank with the same keys. Cost: one read of each local shard, summed where it lives
    (no host sync per tensor: a sync stalls a CUDA stream); the sums of all tensors reach the host in
    one transfer when they are on one device, one per device otherwise (plus one for the all-reduce).
    """
    names = list(tensors)
    sums = []
    for name in names:
        local, start, row_stride, counts = _local_view(tensors[name])
        if not counts:
            sums.append(torch.zeros(2, dtype=torch.int64, device=local.device))
        elif is_nf4(local):
            sums.append(_nf4_sums(local, tensors[name]))
        else:
            sums.append(_box_sums(local, start, row_stride) if row_stride else _device_sums(local, start))
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    # One tensor on the process group's device (NCCL all-reduces CUDA tensors only, gloo CPU ones).
    target = collective_device() if distributed else (sums[0].device if sums else None)
    if sums and all(s.device == target for s in sums):
        stacked = torch.stack(sums)  # the usual case: every shard on the collective's device
        if distributed:
            dist.all_reduce(stacked)
        values = stacked.tolist()  # the one host sync
    else:  # shards on several devices (say, frozen state staged on the host beside CUDA shards)
        values = [[0, 0] for _ in names]
        by_device: dict[torch.device, list[int]] = {}
        for i, s in enumerate(sums):
            by_device.setdefault(s.device, []).append(i)
        for indices in by_device.values():  # one transfer per device
            for i, v in zip(indices, torch.stack([sums[i] for i in indices]).tolist()):
                values[i] = v
        if distributed:
            reduced = torch.tensor(values, dtype=torch.int64, device=target).reshape(len(names), 2)
            dist.all_reduce(reduced)
            values = reduced.tolist()
    return {name: _hex(*values[i]) for i, name in enumerate(names)}


def local_checksum(t: torch.Tensor) -> str:
    """The checksum of a whole tensor held by this rank (no collective); equals `checksums`'s."""
    return _hex(*(_nf4_sums(t, t) if is_nf4(t) else _device_sums(t, 0)).tolist())


def _hex(plain: int, weighted: int) -> str:
    return f"{plain & _MASK:016x}{weighted & _MASK:016x}"


def fingerprint(entries: Mapping[str, Mapping[str, object]]) -> str:
    """One digest of a set of manifest entries (FQN -> shape, dtype, checksum ...): order-free."""
    h = hashlib.sha256()
    for name in sorted(entries):
        e = entries[name]
        h.update(f"{name}|{e.get('shape')}|{e.get('dtype')}|{e.get('quantization')}|{e.get('checksum')}\n".encode())
    return h.hexdigest()[:32]
