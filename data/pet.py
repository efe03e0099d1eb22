"""PET intensities: activity concentration to SUV (body weight), and SUV to the tumour-to-brain ratio (TBR).

No imaging library does SUV from a manifest's columns or an amino-acid-PET reference region (MONAI and
TorchIO normalise intensities, not tracer uptake), hence these few lines by hand.

    SUV_bw = C [Bq/mL] / (D [Bq] x 2^(-t / T_half) / W [g])        (tissue density 1 g/mL)
    TBR    = SUV / mean SUV of normal-appearing brain

Normal-appearing brain (what data.prepare records as each PET channel's "reference"): a brain mask, from
the manifest's `brain_mask` column when a row has one, else estimated from the first channel by
data.brain.brain_mask (the head eroded by `brain_erode_mm`, Otsu's brighter class: grey and white matter,
not CSF, ventricles, bone, muscle or scalp; its largest component); only where the PET field of view
reaches; minus the lesion grown by `lesion_margin_mm`, so the tumour's own uptake and its spill-over (PET
resolution is several mm) do not raise the reference. FET and MET studies draw this reference by hand as a
large region of normal brain, usually a contralateral crescent of grey and white matter; the automatic one
averages grey and white matter of the whole brain, which is what the crescent samples too, so TBR compares
with the literature's cut-offs (1.6-2.0). A row without a lesion mask keeps the lesion in the reference:
finetune.predict prepares such a row again once it has found the lesion.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from core.errors import InputError
from data.brain import dilate_mm
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


def reference_region(brain: np.ndarray, lesion: np.ndarray | None, spacing_mm, cfg: PetConfig) -> np.ndarray:
    """Normal-appearing brain [X, Y, Z] bool: `brain` (a brain mask, see the module docstring) minus `lesion`
    grown by lesion_margin_mm (a ball in mm, so anisotropic voxels grow the same distance)."""
    region = np.asarray(brain, bool).copy()
    if lesion is not None and lesion.any():
        region &= ~dilate_mm(lesion > 0, cfg.lesion_margin_mm, spacing_mm)
    return region


def to_tbr(suv: np.ndarray, region: np.ndarray, where: str) -> tuple[np.ndarray, float]:
    """SUV [X, Y, Z] over the mean SUV in `region` -> (TBR [X, Y, Z] float32, the reference mean SUV)."""
    if region.sum() < 100:
        raise InputError(f"{where}: the normal-brain reference region for TBR has {int(region.sum())} voxels; "
                         "lower --prep.pet.brain_erode_mm or --prep.pet.lesion_margin_mm, "
                         "or give a brain_mask column")
    ref = float(suv[region].mean())
    if not ref > 0:
        raise InputError(f"{where}: mean SUV of normal brain is {ref:g}; expected > 0 (is this a PET image?)")
    return (suv / ref).astype(np.float32), ref

