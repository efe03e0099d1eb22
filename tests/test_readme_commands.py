"""Every command in the README's fenced blocks is one its own parser accepts: each `python -m MOD` /
`accelerate launch -m MOD` / SLURM line is parsed by the parser MOD's `main` builds (caught at its parse
call, so nothing runs), and every file under launch/ that a command names exists."""
import argparse
import importlib
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SLURM_SCRIPT = "launch/slurm_pretrain.sh"  # its arguments are `-m pretrain`'s
OTHER_TOOLS = ("make", "pip", "git", "cd", "export", "source")  # lines that start no mimfm command


def fenced_lines(text: str) -> list[str]:
    """The shell lines of the ```bash blocks: continuations joined, comments dropped, $VAR expanded."""
    lines, variables = [], {}
    for block in re.findall(r"^```(?:bash|sh|shell)\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if not line or line.startswith("#"):
                continue
            assignment = re.fullmatch(r'([A-Z_]+)="(.*)"', line)
            if assignment:
                variables[assignment[1]] = assignment[2]
                continue
            lines.append(re.sub(r"\$([A-Z_]+)", lambda m: variables[m[1]], line))
    return lines


def command_of(line: str) -> tuple[str, list[str]] | None:
    """(module, its arguments) of a shell line; None for a line of another tool."""
    words = [w.strip("[]") for w in shlex.split(line)]  # [--max_steps 10] marks an option; its words count
    words = [w for w in words if w]
    if "-m" in words:
        i = words.index("-m")
        return words[i + 1], words[i + 2:]
    if SLURM_SCRIPT in words:
        return "pretrain", words[words.index(SLURM_SCRIPT) + 1:]
    if words[0] in OTHER_TOOLS:
        return None
    raise AssertionError(f"README line starts no command this test knows: {line}")


class _Parsed(BaseException):
    """Raised at a CLI's parse call, carrying its parser, so the command itself never runs."""

    def __init__(self, parser):
        self.parser = parser


def parser_of(module: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser `python -m module` builds, caught as its main() parses (flags, --config, aliases and all)."""
    if importlib.util.find_spec(module).submodule_search_locations:  # a package runs its __main__
        module += ".__main__"
    main = importlib.import_module(module).main
    original = argparse.ArgumentParser.parse_known_args

    def catch(self, args=None, namespace=None):
        raise _Parsed(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", catch)
    try:
        main(["--help"])
    except _Parsed as caught:
        return caught.parser
    finally:
        monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", original)
    raise AssertionError(f"python -m {module} parsed no command line")


def test_readme_has_commands_to_check():
    commands = [c for c in map(command_of, fenced_lines(README.read_text())) if c]
    modules = {m for m, _ in commands}
    assert {"pretrain", "finetune", "data.prepare", "models.export", "finetune.predict"} <= modules


def problems(lines: list[str], monkeypatch) -> list[str]:
    """What the commands' own parsers say against these lines: unknown flags, refused or left-over words."""
    parsers, bad = {}, []
    for line in lines:
        command = command_of(line)
        if command is None:
            continue
        module, args = command
        if module not in parsers:
            parsers[module] = parser_of(module, monkeypatch)
        parser = parsers[module]
        for flag in (a.split("=")[0] for a in args if a.startswith("--")):
            if flag not in parser._option_string_actions:
                bad.append(f"python -m {module}: unknown flag {flag} in: {line}")
        try:
            _, extra = parser.parse_known_args(args)
        except SystemExit:
            bad.append(f"python -m {module} refuses: {line}")
            continue
        if extra:
            bad.append(f"python -m {module}: {extra} left over in: {line}")
        for path in (a for a in args if a.startswith("launch/")):
            if not (ROOT / path).is_file():
                bad.append(f"{path} does not exist: {line}")
    return bad


def test_every_readme_command_parses(monkeypatch):
    bad = problems(fenced_lines(README.read_text()), monkeypatch)
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("line, expected", [
    ("accelerate launch --num_processes 2 -m pretrain --config x.yaml", ("pretrain", ["--config", "x.yaml"])),
    ("python -m models.export --checkpoint c [--format monai]", ("models.export", ["--checkpoint", "c", "--format", "monai"])),
    ("sbatch --nodes=2 launch/slurm_pretrain.sh --data d", ("pretrain", ["--data", "d"])),
    ("make demo", None),
])
def test_command_of(line, expected):
    assert command_of(line) == expected


def test_a_wrong_command_is_caught(monkeypatch, capsys):
    """The check can fail: a misspelt flag, a value its parser refuses, a missing preset each give a line;
    both spellings of data.synth's counts pass."""
    lines = ["python -m finetune --encoder-lr 1e-3", "python -m data.synth --out o --n_labeled three",
             "accelerate launch -m pretrain --config launch/pretrain_huge.yaml",
             "python -m data.synth --out o --n_labeled 3 --n-external 2"]
    bad = problems(lines, monkeypatch)
    assert len(bad) == 4, bad
    assert "unknown flag --encoder-lr" in bad[0] and "['--encoder-lr', '1e-3'] left over" in bad[1]
    assert bad[2].startswith("python -m data.synth refuses") and "pretrain_huge.yaml does not exist" in bad[3]
