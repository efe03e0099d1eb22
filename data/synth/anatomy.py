"""A T1-CE-like head built once from nilearn's bundled MNI152 2009 template, and warped per subject.

The template brain (skull-stripped T1 plus GM/WM probability maps, 1 mm, shipped inside nilearn; no
download) is resampled to a coarse grid and wrapped in synthetic layers by distance from the brain:
subarachnoid CSF, faintly enhancing dura (brighter along the superior sagittal sinus), skull tables
around fatty marrow, muscle and scalp fat. Cortical veins in sulcal CSF enhance.

Each subject is a random affine pose (rotation, per-axis scale, shift) plus a smooth elastic field,
applied by sampling the template at the subject's scanner grid (one trilinear pass).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from core.errors import InputError
from data.synth.fields import LowFreqField, WaveNoise

TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
# Head box in MNI mm (brain spans x +-72, y -107..73, z -72..82; ~18 mm of skull and scalp around it).
HEAD_BOX_MM = ((-92.0, 92.0), (-127.0, 93.0), (-86.0, 104.0))
# MNI point that sits at the scanner isocentre before the subject's own shift.
ISOCENTRE_MNI = np.array([0.0, -17.0, 16.0])

# Extra-axial layers outward from the brain surface: (outer edge in mm, T1-CE intensity, WM = 1).
LAYERS = (
    (2.5, 0.2),  # subarachnoid CSF
    (3.5, 0.65),  # dura, faintly enhancing
    (5.0, 0.08),  # inner table
    (8.0, 0.55),  # diploe (fatty marrow)
    (9.5, 0.08),  # outer table
    (11.0, 0.45),  # temporalis / galea
    (16.0, 1.1),  # scalp fat
)
# The same layers on FLAIR: CSF suppressed, dura not enhancing, fat still bright.
FLAIR_LAYERS = ((2.5, 0.1), (3.5, 0.6), (5.0, 0.08), (8.0, 0.8), (9.5, 0.08), (11.0, 0.5), (16.0, 1.0))
LAYER_EDGE_MM = 0.6  # softness of layer boundaries
VESSEL_INTENSITY = 1.45
SINUS_INTENSITY = 1.5


@dataclass
class Template:
    intensity: np.ndarray  # [X, Y, Z] float32, T1-CE-like head, normal white matter = 1
    brain: np.ndarray  # [X, Y, Z] float32 in [0, 1]
    wm: np.ndarray  # [X, Y, Z] float32 in [0, 1]
    affine: np.ndarray  # [4, 4] template voxel -> MNI mm
    candidates: np.ndarray  # [N, 3] MNI mm, lesion-centre candidates at the grey-white junction
    depth: np.ndarray  # [N] mm from each candidate to the brain surface
    weight: np.ndarray  # [N] junction score, the sampling preference
    gm: np.ndarray  # [X, Y, Z] float32 grey-matter probability (FLAIR and PET contrast)
    flair_head: np.ndarray  # [X, Y, Z] float32 extra-axial layers on FLAIR (used where brain < 1)
    head: np.ndarray  # [X, Y, Z] float32 in [0, 1], soft tissue or bone outside the brain (not air)

    @property
    def spacing(self) -> float:
        return float(self.affine[0, 0])


def template_dir() -> Path:
    import nilearn.datasets
    return Path(nilearn.datasets.__file__).parent / "data"


@functools.lru_cache(maxsize=2)
def load_template(spacing: float = 1.5) -> Template:
    """Build the head template on a `spacing`-mm grid (a few seconds; cached per process)."""
    folder = template_dir()
    maps = {}
    for key, name in TEMPLATE_FILES.items():
        path = folder / name
        if not path.is_file():
            raise InputError(f"{path}: nilearn's bundled MNI152 file is missing; reinstall nilearn>=0.10")
        img = nib.load(str(path))
        maps[key] = (np.asarray(img.dataobj, dtype=np.float32), img.affine)

    shape = tuple(int(round((hi - lo) / spacing)) + 1 for lo, hi in HEAD_BOX_MM)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = [lo for lo, _ in HEAD_BOX_MM]
    world = [lo + spacing * np.arange(n, dtype=np.float32) for (lo, _), n in zip(HEAD_BOX_MM, shape)]

    def resample(array, src_affine):
        # Both grids are axis-aligned, so trilinear = three 1D linear passes (10x faster than a 3D pass).
        for axis, w in enumerate(world):
            array = _linear_along(array, (w - src_affine[axis, 3]) / src_affine[axis, axis], axis)
        return array

    t1 = resample(*maps["t1"])  # [X, Y, Z], 0..255
    gm = np.clip(resample(*maps["gm"]) / 255.0, 0, 1)
    wm = np.clip(resample(*maps["wm"]) / 255.0, 0, 1)
    t1n = t1 / np.median(t1[wm > 0.9])  # normal white matter = 1

    mask = ndimage.binary_fill_holes(t1n > 0.04)  # [X, Y, Z] bool, brain incl. ventricles
    brain = np.clip(ndimage.gaussian_filter(mask.astype(np.float32), 0.6), 0, 1)
    outside_mm = ndimage.distance_transform_edt(~mask).astype(np.float32) * spacing
    depth_mm = ndimage.distance_transform_edt(mask).astype(np.float32) * spacing

    rng = np.random.default_rng(20090)  # the template is fixed: same veins and layer wobble for everyone
    xyz = np.stack(np.meshgrid(*world, indexing="ij"), axis=-1)  # [X, Y, Z, 3] mm
    wobble = 1.0 + 0.12 * WaveNoise(rng, wavelength=60.0)(xyz)  # layer thickness varies around the head
    head = _layers(outside_mm / wobble)

    # Superior sagittal sinus: the dura along the top of the midline enhances strongly.
    sinus = (np.abs(xyz[..., 0]) < 5) * (xyz[..., 2] > 30) * _band(outside_mm, 2.0, 4.5)
    head = head + sinus * (SINUS_INTENSITY - head)
    # Cortical veins: thin ridges of a noise field inside sulcal CSF near the surface.
    sulcal = (t1n < 0.6) * (depth_mm < 12) * mask
    ridge = np.exp(-0.5 * (WaveNoise(rng, wavelength=25.0)(xyz) / 0.12) ** 2)
    veins = sulcal * ridge
    t1ce = t1n + veins * (VESSEL_INTENSITY - t1n)
    intensity = (brain * t1ce + (1 - brain) * head).astype(np.float32)

    # Lesion centres: grey-white junction (metastases seed there), at least 5 mm inside the brain.
    junction = 4 * gm * wm
    ok = (junction > 0.45) & (depth_mm >= 5) & (t1n > 0.5)
    ix = np.argwhere(ok)
    ix = ix[:: max(1, len(ix) // 20000)]  # a thinned list is plenty and keeps workers light
    candidates = (ix * spacing + affine[:3, 3]).astype(np.float32)
    return Template(intensity=intensity, brain=brain.astype(np.float32), wm=wm.astype(np.float32), affine=affine,
                    candidates=candidates, depth=depth_mm[tuple(ix.T)], weight=junction[tuple(ix.T)],
                    gm=gm.astype(np.float32), flair_head=_layers(outside_mm / wobble, FLAIR_LAYERS).astype(np.float32),
                    head=_step(LAYERS[-1][0] - outside_mm / wobble).astype(np.float32))


def _linear_along(array: np.ndarray, idx: np.ndarray, axis: int) -> np.ndarray:
    """Linear interpolation of `array` at fractional indices `idx` along `axis`; edges repeat
    (so the brainstem continues below the template's lowest slice)."""
    idx = np.clip(idx, 0, array.shape[axis] - 1)
    i0 = np.minimum(np.floor(idx).astype(int), array.shape[axis] - 2)
    f = (idx - i0).astype(np.float32)
    f = f.reshape([-1 if a == axis else 1 for a in range(array.ndim)])
    return np.take(array, i0, axis=axis) * (1 - f) + np.take(array, i0 + 1, axis=axis) * f


def _band(d: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return _step(d - lo) * _step(hi - d)


def _step(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.tanh(x / LAYER_EDGE_MM))


def _layers(d: np.ndarray, layers=LAYERS) -> np.ndarray:
    """Intensity of the extra-axial tissue at distance d (mm) outside the brain; air beyond."""
    out = np.zeros_like(d)
    inner = 0.0
    for outer, value in layers:
        out += value * _band(d, inner, outer)
        inner = outer
    return out


class SubjectWarp:
    """Maps the subject's scanner grid into the template: q = L (p - shift) + isocentre + u(v).

    p is the world (scanner) position of output voxel v, L undoes the head's rotation and size, and
    u is a smooth elastic displacement in mm, defined on the output grid.
    """

    def __init__(self, rng: np.random.Generator, template: Template, out_affine: np.ndarray, out_shape,
                 pose_deg: float, scale_sd: float, shift_mm: float, elastic_mm: float):
        self.template = template
        self.out_affine = np.asarray(out_affine, np.float64)
        self.out_shape = tuple(out_shape)
        angles = np.clip(rng.normal(0, pose_deg, 3), -3 * pose_deg, 3 * pose_deg)
        scale = np.exp(rng.normal(0, scale_sd, 3) + rng.normal(0, scale_sd))  # per axis and overall
        self.head_scale = scale
        rot = Rotation.from_euler("xyz", angles, degrees=True).as_matrix()
        lin = np.linalg.inv(rot @ np.diag(scale))  # world -> template directions
        shift = rng.normal(0, shift_mm, 3)
        # Output voxel -> template voxel, affine part.
        t_inv = np.linalg.inv(template.affine)
        m = lin @ self.out_affine[:3, :3]
        b = lin @ (self.out_affine[:3, 3] - shift) + ISOCENTRE_MNI
        self.vox_to_mm = (m, b)  # template mm = m v + b (+ u)
        self.t_inv = t_inv
        self.elastic = LowFreqField(rng, self.out_shape, order=4, std=elastic_mm, n_fields=3)

    def template_vox_grid(self) -> np.ndarray:
        """Template voxel coordinates of every output voxel, [3, X, Y, Z] float32."""
        return self.template_vox_on_axes([np.arange(n, dtype=np.float32) for n in self.out_shape])

    def template_vox_on_axes(self, axes: list[np.ndarray]) -> np.ndarray:
        """Template voxel coordinates of the grid spanned by output-voxel coordinates along each axis
        (3 arrays [n_i] float32, may be fractional or outside the scan, e.g. a PET grid): [3, n0, n1, n2]."""
        m, b = self.vox_to_mm
        mm = self.elastic.on_axes(axes)  # [3, n0, n1, n2] displacement in mm
        for c in range(3):
            mm[c] += (m[c, 0] * axes[0][:, None, None] + m[c, 1] * axes[1][None, :, None]
                      + m[c, 2] * axes[2][None, None, :] + b[c]).astype(np.float32)
        s, o = self.t_inv[0, 0], self.t_inv[:3, 3]  # the template grid is isotropic, axis-aligned
        for c in range(3):
            mm[c] = mm[c] * s + o[c]
        return mm

    def template_mm(self, vox: np.ndarray) -> np.ndarray:
        """Template mm of output voxel coordinates vox [N, 3] -> [N, 3]."""
        m, b = self.vox_to_mm
        return vox @ m.T + b + self.elastic.at(vox).T

    def output_vox(self, q: np.ndarray, iterations: int = 6) -> np.ndarray:
        """Inverse map: output voxel coordinates of template mm points q [N, 3] (fixed-point on u)."""
        m, b = self.vox_to_mm
        m_inv = np.linalg.inv(m)
        v = (np.atleast_2d(q) - b) @ m_inv.T
        for _ in range(iterations):
            v = (q - b - self.elastic.at(v).T) @ m_inv.T
        return v

    def sample(self, array: np.ndarray, tvox: np.ndarray) -> np.ndarray:
        """Trilinear read of a template array at template voxel coordinates tvox [3, ...]."""
        return ndimage.map_coordinates(array, tvox, order=1, mode="constant", cval=0.0, prefilter=False)
