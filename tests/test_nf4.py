"""NF4 frozen storage (torchao NF4Tensor): parity with a dequantized model, bytes, refusals."""

from __future__ import annotations

import pytest
import torch

from fsdp_frozen import FreezePolicy, PolicyError, describe, shard_with_freezing
from fsdp_frozen.apply import sharded_state
from fsdp_frozen.checkpoint import CheckpointLayoutError, save_checkpoint

from .common import CommCounter, adamw, checkout_env, frozen_group_names, mesh_1d, structural_fallback, train
from .dist_harness import run_ranks
from .models import make_model

BLOCKS = {"nf4_block_size": 16, "nf4_scaler_block_size": 4}  # the toy's 16x16 weights split over 4 ranks


def dequantized_model(fqns: frozenset[str], seed: int = 0, **kwargs):
    """The reference: the weights `fqns` replaced by torchao's quantize-dequantize of themselves."""
    from torchao.quantization import to_nf4

    model = make_model(seed, **kwargs)
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


@pytest.mark.split_layout
def test_nf4_bytes_all_gather_and_training():
    out = run_ranks(_bytes_and_training, 2)[0]
    nf4, bf16 = out["nf4"], out["bf16"]
    assert nf4["frozen_ag"] < 0.5 * bf16["frozen_ag"], (nf4["frozen_ag"], bf16["frozen_ag"])
    assert nf4["frozen_bytes"] < 0.5 * bf16["frozen_bytes"], (nf4["frozen_bytes"], bf16["frozen_bytes"])
    block = next(r for r in nf4["records"] if r["unit"] == "layers.0" and r["kind"] == "frozen")
    # 3 NF4 weights of 64x64 per block, half on this rank: 4-bit data + int8 scalers + factors in the
    # compute dtype, bf16 ([Note: NF4 in the compute dtype]).
    nf4_weights = 3 * (64 * 64 // 2 // 2 + 64 * 64 // 64 // 2 + 2 * (64 * 64 // 64 // 4) // 2)
    dense = 2 * 64 * 2 // 2  # the LayerNorm weight and bias in bf16, half on this rank
    assert block["sharded_bytes"] == nf4_weights + dense, block
    # LoRA training on NF4 weights converges like the bf16 run.
    drop = lambda losses: losses[0] - losses[-1]  # noqa: E731
    assert drop(nf4["losses"]) > 0.5 * drop(bf16["losses"]) > 0, (nf4["losses"], bf16["losses"])


def _refusals(rank: int, world: int) -> dict:
    model = make_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(PolicyError) as e:
        shard_with_freezing(model, mesh_1d(world), FreezePolicy(units=("layers.*",), frozen_dtype="float8_e4m3fn"))
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters()), "model changed by a refusal"
    return {"float8": str(e.value)}


def test_nf4_refusals():
    with pytest.raises(PolicyError, match=r"frozen_dtype='nf4' does not work with frozen_reshard=2: torchao's NF4Tensor"):
        FreezePolicy(units=("layers.*",), frozen_dtype="nf4", frozen_reshard=2)
    with pytest.raises(PolicyError, match=r"FreezePolicy.nf4_block_size must be an int > 0, got 0"):
        FreezePolicy(units=("layers.*",), frozen_dtype="nf4", nf4_block_size=0)
    out = run_ranks(_refusals, 2)[0]
    assert "the gloo backend cannot all-gather float8" in out["float8"] and "use frozen_dtype='bfloat16' or 'nf4'" in out["float8"]


def _nf4_checkpoint(rank: int, world: int, tmp: str, src_world: int | None) -> dict:
    import os

    from fsdp_frozen.checkpoint import load_checkpoint

    policy = FreezePolicy(units=("layers.*",), frozen_dtype="nf4", **BLOCKS)
    path = os.path.join(tmp, "nf4")
    if src_world is None:  # write: train, save, return what a load must reproduce
        model = shard_with_freezing(make_model(frozen_block=False), mesh_1d(world), policy)
        opt = adamw(model)
        train(model, 2, rank, opt=opt)
        save_checkpoint(path, model, opt)
        saved = full_trainable(model)
        return {"trainable": saved, "losses": train(model, 2, rank, opt=opt, start=2)}
    # Frozen weights do not train: what the load must give is seed-0 weights sharded into NF4 here.
    want = shard_with_freezing(make_model(frozen_block=False), mesh_1d(world), policy)
    quantized = sharded_state(want).plan.quantized
    model = shard_with_freezing(make_model(1, frozen_block=False), mesh_1d(world), policy)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    load_checkpoint(path, model, opt)  # NF4 saved at another shard count: resharded, bitwise
    out = {"frozen_differs": _differs(model, want, frozen_only=True), "trainable": full_trainable(model),
           "quantized": sorted(quantized)}
    if world == src_world:
        out["losses"] = train(model, 2, rank, opt=opt, start=2)
    # Quantized storage that differs from the model's: refused before any read, naming the parameter;
    # with cast=True converted from the dequantized weights (the reference: a model built from them).
    bf16 = FreezePolicy(units=("layers.*",), frozen_dtype="bfloat16", param_dtype="bfloat16")
    blocks = FreezePolicy(units=("layers.*",), frozen_dtype="nf4", nf4_block_size=32, nf4_scaler_block_size=2)
    for name, other in (("bf16", bf16), ("blocks", blocks)):
        target = shard_with_freezing(make_model(1, frozen_block=False), mesh_1d(world), other)
        with pytest.raises(CheckpointLayoutError) as e:
            load_checkpoint(path, target)
        out[name] = str(e.value)
        load_checkpoint(path, target, cast=True)
        reference = shard_with_freezing(dequantized_model(quantized, frozen_block=False), mesh_1d(world), other)
        out[name + "_differs"] = _differs(target, reference, frozen_only=True)
    return out


def _differs(model, reference, frozen_only: bool = False) -> list[str]:
    got, ref = _packed(model), _packed(reference)
    frozen = {n for n, p in reference.named_parameters() if not p.requires_grad}
    return [n for n in ref if (n in frozen or not frozen_only)
            and (len(got[n]) != len(ref[n]) or not all(map(torch.equal, got[n], ref[n])))]


@pytest.mark.parametrize("load_world", [2, 1, 4])
def test_nf4_checkpoint_is_packed_resharded_and_converted(tmp_path, load_world):
    import json

    want = run_ranks(_nf4_checkpoint, 2, str(tmp_path), None)[0]
    manifest = json.loads((tmp_path / "nf4" / "fsdp_frozen.json").read_text())
    entry = manifest["params"]["layers.0.attn.base_layer.weight"]
    assert entry["quantization"] == {"format": "nf4", "block_size": 16, "scaler_block_size": 4}
    assert manifest["params"]["layers.0.norm.weight"]["quantization"] is None
    # Packed: what DCP stored for an NF4 weight is the NF4Tensor shard itself (uint8 data), no dense copy.
    import io

    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(str(tmp_path / "nf4")).read_metadata()
    (index, info), *_ = [(i, v) for i, v in md.storage_data.items() if i.fqn == "frozen/layers.0.attn.base_layer.weight"]
    with open(tmp_path / "nf4" / info.relative_path, "rb") as f:
        f.seek(info.offset)
        stored = torch.load(io.BytesIO(f.read(info.length)), weights_only=False)
    assert type(stored).__name__ == "NF4Tensor" and stored.quantized_data.dtype == torch.uint8
    assert stored.quantized_data.numel() == 16 * 16 // 2 // 2  # 4 bits per element, half the rows
    outs = run_ranks(_nf4_checkpoint, load_world, str(tmp_path), 2)
    got = outs[0]
    assert "layers.0.attn.base_layer.weight" in got["quantized"]
    for o in outs:  # every rank holds exactly its part
        assert o["frozen_differs"] == [] and o["bf16_differs"] == [] and o["blocks_differs"] == [], o
    assert all(torch.equal(got["trainable"][n], v) for n, v in want["trainable"].items())
    if load_world == 2:
        assert got["losses"] == want["losses"], "training resumed from the NF4 checkpoint differs"
    assert "'frozen/layers.0.attn.base_layer.weight': stored as nf4(block_size=16, scaler_block_size=4) in the " \
           "checkpoint, plain bfloat16 in the model (load_checkpoint(..., cast=True) converts it on load)" \
           in got["bf16"], got["bf16"]
    assert "nf4(block_size=32, scaler_block_size=2) in the model" in got["blocks"]


# --------------------------------------------------------------------------------------- quantize on load
NF4_POLICY = dict(units=("layers.*",), frozen_dtype="nf4", **BLOCKS)


def _write_plain_bases(rank: int, world: int, tmp: str) -> None:
    """A pretrained base (plain dcp.save of an unsplit FSDP2 model) and an fsdp_frozen checkpoint of
    fp32 frozen storage, both of seed-0 weights."""
    import os

    import torch.distributed.checkpoint as dcp

    from .common import plain_fsdp

    base = plain_fsdp(make_model(frozen_block=False), mesh_1d(world), ("layers.*",))
    dcp.save(base.state_dict(), checkpoint_id=os.path.join(tmp, "plain"))
    fp32 = shard_with_freezing(make_model(frozen_block=False), mesh_1d(world), FreezePolicy(units=("layers.*",)))
    save_checkpoint(os.path.join(tmp, "fp32"), fp32)


def _packed(model) -> dict[str, list[torch.Tensor]]:
    """Each parameter's local storage: an NF4 shard's packed tensors, or the plain shard."""
    out = {}
    for name, p in model.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        names = ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean")
        out[name] = [getattr(local, n) for n in names] if type(local).__name__ == "NF4Tensor" else [local.detach()]
    return out


def _quantize_on_load(rank: int, world: int, tmp: str) -> dict:
    import os

    import torch.distributed as dist

    from fsdp_frozen.checkpoint import load_checkpoint

    # What sharding seed-0 weights straight into NF4 holds: the reference, bitwise.
    want = shard_with_freezing(make_model(frozen_block=False), mesh_1d(world), FreezePolicy(**NF4_POLICY))
    out: dict = {"nf4": sorted(sharded_state(want).plan.quantized)}

    def fresh():  # other weights, same NF4 layout
        return shard_with_freezing(make_model(7, frozen_block=False), mesh_1d(world), FreezePolicy(**NF4_POLICY))

    # A plain base (no manifest) is quantized on load, read at any world size.
    model = fresh()
    load_checkpoint(os.path.join(tmp, "plain"), model)
    out["plain_differs"] = _differs(model, want)
    out["losses"] = [train(m, 2, rank) for m in (model, want)]
    want = shard_with_freezing(make_model(frozen_block=False), mesh_1d(world), FreezePolicy(**NF4_POLICY))

    # An fsdp_frozen checkpoint with plain frozen storage: only when asked (cast=True).
    model = fresh()
    before = _packed(model)
    with pytest.raises(CheckpointLayoutError) as e:
        load_checkpoint(os.path.join(tmp, "fp32"), model)
    out["refused"] = str(e.value)
    out["untouched"] = all(all(map(torch.equal, before[n], v)) for n, v in _packed(model).items())
    load_checkpoint(os.path.join(tmp, "fp32"), model, cast=True)
    out["cast_differs"] = _differs(model, want)

    # A flipped byte in a weight read whole for quantizing: refused by its checksum, model unchanged.
    dist.barrier()
    if rank == 0:
        from torch.distributed.checkpoint import FileSystemReader

        path = os.path.join(tmp, "fp32")
        md = FileSystemReader(path).read_metadata()
        (index, info), *_ = [(i, s) for i, s in md.storage_data.items() if i.fqn == "frozen/layers.0.attn.base_layer.weight"]
        file = os.path.join(path, info.relative_path)
        raw = make_model(frozen_block=False).get_parameter("layers.0.attn.base_layer.weight").detach().numpy().tobytes()
        data = bytearray(open(file, "rb").read())
        at = data.find(raw[:64], info.offset, info.offset + info.length)  # the shard's first rows
        assert at >= 0
        data[at + 5] ^= 0xFF
        open(file, "wb").write(bytes(data))
    dist.barrier()
    model = fresh()
    before = _packed(model)
    with pytest.raises(CheckpointLayoutError) as e:
        load_checkpoint(os.path.join(tmp, "fp32"), model, cast=True)
    out["corrupted"] = str(e.value)
    out["untouched_after_corruption"] = all(all(map(torch.equal, before[n], v)) for n, v in _packed(model).items())
    return out


@pytest.mark.parametrize("world", [1, 2, 4])
def test_plain_checkpoint_quantizes_on_load(tmp_path, world):
    """Plain fp32 weights saved at world 2 load into an NF4 model at world 1/2/4: bitwise the NF4 storage
    of sharding those weights directly; training on top gives the same losses."""
    run_ranks(_write_plain_bases, 2, str(tmp_path))
    outs = run_ranks(_quantize_on_load, world, str(tmp_path))
    assert [(o["plain_differs"], o["cast_differs"]) for o in outs] == [([], [])] * world, "NF4 storage differs"
    out = outs[0]
    assert "layers.0.attn.base_layer.weight" in out["nf4"]
    assert out["losses"][0] == out["losses"][1]
    assert "'frozen/layers.0.attn.base_layer.weight': stored as plain float32 in the checkpoint, " \
           "nf4(block_size=16, scaler_block_size=4) in the model (load_checkpoint(..., cast=True) quantizes it " \
           "on load)" in out["refused"], out["refused"]
    assert out["untouched"]
    assert "checksum mismatch: data of 'layers.0.attn.base_layer.weight'" in out["corrupted"], out["corrupted"]
    assert out["untouched_after_corruption"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_on_meta_has_torchaos_layout(dtype):
    """The meta NF4Tensor built without torchao's (slow on meta) quantization loop has exactly the inner
    tensors, dtypes and context of ``to_nf4`` on the same meta weight."""
    from torchao.quantization import to_nf4

    from fsdp_frozen._torchao_compat import nf4_on_meta

    weight = torch.empty(128, 512, dtype=dtype, device="meta")
    want, got = to_nf4(weight, 64, 256), nf4_on_meta(weight, 64, 256)
    (wn, wctx), (gn, gctx) = want.__tensor_flatten__(), got.__tensor_flatten__()
    assert sorted(wn) == sorted(gn)
    for n in wn:
        a, b = getattr(want, n), getattr(got, n)
        assert (a.shape, a.dtype, b.device.type) == (b.shape, b.dtype, "meta"), n
    assert {k: v for k, v in wctx.items() if k != "tensor_meta"} == {k: v for k, v in gctx.items() if k != "tensor_meta"}
    assert (got.shape, got.dtype) == (want.shape, want.dtype)


def test_torchao_extension_noise_is_filtered():
    """torchao's "Failed to load ..._C*.so" warnings (a CPU torch cannot load its CUDA extensions) are
    dropped once fsdp_frozen is imported; other torchao warnings are not touched."""
    import subprocess
    import sys

    # one process: a filter installed on torchao's logger before fsdp_frozen's sees every record (what a
    # plain ``import torchao`` would print), fsdp_frozen's then drops the noise
    code = ("import logging\n"
            "seen = []\n"
            "class Seen(logging.Filter):\n"
            "    def filter(self, record):\n"
            "        seen.append(record.getMessage())\n"
            "        return True\n"
            "logging.getLogger('torchao').addFilter(Seen())\n"
            "import fsdp_frozen, torchao\n"
            "logging.getLogger('torchao').warning('kept')\n"
            "print(sum(m.startswith('Failed to load ') for m in seen))\n")
    ours = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=checkout_env())
    assert ours.returncode == 0, ours.stderr[-2000:]
    assert "Failed to load" not in ours.stderr and "kept" in ours.stderr, ours.stderr[-2000:]
    if int(ours.stdout.split()[-1]) == 0:
        pytest.skip("this torchao build loads its extensions: nothing to filter here")


@structural_fallback()  # what torch < 2.12 gets
def _fallback_parity(rank: int, world: int, reshard: str) -> dict:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's "cannot hold two param groups" warning
        return _parity(rank, world, reshard)


def test_nf4_at_shard_size_1_in_the_fallback():
    """torch < 2.12 at one rank: NF4 weights stay out of FSDP (the plan's `unmanaged`), in the frozen-only
    modules' fully_shard call too (torchao's all-gather hooks fail at shard size 1); bitwise the
    quantize-dequantize model (issue 23, 3)."""
    out = run_ranks(_fallback_parity, 1, "after_forward")[0]
    assert out["losses"]["nf4"] == out["losses"]["ref"]


def _moved(rank: int, world: int) -> dict:
    from fsdp_frozen.apply import _move_unmanaged

    model = shard_with_freezing(make_model(), mesh_1d(world), FreezePolicy(units=["layers.*"], frozen_dtype="nf4",
                                                                           **BLOCKS))
    plan = sharded_state(model).plan
    # CPU cannot show a CUDA mesh; the mechanism is the same for any target device: meta here
    _move_unmanaged(model, plan, torch.device("meta"))
    devices = {n: str(p.device) for n, p in model.named_parameters()}
    unmanaged = {plan.names.canonical(n) for n in devices} & plan.unmanaged
    return {"unmanaged": sorted(unmanaged), "devices": devices,
            "nf4_inner": [str(model.get_parameter(plan.path(f)).quantized_data.device)
                          for f in sorted(unmanaged & plan.quantized)]}


def test_nf4_kept_out_of_fsdp_moves_to_the_mesh_device():
    """At shard size 1 NF4 weights (and the frozen leftovers stored as computed in, [Note: whole frozen
    groups]) stay out of FSDP, which would leave them where the model was built (issue 23, 4): they are
    moved with the rest; everything FSDP manages is left to FSDP."""
    out = run_ranks(_moved, 1)[0]
    assert len(out["unmanaged"]) >= 7, out["unmanaged"]
    assert all(out["devices"][f] == "meta" for f in out["unmanaged"]), out["devices"]
    assert set(out["nf4_inner"]) == {"meta"}
    assert all(d == "cpu" for n, d in out["devices"].items() if n not in out["unmanaged"]), out["devices"]


# ------------------------------------------------------------------ NF4 read placeholders (issue 23, 6)
def _quantized_elements(fn):
    """(fn(), number of elements torchao's NF4 quantization ran on meanwhile): the count of its cost."""
    from fsdp_frozen._torchao_compat import to_nf4

    nf4_class = type(to_nf4(torch.zeros(64), 16, 4))
    original = nf4_class.__dict__["convert_to_norm_float_weight"]
    seen = []

    def counting(input_tensor, *args, **kwargs):
        seen.append(input_tensor.numel())
        return original.__func__(input_tensor, *args, **kwargs)

    nf4_class.convert_to_norm_float_weight = staticmethod(counting)
    try:
        return fn(), sum(seen)
    finally:
        nf4_class.convert_to_norm_float_weight = original


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_empty_is_a_chunk_of_torchaos_layout_without_quantizing(dtype):
    """`nf4_empty` builds the read placeholder of a saved NF4 shard with exactly the inner tensors, dtypes,
    context and replicated values of torchao's chunk of a quantized zero weight (what the reader used to
    build), quantizing nothing beyond one scaler block however large the weight."""
    from torchao.quantization import to_nf4

    from fsdp_frozen._torchao_compat import NF4_PACKED, nf4_clone, nf4_empty

    rows, cols, n, block, scaler = 64, 32, 4, 16, 4
    want = [nf4_clone(p) for p in torch.chunk(to_nf4(torch.zeros(rows, cols, dtype=dtype), block, scaler), n)]
    got = [nf4_empty((rows // n, cols), dtype, block, scaler, n_blocks=rows * cols // block) for _ in range(n)]
    for w, g in zip(want, got):
        (wn, wctx), (gn, gctx) = w.__tensor_flatten__(), g.__tensor_flatten__()
        assert wn == gn
        for name in wn:
            a, b = getattr(w, name), getattr(g, name)
            assert (a.shape, a.dtype, a.device) == (b.shape, b.dtype, b.device), name
            if name not in NF4_PACKED:  # the replicated lookup table and scaler_mean: values too
                assert torch.equal(a, b), name
        assert {k: v for k, v in wctx.items() if k != "tensor_meta"} == {k: v for k, v in gctx.items() if k != "tensor_meta"}
        assert (g.shape, g.stride(), g.dtype, g.requires_grad) == (w.shape, w.stride(), w.dtype, w.requires_grad)
    assert got[0].quantized_data.data_ptr() != got[1].quantized_data.data_ptr()  # each shard its own storage
    big, quantized = _quantized_elements(lambda: nf4_empty((2048, 1024), dtype, 64, 256))
    assert quantized <= 64 * 256, quantized  # at most the one-scaler-block probe, not 2M elements
    assert big.quantized_data.numel() == 2048 * 1024 // 2 and big.n_blocks == 2048 * 1024 // 64
    with pytest.raises(ValueError, match=r"nf4_empty: a weight of shape \(3, 16\) \(48 elements\) does not split"):
        nf4_empty((3, 16), dtype, 16, 4)


def _save_nf4_weights(rank: int, world: int, tmp: str) -> dict:
    """Save an NF4 model; return this rank's inner tensors of every NF4 weight (what was saved)."""
    import os

    model = shard_with_freezing(make_model(frozen_block=False), mesh_1d(world), FreezePolicy(**NF4_POLICY))
    save_checkpoint(os.path.join(tmp, "nf4"), model)
    out = {}
    for name, p in model.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        if type(local).__name__ == "NF4Tensor":
            out[name] = {n: getattr(local, n).clone() for n in local.__tensor_flatten__()[0]}
    return out


def _read_nf4_whole(rank: int, world: int, tmp: str) -> dict:
    """Read every NF4 weight of the checkpoint whole, as resharding does, counting torchao's quantization."""
    import json
    import os

    from torch.distributed.checkpoint import FileSystemReader

    from fsdp_frozen.checkpoint.checksum import local_checksum
    from fsdp_frozen.checkpoint.convert_on_load import _read_nf4

    path = os.path.join(tmp, "nf4")
    params = json.loads(open(os.path.join(path, "fsdp_frozen.json")).read())["params"]
    keys = {"frozen/" + n: (e["quantization"]["block_size"], e["quantization"]["scaler_block_size"])
            for n, e in params.items() if e.get("quantization")}
    whole, quantized = _quantized_elements(lambda: _read_nf4(path, FileSystemReader(path).read_metadata(), keys))
    return {
        "quantized": quantized,
        "whole": {k[len("frozen/"):]: {n: getattr(t, n) for n in t.__tensor_flatten__()[0]} for k, t in whole.items()},
        "checksums_ok": [k for k, t in whole.items() if local_checksum(t) == params[k[len("frozen/"):]]["checksum"]],
        "numel": {k[len("frozen/"):]: t.numel() for k, t in whole.items()},
    }


def test_nf4_shards_are_read_whole_into_placeholders_without_quantizing(tmp_path):
    """Resharding an NF4 checkpoint reads each weight's saved shards into placeholders that are allocated,
    not quantized from a zero weight (issue 23, 6: an hour at 70B): torchao quantizes at most the
    one-scaler-block probe, and the weight read is bitwise the saved shards end to end, the replicated
    scaler_mean and lookup table those saved (they are stored with each shard), its checksum the manifest's."""
    saved = run_ranks(_save_nf4_weights, 2, str(tmp_path))
    got = run_ranks(_read_nf4_whole, 1, str(tmp_path))[0]
    assert sorted(got["whole"]) == sorted(saved[0]) and len(got["whole"]) >= 7, sorted(got["whole"])
    assert sorted(got["checksums_ok"]) == sorted("frozen/" + n for n in got["whole"])
    block, scaler = BLOCKS["nf4_block_size"], BLOCKS["nf4_scaler_block_size"]
    assert got["quantized"] <= block * scaler < min(got["numel"].values()), got["quantized"]
    for name, inner in got["whole"].items():
        for n, t in inner.items():
            want = torch.cat([s[name][n] for s in saved]) if n in ("quantized_data", "quantized_scalers",
                                                                   "quantization_factor") else saved[0][name][n]
            assert torch.equal(t, want) and t.dtype == want.dtype, (name, n)
        assert inner["scaler_mean"].item() != 0, name  # the saved value, not the placeholder's


def test_nf4_placeholders_refuse_shards_torchao_cannot_hold():
    """Saved NF4 shards that are not equal dim-0 chunks, or that do not hold whole scaler blocks, are
    refused naming the weight (before the placeholders are built: torchao's split would assert)."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorProperties, TensorStorageMetadata

    from fsdp_frozen.checkpoint.convert_on_load import _placeholders

    def md(rows, cols, cuts):
        chunks = [ChunkStorageMetadata(offsets=torch.Size([a, 0]), sizes=torch.Size([b - a, cols]))
                  for a, b in zip(cuts, cuts[1:])]
        return TensorStorageMetadata(TensorProperties(dtype=torch.bfloat16), torch.Size([rows, cols]), chunks), chunks

    parts = _placeholders("frozen/w", *md(64, 32, [0, 16, 32, 48, 64]), 16, 4)
    assert [tuple(p.shape) for p in parts] == [(16, 32)] * 4 and {p.n_blocks for p in parts} == {64 * 32 // 16}
    with pytest.raises(CheckpointLayoutError, match=r"NF4 weight 'frozen/w' of shape \(64, 32\) is saved in shards of "
                                                    r"unequal sizes or other than dim-0 chunks \(sizes \[\(40, 32\), \(24, 32\)\]\)"):
        _placeholders("frozen/w", *md(64, 32, [0, 40, 64]), 16, 4)
    with pytest.raises(CheckpointLayoutError, match=r"NF4 weight 'frozen/w' is saved in shards of shape \(1, 32\), which "
                                                    r"do not hold whole scaler blocks of block_size=16 x scaler_block_size=4"):
        _placeholders("frozen/w", *md(64, 32, list(range(65))), 16, 4)  # 32 elements: half a scaler block


# ------------------------------------------------------- NF4 quantized from the compute dtype (issue 23, 5)
def _dequantized_dtypes(rank: int, world: int, path: str) -> dict:
    """An fp32 model (as HF builds one on meta), NF4 storage, bf16 compute: the dtype of every NF4
    dequantization a forward and backward run, and what loading an NF4 checkpoint quantized from fp32
    says."""
    from fsdp_frozen._torchao_compat import to_nf4
    from fsdp_frozen.checkpoint import load_checkpoint

    nf4_class = type(to_nf4(torch.zeros(64), 16, 4))
    original = nf4_class.get_original_weight
    seen = []

    def recording(self):
        out = original(self)
        seen.append(str(out.dtype))
        return out

    policy = dict(units=("layers.*",), frozen_dtype="nf4", **BLOCKS)
    fp32 = shard_with_freezing(make_model(), mesh_1d(world), FreezePolicy(**policy))
    save_checkpoint(path, fp32)
    model = shard_with_freezing(make_model(), mesh_1d(world), FreezePolicy(param_dtype="bfloat16", **policy))
    plan = sharded_state(model).plan
    stored = {str(local(model.get_parameter(plan.path(f))).dtype) for f in plan.quantized}
    from fsdp_frozen import _torchao_compat as ao

    fast = ao.nf4_dequantize_fast  # what the NF4 linear dequantizes with (fsdp_frozen.nf4_compute)

    def recording_fast(t):
        out = fast(t)
        seen.append(str(out.dtype))
        return out

    nf4_class.get_original_weight, ao.nf4_dequantize_fast = recording, recording_fast
    try:
        train(model, 1, rank)
    finally:
        nf4_class.get_original_weight, ao.nf4_dequantize_fast = original, fast
    try:
        load_checkpoint(path, model)
        refused = ""
    except CheckpointLayoutError as e:
        refused = str(e)
    load_checkpoint(path, model, cast=True)  # what the refusal offers: the saved values re-quantized from bf16
    differs = []
    for f in plan.quantized:
        saved = local(fp32.get_parameter(plan.path(f))).get_original_weight().to(torch.bfloat16)
        want = to_nf4(saved, BLOCKS["nf4_block_size"], BLOCKS["nf4_scaler_block_size"]).get_original_weight()
        if not torch.equal(local(model.get_parameter(plan.path(f))).get_original_weight(), want):
            differs.append(f)
    return {"differs": differs, "stored": sorted(stored), "dequantized": sorted(set(seen)), "uses": len(seen), "refused": refused}


def local(t):
    from fsdp_frozen._torch_compat import local_tensor

    return local_tensor(t)


@pytest.mark.parametrize("world", [1, 2])
def test_nf4_is_quantized_from_the_compute_dtype(tmp_path, world):
    """[Note: NF4 in the compute dtype]: an fp32 model with bf16 compute stores NF4 quantized from bf16,
    so every dequantization in the forward and backward writes bf16 (before: fp32, then a cast: twice
    the transient bytes); a checkpoint of fp32-quantized NF4 is refused by name, not cast silently."""
    out = run_ranks(_dequantized_dtypes, world, str(tmp_path / "ckpt"))[0]
    assert out["stored"] == ["torch.bfloat16"], out
    assert out["uses"] >= 2 * 7 and out["dequantized"] == ["torch.bfloat16"], out
    assert ("'frozen/layers.0.attn.base_layer.weight': nf4(block_size=16, scaler_block_size=4) quantized from "
            "float32 in the checkpoint, from bfloat16 in the model (pass cast=True to re-quantize on load)"
            ) in out["refused"], out["refused"]
    assert out["differs"] == [], out["differs"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_quantized_in_chunks_is_torchaos(dtype, monkeypatch):
    """`load_pretrained` quantizes a whole NF4 weight (shard size 1) or this rank's rows with
    `nf4_quantize_chunk_`, whose 4-bit encoding runs on `QUANTIZE_CHUNK` elements at a time: bitwise
    torchao's ``to_nf4`` of the whole (chunk boundaries inside a scaler block, a short last chunk), with
    one chunk's temporaries (torchao's are ~3.5x the bf16 weight: 7 GiB for Llama-3-70B's head)."""
    from torchao.quantization import to_nf4

    from fsdp_frozen import _torchao_compat as ao
    from fsdp_frozen.diagnostics import PeakTensorMemory

    g = torch.Generator().manual_seed(0)
    monkeypatch.setattr(ao, "QUANTIZE_CHUNK", 3 * 2 * 16 + 5)  # 6 blocks of 16 per chunk; 64 x 32 = 21.3 chunks
    w = torch.randn(64, 32, generator=g).to(dtype)
    target = ao.nf4_empty((64, 32), dtype, 16, 4)
    ao.nf4_quantize_chunk_(target, w)
    want = to_nf4(w, 16, 4)
    for name in want.__tensor_flatten__()[0]:
        assert torch.equal(getattr(target, name), getattr(want, name)), name
    chunk = 1 << 11
    monkeypatch.setattr(ao, "QUANTIZE_CHUNK", chunk)
    w = torch.randn(1024, 2048, generator=g).to(dtype)
    target = ao.nf4_empty((1024, 2048), dtype, 64, 256)
    with PeakTensorMemory([w, target]) as m:
        before = m.current
        ao.nf4_quantize_chunk_(target, w)
    # the packed codes (numel / 2) and the scalers (their double quantization), plus one chunk's temporaries: scaled values, codes and
    # their packing, and torchao's distances to the 16 code values (two (chunk, 16) tensors)
    size = w.element_size()
    bound = w.numel() // 2 + w.numel() // 64 * 8 * size + chunk * (4 * size + 2 + 32 * size)
    assert m.peak - before <= bound, (m.peak - before, bound)
    with PeakTensorMemory([w]) as m:
        before = m.current
        to_nf4(w, 64, 256)
    assert m.peak - before >= 2 * w.numel() * w.element_size()  # torchao's whole-weight temporaries
