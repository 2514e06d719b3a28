"""Activation offloading (recipes/offload.py): the checkpointed blocks' inputs leave the device in the
forward and come back for the backward, and training is bitwise the same.

On the CPU the hook copies each saved tensor to a new CPU tensor: the packing path runs and is counted,
nothing is saved. The CUDA path (pinned memory, a side stream, ``record_stream``) runs on a GPU only: the
CUDA tier (tests/test_cuda.py) runs `train` and `check_bitwise` there.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from fsdp_frozen import FreezePolicy, shard_with_freezing

from .common import full_state, mesh_1d
from .dist_harness import run_ranks

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
from loss import causal_lm_loss, shifted_targets  # noqa: E402
from offload import OffloadActivations  # noqa: E402

HF_MISSING = any(importlib.util.find_spec(m) is None for m in ("transformers", "peft"))
LAYERS = 3


#: how the blocks are checkpointed, and the frozen storage: HF's non-reentrant gradient checkpointing in
#: fp32; torch's checkpoint_wrapper around each block (what torchtitan and torchtune apply) with NF4
#: frozen weights and bf16 compute (QLoRA, where offloading matters most); checkpoint_wrapper around
#: compiled blocks
VARIANTS = {"hf_gc": {}, "checkpoint_wrapper_nf4": {"frozen_dtype": "nf4", "param_dtype": "bfloat16",
                                                    "reduce_dtype": "float32", "nf4_block_size": 32,
                                                    "nf4_scaler_block_size": 16},
            "checkpoint_wrapper_compile": {}}


def _model(variant: str) -> nn.Module:
    from peft import LoraConfig, get_peft_model
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    if variant == "hf_gc":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    for name, p in model.named_parameters():  # B = 0 would make the adapters' first step trivial
        if "lora_B" in name:
            nn.init.normal_(p, std=0.02)
    if variant != "hf_gc":
        layers = model.base_model.model.model.layers
        for i in range(len(layers)):
            if variant.endswith("compile"):
                layers[i].compile(backend="eager")
            layers[i] = checkpoint_wrapper(layers[i])
    return model


def train(rank: int, world: int, variant: str = "hf_gc", device: str = "cpu") -> dict:
    """3 steps without, then with, the hook: losses, full states (on the host) and what the hook moved.
    The model is built on the CPU; `shard_with_freezing` moves it to the mesh's device."""
    from torch.distributed.device_mesh import init_device_mesh

    out = {}
    for offload in (False, True):
        mesh = mesh_1d(world) if device == "cpu" else init_device_mesh(device, (world,))
        model = shard_with_freezing(_model(variant), mesh,
                                    FreezePolicy(units=["LlamaDecoderLayer"], **VARIANTS[variant]))
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses, counts = [], []
        for step in range(3):
            ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(step * world + rank))
            ids = ids.to(device)
            hook = OffloadActivations(min_bytes=0)
            with hook if offload else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
                loss = causal_lm_loss(model, shifted_targets(ids), input_ids=ids, chunks=2)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            counts.append((hook.offloaded, hook.offloaded_bytes))
        out[offload] = {"losses": losses, "state": {k: v.cpu() for k, v in full_state(model).items()},
                        "counts": counts}
    return out


def check_bitwise(results: list[dict], variant: str) -> None:
    """`train`'s results of every rank: offloaded training is bitwise the plain one, and every
    checkpointed block's input went through the hook."""
    for rank, r in enumerate(results):
        plain, offloaded = r[False], r[True]
        assert offloaded["losses"] == plain["losses"], rank
        assert all(torch.equal(plain["state"][k], v) for k, v in offloaded["state"].items()), rank
        # every checkpointed block's input went through the hook (2 x 16 tokens x 64 x 4 bytes (fp32) or 2
        # (bf16) each), besides the few tensors saved outside the blocks (the final norm's, the loss's); no
        # parameter
        itemsize = 2 if VARIANTS[variant].get("param_dtype") == "bfloat16" else 4
        for n, nbytes in offloaded["counts"]:
            assert n >= LAYERS and nbytes >= LAYERS * 2 * 16 * 64 * itemsize, (n, nbytes)


@pytest.mark.skipif(HF_MISSING, reason="needs transformers and peft")
@pytest.mark.parametrize("world,variant", [(1, "hf_gc"), (2, "hf_gc"), (2, "checkpoint_wrapper_nf4"),
                                           (2, "checkpoint_wrapper_compile")])
def test_offloaded_activations_train_bitwise_the_same(world, variant):
    check_bitwise(run_ranks(train, world, variant), variant)


def test_offload_skips_parameters_subclasses_and_small_tensors():
    weight = nn.Parameter(torch.randn(8, 8))
    x = torch.randn(4, 8, requires_grad=True)
    hook = OffloadActivations(min_bytes=64)
    with hook:
        y = (x @ weight).sum() + (x[:1, :1] * 2).sum()  # x and weight saved by the matmul; a 4-byte slice by mul
    y.backward()
    assert hook.offloaded == 1 and hook.offloaded_bytes == 4 * 8 * 4  # x only: not the parameter, not the slice
    ref = x.detach().clone().requires_grad_()
    ((ref @ weight).sum() + (ref[:1, :1] * 2).sum()).backward()
    assert torch.equal(x.grad, ref.grad)
