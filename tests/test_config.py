"""Dataclass configs: YAML < flags precedence, nested dotted flags, type errors, round trip."""
from dataclasses import dataclass, field

import pytest

from core.cli import parse_config
from core.config import load_config, save_config
from core.errors import ConfigError


@dataclass
class Inner:
    depth: int = 2
    size: tuple[int, int, int] = (1, 2, 3)


@dataclass
class Outer:
    lr: float = 1e-3
    name: str = "x"
    flag: bool = False
    cols: list[str] = field(default_factory=list)
    inner: Inner = field(default_factory=Inner)


def test_flags_override_yaml_which_overrides_defaults(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("lr: 0.5\nname: fromfile\ninner:\n  depth: 7\n")
    cfg, _ = parse_config(Outer, ["--config", str(y), "--lr", "0.1", "--inner.size", "4", "5", "6",
                                  "--flag", "true", "--cols", "age", "kps"])
    assert cfg.lr == 0.1 and cfg.name == "fromfile" and cfg.flag is True
    assert cfg.inner.depth == 7 and cfg.inner.size == (4, 5, 6)
    assert cfg.cols == ["age", "kps"]


def test_round_trip_yaml_and_json(tmp_path):
    cfg, _ = parse_config(Outer, ["--inner.depth", "9", "--cols", "a"])
    for name in ("c.yaml", "c.json"):
        save_config(cfg, tmp_path / name)
        assert load_config(Outer, tmp_path / name) == cfg


@pytest.mark.parametrize("argv, fragment", [
    (["--lr", "fast"], "not a number"),
    (["--flag", "maybe"], "not a boolean"),
    (["--inner.size", "1", "2"], "expected 3 values"),
    (["--inner.depth", "2.5"], "not a number"),
])
def test_bad_values_are_config_errors(argv, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_config(Outer, argv)


def test_unknown_yaml_key_is_named(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("inner:\n  dept: 3\n")
    with pytest.raises(ConfigError, match=r"dept"):
        parse_config(Outer, ["--config", str(y)])
