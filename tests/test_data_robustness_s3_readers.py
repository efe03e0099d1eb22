"""Issue 32's damaged-cache fault test, for the readers training uses: a cache array truncated after preparing is
one line naming the file (data.cache.load_array) when a pretraining view, a fine-tuning crop, a pad value or a
lesion candidate reads it, never numpy's traceback mid-epoch."""
import json

import numpy as np
import pandas as pd
import pytest

from core.errors import InputError
from data.cache import write_entry
from data.candidates import CandidateConfig, cached_candidates
from data.datasets import LesionCrops, pad_values_of
from data.views import PretrainCrops

SHAPE = (12, 10, 8)


@pytest.fixture()
def entry(tmp_path):
    """One cache entry as data.prepare writes it: image [1, 12, 10, 8] float32, mask [1, 12, 10, 8] uint8."""
    image = np.random.default_rng(0).normal(size=(1, *SHAPE)).astype(np.float32)
    mask = np.zeros((1, *SHAPE), np.float32)
    mask[0, 5:8, 4:7, 3:6] = 1
    return write_entry(tmp_path / "cache", "ab" * 32, image, mask, {"shape": list(SHAPE), "pad_value": -1.0})


def _truncate(path, keep: float = 0.7) -> None:
    blob = path.read_bytes()
    path.write_bytes(blob[: int(len(blob) * keep)])


def _one_line_naming(info, path) -> None:
    text = str(info.value)
    assert text.startswith(f"{path}: damaged cache array") and "data.prepare" in text and "\n" not in text, text


@pytest.mark.parametrize("damaged", ["image", "mask"])
def test_a_lesion_crop_of_a_truncated_cache_array_is_one_line_naming_it(entry, damaged):
    df = pd.DataFrame({"subject_id": ["s1"], "cache_image": [str(entry.image_path)],
                       "cache_mask": [str(entry.mask_path)]})
    ds = LesionCrops(df, crop_size=8, margin_vox=1, augment=False, seed=0)
    assert ds[0]["x"].shape == (2, 8, 8, 8)  # whole, it reads
    path = entry.image_path if damaged == "image" else entry.mask_path
    _truncate(path)
    with pytest.raises(InputError) as info:
        ds[0]
    _one_line_naming(info, path)


def test_a_pretraining_view_of_a_truncated_cache_array_is_one_line_naming_it(entry):
    ds = PretrainCrops([entry], crop_size=6, crops_per_volume=2, seed=0)
    assert ds[0]["crops"].shape == (2, 1, 6, 6, 6)
    _truncate(entry.image_path)
    with pytest.raises(InputError) as info:
        ds[0]
    _one_line_naming(info, entry.image_path)


def test_pad_values_and_candidates_of_a_truncated_cache_array_are_one_line_naming_it(entry):
    # Without a pad value in meta.json the channel minimum is read from the array; candidates read it too.
    (entry.dir / "meta.json").write_text(json.dumps({**entry.meta, "pad_value": None}))
    _truncate(entry.image_path)
    with pytest.raises(InputError) as info:
        pad_values_of(entry.image_path)
    _one_line_naming(info, entry.image_path)
    with pytest.raises(InputError) as info:
        cached_candidates(entry.image_path, 2.0, CandidateConfig())
    _one_line_naming(info, entry.image_path)
