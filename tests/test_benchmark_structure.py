"""recipes/benchmark_structure.py end to end on a tiny structure (2 gloo ranks from the test pool): every
grouping x frozen policy measured against plain FSDP2, the package's hooks profiled, the scaling table,
and collective counts consistent with each layout. Counts and structure only, no timing assertions."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from .dist_harness import run_ranks

pytest.importorskip("peft")

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
POLICIES = ("after_forward", "never")  #: after_backward only adds time here


def _run_benchmark(rank: int, world: int, out: str) -> dict:
    if str(RECIPES) not in sys.path:
        sys.path.insert(0, str(RECIPES))
    import benchmark_structure as bs

    args = bs.parse_args(["--layers", "1,2", "--hidden", "32", "--steps", "1", "--warmup", "0", "--profile-steps", "1",
                          "--policies", ",".join(POLICIES), "--out", out if rank == 0 else ""])
    results = bs.run(args)
    return {"summaries": [r["summary"] for r in results], "auto": [r["auto"] for r in results],
            "counts": [r["counts"] for r in results]}


def test_benchmark_structure_smoke(tmp_path):
    got = run_ranks(_run_benchmark, 2, str(tmp_path))[0]
    text = (tmp_path / "benchmark_structure.md").read_text()
    data = json.loads((tmp_path / "benchmark_structure.json").read_text())
    assert [r["layers"] for r in data["results"]] == [1, 2]
    assert "### Scaling: the package's per-step work" in text and "Plain FSDP2 with 2 groups per layer" in text
    for layers, summary, counts in zip((1, 2), got["summaries"], got["counts"]):
        assert counts["trainable_parameters"] == 14 * layers  # LoRA A and B on 7 linears per block
        rows = summary["rows"]
        coalesced = "per_unit / after_forward (coalesced)"  # coalesce_frozen=True: a block's groups merged
        assert set(rows) == {f"{g} / {p}" for g in ("per_unit", "root", "replicate") for p in POLICIES} | {coalesced}
        plain, plain2 = summary["plain_collectives"], summary["plain2_collectives"]
        assert rows[coalesced]["collectives"]["all_gather"] == plain["all_gather"], rows[coalesced]
        assert plain["reduce_scatter"] == layers and plain["all_gather"] == 1 + 2 * layers  # root kept, blocks twice
        assert plain2["all_gather"] == 1 + 4 * layers  # a second group per block: two more per block
        for name, row in rows.items():
            grouping, policy = name.split(" / ")
            c = row["collectives"]
            assert row["vs_plain"] > 0 and row["package_ms"] > 0, name
            assert row["profile_ms"]["freezing check"] >= 0 and row["profile_ms"]["track_backward"] > 0, name
            if grouping == "replicate":
                assert (c["reduce_scatter"], c["all_reduce"]) == (0, 1), name
                assert row["profile_ms"]["replicate pre-forward"] > 0, name
            else:
                assert c["reduce_scatter"] == (layers if grouping == "per_unit" else 1) and c["all_reduce"] == 0, name
                assert row["profile_ms"]["replicate pre-forward"] == 0, name
            if grouping == "per_unit" and policy == "after_forward":
                assert c["all_gather"] == plain2["all_gather"], name  # frozen and trainable groups: two per block
            if policy == "never" and grouping != "per_unit":
                assert c["all_gather"] == (1 if grouping == "root" else 0), name  # steady state: adapters only
    assert all(set(a) == {"after_forward", "after_backward", "never"} for a in got["auto"])
