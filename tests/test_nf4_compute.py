"""Cheap NF4 compute (issue 25, 1; `fsdp_frozen.nf4_compute`): the fast dequantization is bitwise
torchao's, and the NF4 linear gives bitwise torchao's outputs and gradients with fewer dequantizations,
alone, under activation checkpointing, torch.compile, FSDP training and QDoRA."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fsdp_frozen import FreezePolicy, shard_with_freezing
from fsdp_frozen import _torchao_compat as ao
from fsdp_frozen.nf4_compute import get_nf4_compute, nf4_compute, set_nf4_compute

from .common import mesh_1d, train, whole
from .dist_harness import run_ranks
from .models import make_model

# (shape, block_size, scaler_block_size): torchao's defaults on a Llama-ish slice, the tests' toy
# blocks, an odd number of packed bytes per row, and rows that are not a multiple of the block
SHAPES = [((256, 512), 64, 256), ((64, 64), 16, 4), ((48, 64), 32, 2), ((12, 40), 16, 2), ((128, 96), 64, 3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fast_dequantize_is_bitwise_torchaos(dtype, monkeypatch):
    check_fast_dequantize(dtype, "cpu", monkeypatch)


def check_fast_dequantize(dtype: torch.dtype, device: str, monkeypatch) -> None:
    """`nf4_dequantize_fast` == ``get_original_weight()`` bit for bit: whole weights, FSDP's dim-0
    chunks (storage offsets inside the packed data, the whole weight's n_blocks), the 256-entry path
    (odd offsets) and the traceable one torch.compile takes; on `device` (the CUDA tier runs "cuda")."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device)

    for shape, block, scaler in SHAPES:
        w = (randn(shape) * 0.02).to(dtype)
        w[0, :block] = 0  # an all-zero block
        t = ao.to_nf4(w, block, scaler)
        parts = [t]
        for n in (2, 4):
            if (shape[0] * shape[1]) % (n * block * scaler) == 0 and shape[0] % n == 0:
                parts += list(torch.chunk(t, n))
        for p in parts:
            want, got = p.get_original_weight(), ao.nf4_dequantize_fast(p)
            assert (got.dtype, got.shape, got.is_contiguous()) == (dtype, want.shape, True)
            assert torch.equal(_bits(got), _bits(want)), (shape, block, scaler)
    # one packed byte per chunk (odd storage offsets) and per weight: the per-byte table (no int16 view)
    t = ao.to_nf4(randn(3, 2).to(dtype), 2, 1)
    for p in [*torch.chunk(t, 3), ao.to_nf4(randn(1, 2).to(dtype), 2, 1)]:
        assert torch.equal(_bits(ao.nf4_dequantize_fast(p)), _bits(p.get_original_weight()))
    assert torch.chunk(t, 3)[1].quantized_data.storage_offset() == 1
    # gathers in chunks of GATHER_CHUNK packed codes (index tensors of one chunk at a time): a chunk
    # boundary inside a block, a row and a pair of bytes, and a last chunk shorter than the others
    monkeypatch.setattr(ao, "GATHER_CHUNK", 37)
    for shape, block, scaler in SHAPES:
        t = ao.to_nf4((randn(shape) * 0.02).to(dtype), block, scaler)
        assert torch.equal(_bits(ao.nf4_dequantize_fast(t)), _bits(t.get_original_weight())), (shape, block)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    for shape, block, scaler in SHAPES[:3]:
        t = ao.to_nf4(randn(shape).to(dtype), block, scaler)
        assert torch.equal(_bits(ao.nf4_dequantize_fast(t)), _bits(t.get_original_weight()))


@pytest.mark.parametrize("traced_table", [False, True], ids=["quad", "pair"])
def test_fast_dequantize_holds_one_chunk_of_indices(traced_table, monkeypatch):
    """The dequantization's peak beyond the NF4 weight: its dense output, the block scalers and one
    `GATHER_CHUNK` of int32 indices (the loss dequantizes Llama-3.1-8B's 525M-element NF4 head at once:
    whole indices would add 1 GiB; torchao's ``get_original_weight`` holds two int64 index tensors of
    numel/2 each, 8 bytes per element, several times the bf16 output)."""
    from fsdp_frozen.diagnostics import PeakTensorMemory

    t = ao.to_nf4(torch.randn(512, 1024, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16), 64, 256)
    if traced_table:  # the per-byte table off the CPU's quad path (an odd storage offset takes it too)
        monkeypatch.setattr(sys, "byteorder", "big")
    monkeypatch.setattr(ao, "GATHER_CHUNK", 4096)
    ao.nf4_dequantize_fast(t)  # the lookup table is built once per weight and cached: in the baseline below
    table = ao._cached_table(t.nf4, "pair" if traced_table else "quad")
    out_bytes, scaler_bytes = t.numel() * 2, t.numel() // 64 * 2
    with PeakTensorMemory([t, table]) as m:
        before = m.current
        out = ao.nf4_dequantize_fast(t)
    assert out_bytes + 4096 * 4 <= m.peak - before <= out_bytes + 2 * scaler_bytes + 4096 * 4 + 4096, m.peak - before
    del out
    with PeakTensorMemory([t]) as m:
        before = m.current
        t.get_original_weight()
    assert m.peak - before >= 4 * out_bytes  # torchao's: the int64 codes alone are 8 bytes per element


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits (``torch.equal`` on floats takes -0.0 for 0.0)."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def test_fast_dequantize_table_follows_the_lookup_tensor():
    """The cached tables are per ``nf4`` tensor object and version: an in-place change of the table
    (a checkpoint load copies into it) is seen."""
    t = ao.to_nf4(torch.randn(64, 64), 16, 4)
    assert torch.equal(ao.nf4_dequantize_fast(t), t.get_original_weight())
    with torch.no_grad():
        t.nf4.mul_(2)
    assert torch.equal(ao.nf4_dequantize_fast(t), t.get_original_weight())


def _count_dequantizations(monkeypatch) -> dict:
    """Counts torchao's ``get_original_weight`` and the fast dequantization, both."""
    count = {"n": 0}
    fast = ao.nf4_dequantize_fast
    nf4_class = type(ao.to_nf4(torch.zeros(64), 16, 4))
    original = nf4_class.get_original_weight

    def counted_fast(t):
        count["n"] += 1
        return fast(t)

    def counted_torchao(self):
        count["n"] += 1
        return original(self)

    monkeypatch.setattr(ao, "nf4_dequantize_fast", counted_fast)
    monkeypatch.setattr(nf4_class, "get_original_weight", counted_torchao)
    return count


def _nf4_mlp(dtype: torch.dtype, device: str = "cpu") -> nn.Module:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 128, bias=True), nn.ReLU(), nn.Linear(128, 64, bias=False)).to(device, dtype)
    for layer in (mlp[0], mlp[2]):
        layer.weight = nn.Parameter(ao.to_nf4(layer.weight.detach(), 32, 4), requires_grad=False)
    return mlp


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_modes_are_bitwise_with_fewer_dequantizations(dtype, monkeypatch):
    check_linear_modes(dtype, "cpu", monkeypatch)


def check_linear_modes(dtype: torch.dtype, device: str, monkeypatch) -> None:
    """Outputs and input gradients bitwise equal in every mode, with and without activation
    checkpointing (non-reentrant, reentrant); dequantizations per linear and step: 2 without AC in
    every mode, 3 with AC in torchao's and "fast_dequant", 2 in "fast" (the backward reuses the
    recompute's). Without AC the "fast" linear saves the packed weight only (no dense copy between
    forward and backward); no graph: no Function at all. On `device` (the CUDA tier runs "cuda")."""
    count = _count_dequantizations(monkeypatch)
    mlp = _nf4_mlp(dtype, device)
    x0 = torch.randn(2, 8, 64, dtype=dtype).to(device)
    results = {}
    for mode in ("torchao", "fast_dequant", "fast"):
        for ac in ("none", "non_reentrant", "reentrant"):
            x = x0.clone().requires_grad_(True)
            count["n"] = 0
            with nf4_compute(mode):
                y = mlp(x) if ac == "none" else checkpoint(mlp, x, use_reentrant=ac == "reentrant")
                if mode == "fast" and ac == "none":
                    saved = y.grad_fn.saved_tensors  # the second linear's Function (no bias)
                    assert [type(s).__name__ for s in saved] == ["NF4Tensor"], saved
                y.float().square().sum().backward()
            results[(mode, ac)] = (y.detach(), x.grad, count["n"])
    want_y, want_grad, _ = results[("torchao", "none")]
    for (mode, ac), (y, grad, n) in results.items():
        assert torch.equal(y, want_y) and torch.equal(grad, want_grad), (mode, ac)
        assert n == 2 * (2 if ac == "none" or mode == "fast" else 3), (mode, ac, n)
    with torch.no_grad():
        assert torch.equal(mlp(x0), want_y)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_nf4_parameters_trace_on_every_torch(backend):
    """A compiled module whose NF4 weights dynamo sees as parameters (a ``frozen_reshard="never"`` unit,
    a model without FSDP) traces and gives torchao's eager outputs and input gradients, plain and
    checkpointed, fp32 and bf16. On torch 2.11 and 2.12 (``is_compiling()`` False in dynamo's fake-tensor
    propagation) the eager path read a fake table on the host and every such linear failed
    (``.numpy() is not supported for tensor subclasses``; the matrix's compiled NF4 ``never`` case on real
    2.12). `ao.nf4_traced`: False on the real weights (the eager fast path stays on), True on fake ones."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    for dtype in (torch.float32, torch.bfloat16):
        mlp = _nf4_mlp(dtype)
        x0 = torch.randn(2, 8, 64, dtype=dtype)
        assert not ao.nf4_traced(mlp[0].weight) and not ao.nf4_traced(torch.chunk(mlp[0].weight, 2)[1])
        with FakeTensorMode() as fake_mode:
            assert ao.nf4_traced(fake_mode.from_tensor(mlp[0].weight))
        for ac in (False, True):
            def run(x):
                return checkpoint(mlp, x, use_reentrant=False) if ac else mlp(x)

            outs = {}
            for name in ("torchao", "fast"):
                torch._dynamo.reset()
                x = x0.clone().requires_grad_(True)
                with nf4_compute(name):
                    y = run(x) if name == "torchao" else torch.compile(run, backend=backend, fullgraph=False)(x)
                    y.float().square().sum().backward()
                outs[name] = (y.detach(), x.grad)
            assert torch.equal(outs["fast"][0], outs["torchao"][0]), (dtype, ac)
            assert torch.equal(outs["fast"][1], outs["torchao"][1]), (dtype, ac)
    torch._dynamo.reset()


def test_handler_scope_and_nf4_to(monkeypatch):
    """The fast linear takes ``F.linear(x, w[, bias])`` of a contiguous 2-D NF4 weight (the bias positional
    or by keyword); anything else goes to torchao's handler as before; `nf4_to` is ``w.to(dtype)``."""
    from fsdp_frozen.nf4_compute import nf4_to

    count = _count_dequantizations(monkeypatch)
    w = ao.to_nf4(torch.randn(32, 64), 16, 4)
    x, b = torch.randn(3, 64), torch.randn(32)
    with nf4_compute("torchao"):
        want = F.linear(x, w, b)
    assert torch.equal(F.linear(x, w, b), want) and torch.equal(F.linear(x, w, bias=b), want)
    count["n"] = 0
    with pytest.raises(RuntimeError):  # a transposed NF4 weight: torchao's LinearNF4, which fails on it
        F.linear(torch.randn(3, 32), w.t())
    assert count["n"] == 1
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(_bits(nf4_to(w, dtype)), _bits(w.to(dtype)))


def test_modes():
    assert get_nf4_compute() == "fast"
    with nf4_compute("torchao"):
        assert get_nf4_compute() == "torchao"
    assert set_nf4_compute("fast") == "fast"
    with pytest.raises(ValueError, match="expected one of"):
        set_nf4_compute("bogus")


# ------------------------------------------------------------------------------ training, under FSDP
def _wrap(model: nn.Module, wrapper: str) -> nn.Module:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for i in range(len(model.layers)):
        if wrapper == "checkpoint_wrapper":
            model.layers[i] = checkpoint_wrapper(model.layers[i])
        elif wrapper == "compile":
            model.layers[i].compile(backend="eager")
    return model


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: whole(p).detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _counting() -> dict:
    """In a rank: count torchao's and the fast dequantizations (process-wide patch, undone by `_uncount`)."""
    count = {"torchao": 0, "fast": 0}
    nf4_class = type(ao.to_nf4(torch.zeros(64), 16, 4))
    fast, original = ao.nf4_dequantize_fast, nf4_class.get_original_weight

    def counted_fast(t):
        count["fast"] += 1
        return fast(t)

    def counted_torchao(self):
        count["torchao"] += 1
        return original(self)

    ao.nf4_dequantize_fast, nf4_class.get_original_weight = counted_fast, counted_torchao
    count["undo"] = lambda: (setattr(ao, "nf4_dequantize_fast", fast),
                             setattr(nf4_class, "get_original_weight", original))
    return count


def _training(rank: int, world: int, variants: list[tuple[str, str, str | None]]) -> dict:
    """Per (wrapper, frozen_reshard, param_dtype): losses, trainable parameters after 2 steps of the toy
    with NF4 storage, and the dequantizations they ran, torchao's linear against "fast"."""
    torch._dynamo.reset()
    out = {}
    count = _counting()
    try:
        for wrapper, reshard, param_dtype in variants:
            runs = {}
            for mode in ("torchao", "fast"):
                policy = FreezePolicy(units=("layers.*",), frozen_dtype="nf4", nf4_block_size=16,
                                      nf4_scaler_block_size=4, frozen_reshard=reshard, param_dtype=param_dtype)
                model = shard_with_freezing(_wrap(make_model(), wrapper), mesh_1d(world), policy)
                count.update(torchao=0, fast=0)
                with nf4_compute(mode):
                    losses = train(model, 2, rank)
                runs[mode] = {"losses": losses, "params": _trainable(model),
                              "dequantized": (count["torchao"], count["fast"])}
            out[(wrapper, reshard, param_dtype)] = runs
    finally:
        count["undo"]()
    return out


def test_fsdp_training_is_bitwise_torchaos():
    """NF4 storage on 2 ranks: 2 AdamW steps give bitwise the same losses and trainable parameters with
    the fast linear as with torchao's, fp32 and bf16 compute, plain, under checkpoint_wrapper and with
    compiled blocks; dequantizations: as many as torchao's, two thirds of them under checkpoint_wrapper
    (the backward reuses the recompute's)."""
    variants = [("none", "after_forward", None), ("checkpoint_wrapper", "after_forward", "bfloat16"),
                ("checkpoint_wrapper", "never", None), ("compile", "after_backward", "bfloat16")]
    out = run_ranks(_training, 2, variants)[0]
    for variant, runs in out.items():
        assert runs["fast"]["losses"] == runs["torchao"]["losses"], variant
        got, want = runs["fast"]["params"], runs["torchao"]["params"]
        assert sorted(got) == sorted(want) and all(torch.equal(got[n], want[n]) for n in got), variant
        # NF4 linears: 3 per block x 3 blocks, and the head; per step a forward of each (10) and a backward
        # of each (10); under checkpoint_wrapper the blocks' forward is recomputed (9 more), in torchao's
        # linear dequantizing again, in the fast one serving the backward too (9 fewer)
        # (compiled blocks: torchao's count also has the compile-time tracing's, on fake tensors)
        ac, compiled = variant[0] == "checkpoint_wrapper", variant[0] == "compile"
        torchao = runs["torchao"]["dequantized"]
        want = (torchao[0] >= 40) if compiled else torchao[0] == (58 if ac else 40)
        assert torchao[1] == 0 and want, (variant, torchao)
        assert runs["fast"]["dequantized"] == (0, 40), (variant, runs["fast"]["dequantized"])


def _qdora(rank: int, world: int) -> dict:
    from peft import get_peft_model

    from .matrix import NF4_BLOCKS, _hf_class, _peft_config, hf_config
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    out = {}
    for mode in ("torchao", "fast"):
        torch.manual_seed(0)
        base = _hf_class("qwen2_dora")(hf_config("qwen2_dora"))
        torch.manual_seed(1)
        model = get_peft_model(base, _peft_config("qwen2_dora"))
        layers = model.base_model.model.model.layers
        for i in range(len(layers)):
            layers[i] = checkpoint_wrapper(layers[i])
        model = shard_with_freezing(model, mesh_1d(world), FreezePolicy(
            units=("base_model.model.model.layers.*",), frozen_dtype="nf4", param_dtype="bfloat16",
            reduce_dtype="float32", **NF4_BLOCKS))
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        with nf4_compute(mode):
            for step in range(2):
                ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(10 * step + rank))
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad()
                losses.append(loss.item())
        out[mode] = {"losses": losses, "params": _trainable(model)}
    return out


def test_qdora_is_bitwise_torchaos():
    """QDoRA (PEFT DoRA on Qwen2, NF4 storage, bf16, checkpoint_wrapper): PEFT's base linear runs the
    fast linear, its ``dequantize()`` torchao's; losses and adapters bitwise as with torchao's linear."""
    out = run_ranks(_qdora, 2)[0]
    assert out["fast"]["losses"] == out["torchao"]["losses"]
    got, want = out["fast"]["params"], out["torchao"]["params"]
    assert any("lora_magnitude_vector" in n for n in got)
    assert all(torch.equal(got[n], want[n]) for n in got)
