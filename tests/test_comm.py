"""Collectives counted per step (c10d ops intercepted): frozen all-gathers and reduce-scatter contents."""

from __future__ import annotations

import contextlib
import math

import pytest

from fsdp_frozen import FreezePolicy, shard_with_freezing
from fsdp_frozen.apply import sharded_state
from fsdp_frozen.diagnostics import shared_frozen_all_gathers
from fsdp_frozen.plan import FROZEN, TRAINABLE

from .common import CommCounter, frozen_group_names, mesh_1d, structural_fallback, train
from .dist_harness import run_ranks
from .models import make_model

STEPS = 4
POLICIES = ("after_forward", "after_backward", "never")


def _padded_numel(shape, world_size: int) -> int:
    return math.ceil(shape[0] / world_size) * world_size * math.prod(shape[1:])


def _count(rank: int, world_size: int) -> dict:
    out = {}
    for reshard, coalesce in [(p, False) for p in POLICIES] + [(p, True) for p in POLICIES]:
        model = shard_with_freezing(make_model(), mesh_1d(world_size),
                                    FreezePolicy(units=["layers.*"], frozen_reshard=reshard, trainable_grouping="per_unit",
                                                 coalesce_frozen=coalesce))
        frozen_pgs = frozen_group_names(model)
        counter = CommCounter()
        per_step = []

        def on_step(step, model, opt, counter=counter):
            per_step.append({
                "frozen_ag": counter.total("all_gather", frozen_pgs, count=True),
                "trainable_ag": counter.total("all_gather", count=True) - counter.total("all_gather", frozen_pgs, count=True),
                "frozen_rs": counter.total("reduce_scatter", frozen_pgs, count=True),
                "rs_bytes": counter.total("reduce_scatter"),
            })
            counter.clear()

        with counter:
            train(model, STEPS, rank, on_step=on_step)
            # A state_dict() reshards kept-gathered groups: at most one re-gather per frozen group, then none.
            model.state_dict()
            counter.clear()
            train(model, 2, rank, on_step=on_step)
        plan = sharded_state(model).plan
        params = dict(make_model().named_parameters())
        out[(reshard, coalesce)] = {
            "per_step": per_step,
            "n_frozen_groups": sum(1 for g in plan.groups if g.kind == FROZEN),
            "n_trainable_groups": sum(1 for g in plan.groups if g.kind == TRAINABLE),
            "expected_frozen_ag": sum(g.all_gathers_per_step for g in plan.groups if g.kind == FROZEN),
            "expected_own_frozen_ag": sum(g.own_all_gathers_per_step for g in plan.groups if g.kind == FROZEN),
            "merged": sorted(g.unit for g in plan.groups if g.merged),
            "trainable_rs_bytes": 4 * sum(
                _padded_numel(params[p].shape, world_size) for g in plan.groups if g.kind == TRAINABLE for p in g.params
            ),
            "frozen_pgs": len(frozen_pgs),
        }
    return out


@pytest.mark.split_layout
@pytest.mark.parametrize("world_size", [2])
def test_frozen_all_gathers_and_reduce_scatter_per_step(world_size):
    results = run_ranks(_count, world_size)
    for (reshard, coalesce), r in results[0].items():
        n = r["n_frozen_groups"]
        assert n == 4  # 3 blocks + root embedding
        assert r["frozen_pgs"] == 1  # every frozen group of the mesh shares one process group (created once)
        steps, after_sd = r["per_step"][:STEPS], r["per_step"][STEPS:]
        # 3 block units + the root (whose frozen group, like FSDP's root, is not resharded after forward)
        assert r["expected_frozen_ag"] == {"after_forward": 2 * 3 + 1, "after_backward": 4, "never": 0}[reshard]
        # [Note: merged frozen groups]: with coalesce_frozen, a frozen group that reshards as its unit's
        # trainable group is gathered in that group's all-gathers (the root's, "after_backward" by the root
        # rule, beside its trainable False; the blocks' "after_forward" beside FSDP's True); layers.2 has no
        # trainable group. Without it (the default) none is.
        merged = {"after_forward": ["", "layers.0", "layers.1"], "after_backward": [""], "never": []}[reshard]
        assert r["merged"] == (merged if coalesce else [])
        # frozen all-gathers on the frozen process groups: merged groups launch none (coalesced after_forward:
        # only layers.2's 2; after_backward: the 3 blocks' 1, the root's in its trainable group)
        want = ({"after_forward": 2, "after_backward": 3, "never": 0} if coalesce else
                {"after_forward": 2 * 3 + 1, "after_backward": 4, "never": 0})[reshard]
        assert r["expected_own_frozen_ag"] == want  # the plan's figure matches the measurement
        first = n if reshard == "never" else want  # "never": gathered once, at first use
        assert [s["frozen_ag"] for s in steps] == [first] + [want] * (STEPS - 1), (reshard, steps)
        # trainable groups behave as plain FSDP2: root kept (1/step), blocks 2/step (2 of 3 blocks have trainables)
        assert {s["trainable_ag"] for s in steps} == {1 + 2 * 2}, (reshard, steps)
        # reduce-scatter: never on frozen process groups, and exactly the trainable elements
        assert {s["frozen_rs"] for s in steps} == {0}
        assert {s["rs_bytes"] for s in steps} == {r["trainable_rs_bytes"]}, (reshard, steps)
        if reshard == "never":
            assert [s["frozen_ag"] for s in after_sd] == [n, 0], after_sd  # one re-gather after state_dict()


def _told_apart(rank: int, world_size: int) -> dict:
    out = {}
    for path in ("split", "fallback"):
        for grouping, reshard in (("per_unit", "after_forward"), ("per_unit", "never"), ("root", "after_forward")):
            with structural_fallback() if path == "fallback" else contextlib.nullcontext():
                model = shard_with_freezing(make_model(), mesh_1d(world_size), FreezePolicy(
                    units=["layers.*"], frozen_reshard=reshard, trainable_grouping=grouping))
                train(model, 1, rank)  # "never": the first step gathers once
                counter = CommCounter()
                with counter:
                    train(model, 1, rank, start=1)
            own = frozen_group_names(model)
            calls, nbytes = shared_frozen_all_gathers(model)
            plan = sharded_state(model).plan
            trainable = {n: p for n, p in make_model().named_parameters() if p.requires_grad}
            out[(path, grouping, reshard)] = {
                "split": plan.split, "own": len(own), "shared": (calls, nbytes),
                "frozen_calls": counter.total("all_gather", own, count=True) + calls,
                "want_frozen_calls": sum(g.own_all_gathers_per_step for g in plan.groups if g.kind == FROZEN),
                "trainable_bytes": counter.total("all_gather") - counter.total("all_gather", own) - nbytes,
                # fp32: each trainable parameter's padded rows x ranks, times its group's gathers per step
                "want_trainable_bytes": sum(4 * _padded_numel(trainable[f].shape, world_size) * g.all_gathers_per_step
                                            for g in plan.groups if g.kind == TRAINABLE for f in g.params
                                            if f in trainable),
            }
    return out


@pytest.mark.split_layout  # both layouts: torch >= 2.12, the fallback forced for one
def test_frozen_traffic_is_told_apart_in_both_layouts():
    """`frozen_group_names` + `shared_frozen_all_gathers` (what the benchmark reports as frozen traffic)
    against a counter: the frozen calls the plan predicts, and what is left is exactly the trainable
    parameters' bytes. torch < 2.12's structural fallback keeps its frozen groups on the user's process
    group (none of their own), and leaves some frozen parameters in trainable groups: counted by the
    plan there; on the split layout nothing is shared."""
    for key, r in run_ranks(_told_apart, 2)[0].items():
        fallback = key[0] == "fallback"
        assert r["split"] is not fallback, key
        assert (r["own"], r["shared"] == (0, 0)) == ((0, False) if fallback else (1, True)), (key, r)
        assert r["frozen_calls"] == r["want_frozen_calls"], (key, r)
        assert r["trainable_bytes"] == r["want_trainable_bytes"] > 0, (key, r)
