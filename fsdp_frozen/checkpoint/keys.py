"""Checkpoint key names: where each entry of a state dict is stored.

A state dict handed to DCP is flattened to paths (DCP's own ``flatten_state_dict``); each path maps to
one checkpoint key:

=========================================  =====================================
state-dict path                            checkpoint key
=========================================  =====================================
``fqn`` or ``model.fqn`` (parameter)       ``frozen/fqn`` or ``trainable/fqn``
``fqn`` or ``model.fqn`` (buffer, other)   ``buffers/fqn``
``optimizer.state.fqn.name``               ``optimizer/fqn/name``
``optimizer.param_groups...``              ``optimizer_groups/...``
anything else (``extra.step``, ...)        ``extra/...``
=========================================  =====================================

``fqn`` is the parameter's name in the unsharded model (FSDP2 adds no prefixes).
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

FROZEN, TRAINABLE, BUFFERS = "frozen", "trainable", "buffers"
OPTIMIZER, OPTIMIZER_GROUPS, EXTRA = "optimizer", "optimizer_groups", "extra"
MODEL_KINDS = (FROZEN, TRAINABLE, BUFFERS)


def model_kinds(model: nn.Module) -> dict[str, str]:
    """State-dict FQN -> "frozen" / "trainable" / "buffers" for every parameter and buffer.

    The frozen set is the one `shard_with_freezing` built the param groups from; for a model that
    was not sharded with it, ``requires_grad`` decides. Tied parameters appear under every name.
    """
    from ..apply import _STATE_ATTR  # local import: apply imports nothing from here

    state = getattr(model, _STATE_ATTR, None)
    canonical = {id(p): n for n, p in model.named_parameters()}
    kinds: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        frozen = canonical[id(p)] in state.plan.frozen if state is not None else not p.requires_grad
        kinds[name] = FROZEN if frozen else TRAINABLE
    for name, _ in model.named_buffers(remove_duplicate=False):
        kinds[name] = BUFFERS
    return kinds


def checkpoint_key(path: tuple[Any, ...], kinds: dict[str, str]) -> str:
    """The checkpoint key of one flattened state-dict path (see the module docstring)."""
    parts = [str(p) for p in path]
    if len(parts) == 1 and parts[0] in kinds:
        return f"{kinds[parts[0]]}/{parts[0]}"
    if len(parts) == 2 and parts[0] == "model":
        return f"{kinds.get(parts[1], BUFFERS)}/{parts[1]}"
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
