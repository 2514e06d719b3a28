"""GPU benchmark: a Llama-3.1-8B-shaped LoRA / QLoRA step on one GPU, through the real path.

    python recipes/benchmark_gpu.py --out DIR [--layers 32] [--steps 5] [--batch 2 --seq 2048]
    python recipes/benchmark_gpu.py --out DIR --tiny --device cpu     # the CPU dry run: gloo, tiny shapes

A Llama-3.1-8B-shaped ``LlamaForCausalLM`` (hidden 4096, MLP 14336, 32 layers, 32 heads, 8 KV heads,
vocab 128256) gets random bf16 weights written once with ``save_pretrained``. For each frozen storage
(bf16, NF4) the model is built on the meta device, wrapped with PEFT LoRA (rank 8, alpha 16) on the
modules torchtune's ``llama3_1/8B_lora_single_device`` adapts (q_proj, v_proj, output_proj = o_proj,
and the MLP: gate_proj, up_proj, down_proj; not the output head), sharded with `shard_with_freezing` on
a 1-rank mesh (NCCL on CUDA, gloo on the CPU), loaded with `load_pretrained`, and trained with
activation checkpointing (transformers' ``gradient_checkpointing_enable``), bf16 compute, AdamW on the
adapters, on random tokens of batch x seq, with the recipes' chunked cross-entropy (recipes/loss.py,
``--loss-chunks``, default 8 as torchtune: the full fp32 logits never exist; ``--loss-chunks 0``: the
model's own unchunked loss, ``labels=``). Not compiled unless ``--compile [BACKEND]`` (torchtune's published
figures are): each decoder layer then gets ``layer.compile()`` and torch's ``checkpoint_wrapper`` before
sharding, torchtune's way (FSDP's hooks outside both; the ``--warmup`` steps compile). Not HF's gradient
checkpointing there: transformers 5 mutates a context variable inside its checkpointed call, which dynamo
refuses inside the checkpoint HOP, so every layer fell back to eager (``compiled`` in the JSON: dynamo's graph
and graph-break counts). Records
the training peak ``torch.cuda.max_memory_allocated`` (reset after the load; the load's own peak is
``load_peak_gib`` in the JSON) and tokens/s (steps after ``--warmup``), plus load time. On the CPU
(``--device cpu``, the dry run) there is no device peak: the row records the largest tensor storage peak
of a training step instead (`fsdp_frozen.diagnostics.PeakTensorMemory` around each step, the model and
optimizer state counted), labelled as such (``peak_metric``), with its ratio to the estimate; the host RSS
peak as ``host_peak_rss_gib``; ``peak_groups``, the state at that peak and the rest summed per op, shape
and dtype (where the activations hide: a block's backward, the checkpointed inputs); and ``peak_top``, the
largest storages alive at that peak (bytes, the op
that made them, shape, dtype; ``--peak-breakdown`` adds one such counted step on CUDA). Its step times
are not comparable to anything (the counting slows every op). That is how docs/benchmark.md reproduced
the first GPU run's excess on the CPU. ``--offloaded-step`` (what `scripts/gpu_check.sh` passes) runs one
more step after the measured ones with the checkpointed blocks' inputs offloaded to pinned host memory
(recipes/offload.py), its peak reset before it and recorded apart (``offloaded`` in the JSON: peak,
estimate, step seconds, tensors and GiB moved), so one load gives both sides of the memory comparison:
at Llama-3.1-8B's shape 16.2 GiB is below what any run that keeps the inputs on the device can reach
(docs/estimate.md), and the offloaded figure is the one to compare with torchtune's.

Each variant runs in a process of its own (several ``--frozen-dtypes``: this script re-invokes itself
once per variant; ``--in-process`` runs them in one process, freeing each model before the next):
``del model`` alone frees nothing (FSDP's state and this package's state attached to the model form
reference cycles with it), so in one process the QLoRA peak would start from the bf16 model's bytes.
Stages (`scripts/gpu_check.sh` runs each in its own process, with its own timeout):

    --write-base           only write the random base (once: reused while its config matches)
    --frozen-dtypes X      one variant; writes OUT/gpu_bench_X.json and .md as it goes (a kill
                           leaves the row, marked incomplete with its last phase), then the combined
                           OUT/gpu_bench.json and OUT/gpu_bench.md of every variant written so far
    --combine              only rewrite the combined files (no torch import)
    --check-args           only parse the arguments (gpu_check.sh --dry-run checks every mode's flags)

The base goes to ``--base`` (default: ``$GPU_BASE_ROOT``, else /dev/shm when it has room, else the
temporary directory; a name per model shape), written once to a temporary name and renamed, so a
killed write is never reused, and every variant reads the same files (from RAM when on /dev/shm).

The estimate (`fsdp_frozen.estimate`, same model, world 1, plus its AC activation formula with the same
loss: chunks, and the NF4 head's dequantized copy for QLoRA) is recorded beside each measured peak, with
their ratio. Reference (torchtune, Llama-3.1-8B, batch 2 x 2048,
compiled, RTX 4090): LoRA 16.2 GiB at 3083 tok/s, QLoRA 7.4 GiB at 2413 tok/s.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_T0 = time.perf_counter()  # process start, for --time-limit
sys.path.insert(0, str(Path(__file__).resolve().parent))  # recipes/loss.py and offload.py beside this file
#: torchtune llama3_1/8B_lora_single_device: lora_attn_modules [q_proj, v_proj, output_proj], apply_lora_to_mlp
TARGET_MODULES = ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
REFERENCE = {"bfloat16": (16.2, 3083), "nf4": (7.4, 2413)}  # GiB, tok/s (torchtune, RTX 4090, compiled)
#: Llama-3.1-8B's shape; --tiny replaces it (and the run's sizes) with TINY
SHAPE_8B = {"layers": 32, "hidden": 4096, "intermediate": 14336, "heads": 32, "kv_heads": 8, "vocab": 128256}
TINY = {"layers": 2, "hidden": 64, "intermediate": 128, "heads": 4, "kv_heads": 2, "vocab": 256,
        "batch": 1, "seq": 16, "steps": 1, "warmup": 0, "nf4_block_size": 32, "nf4_scaler_block_size": 16}
ORDER = ["bfloat16", "nf4"]
PEAK_CUDA = "torch.cuda.max_memory_allocated"
PEAK_TENSORS = "tensor storage peak of a step (PeakTensorMemory; CPU dry run)"
PEAK_TOP = 12  #: the largest storages alive at a counted step's peak, recorded as ``peak_top``
PEAK_GROUPS = 16  #: and the largest groups of the rest (per op, shape, dtype), as ``peak_groups``


# ---------------------------------------------------------------------------------------------- config
def llama_config(a: argparse.Namespace):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                       num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                       max_position_embeddings=max(8192 if a.hidden == 4096 else 64, a.seq),
                       rope_theta=500000.0, tie_word_embeddings=False)


def shape_tag(a: argparse.Namespace) -> str:
    key = json.dumps({k: getattr(a, k) for k in SHAPE_8B}, sort_keys=True)
    return f"l{a.layers}_h{a.hidden}_v{a.vocab}_" + hashlib.sha1(key.encode()).hexdigest()[:8]


def param_bytes(a: argparse.Namespace) -> int:
    """bf16 bytes of the base (embedding, layers, norms, untied head), from the shape alone."""
    h, m, layers, v = a.hidden, a.intermediate, a.layers, a.vocab
    kv = h // a.heads * a.kv_heads
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * m + 2 * h
    return 2 * (2 * v * h + layers * per_layer + h)


def base_dir(a: argparse.Namespace) -> Path:
    if a.base:
        return Path(a.base)
    root = os.environ.get("GPU_BASE_ROOT")
    if not root:
        shm = Path("/dev/shm")
        try:
            room = shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 1.3 * param_bytes(a)
        except OSError:
            room = False
        root = str(shm) if room else tempfile.gettempdir()
    return Path(root) / f"fsdp_frozen_bench_{shape_tag(a)}"


def base_ready(directory: Path) -> bool:
    return (directory / ".complete").exists() and (directory / "config.json").exists()


def write_base(directory: Path, a: argparse.Namespace) -> dict:
    """Random bf16 weights, built on the device and written once with save_pretrained (to a temporary
    name, renamed when complete). Returns what was done and how long it took."""
    if base_ready(directory):
        return {"base": str(directory), "written": False, "seconds": 0.0}
    import torch
    from transformers import LlamaForCausalLM

    t0 = time.perf_counter()
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: no fp32 copy of 8B on the way
    try:
        with torch.device(a.device):
            model = LlamaForCausalLM(llama_config(a))
    finally:
        torch.set_default_dtype(previous)
    build_s = time.perf_counter() - t0
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f"{directory.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), max_shard_size="4GB")
    (tmp / ".complete").write_text("")
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)
    del model
    release(a.device)
    return {"base": str(directory), "written": True, "seconds": time.perf_counter() - t0, "build_s": build_s,
            "bytes": sum(f.stat().st_size for f in directory.iterdir() if f.is_file())}


# ---------------------------------------------------------------------------------------------- running
def release(device: str) -> None:
    """Collect the reference cycles a sharded model leaves (FSDP state <-> module, the package's state
    on the model) and hand cached device memory back, so the next variant's peak starts from zero."""
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def host_peak_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # Linux: KiB


def policy_for(frozen_dtype: str, units: list[str], a: argparse.Namespace):
    from fsdp_frozen import FreezePolicy

    nf4 = ({"nf4_block_size": a.nf4_block_size, "nf4_scaler_block_size": a.nf4_scaler_block_size}
           if frozen_dtype == "nf4" else {})
    return FreezePolicy(units=units, frozen_dtype=frozen_dtype, param_dtype="bfloat16", reduce_dtype="float32",
                        frozen_reshard="never", **nf4)


def estimate_gib(frozen_dtype: str, a: argparse.Namespace, offload: bool) -> float:
    """`fsdp_frozen.estimate` of the same run, the checkpointed inputs offloaded or not (fake process
    group: call before the real one exists)."""
    from fsdp_frozen.estimate import activation_bytes, estimate, hf_builder

    lora = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": TARGET_MODULES}
    config = llama_config(a)
    est = estimate(hf_builder(config, lora), 1, policy_for(frozen_dtype, ["LlamaDecoderLayer"], a))
    acts = activation_bytes(config, a.batch, a.seq, loss_chunks=a.loss_chunks, nf4_head=frozen_dtype == "nf4",
                            nf4_dense=est.nf4_dense_bytes, offload=offload)
    return (est.peak_bytes + acts["checkpointing_bytes"]) / 2**30


def grouped(counted, n: int = PEAK_GROUPS) -> dict:
    """What a counted step's peak holds beyond the state: `PeakTensorMemory.peak_by_origin` without the
    baseline (parameters, buffers, optimizer state: summed apart), its `n` largest groups as
    [GiB, count, op, shape, dtype]."""
    groups = counted.peak_by_origin
    state = sum(b for (op, *_), (b, _) in groups.items() if op == "baseline")
    rest = [(b, c, *k) for k, (b, c) in groups.items() if k[0] != "baseline"]
    return {"state_gib": state / 2**30, "rest_gib": sum(r[0] for r in rest) / 2**30,
            "largest": [[b / 2**30, c, op, list(shape), dtype] for b, c, op, shape, dtype in rest[:n]]}


def step_loss(model, ids, a: argparse.Namespace):
    """The step's loss: next-token CE of `ids`, chunked (recipes/loss.py) or, with --loss-chunks 0, the
    model's own (``labels=ids``: the full logits, upcast to fp32)."""
    if not a.loss_chunks:
        return model(input_ids=ids, labels=ids).loss
    from loss import causal_lm_loss, shifted_targets

    return causal_lm_loss(model, shifted_targets(ids), input_ids=ids, chunks=a.loss_chunks)


def run(directory: Path, frozen_dtype: str, a: argparse.Namespace, progress=lambda **kw: None) -> dict:
    """One variant: meta build, PEFT LoRA, shard_with_freezing, load_pretrained, AdamW steps."""
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import LlamaForCausalLM

    from fsdp_frozen import shard_with_freezing
    from fsdp_frozen._torch_compat import local_tensor
    from fsdp_frozen.checkpoint import load_pretrained
    from fsdp_frozen.diagnostics import PeakTensorMemory, state_tensors
    from fsdp_frozen.storage import is_nf4
    from offload import OffloadActivations

    cuda = a.device == "cuda"
    release(a.device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    at_start = torch.cuda.memory_allocated() / 2**30 if cuda else 0.0
    config = LlamaForCausalLM.config_class.from_pretrained(str(directory))
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.config.use_cache = False  # training: no KV cache (HF's checkpointing sets this too; compile's does not)
    if not a.compile:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGET_MODULES))
    if a.compile:  # torchtune's order: each layer compiled in place inside torch's checkpoint_wrapper
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        layers = model.base_model.model.model.layers
        for i in range(len(layers)):
            layers[i].compile(backend=a.compile)
            layers[i] = checkpoint_wrapper(layers[i])
    policy = policy_for(frozen_dtype, ["base_model.model.model.layers.*"], a)
    model = shard_with_freezing(model, init_device_mesh(a.device, (1,)), policy)
    load_pretrained(model, directory)
    sync()
    load_s = time.perf_counter() - t0
    storage: dict[str, int] = {}  # what the frozen shards are: NF4Tensor for QLoRA, bfloat16 otherwise
    for p in model.parameters():
        if not p.requires_grad:
            t = local_tensor(p)
            kind = type(t).__name__ if is_nf4(t) else str(t.dtype).replace("torch.", "")  # kept whole: a Parameter
            storage[kind] = storage.get(kind, 0) + 1
    load_peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else host_peak_rss_gib()
    if cuda:  # the training peak apart from the load's (which reads whole safetensors tensors onto the device)
        torch.cuda.reset_peak_memory_stats()
    progress(phase="loaded", load_s=load_s, load_peak_gib=load_peak)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator(a.device).manual_seed(0)
    times: list[float] = []
    loss = None
    tensor_peak, peak_top, peak_groups = 0.0, [], {}  # CPU: the largest step's tensor storage peak, what it holds
    offloaded_step = a.offloaded_step and not a.offload_activations  # one more step after the measured ones

    def train_step(ids, counted: bool, offload: bool = a.offload_activations):
        """One step; counted: inside a PeakTensorMemory (returned; None otherwise); offload: the forward
        under recipes/offload.py's hook (the checkpointed blocks' inputs to pinned host memory)."""
        tracker = PeakTensorMemory(state_tensors(model, opt), top=PEAK_TOP) if counted else None
        hook = OffloadActivations(min_bytes=0 if a.tiny else 1 << 20) if offload else None  # tiny: every input
        with tracker or contextlib.nullcontext():
            with hook or contextlib.nullcontext():
                loss = step_loss(model, ids, a)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss, tracker, hook

    for step in range(a.warmup + a.steps):
        ids = torch.randint(0, config.vocab_size, (a.batch, a.seq), device=a.device, generator=g)
        sync()
        t = time.perf_counter()
        # CPU: every step counted (a dispatch mode, under which dynamo does not compile), but a compiled run's
        # warm-up steps, so that they compile
        loss, counted, _ = train_step(ids, counted=not cuda and not (a.compile and step < a.warmup))
        if counted is not None and counted.peak / 2**30 > tensor_peak:
            tensor_peak, peak_top, peak_groups = counted.peak / 2**30, counted.peak_top, grouped(counted)
        sync()
        took = time.perf_counter() - t
        if step >= a.warmup:
            times.append(took)
        so_far = sorted(times)
        progress(phase=f"step {step + 1}/{a.warmup + a.steps}", load_s=load_s, steps_measured=len(times),
                 peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else tensor_peak,
                 peak_metric=PEAK_CUDA if cuda else PEAK_TENSORS,
                 **({"tokens_per_s": a.batch * a.seq / so_far[len(so_far) // 2]} if times else {}))
        # --time-limit (this process's seconds): stop once a further step (and the offloaded one) would not
        # fit (>= 1 measured step)
        if a.time_limit and times and time.perf_counter() - _T0 + (0.5 + 1 + offloaded_step) * took > a.time_limit:
            break
    breakdown = {}
    if cuda and a.peak_breakdown:  # one more step, counted (slower: not timed), after the measured ones
        ids = torch.randint(0, config.vocab_size, (a.batch, a.seq), device=a.device, generator=g)
        _, counted, _ = train_step(ids, counted=True)
        breakdown = {"tensor_peak_gib": counted.peak / 2**30, "peak_top": counted.peak_top,
                     "peak_groups": grouped(counted)}
    elif not cuda:
        breakdown = {"peak_top": peak_top, "peak_groups": peak_groups}
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else tensor_peak
    if offloaded_step:  # the inputs off the device: its own peak, the same model (no second load)
        ids = torch.randint(0, config.vocab_size, (a.batch, a.seq), device=a.device, generator=g)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        sync()
        t = time.perf_counter()
        _, counted, hook = train_step(ids, counted=not cuda, offload=True)
        sync()
        breakdown["offloaded"] = {
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else counted.peak / 2**30,
            "step_s": time.perf_counter() - t, "tensors": hook.offloaded, "gib": hook.offloaded_bytes / 2**30}
    times.sort()
    median = times[len(times) // 2]
    if a.compile:  # proof that it compiled, and how whole: dynamo's own counters (this process: one variant)
        from torch._dynamo.utils import counters

        breakdown["compiled"] = {"graphs": counters["stats"]["unique_graphs"],
                                 "graph_breaks": sum(counters["graph_break"].values()),
                                 "break_reasons": sorted(counters["graph_break"])[:5]}
    out = {"frozen_dtype": frozen_dtype, "load_s": load_s, "step_s_median": median, "steps_measured": len(times),
           "tokens_per_s": a.batch * a.seq / median,
           "peak_gib": peak, "peak_metric": PEAK_CUDA if cuda else PEAK_TENSORS, "load_peak_gib": load_peak,
           **({} if cuda else {"host_peak_rss_gib": host_peak_rss_gib()}),
           "allocated_at_start_gib": at_start, "loss": loss.item(), "frozen_storage": storage,
           "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad), **breakdown}
    del model, opt, loss
    release(a.device)
    return out


# ---------------------------------------------------------------------------------------------- results
def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def header(meta: dict) -> list[str]:
    shape = "Llama-3.1-8B-shaped" if meta.get("hidden") == SHAPE_8B["hidden"] else \
        f"tiny Llama (hidden {meta.get('hidden')}, vocab {meta.get('vocab')})"
    layers = meta.get("layers")
    partial = "" if layers == SHAPE_8B["layers"] or meta.get("hidden") != SHAPE_8B["hidden"] else \
        f" ({layers} of 32 layers: not comparable to the 8B reference)"
    peak = "peak GiB" if meta.get("device") == "cuda" else "step tensor peak GiB (CPU)"
    return [f"{meta.get('date')}, {meta.get('gpu')}, torch {meta.get('torch')}: {shape}, {layers} layers{partial}, "
            f"LoRA r=8 on {', '.join(TARGET_MODULES)}, batch {meta.get('batch')} x {meta.get('seq')}, bf16, "
            f"activation checkpointing{' with its inputs offloaded to host memory' if meta.get('offload_activations') else ''}, "
            f"{loss_label(meta.get('loss_chunks', 0))}, "
            f"{'compiled per layer (' + meta['compile'] + ')' if meta.get('compile') else 'not compiled'}; "
            f"peak = {meta.get('peak_metric')}", "",
            f"| frozen | {peak} | estimate GiB (ratio) | inputs offloaded: {peak} | estimate (ratio) | tok/s "
            "| load s | torchtune (8B, RTX 4090, compiled) |",
            "|---|---|---|---|---|---|---|---|"]


def loss_label(chunks: int) -> str:
    return f"loss in {chunks} chunks (recipes/loss.py)" if chunks else "unchunked loss (labels=)"


def row(dtype: str, r: dict) -> str:
    ref = REFERENCE.get(dtype)
    ref_s = f"{ref[0]} GiB, {ref[1]} tok/s" if ref else ""
    if "error" in r:
        return f"| {dtype} | error: {r['error'][:100]} | | | | | | {ref_s} |"
    if r.get("status") != "done":  # a variant killed on its way: what it had measured by then
        load = f"{r['load_s']:.1f}" if "load_s" in r else ""
        peak = f"{r['peak_gib']:.3g} " if "peak_gib" in r else ""
        tps = f"{r['tokens_per_s']:,.0f} ({r['steps_measured']} steps)" if "tokens_per_s" in r else ""
        return (f"| {dtype} | {peak}(incomplete: killed or failed after {r.get('phase', '?')}) | | | | {tps} "
                f"| {load} | {ref_s} |")
    off = r.get("offloaded") or {}
    off_peak = f"{off['peak_gib']:.3g}" if off else "-"
    return (f"| {dtype} | {r['peak_gib']:.3g} | {_estimate(r)} | {off_peak} | {_estimate(off)} | "
            f"{r['tokens_per_s']:,.0f} | {r['load_s']:.1f} | {ref_s} |")


def _estimate(r: dict) -> str:
    """A measured peak's estimate and their ratio ("-" where there is none)."""
    if r.get("estimate_gib") is None:
        return "-"
    ratio = f" ({r['measured_vs_estimate']:.2f}x)" if r.get("measured_vs_estimate") is not None else ""
    return f"{r['estimate_gib']:.3g}{ratio}"


def variant_path(out: Path, dtype: str, suffix: str) -> Path:
    return out / f"gpu_bench_{dtype}.{suffix}"


def write_variant(out: Path, meta: dict, dtype: str, r: dict) -> None:
    _write(variant_path(out, dtype, "json"), json.dumps({"meta": meta, "run": r}, indent=2))
    _write(variant_path(out, dtype, "md"), "\n".join(header(meta) + [row(dtype, r)]) + "\n")


def combine(out: Path) -> dict:
    """OUT/gpu_bench.json and .md from every OUT/gpu_bench_<dtype>.json written so far."""
    found = {p.name[len("gpu_bench_"):-len(".json")]: p for p in out.glob("gpu_bench_*.json")}
    dtypes = [d for d in ORDER if d in found] + sorted(d for d in found if d not in ORDER)
    results: dict = {"meta": {}, "runs": {}}
    for d in dtypes:
        try:
            data = json.loads(found[d].read_text())
        except (OSError, ValueError) as e:
            results["runs"][d] = {"error": f"unreadable {found[d].name}: {e}"}
            continue
        results["meta"] = results["meta"] or data["meta"]
        results["runs"][d] = data["run"]
    _write(out / "gpu_bench.json", json.dumps(results, indent=2))
    lines = header(results["meta"]) + [row(d, r) for d, r in results["runs"].items()] if dtypes else \
        ["no benchmark rows yet"]
    _write(out / "gpu_bench.md", "\n".join(lines) + "\n")
    return results


# ---------------------------------------------------------------------------------------------- main
def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/gpu_bench"))
    ap.add_argument("--base", default=None, help="base directory (default: see above)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cuda (NCCL; the benchmark) or cpu (gloo; the dry run: no memory figure)")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes and one step (the CPU dry run): "
                    + ", ".join(f"{k}={v}" for k, v in TINY.items()))
    for k, v in SHAPE_8B.items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, default=None, help=f"default {v}")
    ap.add_argument("--batch", type=int, default=None, help="default 2")
    ap.add_argument("--seq", type=int, default=None, help="default 2048")
    ap.add_argument("--steps", type=int, default=None, help="measured steps, default 5")
    ap.add_argument("--warmup", type=int, default=None, help="default 2")
    ap.add_argument("--nf4-block-size", type=int, default=None, help="default 64 (torchao's)")
    ap.add_argument("--nf4-scaler-block-size", type=int, default=None, help="default 256 (torchao's)")
    ap.add_argument("--loss-chunks", type=int, default=8,
                    help="the loss in this many chunks of tokens (recipes/loss.py); 0: the model's own unchunked loss")
    ap.add_argument("--peak-breakdown", action="store_true",
                    help="on CUDA, one more step counted with PeakTensorMemory after the measured ones: its tensor "
                         "peak, the largest storages alive there (op, shape, dtype) as peak_top and the rest "
                         "grouped as peak_groups in the JSON (eager: dynamo does not run under the counting "
                         "mode) "
                         "(the CPU dry run records them for every step)")
    ap.add_argument("--offload-activations", action="store_true",
                    help="the checkpointed blocks' inputs to pinned host memory in forward (recipes/offload.py)")
    ap.add_argument("--offloaded-step", action="store_true",
                    help="after the measured steps, one more with the checkpointed blocks' inputs offloaded "
                         "(recipes/offload.py), its peak measured apart beside its estimate: both halves of the "
                         "memory comparison from one load (as 'offloaded' in the JSON; ignored with "
                         "--offload-activations)")
    ap.add_argument("--compile", nargs="?", const="inductor", default="", metavar="BACKEND",
                    help="torch.compile each decoder layer (layer.compile(backend=BACKEND), default inductor) "
                         "before sharding, as torchtune's recipes do; the warm-up steps compile")
    ap.add_argument("--time-limit", type=float, default=0.0,
                    help="seconds this process may take: fewer measured steps (at least 1) when the load was slow")
    ap.add_argument("--frozen-dtypes", default="bfloat16,nf4")
    ap.add_argument("--in-process", action="store_true", help="all variants in this process (freed in between)")
    ap.add_argument("--write-base", action="store_true", help="only write the base")
    ap.add_argument("--require-base", action="store_true",
                    help="fail (error rows) instead of writing the base when it is missing")
    ap.add_argument("--combine", action="store_true", help="only rewrite OUT/gpu_bench.json and .md")
    ap.add_argument("--check-args", action="store_true", help="only parse the arguments and print them (no torch)")
    a = ap.parse_args(argv)
    if a.steps is not None and a.steps < 1:
        ap.error("--steps must be at least 1 (the measured steps)")
    if a.loss_chunks < 0:
        ap.error("--loss-chunks must be >= 0 (0: unchunked)")
    defaults = {**SHAPE_8B, "batch": 2, "seq": 2048, "steps": 5, "warmup": 2, "nf4_block_size": 64,
                "nf4_scaler_block_size": 256}
    if a.tiny:
        defaults.update(TINY)
        if a.compile:  # a warm-up step, uncounted on the CPU, so that dynamo runs (counted steps are eager)
            defaults["warmup"] = 1
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    return a


def _child_argv(argv: list[str]) -> list[str]:
    """argv without --frozen-dtypes (and its value) and --in-process."""
    out, skip = [], False
    for x in argv:
        if skip:
            skip = False
        elif x == "--frozen-dtypes":
            skip = True
        elif not x.startswith("--frozen-dtypes=") and x != "--in-process":
            out.append(x)
    return out


def _init_process_group(device: str) -> None:
    import atexit

    import torch
    import torch.distributed as dist

    if device == "cuda":
        torch.cuda.set_device(0)
    store = tempfile.mkdtemp(prefix="bench_pg_")  # a file store: no port to collide on; removed at exit
    atexit.register(shutil.rmtree, store, ignore_errors=True)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"file://{store}/store", rank=0,
                            world_size=1)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parse(argv)
    if a.check_args:  # gpu_check.sh --dry-run: the full and quick runs' flags, parsed before they reach a GPU
        print(json.dumps(vars(a)))
        return 0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.combine:
        combine(out)
        print((out / "gpu_bench.md").read_text())
        return 0
    dtypes = [d for d in a.frozen_dtypes.split(",") if d]
    if len(dtypes) > 1 and not a.write_base and not a.in_process:  # one process per variant
        rc = subprocess.call([sys.executable, __file__, *_child_argv(argv), "--write-base"])
        for d in dtypes:
            rc |= subprocess.call([sys.executable, __file__, *_child_argv(argv), "--frozen-dtypes", d])
        print((out / "gpu_bench.md").read_text())
        return rc

    import torch
    import torch.distributed as dist

    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmark_gpu.py needs a CUDA GPU (none here); --device cpu --tiny is the CPU dry run, "
                         "and the CPU benchmarks are benchmark.py and benchmark_load.py")
    base = base_dir(a)
    if a.write_base:
        done = write_base(base, a)
        _write(out / "bench_base.json", json.dumps(done, indent=2))
        print(json.dumps(done))
        return 0

    estimates = {}  # (dtype, offloaded) -> GiB
    offloads = {a.offload_activations} | ({True} if a.offloaded_step else set())  # the measured steps', the extra's
    for d, offload in ((d, o) for d in dtypes for o in offloads):  # before the real process group: a fake one
        try:
            estimates[d, offload] = estimate_gib(d, a, offload)
        except Exception as e:  # noqa: BLE001 - the measurement matters more than its estimate
            print(f"estimate for {d} failed: {type(e).__name__}: {e}", file=sys.stderr)
            estimates[d, offload] = None
    if a.require_base and not base_ready(base):
        meta = {"device": a.device, "date": time.strftime("%Y-%m-%d"), "loss_chunks": a.loss_chunks,
                **{k: getattr(a, k) for k in SHAPE_8B}}
        for d in dtypes:
            write_variant(out, meta, d, {"frozen_dtype": d, "status": "error",
                                         "error": f"no base at {base} (the --write-base stage failed?)"})
        combine(out)
        print(f"no base at {base}; not writing one (--require-base)", file=sys.stderr)
        return 1
    _init_process_group(a.device)
    written = write_base(base, a)  # normally done by the --write-base stage; then this is a no-op
    meta = {"gpu": torch.cuda.get_device_name() if a.device == "cuda" else "CPU (dry run)", "device": a.device,
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "lora_targets": TARGET_MODULES,
            "peak_metric": PEAK_CUDA if a.device == "cuda" else PEAK_TENSORS, "base": str(base),
            "write_base_s": written["seconds"], **{k: getattr(a, k) for k in (*SHAPE_8B, "batch", "seq", "steps",
                                                                           "warmup", "loss_chunks",
                                                                           "offload_activations", "compile")}}
    rc = 0
    for d in dtypes:
        t0 = time.perf_counter()
        state = {"frozen_dtype": d, "status": "running", "phase": "started"}

        def progress(**kw):
            state.update(kw)
            write_variant(out, meta, d, state)

        progress()
        try:
            r = run(base, d, a, progress)
            for part, offload in ((r, a.offload_activations), (r.get("offloaded"), True)):
                if part is not None:
                    part["estimate_gib"] = estimates.get((d, offload))
                    part["measured_vs_estimate"] = (part["peak_gib"] / part["estimate_gib"]
                                                    if part["estimate_gib"] else None)
            r.update(status="done", phase="done", wall_s=time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 - report and go on with the next variant
            import traceback

            traceback.print_exc()
            r = {**state, "status": "error", "error": f"{type(e).__name__}: {e}", "wall_s": time.perf_counter() - t0}
            rc = 1
        release(a.device)  # here, not in the except block: its traceback would still hold the model
        write_variant(out, meta, d, r)
        combine(out)
        print(row(d, r), flush=True)
    dist.destroy_process_group()
    return rc


if __name__ == "__main__":
    sys.exit(main())
