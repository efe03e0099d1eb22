"""Review findings (issues 32, 35): a one-line error raised inside a DataLoader worker still reaches the user as
one line, and the "first line of an error" that the readers quote is one function (core.errors.first_line)."""
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from core.errors import InputError, NiftiError, cli_entry, first_line

DAMAGED = "cache entry c/ab12/image.npy: damaged cache array (truncated); delete the entry to rebuild it"


class DamagedItem(Dataset):
    """One item whose read raises the one-line error data/views.py gives for a damaged cache array."""

    def __len__(self):
        return 1

    def __getitem__(self, i):
        raise NiftiError(DAMAGED)


@cli_entry
def _main(num_workers: int) -> int:
    for _ in DataLoader(DamagedItem(), batch_size=1, num_workers=num_workers):
        pass
    return 0


@pytest.mark.parametrize("num_workers", [0, 1])
def test_an_input_error_raised_in_a_loader_worker_prints_its_one_line_and_exits_2(num_workers, capsys):
    with pytest.raises(SystemExit) as e:
        _main(num_workers)
    assert e.value.code == 2
    assert capsys.readouterr().err == f"error: {DAMAGED}\n"  # torch's "Caught NiftiError in DataLoader worker..." gone


def test_an_error_that_only_looks_like_the_wrapper_is_printed_as_it_is(capsys):
    said = "manifest m.csv: subject Caught X in DataLoader worker process 0. is not a subject id"

    @cli_entry
    def main():
        raise InputError(said)
    with pytest.raises(SystemExit):
        main()
    assert capsys.readouterr().err == f"error: {said}\n"


@pytest.mark.parametrize("error, line", [
    (OSError("disk full\nmore detail"), "disk full"),
    (ValueError("\n  padded line  \nnext"), "padded line"),
    (EOFError(), "EOFError"),  # no message: its type says what happened
    (RuntimeError("   "), "RuntimeError"),
])
def test_first_line_is_the_first_non_blank_line_or_the_type(error, line):
    assert first_line(error) == line


def test_first_line_typed_names_the_type_before_the_line():
    assert first_line(OSError("disk full\nx"), typed=True) == "OSError: disk full"
    assert first_line(EOFError(), typed=True) == "EOFError"


def test_a_library_error_without_a_message_is_named_by_its_type_not_an_index_error():
    """sksurv's ValueError becomes an undefined metric with its first line as the reason; an empty message
    (which str(e).splitlines()[0] turned into an IndexError) gives the error's type instead."""
    from finetune.metrics import UndefinedMetric, _sksurv

    def empty():
        raise ValueError("")

    def said():
        raise ValueError("\n  all samples are censored\nmore detail")

    with pytest.raises(UndefinedMetric, match="^ValueError$"):
        _sksurv(empty)
    with pytest.raises(UndefinedMetric, match="^all samples are censored$"):
        _sksurv(said)
