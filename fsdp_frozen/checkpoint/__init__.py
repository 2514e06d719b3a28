"""Checkpoints that keep frozen and trainable state apart (torch.distributed.checkpoint based).

``save_checkpoint`` / ``load_checkpoint`` for the common case; ``FrozenSavePlanner`` /
``FrozenLoadPlanner`` for plain ``dcp.save`` / ``dcp.load``; ``export_safetensors`` for a
consolidated plain state dict; ``load_pretrained`` for Hugging Face safetensors weights into a
meta-built, sharded model. See ``docs/checkpoint.md`` for the on-disk format.
"""

from ..errors import CheckpointLayoutError
from .export import export_safetensors
from .io import frozen_base, load_checkpoint, save_checkpoint
from .layout import read_manifest
from .planner import FrozenLoadPlanner, FrozenSavePlanner
from .pretrained import load_pretrained

__all__ = [
    "CheckpointLayoutError",
    "FrozenLoadPlanner",
    "FrozenSavePlanner",
    "export_safetensors",
    "frozen_base",
    "load_checkpoint",
    "load_pretrained",
    "read_manifest",
    "save_checkpoint",
]
