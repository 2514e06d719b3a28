"""Frozen storage formats: converted once, before sharding, so no step pays a cast."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn


def cast_frozen(model: nn.Module, fqns: Iterable[str], dtype: torch.dtype) -> None:
    """Store the floating-point parameters named `fqns` in `dtype`, in place.

    The Parameter objects are kept (``param.data`` is replaced), so tied parameters stay tied and
    references the caller holds stay valid. Peak extra memory: one converted parameter at a time.
    """
    for fqn in fqns:
        param = model.get_parameter(fqn)
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
