"""Collectives counted per step (c10d ops intercepted): frozen all-gathers and reduce-scatter contents."""

from __future__ import annotations

import math

import pytest

from fsdp_frozen import FreezePolicy, shard_with_freezing
from fsdp_frozen.apply import sharded_state
from fsdp_frozen.plan import FROZEN, TRAINABLE

from .common import CommCounter, frozen_group_names, mesh_1d, train
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
