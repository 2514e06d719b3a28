"""`estimate`: per-rank bytes and per-step collective bytes equal what real gloo ranks hold and move."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.checkpoint import FileSystemReader

from fsdp_frozen import FreezePolicy, PolicyError, describe, shard_with_freezing
from fsdp_frozen import _torch_compat as compat
from fsdp_frozen._torch_compat import local_tensor
from fsdp_frozen.apply import sharded_state
from fsdp_frozen.checkpoint import save_checkpoint
from fsdp_frozen.diagnostics import shared_frozen_all_gathers
from fsdp_frozen.estimate import activation_bytes, estimate, fake_process_group, loss_bytes, measure

from .common import CommCounter, frozen_group_names, mesh_1d, run_cli
from .dist_harness import run_ranks
from .models import batch, make_model

HF_MISSING = any(importlib.util.find_spec(m) is None for m in ("transformers", "peft"))
POLICIES = {
    "after_forward": dict(frozen_dtype="bfloat16", param_dtype="bfloat16", reduce_dtype="float32"),
    "after_backward": dict(frozen_reshard="after_backward", frozen_dtype="bfloat16", param_dtype="bfloat16"),
    "never": dict(frozen_reshard="never"),
    "nf4": dict(frozen_dtype="nf4", param_dtype="bfloat16", nf4_block_size=32, nf4_scaler_block_size=4),
    "root": dict(frozen_reshard="never", trainable_grouping="root", param_dtype="bfloat16"),
    # [Note: merged frozen groups]: the blocks' and the root's frozen groups in their trainable groups
    "coalesced": dict(frozen_dtype="bfloat16", param_dtype="bfloat16", trainable_grouping="per_unit",
                      coalesce_frozen=True),
}


def _policy(name: str) -> FreezePolicy:
    return FreezePolicy(units=["layers.*"], **POLICIES[name])


def _meta_model():
    with torch.device("meta"):
        return make_model()


def _storage(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (FSDP's gradients can be views of one buffer)."""
    from fsdp_frozen.storage import NF4_PACKED, is_nf4

    seen = {}
    for t in tensors:
        local = local_tensor(t)
        for inner in ([getattr(local, n) for n in NF4_PACKED] if is_nf4(local) else [local]):
            storage = inner.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _real(rank: int, world: int, tmp: str) -> dict:
    out = {}
    for name in POLICIES:
        model = shard_with_freezing(make_model(), mesh_1d(world), _policy(name))
        frozen_pgs = frozen_group_names(model)
        # frozen bytes gathered in their unit's trainable group's all-gathers ([Note: merged frozen groups]):
        # what each merged parameter puts in the gathered buffer (padded rows x ranks, param_dtype)
        state = sharded_state(model)
        dtype = state.policy.torch_param_dtype
        merged_ag = sum(math.prod(compat.padded_shard_size(state.fsdp_params[f])) * world
                        * (dtype or state.fsdp_params[f].orig_dtype).itemsize * g.all_gathers_per_step
                        for g in state.plan.groups if g.merged for f in g.params) if world > 1 else 0
        shared_calls, shared_bytes = shared_frozen_all_gathers(model)
        if state.plan.split:  # the benchmarks' helper says the same; the fallback's frozen groups: test_comm
            assert (shared_calls, shared_bytes) == (0, merged_ag)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        counter = CommCounter()
        steps = []
        with counter:
            for step in range(3):
                counter.clear()
                x, y = batch(step, rank)
                logits = model(x)
                gathered = _storage(compat.unsharded_param_if_any(fp) for _, g, fp in compat.iter_all_fsdp_params(model)
                                    if compat.sharded_param(fp).requires_grad and g.is_unsharded)
                F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1)).backward()
                grads = _storage(p.grad for p in model.parameters() if p.grad is not None)
                opt.step()
                opt.zero_grad(set_to_none=True)
                frozen_ag = counter.total("all_gather", frozen_pgs) + shared_bytes
                steps.append({"frozen_ag": frozen_ag, "trainable_ag": counter.total("all_gather") - frozen_ag,
                              "rs": counter.total("reduce_scatter"), "grads": grads, "gathered_after_forward": gathered})
        path = save_checkpoint(os.path.join(tmp, f"{name}-{world}"), model, opt, frozen="include")
        md = FileSystemReader(path).read_metadata().state_dict_metadata
        saved = {k: v.size.numel() * v.properties.dtype.itemsize for k, v in md.items() if hasattr(v, "size")}
        out[name] = {
            "frozen": _storage(p for p in model.parameters() if not p.requires_grad),
            "trainable": _storage(p for p in model.parameters() if p.requires_grad),
            "optimizer": _storage(t for s in opt.state.values() for t in s.values()),
            "steady": steps[-1],
            "checkpoint_full": sum(v for k, v in saved.items() if not k.startswith("extra/")),
            "checkpoint_trainable": sum(v for k, v in saved.items() if k.split("/")[0] in ("trainable", "optimizer")),
            "measured_here": measure(model).to_dict(),  # the same function on real gloo ranks
            # the process groups the frozen FSDP groups really communicate on, beyond the mesh's own
            "frozen_pgs": len({id(pg) for group, _ in sharded_state(model).frozen_settings
                               for info in compat.group_mesh_infos(group) for pg in compat.mesh_info_groups(info)
                               if all(pg is not m for m in compat.mesh_groups(mesh_1d(world)))}),
        }
    return out


@pytest.mark.parametrize("world", [1, 2, 4])
def test_estimate_equals_real_ranks(tmp_path, world):
    real = run_ranks(_real, world, str(tmp_path))
    failures = []
    for name in POLICIES:
        est = estimate(_meta_model, world, _policy(name))
        for rank, r in enumerate(real):
            r = r[name]
            checks = {
                "frozen shard bytes": (est.frozen_shard_bytes, r["frozen"]),
                "trainable shard bytes": (est.trainable_shard_bytes, r["trainable"]),
                "gradient bytes": (est.gradient_bytes, r["steady"]["grads"]),
                "AdamW state bytes": (est.optimizer_bytes, r["optimizer"]),
                "frozen all-gather bytes/step": (est.all_gather_bytes_per_step["frozen"], r["steady"]["frozen_ag"]),
                "trainable all-gather bytes/step": (est.all_gather_bytes_per_step["trainable"],
                                                    r["steady"]["trainable_ag"]),
                "reduce-scatter bytes/step": (est.reduce_scatter_bytes_per_step if world > 1 else 0, r["steady"]["rs"]),
            }
            # trainable groups still gathered after forward: the root's (every one under "root"), at one
            # rank too (FSDP2 copies each parameter into its unsharded buffer there)
            checks["trainable gathered all step"] = (est.trainable_step_gathered_bytes,
                                                     r["steady"]["gathered_after_forward"])
            if name != "nf4":  # DCP metadata holds NF4 weights by their logical shape, not their packed bytes
                checks["checkpoint bytes (full)"] = (est.checkpoint_full_bytes, r["checkpoint_full"])
            checks["checkpoint bytes (trainable + AdamW)"] = (est.checkpoint_trainable_bytes, r["checkpoint_trainable"])
            checks["frozen process groups"] = (est.frozen_process_groups, r["frozen_pgs"])
            failures += [f"{name} world {world} rank {rank}: {what}: estimate {a}, measured {b}"
                         for what, (a, b) in checks.items() if a != b]
            if est.to_dict() != r["measured_here"] and rank == 0:
                failures.append(f"{name}: measure() on a fake group differs from the gloo ranks'")
    if world > 1:  # the figures are not trivially zero
        est = estimate(_meta_model, world, _policy("after_forward"))
        assert est.all_gather_bytes_per_step["frozen"] > 0 and est.reduce_scatter_bytes_per_step > 0
    assert not failures, "\n".join(failures)


def test_estimate_refusals():
    with pytest.raises(PolicyError, match="world=6 must be a positive multiple of replicate=4"):
        estimate(_meta_model, 6, _policy("never"), replicate=4)
    with pytest.raises(PolicyError, match="must return a model on the meta device"):
        estimate(make_model, 2, _policy("never"))


@pytest.mark.skipif(HF_MISSING, reason="needs the 'hf' extra")
def test_estimate_cli_on_a_hugging_face_config(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2).save_pretrained(str(tmp_path))
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}))
    cmd = ["estimate", "--model", str(tmp_path), "--world", "4",
           "--peft", str(tmp_path / "adapter_config.json"), "--batch", "2", "--seq", "128", "--json"]
    out = run_cli(cmd)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout)["estimates"]
    assert {(r["frozen_reshard"], r["frozen_dtype"]) for r in rows} == {
        (p, d) for p in ("after_forward", "after_backward", "never") for d in ("bfloat16", "nf4")}
    by = {(r["frozen_reshard"], r["frozen_dtype"]): r for r in rows}
    assert by[("never", "bfloat16")]["all_gather_bytes_per_step"]["frozen"] == 0
    assert by[("after_forward", "nf4")]["frozen_shard_bytes"] < by[("after_forward", "bfloat16")]["frozen_shard_bytes"]
    never, sharded = by[("never", "bfloat16")], by[("after_forward", "bfloat16")]
    # kept gathered beside the shards (in FSDP), or whole outside FSDP (trainable_grouping="replicate"): more per rank
    assert never["kept_gathered_bytes"] + never["frozen_shard_bytes"] > 2 * sharded["frozen_shard_bytes"]
    if never["trainable_grouping"] == "replicate" and compat.split_groups_supported():  # the fallback: in FSDP
        assert never["kept_gathered_bytes"] == 0 and never["frozen_shard_bytes"] == 4 * sharded["frozen_shard_bytes"]
    acts = by[("never", "bfloat16")]["activations"]
    assert 0 < acts["checkpointing_bytes"] < acts["no_checkpointing_bytes"] and "Korthikanti" in acts["method"]
    table = run_cli(cmd[:-1])
    assert table.returncode == 0 and "| after_forward | nf4 |" in table.stdout, table.stdout[-2000:]
    recipe = run_cli(["estimate", "--model", os.path.join(os.path.dirname(__file__), "..", "recipes", "configs",
                                                         "lora_tiny.yaml"), "--world", "2", "--json"])
    assert recipe.returncode == 0, recipe.stderr[-3000:]
    rows = json.loads(recipe.stdout)["estimates"]
    assert len(rows) == 6 and all(r["frozen_shard_bytes"] > 0 and r["trainable_shard_bytes"] > 0 for r in rows)
    bad = run_cli([*cmd[:2], str(tmp_path / "nope"), "--world", "2"])
    assert bad.returncode == 2 and "no Hugging Face config at" in bad.stderr, bad.stderr[-2000:]


def test_activations_model_the_recipes_chunked_loss():
    """The activation estimate models the recipes' loss (recipes/loss.py, measured against these terms in
    tests/test_chunked_loss.py) and says so: Llama-3.1-8B's shape at batch 2 x 2048, bf16."""
    from types import SimpleNamespace

    config = SimpleNamespace(hidden_size=4096, num_hidden_layers=32, vocab_size=128256)
    n, h, v, e = 2 * 2048, 4096, 128256, 2
    acts = activation_bytes(config, 2, 2048)
    assert acts["loss_chunks"] == 8
    assert "chunked cross-entropy (recipes/loss.py), 8 chunks of 512 tokens" in acts["method"]
    assert acts["loss_terms"] == {"head_input": n * h * e, "saved_hidden_grad": n * h * e, "chunk": 512 * v * (e + 4)}
    layer, inputs = 34 * n * h, 32 * n * h * e
    # the loss peaks at the end of the forward, a recomputed block during backward: the larger of the two
    assert acts["checkpointing_bytes"] == inputs + max(layer, sum(acts["loss_terms"].values())) == inputs + layer
    assert acts["no_checkpointing_bytes"] == 32 * layer + sum(acts["loss_terms"].values())
    assert acts["nf4_head_extra_bytes"] == v * h * e and "adds its dequantized copy" in acts["method"]
    nf4 = activation_bytes(config, 2, 2048, nf4_head=True)  # QLoRA: the head dequantized once for the loss
    assert nf4["loss_terms"]["nf4_head_dequantized"] == v * h * e and nf4["nf4_head_extra_bytes"] == 0
    assert nf4["checkpointing_bytes"] == inputs + sum(nf4["loss_terms"].values())
    # QLoRA under checkpointing: a recomputed block's NF4 weights dequantized for its backward come with it
    dense = activation_bytes(config, 2, 2048, nf4_head=True, nf4_dense=layer)
    assert dense["checkpointing_bytes"] == inputs + max(2 * layer, sum(nf4["loss_terms"].values()))
    assert "NF4 weights dequantized for its backward" in dense["method"]
    # offloaded inputs (recipes/offload.py): none kept on the device, one back with the recomputed block
    off = activation_bytes(config, 2, 2048, offload=True)
    assert off["checkpointing_bytes"] == max(layer + n * h * e, sum(acts["loss_terms"].values()))
    assert off["no_checkpointing_bytes"] == acts["no_checkpointing_bytes"] and "offloaded" in off["method"]
    unchunked = activation_bytes(config, 2, 2048, loss_chunks=0)
    assert unchunked["loss_terms"] == {"head_input": n * h * e, "logits_fp32_x3": 12 * n * v}
    assert "unchunked" in unchunked["method"]
    assert loss_bytes(n, h, v, 4, chunks=8)["chunk"] == 512 * v * 4 + 32 * v * 4  # fp32: the block + one step's rows
    with pytest.raises(ValueError, match="chunks must be >= 0"):
        loss_bytes(n, h, v, chunks=-1)


def test_after_backward_peak_holds_every_frozen_group_at_the_turn():
    """`frozen_reshard="after_backward"` keeps each unit's frozen weights gathered from its forward to its
    backward: at the turn every one is gathered, as under "never" (whose are kept for good): the same
    peak, where "after_forward" holds at most the root and two others."""
    def build():
        with torch.device("meta"):
            return make_model(dim=64, n_layers=6)

    peaks = {r: estimate(build, 4, FreezePolicy(units=["layers.*"], frozen_reshard=r)).peak_bytes
             for r in ("after_forward", "after_backward", "never")}
    assert peaks["after_backward"] == peaks["never"] > peaks["after_forward"], peaks


def test_nf4_dense_bytes_are_the_largest_blocks_weights_in_the_compute_dtype():
    """`Estimate.nf4_dense_bytes` and describe()'s note: one block's NF4 weights dequantized to bf16
    ([Note: NF4 dequantization reuse]), counted from the plan's quantized set, not the estimate's code."""
    from fsdp_frozen.plan import build_plan

    policy = _policy("nf4")
    plan = build_plan(make_model(), policy, shard_size=2)
    params = dict(make_model().named_parameters())
    per_unit = {}
    for g in plan.groups:
        per_unit[g.unit] = per_unit.get(g.unit, 0) + sum(params[f].numel() * 2 for f in g.params if f in plan.quantized)
    want = max(v for u, v in per_unit.items() if u != "")
    assert want > 0
    assert estimate(_meta_model, 2, policy).nf4_dense_bytes == want
    assert estimate(_meta_model, 2, _policy("after_forward")).nf4_dense_bytes == 0
    from fsdp_frozen.nf4_compute import nf4_compute

    with nf4_compute("fast_dequant"):  # no reuse: one weight dequantized at a time
        one = estimate(_meta_model, 2, policy).nf4_dense_bytes
    assert one == max(params[f].numel() * 2 for f in plan.quantized if not f.startswith("head")) < want
    with fake_process_group(2):
        with torch.device("meta"):
            model = make_model()
        notes = {r.unit: r.note for r in describe(shard_with_freezing(model, mesh_1d(2), policy)) if r.kind == "frozen"}
    assert f"NF4 dequantized to the compute dtype in each linear: {per_unit['layers.0']:,} bytes" in notes["layers.0"]
