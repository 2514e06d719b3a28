"""``python -m fsdp_frozen inspect PATH [--json]``: print a checkpoint's layout.

``python -m fsdp_frozen estimate --model CONFIG --world N [...]``: per-rank memory and per-step
communication of a run, from the real sharding code on a fake process group (`fsdp_frozen.estimate`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any

import torch

from .errors import CheckpointLayoutError


def _nbytes(entry: dict[str, Any]) -> int:
    if entry.get("shape") is None or entry.get("dtype") is None:
        return 0
    return math.prod(entry["shape"]) * getattr(torch, entry["dtype"]).itemsize


def summarize(path: str) -> dict[str, Any]:
    """The layout of the checkpoint at `path` as a JSON-able dict (reads JSON manifests only)."""
    from .checkpoint.layout import read_manifest

    manifest = read_manifest(path)
    if manifest is None:
        return {"path": os.path.abspath(path), "format": "plain DCP checkpoint (no fsdp_frozen manifest)"}
    groups: dict[str, dict[str, Any]] = {}
    for e in manifest["params"].values():
        g = groups.setdefault(e["kind"], {"count": 0, "bytes": 0, "dtypes": set(), "stored": set()})
        g["count"] += 1
        g["bytes"] += _nbytes(e)
        g["dtypes"].add(e["dtype"])
        g["stored"].add(e["stored"])
    for g in groups.values():
        g["dtypes"], g["stored"] = sorted(g["dtypes"]), sorted(g["stored"])
    out: dict[str, Any] = {
        "path": os.path.abspath(path),
        "format_version": manifest["format_version"],
        "torch_version": manifest["torch_version"],
        "fsdp_frozen_version": manifest["fsdp_frozen_version"],
        "world_size": manifest["world_size"],
        "frozen_state": manifest["frozen_state"],
        "frozen_fingerprint": manifest["frozen_fingerprint"],
        "params": groups,
        "buffers": {"count": len(manifest["buffers"]), "bytes": sum(map(_nbytes, manifest["buffers"].values()))},
        "optimizer": {"entries": len(manifest["optimizer"]), "bytes": sum(map(_nbytes, manifest["optimizer"].values()))},
        "extra": sorted(manifest["extra"]),
        "base": None,
    }
    if manifest["base"]:
        base_path = os.path.normpath(os.path.join(os.path.abspath(path), manifest["base"]["path"]))
        status = "matches"
        try:
            base = read_manifest(base_path)
            if base is None or base.get("frozen_fingerprint") != manifest["base"]["fingerprint"]:
                status = "fingerprint differs"
        except CheckpointLayoutError as e:
            status = f"unusable: {e}"
        out["base"] = {"path": base_path, "fingerprint": manifest["base"]["fingerprint"], "status": status}
    return out


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def render(info: dict[str, Any]) -> str:
    if "frozen_state" not in info:
        return f"{info['path']}: {info['format']}"
    lines = [
        f"checkpoint  {info['path']}",
        f"format      v{info['format_version']}  (torch {info['torch_version']}, fsdp_frozen "
        f"{info['fsdp_frozen_version']}, saved at world size {info['world_size']})",
        f"frozen state {info['frozen_state']}  fingerprint {info['frozen_fingerprint']}",
    ]
    for kind, g in sorted(info["params"].items()):
        lines.append(f"{kind:<12}{g['count']} params, {_mib(g['bytes'])}, dtypes {', '.join(g['dtypes'])}, "
                     f"stored {', '.join(g['stored'])}")
    lines.append(f"buffers     {info['buffers']['count']}, {_mib(info['buffers']['bytes'])}")
    lines.append(f"optimizer   {info['optimizer']['entries']} entries, {_mib(info['optimizer']['bytes'])}")
    if info["extra"]:
        lines.append(f"extra       {', '.join(info['extra'])}")
    if info["base"]:
        b = info["base"]
        lines.append(f"base        {b['path']}  ({b['status']})")
    return "\n".join(lines)


POLICIES = ("after_forward", "after_backward", "never")
FROZEN_DTYPES = ("bfloat16", "nf4")


def run_estimates(args: argparse.Namespace) -> dict[str, Any]:
    """Every (frozen policy, frozen dtype) the policy file leaves open, side by side."""
    import yaml

    from .errors import PolicyError
    from .estimate import activation_bytes, default_units, estimate, hf_builder, hf_config
    from .policy import FreezePolicy

    config = hf_config(args.model)
    fields: dict[str, Any] = {"param_dtype": "bfloat16", "reduce_dtype": "float32"}
    if args.policy:
        try:
            data = yaml.safe_load(open(args.policy)) or {}
        except (OSError, yaml.YAMLError) as e:
            raise PolicyError(f"cannot read FreezePolicy YAML {args.policy!r}: {e}") from e
        FreezePolicy.from_dict(dict(data), source=args.policy)  # validated as given
        fields.update(data)
    fields.setdefault("units", default_units(config))
    policies = [fields["frozen_reshard"]] if "frozen_reshard" in fields else list(POLICIES)
    dtypes = [fields["frozen_dtype"]] if "frozen_dtype" in fields else list(FROZEN_DTYPES)
    build = hf_builder(config, args.peft)
    rows = []
    for reshard in policies:
        for dtype in dtypes:
            policy = FreezePolicy.from_dict({**fields, "frozen_reshard": reshard, "frozen_dtype": dtype})
            row = estimate(build, args.world, policy, replicate=args.replicate).to_dict()
            if args.batch and args.seq:
                row["activations"] = activation_bytes(config, args.batch, args.seq)
            rows.append(row)
    return {"model": os.path.abspath(args.model), "world": args.world, "replicate": args.replicate,
            "peft": args.peft, "units": fields["units"], "estimates": rows}


def render_estimates(info: dict[str, Any]) -> str:
    gib, mib = 2**30, 2**20
    head = ("| policy | frozen | frozen GiB/rank | trainable MiB/rank | grads MiB | AdamW MiB | kept gathered GiB | "
            "largest unit gather GiB | persistent GiB | peak GiB | AG GiB/step frozen / trainable | RS MiB/step | "
            "checkpoint full GiB / trainable MiB |")
    lines = [f"{info['model']} at world {info['world']}" + (f" (HSDP {info['replicate']} x "
             f"{info['world'] // info['replicate']})" if info["replicate"] > 1 else "")
             + (f", PEFT {info['peft']}" if info["peft"] else "") + f", units {info['units']}", "",
             head, "|" + "---|" * (head.count("|") - 1)]
    for r in info["estimates"]:
        ag = r["all_gather_bytes_per_step"]
        lines.append(
            f"| {r['frozen_reshard']} | {r['frozen_dtype']} | {r['frozen_shard_bytes'] / gib:.2f} | "
            f"{r['trainable_shard_bytes'] / mib:.1f} | {r['gradient_bytes'] / mib:.1f} | {r['optimizer_bytes'] / mib:.1f} | "
            f"{r['kept_gathered_bytes'] / gib:.2f} | {r['largest_unit_gather_bytes'] / gib:.2f} | "
            f"{r['persistent_bytes'] / gib:.2f} | {r['peak_bytes'] / gib:.2f} | {ag['frozen'] / gib:.2f} / "
            f"{ag['trainable'] / gib:.3f} | {r['reduce_scatter_bytes_per_step'] / mib:.1f} | "
            f"{r['checkpoint_full_bytes'] / gib:.2f} / {r['checkpoint_trainable_bytes'] / mib:.1f} |")
    acts = info["estimates"][0].get("activations") if info["estimates"] else None
    if acts:
        lines += ["", f"Activations per rank at batch {acts['batch']} x {acts['seq']} (add to peak): "
                  f"{acts['no_checkpointing_bytes'] / gib:.2f} GiB without activation checkpointing, "
                  f"{acts['checkpointing_bytes'] / gib:.2f} GiB with it; method: {acts['method']}."]
    lines += ["", "Per rank, exact from the sharding (fake process group); peak = persistent + the two largest units' "
              "all-gathers (FSDP prefetches one unit ahead). Not counted: CUDA context, allocator fragmentation, "
              "NCCL buffers, one unit's unsharded gradients before reduce-scatter."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fsdp_frozen")
    sub = parser.add_subparsers(dest="command", required=True)
    inspect = sub.add_parser("inspect", help="print a checkpoint's layout")
    inspect.add_argument("path")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    est = sub.add_parser("estimate", help="per-rank memory and per-step communication of a run, before renting GPUs")
    est.add_argument("--model", required=True, help="a Hugging Face config.json or a directory holding one")
    est.add_argument("--world", type=int, required=True, help="ranks in all")
    est.add_argument("--policy", help="FreezePolicy YAML; frozen_reshard / frozen_dtype left out are compared")
    est.add_argument("--peft", help="PEFT adapter_config.json (or its directory)")
    est.add_argument("--replicate", type=int, default=1, help="HSDP replicas (world = replicate x shard)")
    est.add_argument("--batch", type=int, help="micro-batch size per rank (with --seq: activation estimate)")
    est.add_argument("--seq", type=int, help="sequence length")
    est.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    if args.command == "estimate":
        from .errors import PolicyError

        try:
            info = run_estimates(args)
        except (PolicyError, OSError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(json.dumps(info, indent=1) if args.json else render_estimates(info))
        return 0
    try:
        info = summarize(args.path)
    except CheckpointLayoutError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=1, sort_keys=True) if args.json else render(info))
    return 0
