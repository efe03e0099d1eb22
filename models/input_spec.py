"""The input contract: what a saved model expects as input, as one typed dataclass.

It travels with every model folder (pretraining checkpoints, the HF encoder folder, the MONAI export,
every fine-tuned fold) as plain JSON in `input_spec.json`, and every reader (fine-tuning, predict,
evaluate, the benchmarks and probes) loads it through `load_input_spec`. Nothing re-parses it by hand.

    preprocessing (spacing, orientation, intensity normalisation)  -> data.prepare.PrepConfig
    input size and channels                                        -> what the encoder is fed
    view: how a lesion or sub-volume is cut before it is resized to the input, in mm
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from core.config import from_dict, to_dict
from core.errors import ConfigError, InputError
from data.prep_config import PrepConfig

INPUT_SPEC_NAME = "input_spec.json"
VIEW_CENTRES = ("lesion", "random")


@dataclass
class ViewSpec:
    """How one input view is cut from a prepared volume before it is resized to `input_size`^3."""
    # "lesion": a cube around the lesion box plus `margin_mm`; "random": a cube anywhere in the volume.
    centre: Literal["lesion", "random"] = "lesion"
    # Cube side in mm. Lesion views: the smallest side (the lesion box + margin may need more);
    # random views: the crop edge. 0 = input_size x spacing, i.e. native scale, no magnification.
    crop_mm: float = 0.0
    margin_mm: float = 10.0  # lesion views: the peritumoral margin kept around the lesion box
    # Lesion views: 0 = one scale. > 0 = a second, wide crop of the same lesion beside the first: the lesion
    # box plus this margin (the PET seed's peritumoral scale), resized to the same input; both crops go
    # through the one encoder and their tokens are pooled together.
    peritumoral_mm: float = 0.0

    def __post_init__(self):
        if self.centre not in VIEW_CENTRES:
            raise ConfigError(f"view.centre: {self.centre!r} is not one of {list(VIEW_CENTRES)}")
        if self.crop_mm < 0:
            raise ConfigError(f"--crop_mm must be >= 0, got {self.crop_mm}")
        if self.margin_mm < 0:
            raise ConfigError(f"--margin_mm must be >= 0, got {self.margin_mm}")
        if self.peritumoral_mm and self.peritumoral_mm <= self.margin_mm:
            raise ConfigError(f"--peritumoral_mm {self.peritumoral_mm}: the wide crop's margin must exceed "
                              f"--margin_mm {self.margin_mm} (0 turns the second scale off)")

    def crop_voxels(self, spacing: float) -> int | None:
        """The cube side in voxels at `spacing` mm; None at native scale (crop_mm 0)."""
        return max(1, int(round(self.crop_mm / spacing))) if self.crop_mm > 0 else None

    def margin_voxels(self, spacing: float) -> int:
        return int(round(self.margin_mm / spacing))


@dataclass
class InputSpec:
    prep: PrepConfig = field(default_factory=PrepConfig)
    orientation: str = "RAS"         # every volume is reoriented to this before preprocessing
    input_size: int = 64             # cubic encoder input edge in voxels
    channels: tuple[str, ...] = ("image",)  # channel order, e.g. ("image", "lesion_mask")
    view: ViewSpec = field(default_factory=ViewSpec)

    def __post_init__(self):
        self.channels = tuple(self.channels)
        if self.input_size < 1:
            raise ConfigError(f"input_size must be >= 1, got {self.input_size}")
        if not self.channels:
            raise ConfigError("an input spec needs at least one channel")

    @property
    def spacing_mm(self) -> float:
        """One isotropic spacing for mm -> voxel conversions of the view."""
        return float(sum(self.prep.spacing) / len(self.prep.spacing))

    def view_voxels(self) -> dict:
        """The lesion view in voxels at the prepared spacing: `margin_vox`, `min_side_vox` and
        `wide_margin_vox` (None with one scale)."""
        s = self.spacing_mm
        wide = int(round(self.view.peritumoral_mm / s)) if self.view.peritumoral_mm else None
        return {"margin_vox": self.view.margin_voxels(s), "min_side_vox": self.view.crop_voxels(s), "wide_margin_vox": wide}

    @property
    def scales(self) -> int:
        """How many crops of each lesion the model reads: 1, or 2 with the peritumoral crop."""
        return 2 if self.view.peritumoral_mm else 1

    def describe_channels(self) -> str:
        """'image 1 t1ce (MRI, percentile z-score), ..., lesion_mask (0/1)': what each input channel holds."""
        methods = {"mri": f"MRI, clipped to percentiles {list(self.prep.mri_percentiles)} and z-scored in the head",
                   "ct": f"CT, HU window {list(self.prep.ct_window)} to [0, 1]",
                   "pet": f"PET, SUV body weight{' from the dose, weight and time columns' if self.prep.pet.units == 'bqml' else ''}"
                          + (", over normal-brain mean SUV (TBR)" if self.prep.pet.scale == "tbr" else "")}
        images = dict(self.prep.channels())
        if len(self.channels) == 1 and len(images) > 1:  # pretrained on several sequences, one per sample
            each = "; ".join(f"{name} ({methods[m]})" for name, m in images.items())
            return f"0: {self.channels[0]}, one sequence at a time, any of those it was pretrained on: {each}"
        parts = []
        for i, name in enumerate(self.channels):
            what = methods[images[name]] if name in images else ("0/1 lesion mask" if "mask" in name else "as trained")
            parts.append(f"{i}: {name} ({what})")
        return "; ".join(parts)

    def to_dict(self) -> dict:
        return to_dict(self)

    def save(self, folder: str | os.PathLike) -> Path:
        """Write `input_spec.json` into `folder` (callers write into a temporary folder, then rename it)."""
        path = Path(folder) / INPUT_SPEC_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


def input_spec_from_dict(d: dict, where: str = INPUT_SPEC_NAME) -> InputSpec:
    return from_dict(InputSpec, d, where)


def load_input_spec(folder: str | os.PathLike, required: bool = True) -> InputSpec | None:
    """The input contract of a model folder or checkpoint; the one way any reader gets it.

    A folder without one is an InputError, or None with required=False (a bare encoder saved by hand).
    """
    path = Path(folder) / INPUT_SPEC_NAME
    if not path.is_file() and not required:
        return None
    if not path.is_file():
        raise InputError(f"{folder}: no {INPUT_SPEC_NAME} (the model's input contract); "
                         "re-export the model with this version of mimfm")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    return input_spec_from_dict(d, where=str(path))  # a bad key or value is a ConfigError naming the file
