"""The recipes' loss: cross-entropy (and distillation) over the output head in chunks of tokens, so
that the full fp32 logits of a step never exist.

Why: the plain loss ``F.cross_entropy(model(x).float(), y)`` holds, for N tokens and a vocabulary of V,
the compute-dtype logits (2 N V bytes in bf16), their fp32 copy (4 N V), the fp32 log-softmax that
autograd saves for backward (4 N V), and in backward its gradient and the gradient of the logits
(4 N V each): about 12 N V bytes at the loss's peak. Llama-3.1-8B at batch 2 x 2048 (N = 4096,
V = 128256): 5.9 GiB, more than the whole rest of the activations under checkpointing.

How (`linear_cross_entropy`): the hidden states that would enter the head, (N, h), are split into
``chunks`` row blocks of C = ceil(N / chunks) tokens. For each block: its logits ``F.linear(h_c, W)`` in
the compute dtype, upcast to fp32, their log-softmax (in place, a few rows at a time), the block's
share of the loss, and -- when a backward may follow -- at once the block's gradient: the softmax in
place of the log-softmax, times 1/n, minus 1/n at the target (n: the tokens not equal to
``ignore_index``, over the whole batch), cast to the compute dtype and multiplied back through the
head: d loss / d h_c (and, for a trainable head, its share of d loss / d W). Then the block is freed.
Alive at a time: one block's compute-dtype logits and its fp32 copy, C x V x (itemsize + 4) bytes
(plus a 16 MiB log-softmax step). Saved for backward: the gradient of the hidden states (N x h in their
dtype) and, for a trainable head, its weight gradient; backward only multiplies them by the incoming
scalar. A frozen NF4 head is dequantized to the compute dtype once per loss (V x h, alive during the
loss only), not once per block. `fsdp_frozen.estimate.loss_bytes` counts these terms, and
tests/test_chunked_loss.py measures them.

This is torchtune's chunked cross-entropy (``CEWithChunkedOutputLoss``, pytorch/torchtune
``torchtune/modules/loss/ce_chunked_output_loss.py``: split the hidden states along the sequence, the
head per chunk, upcast each chunk to fp32, CE sum, divide by the count of non-ignored tokens) with the
gradient taken per chunk inside the forward, as Liger-Kernel's fused linear cross-entropy does
(torchtune's ``LinearCrossEntropyLoss`` wraps it). The difference matters: under plain autograd each
chunk's fp32 log-softmax is saved for backward (4 N V bytes over all chunks, measured in
tests/test_chunked_loss.py), so plain chunking saves only the fp32 upcast copy and the backward's
transients; compiled as torchtune recommends, what is saved is each chunk's bf16 logits (2 N V).
Here nothing of size N x V is saved.

Equality with the unchunked loss: per token row the same operations as ``F.cross_entropy(
F.linear(h, W).float(), y, ignore_index=...)`` and its autograd backward (the fp32 log-softmax of the
same bf16 logits, the same 1/n, the same cast before the same matmul with W), except the order of the
sums over tokens (the loss, and a trainable head's weight gradient, are sums of per-chunk sums), the
matmul's blocking over rows, and the softmax's ``exp`` (torch's log-softmax backward may use a faster
vectorised exp: a few fp32 ulps). tests/test_chunked_loss.py checks loss and gradients against the
unchunked ones within that fp32 rounding. A trainable head's weight gradient is summed over the
chunks in fp32 (from the same compute-dtype values), so in bf16 too it differs only in summation order.

`chunked_loss` is the same scheme for any head module and any per-chunk loss (e.g. distillation):
each chunk goes through the head and the loss under autograd, and `torch.autograd.grad` gives the
chunk's gradients at once; its per-chunk transients are larger (autograd keeps what the loss saves).

In a model (`model_loss`): the head module is called once per step as usual, from the model's own
forward, but returns the loss instead of logits (its ``forward`` is swapped for the duration of the
call). So the loss is computed inside the root module's forward, where FSDP has the head's weights
gathered; if the head is an FSDP unit of its own, its hooks gather it once for the whole loss; and the
loss is the root's output, on which FSDP hooks its backward. Per step the collectives are the
unchunked loss's (tests/test_chunked_loss.py counts them). Calling an FSDP head unit once per chunk
from outside the model's forward instead (torchtune's ``LinearCrossEntropyLoss`` calls the head per
chunk) re-gathers it per chunk, in forward and in backward: recipes/llama.py with its head a unit of
its own, 2 ranks, 8 chunks, 23 all-gathers a step instead of 7. The models: ``recipes/llama.py``
(``self.output(self.norm(h))``) and transformers causal LMs (``self.lm_head(hidden)``), PEFT-wrapped or
not, a PEFT-adapted head included, tied embeddings included (GPT-2's head is an ``nn.Linear`` sharing
the embedding's weight).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from fsdp_frozen.storage import is_nf4

#: torchtune's default number of chunks (``num_output_chunks``)
DEFAULT_CHUNKS = 8
IGNORE_INDEX = -100


def chunk_rows(n_tokens: int, chunks: int) -> int:
    """Rows per chunk: ceil(N / chunks) (the last chunk may be shorter)."""
    if chunks < 1:
        raise ValueError(f"chunks must be >= 1, got {chunks}")
    return max(1, math.ceil(n_tokens / chunks))


def check_chunks(chunks: Any, key: str = "chunks") -> int:
    """`chunks` as given if it is an int >= 0 (0: unchunked); ValueError naming `key` otherwise."""
    if not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 0:
        raise ValueError(f"{key} must be an int >= 0 (0: the unchunked loss), got {chunks!r}")
    return chunks


def _dense(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The head's weight as a plain tensor: an NF4 (or other quantized) weight dequantized to `dtype`
    once, as torchao's ``linear_nf4`` does on every call (``weight.to(input.dtype)``)."""
    if isinstance(weight, DTensor):
        raise RuntimeError("the output head's weight is sharded (a DTensor) where the loss runs: the loss must run "
                           "where FSDP has gathered it (inside the model's forward, see recipes/loss.py model_loss)")
    if type(weight) in (torch.Tensor, nn.Parameter):
        return weight
    if is_nf4(weight):  # fsdp_frozen's dequantization: bitwise torchao's `.to`, without its two int64 index
        return weight.dequantize().to(dtype)  # tensors (8 bytes per element: ~4 GiB more for an 8B head)
    return weight.to(dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    """loss = mean over non-ignored rows of CE(F.linear(hidden, weight, bias).float(), targets)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows, ignore_index, grads):  # type: ignore[override]
        need_h, need_w, need_b = grads
        w = _dense(weight, hidden.dtype)
        valid = targets != ignore_index
        count = valid.sum().to(torch.float32)
        scale = 1.0 / count  # the fp32 1/n of nll_loss's backward (mean reduction)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=hidden.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=hidden.device) if need_b else None
        for start in range(0, hidden.shape[0], rows):
            stop = min(start + rows, hidden.shape[0])
            total += _ce_chunk(hidden[start:stop], w, bias, targets[start:stop], valid[start:stop], scale,
                               grad_h[start:stop] if need_h else None, grad_w, grad_b)
        ctx.save_for_backward(*(g for g in (grad_h, grad_w, grad_b) if g is not None))
        ctx.grads = grads
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total / count  # nll_loss's mean: the negated sum divided by the count

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        saved = list(ctx.saved_tensors)
        need_h, need_w, need_b = ctx.grads
        out = []
        for need, dtype in ((need_h, None), (need_w, ctx.dtypes[0]), (need_b, ctx.dtypes[1])):
            if not need:
                out.append(None)
                continue
            g = saved.pop(0)
            out.append(g * grad_out if dtype is None else (g * grad_out).to(dtype))  # x * 1.0 is exact
        return out[0], out[1], out[2], None, None, None, None


#: elements of the fp32 temporary of one in-place log-softmax step (rows of a chunk at a time): 16 MiB
LOG_SOFTMAX_BLOCK = 1 << 22


def log_softmax_rows_(x: torch.Tensor) -> torch.Tensor:
    """``x[:] = log_softmax(x, -1)`` for a 2-D fp32 block, a few rows at a time (the same values: the
    kernel works row by row), so that its temporary is LOG_SOFTMAX_BLOCK elements, not another block."""
    step = max(1, LOG_SOFTMAX_BLOCK // max(1, x.shape[1]))
    for start in range(0, x.shape[0], step):
        rows = x[start:start + step]
        rows.copy_(torch.log_softmax(rows, -1))
    return x


def _ce_chunk(h, w, bias, t, valid, scale, grad_h, grad_w, grad_b) -> torch.Tensor:
    """One chunk: its negated sum of target log-probabilities; its gradients written into grad_h (a
    view) and added to grad_w / grad_b. A function so that its blocks are freed on return. Alive at
    most: the compute-dtype logits and their fp32 copy (at the upcast), or the fp32 block and its
    compute-dtype cast (the gradient): C x V x (itemsize + 4) bytes; in fp32 the block alone, 4 C V,
    plus the log-softmax step's LOG_SOFTMAX_BLOCK elements."""
    z = F.linear(h, w, bias)
    lsm = z.float()  # fp32 compute: z itself (ours: overwritten in place)
    del z
    log_softmax_rows_(lsm)
    safe = t.masked_fill(~valid, 0)[:, None]
    loss = -lsm.gather(1, safe).squeeze(1).masked_fill(~valid, 0).sum()
    if grad_h is None and grad_w is None and grad_b is None:
        return loss
    # d/dz of the mean CE, as log_softmax's and nll_loss's backward compute it: exp(lsm) * (1/n), minus 1/n at
    # the target, zero on ignored rows
    p = lsm.exp_().mul_(scale)
    del lsm
    p.scatter_(1, safe, p.gather(1, safe) - scale)
    p.masked_fill_(~valid[:, None], 0)
    g = p.to(h.dtype)  # the cast autograd's backward of .float() does (fp32: p itself)
    if grad_h is not None:
        torch.matmul(g, w, out=grad_h)
    if grad_w is not None or grad_b is not None:
        # a trainable head: its gradient summed over chunks in fp32 from the same (cast) values, so that it
        # differs from the unchunked one (one matmul over all tokens) in the order of the sum only
        if g is not p:
            p.copy_(g)
            del g
        if grad_w is not None:
            grad_w.addmm_(p.t(), h.float())
        if grad_b is not None:
            grad_b.add_(p.sum(0))
    return loss


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: torch.Tensor | None = None, *, chunks: int = DEFAULT_CHUNKS,
                         ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean cross-entropy of ``F.linear(hidden, weight, bias)`` against `targets`, over the tokens not
    equal to `ignore_index`, computed in `chunks` row blocks (see the module docstring).

    Args:
        hidden: (..., h), the head's input; targets: its leading shape, integer class indices.
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1).to(hidden.device)
    if t.shape[0] != h.shape[0]:
        raise ValueError(f"targets {tuple(targets.shape)} do not match hidden states {tuple(hidden.shape)}")
    grad = torch.is_grad_enabled()
    grads = (grad and h.requires_grad, grad and weight.requires_grad,
             grad and bias is not None and bias.requires_grad)
    return _LinearCrossEntropy.apply(h, weight, bias, t, chunk_rows(h.shape[0], chunks), ignore_index, grads)


# ------------------------------------------------------------------------------ any head, any loss
class _Chunks:
    """What `_ChunkedLoss` runs per chunk (one object: autograd.Function takes it as a plain argument)."""

    def __init__(self, project, chunk_loss, aux, rows: int, need_h: bool, grad: bool) -> None:
        self.project, self.chunk_loss, self.aux, self.rows = project, chunk_loss, aux, rows
        self.need_h, self.grad = need_h, grad


class _ChunkedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec, hidden, *params):  # type: ignore[override]
        needs = [spec.grad and p.requires_grad for p in params]
        wrt = [p for p, need in zip(params, needs) if need]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if spec.need_h else None
        grad_p = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in wrt]
        for start in range(0, hidden.shape[0], spec.rows):
            stop = min(start + spec.rows, hidden.shape[0])
            total += _generic_chunk(spec, hidden[start:stop], [a[start:stop] for a in spec.aux],
                                    grad_h[start:stop] if spec.need_h else None, wrt, grad_p)
        ctx.save_for_backward(*([grad_h] if spec.need_h else []), *grad_p)
        ctx.layout = (spec.need_h, needs, [p.dtype for p in params])
        return total

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        saved = list(ctx.saved_tensors)
        need_h, needs, dtypes = ctx.layout
        grad_h = saved.pop(0) * grad_out if need_h else None
        grads = [(saved.pop(0) * grad_out).to(dtype) if need else None for need, dtype in zip(needs, dtypes)]
        return None, grad_h, *grads


def _generic_chunk(spec: _Chunks, h, aux, grad_h, params, grad_p) -> torch.Tensor:
    """One chunk through the head and the loss under autograd; its gradients at once."""
    with torch.set_grad_enabled(spec.grad):
        leaf = h.detach().requires_grad_(grad_h is not None)
        loss = spec.chunk_loss(spec.project(leaf), *aux)
        wrt = ([leaf] if grad_h is not None else []) + list(params)
        grads = torch.autograd.grad(loss, wrt, allow_unused=True) if wrt else ()
    if grad_h is not None:
        grad_h.copy_(grads[0])
        grads = grads[1:]
    for acc, g in zip(grad_p, grads):
        if g is not None:
            acc.add_(g)
    return loss.detach().to(torch.float32)


def chunked_loss(hidden: torch.Tensor, project: Callable[[torch.Tensor], torch.Tensor],
                 chunk_loss: Callable[..., torch.Tensor], *aux: torch.Tensor, params: tuple[torch.Tensor, ...] = (),
                 chunks: int = DEFAULT_CHUNKS) -> torch.Tensor:
    """Σ over row chunks of ``chunk_loss(project(hidden_chunk), *aux_chunks)``, with each chunk's
    gradient taken in the forward (one chunk's logits alive at a time).

    `chunk_loss` returns the chunk's share of the final loss (normalised by the whole batch's count:
    e.g. a sum over the chunk divided by n). `aux` tensors share hidden's leading shape and are split
    alike (targets, a teacher's hidden states). `params`: the tensors `project` uses that may need a
    gradient (a trainable head's weights); they get theirs through this function's backward.
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    lead = hidden.shape[:-1]
    flat = []
    for a in aux:
        if a.shape[:len(lead)] != lead:
            raise ValueError(f"aux tensor {tuple(a.shape)} does not match hidden states {tuple(hidden.shape)}")
        flat.append(a.reshape(h.shape[0], *a.shape[len(lead):]).to(hidden.device))
    grad = torch.is_grad_enabled()
    spec = _Chunks(project, chunk_loss, flat, chunk_rows(h.shape[0], chunks), grad and h.requires_grad, grad)
    for p in params:
        if isinstance(p, DTensor):
            raise RuntimeError("a parameter of the output head is sharded (a DTensor) where the loss runs: the loss "
                               "must run where FSDP has gathered it (see recipes/loss.py model_loss)")
    return _ChunkedLoss.apply(spec, h, *params)


def cross_entropy_chunk(n_valid: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> Callable[..., torch.Tensor]:
    """The per-chunk loss of the mean CE over `n_valid` tokens: ``CE sum over the chunk / n``."""

    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction="sum") / n_valid

    return loss


def distillation_loss(hidden: torch.Tensor, head: nn.Module, teacher_hidden: torch.Tensor, teacher_head: nn.Module,
                      targets: torch.Tensor, *, temperature: float, kd_weight: float, chunks: int = DEFAULT_CHUNKS,
                      ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``kd_weight * KL(teacher || student) * T^2 + (1 - kd_weight) * CE``, as recipes/distill.py's
    unchunked loss computes it from both models' fp32 logits (KL with ``reduction="batchmean"``: the sum
    over (batch, seq, vocab) divided by the batch size; CE: the mean over the non-ignored tokens), in
    chunks: each chunk's teacher logits come from `teacher_hidden` through `teacher_head` (no gradient),
    the student's through `head`, whose trainable parameters get their gradients here.

    Call it where both heads are gathered (inside the student head's call, see `model_loss`).
    """
    batch, n = targets.shape[0], (targets != ignore_index).sum().to(torch.float32).to(hidden.device)
    teacher_project = unhooked(teacher_head)

    def chunk_loss(logits: torch.Tensor, teacher_h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        with torch.no_grad():
            teacher_logits = teacher_project(teacher_h).float()
        kd = F.kl_div(F.log_softmax(logits / temperature, -1), F.log_softmax(teacher_logits / temperature, -1),
                      log_target=True, reduction="sum") / batch * temperature**2
        ce = F.cross_entropy(logits, t, ignore_index=ignore_index, reduction="sum") / n
        return kd_weight * kd + (1 - kd_weight) * ce

    params = tuple(p for p in head.parameters() if p.requires_grad)
    return chunked_loss(hidden, unhooked(head), chunk_loss, teacher_hidden, targets, params=params, chunks=chunks)


# ------------------------------------------------------------------------------ in a model
def output_head(model: nn.Module) -> nn.Module:
    """The module that maps hidden states to logits: ``get_output_embeddings()`` (transformers, PEFT,
    recipes/llama.py)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Module):
        raise ValueError(f"{type(model).__name__} has no output head (get_output_embeddings() gave {head!r})")
    return head


def unhooked(head: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The head's own forward, without its module hooks (FSDP's gather, if it is a unit): what a chunk
    goes through once the head's one call has gathered its weights (RuntimeError if they are not)."""
    forward = type(head).forward

    def project(hidden: torch.Tensor) -> torch.Tensor:
        if any(isinstance(p, DTensor) for p in head.parameters()):
            raise RuntimeError(f"the output head ({type(head).__name__}) is sharded (DTensor parameters) where the "
                               f"loss runs: it must run where FSDP has gathered it (see recipes/loss.py model_loss)")
        return forward(head, hidden)

    return project


@contextlib.contextmanager
def head_computes(head: nn.Module, fn: Callable[[torch.Tensor], Any]) -> Iterator[None]:
    """While active, ``head(hidden)`` returns ``fn(hidden)`` (its module hooks still run around it)."""
    if "forward" in head.__dict__:
        raise RuntimeError(f"{type(head).__name__}.forward is already replaced (nested head_computes?)")
    head.forward = fn
    try:
        yield
    finally:
        del head.forward


def head_cross_entropy(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, *,
                       chunks: int = DEFAULT_CHUNKS, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean CE of ``head(hidden)`` against `targets`, chunked: `linear_cross_entropy` for an
    ``nn.Linear`` head (FSDP's and tied ones included), `chunked_loss` through any other head (a
    PEFT-adapted one)."""
    if isinstance(head, nn.Linear):
        return linear_cross_entropy(hidden, head.weight, targets, head.bias, chunks=chunks, ignore_index=ignore_index)
    n = (targets != ignore_index).sum().to(torch.float32).to(hidden.device)
    params = tuple(p for p in head.parameters() if p.requires_grad)
    return chunked_loss(hidden, unhooked(head), cross_entropy_chunk(n, ignore_index), targets, params=params,
                        chunks=chunks)


def model_loss(model: nn.Module, loss_of_hidden: Callable[[torch.Tensor], torch.Tensor], *args: Any,
               **kwargs: Any) -> torch.Tensor:
    """``model(*args, **kwargs)`` with its output head computing ``loss_of_hidden(head input)``
    instead of logits: the scalar the model returns in place of its logits (``.logits`` of a
    transformers output)."""
    head = output_head(model)
    with head_computes(head, loss_of_hidden):
        out = model(*args, **kwargs)
    loss = out.logits if hasattr(out, "logits") else out
    if not (isinstance(loss, torch.Tensor) and loss.ndim == 0):
        raise RuntimeError(f"{type(model).__name__} did not return its head's output as its logits (got "
                           f"{type(loss).__name__}): it post-processes the logits, which a chunked loss cannot see")
    return loss


def causal_lm_loss(model: nn.Module, targets: torch.Tensor, *args: Any, chunks: int = DEFAULT_CHUNKS,
                   ignore_index: int = IGNORE_INDEX, **kwargs: Any) -> torch.Tensor:
    """Mean next-token CE of ``model(*args, **kwargs)`` against `targets` (already shifted: position
    i's target is token i + 1; `ignore_index` where there is none), without the full logits.
    ``chunks=0``: the unchunked reference, ``F.cross_entropy(logits.float(), targets)``."""
    if chunks == 0:
        out = model(*args, **kwargs)
        logits = out.logits if hasattr(out, "logits") else out
        return F.cross_entropy(logits.flatten(0, -2).float(), targets.to(logits.device).flatten(),
                               ignore_index=ignore_index)
    head = output_head(model)
    return model_loss(model, lambda hidden: head_cross_entropy(head, hidden, targets, chunks=chunks,
                                                               ignore_index=ignore_index), *args, **kwargs)


def shifted_targets(tokens: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Next-token targets of `tokens` (batch, seq): token i + 1 at position i, `ignore_index` at the
    last position (what transformers' ``labels=tokens`` trains on)."""
    out = torch.full_like(tokens, ignore_index)
    out[:, :-1] = tokens[:, 1:]
    return out


__all__ = ["DEFAULT_CHUNKS", "IGNORE_INDEX", "causal_lm_loss", "check_chunks", "chunk_rows", "chunked_loss",
           "cross_entropy_chunk", "distillation_loss", "head_computes", "head_cross_entropy", "linear_cross_entropy",
           "model_loss", "output_head", "shifted_targets", "unhooked"]
