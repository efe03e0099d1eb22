"""A manifest's brain_mask column goes onto the image's prepared grid exactly as the lesion mask does (nearest
neighbour through the image's affine), and a brain mask on another grid is refused with one line naming the
subject, the column and the file."""
import numpy as np
import pandas as pd
import pytest

from core.errors import InputError
from data.cache import CacheEntry
from data.nifti import save_volume
from data.prep_config import PetConfig, PrepConfig
from data.prepare import prepare_table

SHAPE = (40, 40, 40)
AFFINE = np.diag([1.0, 1.0, 1.0, 1.0])  # the T1 and PET grid, 1 mm
BRAIN = (slice(8, 32),) * 3  # the drawn brain mask, 1 mm voxels
BRAIN_2MM = (slice(4, 16),) * 3  # the same voxels at 2 mm (see the first test)
PREP = PrepConfig(images=("t1", "pet:pet"), spacing=(2.0, 2.0, 2.0), crop_foreground=False,
                  pet=PetConfig(units="suv"))


def _row(folder, brain_affine) -> dict:
    """T1: a bright ball with a ramp; PET: SUV 1 inside BRAIN, 0.5 in the rest of the head, 0.02 outside."""
    g = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij"), -1)  # [X, Y, Z, 3]
    head = np.linalg.norm(g - 19.5, axis=-1) <= 19  # [X, Y, Z] bool
    t1 = np.where(head, 100.0 + g[..., 0], 0.0).astype(np.float32)
    suv = np.where(head, 0.5, 0.02).astype(np.float32)
    suv[BRAIN] = 1.0
    brain = np.zeros(SHAPE, np.uint8)
    brain[BRAIN] = 1
    save_volume(folder / "s1_t1.nii.gz", t1, AFFINE)
    save_volume(folder / "s1_pet.nii.gz", suv, AFFINE)
    save_volume(folder / "s1_brain.nii.gz", brain, brain_affine, dtype=np.uint8)
    return {"subject_id": "s1", "t1": str(folder / "s1_t1.nii.gz"), "pet": str(folder / "s1_pet.nii.gz"),
            "brain_mask": str(folder / "s1_brain.nii.gz")}


def test_a_brain_mask_within_the_grid_tolerance_lands_on_the_images_prepared_voxels(tmp_path):
    # 1.0009 mm voxels: within check_same_grid's 1e-3 of the image's 1 mm, so the file is accepted as on the
    # image's grid; resampled on its own affine to 2 mm it came out 21^3 against the image's 20^3.
    brain_affine = np.diag([1.0009, 1.0009, 1.0009, 1.0])
    out, _ = prepare_table(pd.DataFrame([_row(tmp_path, brain_affine)]), PREP, tmp_path / "cache",
                           require_lesion=False, progress=False)
    entry = CacheEntry.from_path(out["cache_image"][0])
    pet = entry.meta["channels"][1]
    # By hand: 2 mm voxel j sits on 1 mm voxel 2j (MONAI keeps the first voxel's world point), so BRAIN [8, 32)
    # becomes [4, 16) on each axis: 12^3 voxels, all of SUV 1 (no lesion to leave out).
    assert pet["reference_voxels"] == 12 ** 3
    assert pet["reference_suv"] == pytest.approx(1.0, abs=1e-6)
    x = np.asarray(entry.image())  # [2, 20, 20, 20]
    assert x.shape == (2, 20, 20, 20)
    np.testing.assert_allclose(x[1][BRAIN_2MM], 1.0, atol=1e-5)  # TBR = SUV: the brain's uptake is 1


SHIFTED = np.diag([1.0, 1.0, 1.0, 1.0])
SHIFTED[:3, 3] = [2.0, 0.0, 0.0]  # the image's shape and voxel size, its origin 2 mm off the image's


@pytest.mark.parametrize("brain_affine", [SHIFTED, np.diag([2.0, 2.0, 2.0, 1.0])], ids=["shifted 2 mm", "2 mm voxels"])
def test_a_brain_mask_on_another_grid_is_one_line_naming_subject_column_and_file(tmp_path, brain_affine):
    row = _row(tmp_path, brain_affine)
    with pytest.raises(InputError) as info:
        prepare_table(pd.DataFrame([row]), PREP, tmp_path / "cache", require_lesion=False, progress=False)
    text = str(info.value)
    assert "\n" not in text and text.startswith(f"subject s1 brain_mask {row['brain_mask']}: "), text
    assert "affine differs" in text, text
