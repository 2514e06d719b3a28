"""Single-process tests of the checkpoint layout comparison and checksums."""

from __future__ import annotations

import pytest
import torch

from fsdp_frozen.checkpoint.checksum import _sums, checksums, local_checksum
from fsdp_frozen.checkpoint.keys import checkpoint_key
from fsdp_frozen.checkpoint.layout import Spec, compare


def test_checksum_is_sharding_invariant():
    torch.manual_seed(0)
    t = torch.randn(37, 5, 3).to(torch.bfloat16)  # 30-byte rows: shards start mid-word
    row = 5 * 3 * 2
    whole = _sums(t, 0)
    for cuts in ((0, 10, 11, 37), (0, 1, 2, 3, 36, 37), (0, 37)):
        parts = [_sums(t[a:b], a * row) for a, b in zip(cuts, cuts[1:])]
        assert tuple(sum(p[i] for p in parts) % 2**64 for i in range(2)) == whole, cuts
    big = torch.randn(70000, 3)  # longer than one weight period
    assert tuple(sum(x) % 2**64 for x in zip(_sums(big[:33333], 0), _sums(big[33333:], 33333 * 12))) == _sums(big, 0)
    other = t.clone()
    other[20, 1, 2] += 1  # changes any randn value (x * 2 + 1 keeps x = -1.0)
    assert not torch.equal(other, t)
    assert checksums({"a": t}) != checksums({"a": other})
    rows = torch.randn(10, 4)  # 16-byte rows: swapping two keeps the plain sum, not the weighted one
    swapped = rows.clone()
    swapped[[3, 4]] = rows[[4, 3]]
    assert checksums({"a": rows})["a"][:16] == checksums({"a": swapped})["a"][:16]
    assert checksums({"a": rows}) != checksums({"a": swapped})
    # Scalars and bools: checksummed like any tensor (equal to the whole-tensor figure, sensitive to the value).
    small = {"s": torch.tensor(3.0), "b": torch.tensor([True, False])}
    sums = checksums(small)
    assert sums == {k: local_checksum(v) for k, v in small.items()}
    assert checksums({"s": torch.tensor(3.5), "b": torch.tensor([False, True])}).keys() == sums.keys()
    assert all(a != b for a, b in zip(sums.values(), checksums({"s": torch.tensor(3.5), "b": torch.tensor([False, True])}).values()))


def test_checkpoint_keys():
    kinds = {"w": "frozen", "b": "trainable", "pos": "buffers"}
    assert checkpoint_key(("w",), kinds) == "frozen/w"
    assert checkpoint_key(("model", "b"), kinds) == "trainable/b"
    assert checkpoint_key(("model", "pos"), kinds) == "buffers/pos"
    assert checkpoint_key(("optimizer", "state", "b", "exp_avg"), kinds) == "optimizer/b/exp_avg"
    assert checkpoint_key(("optimizer", "param_groups", 0, "lr"), kinds) == "optimizer_groups/param_groups.0.lr"
    assert checkpoint_key(("extra", "step"), kinds) == "extra/step"
    assert checkpoint_key(("anything",), kinds) == "extra/anything"


def test_compare_lists_every_difference():
    f32, bf16 = "float32", "bfloat16"
    template = {
        "frozen/a": Spec((2, 2), bf16),
        "trainable/b": Spec((3,), f32),
        "trainable/c": Spec((3,), f32),
        "buffers/d": Spec((1,), f32),
        "optimizer/b/exp_avg": Spec((3,), f32),
    }
    saved = {
        "frozen/a": Spec((2, 2), f32),
        "frozen/b": Spec((3,), f32),
        "trainable/c": Spec((4,), f32),
        "trainable/x": Spec((1,), f32),
        "optimizer/c/exp_avg": Spec((4,), f32),
    }
    diffs = compare(template, saved).differences
    assert len(diffs) == 6, diffs
    assert any("optimizer state 'b/exp_avg' is missing" in d for d in diffs)
    assert any("dtype float32 in the checkpoint, bfloat16 in the model" in d for d in diffs)
    assert any("parameter 'b' is trainable in the model but frozen in the checkpoint" in d for d in diffs)
    assert any("shape [4] in the checkpoint, [3] in the model" in d for d in diffs)
    assert any("buffer 'd' is missing" in d for d in diffs)
    assert any("the checkpoint has parameter 'x' (trainable)" in d for d in diffs)
    lenient = compare(template, saved, cast=True, allow_freezing_change=True)
    assert lenient.zero_init == ["optimizer/b/exp_avg"] and lenient.cast == ["frozen/a"]
    assert lenient.key_map["trainable/b"] == "frozen/b"


def test_export_gate_on_old_torch(monkeypatch, tmp_path):
    from fsdp_frozen import _torch_compat as compat
    from fsdp_frozen.checkpoint import export_safetensors

    monkeypatch.setattr(compat, "HF_STORAGE_WRITER_SUPPORTED", False)
    with pytest.raises(ImportError, match=r"export_safetensors needs torch >= 2\.8"):
        export_safetensors(torch.nn.Linear(2, 2), tmp_path / "x")
    assert not (tmp_path / "x").exists()
