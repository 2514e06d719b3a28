"""The configuration matrix: a generated pairwise covering of the options users combine.

Dimensions (`DIMENSIONS`): model family x wrapper x frozen policy x trainable grouping x precision x
build path x how units are named x coalescing x ranks (1: the shard-size-1 layout, frozen groups kept out
of FSDP, [Note: whole frozen groups]; 2; HSDP, 2 replicas x 2 shards; an int ``frozen_reshard`` runs on
4). `cases()` covers every pair of values of any two dimensions that some valid case can hold (a greedy
covering, ties broken by the cheaper case, then ``random.Random(SEED)``), so adding a value to a
dimension adds the cases that pair it with every other value. Combinations the package
refuses (`REFUSED`) are left out of the covering and get one case each that asserts the refusal.

Each case (`run_case`, on the ranks) builds the model as a user does, shards it with
`shard_with_freezing` and a reference with plain FSDP2 (same units, wrapper and
``MixedPrecisionPolicy``, trainable values copied from ours), then checks: 3 AdamW steps against the
reference; frozen parameters without ``.grad`` or optimizer state and bitwise unchanged; `describe`
renders and its all-gathers per step equal the counted ones; PEFT's ``disable_adapter()`` logits
against the reference's (the reference-model path of DPO/GRPO trainers); save, load into a fresh
model, bitwise parameters and next step; `refreeze` that also unfreezes the final norm, then a step
that moves it. The parent (`tests/test_matrix.py`) also runs `estimate` with the same policy.
"""

from __future__ import annotations

import itertools
import os
import random
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.distributed.tensor import DTensor

from fsdp_frozen import FreezePolicy, PolicyError, describe, refreeze, shard_with_freezing
from fsdp_frozen._torch_compat import has_fsdp_state, local_tensor, sharded_param, split_groups_supported
from fsdp_frozen.storage import is_nf4
from fsdp_frozen.apply import sharded_state, state_or_none
from fsdp_frozen.checkpoint import load_checkpoint, load_pretrained, save_checkpoint

from .common import CommCounter, mesh_1d, plain_fsdp
from .models import batch, make_model

SEED = 0  #: tie-breaks of the covering
STEPS = 3
HF_FAMILIES = ("llama_lora", "gpt2_lora", "qwen2_dora", "mixtral_lora", "llama_ia3")
DIMENSIONS: dict[str, tuple] = {
    "family": ("toy", "bitfit", "partial", *HF_FAMILIES),
    "wrapper": ("none", "checkpoint_wrapper", "compile", "hf_gradient_checkpointing"),
    "frozen_reshard": ("after_forward", "after_backward", "never", 2, "auto"),
    "trainable_grouping": ("auto", "per_unit", "root", "replicate"),
    "precision": ("fp32", "bf16", "bf16_fp32_frozen", "nf4"),
    "build": ("real", "meta"),
    "units": ("glob", "class"),
    "coalesce": (False, True),  #: FreezePolicy.coalesce_frozen
    #: world size (an int frozen_reshard: 4); at 1 frozen groups leave FSDP ([Note: whole frozen groups]);
    #: "hsdp": 4 ranks, 2 replicas x 2 shards (mesh dims "replicate", "shard")
    "ranks": (2, 1, "hsdp"),
}
#: frozen_reshard="auto" keeps gathered what fits in this many bytes per rank (some groups, not all)
AUTO_BUDGET = 40_000
#: (dimension, value, dimension, value) pairs shard_with_freezing refuses, with what the error names
REFUSED: dict[tuple, tuple[str, ...]] = {
    ("frozen_reshard", 2, "precision", "nf4"): ("frozen_reshard", "nf4"),
}
#: Tolerances against the reference, by precision. fp32 and bf16 compute on the same values are
#: bitwise (the same casts in the same places; asserted as 0). NF4 is compared with plain FSDP2 in
#: bf16 on the unquantized weights: the 4-bit quantization error of tiny random weights (~10% of a
#: weight's scale per element) moves the loss by up to a few percent.
LOSS_RTOL = {"fp32": 0.0, "bf16": 0.0, "bf16_fp32_frozen": 0.0, "nf4": 0.05}
#: adapters-disabled logits against the reference's, as a share of their largest magnitude. NF4: the
#: logits of a 2-layer model on 4-bit weights move by up to ~15% of their scale (measured: 14% on
#: Mixtral), against the ~100% an unrelated model would give
LOGITS_RTOL = {"fp32": 0.0, "bf16": 0.0, "bf16_fp32_frozen": 0.0, "nf4": 0.25}
NF4_BLOCKS = {"nf4_block_size": 32, "nf4_scaler_block_size": 16}
HF_VOCAB = 128
#: torch < 2.12's structural fallback (frozen-only submodules as their own fully_shard groups), the
#: path torch 2.6-2.11 users and the lent GPU take; FSDP_FROZEN_FORCE_FALLBACK=1 forces it on 2.13
FALLBACK = os.environ.get("FSDP_FROZEN_FORCE_FALLBACK") == "1" or not split_groups_supported()
#: what the fallback refuses beyond `REFUSED`: a replicated trainable group when the root module holds
#: frozen and trainable parameters together (torch < 2.12 cannot split them), naming what to use instead
FALLBACK_REFUSAL = ("trainable_grouping='replicate'", "use trainable_grouping='root' or 'per_unit'")


@dataclass(frozen=True)
class Case:
    family: str
    wrapper: str
    frozen_reshard: str | int
    trainable_grouping: str
    precision: str
    build: str
    units: str
    coalesce: bool = False
    ranks: int = 2

    @property
    def world(self) -> int:
        return 4 if isinstance(self.frozen_reshard, int) or self.ranks == "hsdp" else self.ranks

    def mesh(self):
        """The case's device mesh (call on the ranks): 1-D, or HSDP's 2 x 2."""
        if self.ranks == "hsdp":
            return init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
        return mesh_1d(self.world)

    @property
    def refused(self) -> tuple[str, ...] | None:
        for (d1, v1, d2, v2), names in REFUSED.items():
            if getattr(self, d1) == v1 and getattr(self, d2) == v2:
                return names
        return None

    @property
    def id(self) -> str:
        return "-".join(str(getattr(self, d)) for d in DIMENSIONS)


def _valid(values: dict[str, Any]) -> bool:
    """Cases that exist: HF gradient checkpointing is a transformers method; an int frozen_reshard
    (reshard to N-rank groups of the 1-D mesh) needs more ranks than one, and on HSDP 2 x 2 it would be
    the shard size (FSDP2 takes that as True: nothing of its own to test)."""
    if values.get("ranks") in (1, "hsdp") and isinstance(values["frozen_reshard"], int):
        return False
    return not (values["wrapper"] == "hf_gradient_checkpointing" and values["family"] not in HF_FAMILIES)


def _cost(case: Case) -> int:
    """Roughly what a case costs to run on 2 cores: ranks (processes sharing them) x 3 for compile x 2
    for a transformers model."""
    return case.world * (3 if case.wrapper == "compile" else 1) * (2 if FAMILIES[case.family].hf else 1)


def cases() -> list[Case]:
    """Every valid pair of values covered by some case (greedy: the case covering the most pairs not yet
    covered, the cheapest of those (`_cost`), then a seeded random one); then one case per refused pair."""
    names = list(DIMENSIONS)
    pool = []
    for combo in itertools.product(*DIMENSIONS.values()):
        values = dict(zip(names, combo))
        if _valid(values) and Case(**values).refused is None:
            pool.append((Case(**values), frozenset(_pairs(values))))
    uncovered = set().union(*(p for _, p in pool))
    rng = random.Random(SEED)
    chosen = []
    while uncovered:
        best = max(len(p & uncovered) for _, p in pool)
        candidates = [(c, p) for c, p in pool if len(p & uncovered) == best]
        cheapest = min(_cost(c) for c, _ in candidates)
        case, pairs = rng.choice([(c, p) for c, p in candidates if _cost(c) == cheapest])
        chosen.append(case)
        uncovered -= pairs
    for (d1, v1, d2, v2) in REFUSED:  # one case per refusal, the rest as the first chosen case has it
        chosen.append(Case(**{**vars(chosen[0]), d1: v1, d2: v2}))
    return chosen


def _pairs(values: dict[str, Any]) -> list[tuple]:
    items = list(values.items())
    return [(a, va, b, vb) for (a, va), (b, vb) in itertools.combinations(items, 2)]


# --------------------------------------------------------------------------------------------- models
@dataclass
class Family:
    """How a family is built, named and fed."""

    hf: bool
    glob: list[str]  #: units as FQN globs
    classes: list[str]  #: units as class names
    norm: list[str]  #: the final norm's parameters (canonical names), unfrozen by refreeze
    freeze: list[str]  #: FreezePolicy.freeze (the builder sets requires_grad alike, for the reference)
    unfreeze: list[str]


FAMILIES = {
    "toy": Family(False, ["layers.*"], ["Block"], ["norm.weight", "norm.bias"], [], []),
    "bitfit": Family(False, ["layers.*"], ["Block"], ["norm.weight"], ["**.weight", "scale"], ["**.bias"]),
    "partial": Family(False, ["layers.*"], ["Block"], ["norm.weight", "norm.bias"], ["**"], ["layers.1.**"]),
    "llama_lora": Family(True, ["base_model.model.model.layers.*"], ["LlamaDecoderLayer"],
                         ["base_model.model.model.norm.weight"], [], []),
    "gpt2_lora": Family(True, ["base_model.model.transformer.h.*"], ["GPT2Block"],
                        ["base_model.model.transformer.ln_f.weight", "base_model.model.transformer.ln_f.bias"], [], []),
    "qwen2_dora": Family(True, ["base_model.model.model.layers.*"], ["Qwen2DecoderLayer"],
                         ["base_model.model.model.norm.weight"], [], []),
    "mixtral_lora": Family(True, ["base_model.model.model.layers.*"], ["MixtralDecoderLayer"],
                           ["base_model.model.model.norm.weight"], [], []),
    "llama_ia3": Family(True, ["base_model.model.model.layers.*"], ["LlamaDecoderLayer"],
                        ["base_model.model.model.norm.weight"], [], []),
}


def hf_config(family: str):
    if family == "gpt2_lora":  # Conv1D layers (PEFT's fan_in_fan_out), tied embeddings, no dropout
        from transformers import GPT2Config

        return GPT2Config(vocab_size=HF_VOCAB, n_embd=64, n_layer=2, n_head=2, n_positions=64, resid_pdrop=0.0,
                          embd_pdrop=0.0, attn_pdrop=0.0)
    common = dict(vocab_size=HF_VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, max_position_embeddings=64)
    if family == "qwen2_dora":
        from transformers import Qwen2Config

        return Qwen2Config(intermediate_size=128, **common)
    if family == "mixtral_lora":  # 4 experts, top-2: LoRA on attention, experts frozen
        from transformers import MixtralConfig

        return MixtralConfig(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, **common)
    from transformers import LlamaConfig

    return LlamaConfig(intermediate_size=128, **common)


def _hf_class(family: str):
    import transformers

    name = {"gpt2_lora": "GPT2LMHeadModel", "qwen2_dora": "Qwen2ForCausalLM",
            "mixtral_lora": "MixtralForCausalLM"}.get(family, "LlamaForCausalLM")
    return getattr(transformers, name)


def save_hf(tmp: str, family: str) -> str:
    """The pretrained base of `family` written with save_pretrained (once, by the caller)."""
    directory = os.path.join(tmp, family)
    if not os.path.isdir(directory):
        torch.manual_seed(0)
        _hf_class(family)(hf_config(family)).save_pretrained(directory)
    return directory


def save_toy(tmp: str) -> str:
    """The in-repo model's weights as a safetensors file (what load_pretrained reads)."""
    from safetensors.torch import save_file

    directory = os.path.join(tmp, "toy")
    if not os.path.isdir(directory):
        os.makedirs(directory)
        state = {k: v.contiguous() for k, v in make_model(0, dim=64).state_dict().items()}
        save_file(state, os.path.join(directory, "model.safetensors"))
    return directory


def _peft_config(family: str):
    from peft import IA3Config, LoraConfig

    if family == "llama_ia3":  # vectors in ParameterDicts: one scales k/v outputs, one down_proj's input
        return IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    if family == "gpt2_lora":
        return LoraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    if family == "mixtral_lora":
        return LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    return LoraConfig(r=4, target_modules=["q_proj", "v_proj", "gate_proj"], use_dora=family == "qwen2_dora")


def _layers(model: nn.Module, family: str) -> nn.ModuleList:
    if FAMILIES[family].hf:
        inner = model.base_model.model
        return inner.transformer.h if family == "gpt2_lora" else inner.model.layers
    return model.layers


def build_model(case: Case, tmp: str, meta: bool) -> nn.Module:
    """The unsharded model as the user has it: weights (or meta), requires_grad, PEFT, the wrapper."""
    fam = FAMILIES[case.family]
    if fam.hf:
        from peft import get_peft_model

        if meta:
            with torch.device("meta"):
                base = _hf_class(case.family)(hf_config(case.family))
        else:
            base = _hf_class(case.family).from_pretrained(os.path.join(tmp, case.family))
        torch.manual_seed(1)  # the adapters' init, alike in ours and the reference
        model = get_peft_model(base, _peft_config(case.family))
    else:
        if meta:
            with torch.device("meta"):
                model = make_model(0, dim=64)
        else:
            model = make_model(0, dim=64)
        if case.family == "bitfit":
            for name, p in model.named_parameters():
                p.requires_grad_(name.endswith(".bias"))
        elif case.family == "partial":
            for name, p in model.named_parameters():
                p.requires_grad_(name.startswith("layers.1."))
    layers = _layers(model, case.family)
    if case.wrapper == "checkpoint_wrapper":
        for i in range(len(layers)):
            layers[i] = checkpoint_wrapper(layers[i])
    elif case.wrapper == "compile":
        for layer in layers:
            layer.compile(backend="eager")
    elif case.wrapper == "hf_gradient_checkpointing":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def policy_of(case: Case, **extra: Any) -> FreezePolicy:
    fam = FAMILIES[case.family]
    fields: dict[str, Any] = {
        "units": fam.glob if case.units == "glob" else fam.classes,
        "frozen_reshard": case.frozen_reshard,
        "trainable_grouping": case.trainable_grouping,
        "coalesce_frozen": case.coalesce,
    }
    if fam.freeze:
        fields.update(freeze=fam.freeze, unfreeze=fam.unfreeze)
    if case.frozen_reshard == "auto":
        fields["frozen_budget_bytes"] = AUTO_BUDGET
    if case.precision != "fp32":
        fields.update(param_dtype="bfloat16", reduce_dtype="float32",
                      frozen_dtype={"bf16": "bfloat16", "bf16_fp32_frozen": "float32", "nf4": "nf4"}[case.precision])
    if case.precision == "nf4":
        fields.update(NF4_BLOCKS)
    for key, value in extra.items():
        fields[key] = [*fields.get(key, []), *value] if isinstance(value, list) else value
    return FreezePolicy(**fields)


def mp_policy_of(case: Case) -> MixedPrecisionPolicy:
    if case.precision == "fp32":
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


# ------------------------------------------------------------------------------------------ the case
def _inputs(case: Case, step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    if FAMILIES[case.family].hf:
        ids = torch.randint(0, HF_VOCAB, (2, 8), generator=torch.Generator().manual_seed(1000 * step + rank))
        return ids, ids
    return batch(step, rank)


def _loss(model: nn.Module, case: Case, step: int, rank: int) -> torch.Tensor:
    x, y = _inputs(case, step, rank)
    if FAMILIES[case.family].hf:
        return model(input_ids=x, labels=y).loss
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))


def _logits(model: nn.Module, case: Case, rank: int) -> torch.Tensor:
    x, _ = _inputs(case, 99, rank)
    with torch.no_grad():
        out = model(input_ids=x).logits if FAMILIES[case.family].hf else model(x)
    return out.float()


def _step(model: nn.Module, opt: torch.optim.Optimizer, case: Case, step: int, rank: int) -> dict[str, Any]:
    loss = _loss(model, case, step, rank)
    loss.backward()
    params = _params(model)
    frozen_with_grad = [n for n, p in params.items() if not p.requires_grad and p.grad is not None]
    opt.step()
    with_state = {id(p) for p in opt.state if opt.state[p]}
    frozen_with_state = [n for n, p in params.items() if not p.requires_grad and id(p) in with_state]
    opt.zero_grad(set_to_none=True)
    return {"loss": loss.detach().float().item(), "frozen_with_grad": frozen_with_grad,
            "frozen_with_state": frozen_with_state}


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter by name, FSDP's as their sharded DTensors: a root or "never" group keeps its
    unsharded parameters registered after a forward. Ours are read from FSDP's records (nothing
    resharded: what the next step sees stays as it is); the plain FSDP2 reference is resharded."""
    state = state_or_none(model)
    if state is None:
        for module in model.modules():
            if has_fsdp_state(module):
                module.reshard()
        return dict(model.named_parameters())
    records = state.fsdp_params
    return {n: sharded_param(records[state.plan.names.canonical(n)]) if state.plan.names.canonical(n) in records
            else p for n, p in model.named_parameters()}


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """Whole copies of the trainable parameters (collective for DTensors)."""
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().float().clone()
            for n, p in _params(model).items() if p.requires_grad}


def _local_frozen(model: nn.Module) -> dict[str, list[torch.Tensor]]:
    """This rank's frozen storage (NF4: its inner tensors), for bitwise comparisons."""
    out = {}
    for n, p in _params(model).items():
        if not p.requires_grad:
            local = local_tensor(p)
            inner = local.__tensor_flatten__()[0] if is_nf4(local) else None
            out[n] = [getattr(local, i).clone() for i in inner] if inner else [local.detach().clone()]
    return out


def _equal(a: dict[str, list[torch.Tensor]] | dict[str, torch.Tensor], b) -> list[str]:
    """Names whose tensors differ (or exist on one side only)."""
    bad = sorted(set(a) ^ set(b))
    for k in set(a) & set(b):
        x, y = (a[k], b[k]) if isinstance(a[k], list) else ([a[k]], [b[k]])
        if len(x) != len(y) or not all(s.dtype == t.dtype and torch.equal(s, t) for s, t in zip(x, y)):
            bad.append(k)
    return sorted(bad)


def _ours(case: Case, tmp: str) -> nn.Module:
    model = build_model(case, tmp, meta=case.build == "meta")
    model = shard_with_freezing(model, case.mesh(), policy_of(case))
    if case.build == "meta":
        load_pretrained(model, pretrained_dir(tmp, case.family))
    return model


def pretrained_dir(tmp: str, family: str) -> str:
    """Where `save_hf` / `save_toy` wrote the family's base."""
    return os.path.join(tmp, family if FAMILIES[family].hf else "toy")


def _reference(case: Case, tmp: str, trainable: dict[str, torch.Tensor]) -> nn.Module:
    """Plain FSDP2 on the same units, wrapper and MixedPrecisionPolicy, real weights, our trainable values."""
    model = build_model(case, tmp, meta=False)
    names = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in trainable.items():
            names[name].copy_(value.to(names[name].dtype))
    return plain_fsdp(model, case.mesh(), tuple(policy_of(case).units), mp_policy_of(case))


def _all_gathers(model: nn.Module) -> int:
    return sum(r.own_all_gathers_per_step for r in describe(model))


def run_case(rank: int, world: int, tmp: str, case: Case) -> dict[str, Any]:
    """One case on the ranks; returns what the parent asserts (or the refusal's message)."""
    if FALLBACK:  # what torch < 2.12 gets (the CI tier on 2.13 forces it)
        import fsdp_frozen._torch_compat as compat

        compat.SPLIT_GROUPS_SUPPORTED = False
    if case.refused is not None:
        try:
            _ours(case, tmp)
        except PolicyError as e:
            return {"refused": str(e)}
        return {"refused": None}
    out: dict[str, Any] = {}
    try:
        model = _ours(case, tmp)
    except PolicyError as e:
        if FALLBACK and "cannot split them off" in str(e):  # FALLBACK_REFUSAL
            return {"refused": str(e)}
        raise
    plan = sharded_state(model).plan
    out["grouping"] = plan.trainable_grouping
    # frozen parameters FSDP manages, beyond what the structural fallback leaves in trainable groups: at
    # shard size 1 none unless FSDP casts them ([Note: whole frozen groups])
    out["frozen_in_fsdp"] = sorted((set(sharded_state(model).fsdp_params) & plan.frozen) - set(plan.unsplit))
    out["mesh_ndims"] = sorted({p.device_mesh.ndim for p in model.parameters() if isinstance(p, DTensor)})
    reference = _reference(case, tmp, _trainable(model))
    frozen_before = _local_frozen(model)
    opt, ref_opt = torch.optim.AdamW(model.parameters(), lr=1e-2), torch.optim.AdamW(reference.parameters(), lr=1e-2)
    counter = CommCounter()
    steps, ref_losses = [], []
    for step in range(STEPS):
        if step == STEPS - 1:
            counter.clear()
            with counter:
                steps.append(_step(model, opt, case, step, rank))
        else:
            steps.append(_step(model, opt, case, step, rank))
        ref_losses.append(_step(reference, ref_opt, case, step, rank)["loss"])
    out["losses"] = [s["loss"] for s in steps]
    out["ref_losses"] = ref_losses
    out["frozen_with_grad"] = sorted({n for s in steps for n in s["frozen_with_grad"]})
    out["frozen_with_state"] = sorted({n for s in steps for n in s["frozen_with_state"]})
    out["frozen_changed"] = _equal(frozen_before, _local_frozen(model))
    ours_t, ref_t = _trainable(model), _trainable(reference)
    out["trainable_names_differ"] = sorted(set(ours_t) ^ set(ref_t))
    out["param_max_diff"] = max((float((ours_t[k] - ref_t[k]).abs().max()) for k in ours_t.keys() & ref_t.keys()),
                                default=0.0)
    out["describe"] = str(describe(model))
    out["ag_described"], out["ag_counted"] = _all_gathers(model), counter.total("all_gather", count=True)

    if FAMILIES[case.family].hf:  # the reference model of DPO/GRPO trainers: adapters disabled
        with model.disable_adapter():
            disabled = _logits(model, case, rank)
        with reference.disable_adapter():
            ref_disabled = _logits(reference, case, rank)
        out["disabled_diff"] = float((disabled - ref_disabled).abs().max())
        out["disabled_scale"] = float(ref_disabled.abs().max())
        out["adapters_matter"] = not torch.equal(disabled, _logits(model, case, rank))

    # save, load into a fresh model, bitwise parameters and next step
    path = os.path.join(tmp, f"ck-{case.id}")
    save_checkpoint(path, model, opt, overwrite=True)
    fresh = _ours(case, tmp)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    load_checkpoint(path, fresh, fresh_opt)
    out["loaded_trainable_differ"] = _equal(_trainable(model), _trainable(fresh))
    out["loaded_frozen_differ"] = _equal(_local_frozen(model), _local_frozen(fresh))
    next_step = _step(model, opt, case, STEPS, rank)["loss"], _step(fresh, fresh_opt, case, STEPS, rank)["loss"]
    out["next_loss"] = next_step
    out["next_trainable_differ"] = _equal(_trainable(model), _trainable(fresh))
    if rank == 0:
        import shutil

        shutil.rmtree(path, ignore_errors=True)

    # refreeze: the final norm trainable too, then a step that moves it
    norm = FAMILIES[case.family].norm
    before = _whole(model, norm)
    refreeze(model, opt, policy_of(case, unfreeze=norm))
    after_refreeze = {n: p.requires_grad for n, p in _params(model).items() if n in norm}
    _step(model, opt, case, STEPS + 1, rank)
    moved = _whole(model, norm)
    out["norm_trainable"] = after_refreeze
    out["norm_moved"] = {n: not torch.equal(before[n], moved[n]) for n in before}
    dist.barrier()
    return out


def _whole(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Whole copies of the parameters `names` (collective for DTensors)."""
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().float().clone()
            for n, p in _params(model).items() if n in names}
