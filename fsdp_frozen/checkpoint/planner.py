"""DCP save/load planners that store frozen and trainable state under separate keys.

They subclass DCP's default planners and only rename keys (see `keys.py`), drop the frozen entries
a save should not write, check layouts, and write the JSON manifest; DCP does all I/O and resharding.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from .. import __version__
from .. import _torch_compat as compat
from ..errors import CheckpointLayoutError
from .checksum import checksums, fingerprint
from .keys import BUFFERS, FROZEN, OPTIMIZER, OPTIMIZER_GROUPS, TRAINABLE, checkpoint_key, model_kinds, split_key
from .layout import (
    FORMAT,
    FORMAT_VERSION,
    FROZEN_SAVES,
    FrozenSave,
    compare,
    manifest_frozen_state,
    manifest_stored,
    metadata_specs,
    quantization_of,
    tensor_spec,
    write_manifest,
)



def model_checksums(model: nn.Module) -> dict[str, str]:
    """Checksum of every parameter and buffer in the model's state dict, keyed by FQN (collective)."""
    return checksums({k: v for k, v in get_model_state_dict(model).items() if isinstance(v, torch.Tensor)})


def entry(value: Any, checksum: str | None = None, **more: Any) -> dict[str, Any]:
    """One manifest entry: shape, dtype (and, for parameters and buffers, quantization and checksum)."""
    spec = tensor_spec(value)
    out: dict[str, Any] = {"shape": list(spec.shape) if spec.shape is not None else None, "dtype": spec.dtype}
    if checksum is not None:
        out.update(checksum=checksum, quantization=quantization_of(value))
    out.update(more)
    return out


def frozen_fingerprint(params: dict[str, dict[str, Any]]) -> str:
    """Fingerprint of the frozen state from manifest param entries (FQN -> entry with a "kind")."""
    return fingerprint({n: e for n, e in params.items() if e["kind"] == FROZEN})


class FrozenSavePlanner(DefaultSavePlanner):
    """Save planner: ``frozen/``, ``trainable/``, ``buffers/``, ``optimizer/`` keys plus a JSON manifest.

    Usable with plain DCP::

        dcp.save(model.state_dict(), checkpoint_id=path, planner=FrozenSavePlanner(model))
        dcp.save({"model": get_model_state_dict(m), "optimizer": get_optimizer_state_dict(m, opt)}, ...)

    Construct it on every rank: it checksums the model's parameters and buffers (one all-reduce).
    The coordinator writes ``fsdp_frozen.json`` into the checkpoint directory, so the storage writer
    must be a filesystem one (``checkpoint_id`` a local path).

    Args:
        model: the model whose state is saved (sharded with `shard_with_freezing`, or any module:
            ``requires_grad`` then decides what is frozen).
        frozen: ``"include"`` writes the frozen parameters; ``"skip"`` does not; ``"reference"`` does
            not and records ``base`` (used by `save_checkpoint(frozen="auto")`).
        base: ``{"path": ..., "fingerprint": ...}`` of the checkpoint holding the frozen state.
        checksums_by_fqn / param_entries / fingerprint / kinds: the model's checksums, manifest entries
            of its parameters, frozen fingerprint and `model_kinds`, when the caller has them already
            (`save_checkpoint` does); otherwise computed here (one all-reduce for the checksums).
        enable_plan_caching: DCP's save-plan caching (default True where DCP has it, torch 2.7+; the
            other keyword arguments go to ``DefaultSavePlanner`` too). Repeated saves of the same
            layout then skip DCP's global planning and send empty plans (~100 ms of a 450 ms trainable-
            only save at width 4096 on 2 CPU ranks). Plans are cached per layout written: every key's
            shape, dtype and quantization and the frozen mode, so a changed dtype is never saved under
            a stale plan (DCP's own plan comparison ignores dtypes).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        frozen: FrozenSave = "include",
        base: dict[str, str] | None = None,
        checksums_by_fqn: dict[str, str] | None = None,
        param_entries: dict[str, dict[str, Any]] | None = None,
        fingerprint: str | None = None,
        kinds: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        if compat.SAVE_PLAN_CACHING_SUPPORTED:
            kwargs.setdefault("enable_plan_caching", True)
        self.plan_caching = bool(kwargs.get("enable_plan_caching", False))
        super().__init__(**kwargs)
        if frozen not in FROZEN_SAVES:
            raise CheckpointLayoutError(f"frozen must be one of {FROZEN_SAVES}, got {frozen!r}")
        if (frozen == "reference") != (base is not None):
            raise CheckpointLayoutError("a base is given exactly when frozen='reference'")
        self.kinds = kinds if kinds is not None else model_kinds(model)
        self.frozen_mode = frozen
        self.base = base
        self.checksums_by_fqn = checksums_by_fqn if checksums_by_fqn is not None else model_checksums(model)
        # Computed once by save_checkpoint, which needs them first to decide between include and reference.
        self.param_entries, self.fingerprint = param_entries, fingerprint
        self.manifest: dict[str, Any] | None = None
        self.checkpoint_dir: str | None = None

    def set_up_planner(
        self, state_dict: dict[str, Any], storage_meta: StorageMeta | None = None, is_coordinator: bool = False
    ) -> None:
        super().set_up_planner(state_dict, storage_meta, is_coordinator)
        renamed, mappings, entries = {}, {}, {}
        for flat_key, value in self.state_dict.items():
            key = checkpoint_key(self.mappings[flat_key], self.kinds)
            if key in renamed:
                raise CheckpointLayoutError(f"two state-dict entries map to checkpoint key {key!r}")
            entries[key] = value
            if split_key(key)[0] == FROZEN and self.frozen_mode != "include":
                continue
            renamed[key], mappings[key] = value, self.mappings[flat_key]
        self.state_dict, self.mappings = renamed, mappings
        if self.plan_caching:
            compat.set_save_plan_cache_key(self, self._layout_key(renamed))
        if is_coordinator:
            if storage_meta is None or storage_meta.checkpoint_id is None:
                raise CheckpointLayoutError(
                    "FrozenSavePlanner writes its manifest next to the checkpoint and needs a filesystem "
                    "checkpoint_id (dcp.save(..., checkpoint_id=PATH))"
                )
            self.checkpoint_dir = os.fspath(storage_meta.checkpoint_id)
            self.manifest = self._manifest(entries)

    def _layout_key(self, written: dict[str, Any]) -> str:
        """DCP plan-cache key: this class, the frozen mode and every written key's spec."""
        h = hashlib.sha256(self.frozen_mode.encode())
        for key in sorted(written):
            h.update(f"|{key}:{tensor_spec(written[key])}".encode())
        return f"{type(self).__name__}:{h.hexdigest()[:24]}"

    def _manifest(self, entries: dict[str, Any]) -> dict[str, Any]:
        stored = manifest_stored(self.frozen_mode)
        params, buffers, optimizer, extra = {}, {}, {}, {}
        for key, value in entries.items():
            kind, name = split_key(key)
            if kind in (FROZEN, TRAINABLE):
                where = stored if kind == FROZEN else manifest_stored("include")
                known = self.param_entries.get(name) if self.param_entries is not None else None
                params[name] = ({**known, "stored": where} if known is not None
                                else entry(value, self.checksums_by_fqn[name], kind=kind, stored=where))
            elif kind == BUFFERS:
                buffers[name] = entry(value, self.checksums_by_fqn.get(name, ""))
            elif kind in (OPTIMIZER, OPTIMIZER_GROUPS):
                optimizer[key] = entry(value)
            else:
                extra[key] = entry(value)
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "torch_version": torch.__version__,
            "fsdp_frozen_version": __version__,
            "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "frozen_state": manifest_frozen_state(self.frozen_mode),
            "frozen_fingerprint": self.fingerprint if self.fingerprint is not None else frozen_fingerprint(params),
            "base": self.base,
            "params": params,
            "buffers": buffers,
            "optimizer": optimizer,
            "extra": extra,
        }

    def create_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
        result = super().create_global_plan(all_plans)
        if self.manifest is not None and self.checkpoint_dir is not None:
            write_manifest(self.checkpoint_dir, self.manifest)
        return result


class FrozenLoadPlanner(DefaultLoadPlanner):
    """Load planner for checkpoints written by `FrozenSavePlanner`.

    Renames the state dict's keys the same way, then, before any tensor is read, compares the layout
    with the checkpoint's metadata (missing or extra parameters and buffers, shapes, frozen vs
    trainable, dtypes) and raises `CheckpointLayoutError` listing every difference. Under plain
    ``dcp.load`` DCP wraps that error in its ``CheckpointException``. `load_checkpoint` runs the
    same check first, follows frozen-base references and loads atomically; prefer it.

    Args:
        model: the model being loaded into.
        allow_freezing_change: load a parameter whose frozen/trainable status changed since the save.
        cast: convert dtypes (DCP copies into the target tensors); otherwise a dtype difference is an error.
        frozen_not_stored: the checkpoint holds no frozen parameters by design; leave them as they are.
        key_map: a precomputed template-key -> checkpoint-key map (used by `load_checkpoint`).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        allow_freezing_change: bool = False,
        cast: bool = False,
        frozen_not_stored: bool = False,
        key_map: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.kinds = model_kinds(model)
        self.allow_freezing_change = allow_freezing_change
        self.cast = cast
        self.frozen_not_stored = frozen_not_stored
        self.key_map = key_map

    def set_up_planner(
        self, state_dict: dict[str, Any], metadata: Metadata | None = None, is_coordinator: bool = False
    ) -> None:
        super().set_up_planner(state_dict, metadata, is_coordinator)
        template = {checkpoint_key(self.mappings[k], self.kinds): k for k in self.state_dict}
        key_map = self.key_map
        if key_map is None:
            assert metadata is not None
            match = compare(
                {t: tensor_spec(self.state_dict[k]) for t, k in template.items()},
                metadata_specs(metadata),
                cast=self.cast,
                allow_freezing_change=self.allow_freezing_change,
                frozen_not_stored=self.frozen_not_stored,
            )
            match.raise_if_different("checkpoint")
            if match.dropped:
                warnings.warn(
                    f"optimizer state of {match.dropped} not loaded: trainable at save, frozen now", stacklevel=2
                )
            key_map = match.key_map
        self.state_dict = {key_map[t]: self.state_dict[k] for t, k in template.items() if t in key_map}
        self.mappings = {key_map[t]: self.mappings[k] for t, k in template.items() if t in key_map}


__all__ = ["FrozenLoadPlanner", "FrozenSavePlanner", "model_checksums"]
