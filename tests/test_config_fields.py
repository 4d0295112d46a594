"""Every field of every config is type- and range-checked and named in the error (stylenat._config)."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from stylenat._config import JsonConfig, _hints
from stylenat.errors import ConfigError
from stylenat.models import DiscriminatorConfig, GeneratorConfig, get_preset
from stylenat.train import TrainConfig, get_train_preset

VALID = {
    TrainConfig: get_train_preset("tiny"),
    GeneratorConfig: get_preset("tiny")[0],
    DiscriminatorConfig: get_preset("tiny")[1],
}


def _wrong_value(tp):
    """A JSON value that no field of type ``tp`` accepts."""
    accepted = {typing.get_origin(tp) or tp} | {typing.get_origin(a) or a for a in typing.get_args(tp)}
    for candidate in ({"not": "this"}, "not-this", 1.5, [1.5, "x"]):
        kind = dict if isinstance(candidate, dict) else str if isinstance(candidate, str) else float if isinstance(candidate, float) else tuple
        if kind not in accepted:
            return candidate
    raise AssertionError(f"no wrong value for {tp}")


FIELDS = [(cls, f) for cls in VALID for f in dataclasses.fields(cls)]


@pytest.mark.parametrize("cls, field", FIELDS, ids=[f"{c.__name__}.{f.name}" for c, f in FIELDS])
def test_wrong_type_names_the_field(cls, field):
    values = VALID[cls].to_dict()
    values[field.name] = _wrong_value(_hints(cls)[field.name])
    with pytest.raises(ConfigError, match=rf"{cls.__name__}\.{field.name} must be"):
        cls.from_dict(values)


RANGED = [(cls, f) for cls, f in FIELDS if f.metadata]


@pytest.mark.parametrize("cls, field", RANGED, ids=[f"{c.__name__}.{f.name}" for c, f in RANGED])
def test_out_of_range_names_the_field(cls, field):
    values = VALID[cls].to_dict()
    low = field.metadata.get("min", field.metadata.get("gt"))
    bad = low - 1 if low is not None else field.metadata["max"] + 1

    def replace_numbers(v):
        return [replace_numbers(x) for x in v] if isinstance(v, list) else bad

    values[field.name] = replace_numbers(values[field.name]) if values[field.name] is not None else bad
    with pytest.raises(ConfigError, match=rf"{cls.__name__}\.{field.name} must be .*[<>]"):
        cls.from_dict(values)


@pytest.mark.parametrize("cls", list(VALID))
def test_json_round_trip_and_unknown_fields(cls, tmp_path):
    cfg = VALID[cls]
    cfg.save(tmp_path / "c.json")
    assert cls.load(tmp_path / "c.json") == cfg
    with pytest.raises(ConfigError, match="unknown"):
        cls.from_dict({**cfg.to_dict(), "bogus": 1})


def test_every_config_uses_the_one_mechanism():
    assert all(issubclass(cls, JsonConfig) for cls in VALID)


def test_coercions_are_exact():
    cfg = TrainConfig(steps=1e3, betas=[0, 1], d_lr=1)  # JSON gives floats for ints, lists for tuples, ints for floats
    assert cfg.steps == 1000 and type(cfg.steps) is int
    assert cfg.betas == (0.0, 1.0) and all(type(b) is float for b in cfg.betas)
    assert type(cfg.d_lr) is float
    with pytest.raises(ConfigError, match="TrainConfig.steps must be an integer"):
        TrainConfig(steps=10.5)
    with pytest.raises(ConfigError, match="TrainConfig.xflip must be true or false"):
        TrainConfig(xflip=1)


@pytest.mark.parametrize("cls, field", RANGED, ids=[f"{c.__name__}.{f.name}" for c, f in RANGED])
def test_nan_is_refused_where_a_range_is_set(cls, field):
    """NaN passes every comparison, so a range alone let `--set d_lr=NaN` through."""
    values = VALID[cls].to_dict()
    values[field.name] = [float("nan")] * len(values[field.name]) if isinstance(values[field.name], list) else float("nan")
    with pytest.raises(ConfigError, match=rf"{cls.__name__}\.{field.name} must be"):
        cls.from_dict(values)
