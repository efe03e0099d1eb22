"""Lesion candidates found without labels, so pretraining views can centre on pathology.

On a prepared contrast-enhanced MRI, enhancing lesions are among the brightest compact structures
inside the brain. A candidate is a connected component of voxels above a high intensity quantile of
the brain, after a morphological opening (thin vessels and sinus edges do not survive it), inside a
brain mask made by eroding the head mask (so scalp and skull are left out), and at least
`min_volume_mm3` large. Candidates are ranked by size; the `top_k` largest are kept. With a lesion
mask (a labelled manifest), the mask's own components are used instead.

Scored against the index-lesion masks of the built-in cohort in tests/test_candidates.py. The masks
mark index lesions only, so other (real, unmarked) lesions count as false positives there.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from core.atomic import write_json
from core.config import to_dict
from core.errors import ConfigError
from data.cache import load_array


@dataclass
class CandidateConfig:
    quantile: float = 99.0         # intensity percentile of the brain above which a voxel can be a lesion
    erode_mm: float = 10.0         # the head mask is eroded by this much to make the brain mask
    open_iterations: int = 1       # binary opening (3x3x3 cross) that removes vessel-thin structures
    min_volume_mm3: float = 32.0   # smaller components are noise
    top_k: int = 3                 # candidates kept per volume, the largest first

    def __post_init__(self):
        if not 0 < self.quantile < 100:
            raise ConfigError(f"candidates.quantile must be in (0, 100), got {self.quantile}")
        if self.erode_mm < 0 or self.open_iterations < 0 or self.min_volume_mm3 < 0 or self.top_k < 1:
            raise ConfigError("candidates: erode_mm, open_iterations and min_volume_mm3 must be >= 0, top_k >= 1")

    def key(self) -> str:
        return hashlib.sha256(json.dumps(to_dict(self), sort_keys=True).encode()).hexdigest()[:12]


def components(binary: np.ndarray) -> list[tuple[np.ndarray, int]]:
    """(centre of mass [3] in voxels, voxel count) of each connected component, largest first."""
    labels, n = ndi.label(binary)
    if n == 0:
        return []
    sizes = ndi.sum(binary, labels, range(1, n + 1))
    centres = ndi.center_of_mass(binary, labels, range(1, n + 1))
    order = np.argsort(-np.asarray(sizes), kind="stable")
    return [(np.asarray(centres[i], dtype=np.float64), int(sizes[i])) for i in order]


def find_candidates(image: np.ndarray, spacing: float, cfg: CandidateConfig, background: float | None = None
                    ) -> np.ndarray:
    """Centres [K, 3] (voxels of `image` [X, Y, Z]) of the top-k lesion candidates, largest first."""
    background = float(image.min()) if background is None else background
    head = ndi.binary_fill_holes(image > background + 1e-6)
    iterations = int(round(cfg.erode_mm / spacing))
    brain = ndi.binary_erosion(head, iterations=iterations) if iterations else head
    if not brain.any():
        return np.zeros((0, 3))
    bright = (image > np.percentile(image[brain], cfg.quantile)) & brain
    if cfg.open_iterations:
        bright = ndi.binary_opening(bright, iterations=cfg.open_iterations)
    min_voxels = cfg.min_volume_mm3 / spacing**3
    found = [c for c, n in components(bright) if n >= min_voxels][: cfg.top_k]
    return np.stack(found) if found else np.zeros((0, 3))


def mask_centres(mask: np.ndarray) -> np.ndarray:
    """Centres [K, 3] of the lesions marked in `mask` [X, Y, Z], largest first."""
    found = [c for c, _ in components(np.asarray(mask) > 0.5)]
    return np.stack(found) if found else np.zeros((0, 3))


def cached_candidates(image_path: str | Path, spacing: float, cfg: CandidateConfig,
                      background: float | None = None) -> np.ndarray:
    """`find_candidates` of a cached image.npy, stored beside it (keyed by the config) so a rerun or
    another rank reads them instead of recomputing."""
    path = Path(image_path).parent / f"candidates-{cfg.key()}.json"
    if path.is_file():
        return np.asarray(json.loads(path.read_text())["centres"], dtype=np.float64).reshape(-1, 3)
    centres = find_candidates(load_array(image_path)[0], spacing, cfg, background)
    write_json(path, {"centres": centres.tolist(), "config": to_dict(cfg)})
    return centres
