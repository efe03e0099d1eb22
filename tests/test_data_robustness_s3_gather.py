"""Issue 36: a rank whose preparation crashes (not bad input: a full disk, a bug) still meets the other ranks in
the gather, and then every rank stops with one line naming that rank and the subject and file it was preparing,
instead of the others waiting out the process group's timeout."""
import data.prepare as prep
from core.errors import RunStopped
from data.prep_config import PrepConfig
from data.shard import prepare_shared
# tiny heads at 2 mm; two threads standing for two ranks, meeting in a gather
from test_sharded_prepare import _as_two_ranks, _cohort

WAIT_S = 60  # the test's stand-in for the process group's timeout


def test_a_rank_that_crashes_while_preparing_meets_the_gather_and_every_rank_stops_naming_it(tmp_path, monkeypatch):
    df = _cohort(tmp_path, 2)  # row 0: rank 0's share, row 1: rank 1's
    real = prep.build_entry

    def full_disk_on_v01(row, *args, **kwargs):
        if row["subject_id"] == "v01":
            raise OSError(28, "No space left on device")
        return real(row, *args, **kwargs)

    monkeypatch.setattr(prep, "build_entry", full_disk_on_v01)
    results = _as_two_ranks(lambda shard, gather: prepare_shared(df, PrepConfig(), tmp_path / "cache", shard=shard,
                                                                 gather=gather, workers=1), wait_s=WAIT_S)
    for r in results:
        assert isinstance(r, RunStopped), results  # not BrokenBarrierError: rank 0 did not wait for rank 1 in vain
        text = str(r)
        assert "\n" not in text and "rank 1/2" in text and "subject v01" in text, text
        assert str(tmp_path / "v01.nii.gz") in text and "No space left on device" in text, text
    assert results[0].args == results[1].args  # one line, the same on every rank
