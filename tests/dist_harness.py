"""Run a function on N ranks (gloo; NCCL for the CUDA tier), for pytest, on a pool of ranks kept alive.

Starting ranks costs seconds per test (each imports torch); so, as PyTorch's own
``MultiProcContinuousTest`` does, one pool of N ranks per (world size, backend) serves every
test that asks for that size, with its process group kept. A rank that raises fails the test with that
rank's traceback; ranks that do not finish within `timeout` fail it naming them; a rank that dies fails
it with its exit code. After any failure the whole pool is killed (a failed rank can leave the others
inside a collective) and the next test gets a fresh one. ``fresh=True`` runs in newly started ranks
that end with the test, for tests that change process-wide state (monkeypatched classes, DCP's class-
level plan cache, killed ranks). Nothing is left running at exit.

[Note: ranks forked from a preloaded server]
A spawned rank imports torch, transformers and PEFT itself: ~5 s of CPU per rank, 36-39 s for 8 ranks
on 2 cores (measured 2026-12-03), paid again by every fresh test and every pool a failure killed. gloo
ranks are started with multiprocessing's "forkserver" instead, whose server imports those third-party
modules once (`PRELOAD`) and forks each rank from them: 8 ranks in 0.1 s after the server's ~5 s. The
server imports nothing of this package or the tests (a fork has them imported after it starts, as a
spawned rank does) and runs no tensor op (no thread pool is forked); each rank takes the parent's
environment as it is when the rank starts (`_adopt`), as a spawned one does. NCCL ranks are spawned
(CUDA must not meet a fork); ``FSDP_FROZEN_TEST_START=spawn`` spawns every rank.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import pickle
import queue
import tempfile
import time
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp

DEFAULT_TIMEOUT = float(os.environ.get("FSDP_FROZEN_TEST_TIMEOUT", "180"))
#: FSDP_FROZEN_TEST_POOL=0 runs every test in fresh ranks (the old behaviour; slower).
POOL_ENABLED = os.environ.get("FSDP_FROZEN_TEST_POOL", "1") != "0"
#: [Note: ranks forked from a preloaded server]: "forkserver" (default) or "spawn"
START_METHOD = os.environ.get("FSDP_FROZEN_TEST_START", "forkserver")
if START_METHOD not in ("forkserver", "spawn"):
    raise ValueError(f"FSDP_FROZEN_TEST_START={START_METHOD!r}: expected 'forkserver' or 'spawn'")
#: what the fork server imports once, for every rank: third-party only
PRELOAD = ["torch", "torch.distributed.fsdp", "torch.distributed.tensor", "torch.distributed.checkpoint",
           "transformers", "peft"]


def _context(backend: str):
    """The multiprocessing context ranks start in ([Note: ranks forked from a preloaded server])."""
    if backend != "gloo" or START_METHOD == "spawn" or "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([m for m in PRELOAD if importlib.util.find_spec(m.split(".")[0]) is not None])
    return ctx


def _adopt(env: dict[str, str]) -> None:
    """A forked rank takes the parent's environment of now, not the server's of its start."""
    if os.environ != env:
        os.environ.clear()
        os.environ.update(env)


class RankFailure(AssertionError):
    """A rank raised; the message holds its traceback."""


def _init(rank: int, world_size: int, init_file: str, backend: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    if backend == "nccl":  # one GPU per rank
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size)


def _run_task(fn: Callable[..., Any], rank: int, world_size: int, args: tuple) -> tuple[str, Any]:
    try:
        import torch

        torch.manual_seed(0)  # every task starts from the same generator state, pooled or not
        # Plain pickle (bytes): torch.multiprocessing would share tensors through fds that die with the rank.
        return "ok", pickle.dumps(fn(rank, world_size, *args))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        return "error", traceback.format_exc()


def _worker(fn: Callable[..., Any], rank: int, world_size: int, init_file: str, results: Any, args: tuple,
            backend: str, env: dict[str, str]) -> None:
    """A fresh rank: one task, then the process group is destroyed."""
    _adopt(env)
    try:
        _init(rank, world_size, init_file, backend)
    except BaseException:  # noqa: BLE001
        results.put((rank, 0, "error", traceback.format_exc()))
        return
    import torch.distributed as dist

    try:
        status, payload = _run_task(fn, rank, world_size, args)
    finally:
        dist.destroy_process_group()
    results.put((rank, 0, status, payload))


def _pool_worker(rank: int, world_size: int, init_file: str, tasks: Any, results: Any, backend: str,
                 env: dict[str, str]) -> None:
    """A pooled rank: tasks until told to stop, one process group throughout."""
    _adopt(env)
    try:
        _init(rank, world_size, init_file, backend)
    except BaseException:  # noqa: BLE001
        results.put((rank, -1, "error", traceback.format_exc()))
        return
    while True:
        task = tasks.get()
        if task is None:
            break
        task_id, fn, args = task
        status, payload = _run_task(fn, rank, world_size, args)
        results.put((rank, task_id, status, payload))
    import torch.distributed as dist

    dist.destroy_process_group()


class _Pool:
    def __init__(self, world_size: int, backend: str) -> None:
        ctx = _context(backend)
        self.world_size = world_size
        self.tmp = tempfile.TemporaryDirectory()
        init_file = os.path.join(self.tmp.name, "init")
        self.tasks = [ctx.Queue() for _ in range(world_size)]
        self.results = ctx.Queue()
        env = dict(os.environ)
        self.procs = [ctx.Process(target=_pool_worker, args=(r, world_size, init_file, self.tasks[r], self.results,
                                                            backend, env), daemon=True) for r in range(world_size)]
        for p in self.procs:
            p.start()
        self.next_id = 0

    def submit(self, fn: Callable[..., Any], args: tuple) -> int:
        self.next_id += 1
        for q in self.tasks:
            q.put((self.next_id, fn, args))
        return self.next_id

    def kill(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
        for p in self.procs:
            p.join(timeout=5)
        self.tmp.cleanup()

    def close(self) -> None:
        for q in self.tasks:
            q.put(None)
        for p in self.procs:
            p.join(timeout=10)
        self.kill()


_POOLS: dict[tuple[int, str], _Pool] = {}


def _close_pools() -> None:
    for pool in _POOLS.values():
        pool.kill()
    _POOLS.clear()


atexit.register(_close_pools)


def _collect(name: str, world_size: int, results: Any, procs: list, task_id: int, timeout: float) -> list[Any]:
    outputs: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    while len(outputs) < world_size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            missing = sorted(set(range(world_size)) - set(outputs))
            raise TimeoutError(f"{name}: ranks {missing} of {world_size} did not finish in {timeout:.0f}s")
        try:
            rank, got_id, status, payload = results.get(timeout=min(remaining, 1.0))
        except queue.Empty:
            dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in outputs]
            if dead and all(procs[r].exitcode not in (0, None) for r in dead):  # exit 0: its result is on the way
                raise RankFailure(f"{name}: rank(s) {dead} died without a result "
                                  f"(exit codes {[procs[r].exitcode for r in dead]})")
            continue
        if status == "error":
            where = "failed to start" if got_id == -1 else "failed"
            # The first error can be a consequence (a peer's connection reset): gather what the other
            # ranks report within a few seconds, so the cause is in the message too.
            others = []
            until = time.monotonic() + 3
            while time.monotonic() < until:
                try:
                    r2, _, s2, p2 = results.get(timeout=max(until - time.monotonic(), 0.01))
                except queue.Empty:
                    break
                if s2 == "error":
                    others.append(f"rank {r2} of {world_size} failed:\n{p2}")
            dead = [f"rank {r} died (exit code {p.exitcode})" for r, p in enumerate(procs)
                    if not p.is_alive() and p.exitcode not in (0, None)]
            raise RankFailure("\n".join([f"{name}: rank {rank} of {world_size} {where}:\n{payload}", *others, *dead]))
        if got_id != task_id:
            continue  # a late result of an earlier task that timed out (its pool was killed)
        outputs[rank] = pickle.loads(payload)
    return [outputs[r] for r in range(world_size)]


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = DEFAULT_TIMEOUT,
              backend: str = "gloo", fresh: bool = False) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on `world_size` ranks (gloo; ``backend="nccl"``: one GPU
    per rank, ``cuda:RANK``); return the per-rank results.

    `fn` must be importable (module level) and its results picklable. It runs in the pool of that
    size (its process group, meshes made from it and module-level state persist between tests) unless
    `fresh` or ``FSDP_FROZEN_TEST_POOL=0``; every task starts with ``torch.manual_seed(0)``.
    """
    if fresh or not POOL_ENABLED or backend == "nccl":
        return _run_fresh(fn, world_size, args, timeout, backend)
    key = (world_size, backend)
    pool = _POOLS.get(key)
    if pool is None:
        pool = _POOLS[key] = _Pool(world_size, backend)
    task_id = pool.submit(fn, args)
    try:
        return _collect(fn.__name__, world_size, pool.results, pool.procs, task_id, timeout)
    except BaseException:
        _POOLS.pop(key, None)
        pool.kill()
        raise


def _run_fresh(fn: Callable[..., Any], world_size: int, args: tuple, timeout: float, backend: str) -> list[Any]:
    ctx = _context(backend)
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        procs = [
            ctx.Process(target=_worker, args=(fn, r, world_size, init_file, results, args, backend, dict(os.environ)),
                        daemon=True)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        done = False
        try:
            out = _collect(fn.__name__, world_size, results, procs, 0, timeout)
            done = True
            return out
        finally:
            for p in procs:
                p.join(timeout=5 if done else 0.1)
                if p.is_alive():
                    p.kill()
                    p.join()
