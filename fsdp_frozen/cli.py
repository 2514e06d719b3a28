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


def _recipe_model(path: str) -> tuple[Any, Any, dict[str, Any]]:
    """(build, config for activations, FreezePolicy fields) of a recipe config (``recipes/configs/*.yaml``)
    whose ``model.kind`` is ``llama``: the in-repo Llama of ``recipes/llama.py`` beside it."""
    import importlib.util
    import types

    import yaml

    from .errors import PolicyError

    data = yaml.safe_load(open(path)) or {}
    model = data.get("model", {})
    if model.get("kind", "llama") != "llama":
        raise PolicyError(f"estimate: {path!r} is a recipe config of model.kind={model.get('kind')!r}; pass the "
                          f"Hugging Face config.json instead (only kind 'llama' is built from recipes/llama.py)")
    recipes = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    file = os.path.join(recipes, "llama.py")
    if not os.path.isfile(file):
        raise PolicyError(f"estimate: {path!r} is a recipe config but {file!r} (the in-repo Llama) is missing")
    spec = importlib.util.spec_from_file_location("_fsdp_frozen_recipe_llama", file)
    llama = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = llama  # its dataclasses look their module up
    spec.loader.exec_module(llama)  # type: ignore[union-attr]
    known = {f for f in llama.LlamaConfig.__dataclass_fields__}
    cfg = llama.LlamaConfig(vocab_size=256, **{k: v for k, v in model.items() if k in known})

    def build() -> Any:
        import torch

        with torch.device("meta"):
            return llama.LlamaLoRA(cfg)

    shape = types.SimpleNamespace(hidden_size=cfg.dim, num_hidden_layers=cfg.n_layers, vocab_size=cfg.vocab_size)
    return build, shape, dict(data.get("freeze") or {})


def run_estimates(args: argparse.Namespace) -> dict[str, Any]:
    """Every (frozen policy, frozen dtype) the policy file leaves open, side by side."""
    import yaml

    from .errors import PolicyError
    from .estimate import activation_bytes, default_units, estimate, hf_builder, hf_config
    from .policy import FreezePolicy

    fields: dict[str, Any] = {"param_dtype": "bfloat16", "reduce_dtype": "float32"}
    if args.model.endswith((".yaml", ".yml")):
        if args.peft:
            raise PolicyError("estimate: --peft applies to Hugging Face configs; the in-repo Llama has its own "
                              "LoRA (model.lora_rank in the recipe config)")
        build, config, recipe_fields = _recipe_model(args.model)
        fields.update({k: v for k, v in recipe_fields.items() if v is not None})
        for key in ("frozen_reshard", "frozen_dtype"):  # compared side by side unless --policy fixes them
            fields.pop(key, None)
    else:
        config = hf_config(args.model)
        build = None
    if args.policy:
        try:
            data = yaml.safe_load(open(args.policy)) or {}
        except (OSError, yaml.YAMLError) as e:
            raise PolicyError(f"cannot read FreezePolicy YAML {args.policy!r}: {e}") from e
        FreezePolicy.from_dict(dict(data), source=args.policy)  # validated as given
        fields.update(data)
    if "units" not in fields:
        fields["units"] = default_units(config)
    policies = [fields["frozen_reshard"]] if "frozen_reshard" in fields else list(POLICIES)
    dtypes = [fields["frozen_dtype"]] if "frozen_dtype" in fields else list(FROZEN_DTYPES)
    build = build or hf_builder(config, args.peft)
    rows = []
    for reshard in policies:
        for dtype in dtypes:
            policy = FreezePolicy.from_dict({**fields, "frozen_reshard": reshard, "frozen_dtype": dtype})
            if dtype == "nf4" and args.tp > 1:
                continue  # refused under TP (docs/tp.md): not a row
            row = estimate(build, args.world, policy, replicate=args.replicate, tp=args.tp).to_dict()
            if args.batch and args.seq:
                row["activations"] = activation_bytes(config, args.batch, args.seq, nf4_dense=row["nf4_dense_bytes"],
                                                      nf4_head=dtype == "nf4" and row["nf4_dense_bytes"] > 0)
            rows.append(row)
    return {"model": os.path.abspath(args.model), "world": args.world, "replicate": args.replicate, "tp": args.tp,
            "peft": args.peft, "units": fields["units"], "estimates": rows}


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def render_estimates(info: dict[str, Any]) -> str:
    head = ("| policy | frozen | trainable grouping | frozen/rank | trainable/rank | grads/rank | AdamW/rank | "
            "kept gathered | trainable gathered all step | "
            "largest unit gather | persistent/rank | peak/rank | AG/step frozen / trainable | RS/step | AR/step | "
            "checkpoint full / trainable |")
    lines = [f"{info['model']} at world {info['world']}" + (f" (HSDP {info['replicate']} x "
             f"{info['world'] // info['replicate']})" if info["replicate"] > 1 else "")
             + (f", tensor parallel {info['tp']} (dp {info['world'] // info['tp']})" if info.get("tp", 1) > 1 else "")
             + (f", PEFT {info['peft']}" if info["peft"] else "") + f", units {info['units']}", "",
             head, "|" + "---|" * (head.count("|") - 1)]
    for r in info["estimates"]:
        ag = r["all_gather_bytes_per_step"]
        cells = [r["frozen_reshard"], r["frozen_dtype"], r["trainable_grouping"], *map(_size, (
            r["frozen_shard_bytes"], r["trainable_shard_bytes"], r["gradient_bytes"], r["optimizer_bytes"],
            r["kept_gathered_bytes"], r["trainable_step_gathered_bytes"], r["largest_unit_gather_bytes"],
            r["persistent_bytes"], r["peak_bytes"])),
            f"{_size(ag['frozen'])} / {_size(ag['trainable'])}", _size(r["reduce_scatter_bytes_per_step"]),
            _size(r["all_reduce_bytes_per_step"]),
            f"{_size(r['checkpoint_full_bytes'])} / {_size(r['checkpoint_trainable_bytes'])}"]
        lines.append("| " + " | ".join(cells) + " |")
    tp = info["estimates"][0].get("tensor_parallel") if info["estimates"] else None
    if tp:
        tokens = (lambda a: a["batch"] * a["seq"])(info["estimates"][0]["activations"]) \
            if info["estimates"][0].get("activations") else None
        per_step = (f": {_size(tokens * (tp['all_reduce_bytes_per_token_forward'] + tp['all_reduce_bytes_per_token_backward']))}"
                    f" per step at {tokens:,} tokens per rank") if tokens else " (give --batch and --seq for bytes per step)"
        lines += ["", f"Tensor parallel {tp['degree']}: {tp['colwise']} colwise and {tp['rowwise']} rowwise linears "
                  f"(llama_tp_plan + lora_tp_plan; embedding, norms and head whole on every TP rank); bytes above "
                  f"are per TP rank. The TP plan's all-reduces (TP group, not counted above): "
                  f"{tp['all_reduce_bytes_per_token_forward']:,} B per token in forward (again in an activation "
                  f"recompute), {tp['all_reduce_bytes_per_token_backward']:,} in backward{per_step}."]
    acts = info["estimates"][0].get("activations") if info["estimates"] else None
    if acts:
        lines += ["", f"Activations per rank at batch {acts['batch']} x {acts['seq']} (add to peak): "
                  f"{_size(acts['no_checkpointing_bytes'])} without activation checkpointing, "
                  f"{_size(acts['checkpointing_bytes'])} with it; method: {acts['method']}."]
        nf4 = next((r["activations"] for r in info["estimates"] if r.get("activations", {}).get("nf4_dense_bytes")), None)
        if nf4 and nf4 is not acts:
            lines += ["", f"NF4 rows: {_size(nf4['checkpointing_bytes'])} with activation checkpointing (the NF4 head "
                      f"dequantized for the loss, and a recomputed block's NF4 weights dequantized for its backward, "
                      f"{_size(nf4['nf4_dense_bytes'])}, beside that block)."]
    lines += ["", "Per rank, exact from the sharding (fake process group); peak = persistent + the root's all-gather "
              "(gathered from its forward to the end of backward) + every after_backward frozen group's (all gathered "
              "at the turn to backward) + the two largest other units' (FSDP prefetches "
              "one unit ahead) + the param_dtype copies of replicated trainable parameters. Not counted: CUDA context, allocator fragmentation, "
              "NCCL buffers, one unit's unsharded gradients before reduce-scatter."]
    return "\n".join(lines)


INSPECT_EXAMPLES = """\
examples:
  # the README's main job writes runs/lora_tiny/step_100 and step_200
  python -m fsdp_frozen inspect runs/lora_tiny/step_200
  python -m fsdp_frozen inspect runs/lora_tiny/step_200 --json

prints the format version, the torch and world size of the save, whether the frozen weights are in the
checkpoint or referenced in a base (and whether that base's fingerprint still matches), and the bytes of
frozen and trainable parameters, buffers and optimizer state. See docs/checkpoint.md.
"""

ESTIMATE_EXAMPLES = """\
examples:
  # the in-repo Llama of a recipe config, at 2 ranks
  python -m fsdp_frozen estimate --model recipes/configs/lora_tiny.yaml --world 2
  # Llama-3.1-8B + LoRA on 8 ranks, activations at batch 2 x 2048 (configs in docs/configs/, nothing downloaded)
  python -m fsdp_frozen estimate --model docs/configs/llama-3.1-8b.json \\
      --peft docs/configs/lora_torchtune_8b.json --world 8 --batch 2 --seq 2048
  # Llama-3-70B + LoRA on 64 ranks as dp 8 x tp 8
  python -m fsdp_frozen estimate --model docs/configs/llama-3-70b.json \\
      --peft docs/configs/lora_all_linear.json --world 64 --tp 8 --batch 1 --seq 2048
  # a frozen teacher: the policy file fixes what it names, the rest is compared side by side
  python -m fsdp_frozen estimate --model docs/configs/llama-3.1-8b.json --world 8 \\
      --policy docs/policies/frozen_teacher.yaml

one row per frozen_reshard x frozen_dtype the policy leaves open; per rank: shards, gradients, AdamW
state, gathered bytes, peak; per step: all-gather, reduce-scatter, all-reduce bytes; checkpoint bytes.
See docs/estimate.md.
"""


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m fsdp_frozen``: one sub-command per verb, each with examples."""
    parser = argparse.ArgumentParser(
        prog="python -m fsdp_frozen", description="fsdp_frozen's command-line tools.",
        epilog="Run 'python -m fsdp_frozen COMMAND --help' for a command's options and examples.")
    sub = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")
    raw = argparse.RawDescriptionHelpFormatter
    inspect = sub.add_parser("inspect", help="print a checkpoint's layout, frozen base and bytes",
                             description="Print the layout of a checkpoint written by save_checkpoint "
                                         "(reads its JSON manifest only).",
                             epilog=INSPECT_EXAMPLES, formatter_class=raw)
    inspect.add_argument("path", help="a checkpoint directory")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    est = sub.add_parser("estimate", help="memory per rank and communication per step of a run",
                         description="Build the model on the meta device, shard it with shard_with_freezing on a\n"
                                     "fake process group of --world ranks (one process, nothing allocated), and\n"
                                     "report what each rank holds and moves.",
                         epilog=ESTIMATE_EXAMPLES, formatter_class=raw)
    est.add_argument("--model", required=True, help="a Hugging Face config.json or a directory holding one, or a "
                     "recipe config (recipes/configs/*.yaml) of the in-repo Llama")
    est.add_argument("--world", type=int, required=True, help="ranks in all")
    est.add_argument("--policy", help="FreezePolicy YAML; frozen_reshard / frozen_dtype left out are compared")
    est.add_argument("--peft", help="PEFT adapter_config.json (or its directory)")
    est.add_argument("--replicate", type=int, default=1, help="HSDP replicas (world = replicate x shard)")
    est.add_argument("--tp", type=int, default=1,
                     help="tensor-parallel degree (world = dp x tp; Llama-style models: torchtitan's plan, docs/tp.md)")
    est.add_argument("--batch", type=int, help="micro-batch size per rank (with --seq: activation estimate)")
    est.add_argument("--seq", type=int, help="sequence length")
    est.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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
