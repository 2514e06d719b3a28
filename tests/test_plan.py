"""Pure planning: units, ownership, tied parameters, auto budget, fallback — single process."""

import pytest
import torch
import torch.nn as nn

from fsdp_frozen import FreezePolicy, PolicyError
from fsdp_frozen._globs import glob_match
from fsdp_frozen.plan import FROZEN, TRAINABLE, build_plan, resolve_units

from .models import Block, make_model


def test_glob_segments():
    assert glob_match("layers.*", "layers.0")
    assert not glob_match("layers.*", "layers.0.attn")
    assert glob_match("**.bias", "layers.0.proj.bias")
    assert glob_match("layers.[0-1].*", "layers.1.norm")
    assert not glob_match("layers.[0-1].*", "layers.2.norm")


def test_units_by_glob_and_class_name_deepest_first():
    model = make_model()
    assert resolve_units(model, ("layers.*",)) == ["layers.0", "layers.1", "layers.2", ""]
    by_class = resolve_units(model, ("Block", "LoRALinear"))
    assert by_class[-1] == "" and by_class.index("layers.0.attn") < by_class.index("layers.0")


def test_unmatched_unit_pattern_names_it():
    with pytest.raises(PolicyError, match=r"units pattern 'blocks\.\*' matches no submodule of ToyLM"):
        build_plan(make_model(), FreezePolicy(units=["blocks.*"]), shard_size=2)


def test_groups_are_pure_and_split_per_parameter():
    plan = build_plan(make_model(), FreezePolicy(units=["layers.*"], trainable_grouping="per_unit"), shard_size=2,
                      split=True)
    model = make_model()
    params = dict(model.named_parameters())
    for g in plan.groups:
        assert {params[p].requires_grad for p in g.params} == {g.kind == TRAINABLE}
    frozen0 = plan.frozen_group("layers.0")
    assert "layers.0.proj.weight" in frozen0.params  # mixed module: weight frozen ...
    trainable0 = next(g for g in plan.groups_of("layers.0") if g.kind == TRAINABLE)
    assert "layers.0.proj.bias" in trainable0.params  # ... bias trainable
    assert [g.kind for g in plan.groups_of("layers.2")] == [FROZEN]  # fully frozen unit
    root = next(g for g in plan.groups_of("") if g.kind == TRAINABLE)
    assert root.params == ("scale", "norm.weight", "norm.bias") and root.reshard is False
    assert sorted(p for g in plan.groups for p in g.params) == sorted(params)  # every param exactly once


def test_freeze_and_unfreeze_patterns():
    plan = build_plan(
        make_model(), FreezePolicy(units=["layers.*"], freeze=["scale"], unfreeze=["layers.2.**.lora_*.weight"]),
        shard_size=2,
    )
    assert "scale" in plan.frozen
    assert "layers.2.attn.lora_A.weight" not in plan.frozen
    assert "layers.2.attn.base_layer.weight" in plan.frozen
    with pytest.raises(PolicyError, match=r"freeze pattern 'nothing\.\*' matches no parameter"):
        build_plan(make_model(), FreezePolicy(freeze=["nothing.*"]), shard_size=2)
    with pytest.raises(PolicyError, match=r"unfreeze pattern 'x' matches no parameter"):
        build_plan(make_model(), FreezePolicy(unfreeze=["x"]), shard_size=2)


def test_peft_shaped_model():
    plan = build_plan(make_model(peft_style=True), FreezePolicy(units=["layers.*"], trainable_grouping="per_unit"),
                      shard_size=2)
    trainable = next(g for g in plan.groups_of("layers.0") if g.kind == TRAINABLE)
    assert "layers.0.attn.lora_A.default.weight" in trainable.params
    assert "layers.0.attn.base_layer.weight" in plan.frozen_group("layers.0").params


def test_tied_parameter_owned_by_outer_unit():
    # the split layout's planning (torch >= 2.12), on any torch: the fallback's is tested apart
    model = make_model(tied=True)
    plan = build_plan(model, FreezePolicy(units=["tok", "layers.*"], trainable_grouping="per_unit"),
                      shard_size=2, split=True)
    # tok.weight is used by unit "tok" and by the root's head: the root owns it, "tok" ignores it.
    assert plan.ignored == {"tok": ("tok.weight",)}
    assert "tok.weight" in plan.frozen_group("").params
    assert all("head.weight" not in g.params for g in plan.groups)  # one group, canonical name


def test_tied_across_sibling_units_is_refused():
    model = make_model()
    model.layers[1].attn.base_layer.weight = model.layers[0].attn.base_layer.weight
    with pytest.raises(PolicyError, match=r"tied parameter 'layers.0.attn.base_layer.weight' is used under units"):
        build_plan(model, FreezePolicy(units=["layers.*"]), shard_size=2)


def test_scalar_parameter_is_refused():
    model = make_model()
    model.temp = nn.Parameter(torch.tensor(1.0))
    with pytest.raises(PolicyError, match=r"parameter 'temp' is a scalar"):
        build_plan(model, FreezePolicy(), shard_size=2)


@pytest.mark.parametrize("key", ["frozen_reshard", "trainable_reshard"])
def test_int_reshard_must_divide_shard_size(key):
    with pytest.raises(PolicyError, match=rf"{key}=3 must be a divisor of the mesh's shard size 4.*\[2\]"):
        build_plan(make_model(), FreezePolicy(**{key: 3}), shard_size=4)
    with pytest.raises(PolicyError, match=rf"{key}=2 .* shard size 2.*none"):
        build_plan(make_model(), FreezePolicy(**{key: 2}), shard_size=2)
    plan = build_plan(make_model(), FreezePolicy(units=["layers.*"], **{key: 2}), shard_size=4)
    kind = "frozen" if key == "frozen_reshard" else "trainable"
    assert {g.reshard for g in plan.groups if g.kind == kind} == {2}  # every group of that kind, the root's too
    assert all(g.all_gathers_per_step == 2 for g in plan.groups if g.kind == kind)


def test_expected_all_gathers():
    for reshard, n in [("after_forward", 2), ("after_backward", 1), ("never", 0), (2, 2)]:
        plan = build_plan(make_model(), FreezePolicy(units=["layers.*"], frozen_reshard=reshard), shard_size=4)
        assert plan.frozen_group("layers.0").all_gathers_per_step == n
        assert plan.frozen_group("").all_gathers_per_step == (1 if reshard == "after_forward" else n)
    plan = build_plan(make_model(), FreezePolicy(units=["layers.*"]), shard_size=1)
    assert {g.all_gathers_per_step for g in plan.groups} == {0}


def test_auto_keeps_largest_groups_within_budget():
    # the split layout's planning (torch >= 2.12), on any torch: the fallback's is tested apart
    model = make_model()
    base = build_plan(model, FreezePolicy(units=["layers.*"]), shard_size=2, split=True)
    sizes = {g.unit: g.unsharded_bytes for g in base.groups if g.kind == FROZEN}
    largest = max(sizes, key=sizes.get)
    budget = sizes[largest] + min(sizes.values()) - 1  # the largest fits, then nothing else does
    plan = build_plan(model, FreezePolicy(units=["layers.*"], frozen_reshard="auto", frozen_budget_bytes=budget),
                      shard_size=2, split=True)
    kept = {g.unit for g in plan.groups if g.kind == FROZEN and g.reshard == "never"}
    assert kept == {largest}
    # Groups "auto" does not keep get "after_forward", under the root rule: the root's is kept until
    # backward ends (1 gather per step), as with frozen_reshard="after_forward".
    rest = {g.unit: (g.reshard, g.all_gathers_per_step) for g in plan.groups if g.kind == FROZEN and g.unit != largest}
    assert rest == {u: ("after_backward", 1) if u == "" else ("after_forward", 2) for u in rest}
    # describe() says why: the budget for each group, the root rule for the root's.
    whys = {g.unit: g.why for g in plan.groups if g.kind == FROZEN}
    root_trainable = next(g.unsharded_bytes for g in base.groups if g.kind == TRAINABLE and g.unit == "")
    assert whys[largest] == (f"auto: kept gathered, {sizes[largest]:,} unsharded bytes fit the {budget - root_trainable:,} "
                             f"left of frozen_budget_bytes={budget:,} after {root_trainable:,} of trainable groups "
                             f"kept gathered for the step")
    assert all(w.startswith("auto: ") and "exceed" in w for u, w in whys.items() if u != largest)
    if "" != largest:
        assert "FSDP's root rule" in whys[""]
    none = build_plan(model, FreezePolicy(units=["layers.*"], frozen_reshard="auto", frozen_budget_bytes=0),
                      shard_size=2, split=True)
    fixed = build_plan(model, FreezePolicy(units=["layers.*"], frozen_reshard="after_forward"),
                       shard_size=2, split=True)
    assert [(g.reshard, g.all_gathers_per_step) for g in none.groups] == [
        (g.reshard, g.all_gathers_per_step) for g in fixed.groups]


def test_auto_charges_the_root_trainable_group_first():
    """Under trainable_grouping="root" the adapters stay gathered all step: auto charges them before
    any frozen group, so a budget the largest frozen group alone fits keeps nothing once they are added."""
    # the split layout's planning (torch >= 2.12), on any torch: the fallback's is tested apart
    model = make_model()
    base = build_plan(model, FreezePolicy(units=["layers.*"], trainable_grouping="root"), shard_size=2, split=True)
    adapters = next(g.unsharded_bytes for g in base.groups if g.kind == TRAINABLE)
    largest = max(g.unsharded_bytes for g in base.groups if g.kind == FROZEN)
    for budget, kept in ((largest, False), (largest + adapters - 1, False), (largest + adapters, True)):
        policy = FreezePolicy(units=["layers.*"], trainable_grouping="root", frozen_reshard="auto",
                              frozen_budget_bytes=budget)
        plan = build_plan(model, policy, shard_size=2, split=True)
        # is the largest frozen group kept gathered? (smaller ones may still fit what is left)
        assert any(g.reshard == "never" and g.unsharded_bytes == largest for g in plan.groups) == kept, budget
        assert all(f"after {adapters:,} of trainable groups kept gathered" in g.why
                   for g in plan.groups if g.kind == FROZEN), budget
    at_one = build_plan(model, FreezePolicy(units=["layers.*"], trainable_grouping="root", frozen_reshard="auto",
                                            frozen_budget_bytes=largest), shard_size=1, split=True)
    assert any(g.reshard == "never" for g in at_one.groups)  # shard size 1: nothing is gathered, nothing charged


def test_bf16_storage_and_gathered_bytes():
    policy = FreezePolicy(units=["layers.*"], frozen_dtype="bfloat16", param_dtype="bfloat16",
                          trainable_grouping="per_unit")
    plan = build_plan(make_model(), policy, shard_size=2)
    fg = plan.frozen_group("layers.0")
    assert (fg.storage_dtype, fg.gathered_dtype) == ("bfloat16", "bfloat16")
    assert fg.unsharded_bytes == fg.numel * 2
    tg = next(g for g in plan.groups_of("layers.0") if g.kind == TRAINABLE)
    assert (tg.storage_dtype, tg.gathered_dtype) == ("float32", "bfloat16")


def test_structural_fallback_keeps_ties_in_one_call():
    """torch < 2.12: a module may be a frozen-only group only if every module sharing its tied
    parameters is one too; otherwise FSDP would shard the tie twice."""
    import torch.nn as nn

    frozen_head = build_plan(make_model(tied=True), FreezePolicy(units=["layers.*"]), shard_size=2, split=False)
    assert {"tok", "head"} <= set(frozen_head.frozen_group("").modules)
    model = make_model(tied=True)
    model.head.bias = nn.Parameter(torch.zeros(32))  # the head is no longer frozen-only
    mixed = build_plan(model, FreezePolicy(units=["layers.*"]), shard_size=2, split=False)
    root = mixed.frozen_group("")
    assert root is None or not {"tok", "head"} & set(root.modules)
    assert "tok.weight" in mixed.unsplit  # it stays with the head, in the root's trainable group


def test_structural_fallback_plan_names_unsplit_params():
    plan = build_plan(make_model(), FreezePolicy(units=["layers.*"]), shard_size=2, split=False)
    assert set(plan.unsplit) == {"layers.0.proj.weight", "layers.1.proj.weight"}
    fg = plan.frozen_group("layers.0")
    assert set(fg.modules) == {"layers.0.norm", "layers.0.attn.base_layer", "layers.0.mlp.base_layer"}
    tg = next(g for g in plan.groups_of("layers.0") if g.kind == TRAINABLE)
    assert "layers.0.proj.weight" in tg.params


def test_block_alone_as_root():
    plan = build_plan(Block(8), FreezePolicy(units=["attn", "mlp"]), shard_size=2)
    assert plan.units == ("attn", "mlp", "")


@pytest.mark.parametrize("split", [True, False])
def test_frozen_groups_that_reshard_like_their_trainable_group_are_merged(split):
    """[Note: merged frozen groups]: with ``coalesce_frozen=True`` a frozen group with its unit's trainable
    reshard and gathered dtype rides that group's all-gathers; any other reshard, a dtype FSDP would gather
    differently, NF4, a unit without trainable parameters, or trainables outside FSDP keep it apart."""
    def merged(shard_size=2, model=None, **kw):
        policy = FreezePolicy(units=["layers.*"], **{"trainable_grouping": "per_unit", "coalesce_frozen": True, **kw})
        plan = build_plan(model or make_model(), policy, shard_size=shard_size, split=split)
        assert all(g.kind == FROZEN for g in plan.groups if g.merged)
        assert all(g.own_all_gathers_per_step == (0 if g.merged else g.all_gathers_per_step) for g in plan.groups)
        return sorted(g.unit for g in plan.groups if g.merged)

    # layers.2 is frozen through and through: no trainable group to merge into
    assert merged(coalesce_frozen=False) == []  # the default: every frozen group apart (the lower peak)
    assert merged() == ["", "layers.0", "layers.1"]  # blocks: after_forward x True; root: after_backward x False
    assert merged(frozen_dtype="bfloat16", param_dtype="bfloat16") == ["", "layers.0", "layers.1"]  # both gathered bf16
    assert merged(frozen_reshard="after_backward") == [""]  # the blocks' trainables reshard after forward
    assert merged(frozen_reshard="after_backward", trainable_reshard=False) == ["", "layers.0", "layers.1"]
    assert merged(frozen_reshard="never") == []
    assert merged(frozen_reshard=2, shard_size=4) == []
    assert merged(trainable_reshard=2, shard_size=4) == []  # every trainable group, the root's too, reshards to 2
    # frozen weights stored and gathered in fp32 beside bf16 trainables: another dtype, kept apart
    assert merged(model=make_model().to(torch.bfloat16), frozen_dtype="float32") == []
    # the blocks hold no trainable group (the fallback: a group of the frozen weights it cannot split
    # off their module's trainable bias, gathered like the rest of the block, so they merge)
    assert merged(trainable_grouping="root") == ([""] if split else ["", "layers.0", "layers.1"])
    if split:  # NF4 groups (the root's holds the NF4 head) stay apart
        assert merged(frozen_dtype="nf4", param_dtype="bfloat16", nf4_block_size=32, nf4_scaler_block_size=4) == []
        assert merged(trainable_grouping="replicate") == []  # no trainable FSDP group anywhere
    plan = build_plan(make_model(), FreezePolicy(units=["layers.*"], trainable_grouping="per_unit", coalesce_frozen=True),
                      shard_size=2, split=split)
    assert "merged into the unit's trainable FSDP group" in plan.frozen_group("layers.0").why
    assert plan.frozen_group("layers.0").all_gathers_per_step == 2  # its bytes are still gathered twice


def test_coalesce_frozen_must_be_a_bool():
    with pytest.raises(PolicyError, match=r"FreezePolicy.coalesce_frozen must be True or False, got 'yes'"):
        FreezePolicy(coalesce_frozen="yes")
