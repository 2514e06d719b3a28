"""Frozen storage formats: converted once, before sharding, so no step pays a cast.

* a float dtype (bf16/fp16/fp32): `cast_frozen`, in place;
* ``"nf4"``: torchao's `NF4Tensor` (4-bit NormalFloat with double-quantized block scalers), which
  implements FSDP2's all-gather extension: shards stay packed, are all-gathered packed and are
  dequantized to the compute dtype inside the linear. Quantization is torchao's (`to_nf4`'s values, a
  chunk of blocks at a time), from the compute dtype (`nf4_dtype`); `nf4_ineligible` says which frozen
  weights can take it.

[Note: NF4 in the compute dtype]
torchao's NF4Tensor dequantizes to the dtype it was quantized from (its lookup table, scaler factors
and mean are kept in that dtype), and its FSDP post-all-gather ignores ``param_dtype``. A weight
quantized from fp32 (an HF model built on meta is fp32) therefore dequantizes to fp32 in every linear
and is then cast to bf16: twice the transient bytes and an extra pass per use. So weights are quantized
from the compute dtype (``param_dtype`` where mixed precision is set, else the weight's own dtype), as
torchtune does from its bf16 model: the dequantization writes the compute dtype directly. The NF4
codes can differ from a quantization of the fp32 values (the block scalers are computed in bf16), the
stored factors are in the compute dtype (2 bytes each in bf16), and the checkpoint records that dtype,
so a checkpoint of fp32-quantized NF4 is refused by the layout check instead of loaded into bf16 ones.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from . import _torchao_compat as ao
from ._torch_compat import local_tensor, own_buffers, set_buffer
from ._torchao_compat import NF4_PACKED, nf4_on_meta  # noqa: F401 (NF4_PACKED re-exported)

NF4 = "nf4"


def cast_frozen(model: nn.Module, paths: Iterable[str], dtype: torch.dtype) -> None:
    """Store the floating-point parameters at `paths` (``get_parameter`` names) in `dtype`, in place.

    The Parameter objects are kept (``param.data`` is replaced), so tied parameters stay tied and
    references the caller holds stay valid. Peak extra memory: one converted parameter at a time.
    """
    for path in paths:
        param = model.get_parameter(path)
        if not param.is_floating_point() or param.dtype == dtype:
            continue
        if isinstance(param, DTensor):
            # a TP weight: ``.data =`` would relabel the DTensor's dtype but keep its fp32 local tensor (a
            # Python attribute of the DTensor, what FSDP shards), so the object's contents are swapped instead
            torch.utils.swap_tensors(param, nn.Parameter(param.detach().to(dtype), requires_grad=param.requires_grad))
        else:
            param.data = param.data.to(dtype)


def nf4_ineligible(
    model: nn.Module, path: str, param: nn.Parameter, shard_size: int, block_size: int, scaler_block_size: int
) -> str | None:
    """Why the frozen parameter at `path` cannot be stored as NF4 at this shard size (None: it can).

    torchao quantizes 2-D weights in blocks of `block_size` elements, whose scalers are quantized
    in blocks of `scaler_block_size`; FSDP then splits every inner tensor into `shard_size` equal
    dim-0 chunks (NF4 cannot be padded), so all of them must divide evenly.
    """
    owner = model.get_submodule(path.rpartition(".")[0])
    if not (isinstance(owner, nn.Linear) and path.endswith(".weight")):
        return "not the weight of an nn.Linear"
    if not param.is_floating_point() or param.dim() != 2:
        return f"not a 2-D float tensor ({param.dtype}, {tuple(param.shape)})"
    rows, numel = param.shape[0], param.numel()
    n_blocks = numel // block_size
    checks = [
        (numel % block_size == 0, f"{numel} elements not a multiple of nf4_block_size={block_size}"),
        (n_blocks % scaler_block_size == 0, f"{n_blocks} blocks not a multiple of nf4_scaler_block_size={scaler_block_size}"),
        (rows % shard_size == 0, f"{rows} rows not divisible by the shard size {shard_size}"),
        ((n_blocks // max(scaler_block_size, 1)) % shard_size == 0 and n_blocks % shard_size == 0
         and (numel // 2) % shard_size == 0, f"its quantization blocks do not split into {shard_size} equal shards"),
    ]
    return next((why for ok, why in checks if not ok), None)


def nf4_dtype(param_dtype: torch.dtype | None, dtype: torch.dtype) -> torch.dtype:
    """The dtype a weight of `dtype` is quantized from, and its NF4Tensor dequantizes to: the compute
    dtype (`param_dtype` under mixed precision, else `dtype`). [Note: NF4 in the compute dtype]"""
    return param_dtype if param_dtype is not None else dtype


def nf4_nbytes(numel: int, block_size: int, scaler_block_size: int, dtype: torch.dtype) -> int:
    """Bytes of an NF4Tensor of `numel` elements quantized from `dtype`: 4-bit data, int8 block
    scalers, one factor per scaler block in `dtype`."""
    n_blocks = numel // block_size
    return numel // 2 + n_blocks + dtype.itemsize * math.ceil(n_blocks / scaler_block_size)


def quantize_nf4(model: nn.Module, paths: Iterable[str], block_size: int, scaler_block_size: int,
                 param_dtype: torch.dtype | None = None) -> None:
    """Replace each frozen weight at `paths` by a frozen Parameter holding torchao's NF4Tensor of it,
    quantized from the compute dtype (`nf4_dtype`: `param_dtype`, else the weight's own) a chunk of
    blocks at a time (`_torchao_compat.nf4_quantize_chunk_`: torchao's ``to_nf4`` holds ~3.5x the bf16
    weight in temporaries, 7 GiB for Llama-3-70B's head)."""
    for path in paths:
        parent, _, leaf = path.rpartition(".")
        module = model.get_submodule(parent)
        weight = getattr(module, leaf)
        dtype = nf4_dtype(param_dtype, weight.dtype)
        if weight.is_meta:  # a meta build: the layout only (load_pretrained quantizes the real values)
            quantized = nf4_on_meta(weight, block_size, scaler_block_size, dtype)
        else:  # bitwise to_nf4 of the whole weight, with one chunk of blocks' temporaries at a time
            quantized = ao.nf4_empty(tuple(weight.shape), dtype, block_size, scaler_block_size, weight.device)
            ao.nf4_quantize_chunk_(quantized, weight.detach())
        setattr(module, leaf, nn.Parameter(quantized, requires_grad=False))


def is_nf4(t: torch.Tensor) -> bool:
    return type(t).__name__ == "NF4Tensor"


def storage_nbytes(t: torch.Tensor) -> int:
    """Bytes of a tensor's storage; for an NF4Tensor, of its packed inner tensors."""
    if is_nf4(t):
        return sum(getattr(t, name).untyped_storage().nbytes() for name in NF4_PACKED)
    return t.untyped_storage().nbytes()


def shard_device(mesh: Any) -> torch.device:
    """The device a mesh's shards live on (the current CUDA device for a CUDA mesh)."""
    if mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(mesh.device_type)


def materialize_meta(model: nn.Module, device: torch.device) -> None:
    """Allocate meta parameters and buffers on `device` (only this rank's shards); real buffers stay.
    Values are left uninitialised: the caller fills them (`load_pretrained`, `refreeze`)."""
    if not any((ao.nf4_is_meta(t) if is_nf4(t) else t.is_meta)
               for t in (*map(local_tensor, model.parameters()), *model.buffers())):
        return
    real = {}
    for module_path, module in model.named_modules():
        for name, buf in own_buffers(module).items():
            if not buf.is_meta:
                real[(module_path, name)] = buf
    # Plain (not DTensor) meta parameters (kept out of FSDP: trainable_grouping="replicate", NF4 at shard
    # size 1) are allocated in place first: ``to_empty`` would replace each module slot's Parameter by a
    # new object (meta and real tensors cannot share ``.data``), breaking ties (GPT-2's head = its
    # embedding) and the references `replicate.ReplicatedTrainables` holds. After this, ``to_empty``
    # only re-points their ``.data`` (same object).
    for p in {id(p): p for p in model.parameters()}.values():
        if type(p.data) is torch.Tensor and p.is_meta:
            torch.utils.swap_tensors(p, nn.Parameter(torch.empty_like(p, device=device), requires_grad=p.requires_grad))
    model.to_empty(device=device)
    for (module_path, name), buf in real.items():
        set_buffer(model.get_submodule(module_path), name, buf.to(device))
    for p in model.parameters():  # torchao's NF4Tensor: to_empty allocates only the packed tensors
        local = local_tensor(p)
        if is_nf4(local):
            ao.nf4_materialize_(local, device)
