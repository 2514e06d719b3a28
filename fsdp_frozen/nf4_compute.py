"""Cheap NF4 compute (issue 25, 1): the linear of an NF4 frozen weight, with a faster dequantization
and fewer of them, bitwise torchao's values.

torchao 0.18 runs ``F.linear(x, nf4_weight)`` as its ``LinearNF4``: ``get_original_weight()`` in the
forward, again in the backward (the input's gradient needs the weight) and, under activation
checkpointing, a third time when the forward is recomputed. `nf4_linear` replaces it (installed into
torchao's NF4 ``F.linear`` handler by `_torchao_compat.install_nf4_linear`, on the first `to_nf4`):

* each dequantization is `_torchao_compat.nf4_dequantize_fast` ([Note: fast NF4 dequantization]):
  bitwise ``get_original_weight()``, 3-12x faster on this CPU (scripts/nf4_bench.py);
* [Note: NF4 dequantization reuse] under activation checkpointing the backward reuses the dense
  weight the recompute made, instead of dequantizing it again: two dequantizations per step, not three.

Outside checkpointing it is `_NF4Linear`, torchao's LinearNF4 with the fast dequantization.

Modes (`set_nf4_compute`, `nf4_compute`, or ``FSDP_FROZEN_NF4_COMPUTE`` at import):
``"fast"`` (default: both), ``"fast_dequant"`` (the fast dequantization only, torchao's saving), and
``"torchao"`` (torchao's own LinearNF4, untouched). All three give bitwise the same outputs and
gradients (tests/test_nf4_compute.py). Read at each call in eager mode; a torch.compile'd graph
(AOT backends) keeps the mode it was traced in.

[Note: NF4 dequantization reuse]
Memory bound (issue 25): at most one unit's compute-dtype weights more than torchao, alive only while
that unit computes, and no dense copy kept across steps. Keeping the forward's dense weight for the
backward would hold every unit's dense weights from its forward to its backward, so outside activation
checkpointing the backward dequantizes again (2 per step, as torchao). Under checkpointing the linear
is autograd's own ``F.linear`` of the dense weight, which saves that weight: in the checkpointed
forward ``torch.utils.checkpoint``'s pack hook drops it (only a holder is kept), and in the recompute,
which runs inside that unit's backward, the dense weights are kept just until each linear's backward
consumes them: the recompute's dequantization serves the backward (3 -> 2 per step), and the extra
memory is the unit's NF4 weights in the compute dtype, from the recompute to each one's backward.
Autograd's linear, not a custom Function: it lets the recompute stop early, before the unit's last
matmul, as it does for a dense weight (a Function's saved tensors are packed after its forward ran,
so its matmul would always be recomputed), and its backward is the same matmul as torchao's
(``grad @ weight``), so bitwise torchao's (tested). The same holds in a forward run inside a backward
without saved-tensor hooks (the reentrant checkpoint's recompute, whose backward follows at once). Any
other saved-tensor hook (CPU offload), autocast, and torch.compile tracing keep torchao's choice: the
packed weight is saved and dequantized again.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from . import _torch_compat as compat
from . import _torchao_compat as ao

MODES = ("fast", "fast_dequant", "torchao")
_mode = os.environ.get("FSDP_FROZEN_NF4_COMPUTE", "fast")
if _mode not in MODES:
    raise ValueError(f"FSDP_FROZEN_NF4_COMPUTE={_mode!r}: expected one of {MODES}")


def get_nf4_compute() -> str:
    """The current mode: "fast", "fast_dequant" or "torchao" (module docstring)."""
    return _mode


def set_nf4_compute(mode: str) -> str:
    """Set how NF4 linears compute (process-wide); returns the previous mode."""
    global _mode
    if mode not in MODES:
        raise ValueError(f"set_nf4_compute({mode!r}): expected one of {MODES}")
    previous, _mode = _mode, mode
    return previous


@contextlib.contextmanager
def nf4_compute(mode: str) -> Iterator[None]:
    """``with nf4_compute("torchao"): ...``: `set_nf4_compute` for a block, restored after."""
    previous = set_nf4_compute(mode)
    try:
        yield
    finally:
        set_nf4_compute(previous)


def _backward_follows(weight: torch.Tensor) -> bool:
    """[Note: NF4 dequantization reuse]: `compat.in_checkpointed_region`, never while traced (`ao.nf4_traced`)."""
    return not ao.nf4_traced(weight) and compat.in_checkpointed_region()


class _NF4Linear(torch.autograd.Function):
    """torchao's LinearNF4 (``F.linear(x, w.to(x.dtype))``, saving the packed weight; backward
    ``g @ w.to(g.dtype)``) with the fast dequantization."""

    @staticmethod
    def forward(ctx, input: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return F.linear(input, ao.nf4_dequantize_fast(weight).to(input.dtype))

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (weight,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad_output @ ao.nf4_dequantize_fast(weight).to(grad_output.dtype), None


def nf4_linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(input, weight, bias)`` for an NF4Tensor `weight` in the current mode; bitwise torchao's
    (whose handler adds the bias after the linear, as here)."""
    if _mode == "torchao":
        return ao.torchao_nf4_linear(input, weight, bias)
    if not (torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad)):
        out = F.linear(input, ao.nf4_dequantize_fast(weight).to(input.dtype))  # no graph: LinearNF4's forward
    elif _mode == "fast" and not weight.requires_grad and not torch.is_autocast_enabled(input.device.type) \
            and _backward_follows(weight):
        # [Note: NF4 dequantization reuse]: autograd's own linear of the dense weight, which it saves (a
        # checkpoint holder in the checkpointed forward; in the recompute, the weight the backward uses,
        # and the recompute can stop early before this matmul, as it does for a dense weight)
        out = F.linear(input, ao.nf4_dequantize_fast(weight).to(input.dtype))
    else:
        out = _NF4Linear.apply(input, weight)
    if bias is not None:
        out = out + bias
    return out


def nf4_to(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight.to(dtype)`` of an NF4Tensor (torchao: ``get_original_weight().to(dtype)``), bitwise, with
    the fast dequantization unless the mode is "torchao": for code that needs an NF4 weight dense
    outside a linear (a chunked loss's head)."""
    if _mode == "torchao" or not ao.nf4_fast_supported():
        return weight.to(dtype)
    return ao.nf4_dequantize_fast(weight).to(dtype)
