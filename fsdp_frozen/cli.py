"""``python -m fsdp_frozen inspect PATH [--json]``: print a checkpoint's layout."""

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fsdp_frozen")
    sub = parser.add_subparsers(dest="command", required=True)
    inspect = sub.add_parser("inspect", help="print a checkpoint's layout")
    inspect.add_argument("path")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    try:
        info = summarize(args.path)
    except CheckpointLayoutError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=1, sort_keys=True) if args.json else render(info))
    return 0
