"""The recipes' chunked loss (recipes/loss.py): equal to the unchunked loss, and what it holds.

[Note: chunked-loss tolerance] Chunking changes only the order of fp32 sums (the loss and a
trainable head's weight gradient are sums of per-chunk sums; a matmul over fewer rows may block its
sum differently) and, in the gradient of the logits, torch's log-softmax backward may use a faster
``exp`` than ``torch.exp`` (a few fp32 ulps). So the check is: against float64 math on the same
inputs, the chunked result is no further off than the unchunked one (at most twice its max-abs
error), plus 4 fp32 ulps of the largest element (one more summation order). In bf16 the unchunked
error is itself a bf16 rounding, so in bf16 each element is also checked to be at most one bf16
rounding from the unchunked one (a rounding the fp32 differences can flip).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))

from llama import LlamaConfig, LlamaLoRA, LoRALinear  # noqa: E402
from loss import (  # noqa: E402
    IGNORE_INDEX, causal_lm_loss, check_chunks, chunk_rows, distillation_loss, head_cross_entropy, linear_cross_entropy,
    model_loss, output_head,
)

from fsdp_frozen.diagnostics import PeakTensorMemory  # noqa: E402
from fsdp_frozen.estimate import loss_bytes  # noqa: E402

from .dist_harness import run_ranks  # noqa: E402

HF_MISSING = any(importlib.util.find_spec(m) is None for m in ("transformers", "peft"))
EPS32 = torch.finfo(torch.float32).eps


def assert_as_exact(got: torch.Tensor, ref: torch.Tensor, exact: torch.Tensor, what: str) -> None:
    """[Note: chunked-loss tolerance]: `got` (chunked) is within 2x the error of `ref` (unchunked, same
    dtype) against `exact` (float64), plus 4 fp32 ulps of the largest element."""
    exact = exact.double()
    err_ref = (ref.double() - exact).abs().max().item()
    err = (got.double() - exact).abs().max().item()
    bound = 2 * err_ref + 4 * EPS32 * exact.abs().max().item()
    assert err <= bound, f"{what}: chunked error {err:.3g} > {bound:.3g} (unchunked error {err_ref:.3g})"
    if got.dtype == torch.bfloat16:  # and element by element at most one bf16 rounding from the unchunked value
        apart = (got.float() - ref.float()).abs()
        allowed = torch.finfo(torch.bfloat16).eps * ref.float().abs() + 4 * EPS32 * ref.float().abs().max()
        assert (apart <= allowed).all(), f"{what}: {int((apart > allowed).sum())} elements > a bf16 rounding apart"


def _problem(dtype: torch.dtype, n: int = 77, h: int = 24, vocab: int = 300, bias: bool = True):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(vocab, h, generator=g) * 0.5).to(dtype)
    b = torch.randn(vocab, generator=g).to(dtype) if bias else None
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[:12] = IGNORE_INDEX  # the whole first chunk at chunks >= 7, and a few more below
    targets[30::9] = IGNORE_INDEX
    return hidden, weight, b, targets


def _ce_grads(h, w, b, t, fn, dtype=None):
    """(loss, grads of h, w[, b]) of ``fn(h, w, b, t)`` on fresh leaves (converted to `dtype` if given)."""
    leaves = [None if x is None else x.detach().to(dtype or x.dtype).clone().requires_grad_() for x in (h, w, b)]
    loss = fn(*leaves, t)
    return loss.detach(), torch.autograd.grad(loss, [x for x in leaves if x is not None])


def _unchunked(h, w, b, t):
    """The recipes' loss before: the full logits, upcast to fp32."""
    return F.cross_entropy(F.linear(h, w, b).float(), t, ignore_index=IGNORE_INDEX)


def _exact(h, w, b, t):
    """The same math in the inputs' dtype (float64 leaves: the exact reference)."""
    return F.cross_entropy(F.linear(h, w, b), t, ignore_index=IGNORE_INDEX)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunks", [1, 3, 8, 26])
def test_linear_cross_entropy_equals_unchunked(dtype, chunks):
    """Loss and the gradients of hidden states, weight and bias, with ignored tokens (a whole chunk of
    them included), chunk counts that do not divide the 77 tokens."""
    h, w, b, t = _problem(dtype)
    ref_loss, ref_grads = _ce_grads(h, w, b, t, _unchunked)
    exact_loss, exact_grads = _ce_grads(h, w, b, t, _exact, torch.float64)
    loss, grads = _ce_grads(h, w, b, t, lambda h_, w_, b_, t_: linear_cross_entropy(h_, w_, t_, b_, chunks=chunks))
    assert loss.dtype == torch.float32 and [g.dtype for g in grads] == [dtype] * 3
    assert_as_exact(loss, ref_loss, exact_loss, "loss")
    for name, got, ref, exact in zip(("hidden", "weight", "bias"), grads, ref_grads, exact_grads):
        assert_as_exact(got, ref, exact, f"grad of {name}")


def test_frozen_head_no_grad_and_nf4():
    """A frozen head gets no gradient and the loss saves none for it; under no_grad nothing is computed
    for backward; an NF4 head (dequantized once, as torchao's linear_nf4 does per call) equals it."""
    h, w, _, t = _problem(torch.bfloat16, bias=False)
    with torch.no_grad():
        loss = linear_cross_entropy(h.requires_grad_(), w, t, chunks=4)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, _unchunked(h, w, None, t).detach(), rtol=8 * EPS32, atol=0)
    h = h.detach()
    from fsdp_frozen._torchao_compat import to_nf4

    nf4 = to_nf4(w.float().bfloat16().contiguous(), 24, 25)  # 300 x 24: 300 blocks of 24, 12 scaler blocks
    leaf = h.clone().requires_grad_()
    ref = F.cross_entropy(F.linear(leaf, nf4).float(), t, ignore_index=IGNORE_INDEX)  # torchao's path
    ref_grad, = torch.autograd.grad(ref, leaf)
    leaf = h.clone().requires_grad_()
    got = linear_cross_entropy(leaf, nn.Parameter(nf4, requires_grad=False), t, chunks=4)
    got_grad, = torch.autograd.grad(got, leaf)
    leaf = h.double().requires_grad_()
    exact_loss = _exact(leaf, nf4.to(torch.bfloat16).double(), None, t)  # the dequantized values, in float64
    exact_grad, = torch.autograd.grad(exact_loss, leaf)
    assert_as_exact(got, ref, exact_loss, "NF4 head loss")
    assert_as_exact(got_grad, ref_grad, exact_grad, "NF4 head: grad of hidden")
    # What the NF4 head costs beyond a dense one: its dense copy, from fsdp_frozen's dequantization (one
    # chunk of int32 indices), not torchao's `.to` (two int64 code tensors, 8 bytes per element: with the
    # rest of its temporaries ~6 GiB more for Llama-3.1-8B's head, the first GPU run's QLoRA peak)
    from fsdp_frozen._torchao_compat import _cached_table

    dense = nf4.to(torch.bfloat16)
    peaks = {}
    for name, weight in (("dense", dense), ("nf4", nf4)):
        with PeakTensorMemory([h, t, weight, _cached_table(nf4.nf4, "quad")]) as m:
            before = m.current
            linear_cross_entropy(h.clone().requires_grad_(), nn.Parameter(weight, requires_grad=False), t, chunks=4)
        peaks[name] = m.peak - before
    scalers = dense.numel() // 24 * 2
    assert peaks["nf4"] - peaks["dense"] <= dense.numel() * 2 + 2 * scalers + dense.numel() + 1024, peaks


def test_any_head_through_autograd():
    """A head that is not an nn.Linear (a LoRA-adapted one: frozen base, trainable A and B) goes chunk
    by chunk through autograd: loss and the gradients of hidden states and adapters."""
    torch.manual_seed(0)
    head = LoRALinear(24, 300, rank=4, alpha=8.0)
    nn.init.normal_(head.lora_B.weight, std=0.1)
    h, _, _, t = _problem(torch.float32)

    def run(fn, dtype):
        m = LoRALinear(24, 300, rank=4, alpha=8.0).to(dtype)
        m.load_state_dict(head.state_dict())
        leaf = h.to(dtype).clone().requires_grad_()
        loss = fn(m, leaf)
        return loss.detach(), torch.autograd.grad(loss, [leaf, m.lora_A.weight, m.lora_B.weight])

    plain = lambda m, x: F.cross_entropy(m(x), t, ignore_index=IGNORE_INDEX)  # noqa: E731 (fp32 or float64)
    ref_loss, ref_grads = run(plain, torch.float32)
    exact_loss, exact_grads = run(plain, torch.float64)
    loss, grads = run(lambda m, x: head_cross_entropy(m, x, t, chunks=5), torch.float32)
    assert_as_exact(loss, ref_loss, exact_loss, "loss")
    for name, got, ref, exact in zip(("hidden", "lora_A", "lora_B"), grads, ref_grads, exact_grads):
        assert_as_exact(got, ref, exact, f"grad of {name}")


def test_distillation_loss_equals_unchunked():
    """recipes/distill.py's loss (KL "batchmean" x T^2 and CE, from a bf16 teacher's and an fp32 student's
    logits), chunked: loss and the gradients of the student's hidden states and head."""
    g = torch.Generator().manual_seed(0)
    student_h, teacher_h = torch.randn(3, 20, 24, generator=g), torch.randn(3, 20, 32, generator=g).bfloat16()
    teacher = nn.Linear(32, 300, bias=False).bfloat16().requires_grad_(False)
    targets = torch.randint(0, 300, (3, 20), generator=g)
    targets[1, :4] = IGNORE_INDEX
    temp, w = 2.0, 0.9

    def run(dtype, chunks):
        torch.manual_seed(0)
        head = nn.Linear(24, 300, bias=False).to(dtype)
        hidden = student_h.to(dtype).requires_grad_()
        if chunks:
            loss = distillation_loss(hidden, head, teacher_h, teacher, targets, temperature=temp, kd_weight=w,
                                     chunks=chunks)
        else:  # recipes/distill.py's unchunked loss (float64: not cast down)
            logits = head(hidden).to(torch.promote_types(dtype, torch.float32))
            teacher_logits = teacher(teacher_h).to(logits.dtype)
            kd = F.kl_div(F.log_softmax(logits / temp, -1), F.log_softmax(teacher_logits / temp, -1),
                          log_target=True, reduction="batchmean") * temp**2
            loss = w * kd + (1 - w) * F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return loss.detach(), torch.autograd.grad(loss, [hidden, head.weight])

    (exact_loss, exact), (ref_loss, ref) = run(torch.float64, 0), run(torch.float32, 0)
    loss, got = run(torch.float32, 7)
    assert_as_exact(loss, ref_loss, exact_loss, "loss")
    for name, a, b, c in zip(("hidden", "head weight"), got, ref, exact):
        assert_as_exact(a, b, c, f"grad of {name}")


class _Saved:
    """Bytes of the distinct storages autograd saves for backward (saved_tensors_hooks)."""

    def __init__(self) -> None:
        self.storages: dict[int, int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self.storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    @property
    def nbytes(self) -> int:
        return sum(self.storages.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_memory_saved_and_peak(dtype):
    """What each loss saves for backward and its peak, counted on CPU (`PeakTensorMemory`: storages
    alive), against `fsdp_frozen.estimate.loss_bytes`, the terms the estimate adds for the loss.

    - unchunked: 12 N V bytes at the peak (log-softmax backward: its fp32 output, its gradient, the
      logits' fp32 gradient);
    - torchtune's chunking under plain autograd (each chunk's logits upcast, CE sum): every chunk's fp32
      log-softmax is saved, 4 N V bytes in all, so it saves only the fp32 upcast copy at the peak;
    - recipes/loss.py: saves the N x h gradient of the hidden states, nothing of size N x V, and peaks
      at one chunk's logits."""
    n, hdim, vocab, chunks = 512, 64, 4096, 8
    e = torch.empty((), dtype=dtype).element_size()
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, hdim, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, hdim, generator=g) * 0.1).to(dtype)
    targets = torch.randint(0, vocab, (n,), generator=g)

    def torchtune_chunked():
        total = 0.0
        for h_c, t_c in zip(hidden.tensor_split(chunks), targets.tensor_split(chunks)):
            total = total + F.cross_entropy(F.linear(h_c, weight).float(), t_c, reduction="sum")
        return total / n

    runs = {"unchunked": lambda: _unchunked(hidden, weight, None, targets), "torchtune": torchtune_chunked,
            "recipes": lambda: linear_cross_entropy(hidden, weight, targets, chunks=chunks)}
    saved, peak = {}, {}
    for name, fn in runs.items():
        record = _Saved()
        with PeakTensorMemory([hidden, weight, targets]) as mem:
            base = mem.current
            with torch.autograd.graph.saved_tensors_hooks(record.pack, lambda t: t):
                loss = fn()
            loss.backward()
            hidden.grad = None
        saved[name], peak[name] = record.nbytes, mem.peak - base
    nv = n * vocab
    assert saved["recipes"] == n * hdim * e  # the gradient of the hidden states, only
    assert saved["torchtune"] >= 4 * nv  # every chunk's fp32 log-softmax
    assert saved["unchunked"] >= 4 * nv
    small = 4096  # masks, targets' views, scalars
    for name, chunked in (("unchunked", 0), ("recipes", chunks)):
        terms = loss_bytes(n, hdim, vocab, e, chunks=chunked)
        want = sum(terms.values()) - terms["head_input"]  # the hidden states are in the baseline here
        assert want <= peak[name] <= want + small, (name, peak[name], terms)
    assert peak["recipes"] * 4 < peak["torchtune"] < peak["unchunked"], peak


def _llama(lora_rank: int, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    model = LlamaLoRA(LlamaConfig(vocab_size=256, dim=32, n_layers=2, n_heads=2, hidden_dim=64, lora_rank=lora_rank))
    if lora_rank:
        for m in model.modules():
            if isinstance(m, LoRALinear):
                nn.init.normal_(m.lora_B.weight, std=0.05)
    return model.to(dtype)


def _hf(arch: str, peft_targets: list[str] | None, dtype=torch.float32) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig as HFLlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if arch == "gpt2":  # tied: lm_head.weight is the embedding's
        model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
        assert model.lm_head.weight is model.transformer.wte.weight
    else:
        model = LlamaForCausalLM(HFLlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                               max_position_embeddings=64, tie_word_embeddings=False))
    if peft_targets:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=peft_targets, lora_dropout=0.0,
                                                 init_lora_weights=False))
    return model.to(dtype)


def _plain_loss(model: nn.Module, targets: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The unchunked loss in the model's own dtype (fp32: the recipes' ``train.loss_chunks=0``; float64:
    the exact reference, not cast down to fp32)."""
    out = model(tokens)
    logits = out.logits if hasattr(out, "logits") else out
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=IGNORE_INDEX)


MODELS = {
    "llama LoRA": lambda dtype: _llama(8, dtype),
    "llama, trainable head": lambda dtype: _llama(0, dtype),
    "hf llama + PEFT": lambda dtype: _hf("llama", ["q_proj", "v_proj"], dtype),
    "hf llama + PEFT on lm_head": lambda dtype: _hf("llama", ["q_proj", "lm_head"], dtype),
    "gpt2 tied, trainable": lambda dtype: _hf("gpt2", None, dtype),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_models_equal_unchunked(name):
    """`causal_lm_loss` on the recipes' models: loss and every trainable parameter's gradient."""
    if name.startswith(("hf", "gpt2")) and HF_MISSING:
        pytest.skip("needs the 'hf' extra")
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 256, (2, 24), generator=g)
    targets = torch.randint(0, 256, (2, 24), generator=g)
    targets[0, :5] = IGNORE_INDEX

    def run(dtype, chunks):
        model = MODELS[name](dtype).train()
        loss = causal_lm_loss(model, targets, tokens, chunks=chunks) if chunks else _plain_loss(model, targets, tokens)
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        return loss.detach(), dict(zip(params, torch.autograd.grad(loss, list(params.values()))))

    exact_loss, exact = run(torch.float64, 0)
    ref_loss, ref = run(torch.float32, 0)
    loss, got = run(torch.float32, 5)
    assert got.keys() == ref.keys() and got
    assert_as_exact(loss, ref_loss, exact_loss, f"{name}: loss")
    for param in got:
        assert_as_exact(got[param], ref[param], exact[param], f"{name}: grad of {param}")


def test_refusals():
    with pytest.raises(ValueError, match="train.loss_chunks must be an int >= 0"):
        check_chunks(-1, "train.loss_chunks")
    with pytest.raises(ValueError, match="chunks must be >= 1"):
        chunk_rows(10, 0)

    class Scaled(nn.Module):  # post-processes its logits: a chunked loss cannot see that
        def __init__(self) -> None:
            super().__init__()
            self.inner = _llama(0)

        def get_output_embeddings(self) -> nn.Module:
            return self.inner.output

        def forward(self, tokens):
            return self.inner(tokens).unsqueeze(0) * 2

    tokens = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(RuntimeError, match="post-processes the logits"):
        causal_lm_loss(Scaled(), tokens, tokens)
    model = _llama(0)
    with pytest.raises(RuntimeError, match="already replaced"):
        model_loss(model, lambda h: model_loss(model, lambda h2: h2.sum(), tokens), tokens)
    assert "forward" not in output_head(model).__dict__  # put back after the failure


# ------------------------------------------------------------------------------ 2 gloo ranks
def _sharded_steps(rank: int, world: int, units: list[str], lora_rank: int, reshard: str) -> dict:
    """Per loss (float64 unchunked, float32 unchunked, float32 chunked): the loss, the full gradient of
    every trainable parameter after the second step, and the collectives of that step."""
    from fsdp_frozen import FreezePolicy, shard_with_freezing

    from .common import CommCounter, mesh_1d, whole

    out = {}
    for key, dtype, chunks in (("exact", torch.float64, 0), ("ref", torch.float32, 0), ("got", torch.float32, 8)):
        model = shard_with_freezing(_llama(lora_rank, dtype), mesh_1d(world),
                                    FreezePolicy(units=units, frozen_reshard=reshard))
        counter = CommCounter()
        for step in range(2):
            g = torch.Generator().manual_seed(100 * step + rank)
            tokens = torch.randint(0, 256, (2, 16), generator=g)
            targets = torch.randint(0, 256, (2, 16), generator=g)
            targets[:, :3] = IGNORE_INDEX
            for p in model.parameters():
                p.grad = None
            counter.clear()
            with counter:
                loss = causal_lm_loss(model, targets, tokens, chunks=chunks) if chunks else \
                    _plain_loss(model, targets, tokens)
                loss.backward()
        grads = {n: whole(p.grad).detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        out[key] = {"loss": loss.detach(), "grads": grads,
                    "all_gathers": counter.total("all_gather", count=True),
                    "all_gather_bytes": counter.total("all_gather"),
                    "reduce_scatters": counter.total("reduce_scatter", count=True)}
    return out


@pytest.mark.parametrize("units,lora_rank,reshard", [
    (["layers.*"], 8, "after_backward"),  # lora_tiny.yaml: the head in the root unit
    (["layers.*", "output"], 0, "after_forward"),  # the head an FSDP unit of its own, trainable
])
def test_sharded_two_ranks(units, lora_rank, reshard):
    """Under shard_with_freezing on 2 gloo ranks: the same loss and gradients as unchunked, and the same
    collectives per step (the head gathered by its unit once per step, not once per chunk)."""
    for rank, r in enumerate(run_ranks(_sharded_steps, 2, units, lora_rank, reshard)):
        got, ref, exact = r["got"], r["ref"], r["exact"]
        assert_as_exact(got["loss"], ref["loss"], exact["loss"], f"rank {rank}: loss")
        assert got["grads"].keys() == ref["grads"].keys() and got["grads"]
        for name in got["grads"]:
            assert_as_exact(got["grads"][name], ref["grads"][name], exact["grads"][name], f"rank {rank}: {name}")
        for key in ("all_gathers", "all_gather_bytes", "reduce_scatters"):
            assert got[key] == ref[key], (rank, key, got[key], ref[key])
        assert got["all_gathers"] > 0
