"""Training parity against plain FSDP2 (bitwise, fp32) and a single-process model (1e-5).

One spawn per world size; each runs every frozen policy and model variant.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh

from fsdp_frozen import FreezePolicy, shard_with_freezing
from fsdp_frozen import _torch_compat as compat
from fsdp_frozen.apply import sharded_state

from .common import adamw, full_state, mesh_1d, plain_fsdp, train
from .dist_harness import run_ranks
from .models import batch, make_model

STEPS = 5
POLICIES = ["after_forward", "after_backward", "never", "auto"]
VARIANTS = {  # name -> (model kwargs, units)
    "toy": ({}, ("layers.*",)),
    "peft": ({"peft_style": True}, ("layers.*",)),
    "tied": ({"tied": True}, ("tok", "layers.*")),
}


def _cases(world_size: int) -> list[tuple[str, object, str]]:
    cases = [("toy", p, "1d") for p in POLICIES]
    if world_size >= 2:
        cases += [("peft", "after_forward", "1d"), ("tied", "never", "1d"), ("tied", "after_forward", "1d")]
    if world_size == 4:
        cases += [("toy", 2, "1d"), ("toy", "after_forward", "hsdp"), ("toy", "never", "hsdp"), ("peft", "after_backward", "hsdp")]
    return cases


def _auto_budget(kwargs: dict, units, shard_size: int) -> int:
    """A budget that keeps the largest frozen group gathered and no other: "auto" runs both paths."""
    from fsdp_frozen.plan import build_plan

    base = build_plan(make_model(**kwargs), FreezePolicy(units=list(units)), shard_size=shard_size)
    sizes = sorted((g.unsharded_bytes for g in base.groups if g.kind == "frozen"), reverse=True)
    return sizes[0] + sizes[-1] - 1


def _policy(units, reshard, kwargs: dict | None = None, shard_size: int = 1) -> FreezePolicy:
    extra = {"frozen_budget_bytes": _auto_budget(kwargs or {}, units, shard_size)} if reshard == "auto" else {}
    return FreezePolicy(units=list(units), frozen_reshard=reshard, **extra)


def _run_parity(rank: int, world_size: int) -> dict:
    out = {}
    for variant, reshard, mesh_kind in _cases(world_size):
        kwargs, units = VARIANTS[variant]
        mesh = mesh_1d(world_size) if mesh_kind == "1d" else init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=("replicate", "shard"))
        ref = plain_fsdp(make_model(**kwargs), mesh, units)
        ref_losses = train(ref, STEPS, rank)
        model = shard_with_freezing(make_model(**kwargs), mesh, _policy(units, reshard, kwargs, mesh.size(mesh.ndim - 1)))
        if reshard == "auto":  # the budget keeps one frozen group gathered and leaves the others
            kept = [g.reshard == "never" for g in sharded_state(model).plan.groups if g.kind == "frozen"]
            assert any(kept) and not all(kept), kept
        opt = adamw(model)
        losses = train(model, STEPS, rank, opt=opt)
        # Frozen parameters: no grad after backward, no optimizer state.
        frozen_with_state = []
        for _, _, fp in compat.iter_all_fsdp_params(model):
            sharded = compat.sharded_param(fp)
            if not sharded.requires_grad:
                assert sharded.grad is None, fp
                if sharded in opt.state:
                    frozen_with_state.append(str(fp))
        trainable_with_state = sum(1 for p in model.parameters() if p.requires_grad and p in opt.state)
        ref_state, state = full_state(ref), full_state(model)
        mismatched = sorted(k for k in ref_state if not torch.equal(ref_state[k], state[k]))
        out[(variant, str(reshard), mesh_kind)] = {
            "ref_losses": ref_losses, "losses": losses, "mismatched": mismatched,
            "frozen_with_state": frozen_with_state, "trainable_with_state": trainable_with_state,
            "state": state if rank == 0 else None,
        }
    return out


def _single_process(variant: str, world_size: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The same training on one process: the loss is the mean of the ranks' losses."""
    kwargs, _ = VARIANTS[variant]
    model = make_model(**kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for step in range(STEPS):
        total = 0
        for r in range(world_size):
            x, y = batch(step, r)
            logits = model(x)
            total = total + F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss = total / world_size
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, {n: p.detach().float() for n, p in model.named_parameters()}


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_parity_with_plain_fsdp_and_single_process(world_size):
    results = run_ranks(_run_parity, world_size)
    singles: dict[str, tuple] = {}
    for key, r0 in results[0].items():
        variant = key[0]
        for rank, res in enumerate(results):
            r = res[key]
            assert r["losses"] == r["ref_losses"], (key, rank, r["losses"], r["ref_losses"])
            assert r["mismatched"] == [], (key, rank)
            assert r["frozen_with_state"] == [], (key, rank)
            assert r["trainable_with_state"] > 0, (key, rank)
        if variant not in singles:
            singles[variant] = _single_process(variant, world_size)
        single_losses, single_state = singles[variant]
        mean_losses = [sum(res[key]["losses"][s] for res in results) / world_size for s in range(STEPS)]
        torch.testing.assert_close(torch.tensor(mean_losses), torch.tensor(single_losses), rtol=1e-5, atol=1e-5)
        for name, value in r0["state"].items():
            torch.testing.assert_close(value, single_state[name], rtol=1e-5, atol=1e-5, msg=f"{key} {name}")
        initial = make_model(**VARIANTS[variant][0])
        for name, p0 in initial.named_parameters():  # trainable weights moved, frozen ones did not
            assert torch.equal(r0["state"][name], p0.detach()) != p0.requires_grad, (key, name)
