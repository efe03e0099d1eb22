"""Issue 36: a rank whose preparation crashes (not bad input: a full disk, a bug) still meets the other ranks in
the gather, and then every rank stops with one line naming that rank and the subject and file it was preparing,
instead of the others waiting out the process group's timeout."""
import threading

import numpy as np
import pandas as pd
import pytest

import data.prepare as prep
from core.errors import RunStopped
from data.nifti import save_volume
from data.prep_config import PrepConfig
from data.shard import Shard, prepare_shared

WAIT_S = 60  # the test's stand-in for the process group's timeout


def _cohort(folder, n: int) -> pd.DataFrame:
    """n tiny heads [10, 8, 6] at 2 mm, each file its own bytes."""
    g = np.stack(np.meshgrid(*[np.arange(s) for s in (10, 8, 6)], indexing="ij"), -1)  # [X, Y, Z, 3]
    inside = (((g - np.array([4.5, 3.5, 2.5])) / np.array([3.5, 2.5, 1.8])) ** 2).sum(-1) <= 1
    rows = []
    for i in range(n):
        path = folder / f"v{i:02d}.nii.gz"
        noise = np.random.default_rng(i).normal(0, 5, inside.shape)
        save_volume(path, np.where(inside, 100 + noise, 0).astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
        rows.append({"subject_id": f"v{i:02d}", "image": str(path)})
    return pd.DataFrame(rows)


def _two_ranks(fn) -> list:
    """fn(shard, gather) on two threads standing for two ranks; a rank that never reaches the gather leaves the
    other one stuck there until WAIT_S (threading.BrokenBarrierError, as NCCL's timeout would stop it)."""
    shares, results, meet = [None, None], [None, None], threading.Barrier(2, timeout=WAIT_S)

    def gather(payload, rank):
        shares[rank] = payload
        meet.wait()
        return shares[0] + shares[1]

    def rank(r):
        try:
            results[r] = fn(Shard(r, 2, show=False), lambda payload: gather(payload, r))
        except Exception as e:  # noqa: BLE001 - handed to the test
            results[r] = e
            if not isinstance(e, threading.BrokenBarrierError) and shares[r] is None:
                meet.abort()  # this rank left before the gather: the other one's wait breaks (test time only)
    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(2 * WAIT_S)
    return results


def test_a_rank_that_crashes_while_preparing_meets_the_gather_and_every_rank_stops_naming_it(tmp_path, monkeypatch):
    df = _cohort(tmp_path, 2)  # row 0: rank 0's share, row 1: rank 1's
    real = prep.build_entry

    def full_disk_on_v01(row, *args, **kwargs):
        if row["subject_id"] == "v01":
            raise OSError(28, "No space left on device")
        return real(row, *args, **kwargs)

    monkeypatch.setattr(prep, "build_entry", full_disk_on_v01)
    results = _two_ranks(lambda shard, gather: prepare_shared(df, PrepConfig(), tmp_path / "cache", shard=shard,
                                                              gather=gather, workers=1))
    for r in results:
        assert isinstance(r, RunStopped), results  # not BrokenBarrierError: rank 0 did not wait for rank 1 in vain
        text = str(r)
        assert "\n" not in text and "rank 1/2" in text and "subject v01" in text, text
        assert str(tmp_path / "v01.nii.gz") in text and "No space left on device" in text, text
    assert results[0].args == results[1].args  # one line, the same on every rank
