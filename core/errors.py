"""Errors for bad input, and the CLI wrapper that turns them into one line and exit code 2.

Every check in mimfm raises a subclass of `InputError` (itself a `ValueError`) whose
message names the file, subject or column at fault and what was expected.
"""
from __future__ import annotations

import contextlib
import functools
import re
import sys
from pathlib import Path
from typing import Callable, Iterator


class InputError(ValueError):
    """Bad user input: the message names the file, subject or column and what was wrong."""


class NiftiError(InputError):
    """A NIfTI file is unreadable or fails a check (shape, finiteness, grid, mask)."""


class ManifestError(InputError):
    """A manifest, folder scan or datalist is malformed (columns, rows, files)."""


class ClinicalError(InputError):
    """Clinical tabular data does not match what the model expects."""


class ConfigError(InputError):
    """A run configuration (YAML or flags) is invalid."""


class RunStopped(RuntimeError):
    """A run stopped on purpose mid-way (e.g. too many non-finite losses); the message says why and what to do."""


def first_line(e: BaseException, *, typed: bool = False) -> str:
    """The first non-blank line of `e`'s message (stripped), or its type's name when it says nothing; `typed`
    puts the type's name in front ("OSError: disk full"), for errors that are not mimfm's own."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    return f"{type(e).__name__}: {lines[0]}" if typed else lines[0]


_WORKING_ON = "mimfm_working_on"  # the attribute working_on sets on an exception


@contextlib.contextmanager
def working_on(what: str) -> Iterator[None]:
    """Tag an exception that is not bad input, raised inside, with `what` was being worked on (e.g. "mask
    m.nii.gz"), unless a block inside tagged it first: the line that reports a failed subject then names the
    file that failed (failed_on), where the error itself (an OSError, a bug) may not."""
    try:
        yield
    except InputError:
        raise
    except Exception as e:
        if not hasattr(e, _WORKING_ON):
            setattr(e, _WORKING_ON, what)
        raise


def failed_on(e: BaseException, default: str) -> str:
    """What `e` was raised while working on (the innermost working_on block), else `default`."""
    return getattr(e, _WORKING_ON, default)


def restated(where: str, path, e: InputError) -> str:
    """`e`'s line behind `where` (e.g. "subject s1 brain_mask P": whose file, which column), without `e`'s
    own naming of the same file ("brain_mask P: ", "P: "), so that the file is named once."""
    text = str(e)
    if text.startswith(where):
        return text
    head, said, rest = text.partition(f"{Path(path)}: ")  # data.nifti names files as Path prints them
    return f"{where}: {rest if said and len(head.split()) <= 1 else text}"


# torch.utils.data re-raises a worker's exception as the same type with this message (torch/_utils.py
# ExceptionWrapper.reraise): "Caught <Type> in DataLoader worker process N.\nOriginal Traceback ...", whose
# last line is the original "module.Type: message".
_WORKER_WRAPPER = re.compile(r"Caught (\w+) in DataLoader worker process \d+\.\nOriginal Traceback")


def _said(e: BaseException) -> str:
    """What the CLI prints of `e`: its message, or, for an error torch re-raised from a loader worker, the
    original message alone (the traceback a worker's wrapper carries is not for the user)."""
    text = str(e)
    wrapped = _WORKER_WRAPPER.match(text)
    if wrapped is None:
        return text
    last = re.findall(rf"^(?:[\w.]+\.)?{wrapped.group(1)}: (.*)$", text, flags=re.MULTILINE)
    return last[-1].strip() if last else text


def cli_entry(main: Callable[..., int | None]) -> Callable[..., int | None]:
    """Wrap a CLI `main` so bad input prints one line (no traceback) and exits with code 2,
    and a deliberately stopped run prints one line and exits with code 1; either raised in a DataLoader
    worker prints the worker's own line."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except InputError as e:
            print(f"error: {_said(e)}", file=sys.stderr)
            raise SystemExit(2) from None
        except RunStopped as e:
            print(f"error: {_said(e)}", file=sys.stderr)
            raise SystemExit(1) from None

    return wrapper
