"""FLAIR and FET-PET beside the T1-CE of one scan (`--sequences t1ce,flair,pet`).

Both are drawn from the same subject, head pose and lesions as the T1-CE, but every random number
they need comes from streams of their own, derived from the scan's seed with an extra spawn key: the
T1-CE stream's sequence of draws, and so the T1-CE files, do not change when they are requested.

- FLAIR: same grid as the T1-CE. CSF is dark, cortex a little brighter than white matter, and the
  oedema the T1-CE renderer drew hypointense is hyperintense. The lesion itself shows the T1/T2
  "match / mismatch" sign (Kano et al., Neurosurgery 2010): in progression its FLAIR margin is sharp
  and matches the enhancing region; in radiation necrosis it is ill-defined and smaller. The sign is
  drawn per lesion (P(match) 0.75 vs 0.25 by default), so it helps but does not classify.
- FET-PET: its own isotropic grid and field of view, stored RAS, registered to the MRI in world mm.
  Background uptake follows the tissue maps (GM > WM > CSF); the enhancing part of a lesion takes up
  TBR x the mean normal-brain SUV, with TBR log-normal by label (FET's cut-off is near TBR 2), the
  necrotic core less. The scanner's PSF, calibration and noise are site-level; SUV becomes Bq/mL with
  the patient's injected dose, weight and minutes since injection.
"""
from __future__ import annotations

import dataclasses
import functools
import shutil
from pathlib import Path

import numpy as np
from scipy import ndimage

from data.nifti import save_volume
from data.pet import suv_factor
from data.synth.anatomy import SubjectWarp, Template, load_template
from data.synth.params import CohortParams, FlairParams, PetParams
from data.synth.scanner import acquire, jitter, to_storage

SEQUENCE_STREAM = 0x5E9  # extra spawn-key entry of a scan's FLAIR/PET streams (never spawned otherwise)
FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))


def scan_streams(seed: np.random.SeedSequence) -> tuple[np.random.Generator, ...]:
    """(per-lesion draws, FLAIR acquisition, PET grid and acquisition): three streams of one scan, apart
    from each other so e.g. adding PET leaves the FLAIR bytes alone."""
    key = tuple(seed.spawn_key) + (SEQUENCE_STREAM,)
    return tuple(np.random.default_rng(np.random.SeedSequence(seed.entropy, spawn_key=key + (i,))) for i in range(3))


def draw_lesion_sequences(rng: np.random.Generator, label: int | None, fp: FlairParams, pp: PetParams) -> dict:
    """One lesion's FLAIR sign and FET TBR. label: 1 progression, 0 necrosis, None unknown (non-index
    or unlabeled lesions: match with P = match_p_unknown, TBR from a 50/50 mix of the two classes).
    The same four numbers are drawn whatever the label, so the stream stays aligned."""
    u_match, u_degree, u_mix, z = rng.random(), rng.random(), rng.random(), rng.standard_normal()
    if label is None:
        p_match, progression = fp.match_p_unknown, u_mix < 0.5
    else:
        p_match = fp.match_p_progression if int(label) == 1 else fp.match_p_necrosis
        progression = int(label) == 1
    match = u_match < p_match
    lo, hi = fp.mismatch_range
    median = pp.tbr_median_progression if progression else pp.tbr_median_necrosis
    return {"flair_match": int(match), "flair_mismatch": 0.0 if match else lo + (hi - lo) * u_degree,
            "pet_tbr": float(median * np.exp(pp.tbr_log_sd * z))}


def _tissue_mix(t: Template, gm: float, wm: float, csf: float, head: np.ndarray) -> np.ndarray:
    csf_p = np.clip(1.0 - t.gm - t.wm, 0.0, 1.0)  # [X, Y, Z] what is neither GM nor WM inside the brain
    inside = t.gm * gm + t.wm * wm + csf_p * csf
    return (t.brain * inside + (1.0 - t.brain) * head).astype(np.float32)


@functools.lru_cache(maxsize=4)
def _contrasts(spacing: float, flair: tuple, suv: tuple) -> tuple[np.ndarray, np.ndarray, float]:
    """Template-space FLAIR [X, Y, Z] (normal WM = 1), background SUV [X, Y, Z], and the mean SUV of
    normal brain (the TBR reference); built once per process and parameter set."""
    t = load_template(spacing)
    flair_t = _tissue_mix(t, *flair, head=t.flair_head)
    suv_t = _tissue_mix(t, *suv[:3], head=suv[3] * t.head)
    return flair_t, suv_t, float(suv_t[t.brain > 0.5].mean())


def _sigmoid(x):
    return 0.5 * (1 + np.tanh(0.5 * x))


def flair_lesion(before: np.ndarray, parts: dict, draw: dict, fp: FlairParams, voxel_mm: float) -> np.ndarray:
    """One lesion on FLAIR in its box [...]: hyperintense oedema around a lesion whose margin matches
    the enhancing one (mismatch 0) or is shrunk and blurred by the mismatch degree."""
    around = before + parts["oedema"] * (fp.oedema - before)  # the T1 renderer's oedema extent
    k = float(draw["flair_mismatch"])
    radius = parts["Ru"] * (1.0 - fp.mismatch_shrink * k)  # mm, per direction
    width = 0.3 * voxel_mm + 0.3 + fp.mismatch_blur_mm * k  # a matching margin is sharp
    a = _sigmoid(2.0 * (radius - parts["r"]) / width)
    lesion = fp.necrotic + (fp.solid - fp.necrotic) * np.clip(parts["frac"] * parts["hetero"], 0, 1)
    return ((1 - a) * around + a * lesion).astype(np.float32)


def pet_lesion(before: np.ndarray, parts: dict, draw: dict, pp: PetParams, suv_ref: float) -> np.ndarray:
    """One lesion's FET uptake (SUV) in its box [...]: TBR x reference in the enhancing part, less in
    the necrotic core, slightly lowered uptake in the oedema."""
    around = before * (1.0 - pp.oedema_depth * parts["oedema"])
    share = pp.core_uptake + (1.0 - pp.core_uptake) * np.clip(parts["frac"], 0, 1)
    hot = draw["pet_tbr"] * suv_ref * share
    a = parts["alpha"]
    return ((1 - a) * around + a * hot).astype(np.float32)


class ExtraSequences:
    """FLAIR and PET of one scan, drawn lesion by lesion beside the T1-CE, then acquired and written."""

    def __init__(self, job, params: CohortParams, template: Template, warp: SubjectWarp, tvox: np.ndarray):
        self.job, self.p, self.warp = job, params, warp
        self.draw_rng, self.flair_rng, self.pet_rng = scan_streams(job.seed)
        f, q = params.flair, params.pet
        flair_t, self.suv_t, self.suv_ref = _contrasts(
            params.template_spacing_mm, (f.grey_matter, f.white_matter, f.csf),
            (q.suv_grey_matter, q.suv_white_matter, q.suv_csf, q.suv_head))
        self.flair = warp.sample(flair_t, tvox) if job.flair else None  # [X, Y, Z], normal WM = 1
        self.suv_bg = warp.sample(self.suv_t, tvox) if job.pet else None  # [X, Y, Z] SUV without lesions
        self.suv = self.suv_bg.copy() if job.pet else None  # [X, Y, Z] SUV with lesions
        self.draws: list[dict] = []  # per lesion, in drawing order (index lesions first)

    def add_lesion(self, box: tuple, keep: np.ndarray, parts: dict, voxel_mm: float) -> dict:
        """Draw lesion number len(draws) into the box; `keep` [...] protects earlier lesions as on T1."""
        i = len(self.draws)
        label = self.job.labels[i] if i < len(self.job.labels) else None
        draw = draw_lesion_sequences(self.draw_rng, label, self.p.flair, self.p.pet)
        self.draws.append(draw)
        if self.flair is not None:
            before = self.flair[box]
            self.flair[box] = keep * before + (1 - keep) * flair_lesion(before, parts, draw, self.p.flair, voxel_mm)
        if self.suv is not None:
            before = self.suv[box]
            self.suv[box] = keep * before + (1 - keep) * pet_lesion(before, parts, draw, self.p.pet, self.suv_ref)
        return draw

    def write(self, root: Path, affine: np.ndarray) -> None:
        """Acquire and write FLAIR (on the T1-CE grid and storage) and PET (its own RAS grid)."""
        site, level = self.job.site, self.p.gzip_level
        if self.flair is not None:
            flair_site = dataclasses.replace(site, noise=site.noise * self.p.flair.noise_factor)
            acq = jitter(flair_site, self.flair_rng)
            image = acquire(self.flair, flair_site, acq, self.flair_rng)  # [X, Y, Z] int16
            stored, stored_affine = to_storage(image, affine, site.orientation)
            _save_copies(root, self.job.flair, stored, stored_affine, level)
        if self.suv is not None:
            suv, pet_affine = self.pet_suv(affine)
            dose, weight, minutes = self.job.pet_injection
            # Bq/mL of SUV 1: the inverse of what preprocessing multiplies by (data.pet.suv_factor)
            bq = suv * np.float32(1.0 / suv_factor(dose, weight, minutes, self.p.pet.half_life_min))
            _save_copies(root, self.job.pet, bq.astype(np.float32), pet_affine, level)

    def pet_suv(self, mri_affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Reconstructed SUV on the PET grid [Px, Py, Pz] float32 and its RAS affine.

        The background is sampled from the template at the PET voxels' own world positions (so the
        larger PET field of view has no MRI edge in it); the lesions, drawn on the MRI grid, are
        resampled into it through the two affines. Then PSF, noise and the scanner's calibration."""
        ps, rng = self.job.pet_site, self.pet_rng
        v = float(ps.voxel_mm)
        n = np.maximum(np.round(np.asarray(ps.fov_mm) / v).astype(int), 1)
        origin = -(n - 1) * v / 2 + np.round(rng.normal(0, ps.offset_mm, 3), 2)  # FOV centre set by hand
        pet_affine = np.diag([v, v, v, 1.0])
        pet_affine[:3, 3] = origin
        # Both grids are RAS and axis-aligned: the MRI voxel coordinate of PET voxel i along each axis.
        axes = [((origin[a] + v * np.arange(n[a])) - mri_affine[a, 3]) / mri_affine[a, a] for a in range(3)]
        axes = [ax.astype(np.float32) for ax in axes]
        suv = self.warp.sample(self.suv_t, self.warp.template_vox_on_axes(axes))  # [Px, Py, Pz]
        mri_vox = np.stack(np.meshgrid(*axes, indexing="ij"))  # [3, Px, Py, Pz]
        suv += ndimage.map_coordinates(self.suv - self.suv_bg, mri_vox, order=1, mode="constant", cval=0.0,
                                       prefilter=False)
        suv = ndimage.gaussian_filter(suv, ps.fwhm_mm / FWHM_PER_SIGMA / v, mode="constant", truncate=3.0)
        # Reconstruction noise: spatially correlated, its variance grows with the counts (uptake).
        noise = ndimage.gaussian_filter(rng.standard_normal(suv.shape, dtype=np.float32), 0.8)
        noise /= max(float(noise.std()), 1e-6)
        calibration = ps.calibration * np.exp(0.03 * rng.standard_normal())  # per-scan drift
        suv = np.maximum(suv + np.float32(ps.noise) * np.sqrt(np.maximum(suv, 0)) * noise, 0)
        return (suv * np.float32(calibration)).astype(np.float32), pet_affine


def _save_copies(root: Path, paths: list[str], array: np.ndarray, affine: np.ndarray, level: int) -> None:
    """One file per subject row of the scan (a patient with two index lesions has two identical ones)."""
    if not paths:
        return
    save_volume(root / paths[0], array, affine, dtype=array.dtype, compresslevel=level)
    for rel in paths[1:]:
        shutil.copyfile(root / paths[0], root / rel)
