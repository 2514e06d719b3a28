"""shard_with_freezing on real ranks: storage, describe, bad input, requires_grad flips, fallback."""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from fsdp_frozen import FreezePolicy, FreezingChangedError, PolicyError, describe, shard_with_freezing
from fsdp_frozen import _torch_compat as compat

from .common import CommCounter, adamw, full_state, mesh_1d, plain_fsdp, structural_fallback, train
from .dist_harness import RankFailure, run_ranks
from .models import batch, make_model

UNITS = ["layers.*"]


def _storage(rank: int, world_size: int) -> dict:
    mesh = mesh_1d(world_size)
    fp32 = describe(shard_with_freezing(make_model(), mesh, FreezePolicy(units=UNITS, param_dtype="bfloat16")))
    bf16_model = shard_with_freezing(
        make_model(), mesh, FreezePolicy(units=UNITS, frozen_dtype="bfloat16", param_dtype="bfloat16")
    )
    bf16 = describe(bf16_model)
    local_dtypes = {
        n: p.to_local().dtype for n, p in bf16_model.named_parameters()
    }
    ref = plain_fsdp(make_model(), mesh, tuple(UNITS), MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    ref_losses = train(ref, 3, rank)
    losses = train(bf16_model, 3, rank)
    return {"fp32": fp32.to_dicts(), "bf16": bf16.to_dicts(), "table": str(bf16), "local_dtypes": local_dtypes,
            "losses": losses, "ref_losses": ref_losses}


@pytest.mark.split_layout
def test_bf16_frozen_storage_halves_bytes_and_describe():
    results = run_ranks(_storage, 2)
    for r in results:
        frozen = lambda recs: sum(x["sharded_bytes"] for x in recs if x["kind"] == "frozen")  # noqa: E731
        trainable = lambda recs: sum(x["sharded_bytes"] for x in recs if x["kind"] == "trainable")  # noqa: E731
        assert frozen(r["bf16"]) * 2 == frozen(r["fp32"]) > 0
        assert trainable(r["bf16"]) == trainable(r["fp32"]) > 0  # trainable shards stay fp32
        assert r["local_dtypes"]["layers.0.attn.base_layer.weight"] == torch.bfloat16
        assert r["local_dtypes"]["layers.0.attn.lora_A.weight"] == torch.float32
        rec = next(x for x in r["bf16"] if x["unit"] == "layers.0" and x["kind"] == "frozen")
        assert rec["storage_dtype"] == rec["gathered_dtype"] == "bfloat16"
        assert rec["reshard"] == "after_forward" and rec["all_gathers_per_step"] == 2
        assert rec["unsharded_bytes"] == 2 * rec["numel"]
        assert "layers.0.proj.weight" in rec["params"]
        assert "bytes/rank" in r["table"] and "<root>" in r["table"] and "layers.0" in r["table"]
        # Frozen weights stored in bf16 equal plain FSDP2's per-gather bf16 cast: same losses.
        assert r["losses"] == r["ref_losses"]


def _bad_input(rank: int, world_size: int) -> dict:
    mesh = mesh_1d(world_size)
    errors = {}

    def capture(name, fn):
        try:
            fn()
        except Exception as exc:  # noqa: BLE001
            errors[name] = (type(exc).__name__, str(exc))

    model = make_model()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    capture("int_reshard", lambda: shard_with_freezing(model, mesh, FreezePolicy(units=UNITS, frozen_reshard=4)))
    untouched = (
        {n: p.requires_grad for n, p in model.named_parameters()} == before
        and not any(compat.has_fsdp_state(m) for m in model.modules())
    )
    capture("not_a_policy", lambda: shard_with_freezing(make_model(), mesh, {"units": UNITS}))
    capture("mesh_3d", lambda: shard_with_freezing(make_model(), init_device_mesh("cpu", (1, 1, world_size)), FreezePolicy()))
    pre = make_model()
    fully_shard(pre.layers[1], mesh=mesh)
    capture("already_fsdp", lambda: shard_with_freezing(pre, mesh, FreezePolicy(units=UNITS)))
    twice = shard_with_freezing(make_model(), mesh, FreezePolicy(units=UNITS))
    capture("twice", lambda: shard_with_freezing(twice, mesh, FreezePolicy(units=UNITS)))
    capture("bad_unit", lambda: shard_with_freezing(make_model(), mesh, FreezePolicy(units=["blocks.*"])))
    return {"errors": errors, "untouched": untouched}


def test_bad_input_is_refused_before_sharding():
    r = run_ranks(_bad_input, 4)[0]
    errors = r["errors"]
    assert r["untouched"]
    assert errors["int_reshard"][0] == "PolicyError" and "frozen_reshard=4" in errors["int_reshard"][1]
    assert "[2]" in errors["int_reshard"][1]
    assert errors["not_a_policy"] == ("PolicyError", "policy must be a FreezePolicy, got dict")
    assert errors["mesh_3d"][0] == "PolicyError" and "1-D (FSDP) or 2-D (HSDP)" in errors["mesh_3d"][1]
    assert errors["already_fsdp"][0] == "PolicyError" and "'layers.1' already has fully_shard" in errors["already_fsdp"][1]
    assert errors["twice"][0] == "PolicyError" and "is already sharded by shard_with_freezing" in errors["twice"][1]
    assert errors["bad_unit"][0] == "PolicyError" and "'blocks.*'" in errors["bad_unit"][1]


def _flip(rank: int, world_size: int, which: str, reshard: str) -> str:
    model = shard_with_freezing(make_model(), mesh_1d(world_size), FreezePolicy(units=UNITS, frozen_reshard=reshard))
    train(model, 1, rank)
    name = {"unfreeze": "layers.0.attn.base_layer.weight", "freeze": "layers.0.attn.lora_A.weight"}[which]
    model.get_parameter(name).requires_grad_(which == "unfreeze")
    try:
        model(batch(0, rank)[0])
    except FreezingChangedError as exc:
        return str(exc)
    return "no error"


# at one rank the frozen weights are kept whole outside FSDP ([Note: whole frozen groups]): checked as well
@pytest.mark.parametrize("which, reshard, world", [("unfreeze", "after_forward", 2), ("unfreeze", "never", 2),
                                                   ("freeze", "after_backward", 2), ("unfreeze", "never", 1),
                                                   ("unfreeze", "after_backward", 1), ("freeze", "never", 1)])
def test_requires_grad_flip_is_detected_at_next_forward(which, reshard, world):
    msg = run_ranks(_flip, world, which, reshard)[0]
    name = {"unfreeze": "layers.0.attn.base_layer.weight", "freeze": "layers.0.attn.lora_A.weight"}[which]
    assert f"requires_grad of parameter {name!r} changed" in msg
    assert "before sharding" in msg


@structural_fallback()  # what torch < 2.12 gets
def _fallback(rank: int, world_size: int) -> dict:
    mesh = mesh_1d(world_size)
    ref = plain_fsdp(make_model(), mesh, tuple(UNITS))
    ref_losses = train(ref, 4, rank)
    out = {}
    tied_ref = plain_fsdp(make_model(tied=True), mesh, tuple(UNITS))
    tied_losses = train(tied_ref, 4, rank)
    for reshard, grouping in (("after_forward", "per_unit"), ("never", "per_unit"), ("after_forward", "root"),
                              ("never", "replicate"), ("never", "tied")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            policy = FreezePolicy(units=UNITS, frozen_reshard=reshard,
                                  trainable_grouping="per_unit" if grouping == "tied" else grouping)
            model = shard_with_freezing(make_model(tied=grouping == "tied"), mesh, policy)
        counter = CommCounter()
        with counter:
            losses = train(model, 4, rank)
        out[(reshard, grouping)] = {
            "reduce_scatters": counter.total("reduce_scatter", count=True),
            "all_reduces": counter.total("all_reduce", count=True),
            "warnings": [str(w.message) for w in caught if "cannot hold two param groups" in str(w.message)],
            "equal": (losses == (tied_losses if grouping == "tied" else ref_losses)
                      and all(torch.equal(a, b) for a, b in zip(full_state(tied_ref if grouping == "tied" else ref).values(),
                                                                full_state(model).values()))),
            "tie_holds": grouping != "tied" or model.tok.weight is model.head.weight,
            "table": str(describe(model)),
            "groups_per_state": max(len(compat.param_groups(m)) for m in model.modules() if compat.has_fsdp_state(m)),
        }
    return out


def test_structural_fallback_without_split_groups():
    for (reshard, grouping), r in run_ranks(_fallback, 2)[0].items():
        assert r["equal"] and r["tie_holds"], (reshard, grouping)
        if grouping == "tied":  # the embedding and the head it is tied to: one frozen-only group, one tensor
            continue
        # 4 steps; per_unit: the root and the 2 blocks with trainable parameters reduce-scatter; root: the root only,
        # and the blocks' unsplit frozen weights (proj.weight) stay in their own groups, which reduce-scatter nothing;
        # replicate: one all-reduce a step and no reduce-scatter
        assert r["reduce_scatters"] == 4 * {"per_unit": 3, "root": 1, "replicate": 0}[grouping], (reshard, grouping)
        assert r["all_reduces"] == 4 * (grouping == "replicate"), (reshard, grouping)
        assert len(r["warnings"]) == 1
        assert "layers.0.proj.weight" in r["warnings"][0] and "layers.1.proj.weight" in r["warnings"][0]
        assert "not split off" in r["table"]
        assert r["groups_per_state"] == 1


def test_harness_reports_failing_rank_and_timeout():
    with pytest.raises(RankFailure, match=r"rank 1 of 2 failed:[\s\S]*ValueError: boom on rank 1"):
        run_ranks(_fail_on_rank_1, 2)
    run_ranks(_fail_on_rank_1, 2, -1)  # the pool, renewed after the failure, is up: 2 s below is only the task
    with pytest.raises(TimeoutError, match=r"ranks \[1\] of 2 did not finish"):
        run_ranks(_hang_on_rank_1, 2, timeout=2)


def _fail_on_rank_1(rank: int, world_size: int, on: int = 1) -> None:
    if rank == on:
        raise ValueError("boom on rank 1")


def _hang_on_rank_1(rank: int, world_size: int) -> None:
    if rank == 1:
        import time

        time.sleep(600)


def test_version_gates(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.5.1")
    with pytest.raises(ImportError, match=r"fsdp_frozen needs torch >= 2.6, found 2.5.1"):
        importlib.reload(compat)
    monkeypatch.undo()
    importlib.reload(compat)
    assert compat.split_groups_supported() == (compat.TORCH_VERSION >= (2, 12))  # checked on real 2.10-2.14


def test_tied_param_gate_on_old_torch(monkeypatch):
    from fsdp_frozen.plan import build_plan

    monkeypatch.setattr(compat, "IGNORED_PARAMS_SUPPORTED", False)
    with pytest.raises(PolicyError, match=r"tied parameter 'tok.weight' is used in unit 'tok'.*torch >= 2.7"):
        build_plan(make_model(tied=True), FreezePolicy(units=["tok", "layers.*"]), shard_size=2)


def _process_groups_reused(rank: int, world: int) -> dict:
    from fsdp_frozen import release_process_groups
    from fsdp_frozen.apply import sharded_state

    def frozen_pgs(model):
        return {id(compat.mesh_info_groups(group.mesh_info)[0]) for group, _ in sharded_state(model).frozen_settings}

    release_process_groups()  # what earlier tasks in these pooled ranks left: only this task's are counted
    mesh = mesh_1d(world)
    first = shard_with_freezing(make_model(), mesh, FreezePolicy(units=["layers.*"]))
    second = shard_with_freezing(make_model(seed=1), mesh, FreezePolicy(units=["layers.*"], frozen_reshard="never"))
    hsdp = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    other = shard_with_freezing(make_model(), hsdp, FreezePolicy(units=["layers.*"]))
    # an equal mesh built anew (new sub-groups for a 2-D mesh) reuses them: keyed by rank layout (issue 23, 10)
    rebuilt = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    again = shard_with_freezing(make_model(), rebuilt, FreezePolicy(units=["layers.*"]))
    out = {"same_mesh": frozen_pgs(first) == frozen_pgs(second) and len(frozen_pgs(first)) == 1,
           "other_mesh_differs": not (frozen_pgs(first) & frozen_pgs(other)),
           "rebuilt_mesh_reuses": frozen_pgs(again) == frozen_pgs(other) and rebuilt.get_group(1) is not hsdp.get_group(1),
           "counted": [describe(m).frozen_process_groups for m in (first, other, shard_with_freezing(
               make_model(), mesh, FreezePolicy(units=["layers.*"], frozen_reshard=2)))],
           "table": str(describe(other))}
    kept = [compat.mesh_info_groups(g.mesh_info)[0] for g, _ in sharded_state(first).frozen_settings[:1]]
    out["released"] = release_process_groups()
    third = shard_with_freezing(make_model(), mesh, FreezePolicy(units=["layers.*"]))
    out["fresh_after_release"] = all(compat.mesh_info_groups(g.mesh_info)[0] is not kept[0]
                                     for g, _ in sharded_state(third).frozen_settings)
    train(third, 1, rank)  # the new groups work
    return out


@pytest.mark.split_layout
def test_frozen_process_groups_are_created_once_per_mesh_and_released():
    for r in run_ranks(_process_groups_reused, 4):
        assert r["same_mesh"] and r["other_mesh_differs"] and r["fresh_after_release"], r
        assert r["rebuilt_mesh_reuses"], r
        assert r["counted"] == [1, 2, 3], r  # 1-D: the shard dim's; HSDP: shard and replicate; int: + its 2 x 2 mesh's two
        assert "frozen groups add 2 process group(s)" in r["table"], r["table"]
        assert r["released"] == 5, r  # the 1-D mesh's shard group, the int reshard's 2 x 2 post-forward mesh's two; the HSDP mesh's shard and replicate groups


def _release(rank: int, world_size: int) -> int:
    from fsdp_frozen import release_process_groups

    return release_process_groups()


def _build_after_release(rank: int, world_size: int) -> dict:
    """Models on a 1-D and an HSDP mesh, each mesh built anew; a step; every parameter gathered whole
    (DTensor collectives on its spec's groups); then `release_process_groups`."""
    from fsdp_frozen import release_process_groups

    out = {}
    meshes = {"1d": mesh_1d(world_size),
              "hsdp": init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=("replicate", "shard"))}
    for name, mesh in meshes.items():
        model = shard_with_freezing(make_model(), mesh, FreezePolicy(units=UNITS, frozen_dtype="bfloat16",
                                                                     param_dtype="bfloat16"))
        losses = train(model, 1, rank)
        assert [n for n, p in model.named_parameters() if compat.released_groups(p)] == []  # no destroyed group
        frozen_meshes = {tuple(p.device_mesh._dim_group_names) for p in model.parameters() if not p.requires_grad}
        out[name] = {"losses": losses, "full": full_state(model), "frozen_meshes": frozen_meshes}
    out["released"] = release_process_groups()
    return out


@pytest.mark.split_layout
def test_models_built_after_release_process_groups_train():
    """Models built in the same processes after `release_process_groups` (the pooled ranks: the second task
    inherits the first's history) neither hang nor use a released group: [Note: frozen groups' names] in
    _torch_compat (torch <= 2.13 reused a destroyed group's name and store keys: gloo hung; DTensor's spec
    cache handed a frozen parameter the released mesh: "Could not resolve the process group")."""
    run_ranks(_release, 4)  # what earlier tasks in these pooled ranks left
    first = run_ranks(_build_after_release, 4, timeout=120)
    second = run_ranks(_build_after_release, 4, timeout=120)
    for a, b in zip(first, second):
        assert a["released"] == b["released"] == 3, (a["released"], b["released"])  # 1-D: 1; HSDP: 2
        for name in ("1d", "hsdp"):
            assert a[name]["losses"] == b[name]["losses"], name
            assert all(torch.equal(a[name]["full"][k], v) for k, v in b[name]["full"].items()), name
            # every frozen parameter on the frozen groups' one mesh, a new one after the release
            assert len(b[name]["frozen_meshes"]) == 1 and a[name]["frozen_meshes"] != b[name]["frozen_meshes"], name


OPENED = ("layers.*.norm.*", "layers.*.attn.base_layer.*", "layers.*.mlp.base_layer.*")


@structural_fallback()  # what torch < 2.12 gets
def _fallback_one_module(rank: int, world_size: int) -> dict:
    """Each block's frozen-only part is one module (proj): its FSDP group's own pre-hook is replaced by one
    that passes when the block entered the group ([Note: frozen group entered at its unit] in apply.py)."""
    from fnmatch import fnmatch

    mesh = mesh_1d(world_size)
    kinds = {"mixed_bias": False, "frozen_block": False}  # proj wholly frozen in every block
    ref = make_model(**kinds)
    for name, p in ref.named_parameters():
        if any(fnmatch(name, g) for g in OPENED):
            p.requires_grad_(True)
    ref = plain_fsdp(ref, mesh, tuple(UNITS))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's "cannot hold two param groups" warning
        model = shard_with_freezing(make_model(**kinds), mesh, FreezePolicy(units=UNITS, unfreeze=list(OPENED)))
    from fsdp_frozen import refreeze
    from fsdp_frozen.apply import sharded_state

    modules = {g.unit: list(g.modules) for g in sharded_state(model).plan.groups if g.kind == "frozen" and g.unit}
    opt = adamw(model)
    out = {"modules": modules, "ref": train(ref, 3, rank), "ours": train(model, 3, rank, opt=opt)}
    out["equal"] = all(torch.equal(a, b) for a, b in zip(full_state(ref).values(), full_state(model).values()))
    # the group's pre-forward runs once per forward (at the block), not again at proj
    calls = []
    groups = [layer.proj._get_fsdp_state()._fsdp_param_group for layer in model.layers]
    for i, g in enumerate(groups):
        g.pre_forward = (lambda f, i: lambda *a: calls.append(i) or f(*a))(g.pre_forward, i)
    with torch.no_grad():
        model(batch(0, rank)[0])
    for g in groups:
        del g.pre_forward
    out["pre_forward_calls"] = calls
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        refreeze(model, opt, FreezePolicy(units=UNITS))  # the replaced hooks come off; groups of several modules
    out["after_refreeze"] = train(model, 1, rank, opt=opt, start=3)
    return out


def test_fallback_frozen_group_of_one_module_is_entered_at_its_unit():
    for r in run_ranks(_fallback_one_module, 2):
        assert r["modules"] == {f"layers.{i}": [f"layers.{i}.proj"] for i in range(3)}, r["modules"]
        assert r["ours"] == r["ref"] and r["equal"], (r["ours"], r["ref"])
        assert r["pre_forward_calls"] == [0, 1, 2], r["pre_forward_calls"]
        assert len(r["after_refreeze"]) == 1 and r["after_refreeze"][0] == r["after_refreeze"][0]  # finite
