"""`load_pretrained`: pretrained weights from Hugging Face safetensors into a sharded model, rank by rank.

The path a large model takes: build it on the meta device (``with torch.device("meta")`` or
``accelerate.init_empty_weights()``), optionally wrap it with PEFT, shard it with
`shard_with_freezing` (nothing is allocated yet), then::

    initialised = load_pretrained(model, "path/to/hf_model_dir")

Each rank allocates only its own shards on the mesh's device and reads only its own rows of each
weight from the safetensors files (``safe_open(...).get_slice``; the file is opened per tensor, so
its mmap never holds more than one tensor's pages). NF4 weights are the exception: torchao's NF4
quantization is global per weight (double quantization subtracts the mean of all block scalers), so
each rank reads such a weight whole, quantizes it on the mesh's device and keeps its chunk.

[Note: why not DCP's HuggingFaceStorageReader] It reads through one mmap per file kept open for the
whole load, so the pages of a rank's rows stay counted in its RSS: on a single-file model the peak
grew past the whole model per rank (measured on torch 2.13, see ``docs/pretrained.md``). Row slices
with the file reopened per tensor stay near the rank's own share.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from .. import _torch_compat as compat
from .. import _torchao_compat as ao
from .._torch_compat import local_tensor
from ..apply import sharded_state, sync_requires_grad
from ..errors import CheckpointLayoutError
from ..storage import is_nf4, materialize_meta, shard_device

logger = logging.getLogger("fsdp_frozen")

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_FILE = "model.safetensors"

#: safetensors dtype codes -> torch dtypes
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}

#: Segments PEFT inserts into a wrapped model's names (the file has the base model's names).
_PEFT_PREFIX = "base_model.model."
_PEFT_SEGMENTS = (".base_layer", ".original_module", ".modules_to_save.default")
#: PEFT adapter containers: the segment after them is the adapter name.
_LORA_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
_IA3_PARTS = ("ia3_l",)

KeyMap = Callable[[str], "str | None"]


@dataclass(frozen=True)
class _FileTensor:
    file: str  #: the safetensors file holding it, or the DCP checkpoint directory
    shape: tuple[int, ...]
    dtype: torch.dtype
    key: str = ""  #: the key it is stored under, where that differs from its name (DCP "model." prefix)
    #: a tensor the file holds in pieces ([Note: per-expert files]): for each index of dim 0, the
    #: (name, file tensor) pieces concatenated along their dim 0 to make that slice
    parts: tuple[tuple[tuple[str, "_FileTensor"], ...], ...] = ()


#: [Note: per-expert files] transformers >= 5 fuses a MoE block's experts into 3-D parameters
#: (``mlp.experts.gate_up_proj``: E x 2I x H, ``mlp.experts.down_proj``: E x H x I), while the
#: checkpoints users have (and ``save_pretrained`` writes) keep one tensor per expert; its loader
#: converts them (``transformers/conversion_mapping.py``, checked on 5.24: ``"mixtral"`` renames
#: ``.block_sparse_moe.`` to ``.mlp.`` and stacks ``experts.E.w1`` / ``w3`` concatenated, and ``w2``;
#: ``"qwen2_moe"`` and the models mapped to it do the same with ``gate_proj`` / ``up_proj`` and
#: ``down_proj``). A fused parameter the file lacks is read from those pieces, each rank reading
#: only its experts (FSDP shards dim 0, the experts).
_EXPERT_PIECES = {"gate_up_proj": (("w1", "w3"), ("gate_proj", "up_proj")), "down_proj": (("w2",), ("down_proj",))}
_MOE_RENAMES = ((".mlp.", ".block_sparse_moe."),)


def _per_expert(name: str, index: dict[str, _FileTensor]) -> tuple[str, _FileTensor] | None:
    """(file name, file tensor) behind `name` when the file keeps it in the per-expert layout
    ([Note: per-expert files]): the renamed router, or a fused experts tensor read from its pieces
    (a virtual entry, named `name`); None if `name` is neither or the file has no pieces that stack."""
    head, _, leaf = name.rpartition(".")
    olds = [head.replace(new, old) for new, old in _MOE_RENAMES if new in f"{head}."]
    if leaf == "weight" and head.endswith(".mlp.gate"):  # the router, renamed only
        return next(((f"{o}.weight", index[f"{o}.weight"]) for o in olds if f"{o}.weight" in index), None)
    if leaf not in _EXPERT_PIECES or not head.endswith(".experts"):
        return None
    for prefix in (head, *olds):
        for pieces in _EXPERT_PIECES[leaf]:
            parts: list[tuple[tuple[str, _FileTensor], ...]] = []
            while all(f"{prefix}.{len(parts)}.{p}.weight" in index for p in pieces):
                e = len(parts)
                parts.append(tuple((f"{prefix}.{e}.{p}.weight", index[f"{prefix}.{e}.{p}.weight"]) for p in pieces))
            infos = [info for row in parts for _, info in row]
            rows = {sum(info.shape[0] for _, info in row) for row in parts}
            if not parts or len(rows) != 1 or len({(i.shape[1:], i.dtype) for i in infos}) != 1:
                continue
            return name, _FileTensor(infos[0].file, (len(parts), rows.pop(), *infos[0].shape[1:]), infos[0].dtype,
                                     parts=tuple(parts))
    return None


def safetensors_index(path: str | os.PathLike) -> dict[str, _FileTensor]:
    """Every tensor of a Hugging Face safetensors model: name -> (file, shape, dtype). Headers only.

    `path` is a directory holding ``model.safetensors`` or ``model.safetensors.index.json`` plus its
    shards, or one ``.safetensors`` file.
    """
    from safetensors import safe_open

    path = os.fspath(path)
    if os.path.isfile(path) and path.endswith(".safetensors"):
        files, wanted = [path], None
    elif os.path.isfile(os.path.join(path, SAFETENSORS_INDEX)):
        index_file = os.path.join(path, SAFETENSORS_INDEX)
        try:
            with open(index_file) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointLayoutError(f"cannot read safetensors index {index_file!r}: {e}") from e
        files = sorted({os.path.join(path, f) for f in weight_map.values()})
        wanted = {k: os.path.join(path, f) for k, f in weight_map.items()}
    elif os.path.isfile(os.path.join(path, SAFETENSORS_FILE)):
        files, wanted = [os.path.join(path, SAFETENSORS_FILE)], None
    else:
        raise CheckpointLayoutError(
            f"{path!r} holds no Hugging Face safetensors model: expected {SAFETENSORS_FILE!r} or "
            f"{SAFETENSORS_INDEX!r} (save one with save_pretrained(..., safe_serialization=True)), "
            f"or pass a .safetensors file"
        )
    out: dict[str, _FileTensor] = {}
    for file in files:
        if not os.path.isfile(file):
            raise CheckpointLayoutError(f"safetensors shard {file!r} named by the index is missing")
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    dtype = _ST_DTYPES.get(sl.get_dtype())
                    if dtype is None:
                        raise CheckpointLayoutError(f"tensor {name!r} in {file!r} has dtype {sl.get_dtype()}, "
                                                    f"which fsdp_frozen cannot load")
                    out[name] = _FileTensor(file, tuple(sl.get_shape()), dtype)
        except CheckpointLayoutError:
            raise
        except Exception as e:  # noqa: BLE001 - a corrupt header, a truncated file, ...
            raise CheckpointLayoutError(f"cannot read safetensors file {file!r}: {e}") from e
    if wanted is not None:
        lost = sorted(k for k, f in wanted.items() if k not in out or out[k].file != f)
        if lost:
            raise CheckpointLayoutError(f"the safetensors index of {path!r} names tensors its shards do not hold: "
                                        f"{lost[:10]}{' ...' if len(lost) > 10 else ''}")
    return out


def dcp_index(path: str) -> dict[str, _FileTensor]:
    """Every tensor of a plain DCP checkpoint (``dcp.save(model.state_dict())``, or under a "model"
    key): name -> (directory, shape, dtype). Metadata only."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        metadata = FileSystemReader(path).read_metadata()
    except Exception as e:  # noqa: BLE001 - any failure to read it means the same to the user
        raise CheckpointLayoutError(f"cannot read DCP metadata {os.path.join(path, '.metadata')!r}: {e}") from e
    tensors = {k: md for k, md in metadata.state_dict_metadata.items() if isinstance(md, TensorStorageMetadata)}
    prefixed = bool(tensors) and all(k.startswith("model.") for k in tensors)
    return {(k[len("model."):] if prefixed else k): _FileTensor(path, tuple(md.size), md.properties.dtype, k)
            for k, md in tensors.items()}


def pretrained_index(path: str | os.PathLike) -> dict[str, _FileTensor]:
    """The tensors of a pretrained model: a DCP checkpoint directory (it has ``.metadata``) or a
    Hugging Face safetensors model (`safetensors_index`)."""
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, ".metadata")):
        return dcp_index(path)
    return safetensors_index(path)


def file_candidates(name: str) -> list[str]:
    """File names a model tensor may have: its own, then without PEFT's prefix and inserted segments."""
    out = [name]
    base = name[len(_PEFT_PREFIX):] if name.startswith(_PEFT_PREFIX) else name
    for segment in _PEFT_SEGMENTS:
        base = base.replace(segment + ".", ".")
    if base not in out:
        out.append(base)
    return out


@dataclass(eq=False)
class _Target:
    names: tuple[str, ...]  #: canonical names (tied parameters have several)
    path: str  #: module path of the tensor
    kind: str  #: "frozen", "trainable" or "buffer"
    file_name: str | None = None


def _targets(model: nn.Module, state: Any) -> list[_Target]:
    names, plan = state.plan.names, state.plan
    out = [_Target(tied, names.params[primary], "frozen" if primary in plan.frozen else "trainable")
           for primary, tied in names.tied.items()]
    out += [_Target((n,), path, "buffer") for n, path in names.buffers.items() if not n.endswith("_extra_state")]
    return out


def _is_meta(t: torch.Tensor) -> bool:
    local = local_tensor(t)
    return ao.nf4_is_meta(local) if is_nf4(local) else local.is_meta


def _tensor(model: nn.Module, target: _Target) -> torch.Tensor:
    return model.get_buffer(target.path) if target.kind == "buffer" else model.get_parameter(target.path)


def _adapter_of(model: nn.Module, path: str, parts: tuple[str, ...]) -> tuple[str, str | None] | None:
    """(layer path, adapter name) if `path` lies in one of the adapter containers `parts` of a layer;
    the adapter name is the key under a PEFT ``ModuleDict`` / ``ParameterDict`` (None otherwise)."""
    segments = path.split(".")
    for i in range(len(segments) - 2, -1, -1):
        if segments[i] in parts:
            layer_path = ".".join(segments[:i])
            container = getattr(model.get_submodule(layer_path), segments[i], None)
            keyed = isinstance(container, (nn.ModuleDict, nn.ParameterDict))
            return layer_path, segments[i + 1] if keyed else None
    return None


def _peft_init_lora(model: nn.Module, adapter: str | None) -> Any:
    configs = getattr(model, "peft_config", None)
    config = configs.get(adapter) if isinstance(configs, dict) and adapter is not None else None
    return getattr(config, "init_lora_weights", True) if config is not None else True


def _initialiser(model: nn.Module, target: _Target) -> tuple[str, Callable[[], None]] | str:
    """(key, init function) for a trainable tensor the file lacks, or why there is none.

    A tensor inside a layer's LoRA containers (``lora_A``, ``lora_B``, ...) gets the layer's
    ``reset_lora_parameters(adapter, init_lora_weights)`` (PEFT's: A kaiming, B zero;
    ``init_lora_weights`` from the model's ``peft_config``); an IA3 vector its layer's
    ``reset_ia3_parameters(adapter)`` (ones); DoRA's magnitude is computed from the base weight later;
    anything else its module's ``reset_parameters()``. The key deduplicates layers shared by tensors.
    """
    lora = _adapter_of(model, target.path, _LORA_PARTS)
    if lora is not None:
        layer_path, adapter = lora
        layer = model.get_submodule(layer_path)
        container = target.path[len(layer_path) + 1 if layer_path else 0:].split(".")[0]
        if container == "lora_magnitude_vector":
            return f"dora:{target.path}", lambda: None  # filled from the base weight's rows
        if callable(getattr(layer, "reset_lora_parameters", None)):
            init = _peft_init_lora(model, adapter)
            return f"lora:{layer_path}:{adapter}", lambda: layer.reset_lora_parameters(adapter, init)
    ia3 = _adapter_of(model, target.path, _IA3_PARTS)
    if ia3 is not None:
        layer_path, adapter = ia3
        layer = model.get_submodule(layer_path)
        if callable(getattr(layer, "reset_ia3_parameters", None)):
            return f"ia3:{layer_path}:{adapter}", lambda: layer.reset_ia3_parameters(adapter)
    owner_path = target.path.rpartition(".")[0]
    owner = model.get_submodule(owner_path)
    if callable(getattr(owner, "reset_parameters", None)):
        return f"reset:{owner_path}", owner.reset_parameters
    return (f"{target.names[0]!r} is not in the file and its module {type(owner).__name__} ({owner_path or '<root>'!r}) "
            f"has no reset_parameters(); give it one, or map it to a file tensor with key_map")


def _buffer_initialiser(model: nn.Module, target: _Target) -> Callable[[], None] | None:
    """How to recompute a buffer a meta build left empty: transformers' ``_init_weights`` for its
    modules without parameters (rotary ``inv_freq``), torchtune's ``rope_init``, ``reset_parameters``."""
    owner_path = target.path.rpartition(".")[0]
    owner = model.get_submodule(owner_path)
    if any(True for _ in owner.parameters(recurse=False)):
        return None
    for fn in ("rope_init", "reset_parameters"):
        if callable(getattr(owner, fn, None)):
            return getattr(owner, fn)
    segments = owner_path.split(".") if owner_path else []
    for i in range(len(segments), -1, -1):  # the nearest transformers PreTrainedModel above it
        ancestor = model.get_submodule(".".join(segments[:i]))
        if callable(getattr(ancestor, "_init_weights", None)) and hasattr(ancestor, "config"):
            return lambda: ancestor._init_weights(owner)
    return None


def _chunk_index(t: torch.Tensor) -> tuple[slice, ...] | None:
    """This rank's slice of the global tensor (None: nothing here); the whole tensor if not a DTensor."""
    if not isinstance(t, DTensor):
        return tuple(slice(0, s) for s in t.shape)
    local = local_tensor(t)
    if local.numel() == 0:
        return None
    (chunk,) = compat.chunk_list(t)
    return tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes))


def _read(info: _FileTensor, name: str, index: tuple[slice, ...] | None) -> torch.Tensor:
    """Rows (or the whole tensor when `index` is None) of one file tensor, on the host; a safetensors
    file is open only here. A DCP tensor is read whole (`_fill_dcp` reads shards in place instead)."""
    if info.parts:  # [Note: per-expert files]: this rank's experts, each from its pieces
        experts = range(len(info.parts))[index[0]] if index is not None else range(len(info.parts))
        whole = torch.stack([torch.cat([_read(piece, n, None) for n, piece in info.parts[e]]) for e in experts])
        return whole if index is None else whole[(slice(None), *index[1:])]
    if info.key:  # DCP
        import torch.distributed.checkpoint as dcp

        whole = {info.key: torch.empty(info.shape, dtype=info.dtype)}
        dcp.load(whole, checkpoint_id=info.file, no_dist=True)
        return whole[info.key] if index is None else whole[info.key][index]
    from safetensors import safe_open

    with safe_open(info.file, framework="pt") as f:
        if index is None:
            return f.get_tensor(name)
        return f.get_slice(name)[index]


def load_pretrained(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    key_map: KeyMap | None = None,
    seed: int = 0,
) -> list[str]:
    """Load pretrained weights from a Hugging Face safetensors model into a sharded model.

    Args:
        model: sharded with `shard_with_freezing`, its parameters on the meta device (built under
            ``torch.device("meta")``, or with real buffers as ``accelerate.init_empty_weights()``
            does) or already materialized. Meta shards are allocated on the mesh's device (CUDA
            when the mesh is on CUDA), real buffers are kept.
        path: a directory with ``model.safetensors`` or ``model.safetensors.index.json`` and its
            shards (``save_pretrained``), one ``.safetensors`` file, or a plain DCP checkpoint
            (``dcp.save(model.state_dict())``, keys optionally under ``"model"``; then the call is
            collective and DCP reads each rank's chunks).
        key_map: ``key_map(model_name) -> file_name or None``, tried first for every canonical
            parameter and buffer name; None falls back to the automatic mapping: the name itself,
            then without PEFT's ``base_model.model.`` prefix and its inserted ``.base_layer``,
            ``.original_module`` and ``.modules_to_save.default`` segments (LoRA, DoRA, IA3).
        seed: seeds the random init of tensors the file lacks. They are initialised whole, on the
            host, with the same generator state on every rank, and each rank keeps its chunk: the
            values do not depend on the world size (DTensor's own random init is not coordinated
            across ranks on a CPU mesh: every shard would get the same numbers).

    Returns:
        The canonical names initialised rather than loaded (trainable tensors the file lacks, e.g.
        adapters or a new head, and recomputed buffers), also logged on rank 0.

    What it guarantees:

    * Before anything is allocated or written, every problem is raised in one
      `CheckpointLayoutError`: a frozen parameter or persistent buffer the file lacks, a file
      tensor nothing maps to, a shape mismatch, a float/non-float dtype mismatch, a trainable
      tensor without an initialiser, a meta buffer nothing can recompute.
    * Float dtypes convert on the way in (an fp32 or bf16 file into bf16 frozen shards), and NF4
      weights are quantized from the file's values in the NF4 weights' dtype (the compute dtype),
      each rank its own rows ([Note: NF4 from row chunks]: one all-gather of block maxima per
      weight): bitwise the shards `shard_with_freezing` gives a model loaded with ``from_pretrained``.
    * Trainable tensors the file lacks get their module's own init: PEFT's LoRA init (A kaiming,
      B zero; ``init_lora_weights`` from the model's ``peft_config``), IA3's ones, DoRA's magnitude
      (the base weight's row norms, read from the file), else ``reset_parameters()``. Buffers a meta
      build left empty are recomputed (transformers' ``_init_weights`` for rotary ``inv_freq``,
      torchtune's ``rope_init``, ``reset_parameters``).

    Cost: each rank reads its own rows of every weight, one tensor at a time; peak host memory beyond
    the rank's shards is about one tensor's rows. Collectives for safetensors: one small all-gather
    per sharded NF4 weight (its block maxima); every rank reads the same headers and decides alike.
    NF4 weights kept out of FSDP (shard size 1) and DCP sources are read whole.
    """
    state = sharded_state(model)
    path = os.fspath(path)
    index = pretrained_index(path)
    targets = _targets(model, state)
    problems = _map_to_file(model, targets, index, key_map)
    inits, buffer_inits, dora, initialised, more = _initialisers(model, targets)
    problems += more
    if problems:
        raise CheckpointLayoutError(
            f"cannot load pretrained weights from {path!r} into {type(model).__name__} ({len(problems)} "
            f"problem(s); nothing was allocated or written):\n  - " + "\n  - ".join(problems))

    device = shard_device(state.mesh)
    materialize_meta(model, device)
    sync_requires_grad(model)  # before the reshard: [Note: stale requires_grad]
    for module in model.modules():  # kept-gathered groups must re-gather from the new shards
        if compat.has_fsdp_state(module):
            module.reshard()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="DTensor random operators may not have complete support")
        for init, paths in inits.values():
            _init_unsharded(model, paths, init, seed)
        _read_all(model, [t for t in targets if t.file_name is not None], index, path, device)
        for target, (base_name, fan_in_fan_out) in dora.items():
            _fill_dora(_tensor(model, target), base_name, fan_in_fan_out, index, device)
        for init in buffer_inits:
            init()
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        logger.info("load_pretrained(%s): %d tensors loaded, %d initialised: %s", path,
                    sum(t.file_name is not None for t in targets), len(initialised), initialised)
    return initialised


def _map_to_file(model: nn.Module, targets: list[_Target], index: dict[str, _FileTensor],
                 key_map: KeyMap | None) -> list[str]:
    """Set each target's file name (key_map first, then `file_candidates`); the problems found:
    shapes, dtypes, frozen parameters the file lacks, file tensors nothing maps to."""
    problems: list[str] = []
    for target in targets:
        tensor = _tensor(model, target)
        for name in target.names:
            mapped = key_map(name) if key_map is not None else None
            if mapped is not None and mapped not in index:
                problems.append(f"key_map maps {name!r} to {mapped!r}, which the file does not hold")
                break
            hit = mapped if mapped is not None else next((c for c in file_candidates(name) if c in index), None)
            if hit is None:  # [Note: per-expert files]
                found = next((f for f in map(lambda c: _per_expert(c, index), file_candidates(name)) if f), None)
                if found is not None:
                    hit = found[0]
                    index.setdefault(hit, found[1])
            if hit is not None:
                target.file_name = hit
                break
        if target.file_name is None:
            continue
        info = index[target.file_name]
        if tuple(info.shape) != tuple(tensor.shape):
            problems.append(f"shape of {target.names[0]!r}: model {tuple(tensor.shape)}, file {target.file_name!r} "
                            f"{info.shape}")
        elif info.dtype.is_floating_point != tensor.dtype.is_floating_point or (
                not info.dtype.is_floating_point and info.dtype != tensor.dtype):
            problems.append(f"dtype of {target.names[0]!r}: model {tensor.dtype}, file {target.file_name!r} {info.dtype} "
                            f"(only float-to-float conversions happen on load)")
    tie_hint = ("; if the model ties it to another weight, tie them before shard_with_freezing "
                "(model.tie_weights(): accelerate.init_empty_weights() unties them)"
                if getattr(getattr(model, "config", None), "tie_word_embeddings", False) else "")
    problems += [f"frozen parameter {t.names[0]!r} is missing from the file (it would keep a random init forever)"
                 f"{tie_hint}" for t in targets if t.file_name is None and t.kind == "frozen"]
    used = {t.file_name for t in targets}
    used |= {piece for t in targets if t.file_name is not None for row in index[t.file_name].parts for piece, _ in row}
    problems += [f"file tensor {n!r} matches no parameter or buffer of the model (map it with key_map)"
                 for n in sorted(set(index) - used)]
    return problems


def _initialisers(model: nn.Module, targets: list[_Target]) -> tuple[
        dict[str, tuple[Callable[[], None], list[str]]], list[Callable[[], None]], dict[_Target, tuple[str, bool]],
        list[str], list[str]]:
    """How every tensor the file lacks gets its value: (inits: key -> (init, paths it sets), buffer
    inits, DoRA magnitudes -> (base weight's file name, fan_in_fan_out), the names initialised, problems)."""
    inits: dict[str, tuple[Callable[[], None], list[str]]] = {}
    buffer_inits: list[Callable[[], None]] = []
    dora: dict[_Target, tuple[str, bool]] = {}
    initialised: list[str] = []
    problems: list[str] = []
    for target in targets:
        if target.file_name is not None or target.kind == "frozen":
            continue
        if target.kind == "buffer":
            if not _is_meta(_tensor(model, target)):
                continue  # a real buffer (params-only meta build): kept as it is
            module = model.get_submodule(target.path.rpartition(".")[0])
            persistent = compat.is_persistent_buffer(module, target.path.rpartition(".")[2])
            init = None if persistent else _buffer_initialiser(model, target)
            if init is None:
                problems.append(
                    f"buffer {target.names[0]!r} is on the meta device and not in the file, and nothing can "
                    f"recompute it; build buffers on a real device (accelerate.init_empty_weights() keeps them "
                    f"real) or give its module reset_parameters()")
            else:
                buffer_inits.append(init)
                initialised.append(target.names[0])
            continue
        found = _initialiser(model, target)
        if isinstance(found, str):
            problems.append(found)
            continue
        key, init = found
        if key.startswith("dora:"):
            base = _dora_base(model, target, targets)
            if isinstance(base, str):
                problems.append(base)
                continue
            dora[target] = base
        else:
            inits.setdefault(key, (init, []))[1].append(target.path)
        initialised.append(target.names[0])
    return inits, buffer_inits, dora, initialised, problems


def _read_all(model: nn.Module, loaded: list[_Target], index: dict[str, _FileTensor], path: str,
              device: torch.device) -> None:
    """Fill every target the file holds: one collective DCP read for a DCP source (each rank reads the
    chunks of its own shards; NF4 weights whole), else row slices per tensor (NF4 too, quantized by
    `nf4_quantize_chunk_`, collective: every rank fills the same targets in the same order)."""
    dcp_targets = {index[t.file_name].key: _tensor(model, t) for t in loaded
                   if index[t.file_name].key and not is_nf4(local_tensor(_tensor(model, t)))}
    if dcp_targets:
        import torch.distributed.checkpoint as dcp

        dcp.load(dcp_targets, checkpoint_id=path)
    for target in loaded:
        info = index[target.file_name]
        if info.key not in dcp_targets:
            _fill(_tensor(model, target), info, target.file_name, device)


def _init_unsharded(model: nn.Module, paths: list[str], init: Callable[[], None], seed: int) -> None:
    """Run `init` with the tensors at `paths` swapped for whole host tensors, then keep this rank's chunk.

    The seed is derived from `seed` and the first path, so every rank draws the same numbers for the
    same tensor whatever ran before; the sharded Parameters FSDP holds are put back unchanged.
    """
    import zlib

    swapped = []
    for path in paths:
        parent, _, leaf = path.rpartition(".")
        module = model.get_submodule(parent)
        param = module.get_parameter(leaf)
        whole = nn.Parameter(torch.empty(param.shape, dtype=param.dtype), requires_grad=param.requires_grad)
        compat.swap_parameter(module, leaf, whole)
        swapped.append((module, leaf, param, whole))
    try:
        # the host generator only: the inits run on host tensors, and torch.manual_seed would also
        # reseed every CUDA generator, which fork_rng(devices=[]) does not restore
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed + zlib.crc32(paths[0].encode()))
            init()
    finally:
        for module, leaf, param, _ in swapped:
            compat.swap_parameter(module, leaf, param)
    for _, _, param, whole in swapped:
        index = _chunk_index(param)
        if index is not None:
            local_tensor(param).copy_(whole.detach()[index] if isinstance(param, DTensor) else whole.detach())


def _dora_base(model: nn.Module, magnitude: _Target, targets: list[_Target]) -> tuple[str, bool] | str:
    """(file name of the base weight, fan_in_fan_out) for a DoRA magnitude vector, or why not."""
    layer_path, adapter = _adapter_of(model, magnitude.path, _LORA_PARTS)  # type: ignore[misc]
    layer = model.get_submodule(layer_path)
    init = _peft_init_lora(model, adapter)
    if init is False:
        return (f"DoRA magnitude {magnitude.names[0]!r}: with init_lora_weights=False it depends on the random "
                f"LoRA weights; initialise adapters with init_lora_weights=True or 'gaussian' (lora_B = 0)")
    base_path = f"{layer_path}.base_layer.weight"
    base = next((t for t in targets if t.path == base_path and t.file_name is not None), None)
    if base is None:
        return f"DoRA magnitude {magnitude.names[0]!r}: its base weight {base_path!r} is not loaded from the file"
    return base.file_name, bool(getattr(layer, "fan_in_fan_out", False))


def _fill(tensor: torch.Tensor, info: _FileTensor, name: str, device: torch.device) -> None:
    """Copy this rank's part of the file tensor `name` into `tensor` (a shard, a plain tensor, NF4)."""
    local = local_tensor(tensor)
    if is_nf4(local):
        if not info.key:  # [Note: NF4 from row chunks]: this rank's rows only (a plain NF4Tensor, kept out of
            # FSDP at shard size 1, is the whole weight), quantized a chunk of blocks at a time
            index = _chunk_index(tensor) if isinstance(tensor, DTensor) else None
            ao.nf4_quantize_chunk_(tensor, _read(info, name, index).to(device=device))
        else:  # a DCP source is read whole anyway
            ao.nf4_copy_chunk_(tensor, _read(info, name, None).to(device=device, dtype=local.dtype))
        return
    index = _chunk_index(tensor)
    if index is None:
        return
    rows = _read(info, name, index if isinstance(tensor, DTensor) else None)
    local.copy_(rows.to(local.dtype))


def _fill_dora(magnitude: torch.Tensor, base_name: str, fan_in_fan_out: bool, index: dict[str, _FileTensor],
               device: torch.device) -> None:
    """DoRA's magnitude with lora_B = 0: the L2 norm of each output row of the base weight, in the
    magnitude's dtype (PEFT's ``DoraLinearLayer.update_layer``), from this rank's rows of the file."""
    local = local_tensor(magnitude)
    chunk = _chunk_index(magnitude)
    if chunk is None:
        return
    (rows,) = chunk
    sl = (slice(None), rows) if fan_in_fan_out else (rows,)
    weight = _read(index[base_name], base_name, sl).to(device=device, dtype=local.dtype)
    if fan_in_fan_out:
        weight = weight.T
    local.copy_(torch.linalg.norm(weight, dim=1).to(local.dtype))


__all__ = ["file_candidates", "load_pretrained", "pretrained_index", "safetensors_index"]
