"""fsdp_frozen: FSDP2 with frozen parameters in their own param groups.

Public API::

    from fsdp_frozen import FreezePolicy, shard_with_freezing, describe, refreeze, PolicyError
"""

from .apply import register_forward_method, shard_with_freezing
from .errors import FreezingChangedError, PolicyError
from .estimate import Estimate, estimate
from .policy import FreezePolicy
from .process_groups import release_process_groups
from .refreeze import refreeze
from .report import GroupRecord, describe
from .tp import llama_tp_plan, lora_tp_plan

__version__ = "0.1.0"

__all__ = [
    "Estimate",
    "FreezePolicy",
    "FreezingChangedError",
    "GroupRecord",
    "PolicyError",
    "describe",
    "estimate",
    "llama_tp_plan",
    "lora_tp_plan",
    "refreeze",
    "register_forward_method",
    "release_process_groups",
    "shard_with_freezing",
    "__version__",
]
