"""Exceptions raised by fsdp_frozen. Every message names the culprit (key, parameter, module or file)."""

from __future__ import annotations


class PolicyError(ValueError):
    """A `FreezePolicy` or its application to a model is invalid.

    Raised before any sharding happens, so the model is left as it was.
    """


class FreezingChangedError(RuntimeError):
    """`requires_grad` of a sharded parameter changed after `shard_with_freezing`.

    The frozen/trainable split is fixed when the model is sharded; training on would silently
    use a stale split, so the next forward raises this instead.
    """


#: added to the FreezingChangedError of a trainable parameter found with requires_grad=False
DISABLED_ADAPTER_HINT = (" (PEFT's disable_adapter() sets requires_grad=False on the adapters while it is "
                         "active: run that forward under torch.no_grad(), as DPO/GRPO reference forwards do)")


class CheckpointLayoutError(RuntimeError):
    """A checkpoint cannot be loaded into this model as asked, or cannot be saved as asked.

    The message lists every difference (missing, extra, shape, frozen vs trainable, dtype,
    quantization) or names the file, base checkpoint or parameter at fault. Raised before any
    tensor of the model or optimizer is changed.
    """
