"""Dotted-name glob matching used for unit, freeze and unfreeze patterns.

`*` matches within one dotted segment (`layers.*` matches `layers.0`, not `layers.0.attn`),
`**` matches any number of segments (`**.bias` matches every bias), other fnmatch syntax
(`?`, `[0-3]`) works within a segment.
"""

from __future__ import annotations

import fnmatch
from functools import lru_cache


def _split(name: str) -> tuple[str, ...]:
    return tuple(name.split(".")) if name else ()


@lru_cache(maxsize=4096)
def glob_match(pattern: str, name: str) -> bool:
    """True if the dotted `name` matches the dotted glob `pattern`."""
    return _match(_split(pattern), _split(name))


def _match(pat: tuple[str, ...], parts: tuple[str, ...]) -> bool:
    if not pat:
        return not parts
    head, rest = pat[0], pat[1:]
    if head == "**":
        return any(_match(rest, parts[i:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], head) and _match(rest, parts[1:])
