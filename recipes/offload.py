"""Activation offloading (issue 25, 3): what autograd saves outside the activation-checkpointed blocks
goes to pinned host memory in the forward and comes back for the backward.

    with OffloadActivations():
        loss = causal_lm_loss(model, labels, ids)
    loss.backward()

[Note: offloading the checkpointed inputs] With every block checkpointed (non-reentrant), what a
step keeps on the device between forward and backward is each block's input (``torch.utils.checkpoint``
saves it through autograd's saved-tensor hooks, both on torch 2.11, `_NoopSaveInputs`, and 2.13,
``save_inputs``), the loss's saved tensors and a few small ones; inside a checkpointed block the
checkpoint's own hooks hold only placeholders, so this hook never sees a block's inner activations.
For Llama-3.1-8B at 2 x 2048 the inputs are 32 x 32 MiB = 1.00 GiB, the largest activation term left
after the chunked loss (`fsdp_frozen.estimate.activation_bytes(..., offload=True)` models this). Each
saved tensor of at least `min_bytes` is copied on a side stream into pinned host memory
(``non_blocking``), and the device memory is handed back without a host sync: ``record_stream`` tells
the caching allocator the side stream still reads it, so the block is reused only after the copy. The
backward's unpack makes the current stream wait for that copy's event and copies the tensor back
``non_blocking``. torchtune's ``OffloadActivations`` does the same with more machinery (prefetching the
next tensors back during backward); ``torch.autograd.graph.save_on_cpu`` copies synchronously (a host
sync per tensor). Parameters (FSDP's unsharded weights saved by a linear outside the blocks: the head)
and tensor subclasses (NF4, DTensor) stay where they are: they are not activations, and gathering
them again is FSDP's business. On the CPU (the tests) a saved tensor is copied to a new CPU tensor, so
the same packing runs and its count can be checked; nothing is saved there.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn


class OffloadActivations(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks moving saved activations of at least `min_bytes` to pinned host memory
    ([Note: offloading the checkpointed inputs]). ``offloaded`` / ``offloaded_bytes`` count what was
    moved since construction."""

    def __init__(self, min_bytes: int = 1 << 20) -> None:
        self.min_bytes = min_bytes
        self.offloaded = 0
        self.offloaded_bytes = 0
        self._streams: dict[torch.device, Any] = {}
        super().__init__(self._pack, self._unpack)

    def _stream(self, device: torch.device) -> Any:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def _pack(self, tensor: torch.Tensor) -> Any:
        nbytes = tensor.numel() * tensor.element_size()
        if type(tensor) is not torch.Tensor or isinstance(tensor, nn.Parameter) or nbytes < self.min_bytes:
            return tensor
        self.offloaded += 1
        self.offloaded_bytes += nbytes
        if tensor.device.type != "cuda":
            return tensor.device, tensor.to("cpu", copy=True), None
        stream = self._stream(tensor.device)
        stream.wait_stream(torch.cuda.current_stream(tensor.device))
        with torch.cuda.stream(stream):
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            host.copy_(tensor, non_blocking=True)
            copied = stream.record_event()
        tensor.record_stream(stream)  # the allocator keeps its block until the side stream's copy is done
        return tensor.device, host, copied

    @staticmethod
    def _unpack(packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        device, host, copied = packed
        if copied is None:
            return host.to(device)
        torch.cuda.current_stream(device).wait_event(copied)
        return host.to(device, non_blocking=True)
