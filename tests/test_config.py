"""The dataclass configuration layer: conversions and the errors users see."""

from dataclasses import dataclass, field
from typing import Optional

import pytest

from speech_ssl.config import ConfigError, check_key, from_dict, to_dict


@dataclass
class Inner:
    rate: float = 1.0
    mode: str = field(default="a", metadata={"choices": ["a", "b"]})


@dataclass
class Outer:
    name: str
    count: int = 3
    layers: list[int] = field(default_factory=lambda: [1, 2])
    path: Optional[str] = None
    inner: Inner = field(default_factory=Inner)
    extra: dict[str, float] = field(default_factory=dict)


def test_round_trip_with_nesting_and_defaults():
    cfg = from_dict(Outer, {"name": "x", "inner": {"rate": 2}, "extra": {"k": 1}})
    assert cfg == Outer(name="x", inner=Inner(rate=2.0), extra={"k": 1.0})
    assert isinstance(cfg.inner.rate, float)
    assert from_dict(Outer, to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "data, key, needle",
    [
        ({"name": "x", "cuont": 1}, "cuont", "Did you mean 'count'"),
        ({"name": "x", "inner": {"rat": 1}}, "inner.rat", "Did you mean 'rate'"),
        ({"name": "x", "count": "many"}, "count", "expected an integer"),
        ({"name": "x", "count": True}, "count", "expected an integer"),
        ({"name": "x", "layers": "1,2"}, "layers", "expected a list"),
        ({"name": "x", "layers": [1, "b"]}, "layers[1]", "expected an integer"),
        ({"name": "x", "inner": {"mode": "c"}}, "inner.mode", "'c' is not allowed"),
        ({}, "name", "required value is missing"),
        ({"name": "???"}, "name", "required value is missing"),
    ],
)
def test_errors_name_the_key(data, key, needle):
    with pytest.raises(ConfigError) as info:
        from_dict(Outer, data)
    assert info.value.key == key
    assert needle in info.value.paragraph()
    assert "\n" not in info.value.paragraph()


def test_unknown_key_lists_valid_choices():
    with pytest.raises(ConfigError) as info:
        from_dict(Outer, {"name": "x", "bogus": 1})
    assert info.value.choices == ["name", "count", "layers", "path", "inner", "extra"]
    with pytest.raises(ConfigError) as info:
        from_dict(Outer, {"name": "x", "inner": {"mode": "z"}})
    assert info.value.choices == ["a", "b"]


def test_check_key_walks_nested_fields_and_mappings():
    assert check_key(Outer, "inner.rate") is float
    assert check_key(Outer, "extra.anything") is float
    with pytest.raises(ConfigError, match="unknown key 'rte'"):
        check_key(Outer, "inner.rte")
    with pytest.raises(ConfigError, match="has no sub-keys"):
        check_key(Outer, "count.x")


def test_infinity_and_int_to_float():
    @dataclass
    class F:
        limit: float = 1.0

    assert from_dict(F, {"limit": "inf"}).limit == float("inf")
    assert to_dict(F(limit=float("inf"))) == {"limit": "inf"}
