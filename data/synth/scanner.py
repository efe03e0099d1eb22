"""Acquisition: the site's grid and storage orientation, then contrast, blur, bias field, Rician noise
and integer storage, with per-scan jitter around the site's protocol."""
from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np
from scipy import ndimage

from data.synth.fields import LowFreqField
from data.synth.params import SiteParams


@dataclass
class Acquisition:
    gamma: float
    bias_std: float
    noise: float
    scale: float


def scan_grid(site: SiteParams, rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, int, int]]:
    """RAS voxel -> scanner mm affine and shape of one scan; the FOV is centred near the isocentre."""
    spacing = np.asarray(site.spacing, float)
    shape = tuple(int(round(f / s)) for f, s in zip(site.fov_mm, spacing))
    affine = np.diag([*spacing, 1.0])
    table = np.round(rng.normal(0, 3.0, 3), 2)  # the FOV centre is set by hand, never exactly at 0
    affine[:3, 3] = -(np.asarray(shape) - 1) * spacing / 2 + table
    return affine, shape


def jitter(site: SiteParams, rng: np.random.Generator) -> Acquisition:
    j = site.jitter
    return Acquisition(gamma=site.gamma * np.exp(0.5 * j * rng.standard_normal()),
                       bias_std=site.bias_std * np.exp(j * rng.standard_normal()),
                       noise=site.noise * np.exp(j * rng.standard_normal()),
                       scale=site.scale * np.exp(1.5 * j * rng.standard_normal()))


def acquire(truth: np.ndarray, site: SiteParams, acq: Acquisition, rng: np.random.Generator) -> np.ndarray:
    """truth [X, Y, Z] float32 (normal WM = 1, air = 0) -> stored int16 magnitude image [X, Y, Z]."""
    img = np.power(np.maximum(truth, 0), acq.gamma, dtype=np.float32)
    sigma_vox = np.asarray(site.psf_sigma_mm) / np.asarray(site.spacing)
    img = ndimage.gaussian_filter(img, sigma_vox, mode="constant", truncate=3.0)
    img *= np.exp(LowFreqField(rng, img.shape, order=3, std=acq.bias_std).grid()[0])
    img *= np.float32(acq.scale)
    sd = np.float32(acq.noise * acq.scale)
    # Rician magnitude: noise in both quadrature channels, so air is not zero and dark areas lift.
    noise = rng.standard_normal((2,) + img.shape, dtype=np.float32) * sd
    img = np.sqrt((img + noise[0]) ** 2 + noise[1] ** 2)
    return np.clip(np.rint(img), 0, np.iinfo(np.int16).max).astype(np.int16)


def to_storage(array: np.ndarray, affine: np.ndarray, orientation: str) -> tuple[np.ndarray, np.ndarray]:
    """Reorder a RAS array (and its affine) into the site's storage orientation, e.g. 'LAS'."""
    ras = nib.orientations.axcodes2ornt("RAS")
    target = nib.orientations.axcodes2ornt(tuple(orientation))
    t = nib.orientations.ornt_transform(ras, target)
    out = nib.orientations.apply_orientation(array, t)
    return np.ascontiguousarray(out), affine @ nib.orientations.inv_ornt_aff(t, array.shape)
