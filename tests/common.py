"""Helpers shared by the distributed tests: reference sharding, a training loop, full states."""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from fsdp_frozen.diagnostics import CommCounter, frozen_group_names  # noqa: F401 (re-exported for tests)
from fsdp_frozen.plan import resolve_units

from .models import batch


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def checkout_env(**extra: str) -> dict[str, str]:
    """The environment for a subprocess that imports ``fsdp_frozen``: this checkout first on
    ``PYTHONPATH``, so a recipe or script run by a test imports the code under test even where pip's
    editable install points at another clone."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": ROOT + (os.pathsep + path if path else ""), **extra}


def mesh_1d(world_size: int):
    return init_device_mesh("cpu", (world_size,))


def plain_fsdp(model: nn.Module, mesh, units: tuple[str, ...], mp: MixedPrecisionPolicy | None = None) -> nn.Module:
    """Reference: plain FSDP2 with the same units (one mixed group per unit).

    A tied parameter used in a nested unit is ignored there, so the outer unit owns it (as ours does).
    """
    mp = mp or MixedPrecisionPolicy()
    holders: dict[nn.Parameter, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        holders.setdefault(p, []).append(name)
    tied = [p for p, names in holders.items() if len(names) > 1]
    for unit in resolve_units(model, units):
        module = model.get_submodule(unit)
        inner = {p for p in tied if unit and any(n.startswith(unit + ".") for n in holders[p])
                 and not all(n.startswith(unit + ".") for n in holders[p])}
        extra = {"ignored_params": inner} if inner else {}
        fully_shard(module, mesh=mesh, mp_policy=mp, reshard_after_forward=unit != "", **extra)
    return model


def store_frozen_in(model: nn.Module, dtype: torch.dtype) -> None:
    """A reference's frozen parameters stored in `dtype`, as ``FreezePolicy.frozen_dtype`` stores ours.
    A TP weight (DTensor) is swapped whole: ``p.data = p.data.to(dtype)`` relabels a DTensor's dtype but
    keeps its local tensor, which is what FSDP shards (the reference stayed fp32 that way)."""
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point():
            torch.utils.swap_tensors(p, nn.Parameter(p.detach().to(dtype), requires_grad=False))


def adamw(model: nn.Module, lr: float = 1e-2) -> torch.optim.Optimizer:
    """The tests' optimizer (what `train` makes when it is given none)."""
    return torch.optim.AdamW(model.parameters(), lr=lr)


def train(model: nn.Module, steps: int, rank: int, lr: float = 1e-2, on_step=None, opt=None, start: int = 0) -> list[float]:
    """`steps` AdamW steps on batches `start`, `start + 1`, ...; a new optimizer unless `opt` is given
    (pass one made with `adamw` to keep its state)."""
    opt = opt if opt is not None else adamw(model, lr)
    losses = []
    for step in range(start, start + steps):
        x, y = batch(step, rank)
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach().item())
        if on_step is not None:
            on_step(step, model, opt)
    return losses


def whole(t: torch.Tensor) -> torch.Tensor:
    """The global tensor: ``full_tensor()`` of a DTensor (collective), else `t` (replicated or kept gathered)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded copies of every parameter, on every rank (collective)."""
    out = {}
    for name, p in model.named_parameters():
        t = p.full_tensor() if isinstance(p, DTensor) else p
        out[name] = t.detach().float().clone()
    return out


def hf_train(model: nn.Module, opt, rank: int, start: int, steps: int, vocab: int, on_step=None) -> list[float]:
    """`steps` steps of a transformers causal LM on seeded random ids (labels = inputs); the losses."""
    losses = []
    for step in range(start, start + steps):
        ids = torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(10 * step + rank))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step)
    return losses


def save_tiny_hf(rank: int, tmp: str) -> None:
    """Tiny Llama and GPT-2 (tied) safetensors under `tmp`/llama and `tmp`/gpt2, written by rank 0."""
    import torch.distributed as dist

    from .test_pretrained import save_tiny

    for arch in ("llama", "gpt2"):
        if rank == 0:
            save_tiny(os.path.join(tmp, arch), arch, tied=arch == "gpt2")
        dist.barrier()


def hf_sharded(arch: str, peft: str, wrapper: str | None, tmp: str, world: int, **policy: Any) -> nn.Module:
    """The users' path: a transformers model built on meta, PEFT `peft`, gradient checkpointing or
    compiled blocks (`wrapper`), `shard_with_freezing` with the tests' policy plus `policy`, and
    `load_pretrained` from `save_tiny_hf`'s files; GPT-2 in eval mode (no dropout), Llama in train."""
    from fsdp_frozen import FreezePolicy, shard_with_freezing
    from fsdp_frozen.checkpoint import load_pretrained

    from .test_pretrained import _build_meta, _peft, _policy as hf_policy

    model = _peft(_build_meta(arch, arch == "gpt2", "meta"), peft, arch)
    if wrapper == "gradient_checkpointing":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if wrapper == "compile":
        layers = model.base_model.model.model.layers if arch == "llama" else model.base_model.model.transformer.h
        for layer in layers:
            layer.compile(backend="eager")
    model = shard_with_freezing(model, mesh_1d(world),
                                FreezePolicy(**{**hf_policy(peft, arch, None).to_dict(), **policy}))
    load_pretrained(model, os.path.join(tmp, arch))
    model.train(arch != "gpt2")
    return model


def run_cli(argv: list[str]):
    """``python -m fsdp_frozen ARGV`` in this process (its entry point is tests/test_cli_help.py's
    subprocess): a CompletedProcess with the exit code and what it printed."""
    import io
    import subprocess

    from fsdp_frozen.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return subprocess.CompletedProcess(["python", "-m", "fsdp_frozen", *argv], code, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def structural_fallback() -> Iterator[None]:
    """torch < 2.12's structural fallback forced in this process (``split_groups_supported()`` read as
    False at each call), restored after: a pooled rank runs the fallback and the next task does not."""
    import fsdp_frozen._torch_compat as compat

    before = compat.SPLIT_GROUPS_SUPPORTED
    compat.SPLIT_GROUPS_SUPPORTED = False
    try:
        yield
    finally:
        compat.SPLIT_GROUPS_SUPPORTED = before
