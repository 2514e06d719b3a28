"""The CUDA tier: the same guarantees on CUDA + NCCL (world 1, and world 2 where two GPUs exist).

Skipped with a reason on machines without a GPU (CI, the CPU development machines). Run by
``scripts/gpu_check.sh`` on a lent GPU machine. Covers: shard + train (bitwise against plain FSDP2),
save + load (frozen shards staged on the host: the device peak during the load stays near the model),
checksums of CUDA shards, `load_pretrained` (shards created on the GPU), NF4, `refreeze`,
``trainable_grouping="replicate"``, recipes/offload.py's CUDA path (pinned memory, a side stream) and the
fast NF4 dequantization and linear bitwise torchao's.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

from fsdp_frozen import FreezePolicy, shard_with_freezing
from fsdp_frozen._torch_compat import local_tensor
from fsdp_frozen.checkpoint import load_checkpoint, load_pretrained, save_checkpoint
from fsdp_frozen.checkpoint.checksum import checksums, local_checksum

from .dist_harness import run_ranks
from .models import batch, make_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA tier needs a CUDA GPU (none here)")
HF_MISSING = any(importlib.util.find_spec(m) is None for m in ("transformers", "peft", "safetensors"))
TORCHAO_MISSING = importlib.util.find_spec("torchao") is None
WORLDS = [1] + ([2] if torch.cuda.is_available() and torch.cuda.device_count() >= 2 else [])


def _mesh(world: int):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cuda", (world,))


def _adamw(model) -> torch.optim.Optimizer:
    """foreach=False: left to itself, torch takes AdamW's foreach kernels on CUDA for plain tensors only
    (torch.optim.optimizer._default_to_fused_or_foreach, `_foreach_supported_types`; pytorch/pytorch#92306:
    "all tensors are native tensors (not subclasses) and on CUDA"), so plain FSDP2's DTensors would step
    through the per-tensor loop and replicated adapters (plain tensors) through the foreach kernels:
    one implementation for every model compared. (Not what failed test_cuda_replicate[1] on the GPU:
    that was its reference, built under torch.device("cuda"), drawing other initial weights.)"""
    return torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)


def _train(model, steps: int, rank: int, opt=None) -> tuple[list[float], torch.optim.Optimizer]:
    opt = opt or _adamw(model)
    losses = []
    for step in range(steps):
        x, y = (t.cuda() for t in batch(step, rank))
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, opt


def _block_bytes(t: torch.Tensor) -> int:
    """Bytes the CUDA caching allocator charges to ``torch.cuda.memory_allocated`` for a tensor of
    ``t``'s size: every block is rounded up to a multiple of 512 B (the smallest block is 512 B;
    empty tensors take none). The toy model's tensors are all in the small pool (< 1 MiB), where a
    block is split off exactly at that size."""
    n = t.numel() * t.element_size()
    return 0 if n == 0 else -(-n // 512) * 512


def _staged_on_device(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    """What `load_checkpoint` legitimately stages on the device: a zeroed copy of every trainable
    parameter's shard, persistent buffer and optimizer-state tensor that lives there (frozen plain
    shards are staged on the host), each rounded to the allocator's 512 B blocks."""
    persistent = set(model.state_dict())
    tensors = [p for p in model.parameters() if p.requires_grad]
    tensors += [b for n, b in model.named_buffers() if n in persistent]
    tensors += [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return sum(_block_bytes(local_tensor(t)) for t in tensors if local_tensor(t).is_cuda)


class _PeakOutsideCollectives:
    """The peak ``torch.cuda.memory_allocated`` while not inside an object collective or barrier.

    On an NCCL-only process group, object collectives (DCP's plan gather and scatter, its result
    all-gather, `broadcast_object_list`) pickle their payload into device tensors: input and output
    buffers of the pickled load plan, ~2 x 13.4 KiB for the toy model at world 1, more than its frozen
    shards (~14 KiB). That memory is freed when the collective returns (a waited work releases the
    tensors it stashed) and does not depend on where frozen shards are staged, so it is kept apart:
    the peak is reset around each call and only the stretches between calls make up `peak`.
    The functions are replaced on `torch.distributed` (DCP calls ``dist.X``) and on `distributed_c10d`,
    and restored on exit, also on an error (the pooled rank is left as it was).
    """

    NAMES = ("gather_object", "scatter_object_list", "all_gather_object", "broadcast_object_list", "barrier")

    def __enter__(self) -> "_PeakOutsideCollectives":
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        self.saved = [(m, n, getattr(m, n)) for m in (dist, c10d) for n in self.NAMES]
        self.segments: list[int] = []
        self.collective_peak = 0  # the most one call added (reported, not asserted)
        depth = [0]

        def wrap(fn):
            def inner(*args, **kwargs):
                if depth[0]:  # called from inside another one (c10d's own calls): already counted
                    return fn(*args, **kwargs)
                self.segments.append(torch.cuda.max_memory_allocated())
                start = torch.cuda.memory_allocated()
                depth[0] += 1
                try:
                    return fn(*args, **kwargs)
                finally:
                    depth[0] -= 1
                    self.collective_peak = max(self.collective_peak, torch.cuda.max_memory_allocated() - start)
                    torch.cuda.reset_peak_memory_stats()
            return inner

        for m, n, fn in self.saved:
            setattr(m, n, wrap(fn))
        torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc) -> None:
        self.segments.append(torch.cuda.max_memory_allocated())
        for m, n, fn in self.saved:
            setattr(m, n, fn)

    @property
    def peak(self) -> int:
        return max(self.segments)


def _shard_train_save_load(rank: int, world: int, tmp: str) -> dict:
    from .common import plain_fsdp

    out = {}
    with torch.device("cuda"):
        reference = plain_fsdp(make_model(), _mesh(world), ("layers.*",))
        model = shard_with_freezing(make_model(), _mesh(world),
                                    FreezePolicy(units=["layers.*"], frozen_reshard="after_backward"))
    out["devices"] = sorted({str(local_tensor(p).device.type) for p in model.parameters()})
    want, _ = _train(reference, 3, rank)
    got, opt = _train(model, 3, rank)
    out["losses_bitwise"] = want == got
    # Checksums of CUDA shards: computed where they live, all-reduced on NCCL, equal to the CPU figure.
    sd = {n: p for n, p in model.named_parameters()}
    sums = checksums(sd)
    full = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu() for n, p in sd.items()}
    out["checksums_match_cpu"] = all(local_checksum(full[n]) == sums[n] for n in sd)
    path = save_checkpoint(os.path.join(tmp, "ck"), model, opt)
    with torch.device("cuda"):
        fresh = shard_with_freezing(make_model(seed=1), _mesh(world),
                                    FreezePolicy(units=["layers.*"], frozen_reshard="after_backward"))
    fresh_opt = _adamw(fresh)
    _train(fresh, 1, rank, fresh_opt)  # optimizer state exists, as on a resume
    torch.cuda.synchronize()
    staged = _staged_on_device(fresh, fresh_opt)
    base = torch.cuda.memory_allocated()
    with _PeakOutsideCollectives() as peak:
        load_checkpoint(path, fresh, fresh_opt)
        torch.cuda.synchronize()
    frozen_bytes = sum(local_tensor(p).untyped_storage().nbytes() for p in fresh.parameters() if not p.requires_grad)
    out["load_peak_above_base"] = peak.peak - base
    out["staged_on_device"] = staged
    out["collective_peak"] = peak.collective_peak
    out["frozen_bytes"] = frozen_bytes
    out["resume_bitwise"] = _train(fresh, 2, rank, fresh_opt)[0] == _train(model, 2, rank, opt)[0]
    return out


@pytest.mark.parametrize("world", WORLDS)
def test_cuda_shard_train_save_load(tmp_path, world):
    for r in run_ranks(_shard_train_save_load, world, str(tmp_path), backend="nccl", timeout=300):
        assert r["devices"] == ["cuda"], r
        assert r["losses_bitwise"], r
        assert r["checksums_match_cpu"], r
        assert r["resume_bitwise"], r
        # Frozen shards are staged on the host: beyond what the load must stage on the device (trainable
        # shards, buffers, optimizer state, each in 512 B allocator blocks: ~24 KiB at world 1, more than
        # the toy model's ~14 KiB of frozen shards) it adds less than one copy of the frozen shards. The
        # rest (checksum temporaries, <= one tensor + 1 KiB, ~5 KiB) fits under that; a device copy of the
        # frozen shards (>= frozen_bytes, 22 blocks: ~18.5 KiB) does not. Object collectives are left out
        # (see _PeakOutsideCollectives).
        assert r["load_peak_above_base"] - r["staged_on_device"] < r["frozen_bytes"], r


def _pretrained(rank: int, world: int, directory: str, dtype: str) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from .test_pretrained import NF4, _config, _frozen_shards

    out = {}
    for dtype in (dtype,):
        policy = FreezePolicy(units=["base_model.model.model.layers.*"], frozen_dtype=dtype, param_dtype="bfloat16",
                              **(NF4 if dtype == "nf4" else {}))
        lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
        reference = LlamaForCausalLM.from_pretrained(directory).cuda()
        reference = shard_with_freezing(get_peft_model(reference, lora), _mesh(world), policy)
        with torch.device("meta"):
            model = LlamaForCausalLM(_config("llama"))
        model = shard_with_freezing(get_peft_model(model, lora), _mesh(world), policy)
        load_pretrained(model, directory)
        want, got = _frozen_shards(reference), _frozen_shards(model)
        ids = torch.randint(0, 128, (2, 8), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
        reference.eval()
        model.eval()
        with torch.no_grad():
            diff = (reference(input_ids=ids).logits.float() - model(input_ids=ids).logits.float()).abs().max().item()
        out[dtype] = {
            "devices": sorted({str(local_tensor(p).device.type) for p in model.parameters()}),
            "frozen_bitwise": all(all(torch.equal(a, b) for a, b in zip(want[k], got[k])) for k in want),
            "logits_diff": diff,
        }
    return out


@pytest.mark.skipif(HF_MISSING, reason="needs the 'hf' extra")
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("dtype", ["bfloat16", pytest.param("nf4", marks=pytest.mark.skipif(
    TORCHAO_MISSING, reason="NF4 needs torchao (carry its wheel: scripts/gpu_wheels.sh)"))])
def test_cuda_load_pretrained_bf16_and_nf4(tmp_path, world, dtype):
    from .test_pretrained import save_tiny

    directory = save_tiny(str(tmp_path / "tiny"))
    for r in run_ranks(_pretrained, world, directory, dtype, backend="nccl", timeout=300):
        for dtype, got in r.items():
            assert got["devices"] == ["cuda"], (dtype, got)
            assert got["frozen_bitwise"], (dtype, got)
            assert got["logits_diff"] == 0.0, (dtype, got)


def _refreeze(rank: int, world: int, tmp: str) -> dict:
    """refreeze on CUDA + NCCL: every new shard on the device, equal to save + rebuild + load."""
    from fsdp_frozen import refreeze

    stage1 = FreezePolicy(units=["layers.*"], frozen_dtype="bfloat16", param_dtype="bfloat16")
    stage2 = FreezePolicy(units=["layers.*"], frozen_dtype="bfloat16", param_dtype="bfloat16",
                          unfreeze=["layers.2.**"], freeze=["layers.0.attn.lora_A.weight"])
    with torch.device("cuda"):
        model = shard_with_freezing(make_model(), _mesh(world), stage1)
    losses, opt = _train(model, 2, rank)
    path = save_checkpoint(os.path.join(tmp, "ck"), model, opt, frozen="include")
    refreeze(model, opt, stage2)
    devices = sorted({str(local_tensor(p).device.type) for p in model.parameters()})
    state_devices = sorted({str(local_tensor(v).device.type) for s in opt.state.values() for v in s.values()
                            if isinstance(v, torch.Tensor) and v.dim() > 0})
    tail, _ = _train(model, 2, rank, opt)
    with torch.device("cuda"):
        ref = shard_with_freezing(make_model(seed=3), _mesh(world), stage2)
    ref_opt = _adamw(ref)
    load_checkpoint(path, ref, ref_opt, allow_freezing_change=True, cast=True)
    ref_tail, _ = _train(ref, 2, rank, ref_opt)
    return {"devices": devices, "state_devices": state_devices, "equal": tail == ref_tail,
            "grouping": __import__("fsdp_frozen.apply", fromlist=["x"]).sharded_state(model).plan.trainable_grouping}


@pytest.mark.parametrize("world", WORLDS)
def test_cuda_refreeze(tmp_path, world):
    for r in run_ranks(_refreeze, world, str(tmp_path), backend="nccl", timeout=300):
        assert r["devices"] == ["cuda"] and r["state_devices"] in ([], ["cuda"]), r
        assert r["equal"], r


def _replicate(rank: int, world: int) -> dict:
    """trainable_grouping='replicate' on CUDA + NCCL: parameters, bf16 copies, gradients and the
    all-reduce buffer on the device (also for a model built on the CPU or on meta), losses equal to
    plain FSDP2's."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from .common import plain_fsdp

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    # Both built on the CPU (fully_shard moves them to the mesh's device): built under torch.device("cuda"),
    # the reference drew its initial weights from CUDA's generator, not the CPU's, and was another model
    # (the GPU runs of 2026-12-04: losses not equal, with either AdamW)
    reference = plain_fsdp(make_model(), _mesh(world), ("layers.*",), mp)
    policy = FreezePolicy(units=["layers.*"], trainable_grouping="replicate", param_dtype="bfloat16",
                          reduce_dtype="float32")
    model = shard_with_freezing(make_model(), _mesh(world), policy)  # built on the CPU: moved to the mesh's device
    want, _ = _train(reference, 3, rank)
    got, _ = _train(model, 3, rank)
    trainable = [p for p in model.parameters() if p.requires_grad]
    x, y = (t.cuda() for t in batch(0, rank))
    logits = model(x)
    during = sorted({f"{p.device.type}:{p.dtype}" for p in model.parameters() if p.requires_grad})
    F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1)).backward()
    # [Note: dormant root]: "never" frozen groups whole too, nothing left to FSDP; CPU inputs are moved
    # to the device by this package's pre-hook, as FSDP2's root would
    dormant = shard_with_freezing(make_model(), _mesh(world), FreezePolicy(
        units=["layers.*"], frozen_reshard="never", frozen_dtype="bfloat16", trainable_grouping="replicate",
        param_dtype="bfloat16", reduce_dtype="float32"))
    dormant_out = dormant(batch(0, rank)[0])  # a CPU tensor in
    return {"losses_equal": want == got, "during": during,
            "devices": sorted({p.device.type for p in trainable} | {p.grad.device.type for p in trainable}),
            "grad_dtypes": sorted({str(p.grad.dtype) for p in trainable}),
            "dormant": (dormant_out.device.type, str(dormant_out.dtype),
                        sorted({p.device.type for p in dormant.parameters()}))}


@pytest.mark.parametrize("world", WORLDS)
def test_cuda_replicate(world):
    for r in run_ranks(_replicate, world, backend="nccl", timeout=300):
        assert r["losses_equal"], r
        assert r["devices"] == ["cuda"] and r["grad_dtypes"] == ["torch.float32"], r
        assert r["during"] == ["cuda:torch.bfloat16"], r
        assert r["dormant"] == ("cuda", "torch.bfloat16", ["cuda"]), r


@pytest.mark.skipif(HF_MISSING, reason="needs the 'hf' extra")
@pytest.mark.parametrize("variant", ["hf_gc", pytest.param("checkpoint_wrapper_nf4", marks=pytest.mark.skipif(
    TORCHAO_MISSING, reason="NF4 needs torchao"))])
def test_cuda_offloaded_activations_train_bitwise_the_same(variant):
    """recipes/offload.py on CUDA: saved block inputs copied to pinned host memory on a side stream and
    back, training bitwise the same as without it (tests/test_offload.py runs the CPU path)."""
    from .test_offload import check_bitwise, train

    check_bitwise(run_ranks(train, WORLDS[-1], variant, "cuda", backend="nccl", timeout=300), variant)


@pytest.mark.skipif(TORCHAO_MISSING, reason="NF4 needs torchao (carry its wheel: scripts/gpu_wheels.sh)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_nf4_compute_bitwise_torchaos(dtype, monkeypatch):
    """The fast dequantization (tables on the device) and the NF4 linear in every mode against
    torchao's, on CUDA: the same checks tests/test_nf4_compute.py runs on the CPU."""
    from .test_nf4_compute import check_fast_dequantize, check_linear_modes

    check_fast_dequantize(dtype, "cuda", monkeypatch)
    monkeypatch.undo()
    check_linear_modes(dtype, "cuda", monkeypatch)
