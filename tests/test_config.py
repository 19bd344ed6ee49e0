from dataclasses import dataclass, field

import pytest

from banditroute.core.config import ConfigError, from_dict, load_config, parse_set_args, to_dict


@dataclass
class Inner:
    size: int = 1
    """a size"""
    ratio: float = 0.5
    """a ratio"""

    def validate(self):
        if self.size < 0:
            raise ValueError("inner.size must be >= 0")


@dataclass
class Outer:
    name: str = "x"
    """a name"""
    inner: Inner = field(default_factory=Inner)
    """nested"""
    tags: list[str] = field(default_factory=list)
    """tags"""
    limit: int | None = None
    """optional"""


def test_from_dict_fills_nested_and_coerces():
    cfg = from_dict(Outer, {"name": "r", "inner": {"size": "3", "ratio": 1}, "tags": ["a"], "limit": None})
    assert cfg.inner.size == 3 and cfg.inner.ratio == 1.0 and cfg.tags == ["a"] and cfg.limit is None


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="inner.sise"):
        from_dict(Outer, {"inner": {"sise": 3}})


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match="inner.size"):
        from_dict(Outer, {"inner": {"size": "big"}})
    with pytest.raises(ConfigError, match="tags"):
        from_dict(Outer, {"tags": "a"})


def test_validate_runs():
    with pytest.raises(ValueError, match="inner.size"):
        from_dict(Outer, {"inner": {"size": -1}})


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: from-yaml\ninner:\n  size: 2\n")
    cfg = load_config(Outer, path, overrides=parse_set_args(["inner.ratio=0.25", "limit=7"]))
    assert (cfg.name, cfg.inner.size, cfg.inner.ratio, cfg.limit) == ("from-yaml", 2, 0.25, 7)
    assert to_dict(cfg)["inner"] == {"size": 2, "ratio": 0.25}


def test_set_arg_needs_equals():
    with pytest.raises(ConfigError, match="key=value"):
        parse_set_args(["novalue"])


@dataclass
class Texts:
    sink: str = "local"
    """a name that may look like YAML"""
    path: str | None = "x"
    """optional text"""
    count: int = 0
    """a number"""


def test_text_overrides_keep_text_fields_as_text():
    cfg = load_config(Texts, overrides={"sink": "null", "count": "7"})
    assert cfg.sink == "null" and cfg.count == 7
    assert load_config(Texts, overrides={"sink": "true", "path": "null"}).path is None
    assert load_config(Texts, overrides={"sink": "true"}).sink == "true"
    with pytest.raises(ConfigError, match="count"):
        load_config(Texts, overrides={"count": "many"})
