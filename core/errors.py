"""Errors for bad input, and the CLI wrapper that turns them into one line and exit code 2.

Every check in mimfm raises a subclass of `InputError` (itself a `ValueError`) whose
message names the file, subject or column at fault and what was expected.
"""
from __future__ import annotations

import functools
import sys
from typing import Callable


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


def cli_entry(main: Callable[..., int | None]) -> Callable[..., int | None]:
    """Wrap a CLI `main` so bad input prints one line (no traceback) and exits with code 2,
    and a deliberately stopped run prints one line and exits with code 1."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except InputError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        except RunStopped as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(1) from None

    return wrapper
