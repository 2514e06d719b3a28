"""`load_pretrained`: Hugging Face safetensors into meta-built, sharded models, rank by rank.

Each case is compared with the reference path (``from_pretrained`` + ``get_peft_model`` +
``shard_with_freezing`` of the same files): frozen shards bitwise on every rank, buffers equal,
logits equal (fp32), adapters initialised as PEFT does.
"""

from __future__ import annotations

import importlib.util
import os
import traceback

import pytest
import torch
import torch.nn as nn

from fsdp_frozen import FreezePolicy, shard_with_freezing
from fsdp_frozen._torch_compat import local_tensor
from fsdp_frozen.checkpoint import CheckpointLayoutError, load_pretrained
from fsdp_frozen.diagnostics import reset_rss_peak, rss_bytes
from fsdp_frozen.storage import is_nf4

from .common import mesh_1d, whole
from .dist_harness import run_ranks

HF_MISSING = any(importlib.util.find_spec(m) is None for m in ("transformers", "peft", "safetensors"))
pytestmark = pytest.mark.skipif(HF_MISSING, reason="needs the 'hf' extra: pip install -e '.[hf]'")

VOCAB = 128
# NF4 blocks of 32 elements, scalers in blocks of 16: every 64x64 / 64x128 weight splits over 1, 2 or 4 ranks.
NF4 = {"nf4_block_size": 32, "nf4_scaler_block_size": 16}


def _config(arch: str, tied: bool = False):
    if arch == "gpt2":  # Conv1D layers (PEFT's fan_in_fan_out), tied embeddings
        from transformers import GPT2Config

        return GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=2, n_positions=64)
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=tied)


def _model_class(arch: str):
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    return GPT2LMHeadModel if arch == "gpt2" else LlamaForCausalLM


def save_tiny(directory: str, arch: str = "llama", tied: bool = False, shard: bool | str = False) -> str:
    """A random tiny model written with save_pretrained (one file, or shards with an index), or, with
    ``shard="dcp"``, as a plain DCP checkpoint of its state dict (the model's config beside it)."""
    torch.manual_seed(0)
    model = _model_class(arch)(_config(arch, tied))
    if shard == "dcp":
        import torch.distributed.checkpoint as dcp

        dcp.save({"model": model.state_dict()}, checkpoint_id=directory, no_dist=True)
        model.config.save_pretrained(directory)  # from_pretrained of the reference needs weights: see _reference
        model.save_pretrained(os.path.join(directory, "hf"))
        return directory
    model.save_pretrained(directory, max_shard_size="40KB" if shard else "10GB")
    return directory


def _peft(model: nn.Module, kind: str | None, arch: str) -> nn.Module:
    if kind is None:
        return model
    from peft import IA3Config, LoraConfig, get_peft_model

    if arch == "gpt2":
        config = LoraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, use_dora=kind == "dora")
    elif kind == "ia3":
        config = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    else:
        config = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "gate_proj"], use_dora=kind == "dora")
    return get_peft_model(model, config)


def _policy(peft: str | None, arch: str, dtype: str | None) -> FreezePolicy:
    prefix = "base_model.model." if peft else ""
    units = [f"{prefix}transformer.h.*"] if arch == "gpt2" else [f"{prefix}model.layers.*"]
    extra = {} if peft else {"freeze": ["**.wte.weight" if arch == "gpt2" else "**.embed_tokens.weight"]}
    if dtype is None:
        return FreezePolicy(units=units, **extra)
    return FreezePolicy(units=units, frozen_dtype=dtype, param_dtype="bfloat16", **NF4, **extra)


def _build_meta(arch: str, tied: bool, how: str) -> nn.Module:
    cls, config = _model_class(arch), _config(arch, tied)
    if how == "meta":
        with torch.device("meta"):
            return cls(config)
    from accelerate import init_empty_weights  # parameters on meta, buffers real

    with init_empty_weights():
        model = cls(config)
    model.tie_weights()  # init_empty_weights re-creates each registered Parameter: ties are lost (as in from_pretrained)
    return model


def _frozen_shards(model: nn.Module) -> dict[str, list[torch.Tensor]]:
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            continue
        local = local_tensor(p)
        out[name] = [getattr(local, n) for n in local.__tensor_flatten__()[0]] if is_nf4(local) else [local]
    return out


def _case(rank: int, world: int, directory: str, arch: str, peft: str | None, dtype: str | None, how: str,
          tied: bool) -> dict:
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(7))
    mesh = mesh_1d(world)
    hf_dir = os.path.join(directory, "hf") if os.path.isdir(os.path.join(directory, "hf")) else directory
    reference = _model_class(arch).from_pretrained(hf_dir)
    reference = shard_with_freezing(_peft(reference, peft, arch), mesh, _policy(peft, arch, dtype))
    model = _peft(_build_meta(arch, tied, how), peft, arch)
    model = shard_with_freezing(model, mesh, _policy(peft, arch, dtype))
    assert all(local_tensor(p).is_meta or is_nf4(local_tensor(p)) for p in model.parameters())
    import fsdp_frozen.checkpoint.pretrained as pretrained_module

    ao = pretrained_module.ao
    nf4_reads, fills = [], (ao.nf4_copy_chunk_, ao.nf4_quantize_chunk_)
    nf4_names = {n for n, p in model.named_parameters() if is_nf4(local_tensor(p))}

    def recording(fill):
        def record(target, values):
            nf4_reads.append(values.numel())  # elements read from the file for one NF4 weight on this rank
            return fill(target, values)
        return record

    ao.nf4_copy_chunk_, ao.nf4_quantize_chunk_ = map(recording, fills)
    try:
        initialised = load_pretrained(model, directory)
    finally:
        ao.nf4_copy_chunk_, ao.nf4_quantize_chunk_ = fills
    nf4_numel = sum(local_tensor(p).numel() for n, p in model.named_parameters() if n in nf4_names)
    reference.eval()  # from_pretrained returns eval mode (GPT-2 has dropout)
    model.eval()

    want, got = _frozen_shards(reference), _frozen_shards(model)
    frozen_bitwise = want.keys() == got.keys() and all(
        len(a) == len(b) and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b))
        for a, b in ((want[k], got[k]) for k in want))
    ref_buffers, buffers = dict(reference.named_buffers()), dict(model.named_buffers())
    buffers_equal = ref_buffers.keys() == buffers.keys() and all(torch.equal(ref_buffers[k], buffers[k])
                                                                 for k in ref_buffers)
    trainable_equal = {}  # deterministic adapter inits (B zero, IA3 ones, DoRA magnitude) and loaded tensors
    for (name, a), (_, b) in zip(reference.named_parameters(), model.named_parameters()):
        if a.requires_grad and "lora_A" not in name:
            trainable_equal[name] = torch.equal(local_tensor(a), local_tensor(b))
    lora_a = [local_tensor(p) for n, p in model.named_parameters() if "lora_A" in n]
    # Each rank keeps its chunk of one whole init: the shards differ (DTensor's uncoordinated CPU init
    # would repeat the same numbers on every rank).
    halves = [torch.chunk(whole(p), world)[:2] for n, p in model.named_parameters() if "lora_A" in n]
    shards_distinct = world == 1 or all(not torch.equal(a, b) for a, b in halves if a.shape == b.shape)
    with torch.no_grad():
        diff = (reference(input_ids=ids).logits.float() - model(input_ids=ids).logits.float()).abs().max().item()
    for m in (reference, model):
        m.reshard()
    return {
        "frozen_bitwise": frozen_bitwise,
        "buffers_equal": buffers_equal,
        "trainable_not_equal": sorted(n for n, ok in trainable_equal.items() if not ok),
        "lora_a_random": all(t.numel() == 0 or t.abs().sum() > 0 for t in lora_a) and shards_distinct,
        "logits_diff": diff,
        "initialised": initialised,
        "devices": sorted({str(local_tensor(p).device) for p in model.parameters()}),
        "nf4_read_fraction": sum(nf4_reads) / nf4_numel if nf4_names else None,
    }


def _cases(rank: int, world: int, tmp: str, cases: list[tuple]) -> dict:
    out = {}
    for case in cases:
        arch, peft, dtype, how, tied, shard = case
        directory = os.path.join(tmp, f"{arch}-tied{tied}-shard{shard}")
        try:
            out[case] = _case(rank, world, directory, arch, peft, dtype, how, tied)
        except Exception:  # noqa: BLE001 - reported per case by the parent
            out[case] = traceback.format_exc()
    return out


#: (arch, peft, frozen dtype, meta build, tied embeddings, sharded files)
CASES = {
    1: [("llama", "lora", "nf4", "meta", False, False), ("llama", "lora", None, "empty_weights", False, True)],
    2: [
        ("llama", "lora", None, "meta", False, False),
        ("llama", "lora", "bfloat16", "meta", False, True),
        ("llama", "lora", "nf4", "empty_weights", False, True),
        ("llama", "dora", "bfloat16", "meta", False, False),
        ("llama", "ia3", None, "meta", False, False),
        ("llama", None, None, "meta", True, False),
        ("gpt2", "lora", None, "meta", True, False),
        ("gpt2", "dora", None, "empty_weights", True, False),
        ("llama", "lora", "bfloat16", "meta", False, "dcp"),
        ("llama", "lora", "nf4", "meta", False, "dcp"),
        ("llama", "dora", None, "empty_weights", False, "dcp"),
    ],
    4: [("llama", "lora", "nf4", "meta", False, True), ("llama", "dora", None, "meta", False, False)],
}


@pytest.mark.parametrize("world", [1, 2, 4])
def test_load_pretrained_equals_from_pretrained(tmp_path, world):
    for arch, _, _, _, tied, shard in CASES[world]:
        directory = tmp_path / f"{arch}-tied{tied}-shard{shard}"
        if not directory.exists():
            save_tiny(str(directory), arch, tied, shard)
        assert (directory / "model.safetensors.index.json").exists() == (shard is True)
    results = run_ranks(_cases, world, str(tmp_path), CASES[world], timeout=300)
    failures = []
    for case in CASES[world]:
        arch, peft, dtype, how, tied, shard = case
        per_rank = [r[case] for r in results]
        for rank, r in enumerate(per_rank):
            if isinstance(r, str):
                failures.append(f"{case} rank {rank} raised:\n{r}")
                continue
            checks = {
                "frozen shards bitwise": r["frozen_bitwise"],
                "buffers equal": r["buffers_equal"],
                "deterministic trainables equal": not r["trainable_not_equal"],
                "lora_A initialised (kaiming, not zero or garbage)": r["lora_a_random"],
                "logits equal": r["logits_diff"] <= (1e-5 if dtype is None else 0.0),
                "shards on the mesh's device": r["devices"] == ["cpu"],
                # [Note: NF4 from row chunks]: each rank reads (and quantizes) only its rows of a
                # safetensors NF4 weight; a DCP source is read whole
                "NF4 read in this rank's rows only": dtype != "nf4" or r["nf4_read_fraction"] == (
                    world if shard == "dcp" else 1),
            }
            failures += [f"{case} rank {rank}: {what} ({r if what != 'frozen shards bitwise' else ''})"
                         for what, ok in checks.items() if not ok]
            initialised = r["initialised"]
            expect_adapters = peft is not None
            if expect_adapters != any(("lora_" in n or "ia3_" in n) for n in initialised):
                failures.append(f"{case}: initialised names {initialised}")
            if arch == "llama" and how == "meta" and not any(n.endswith("rotary_emb.inv_freq") for n in initialised):
                failures.append(f"{case}: rotary inv_freq not recomputed: {initialised}")
            if how == "empty_weights" and any("inv_freq" in n for n in initialised):
                failures.append(f"{case}: real buffers were re-initialised: {initialised}")
    assert not failures, "\n".join(failures)


# ----------------------------------------------------------------------------------------- refusals
def _refusals(rank: int, world: int, tmp: str) -> dict:
    from safetensors.torch import load_file, save_file

    good = save_tiny(os.path.join(tmp, "good"))
    weights = load_file(os.path.join(good, "model.safetensors"))
    del weights["model.norm.weight"]  # missing (frozen)
    weights["model.extra.weight"] = torch.zeros(3)  # unexpected
    weights["model.layers.0.mlp.up_proj.weight"] = torch.zeros(5, 5)  # shape
    weights["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"].to(torch.int32)  # dtype
    bad = os.path.join(tmp, "bad")
    os.makedirs(bad)
    save_file(weights, os.path.join(bad, "model.safetensors"))

    def fresh():
        model = _peft(_build_meta("llama", False, "meta"), "lora", "llama")
        return shard_with_freezing(model, mesh_1d(world), _policy("lora", "llama", None))

    out = {}
    model = fresh()
    try:
        load_pretrained(model, bad)
    except CheckpointLayoutError as e:
        out["bad"] = str(e)
    out["still_meta"] = all(local_tensor(p).is_meta for p in model.parameters())
    for what, call in {
        "no_model": lambda: load_pretrained(fresh(), tmp),
        "key_map": lambda: load_pretrained(fresh(), good, key_map=lambda n: "nope.weight" if "norm" in n else None),
        "not_sharded": lambda: load_pretrained(nn.Linear(2, 2), good),
    }.items():
        try:
            call()
            out[what] = None
        except Exception as e:  # noqa: BLE001
            out[what] = f"{type(e).__name__}: {e}"
    return out


def test_load_pretrained_refusals_name_every_problem(tmp_path):
    (r,) = run_ranks(_refusals, 1, str(tmp_path))
    message = r["bad"]
    assert message is not None and "nothing was allocated or written" in message
    for needle in (
        "frozen parameter 'base_model.model.model.norm.weight' is missing from the file",
        "file tensor 'model.extra.weight' matches no parameter",
        "shape of 'base_model.model.model.layers.0.mlp.up_proj.weight': model (128, 64), file "
        "'model.layers.0.mlp.up_proj.weight' (5, 5)",
        "dtype of 'base_model.model.model.embed_tokens.weight': model torch.float32, file "
        "'model.embed_tokens.weight' torch.int32",
    ):
        assert needle in message, (needle, message)
    assert r["still_meta"], "a refused load allocated or wrote parameters"
    assert r["no_model"].startswith("CheckpointLayoutError") and "holds no Hugging Face safetensors model" in r["no_model"]
    assert "key_map maps 'base_model.model.model.layers.0.input_layernorm.weight' to 'nope.weight'" in r["key_map"]
    assert r["not_sharded"].startswith("PolicyError") and "shard_with_freezing" in r["not_sharded"]


# ---------------------------------------------------------------------------------------- host memory
class _Stack(nn.Module):
    def __init__(self, n: int, dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(dim, dim, bias=False) for _ in range(n))


def _host_memory(rank: int, world: int, directory: str, n: int, dim: int) -> dict:
    with torch.device("meta"):
        model = _Stack(n, dim)
    model.requires_grad_(False)
    model = shard_with_freezing(model, mesh_1d(world), FreezePolicy(units=["layers.*"]))
    torch.distributed.barrier()
    reset_rss_peak()  # the RSS high-water mark (VmHWM) restarts from now
    before = rss_bytes("VmRSS")
    load_pretrained(model, directory)
    peak = rss_bytes("VmHWM") - before
    shard = sum(local_tensor(p).untyped_storage().nbytes() for p in model.parameters())
    return {"peak": peak, "shard": shard}


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc/self/clear_refs")
def test_load_pretrained_host_memory_stays_near_the_shard(tmp_path):
    from safetensors.torch import save_file

    n, dim = 48, 1024  # 48 weights of 4 MiB: 192 MiB in all
    torch.manual_seed(0)
    save_file({f"layers.{i}.weight": torch.randn(dim, dim) for i in range(n)}, str(tmp_path / "model.safetensors"))
    whole = n * dim * dim * 4
    results = run_ranks(_host_memory, 2, str(tmp_path), n, dim)
    for r in results:
        assert r["shard"] == whole // 2
        # Own shards + about one tensor's rows + a fixed overhead (allocator, safetensors): measured and
        # stated in docs/pretrained.md; the target is <= 0.6x of the whole model per rank.
        assert r["peak"] <= 0.6 * whole, (r, whole)
        assert r["peak"] <= r["shard"] + dim * dim * 4 + 16 * 2**20, (r, whole)


def _cuda_seeds(rank: int, world: int, directory: str) -> list:
    """load_pretrained initialises adapters with the host generator only (issue 23, 8): every call
    that would reseed a CUDA generator is recorded."""
    calls = []
    originals = (torch.cuda.manual_seed_all, torch.cuda.manual_seed)
    torch.cuda.manual_seed_all = lambda seed: calls.append(("manual_seed_all", seed))
    torch.cuda.manual_seed = lambda seed: calls.append(("manual_seed", seed))
    try:
        model = shard_with_freezing(_peft(_build_meta("llama", False, "meta"), "lora", "llama"), mesh_1d(world),
                                    _policy("lora", "llama", None))
        initialised = load_pretrained(model, directory)
    finally:
        torch.cuda.manual_seed_all, torch.cuda.manual_seed = originals
    return [calls, len(initialised)]


@pytest.mark.skipif(HF_MISSING, reason="needs the hf extra (transformers, peft, safetensors)")
def test_load_pretrained_leaves_cuda_generators_alone(tmp_path):
    directory = save_tiny(str(tmp_path / "llama"), "llama")
    for calls, initialised in run_ranks(_cuda_seeds, 2, directory):
        assert initialised > 0  # adapters were initialised, so the seeding ran
        assert calls == [], calls
