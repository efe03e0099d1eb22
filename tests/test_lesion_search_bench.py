"""benchmarks/speed/lesion_search.py: its smallest configuration runs the deployed search, and the windows it counts
are MONAI's, by hand from the scan-interval formula. No timing is asserted (2 shared cores)."""
import math

import pytest

from benchmarks.speed import lesion_search as bench


def hand_windows(n: int, roi: int, overlap: float) -> int:
    """MONAI's scan along one axis: a step of int(roi (1 - overlap)), the last window flush with the far edge,
    one window when the axis is no longer than the window."""
    return 1 if n <= roi else math.ceil((n - roi) / int(roi * (1 - overlap))) + 1


def test_the_smallest_configuration_counts_monais_windows():
    rows = bench.main(["--segmenters", "dynunet-4", "--img_size", "24", "--crop_mm", "0", "24", "--folds", "1",
                       "--overlap", "0.25", "--repeats", "1", "--synthetic", "ball", "--ball_size", "32", "--quiet"])
    native, magnified = rows
    assert (native.voxel_mm, magnified.voxel_mm) == (2.0, 1.0)
    assert native.box == magnified.box and all(n > 24 for n in native.box)
    # native scale: the box itself; crop_mm 24 over 24 voxels: 1 mm voxels, the box up-sampled 2x per axis
    assert native.windows == math.prod(hand_windows(n, 24, 0.25) for n in native.box)
    assert magnified.windows == math.prod(hand_windows(2 * n, 24, 0.25) for n in magnified.box)
    assert magnified.windows > native.windows and magnified.windows_whole_head >= magnified.windows
    for row in rows:
        assert set(row.seconds) == set(bench.STAGES) and row.seconds["sliding window"] > 0


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
def test_window_count_is_monais_own(overlap):
    """The formula the benchmark reports for the whole head against MONAI's own slices."""
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval
    for shape in [(10, 48, 49), (97, 200, 61), (214, 250, 202)]:
        size = [max(n, 48) for n in shape]  # MONAI pads an axis shorter than the window
        slices = dense_patch_slices(size, (48,) * 3, _get_scan_interval(size, (48,) * 3, 3, (overlap,) * 3))
        assert bench.window_count(shape, 48, overlap) == len(slices)


def test_a_multi_fold_row_over_budget_is_the_one_fold_row_with_its_window_passes_times_the_folds():
    one = bench.Row("dynunet-16", 0.0, 0.25, 1, voxel_mm=2.0, box=(80, 90, 70), windows=12, windows_whole_head=18,
                    seconds={s: 1.0 for s in bench.STAGES}, wall=12.0)
    three = bench.estimate_row(bench.Row("dynunet-16", 0.0, 0.25, 3), one)
    assert three.estimated and three.seconds["sliding window"] == 3.0
    assert three.total == 8.0 and three.wall == pytest.approx(12.0 * 8 / 6) and three.windows == 12
