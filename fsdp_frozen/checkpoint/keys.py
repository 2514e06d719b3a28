"""Checkpoint key names: where each entry of a state dict is stored.

A state dict handed to DCP is flattened to paths (DCP's own ``flatten_state_dict``); each path maps to
one checkpoint key:

=========================================  =====================================
state-dict path                            checkpoint key
=========================================  =====================================
``fqn`` or ``model.fqn`` (parameter)       ``frozen/fqn`` or ``trainable/fqn``
``fqn`` or ``model.fqn`` (buffer)          ``buffers/fqn``
``model.X``, X not in the model            `CheckpointLayoutError` naming it
``optimizer.state.fqn.name``               ``optimizer/fqn/name``
``optimizer.param_groups...``              ``optimizer_groups/...``
anything else (``extra.step``, ...)        ``extra/...``
=========================================  =====================================

``fqn`` is the canonical name (`fsdp_frozen.names`): DCP's ``get_model_state_dict`` name, without
wrapper prefixes (``_checkpoint_wrapped_module.``, ``_orig_mod.``); FSDP2 adds none.
"""

from __future__ import annotations

from typing import Any, Literal

import torch.nn as nn

from ..errors import CheckpointLayoutError
from ..names import model_names
from ..plan import FROZEN, TRAINABLE

BUFFERS = "buffers"
OPTIMIZER, OPTIMIZER_GROUPS, EXTRA = "optimizer", "optimizer_groups", "extra"
#: What a model entry of a state dict is (the first segment of its checkpoint key).
ModelKind = Literal["frozen", "trainable", "buffers"]
MODEL_KINDS: tuple[ModelKind, ...] = (FROZEN, TRAINABLE, BUFFERS)


class ModelKinds(dict):
    """Canonical state-dict FQN -> ``"frozen"`` / ``"trainable"`` / ``"buffers"``.

    ``aliases`` maps module paths that differ from their canonical name (wrapper prefixes, see
    `fsdp_frozen.names`) to it, so a state dict keyed either way finds its entries.
    """

    def __init__(self, kinds: dict[str, str], aliases: dict[str, str]) -> None:
        super().__init__(kinds)
        self.aliases = aliases


def model_kinds(model: nn.Module) -> ModelKinds:
    """The kind of every parameter, buffer and module extra state, by canonical FQN.

    The frozen set is the one `shard_with_freezing` built the param groups from (and the names the
    ones it planned with); for a model that was not sharded with it, ``requires_grad`` decides.
    Tied parameters appear under every name.
    """
    from ..apply import state_or_none  # local import: apply imports nothing from here

    state = state_or_none(model)
    names = state.plan.names if state is not None and state.plan.names is not None else model_names(model)
    kinds: dict[str, str] = {}
    for primary, tied in names.tied.items():
        if state is not None:
            frozen = primary in state.plan.frozen
        else:
            frozen = not model.get_parameter(names.params[primary]).requires_grad
        kinds.update({n: FROZEN if frozen else TRAINABLE for n in tied})
    kinds.update({n: BUFFERS for n in names.buffers})
    return ModelKinds(kinds, names.aliases)


def _model_name(name: str, kinds: dict[str, str]) -> str | None:
    """The canonical FQN of a state-dict name of the model, or None if the model has no such entry."""
    name = getattr(kinds, "aliases", {}).get(name, name)
    return name if name in kinds else None


def _unknown(entry: str, name: str, kinds: dict[str, str]) -> CheckpointLayoutError:
    close = sorted(k for k in kinds if k.rpartition(".")[2] == name.rpartition(".")[2])[:3]
    return CheckpointLayoutError(
        f"state-dict entry {entry!r} is neither a parameter nor a buffer of the model (canonical names, "
        f"wrapper prefixes such as '_checkpoint_wrapped_module.' and '_orig_mod.' stripped)"
        + (f"; the model has e.g. {close}" if close else "")
        + "; save the model's own state dict (get_model_state_dict) or put other entries under 'extra'"
    )


def checkpoint_key(path: tuple[Any, ...], kinds: dict[str, str]) -> str:
    """The checkpoint key of one flattened state-dict path (see the module docstring).

    A model entry (``model.X``, or a dotted top-level ``X``) that is not a parameter, buffer or
    extra state of the model raises `CheckpointLayoutError` naming it: it is never filed as a buffer.
    """
    parts = [str(p) for p in path]
    if len(parts) == 1 and (name := _model_name(parts[0], kinds)) is not None:
        return f"{kinds[name]}/{name}"
    if len(parts) == 1 and "." in parts[0]:
        raise _unknown(parts[0], parts[0], kinds)
    if len(parts) == 2 and parts[0] == "model":
        name = _model_name(parts[1], kinds)
        if name is None:
            raise _unknown(f"model.{parts[1]}", parts[1], kinds)
        return f"{kinds[name]}/{name}"
    if parts[0] == "optimizer" and len(parts) >= 4 and parts[1] == "state":
        return f"{OPTIMIZER}/{parts[2]}/{'.'.join(parts[3:])}"
    if parts[0] == "optimizer":
        return f"{OPTIMIZER_GROUPS}/{'.'.join(parts[1:])}"
    if parts[0] == "extra" and len(parts) > 1:
        return f"{EXTRA}/{'.'.join(parts[1:])}"
    return f"{EXTRA}/{'.'.join(parts)}"


def split_key(key: str) -> tuple[str, str]:
    """``"frozen/a.b"`` -> ``("frozen", "a.b")``."""
    kind, _, rest = key.partition("/")
    return kind, rest


def optimizer_param(key: str) -> str:
    """The parameter FQN an ``optimizer/fqn/name`` key belongs to."""
    return key.split("/")[1]
