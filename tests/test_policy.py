"""FreezePolicy validation and (de)serialisation — single process."""

import pytest

from fsdp_frozen import FreezePolicy, PolicyError


def test_round_trip_dict_and_yaml(tmp_path):
    policy = FreezePolicy(
        units=["layers.*"], freeze=["**.base_layer.weight"], frozen_reshard="after_backward",
        frozen_dtype="bfloat16", param_dtype="bfloat16", reduce_dtype="float32", trainable_reshard=False,
    )
    assert FreezePolicy.from_dict(policy.to_dict()) == policy
    import yaml

    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(policy.to_dict()))
    assert FreezePolicy.from_yaml(path) == policy
    assert policy.units == ("layers.*",)  # lists normalised to tuples


def test_int_and_auto_values_accepted():
    assert FreezePolicy(frozen_reshard=2).frozen_reshard == 2
    assert FreezePolicy(frozen_reshard="auto", frozen_budget_bytes=0).frozen_budget_bytes == 0


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"frozen_reshard": "sometimes"}, "frozen_reshard='sometimes'"),
        ({"frozen_reshard": 1}, "frozen_reshard=1"),
        ({"frozen_reshard": True}, "frozen_reshard=True"),
        ({"frozen_reshard": "auto"}, "frozen_budget_bytes is required"),
        ({"frozen_budget_bytes": 10}, "frozen_budget_bytes is required"),
        ({"frozen_reshard": "auto", "frozen_budget_bytes": -1}, "frozen_budget_bytes must be an int >= 0"),
        ({"trainable_reshard": "yes"}, "trainable_reshard='yes'"),
        ({"trainable_reshard": 1}, "trainable_reshard=1"),
        ({"frozen_dtype": "int8"}, "frozen_dtype='int8'"),
        ({"param_dtype": "fp16"}, "param_dtype='fp16'"),
        ({"reduce_dtype": 3}, "reduce_dtype=3"),
        ({"frozen_dtype": "bfloat16"}, "needs param_dtype='bfloat16'"),
        ({"frozen_dtype": "float16", "param_dtype": "bfloat16"}, "needs param_dtype='float16'"),
        ({"units": [""]}, "FreezePolicy.units must be a list of non-empty strings"),
        ({"freeze": [3]}, "FreezePolicy.freeze must be"),
    ],
)
def test_bad_values_name_the_key(kwargs, needle):
    with pytest.raises(PolicyError) as err:
        FreezePolicy(**kwargs)
    assert needle in str(err.value)


def test_allowed_values_listed():
    with pytest.raises(PolicyError, match=r"\['after_forward', 'after_backward', 'never', 'auto'\]"):
        FreezePolicy(frozen_reshard="x")


def test_unknown_key_rejected_with_source(tmp_path):
    with pytest.raises(PolicyError, match=r"policy: unknown FreezePolicy key\(s\) \['frozen_reshrad'\]"):
        FreezePolicy.from_dict({"frozen_reshrad": "never"})
    path = tmp_path / "bad.yaml"
    path.write_text("units: ['layers.*']\nfrozen_dype: bfloat16\n")
    with pytest.raises(PolicyError, match=r"bad.yaml: unknown FreezePolicy key\(s\) \['frozen_dype'\]"):
        FreezePolicy.from_yaml(path)


def test_yaml_errors_name_the_file(tmp_path):
    with pytest.raises(PolicyError, match="missing.yaml"):
        FreezePolicy.from_yaml(tmp_path / "missing.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(PolicyError, match="list.yaml: expected a mapping"):
        FreezePolicy.from_yaml(path)


def test_torch_dtype_objects_are_normalised():
    import torch

    policy = FreezePolicy(param_dtype=torch.bfloat16, frozen_dtype=torch.bfloat16)
    assert policy.param_dtype == "bfloat16" and policy.torch_frozen_dtype is torch.bfloat16
