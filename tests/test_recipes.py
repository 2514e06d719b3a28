"""Recipes end to end (world 2, tiny configs): loss falls, checkpoints, exact resume, config validation,
and the Hugging Face + PEFT adapter export.

Each recipe's first run in `test_lora_finetune` (the README's main job), one benchmark run and one bad
config go through ``torchrun`` / ``python``, as a user runs them; the others call the recipe's
``main(argv)`` in the suite's pooled gloo ranks (tests/dist_harness.py), which saves a torch import per
process per run: the same code from the argument parsing on (`recipes/runtime.py` leaves a process group
it did not create). A resumed pooled run logging bitwise a torchrun run's losses checks that the two agree.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .common import checkout_env
from .dist_harness import run_ranks

ROOT = Path(__file__).resolve().parent.parent
TINY = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.hidden_dim=64", "data.batch_size=4",
        "data.seq_len=32", "train.log_every=5", "optimizer.lr=0.01"]
TIMEOUT = 300


def torchrun(script: str, config: str, *overrides: str, world: int = 2) -> subprocess.CompletedProcess:
    return launch(script, "--config", str(ROOT / "recipes" / "configs" / config), *overrides, world=world)


def launch(script: str, *args: str, world: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
           str(ROOT / "recipes" / script), *args]
    env = checkout_env(OMP_NUM_THREADS="1")
    # Own process group, so a hung run is killed with all its ranks, not just the launcher.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"{script} timed out after {TIMEOUT}s\n{stdout[-2000:]}\n{stderr[-4000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _main_in_rank(rank: int, world: int, script: str, argv: list[str]) -> str:
    """``recipes/SCRIPT``'s ``main(argv)`` in a pooled rank; what it printed."""
    import contextlib
    import importlib
    import io

    if str(ROOT / "recipes") not in sys.path:
        sys.path.insert(0, str(ROOT / "recipes"))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        importlib.import_module(Path(script).stem).main(argv)
    return printed.getvalue()


def in_ranks(script: str, *args: str, world: int = 2) -> subprocess.CompletedProcess:
    """`launch`'s result for ``main(args)`` run in the pooled ranks (a failing rank raises, with its
    traceback); rank 0's output."""
    argv = list(args)
    return subprocess.CompletedProcess([script, *argv], 0, run_ranks(_main_in_rank, world, script, argv,
                                                                     timeout=TIMEOUT)[0], "")


def pooled(script: str, config: str, *overrides: str, world: int = 2) -> subprocess.CompletedProcess:
    """`torchrun`'s twin in the pooled ranks."""
    return in_ranks(script, "--config", str(ROOT / "recipes" / "configs" / config), *overrides, world=world)


def run_ok(*args, runner=pooled, **kwargs) -> subprocess.CompletedProcess:
    out = runner(*args, **kwargs)
    assert out.returncode == 0, f"exit {out.returncode}\nstdout:\n{out.stdout[-3000:]}\nstderr:\n{out.stderr[-6000:]}"
    return out


def losses(out_dir: Path) -> dict[int, float]:
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(ln) for ln in lines]
    assert all(r["tokens_per_s"] > 0 for r in records)
    return {r["step"]: r["loss"] for r in records}


def check_recipe(tmp_path: Path, script: str, config: str, overrides: list[str], steps: int = 12,
                 first=pooled) -> None:
    """Loss falls; checkpoints are written; a run resumed from step steps/2 logs the same losses. The first
    run goes through `first` (`torchrun` or `pooled`), the other two through `pooled`."""
    full, part = tmp_path / "full", tmp_path / "part"
    half = steps // 2
    common = [*overrides, f"train.checkpoint_every={half}"]
    out = run_ok(script, config, *common, f"train.steps={steps}", f"train.output_dir={full}", runner=first)
    assert f"step {steps}/{steps}" in out.stdout, out.stdout[-2000:]  # the progress bar, rank 0
    straight = losses(full)
    assert sorted(straight) == list(range(1, steps + 1))
    first, last = straight[1], sum(straight[s] for s in range(steps - 2, steps + 1)) / 3
    assert last < first - 0.3, f"loss did not fall: {straight}"
    assert (full / f"step_{half}" / "fsdp_frozen.json").is_file() and (full / f"step_{steps}" / ".metadata").is_file()

    run_ok(script, config, *common, f"train.steps={half}", f"train.output_dir={part}")
    out = run_ok(script, config, *common, f"train.steps={steps}", f"train.output_dir={part}", "train.resume=true")
    assert f"training steps {half + 1}..{steps}" in out.stdout, out.stdout[-2000:]  # it did resume
    assert losses(part) == straight, "resumed run differs from the uninterrupted one"


def test_lora_finetune(tmp_path):
    check_recipe(tmp_path, "lora_finetune.py", "lora_tiny.yaml", TINY, first=torchrun)
    manifest = json.loads((tmp_path / "full" / "step_12" / "fsdp_frozen.json").read_text())
    assert manifest["frozen_state"] == "referenced" and manifest["base"]["path"] == "../step_6"


def test_partial_freeze(tmp_path):
    check_recipe(tmp_path, "lora_finetune.py", "partial_freeze.yaml", TINY)
    params = json.loads((tmp_path / "full" / "step_6" / "fsdp_frozen.json").read_text())["params"]
    frozen = sorted(n for n, e in params.items() if e["kind"] == "frozen")
    assert frozen == sorted(["tok_embeddings.weight"] + [n for n in params if n.startswith(("layers.0.", "layers.1."))])


def test_lora_stages_refreeze_and_resume_across_the_boundary(tmp_path):
    """Stage 2 (from step 7) opens block 1 with refreeze; a run resumed from step 6 refreezes at 7 and
    logs the same losses as the uninterrupted run."""
    stage = "stages=[{step: 7, freeze: {units: ['layers.*'], frozen_reshard: after_backward, unfreeze: ['layers.1.**']}}]"
    check_recipe(tmp_path, "lora_finetune.py", "lora_stages.yaml", [*TINY, stage])
    before = json.loads((tmp_path / "full" / "step_6" / "fsdp_frozen.json").read_text())
    after = json.loads((tmp_path / "full" / "step_12" / "fsdp_frozen.json").read_text())
    kind = lambda m, n: m["params"][n]["kind"]  # noqa: E731
    assert kind(before, "layers.1.wq.base_layer.weight") == "frozen" and kind(after, "layers.1.wq.base_layer.weight") == "trainable"
    assert kind(after, "layers.0.wq.base_layer.weight") == "frozen"
    assert after["frozen_state"] == "included"  # the frozen set changed: a new base, not a reference


def test_distill(tmp_path):
    tiny = ["teacher.dim=32", "teacher.n_heads=2", "teacher.hidden_dim=64", "student.dim=32", "student.n_heads=2",
            "student.hidden_dim=64", "data.batch_size=4", "data.seq_len=32", "train.log_every=5", "optimizer.lr=0.01"]
    check_recipe(tmp_path, "distill.py", "distill.yaml", tiny)


@pytest.mark.parametrize("where,bad,expect", [
    ("override", "trian.steps=3", "unknown config key 'trian' in .*did you mean 'train'"),
    ("override", "train.stpes=3", "unknown config key 'train.stpes' in .*did you mean 'train.steps'"),
    ("override", "freeze.frozen_reshrd=never", "frozen_reshrd"),
    ("override", "train.steps=many", "config key 'train.steps' in .* must be int, got 'many'"),
    ("file", "optimizer:\n  lr: 0.001\n  lr_warmup: 10\n", "unknown config key 'optimizer.lr_warmup' in .*bad.yaml"),
    ("override", "train.loss_chunks=-1", r"train.loss_chunks must be an int >= 0 \(0: the unchunked loss\), got -1"),
])
def test_misspelled_config_key_fails_naming_it(tmp_path, where, bad, expect):
    """Each bad config raises before any process group exists, naming the key; the first one also as a
    user meets it: ``python recipes/lora_finetune.py``, a non-zero exit and the message on stderr."""
    import re

    if where == "file":
        cfg = tmp_path / "bad.yaml"
        cfg.write_text((ROOT / "recipes" / "configs" / "lora_tiny.yaml").read_text() + bad)
        argv = ["--config", str(cfg)]
    else:
        argv = ["--config", str(ROOT / "recipes" / "configs" / "lora_tiny.yaml"), bad]
    if bad == "trian.steps=3":
        out = subprocess.run([sys.executable, str(ROOT / "recipes" / "lora_finetune.py"), *argv], capture_output=True,
                             text=True, timeout=TIMEOUT, cwd=ROOT, env=checkout_env())
        assert out.returncode != 0 and re.search(expect, out.stderr), out.stderr[-3000:]
    if str(ROOT / "recipes") not in sys.path:
        sys.path.insert(0, str(ROOT / "recipes"))
    import torch.distributed as dist
    from lora_finetune import main

    with pytest.raises(ValueError, match=expect):
        main(argv)
    assert not dist.is_initialized()


HF_MISSING = importlib.util.find_spec("transformers") is None or importlib.util.find_spec("peft") is None


@pytest.mark.skipif(HF_MISSING, reason="needs the 'hf' extra: pip install -e '.[hf]' (transformers, peft)")
@pytest.mark.parametrize("config,extra", [
    ("hf_lora.yaml", []),
    # tensor parallel 2 (dp 1 x tp 2, docs/tp.md) in fp32, so the unsharded reload compares at 1e-6
    ("hf_lora_tp.yaml", ["freeze.frozen_dtype=null", "freeze.param_dtype=null", "freeze.reduce_dtype=null"]),
])
def test_hf_peft_lora_and_adapter_export(tmp_path, config, extra):
    sys.path.insert(0, str(ROOT / "recipes"))
    from hf_llama import build_hf_base, build_hf_lora
    from lora_finetune import ModelConfig
    from peft import PeftModel

    from fsdp_frozen.checkpoint import load_checkpoint

    tiny = ["model.dim=32", "model.n_heads=2", "model.hidden_dim=64", "data.batch_size=4", "data.seq_len=32"]
    out_dir = tmp_path / "hf"
    run_ok("lora_finetune.py", config, *tiny, *extra, "train.steps=10", "train.checkpoint_every=0",
           f"train.output_dir={out_dir}")
    assert losses(out_dir)[10] < losses(out_dir)[1]
    assert {p.name for p in (out_dir / "adapter").iterdir()} >= {"adapter_model.safetensors", "adapter_config.json"}

    cfg = ModelConfig(kind="hf", dim=32, n_layers=2, n_heads=2, hidden_dim=64)
    trained = build_hf_lora(cfg, 256)
    load_checkpoint(out_dir / "step_10", trained)  # the trained model, unsharded, in this process
    reloaded = PeftModel.from_pretrained(build_hf_base(cfg, 256), str(out_dir / "adapter"))
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = trained(input_ids=tokens).logits, reloaded(input_ids=tokens).logits
    assert not torch.equal(want, build_hf_lora(cfg, 256)(input_ids=tokens).logits), "adapter did not train"
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_benchmark_runs_and_reports_consistent_numbers(tmp_path):
    """The benchmark end to end on a tiny model: every variant measured, counts consistent with the
    policies, peak memory for every variant and close to torch's FSDPMemTracker on plain FSDP2."""
    out = run_ok("benchmark.py", "--dim", "256", "--layers", "2", "--steps", "1", "--warmup", "0",
                 "--save-repeats", "1", "--no-plot", "--frozen-dtypes", "bf16,nf4", "--variants", "after_forward,never",
                 "--out", str(tmp_path), runner=launch)
    assert "| plain FSDP2 |" in out.stdout and "Peak memory cross-check" in out.stdout, out.stdout[-3000:]
    data = json.loads((tmp_path / "benchmark.json").read_text())
    assert "Compute floor (" in out.stdout and data["meta"]["compute_floor_step_time_s"] > 0, out.stdout[-3000:]
    r = data["results"]
    per_unit = ["after_forward", "never", "after_forward (nf4 frozen)", "never (nf4 frozen)"]
    assert set(r) == {"plain", *per_unit, *(f"{v}, {g} trainable" for v in per_unit for g in ("root", "replicated")),
                      "never, no units, replicated trainable"}
    for name, v in r.items():
        assert v["total_persistent_bytes"] < v["peak_bytes"], name
        assert v["compute_floor_ratio"] > 0 and v["data_parallel_floor_ratio"] > 0, name
        # trainable collectives per step: one each way in one root group; replicated, one all-reduce; per unit,
        # one reduce-scatter per block
        root, replicated = name.endswith("root trainable"), name.endswith("replicated trainable")
        assert v["reduce_scatters"] == (1 if root else 0 if replicated else 2), name
        assert v["all_reduces"] == int(replicated), name
        if root or replicated:
            assert v["all_gathers"] - v["frozen_all_gathers"] == int(root), name
    assert data["meta"]["collectives_step_time_s"] > 0 and data["meta"]["all_reduce_step_time_s"] > 0
    assert "Collectives of the one trainable group alone" in out.stdout
    assert "Data-parallel floor (" in out.stdout and "Overlapped (one asynchronous all-reduce per block" in out.stdout
    assert data["meta"]["data_parallel_floor_step_time_s"] > 0 and data["meta"]["data_parallel_overlapped_step_time_s"] > 0
    # real data-parallel steps (different data per rank, averaged gradients): the replicas agree
    assert data["meta"]["data_parallel_replicas_agree"] == {"data-parallel floor": True,
                                                            "data-parallel floor, overlapped": True}
    assert "Collectives of the replicated trainable group alone" in out.stdout
    assert r["never"]["frozen_all_gather_bytes"] == 0 and r["after_forward"]["frozen_all_gather_bytes"] > 0
    assert r["never, root trainable"]["all_gathers"] == 1  # steady state: the adapters' one all-gather, nothing frozen
    assert r["after_forward (nf4 frozen)"]["frozen_persistent_bytes"] < r["after_forward"]["frozen_persistent_bytes"]
    cross = r["plain"]["fsdp_mem_tracker_peak_bytes"]
    assert cross and 0.5 < r["plain"]["peak_bytes"] / cross < 2, (r["plain"]["peak_bytes"], cross)
    ck = data["checkpoint"]
    assert ck["trainable_save_bytes"] < ck["full_save_bytes"] < ck["plain_full_save_bytes"]


def test_benchmark_checkpoint_only(tmp_path):
    """--checkpoint-only: the saves alone (no training steps), their JSON and table."""
    out = run_ok("benchmark.py", "--checkpoint-only", "--dim", "128", "--layers", "1", "--save-repeats", "1",
                 "--out", str(tmp_path), runner=in_ranks)
    assert "| save_checkpoint, frozen='auto' (reference) |" in out.stdout, out.stdout[-3000:]
    assert "| plain FSDP2 |" not in out.stdout and not (tmp_path / "benchmark.json").exists()
    ck = json.loads((tmp_path / "checkpoint.json").read_text())["checkpoint"]
    assert ck["trainable_save_bytes"] < ck["full_save_bytes"] < ck["plain_full_save_bytes"]
    assert ck["trainable_save_bytes"] > ck["trainable_and_optimizer_bytes"] > 0
    assert not (tmp_path / "ckpt").exists(), "the benchmark's checkpoints are removed"
