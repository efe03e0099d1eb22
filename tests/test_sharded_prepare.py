"""Preparing at scale (issue 36): every rank or `--shard I/N` job prepares its share of the table, writers
meeting on one entry leave one whole entry, a killed preparation leaves no half entry, and a stage's YAML
prepares the cache its run then finds (issue 34)."""
import os

import numpy as np
import pandas as pd
import pytest

import data.cache as cache_mod
from core.errors import ConfigError
from data.nifti import save_volume

N_VOLUMES = 8


def _volume(seed: int, shape=(14, 12, 10)) -> np.ndarray:
    """A small MRI-like head: an ellipsoid of tissue with noise; the seed makes each file's bytes its own."""
    rng = np.random.default_rng(seed)
    g = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)  # [X, Y, Z, 3]
    centre, radii = np.array(shape) / 2 - 0.5, np.array(shape) / 2 - 1.5
    inside = (((g - centre) / radii) ** 2).sum(-1) <= 1
    return np.where(inside, 100 + rng.normal(0, 5, shape), 0).astype(np.float32)


def _cohort(folder, n=N_VOLUMES) -> pd.DataFrame:
    """n tiny unlabelled volumes at 2 mm and the manifest of them (folder/manifest.csv)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        path = folder / f"v{i:02d}.nii.gz"
        save_volume(path, _volume(i), np.diag([2.0, 2.0, 2.0, 1.0]))
        rows.append({"subject_id": f"v{i:02d}", "image": str(path)})
    df = pd.DataFrame(rows)
    df.to_csv(folder / "manifest.csv", index=False)
    return df


def _entries(cache) -> set[str]:
    """Keys of the complete, readable entries in a cache."""
    keys = {p.parent.name for p in cache.rglob("meta.json") if not p.parent.name.startswith(".")}
    return {k for k in keys if cache_mod.lookup(cache, k) is not None}


# ---- the cache under concurrent writers --------------------------------------------------------

def test_a_writer_that_loses_the_race_keeps_the_winners_whole_entry(tmp_path, monkeypatch):
    """Two writers of one entry (two ranks, two --shard jobs): the second one's move into place finds the
    first one's entry already there. It ends with one valid entry and no error."""
    image = np.ones((1, 3, 3, 3), np.float32)
    final = cache_mod.entry_dir(tmp_path, "ab" * 32)
    real_replace = os.replace
    raced = []

    def replace(src, dst):
        # the other writer finishes the same entry between this writer's check and its move
        if str(dst) == str(final) and not raced:
            raced.append(True)
            cache_mod.write_entry(tmp_path, "ab" * 32, image, None, {"shape": [3, 3, 3], "by": "other"})
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    cache_mod.write_entry(tmp_path, "ab" * 32, image, None, {"shape": [3, 3, 3], "by": "this"})
    assert raced
    assert _entries(tmp_path) == {"ab" * 32}
    assert not [p for p in final.parent.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_hash_memos_of_two_shards_are_both_kept(tmp_path):
    """Two shards save their digests side by side; neither replaces the other's, and a later index
    (any shard, or none) finds both without hashing again."""
    files = []
    for name in ("a", "b"):
        f = tmp_path / f"{name}.bin"
        f.write_bytes(name.encode() * 100)
        os.utime(f, ns=(10 ** 18, 10 ** 18))  # an old file: its digest is memoised
        files.append(f)
    cache = tmp_path / "cache"
    for part, f in zip(("0of2", "1of2"), files):
        index = cache_mod.HashIndex(cache, part=part)
        index.digest(f)
        index.save()
    later = cache_mod.HashIndex(cache)
    later_hash = cache_mod.file_digest
    calls = []
    cache_mod.file_digest = lambda p: calls.append(p) or later_hash(p)
    try:
        assert [later.digest(f) for f in files] == [later_hash(f) for f in files]
    finally:
        cache_mod.file_digest = later_hash
    assert calls == []
