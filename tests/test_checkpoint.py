"""Checkpointing: key layout, manifest, frozen written once, refusals, imports/exports, atomicity."""

from __future__ import annotations

import contextlib
import json
import os
import signal

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
from torch.distributed.tensor import DTensor

from fsdp_frozen import FreezePolicy, shard_with_freezing
from fsdp_frozen.apply import sharded_state
from fsdp_frozen.checkpoint import (
    CheckpointLayoutError,
    FrozenLoadPlanner,
    FrozenSavePlanner,
    export_safetensors,
    load_checkpoint,
    read_manifest,
    save_checkpoint,
)

from .common import adamw, full_state, mesh_1d, plain_fsdp, structural_fallback, train
from .dist_harness import RankFailure, run_ranks
from .models import make_model

UNITS = ("layers.*",)


def build(world: int, seed: int = 0, **policy) -> torch.nn.Module:
    policy.setdefault("units", UNITS)
    if policy.get("frozen_dtype") not in (None, "float32"):
        policy.setdefault("param_dtype", policy["frozen_dtype"])
    return shard_with_freezing(make_model(seed), mesh_1d(world), FreezePolicy(**policy))


def full_optim(model, opt) -> dict[str, torch.Tensor]:
    osd = get_optimizer_state_dict(model, opt)
    return {
        f"{p}/{n}": (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
        for p, s in osd["state"].items()
        for n, v in s.items()
    }


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: keys differ: {sorted(a.keys() ^ b.keys())}"
    bad = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not bad, f"{what}: not bitwise equal: {bad}"


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


# ---------------------------------------------------------------------------------------------- format
def _format_and_roundtrip(rank: int, world: int, tmp: str) -> dict:
    model = build(world, frozen_dtype="bfloat16")
    opt = adamw(model)
    train(model, 2, rank, opt=opt)
    path = save_checkpoint(os.path.join(tmp, "ck"), model, opt, extra={"step": 2, "rng": torch.arange(4)})
    fresh = build(world, seed=1, frozen_dtype="bfloat16")
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    extra = load_checkpoint(path, fresh, fresh_opt)
    assert extra["step"] == 2 and torch.equal(extra["rng"], torch.arange(4)), extra
    assert_same(full_state(model), full_state(fresh), "params")
    assert_same(full_optim(model, opt), full_optim(fresh, fresh_opt), "optimizer state")
    # Frozen parameters hold no optimizer state, before and after the load.
    frozen = {n for n, p in fresh.named_parameters() if not p.requires_grad}
    assert not any(k.split("/")[0] in frozen for k in full_optim(fresh, fresh_opt))
    # Training on from the loaded state matches training on from the original.
    assert train(model, 2, rank) == train(fresh, 2, rank)
    keys = sorted(FileSystemReader(path).read_metadata().state_dict_metadata)
    return {"keys": keys, "frozen": sorted(frozen)}


def test_keys_manifest_and_roundtrip(tmp_path):
    out = run_ranks(_format_and_roundtrip, 2, str(tmp_path))[0]
    keys, frozen = out["keys"], set(out["frozen"])
    kinds = {k.split("/")[0] for k in keys}
    assert kinds == {"frozen", "trainable", "buffers", "optimizer", "optimizer_groups", "extra"}, kinds
    assert "buffers/pos" in keys and "trainable/scale" in keys and "frozen/tok.weight" in keys
    assert {k.split("/", 1)[1] for k in keys if k.startswith("frozen/")} == frozen
    optim_params = {k.split("/")[1] for k in keys if k.startswith("optimizer/")}
    assert optim_params and not optim_params & frozen, "optimizer state only for trainable parameters"
    assert "optimizer/layers.0.attn.lora_A.weight/exp_avg" in keys

    manifest = json.loads((tmp_path / "ck" / "fsdp_frozen.json").read_text())
    assert manifest["format_version"] == 1 and manifest["torch_version"] == torch.__version__
    assert manifest["fsdp_frozen_version"] and manifest["world_size"] == 2
    assert manifest["frozen_state"] == "included" and manifest["base"] is None
    tok = manifest["params"]["tok.weight"]
    assert tok["kind"] == "frozen" and tok["dtype"] == "bfloat16" and tok["shape"] == [32, 16]
    assert tok["quantization"] is None and len(tok["checksum"]) == 32 and tok["stored"] == "here"
    assert manifest["params"]["scale"]["kind"] == "trainable" and manifest["params"]["scale"]["dtype"] == "float32"
    assert manifest["buffers"]["pos"]["shape"] == [64, 16]
    assert read_manifest(tmp_path / "ck") == manifest
    assert not list(tmp_path.glob("ck.tmp-*")), "temporary directory left behind"


# ------------------------------------------------------------------------------------ frozen written once
def _frozen_once(rank: int, world: int, tmp: str) -> dict:
    model = build(world, frozen_reshard="never")
    opt = adamw(model)
    train(model, 1, rank, opt=opt)
    first = save_checkpoint(os.path.join(tmp, "s1"), model, opt)  # auto, no base yet: includes frozen
    train(model, 1, rank)
    second = save_checkpoint(os.path.join(tmp, "s2"), model, opt)  # auto: reference to s1
    included = save_checkpoint(os.path.join(tmp, "s3"), model, opt, frozen="include")
    skipped = save_checkpoint(os.path.join(tmp, "s4"), model, opt, frozen="skip")
    expected = full_state(model)

    fresh = build(world, seed=1, frozen_reshard="never")
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    load_checkpoint(second, fresh, fresh_opt)  # follows the reference to s1
    assert_same(expected, full_state(fresh), "via reference")
    assert_same(full_optim(model, opt), full_optim(fresh, fresh_opt), "optimizer via reference")
    # A model loaded from a reference saves a reference to the same base, not the frozen weights again.
    again = save_checkpoint(os.path.join(tmp, "s5"), fresh, fresh_opt)

    # "skip": the frozen weights in the model stay as they are (here: seed 2's).
    other = build(world, seed=2, frozen_reshard="never")
    frozen = {n for n, p in other.named_parameters() if not p.requires_grad}
    before = full_state(other)
    load_checkpoint(skipped, other)
    after = full_state(other)
    assert all(torch.equal(before[n], after[n]) for n in frozen)
    assert all(torch.equal(after[n], expected[n]) for n in after if n not in frozen)

    # Frozen weights changed in place: "auto" notices (fingerprint) and writes them again.
    with torch.no_grad():
        fresh.get_parameter("tok.weight").mul_(2)
    changed = save_checkpoint(os.path.join(tmp, "s6"), fresh, fresh_opt)
    return {"paths": [first, second, included, skipped, again, changed]}


def test_frozen_written_once_and_references(tmp_path):
    paths = run_ranks(_frozen_once, 2, str(tmp_path))[0]["paths"]
    manifests = [read_manifest(p) for p in paths]
    states = [m["frozen_state"] for m in manifests]
    assert states == ["included", "referenced", "included", "skipped", "referenced", "included"], states
    assert manifests[1]["base"]["path"] == "../s1" and manifests[4]["base"]["path"] == "../s1"
    assert manifests[1]["base"]["fingerprint"] == manifests[0]["frozen_fingerprint"]
    assert manifests[5]["frozen_fingerprint"] != manifests[0]["frozen_fingerprint"]
    for p in paths:
        stored = [k for k in FileSystemReader(p).read_metadata().state_dict_metadata if k.startswith("frozen/")]
        assert bool(stored) == (read_manifest(p)["frozen_state"] == "included"), p
    frozen_bytes = sum(
        torch.Size(e["shape"]).numel() * getattr(torch, e["dtype"]).itemsize
        for e in manifests[0]["params"].values() if e["kind"] == "frozen"
    )
    assert dir_bytes(paths[0]) - dir_bytes(paths[1]) >= frozen_bytes


def _load_expect_error(rank: int, world: int, path: str, seed: int, kwargs: dict) -> str:
    model = build(world, seed=seed, frozen_reshard="never")
    before = full_state(model)
    try:
        load_checkpoint(path, model, **kwargs)
    except CheckpointLayoutError as e:
        assert_same(before, full_state(model), "model after a refused load")
        return str(e)
    raise AssertionError("load_checkpoint did not refuse")


def test_missing_moved_or_changed_base(tmp_path):
    run_ranks(_frozen_once, 2, str(tmp_path))
    # Changed: s1 replaced by a checkpoint with other frozen weights (s6's).
    os.rename(tmp_path / "s1", tmp_path / "s1-moved")
    msg = run_ranks(_load_expect_error, 2, str(tmp_path / "s2"), 0, {})[0]
    assert "base checkpoint" in msg and str(tmp_path / "s1") in msg and "missing" in msg, msg
    os.rename(tmp_path / "s6", tmp_path / "s1")
    msg = run_ranks(_load_expect_error, 2, str(tmp_path / "s2"), 0, {})[0]
    assert str(tmp_path / "s1") in msg and "has changed" in msg, msg


# ------------------------------------------------------------------------------------------- refusals
def _save_plain_layout(rank: int, world: int, tmp: str, policy: dict, seed: int = 0) -> None:
    model = build(world, seed=seed, **policy)
    opt = adamw(model)
    train(model, 1, rank, opt=opt)
    save_checkpoint(tmp, model, opt)


def _refusals(rank: int, world: int, path: str) -> dict:
    out = {}
    # bf16 frozen storage now, fp32 at save: a dtype difference, never a silent cast.
    model = build(world, seed=3, frozen_dtype="bfloat16")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, 1, rank)
    before, before_opt = full_state(model), full_optim(model, opt)
    with pytest.raises(CheckpointLayoutError) as e:
        load_checkpoint(path, model, opt)
    out["dtype"] = str(e.value)
    assert_same(before, full_state(model), "params after refusal")
    assert_same(before_opt, full_optim(model, opt), "optimizer after refusal")
    # cast=True converts, equal to casting the saved values.
    load_checkpoint(path, model, opt, cast=True)
    same_layout = build(world, seed=4)
    load_checkpoint(path, same_layout)
    saved, cast = full_state(same_layout), full_state(model)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert all(torch.equal(cast[n], saved[n].to(torch.bfloat16).float()) for n in frozen)
    assert all(torch.equal(cast[n], saved[n]) for n in cast if n not in frozen)

    # Frozen vs trainable: unfreeze a frozen weight, freeze a trainable one.
    flipped = build(world, seed=3, unfreeze=("layers.0.proj.weight",), freeze=("layers.0.attn.lora_A.weight",))
    with pytest.raises(CheckpointLayoutError) as e:
        load_checkpoint(path, flipped)
    out["kind"] = str(e.value)

    # Missing, extra, and shape differences, all in one message.
    model = make_model(3, n_layers=4)  # one block more: its parameters are missing from the checkpoint
    model.head = torch.nn.Linear(16, 33, bias=False)  # shape differs
    model.head.weight.requires_grad_(False)
    del model.norm  # the checkpoint has parameters the model lacks
    model.norm = torch.nn.Identity()
    sharded = shard_with_freezing(model, mesh_1d(world), FreezePolicy(units=UNITS))
    with pytest.raises(CheckpointLayoutError) as e:
        load_checkpoint(path, sharded)
    out["many"] = str(e.value)

    # An optimizer asked for, none saved.
    no_opt = os.path.join(os.path.dirname(path), "no_opt")
    save_checkpoint(no_opt, build(world), None)
    m = build(world)
    fresh_opt = torch.optim.AdamW(m.parameters())
    with pytest.raises(CheckpointLayoutError) as e:
        load_checkpoint(no_opt, m, fresh_opt)
    out["optimizer"] = str(e.value)
    assert not fresh_opt.state, "a refused load left state in a fresh optimizer"
    return out


def test_layout_refusals_list_every_difference(tmp_path):
    path = str(tmp_path / "ck")
    run_ranks(_save_plain_layout, 2, path, {})
    out = run_ranks(_refusals, 2, path)[0]
    assert "'frozen/tok.weight': dtype float32 in the checkpoint, bfloat16 in the model" in out["dtype"]
    assert "cast=True" in out["dtype"] and "nothing was loaded" in out["dtype"]
    assert "parameter 'layers.0.proj.weight' is trainable in the model but frozen in the checkpoint" in out["kind"]
    assert "parameter 'layers.0.attn.lora_A.weight' is frozen in the model but trainable" in out["kind"]
    assert "allow_freezing_change=True" in out["kind"]
    many = out["many"]
    assert "parameter 'layers.3.attn.base_layer.weight' (frozen in the model) is missing" in many
    assert "'frozen/head.weight': shape [32, 16] in the checkpoint, [33, 16] in the model" in many
    assert "the checkpoint has parameter 'norm.weight' (trainable), which the model does not have" in many
    assert "holds no optimizer state" in out["optimizer"]


def _freezing_change(rank: int, world: int, path: str) -> dict:
    model = build(world, unfreeze=("layers.0.proj.weight",), freeze=("layers.0.attn.lora_A.weight",))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with pytest.warns(UserWarning, match=r"layers\.0\.attn\.lora_A\.weight"):
        load_checkpoint(path, model, opt, allow_freezing_change=True)
    state = full_optim(model, opt)
    newly = {k: v for k, v in state.items() if k.startswith("layers.0.proj.weight/")}
    assert newly and all(not v.any() for v in newly.values()), "zero-initialised state for a newly trainable param"
    assert not any(k.startswith("layers.0.attn.lora_A.weight/") for k in state)
    ref = build(world)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    load_checkpoint(path, ref, ref_opt)
    ref_state = full_optim(ref, ref_opt)
    kept = [k for k in ref_state if not k.startswith("layers.0.attn.lora_A.weight/")]
    assert all(torch.equal(ref_state[k], state[k]) for k in kept)
    assert_same(full_state(ref), full_state(model), "params")
    train(model, 1, rank)  # trains on with the new split
    return {}


def test_allow_freezing_change(tmp_path):
    path = str(tmp_path / "ck")
    run_ranks(_save_plain_layout, 2, path, {})
    run_ranks(_freezing_change, 2, path)


# ------------------------------------------------------------------------------------ imports/exports
def _import_plain(rank: int, world: int, tmp: str) -> None:
    # A pretrained base: plain FSDP2 (one mixed group per unit), saved with plain dcp.save.
    base = plain_fsdp(make_model(5), mesh_1d(world), UNITS)
    dcp.save(base.state_dict(), checkpoint_id=os.path.join(tmp, "plain"))
    expected = full_state(base)
    model = build(world, seed=6, frozen_reshard="after_backward")
    load_checkpoint(os.path.join(tmp, "plain"), model)
    assert_same(expected, full_state(model), "imported from plain dcp.save")
    # {"model": ..., "optimizer": ...} layout: "model."-prefixed keys; other entries are not model state.
    opt = torch.optim.AdamW(base.parameters())
    dcp.save({"model": base.state_dict(), "optimizer": opt.state_dict()}, checkpoint_id=os.path.join(tmp, "nested"))
    model = build(world, seed=6)
    load_checkpoint(os.path.join(tmp, "nested"), model)
    assert_same(expected, full_state(model), "imported from a nested plain checkpoint")
    # A base without adapters: strict=False leaves the LoRA weights as they are.
    lora = {k: v for k, v in base.state_dict().items() if "lora" not in k}
    dcp.save(lora, checkpoint_id=os.path.join(tmp, "no_lora"))
    model = build(world, seed=6)
    before = full_state(model)
    with pytest.raises(CheckpointLayoutError, match=r"'layers\.0\.attn\.lora_A\.weight' \(trainable in the model\) is missing"):
        load_checkpoint(os.path.join(tmp, "no_lora"), model)
    load_checkpoint(os.path.join(tmp, "no_lora"), model, strict=False)
    after = full_state(model)
    assert all(torch.equal(after[k], before[k] if "lora" in k else expected[k]) for k in after)
    # Export: consolidated safetensors of the whole model and of the trainable part.
    from safetensors.torch import load_file

    whole = load_file(export_safetensors(model, os.path.join(tmp, "whole")))
    adapter = load_file(export_safetensors(model, os.path.join(tmp, "adapter"), part="trainable"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(adapter) == trainable
    assert set(whole) == set(after) | {"pos"}
    assert all(torch.equal(whole[k], after[k]) for k in after)
    with pytest.raises(ValueError, match="part must be one of"):
        export_safetensors(model, os.path.join(tmp, "x"), part="frozen")
    with pytest.raises(FileExistsError, match="whole"):
        export_safetensors(model, os.path.join(tmp, "whole"))


def test_import_plain_dcp_and_export_safetensors(tmp_path):
    pytest.importorskip("safetensors", reason="export needs the safetensors package (the 'export' extra)")
    run_ranks(_import_plain, 2, str(tmp_path))


def _plain_dcp_with_planners(rank: int, world: int, tmp: str) -> str:
    model = build(world, frozen_dtype="bfloat16")
    train(model, 1, rank)
    path = os.path.join(tmp, "dcp")
    dcp.save(model.state_dict(), checkpoint_id=path, planner=FrozenSavePlanner(model))
    fresh = build(world, seed=1, frozen_dtype="bfloat16")
    sd = fresh.state_dict()
    dcp.load(sd, checkpoint_id=path, planner=FrozenLoadPlanner(fresh))
    fresh.load_state_dict(sd)
    assert_same(full_state(model), full_state(fresh), "plain dcp.save/load with the planners")
    wrong = build(world, seed=1)  # fp32 frozen storage: refused by the planner inside dcp.load
    from torch.distributed.checkpoint.api import CheckpointException

    with pytest.raises(CheckpointException) as e:  # DCP wraps each rank's error
        dcp.load(wrong.state_dict(), checkpoint_id=path, planner=FrozenLoadPlanner(wrong))
    error = e.value.failures[rank][0]
    assert isinstance(error, CheckpointLayoutError), error
    assert "'frozen/tok.weight': dtype bfloat16 in the checkpoint, float32 in the model" in str(error)
    return ""


def test_planners_with_plain_dcp(tmp_path):
    run_ranks(_plain_dcp_with_planners, 2, str(tmp_path))
    keys = FileSystemReader(str(tmp_path / "dcp")).read_metadata().state_dict_metadata
    assert "frozen/tok.weight" in keys and "trainable/scale" in keys and "buffers/pos" in keys
    assert read_manifest(tmp_path / "dcp")["frozen_state"] == "included"


def _plan_cache(rank: int, world: int, tmp: str) -> list[int]:
    """Global plans DCP builds per save_checkpoint (rank 0): 0 when the cached plan is reused."""
    from torch.distributed.checkpoint import DefaultSavePlanner

    built = []
    original = DefaultSavePlanner._create_global_plan

    def counting(self, all_plans):
        built[-1] += 1
        return original(self, all_plans)

    DefaultSavePlanner._create_global_plan = counting
    model = build(world, frozen_dtype="bfloat16")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, 1, rank, opt=opt)
    x32, x16 = torch.arange(3.0), torch.arange(3.0).to(torch.bfloat16)
    saves = [("base", None), ("r1", None), ("r2", None), ("x32", x32), ("x16", x16), ("x16b", x16)]
    for name, x in saves:
        built.append(0)
        save_checkpoint(os.path.join(tmp, name), model, opt, extra=None if x is None else {"x": x})
    fresh = build(world, seed=1, frozen_dtype="bfloat16")
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    for name, x in saves:
        extra = load_checkpoint(os.path.join(tmp, name), fresh, fresh_opt)
        if x is not None:  # a cached plan made for float32 must not describe the bfloat16 save
            dtype = FileSystemReader(os.path.join(tmp, name)).read_metadata().state_dict_metadata["extra/x"]
            assert dtype.properties.dtype == x.dtype and extra["x"].dtype == x.dtype, (name, dtype, extra)
        assert_same(full_state(model), full_state(fresh), name)
        assert_same(full_optim(model, opt), full_optim(fresh, fresh_opt), name)
    return built


def test_save_plans_are_cached_per_layout(tmp_path):
    built = run_ranks(_plan_cache, 2, str(tmp_path), fresh=True)[0]  # patches DCP; DCP's plan cache is per process
    # base (frozen included), r1 (a reference: new layout), r2 (same: cached), x32 (new), x16 (same shapes,
    # another dtype: new), x16b (cached)
    assert built == [1, 1, 0, 1, 1, 0], built


def test_save_plan_caching_gate(monkeypatch):
    from fsdp_frozen import _torch_compat as compat

    model = torch.nn.Linear(2, 2)
    assert FrozenSavePlanner(model).plan_caching is compat.SAVE_PLAN_CACHING_SUPPORTED
    assert FrozenSavePlanner(model, enable_plan_caching=False).plan_caching is False
    monkeypatch.setattr(compat, "SAVE_PLAN_CACHING_SUPPORTED", False)  # torch < 2.7: not passed to DCP
    planner = FrozenSavePlanner(model)
    assert planner.plan_caching is False and not getattr(planner, "_enable_plan_caching", False)


# ------------------------------------------------------------------------------- resharding and resume
RESHARD_POLICIES = {
    "after_forward": {},
    "after_backward": {"frozen_reshard": "after_backward"},
    "never": {"frozen_reshard": "never"},
    "bf16": {"frozen_dtype": "bfloat16", "frozen_reshard": "never"},
}


def _reshard_step(rank: int, world: int, tmp: str, src: str | None, dst: str) -> dict:
    """Load every policy's checkpoint from `src` (or train one), compare, save it to `dst`."""
    out = {}
    for name, policy in RESHARD_POLICIES.items():
        model = build(world, seed=0 if src is None else 7, **policy)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        if src is None:
            train(model, 2, rank, opt=opt)
        else:
            load_checkpoint(os.path.join(tmp, src, name), model, opt)
        save_checkpoint(os.path.join(tmp, dst, name), model, opt, frozen="include")
        out[name] = (full_state(model), full_optim(model, opt))
    return out


def test_resharding_4_2_1_4(tmp_path):
    """Save at world 4, load at 2, at 1, back at 4: parameters and optimizer state bitwise equal."""
    first = run_ranks(_reshard_step, 4, str(tmp_path), None, "w4")[0]
    for src, dst, world in (("w4", "w2", 2), ("w2", "w1", 1), ("w1", "w4b", 4)):
        got = run_ranks(_reshard_step, world, str(tmp_path), src, dst)[0]
        for name in RESHARD_POLICIES:
            assert_same(first[name][0], got[name][0], f"{name}: params at world {world}")
            assert_same(first[name][1], got[name][1], f"{name}: optimizer state at world {world}")


def _resume(rank: int, world: int, tmp: str) -> tuple[list[float], list[float]]:
    straight = build(world)
    losses = train(straight, 6, rank)
    expected = full_state(straight)

    model = build(world)
    opt = adamw(model)
    first = train(model, 3, rank, opt=opt)
    save_checkpoint(os.path.join(tmp, "ck"), model, opt, extra={"step": 3})
    resumed = build(world, seed=1)
    opt = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    step = load_checkpoint(os.path.join(tmp, "ck"), resumed, opt)["step"]
    rest = train(resumed, 6 - step, rank, opt=opt, start=step)
    assert_same(expected, full_state(resumed), "params after resume")
    return losses, first + rest


def test_resume_is_bitwise(tmp_path):
    for losses, resumed in run_ranks(_resume, 2, str(tmp_path)):
        assert losses == resumed


def _resume_across_paths(rank: int, world: int, tmp: str, frozen_dtype: str, saved_in: str) -> dict:
    """A run saved on one torch's path resumed on the other's: torch 2.6-2.11's structural fallback and
    2.12+'s split groups (a torch upgrade mid-run, or a checkpoint moved between clusters)."""
    path = {"fallback": structural_fallback, "split": contextlib.nullcontext}
    policy = dict(frozen_dtype=frozen_dtype, param_dtype="bfloat16", frozen_reshard="never")
    if frozen_dtype == "nf4":
        policy.update(nf4_block_size=16, nf4_scaler_block_size=4)
    straight = build(world, **policy)  # the reference: 4 steps on the split path, in one go
    losses = train(straight, 4, rank)
    expected = full_state(straight)
    with path[saved_in]():
        model = build(world, **policy)
        opt = adamw(model)
        first = train(model, 1, rank, opt=opt)
        save_checkpoint(os.path.join(tmp, "s1"), model, opt)  # the frozen weights, once
        first += train(model, 1, rank, opt=opt, start=1)
        second = save_checkpoint(os.path.join(tmp, "s2"), model, opt, extra={"step": 2})  # references s1
    with path["split" if saved_in == "fallback" else "fallback"]():
        resumed = build(world, seed=1, **policy)
        opt = adamw(resumed)
        step = load_checkpoint(second, resumed, opt)["step"]
        rest = train(resumed, 4 - step, rank, opt=opt, start=step)
    splits = [sharded_state(m).plan.split for m in (model, resumed)]
    assert splits == [saved_in == "split", saved_in != "split"], splits  # the two paths, as named
    assert_same(expected, full_state(resumed), "params after the resume")
    return {"straight": losses, "resumed": first + rest, "frozen": read_manifest(second)["frozen_state"]}


@pytest.mark.split_layout  # needs both paths: torch >= 2.12 (the fallback forced for one of them)
@pytest.mark.parametrize("frozen_dtype", ["bfloat16", "nf4"])
@pytest.mark.parametrize("saved_in", ["fallback", "split"])
def test_resume_across_the_fallback_and_split_layouts(tmp_path, frozen_dtype, saved_in):
    """Saved in the structural fallback and resumed with split groups, or the other way: the same keys
    and shards (a checkpoint names parameters by FQN, never by FSDP group), bitwise the straight run,
    through a checkpoint that references its base."""
    for r in run_ranks(_resume_across_paths, 2, str(tmp_path), frozen_dtype, saved_in):
        assert r["resumed"] == r["straight"] and r["frozen"] == "referenced", r


# ------------------------------------------------------------------------------------------ atomicity
def _save_then_die(rank: int, world: int, tmp: str) -> None:
    model = build(world)
    opt = adamw(model)
    train(model, 1, rank, opt=opt)
    path = os.path.join(tmp, "ck")
    save_checkpoint(path, model, opt)
    if rank == 0:
        torch.save(full_state(model), os.path.join(tmp, "expected.pt"))
    else:
        full_state(model)
    train(model, 1, rank)
    if rank == 1:  # killed while writing its shard of the next save
        original = FrozenSavePlanner.resolve_data

        def die(self, item):
            os.kill(os.getpid(), signal.SIGKILL)
            return original(self, item)

        FrozenSavePlanner.resolve_data = die
    save_checkpoint(path, model, opt, overwrite=True)


def _load_compare(rank: int, world: int, tmp: str) -> None:
    model = build(world, seed=1)
    load_checkpoint(os.path.join(tmp, "ck"), model, torch.optim.AdamW(model.parameters()))
    assert_same(torch.load(os.path.join(tmp, "expected.pt")), full_state(model), "previous checkpoint")
    save_checkpoint(os.path.join(tmp, "ck"), model, overwrite=True)  # cleans the leftover temporary dir


def test_rank_killed_mid_save_leaves_previous_checkpoint(tmp_path):
    # Rank 1 dies; rank 0 either is reported first or fails in its collective (gloo: reset or closed).
    with pytest.raises(RankFailure, match=r"rank\(s\) \[1\] died|Connection (reset|closed) by peer"):
        run_ranks(_save_then_die, 2, str(tmp_path), timeout=120, fresh=True)  # patches FrozenSavePlanner, kills rank 1
    assert list(tmp_path.glob("ck.tmp-*")), "the interrupted save wrote into a temporary directory"
    assert read_manifest(tmp_path / "ck")["frozen_state"] == "included"
    run_ranks(_load_compare, 2, str(tmp_path))
    assert not list(tmp_path.glob("ck.tmp-*")) and not list(tmp_path.glob("ck.old-*"))


def _bad_files(rank: int, world: int, tmp: str, case: str) -> str:
    path = os.path.join(tmp, case)
    model = build(world)
    save_checkpoint(path, model)
    dist.barrier()
    if rank == 0:
        md = FileSystemReader(path).read_metadata()
        (index, info), *_ = [(i, s) for i, s in md.storage_data.items() if i.fqn == "frozen/tok.weight"]
        file = os.path.join(path, info.relative_path)
        if case == "truncated":
            os.truncate(file, info.offset + info.length - 10)
        elif case == "corrupted":  # flip one byte inside the tensor's raw data: DCP reads it without complaint
            raw = model.state_dict()["tok.weight"].to_local().numpy().tobytes()
            data = bytearray(open(file, "rb").read())
            at = data.find(raw[:64])
            assert at >= 0
            data[at + 5] ^= 0xFF
            open(file, "wb").write(bytes(data))
        elif case == "no_metadata":
            os.remove(os.path.join(path, ".metadata"))
        elif case == "bad_manifest":
            open(os.path.join(path, "fsdp_frozen.json"), "w").write("{not json")
    dist.barrier()
    return _load_expect_error(rank, world, path, 1, {})


@pytest.mark.parametrize("case,expect", [
    ("truncated", r"checkpoint file '.*__\d_0\.distcp' is truncated \(\d+ bytes, needs \d+\)"),
    ("corrupted", r"checksum mismatch: .*'tok\.weight' \(in '.*__\d_0\.distcp'\)"),
    ("no_metadata", r"has no \.metadata file: it is not a DCP checkpoint or its save did not finish"),
    ("bad_manifest", r"manifest '.*fsdp_frozen\.json' cannot be read"),
])
def test_damaged_checkpoint_is_refused_naming_the_file(tmp_path, case, expect):
    import re

    msg = run_ranks(_bad_files, 2, str(tmp_path), case)[0]
    assert re.search(expect, msg), msg


# ----------------------------------------------------------------------------------- bad arguments, CLI
def _bad_arguments(rank: int, world: int, tmp: str) -> None:
    model = build(world)
    with pytest.raises(ValueError, match=r"frozen must be one of \('auto', 'include', 'skip'\), got 'always'"):
        save_checkpoint(os.path.join(tmp, "a"), model, frozen="always")
    save_checkpoint(os.path.join(tmp, "a"), model)
    with pytest.raises(FileExistsError, match=r"checkpoint '.*/a' exists; pass overwrite=True"):
        save_checkpoint(os.path.join(tmp, "a"), model)
    with pytest.raises(CheckpointLayoutError, match=r"checkpoint '.*/nowhere' does not exist"):
        load_checkpoint(os.path.join(tmp, "nowhere"), model)
    with pytest.raises(CheckpointLayoutError, match="frozen must be one of"):
        FrozenSavePlanner(model, frozen="sometimes")
    # Overwriting the checkpoint that holds the frozen base writes the frozen state again.
    latest, fresh = os.path.join(tmp, "latest"), build(world)
    save_checkpoint(latest, fresh)
    save_checkpoint(latest, fresh, overwrite=True)
    assert read_manifest(latest)["frozen_state"] == "included"
    load_checkpoint(latest, build(world, seed=1))


def test_bad_arguments(tmp_path):
    run_ranks(_bad_arguments, 1, str(tmp_path))


def test_manifest_format_version_is_checked(tmp_path):
    run_ranks(_save_plain_layout, 1, str(tmp_path / "ck"), {})
    manifest = json.loads((tmp_path / "ck" / "fsdp_frozen.json").read_text())
    manifest["format_version"] = 99
    (tmp_path / "ck" / "fsdp_frozen.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointLayoutError, match=r"format version 99; this fsdp_frozen reads version 1"):
        read_manifest(tmp_path / "ck")


def test_cli_inspect(tmp_path):
    from .common import run_cli

    run_ranks(_frozen_once, 2, str(tmp_path))
    text = run_cli(["inspect", str(tmp_path / "s2")]).stdout
    assert "frozen state referenced" in text and f"{tmp_path / 's1'}  (matches)" in text, text
    assert "trainable   13 params" in text and "frozen      22 params" in text, text
    info = json.loads(run_cli(["inspect", str(tmp_path / "s1"), "--json"]).stdout)
    assert info["frozen_state"] == "included" and info["params"]["frozen"]["count"] == 22
    assert info["params"]["trainable"]["bytes"] == sum(
        torch.Size(e["shape"]).numel() * 4 for e in read_manifest(tmp_path / "s1")["params"].values()
        if e["kind"] == "trainable"
    )
    os.rename(tmp_path / "s6", tmp_path / "s1-other")
    os.rename(tmp_path / "s1", tmp_path / "s1-old")
    os.rename(tmp_path / "s1-other", tmp_path / "s1")
    info = json.loads(run_cli(["inspect", str(tmp_path / "s2"), "--json"]).stdout)
    assert info["base"]["status"] == "fingerprint differs"
    bad = run_cli(["inspect", str(tmp_path / "missing")])
    assert bad.returncode == 2 and "does not exist" in bad.stderr


def _hsdp_save(rank: int, world: int, tmp: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    model = shard_with_freezing(make_model(), mesh, FreezePolicy(units=UNITS, frozen_reshard="after_backward"))
    opt = adamw(model)
    train(model, 2, rank, opt=opt)
    save_checkpoint(os.path.join(tmp, "hsdp"), model, opt)
    return {"params": full_state(model), "optim": full_optim(model, opt)}


def _hsdp_load(rank: int, world: int, tmp: str) -> dict:
    model = build(world, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    load_checkpoint(os.path.join(tmp, "hsdp"), model, opt)  # verifies checksums: shards counted once
    return {"params": full_state(model), "optim": full_optim(model, opt)}


def test_hsdp_checkpoint_loads_on_a_1d_mesh(tmp_path):
    """Saved on a 2x2 HSDP mesh (shards replicated over dim 0), loaded at world 2: bitwise, checksums agree."""
    saved = run_ranks(_hsdp_save, 4, str(tmp_path))[0]
    manifest = read_manifest(tmp_path / "hsdp")
    assert manifest["world_size"] == 4
    loaded = run_ranks(_hsdp_load, 2, str(tmp_path))[0]
    assert_same(saved["params"], loaded["params"], "params")
    assert_same(saved["optim"], loaded["optim"], "optimizer state")


def _staging_layout(rank: int, world: int) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from fsdp_frozen._torch_compat import is_host_staged, local_tensor
    from fsdp_frozen.checkpoint.io import _staging
    from fsdp_frozen.checkpoint.keys import model_kinds

    model = build(world, frozen_dtype="bfloat16")
    sd = get_model_state_dict(model)
    kinds = model_kinds(model)
    staged = _staging(sd, None, {}, kinds)["model"]
    out = {}
    for name, value in sd.items():
        got = staged[name]
        out[name] = {
            "kind": kinds[name],
            "host": is_host_staged(got) and local_tensor(got).device.type == "cpu",
            "same_layout": isinstance(got, DTensor) == isinstance(value, DTensor) and (
                not isinstance(value, DTensor) or (got.__create_chunk_list__() == value.__create_chunk_list__()
                                                   and got.placements == value.placements)),
            "same_storage": local_tensor(got).untyped_storage().data_ptr() == local_tensor(value).untyped_storage().data_ptr(),
        }
    return out


def test_frozen_state_is_staged_on_the_host_with_the_shards_layout():
    for per_rank in run_ranks(_staging_layout, 2):
        for name, r in per_rank.items():
            assert r["same_layout"] and not r["same_storage"], (name, r)
            assert r["host"] == (r["kind"] == "frozen"), (name, r)


# --------------------------------------------------------------------- checksums: host syncs (issue 23, 7)
def _checksum_tensors() -> dict[str, torch.Tensor]:
    """Deterministic tensors (no RNG, no quantization) covering the checksum's cases."""
    from fsdp_frozen._torchao_compat import nf4_empty

    nf4 = nf4_empty((64, 32), torch.bfloat16, 16, 4)  # inner tensors filled below
    nf4.quantized_data.copy_(torch.arange(nf4.quantized_data.numel()) * 7 % 256)
    nf4.quantized_scalers.copy_(torch.arange(nf4.quantized_scalers.numel()) % 255 - 127)
    nf4.quantization_factor.copy_(torch.arange(1, nf4.quantization_factor.numel() + 1) / 8)
    nf4.scaler_mean.fill_(0.75)
    return {
        "f32": torch.arange(-51, 52, dtype=torch.float32) / 4,  # 412 bytes: a partial last word
        "bf16": (torch.arange(37 * 5 * 3) - 200).to(torch.bfloat16).reshape(37, 5, 3),  # 30-byte rows
        "u8": (torch.arange(65521 * 8 + 13) % 251).to(torch.uint8),  # longer than a weight period
        "bool": torch.arange(11) % 3 == 0,
        "scalar": torch.tensor(3.5),
        "nf4": nf4,
    }


#: `_checksum_tensors`'s checksums as the code before issue 23 (7) computed them: what manifests written
#: then hold, so what checkpoints saved then must still verify against.
PINNED_CHECKSUMS = {
    "f32": "2050001a1fa00000c820020b46100000", "bf16": "076b4b364acf0b44cc48768245c98820",
    "u8": "43382d7e7265dcdb7c92694e0e56000b", "bool": "00010000010001010001000001000201",
    "scalar": "00000000406000000000000040600000", "nf4": "0afdeb3ecb7fe67082b18e910a84c2c8",
}


class _HostReads:
    """Counts the host's reads of tensor values while active: ``.item()``/``int()``/``bool()``
    (``aten._local_scalar_dense``), ``torch.equal``, copies from a device to the host (a dispatch
    mode), ``.tolist()`` and ``.numpy()`` (not dispatched: counted by wrapping them); and all-reduces.
    On CUDA each read of device data is a stream sync. Not counted, in `dtensor_bookkeeping`: reads made
    by DTensor's own code (``int(offsets[0])`` of the offsets tensor it builds on the host to place a
    shard: CPU metadata, the same reads for DCP's planning)."""

    _SKIP = ("torch/_compile.py", "torch/_dynamo/", "torch/utils/_python_dispatch.py")

    def __init__(self) -> None:
        from fsdp_frozen._torch_compat import TorchDispatchMode

        outer = self
        aten = torch.ops.aten

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func in (aten._local_scalar_dense.default, aten.equal.default):
                    outer._read()
                elif func is aten.copy_.default and args[1].device.type != "cpu" and args[0].device.type == "cpu":
                    outer._read()
                elif func is aten._to_copy.default and args[0].device.type != "cpu" and \
                        torch.device(kwargs.get("device") or args[0].device).type == "cpu":
                    outer._read()
                return func(*args, **kwargs)

        self.mode, self.syncs, self.all_reduces, self.dtensor_bookkeeping = Mode(), 0, 0, 0

    def _read(self) -> None:
        import inspect

        frame = inspect.currentframe().f_back.f_back  # the caller of the mode or of a wrapped method
        while frame is not None and any(s in frame.f_code.co_filename.replace("\\", "/") for s in self._SKIP):
            frame = frame.f_back
        if frame is not None and "torch/distributed/tensor/" in frame.f_code.co_filename.replace("\\", "/"):
            self.dtensor_bookkeeping += 1
        else:
            self.syncs += 1

    def __enter__(self) -> "_HostReads":
        self.saved = {n: torch.Tensor.__dict__.get(n) for n in ("tolist", "numpy")}
        for name in self.saved:
            setattr(torch.Tensor, name, self._counting(getattr(torch.Tensor, name), self._read))
        self.all_reduce = dist.all_reduce
        dist.all_reduce = self._counting(self.all_reduce, self._all_reduce)
        self.mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.mode.__exit__(*exc)
        dist.all_reduce = self.all_reduce
        for name, attr in self.saved.items():
            if attr is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, attr)

    def _all_reduce(self) -> None:
        self.all_reduces += 1

    @staticmethod
    def _counting(fn, count):
        def counted(*args, **kwargs):
            count()
            return fn(*args, **kwargs)

        return counted


def _count_checksums(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, str], int, int]:
    from fsdp_frozen.checkpoint.checksum import checksums

    with _HostReads() as reads:
        sums = checksums(tensors)
    return sums, reads.syncs, reads.all_reduces


def test_checksums_sync_the_host_once_and_keep_their_values():
    """One host sync per `checksums` call however many tensors (each used to cost several: a CUDA stream
    stall each), values unchanged: checkpoints saved before still verify."""
    from fsdp_frozen.checkpoint.checksum import local_checksum

    tensors = _checksum_tensors()
    sums, syncs, _ = _count_checksums(tensors)
    assert sums == PINNED_CHECKSUMS
    assert {k: local_checksum(v) for k, v in tensors.items()} == PINNED_CHECKSUMS
    many = {f"{k}/{i}": v for i in range(4) for k, v in tensors.items()}  # 4x the tensors
    many_sums, many_syncs, _ = _count_checksums(many)
    assert many_sums == {f"{k}/{i}": v for i in range(4) for k, v in PINNED_CHECKSUMS.items()}
    assert (syncs, many_syncs) == (1, 1), (syncs, many_syncs)
    with _HostReads() as reads:
        local_checksum(tensors["nf4"])
    assert reads.syncs == 1


def _sharded_checksum_syncs(rank: int, world: int) -> dict:
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = mesh_1d(world)
    sharded = {}
    for name, t in _checksum_tensors().items():
        if name == "nf4":  # torchao's dim-0 split, as FSDP shards an NF4 weight
            part = torch.chunk(t, world, dim=0)[rank]
            sharded[name] = DTensor.from_local(part, mesh, [Shard(0)], run_check=False, shape=t.shape, stride=t.stride())
        elif t.dim():
            sharded[name] = distribute_tensor(t, mesh, [Shard(0)])  # uneven: shards start mid-word
        else:
            sharded[name] = t  # a plain tensor, the same on every rank: counted once
    few = _count_checksums(sharded)
    many = _count_checksums({f"{k}/{i}": v for i in range(4) for k, v in sharded.items()})
    return {"few": few, "many": many}


def test_sharded_checksums_sync_the_host_once():
    """World 2, uneven dim-0 shards (starting mid-word) and NF4 shards: the figures of the whole tensors
    (the pinned values), one all-reduce and one host sync per call, for 6 tensors as for 24."""
    for out in run_ranks(_sharded_checksum_syncs, 2):
        assert out["few"][0] == PINNED_CHECKSUMS
        assert out["many"][0] == {f"{k}/{i}": v for i in range(4) for k, v in PINNED_CHECKSUMS.items()}
        assert [out[n][1:] for n in ("few", "many")] == [(1, 1), (1, 1)], out  # (host syncs, all-reduces)
