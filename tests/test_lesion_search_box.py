"""The whole-head search slides its windows over the search region's bounding box (grown by BOX_MARGIN_MM), not
the whole head crop, and gives the mask channel zeros as each window is read (finetune/lesion/search.py); a
segmentation model trains at the voxel the search runs it at (native scale included)."""
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from data.prep_config import PrepConfig
from finetune.lesion import search
from models.input_spec import InputSpec, ViewSpec

PREP = PrepConfig(spacing=(2.0, 2.0, 2.0))
NATIVE = InputSpec(prep=PREP, input_size=8, channels=("image", "lesion_mask"), view=ViewSpec(crop_mm=0.0))
MAGNIFIED = InputSpec(prep=PREP, input_size=8, channels=("image", "lesion_mask"), view=ViewSpec(crop_mm=12.0))


class Pointwise:
    """Logits = the image channel, voxel by voxel; counts the windows it is called on."""
    def __init__(self):
        self.windows = 0

    def segment(self, x):
        self.windows += x.shape[0]
        return x[:, :1]  # [B, 1, s, s, s]


class MaskMean:
    """Logits = the window's mean of the mask channel (the last), everywhere: 0 only if the mask reads 0."""
    def segment(self, x):
        return x[:, -1:].mean(dim=(2, 3, 4), keepdim=True).expand(-1, 1, *x.shape[2:])


class SmallConv:
    """A fixed random 3x3x3 convolution of both channels: its windows overlap differently at each position,
    so the blend matters."""
    def __init__(self):
        torch.manual_seed(0)
        self.conv = torch.nn.Conv3d(2, 1, 3, padding=1)

    def segment(self, x):
        return self.conv(x)


def test_search_box_is_the_region_bounding_box_grown_by_the_margin():
    region = np.zeros((40, 30, 20), bool)
    region[10:15, 12:14, 3:18] = True
    margin = int(np.ceil(search.BOX_MARGIN_MM / 2.0))  # 5 voxels of 2 mm
    assert margin == 5
    box = search.search_box(region, (2.0, 2.0, 2.0), region.shape)
    # by hand: [10 - 5, 15 + 5), [12 - 5, 14 + 5), [3 - 5 -> 0, 18 + 5 -> 20)
    assert box == (slice(5, 20), slice(7, 19), slice(0, 20))
    whole = (slice(0, 40), slice(0, 30), slice(0, 20))
    assert search.search_box(np.zeros_like(region), (2.0, 2.0, 2.0), region.shape) == whole
    assert search.search_box(None, (2.0, 2.0, 2.0), region.shape) == whole


def test_probability_is_computed_in_the_box_alone_and_zero_outside():
    rng = np.random.default_rng(0)
    image = rng.standard_normal((1, 40, 30, 20)).astype(np.float32)
    region = np.zeros((40, 30, 20), bool)
    region[10:15, 12:14, 3:18] = True  # box [5, 20) x [7, 19) x [0, 20): 15 x 12 x 20 voxels
    model = Pointwise()
    prob = search.lesion_probability([model], image, NATIVE, 0.0, region=region)
    box = (slice(5, 20), slice(7, 19), slice(0, 20))
    np.testing.assert_allclose(prob[box], 1 / (1 + np.exp(-image[0][box])), atol=1e-6)
    outside = np.ones(prob.shape, bool)
    outside[box] = False
    assert (prob[outside] == 0).all()
    # MONAI's windows of 8 with overlap 0.25 (a step of 6, the last flush with the edge) over 15 x 12 x 20:
    # starts 0, 6, 7 | 0, 4 | 0, 6, 12 -> 3 x 2 x 3, not the whole grid's 40 x 30 x 20 -> 7 x 5 x 3
    assert model.windows == 3 * 2 * 3


def test_without_a_region_the_probability_is_the_previous_searchs():
    """region None: the same numbers as the search before the box (up-sampling, the mask channel of zeros
    over the whole volume, MONAI's sliding window, down-sampling), written out here as it was."""
    from monai.inferers import sliding_window_inference
    rng = np.random.default_rng(1)
    image = rng.standard_normal((1, 14, 11, 9)).astype(np.float32)
    model = SmallConv()
    got = search.lesion_probability([model, model], image, MAGNIFIED, -1.0)
    x = torch.from_numpy(image)[None]
    factor = 2.0 / (12.0 / 8)
    up = F.interpolate(x, size=[round(s * factor) for s in x.shape[2:]], mode="trilinear", align_corners=False)
    x2 = torch.cat([up, torch.zeros_like(up[:, :1])], dim=1)
    with torch.no_grad():
        p = sliding_window_inference(x2, (8, 8, 8), 8, lambda w: torch.sigmoid(model.segment(w)), overlap=0.25,
                                     mode="gaussian", padding_mode="constant", cval=-1.0)
    want = F.interpolate(p, size=list(image.shape[1:]), mode="trilinear", align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_the_mask_channel_reads_zero_where_a_window_passes_the_volume_edge():
    """A volume smaller than the window is padded with the image's background; the mask channel must still
    be 0 there (before: the background value too), so a head that reads the mask sees none."""
    image = np.full((1, 5, 6, 7), 2.0, np.float32)
    prob = search.lesion_probability([MaskMean()], image, NATIVE, pad_value=-3.0)
    np.testing.assert_allclose(prob, 0.5, atol=1e-6)  # sigmoid(0)


def test_search_lesion_slides_over_its_search_region(tmp_path, monkeypatch):
    """The deployed path computes the region first and hands it to the sliding window."""
    from data.prepare import prepare_table
    from test_auto_mask import SPEC, ThresholdSegmenter, brain_with_ball
    path, _ = brain_with_ball(tmp_path, "s1", (30.0, 26.0, 8.0))
    good, _ = prepare_table(pd.DataFrame({"subject_id": ["s1"], "image": [str(path)]}), SPEC.prep, tmp_path / "c",
                            require_lesion=False, on_error="collect", progress=False)
    seen, real = {}, search.lesion_probability

    def spy(models, image, spec, pad_value, **kw):
        seen.update(kw)
        return real(models, image, spec, pad_value, **kw)

    monkeypatch.setattr(search, "lesion_probability", spy)
    search.search_lesion([ThresholdSegmenter(1e9)], good.iloc[0], SPEC, tmp_path / "masks")
    from data.cache import CacheEntry
    region = search.search_region(CacheEntry.from_path(good["cache_image"].iloc[0]), good.iloc[0], SPEC.prep)
    assert np.array_equal(seen["region"], region.mask) and seen["overlap"] == search.OVERLAP


def test_segmentation_windows_train_at_the_voxel_the_search_slides_at(tmp_path):
    """issue 35: train at the voxel size inference uses. A segmentation training window (placement
    "segmentation", data.crops.segmentation_box) of the contract's view is cut at scale x the prepared voxel;
    the search runs the model at model_voxel_mm. Native scale (crop_mm 0): both are the prepared 2 mm voxel,
    and the search resamples nothing; crop_mm 12 over 8 voxels: both 1.5 mm."""
    from data.datasets import LesionCrops
    from data.nifti import save_volume
    from data.prepare import prepare_table
    from test_auto_mask import brain_with_ball
    from test_lesion_candidates import oblique_lps_affine
    path, mask = brain_with_ball(tmp_path, "s1", (30.0, 26.0, 8.0))
    save_volume(tmp_path / "s1_mask.nii.gz", mask.astype(np.uint8), oblique_lps_affine())
    df = pd.DataFrame({"subject_id": ["s1"], "image": [str(path)], "mask": [str(tmp_path / "s1_mask.nii.gz")]})
    good, _ = prepare_table(df, PREP, tmp_path / "c", require_lesion=True, on_error="collect", progress=False)
    image = np.load(good["cache_image"].iloc[0])
    for spec, voxel_mm in ((NATIVE, 2.0), (MAGNIFIED, 1.5)):
        view = spec.view_voxels()
        crops = LesionCrops(good, spec.input_size, view["margin_vox"], augment=False, seed=0,
                            min_side_vox=view["min_side_vox"], placement="segmentation")
        for epoch in range(3):  # windows on the lesion and anywhere in the head alike
            crops.set_epoch(epoch)
            assert float(crops[0]["scale"]) * spec.spacing_mm == pytest.approx(voxel_mm)
        assert search.model_voxel_mm(spec) == voxel_mm
    assert torch.equal(search.to_model_grid(image, NATIVE)[0], torch.from_numpy(image))


class WindowMin:
    """Logits 0; records the smallest image value any window holds (the pad value if MONAI padded one)."""
    def __init__(self):
        self.smallest = float("inf")

    def segment(self, x):
        self.smallest = min(self.smallest, float(x[:, 0].min()))
        return torch.zeros_like(x[:, :1])


def test_a_box_narrower_than_a_window_grows_to_one_inside_the_grid():
    """A one-voxel region's box is 11 voxels (2 x 5 of margin + 1) at 2 mm; a window of 16 voxels (32 mm)
    would make MONAI pad the box with the background. The box grows about its centre to 16 voxels instead,
    shifted inside the grid at an edge, and every window then reads real tissue (value 1, never the pad -5)."""
    region = np.zeros((40, 30, 20), bool)
    region[20, 15, 1] = True
    assert search.search_box(region, (2.0,) * 3, region.shape) == (slice(15, 26), slice(10, 21), slice(0, 7))
    box = search.search_box(region, (2.0,) * 3, region.shape, min_mm=32.0)
    # by hand: x [15, 26) -> centre-grown to 16: (15 + 26 - 16) // 2 = 12 -> [12, 28); y [10, 21) -> [7, 23);
    # z [0, 7) -> (0 + 7 - 16) // 2 < 0 -> shifted to [0, 16)
    assert box == (slice(12, 28), slice(7, 23), slice(0, 16))
    assert search.search_box(region, (2.0,) * 3, (40, 30, 12), min_mm=32.0)[2] == slice(0, 12)  # grid < window
    spec = InputSpec(prep=PREP, input_size=16, channels=("image", "lesion_mask"), view=ViewSpec(crop_mm=0.0))
    assert search.window_mm(spec) == 32.0
    model = WindowMin()
    search.lesion_probability([model], np.ones((1, 40, 30, 20), np.float32), spec, pad_value=-5.0, region=region)
    assert model.smallest == 1.0


def test_a_magnified_view_searches_its_box_as_the_whole_volume_search_does_a_volume():
    """crop_mm > 0 (model voxel 1.5 mm on a 2 mm grid): inside the box, the probability is exactly the search of
    the box's image alone (up-sampled, slid, down-sampled to the box's own shape); 0 outside it."""
    rng = np.random.default_rng(2)
    image = rng.standard_normal((1, 30, 24, 18)).astype(np.float32)
    region = np.zeros((30, 24, 18), bool)
    region[12:16, 10:12, 6:9] = True
    box = search.search_box(region, (2.0,) * 3, region.shape, search.window_mm(MAGNIFIED))
    assert box == (slice(7, 21), slice(5, 17), slice(1, 14))  # the 10 mm margin (5 voxels); each axis >= 12 mm
    model = SmallConv()
    got = search.lesion_probability([model], image, MAGNIFIED, -1.0, region=region)
    alone = search.lesion_probability([model], np.ascontiguousarray(image[(slice(None), *box)]), MAGNIFIED, -1.0)
    np.testing.assert_allclose(got[box], alone, atol=1e-6)
    outside = np.ones(got.shape, bool)
    outside[box] = False
    assert (got[outside] == 0).all() and got[box].min() > 0
