"""Load benchmark: `load_pretrained` into a meta-built sharded model vs ``from_pretrained`` + sharding.

    python recipes/benchmark_load.py [--nproc 2] [--dim 1024 --layers 16] [--rounds 2] [--out DIR]

A Llama-shaped Hugging Face model with random fp32 weights (about 1.1 GB at the defaults) is written
once with ``save_pretrained``. Then, round-robin, each variant runs in fresh ``torchrun`` processes
(so one variant's freed memory cannot hide the other's peak):

* ``load_pretrained``: built on the meta device, PEFT LoRA, `shard_with_freezing` (bf16 frozen), then
  `load_pretrained`: each rank reads its own rows.
* ``from_pretrained``: ``LlamaForCausalLM.from_pretrained`` on every rank (the whole model), PEFT LoRA,
  `shard_with_freezing`.

Per rank it records the peak host RSS above the RSS before loading (``/proc/self/status`` VmHWM after
resetting it with ``/proc/self/clear_refs``), the wall time, and on CUDA ``max_memory_allocated``.
Results: ``OUT/load.json`` and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VARIANTS = ("load_pretrained", "from_pretrained")


def _config(dim: int, layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=32000, hidden_size=dim, intermediate_size=int(dim * 2.75) // 64 * 64,
                       num_hidden_layers=layers, num_attention_heads=max(1, dim // 128),
                       num_key_value_heads=max(1, dim // 128), max_position_embeddings=2048,
                       tie_word_embeddings=False)


def write_base(directory: Path, dim: int, layers: int) -> int:
    """The random base, written once; returns its bytes on disk."""
    if not (directory / "config.json").exists():
        import torch
        from transformers import LlamaForCausalLM

        torch.manual_seed(0)
        LlamaForCausalLM(_config(dim, layers)).save_pretrained(str(directory), max_shard_size="500MB")
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def worker(variant: str, directory: str, out: str) -> None:
    import torch
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import LlamaForCausalLM

    from fsdp_frozen import FreezePolicy, shard_with_freezing
    from fsdp_frozen.checkpoint import load_pretrained
    from fsdp_frozen.diagnostics import reset_rss_peak, rss_bytes

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    mesh = init_device_mesh("cuda" if cuda else "cpu", (world,))
    policy = FreezePolicy(units=["base_model.model.model.layers.*"], frozen_dtype="bfloat16", param_dtype="bfloat16",
                          reduce_dtype="float32")
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"])
    config = LlamaForCausalLM.config_class.from_pretrained(directory)
    dist.barrier()
    reset_rss_peak()  # the RSS high-water mark restarts from now
    before = rss_bytes("VmRSS")
    t0 = time.perf_counter()
    if variant == "load_pretrained":
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        model = shard_with_freezing(get_peft_model(model, lora), mesh, policy)
        load_pretrained(model, directory)
    else:
        model = LlamaForCausalLM.from_pretrained(directory)
        model = shard_with_freezing(get_peft_model(model, lora), mesh, policy)
        if cuda:
            model.cuda()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    record = {"variant": variant, "rank": rank, "world": world, "seconds": seconds,
              "peak_rss_bytes": rss_bytes("VmHWM") - before, "rss_before_bytes": before,
              "cuda_max_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else None}
    with open(os.path.join(out, f"{variant}-{rank}.json"), "w") as f:
        json.dump(record, f)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="runs/benchmark_load")
    ap.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    args = ap.parse_args()
    out = Path(args.out)
    if args.worker:
        return worker(args.worker, args.base, str(out))
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"base-{args.dim}x{args.layers}"
    nbytes = write_base(base, args.dim, args.layers)
    runs: dict[str, list[list[dict]]] = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for variant in VARIANTS:  # round-robin: each variant in fresh processes
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc),
                   str(Path(__file__).resolve()), "--worker", variant, "--base", str(base), "--out", str(out)]
            subprocess.run(cmd, check=True, cwd=ROOT.parent)
            runs[variant].append([json.loads((out / f"{variant}-{r}.json").read_text()) for r in range(args.nproc)])
    summary = {}
    for variant, rounds in runs.items():
        peak = max(r["peak_rss_bytes"] for rnd in rounds for r in rnd)
        seconds = sorted(max(r["seconds"] for r in rnd) for rnd in rounds)[len(rounds) // 2]
        summary[variant] = {"peak_rss_bytes_max_rank": peak, "peak_rss_vs_whole_model": peak / nbytes,
                            "seconds_median": seconds,
                            "cuda_max_allocated_bytes": max((r["cuda_max_allocated_bytes"] or 0) for rnd in rounds
                                                            for r in rnd)}
    result = {"meta": {"dim": args.dim, "layers": args.layers, "nproc": args.nproc, "rounds": args.rounds,
                       "file_bytes": nbytes}, "summary": summary, "runs": runs}
    (out / "load.json").write_text(json.dumps(result, indent=2))
    mib = 2**20
    lines = [f"Load of a {nbytes / 2**30:.2f} GiB fp32 safetensors model (bf16 frozen shards) at world {args.nproc}, "
             f"median of {args.rounds} rounds:", "",
             "| variant | peak RSS MiB/rank (max rank) | vs whole model | s | vs from_pretrained |", "|---|---|---|---|---|"]
    ref = summary["from_pretrained"]["seconds_median"]
    for variant, s in summary.items():
        lines.append(f"| {variant} | {s['peak_rss_bytes_max_rank'] / mib:,.1f} | {s['peak_rss_vs_whole_model']:.2f}x | "
                     f"{s['seconds_median']:.2f} | {s['seconds_median'] / ref:.2f}x |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
