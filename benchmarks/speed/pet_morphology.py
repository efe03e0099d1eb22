"""PET reference morphology: ball erosion/dilation (the code before issue 32) vs distance-transform thresholds.

    python -m benchmarks.speed.pet_morphology [--shape 180 216 176] [--spacing 1 1 1] [--repeats 3]

The TBR reference erodes the head by 8 mm and grows the lesion by 10 mm. Before issue 32 data/pet.py did both
with scipy.ndimage.binary_erosion / binary_dilation and an ellipsoidal ball in mm: O(voxels x ball), and a
ball of 8 mm at 1 mm holds 2,109 offsets. data.brain.erode_mm / dilate_mm threshold
scipy.ndimage.distance_transform_edt (O(voxels)) instead. This times both on a head-sized ellipsoid with a
lesion, checks that they give the same masks, and prints a markdown table (median of --repeats, one
process, OMP threads as set in the environment). Nothing is written to docs/.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
from scipy import ndimage

from benchmarks.common import Table, cpu_model, load_average, today
from data.brain import dilate_mm, erode_mm

ERODE_MM, GROW_MM = 8.0, 10.0  # data.prep_config.PetConfig's brain_erode_mm and lesion_margin_mm defaults


def ball(radius_mm: float, spacing) -> np.ndarray:
    """The structuring element of data/pet.py before issue 32 (kept here as the reference)."""
    half = [max(1, int(np.floor(radius_mm / s))) for s in spacing]
    grid = np.meshgrid(*[np.arange(-h, h + 1) * s for h, s in zip(half, spacing)], indexing="ij")
    return sum(g ** 2 for g in grid) <= radius_mm ** 2 + 1e-9


def phantom(shape, spacing) -> tuple[np.ndarray, np.ndarray]:
    """A head [X, Y, Z] bool (an ellipsoid filling most of the grid) and a 15 mm-radius lesion [X, Y, Z] bool."""
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)]  # mm from the centre
    x, y, z = np.meshgrid(*axes, indexing="ij")
    radii = [0.45 * n * s for n, s in zip(shape, spacing)]
    head = (x / radii[0]) ** 2 + (y / radii[1]) ** 2 + (z / radii[2]) ** 2 <= 1
    lesion = (x - 20) ** 2 + (y + 10) ** 2 + (z - 15) ** 2 <= 15.0 ** 2
    return head, lesion


def old(head, lesion, spacing):
    return ndimage.binary_erosion(head, ball(ERODE_MM, spacing)), ndimage.binary_dilation(lesion, ball(GROW_MM, spacing))


def new(head, lesion, spacing):
    return erode_mm(head, ERODE_MM, spacing), dilate_mm(lesion, GROW_MM, spacing)


def timed(fn, repeats: int, *args) -> tuple[float, tuple]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn(*args)
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main(argv=None) -> Table:
    p = argparse.ArgumentParser(prog="python -m benchmarks.speed.pet_morphology", description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=3, default=[180, 216, 176])
    p.add_argument("--spacing", type=float, nargs=3, default=[1.0, 1.0, 1.0])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    head, lesion = phantom(args.shape, args.spacing)
    t_old, (e_old, g_old) = timed(old, args.repeats, head, lesion, args.spacing)
    t_new, (e_new, g_new) = timed(new, args.repeats, head, lesion, args.spacing)
    same = bool(np.array_equal(e_old, e_new) and np.array_equal(g_old, g_new))
    table = Table(["method", "median s", "ratio", "same masks"])
    table.add("binary_erosion/dilation, mm ball (before)", f"{t_old:.3f}", "1.00x", "—")
    table.add("distance_transform_edt threshold (now)", f"{t_new:.3f}", f"{t_old / t_new:.1f}x", "yes" if same else "NO")
    table.notes.append(f"{today()}, {cpu_model()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
                       f"load average {load_average():.1f}; grid {args.shape} at {args.spacing} mm, "
                       f"erode {ERODE_MM:g} mm (ball of {int(ball(ERODE_MM, args.spacing).sum())} offsets), "
                       f"grow {GROW_MM:g} mm; median of {args.repeats}")
    print(table.markdown())
    print("\n".join(table.notes))
    if not same:
        raise SystemExit("the two methods gave different masks")
    return table


if __name__ == "__main__":
    main()
