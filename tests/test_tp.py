"""FSDP x TP: `shard_with_freezing` on a model parallelized with ``parallelize_module`` on the TP
sub-mesh of a (dp, tp) world mesh, against plain FSDP2 with the same TP plan (4 ranks: dp=2 x tp=2)."""

from __future__ import annotations

import contextlib
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from fsdp_frozen import FreezePolicy, PolicyError, describe, lora_tp_plan, shard_with_freezing
from fsdp_frozen._torch_compat import split_groups_supported

from .common import adamw, plain_fsdp, store_frozen_in, structural_fallback, train
from .dist_harness import run_ranks
from .models import batch, make_model

#: the toy's base plan: attention output gathered (a lone colwise linear), MLP colwise -> proj rowwise
TOY_PLAN = {"layers.*.attn": ColwiseParallel(output_layouts=Replicate()), "layers.*.mlp": ColwiseParallel(),
            "layers.*.proj": RowwiseParallel()}

#: (policy, frozen params' storage / compute precision): each against plain FSDP2 + the same TP plan
CASES = [
    {},
    {"trainable_grouping": "root"},
    {"frozen_reshard": "never", "trainable_grouping": "root"},
    {"frozen_reshard": "after_backward"},
    {"frozen_dtype": "bfloat16", "param_dtype": "bfloat16"},
    {"param_dtype": "bfloat16", "reduce_dtype": "float32", "trainable_grouping": "root"},
]


def _world():
    return init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))


def _toy_tp(world):
    model = make_model()
    parallelize_module(model, world["tp"], lora_tp_plan(model, TOY_PLAN))
    return model


def _mp(policy: dict):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    dt = {None: None, "bfloat16": torch.bfloat16, "float32": torch.float32}
    return MixedPrecisionPolicy(param_dtype=dt[policy.get("param_dtype")], reduce_dtype=dt[policy.get("reduce_dtype")])


def _steps(model, dp: int, steps: int = 3, opt=None) -> list[float]:
    """`steps` AdamW steps on the batches of data-parallel rank `dp` (the same on its TP ranks)."""
    return train(model, steps, dp, opt=opt)


def _full(model) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().float().clone()
            for n, p in model.named_parameters()}


def _parity(rank: int, world_size: int, cases: list[dict]) -> dict:
    world = _world()
    dp = world.get_coordinate()[0]
    out = {}
    for i, policy in enumerate(cases):
        ref = _toy_tp(world)
        frozen = {n for n, p in ref.named_parameters() if not p.requires_grad}
        storage = {"bfloat16": torch.bfloat16}.get(policy.get("frozen_dtype"))
        if storage is not None:  # the reference stores frozen params alike
            store_frozen_in(ref, storage)
        plain_fsdp(ref, world["dp"], ("layers.*",), _mp(policy))
        model = shard_with_freezing(_toy_tp(world), world["dp"], FreezePolicy(units=("layers.*",), **policy))
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        tp_frozen = sorted(n for n, p in model.named_parameters() if n in frozen and isinstance(p, DTensor)
                           and any(isinstance(pl, Shard) for pl in p.placements[1:]))
        losses = {"ref": _steps(ref, dp), "ours": _steps(model, dp)}
        got, want = _full(model), _full(ref)
        out[i] = {
            "losses": losses,
            "differs": sorted(n for n in want if not torch.equal(want[n], got[n])),
            "became_trainable": sorted(n for n in frozen if flags[n]),
            "became_frozen": sorted(n for n, f in flags.items() if not f and n not in frozen),
            "tp_frozen": tp_frozen,
            # what the frozen weights are stored in: the local tensors FSDP shards (a DTensor's dtype alone
            # once said bfloat16 over fp32 local tensors under TP)
            "frozen_storage": {name: sorted({str(p.to_local().dtype if isinstance(p, DTensor) else p.dtype)
                                             for n, p in m.named_parameters() if n in frozen})
                               for name, m in (("ours", model), ("ref", ref))},
            "full": {n: got[n] for n in got if "lora_A" in n or n == "scale"},
            "grads": sorted(n for n, p in model.named_parameters() if n in frozen and p.grad is not None),
            "describe": str(describe(model)),
        }
    return out


@pytest.mark.skipif(not split_groups_supported(), reason="compared at the split groups' layout (torch >= 2.12); "
                    "the fallback's TP parity is in test_tp_structural_fallback")
def test_fsdp_x_tp_equals_plain_fsdp2_with_the_same_tp_plan():
    """dp=2 x tp=2, fp32 and bf16 compute: losses and every parameter bitwise plain FSDP2 + the same
    TP plan (the same ops on the same shards); frozen parameters stay frozen (torchtitan 0.3.0's rc
    made them trainable under TP), get no gradient; adapters replicated on TP are equal on both TP
    ranks (each TP rank training its own copy is the bug users report)."""
    results = run_ranks(_parity, 4, CASES)
    for i, policy in enumerate(CASES):
        for rank, r in enumerate(results):
            case = r[i]
            assert case["losses"]["ours"] == case["losses"]["ref"], (policy, rank, case["losses"])
            assert case["differs"] == [], (policy, rank, case["differs"])
            assert case["became_trainable"] == [] and case["became_frozen"] == [] and case["grads"] == [], (policy, case)
            # 3 x (attn, mlp base, proj) weights, and the frozen block's two colwise lora_B
            assert len(case["tp_frozen"]) == 11, case["tp_frozen"]
            want = ["torch.bfloat16"] if policy.get("frozen_dtype") == "bfloat16" else ["torch.float32"]
            assert case["frozen_storage"] == {"ours": want, "ref": want}, (policy, case["frozen_storage"])
            # describe counts the TP plan: 3 layers x (attn, mlp) x (base, lora_B) colwise, 3 proj rowwise
            assert "tensor parallel: degree 2, 12 colwise and 3 rowwise linears" in case["describe"], case["describe"]
        for tp0, tp1 in ((0, 1), (2, 3)):  # ranks (dp, tp=0) and (dp, tp=1)
            a, b = results[tp0][i]["full"], results[tp1][i]["full"]
            assert all(torch.equal(a[n], b[n]) for n in a), (policy, [n for n in a if not torch.equal(a[n], b[n])])


@structural_fallback()  # what torch < 2.12 gets
def _fallback_parity(rank: int, world_size: int, cases: list[dict]) -> dict:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's "cannot hold two param groups" warning
        return _parity(rank, world_size, cases)


def test_tp_structural_fallback():
    """torch < 2.12 (forced here; real on the 2.11 tier): FSDP x TP through the structural fallback,
    bitwise plain FSDP2 + the same TP plan, frozen parameters still frozen."""
    cases = [{}, {"trainable_grouping": "root", "frozen_dtype": "bfloat16", "param_dtype": "bfloat16"}]
    results = run_ranks(_fallback_parity, 4, cases)
    for i, policy in enumerate(cases):
        for r in results:
            case = r[i]
            assert case["losses"]["ours"] == case["losses"]["ref"], (policy, case["losses"])
            assert case["differs"] == [] and case["became_trainable"] == [] and case["grads"] == [], (policy, case)


def _single(rank: int, world_size: int) -> dict:
    """The reference without TP or FSDP: one process, both data-parallel batches in one (the mean of
    two equal-sized batches' losses is FSDP's averaged gradient)."""
    model = make_model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        xs, ys = zip(*(batch(step, dp) for dp in range(2)))
        x, y = torch.cat(xs), torch.cat(ys)
        logits = model(x)
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.skipif(not split_groups_supported(), reason="uses the split layout's parity run")
def test_adapters_under_tp_train_as_without_tp():
    """The adapters' gradients are whole: 3 steps under dp=2 x tp=2 end where one process without TP
    does, to fp32 rounding (TP sums each output over two partial products: rounding only, ~1e-7
    relative; adapters trained on partial gradients are off by O(1e-2) after one AdamW step)."""
    want = run_ranks(_single, 1)[0]
    got = run_ranks(_parity, 4, [{}])[0][0]["full"]
    for name, value in got.items():
        torch.testing.assert_close(value, want[name], rtol=1e-5, atol=1e-6, msg=name)


def _refusals(rank: int, world_size: int) -> dict:
    world = _world()
    out = {}

    def refused(fn) -> str:
        try:
            fn()
        except PolicyError as e:
            return str(e)
        return "not refused"

    out["nf4"] = refused(lambda: shard_with_freezing(_toy_tp(world), world["dp"], FreezePolicy(
        units=("layers.*",), frozen_dtype="nf4", nf4_block_size=16, nf4_scaler_block_size=4)))
    out["replicate"] = refused(lambda: shard_with_freezing(_toy_tp(world), world["dp"], FreezePolicy(
        units=("layers.*",), trainable_grouping="replicate")))

    def unplaced():  # the base plan alone: adapters left plain beside TP-sharded bases
        model = make_model()
        parallelize_module(model, world["tp"], {"layers.*.attn.base_layer": ColwiseParallel(output_layouts=Replicate()),
                                               "layers.*.mlp.base_layer": ColwiseParallel(),
                                               "layers.*.proj": RowwiseParallel()})
        shard_with_freezing(model, world["dp"], FreezePolicy(units=("layers.*",)))

    out["unplaced"] = refused(unplaced)
    other = init_device_mesh("cpu", (4,))
    out["other_mesh"] = refused(lambda: shard_with_freezing(_toy_tp(world), other, FreezePolicy(units=("layers.*",))))
    out["sequence_parallel"] = refused(lambda: lora_tp_plan(make_model(), {"layers.*.mlp": ColwiseParallel(
        input_layouts=Shard(1))}))
    out["no_match"] = refused(lambda: lora_tp_plan(make_model(), {"blocks.*.mlp": ColwiseParallel()}))
    auto = shard_with_freezing(_toy_tp(world), world["dp"], FreezePolicy(units=("layers.*",), trainable_grouping="auto"))
    out["auto"] = str(describe(auto))
    return out


@pytest.mark.skipif(not split_groups_supported(), reason="refusals of the split path (torch >= 2.12)")
def test_tp_refusals_name_what_to_do():
    r = run_ranks(_refusals, 4)[0]
    assert "frozen_dtype='nf4' with tensor-parallel frozen weights ['layers.0.attn.base_layer.weight'" in r["nf4"]
    assert "use frozen_dtype='bfloat16' under TP" in r["nf4"]
    assert "trainable_grouping='replicate'" in r["replicate"] and "use trainable_grouping='root'" in r["replicate"]
    assert "LoRA layer 'layers.0.attn': its base weight is TP-sharded on dim 0 but 'lora_B' is not placed" \
        in r["unplaced"] and "fsdp_frozen.lora_tp_plan" in r["unplaced"]
    assert "is not a sub-mesh of the data-parallel mesh's world mesh" in r["other_mesh"], r["other_mesh"]
    assert "'layers.*.mlp' has ColwiseParallel(input_layouts=" in r["sequence_parallel"], r["sequence_parallel"]
    assert "plan key 'blocks.*.mlp' matches no module of ToyLM" in r["no_match"]
    assert "'replicate' does not take tensor-parallel trainable parameters" in r["auto"], r["auto"]


def test_lora_tp_plan_places_adapters_from_their_base():
    plan = lora_tp_plan(make_model(n_layers=1, peft_style=True), TOY_PLAN)
    assert sorted(plan) == ["layers.0.attn.base_layer", "layers.0.attn.lora_B.default", "layers.0.mlp.base_layer",
                            "layers.0.mlp.lora_B.default", "layers.0.proj"]
    assert isinstance(plan["layers.0.mlp.lora_B.default"], ColwiseParallel)
    assert plan["layers.0.attn.lora_B.default"].output_layouts == (Replicate(),)
    rowwise = lora_tp_plan(make_model(n_layers=1), {"layers.0.mlp": RowwiseParallel()})
    assert sorted(rowwise) == ["layers.0.mlp.base_layer", "layers.0.mlp.lora_A"]


# ------------------------------------------------------------------------ transformers Llama + PEFT LoRA
LLAMA_PLAN = {
    **{f"base_model.model.model.layers.*.self_attn.{p}": ColwiseParallel() for p in ("q_proj", "k_proj", "v_proj")},
    "base_model.model.model.layers.*.self_attn.o_proj": RowwiseParallel(),
    **{f"base_model.model.model.layers.*.mlp.{p}": ColwiseParallel() for p in ("gate_proj", "up_proj")},
    "base_model.model.model.layers.*.mlp.down_proj": RowwiseParallel(),
}


def _hf_llama(world):
    from peft import LoraConfig, get_peft_model

    from .test_pretrained import _config, _model_class

    torch.manual_seed(0)
    model = _model_class("llama")(_config("llama"))
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                                             init_lora_weights="gaussian"))
    parallelize_module(model, world["tp"], lora_tp_plan(model, LLAMA_PLAN))
    return model


def _hf(rank: int, world_size: int) -> dict:
    world = _world()
    dp = world.get_coordinate()[0]
    out = {}
    for name, make in (("ref", lambda m: plain_fsdp(m, world["dp"], ("base_model.model.model.layers.*",))),
                       ("ours", lambda m: shard_with_freezing(m, world["dp"], FreezePolicy(
                           units=("base_model.model.model.layers.*",), frozen_dtype="bfloat16",
                           param_dtype="bfloat16", reduce_dtype="float32")))):
        model = _hf_llama(world)
        if name == "ref":
            store_frozen_in(model, torch.bfloat16)
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            for layer in model.base_model.model.model.layers:
                fully_shard(layer, mesh=world["dp"], mp_policy=MixedPrecisionPolicy(torch.bfloat16, torch.float32))
            fully_shard(model, mesh=world["dp"], mp_policy=MixedPrecisionPolicy(torch.bfloat16, torch.float32))
        else:
            make(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for step in range(3):
            ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(10 * step + dp))
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        out[name] = {"losses": losses, "full": _full(model),
                     "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad)}
    return out


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="needs the 'hf' extra: pip install -e '.[hf]'")
@pytest.mark.skipif(not split_groups_supported(), reason="compared at the split groups' layout (torch >= 2.12)")
def test_transformers_llama_peft_lora_under_tp_equals_plain_fsdp2():
    """transformers Llama + PEFT LoRA on q/v (colwise) and o/down (rowwise), bf16 compute, frozen
    weights stored in bf16: bitwise plain FSDP2 + the same TP plan (from `lora_tp_plan`)."""
    for r in run_ranks(_hf, 4):
        assert r["ours"]["losses"] == r["ref"]["losses"], (r["ours"]["losses"], r["ref"]["losses"])
        assert r["ours"]["trainable"] == r["ref"]["trainable"] and len(r["ours"]["trainable"]) == 16
        differs = [n for n in r["ref"]["full"] if not torch.equal(r["ref"]["full"][n], r["ours"]["full"][n])]
        assert differs == [], differs


# ----------------------------------------------------------------------------------------------- checkpoints
def _save_tp(rank: int, world_size: int, path: str) -> dict:
    from fsdp_frozen.checkpoint import save_checkpoint

    world = _world()
    model = shard_with_freezing(_toy_tp(world), world["dp"], FreezePolicy(units=("layers.*",)))
    _steps(model, world.get_coordinate()[0], 2)
    save_checkpoint(path, model)  # frozen="auto", no base yet: the frozen weights included
    saved = _full(model)
    _steps(model, world.get_coordinate()[0], 1)
    save_checkpoint(path + "-next", model)  # frozen="auto": a reference to the first, no frozen bytes
    return {"full": saved}


def _load_at(rank: int, world_size: int, path: str, layout: tuple[int, int]) -> dict:
    from fsdp_frozen.checkpoint import load_checkpoint

    dp, tp = layout
    if tp == 1:
        mesh, model = init_device_mesh("cpu", (dp,)), make_model(seed=1)
    else:
        world = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))
        model = make_model(seed=1)
        parallelize_module(model, world["tp"], lora_tp_plan(model, TOY_PLAN))
        mesh = world["dp"]
    model = shard_with_freezing(model, mesh, FreezePolicy(units=("layers.*",)))
    load_checkpoint(path, model)
    return {"full": _full(model)}


def test_tp_checkpoint_has_the_same_keys_and_reshards(tmp_path):
    """Saved at dp=2 x tp=2: the same keys as without TP, and loaded bitwise at (2, 2), (4, 1) and (1, 2)
    (DCP reshards the DTensors)."""
    import json

    from torch.distributed.checkpoint import FileSystemReader

    from fsdp_frozen.checkpoint import read_manifest

    want = run_ranks(_save_tp, 4, str(tmp_path / "tp"))[0]["full"]
    keys = sorted(json.loads((tmp_path / "tp" / "fsdp_frozen.json").read_text())["params"])
    assert keys == sorted(n for n, _ in make_model().named_parameters())
    # the base written once under TP too: the next save references it and stores no frozen tensor
    second = read_manifest(tmp_path / "tp-next")
    assert second["frozen_state"] == "referenced" and second["base"]["path"] == "../tp", second
    assert not [k for k in FileSystemReader(str(tmp_path / "tp-next")).read_metadata().state_dict_metadata
                if k.startswith("frozen/")]
    for world_size, layout in ((4, (2, 2)), (4, (4, 1)), (2, (1, 2))):
        for r in run_ranks(_load_at, world_size, str(tmp_path / "tp"), layout):
            assert [n for n in want if not torch.equal(want[n], r["full"][n])] == [], layout


def _pretrained_tp(rank: int, world_size: int, directory: str) -> dict:
    """A meta-built Llama + PEFT LoRA, TP-placed, sharded, filled by load_pretrained: each rank's (dp, tp)
    box of every file tensor read, bitwise the shards of from_pretrained + the same TP and sharding."""
    from peft import LoraConfig, get_peft_model

    import fsdp_frozen.checkpoint.pretrained as pretrained_module
    from fsdp_frozen._torch_compat import local_tensor
    from fsdp_frozen.checkpoint import load_pretrained

    from .test_pretrained import _config, _model_class

    world = _world()
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
    policy = FreezePolicy(units=("base_model.model.model.layers.*",), frozen_dtype="bfloat16", param_dtype="bfloat16")
    reference = get_peft_model(_model_class("llama").from_pretrained(directory), config)
    parallelize_module(reference, world["tp"], lora_tp_plan(reference, LLAMA_PLAN))
    shard_with_freezing(reference, world["dp"], policy)
    with torch.device("meta"):
        model = get_peft_model(_model_class("llama")(_config("llama")), config)
    parallelize_module(model, world["tp"], lora_tp_plan(model, LLAMA_PLAN))
    shard_with_freezing(model, world["dp"], policy)
    read, elements = pretrained_module._read, []

    def counting(info, name, index):
        out = read(info, name, index)
        elements.append(out.numel())
        return out

    pretrained_module._read = counting
    try:
        load_pretrained(model, directory)
    finally:
        pretrained_module._read = read
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    differs = [n for n in frozen if not torch.equal(local_tensor(model.get_parameter(n)),
                                                  local_tensor(reference.get_parameter(n)))]
    file_elements = sum(p.numel() for p in _model_class("llama")(_config("llama")).parameters())
    return {"differs": differs, "frozen": len(frozen), "read_fraction": sum(elements) / file_elements}


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="needs the 'hf' extra: pip install -e '.[hf]'")
def test_load_pretrained_under_tp_reads_each_ranks_box(tmp_path):
    from .test_pretrained import save_tiny

    directory = save_tiny(str(tmp_path / "llama"))
    for r in run_ranks(_pretrained_tp, 4, directory):
        assert r["differs"] == [] and r["frozen"] > 10, r
        # each of 4 ranks reads a quarter of the TP-sharded weights (81,920 elements of the layers'
        # linears) and half of the rest (embedding, head, norms: 16,704, over dp only): 28,832 of 98,624
        assert r["read_fraction"] == (81920 / 4 + 16704 / 2) / 98624, r["read_fraction"]


def _hsdp_tp(rank: int, world_size: int) -> dict:
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2, 2, 2), mesh_dim_names=("dp_replicate", "dp_shard", "tp"))
    replica, shard, _ = mesh.get_coordinate()
    out = {}
    for ours in (False, True):
        model = make_model()
        parallelize_module(model, mesh["tp"], lora_tp_plan(model, TOY_PLAN))
        dp = mesh["dp_replicate", "dp_shard"]
        if ours:
            shard_with_freezing(model, dp, FreezePolicy(units=("layers.*",)))
        else:
            for layer in model.layers:
                fully_shard(layer, mesh=dp)
            fully_shard(model, mesh=dp)
        out[ours] = {"losses": _steps(model, 2 * replica + shard), "full": _full(model)}
    return out


@pytest.mark.skipif(not split_groups_supported(), reason="compared at the split groups' layout (torch >= 2.12)")
def test_hsdp_x_tp_equals_plain_fsdp2():
    """HSDP x TP, 8 ranks as (replicate, shard, tp) = (2, 2, 2): dp mesh world['dp_replicate', 'dp_shard'],
    bitwise plain FSDP2 + the same TP plan (the frozen groups' fresh 2-D sub-mesh under TP)."""
    for r in run_ranks(_hsdp_tp, 8, fresh=True):
        want, got = r[False], r[True]
        assert got["losses"] == want["losses"]
        assert [n for n in want["full"] if not torch.equal(want["full"][n], got["full"][n])] == []


def _refreeze_tp(rank: int, world_size: int) -> dict:
    from fsdp_frozen import refreeze

    world = _world()
    dp = world.get_coordinate()[0]
    model = shard_with_freezing(_toy_tp(world), world["dp"], FreezePolicy(units=("layers.*",)))
    opt = adamw(model)
    _steps(model, dp, 1, opt)
    before = _full(model)
    # open the last block (its TP-sharded weights included) and the final norm; close block 0's adapters
    refreeze(model, opt, FreezePolicy(units=("layers.*",), unfreeze=["layers.2.**", "norm.*"],
                                      freeze=["layers.0.**"]))
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    losses = _steps(model, dp, 2, opt)
    after = _full(model)
    return {"moved": sorted(n for n in after if not torch.equal(before[n], after[n])), "flags": flags,
            "losses": losses, "placements": {n: str(p.placements) for n, p in model.named_parameters()
                                             if n == "layers.2.proj.weight"}}


def test_refreeze_under_tp():
    """`refreeze` on an FSDP x TP model: the block it opens trains (its TP-sharded weights too), the
    block it closes stops, the TP placements stay."""
    for r in run_ranks(_refreeze_tp, 4):
        assert r["flags"]["layers.2.proj.weight"] and r["flags"]["norm.weight"], r["flags"]
        assert not r["flags"]["layers.0.attn.lora_A.weight"] and not r["flags"]["layers.0.proj.bias"]
        assert "layers.2.proj.weight" in r["moved"] and "norm.weight" in r["moved"], r["moved"]
        assert not any(n.startswith("layers.0.") for n in r["moved"]), r["moved"]
        assert "Shard(dim=1)" in r["placements"]["layers.2.proj.weight"], r["placements"]


TP_POLICY = dict(units=("base_model.model.model.layers.*",), frozen_dtype="bfloat16", param_dtype="bfloat16",
                 trainable_grouping="root")


def _tp_describe(rank: int, world_size: int) -> dict:
    model = shard_with_freezing(_hf_llama(_world()), _world()["dp"], FreezePolicy(**TP_POLICY))
    records = describe(model)
    return {"frozen": sum(r.sharded_bytes for r in records if r.kind == "frozen"),
            "trainable": sum(r.sharded_bytes for r in records if r.kind != "frozen"),
            "tp": records.tensor_parallel}


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="needs the 'hf' extra: pip install -e '.[hf]'")
def test_estimate_with_tp_equals_the_ranks():
    """`estimate(..., tp=2)` on the meta model plans what 4 gloo ranks as dp=2 x tp=2 hold: the same
    frozen and trainable bytes per rank, the same TP linears."""
    from peft import LoraConfig, get_peft_model

    from fsdp_frozen import estimate

    from .test_pretrained import _config, _model_class

    def build():
        with torch.device("meta"):
            return get_peft_model(_model_class("llama")(_config("llama")), LoraConfig(
                r=4, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]))

    est = estimate(build, 4, FreezePolicy(**TP_POLICY), tp=2, tp_plan=LLAMA_PLAN)
    for r in run_ranks(_tp_describe, 4):
        assert (est.frozen_shard_bytes, est.trainable_shard_bytes) == (r["frozen"], r["trainable"]), (est, r)
        assert {k: est.tensor_parallel[k] for k in r["tp"]} == r["tp"]
    # per token: o and down (rowwise) outputs of 64 in bf16, plus their lora_A's r=4 outputs, 2 layers
    assert est.tensor_parallel["all_reduce_bytes_per_token_forward"] == 2 * (2 * 64 * 2 + 2 * 4 * 2)


def _inrepo(rank: int, world_size: int) -> dict:
    """recipes/llama.py's LlamaLoRA under its tp_plan(), plain FSDP2 and ours, fp32."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "recipes"))
    from llama import LlamaConfig, LlamaLoRA, tp_plan

    world = _world()
    dp = world.get_coordinate()[0]
    out = {}
    for ours in (False, True):
        torch.manual_seed(0)
        model = LlamaLoRA(LlamaConfig(vocab_size=64, dim=64, n_layers=2, n_heads=4, hidden_dim=128, lora_rank=4))
        for name, p in model.named_parameters():  # lora_B starts at zero: give every adapter a gradient
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
        parallelize_module(model, world["tp"], lora_tp_plan(model, tp_plan()))
        if ours:
            shard_with_freezing(model, world["dp"], FreezePolicy(units=("layers.*",)))
        else:
            plain_fsdp(model, world["dp"], ("layers.*",))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for step in range(3):
            tokens = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(10 * step + dp))
            logits = model(tokens[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, 64).float(), tokens[:, 1:].reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        out[ours] = {"losses": losses, "full": _full(model)}
    return out


@pytest.mark.skipif(not split_groups_supported(), reason="compared at the split groups' layout (torch >= 2.12)")
def test_in_repo_llama_under_tp_equals_plain_fsdp2():
    """The recipes' Llama (recipes/llama.py, heads as -1 so colwise q/k/v split them) with its tp_plan():
    bitwise plain FSDP2 + the same TP plan at dp=2 x tp=2."""
    for r in run_ranks(_inrepo, 4):
        want, got = r[False], r[True]
        assert got["losses"] == want["losses"]
        assert [n for n in want["full"] if not torch.equal(want["full"][n], got["full"][n])] == []




def _hf_offload(rank: int, world_size: int) -> dict:
    """`_hf`'s model under TP, every block in checkpoint_wrapper, trained with and without
    recipes/offload.py's OffloadActivations."""
    import sys
    from pathlib import Path

    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
    from offload import OffloadActivations

    world = _world()
    dp = world.get_coordinate()[0]
    out = {}
    for offload in (False, True):
        model = _hf_llama(world)
        layers = model.base_model.model.model.layers
        for i in range(len(layers)):
            layers[i] = checkpoint_wrapper(layers[i])
        shard_with_freezing(model, world["dp"], FreezePolicy(units=("base_model.model.model.layers.*",),
                                                             frozen_dtype="bfloat16", param_dtype="bfloat16",
                                                             reduce_dtype="float32"))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses, counts = [], []
        for step in range(2):
            ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(10 * step + dp))
            hook = OffloadActivations(min_bytes=0)
            with hook if offload else contextlib.nullcontext():
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
            counts.append(hook.offloaded)
        out[offload] = {"losses": losses, "full": _full(model), "counts": counts, "layers": len(layers)}
    return out


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="needs the 'hf' extra: pip install -e '.[hf]'")
@pytest.mark.skipif(not split_groups_supported(), reason="compared at the split groups' layout (torch >= 2.12)")
def test_offloaded_activations_under_tp_train_bitwise_the_same():
    """Activation offloading (recipes/offload.py) under FSDP x TP: the checkpointed blocks' inputs (plain
    tensors: the TP plan's outputs are local) leave and come back, training bitwise the same."""
    for r in run_ranks(_hf_offload, 4):
        plain, offloaded = r[False], r[True]
        assert offloaded["losses"] == plain["losses"]
        assert [n for n in plain["full"] if not torch.equal(plain["full"][n], offloaded["full"][n])] == []
        assert all(n >= plain["layers"] for n in offloaded["counts"]), offloaded["counts"]


def _tp_after_release(rank: int, world_size: int) -> str | None:
    """A TP model sharded and its frozen groups released, then another one sharded: the error it raises."""
    from fsdp_frozen import release_process_groups

    world = _world()
    shard_with_freezing(_toy_tp(world), world["dp"], FreezePolicy(units=("layers.*",)))
    release_process_groups()
    world = _world()
    try:
        shard_with_freezing(_toy_tp(world), world["dp"], FreezePolicy(units=("layers.*",)))
    except RuntimeError as e:
        return str(e)
    finally:
        release_process_groups()
    return None


@pytest.mark.skipif(not split_groups_supported(), reason="the frozen groups' own process groups (torch >= 2.12)")
def test_tp_model_built_after_a_release_is_refused_naming_the_fix():
    """Under TP the frozen dp mesh must equal the user's sub-mesh, and torch's DTensor caches then hand a
    model built after `release_process_groups` a spec on the released groups (process_groups.py): refused at
    sharding, naming the parameter and what to do, rather than a collective failing later."""
    # fresh ranks: what DTensor's caches hold decides whether a spec goes stale, and pooled ranks hold earlier
    # tests' meshes (an equal live one from a plain FSDP2 + TP reference would be handed out instead)
    for message in run_ranks(_tp_after_release, 4, fresh=True):
        assert message is not None, "the model built after the release was not refused"
        assert "was sharded onto process group(s)" in message and "release_process_groups()" in message, message
        assert "Shard the models you need before" in message, message


class _TrainsWhatItShards(ColwiseParallel):
    """``ColwiseParallel`` as torch 2.9 has it: every parameter it shards comes out trainable (its
    ``nn.Parameter(distribute_tensor(...))`` drops ``requires_grad``; 2.11 passes it on)."""

    def _apply(self, module, device_mesh):
        out = super()._apply(module, device_mesh)
        for p in module.parameters(recurse=False):
            p.requires_grad_(True)
        return out


def _flags_through_tp(rank: int, world_size: int) -> dict:
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    out = {}
    for how in ("lora_tp_plan", "its plan straight to torch"):
        model = make_model()
        before = {n: p.requires_grad for n, p in model.named_parameters()}
        if how == "lora_tp_plan":
            plan = lora_tp_plan(model, {"layers.*.attn": _TrainsWhatItShards(output_layouts=Replicate())})
        else:
            plan = {"layers.*.attn.base_layer": _TrainsWhatItShards(output_layouts=Replicate())}
        parallelize_module(model, mesh, plan)
        out[how] = sorted(n for n, p in model.named_parameters() if p.requires_grad != before[n])
    return out


def test_lora_tp_plan_keeps_the_frozen_weights_frozen():
    """A model frozen before ``parallelize_module`` stays frozen with `lora_tp_plan`'s styles, on a torch
    whose TP styles make what they shard trainable (torch 2.9, simulated; found on real 2.9, where the
    TP checkpoint test saw every TP-sharded base weight as trainable)."""
    r = run_ranks(_flags_through_tp, 2)[0]
    assert r["lora_tp_plan"] == [], r
    assert "layers.0.attn.base_layer.weight" in r["its plan straight to torch"], r  # what the old style does
