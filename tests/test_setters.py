"""FSDP's public setters on a model sharded by shard_with_freezing: frozen groups keep their policy,
trainable groups follow the setter, and describe() reports what the groups then do (counted)."""

from __future__ import annotations

from torch.distributed.fsdp import FSDPModule

from fsdp_frozen import FreezePolicy, describe, shard_with_freezing

from fsdp_frozen.diagnostics import shared_frozen_all_gathers

from .common import CommCounter, adamw, frozen_group_names, mesh_1d, train
from .dist_harness import run_ranks
from .models import make_model

SETTERS = {
    "root.set_reshard_after_forward(True)": lambda m: m.set_reshard_after_forward(True),
    "root.set_reshard_after_forward(False)": lambda m: m.set_reshard_after_forward(False),
    "root.set_reshard_after_backward(False)": lambda m: m.set_reshard_after_backward(False),
    "root.set_reshard_after_backward(True)": lambda m: m.set_reshard_after_backward(True),
    "layers.0.set_reshard_after_forward(False, recurse=False)":
        lambda m: m.layers[0].set_reshard_after_forward(False, recurse=False),
    # Bypasses the instance guard: undone by the root's forward pre-hook.
    "FSDPModule.set_reshard_after_forward(root, True)": lambda m: FSDPModule.set_reshard_after_forward(m, True),
}


def _setters(rank: int, world: int) -> dict:
    out = {}
    for frozen_reshard, coalesce in (("never", False), ("after_backward", False), ("after_backward", True)):
        for name, call in SETTERS.items():
            model = shard_with_freezing(make_model(), mesh_1d(world),
                                        FreezePolicy(units=["layers.*"], frozen_reshard=frozen_reshard,
                                                     trainable_grouping="per_unit", coalesce_frozen=coalesce))
            opt = adamw(model)
            train(model, 1, rank, opt=opt)  # warm-up: "never" groups gathered once
            before = describe(model)
            call(model)
            after = describe(model)
            frozen_pgs = frozen_group_names(model)
            # torch < 2.12's structural fallback: frozen groups on the user's process group, by the plan
            shared = shared_frozen_all_gathers(model)[0]
            counter = CommCounter()
            per_step = []

            def on_step(step, model, opt, counter=counter):
                frozen = counter.total("all_gather", frozen_pgs, count=True) + shared
                per_step.append((frozen, counter.total("all_gather", count=True) - frozen))
                counter.clear()

            with counter:
                train(model, 3, rank, opt=opt, start=1, on_step=on_step)
            out[(frozen_reshard + (" coalesced" if coalesce else ""), name)] = {
                "per_step": per_step,
                # frozen groups of their own; a merged one is its unit's trainable group ([Note: merged frozen groups])
                "frozen_before": [(r.unit, r.reshard, r.all_gathers_per_step) for r in before if r.kind == "frozen" and not r.merged],
                "frozen_after": [(r.unit, r.reshard, r.all_gathers_per_step) for r in after if r.kind == "frozen" and not r.merged],
                "merged_after": [(r.unit, r.reshard, r.all_gathers_per_step) for r in after if r.merged],
                "trainable_before": [(r.unit, r.reshard) for r in before if r.kind == "trainable"],
                "trainable_after": [(r.unit, r.reshard) for r in after if r.kind == "trainable"],
                "trainable_why": [r.why for r in after if r.kind == "trainable"],
                "describe_ag": (sum(r.all_gathers_per_step for r in after if r.kind == "frozen" and not r.merged),
                                sum(r.all_gathers_per_step for r in after if r.kind == "trainable")),
            }
    return out


def test_fsdp_setters_keep_the_frozen_policy():
    results = run_ranks(_setters, 2)[0]
    failures = []
    for (frozen_reshard, name), r in results.items():
        if r["frozen_after"] != r["frozen_before"]:
            failures.append(f"{frozen_reshard} / {name}: describe changed the frozen groups: {r['frozen_after']}")
        # Steady-state steps (the first after a setter may be a transition) move exactly what
        # describe() says, frozen and trainable apart.
        if r["per_step"][1:] != [r["describe_ag"]] * 2:
            failures.append(f"{frozen_reshard} / {name}: counted {r['per_step']}, describe says {r['describe_ag']}")
    assert not failures, "\n".join(failures)
    never = {n: r for (f, n), r in results.items() if f == "never"}
    assert all(r["describe_ag"][0] == 0 for r in never.values())
    # The setters did reach the trainable groups (and describe() shows it).
    kept = never["root.set_reshard_after_forward(False)"]
    assert all(reshard == "False" for _, reshard in kept["trainable_after"]), kept["trainable_after"]
    assert kept["trainable_before"] != kept["trainable_after"]
    assert kept["describe_ag"][1] == 3  # 3 units with trainables (2 blocks + root), 1 gather each
    # describe() says the blocks' trainable groups were changed by a setter (the root's already kept).
    assert sum("set by FSDP's set_reshard_after_*" in w for w in kept["trainable_why"]) == 2, kept["trainable_why"]
    one = never["layers.0.set_reshard_after_forward(False, recurse=False)"]["trainable_after"]
    assert dict(one) == {"layers.0": "False", "layers.1": "True", "": "False"}, one
    backward = never["root.set_reshard_after_backward(False)"]
    assert backward["describe_ag"][1] == 2 and backward["per_step"][1:] == [(0, 2)] * 2  # 2 blocks, 1 each
    # With coalesce_frozen under "after_backward" the root's frozen group is merged into the root's trainable
    # group (both kept after forward, resharded after backward): it follows the setters there, as in plain
    # FSDP2, and describe() says so; without coalesce_frozen nothing is merged
    assert all(r["merged_after"] == [] for (f, n), r in results.items() if "coalesced" not in f)
    merged = {n: r["merged_after"] for (f, n), r in results.items() if f == "after_backward coalesced"}
    assert merged["layers.0.set_reshard_after_forward(False, recurse=False)"] == [("", "after_backward", 1)]
    assert merged["root.set_reshard_after_backward(False)"] == [("", "False, kept after backward", 0)]
