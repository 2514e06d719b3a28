"""`FreezePolicy`: the validated configuration of `shard_with_freezing`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import torch

from .errors import PolicyError

#: Named reshard policies of frozen groups (an int N is also accepted: reshard to N-rank groups).
FROZEN_RESHARD_NAMES = ("after_forward", "after_backward", "never", "auto")
#: Storage formats a frozen shard may be converted to at sharding time ("nf4": torchao NF4Tensor).
FROZEN_DTYPES = ("bfloat16", "float16", "float32", "nf4", "float8_e4m3fn")
#: Formats that are not a float storage dtype: their dense leftovers are stored in `param_dtype`.
QUANTIZED_DTYPES = ("nf4", "float8_e4m3fn")
#: Mixed-precision dtypes of `param_dtype` / `reduce_dtype`.
MP_DTYPES = ("bfloat16", "float16", "float32")

#: Where trainable parameters live (see `FreezePolicy.trainable_grouping`).
TRAINABLE_GROUPINGS = ("auto", "per_unit", "root", "replicate")

#: A frozen_reshard value: one of FROZEN_RESHARD_NAMES, or an int N (reshard to N-rank groups).
ReshardValue = Union[Literal["after_forward", "after_backward", "never", "auto"], int]


def _dtype_name(key: str, value: Any, allowed: tuple[str, ...]) -> str | None:
    if value is None:
        return None
    if isinstance(value, torch.dtype):
        value = str(value).removeprefix("torch.")
    if not isinstance(value, str) or value not in allowed:
        raise PolicyError(f"FreezePolicy.{key}={value!r} is not allowed; use None or one of {list(allowed)}")
    return value


def _patterns(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise PolicyError(f"FreezePolicy.{key} must be a list of non-empty strings, got {value!r}")
    return tuple(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class FreezePolicy:
    """How `shard_with_freezing` splits and shards a model.

    Attributes:
        units: Submodules that become FSDP units, as dotted FQN globs (``"layers.*"``; ``*`` stays
            within one segment, ``**`` spans several) or module class names (``"TransformerBlock"``).
            The root module is always a unit and takes every parameter no other unit took.
        freeze / unfreeze: Parameter-FQN globs whose ``requires_grad`` is set to False / True before
            sharding (``unfreeze`` wins). Without them, ``requires_grad`` as the user left it decides.
        frozen_reshard: What frozen groups do after forward. ``"after_forward"`` (default, FSDP's
            memory: two all-gathers per step; the root's frozen group, like FSDP's root, is kept
            until backward ends instead, since backward needs it at once), ``"after_backward"``
            (kept from forward until backward is done: one all-gather per step), ``"never"`` (gathered at first use and kept: no frozen
            communication in steady state, at the cost of the unsharded frozen bytes per rank), an int
            N (reshard to N-rank groups after forward, as FSDP's int ``reshard_after_forward``), or
            ``"auto"`` (keep gathered the groups that fit in ``frozen_budget_bytes``, largest saving
            first; ``"after_forward"`` for the rest). At shard size 1 it changes nothing for groups
            stored in the dtype they compute in: they are kept whole outside FSDP, whose world-size-1
            "all-gather" is a copy ([Note: whole frozen groups] in plan.py).
        frozen_budget_bytes: Per-rank bytes of gathered weights ``"auto"`` may keep: trainable
            groups gathered for the whole step (the root's; every adapter under
            ``trainable_grouping="root"``) are charged first, the rest goes to frozen groups kept
            gathered (``"never"``), largest first. `describe` says what each group got and why.
        trainable_reshard: FSDP's ``reshard_after_forward`` for trainable groups (None: True for
            non-root units, False for the root).
        trainable_grouping: Where trainable parameters live. ``"auto"`` (default): ``"replicate"``
            when the trainable parameters' whole state (parameters, gradients, AdamW moments,
            ``param_dtype`` copies) fits in the largest unit other than the root's gathered bytes,
            else ``"root"`` when they fit gathered, else ``"per_unit"``; ``"root"`` where
            ``"replicate"`` cannot take them (tensor-parallel adapters; the torch < 2.12 fallback with
            frozen parameters beside trainable ones on the root); `describe` says which and why. ``"per_unit"`` (plain FSDP2's
            layout: each unit's trainable group is gathered in its forward, resharded, re-gathered in
            its backward and reduce-scattered there, overlapping with compute; right for large
            trainable sets such as full fine-tuning) or ``"root"``: every unit's trainable
            parameters form one group owned by the root, gathered once per step (twice with
            ``trainable_reshard=True``) and reduce-scattered once at the end of backward. For
            adapters (LoRA, DoRA, IA3) this removes all per-unit trainable collectives and hooks;
            it costs the unsharded trainable bytes on every rank for the whole step (`describe`
            shows them) and gives up the overlap of gradient reduction with backward. Frozen
            groups keep their units and policies. ``"replicate"``: trainable parameters are not
            sharded: every rank holds them whole (plain tensors, no DTensor), computes with a
            ``param_dtype`` copy refreshed once per forward, and averages the gradients with one
            all-reduce per step at the end of backward (two under HSDP), as DDP would; the
            optimizer then steps plain tensors. Fastest for adapters (no trainable all-gather, no
            per-parameter FSDP work, no DTensor dispatch in the optimizer); it costs the whole
            trainable parameters, gradients and optimizer state on every rank (`describe` shows
            the bytes), so it suits small trainable sets only. Under it a ``"never"`` frozen group
            stored in its compute dtype (not NF4) leaves FSDP too: whole on every rank from the
            start, never communicated, without FSDP's shard copy beside it, and a unit left with
            nothing for FSDP gets no fully_shard call (no per-unit hooks). See
            ``docs/grouping.md``. ``"root"``
            and ``"replicate"`` need ``fully_shard(ignored_params=...)``, torch >= 2.7. The
            checkpoint keys do not depend on the grouping, and a checkpoint saved under one loads
            under any other.
        frozen_dtype: Storage dtype of frozen shards, converted once at sharding time (None keeps the
            original dtype). Must equal ``param_dtype`` unless it is ``"float32"`` or ``"nf4"``.
            ``"nf4"``: frozen ``nn.Linear`` weights are quantized once with torchao (`to_nf4`),
            stored and all-gathered packed (about 0.53 bytes per element) and dequantized to the
            compute dtype in the linear; frozen parameters NF4 cannot hold (norms, embeddings, shapes
            whose quantization blocks do not split evenly over the shard size) are stored in
            ``param_dtype`` and listed by `describe`. Not with an int ``frozen_reshard``.
            ``"float8_e4m3fn"`` is refused at sharding time: gloo cannot all-gather float8, and
            float8 frozen storage is not implemented for other backends.
        nf4_block_size / nf4_scaler_block_size: torchao's NF4 block sizes (elements per scaler,
            scalers per double-quantization factor).
        param_dtype / reduce_dtype: FSDP ``MixedPrecisionPolicy`` of the groups.
        coalesce_frozen: A unit's frozen group that would reshard exactly as its trainable group
            (``"after_forward"`` beside FSDP's default ``reshard_after_forward=True``; the root's, kept
            until backward ends, beside the root's trainable ``False``), gathered in the same dtype and
            not NF4, joins that FSDP group: one all-gather for both instead of two, as plain FSDP2.
            Costs one unit's gathered bytes at peak: FSDP2 holds the latest all-gather's output until
            the next group's, which is then the whole unit's rather than its small trainable group's
            (+1.6 GiB per rank for a Llama-3-70B block in bf16). False (default): the split, lower
            peak; True: fewer collectives (at 80 tiny blocks: 0.94-0.97x plain FSDP2's step instead of
            1.21-1.29x). `describe` marks such groups "frozen (merged)". [Note: merged frozen groups]
    """

    units: tuple[str, ...] = ()
    freeze: tuple[str, ...] = ()
    unfreeze: tuple[str, ...] = ()
    frozen_reshard: ReshardValue = "after_forward"
    frozen_budget_bytes: int | None = None
    trainable_reshard: bool | int | None = None
    trainable_grouping: Literal["auto", "per_unit", "root", "replicate"] = "auto"
    frozen_dtype: str | None = None
    param_dtype: str | None = None
    reduce_dtype: str | None = None
    nf4_block_size: int = 64
    nf4_scaler_block_size: int = 256
    coalesce_frozen: bool = False

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        for key in ("units", "freeze", "unfreeze"):
            set_(key, _patterns(key, getattr(self, key)))
        reshard = self.frozen_reshard
        if not (_is_int(reshard) and reshard > 1) and reshard not in FROZEN_RESHARD_NAMES:
            raise PolicyError(
                f"FreezePolicy.frozen_reshard={reshard!r} is not allowed; use one of "
                f"{list(FROZEN_RESHARD_NAMES)} or an int > 1 (ranks to reshard to after forward)"
            )
        budget = self.frozen_budget_bytes
        if budget is not None and not (_is_int(budget) and budget >= 0):
            raise PolicyError(f"FreezePolicy.frozen_budget_bytes must be an int >= 0, got {budget!r}")
        if (reshard == "auto") != (budget is not None):
            raise PolicyError(
                "FreezePolicy.frozen_budget_bytes is required with frozen_reshard='auto' and only then "
                f"(frozen_reshard={reshard!r}, frozen_budget_bytes={budget!r})"
            )
        tr = self.trainable_reshard
        if not (tr is None or isinstance(tr, bool) or (_is_int(tr) and tr > 1)):
            raise PolicyError(
                f"FreezePolicy.trainable_reshard={tr!r} is not allowed; use None, True, False or an int > 1"
            )
        if self.trainable_grouping not in TRAINABLE_GROUPINGS:
            raise PolicyError(
                f"FreezePolicy.trainable_grouping={self.trainable_grouping!r} is not allowed; use one of "
                f"{list(TRAINABLE_GROUPINGS)}"
            )
        set_("frozen_dtype", _dtype_name("frozen_dtype", self.frozen_dtype, FROZEN_DTYPES))
        set_("param_dtype", _dtype_name("param_dtype", self.param_dtype, MP_DTYPES))
        set_("reduce_dtype", _dtype_name("reduce_dtype", self.reduce_dtype, MP_DTYPES))
        if not isinstance(self.coalesce_frozen, bool):
            raise PolicyError(f"FreezePolicy.coalesce_frozen must be True or False, got {self.coalesce_frozen!r}")
        for key in ("nf4_block_size", "nf4_scaler_block_size"):
            value = getattr(self, key)
            if not (_is_int(value) and value > 0):
                raise PolicyError(f"FreezePolicy.{key} must be an int > 0, got {value!r}")
        if self.frozen_dtype == "nf4" and _is_int(reshard):
            raise PolicyError(
                f"FreezePolicy.frozen_dtype='nf4' does not work with frozen_reshard={reshard!r}: torchao's "
                f"NF4Tensor does not support an int reshard_after_forward; use 'after_forward', "
                f"'after_backward', 'never' or 'auto'"
            )
        if self.frozen_dtype not in (None, "float32", *QUANTIZED_DTYPES) and self.frozen_dtype != self.param_dtype:
            raise PolicyError(
                f"FreezePolicy.frozen_dtype={self.frozen_dtype!r} needs param_dtype={self.frozen_dtype!r}: "
                f"frozen weights are computed with in their storage dtype (param_dtype={self.param_dtype!r})"
            )

    # -- conversions -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "policy") -> "FreezePolicy":
        """Build from a plain dict; unknown keys raise `PolicyError` naming them and `source`."""
        if not isinstance(data, dict):
            raise PolicyError(f"{source}: expected a mapping of FreezePolicy fields, got {type(data).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise PolicyError(f"{source}: unknown FreezePolicy key(s) {unknown}; allowed keys: {known}")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "FreezePolicy":
        """Read a YAML file holding a mapping of FreezePolicy fields."""
        import yaml

        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise PolicyError(f"cannot read FreezePolicy YAML {str(path)!r}: {exc}") from exc
        return cls.from_dict(data if data is not None else {}, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML/JSON-friendly dict; `from_dict(to_dict())` round-trips."""
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
            for f in dataclasses.fields(self)
        }

    # -- derived ------------------------------------------------------------------------------
    @property
    def torch_param_dtype(self) -> torch.dtype | None:
        return getattr(torch, self.param_dtype) if self.param_dtype else None

    @property
    def torch_reduce_dtype(self) -> torch.dtype | None:
        return getattr(torch, self.reduce_dtype) if self.reduce_dtype else None

    @property
    def torch_frozen_dtype(self) -> torch.dtype | None:
        """The float dtype frozen shards are stored in (quantized formats: their dense leftovers' dtype)."""
        if self.frozen_dtype in QUANTIZED_DTYPES:
            return self.torch_param_dtype
        return getattr(torch, self.frozen_dtype) if self.frozen_dtype else None
