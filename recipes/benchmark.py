"""Benchmark: shard_with_freezing under each frozen policy against plain FSDP2, in one run.

    torchrun --nproc-per-node 2 recipes/benchmark.py [--steps 10] [--out bench_out]

Builds the Llama-style LoRA model (recipes/llama.py: >= 4 blocks, width >= 512, LoRA rank 8 on every
linear) once per variant: plain FSDP2 (one unit per block) and shard_with_freezing under every frozen
policy (after_forward, after_backward, never) with bf16, fp32 and NF4 frozen storage, each with the
adapters per unit (FSDP2's layout), in one root group (``trainable_grouping="root"``) and replicated
(``"replicate"``; both with bf16 and NF4), all computing in bf16 (reduce in fp32), fused AdamW. Times the variants round-robin (one step of each
per round) so that machine noise hits all of them alike, alongside a compute floor (the same model in
bf16 on each rank without FSDP: no communication, no hooks; what no sharding can beat), the
data-parallel floor (the same with its gradients averaged in one fp32 all-reduce after backward, as DDP
without overlap: what no layout that averages gradients without overlap can beat; and overlapped, one
all-reduce per block launched from backward) and the collectives of the one trainable group and of the
replicated group alone. `--profile-nf4` adds where an NF4 step's time goes. Counts collective bytes per step, persistent
bytes per rank, peak memory (fsdp_frozen.diagnostics.PeakTensorMemory for every variant, cross-checked
against torch's FSDPMemTracker on plain FSDP2, the one variant it supports; torch.cuda.max_memory_allocated
on CUDA) and tokens/s. Then times a trainable-only checkpoint save against full dcp.saves. Prints
markdown tables on rank 0, writes OUT/benchmark.json and, with matplotlib (the `plot` extra),
OUT/benchmark.png. Ratios are against plain FSDP2 (or a floor) in the same run: the median over rounds of the
two step times of a round, each round running every variant once in a shuffled order.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llama import LlamaConfig, LlamaLoRA  # noqa: E402
from runtime import end_runtime, init_runtime  # noqa: E402

import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict  # noqa: E402

from fsdp_frozen import FreezePolicy, describe, shard_with_freezing  # noqa: E402
from fsdp_frozen.apply import sharded_state  # noqa: E402
from fsdp_frozen.checkpoint import read_manifest, save_checkpoint  # noqa: E402
from fsdp_frozen import _torch_compat as compat  # noqa: E402
from fsdp_frozen.diagnostics import CommCounter, frozen_group_names, shared_frozen_all_gathers  # noqa: E402
from fsdp_frozen.diagnostics import PeakTensorMemory, state_tensors  # noqa: E402
from fsdp_frozen.storage import storage_nbytes  # noqa: E402

POLICIES = ["after_forward", "after_backward", "never"]
DTYPES = {"bf16": "bfloat16", "fp32": "float32", "nf4": "nf4"}  #: frozen storage; compute is bf16 in every variant
GROUPINGS = ["per_unit", "root", "replicate"]  #: FreezePolicy.trainable_grouping
FLOOR = "compute floor"  #: timed only: the model in bf16 on each rank, no FSDP
#: no units at all: one frozen group, the root's, and the trainable parameters replicated (the least
#: FSDP2 does per step: its root hooks and a frozen group kept gathered)
NO_UNITS = "never, no units, replicated trainable"
COLLECTIVES = "collectives of one trainable group"  #: timed only: one all-gather + one reduce-scatter, no model
COLLECTIVES_AR = "collectives of the replicated trainable group"  #: timed only: one all-reduce, no model
#: timed only: the compute floor's model with its gradients averaged across ranks in one fp32
#: all-reduce after backward (DDP without overlap): the least a data-parallel step costs unoverlapped
DP_FLOOR = "data-parallel floor"
#: timed only: the same with one asynchronous all-reduce per block, launched from backward as soon as
#: the block's gradients are all there (DDP's overlap, bucketed by block)
DP_OVERLAP = "data-parallel floor, overlapped"


def make_optimizer(model: nn.Module, kind: str) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; ``fused``: one kernel (one DTensor dispatch) per step."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=1e-4, **({"fused": True} if kind == "fused" else {"foreach": True}))


def collectives_step(model: nn.Module, device: torch.device, all_reduce: bool = False):
    """What a one-trainable-group layout must communicate per step, alone: one all-gather of the
    trainable bytes in bf16 and one reduce-scatter of their gradients in fp32 (sizes read from
    `describe` of `model`), the communication floor of ``trainable_grouping="root"``; with
    `all_reduce`, one all-reduce of the gradients in fp32, that of ``"replicate"``."""
    record = next(r for r in describe(model) if r.kind == "trainable")
    world = dist.get_world_size()
    numel = math.ceil(record.numel / world) * world
    shard = torch.zeros(numel // world, dtype=torch.bfloat16, device=device)
    gathered = torch.empty(numel, dtype=torch.bfloat16, device=device)
    grads = torch.zeros(numel, dtype=torch.float32, device=device)
    out = torch.empty(numel // world, dtype=torch.float32, device=device)

    def step() -> None:
        if all_reduce:
            dist.all_reduce(grads, op=dist.ReduceOp.AVG)
            return
        compat.all_gather_single(gathered, shard)
        compat.reduce_scatter_single(out, grads)

    return step


class GradientAverager:
    """What data parallelism adds to the compute floor's step: the trainable gradients averaged across
    ranks in fp32 (the variants' reduce dtype) and copied back, either in one all-reduce after
    backward (`overlap` False) or in one asynchronous all-reduce per block, launched from a
    post-accumulate-grad hook once the block's last gradient is there and waited for after backward
    (`overlap` True). A reference to time against, not a layout this package offers."""

    def __init__(self, model: nn.Module, overlap: bool) -> None:
        trainable = lambda m: [p for p in m.parameters() if p.requires_grad]  # noqa: E731
        self.buckets = [trainable(block) for block in model.layers] if overlap else [trainable(model)]
        self.pending: list[tuple] = []
        self.overlap = overlap
        for bucket in self.buckets if overlap else []:
            left = {"n": len(bucket)}

            def hook(_p: torch.Tensor, bucket=bucket, left=left) -> None:
                left["n"] -= 1
                if left["n"] == 0:
                    left["n"] = len(bucket)
                    self._launch(bucket)

            for p in bucket:
                p.register_post_accumulate_grad_hook(hook)

    def _launch(self, bucket: list[nn.Parameter]) -> None:
        flat = torch.cat([p.grad.view(-1) for p in bucket]).float()  # packed in two ops, as replicate.py does in one
        self.pending.append((dist.all_reduce(flat, async_op=True), flat, bucket))

    def finish(self) -> None:
        """After backward: (launch and) wait for the all-reduces, copy the averages into ``.grad``."""
        if not self.overlap:
            self._launch(self.buckets[0])
        for work, flat, bucket in self.pending:
            work.wait()
            flat.div_(dist.get_world_size())
            torch._foreach_copy_([p.grad.view(-1) for p in bucket], flat.split([p.numel() for p in bucket]))
        self.pending.clear()


def replicas_equal(model: nn.Module) -> bool:
    """Whether every rank holds the same parameters (one all-gather of a float64 checksum)."""
    total = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    gathered = [torch.empty_like(total) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, total)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def variant_name(policy: str, dtype: str, grouping: str = "per_unit") -> str:
    name = policy if dtype == "bf16" else f"{policy} ({dtype} frozen)"
    return name if grouping == "per_unit" else f"{name}, {'replicated' if grouping == 'replicate' else grouping} trainable"


def checkpointed(model: nn.Module, ac: bool) -> nn.Module:
    """With `ac`, every block in torch's ``checkpoint_wrapper`` (non-reentrant), as users apply AC."""
    if ac:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for i, layer in enumerate(model.layers):
            model.layers[i] = checkpoint_wrapper(layer)
    return model


def build(variant: tuple[str, str, str] | None, cfg: LlamaConfig, mesh, device: torch.device,
          ac: bool = False) -> nn.Module:
    """`variant`: (frozen policy, frozen dtype key, trainable grouping or "none": no units), or None for
    plain FSDP2."""
    torch.manual_seed(0)
    with torch.device(device):
        model = checkpointed(LlamaLoRA(cfg), ac)
    if variant is None:
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in model.layers:
            fully_shard(layer, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        return model
    policy_name, dtype, grouping = variant
    policy = FreezePolicy(
        units=[] if grouping == "none" else ["layers.*"], frozen_reshard=policy_name, frozen_dtype=DTYPES[dtype],
        param_dtype="bfloat16", reduce_dtype="float32",
        trainable_grouping="replicate" if grouping == "none" else grouping,
    )
    return shard_with_freezing(model, mesh, policy)


def build_compute_floor(cfg: LlamaConfig, device: torch.device, ac: bool = False) -> nn.Module:
    """The same model, all in bf16, unsharded on each rank: the per-rank compute alone (a step-time floor)."""
    torch.manual_seed(0)
    with torch.device(device):
        return checkpointed(LlamaLoRA(cfg).to(torch.bfloat16), ac)


def persistent_bytes(model: nn.Module) -> tuple[int, int]:
    """(frozen, total) bytes of parameter storage that lives across steps on this rank."""
    frozen = total = 0
    for p in model.parameters():
        local = p.to_local() if isinstance(p, DTensor) else p  # kept-gathered groups show full tensors
        n = storage_nbytes(local)  # NF4: its packed inner tensors
        total += n
        frozen += 0 if p.requires_grad else n
    return frozen, total


def kept_shard_bytes(model: nn.Module) -> int:
    """Shards FSDP still holds behind kept-gathered ("never") frozen groups (those show full tensors);
    none behind groups kept whole outside FSDP (``trainable_grouping="replicate"``)."""
    whole = sharded_state(model).plan.unmanaged
    return sum(r.sharded_bytes for r in describe(model)
               if r.kind == "frozen" and r.reshard == "never" and not set(r.params) <= whole)


def peak_bytes(model: nn.Module, opt, step_fn) -> int:
    """Peak tensor bytes alive on this rank during one step (`PeakTensorMemory`: same method for
    plain FSDP2 and split models, CPU or CUDA)."""
    with PeakTensorMemory(state_tensors(model, opt)) as tracker:
        step_fn()
    return tracker.peak


def fsdp_mem_tracker_peak(model: nn.Module, opt, step_fn) -> int | None:
    """torch's FSDPMemTracker, where it works (plain FSDP2: one param group per module): a cross-check."""
    try:
        tracker = compat.fsdp_mem_tracker(model, opt)
        with tracker:
            step_fn()
        snap = tracker.get_tracker_snapshot("peak")
        return max(v.get("Total", 0) for v in snap.values())
    except Exception:  # noqa: BLE001 - refuses several param groups per module
        return None


def profile_step(step, variant: str, top: int = 8) -> list[dict]:
    """Where one step of `variant` spends its time: torch.profiler's operators by self CPU time
    (CUDA time too on CUDA), the `top` largest with their share of the step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        step(variant, 0)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events) or 1
    events.sort(key=lambda e: -e.self_cpu_time_total)
    return [{"op": e.key, "self_cpu_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total,
             "calls": e.count} for e in events[:top]]


def render_profile(variant: str, rows: list[dict]) -> str:
    lines = [f"\nProfile of one step of '{variant}' (rank 0, self CPU time by operator):", "",
             "| operator | calls | self ms | share |", "|---|---|---|---|"]
    lines += [f"| {r['op']} | {r['calls']} | {r['self_cpu_ms']:.1f} | {r['share']:.0%} |" for r in rows]
    return "\n".join(lines)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def checkpoint_bench(model: nn.Module, opt, plain: nn.Module, plain_opt, root: Path, repeats: int) -> dict:
    """Trainable-only save (frozen base already on disk) vs full dcp.saves of model + optimizer state.

    "full": the same split model (frozen shards in bf16); "plain_full": the plain FSDP2 model (fp32
    frozen shards), what a user saves without this package. All run round-robin `repeats` times into
    fresh directories; the median time of each is reported.
    """
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(root, ignore_errors=True)
    dist.barrier()
    save_checkpoint(root / "base", model, opt)  # writes the frozen base once
    times: dict[str, list[float]] = {"full": [], "plain_full": [], "trainable": []}
    sizes: dict[str, int] = {}
    for i in range(repeats):
        for kind in times:
            path = root / f"{kind}_{i}"
            dist.barrier()
            t0 = time.perf_counter()
            if kind != "trainable":
                m, o = (model, opt) if kind == "full" else (plain, plain_opt)
                dcp.save({"model": get_model_state_dict(m), "optimizer": get_optimizer_state_dict(m, o)},
                         checkpoint_id=str(path))
            else:
                save_checkpoint(path, model, opt)  # frozen="auto": a reference to the base
            dist.barrier()
            times[kind].append(time.perf_counter() - t0)
            if rank == 0:
                sizes[kind] = dir_bytes(path)
                if i == 0 and kind == "trainable":
                    manifest = read_manifest(path)
    result = {}
    if rank == 0:
        nbytes = lambda e: math.prod(e["shape"]) * getattr(torch, e["dtype"]).itemsize  # noqa: E731
        logical = sum(nbytes(e) for e in manifest["params"].values() if e["kind"] == "trainable")
        logical += sum(nbytes(e) for e in manifest["optimizer"].values() if e["shape"] is not None)
        assert manifest["frozen_state"] == "referenced"
        result = {
            "full_save_bytes": sizes["full"],
            "plain_full_save_bytes": sizes["plain_full"],
            "trainable_save_bytes": sizes["trainable"],
            "trainable_and_optimizer_bytes": logical,
            "bytes_ratio_vs_trainable_and_optimizer": sizes["trainable"] / logical,
            "full_save_s": statistics.median(times["full"]),
            "plain_full_save_s": statistics.median(times["plain_full"]),
            "trainable_save_s": statistics.median(times["trainable"]),
        }
        result["time_ratio_vs_full"] = result["trainable_save_s"] / result["full_save_s"]
        result["time_ratio_vs_plain_full"] = result["trainable_save_s"] / result["plain_full_save_s"]
        shutil.rmtree(root, ignore_errors=True)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--save-repeats", type=int, default=5, help="timed checkpoint saves of each kind")
    ap.add_argument("--variants", default=",".join(POLICIES), help="frozen policies to run (after_forward always)")
    ap.add_argument("--frozen-dtypes", default=",".join(DTYPES), help="frozen storage dtypes to run (bf16 always)")
    ap.add_argument("--groupings", default=",".join(GROUPINGS),
                    help="trainable groupings to run (per_unit always; root is run for bf16 and nf4 frozen)")
    ap.add_argument("--optimizer", choices=["fused", "foreach"], default="fused",
                    help="AdamW implementation of every variant and of the compute floor")
    ap.add_argument("--profile-nf4", action="store_true",
                    help="profile one step of the NF4 after_forward variant and print where its time goes")
    ap.add_argument("--ac", action="store_true",
                    help="activation checkpointing: every block wrapped in checkpoint_wrapper (non-reentrant), in "
                         "every variant and floor")
    ap.add_argument("--no-plot", action="store_true", help="skip the PNG chart")
    ap.add_argument("--checkpoint-only", action="store_true",
                    help="only the checkpoint saves (plain FSDP2 and after_forward/bf16; no training steps): "
                         "for model sizes where CPU steps are too slow")
    args = ap.parse_args(argv)
    chosen, dtypes = args.variants.split(","), args.frozen_dtypes.split(",")
    if set(chosen) - set(POLICIES) or "after_forward" not in chosen:
        ap.error(f"--variants: a comma list of {POLICIES} including after_forward, got {args.variants!r}")
    if set(dtypes) - set(DTYPES) or "bf16" not in dtypes:
        ap.error(f"--frozen-dtypes: a comma list of {list(DTYPES)} including bf16, got {args.frozen_dtypes!r}")
    groupings = args.groupings.split(",")
    if set(groupings) - set(GROUPINGS) or "per_unit" not in groupings:
        ap.error(f"--groupings: a comma list of {GROUPINGS} including per_unit, got {args.groupings!r}")
    specs: dict[str, tuple[str, str, str] | None] = {"plain": None}
    for g in GROUPINGS:
        for d in DTYPES:
            for p in POLICIES:
                if g in groupings and d in dtypes and p in chosen and (g == "per_unit" or d != "fp32"):
                    specs[variant_name(p, d, g)] = (p, d, g)
    if "replicate" in groupings and "never" in chosen:
        specs[NO_UNITS] = ("never", "bf16", "none")
    if args.checkpoint_only:
        specs = {"plain": None, "after_forward": specs["after_forward"]}
    args.specs = specs
    args.variant_list = list(specs)
    return args


def time_round_robin(step, names: list[str], warmup: int, steps: int, cuda: bool) -> dict[str, list[float]]:
    """Seconds per step of every variant, the variants interleaved step by step (one round = each
    once), in an order shuffled per round (the same on every rank), so that no variant always follows
    the same one (what ran before a step leaves the caches in its own state). ``times[v][i]`` is
    round i's: `paired_ratio` compares variants round by round."""
    times: dict[str, list[float]] = {v: [] for v in names}
    for i in range(warmup + steps):
        order = list(names)
        random.Random(i).shuffle(order)
        for v in order:
            dist.barrier()
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step(v, i)
            if cuda:
                torch.cuda.synchronize()
            if i >= warmup:
                times[v].append(time.perf_counter() - t0)
    return times


def paired_ratio(times: dict[str, list[float]], v: str, ref: str) -> float:
    """Median over rounds of v's step time over ref's in the same round: the machine's drift from
    round to round (other load, frequency) cancels, which the ratio of two medians does not do."""
    return statistics.median(a / b for a, b in zip(times[v], times[ref]))


def measure(step, models: dict, opts: dict, times: dict, variants: list[str], tokens: int, cuda: bool) -> dict:
    """Per variant: median step time, collective bytes of one step, persistent and peak bytes; the
    ratios against plain FSDP2."""
    results = {}
    for v in variants:
        counter = CommCounter()
        with counter:
            step(v, 0)
        fpgs = frozen_group_names(models[v]) if v != "plain" else set()  # plain: derived below
        shared_calls, shared_bytes = shared_frozen_all_gathers(models[v]) if v != "plain" else (0, 0)
        frozen_b, total_b = persistent_bytes(models[v])
        kept = kept_shard_bytes(models[v]) if v != "plain" else 0
        cuda_max = None
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            step(v, 0)
            cuda_max = torch.cuda.max_memory_allocated()
        results[v] = {
            "step_time_s": statistics.median(times[v]),
            "tokens_per_s": tokens / statistics.median(times[v]),
            "all_gather_bytes": counter.total("all_gather"),
            # frozen bytes on the frozen groups' own process groups, and those on groups shared with
            # trainable parameters (merged groups; torch < 2.12's structural fallback)
            "frozen_all_gather_bytes": counter.total("all_gather", fpgs) + shared_bytes,
            "reduce_scatter_bytes": counter.total("reduce_scatter"),
            "all_gathers": counter.total("all_gather", count=True),
            "frozen_all_gathers": counter.total("all_gather", fpgs, count=True) + shared_calls,
            "reduce_scatters": counter.total("reduce_scatter", count=True),
            "all_reduces": counter.total("all_reduce", count=True),
            "frozen_persistent_bytes": frozen_b + kept,
            "total_persistent_bytes": total_b + kept,
            "peak_bytes": peak_bytes(models[v], opts[v], lambda v=v: step(v, 0)),
            "fsdp_mem_tracker_peak_bytes": fsdp_mem_tracker_peak(models[v], opts[v], lambda v=v: step(v, 0))
            if v == "plain" else None,
            "cuda_max_memory_allocated": cuda_max,
        }
    plain = results["plain"]
    trainable_ag = results["after_forward"]["all_gather_bytes"] - results["after_forward"]["frozen_all_gather_bytes"]
    plain["frozen_all_gather_bytes"] = plain["all_gather_bytes"] - trainable_ag  # same trainable groups as ours
    for v, r in results.items():
        r["step_time_ratio"] = paired_ratio(times, v, "plain")
        r["compute_floor_ratio"] = paired_ratio(times, v, FLOOR) if FLOOR in times else None
        r["data_parallel_floor_ratio"] = paired_ratio(times, v, DP_FLOOR) if DP_FLOOR in times else None
        r["frozen_all_gather_ratio"] = r["frozen_all_gather_bytes"] / plain["frozen_all_gather_bytes"]
        r["frozen_persistent_ratio"] = r["frozen_persistent_bytes"] / plain["frozen_persistent_bytes"]
    return results


def report(results: dict, meta: dict, ckpt: dict, layout: str, args: argparse.Namespace, out: Path) -> None:
    """benchmark.json, the tables and the chart (rank 0)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.json").write_text(json.dumps({"meta": meta, "results": results, "checkpoint": ckpt}, indent=2))
    print(f"describe() of the after_forward model, rank 0:\n{layout}\n")
    print(render(results, meta))
    cross = results["plain"]["fsdp_mem_tracker_peak_bytes"]
    if cross:
        print(f"\nPeak memory cross-check on plain FSDP2: PeakTensorMemory {results['plain']['peak_bytes'] / 2**20:.2f} "
              f"MiB, torch's FSDPMemTracker {cross / 2**20:.2f} MiB.")
    print(render_nf4(results))
    print(render_checkpoint(ckpt, args.save_repeats))
    if not args.no_plot:
        print(plot(results, meta, out / "benchmark.png"))
    print(f"\nJSON: {out / 'benchmark.json'}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device, mesh = init_runtime()
    rank, world, cuda = dist.get_rank(), dist.get_world_size(), device.type == "cuda"
    cfg = LlamaConfig(dim=args.dim, n_layers=args.layers, hidden_dim=int(args.dim * 8 / 3) // 32 * 32)
    variants, out = args.variant_list, Path(args.out)
    models = {v: build(args.specs[v], cfg, mesh, device, args.ac) for v in variants}
    opts = {v: make_optimizer(m, args.optimizer) for v, m in models.items()}
    if args.checkpoint_only:
        for v in variants:  # AdamW state as after a step (DCP initialises it: zero grads, lr 0)
            get_optimizer_state_dict(models[v], opts[v])
        ckpt = checkpoint_bench(models["after_forward"], opts["after_forward"], models["plain"], opts["plain"],
                                out / "ckpt", args.save_repeats)
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            (out / "checkpoint.json").write_text(json.dumps({"config": vars(cfg), "checkpoint": ckpt}, indent=2))
            print(render_checkpoint(ckpt, args.save_repeats))
        end_runtime()
        return
    averagers = {}
    for name in (FLOOR, DP_FLOOR, DP_OVERLAP):
        models[name] = build_compute_floor(cfg, device, args.ac)
        opts[name] = make_optimizer(models[name], args.optimizer)
        if name != FLOOR:
            averagers[name] = GradientAverager(models[name], overlap=name == DP_OVERLAP)
    grouped, replicated = variant_name("never", "bf16", "root"), variant_name("never", "bf16", "replicate")
    comm_only = collectives_step(models[grouped], device) if grouped in models else None
    comm_ar = collectives_step(models[replicated], device, all_reduce=True) if replicated in models else None
    g = torch.Generator().manual_seed(rank)
    data = [torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g).to(device) for _ in range(4)]

    def step(v: str, i: int) -> float:
        if v == COLLECTIVES:
            comm_only()
            return 0.0
        if v == COLLECTIVES_AR:
            comm_ar()
            return 0.0
        tokens = data[i % len(data)]
        logits = models[v](tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        if v in averagers:
            averagers[v].finish()
        opts[v].step()
        opts[v].zero_grad(set_to_none=True)
        return loss.item()

    timed = [*variants, FLOOR, DP_FLOOR, DP_OVERLAP] + ([COLLECTIVES] if comm_only else []) + ([COLLECTIVES_AR] if comm_ar else [])
    times = time_round_robin(step, timed, args.warmup, args.steps, cuda)
    results = measure(step, models, opts, times, variants, args.batch * args.seq * world, cuda)
    for v, spec in args.specs.items():  # NF4 against bf16 storage, same policy and grouping, paired by round
        if spec is not None and spec[1] == "nf4" and variant_name(spec[0], "bf16", spec[2]) in results:
            results[v]["vs_bf16"] = paired_ratio(times, v, variant_name(spec[0], "bf16", spec[2]))
    # the data-parallel floors are real data-parallel steps: their replicas stay equal across ranks
    replicas_agree = {name: replicas_equal(models[name]) for name in (DP_FLOOR, DP_OVERLAP)}
    layout = str(describe(models["after_forward"]))
    nf4_variant = variant_name("after_forward", "nf4")
    profile = profile_step(step, nf4_variant) if args.profile_nf4 and nf4_variant in models else None
    ckpt = checkpoint_bench(models["after_forward"], opts["after_forward"], models["plain"], opts["plain"],
                            out / "ckpt", args.save_repeats)
    if rank == 0:
        floor_s = statistics.median(times[FLOOR])
        meta = {"world_size": world, "device": device.type, "torch": torch.__version__, "config": vars(cfg), "ac": args.ac,
                "batch": args.batch, "seq": args.seq, "steps": args.steps, "warmup": args.warmup,
                "compute_floor_step_time_s": floor_s, "compute_floor_ratio": paired_ratio(times, FLOOR, "plain"),
                "data_parallel_floor_step_time_s": statistics.median(times[DP_FLOOR]),
                "data_parallel_floor_ratio": paired_ratio(times, DP_FLOOR, FLOOR),
                "data_parallel_overlapped_step_time_s": statistics.median(times[DP_OVERLAP]),
                "data_parallel_overlapped_ratio": paired_ratio(times, DP_OVERLAP, FLOOR),
                "data_parallel_replicas_agree": replicas_agree,
                "optimizer": args.optimizer,
                "collectives_step_time_s": statistics.median(times[COLLECTIVES]) if comm_only else None,
                "all_reduce_step_time_s": statistics.median(times[COLLECTIVES_AR]) if comm_ar else None}
        report(results, meta, ckpt, layout, args, out)
        if profile:
            print(render_profile(nf4_variant, profile))
            (out / "nf4_profile.json").write_text(json.dumps(profile, indent=2))
    end_runtime()


def render(results: dict, meta: dict) -> str:
    mib = lambda b: "n/a" if b is None else f"{b / 2**20:.2f}"  # noqa: E731
    cuda = meta["device"] == "cuda"
    lines = [
        f"world {meta['world_size']} ({meta['device']}), torch {meta['torch']}, {meta['config']['n_layers']} blocks, "
        f"dim {meta['config']['dim']}, LoRA r{meta['config']['lora_rank']}, bf16 compute, batch {meta['batch']}x{meta['seq']}, "
        f"{'activation checkpointing (every block), ' if meta.get('ac') else ''}"
        f"median of {meta['steps']} steps",
        "",
        "| variant | step ms | vs plain | vs floor | vs DP floor | tok/s | AG/step (frozen) | RS/step | AR/step | AG MiB/step "
        "| frozen AG MiB/step | frozen AG vs plain | RS MiB/step "
        "| frozen MiB/rank | frozen vs plain | total MiB/rank | peak MiB |" + (" CUDA max alloc MiB |" if cuda else ""),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if cuda else ""),
    ]
    for v, r in results.items():
        cuda_col = f" {mib(r['cuda_max_memory_allocated'])} |" if cuda else ""
        lines.append(
            f"| {'plain FSDP2' if v == 'plain' else v} | {r['step_time_s'] * 1e3:.1f} | {r['step_time_ratio']:.2f}x "
            f"| {r['compute_floor_ratio']:.2f}x | {r['data_parallel_floor_ratio']:.2f}x | {r['tokens_per_s']:,.0f} "
            f"| {r['all_gathers']} ({'-' if v == 'plain' else r['frozen_all_gathers']}) | {r['reduce_scatters']} | {r['all_reduces']} "
            f"| {mib(r['all_gather_bytes'])} | {mib(r['frozen_all_gather_bytes'])} | {r['frozen_all_gather_ratio']:.2f}x "
            f"| {mib(r['reduce_scatter_bytes'])} | {mib(r['frozen_persistent_bytes'])} | {r['frozen_persistent_ratio']:.2f}x "
            f"| {mib(r['total_persistent_bytes'])} | {mib(r['peak_bytes'])} |{cuda_col}"
        )
    lines.append(f"\nCompute floor (the same model in bf16 on each rank, no FSDP, no communication, timed in the "
                 f"same rounds): {meta['compute_floor_step_time_s'] * 1e3:.1f} ms = {meta['compute_floor_ratio']:.2f}x "
                 f"plain FSDP2.")
    dp, ov = meta["data_parallel_floor_step_time_s"], meta["data_parallel_overlapped_step_time_s"]
    lines.append(f"Data-parallel floor (the same, its trainable gradients averaged in one fp32 all-reduce after "
                 f"backward, as DDP without overlap; the least a step that averages gradients costs without overlap): "
                 f"{dp * 1e3:.1f} ms = {meta['data_parallel_floor_ratio']:.2f}x the compute floor. Overlapped (one "
                 f"asynchronous all-reduce per block, launched from backward): {ov * 1e3:.1f} ms = "
                 f"{meta['data_parallel_overlapped_ratio']:.2f}x.")
    lines.append("Ratios are medians over rounds of the two step times in the same round (each round times every "
                 "variant once, in a shuffled order).")
    if meta.get("collectives_step_time_s"):
        c, f = meta["collectives_step_time_s"], meta["compute_floor_step_time_s"]
        lines.append(f"Collectives of the one trainable group alone (one all-gather in bf16 + one reduce-scatter in fp32 "
                     f"of its bytes, no model, same rounds): {c * 1e3:.1f} ms; compute floor + them = "
                     f"{(f + c) * 1e3:.1f} ms = {(f + c) / f:.2f}x the floor (timed apart: in a step the ranks "
                     f"also wait for each other, which the data-parallel floor includes).")
    if meta.get("all_reduce_step_time_s"):
        c, f = meta["all_reduce_step_time_s"], meta["compute_floor_step_time_s"]
        lines.append(f"Collectives of the replicated trainable group alone (one all-reduce in fp32 of its gradient "
                     f"bytes, same rounds): {c * 1e3:.1f} ms; compute floor + it = {(f + c) * 1e3:.1f} ms = "
                     f"{(f + c) / f:.2f}x the floor.")
    return "\n".join(lines)


def render_nf4(results: dict) -> str:
    """NF4 against plain FSDP2's fp32 frozen bytes and against the bf16 run's frozen all-gather bytes."""
    lines = []
    for policy in POLICIES:
        nf4, bf16 = results.get(variant_name(policy, "nf4")), results.get(policy)
        if nf4 is None or bf16 is None:
            continue
        ag = nf4["frozen_all_gather_bytes"] / bf16["frozen_all_gather_bytes"] if bf16["frozen_all_gather_bytes"] else 0
        lines.append(f"- {policy}: NF4 frozen bytes/rank {nf4['frozen_persistent_ratio']:.3f}x plain FSDP2's fp32; "
                     f"frozen all-gather bytes/step {ag:.3f}x the bf16 run's; step time "
                     f"{nf4.get('vs_bf16', float('nan')):.2f}x the bf16 run's (paired by round)")
    return "\nNF4 frozen storage:\n" + "\n".join(lines) if lines else ""


def plot(results: dict, meta: dict, path: Path) -> str:
    """A PNG with step time, frozen all-gather bytes, frozen persistent bytes and peak bytes per variant."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "(no chart: pip install -e '.[plot]' for matplotlib)"
    names = ["plain FSDP2" if v == "plain" else v for v in results]
    panels = [
        ("step time vs plain FSDP2", [r["step_time_ratio"] for r in results.values()], "x"),
        ("frozen all-gather MiB / step", [r["frozen_all_gather_bytes"] / 2**20 for r in results.values()], "MiB"),
        ("frozen parameter MiB / rank", [r["frozen_persistent_bytes"] / 2**20 for r in results.values()], "MiB"),
        ("peak tensor MiB / rank (one step)", [r["peak_bytes"] / 2**20 for r in results.values()], "MiB"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 0.45 * len(names) + 1.8))
    colors = ["#888888"] + ["#3b7dd8"] * (len(names) - 1)
    for ax, (title, values, unit) in zip(axes, panels):
        ax.barh(names, values, color=colors)
        ax.set_title(title, fontsize=10)
        ax.invert_yaxis()
        for y, val in enumerate(values):
            ax.text(val, y, f" {val:.2f}{unit if unit == 'x' else ''}", va="center", fontsize=8)
        ax.margins(x=0.25)
    for ax in axes[1:]:
        ax.set_yticklabels([])
    fig.suptitle(f"fsdp_frozen vs plain FSDP2: {meta['config']['n_layers']} blocks, dim {meta['config']['dim']}, "
                 f"LoRA r{meta['config']['lora_rank']}, world {meta['world_size']} ({meta['device']}), "
                 f"torch {meta['torch']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"chart: {path}"


def render_checkpoint(c: dict, repeats: int) -> str:
    mib = lambda b: f"{b / 2**20:.2f}"  # noqa: E731
    return "\n".join([
        "",
        f"Checkpoint save (after_forward model + AdamW state, median of {repeats}; the frozen base was saved once before):",
        "",
        "| save | MiB written | vs trainable+optimizer | ms | vs full dcp.save |",
        "|---|---|---|---|---|",
        f"| full dcp.save, plain FSDP2 model (fp32 frozen) | {mib(c['plain_full_save_bytes'])} | "
        f"{c['plain_full_save_bytes'] / c['trainable_and_optimizer_bytes']:.2f}x | "
        f"{c['plain_full_save_s'] * 1e3:.1f} | {c['plain_full_save_s'] / c['full_save_s']:.2f}x |",
        f"| full dcp.save, same split model (bf16 frozen) | {mib(c['full_save_bytes'])} | "
        f"{c['full_save_bytes'] / c['trainable_and_optimizer_bytes']:.2f}x | {c['full_save_s'] * 1e3:.1f} | 1.00x |",
        f"| save_checkpoint, frozen='auto' (reference) | {mib(c['trainable_save_bytes'])} | "
        f"{c['bytes_ratio_vs_trainable_and_optimizer']:.3f}x | {c['trainable_save_s'] * 1e3:.1f} | "
        f"{c['time_ratio_vs_full']:.3f}x ({c['time_ratio_vs_plain_full']:.3f}x vs plain) |",
        f"\ntrainable parameters + optimizer state: {mib(c['trainable_and_optimizer_bytes'])} MiB",
    ])


if __name__ == "__main__":
    main()
