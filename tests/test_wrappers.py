"""Models as users wrap them: activation checkpointing and torch.compile keep one name per parameter.

For each wrapper: the plan, describe and the checkpoint keys use canonical names (as without the
wrapper), a second ``frozen="auto"`` save writes no frozen tensor, and a resume is bitwise.
"""

from __future__ import annotations

import importlib.util
import os
import traceback

import pytest
import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing, checkpoint_wrapper
from torch.distributed.checkpoint import FileSystemReader
from torch.utils.checkpoint import checkpoint

from fsdp_frozen import FreezePolicy, describe, shard_with_freezing
from fsdp_frozen.apply import sharded_state
from fsdp_frozen.checkpoint import CheckpointLayoutError, load_checkpoint, read_manifest, save_checkpoint
from fsdp_frozen.checkpoint.keys import checkpoint_key, model_kinds

from .common import adamw, full_state, hf_train, mesh_1d, train
from .dist_harness import run_ranks
from .models import Block, make_model

HF_MISSING = importlib.util.find_spec("transformers") is None


class _InnerCheckpoint(nn.Module):
    """A block whose forward calls torch.utils.checkpoint itself (no wrapper module, no name change)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.inner = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.inner, x, use_reentrant=False)


def _wrap(model: nn.Module, how: str) -> nn.Module:
    layers = model.layers
    if how == "checkpoint_wrapper":
        for i in range(len(layers)):
            layers[i] = checkpoint_wrapper(layers[i])
    elif how == "apply_activation_checkpointing":
        apply_activation_checkpointing(model, checkpoint_wrapper_fn=checkpoint_wrapper,
                                       check_fn=lambda m: isinstance(m, Block))
    elif how == "torch.compile(block)":  # the block replaced by its OptimizedModule (names gain _orig_mod.)
        for i in range(len(layers)):
            layers[i] = torch.compile(layers[i], backend="eager")
    elif how == "block.compile()":
        for layer in layers:
            layer.compile(backend="eager")
    elif how == "ac+compile":  # torchtitan's order: AC, then compile, then FSDP
        for i in range(len(layers)):
            layers[i] = torch.compile(checkpoint_wrapper(layers[i]), backend="eager")
    return model


WRAPPERS = ["checkpoint_wrapper", "apply_activation_checkpointing", "torch.compile(block)", "block.compile()",
            "ac+compile"]


def _build(world: int, how: str | None, seed: int = 0, replicate: bool = False) -> nn.Module:
    """`replicate`: adapters replicated and frozen groups `never`, so kept whole outside FSDP and the
    units left without fully_shard (a checkpoint-wrapped block then recomputes in backward with the
    replicated group's compute copies still in its slots)."""
    model = make_model(seed)
    if how is not None:
        _wrap(model, how)
    policy = (FreezePolicy(units=["layers.*"], frozen_reshard="never", trainable_grouping="replicate") if replicate
              else FreezePolicy(units=["layers.*"], frozen_reshard="after_backward"))
    return shard_with_freezing(model, mesh_1d(world), policy)


def _keys(path: str) -> list[str]:
    return sorted(FileSystemReader(path).read_metadata().state_dict_metadata)


def _scenario(rank: int, world: int, tmp: str, how: str | None, replicate: bool = False) -> dict:
    tag = (how or "plain").replace("(", "_").replace(")", "").replace(".", "_").replace("+", "_")
    tag += "_replicate" if replicate else ""
    model = _build(world, how, replicate=replicate)
    state = sharded_state(model)
    opt = adamw(model)
    losses = train(model, 2, rank, opt=opt)
    first = save_checkpoint(os.path.join(tmp, tag, "step_2"), model, opt, extra={"step": 2})
    losses += train(model, 1, rank, opt=opt, start=2)
    second = save_checkpoint(os.path.join(tmp, tag, "step_3"), model, opt, extra={"step": 3})
    fresh = _build(world, how, seed=1, replicate=replicate)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    load_checkpoint(second, fresh, fresh_opt)
    want, got = full_state(model), full_state(fresh)
    same_params = want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    resumed = train(fresh, 2, rank, opt=fresh_opt, start=3)
    continued = train(model, 2, rank, opt=opt, start=3)
    return {
        "losses": losses,
        "first_keys": _keys(first),
        "second_keys": _keys(second),
        "second_frozen_state": read_manifest(second)["frozen_state"],
        "manifest_params": sorted(read_manifest(first)["params"]),
        "describe_params": sorted(p for r in describe(model) for p in r.params),
        "same_params": same_params,
        "resume_bitwise": resumed == continued,
        "layout": (state.replicated is not None, len(state.plan.units_without_fsdp)),
    }


def _all_wrappers(rank: int, world: int, tmp: str, wrappers: list[str] = WRAPPERS, replicate: bool = False) -> dict:
    out = {"plain": _scenario(rank, world, tmp, None, replicate)}
    for how in wrappers:
        try:
            out[how] = _scenario(rank, world, tmp, how, replicate)
        except Exception:  # noqa: BLE001 - reported per wrapper by the parent
            out[how] = traceback.format_exc()
    return out


def _failures(results: dict, wrappers: list[str]) -> list[str]:
    """What differs, per wrapper, from the unwrapped model of the same run (rank 0's view)."""
    plain, failures = results["plain"], []
    for how in wrappers:
        got = results[how]
        if isinstance(got, str):
            failures.append(f"{how}: raised\n{got}")
            continue
        checks = {
            "keys equal the unwrapped model's": got["first_keys"] == plain["first_keys"],
            "second auto save references the base": got["second_frozen_state"] == "referenced",
            "second save writes no frozen tensor": not any(k.startswith("frozen/") for k in got["second_keys"]),
            "manifest names equal": got["manifest_params"] == plain["manifest_params"],
            "describe names equal": got["describe_params"] == plain["describe_params"],
            "losses equal the unwrapped model's": got["losses"] == plain["losses"],
            "loaded parameters bitwise": got["same_params"],
            "resume bitwise": got["resume_bitwise"],
            "same layout": got["layout"] == plain["layout"],
        }
        failures += [f"{how}: {what}" for what, ok in checks.items() if not ok]
    return failures


def test_wrapped_blocks_checkpoint_as_unwrapped(tmp_path):
    results = run_ranks(_all_wrappers, 2, str(tmp_path))
    plain = results[0]["plain"]
    assert any(k.startswith("frozen/layers.0.") for k in plain["first_keys"])
    assert not any(k.startswith("buffers/layers.") for k in plain["first_keys"])
    assert plain["layout"] == (False, 0)
    failures = _failures(results[0], WRAPPERS)
    assert not failures, "\n".join(failures)


@pytest.mark.split_layout
def test_wrapped_blocks_under_replicate(tmp_path):
    """The same under trainable_grouping="replicate" with `never` frozen groups: the adapters whole
    outside FSDP, the frozen groups whole too and the blocks without fully_shard, wrapped for
    activation checkpointing (recomputed in backward) and compiled after it."""
    wrappers = ["checkpoint_wrapper", "ac+compile"]
    results = run_ranks(_all_wrappers, 2, str(tmp_path), wrappers, True)
    plain = results[0]["plain"]
    assert plain["layout"] == (True, 3), plain["layout"]  # every block (3) left without fully_shard
    assert any(k.startswith("frozen/layers.0.") for k in plain["first_keys"])
    failures = _failures(results[0], wrappers)
    assert not failures, "\n".join(failures)


# ----------------------------------------------------------------------------------- one process
def test_wrapped_plan_uses_canonical_names():
    from fsdp_frozen.plan import build_plan

    plain = build_plan(make_model(), FreezePolicy(units=["layers.*"]), shard_size=2)
    for how in WRAPPERS:
        plan = build_plan(_wrap(make_model(), how), FreezePolicy(units=["layers.*"]), shard_size=2)
        assert plan.units == plain.units, how
        assert [g.params for g in plan.groups] == [g.params for g in plain.groups], how
        assert plan.frozen == plain.frozen, how
    # Class-name units name the outermost module (the wrapper): FSDP hooks run outside AC/compile.
    wrapped = _wrap(make_model(), "ac+compile")
    plan = build_plan(wrapped, FreezePolicy(units=["Block"]), shard_size=2)
    assert plan.units == ("layers.0", "layers.1", "layers.2", "")
    assert plan.path("layers.0") == "layers.0"
    assert plan.path("layers.0.attn.base_layer.weight") == (
        "layers.0._orig_mod._checkpoint_wrapped_module.attn.base_layer.weight")
    # freeze / unfreeze patterns match canonical names (and module paths).
    plan = build_plan(_wrap(make_model(), "torch.compile(block)"),
                      FreezePolicy(units=["layers.*"], freeze=["layers.0.attn.lora_A.weight"]), shard_size=2)
    assert "layers.0.attn.lora_A.weight" in plan.frozen


def test_unknown_state_dict_entry_is_an_error():
    model = _wrap(make_model(), "torch.compile(block)")
    kinds = model_kinds(model)
    # A module path (with _orig_mod.) finds its canonical key; an unknown name is an error naming it.
    assert checkpoint_key(("layers.0._orig_mod.attn.lora_A.weight",), kinds) == "trainable/layers.0.attn.lora_A.weight"
    assert checkpoint_key(("model", "layers.0._orig_mod.norm.weight"), kinds) == "frozen/layers.0.norm.weight"
    with pytest.raises(CheckpointLayoutError, match=r"'model\.layers\.0\.attn\.nope\.weight' is neither a parameter"):
        checkpoint_key(("model", "layers.0.attn.nope.weight"), kinds)
    with pytest.raises(CheckpointLayoutError, match=r"'layers\.9\.norm\.weight' is neither a parameter nor a buffer"):
        checkpoint_key(("layers.9.norm.weight",), kinds)
    assert checkpoint_key(("step",), kinds) == "extra/step"  # an undotted top-level entry is extra state


class _WithExtraState(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def get_extra_state(self):
        return {"scale": 1.0}

    def set_extra_state(self, state) -> None:
        pass


def test_extra_state_is_model_state():
    model = nn.Sequential(_WithExtraState())
    kinds = model_kinds(checkpoint_wrapper(model))
    assert kinds["0._extra_state"] == "buffers"
    assert checkpoint_key(("model", "0._extra_state"), kinds) == "buffers/0._extra_state"


# ------------------------------------------------------------------------ transformers' own AC
def _hf_gradient_checkpointing(rank: int, world: int, tmp: str) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    def build(gc: bool, seed: int = 0):
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
        model = LlamaForCausalLM(cfg)
        if gc:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        for n, p in model.named_parameters():
            p.requires_grad_("mlp" in n)
        model = shard_with_freezing(model, mesh_1d(world), FreezePolicy(units=["model.layers.*"]))
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2)

    def steps(model, opt, start: int, n: int) -> list[float]:
        return hf_train(model, opt, rank, start, n, 32)

    out = {}
    for gc in (False, True):
        model, opt = build(gc)
        losses = steps(model, opt, 0, 2)
        first = save_checkpoint(os.path.join(tmp, f"gc{gc}", "a"), model, opt)
        second = save_checkpoint(os.path.join(tmp, f"gc{gc}", "b"), model, opt)
        fresh, fresh_opt = build(gc, seed=1)
        load_checkpoint(second, fresh, fresh_opt)
        resumed = steps(fresh, fresh_opt, 2, 2) == steps(model, opt, 2, 2)
        out[gc] = {"losses": losses, "keys": _keys(first), "second_keys": _keys(second), "resume_bitwise": resumed}
    return out


@pytest.mark.skipif(HF_MISSING, reason="needs the 'hf' extra: pip install -e '.[hf]'")
def test_transformers_gradient_checkpointing(tmp_path):
    (result, _) = run_ranks(_hf_gradient_checkpointing, 2, str(tmp_path))
    assert result[True]["keys"] == result[False]["keys"]
    assert any(k.startswith("frozen/model.layers.0.self_attn.") for k in result[True]["keys"])
    assert not any(k.startswith("frozen/") for k in result[True]["second_keys"])
    assert result[True]["resume_bitwise"] and result[False]["resume_bitwise"]
    assert result[True]["losses"] == result[False]["losses"]
