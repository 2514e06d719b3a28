"""NF4 compute cost (issue 25, 1): torchao's dequantization against `nf4_dequantize_fast`, and a
block's NF4 linears forward + backward against the same linears in bf16, with and without activation
checkpointing, in one process, variants interleaved round-robin (median of the repeats), so that a
shared machine's contention falls on all of them alike.

    python scripts/nf4_bench.py [--configs 512x1344:16,512x1344:256,2048x5632:128] [--repeats 7]
                                [--dequant-dims 512,4096] [--threads 1] [--json out.json]

* dequantization, per weight (NF4 quantized from bf16, torchao's default blocks 64/256): Llama-ish
  shapes of each ``--dequant-dims`` d: (d, d) attention, (d/4, d) GQA k/v, (8d/3 -> 3.5d at 4096, d)
  MLP up/gate, (d, hidden) down; 4096 is Llama-3-8B's (4096x4096, 1024x4096, 14336x4096, 4096x14336).
* linear fwd+bwd, per ``--configs`` DIMxHIDDEN:TOKENS: the 7 linears of a Llama block (wq wk wv wo of
  DIMxDIM, w1 w3 of HIDDENxDIM, w2 of DIMxHIDDEN, recipes/llama.py's), bf16 activations, frozen
  weights (the gradient of the inputs only, as for a LoRA base layer), in bf16 (dense) and in NF4 with
  ``nf4_compute`` "torchao" (torchao's LinearNF4), "fast_dequant" (the fast dequantization only) and
  "fast" (+ the backward reusing the recompute's dequantization); "AC" runs the block under
  ``torch.utils.checkpoint`` (non-reentrant), so its forward is recomputed in the backward.
  512x1344 at 16 and 256 tokens are recipes/benchmark.py's default model at 1 x 16 and 4 x 64.
* the floor: the fast dequantization of the block's weights alone, times the dequantizations a step
  needs (2), against the bf16 matmuls they feed: the lowest NF4/bf16 ratio without a fused kernel.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fsdp_frozen import _torchao_compat as ao
from fsdp_frozen.nf4_compute import nf4_compute

MODES = ("torchao", "fast_dequant", "fast")


def llama_weights(dim: int) -> list[tuple[str, tuple[int, int]]]:
    hidden = 14336 if dim == 4096 else int(dim * 8 / 3) // 32 * 32
    return [("wq/wo", (dim, dim)), ("wk/wv (GQA d/4)", (dim // 4, dim)), ("w1/w3", (hidden, dim)),
            ("w2", (dim, hidden))]


#: the clock `timed` reads: "cpu" (this process's CPU time: with one thread, the time it ran, not the
#: time other processes on a shared machine held the cores) or "wall"
CLOCK = {"now": time.process_time}


def timed(fn) -> float:
    start = CLOCK["now"]()
    fn()
    return CLOCK["now"]() - start


def round_robin(fns: dict, repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each function, run in turn `repeats` times after `warmup` rounds."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(warmup + repeats):
        for name, fn in fns.items():
            t = timed(fn)
            if r >= warmup:
                times[name].append(t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def dequant_table(dims: list[int], repeats: int) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    for dim in dims:
        for name, shape in llama_weights(dim):
            w = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
            t = ao.to_nf4(w, 64, 256)
            assert torch.equal(ao.nf4_dequantize_fast(t), t.get_original_weight())
            del w
            med = round_robin({"torchao": t.get_original_weight, "fast": lambda t=t: ao.nf4_dequantize_fast(t)},
                              repeats)
            rows.append({"dim": dim, "weight": name, "shape": list(shape), "torchao_ms": med["torchao"] * 1e3,
                         "fast_ms": med["fast"] * 1e3, "speedup": med["torchao"] / med["fast"]})
    return rows


def block_table(dim: int, hidden: int, tokens: int, repeats: int) -> dict:
    g = torch.Generator().manual_seed(1)
    shapes = [(dim, dim)] * 4 + [(hidden, dim)] * 2 + [(dim, hidden)]
    nf4 = [ao.to_nf4((torch.randn(s, generator=g) * 0.02).to(torch.bfloat16), 64, 256) for s in shapes]
    dense = [t.get_original_weight() for t in nf4]  # the bf16 run computes on the same values
    x0 = torch.randn(tokens, dim, generator=g).to(torch.bfloat16)
    h0 = torch.randn(tokens, hidden, generator=g).to(torch.bfloat16)
    grads = [torch.randn(tokens, s[0], generator=g).to(torch.bfloat16) for s in shapes]

    def block(x, h, weights):
        return tuple(F.linear(h if i == 6 else x, w) for i, w in enumerate(weights))  # w2 reads the MLP's hidden

    def step(weights, ac: bool, mode: str | None):
        def run():
            x, h = x0.clone().requires_grad_(True), h0.clone().requires_grad_(True)
            with nf4_compute(mode or "fast"):
                out = checkpoint(block, x, h, weights, use_reentrant=False) if ac else block(x, h, weights)
                torch.autograd.backward(out, grads)
            return x.grad, h.grad
        return run

    fns = {}
    for ac in (False, True):
        tag = "ac" if ac else "plain"
        fns[f"bf16/{tag}"] = step(dense, ac, None)
        for mode in MODES:
            fns[f"nf4-{mode}/{tag}"] = step(nf4, ac, mode)
    fns["dequant/torchao"] = lambda: [t.get_original_weight() for t in nf4]
    fns["dequant/fast"] = lambda: [ao.nf4_dequantize_fast(t) for t in nf4]
    # bitwise: every mode's input gradients are the bf16 run's (same values, same matmuls)
    want = step(dense, False, None)()
    for name, fn in fns.items():
        if not name.startswith("dequant"):
            got = fn()
            assert all(torch.equal(a, b) for a, b in zip(got, want)), name
    med = round_robin(fns, repeats)
    return {"dim": dim, "hidden": hidden, "tokens": tokens, "ms": {k: v * 1e3 for k, v in med.items()}}


def report(dq: list[dict], blocks: list[dict], threads: int, clock: str, repeats: int) -> str:
    lines = [f"torch {torch.__version__}, {threads} thread(s), {clock} time, bf16, NF4 blocks 64/256; medians of "
             f"{repeats} round-robin repeats", ""]
    if dq:
        lines += ["Dequantization per weight (ms):", "",
                  "| weight | shape | torchao | fast | speedup |", "|---|---|---:|---:|---:|"]
        lines += [f"| {r['weight']} | {r['shape'][0]}x{r['shape'][1]} | {r['torchao_ms']:.2f} | {r['fast_ms']:.2f} | "
                  f"{r['speedup']:.2f}x |" for r in dq]
        lines.append("")
    if blocks:
        lines += ["A block's 7 linears, forward + backward (input gradients), ms and ratio to bf16:", "",
                  "| dim x hidden : tokens | AC | bf16 | nf4 torchao | nf4 fast_dequant | nf4 fast | "
                  "dequant torchao (x7) | dequant fast (x7) | floor fast (bf16 + 2 dequant) |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for b in blocks:
            ms = b["ms"]
            for tag in ("plain", "ac"):
                base = ms[f"bf16/{tag}"]
                cells = [f"{ms[f'nf4-{m}/{tag}']:.1f} ({ms[f'nf4-{m}/{tag}'] / base:.2f}x)" for m in MODES]
                floor = base + 2 * ms["dequant/fast"]
                lines.append(f"| {b['dim']}x{b['hidden']} : {b['tokens']} | {'yes' if tag == 'ac' else 'no'} | "
                             f"{base:.1f} | {' | '.join(cells)} | {ms['dequant/torchao']:.1f} | "
                             f"{ms['dequant/fast']:.1f} | "
                             f"{floor / base:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default="512x1344:16,512x1344:256,2048x5632:128",
                    help="DIMxHIDDEN:TOKENS, comma-separated (block linears fwd+bwd)")
    ap.add_argument("--dequant-dims", default="512,4096", help="model dims of the per-weight dequantization table")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared machine a preempted OpenMP thread stalls every "
                         "parallel op; 0: torch's default)")
    ap.add_argument("--clock", choices=["cpu", "wall"], default="",
                    help="what is timed: the process's CPU time (default with one thread: contention-proof on a "
                         "shared machine) or wall time (default with more threads)")
    ap.add_argument("--json", default="", help="also write the raw medians here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = args.clock or ("cpu" if torch.get_num_threads() == 1 else "wall")
    CLOCK["now"] = time.process_time if clock == "cpu" else time.perf_counter
    dq = dequant_table([int(d) for d in args.dequant_dims.split(",") if d], args.repeats)
    blocks = []
    for config in filter(None, args.configs.split(",")):
        shape, tokens = config.split(":")
        dim, hidden = (int(v) for v in shape.split("x"))
        blocks.append(block_table(dim, hidden, int(tokens), args.repeats))
    print(report(dq, blocks, torch.get_num_threads(), clock, args.repeats))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dequant": dq, "blocks": blocks, "threads": torch.get_num_threads(), "clock": clock,
                       "torch": torch.__version__}, f, indent=1)


if __name__ == "__main__":
    main()
