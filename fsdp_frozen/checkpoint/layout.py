"""The layout manifest (JSON) and the comparison of a checkpoint's layout with a model's.

Everything here runs before any tensor is read: a load that would not fit is refused with every
difference listed, and the model is not touched.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from .._torch_compat import local_tensor
from ..errors import CheckpointLayoutError
from .keys import BUFFERS, FROZEN, OPTIMIZER, OPTIMIZER_GROUPS, TRAINABLE, optimizer_param, split_key

FORMAT = "fsdp_frozen.checkpoint"
FORMAT_VERSION = 1
MANIFEST_FILE = "fsdp_frozen.json"
DCP_METADATA_FILE = ".metadata"

#: What a checkpoint does with the frozen state; the one vocabulary in code. ``save_checkpoint``'s
#: ``frozen=`` adds ``"auto"`` (include, or reference when the frozen base on disk matches).
FrozenSave = Literal["include", "reference", "skip"]
FROZEN_SAVES: tuple[FrozenSave, ...] = ("include", "reference", "skip")
#: The words format v1 writes for them: the manifest's ``frozen_state`` and each frozen parameter's ``stored``.
_MANIFEST_STATE = {"include": "included", "reference": "referenced", "skip": "skipped"}
_MANIFEST_STORED = {"include": "here", "reference": "base", "skip": "no"}


def manifest_frozen_state(mode: FrozenSave) -> str:
    return _MANIFEST_STATE[mode]


def manifest_stored(mode: FrozenSave) -> str:
    """Where a frozen parameter's data is, as the manifest says (trainable ones: always ``"here"``)."""
    return _MANIFEST_STORED[mode]


def frozen_save(manifest: dict[str, Any] | None) -> FrozenSave | None:
    """The `FrozenSave` a manifest records (None for a plain DCP checkpoint without one)."""
    if manifest is None:
        return None
    return next(m for m, word in _MANIFEST_STATE.items() if word == manifest["frozen_state"])


@dataclass(frozen=True)
class Spec:
    """What a layout check compares for one checkpoint key. ``shape is None``: a non-tensor object."""

    shape: tuple[int, ...] | None
    dtype: str | None
    quantization: str | None = None  #: e.g. "nf4(block_size=64, scaler_block_size=256)"; "?" = unknown


def quantization_of(value: Any) -> dict[str, Any] | None:
    """The manifest's quantization record of a (possibly sharded) tensor: None for plain storage."""
    from ..storage import is_nf4

    local = local_tensor(value) if isinstance(value, torch.Tensor) else value
    if is_nf4(local):
        return {"format": "nf4", "block_size": local.block_size, "scaler_block_size": local.scaler_block_size}
    return None


def quantization_label(record: dict[str, Any] | None) -> str | None:
    if record is None:
        return None
    return f"{record['format']}(block_size={record['block_size']}, scaler_block_size={record['scaler_block_size']})"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tensor_spec(value: Any) -> Spec:
    if isinstance(value, torch.Tensor):
        return Spec(tuple(value.shape), dtype_name(value.dtype), quantization_label(quantization_of(value)))
    return Spec(None, None)


def metadata_specs(metadata: Metadata) -> dict[str, Spec]:
    """Specs of every key in a DCP checkpoint's metadata (read from ``.metadata``; no tensor read)."""
    out = {}
    for key, md in metadata.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata):  # DCP's metadata does not record quantization
            out[key] = Spec(tuple(md.size), dtype_name(md.properties.dtype), "?")
        else:
            out[key] = Spec(None, None)
    return out


# --------------------------------------------------------------------------------------------- manifest
def manifest_path(checkpoint: str | os.PathLike) -> str:
    return os.path.join(os.fspath(checkpoint), MANIFEST_FILE)


def write_manifest(checkpoint: str | os.PathLike, manifest: dict[str, Any]) -> None:
    """Write the manifest next to DCP's files (through a temporary file, so it is never half-written)."""
    path = manifest_path(checkpoint)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(checkpoint: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest of a checkpoint directory; None for a plain DCP checkpoint (no manifest).

    Raises:
        CheckpointLayoutError: the directory or its DCP metadata is missing (an interrupted save), the
            manifest is not valid JSON, or it has a format version this package cannot read.
    """
    checkpoint = os.fspath(checkpoint)
    if not os.path.isdir(checkpoint):
        raise CheckpointLayoutError(f"checkpoint {checkpoint!r} does not exist or is not a directory")
    if not os.path.isfile(os.path.join(checkpoint, DCP_METADATA_FILE)):
        raise CheckpointLayoutError(
            f"checkpoint {checkpoint!r} has no {DCP_METADATA_FILE} file: it is not a DCP checkpoint or its save "
            f"did not finish"
        )
    path = manifest_path(checkpoint)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointLayoutError(f"manifest {path!r} cannot be read: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointLayoutError(f"{path!r} is not an fsdp_frozen manifest (format {FORMAT!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointLayoutError(
            f"manifest {path!r} has format version {manifest.get('format_version')!r}; this fsdp_frozen reads "
            f"version {FORMAT_VERSION}"
        )
    return manifest


# --------------------------------------------------------------------------------------------- compare
@dataclass
class LayoutMatch:
    """How a template (what the model and optimizer hold now) maps onto a checkpoint."""

    key_map: dict[str, str] = field(default_factory=dict)  #: template key -> saved key to read
    zero_init: list[str] = field(default_factory=list)  #: template optimizer keys left at zero
    dropped: list[str] = field(default_factory=list)  #: params whose saved optimizer state is not loaded
    cast: list[str] = field(default_factory=list)  #: template keys whose dtype is converted on load
    convert: list[str] = field(default_factory=list)  #: template keys read whole and converted (convert_on_load)
    differences: list[str] = field(default_factory=list)

    def raise_if_different(self, what: str) -> None:
        if self.differences:
            lines = "\n  - ".join(self.differences)
            raise CheckpointLayoutError(
                f"{what} does not fit the model ({len(self.differences)} difference(s); nothing was loaded):"
                f"\n  - {lines}"
            )


def compare(
    template: dict[str, Spec],
    saved: dict[str, Spec],
    *,
    cast: bool = False,
    allow_freezing_change: bool = False,
    frozen_not_stored: bool = False,
    quantize: bool = False,
) -> LayoutMatch:
    """Match template keys (see `keys.py`) with saved keys and list every difference.

    ``frozen_not_stored``: the checkpoint holds no frozen parameters by design (saved with
    ``frozen="skip"``): frozen template entries are then not loaded rather than missing.
    ``quantize``: a parameter stored plain in the checkpoint and quantized in the model is quantized
    on load (listed in ``convert``) rather than a difference; with ``cast`` any quantization difference
    is converted (dequantized, re-quantized).
    """
    match = LayoutMatch()
    diffs = match.differences
    saved_params = {n: k for k, n in map(split_key, saved) if k in (FROZEN, TRAINABLE)}
    model_params = {n: k for k, n in map(split_key, template) if k in (FROZEN, TRAINABLE)}
    wants_optimizer = any(split_key(k)[0] == OPTIMIZER for k in template)
    saved_optimizer = any(split_key(k)[0] in (OPTIMIZER, OPTIMIZER_GROUPS) for k in saved)
    if wants_optimizer and not saved_optimizer:
        diffs.append("the checkpoint holds no optimizer state (saved without an optimizer); pass optimizer=None")

    for key, spec in template.items():
        kind, name = split_key(key)
        src: str | None = key
        if kind in (FROZEN, TRAINABLE):
            saved_kind = saved_params.get(name)
            if saved_kind is None:
                if not (kind == FROZEN and frozen_not_stored):
                    diffs.append(f"parameter {name!r} ({kind} in the model) is missing from the checkpoint")
                continue
            if saved_kind != kind and not allow_freezing_change:
                diffs.append(
                    f"parameter {name!r} is {kind} in the model but {saved_kind} in the checkpoint "
                    f"(pass allow_freezing_change=True to load it anyway)"
                )
                continue
            src = f"{saved_kind}/{name}"
        elif kind == BUFFERS:
            if key not in saved:
                diffs.append(f"buffer {name!r} is missing from the checkpoint")
                continue
        elif kind == OPTIMIZER:
            if not saved_optimizer:
                continue
            if key not in saved:
                if allow_freezing_change and saved_params.get(optimizer_param(key)) == FROZEN:
                    match.zero_init.append(key)
                else:
                    diffs.append(f"optimizer state {name!r} is missing from the checkpoint")
                continue
        elif kind == OPTIMIZER_GROUPS:
            if not saved_optimizer or name.endswith(".params"):
                continue  # the optimizer's own parameter lists stay; they name the current params
            if key not in saved:
                diffs.append(f"optimizer param-group entry {name!r} is missing from the checkpoint")
                continue
        elif key not in saved:  # extra: only what the checkpoint holds is loaded
            continue
        have, want = saved[src], spec
        if have.quantization != "?" and have.quantization != want.quantization:
            stored = f"{key!r}: stored as {have.quantization or 'plain ' + str(have.dtype)} in the checkpoint, " \
                     f"{want.quantization or 'plain ' + str(want.dtype)} in the model"
            if have.shape != want.shape:
                diffs.append(f"{stored}, shape {list(have.shape or ())} in the checkpoint, {list(want.shape or ())} "
                             f"in the model")
            elif cast or (quantize and have.quantization is None):
                match.convert.append(key)
                match.key_map[key] = src
            else:
                verb = "quantizes" if have.quantization is None else "converts"
                diffs.append(f"{stored} (load_checkpoint(..., cast=True) {verb} it on load)")
        elif have.shape != want.shape:
            diffs.append(f"{key!r}: shape {list(have.shape or ())} in the checkpoint, {list(want.shape or ())} in the model")
        elif have.dtype != want.dtype:
            quantized = want.quantization is not None  # NF4 quantized from another dtype: re-quantized, never cast
            if cast:
                (match.convert if quantized else match.cast).append(key)
                match.key_map[key] = src
            elif quantized:
                diffs.append(f"{key!r}: {want.quantization} quantized from {have.dtype} in the checkpoint, from "
                             f"{want.dtype} in the model (pass cast=True to re-quantize on load)")
            else:
                diffs.append(f"{key!r}: dtype {have.dtype} in the checkpoint, {want.dtype} in the model "
                             f"(pass cast=True to convert on load)")
        else:
            match.key_map[key] = src

    dropped: set[str] = set()
    for key in saved:
        kind, name = split_key(key)
        if kind in (FROZEN, TRAINABLE) and name not in model_params:
            diffs.append(f"the checkpoint has parameter {name!r} ({kind}), which the model does not have")
        elif kind == BUFFERS and key not in template:
            diffs.append(f"the checkpoint has buffer {name!r}, which the model does not have")
        elif kind == OPTIMIZER and wants_optimizer:
            param = optimizer_param(key)
            if param not in model_params:
                diffs.append(f"the checkpoint has optimizer state {name!r} for a parameter the model does not have")
            elif model_params[param] == FROZEN and allow_freezing_change:
                dropped.add(param)
    match.dropped = sorted(dropped)
    return match


__all__ = [
    "LayoutMatch",
    "Spec",
    "compare",
    "metadata_specs",
    "read_manifest",
    "tensor_spec",
    "write_manifest",
]
