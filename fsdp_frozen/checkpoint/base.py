"""Frozen-base references: which checkpoint on disk holds a model's frozen state, and checking one.

`save_checkpoint(frozen="auto")` writes the frozen state once and references it from later saves (path
relative to the referencing checkpoint, plus the frozen fingerprint); a load follows the reference
after checking the fingerprint. The model remembers its base (`frozen_base`).
"""

from __future__ import annotations

import os
from typing import Any

import torch.nn as nn

from ..errors import CheckpointLayoutError
from .layout import frozen_save, read_manifest

_BASE_ATTR = "_fsdp_frozen_checkpoint_base"


def set_frozen_base(model: nn.Module, base: dict[str, str] | None) -> None:
    """Record (or forget, with None) the checkpoint holding `model`'s frozen state."""
    setattr(model, _BASE_ATTR, base)


def frozen_base(model: nn.Module) -> dict[str, str] | None:
    """``{"path", "fingerprint"}`` of the checkpoint holding this model's frozen state, if known.

    Set by a save that wrote the frozen state and by a load that read it.
    """
    return getattr(model, _BASE_ATTR, None)


def base_usable(base_path: str, fingerprint_now: str) -> bool:
    """True if `base_path` is a checkpoint holding frozen state with exactly this fingerprint."""
    try:
        manifest = read_manifest(base_path)
    except CheckpointLayoutError:
        return False
    return (
        manifest is not None
        and frozen_save(manifest) == "include"
        and manifest.get("frozen_fingerprint") == fingerprint_now
    )


def resolve_base(path: str, manifest: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(path, manifest) of the base a referencing checkpoint names, checked; `CheckpointLayoutError`
    saying what is wrong (missing, unreadable, holds no frozen state, fingerprint changed)."""
    ref = manifest.get("base") or {}
    base_path = os.path.normpath(os.path.join(path, ref.get("path", "")))
    if not os.path.isdir(base_path):
        raise CheckpointLayoutError(
            f"checkpoint {path!r} takes its frozen parameters from base checkpoint {base_path!r}, which is "
            f"missing (deleted or moved?); restore it there, or load with a model whose frozen weights come "
            f"from elsewhere after saving with frozen='include'"
        )
    try:
        base_manifest = read_manifest(base_path)
    except CheckpointLayoutError as e:
        raise CheckpointLayoutError(f"base checkpoint {base_path!r} of {path!r} is not usable: {e}") from e
    if frozen_save(base_manifest) != "include":
        raise CheckpointLayoutError(f"base checkpoint {base_path!r} of {path!r} holds no frozen state")
    if base_manifest.get("frozen_fingerprint") != ref.get("fingerprint"):
        raise CheckpointLayoutError(
            f"base checkpoint {base_path!r} of {path!r} has changed: its frozen-state fingerprint is "
            f"{base_manifest.get('frozen_fingerprint')}, the reference expects {ref.get('fingerprint')}"
        )
    return base_path, base_manifest


def record_base(model: nn.Module, path: str, manifest: dict[str, Any] | None, sources: dict[str, Any]) -> None:
    """After a load: the model's frozen state now comes from this checkpoint, or from its base."""
    if manifest is None:
        set_frozen_base(model, None)
    elif frozen_save(manifest) == "include":
        set_frozen_base(model, {"path": path, "fingerprint": manifest["frozen_fingerprint"]})
    elif frozen_save(manifest) == "reference":
        base_path, _, base_manifest = sources["base"]
        set_frozen_base(model, {"path": base_path, "fingerprint": base_manifest["frozen_fingerprint"]})
