"""`refreeze`: change the frozen set mid-run, in place.

Parity: k steps, refreeze, k more steps equal (fp32, bitwise: losses, parameters, optimizer state)
the same run done through save_checkpoint, a rebuild under the new policy and
load_checkpoint(allow_freezing_change=True), at world 1, 2 and 4, under every frozen policy, HSDP,
an int reshard, "auto", a change of trainable grouping and NF4. Collectives per step follow the new
plan; the next checkpoint writes a new frozen base only when the frozen set changed; bad input
changes nothing.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh

from fsdp_frozen import FreezePolicy, PolicyError, describe, refreeze, shard_with_freezing
from fsdp_frozen import _torch_compat as compat
from fsdp_frozen.apply import sharded_state
from fsdp_frozen.checkpoint import load_checkpoint, read_manifest, save_checkpoint

from .common import CommCounter, adamw, frozen_group_names, hf_train, mesh_1d, structural_fallback, train, whole
from .dist_harness import run_ranks
from .models import batch, make_model
from .test_checkpoint import full_optim

K = 2
UNITS = ["layers.*"]
#: stage 2 of every case: open the frozen last block, close one adapter
STAGE2 = {"unfreeze": ["layers.2.**"], "freeze": ["layers.0.attn.lora_A.weight"]}
NF4 = {"frozen_dtype": "nf4", "nf4_block_size": 16, "nf4_scaler_block_size": 4}


def _cases(world: int) -> list[tuple[str, dict, dict, str]]:
    """(name, stage-1 policy fields, stage-2 policy fields, mesh)."""
    cases = [(r, {"frozen_reshard": r}, {"frozen_reshard": r, **STAGE2}, "1d")
             for r in ("after_forward", "after_backward", "never")]
    cases.append(("after_forward->never, root grouping", {}, {"frozen_reshard": "never", "trainable_grouping": "root",
                                                              **STAGE2}, "1d"))
    # NF4: stage 1 trains block 2 (dense), stage 2 freezes it again: its weights are quantized whole
    # (world 1: NF4 weights are kept out of FSDP, plain tensors)
    cases.append(("nf4 refrozen", {**NF4, "unfreeze": ["layers.2.**"]}, {**NF4, "freeze": ["layers.2.**"]}, "1d"))
    if world >= 2:
        cases.append(("auto", {"frozen_reshard": "auto", "frozen_budget_bytes": 4000},
                      {"frozen_reshard": "auto", "frozen_budget_bytes": 4000, **STAGE2}, "1d"))
        # a tied embedding = head (the toy's tied variant), unfrozen: one parameter under two names
        cases.append(("tied unfrozen", {"frozen_reshard": "never"},
                      {"frozen_reshard": "never", "unfreeze": ["tok.weight"], "freeze": STAGE2["freeze"]}, "1d"))
    if world == 4:  # every named policy ran at worlds 1 and 2; here what needs 4 ranks, beside after_forward
        cases = [c for c in cases if c[0] == "after_forward"]
        cases += [("int 2", {"frozen_reshard": 2}, {"frozen_reshard": 2, **STAGE2}, "1d"),
                  ("hsdp never", {"frozen_reshard": "never"}, {"frozen_reshard": "never", **STAGE2}, "hsdp")]
    return cases


def _mesh(kind: str, world: int):
    if kind == "1d":
        return mesh_1d(world)
    return init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))


def _optim(model, opt) -> dict[str, torch.Tensor]:
    """Unsharded optimizer state. Kept-gathered groups are resharded first: DCP's
    get_optimizer_state_dict maps the optimizer's (sharded) parameters by the registered ones, which
    are the unsharded ones while a group is gathered (torch 2.13), and fails otherwise."""
    for module in model.modules():
        if compat.has_fsdp_state(module):
            module.reshard()
    return full_optim(model, opt)


def _trainable_state(model) -> dict[str, torch.Tensor]:
    """Unsharded trainable parameters (NF4 frozen weights cannot be gathered as dense tensors)."""
    return {n: whole(p).detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _parity(rank: int, world: int, tmp: str, only: tuple[str, ...] | None = None) -> dict:
    out = {}
    for name, first, second, mesh_kind in _cases(world):
        if only is not None and name not in only:
            continue
        mesh = _mesh(mesh_kind, world)
        p1, p2 = FreezePolicy(units=UNITS, **first), FreezePolicy(units=UNITS, **second)
        kwargs = {"tied": True} if name.startswith("tied") else {}
        model = shard_with_freezing(make_model(**kwargs), mesh, p1)
        opt = adamw(model)
        head = train(model, K, rank, opt=opt)
        path = os.path.join(tmp, name.replace(" ", "_").replace(">", ""))
        save_checkpoint(path, model, opt, frozen="include")
        before = describe(model)

        refreeze(model, opt, p2)
        tail = _counted(model, rank, opt)

        ref = shard_with_freezing(make_model(seed=9, **kwargs), mesh, p2)
        ref_opt = adamw(ref)
        # NF4: the checkpoint holds block 2 dense (it was trainable), so the reference quantizes it on load
        load_checkpoint(path, ref, ref_opt, allow_freezing_change=True, cast=name.startswith("nf4"))
        ref_tail = _counted(ref, rank, ref_opt)
        plan = sharded_state(model).plan
        out[name] = {
            "losses": head + tail["losses"], "ref_losses": head + ref_tail["losses"],
            "params": _trainable_state(model), "ref_params": _trainable_state(ref),
            "optim": _optim(model, opt), "ref_optim": _optim(ref, ref_opt),
            "frozen": sorted(plan.frozen), "ref_frozen": sorted(sharded_state(ref).plan.frozen),
            "steady": tail["steady"], "ref_steady": ref_tail["steady"],
            "expected_frozen_ag": sum(r.own_all_gathers_per_step for r in describe(model) if r.kind == "frozen"),
            "before_frozen_ag": sum(r.own_all_gathers_per_step for r in before if r.kind == "frozen"),
            "describe": [(r.unit, r.kind, r.params, r.reshard) for r in describe(model)],
            "ref_describe": [(r.unit, r.kind, r.params, r.reshard) for r in describe(ref)],
        }
    return out


def _counted(model, rank: int, opt) -> dict:
    counter, fpgs, steady = CommCounter(), frozen_group_names(model), []

    def on_step(step, model, opt):
        steady.append({"frozen_ag": counter.total("all_gather", fpgs, count=True),
                       "ag": counter.total("all_gather", count=True), "rs": counter.total("reduce_scatter", count=True)})
        counter.clear()

    with counter:
        losses = train(model, K + 1, rank, opt=opt, start=K, on_step=on_step)
    return {"losses": losses, "steady": steady[1:]}


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.split_layout
def test_refreeze_equals_save_rebuild_load(tmp_path, world):
    results = run_ranks(_parity, world, str(tmp_path))
    failures = []
    for name in results[0]:
        for rank, res in enumerate(results):
            r = res[name]
            checks = {
                "losses": r["losses"] == r["ref_losses"],
                "frozen set": r["frozen"] == r["ref_frozen"],
                "trainable parameters": r["params"].keys() == r["ref_params"].keys()
                and all(torch.equal(v, r["ref_params"][k]) for k, v in r["params"].items()),
                "optimizer state": r["optim"].keys() <= r["ref_optim"].keys()
                and all(torch.equal(v, r["ref_optim"][k]) for k, v in r["optim"].items()),
                "describe": r["describe"] == r["ref_describe"],
                "collectives per step": r["steady"] == r["ref_steady"],
                "frozen all-gathers follow the new plan": all(s["frozen_ag"] == r["expected_frozen_ag"]
                                                              for s in r["steady"]),
            }
            failures += [f"{name} rank {rank}: {what}" for what, ok in checks.items() if not ok]
        assert "layers.0.attn.lora_A.weight" in results[0][name]["frozen"] or name == "nf4 refrozen", name
    assert not failures, "\n".join(failures)
    if world == 2:  # the policy change shows in the counts: after_forward's gathers, then none
        r = results[0]["after_forward->never, root grouping"]
        assert r["before_frozen_ag"] > 0 and r["expected_frozen_ag"] == 0
        assert {s["rs"] for s in r["steady"]} == {1}  # one root trainable group after the change


def _nf4_unfreeze(rank: int, world: int) -> dict:
    """An NF4 weight made trainable with dequantize=True takes its dequantized values, in fp32."""
    name = "layers.0.attn.base_layer.weight"
    policy = FreezePolicy(units=UNITS, **NF4)
    model = shard_with_freezing(make_model(), mesh_1d(world), policy)
    opt = adamw(model)
    train(model, 1, rank, opt=opt)
    gathered = model.get_parameter(name).full_tensor()  # the NF4Tensor, gathered
    want = gathered.get_original_weight().float()
    refused = ""
    try:
        refreeze(model, opt, FreezePolicy(units=UNITS, unfreeze=[name], **NF4))
    except PolicyError as e:
        refused = str(e)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        refreeze(model, opt, FreezePolicy(units=UNITS, unfreeze=[name], **NF4), dequantize=True)
    param = model.get_parameter(name)
    got = whole(param)
    losses = train(model, 2, rank, opt=opt, start=1)
    return {"refused": refused, "warned": [str(w.message) for w in caught if "NF4" in str(w.message)],
            "equal": torch.equal(got, want), "dtype": str(got.dtype), "trainable": param.requires_grad,
            "moved": not torch.equal(whole(model.get_parameter(name)), want),
            "in_optimizer": any(p is model.get_parameter(name) for g in opt.param_groups for p in g["params"]),
            "losses": losses}


def test_refreeze_nf4_to_trainable_needs_dequantize():
    for r in run_ranks(_nf4_unfreeze, 2):
        assert "would make NF4 weights trainable: ['layers.0.attn.base_layer.weight']" in r["refused"]
        assert "dequantize=True" in r["refused"]
        assert len(r["warned"]) == 1 and "dequantized values" in r["warned"][0]
        assert r["equal"] and r["dtype"] == "torch.float32" and r["trainable"]
        assert r["in_optimizer"] and r["moved"]  # it joined the optimizer and trained


def _snapshot(model, opt) -> tuple:
    params = [(n, id(p), p.to_local().clone() if hasattr(p, "to_local") else p.clone())
              for n, p in model.named_parameters()]
    state = {id(p): {k: (v.to_local() if hasattr(v, "to_local") else v).clone() for k, v in s.items()}
             for p, s in opt.state.items()}
    groups = [[id(p) for p in g["params"]] for g in opt.param_groups]
    return params, state, groups


def _same(a: tuple, b: tuple) -> bool:
    (pa, sa, ga), (pb, sb, gb) = a, b
    return (ga == gb and [(n, i) for n, i, _ in pa] == [(n, i) for n, i, _ in pb]
            and all(torch.equal(x, y) for (_, _, x), (_, _, y) in zip(pa, pb))
            and sa.keys() == sb.keys() and all(torch.equal(sa[k][n], sb[k][n]) for k in sa for n in sa[k]))


def _refusals(rank: int, world: int) -> dict:
    model = shard_with_freezing(make_model(), mesh_1d(world), FreezePolicy(units=UNITS))
    opt = adamw(model)
    train(model, 1, rank, opt=opt)
    before = _snapshot(model, opt)
    out = {}

    def attempt(key, call, before=before):
        try:
            call()
            out[key] = ("no error", _same(before, _snapshot(model, opt)))
        except PolicyError as e:
            out[key] = (str(e), _same(before, _snapshot(model, opt)))

    attempt("pattern", lambda: refreeze(model, opt, FreezePolicy(units=UNITS, unfreeze=["layers.9.**"])))
    attempt("units", lambda: refreeze(model, opt, FreezePolicy(units=["layers.0", "layers.1"])))
    attempt("policy", lambda: refreeze(model, opt, {"units": UNITS}))
    attempt("float8", lambda: refreeze(model, opt, FreezePolicy(units=UNITS, frozen_dtype="float8_e4m3fn")))
    attempt("param_group", lambda: refreeze(model, opt, FreezePolicy(units=UNITS), param_group=3))
    other = torch.nn.Parameter(torch.zeros(3))
    foreign = torch.optim.AdamW([*model.parameters(), other])
    attempt("foreign", lambda: refreeze(model, foreign, FreezePolicy(units=UNITS)))
    x, _ = batch(5, rank)
    loss = model(x).float().pow(2).mean()  # a forward whose backward has not run
    attempt("mid-step", lambda: refreeze(model, opt, FreezePolicy(units=UNITS, unfreeze=["layers.2.**"])),
            before=_snapshot(model, opt))  # mid-step, the root's groups are gathered: compare with that
    loss.backward()  # the step finishes as if nothing had been tried
    opt.zero_grad()
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)  # bound before the refreeze
    refreeze(model, opt, FreezePolicy(units=UNITS, unfreeze=["layers.2.**"]))  # and now it works
    out["after"] = model.get_parameter("layers.2.proj.weight").requires_grad
    lr = opt.param_groups[0]["lr"]
    scheduler.step()
    out["scheduler"] = (opt.param_groups[0]["lr"] == lr / 2 and scheduler.optimizer is opt
                        and any(p is model.get_parameter("layers.2.proj.weight") for p in opt.param_groups[0]["params"]))
    return out


def test_refreeze_refusals_change_nothing():
    r = run_ranks(_refusals, 2)[0]
    expect = {
        "pattern": "FreezePolicy.unfreeze pattern 'layers.9.**' matches no parameter",
        "units": "refreeze keeps the units: FreezePolicy.units gives ['layers.0', 'layers.1'], the model was sharded "
                 "with ['layers.0', 'layers.1', 'layers.2']",
        "policy": "policy must be a FreezePolicy, got dict",
        "float8": "FreezePolicy.frozen_dtype='float8_e4m3fn' is not supported",
        "param_group": "param_group=3 is not an index of the optimizer's 1 param group(s)",
        "foreign": "the optimizer holds 1 parameter(s) that are not the model's (shapes [(3,)])",
        "mid-step": "refreeze was called after a forward whose backward has not run",
    }
    for key, text in expect.items():
        msg, unchanged = r[key]
        assert text in msg, (key, msg)
        assert unchanged, f"{key}: the model or the optimizer changed"
    assert r["after"]
    assert r["scheduler"]  # an LR scheduler made before the refreeze still drives the group, new parameters included


def _base(rank: int, world: int, tmp: str) -> dict:
    """A frozen="auto" save after refreeze writes a new frozen base only when the frozen set changed."""
    model = shard_with_freezing(make_model(), mesh_1d(world), FreezePolicy(units=UNITS))
    opt = adamw(model)
    train(model, 1, rank, opt=opt)
    first = save_checkpoint(os.path.join(tmp, "a"), model, opt)  # writes the base
    refreeze(model, opt, FreezePolicy(units=UNITS, frozen_reshard="never"))  # same frozen set
    train(model, 1, rank, opt=opt, start=1)
    second = save_checkpoint(os.path.join(tmp, "b"), model, opt)
    refreeze(model, opt, FreezePolicy(units=UNITS, frozen_reshard="never", unfreeze=["layers.2.**"]))
    train(model, 1, rank, opt=opt, start=2)
    third = save_checkpoint(os.path.join(tmp, "c"), model, opt)
    resumed = shard_with_freezing(make_model(seed=4), mesh_1d(world),
                                  FreezePolicy(units=UNITS, frozen_reshard="never", unfreeze=["layers.2.**"]))
    ropt = adamw(resumed)
    load_checkpoint(third, resumed, ropt)
    return {"frozen_state": [read_manifest(p)["frozen_state"] for p in (first, second, third)],
            "resume": train(resumed, 2, rank, opt=ropt, start=3) == train(model, 2, rank, opt=opt, start=3)}


def test_checkpoints_follow_refreeze(tmp_path):
    for r in run_ranks(_base, 2, str(tmp_path)):
        assert r["frozen_state"] == ["included", "referenced", "included"]
        assert r["resume"]


def _hf(rank: int, world: int, tmp: str) -> dict:
    """The users' path: transformers Llama + PEFT LoRA built on meta, gradient checkpointing, compiled
    blocks, load_pretrained; refreeze opens the last decoder layer. Against save + rebuild + load."""
    import torch.distributed as dist

    from fsdp_frozen.checkpoint import load_pretrained

    from .test_pretrained import VOCAB, _build_meta, _peft, save_tiny

    base = os.path.join(tmp, "base")
    if rank == 0:
        save_tiny(base, "llama")
    dist.barrier()
    units = ["base_model.model.model.layers.*"]
    stage1 = FreezePolicy(units=units)
    stage2 = FreezePolicy(units=units, unfreeze=["base_model.model.model.layers.1.**"])

    def build(policy, seed=0):
        model = _peft(_build_meta("llama", False, "meta"), "lora", "llama")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for layer in model.base_model.model.model.layers:
            layer.compile(backend="eager")
        model = shard_with_freezing(model, mesh_1d(world), policy)
        load_pretrained(model, base, seed=seed)
        model.train()
        return model, adamw(model)

    def steps(model, opt, start, n):
        return hf_train(model, opt, rank, start, n, VOCAB)

    model, opt = build(stage1)
    head = steps(model, opt, 0, 2)
    path = save_checkpoint(os.path.join(tmp, "ck"), model, opt, frozen="include")
    refreeze(model, opt, stage2)
    tail = steps(model, opt, 2, 2)
    ref, ref_opt = build(stage2, seed=3)
    load_checkpoint(path, ref, ref_opt, allow_freezing_change=True)
    ref_tail = steps(ref, ref_opt, 2, 2)
    return {"losses": head + tail, "ref_losses": head + ref_tail, "params": _trainable_state(model),
            "ref_params": _trainable_state(ref),
            "opened": model.get_parameter("base_model.model.model.layers.1.mlp.up_proj.weight").requires_grad}


@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("transformers", "peft")),
                    reason="needs the 'hf' extra: pip install -e '.[hf]'")
def test_refreeze_on_a_transformers_peft_model(tmp_path):
    for r in run_ranks(_hf, 2, str(tmp_path)):
        assert r["opened"]
        assert r["losses"] == r["ref_losses"]
        assert r["params"].keys() == r["ref_params"].keys()
        assert all(torch.equal(v, r["ref_params"][k]) for k, v in r["params"].items())


@structural_fallback()
def _structural(rank: int, world: int, tmp: str) -> dict:
    """torch < 2.12's structural fallback (frozen-only submodules as their own FSDP groups)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's "cannot hold two param groups" warning
        return _parity(rank, world, tmp, STRUCTURAL_CASES)


STRUCTURAL_CASES = ("after_forward", "never", "after_forward->never, root grouping", "tied unfrozen")


def test_refreeze_in_the_structural_fallback(tmp_path):
    results = run_ranks(_structural, 2, str(tmp_path))
    for name in STRUCTURAL_CASES:
        for r in results:
            r = r[name]
            assert r["losses"] == r["ref_losses"], name
            assert all(torch.equal(v, r["ref_params"][k]) for k, v in r["params"].items()), name
            assert r["steady"] == r["ref_steady"], name
