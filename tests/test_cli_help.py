"""The config CLIs explain themselves: --help text, no prefix matching, bad values blamed on their source."""
import argparse
import re
import sys
import types
from dataclasses import dataclass, field
from typing import Literal

import pytest

from core.cli import parse_config
from core.errors import ConfigError
from finetune.config import FinetuneConfig


def _help_text(cls, capsys, **kwargs) -> str:
    with pytest.raises(SystemExit) as e:
        parse_config(cls, ["--help"], **kwargs)
    assert e.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # one line: argparse wraps at the terminal width


def _entry(text: str, flag: str) -> str:
    """The help of one flag: from `--flag` up to the next flag's entry."""
    m = re.search(rf"(?<![\w.-]){re.escape(flag)} (.*?)(?= --[a-z]|$)", text)
    assert m, f"{flag} missing from --help"
    return m.group(1)


def test_finetune_help_shows_description_default_and_choices(capsys):
    text = _help_text(FinetuneConfig, capsys, prog="python -m finetune")
    assert text.startswith("usage: python -m finetune ")
    # description from the trailing comment, default, and the Literal's choices as the metavar
    modality = _entry(text, "--prep.modality")
    assert modality.startswith("{mri,ct,pet} mri: percentile clip") and "(default: mri)" in modality
    patience = _entry(text, "--patience")
    assert patience.startswith("INT epochs without validation improvement") and "(default: 6)" in patience
    # a fixed-length tuple shows how many numbers it takes; a nested default_factory's value is shown
    spacing = _entry(text, "--prep.spacing")
    assert spacing.startswith("FLOAT FLOAT FLOAT target voxel size, mm") and "(default: 2.0 2.0 2.0)" in spacing
    assert "(default: 0.001)" in _entry(text, "--optim.lr")
    # a bool takes true/false; a comment block above the field (crop_mm) is its description
    assert _entry(text, "--freeze_encoder").startswith("{true,false} linear probe")
    assert "Smallest side of the lesion-centred cube" in _entry(text, "--crop_mm")
    assert "V [V ...]" not in text


@dataclass
class Small:
    epochs: int = 3
    mode: str = field(default="a", metadata={"help": "how to run", "choices": ("a", "b")})
    kind: Literal["x", "y"] = "x"  # which kind
    ratios: tuple[float, ...] = (0.5,)
    on: bool = False


@dataclass
class Derived(Small):
    extra: int = 1  # only here


def test_metadata_help_and_choices_win(capsys):
    text = _help_text(Derived, capsys, prog="prog")
    assert _entry(text, "--extra").startswith("INT only here")
    assert _entry(text, "--mode").startswith("{a,b} how to run (default: a)")
    assert _entry(text, "--kind").startswith("{x,y} which kind (default: x)")
    assert _entry(text, "--ratios").startswith("FLOAT [FLOAT ...]")
    assert _entry(text, "--epochs").startswith("INT epochs (default: 3)")  # no comment: the field's name


def test_prog_is_the_module_the_user_ran(monkeypatch, capsys):
    fake = types.ModuleType("__main__")
    fake.__spec__ = types.SimpleNamespace(name="finetune.__main__")
    monkeypatch.setitem(sys.modules, "__main__", fake)
    assert _help_text(Small, capsys).startswith("usage: python -m finetune ")
    given = argparse.ArgumentParser(prog="__main__.py")
    assert _help_text(Small, capsys, parser=given).startswith("usage: python -m finetune ")


def test_bools_take_true_false_or_nothing():
    assert parse_config(Small, ["--on"])[0].on is True
    assert parse_config(Small, ["--on", "false"])[0].on is False


@pytest.mark.parametrize("parser", [None, argparse.ArgumentParser(prog="p")])
def test_no_prefix_matching(parser, capsys):
    with pytest.raises(SystemExit):
        parse_config(Small, ["--epoch", "2"], parser=parser)
    assert "unrecognized arguments: --epoch 2" in capsys.readouterr().err


def test_bad_flag_value_is_blamed_on_the_flag(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("epochs: 5\n")
    with pytest.raises(ConfigError) as e:
        parse_config(FinetuneConfig, ["--config", str(y), "--epochs", "two"])
    assert str(e.value) == "--epochs: 'two' is not a number (int)"
    with pytest.raises(ConfigError, match=r"^--prep\.modality: 'spect' is not one of \['mri', 'ct', 'pet'\]"):
        parse_config(FinetuneConfig, ["--config", str(y), "--prep.modality", "spect"])


def test_bad_file_value_is_blamed_on_the_file_and_key(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("epochs: two\n")
    with pytest.raises(ConfigError) as e:
        parse_config(FinetuneConfig, ["--config", str(y), "--folds", "3"])
    assert str(e.value) == f"{y}.epochs: 'two' is not a number (int)"


def test_a_check_that_only_the_flags_break_is_blamed_on_the_flags(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("model: {task: survival}\n")
    with pytest.raises(ConfigError) as e:  # a value check (in __post_init__) that only the flags break
        parse_config(FinetuneConfig, ["--config", str(y), "--crop_mm", "-5"])
    assert str(e.value).startswith("flags: ") and str(y) not in str(e.value)
    with pytest.raises(ConfigError) as e:  # a choice is checked against the flag itself
        parse_config(FinetuneConfig, ["--config", str(y), "--task", "bogus"])
    assert str(e.value).startswith("--model.task: 'bogus' is not one of") and str(y) not in str(e.value)
    y.write_text("model: {task: bogus}\n")
    with pytest.raises(ConfigError, match=re.escape(str(y))):
        parse_config(FinetuneConfig, ["--config", str(y), "--folds", "3"])


def _own_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="p")
    p.add_argument("--skip-bad", action="store_true", help="skip")
    p.add_argument("--datalist-key", default="training")
    p.add_argument("--n_kept", "--n-kept", dest="n_kept", type=int, default=0)  # both spellings already
    return p


@pytest.mark.parametrize("spelling", ["--skip_bad", "--skip-bad"])
def test_a_commands_hyphenated_flags_also_take_underscores(spelling):
    """Every command takes underscores; a command's own hyphenated flag keeps its spelling as an alias."""
    _, ns = parse_config(Small, [spelling, "--datalist_key", "k", "--n-kept", "2"], parser=_own_parser())
    assert ns.skip_bad is True and ns.datalist_key == "k" and ns.n_kept == 2
    _, ns = parse_config(Small, ["--datalist-key", "j", "--n_kept", "3"], parser=_own_parser())
    assert ns.skip_bad is False and ns.datalist_key == "j" and ns.n_kept == 3


def test_help_shows_the_underscore_spelling_first(capsys):
    text = _help_text(Small, capsys, parser=_own_parser())
    assert "--skip_bad, --skip-bad" in text and "--datalist_key DATALIST_KEY, --datalist-key" in text
    assert "--n_kept N_KEPT, --n-kept N_KEPT" in text


@pytest.mark.parametrize("spelling", ["_", "-"])
def test_data_synth_takes_both_spellings(spelling):
    from data.synth.__main__ import build_parser
    from data.synth.params import CohortParams
    argv = ["--out", "x", f"--n{spelling}unlabeled", "1", f"--n{spelling}labeled", "2",
            f"--n{spelling}external", "3", f"--no{spelling}progress"]
    _, ns = parse_config(CohortParams, argv, parser=build_parser())
    assert (ns.n_unlabeled, ns.n_labeled, ns.n_external, ns.no_progress) == (1, 2, 3, True)


def test_data_synth_usage_and_help_spell_with_underscores(capsys):
    from data.synth.__main__ import build_parser
    from data.synth.params import CohortParams
    text = _help_text(CohortParams, capsys, parser=build_parser())
    usage = text.split(" options:")[0]
    assert "--n_labeled" in usage and "--no_progress" in usage and "--n-labeled" not in usage
    assert "--n_labeled N_LABELED, --n-labeled N_LABELED" in text


def test_a_plain_argparse_cli_gets_both_spellings_too():
    """A CLI that parses with argparse alone (no config) calls underscore_spellings before parsing."""
    from core.cli import underscore_spellings
    parser = underscore_spellings(_own_parser())
    assert parser.parse_args(["--skip_bad", "--datalist_key", "k"]).datalist_key == "k"
    assert parser.parse_args(["--skip-bad"]).skip_bad is True
