"""What preprocessing does to a volume, as a config: spacing, intensity normalisation, foreground crop.

Light on purpose (no imaging libraries): the input contract (models/input_spec.py) carries it with every
model, and reading a contract must not pull in the preprocessing stack. The operations are data/prepare.py.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Literal

from core.config import to_dict
from core.errors import ConfigError

# Bump when the preprocessing code changes its output, so old cache entries are not served.
PREP_VERSION = 1


@dataclass
class PrepConfig:
    spacing: tuple[float, float, float] = (2.0, 2.0, 2.0)  # target voxel size, mm
    modality: Literal["mri", "ct"] = "mri"  # mri: percentile clip + z-score in the foreground; ct: HU window -> [0, 1]
    ct_window: tuple[float, float] = (-1000.0, 1000.0)  # HU mapped to 0 and 1
    # Clip range, percentiles of the foreground. No upper clip by default: a clip at the 99.5th puts about
    # half of an enhancing lesion's voxels at the ceiling, losing rim and nodule contrast
    # (tests/test_prepare.py::test_default_normalisation_keeps_lesion_contrast).
    mri_percentiles: tuple[float, float] = (0.5, 100.0)
    crop_foreground: bool = True  # crop to the foreground box (+ margin); false keeps the whole resampled volume
    foreground_margin: int = 4  # voxels kept around the foreground box (the box always contains the whole mask)

    def __post_init__(self):
        if len(self.spacing) != 3 or not all(s > 0 and math.isfinite(s) for s in self.spacing):
            raise ConfigError(f"spacing: expected 3 positive mm values, got {self.spacing}")
        if self.modality not in ("mri", "ct"):
            raise ConfigError(f"modality: expected 'mri' or 'ct', got {self.modality!r}")
        if not self.ct_window[0] < self.ct_window[1]:
            raise ConfigError(f"ct_window: expected low < high HU, got {self.ct_window}")
        if not 0 <= self.mri_percentiles[0] < self.mri_percentiles[1] <= 100:
            raise ConfigError(f"mri_percentiles: expected 0 <= low < high <= 100, got {self.mri_percentiles}")
        if self.foreground_margin < 0:
            raise ConfigError(f"foreground_margin: expected >= 0 voxels, got {self.foreground_margin}")

    def key(self) -> str:
        """Stable short hash of every parameter and PREP_VERSION: part of each cache key."""
        text = json.dumps({"prep_version": PREP_VERSION, **to_dict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]
