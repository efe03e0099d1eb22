"""A brain mask from a head image, erosion / dilation by a distance in mm, and the head (foreground) mask, its
box and the Otsu threshold that data.prepare crops and normalises with.

    brain_mask(image, spacing) -> [X, Y, Z] bool

The estimate, for a volume without a drawn brain mask (what data/pet.py takes the TBR reference from,
and what lesion search may use to pass over scalp):

    head   = the image's foreground (`foreground_mask`: Otsu, holes filled), or `head`, with holes also
             filled in every axial, coronal and sagittal slice: where the field of view cuts the head (the
             neck, the vertex) the skull is no closed shell in 3D, and CSF and bone would stay holes that the
             erosion below grows from, deep into the brain
    inner  = head eroded by `head_erode_mm`: scalp, skull and most of the meninges leave
    tissue = inner voxels brighter than Otsu's threshold over `inner` (MRI: grey and white matter against
             CSF, ventricles and bone, which are dark on T1, T1-CE and FLAIR; CT: 0..80 HU instead;
             PET: no cut, its contrast does not separate tissue from CSF reliably)
    brain  = the largest connected component of `tissue` eroded by `open_mm` (thin bridges to a scalp or
             muscle remnant break), grown back by `open_mm` inside `tissue` (the cortex returns)

So the mask is brain parenchyma (grey and white matter; a T2-weighted first channel, where CSF is bright,
would keep CSF: give a brain-mask column then). No library does this on a head that is not
skull-stripped without a model (SynthStrip, HD-BET need weights), hence by hand with scipy and
scikit-image.

Morphology in mm uses Euclidean distance transforms (`scipy.ndimage.distance_transform_edt` with the
voxel spacing), O(voxels) whatever the radius. The definition is that of a closed ellipsoidal ball:

    erode_mm(m, r)[p]  = no voxel q outside m (the volume's border counts as outside) has |p - q|_mm <= r
    dilate_mm(m, r)[p] = some voxel q in m has |p - q|_mm <= r

which equals scipy's binary_erosion / binary_dilation with the ball {offsets d : |d|_mm <= r} (border_value
0), as tests/test_brain_mask.py checks on an anisotropic grid.
"""
from __future__ import annotations

import numpy as np
from monai.transforms.utils import generate_spatial_bounding_box
from scipy import ndimage
from scipy.ndimage import binary_fill_holes
from skimage.filters import threshold_otsu

CT_BODY_HU = -500.0  # above air and lung, below fat: voxels inside the body for the foreground box
# A distance within this of the radius counts as on the ball (sqrt rounding; real gaps are >> 1e-6 mm).
_TOL_MM = 1e-6
CT_BRAIN_HU = (0.0, 80.0)  # grey and white matter, blood; CSF (0..15 HU) partly, bone and fat not


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold (scikit-image) on values clipped to min..99.9th percentile.

    The clip keeps a few very bright voxels (vessels, fat, artefacts) from squashing the histogram
    into a handful of bins, where Otsu would cut inside the background.
    """
    lo, hi = float(values.min()), float(np.percentile(values, 99.9))
    if hi <= lo:
        hi = float(values.max())
    return float(threshold_otsu(np.clip(values, lo, hi), nbins=bins))


def foreground_mask(image: np.ndarray, modality: str) -> np.ndarray:
    """Head/body voxels of `image` [X,Y,Z] as bool: CT above CT_BODY_HU; MRI (and PET) above Otsu, holes filled."""
    if modality == "ct":
        return image > CT_BODY_HU
    # Filling holes keeps dark structures enclosed by tissue (ventricles, necrotic cores) in the foreground.
    return binary_fill_holes(image > otsu_threshold(image))


def foreground_box(fg: np.ndarray, mask: np.ndarray | None, margin: int) -> tuple[list[int], list[int]]:
    """Box [start, end) around foreground ∪ lesion, grown by `margin` and clipped to the volume."""
    keep = fg if mask is None else (fg | (mask > 0))
    start, end = generate_spatial_bounding_box(keep[None], margin=margin, allow_smaller=True)
    start, end = [int(s) for s in start], [int(e) for e in end]
    if any(e <= s for s, e in zip(start, end)):  # nothing selected: keep the whole volume
        return [0, 0, 0], list(fg.shape)
    return start, end


def erode_mm(mask: np.ndarray, radius_mm: float, spacing) -> np.ndarray:
    """`mask` [X, Y, Z] eroded by a ball of `radius_mm` (voxels outside the volume count as background)."""
    mask = np.asarray(mask, bool)
    if radius_mm <= 0 or not mask.any():
        return mask.copy()
    # One background layer around the volume stands for everything outside it, as border_value=0 does.
    padded = np.pad(mask, 1, constant_values=False)  # [X+2, Y+2, Z+2]
    depth = ndimage.distance_transform_edt(padded, sampling=[float(s) for s in spacing])[1:-1, 1:-1, 1:-1]
    return depth > radius_mm + _TOL_MM


def dilate_mm(mask: np.ndarray, radius_mm: float, spacing) -> np.ndarray:
    """`mask` [X, Y, Z] grown by a ball of `radius_mm`."""
    mask = np.asarray(mask, bool)
    if radius_mm <= 0 or not mask.any():
        return mask.copy()
    away = ndimage.distance_transform_edt(~mask, sampling=[float(s) for s in spacing])  # [X, Y, Z] mm to mask
    return away <= radius_mm + _TOL_MM


def fill_slices(mask: np.ndarray) -> np.ndarray:
    """`mask` [X, Y, Z] with its 3D holes and the holes of each slice along every axis filled."""
    out = ndimage.binary_fill_holes(mask)
    for axis in range(3):
        plane = np.zeros((3, 3, 3), bool)  # a 2D cross in the slice across `axis`: background flows in-plane only
        index = [slice(None)] * 3
        index[axis] = 1
        plane[tuple(index)] = ndimage.generate_binary_structure(2, 1)
        out |= ndimage.binary_fill_holes(mask, structure=plane)
    return out


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of `mask` [X, Y, Z] (empty in, empty out)."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if n <= 1:
        return labels > 0
    sizes = np.bincount(labels.ravel())[1:]  # [n]
    return labels == 1 + int(np.argmax(sizes))


def brain_mask(image: np.ndarray, spacing, *, head: np.ndarray | None = None, modality: str = "mri",
               head_erode_mm: float = 8.0, open_mm: float = 3.0) -> np.ndarray:
    """Brain parenchyma of a head image [X, Y, Z] on a grid of `spacing` mm -> [X, Y, Z] bool (see the module
    docstring). `head`: the head mask when the caller has it already (else the image's foreground).
    Empty when nothing qualifies; the caller decides whether that is an error."""
    image = np.asarray(image, np.float32)
    head = fill_slices(foreground_mask(image, modality) if head is None else np.asarray(head, bool))
    inner = erode_mm(head, head_erode_mm, spacing)
    if not inner.any():
        return inner
    if modality == "ct":
        tissue = inner & (image >= CT_BRAIN_HU[0]) & (image <= CT_BRAIN_HU[1])
    elif modality == "pet":
        tissue = inner
    else:
        values = image[inner]
        tissue = inner & (image > otsu_threshold(values)) if values.max() > values.min() else inner
    core = largest_component(erode_mm(tissue, open_mm, spacing))
    if not core.any():  # a brain thinner than 2 x open_mm: keep the component without opening
        return largest_component(tissue)
    return dilate_mm(core, open_mm, spacing) & tissue
