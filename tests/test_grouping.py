"""`FreezePolicy.trainable_grouping="root"`: every unit's trainable parameters in one root group.

Against plain FSDP2 with the same units (per-unit mixed groups), in fp32: losses and parameters
bitwise equal, under every frozen policy, tied and PEFT-shaped models, HSDP, an int reshard, "auto",
gradient accumulation; collectives per step counted against the plan; NF4 against "per_unit"; a
checkpoint saved under one grouping loads under the other.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh

from fsdp_frozen import FreezePolicy, PolicyError, describe, shard_with_freezing
from fsdp_frozen import _torch_compat as compat
from fsdp_frozen.apply import sharded_state
from fsdp_frozen.checkpoint import load_checkpoint, save_checkpoint
from fsdp_frozen.plan import FROZEN, TRAINABLE, build_plan

from .common import (CommCounter, adamw, frozen_group_names, full_state, hf_sharded, hf_train, mesh_1d, plain_fsdp,
                     save_tiny_hf, train)
from .dist_harness import run_ranks
from .models import batch, make_model
from .test_parity import _auto_budget

STEPS = 4
VARIANTS = {  # name -> (model kwargs, units, extra policy)
    "toy": ({}, ("layers.*",), {}),
    "peft": ({"peft_style": True}, ("layers.*",), {}),
    "tied": ({"tied": True}, ("tok", "layers.*"), {}),
    # a trainable tied parameter, used in the unit "tok" and at the root
    "tied_trainable": ({"tied": True}, ("tok", "layers.*"), {"unfreeze": ["tok.weight"]}),
}


def _cases(world: int) -> list[tuple[str, object, str]]:
    cases = [("toy", p, "1d") for p in ("after_forward", "after_backward", "never", "auto")]
    if world >= 2:
        cases += [("peft", "after_forward", "1d"), ("tied", "never", "1d"), ("tied_trainable", "after_backward", "1d")]
    if world == 2:  # HSDP at shard size 1: the frozen groups kept whole on both replicas ([Note: whole frozen groups])
        cases += [("peft", "never", "hsdp"), ("toy", "after_forward", "hsdp")]
    if world == 4:
        cases += [("toy", 2, "1d"), ("toy", "after_forward", "hsdp"), ("peft", "never", "hsdp")]
    return cases


def _mesh(kind: str, world: int):
    if kind == "1d":
        return mesh_1d(world)
    return init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))


def _policy(variant: str, reshard, shard_size: int, grouping: str = "root", **extra) -> FreezePolicy:
    kwargs, units, more = VARIANTS[variant]
    if reshard == "auto":
        extra["frozen_budget_bytes"] = _auto_budget(kwargs, units, shard_size)
    return FreezePolicy(units=list(units), frozen_reshard=reshard, trainable_grouping=grouping, **more, **extra)


def _model(variant: str):
    kwargs, _, more = VARIANTS[variant]
    model = make_model(**kwargs)
    for name in more.get("unfreeze", ()):
        model.get_parameter(name).requires_grad_(True)
    return model


def _counted_train(model, rank: int, steps: int, frozen_pgs: set[str]):
    counter, per_step = CommCounter(), []

    def on_step(step, model, opt):
        per_step.append({
            "frozen_ag": counter.total("all_gather", frozen_pgs, count=True),
            "trainable_ag": counter.total("all_gather", count=True) - counter.total("all_gather", frozen_pgs, count=True),
            "rs": counter.total("reduce_scatter", count=True),
            "frozen_rs": counter.total("reduce_scatter", frozen_pgs, count=True),
            "ar": counter.total("all_reduce", count=True),
        })
        counter.clear()

    with counter:
        losses = train(model, steps, rank, on_step=on_step)
    return losses, per_step


def _parity(rank: int, world: int) -> dict:
    out = {}
    for variant, reshard, mesh_kind in _cases(world):
        mesh = _mesh(mesh_kind, world)
        shard_size = mesh.size(mesh.ndim - 1)
        ref = plain_fsdp(_model(variant), mesh, VARIANTS[variant][1])
        ref_losses = train(ref, STEPS, rank)
        model = shard_with_freezing(_model(variant), mesh, _policy(variant, reshard, shard_size))
        plan = sharded_state(model).plan
        losses, per_step = _counted_train(model, rank, STEPS, frozen_group_names(model))
        ref_state, state = full_state(ref), full_state(model)
        trainable = [g for g in plan.groups if g.kind == TRAINABLE]
        records = describe(model)
        out[(variant, str(reshard), mesh_kind)] = {
            "equal": losses == ref_losses,
            "mismatched": sorted(k for k in ref_state if not torch.equal(ref_state[k], state[k])),
            "steady": per_step[1:],
            "trainable_groups": [(g.unit, len(g.params)) for g in trainable],
            "n_trainable": sum(p.requires_grad for p in _model(variant).parameters()),
            "frozen_units": sorted({g.unit for g in plan.groups if g.kind == FROZEN}),
            "expected": {
                "frozen_ag": sum(r.own_all_gathers_per_step for r in records if r.kind == FROZEN),
                "trainable_ag": sum(r.all_gathers_per_step for r in records if r.kind == TRAINABLE),
                "rs": sum(r.reduce_scatters_per_step for r in records),
            },
            "replicated": mesh_kind == "hsdp",
        }
    return out


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.split_layout
def test_root_grouping_matches_plain_fsdp_and_counts_one_collective_each_way(world):
    results = run_ranks(_parity, world)
    for key, r0 in results[0].items():
        for rank, res in enumerate(results):
            r = res[key]
            assert r["equal"] and r["mismatched"] == [], (key, rank, r["mismatched"])
        # one trainable group, the root's, holding every trainable parameter
        assert r0["trainable_groups"] == [("", r0["n_trainable"])], key
        assert len(r0["frozen_units"]) > 1, key  # frozen groups keep their units
        expected = r0["expected"]
        if world > 1 and key[2] == "1d":
            assert expected["trainable_ag"] == 1 and expected["rs"] == 1, key
        for step in r0["steady"]:
            assert step["frozen_ag"] == expected["frozen_ag"], (key, step, expected)
            assert step["trainable_ag"] == expected["trainable_ag"], (key, step, expected)
            assert step["rs"] == expected["rs"] and step["frozen_rs"] == 0, (key, step, expected)
            if r0["replicated"]:  # HSDP: the one reduce-scatter's result is all-reduced over the replicas once
                assert step["ar"] == 1, (key, step)


def _accumulate(rank: int, world: int) -> dict:
    """Two micro-batches per step, gradient sync only on the second (FSDP's set_requires_gradient_sync)."""
    mesh = mesh_1d(world)
    out = {}
    for name, model in (("plain", plain_fsdp(make_model(), mesh, ("layers.*",))),
                        ("root", shard_with_freezing(make_model(), mesh, _policy("toy", "never", world)))):
        opt, counter, losses, rs = adamw(model), CommCounter(), [], []
        with counter:
            for step in range(3):
                for micro in range(2):
                    model.set_requires_gradient_sync(micro == 1)
                    x, y = batch(2 * step + micro, rank)
                    logits = model(x)
                    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)) / 2
                    loss.backward()
                    losses.append(loss.item())
                opt.step()
                opt.zero_grad()
                rs.append(counter.total("reduce_scatter", count=True))
                counter.clear()
        out[name] = {"losses": losses, "state": full_state(model), "rs": rs}
    return out


def test_root_grouping_with_gradient_accumulation():
    for r in run_ranks(_accumulate, 2):
        assert r["root"]["losses"] == r["plain"]["losses"]
        assert all(torch.equal(r["plain"]["state"][k], v) for k, v in r["root"]["state"].items())
        assert r["root"]["rs"] == [1, 1, 1]  # one reduce-scatter per optimizer step, none for the first micro-batch
        assert r["plain"]["rs"] == [3, 3, 3]  # plain FSDP2: one per unit with trainable parameters (2 blocks, root)


def _nf4(rank: int, world: int) -> dict:
    out = {}
    for grouping in ("per_unit", "root"):
        model = make_model()  # fp32 compute: NF4 dequantizes to fp32, so both groupings are bitwise comparable
        policy = FreezePolicy(units=["layers.*"], frozen_dtype="nf4", nf4_block_size=16, nf4_scaler_block_size=4,
                              frozen_reshard="after_forward", trainable_grouping=grouping)
        model = shard_with_freezing(model, mesh_1d(world), policy)
        losses, per_step = _counted_train(model, rank, 3, frozen_group_names(model))
        trainable = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        out[grouping] = {"losses": losses, "state": trainable, "steady": per_step[1:],
                         "quantized": len(sharded_state(model).plan.quantized)}
    return out


@pytest.mark.split_layout
def test_root_grouping_with_nf4_equals_per_unit():
    for r in run_ranks(_nf4, 2):
        per_unit, root = r["per_unit"], r["root"]
        assert root["quantized"] > 0 and root["quantized"] == per_unit["quantized"]
        assert root["losses"] == per_unit["losses"]
        assert root["state"].keys() == per_unit["state"].keys()
        assert all(torch.equal(per_unit["state"][k], v) for k, v in root["state"].items())
        assert {s["trainable_ag"] for s in root["steady"]} == {1} and {s["rs"] for s in root["steady"]} == {1}
        assert {s["frozen_ag"] for s in root["steady"]} == {s["frozen_ag"] for s in per_unit["steady"]}
        assert {s["rs"] for s in per_unit["steady"]} == {3}


def _across(rank: int, world: int, tmp: str) -> dict:
    """Train 2 steps under one grouping, save, load under the other, train 2 more: equal to 4 straight steps."""
    straight = shard_with_freezing(make_model(), mesh_1d(world), _policy("toy", "never", world, "per_unit"))
    opt = adamw(straight)
    losses = train(straight, 4, rank, opt=opt)
    out = {"straight": (losses, full_state(straight))}
    for first, second in (("per_unit", "root"), ("root", "per_unit")):
        model = shard_with_freezing(make_model(), mesh_1d(world), _policy("toy", "never", world, first))
        opt = adamw(model)
        head = train(model, 2, rank, opt=opt)
        path = os.path.join(tmp, first)
        save_checkpoint(path, model, opt, frozen="include")
        resumed = shard_with_freezing(make_model(seed=5), mesh_1d(world), _policy("toy", "never", world, second))
        opt = adamw(resumed)
        load_checkpoint(path, resumed, opt)
        tail = train(resumed, 2, rank, opt=opt, start=2)
        out[first] = (head + tail, full_state(resumed), sorted(os.listdir(path)))
    return out


def test_checkpoint_layout_does_not_depend_on_grouping(tmp_path):
    for r in run_ranks(_across, 2, str(tmp_path)):
        losses, state = r["straight"]
        for first in ("per_unit", "root"):
            got_losses, got_state, files = r[first]
            assert got_losses == losses, first
            assert all(torch.equal(state[k], v) for k, v in got_state.items()), first
        assert r["per_unit"][2] == r["root"][2]  # the same files


@pytest.mark.split_layout
def test_root_grouping_plan_and_refusals(monkeypatch):
    model = make_model()
    plan = build_plan(model, FreezePolicy(units=["layers.*"], trainable_grouping="root"), shard_size=2)
    trainable = [g for g in plan.groups if g.kind == TRAINABLE]
    assert [(g.unit, g.all_gathers_per_step, g.reduce_scatters_per_step) for g in trainable] == [("", 1, 1)]
    assert set(trainable[0].params) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert "trainable_grouping='root'" in trainable[0].why
    assert plan.apply_order == ("", "layers.0", "layers.1", "layers.2")
    assert plan.ignored["layers.0"] == ("layers.0.attn.lora_A.weight", "layers.0.attn.lora_B.weight",
                                        "layers.0.mlp.lora_A.weight", "layers.0.mlp.lora_B.weight",
                                        "layers.0.proj.bias")
    assert set(plan.ignored[""]) == {f for g in plan.groups if g.unit != "" for f in g.params}
    per_unit = build_plan(model, FreezePolicy(units=["layers.*"], trainable_grouping="per_unit"), shard_size=2)
    assert per_unit.apply_order == per_unit.units == ("layers.0", "layers.1", "layers.2", "")
    assert "" not in per_unit.ignored
    # "auto" (the default): the adapters fit within the largest unit -> root; every weight trainable -> per unit
    auto = build_plan(model, FreezePolicy(units=["layers.*"]), shard_size=2)
    assert auto.trainable_grouping == "root" and [g.unit for g in auto.groups if g.kind == TRAINABLE] == [""]
    assert "trainable_grouping='auto': the trainable parameters' whole state per rank" in auto.grouping_why
    assert "exceeds the largest unit's gathered bytes" in auto.grouping_why  # too much to replicate (see test_replicate)
    assert auto.grouping_why.endswith("they fit: one root group")
    full = make_model()
    for p in full.parameters():
        p.requires_grad_(True)
    full_plan = build_plan(full, FreezePolicy(units=["layers.*"]), shard_size=2)
    assert full_plan.trainable_grouping == "per_unit" and "and their gathered bytes" in full_plan.grouping_why
    assert all(full_plan.grouping_why in g.why for g in full_plan.groups if g.kind == TRAINABLE)

    with pytest.raises(PolicyError, match=r"trainable_grouping='by_block' is not allowed; use one of \['auto', 'per_unit', 'root', 'replicate'\]"):
        FreezePolicy(trainable_grouping="by_block")
    monkeypatch.setattr(compat, "IGNORED_PARAMS_SUPPORTED", False)
    with pytest.raises(PolicyError, match=r"trainable_grouping='root' needs fully_shard\(ignored_params=\.\.\.\), torch >= 2\.7"):
        build_plan(model, FreezePolicy(units=["layers.*"], trainable_grouping="root"), shard_size=2)
    old = build_plan(model, FreezePolicy(units=["layers.*"]), shard_size=2)  # auto falls back, and says so
    assert old.trainable_grouping == "per_unit" and "needs fully_shard(ignored_params=...)" in old.grouping_why


# ------------------------------------------------------------- transformers + PEFT, on the users' path
HF_CASES = [  # (arch, peft, wrapper): meta build, PEFT, AC or compile, shard, load_pretrained
    ("llama", "lora", "gradient_checkpointing"),
    ("llama", "dora", None),
    ("llama", "ia3", "compile"),  # IA3's vectors live in ParameterDicts no forward hook ever sees
    ("gpt2", "lora", None),  # Conv1D, tied embeddings
]


def _hf(rank: int, world: int, tmp: str) -> dict:
    from .test_pretrained import VOCAB

    save_tiny_hf(rank, tmp)
    out = {}
    for arch, peft, wrapper in HF_CASES:
        for grouping in ("per_unit", "root"):
            model = hf_sharded(arch, peft, wrapper, tmp, world, trainable_grouping=grouping)
            opt, counter, rs = adamw(model), CommCounter(), []

            def count(step, counter=counter, rs=rs):
                rs.append(counter.total("reduce_scatter", count=True))
                counter.clear()

            with counter:
                losses = hf_train(model, opt, rank, 0, 3, VOCAB, on_step=count)
            trainable = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters() if p.requires_grad}
            groups = [g.unit for g in sharded_state(model).plan.groups if g.kind == TRAINABLE]
            out[(arch, peft, wrapper, grouping)] = {"losses": losses, "trainable": trainable, "rs": rs[1:],
                                                    "trainable_units": groups}
    return out


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="needs the 'hf' extra: pip install -e '.[hf]'")
def test_root_grouping_on_transformers_and_peft_models(tmp_path):
    results = run_ranks(_hf, 2, str(tmp_path))
    for r in results:
        for arch, peft, wrapper in HF_CASES:
            per_unit, root = r[(arch, peft, wrapper, "per_unit")], r[(arch, peft, wrapper, "root")]
            case = (arch, peft, wrapper)
            assert root["losses"] == per_unit["losses"], case
            assert root["trainable"].keys() == per_unit["trainable"].keys() and root["trainable"], case
            assert all(torch.equal(per_unit["trainable"][k], v) for k, v in root["trainable"].items()), case
            assert root["trainable_units"] == [""] and len(per_unit["trainable_units"]) == 2, case
            assert set(root["rs"]) == {1} and set(per_unit["rs"]) == {2}, case
