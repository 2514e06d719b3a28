"""Measurement tools: what a step communicates and what memory it holds. Used by the tests (counts
against the plan's prediction) and the benchmarks; nothing in the training path imports them.

* `CommCounter` (``comm_counter``): c10d collectives by kind, process group and bytes, intercepted with
  a TorchDispatchMode; `frozen_group_names` names the process groups only a model's frozen groups use, and
  `shared_frozen_all_gathers` counts the frozen all-gathers on groups shared with trainable parameters
  (merged groups; torch < 2.12's structural fallback).
* `PeakTensorMemory` (``peak_memory``): the peak bytes of tensor storage alive on the rank during a
  region; `rss_bytes` / `reset_rss_peak`: host RSS and its high-water mark (Linux).
"""

from .comm_counter import CommCounter, frozen_group_names, shared_frozen_all_gathers
from .peak_memory import PeakTensorMemory, reset_rss_peak, rss_bytes, state_tensors

__all__ = ["CommCounter", "PeakTensorMemory", "frozen_group_names", "reset_rss_peak", "rss_bytes",
           "shared_frozen_all_gathers", "state_tensors"]
