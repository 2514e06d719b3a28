"""Every combination works: the generated configuration matrix (`tests/matrix.py`), one test per case.

Each case runs on gloo ranks (2; 4 for an int frozen_reshard) against plain FSDP2 with the same units,
wrapper and MixedPrecisionPolicy. The parent checks what the ranks measured and runs `estimate` with
the case's policy (units named as the case names them).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from fsdp_frozen import estimate

from . import matrix
from .dist_harness import run_ranks

HF_MISSING = any(importlib.util.find_spec(m) is None for m in ("transformers", "peft", "safetensors"))
CASES = matrix.cases()
if matrix.FALLBACK:  # estimate plans in this process: the same path as the ranks
    import fsdp_frozen._torch_compat as compat

    compat.SPLIT_GROUPS_SUPPORTED = False
#: seconds per case, generous: the slowest (4 ranks, compile) take ~20 s on 2 cores
CASE_TIMEOUT = 240


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> str:
    """The bases every case loads (written once, in the parent)."""
    tmp = str(tmp_path_factory.mktemp("matrix"))
    matrix.save_toy(tmp)
    if not HF_MISSING:
        for family in matrix.HF_FAMILIES:
            matrix.save_hf(tmp, family)
    return tmp


def test_the_covering_holds_every_pair():
    """Every pair of values that a valid, unrefused case can hold is in some case; refusals have one each."""
    names = list(matrix.DIMENSIONS)
    covered = {pair for c in CASES if c.refused is None for pair in matrix._pairs(vars(c))}
    for d1, d2 in ((a, b) for i, a in enumerate(names) for b in names[i + 1:]):
        for v1 in matrix.DIMENSIONS[d1]:
            for v2 in matrix.DIMENSIONS[d2]:
                holdable = any(
                    matrix._valid(values) and matrix.Case(**values).refused is None
                    for values in ({**vars(c), d1: v1, d2: v2} for c in CASES))
                if holdable:
                    assert (d1, v1, d2, v2) in covered, (d1, v1, d2, v2)
    assert sum(c.refused is not None for c in CASES) == len(matrix.REFUSED)
    assert len(CASES) == len({c.id for c in CASES})


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(case: matrix.Case, pretrained: str):
    if HF_MISSING and matrix.FAMILIES[case.family].hf:
        pytest.skip("needs the hf extra (transformers, peft, safetensors)")
    results = run_ranks(matrix.run_case, case.world, pretrained, case, timeout=CASE_TIMEOUT)
    if matrix.FALLBACK and case.refused is None and "refused" in results[0]:
        for r in results:
            assert all(part in r["refused"] for part in matrix.FALLBACK_REFUSAL), r["refused"]
        return
    if case.refused is not None:
        for r in results:
            assert r["refused"] is not None, f"{case.id}: shard_with_freezing accepted a refused combination"
            for name in case.refused:
                assert name in r["refused"], (name, r["refused"])
            assert "use" in r["refused"], r["refused"]  # says what to use instead
        return
    for rank, r in enumerate(results):
        rtol = matrix.LOSS_RTOL[case.precision]  # 0 but for NF4: bitwise, the structural fallback too
        for got, want in zip(r["losses"], r["ref_losses"]):
            assert abs(got - want) <= rtol * abs(want), (rank, r["losses"], r["ref_losses"])
        if rtol == 0.0:
            assert r["param_max_diff"] == 0.0, (rank, r["param_max_diff"])
        assert r["trainable_names_differ"] == [], r["trainable_names_differ"]
        assert r["frozen_with_grad"] == [] and r["frozen_with_state"] == [], r
        if case.world == 1 and case.precision != "bf16_fp32_frozen":  # stored as they compute: no FSDP copy
            assert r["frozen_in_fsdp"] == [], r["frozen_in_fsdp"]
        assert r["frozen_changed"] == [], r["frozen_changed"]
        # HSDP's sharded parameters really are on the 2-D mesh, the others' on a 1-D one (none at all where
        # every group is kept whole: one rank, or "never" frozen groups beside a replicated trainable group)
        assert set(r["mesh_ndims"]) <= ({2} if case.ranks == "hsdp" else {1}), r["mesh_ndims"]
        assert "frozen" in r["describe"] or case.family == "partial", r["describe"]
        assert r["ag_described"] == r["ag_counted"], (r["ag_described"], r["ag_counted"], r["describe"])
        if "disabled_diff" in r:
            assert r["adapters_matter"], "the trained adapters do not change the logits: disable_adapter tests nothing"
            tol = matrix.LOGITS_RTOL[case.precision] * r["disabled_scale"]
            assert r["disabled_diff"] <= tol, (r["disabled_diff"], r["disabled_scale"])
        assert r["loaded_trainable_differ"] == [] and r["loaded_frozen_differ"] == [], r
        assert r["next_loss"][0] == r["next_loss"][1], r["next_loss"]
        assert r["next_trainable_differ"] == [], r["next_trainable_differ"]
        assert r["norm_trainable"] and all(r["norm_trainable"].values()), r["norm_trainable"]
        assert all(r["norm_moved"].values()), r["norm_moved"]
    # estimate: the same policy (units as the case names them) on a fake process group, meta build
    est = estimate(lambda: matrix.build_model(case, pretrained, meta=True), case.world, matrix.policy_of(case),
                   replicate=2 if case.ranks == "hsdp" else 1)
    assert est.trainable_grouping == results[0]["grouping"], (est.trainable_grouping, results[0]["grouping"])
    assert est.frozen_shard_bytes > 0 or case.family == "partial"


GROUPINGS = ("per_unit", "root", "replicate", "auto")
FROZEN = ("after_forward", "after_backward", "never", "auto")


def _promoted(rank: int, world: int) -> dict:
    """[Note: units outside FSDP]: the toy model adds an fp32 buffer to its activations at the root,
    so every unit's input is promoted to fp32; each unit must cast it to param_dtype as FSDP2 does."""
    from fsdp_frozen import FreezePolicy, shard_with_freezing
    from fsdp_frozen.apply import sharded_state
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from .common import mesh_1d, plain_fsdp, train
    from .models import make_model

    out = {}
    for bf16 in (False, True):
        dtypes = dict(param_dtype="bfloat16", reduce_dtype="float32", frozen_dtype="bfloat16") if bf16 else {}
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
        want = train(plain_fsdp(make_model(), mesh_1d(world), ("layers.*",), mp), 3, rank)
        for grouping in GROUPINGS:
            for frozen in FROZEN:
                model = shard_with_freezing(make_model(), mesh_1d(world), FreezePolicy(
                    units=["layers.*"], trainable_grouping=grouping, frozen_reshard=frozen,
                    frozen_budget_bytes=10**9 if frozen == "auto" else None, **dtypes))
                plan = sharded_state(model).plan
                out[(bf16, grouping, frozen)] = (train(model, 3, rank), want, sorted(plan.units_without_fsdp),
                                                 plan.split)
    return out


def test_units_outside_fsdp_cast_inputs_as_fsdp2():
    """Every grouping x frozen policy, fp32 and bf16, on a model whose activations are promoted to
    fp32 between units: losses bitwise those of plain FSDP2 with the same MixedPrecisionPolicy (the
    same casts at the same modules: bitwise in bf16 too). replicate + never (+ auto with a budget
    that keeps every frozen group) leaves the blocks without fully_shard: the cast case."""
    for r in run_ranks(_promoted, 2):
        for (bf16, grouping, frozen), (got, want, outside, split) in r.items():
            assert got == want, (bf16, grouping, frozen, got, want)
            if split and grouping == "replicate" and frozen in ("never", "auto"):  # (not in the fallback)
                assert outside == ["layers.0", "layers.1", "layers.2"], (bf16, frozen, outside)
