"""Run a function on N gloo ranks in spawned processes, for pytest.

A rank that raises fails the test with that rank's traceback; ranks that do not finish within
`timeout` are killed and the test fails naming them. Nothing is left running.
"""

from __future__ import annotations

import os
import pickle
import queue
import tempfile
import time
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp

DEFAULT_TIMEOUT = float(os.environ.get("FSDP_FROZEN_TEST_TIMEOUT", "180"))


class RankFailure(AssertionError):
    """A rank raised; the message holds its traceback."""


def _worker(fn: Callable[..., Any], rank: int, world_size: int, init_file: str, results: Any, args: tuple,
            backend: str = "gloo") -> None:
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        if backend == "nccl":  # one GPU per rank
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size)
        try:
            out = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        # Plain pickle (bytes): torch.multiprocessing would share tensors through fds that die with the rank.
        results.put((rank, "ok", pickle.dumps(out)))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        results.put((rank, "error", traceback.format_exc()))


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = DEFAULT_TIMEOUT,
              backend: str = "gloo") -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on `world_size` ranks (gloo; ``backend="nccl"``: one GPU
    per rank, ``cuda:RANK``); return the per-rank results.

    `fn` must be importable (module level) and its results picklable.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        procs = [
            ctx.Process(target=_worker, args=(fn, r, world_size, init_file, results, args, backend), daemon=True)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        outputs: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        try:
            while len(outputs) < world_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    missing = sorted(set(range(world_size)) - set(outputs))
                    raise TimeoutError(f"{fn.__name__}: ranks {missing} of {world_size} did not finish in {timeout:.0f}s")
                try:
                    rank, status, payload = results.get(timeout=min(remaining, 1.0))
                except queue.Empty:
                    dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in outputs]
                    if dead and all(p.exitcode not in (0, None) for p in (procs[r] for r in dead)):
                        raise RankFailure(
                            f"{fn.__name__}: rank(s) {dead} died without a result "
                            f"(exit codes {[procs[r].exitcode for r in dead]})"
                        )
                    continue
                if status == "error":
                    raise RankFailure(f"{fn.__name__}: rank {rank} of {world_size} failed:\n{payload}")
                outputs[rank] = pickle.loads(payload)
        finally:
            for p in procs:
                p.join(timeout=5 if len(outputs) == world_size else 0.1)
                if p.is_alive():
                    p.kill()
                    p.join()
    return [outputs[r] for r in range(world_size)]
