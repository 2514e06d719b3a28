"""Export a consolidated plain state dict (safetensors) with DCP's Hugging Face storage writer."""

from __future__ import annotations

import os
import shutil

import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from .. import _torch_compat as compat
from .atomic import replace_dir, temp_dir_for
from .collectives import barrier, rank
from .keys import TRAINABLE, model_kinds

PARTS = ("all", "trainable")


def export_safetensors(model: nn.Module, path: str | os.PathLike, *, part: str = "all") -> str:
    """Write the model's parameters and buffers as one consolidated safetensors file under `path`.

    Keys are plain FQNs (as ``model.state_dict()`` names them in the unsharded model); tensors keep
    their storage dtype. ``part="trainable"`` writes only trainable parameters (an adapter).
    Collective; written into a temporary directory and renamed, like `save_checkpoint`. Needs the
    ``safetensors`` package (the ``export`` extra) and torch >= 2.8 (DCP's ``HuggingFaceStorageWriter``
    does the writing and consolidation). Returns the path of the ``.safetensors`` file.
    """
    if part not in PARTS:
        raise ValueError(f"export_safetensors: part must be one of {PARTS}, got {part!r}")
    if not compat.HF_STORAGE_WRITER_SUPPORTED:
        raise ImportError(
            f"export_safetensors needs torch >= 2.8 (DCP's HuggingFaceStorageWriter); found {torch.__version__}"
        )
    try:
        import safetensors  # noqa: F401
    except ImportError as e:
        raise ImportError("export_safetensors needs the safetensors package: pip install 'fsdp-frozen[export]'") from e
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path):
        raise FileExistsError(f"export directory {path!r} exists")
    kinds = model_kinds(model)
    state = {
        k: v for k, v in get_model_state_dict(model).items()
        if isinstance(v, torch.Tensor) and (part == "all" or kinds.get(k) == TRAINABLE)
    }
    tmp = temp_dir_for(path)
    dcp.save(state, storage_writer=HuggingFaceStorageWriter(tmp, save_distributed=True, enable_consolidation=True))
    barrier()
    if rank() == 0:
        shutil.rmtree(os.path.join(tmp, "sharded"), ignore_errors=True)  # DCP's per-rank files, consolidated
        replace_dir(tmp, path)
    barrier()
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    return os.path.join(path, files[0])
