"""NF4 frozen storage (torchao NF4Tensor): parity with a dequantized model, bytes, refusals."""

from __future__ import annotations

import pytest
import torch

from fsdp_frozen import FreezePolicy, PolicyError, describe, shard_with_freezing
from fsdp_frozen.apply import sharded_state
from fsdp_frozen.checkpoint import CheckpointLayoutError, save_checkpoint

from .common import CommCounter, frozen_group_names, mesh_1d, train
from .dist_harness import run_ranks
from .models import make_model

BLOCKS = {"nf4_block_size": 16, "nf4_scaler_block_size": 4}  # the toy's 16x16 weights split over 4 ranks


def dequantized_model(fqns: frozenset[str], seed: int = 0):
    """The reference: the weights `fqns` replaced by torchao's quantize-dequantize of themselves."""
    from torchao.quantization import to_nf4

    model = make_model(seed)
    for fqn in fqns:
        w = model.get_parameter(fqn)
        w.data = to_nf4(w.detach(), BLOCKS["nf4_block_size"], BLOCKS["nf4_scaler_block_size"]).get_original_weight()
    return model


def _parity(rank: int, world: int, reshard: str) -> dict:
    policy = dict(units=("layers.*",), frozen_reshard=reshard)
    nf4 = shard_with_freezing(make_model(), mesh_1d(world), FreezePolicy(frozen_dtype="nf4", **BLOCKS, **policy))
    quantized = sharded_state(nf4).plan.quantized  # what NF4 can hold at this shard size
    assert len(quantized) >= 7, sorted(quantized)
    ref = shard_with_freezing(dequantized_model(quantized), mesh_1d(world), FreezePolicy(**policy))
    losses = {}
    for name, model in (("nf4", nf4), ("ref", ref)):
        losses[name] = train(model, 5, rank)
    trainable = [n for n, p in nf4.named_parameters() if p.requires_grad]
    got, want = full_trainable(nf4), full_trainable(ref)
    assert sorted(got) == sorted(trainable)
    assert all(torch.equal(got[n], want[n]) for n in got), [n for n in got if not torch.equal(got[n], want[n])]
    return {"losses": losses, "describe": describe(nf4).to_dicts()}


def full_trainable(model) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("world,reshard", [(1, "after_forward"), (2, "after_forward"), (2, "after_backward"),
                                            (2, "never"), (4, "after_backward")])
def test_nf4_equals_dequantized_model(world, reshard):
    """fp32 compute: losses and trainable parameters bitwise equal to the quantize-dequantize model."""
    out = run_ranks(_parity, world, reshard)[0]
    assert out["losses"]["nf4"] == out["losses"]["ref"]
    block = next(r for r in out["describe"] if r["unit"] == "layers.0" and r["kind"] == "frozen")
    assert block["storage_dtype"] == "nf4+float32"
    assert "not NF4, kept in float32: layers.0.norm.weight (not the weight of an nn.Linear)" in block["note"]


def _bytes_and_training(rank: int, world: int) -> dict:
    out = {}
    for name, dtype in (("nf4", "nf4"), ("bf16", "bfloat16")):
        model = shard_with_freezing(
            make_model(dim=64), mesh_1d(world),
            FreezePolicy(units=("layers.*",), frozen_dtype=dtype, param_dtype="bfloat16", nf4_block_size=64,
                         nf4_scaler_block_size=4),
        )
        train(model, 1, rank)
        counter = CommCounter()
        with counter:
            losses = train(model, 8, rank, lr=3e-3)
        records = describe(model)
        out[name] = {
            "losses": losses,
            "frozen_ag": counter.total("all_gather", frozen_group_names(model)) / 8,
            "frozen_bytes": sum(r.sharded_bytes for r in records if r.kind == "frozen"),
            "records": records.to_dicts(),
        }
    return out


def test_nf4_bytes_all_gather_and_training():
    out = run_ranks(_bytes_and_training, 2)[0]
    nf4, bf16 = out["nf4"], out["bf16"]
    assert nf4["frozen_ag"] < 0.5 * bf16["frozen_ag"], (nf4["frozen_ag"], bf16["frozen_ag"])
    assert nf4["frozen_bytes"] < 0.5 * bf16["frozen_bytes"], (nf4["frozen_bytes"], bf16["frozen_bytes"])
    block = next(r for r in nf4["records"] if r["unit"] == "layers.0" and r["kind"] == "frozen")
    # 3 NF4 weights of 64x64 per block, half on this rank: 4-bit data + int8 scalers + fp32 factors.
    nf4_weights = 3 * (64 * 64 // 2 // 2 + 64 * 64 // 64 // 2 + 4 * (64 * 64 // 64 // 4) // 2)
    dense = 2 * 64 * 2 // 2  # the LayerNorm weight and bias in bf16, half on this rank
    assert block["sharded_bytes"] == nf4_weights + dense, block
    # LoRA training on NF4 weights converges like the bf16 run.
    drop = lambda losses: losses[0] - losses[-1]  # noqa: E731
    assert drop(nf4["losses"]) > 0.5 * drop(bf16["losses"]) > 0, (nf4["losses"], bf16["losses"])


def _refusals(rank: int, world: int) -> dict:
    out = {}
    model = make_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(PolicyError) as e:
        shard_with_freezing(model, mesh_1d(world), FreezePolicy(units=("layers.*",), frozen_dtype="float8_e4m3fn"))
    out["float8"] = str(e.value)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters()), "model changed by a refusal"
    nf4 = shard_with_freezing(make_model(), mesh_1d(world), FreezePolicy(units=("layers.*",), frozen_dtype="nf4", **BLOCKS))
    with pytest.raises(CheckpointLayoutError) as e:
        save_checkpoint("/nonexistent/ck", nf4)
    out["checkpoint"] = str(e.value)
    return out


def test_nf4_refusals():
    with pytest.raises(PolicyError, match=r"frozen_dtype='nf4' does not work with frozen_reshard=2: torchao's NF4Tensor"):
        FreezePolicy(units=("layers.*",), frozen_dtype="nf4", frozen_reshard=2)
    with pytest.raises(PolicyError, match=r"FreezePolicy.nf4_block_size must be an int > 0, got 0"):
        FreezePolicy(units=("layers.*",), frozen_dtype="nf4", nf4_block_size=0)
    out = run_ranks(_refusals, 2)[0]
    assert "the gloo backend cannot all-gather float8" in out["float8"] and "use frozen_dtype='bfloat16' or 'nf4'" in out["float8"]
    assert "does not handle NF4-quantized parameters yet" in out["checkpoint"] and "layers.0" in out["checkpoint"]
