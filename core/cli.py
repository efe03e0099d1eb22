"""The command line that fills a config: one flag per (dotted) field, `--config FILE` beneath them.

Nested dataclasses are addressed with dotted flags, e.g. `--model.depth 4`. Flags always win over the
`--config` file, which wins over the dataclass defaults. `--help` shows every field's comment as its help.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import io
import sys
import textwrap
import tokenize
import types
import typing
from typing import Any, Sequence, TypeVar

from core.config import coerce, from_dict, load_file
from core.errors import ConfigError

T = TypeVar("T")


def _set_dotted(d: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
        if not isinstance(d, dict):
            raise ConfigError(f"--{dotted}: {k} is not a section")
    d[keys[-1]] = value


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


# ---- the command line ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Flag:
    """One leaf field of a (nested) config, as a command-line flag."""
    name: str  # dotted, e.g. "model.encoder.depth"
    tp: Any  # resolved type hint
    field: dataclasses.Field
    owner: type  # the dataclass whose body declares the field (its source holds the comment)
    default: Any


def _field_default(f: dataclasses.Field, parent) -> Any:
    # The parent instance's value wins: a default_factory may override nested defaults (lr=3e-4).
    if parent is not None:
        return getattr(parent, f.name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _declaring_class(cls: type, name: str) -> type:
    for klass in cls.__mro__:
        if name in klass.__dict__.get("__annotations__", {}):
            return klass
    return cls


def _flags(cls: type, prefix: str = "", instance=None) -> list[_Flag]:
    hints = typing.get_type_hints(cls)
    out: list[_Flag] = []
    for f in dataclasses.fields(cls):
        value = _field_default(f, instance)
        if dataclasses.is_dataclass(hints[f.name]):
            nested = value if dataclasses.is_dataclass(value) else None
            out += _flags(hints[f.name], f"{prefix}{f.name}.", nested)
        else:
            out.append(_Flag(prefix + f.name, hints[f.name], f, _declaring_class(cls, f.name), value))
    return out


def _comments_by_line(source: str) -> dict[int, tuple[str, bool]]:
    """line number -> (comment text, whether the comment is the whole line)."""
    out = {}
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                whole = not tok.line[:tok.start[1]].strip()
                out[tok.start[0]] = (tok.string.lstrip("#").strip(), whole)
    except (tokenize.TokenError, SyntaxError):
        pass
    return out


@functools.lru_cache(maxsize=None)
def _source_help(cls: type) -> dict[str, str]:
    """Field name -> its comment in the class body: the trailing one, else the block just above.

    The fallback for fields without `metadata={"help": ...}`, so `--help` says what the code's
    comments say and cannot drift from them. Classes without source (built at run time) give {}.
    """
    try:
        source = textwrap.dedent(inspect.getsource(cls))
        body = ast.parse(source).body[0].body
    except (OSError, TypeError, SyntaxError, IndexError, AttributeError):
        return {}
    comments = _comments_by_line(source)
    out = {}
    for stmt in body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        trailing = [text for line, (text, whole) in sorted(comments.items())
                    if stmt.lineno <= line <= stmt.end_lineno and not whole]
        above, line = [], stmt.lineno - 1
        while line in comments and comments[line][1]:
            above.insert(0, comments[line][0])
            line -= 1
        if trailing or above:
            out[stmt.target.id] = " ".join(trailing or above)
    return out


def _unwrap_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _choices(flag: _Flag) -> tuple | None:
    tp = _unwrap_optional(flag.tp)
    if typing.get_origin(tp) is typing.Literal:
        return typing.get_args(tp)
    choices = flag.field.metadata.get("choices")
    return tuple(choices) if choices else None


_TYPE_NAMES = {int: "INT", float: "FLOAT", str: "TEXT", bool: "{true,false}"}


def _metavar(flag: _Flag) -> tuple[str, str | None]:
    """(metavar as shown in --help, argparse nargs) for a flag's type."""
    choices = _choices(flag)
    if choices:
        return "{" + ",".join(str(c) for c in choices) + "}", None
    tp = _unwrap_optional(flag.tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):  # e.g. float | Literal["auto"] -> FLOAT|auto
        parts = [",".join(map(str, typing.get_args(a))) if typing.get_origin(a) is typing.Literal
                 else _TYPE_NAMES.get(a, "VALUE") for a in args if a is not type(None)]
        return "|".join(parts), "?" if bool in args else None  # bool | Literal["auto"]: a bare `--flag` is true
    if tp is bool:
        return _TYPE_NAMES[bool], "?"  # a bare `--flag` means true
    if origin in (tuple, list):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return " ".join(_TYPE_NAMES.get(a, "VALUE") for a in args), "+"  # exactly len(args) values
        one = _TYPE_NAMES.get(args[0] if args else str, "VALUE")
        return f"{one} [{one} ...]", "+"
    return _TYPE_NAMES.get(tp, "VALUE"), None


def _show(value) -> str:
    """A default as the user would type it on the command line."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return " ".join(_show(v) for v in value) if value else "(none)"
    if value == "":
        return '""'
    return str(value)


def _help(flag: _Flag) -> str:
    leaf = flag.name.rsplit(".", 1)[-1]
    text = flag.field.metadata.get("help") or _source_help(flag.owner).get(leaf) or leaf.replace("_", " ")
    # An empty default whose comment already says what "" means ("default: <output_dir>/../cache").
    said = flag.default == "" and "default" in text.lower()
    if flag.default is not dataclasses.MISSING and not said:
        text = f"{text} (default: {_show(flag.default)})"
    return text.replace("%", "%%")  # argparse %-formats help strings


class _MetavarHelp:
    """Formatter mixin: show a flag's metavar exactly as given (e.g. `FLOAT FLOAT FLOAT`) instead of
    argparse's `M [M ...]`, which hides how many values a fixed-length tuple takes."""

    def _format_args(self, action, default_metavar):
        shown = getattr(action, "shown_metavar", None)
        return shown if shown else super()._format_args(action, default_metavar)


def _prog_from_main() -> str | None:
    """`python -m finetune` when run as a module, so --help names the command the user typed."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = getattr(spec, "name", None)
    if not name:
        return None
    return "python -m " + name.removesuffix(".__main__")


def underscore_spellings(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Every command takes underscores (`--skip_bad`): a command's own hyphenated flag (`--skip-bad`) gains
    the underscore spelling, first in --help, and keeps the hyphenated one as an alias. parse_config applies
    it to the parser it is given; a CLI with a plain argparse parser calls it before parsing."""
    for action in list(parser._actions):
        for option in list(action.option_strings):
            alias = "--" + option[2:].replace("-", "_")
            if option.startswith("--") and alias not in parser._option_string_actions:
                action.option_strings.insert(0, alias)
                parser._option_string_actions[alias] = action
    return parser


def _prepare_parser(parser: argparse.ArgumentParser | None, description: str,
                    prog: str | None, epilog: str | None = None) -> argparse.ArgumentParser:
    prog = prog or _prog_from_main()
    if parser is None:
        parser = argparse.ArgumentParser(description=description, **({"prog": prog} if prog else {}))
        parser.usage = "%(prog)s [--config FILE] [--OPTION VALUE ...]"  # the full list is below
    elif prog and parser.prog == "__main__.py":
        parser.prog = prog
    underscore_spellings(parser)
    if epilog and not parser.epilog:
        parser.epilog = epilog
    # Without this `--epoch 2` silently sets --epochs; read at parse time, so it holds for a given parser.
    parser.allow_abbrev = False
    if not issubclass(parser.formatter_class, _MetavarHelp):
        parser.formatter_class = type("ConfigHelpFormatter", (_MetavarHelp, parser.formatter_class), {})
    return parser


class _GivenOnce(argparse.Action):
    """Stores a flag that has two spellings, refusing a command line that gives it under both."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"{' and '.join(self.option_strings)} name one setting; give it once")
        setattr(namespace, self.dest, values)


def _add_flags(parser: argparse.ArgumentParser, cls: type, flags: list[_Flag]) -> None:
    groups: dict[str, argparse._ArgumentGroup] = {}
    for flag in flags:
        section = flag.name.rpartition(".")[0]
        if section not in groups:
            title = f"{section} options ({flag.owner.__name__})" if section else f"{cls.__name__} options"
            groups[section] = parser.add_argument_group(title)
        shown, nargs = _metavar(flag)
        kwargs = {"nargs": nargs, "const": "true"} if nargs == "?" else {"nargs": nargs}
        # A nested field the user sets on every run may also be named by a short flag (field metadata
        # "flag"), e.g. --task for --model.task: declared once, where the code that needs it reads it.
        names = [f"--{flag.name}"] + ([f"--{flag.field.metadata['flag']}"] if "flag" in flag.field.metadata else [])
        if len(names) > 1:
            kwargs["action"] = _GivenOnce
        action = groups[section].add_argument(*names, dest=f"cfg__{flag.name}", default=None,
                                              help=_help(flag), metavar=shown, **kwargs)
        action.shown_metavar = shown


def _flag_overrides(ns: argparse.Namespace, flags: list[_Flag]) -> dict:
    """The flags given, each already checked against its type so a bad value is blamed on the flag."""
    over: dict = {}
    for flag in flags:
        v = getattr(ns, f"cfg__{flag.name}")
        delattr(ns, f"cfg__{flag.name}")
        if v is None:
            continue
        if isinstance(v, list) and len(v) == 1:
            v = v[0]  # one word: a single value or a comma list
        _set_dotted(over, flag.name, coerce(flag.tp, v, f"--{flag.name}"))
    return over


def _build(cls: type[T], file_dict: dict, over: dict, source: str | None) -> T:
    """The config from file + flags; a failure is blamed on the file only if the file alone fails too."""
    try:
        return from_dict(cls, _merge(file_dict, over), where=source or "flags")
    except ConfigError:
        if not (source and over):
            raise
        from_dict(cls, file_dict, where=source)  # raises: the file is at fault, with its own message
    return from_dict(cls, _merge(file_dict, over), where="flags")  # raises: the flags broke it


def _section(file_dict: dict, section: str | None, source: str) -> tuple[dict, str]:
    """(the `section:` mapping of a stage's file, where it came from): data.prepare reads a stage YAML's
    prep:. A file without that key is the config's own file, whole."""
    if section is None or section not in file_dict:
        return file_dict, source
    if not isinstance(file_dict[section], dict):
        raise ConfigError(f"{source}: {section}: expected a mapping, got {type(file_dict[section]).__name__}")
    return file_dict[section], f"{source}: {section}"


def parse_config(cls: type[T], argv: Sequence[str] | None = None, description: str = "",
                 parser: argparse.ArgumentParser | None = None, prog: str | None = None,
                 section: str | None = None) -> tuple[T, argparse.Namespace]:
    """Parse `--config FILE` plus one flag per (dotted) field of `cls`.

    Multi-value fields take several words (`--spacing 1 1 1`) or a comma list. `--help` lists every
    flag with its description (field metadata "help", else the field's comment), default and choices.
    `prog` names the command in --help (default: `python -m <module>` of the running module); the
    config class's `HELP` text, if any, is shown beneath the flags. Flags of `parser` spelt with hyphens
    are accepted with underscores too. With `section`, a `--config` file that has that top-level key gives
    only that mapping (e.g. the `prep:` of a stage's YAML).
    Returns the config and the namespace of any extra arguments `parser` defines.
    """
    parser = _prepare_parser(parser, description, prog, getattr(cls, "HELP", None))
    parser.add_argument("--config", metavar="FILE",
                        help="YAML or JSON file with the run configuration; flags override it")
    # Each field's declared default, as the user would type it (`auto`, not what __post_init__ resolves
    # it to); a nested section shows its default_factory's values.
    flags = _flags(cls)
    _add_flags(parser, cls, flags)
    ns = parser.parse_args(argv)
    over = _flag_overrides(ns, flags)
    file_dict, source = _section(load_file(ns.config), section, str(ns.config)) if ns.config else ({}, None)
    return _build(cls, file_dict, over, source), ns
