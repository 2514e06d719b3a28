"""Canonical names: one name per parameter, buffer and module, whatever wraps the model.

Activation checkpointing (``checkpoint_wrapper``: ``_checkpoint_wrapped_module.``) and
``torch.compile(block)`` replacing a block (``_orig_mod.``) insert segments into the names
``named_parameters()`` gives; DCP's ``get_model_state_dict`` strips them. fsdp_frozen uses DCP's
names everywhere a user sees one: `FreezePolicy` patterns are matched against them, and the plan,
`describe`, checkpoint keys, the manifest and every error use them. Only `apply` and `storage`
touch modules by their *path* (the name ``get_submodule`` needs), read from `ModelNames`.

[Note: the outermost module of a name] A wrapper and the module it wraps have the same canonical
name (``layers.0`` is the ``CheckpointWrapper`` and, inside it, the block). Units are the outermost
of them, as torchtitan shards AC-wrapped and compiled blocks: FSDP's hooks then run outside the
recomputed / compiled region.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from . import _torch_compat as compat

_EXTRA_STATE = compat.EXTRA_STATE_SUFFIX  # "_extra_state"


@dataclass(frozen=True)
class ModelNames:
    """Canonical names of one model and the paths behind them."""

    params: dict[str, str]  #: canonical FQN of each Parameter (its first name) -> its path
    aliases: dict[str, str]  #: path -> canonical FQN, for every path that differs from its canonical name
    tied: dict[str, tuple[str, ...]]  #: canonical FQN -> every canonical name of that Parameter (in use order)
    buffers: dict[str, str]  #: canonical FQN of each buffer or module extra state -> its path
    modules: dict[str, str]  #: canonical FQN of each module -> the outermost module's path

    def canonical(self, name: str) -> str:
        """The canonical name of `name` (a path, or already canonical)."""
        return self.aliases.get(name, name)


def model_names(model: nn.Module) -> ModelNames:
    """Canonical names of every parameter, buffer, extra state and module of `model` (no collective)."""
    canon = {}

    def of(path: str) -> str:
        if path not in canon:
            canon[path] = compat.canonical_fqn(model, path) if path else path
        return canon[path]

    params: dict[str, str] = {}
    tied: dict[str, list[str]] = {}
    first: dict[int, str] = {}
    for path, p in model.named_parameters(remove_duplicate=False):
        name = of(path)
        primary = first.setdefault(id(p), name)
        if primary == name:
            params.setdefault(name, path)
        tied.setdefault(primary, [])
        if name not in tied[primary]:
            tied[primary].append(name)
    buffers = {of(path): path for path, _ in model.named_buffers(remove_duplicate=False)}
    modules: dict[str, str] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        modules.setdefault(of(path), path)  # named_modules is pre-order: the outermost comes first
        if type(module).get_extra_state is not nn.Module.get_extra_state:
            key = f"{path}.{_EXTRA_STATE}" if path else _EXTRA_STATE
            buffers[of(path) + f".{_EXTRA_STATE}" if path else _EXTRA_STATE] = key
    aliases = {path: name for path, name in canon.items() if path != name}
    for name, path in buffers.items():
        if path != name:
            aliases[path] = name
    return ModelNames(params=params, aliases=aliases, tied={k: tuple(v) for k, v in tied.items()},
                      buffers=buffers, modules=modules)
