"""Refreeze benchmark: `refreeze` against save + rebuild + load of the same model, in one run.

    torchrun --nproc-per-node 2 recipes/benchmark_refreeze.py [--dim 1024 --layers 8] [--rounds 3] [--out DIR]

The Llama-style LoRA model (recipes/llama.py, bf16 frozen, fp32 adapters) trains one step as stage 1
(adapters only). Then stage 2 opens the last two blocks, in two ways, alternated round by round:

* ``refreeze``: `fsdp_frozen.refreeze(model, optimizer, stage2)`, in place.
* ``save+rebuild+load``: `save_checkpoint` (frozen="include"), the old model and optimizer dropped,
  a new model built on meta and sharded under stage 2, `load_checkpoint(allow_freezing_change=True)`,
  a new optimizer. This is the path without `refreeze`.

For each it records the wall time (median over rounds; all ranks synchronised) and the peak bytes of
tensors alive on rank 0 while it runs (`PeakTensorMemory`, the model and optimizer state included).
Results: ``OUT/refreeze.json`` and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llama import LlamaConfig, LlamaLoRA  # noqa: E402
from runtime import init_runtime  # noqa: E402

from fsdp_frozen import FreezePolicy, refreeze, shard_with_freezing  # noqa: E402
from fsdp_frozen.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from fsdp_frozen.diagnostics import PeakTensorMemory, state_tensors  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="bench_out")
    args = ap.parse_args()
    device, mesh = init_runtime()
    rank = dist.get_rank()
    cfg = LlamaConfig(dim=args.dim, n_layers=args.layers, hidden_dim=int(args.dim * 8 / 3) // 32 * 32)
    common = dict(units=["layers.*"], frozen_dtype="bfloat16", param_dtype="bfloat16", reduce_dtype="float32")
    stage1 = FreezePolicy(**common)
    last = [f"layers.{i}.**" for i in range(args.layers - 2, args.layers)]
    stage2 = FreezePolicy(**common, unfreeze=last)
    out = Path(args.out)
    tokens = torch.randint(0, cfg.vocab_size, (2, 65), generator=torch.Generator().manual_seed(rank)).to(device)

    def build(policy: FreezePolicy):
        torch.manual_seed(0)
        with torch.device(device):
            model = shard_with_freezing(LlamaLoRA(cfg), mesh, policy)
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(model, opt) -> None:
        F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1).float(), tokens[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def via_refreeze(model, opt, _path):
        refreeze(model, opt, stage2)
        return model, opt

    def via_checkpoint(model, opt, path):
        save_checkpoint(path, model, opt, frozen="include", overwrite=True)
        del model, opt  # what a user does before rebuilding: only the new model stays
        with torch.device("meta"):
            torch.manual_seed(0)
            model = shard_with_freezing(LlamaLoRA(cfg), mesh, stage2)
        model.to_empty(device=device)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        load_checkpoint(path, model, opt, allow_freezing_change=True, cast=True)  # bf16 frozen -> fp32 trainable
        return model, opt

    ways = {"refreeze": via_refreeze, "save+rebuild+load": via_checkpoint}
    times: dict[str, list[float]] = {w: [] for w in ways}
    peaks: dict[str, list[int]] = {w: [] for w in ways}
    shards: list[int] = []
    for i in range(args.rounds):
        for name, way in ways.items():
            model, opt = build(stage1)
            step(model, opt)
            shards.append(sum(t.untyped_storage().nbytes() for t in state_tensors(model, opt)))
            dist.barrier()
            with PeakTensorMemory(state_tensors(model, opt)) as tracker:
                t0 = time.perf_counter()
                model, opt = way(model, opt, str(out / "refreeze_ckpt"))
                dist.barrier()
                elapsed = time.perf_counter() - t0
            step(model, opt)  # stage 2 trains
            times[name].append(elapsed)
            peaks[name].append(tracker.peak)
            del model, opt
    if rank == 0:
        shutil.rmtree(out / "refreeze_ckpt", ignore_errors=True)
        result = {"config": vars(cfg), "world": dist.get_world_size(), "rounds": args.rounds,
                  "state_bytes_before": max(shards),
                  **{name: {"time_s": statistics.median(times[name]), "peak_bytes": max(peaks[name])} for name in ways}}
        out.mkdir(parents=True, exist_ok=True)
        (out / "refreeze.json").write_text(json.dumps(result, indent=2))
        mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
        base = result["save+rebuild+load"]
        print(f"world {result['world']}, {args.layers} blocks of width {args.dim}, stage 2 opens {last}; "
              f"model + optimizer state on rank 0 before: {mib(result['state_bytes_before'])} MiB; median of {args.rounds}\n")
        print("| way | time ms | vs save+rebuild+load | peak MiB (rank 0) | vs save+rebuild+load |\n|---|---|---|---|---|")
        for name in ways:
            r = result[name]
            print(f"| {name} | {r['time_s'] * 1e3:.1f} | {r['time_s'] / base['time_s']:.2f}x | {mib(r['peak_bytes'])} | "
                  f"{r['peak_bytes'] / base['peak_bytes']:.2f}x |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
