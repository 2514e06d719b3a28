"""Per-step overhead at Llama-3-70B's structure: does what the package adds per step grow with the model?

    torchrun --nproc-per-node 2 recipes/benchmark_structure.py [--layers 20,80] [--steps 15] [--out bench_out/structure]
    python recipes/benchmark_structure.py --spawn 2 [...]          # the same without torchrun (gloo, CPU)

Builds a transformers ``LlamaForCausalLM`` with Llama-3-70B's structure and tiny widths, so that compute
is near zero and what is left of a step is per-parameter and per-module Python and collectives: 80
decoder layers (``--layers``; several counts run one after the other: the scaling), hidden 64, 8 heads
/ 8 KV heads, intermediate 128, vocab 256, with PEFT LoRA r=8 on every linear (q, k, v, o, gate, up,
down: 560 adapted linears and 1,120 adapter tensors at 80 layers). Batch 1 x 16 tokens, bf16 compute,
fp32 reduce, fused AdamW over the adapters, on 2 gloo ranks.

Variants, all timed round-robin in the same run (each round runs every variant once, in an order
shuffled per round, the same on every rank; the ratio of a variant is the median over rounds of its
step time over plain FSDP2's in the same round, so the machine's drift cancels):

* plain FSDP2: ``fully_shard`` on every decoder layer, then on the root (one mixed group per layer);
* plain FSDP2 with two groups per layer, a reference for ``per_unit``: ``fully_shard`` on the list of a
  layer's LoRA modules (its adapters: one group), then on the layer (the frozen rest), then the root.
  What a second param group per unit costs FSDP2 itself, with no package code involved;
* ``shard_with_freezing`` with every ``trainable_grouping`` (per_unit, root, replicate) x every
  ``frozen_reshard`` (after_forward, after_backward, never), units = the decoder layers;
* the compute floor: the same PEFT model in bf16 on each rank, no FSDP, no communication, no hooks.

Plain FSDP2's per-step overhead is its step time minus the compute floor's (same rounds). The package's
own per-step work is measured apart, after the timed rounds (so that timers do not perturb them): every
forward hook, forward pre-hook and backward callback that ``shard_with_freezing`` installs (the root's
freezing check with its ``restore_frozen_policy``, the root's backward tracker, the replicated group's
pre-forward copies and its end-of-backward reduction, the input-cast hooks of units left outside FSDP) is
wrapped in a ``perf_counter`` accumulator for `--profile-steps` steps; the median per step is reported,
less the all-reduce the replicated group's reduction waits in (a collective FSDP2 would spend as a
reduce-scatter; reported beside it). Also per variant: its collectives in one step (`CommCounter`), and
what ``trainable_grouping="auto"`` would pick here (the plan alone). Prints markdown tables on rank 0 and
writes OUT/benchmark_structure.json and OUT/benchmark_structure.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import paired_ratio, time_round_robin  # noqa: E402

from fsdp_frozen import FreezePolicy, shard_with_freezing  # noqa: E402
from fsdp_frozen.apply import sharded_state  # noqa: E402
from fsdp_frozen.diagnostics import CommCounter  # noqa: E402
from fsdp_frozen.plan import build_plan  # noqa: E402

GROUPINGS = ["per_unit", "root", "replicate"]
POLICIES = ["after_forward", "after_backward", "never"]
PLAIN, FLOOR = "plain FSDP2", "compute floor"
PLAIN2 = "plain FSDP2, 2 groups/layer"  #: adapters and frozen weights of a layer in two fully_shard calls
UNITS = ["base_model.model.model.layers.*"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB, SEQ = 256, 16
#: the package's per-step entry points, as the profile names them
PARTS = ("freezing check", "restore_frozen_policy", "track_backward", "replicate pre-forward",
         "replicate reduce + swap_back", "input casts", "other")


def variant(grouping: str, policy: str) -> str:
    return f"{grouping} / {policy}"


def build_peft(layers: int, args: argparse.Namespace) -> nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                      num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8,
                      max_position_embeddings=64, tie_word_embeddings=False)
    base = LlamaForCausalLM(cfg)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0)
    model = get_peft_model(base, lora)
    model.train()
    return model


#: suffixes of the extra per_unit rows: ``coalesce_frozen=True`` (each block's frozen group merged into its
#: trainable group where both reshard alike, [Note: merged frozen groups]: one all-gather per block each
#: way, as plain FSDP2) and, for after_backward, with ``trainable_reshard=False`` too (then they reshard alike)
COALESCED, KEPT = " (coalesced)", " (trainable kept, coalesced)"


def policy_of(grouping: str, frozen: str) -> FreezePolicy:
    kept, coalesced = frozen.endswith(KEPT), frozen.endswith(COALESCED)
    return FreezePolicy(units=UNITS, frozen_reshard=frozen.removesuffix(KEPT).removesuffix(COALESCED),
                        trainable_grouping=grouping, frozen_dtype="bfloat16", param_dtype="bfloat16",
                        reduce_dtype="float32", trainable_reshard=False if kept else None,
                        coalesce_frozen=kept or coalesced)


def build(name: str, layers: int, args: argparse.Namespace, mesh) -> nn.Module:
    model = build_peft(layers, args)
    if name == FLOOR:
        return model.to(torch.bfloat16)
    if name in (PLAIN, PLAIN2):
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in model.base_model.model.model.layers:
            if name == PLAIN2:
                adapters = [m for n, m in layer.named_modules() if n.split(".")[-2:-1] in (["lora_A"], ["lora_B"])]
                fully_shard(adapters, mesh=mesh, mp_policy=mp)
            fully_shard(layer, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        return model
    grouping, frozen = name.split(" / ")
    return shard_with_freezing(model, mesh, policy_of(grouping, frozen))


def auto_choices(layers: int, args: argparse.Namespace) -> dict[str, str]:
    """What ``trainable_grouping="auto"`` picks on this structure per frozen policy (the plan alone)."""
    model = build_peft(layers, args)
    out = {}
    for frozen in POLICIES:
        plan = build_plan(model, policy_of("auto", frozen), shard_size=dist.get_world_size())
        out[frozen] = plan.trainable_grouping
    return out


class HookTimer:
    """Per-step seconds spent in what `shard_with_freezing` installed on a model (see the module doc)."""

    def __init__(self, model: nn.Module) -> None:
        self.acc = dict.fromkeys(PARTS, 0.0)
        self.collective = 0.0
        self.calls = 0
        state = sharded_state(model)
        check, track = state.root_hooks
        for module in model.modules():
            for hooks in (module._forward_pre_hooks, module._forward_hooks):
                for key, fn in list(hooks.items()):
                    owner = getattr(fn, "__module__", "") or ""
                    if not owner.startswith("fsdp_frozen"):
                        continue
                    if fn is check:
                        part = "freezing check"
                    elif fn is track:
                        part = "track_backward"
                    elif state.replicated is not None and fn == state.replicated._pre_forward:
                        part = "replicate pre-forward"
                    elif getattr(fn, "__qualname__", "").startswith("_input_hook"):
                        part = "input casts"
                    else:
                        part = "other"
                    hooks[key] = self._wrap(fn, part)
        # nested inside the freezing check: reported apart, not added to the total
        state.restore_frozen_policy = self._wrap(state.restore_frozen_policy, "restore_frozen_policy")
        if state.replicated is not None:
            rep = state.replicated
            rep._post_backward = self._wrap(rep._post_backward, "replicate reduce + swap_back")
            rep.backward_started = self._wrap(rep.backward_started, "other")

    def _wrap(self, fn: Callable, part: str) -> Callable:
        @functools.wraps(fn)
        def timed(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.acc[part] += time.perf_counter() - t0
        return timed

    def total(self) -> float:
        return sum(v for k, v in self.acc.items() if k != "restore_frozen_policy") - self.collective

    def reset(self) -> None:
        self.acc = dict.fromkeys(PARTS, 0.0)
        self.collective = 0.0


class CollectiveTimer:
    """Time spent inside ``dist.all_reduce`` (the replicated group's one collective) while active."""

    def __init__(self, timer: HookTimer) -> None:
        self.timer, self.original = timer, dist.all_reduce

    def __enter__(self) -> "CollectiveTimer":
        original = self.original

        def all_reduce(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                self.timer.collective += time.perf_counter() - t0

        dist.all_reduce = all_reduce
        return self

    def __exit__(self, *exc: Any) -> None:
        dist.all_reduce = self.original


def run_layers(layers: int, args: argparse.Namespace, mesh) -> dict:
    """Every variant at `layers` decoder layers: timed rounds, then the package's hooks profiled."""
    rank = dist.get_rank()
    names = [PLAIN, FLOOR, PLAIN2] + [variant(g, p) for g in args.groupings for p in args.policies]
    if "per_unit" in args.groupings:
        names += [variant("per_unit", p + (KEPT if p == "after_backward" else COALESCED))
                  for p in args.policies if p != "never"]
    models, opts = {}, {}
    for name in names:
        models[name] = build(name, layers, args, mesh)
        params = [p for p in models[name].parameters() if p.requires_grad]
        opts[name] = torch.optim.AdamW(params, lr=1e-4, fused=True)
    g = torch.Generator().manual_seed(rank)
    batch = torch.randint(0, VOCAB, (1, SEQ), generator=g)

    def step(name: str, _i: int) -> None:
        model, opt = models[name], opts[name]
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = time_round_robin(step, names, args.warmup, args.steps, cuda=False)

    collectives = {}
    for name in [PLAIN, PLAIN2, *names[3:]]:  # per step, counted on one step (CommCounter)
        counter = CommCounter()
        with counter:
            step(name, 0)
        collectives[name] = {k: counter.total(k, count=True) for k in ("all_gather", "reduce_scatter", "all_reduce")}

    profiles: dict[str, dict] = {}
    for name in names[3:]:
        timer = HookTimer(models[name])
        per_step: list[dict] = []
        with CollectiveTimer(timer):
            for _ in range(args.profile_steps):
                timer.reset()
                dist.barrier()
                step(name, 0)
                per_step.append({**timer.acc, "all-reduce": timer.collective, "total": timer.total()})
        profiles[name] = {k: statistics.median(s[k] for s in per_step) for k in per_step[0]}
    state = sharded_state(models[variant(args.groupings[0], args.policies[0])])
    counts = {
        "fsdp_params_per_unit_split": len(state.fsdp_params),
        "parameters": sum(1 for _ in models[FLOOR].parameters()),
        "trainable_parameters": sum(1 for p in models[FLOOR].parameters() if p.requires_grad),
    }
    result = {"layers": layers, "times": times, "profiles": profiles, "counts": counts, "collectives": collectives,
              "auto": auto_choices(layers, args)}
    del models, opts
    return result


def summarize(res: dict) -> dict:
    times = res["times"]
    plain = statistics.median(times[PLAIN])
    floor = statistics.median(times[FLOOR])
    overhead = plain - floor
    rows = {}
    for name, prof in res["profiles"].items():
        rows[name] = {"step_ms": statistics.median(times[name]) * 1e3, "vs_plain": paired_ratio(times, name, PLAIN),
                      "package_ms": prof["total"] * 1e3, "package_share_of_plain_overhead": prof["total"] / overhead,
                      "profile_ms": {k: v * 1e3 for k, v in prof.items()}, "collectives": res["collectives"][name]}
    return {"plain_ms": plain * 1e3, "floor_ms": floor * 1e3, "plain_overhead_ms": overhead * 1e3,
            "floor_vs_plain": paired_ratio(times, FLOOR, PLAIN), "rows": rows,
            "plain2_ms": statistics.median(times[PLAIN2]) * 1e3, "plain2_vs_plain": paired_ratio(times, PLAIN2, PLAIN),
            "plain_collectives": res["collectives"][PLAIN], "plain2_collectives": res["collectives"][PLAIN2]}


def _coll(c: dict, short: bool = False) -> str:
    if short:
        return f"{c['all_gather']} / {c['reduce_scatter']} / {c['all_reduce']}"
    return f"{c['all_gather']} all-gathers, {c['reduce_scatter']} reduce-scatters per step"


def render(results: list[dict], args: argparse.Namespace) -> str:
    lines = [f"Llama-3-70B structure, tiny widths (hidden {args.hidden}, 8 heads, LoRA r8 on q,k,v,o,gate,up,down), "
             f"world {dist.get_world_size()} (gloo, CPU), torch {torch.__version__}, batch 1x{SEQ}, bf16 compute, "
             f"median of {args.steps} round-robin rounds after {args.warmup}; package work: median of "
             f"{args.profile_steps} profiled steps"]
    for res in results:
        s = res["summary"]
        c = res["counts"]
        lines += ["", f"### {res['layers']} decoder layers ({c['parameters']} parameters, {c['trainable_parameters']} "
                  f"trainable; {c['fsdp_params_per_unit_split']} FSDP parameters under per_unit)", "",
                  f"plain FSDP2 {s['plain_ms']:.1f} ms/step ({_coll(s['plain_collectives'])}), compute floor "
                  f"{s['floor_ms']:.1f} ms ({s['floor_vs_plain']:.2f}x plain); plain FSDP2's overhead (plain - floor): "
                  f"{s['plain_overhead_ms']:.1f} ms. Plain FSDP2 with 2 groups per layer (adapters apart): "
                  f"{s['plain2_ms']:.1f} ms = {s['plain2_vs_plain']:.2f}x plain ({_coll(s['plain2_collectives'])}). "
                  f"`auto` picks: " + ", ".join(f"{p}: {g}" for p, g in res["auto"].items()), "",
                  "| grouping / frozen_reshard | step ms | vs plain | AG / RS / AR per step | package ms/step "
                  "| of plain's overhead | freezing check | (restore_frozen_policy) | track_backward | replicate pre-fwd "
                  "| replicate reduce (less all-reduce) | all-reduce | input casts |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in s["rows"].items():
            p = r["profile_ms"]
            lines.append(
                f"| {name} | {r['step_ms']:.1f} | {r['vs_plain']:.2f}x | {_coll(r['collectives'], short=True)} "
                f"| {r['package_ms']:.2f} "
                f"| {r['package_share_of_plain_overhead']:.1%} | {p['freezing check']:.2f} "
                f"| {p['restore_frozen_policy']:.2f} | {p['track_backward']:.2f} | {p['replicate pre-forward']:.2f} "
                f"| {p['replicate reduce + swap_back'] - p['all-reduce']:.2f} | {p['all-reduce']:.2f} "
                f"| {p['input casts']:.2f} |")
    if len(results) > 1:
        lines += ["", "### Scaling: the package's per-step work (ms) by layer count", "",
                  "| grouping / frozen_reshard | " + " | ".join(f"{r['layers']} layers" for r in results)
                  + " | ratio last/first |", "|---|" + "---|" * (len(results) + 1)]
        first, last = results[0]["summary"]["rows"], results[-1]["summary"]["rows"]
        for name in first:
            vals = [r["summary"]["rows"][name]["package_ms"] for r in results]
            lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in vals)
                         + f" | {last[name]['package_ms'] / max(first[name]['package_ms'], 1e-9):.2f}x |")
        lines.append(f"| plain FSDP2's overhead | " + " | ".join(f"{r['summary']['plain_overhead_ms']:.1f}"
                                                             for r in results) + " | |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> list[dict]:
    """The whole benchmark on an initialized process group; rank 0 prints and writes; returns the results."""
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(args.threads)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    results = []
    for layers in args.layers:
        res = run_layers(layers, args, mesh)
        res["summary"] = summarize(res)
        results.append(res)
    if dist.get_rank() == 0:
        text = render(results, args)
        print(text, flush=True)
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "benchmark_structure.json").write_text(json.dumps(
                {"args": {k: v for k, v in vars(args).items()}, "torch": torch.__version__,
                 "results": [{k: v for k, v in r.items()} for r in results]}, indent=1))
            (out / "benchmark_structure.md").write_text(text + "\n")
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="20,80", help="comma list of decoder-layer counts, run one after the other")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--steps", type=int, default=15, help="timed round-robin rounds")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--profile-steps", type=int, default=5, help="steps per variant with the package's hooks timed")
    ap.add_argument("--groupings", default=",".join(GROUPINGS))
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--out", default="bench_out/structure", help="output directory ('' for none)")
    ap.add_argument("--spawn", type=int, default=0, help="start this many gloo ranks here instead of under torchrun")
    args = ap.parse_args(argv)
    args.layers = [int(x) for x in str(args.layers).split(",")]
    args.groupings, args.policies = args.groupings.split(","), args.policies.split(",")
    if set(args.groupings) - set(GROUPINGS) or set(args.policies) - set(POLICIES):
        ap.error(f"--groupings from {GROUPINGS}, --policies from {POLICIES}")
    return args


def _spawned(rank: int, world: int, init_file: str, args: argparse.Namespace) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        run(args)
    finally:
        dist.destroy_process_group()


def main() -> None:
    args = parse_args()
    if args.spawn:
        import tempfile

        import torch.multiprocessing as mp

        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_spawned, args=(args.spawn, os.path.join(tmp, "init"), args), nprocs=args.spawn)
        return
    dist.init_process_group("gloo")
    try:
        run(args)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
