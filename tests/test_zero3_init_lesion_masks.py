"""Issue 36's small extra: pretraining's lesion centres read each cached mask through data.cache.load_array, so a
mask truncated after preparing is one line naming the file, never numpy's mmap traceback at start-up."""
import numpy as np
import pandas as pd
import pytest

from core.errors import InputError
from data.cache import write_entry
from pretrain.config import PretrainConfig
from pretrain.train import lesion_centres

SHAPE = (12, 10, 8)


def test_lesion_centres_of_a_truncated_cached_mask_is_one_line_naming_it(tmp_path):
    image = np.zeros((1, *SHAPE), np.float32)
    mask = np.zeros((1, *SHAPE), np.float32)
    mask[0, 5:8, 4:7, 3:6] = 1  # one 3^3 lesion, centre (6, 5, 4)
    entry = write_entry(tmp_path / "cache", "cd" * 32, image, mask, {"shape": list(SHAPE), "pad_value": 0.0})
    prepared = pd.DataFrame({"cache_image": [str(entry.image_path)], "cache_mask": [str(entry.mask_path)]})
    centres = lesion_centres(prepared, PretrainConfig(), use_masks=True, show_progress=False)
    np.testing.assert_allclose(np.asarray(centres[0], float).reshape(-1, 3), [[6, 5, 4]])  # whole, it reads
    blob = entry.mask_path.read_bytes()
    entry.mask_path.write_bytes(blob[: int(len(blob) * 0.7)])
    with pytest.raises(InputError) as info:
        lesion_centres(prepared, PretrainConfig(), use_masks=True, show_progress=False)
    text = str(info.value)
    assert text.startswith(f"{entry.mask_path}: damaged cache array") and "\n" not in text, text
