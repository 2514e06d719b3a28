"""NF4 forward + backward of one Llama-shaped block's linears, quantized from fp32 (what an HF model
built on meta gave before) or from the bf16 compute dtype ([Note: NF4 in the compute dtype]).

    python scripts/nf4_forward.py [--dim 2048] [--tokens 256] [--repeats 5]

Prints, per variant: the median time of forward + backward through the 7 linears (bf16 activations),
and the transient bytes of the dequantization per use (the dequantized weight, plus its bf16 cast
when it is quantized from fp32), from the dtypes torchao's dequantization writes.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from fsdp_frozen._torchao_compat import to_nf4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    d, ffn, kv = args.dim, int(args.dim * 3.5), args.dim // 4  # Llama-3-8B's proportions
    shapes = [(d, d), (kv, d), (kv, d), (d, d), (ffn, d), (ffn, d), (d, ffn)]
    torch.manual_seed(0)
    weights = [torch.randn(s) * 0.02 for s in shapes]
    x = {s: torch.randn(args.tokens, s[1], dtype=torch.bfloat16) for s in shapes}
    for source in (torch.float32, torch.bfloat16):
        nf4 = [to_nf4(w.to(source), 64, 256) for w in weights]
        times = []
        for _ in range(args.repeats + 1):
            start = time.perf_counter()
            for w, s in zip(nf4, shapes):
                inp = x[s].clone().requires_grad_(True)
                y = F.linear(inp, w)  # torchao's LinearNF4: dequantizes in forward and again in backward
                y.sum().backward()
            times.append(time.perf_counter() - start)
        numel = max(w.numel() for w in weights)
        per_use = numel * (source.itemsize + (2 if source != torch.bfloat16 else 0))
        print(f"quantized from {str(source).removeprefix('torch.'):8s}: dequantized to {nf4[0].dtype}, "
              f"fwd+bwd {statistics.median(times[1:]) * 1e3:7.1f} ms; transient per use of the largest weight "
              f"{per_use / 2**20:6.1f} MiB ({numel:,} elements)")


if __name__ == "__main__":
    main()
