"""Markers shared by the suite."""

from __future__ import annotations

import pytest

from fsdp_frozen._torch_compat import TORCH_VERSION, split_groups_supported

SPLIT_LAYOUT = (
    "asserts the layout or collective counts of split param groups (torch >= 2.12); torch "
    f"{TORCH_VERSION[0]}.{TORCH_VERSION[1]} takes the structural fallback, whose layout differs by design "
    "(docs/combinations.md) and whose parity the configuration matrix checks"
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "split_layout: " + SPLIT_LAYOUT.split(";")[0])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if split_groups_supported():
        return
    skip = pytest.mark.skip(reason=SPLIT_LAYOUT)
    for item in items:
        if "split_layout" in item.keywords:
            item.add_marker(skip)
