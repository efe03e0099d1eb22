"""Radiomics features: IBSI-style first-order, shape and 3D GLCM features of a lesion and its peritumoral ring.

Computed with numpy/scipy/scikit-image and checked against PyRadiomics 3.0.1 (tests/test_radiomics_reference.py)
with PyRadiomics set to binCount=bins, distances=[1], 3D, symmetric GLCM averaged over directions.
The names map to PyRadiomics':
- first-order: mean, std = sqrt(Variance) (biased), skewness, kurtosis (Pearson), p10 = 10Percentile,
  p50 = Median, p90 = 90Percentile, energy (no voxel shift), entropy (on the binned values), iqr;
- shape: volume_mm3 = VoxelVolume, mesh_volume_mm3 = MeshVolume, surface_area_mm2 = SurfaceArea,
  surface_volume_ratio, sphericity, compactness = Compactness2, major/minor/least_axis_mm = ...AxisLength,
  elongation, flatness, max_diameter_mm = Maximum3DDiameter;
- GLCM: contrast, dissimilarity = DifferenceAverage, homogeneity = Idm, joint_energy = JointEnergy (ASM),
  entropy = JointEntropy, correlation.
First-order, GLCM and the voxel-based shape features agree to ~1e-9; the mesh features (mesh volume, surface
area and what uses them) differ by ~0.2 % (median; 5 % at most) because PyRadiomics' marching cubes
triangulates ambiguous cubes its own way (ours, scikit-image's Lewiner, gives a watertight mesh). Ours stays
the extractor: faster (docs/RESULTS.md, the PyRadiomics cross-check), no SimpleITK round trip, and
PyRadiomics needs a no-isolation source build; PyRadiomics is the reference.

Discretisation: `bins` equal-width bins over each region's own range (PyRadiomics' binCount), for texture and
for first-order entropy.

Undefined values: a region without voxels (an empty ring when the lesion fills the volume) or without any
neighbouring voxel pair (a one-voxel region) gives NaN for that region's features; the model imputes them with
the training median. A constant region follows PyRadiomics: skewness = kurtosis = 0 and GLCM correlation = 1.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError
from scipy.spatial.distance import pdist
from skimage.measure import marching_cubes, mesh_surface_area

from core.errors import InputError

# Bump when a feature's definition changes: features.csv rows are keyed on it.
# 2: GLCM energy -> joint_energy, the angular second moment (PyRadiomics JointEnergy, IBSI), not its square root.
FEATURE_VERSION = 2

# The 13 unique neighbour offsets of a 26-neighbourhood (the other 13 are their negatives).
DIRECTIONS_3D = [(0, 0, 1), (0, 1, 0), (1, 0, 0), (0, 1, 1), (0, 1, -1), (1, 0, 1), (1, 0, -1),
                 (1, 1, 0), (1, -1, 0), (1, 1, 1), (1, 1, -1), (1, -1, 1), (1, -1, -1)]


# ---------------------------------------------------------------- features

def extract_features(image: np.ndarray, mask: np.ndarray, spacing, ring_mm: float = 5.0,
                     bins: int = 32) -> dict[str, float]:
    """Features of the lesion (mask) and of a peritumoral ring ring_mm wide around it."""
    image = np.asarray(image, dtype=np.float64)  # [X, Y, Z]
    lesion = np.asarray(mask) > 0.5  # [X, Y, Z]
    spacing = tuple(float(s) for s in spacing)
    if image.ndim != 3 or image.shape != lesion.shape:
        raise InputError(f"radiomics: image {image.shape} and mask {lesion.shape} must be the same 3D grid")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise InputError(f"radiomics: spacing {spacing} must be three positive numbers (mm)")
    if int(bins) < 2 or not ring_mm > 0:
        raise InputError(f"radiomics: bins ({bins}) must be >= 2 and ring_mm ({ring_mm}) > 0")
    if not lesion.any():
        raise InputError("radiomics: the lesion mask is empty")
    if not np.isfinite(image[lesion]).all():
        raise InputError("radiomics: the image has non-finite values inside the lesion")
    ring = peritumoral_ring(lesion, spacing, ring_mm)

    feats = _prefixed("lesion_shape", shape_features(lesion, spacing))
    for name, region in (("lesion", lesion), ("ring", ring)):
        feats |= _prefixed(f"{name}_firstorder", first_order_features(image[region], bins))
        feats |= _prefixed(f"{name}_glcm", glcm_features(image, region, bins))
    return feats


def peritumoral_ring(lesion: np.ndarray, spacing, ring_mm: float) -> np.ndarray:
    """Voxels outside the lesion whose centre lies within ring_mm (Euclidean, in mm) of a lesion voxel.

    Exact Euclidean distance rather than a voxel structuring element, so anisotropic spacing is right.
    """
    distance = ndimage.distance_transform_edt(~lesion, sampling=spacing)  # [X, Y, Z] mm
    return (distance <= ring_mm) & ~lesion


def quantise(values: np.ndarray, bins: int) -> np.ndarray:
    """Levels 1..bins, equal-width over the values' own range (a constant region is all level 1)."""
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.ones(values.shape, dtype=np.int64)
    level = np.floor(bins * (values - lo) / (hi - lo)).astype(np.int64)
    return np.clip(level, 0, bins - 1) + 1


def first_order_features(values: np.ndarray, bins: int) -> dict[str, float]:
    names = ["mean", "std", "skewness", "kurtosis", "p10", "p50", "p90", "energy", "entropy", "iqr"]
    if values.size == 0:
        return dict.fromkeys(names, np.nan)
    values = values.astype(np.float64)
    mean = values.mean()
    centred = values - mean
    m2, m3, m4 = (np.mean(centred ** k) for k in (2, 3, 4))
    flat = m2 <= 1e-12 * max(1.0, mean * mean)
    p10, p25, p50, p75, p90 = np.percentile(values, [10, 25, 50, 75, 90])
    p = np.bincount(quantise(values, bins))[1:] / values.size
    p = p[p > 0]
    return {
        "mean": mean, "std": np.sqrt(m2),
        "skewness": 0.0 if flat else m3 / m2 ** 1.5,
        "kurtosis": 0.0 if flat else m4 / m2 ** 2,  # Pearson (a normal gives 3), as PyRadiomics
        "p10": p10, "p50": p50, "p90": p90,
        "energy": float(np.sum(values ** 2)),
        "entropy": float(-np.sum(p * np.log2(p))),
        "iqr": p75 - p25,
    }


def shape_features(lesion: np.ndarray, spacing) -> dict[str, float]:
    spacing = np.asarray(spacing, dtype=np.float64)
    volume = float(lesion.sum() * np.prod(spacing))  # voxel count: exact for the voxelised lesion
    crop = np.pad(lesion[_bounding_box(lesion)], 1).astype(np.float32)  # padded so the mesh closes
    verts, faces, _, _ = marching_cubes(crop, level=0.5, spacing=tuple(spacing))
    area = float(mesh_surface_area(verts, faces))
    tri = verts[faces]  # [T, 3 vertices, 3 coords]
    mesh_volume = abs(float(np.einsum("ij,ij->i", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])).sum())) / 6
    # Sphericity from the mesh volume and mesh area, as PyRadiomics: both see the same surface.
    sphericity = np.pi ** (1 / 3) * (6 * mesh_volume) ** (2 / 3) / area

    coords = np.argwhere(lesion) * spacing  # [N, 3] mm
    eig = np.sort(np.linalg.eigvalsh(np.cov(coords.T, bias=True)))[::-1] if len(coords) > 1 else np.zeros(3)
    eig = np.clip(eig, 0, None)
    major, minor, least = 4 * np.sqrt(eig)  # full axis lengths of the equivalent ellipsoid
    return {
        "volume_mm3": volume,
        "mesh_volume_mm3": mesh_volume,
        "surface_area_mm2": area,
        "surface_volume_ratio": area / mesh_volume,
        "sphericity": sphericity,
        "compactness": 36 * np.pi * mesh_volume ** 2 / area ** 3,  # = sphericity^3
        "major_axis_mm": major, "minor_axis_mm": minor, "least_axis_mm": least,
        "elongation": np.sqrt(eig[1] / eig[0]) if eig[0] > 0 else 1.0,
        "flatness": np.sqrt(eig[2] / eig[0]) if eig[0] > 0 else 1.0,
        "max_diameter_mm": _max_diameter(verts),
    }


def _max_diameter(points: np.ndarray) -> float:
    # The farthest pair of mesh vertices are both hull vertices, which are few.
    try:
        points = points[ConvexHull(points).vertices]
    except QhullError:  # degenerate (flat) point set: all points, subsampled to bound the cost
        points = points[:: max(1, len(points) // 2000)]
    return float(pdist(points).max()) if len(points) > 1 else 0.0


def glcm_matrices(levels: np.ndarray, bins: int) -> np.ndarray:
    """[13, bins, bins] symmetric co-occurrence counts of levels 1..bins (0 = outside the region)."""
    out = np.zeros((len(DIRECTIONS_3D), bins, bins))
    shape = levels.shape
    for k, offset in enumerate(DIRECTIONS_3D):
        src = tuple(slice(max(0, -o), n - max(0, o)) for o, n in zip(offset, shape))
        dst = tuple(slice(max(0, o), n - max(0, -o)) for o, n in zip(offset, shape))
        a, b = levels[src], levels[dst]
        pair = (a > 0) & (b > 0)
        counts = np.bincount((a[pair] - 1) * bins + (b[pair] - 1), minlength=bins * bins)
        counts = counts.reshape(bins, bins)
        out[k] = counts + counts.T
    return out


def glcm_properties(P: np.ndarray) -> dict[str, float]:
    """Texture of one normalised GLCM [bins, bins] (PyRadiomics definitions; entropy in bits)."""
    i, j = np.indices(P.shape) + 1
    diff = np.abs(i - j)
    mu = np.sum(i * P)  # symmetric: the row and column means and variances are equal
    var = np.sum((i - mu) ** 2 * P)
    nz = P[P > 0]
    return {
        "contrast": np.sum(diff ** 2 * P),
        "dissimilarity": np.sum(diff * P),
        "homogeneity": np.sum(P / (1.0 + diff ** 2)),
        "joint_energy": np.sum(P ** 2),  # the ASM, as PyRadiomics/IBSI (skimage's "energy" is its root)
        "entropy": -np.sum(nz * np.log2(nz)),
        "correlation": np.sum((i - mu) * (j - mu) * P) / var if var > 1e-15 else 1.0,
    }


def glcm_features(image: np.ndarray, region: np.ndarray, bins: int) -> dict[str, float]:
    names = ["contrast", "dissimilarity", "homogeneity", "joint_energy", "entropy", "correlation"]
    if not region.any():
        return dict.fromkeys(names, np.nan)
    box = _bounding_box(region)
    inside = region[box]
    levels = np.zeros(inside.shape, dtype=np.int64)  # [x, y, z] of the box
    levels[inside] = quantise(image[box][inside], bins)
    per_direction = [glcm_properties(P / P.sum()) for P in glcm_matrices(levels, bins) if P.sum() > 0]
    if not per_direction:  # a single voxel has no neighbour pair: texture is undefined
        return dict.fromkeys(names, np.nan)
    return {n: float(np.mean([d[n] for d in per_direction])) for n in names}


def _bounding_box(region: np.ndarray) -> tuple[slice, ...]:
    idx = np.argwhere(region)
    return tuple(slice(lo, hi + 1) for lo, hi in zip(idx.min(0), idx.max(0)))


def _prefixed(prefix: str, d: dict) -> dict[str, float]:
    return {f"{prefix}_{k}": float(v) for k, v in d.items()}
