"""`data.prepare --shard I/N`: the last shard writes the index from every shard's part, and only from parts that
belong to this table, this shard count and the source files as they are now; a part left by an earlier run
(whose files have changed since) or one that does not cover its shard's rows is not assembled."""
import json

import numpy as np
import pandas as pd

from data.nifti import save_volume
from data.prep_config import PrepConfig
from data.shard import Shard, prepare_command

CFG = PrepConfig()


def _save(path, seed: int) -> None:
    """A tiny head [10, 8, 6] at 2 mm whose bytes depend on `seed`."""
    g = np.stack(np.meshgrid(*[np.arange(s) for s in (10, 8, 6)], indexing="ij"), -1)  # [X, Y, Z, 3]
    inside = (((g - np.array([4.5, 3.5, 2.5])) / np.array([3.5, 2.5, 1.8])) ** 2).sum(-1) <= 1
    noise = np.random.default_rng(seed).normal(0, 5, inside.shape)
    save_volume(path, np.where(inside, 100 + noise, 0).astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))


def _cohort(folder) -> pd.DataFrame:
    for i in range(2):
        _save(folder / f"v{i:02d}.nii.gz", i)
    return pd.DataFrame([{"subject_id": f"v{i:02d}", "image": str(folder / f"v{i:02d}.nii.gz")} for i in range(2)])


def _shard(df, cache, index: int) -> str:
    return prepare_command(df, CFG, cache, "m", shard=Shard(index, 2, show=False), workers=0, skip_bad=False,
                           require_lesion=False)


def _source_of(index_csv, subject: str) -> str:
    """The source the cache entry of `subject` was prepared from, by its content: the entry's key directory."""
    table = pd.read_csv(index_csv)
    return str(table.set_index("subject_id").loc[subject, "cache_image"])


def test_a_part_left_by_an_earlier_run_whose_files_changed_is_not_assembled(tmp_path):
    df, cache = _cohort(tmp_path), tmp_path / "cache"
    _shard(df, cache, 0)
    _shard(df, cache, 1)
    old = _source_of(cache / "index-m.csv", "v01")
    # v01 (shard 1's row) is replaced by another scan under the same name; the table is unchanged, so the
    # new run's parts go to the same folder, where the earlier run's 1-of-2 still lies.
    (cache / "index-m.csv").unlink()
    _save(tmp_path / "v01.nii.gz", 7)
    line = _shard(df, cache, 0)
    assert not (cache / "index-m.csv").exists(), "index assembled from the earlier run's part for shard 1/2"
    assert "shard 1/2" in line and "v01.nii.gz" in line, line  # says which shard to run again, and why
    _shard(df, cache, 1)  # shard 1/2 runs again: now the index is whole and current
    new = _source_of(cache / "index-m.csv", "v01")
    assert new != old and _source_of(cache / "index-m.csv", "v00") != new


def test_a_part_that_misses_rows_of_its_shard_or_names_another_is_not_assembled(tmp_path):
    df, cache = _cohort(tmp_path), tmp_path / "cache"
    _shard(df, cache, 1)
    (part,) = (cache / "parts").rglob("1-of-2.json")
    whole = json.loads(part.read_text())
    for broken in ({**whole, "paths": {}}, {**whole, "shard": "1/3"}, {k: v for k, v in whole.items() if k != "paths"}):
        part.write_text(json.dumps(broken))
        line = _shard(df, cache, 0)
        assert not (cache / "index-m.csv").exists(), broken  # v01 silently missing, or a KeyError, before
        assert "shard 1/2" in line, line
    part.write_text(json.dumps(whole))
    _shard(df, cache, 0)
    assert list(pd.read_csv(cache / "index-m.csv")["subject_id"]) == ["v00", "v01"]
