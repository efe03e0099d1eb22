"""What preprocessing does to a volume, as a config: spacing, intensity normalisation, foreground crop.

Light on purpose (no imaging libraries): the input contract (models/input_spec.py) carries it with every
model, and reading a contract must not pull in the preprocessing stack. The operations are data/prepare.py.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, fields
from typing import Literal

from core.config import to_dict
from core.errors import ConfigError

# Bump when the preprocessing code changes its output, so old cache entries are not served.
PREP_VERSION = 1
# Bumped when the preprocessing of a further channel or of PET changes its output, and in the key of those
# configs only, so a one-image MRI or CT run keeps its key and cache entries. 2: a channel's statistics leave
# out the voxels its field of view does not cover; the TBR reference is a brain mask (issue 32).
CHANNELS_VERSION = 2
MODALITIES = ("mri", "ct", "pet")
# Manifest columns an image channel may not be named after: they mean something else.
RESERVED_COLUMNS = ("subject_id", "patient_id", "site", "mask", "brain_mask", "label", "time", "event")
F18_HALF_LIFE_MIN = 109.77


@dataclass
class PetConfig:
    """How a PET channel becomes SUV, then TBR (data/pet.py does it)."""
    # what the PET files hold: bqml = activity concentration in Bq/mL, made SUV (body weight) with the
    # manifest's dose, weight and time columns; suv = already SUV (the columns are not needed)
    units: Literal["bqml", "suv"] = "bqml"
    # what the channel holds: tbr = SUV over the mean SUV of normal-appearing brain (the manifest's brain_mask
    # column, else data.brain.brain_mask of the first channel; minus the lesion grown by lesion_margin_mm;
    # data/pet.py); suv = SUV itself
    scale: Literal["tbr", "suv"] = "tbr"
    dose_column: str = "pet_dose_mbq"      # manifest column: injected dose, MBq
    weight_column: str = "pet_weight_kg"   # manifest column: body weight, kg
    minutes_column: str = "pet_minutes"    # manifest column: minutes from injection to the scan (decay correction)
    half_life_min: float = F18_HALF_LIFE_MIN  # the tracer's half-life in minutes (F-18: FET, FDG, FDOPA)
    # the head is eroded by this before the brain is estimated, to leave scalp and skull out (unused with a
    # brain_mask column)
    brain_erode_mm: float = 8.0
    lesion_margin_mm: float = 10.0         # the lesion grown by this is left out of the reference (no uptake spill)

    def __post_init__(self):
        if self.units not in ("bqml", "suv"):
            raise ConfigError(f"--prep.pet.units: expected 'bqml' or 'suv', got {self.units!r}")
        if self.scale not in ("tbr", "suv"):
            raise ConfigError(f"--prep.pet.scale: expected 'tbr' or 'suv', got {self.scale!r}")
        if not self.half_life_min > 0:
            raise ConfigError(f"--prep.pet.half_life_min: expected > 0 minutes, got {self.half_life_min}")
        if self.brain_erode_mm < 0 or self.lesion_margin_mm < 0:
            raise ConfigError("--prep.pet.brain_erode_mm and --prep.pet.lesion_margin_mm must be >= 0")

    def columns(self) -> tuple[str, ...]:
        """The manifest columns SUV needs (none when the files are SUV already)."""
        return (self.dose_column, self.weight_column, self.minutes_column) if self.units == "bqml" else ()


@dataclass
class PrepConfig:
    spacing: tuple[float, float, float] = (2.0, 2.0, 2.0)  # target voxel size, mm
    # The image channels, in order: manifest columns holding NIfTI paths, each COLUMN or COLUMN:MODALITY
    # (mri, ct, pet; default --prep.modality), e.g. --images t1ce,flair,fet:pet. The lesion mask is always the
    # last channel after them. The first channel sets the grid: the others are resampled onto it.
    images: tuple[str, ...] = field(default=("image",), metadata={"flag": "images"})
    # A subject whose cell for a channel after the first is empty: refuse (one line naming the row and column),
    # or zero (the channel is all zeros and the table gains a 0/1 column missing_<column>, a clinical feature)
    missing_image: Literal["refuse", "zero"] = field(default="refuse", metadata={"flag": "missing_image"})
    # mri: percentile clip + z-score in the foreground; ct: HU window -> [0, 1]; pet: SUV, then TBR (--prep.pet)
    modality: Literal["mri", "ct", "pet"] = "mri"
    ct_window: tuple[float, float] = (-1000.0, 1000.0)  # HU mapped to 0 and 1
    # Clip range, percentiles of the foreground. No upper clip by default: a clip at the 99.5th puts about
    # half of an enhancing lesion's voxels at the ceiling, losing rim and nodule contrast
    # (tests/test_prepare.py::test_default_normalisation_keeps_lesion_contrast).
    mri_percentiles: tuple[float, float] = (0.5, 100.0)
    crop_foreground: bool = True  # crop to the foreground box (+ margin); false keeps the whole resampled volume
    foreground_margin: int = 4  # voxels kept around the foreground box (the box always contains the whole mask)
    pet: PetConfig = field(default_factory=PetConfig)

    def __post_init__(self):
        if len(self.spacing) != 3 or not all(s > 0 and math.isfinite(s) for s in self.spacing):
            raise ConfigError(f"spacing: expected 3 positive mm values, got {self.spacing}")
        if self.modality not in MODALITIES:
            raise ConfigError(f"modality: expected one of {list(MODALITIES)}, got {self.modality!r}")
        # A comma list in one word or in a YAML string is the same list as separate words.
        self.images = tuple(p.strip() for item in self.images for p in str(item).split(",") if p.strip())
        self.channels()  # a bad --images fails at parse time, naming the flag
        if self.missing_image not in ("refuse", "zero"):
            raise ConfigError(f"--missing_image: expected 'refuse' or 'zero', got {self.missing_image!r}")
        if not self.ct_window[0] < self.ct_window[1]:
            raise ConfigError(f"ct_window: expected low < high HU, got {self.ct_window}")
        if not 0 <= self.mri_percentiles[0] < self.mri_percentiles[1] <= 100:
            raise ConfigError(f"mri_percentiles: expected 0 <= low < high <= 100, got {self.mri_percentiles}")
        if self.foreground_margin < 0:
            raise ConfigError(f"foreground_margin: expected >= 0 voxels, got {self.foreground_margin}")

    def channels(self) -> list[tuple[str, str]]:
        """(manifest column, modality) of each image channel, in channel order."""
        if not self.images:
            raise ConfigError("--images: expected at least one manifest column")
        out = []
        for item in self.images:
            column, _, modality = item.partition(":")
            modality = modality or self.modality
            if not column or modality not in MODALITIES:
                raise ConfigError(f"--images {item!r}: expected COLUMN or COLUMN:MODALITY with MODALITY one of "
                                  f"{list(MODALITIES)}")
            if column in RESERVED_COLUMNS or column.startswith("cache_"):
                raise ConfigError(f"--images {item!r}: {column!r} is a reserved manifest column, not an image")
            out.append((column, modality))
        names = [c for c, _ in out]
        if len(set(names)) < len(names):
            raise ConfigError(f"--images {','.join(self.images)}: a column is named twice")
        return out

    def image_columns(self) -> list[str]:
        return [c for c, _ in self.channels()]

    def has_pet(self) -> bool:
        return any(m == "pet" for _, m in self.channels())

    def uses_brain_mask(self) -> bool:
        """Whether preparing reads a brain mask: a PET channel scaled to TBR."""
        return self.has_pet() and self.pet.scale == "tbr"

    def acquisition_columns(self) -> list[str]:
        """Manifest columns preprocessing reads besides the images (PET dose, weight, time): never clinical."""
        return list(self.pet.columns()) if self.has_pet() else []

    def key(self) -> str:
        """Stable short hash of every parameter and PREP_VERSION: part of each cache key.

        The multi-channel fields are left out while they hold their defaults, so a one-image run keeps
        the keys (and cache entries) it had before they existed; CHANNELS_VERSION joins only configs with a
        further channel or a PET channel."""
        d = to_dict(self)
        for f in fields(self):
            if f.name in ("images", "missing_image", "pet") and getattr(self, f.name) == _DEFAULTS[f.name]:
                del d[f.name]
        if len(self.channels()) > 1 or self.has_pet():
            d["channels_version"] = CHANNELS_VERSION
        text = json.dumps({"prep_version": PREP_VERSION, **d}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


_DEFAULTS = {"images": ("image",), "missing_image": "refuse", "pet": PetConfig()}
