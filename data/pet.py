"""PET intensities: activity concentration to SUV (body weight), and SUV to the tumour-to-brain ratio (TBR).

No imaging library does SUV from a manifest's columns or an amino-acid-PET reference region (MONAI and
TorchIO normalise intensities, not tracer uptake), hence these few lines by hand.

    SUV_bw = C [Bq/mL] / (D [Bq] x 2^(-t / T_half) / W [g])        (tissue density 1 g/mL)
    TBR    = SUV / mean SUV of normal-appearing brain

Normal-appearing brain: the head mask (the first channel's foreground) eroded by `brain_erode_mm`, so scalp
and skull are left out, minus the lesion grown by `lesion_margin_mm`, so the tumour's own uptake and its
spill-over (PET resolution is several mm) do not raise the reference. FET and MET studies draw this
reference by hand as a large region of normal brain, usually contralateral; the automatic one averages
grey and white matter of the whole brain, which is what a hand-drawn crescent samples too.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from core.errors import InputError
from data.prep_config import PetConfig


def suv_factor(dose_mbq: float, weight_kg: float, minutes: float, half_life_min: float) -> float:
    """The number that turns Bq/mL into SUV body weight: W[g] / (D[Bq] x 2^(-t / T_half))."""
    decayed_bq = dose_mbq * 1e6 * 2.0 ** (-minutes / half_life_min)
    return weight_kg * 1000.0 / decayed_bq


def suv_from_row(row, cfg: PetConfig, where: str) -> float:
    """suv_factor from one manifest row's dose, weight and time columns; a bad value is one line naming
    the subject and column."""
    values = {}
    for column, low in ((cfg.dose_column, 0.0), (cfg.weight_column, 0.0), (cfg.minutes_column, -1e-9)):
        try:
            v = float(row.get(column))
        except (TypeError, ValueError):
            v = float("nan")
        if not (np.isfinite(v) and v > low):
            raise InputError(f"{where}: PET column {column} is {row.get(column)!r}; expected a number "
                             f"{'>= 0' if low < 0 else '> 0'} (or --prep.pet.units suv for images already in SUV)")
        values[column] = v
    return suv_factor(values[cfg.dose_column], values[cfg.weight_column], values[cfg.minutes_column], cfg.half_life_min)


def reference_region(head: np.ndarray, lesion: np.ndarray | None, spacing_mm, cfg: PetConfig) -> np.ndarray:
    """Normal-appearing brain [X, Y, Z] bool: `head` eroded by brain_erode_mm, minus `lesion` grown by
    lesion_margin_mm (both as ellipsoids in mm, so anisotropic voxels erode the same distance)."""
    region = head.astype(bool)
    if cfg.brain_erode_mm > 0:
        region = ndimage.binary_erosion(region, _ball(cfg.brain_erode_mm, spacing_mm))
    if lesion is not None and lesion.any():
        grown = ndimage.binary_dilation(lesion > 0, _ball(cfg.lesion_margin_mm, spacing_mm)) \
            if cfg.lesion_margin_mm > 0 else lesion > 0
        region &= ~grown
    return region


def to_tbr(suv: np.ndarray, region: np.ndarray, where: str) -> tuple[np.ndarray, float]:
    """SUV [X, Y, Z] over the mean SUV in `region` -> (TBR [X, Y, Z] float32, the reference mean SUV)."""
    if region.sum() < 100:
        raise InputError(f"{where}: the normal-brain reference region for TBR has {int(region.sum())} voxels; "
                         "lower --prep.pet.brain_erode_mm or --prep.pet.lesion_margin_mm")
    ref = float(suv[region].mean())
    if not ref > 0:
        raise InputError(f"{where}: mean SUV of normal brain is {ref:g}; expected > 0 (is this a PET image?)")
    return (suv / ref).astype(np.float32), ref


def _ball(radius_mm: float, spacing_mm) -> np.ndarray:
    """Ellipsoidal structuring element of `radius_mm` on a grid of `spacing_mm` voxels."""
    half = [max(1, int(np.floor(radius_mm / s))) for s in spacing_mm]
    axes = [np.arange(-h, h + 1) * s for h, s in zip(half, spacing_mm)]
    grid = np.meshgrid(*axes, indexing="ij")
    return sum(g ** 2 for g in grid) <= radius_mm ** 2 + 1e-9
