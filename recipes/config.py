"""Recipe configs: nested dataclasses loaded from YAML plus ``key=value`` overrides, strictly.

Every key must be a field: an unknown or misspelled key (in the file or an override) is an error that
names it, its section and the closest valid key. Values are type-checked against the field's type.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import difflib
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


# ------------------------------------------------------------------ sections every recipe shares
@dataclass
class DataConfig:
    batch_size: int = 8
    seq_len: int = 64
    n_sentences: int = 4000
    seed: int = 0


@dataclass
class OptimizerConfig:
    lr: float = 3e-3
    weight_decay: float = 0.0


@dataclass
class TrainConfig:
    steps: int = 100
    log_every: int = 10
    checkpoint_every: int = 50  #: 0: only at the end
    output_dir: str = "runs/lora"
    resume: bool = False
    export_adapter: bool = False  #: hf: write OUTPUT_DIR/adapter in PEFT's format at the end
    #: the loss over the output head in this many chunks of tokens (recipes/loss.py; torchtune's 8), never
    #: the full fp32 logits; 0: unchunked (the full logits, F.cross_entropy), the reference
    loss_chunks: int = 8




class ConfigError(ValueError):
    """A recipe config key or value is invalid; the message names the key and the file."""


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] = ()) -> T:
    """Build `cls` from the YAML file at `path` (optional) and dotted ``key=value`` overrides."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read config {source!r}: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"config {source!r} must be a mapping at the top level")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.steps=20)")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[leaf] = yaml.safe_load(value)
    return _build(cls, data, prefix="", source=source)


def _build(cls: type[T], data: dict[str, Any], prefix: str, source: str) -> T:
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"; did you mean {prefix + close[0]!r}?" if close else ""
            raise ConfigError(
                f"unknown config key {prefix + key!r} in {source}{hint} (valid keys here: {', '.join(sorted(fields))})"
            )
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {prefix + name!r} in {source} must be a section (a mapping)")
            kwargs[name] = _build(hint, value, prefix=f"{prefix}{name}.", source=source)
        else:
            kwargs[name] = _check_type(value, hint, prefix + name, source)
    return cls(**kwargs)


def _check_type(value: Any, hint: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(hint)
    options = typing.get_args(hint) if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) else (hint,)
    for option in options:
        base = typing.get_origin(option) or option
        if option is type(None) and value is None:
            return value
        if option is Any:
            return value
        if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if base in (list, tuple) and isinstance(value, (list, tuple)):
            return list(value)
        if base is dict and isinstance(value, dict):
            return value
        if isinstance(base, type) and base not in (list, tuple, dict) and isinstance(value, base):
            if base is int and isinstance(value, bool):
                continue
            return value
    raise ConfigError(f"config key {key!r} in {source} must be {_name(hint)}, got {value!r}")


def _name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def parse_recipe_args(cls: type[T], description: str, argv: list[str] | None = None) -> tuple[T, str | None]:
    """``--config FILE [key=value ...]`` -> (the validated config, the config file)."""
    import argparse

    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML config (recipes/configs/*.yaml)")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=20")
    args = ap.parse_args(argv)
    return load_config(cls, args.config, args.overrides), args.config
