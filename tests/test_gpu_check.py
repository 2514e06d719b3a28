"""`scripts/gpu_check.sh --dry-run`: the GPU check's every stage on the CPU (gloo, tiny shapes).

The lent GPU machine runs the script once, without network, against a hard time limit; an import, path,
flag or file error found there costs the run. The dry run takes the same stages in the same processes:
the benchmark's meta build, PEFT LoRA, `shard_with_freezing`, `load_pretrained`, a training step, bf16
and NF4, its per-stage JSON and markdown, and the CUDA tier's collection (it skips on the CPU). About
30 s on 2 CPU cores, run once per module.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from .common import checkout_env

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
STAGES = ["wheels", "args", "env", "base", "bfloat16", "nf4", "tier"]
MISSING = [m for m in ("transformers", "peft", "safetensors", "torchao") if importlib.util.find_spec(m) is None]
pytestmark = [
    pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                       reason="gpu_check.sh needs bash and coreutils' timeout"),
    pytest.mark.skipif(bool(MISSING), reason=f"the dry run needs {MISSING} (the 'hf' extra and torchao)"),
]


def _gpu_check(out: Path, base_root: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    env = checkout_env(OUT=str(out), GPU_BASE_ROOT=str(base_root), PYTHON=sys.executable, **env)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=240)


def _text(path: Path) -> str:
    assert path.is_file(), f"{path.name} missing"
    return path.read_text()


def _json(path: Path):
    return json.loads(_text(path))


def check_outputs(out: Path) -> None:
    """Every file a complete dry run writes, present and parsed; both benchmark rows measured."""
    stages = _json(out / "stages.json")
    assert [s["stage"] for s in stages] == STAGES, stages
    assert all(s["status"] in ("ok", "not needed") and s["rc"] == 0 for s in stages), stages
    assert all(s["timeout"] <= 60 for s in stages), stages
    env = _json(out / "env.json")
    assert env["torch"] and env["cuda"] is False and not str(env["torchao"]).startswith("missing"), env
    assert _text(out / "env.txt").startswith("torch ")
    parsed = [json.loads(line) for line in _text(out / "args.log").splitlines()]
    assert [(x["layers"], x["device"]) for x in parsed[::2]] == [(32, "cuda"), (4, "cuda"), (2, "cpu")], parsed
    assert [x["compile"] for x in parsed[::2]] == ["inductor", "", "aot_eager"], parsed  # full: torchtune's way
    base = _json(out / "bench_base.json")
    assert base["written"] and base["bytes"] > 0, base
    storage = {"bfloat16": "bfloat16", "nf4": "NF4Tensor"}
    for dtype, kind in storage.items():
        data = _json(out / f"gpu_bench_{dtype}.json")
        meta, r = data["meta"], data["run"]
        assert meta["device"] == "cpu" and meta["layers"] == 2 and meta["hidden"] == 64, meta
        assert r["status"] == "done" and r["frozen_dtype"] == dtype, r
        # the CPU's figure: a step's tensor storage peak, against the estimate of the same run
        assert r["peak_metric"].startswith("tensor storage peak") and r["peak_gib"] > 0, r
        assert r["measured_vs_estimate"] > 0 and r["host_peak_rss_gib"] > 0, r
        # what the peak holds: the largest storages, the op that made each
        top = r["peak_top"]
        assert len(top) == 12 and all(b > 0 and isinstance(op, str) for b, op, _, _ in top), top
        assert [b for b, *_ in top] == sorted((b for b, *_ in top), reverse=True), top
        # and all of it: the state plus the rest grouped per (op, shape, dtype) is the peak itself
        groups = r["peak_groups"]
        assert groups["state_gib"] > 0 and groups["rest_gib"] > 0, groups
        assert math.isclose(groups["state_gib"] + groups["rest_gib"], r["peak_gib"], rel_tol=1e-9), (groups, r)
        sizes = [g[0] for g in groups["largest"]]
        assert 0 < len(sizes) <= 16 and sizes == sorted(sizes, reverse=True), groups
        assert all(g[1] >= 1 and g[2] != "baseline" for g in groups["largest"]), groups
        assert r["steps_measured"] == 1 and r["tokens_per_s"] > 0 and math.isfinite(r["loss"]), r
        assert r["trainable_params"] > 0 and r["estimate_gib"] > 0, r
        assert kind in r["frozen_storage"], r  # NF4 frozen shards really are NF4Tensors
        # --compile: the uncounted warm-up step compiled every layer whole; one graph per input signature
        # (the first layer's input needs no grad: a frozen embedding), so no recompiles: a KV cache left on
        # in training recompiled per layer (4 graphs here), and under inductor failed the recompute
        assert meta["compile"] == "aot_eager" and r["compiled"]["graph_breaks"] == 0, r["compiled"]
        assert 1 <= r["compiled"]["graphs"] <= 2, r["compiled"]
        # --offloaded-step: one more step with the checkpointed inputs offloaded, its peak beside its estimate
        off = r["offloaded"]
        assert off["tensors"] >= meta["layers"] and off["gib"] > 0 and off["peak_gib"] > 0, off
        assert 0 < off["estimate_gib"] < r["estimate_gib"] and off["measured_vs_estimate"] > 0, (off, r)
        md = _text(out / f"gpu_bench_{dtype}.md")
        assert f"| {dtype} | " in md and "step tensor peak" in md and "inputs offloaded" in md, md
    assert set(_json(out / "gpu_bench_bfloat16.json")["run"]["frozen_storage"]) == {"bfloat16"}
    combined = _json(out / "gpu_bench.json")
    assert list(combined["runs"]) == ["bfloat16", "nf4"], combined
    assert all(r["status"] == "done" for r in combined["runs"].values()), combined
    tier = _json(out / "cuda_tests.json")
    assert tier["status"] == "ok" and tier["rc"] == 0, tier
    assert tier["tests"] > 0 and tier["skipped"] == tier["tests"] and not tier["failures"] + tier["errors"], tier
    junit = ET.fromstring(_text(out / "cuda_tests.xml"))
    assert sum(1 for _ in junit.iter("testcase")) == tier["tests"], tier
    summary = _text(out / "summary.md")
    rows = [line for line in summary.splitlines() if line.startswith(("| bfloat16 | ", "| nf4 | "))]
    measured = [line for line in rows if line.split("|")[2].strip().replace(".", "", 1).isdigit()]
    assert len(measured) == 2, summary  # one benchmark row each (the stage rows have a status there)
    for stage in STAGES:
        assert f"| {stage} | " in summary, summary
    assert "skipped" in summary.split("## CUDA tier")[1], summary


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_check")
    proc = _gpu_check(tmp / "out", tmp / "base", "--dry-run")
    return proc, tmp / "out"


def test_dry_run_writes_every_stage(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    check_outputs(out)


def test_check_outputs_fails_on_a_missing_or_unfinished_result(dry_run, tmp_path):
    """The checks above can fail: a missing file, or a row a killed stage left unfinished."""
    _, out = dry_run
    for name, damage in (("gpu_bench_nf4.json", None), ("summary.md", None), ("gpu_bench_bfloat16.md", None),
                         ("gpu_bench_nf4.json", lambda d: d["run"].update(status="running", phase="loaded"))):
        copy = tmp_path / f"copy_{len(list(tmp_path.iterdir()))}"
        shutil.copytree(out, copy)
        if damage is None:
            (copy / name).unlink()
        else:
            data = json.loads((copy / name).read_text())
            damage(data)
            (copy / name).write_text(json.dumps(data))
        with pytest.raises(AssertionError):
            check_outputs(copy)


def test_no_time_left_skips_stages_and_fails(tmp_path):
    """A budget too small for any stage: each is skipped, recorded, and the script exits non-zero."""
    proc = _gpu_check(tmp_path / "out", tmp_path / "base", "--dry-run", GPU_BUDGET="10")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    stages = _json(tmp_path / "out" / "stages.json")
    assert [s["stage"] for s in stages] == STAGES and {s["status"] for s in stages[2:]} == {"skipped"}, stages
    assert "| nf4 | skipped |" in (tmp_path / "out" / "summary.md").read_text()


def test_a_bad_benchmark_flag_fails_before_any_gpu_stage(tmp_path):
    """The args stage parses every mode's benchmark flags (here the full run's, broken by GPU_LAYERS)."""
    proc = _gpu_check(tmp_path / "out", tmp_path / "base", "--dry-run", GPU_BUDGET="10", GPU_LAYERS="32x")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    args = [s for s in _json(tmp_path / "out" / "stages.json") if s["stage"] == "args"]
    assert args and args[0]["status"] == "failed", args
    assert "--layers: invalid int value: '32x'" in (tmp_path / "out" / "args.log").read_text()


def test_unknown_argument_is_refused(tmp_path):
    proc = _gpu_check(tmp_path / "out", tmp_path / "base", "--dryrun")
    assert proc.returncode == 2 and "unknown argument --dryrun" in proc.stderr, proc.stderr
