"""GPU benchmark: a Llama-3.1-8B-shaped LoRA / QLoRA step on one GPU, through the real path.

    python recipes/benchmark_gpu.py --out DIR [--layers 32] [--steps 5] [--batch 2 --seq 2048]

A Llama-3.1-8B-shaped ``LlamaForCausalLM`` (hidden 4096, MLP 14336, 32 layers, 32 heads, 8 KV heads,
vocab 128256) gets random bf16 weights written once with ``save_pretrained``. For each frozen storage
(bf16, NF4) the model is built on the meta device, wrapped with PEFT LoRA (rank 8, alpha 16) on the
modules torchtune's ``llama3_1/8B_lora_single_device`` adapts (q_proj, v_proj, output_proj = o_proj,
and the MLP: gate_proj, up_proj, down_proj; not the output head), sharded with `shard_with_freezing` on
a 1-rank NCCL mesh, loaded with `load_pretrained`, and trained with activation checkpointing
(transformers' ``gradient_checkpointing_enable``), bf16 compute, AdamW on the adapters, on random
tokens of batch x seq. Not compiled (torchtune's published figures are). Records the peak
``torch.cuda.max_memory_allocated`` and tokens/s (steps after ``--warmup``), plus load time.

The estimate (`fsdp_frozen.estimate`, same model, world 1, plus its AC activation formula) is recorded
beside each measured peak, with their ratio. Reference (torchtune, Llama-3.1-8B, batch 2 x 2048, compiled, RTX 4090): LoRA 16.2 GiB at 3083 tok/s,
QLoRA 7.4 GiB at 2413 tok/s. Writes ``OUT/gpu_bench.json`` and ``OUT/gpu_bench.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

#: torchtune llama3_1/8B_lora_single_device: lora_attn_modules [q_proj, v_proj, output_proj], apply_lora_to_mlp
TARGET_MODULES = ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
REFERENCE = {"bfloat16": (16.2, 3083), "nf4": (7.4, 2413)}  # GiB, tok/s (torchtune, RTX 4090, compiled)


def llama_8b_config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                       rope_theta=500000.0, tie_word_embeddings=False, torch_dtype="bfloat16")


def write_base(directory: Path, layers: int) -> float:
    """Random bf16 weights, built on the GPU and written with save_pretrained; returns seconds."""
    import torch
    from transformers import LlamaForCausalLM

    if (directory / "config.json").exists():
        return 0.0
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(llama_8b_config(layers)).to(torch.bfloat16)
    model.save_pretrained(str(directory), max_shard_size="4GB")
    del model
    torch.cuda.empty_cache()
    return time.perf_counter() - t0


def run(directory: Path, frozen_dtype: str, batch: int, seq: int, steps: int, warmup: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import LlamaForCausalLM

    from fsdp_frozen import FreezePolicy, shard_with_freezing
    from fsdp_frozen.checkpoint import load_pretrained

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    config = LlamaForCausalLM.config_class.from_pretrained(str(directory))
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGET_MODULES))
    policy = FreezePolicy(units=["base_model.model.model.layers.*"], frozen_dtype=frozen_dtype,
                          param_dtype="bfloat16", reduce_dtype="float32", frozen_reshard="never")
    model = shard_with_freezing(model, init_device_mesh("cuda", (1,)), policy)
    load_pretrained(model, directory)
    torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator("cuda").manual_seed(0)
    times = []
    for step in range(warmup + steps):
        ids = torch.randint(0, config.vocab_size, (batch, seq), device="cuda", generator=g)
        torch.cuda.synchronize()
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - t)
    times.sort()
    median = times[len(times) // 2]
    out = {"frozen_dtype": frozen_dtype, "load_s": load_s, "step_s_median": median,
           "tokens_per_s": batch * seq / median, "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
           "loss": loss.item(), "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    del model, opt
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/gpu_bench"))
    ap.add_argument("--base", default="/tmp/llama31_8b_random")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--frozen-dtypes", default="bfloat16,nf4")
    args = ap.parse_args()

    import torch
    import torch.distributed as dist

    if not torch.cuda.is_available():
        raise SystemExit("benchmark_gpu.py needs a CUDA GPU (none here); the CPU benchmarks are benchmark.py and "
                         "benchmark_load.py")
    # The estimate of the same runs (fake process group, before the real one exists): its ratio to the
    # measured peak is recorded per frozen dtype.
    from fsdp_frozen import FreezePolicy
    from fsdp_frozen.estimate import activation_bytes, estimate, hf_builder

    lora = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": TARGET_MODULES}
    estimates = {}
    for dtype in args.frozen_dtypes.split(","):
        policy = FreezePolicy(units=["LlamaDecoderLayer"], frozen_dtype=dtype, param_dtype="bfloat16",
                              reduce_dtype="float32", frozen_reshard="never")
        est = estimate(hf_builder(llama_8b_config(args.layers), lora), 1, policy)
        acts = activation_bytes(llama_8b_config(args.layers), args.batch, args.seq)
        estimates[dtype] = (est.peak_bytes + acts["checkpointing_bytes"]) / 2**30
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("nccl", rank=0, world_size=1)
    torch.cuda.set_device(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = Path(args.base)
    write_s = write_base(base, args.layers)
    results = {"meta": {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": args.layers,
                        "batch": args.batch, "seq": args.seq, "steps": args.steps, "write_base_s": write_s,
                        "date": time.strftime("%Y-%m-%d"), "lora_targets": TARGET_MODULES}, "runs": {}}
    for dtype in args.frozen_dtypes.split(","):
        try:
            results["runs"][dtype] = run(base, dtype, args.batch, args.seq, args.steps, args.warmup)
            results["runs"][dtype]["estimate_gib"] = estimates[dtype]
            results["runs"][dtype]["measured_vs_estimate"] = results["runs"][dtype]["peak_allocated_gib"] / estimates[dtype]
        except Exception as e:  # noqa: BLE001 - report and go on with the next variant
            results["runs"][dtype] = {"error": f"{type(e).__name__}: {e}"}
        (out / "gpu_bench.json").write_text(json.dumps(results, indent=2))
    lines = [f"{results['meta']['date']}, {results['meta']['gpu']}, torch {torch.__version__}: Llama-3.1-8B-shaped "
             f"({args.layers} layers), LoRA r=8 on {', '.join(TARGET_MODULES)}, batch {args.batch} x {args.seq}, "
             f"bf16, activation checkpointing, not compiled", "",
             "| frozen | peak GiB | estimate GiB (ratio) | tok/s | load s | torchtune (RTX 4090, compiled) |",
             "|---|---|---|---|---|---|"]
    for dtype, r in results["runs"].items():
        ref = REFERENCE.get(dtype)
        if "error" in r:
            lines.append(f"| {dtype} | error: {r['error'][:80]} | | | | |")
        else:
            lines.append(f"| {dtype} | {r['peak_allocated_gib']:.1f} | {r['estimate_gib']:.1f} "
                         f"({r['measured_vs_estimate']:.2f}x) | {r['tokens_per_s']:,.0f} | {r['load_s']:.1f} | "
                         f"{ref[0]} GiB, {ref[1]} tok/s |")
    (out / "gpu_bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
