"""`FreezePolicy.trainable_grouping="replicate"`: trainable parameters whole on every rank, one
all-reduce per step, outside FSDP.

Against plain FSDP2 with the same units, in fp32: losses and parameters bitwise equal under every
frozen policy, tied and PEFT-shaped models, HSDP, an int reshard, "auto" (world 1, 2, 4); the
collectives per step counted against `describe`; gradient accumulation; bf16 mixed precision; NF4;
checkpoints across groupings; `refreeze` to and from it; transformers + PEFT on the meta/AC/compile
path; refusals and the in-between states (eval forward, two forwards, a requires_grad flip).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from fsdp_frozen import FreezePolicy, FreezingChangedError, PolicyError, describe, refreeze, shard_with_freezing
from fsdp_frozen import _torch_compat as compat
from fsdp_frozen.apply import sharded_state
from fsdp_frozen.checkpoint import load_checkpoint, save_checkpoint
from fsdp_frozen.estimate import measure
from fsdp_frozen.plan import FROZEN, REPLICATED, TRAINABLE, build_plan

from .common import (CommCounter, adamw, frozen_group_names, full_state, hf_sharded, hf_train, mesh_1d, plain_fsdp,
                     save_tiny_hf, train)
from .dist_harness import run_ranks
from .models import batch, make_model
from .test_grouping import HF_CASES, STEPS, VARIANTS, _cases, _counted_train, _mesh, _model, _policy


def _parity(rank: int, world: int) -> dict:
    out = {}
    for variant, reshard, mesh_kind in _cases(world):
        mesh = _mesh(mesh_kind, world)
        shard_size = mesh.size(mesh.ndim - 1)
        ref = plain_fsdp(_model(variant), mesh, VARIANTS[variant][1])
        ref_losses = train(ref, STEPS, rank)
        model = shard_with_freezing(_model(variant), mesh, _policy(variant, reshard, shard_size, "replicate"))
        plan = sharded_state(model).plan
        losses, per_step = _counted_train(model, rank, STEPS, frozen_group_names(model))
        ref_state, state = full_state(ref), full_state(model)
        records = describe(model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        out[(variant, str(reshard), mesh_kind)] = {
            "equal": losses == ref_losses,
            "mismatched": sorted(k for k in ref_state if not torch.equal(ref_state[k], state[k])),
            "steady": per_step[1:],
            "trainable_groups": [(g.unit, len(g.params), g.reshard) for g in plan.groups if g.kind == TRAINABLE],
            "n_trainable": len(trainable),
            "plain": all(not isinstance(p, DTensor) for p in trainable),
            "frozen_units": sorted({g.unit for g in plan.groups if g.kind == FROZEN}),
            "expected": {
                "frozen_ag": sum(r.own_all_gathers_per_step for r in records if r.kind == FROZEN),
                "ar": sum(r.all_reduces_per_step for r in records),
            },
            "hsdp": mesh_kind == "hsdp",
            # [Note: whole frozen groups]: "never" groups leave FSDP, and so do units left with nothing
            "whole": sorted(plan.unmanaged), "units_without_fsdp": sorted(plan.units_without_fsdp),
            "never_groups": sorted(f for g in plan.groups if g.kind == FROZEN and g.reshard == "never" for f in g.params),
            # at shard size 1 every frozen group FSDP would not cast leaves FSDP, whatever its reshard
            "in_place_groups": sorted(f for g in plan.groups if g.kind == FROZEN and g.storage_dtype == g.gathered_dtype
                                      for f in g.params),
            "shard_size": shard_size,
            "frozen_plain": sorted({type(p).__name__ for n, p in model.named_parameters() if n in plan.unmanaged}),
            "first_step_frozen_ag": per_step[0]["frozen_ag"],
            "trainable_sum": sum(float(p.detach().double().sum()) for p in trainable),
        }
    return out


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.split_layout
def test_replicate_matches_plain_fsdp_and_counts_one_all_reduce(world):
    results = run_ranks(_parity, world)
    for key, r0 in results[0].items():
        for rank, res in enumerate(results):
            r = res[key]
            assert r["equal"] and r["mismatched"] == [], (key, rank, r["mismatched"])
            assert r["trainable_sum"] == r0["trainable_sum"], (key, rank)  # the replicas agree
        assert r0["trainable_groups"] == [("", r0["n_trainable"], REPLICATED)], key
        assert r0["plain"], key  # whole tensors, no DTensor
        assert len(r0["frozen_units"]) > 1, key  # frozen groups keep their units
        expected = r0["expected"]
        assert expected["ar"] == int(r0["shard_size"] > 1), key
        if key[1] == "never":  # kept whole on every rank, outside FSDP: nothing gathered even in the first step
            assert r0["whole"] and r0["frozen_plain"] == ["Parameter"] and r0["first_step_frozen_ag"] == 0, key
            assert r0["units_without_fsdp"], key
        # "auto" keeps some groups gathered: those leave FSDP too; at shard size 1, every group stored as computed in
        assert r0["whole"] == (r0["never_groups"] if r0["shard_size"] > 1 else r0["in_place_groups"]), key
        for step in r0["steady"]:
            assert step["frozen_ag"] == expected["frozen_ag"], (key, step, expected)
            assert step["trainable_ag"] == 0 and step["rs"] == 0, (key, step)
            # one all-reduce over the shard dim; HSDP adds one over the replicas (as it does for a reduce-scatter)
            assert step["ar"] == expected["ar"] + int(r0["hsdp"]), (key, step, expected)


def _flat(rank: int, world: int) -> dict:
    """Padding over the allowance: the gradients go flat in parameter order, unpadded."""
    from fsdp_frozen import replicate

    replicate.PADDING_SHARE, replicate.PADDING_BYTES = 0, 0  # any padding is too much
    ref = plain_fsdp(make_model(dim=15), mesh_1d(world), ("layers.*",))  # odd dim 0: padded at 2 and 4 ranks
    ref_losses = train(ref, STEPS, rank)
    model = shard_with_freezing(make_model(dim=15), mesh_1d(world), _policy("toy", "never", world, "replicate"))
    counter, opt = CommCounter(), adamw(model)
    train(model, 1, rank, opt=opt)
    with counter:
        losses = train(model, STEPS - 1, rank, opt=opt, start=1)
    ref_state, state = full_state(ref), full_state(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return {"losses": (ref_losses[1:], losses),
            "max_diff": max((ref_state[k] - state[k]).abs().max().item() for k in ref_state),
            "bitwise": all(torch.equal(ref_state[k], state[k]) for k in ref_state),
            "ar_bytes": counter.total("all_reduce") // (STEPS - 1),
            "flat_bytes": sum(p.numel() * 4 for p in trainable),
            "padded": sum(replicate.padded_numels([p.shape for p in trainable], world)) * 4}


@pytest.mark.parametrize("world", [2, 4])
def test_replicate_flat_layout_when_padding_is_too_much(world):
    for r in run_ranks(_flat, world):
        assert r["padded"] > r["flat_bytes"]  # this model pads at these world sizes
        assert r["ar_bytes"] == r["flat_bytes"]  # exactly the gradients, no padding
        if world == 2:  # two summands commute: bitwise whatever the layout
            assert r["bitwise"] and r["losses"][0] == r["losses"][1]
        else:  # another order of summation: the same averages up to rounding
            assert r["max_diff"] < 1e-5 and r["losses"][0] == pytest.approx(r["losses"][1], rel=1e-5)


def _mixed_and_accumulation(rank: int, world: int) -> dict:
    """bf16 compute with fp32 reduction; two micro-batches per step with gradient sync on the second."""
    mesh = mesh_1d(world)
    out = {}
    mp = {"param_dtype": "bfloat16", "reduce_dtype": "float32"}
    from torch.distributed.fsdp import MixedPrecisionPolicy

    for name in ("plain", "replicate"):
        if name == "plain":
            model = plain_fsdp(make_model(), mesh, ("layers.*",),
                               MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
        else:
            model = shard_with_freezing(make_model(), mesh, FreezePolicy(units=["layers.*"], frozen_reshard="never",
                                                                         trainable_grouping="replicate", **mp))
        opt, counter, losses, counts = adamw(model), CommCounter(), [], []
        with counter:
            for step in range(3):
                for micro in range(2):
                    model.set_requires_gradient_sync(micro == 1)
                    x, y = batch(2 * step + micro, rank)
                    logits = model(x)
                    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1)) / 2
                    loss.backward()
                    losses.append(loss.item())
                opt.step()
                opt.zero_grad()
                counts.append((counter.total("reduce_scatter", count=True), counter.total("all_reduce", count=True)))
                counter.clear()
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}  # frozen "never" groups show bf16
        out[name] = {"losses": losses, "state": {k: v for k, v in full_state(model).items() if k in trainable},
                     "counts": counts}
    return out


def test_replicate_with_mixed_precision_and_gradient_accumulation():
    for r in run_ranks(_mixed_and_accumulation, 2):
        assert r["replicate"]["losses"] == r["plain"]["losses"]
        assert r["replicate"]["state"].keys() == r["plain"]["state"].keys() and r["plain"]["state"]
        mismatched = [k for k, v in r["replicate"]["state"].items() if not torch.equal(r["plain"]["state"][k], v)]
        assert mismatched == []
        assert r["replicate"]["counts"] == [(0, 1)] * 3  # one all-reduce per optimizer step, none for the first micro-batch
        assert r["plain"]["counts"] == [(3, 0)] * 3  # plain FSDP2: a reduce-scatter per unit with trainable parameters


def _nf4(rank: int, world: int) -> dict:
    out = {}
    for grouping in ("per_unit", "replicate"):
        policy = FreezePolicy(units=["layers.*"], frozen_dtype="nf4", nf4_block_size=16, nf4_scaler_block_size=4,
                              frozen_reshard="after_forward", trainable_grouping=grouping)
        model = shard_with_freezing(make_model(), mesh_1d(world), policy)
        losses, per_step = _counted_train(model, rank, 3, frozen_group_names(model))
        trainable = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
                     for n, p in model.named_parameters() if p.requires_grad}
        out[grouping] = {"losses": losses, "state": trainable, "steady": per_step[1:],
                         "quantized": len(sharded_state(model).plan.quantized)}
    return out


@pytest.mark.split_layout
def test_replicate_with_nf4_equals_per_unit():
    for r in run_ranks(_nf4, 2):
        per_unit, rep = r["per_unit"], r["replicate"]
        assert rep["quantized"] > 0 and rep["quantized"] == per_unit["quantized"]
        assert rep["losses"] == per_unit["losses"]
        assert rep["state"].keys() == per_unit["state"].keys() and rep["state"]
        assert all(torch.equal(per_unit["state"][k], v) for k, v in rep["state"].items())
        assert {s["frozen_ag"] for s in rep["steady"]} == {s["frozen_ag"] for s in per_unit["steady"]}
        assert {(s["rs"], s["ar"], s["trainable_ag"]) for s in rep["steady"]} == {(0, 1, 0)}


def _across(rank: int, world: int, tmp: str) -> dict:
    """Train 2 steps under one grouping, save, load under another, train 2 more: equal to 4 straight steps."""
    straight = shard_with_freezing(make_model(), mesh_1d(world), _policy("toy", "never", world, "per_unit"))
    losses = train(straight, 4, rank, opt=adamw(straight))
    out = {"straight": (losses, full_state(straight))}
    for first, second in (("per_unit", "replicate"), ("replicate", "per_unit"), ("replicate", "root")):
        model = shard_with_freezing(make_model(), mesh_1d(world), _policy("toy", "never", world, first))
        opt = adamw(model)
        head = train(model, 2, rank, opt=opt)
        path = os.path.join(tmp, f"{first}-{second}")
        save_checkpoint(path, model, opt, frozen="include")
        resumed = shard_with_freezing(make_model(seed=5), mesh_1d(world), _policy("toy", "never", world, second))
        opt = adamw(resumed)
        load_checkpoint(path, resumed, opt)
        tail = train(resumed, 2, rank, opt=opt, start=2)
        out[(first, second)] = (head + tail, full_state(resumed), sorted(os.listdir(path)))
    return out


def test_checkpoints_load_across_replicate_and_sharded_groupings(tmp_path):
    for r in run_ranks(_across, 2, str(tmp_path)):
        losses, state = r["straight"]
        files = {k: v[2] for k, v in r.items() if k != "straight"}
        for key, (got_losses, got_state, _) in ((k, v) for k, v in r.items() if k != "straight"):
            assert got_losses == losses, key
            assert all(torch.equal(state[k], v) for k, v in got_state.items()), key
        assert len({tuple(v) for v in files.values()}) == 1, files  # the same files whatever the grouping


def _refreeze(rank: int, world: int, tmp: str) -> dict:
    """k steps, refreeze to another grouping (and freezing), k more: against save + rebuild + load."""
    out = {}
    switches = [("per_unit", "replicate", ()), ("replicate", "per_unit", ()), ("replicate", "replicate", ("layers.2.**",)),
                ("replicate-never", "per_unit", ()), ("per_unit", "replicate-never", ())]  # frozen kept whole <-> sharded
    for first, second, unfreeze in switches:
        runs = {}
        for how in ("refreeze", "rebuild"):
            def policy_of(name: str, **extra) -> FreezePolicy:
                grouping, _, reshard = name.partition("-")
                return _policy("toy", reshard or "after_forward", world, grouping, **extra)

            model = shard_with_freezing(make_model(), mesh_1d(world), policy_of(first))
            opt = adamw(model)
            head = train(model, 2, rank, opt=opt)
            policy = policy_of(second, unfreeze=list(unfreeze))
            if how == "refreeze":
                refreeze(model, opt, policy)
            else:
                path = os.path.join(tmp, f"{first}-{second}-{len(unfreeze)}")
                save_checkpoint(path, model, opt, frozen="include")
                model = shard_with_freezing(make_model(seed=5), mesh_1d(world), policy)
                opt = adamw(model)
                load_checkpoint(path, model, opt, allow_freezing_change=bool(unfreeze))
            tail = train(model, 2, rank, opt=opt, start=2)
            runs[how] = (head + tail, full_state(model), sharded_state(model).plan.trainable_grouping)
        out[(first, second, unfreeze)] = runs
    return out


def test_refreeze_to_and_from_replicate(tmp_path):
    for r in run_ranks(_refreeze, 2, str(tmp_path)):
        for key, runs in r.items():
            (losses, state, grouping), (ref_losses, ref_state, ref_grouping) = runs["refreeze"], runs["rebuild"]
            assert grouping == ref_grouping == key[1].partition("-")[0], key
            assert losses == ref_losses, key
            assert [k for k in ref_state if not torch.equal(ref_state[k], state[k])] == [], key


def _states(rank: int, world: int) -> dict:
    """The parameters the model shows between steps, after an eval forward, across two forwards."""
    torch.manual_seed(rank)  # different values on each rank: shard_with_freezing broadcasts rank 0's
    model = make_model(seed=rank)
    model = shard_with_freezing(model, mesh_1d(world), FreezePolicy(units=["layers.*"], trainable_grouping="replicate",
                                                                    param_dtype="bfloat16"))
    masters = [p for p in model.parameters() if p.requires_grad]
    out = {"fp32": {p.dtype for p in masters}, "sum": sum(float(p.detach().double().sum()) for p in masters)}
    x, y = batch(0, rank)
    with torch.no_grad():
        model(x)
    out["after_eval"] = [p for p in model.parameters() if p.requires_grad] == masters
    logits = model(x)
    out["during"] = {p.dtype for p in model.parameters() if p.requires_grad}
    logits2 = model(x)  # a second forward before backward reuses the copies
    (F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
     + F.cross_entropy(logits2.reshape(-1, logits2.shape[-1]).float(), y.reshape(-1))).backward()
    out["after_backward"] = [p for p in model.parameters() if p.requires_grad] == masters
    out["grads"] = all(p.grad is not None and p.grad.dtype == torch.float32 for p in masters)
    masters[0].requires_grad_(False)
    try:
        model(x)
        out["flip"] = None
    except FreezingChangedError as e:
        out["flip"] = str(e)
    masters[0].requires_grad_(True)
    whole = shard_with_freezing(make_model(), mesh_1d(world), FreezePolicy(
        units=["layers.*"], trainable_grouping="replicate", frozen_reshard="never"))
    whole.get_parameter("tok.weight").requires_grad_(True)
    try:
        whole(x)
        out["frozen_flip"] = None
    except FreezingChangedError as e:
        out["frozen_flip"] = str(e)
    whole.get_parameter("tok.weight").requires_grad_(False)
    # new storage behind a parameter (p.data = ...) between steps: the next forward computes with it,
    # through a bf16 copy (model) or an alias (whole: no param_dtype)
    out["new_storage"] = []
    for m in (model, whole):
        name, param = next((n, q) for n, q in m.named_parameters() if q.requires_grad)
        with torch.no_grad():
            param.data = torch.full_like(param, 0.25)
        logits = m(x)
        out["new_storage"].append(bool((m.get_parameter(name) == 0.25).all()))  # the slot holds the compute tensor
        logits.float().sum().backward()
    return out


class _Embeds(nn.Module):
    """Takes floating-point inputs (as ``inputs_embeds``), one positional and one keyword."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([nn.Linear(8, 8) for _ in range(2)])
        self.adapter = nn.Linear(8, 8, bias=False)
        self.head = nn.Linear(8, 4)
        self.scale = nn.Parameter(torch.full((1,), 0.5))
        for module in (*self.layers, self.head):
            module.requires_grad_(False)

    def forward(self, x: torch.Tensor, *, gate: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x + self.adapter(x) * gate) * self.scale


def _dormant(rank: int, world: int) -> dict:
    """[Note: dormant root]: nothing left to FSDP, so the root's FSDP hooks are off and this package
    moves and casts the inputs; against per_unit, where FSDP2's root does."""
    out = {}
    for grouping in ("per_unit", "replicate"):
        model = shard_with_freezing(_Embeds(), mesh_1d(world), FreezePolicy(
            units=["layers.*"], frozen_reshard="never", trainable_grouping=grouping, param_dtype="bfloat16", frozen_dtype="bfloat16",
            reduce_dtype="float32"))
        opt = adamw(model)
        g = torch.Generator().manual_seed(rank)
        results = []
        for _ in range(2):
            x, gate = torch.randn(3, 8, generator=g), torch.rand(1, generator=g)
            y = model(x, gate=gate)  # fp32 inputs: cast to bf16 by the root (a bf16 weight would refuse fp32)
            y.float().square().mean().backward()
            opt.step()
            opt.zero_grad()
            results.append((y.dtype, y.detach().float()))
        hooks = [h for h in model._forward_pre_hooks.values() if type(getattr(h, "__self__", None)).__name__ == "FSDPState"]
        model.set_requires_gradient_sync(True)  # FSDPModule's API is still there
        out[grouping] = {"outputs": results, "fsdp_hooks": len(hooks), "fsdp_module": compat.has_fsdp_state(model),
                         "params": full_state(model)}
    return out


@pytest.mark.split_layout
def test_dormant_root_moves_and_casts_inputs_as_fsdp_does():
    for r in run_ranks(_dormant, 2):
        ref, got = r["per_unit"], r["replicate"]
        assert ref["fsdp_hooks"] == 1 and got["fsdp_hooks"] == 0  # per_unit keeps FSDP's root hooks
        assert got["fsdp_module"]  # still an FSDPModule
        for (dtype, y), (ref_dtype, ref_y) in zip(got["outputs"], ref["outputs"]):
            assert dtype == ref_dtype == torch.bfloat16 and torch.equal(y, ref_y)
        assert all(torch.equal(ref["params"][k], got["params"][k]) for k in ref["params"])


@pytest.mark.split_layout
def test_replicate_between_steps_and_refusals():
    results = run_ranks(_states, 2)
    assert results[0]["sum"] == results[1]["sum"]  # rank 0's values on both ranks
    for r in results:
        assert r["fp32"] == {torch.float32} and r["during"] == {torch.bfloat16}
        assert r["after_eval"] and r["after_backward"] and r["grads"]
        assert "changed from True to False" in r["flip"] and "trainable_grouping='replicate'" in r["flip"]
        assert "'tok.weight' changed from False to True" in r["frozen_flip"] and "outside FSDP" in r["frozen_flip"]
        assert r["new_storage"] == [True, True]


@pytest.mark.split_layout
def test_replicate_plan_estimate_and_refusals(monkeypatch):
    model = make_model()
    plan = build_plan(model, FreezePolicy(units=["layers.*"], trainable_grouping="replicate"), shard_size=2)
    trainable = [g for g in plan.groups if g.kind == TRAINABLE]
    assert [(g.unit, g.reshard, g.all_gathers_per_step, g.reduce_scatters_per_step, g.all_reduces_per_step)
            for g in trainable] == [("", REPLICATED, 0, 0, 1)]
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(trainable[0].params) == names and plan.replicated == names
    assert plan.apply_order == plan.units  # bottom-up: every fully_shard call ignores the trainable parameters
    assert set(plan.ignored[""]) == names
    assert "trainable_grouping='replicate'" in trainable[0].why
    # "auto" (the default) replicates adapters whose whole state fits within the largest unit gathered
    adapters = make_model(dim=128, peft_style=True, mixed_bias=False)
    auto = build_plan(adapters, FreezePolicy(units=["layers.*"], freeze=["scale", "norm.*"], param_dtype="bfloat16"),
                      shard_size=2)
    assert auto.trainable_grouping == "replicate" and auto.replicated, auto.grouping_why
    assert auto.grouping_why.startswith("trainable_grouping='auto': the trainable parameters' whole state per rank "
                                        "(parameters, gradients, AdamW moments, bfloat16 copies: ")
    assert auto.grouping_why.endswith("): replicated") and "fits within the largest unit's gathered bytes (layers." in auto.grouping_why
    # the torch < 2.12 fallback cannot split a root module's frozen weight from its trainable bias: "auto"
    # takes the next choice instead of a layout it would refuse
    adapters.norm.weight.requires_grad_(False)
    fallback = build_plan(adapters, FreezePolicy(units=["layers.*"], freeze=["scale"], param_dtype="bfloat16"),
                          shard_size=2, split=False)
    assert fallback.trainable_grouping == "root" and fallback.grouping_why.endswith(
        "cannot split the frozen parameters of the root's modules ['norm'] off a replicated set: one root group")
    one = build_plan(model, FreezePolicy(units=["layers.*"], trainable_grouping="replicate"), shard_size=1)
    assert [g.all_reduces_per_step for g in one.groups if g.kind == TRAINABLE] == [0]

    with pytest.raises(PolicyError, match=r"use one of \['auto', 'per_unit', 'root', 'replicate'\]"):
        FreezePolicy(trainable_grouping="ddp")
    # the torch < 2.12 fallback cannot split a root module's frozen weight from its trainable bias
    mixed = make_model()
    mixed.norm.weight.requires_grad_(False)
    with pytest.raises(PolicyError, match=r"trainable_grouping='replicate': the root's frozen parameters \['norm.weight'\]"):
        build_plan(mixed, FreezePolicy(units=["layers.*"], trainable_grouping="replicate"), shard_size=2, split=False)
    monkeypatch.setattr(compat, "IGNORED_PARAMS_SUPPORTED", False)
    with pytest.raises(PolicyError, match=r"trainable_grouping='replicate' needs fully_shard\(ignored_params=\.\.\.\), torch >= 2\.7"):
        build_plan(model, FreezePolicy(units=["layers.*"], trainable_grouping="replicate"), shard_size=2)


def _estimate(rank: int, world: int) -> dict:
    model = shard_with_freezing(make_model(), mesh_1d(world), FreezePolicy(
        units=["layers.*"], trainable_grouping="replicate", param_dtype="bfloat16", reduce_dtype="float32",
        frozen_dtype="bfloat16"))
    est = measure(model)
    counter = CommCounter()
    train(model, 1, rank)
    with counter:
        train(model, 1, rank)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return {"est": est.to_dict(), "ar_bytes": counter.total("all_reduce"),
            "whole": sum(p.numel() * p.element_size() for p in trainable),
            "copies": sum(p.numel() * 2 for p in trainable)}


@pytest.mark.split_layout
def test_replicate_estimate_matches_the_ranks():
    for r in run_ranks(_estimate, 2):
        est = r["est"]
        assert est["trainable_shard_bytes"] == est["gradient_bytes"] == r["whole"]  # whole on every rank
        assert est["trainable_step_gathered_bytes"] == r["copies"]  # the bf16 copies for the step
        assert est["all_reduce_bytes_per_step"] == r["ar_bytes"] > 0
        assert est["reduce_scatter_bytes_per_step"] == 0


def _hf(rank: int, world: int, tmp: str) -> dict:
    from .test_pretrained import VOCAB

    save_tiny_hf(rank, tmp)
    out = {}
    for arch, peft, wrapper in HF_CASES:
        for grouping in ("per_unit", "replicate"):
            # "never" where it matters most: AC recomputes with whole frozen weights, GPT-2 ties them
            reshard = "never" if arch == "gpt2" or wrapper == "gradient_checkpointing" else "after_forward"
            model = hf_sharded(arch, peft, wrapper, tmp, world, trainable_grouping=grouping, frozen_reshard=reshard)
            opt, counter, counts = adamw(model), CommCounter(), []

            def count(step, counter=counter, counts=counts):
                counts.append((counter.total("reduce_scatter", count=True), counter.total("all_reduce", count=True)))
                counter.clear()

            with counter:
                losses = hf_train(model, opt, rank, 0, 3, VOCAB, on_step=count)
            plan = sharded_state(model).plan
            out[(arch, peft, wrapper, grouping)] = {"losses": losses, "trainable": full_state(model),
                                                    "counts": counts[1:], "whole": len(plan.unmanaged),
                                                    "without_fsdp": len(plan.units_without_fsdp),
                                                    "tied": arch != "gpt2" or _gpt2_tied(model)}
    return out


def _gpt2_tied(model) -> bool:
    inner = model.base_model.model
    return inner.lm_head.weight is inner.transformer.wte.weight


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="needs the 'hf' extra: pip install -e '.[hf]'")
@pytest.mark.split_layout
def test_replicate_on_transformers_and_peft_models(tmp_path):
    for r in run_ranks(_hf, 2, str(tmp_path)):
        for arch, peft, wrapper in HF_CASES:
            per_unit, rep = r[(arch, peft, wrapper, "per_unit")], r[(arch, peft, wrapper, "replicate")]
            case = (arch, peft, wrapper)
            assert rep["losses"] == per_unit["losses"], case
            assert [k for k, v in rep["trainable"].items() if not torch.equal(per_unit["trainable"][k], v)] == [], case
            assert set(rep["counts"]) == {(0, 1)} and set(per_unit["counts"]) == {(2, 0)}, case
            never = arch == "gpt2" or wrapper == "gradient_checkpointing"
            assert (rep["whole"] > 0 and rep["without_fsdp"] == 2) == never and per_unit["whole"] == 0, case
            assert rep["tied"], case  # GPT-2's head is still its embedding


def test_replicate_divide_factors_follow_fsdp2():
    """The division of the replicated all-reduce is FSDP2's (AVG for fp32/bf16, pre/post-division by
    powers of two around a sum for fp16), checked against torch 2.13's own choice where it exists."""
    from fsdp_frozen.replicate import _divide

    assert _divide(torch.float32, 1) == (None, None, dist.ReduceOp.SUM)
    assert _divide(torch.bfloat16, 4)[2] == dist.ReduceOp.AVG and _divide(torch.float32, 6)[:2] == (None, None)
    assert _divide(torch.float16, 4) == (2.0, 2.0, dist.ReduceOp.SUM)
    assert _divide(torch.float16, 8) == (4.0, 2.0, dist.ReduceOp.SUM)
    try:
        from torch.distributed.fsdp._fully_shard._fsdp_collectives import _get_gradient_divide_factors
    except ImportError:
        pytest.skip("this torch has no _get_gradient_divide_factors to compare with")

    class Group:  # the function reads only .size()
        def __init__(self, n):
            self.n = n

        def size(self):
            return self.n

    for dtype in (torch.float16, torch.float32):
        for shard, rep in ((2, None), (4, None), (8, None), (2, 2), (4, 2)):
            try:
                pre, post, rs_op, ar_op = _get_gradient_divide_factors(Group(shard), rep and Group(rep), dtype, "cpu")
            except TypeError:
                pytest.skip("another signature of _get_gradient_divide_factors")
            ours = _divide(dtype, shard * (rep or 1))
            assert (ours[0], ours[1]) == (pre, post) and ours[2] == rs_op, (dtype, shard, rep)


def _generate_dtypes(rank: int, world: int) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from fsdp_frozen import register_forward_method

    from .test_pretrained import _config

    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(_config("llama")), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model = shard_with_freezing(model, mesh_1d(world), FreezePolicy(
        units=["LlamaDecoderLayer"], trainable_grouping="replicate", param_dtype="bfloat16"))
    register_forward_method(model, "generate")
    register_forward_method(model, "generate")  # idempotent
    lora = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"]
    seen = []
    handle = lora.register_forward_pre_hook(lambda m, args: seen.append(str(m.weight.dtype)))
    prompts = torch.randint(0, 128, (2, 4), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.generate(prompts, max_new_tokens=3, do_sample=False, pad_token_id=0)
    handle.remove()
    return {"seen": sorted(set(seen)), "calls": len(seen), "after": str(lora.weight.dtype),
            "is_param": lora.weight is sharded_state(model).replicated.params[0]}


def test_generate_computes_with_the_replicated_param_dtype_copies():
    """`register_forward_method(model, "generate")`: transformers' generate calls the inner model, not
    the root, so without it the replicated adapters' bf16 copies were not put in place and the
    rollouts computed with the fp32 adapters (logits off by up to 4e-3 from forward's); after
    generate the parameters are back in their slots."""
    r = run_ranks(_generate_dtypes, 2)[0]
    assert r["seen"] == ["torch.bfloat16"] and r["calls"] == 3, r
    assert r["after"] == "torch.float32" and r["is_param"], r
