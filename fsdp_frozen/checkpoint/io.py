"""`save_checkpoint` / `load_checkpoint`: frozen-base references and safe loading (atomic directories
in `atomic.py`, rank-0 helpers in `collectives.py`).

Built on the planners in `planner.py`, DCP's ``save``/``load`` and ``torch.distributed.checkpoint.
state_dict`` (``get_state_dict`` / ``set_state_dict``). Every function here is collective: call it on
every rank with the same arguments; paths must be on a filesystem every rank sees.
"""

from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from .. import _torchao_compat as ao
from .._torch_compat import flatten_state_dict, host_like, is_host_staged, local_tensor
from ..apply import sync_requires_grad
from ..errors import CheckpointLayoutError
from ..storage import is_nf4
from .atomic import replace_dir, temp_dir_for
from .base import base_usable, frozen_base, record_base, resolve_base, set_frozen_base
from .checksum import checksums
from .collectives import barrier, broadcast, rank
from .convert_on_load import load_converted
from .keys import BUFFERS, EXTRA, FROZEN, TRAINABLE, checkpoint_key, model_kinds, split_key
from .layout import FrozenSave, Spec, compare, frozen_save, metadata_specs, quantization_label, read_manifest, tensor_spec
from .planner import FrozenLoadPlanner, FrozenSavePlanner, entry, frozen_fingerprint

#: save_checkpoint's frozen= choices: a `FrozenSave`, or "auto" (decided per save, see there).
SaveChoice = Literal["auto", "include", "skip"]
SAVE_CHOICES: tuple[SaveChoice, ...] = ("auto", "include", "skip")


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    extra: dict[str, Any] | None = None,
    frozen: SaveChoice = "auto",
    overwrite: bool = False,
) -> str:
    """Save model (and optimizer) state to the directory `path`, atomically. Returns the path.

    Frozen parameters are stored under ``frozen/FQN``, trainable ones under ``trainable/FQN``,
    buffers under ``buffers/FQN``, optimizer state (trainable parameters only) under
    ``optimizer/FQN/NAME``, `extra` under ``extra/NAME``; ``fsdp_frozen.json`` is the layout manifest.

    Args:
        frozen: ``"auto"`` writes the frozen state only if the model has no frozen base on disk yet
            (a checkpoint that holds exactly these frozen weights, by fingerprint); otherwise it writes
            a reference to that base (path relative to `path`, plus fingerprint). ``"include"`` always
            writes it; ``"skip"`` never does (loading then leaves the frozen weights as they are).
        extra: a flat mapping of names to tensors or picklable objects (DCP pickles non-tensors).
        overwrite: replace an existing checkpoint at `path` (only after the new one is complete).

    Atomicity: every rank writes into ``PATH.tmp-XXXX``; rank 0 renames it to `path` after all ranks
    finished. A save killed midway leaves any previous checkpoint at `path` intact (the next save to
    `path` removes the leftover temporary directory). With `overwrite`, the old directory is moved
    aside, the new one renamed in, then the old one deleted.

    Cost: one checksum pass over every parameter and buffer shard (one all-reduce), plus DCP's save
    of what is written. With a frozen base on disk only trainable state and optimizer state are written.
    """
    if frozen not in SAVE_CHOICES:
        raise ValueError(f"save_checkpoint: frozen must be one of {SAVE_CHOICES}, got {frozen!r}")
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"checkpoint {path!r} exists; pass overwrite=True to replace it")

    sync_requires_grad(model)  # before state_dict reshards: [Note: stale requires_grad]
    model_sd = get_model_state_dict(model)
    state: dict[str, Any] = {"model": model_sd}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    if extra:
        state["extra"] = dict(extra)
    kinds = model_kinds(model)
    sums = checksums({k: v for k, v in model_sd.items() if isinstance(v, torch.Tensor)})
    params = {n: entry(v, sums[n], kind=kinds[n]) for n, v in model_sd.items() if kinds.get(n) in (FROZEN, TRAINABLE)}
    fingerprint_now = frozen_fingerprint(params)

    mode: FrozenSave = "skip" if frozen == "skip" else "include"
    base = None
    known = frozen_base(model)
    # A base at `path` itself is about to be replaced: the frozen state must then be written again.
    if frozen == "auto" and known is not None and known["path"] != path and any(
        p["kind"] == FROZEN for p in params.values()
    ):
        usable = base_usable(known["path"], fingerprint_now) if rank() == 0 else None
        if broadcast(usable):
            mode = "reference"
            base = {"path": os.path.relpath(known["path"], path), "fingerprint": fingerprint_now}

    tmp = temp_dir_for(path)
    planner = FrozenSavePlanner(model, frozen=mode, base=base, checksums_by_fqn=sums, param_entries=params,
                                fingerprint=fingerprint_now, kinds=kinds)
    dcp.save(state, checkpoint_id=tmp, planner=planner)
    barrier()
    if rank() == 0:
        replace_dir(tmp, path)
    barrier()
    if mode == "include":
        set_frozen_base(model, {"path": path, "fingerprint": fingerprint_now})
    return path


# ----------------------------------------------------------------------------------------------- load
def _read_metadata(path: str) -> Metadata:
    try:
        return FileSystemReader(path).read_metadata()
    except Exception as e:  # noqa: BLE001 - any failure to read it means the same to the user
        raise CheckpointLayoutError(f"cannot read DCP metadata {os.path.join(path, '.metadata')!r}: {e}") from e


def _with_quantization(metadata: Metadata, manifest: dict[str, Any], keep: Any) -> dict[str, Spec]:
    """DCP metadata specs of the keys whose kind passes `keep`, with quantization from the manifest."""
    out = {}
    for key, spec in metadata_specs(metadata).items():
        kind, name = split_key(key)
        if not keep(kind):
            continue
        if kind in (FROZEN, TRAINABLE, BUFFERS):
            section = manifest["buffers" if kind == BUFFERS else "params"]
            spec = Spec(spec.shape, spec.dtype, quantization_label(section.get(name, {}).get("quantization")))
        out[key] = spec
    return out


def _nf4_resharded(
    sources: dict[str, Source], template: dict[str, tuple[str, Any]],
    key_map: dict[str, str],
) -> list[str]:
    """Template keys of NF4 weights saved in another number of shards. DCP cannot reshard them
    (torchao's NF4Tensor cannot be sliced at DCP's boundaries, aten.slice), so they are read whole
    and chunked again (`convert_on_load`). Decided from metadata alone, identically on every rank."""
    out = []
    for t, s in key_map.items():
        value = template[t][1]
        local = local_tensor(value)
        if not is_nf4(local):
            continue
        saved = len(sources[_source_of(s, sources)][1].state_dict_metadata[s].chunks)
        shards = value.device_mesh.size(value.device_mesh.ndim - 1) if hasattr(value, "device_mesh") else 1
        if saved != shards:
            out.append(t)
    return out


def _check_files(path: str, metadata: Metadata, keys: set[str]) -> None:
    """Every data file that holds one of `keys` exists and is long enough (no tensor read)."""
    need: dict[str, int] = {}
    for index, info in (metadata.storage_data or {}).items():
        if index.fqn in keys:
            need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for rel, size in sorted(need.items()):
        file = os.path.join(path, rel)
        have = os.path.getsize(file) if os.path.isfile(file) else None
        if have is None or have < size:
            what = "is missing" if have is None else f"is truncated ({have} bytes, needs {size})"
            raise CheckpointLayoutError(f"checkpoint file {file!r} {what}; nothing was loaded")


def _files_of(metadata: Metadata, keys: set[str]) -> dict[str, list[str]]:
    """Checkpoint key -> the data files holding its chunks."""
    out: dict[str, set[str]] = {}
    for idx, info in (metadata.storage_data or {}).items():
        if idx.fqn in keys:
            out.setdefault(idx.fqn, set()).add(info.relative_path)
    return {k: sorted(v) for k, v in out.items()}


def _staging(
    model_sd: dict[str, Any], optim_sd: dict[str, Any] | None, extra_specs: dict[str, Spec], kinds: dict[str, str]
) -> dict[str, Any]:
    """Empty tensors shaped and sharded like the targets: loads land here first, never half in the model.

    Frozen plain tensors are staged on the host (`host_like`): a load never holds a second copy of
    the frozen state on the model's device. Trainable state, buffers and optimizer state (small
    next to a frozen base) and NF4 frozen weights (packed, ~1/4 of bf16) are staged where they live.
    """

    def like(k: str, v: Any) -> Any:
        if not isinstance(v, torch.Tensor):
            return copy.deepcopy(v)
        if is_nf4(local_tensor(v)):
            return ao.nf4_clone(v)  # NF4Tensor has no zeros_like; a packed copy is small
        if kinds.get(k) == FROZEN:
            return host_like(v)
        return torch.zeros_like(v)

    staged: dict[str, Any] = {"model": {k: like(k, v) for k, v in model_sd.items()}}
    if optim_sd is not None:
        staged["optimizer"] = {
            "state": {p: {n: like("", v) for n, v in s.items()} for p, s in optim_sd["state"].items()},
            "param_groups": copy.deepcopy(optim_sd["param_groups"]),
        }
    extra = {}
    for key, spec in extra_specs.items():
        name = split_key(key)[1]
        extra[name] = torch.empty(spec.shape, dtype=getattr(torch, spec.dtype)) if spec.shape is not None else None
    if extra:
        staged["extra"] = extra
    return staged


def _template_specs(staged: dict[str, Any], kinds: dict[str, str]) -> dict[str, tuple[str, Any]]:
    flat, mappings = flatten_state_dict(staged)
    return {checkpoint_key(mappings[k], kinds): (k, flat[k]) for k in flat}


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    allow_freezing_change: bool = False,
    cast: bool = False,
    strict: bool = True,
) -> dict[str, Any]:
    """Load a checkpoint into `model` (and `optimizer`); return its `extra` entries.

    Before any tensor is read, the checkpoint's layout (its manifest and DCP metadata, and the
    frozen base it references) is compared with the model's: missing or extra parameters and
    buffers, shapes, frozen vs trainable, dtypes. Any difference raises `CheckpointLayoutError`
    listing all of them. Data files are checked for presence and length; tensors are then read
    into a staging copy (peak memory: one extra copy of the loaded shards), their checksums are
    compared with the manifest, and only then copied into the model and optimizer. On any error
    the model and optimizer are unchanged.

    Args:
        allow_freezing_change: a parameter frozen at save and trainable now gets zero-initialised
            optimizer state; one trainable at save and frozen now loses its optimizer state, with a
            warning naming it. Without it, a changed status is a difference.
        cast: convert dtypes on load; without it a dtype difference is an error, never a silent cast.
            It also converts quantized storage (see `convert_on_load`): a weight stored plain in the
            checkpoint and NF4 in the model is quantized with torchao at the model's block sizes (from
            a plain DCP checkpoint, i.e. a pretrained base without manifest, this happens without
            `cast`); an NF4 weight is dequantized into a plain model, or re-quantized at other block
            sizes. NF4 weights saved at another shard count are resharded bitwise, without `cast`.
        strict: for a plain DCP checkpoint (no manifest, e.g. a pretrained base saved with
            ``dcp.save(model.state_dict())``), ``strict=False`` leaves parameters it lacks (e.g. LoRA
            adapters) as they are. Checkpoints written by fsdp_frozen are always loaded strictly.

    A checkpoint saved with ``frozen="auto"`` that references a base reads the frozen parameters
    from that base, after checking its fingerprint; one saved with ``frozen="skip"`` leaves the
    model's frozen parameters as they are.
    """
    path = os.path.abspath(os.fspath(path))
    manifest = read_manifest(path)
    metadata = _read_metadata(path)
    sync_requires_grad(model)  # before state_dict reshards: [Note: stale requires_grad]
    kinds = model_kinds(model)
    model_sd = get_model_state_dict(model)
    # get_optimizer_state_dict gives a fresh optimizer zero state (DCP runs a step with lr=0); a refused
    # load must leave it fresh, so that state is dropped again on any error below.
    fresh_optimizer = optimizer is not None and not optimizer.state
    optim_sd = get_optimizer_state_dict(model, optimizer) if optimizer is not None else None
    try:
        return _load(Source(path, metadata, manifest), model, optimizer, kinds, model_sd, optim_sd,
                     _LoadOptions(allow_freezing_change=allow_freezing_change, cast=cast, strict=strict))
    except BaseException:
        if fresh_optimizer:
            optimizer.state.clear()
        raise


class Source(NamedTuple):
    """One checkpoint directory a load reads: its path, DCP metadata and manifest (None: plain DCP)."""

    path: str
    metadata: Metadata
    manifest: dict[str, Any] | None


@dataclass(frozen=True)
class _LoadOptions:
    allow_freezing_change: bool
    cast: bool
    strict: bool


def _load(
    own: Source, model: nn.Module, optimizer: torch.optim.Optimizer | None, kinds: dict[str, str],
    model_sd: dict[str, Any], optim_sd: dict[str, Any] | None, options: _LoadOptions,
) -> dict[str, Any]:
    """The load proper: layouts compared, files checked, tensors read into staging, checksums
    verified, then copied into the model and optimizer (see `load_checkpoint`)."""
    path, metadata, manifest = own
    allow_freezing_change, cast, strict = options.allow_freezing_change, options.cast, options.strict
    sources: dict[str, Source] = {"own": own}
    raw: dict[str, str] = {}  # plain checkpoints: our key -> the key DCP stored
    if manifest is None:
        saved = {}
        # Keys are FQNs (dcp.save(model.state_dict())) or "model.FQN" (dcp.save({"model": ...})); an
        # unsharded Hugging Face model's own FQNs start with "model." too, so count which reading fits.
        keys = list(metadata.state_dict_metadata)
        prefixed = sum(k.startswith("model.") and k[6:] in kinds for k in keys) > sum(k in kinds for k in keys)
        for key, spec in metadata_specs(metadata).items():
            if prefixed and not key.startswith("model."):
                continue  # other top-level entries (optimizer, ...) are not model state
            name = key[6:] if prefixed else key
            name = kinds.aliases.get(name, name)  # a base saved from a wrapped model (paths as keys)
            ours = f"{kinds.get(name, BUFFERS)}/{name}"  # not in the model: reported as unexpected below
            saved[ours], raw[ours] = Spec(spec.shape, spec.dtype), key  # a plain base: plain storage
        frozen_not_stored = False
    else:
        saved = _with_quantization(metadata, manifest, lambda kind: kind != FROZEN)
        if frozen_save(manifest) == "include":
            saved.update(_with_quantization(metadata, manifest, lambda kind: kind == FROZEN))
        elif frozen_save(manifest) == "reference":
            base_path, base_manifest = resolve_base(path, manifest)
            base_metadata = _read_metadata(base_path)
            sources["base"] = Source(base_path, base_metadata, base_manifest)
            saved.update(_with_quantization(base_metadata, base_manifest, lambda kind: kind == FROZEN))
        frozen_not_stored = frozen_save(manifest) == "skip"

    extra_specs = {k: s for k, s in saved.items() if split_key(k)[0] == EXTRA}
    staged = _staging(model_sd, optim_sd, extra_specs, kinds)
    template = _template_specs(staged, kinds)
    match = compare(
        {t: tensor_spec(v) for t, (_, v) in template.items()},
        saved,
        cast=cast,
        allow_freezing_change=allow_freezing_change,
        frozen_not_stored=frozen_not_stored,
        quantize=cast or manifest is None,
    )
    match.convert += _nf4_resharded(sources, template, {t: s for t, s in match.key_map.items() if t not in match.convert})
    if manifest is None:
        if optim_sd is not None:
            match.differences.insert(0, "a plain DCP checkpoint (no fsdp_frozen manifest) holds no optimizer "
                                        "state this function can map; pass optimizer=None")
        if not strict:
            match.differences = [d for d in match.differences if "is missing from the checkpoint" not in d]
        match.key_map = {t: raw[s] for t, s in match.key_map.items()}
    match.raise_if_different(f"checkpoint {path!r}")
    for name in match.dropped:
        warnings.warn(f"optimizer state of parameter {name!r} not loaded: trainable at save, frozen now", stacklevel=2)

    # Read: one DCP load per source directory, each given only the keys it holds; weights converted on
    # load are read whole, in batches, then converted into the staged shards.
    for source, (src_path, src_md, src_manifest) in sources.items():
        wanted = {t: s for t, s in match.key_map.items() if _source_of(s, sources) == source}
        if not wanted:
            continue
        _check_files(src_path, src_md, set(wanted.values()))
        whole = {t: s for t, s in wanted.items() if t in match.convert}
        try:
            if len(whole) < len(wanted):
                planner = FrozenLoadPlanner(model, cast=cast, key_map={t: s for t, s in wanted.items() if t not in whole})
                dcp.load(staged, checkpoint_id=src_path, planner=planner)
            if whole:
                params = {split_key(s)[1]: src_manifest["params"][split_key(s)[1]] for s in whole.values()} \
                    if src_manifest else {}
                nf4 = {s: (q["block_size"], q["scaler_block_size"]) for s in whole.values()
                       if (q := params.get(split_key(s)[1], {}).get("quantization"))}
                load_converted(
                    src_path, src_md, {s: (split_key(t)[1], template[t][1]) for t, s in whole.items()}, nf4,
                    {s: params[split_key(s)[1]].get("checksum", "") for s in whole.values() if params},
                )
        except CheckpointLayoutError:
            raise
        except Exception as e:  # noqa: BLE001 - DCP wraps per-rank failures; name the files involved
            files = sorted({f for fs in _files_of(src_md, set(wanted.values())).values() for f in fs})
            raise CheckpointLayoutError(
                f"reading checkpoint {src_path!r} failed (files {files}); the model was not changed: {e}"
            ) from e

    if manifest is not None:
        _verify_checksums(sources, template, match)

    loaded_model = {template[t][0].split(".", 1)[1]: template[t][1] for t in match.key_map
                    if split_key(t)[0] in (FROZEN, TRAINABLE, BUFFERS)}
    on_host = {k: v for k, v in loaded_model.items() if is_host_staged(v)}
    # set_model_state_dict first: its pre-hook reshards kept-gathered groups, so the host-staged frozen
    # shards copied in after it are what the next forward gathers.
    set_model_state_dict(model, {k: v for k, v in loaded_model.items() if k not in on_host},
                         options=StateDictOptions(strict=False))
    with torch.no_grad():
        for k, v in on_host.items():
            local_tensor(model_sd[k]).copy_(local_tensor(v))
    if optimizer is not None and "optimizer" in staged:
        set_optimizer_state_dict(model, optimizer, staged["optimizer"])
    record_base(model, path, manifest, sources)
    return dict(staged.get("extra", {}))


def _source_of(saved_key: str, sources: dict[str, Any]) -> str:
    """Frozen entries come from the base checkpoint when there is one; everything else from the own."""
    return "base" if "base" in sources and split_key(saved_key)[0] == FROZEN else "own"


def _verify_checksums(
    sources: dict[str, Source],
    template: dict[str, tuple[str, Any]],
    match: Any,
) -> None:
    """Compare checksums of what was read with the manifests' (one all-reduce)."""
    expected: dict[str, tuple[str, str]] = {}
    for t, s in match.key_map.items():
        kind, name = split_key(s)
        if kind not in (FROZEN, TRAINABLE, BUFFERS) or t in match.cast or t in match.convert:
            continue
        source = _source_of(s, sources)
        src_path, src_md, src_manifest = sources[source]
        section = src_manifest.get("buffers" if kind == BUFFERS else "params", {}) if src_manifest else {}
        want = section.get(name, {}).get("checksum")
        if want:
            files = _files_of(src_md, {s}).get(s, ["?"])
            expected[t] = (want, ", ".join(os.path.join(src_path, f) for f in files))
    got = checksums({t: template[t][1] for t in expected})
    bad = [f"{split_key(t)[1]!r} (in {file!r})" for t, (want, file) in expected.items() if got[t] != want]
    if bad:
        raise CheckpointLayoutError(
            f"checksum mismatch: data of {len(bad)} tensor(s) differs from what was saved (corrupted file?): "
            f"{', '.join(bad)}; the model was not changed"
        )
