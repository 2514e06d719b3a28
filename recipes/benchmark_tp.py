"""Benchmark: FSDP x TP with frozen groups against plain FSDP2 x TP, the same TP plan, in one run.

    torchrun --nproc-per-node 4 recipes/benchmark_tp.py [--tp 2] [--steps 10] [--layers 4] [--dim 256]

A transformers Llama (random weights, nothing downloaded) with PEFT LoRA r=8 on every linear,
parallelized with ``parallelize_module`` on ``world["tp"]`` (q/k/v/gate/up colwise, o/down rowwise;
adapters placed by `fsdp_frozen.lora_tp_plan`), then sharded on ``world["dp"]``: plain FSDP2 (one unit
per decoder layer, frozen weights stored in fp32 as the model has them, and cast to bf16 for a
like-for-like storage), and `shard_with_freezing` under several policies, all computing in bf16 with
fp32 reduction. Variants run round-robin (`benchmark.time_round_robin`: each round runs every variant
once, shuffled), ratios are the median over rounds of the paired step times against plain FSDP2 x TP.
Prints a markdown table on rank 0 (``--json`` for one line of JSON).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import paired_ratio, time_round_robin  # noqa: E402

from fsdp_frozen import FreezePolicy, lora_tp_plan, shard_with_freezing  # noqa: E402

LAYERS = "base_model.model.model.layers.*"
BASE_PLAN = {
    **{f"{LAYERS}.self_attn.{p}": ColwiseParallel() for p in ("q_proj", "k_proj", "v_proj")},
    f"{LAYERS}.self_attn.o_proj": RowwiseParallel(),
    **{f"{LAYERS}.mlp.{p}": ColwiseParallel() for p in ("gate_proj", "up_proj")},
    f"{LAYERS}.mlp.down_proj": RowwiseParallel(),
}
#: name -> shard_with_freezing policy fields (None: plain FSDP2; "bf16": plain FSDP2 with frozen weights stored in bf16)
VARIANTS = {
    "plain FSDP2 x TP": None,
    "plain FSDP2 x TP, frozen bf16": "bf16",
    "per_unit, after_forward": {"trainable_grouping": "per_unit"},
    "root, after_forward": {"trainable_grouping": "root"},
    "root, after_backward": {"trainable_grouping": "root", "frozen_reshard": "after_backward"},
    "root, never": {"trainable_grouping": "root", "frozen_reshard": "never"},
}


def build(args, world, variant):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=args.dim, intermediate_size=args.dim * 11 // 4,
                         num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(
        r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    parallelize_module(model, world["tp"], lora_tp_plan(model, BASE_PLAN))
    if isinstance(variant, dict):
        return shard_with_freezing(model, world["dp"], FreezePolicy(
            units=["LlamaDecoderLayer"], frozen_dtype="bfloat16", param_dtype="bfloat16", reduce_dtype="float32",
            **variant))
    if variant == "bf16":
        for p in model.parameters():  # swapped whole: `.data =` would keep a TP weight's fp32 local tensor
            if not p.requires_grad:
                torch.utils.swap_tensors(p, torch.nn.Parameter(p.detach().to(torch.bfloat16), requires_grad=False))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=world["dp"], mp_policy=mp)
    return fully_shard(model, mesh=world["dp"], mp_policy=mp)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    dist.init_process_group("gloo")
    world_size = dist.get_world_size()
    world = init_device_mesh("cpu", (world_size // args.tp, args.tp), mesh_dim_names=("dp", "tp"))
    dp_rank = world.get_coordinate()[0]
    models = {name: build(args, world, v) for name, v in VARIANTS.items()}
    opts = {name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
            for name, m in models.items()}

    def step(name: str, i: int) -> None:
        ids = torch.randint(0, 256, (1, args.seq), generator=torch.Generator().manual_seed(100 * i + dp_rank))
        models[name](input_ids=ids, labels=ids).loss.backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)

    times = time_round_robin(step, list(VARIANTS), args.warmup, args.steps, cuda=False)
    ref = "plain FSDP2 x TP"
    rows = [{"variant": v, "ms": statistics.median(times[v]) * 1e3, "vs_plain": paired_ratio(times, v, ref)}
            for v in VARIANTS]
    if dist.get_rank() == 0:
        if args.json:
            print(json.dumps({"args": vars(args), "world": world_size, "rows": rows}))
        else:
            print(f"dp={world_size // args.tp} x tp={args.tp}, {args.layers} layers of width {args.dim}, LoRA r=8 on "
                  f"every linear, batch 1 x {args.seq}, bf16 compute, fp32 reduce; {args.steps} rounds\n")
            print("| variant | step (ms, median) | vs plain FSDP2 x TP |\n|---|---|---|")
            for r in rows:
                print(f"| {r['variant']} | {r['ms']:.1f} | {r['vs_plain']:.2f}x |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
