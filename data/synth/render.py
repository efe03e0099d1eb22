"""One scan: warp the template into the subject's scanner grid, place and draw lesions, acquire, write.

A `ScanJob` carries everything a worker needs, including its own seed, so the files do not depend on
how many workers run or in which order.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.errors import InputError
from data.nifti import save_volume
from data.synth.anatomy import SubjectWarp, load_template
from data.synth.lesions import physical, reach_mm, render_lesion, sample_latents
from data.synth.params import CohortParams, PetSiteParams, SiteParams
from data.synth.scanner import acquire, jitter, scan_grid, to_storage
from data.synth.sequences import ExtraSequences

MASK_THRESHOLD = 0.5  # lesion occupancy above which a voxel belongs to the index-lesion mask


@dataclass
class ScanJob:
    scan_id: str
    site: SiteParams
    seed: np.random.SeedSequence
    images: list[str]  # relative paths the image is written to (one per index lesion, or one)
    lesions: list[dict]  # physical parameters per lesion (scalars); index lesions first
    masks: list[str | None] = field(default_factory=list)  # per lesion: mask path, None = not an index lesion
    n_extra: int = 0  # further non-index lesions drawn from the scan's own stream
    steroid: int = 0
    labels: list[int] = field(default_factory=list)  # per index lesion (FLAIR sign, PET TBR); none if unknown
    flair: list[str] = field(default_factory=list)  # FLAIR paths like `images`; empty = no FLAIR
    pet: list[str] = field(default_factory=list)  # PET paths like `images`; empty = no PET
    pet_site: PetSiteParams | None = None
    pet_injection: tuple[float, float, float] | None = None  # dose (MBq), weight (kg), minutes to scan


def _place(rng, template, warp: SubjectWarp, radius_mm: float, placed: list[tuple[np.ndarray, float]],
           gap_mm: float) -> np.ndarray:
    """Template-mm centre at the grey-white junction, deep enough for the lesion, clear of the others,
    and inside the scan's field of view."""
    scale = float(np.mean(warp.head_scale))
    r_t = radius_mm / scale  # radius in template mm
    for relax in (1.0, 0.6, 0.3, 0.0):
        ok = template.depth >= relax * r_t + 2.0
        for centre, r_other in placed:
            ok &= np.linalg.norm(template.candidates - centre, axis=1) >= relax * (r_t + r_other + gap_mm / scale)
        idx = np.flatnonzero(ok)
        if len(idx) == 0:
            continue
        w = template.weight[idx] / template.weight[idx].sum()
        for i in rng.choice(idx, size=min(20, len(idx)), replace=False, p=w):
            v = warp.output_vox(template.candidates[i][None])[0]
            if np.all(v >= 2) and np.all(v <= np.asarray(warp.out_shape) - 3):
                placed.append((template.candidates[i], r_t))
                return v
    raise InputError(f"no room for a {radius_mm:.1f} mm lesion in the brain; lower lesion.radius_mm_range")


def render_scan(job: ScanJob, root: Path, params: CohortParams) -> dict[str, dict]:
    """Render and write one scan; returns {mask path: {"lesion_volume_ml", and with FLAIR or PET the
    index lesion's "flair_match", "flair_mismatch", "pet_tbr"}}."""
    rng = np.random.default_rng(job.seed)
    template = load_template(params.template_spacing_mm)
    affine, shape = scan_grid(job.site, rng)
    acq = jitter(job.site, rng)
    warp = SubjectWarp(rng, template, affine, shape, params.head_pose_deg, params.head_scale_sd,
                       params.head_shift_mm, params.elastic_mm)
    tvox = warp.template_vox_grid()  # [3, X, Y, Z] template voxel of every scan voxel
    truth = warp.sample(template.intensity, tvox)  # [X, Y, Z], normal WM = 1
    # FLAIR and PET draw from streams of their own: `rng` sees exactly the draws it always did.
    seqs = ExtraSequences(job, params, template, warp, tvox) if (job.flair or job.pet) else None

    lesions, masks = list(job.lesions), list(job.masks)
    if job.n_extra:
        lat = sample_latents(rng, job.n_extra, params.lesion)
        ph = physical(lat, np.full(job.n_extra, job.steroid), params.lesion)
        lesions += [{k: float(v[i]) for k, v in ph.items()} for i in range(job.n_extra)]
        masks += [None] * job.n_extra

    spacing = np.asarray(job.site.spacing, float)
    occupied = np.zeros(shape, np.float32)  # [X, Y, Z] max occupancy of lesions drawn so far
    placed: list = []
    volumes = {}
    for ph, mask_path in zip(lesions, masks):
        centre = _place(rng, template, warp, ph["radius_mm"], placed, params.lesion.min_gap_mm)
        half = np.ceil(reach_mm(ph) / spacing).astype(int)
        lo = np.maximum(np.floor(centre).astype(int) - half, 0)
        hi = np.minimum(np.floor(centre).astype(int) + half + 1, shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        axes = [(np.arange(a, b) - c) * s for a, b, c, s in zip(lo, hi, centre, spacing)]
        x = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).astype(np.float32)  # [bx, by, bz, 3] mm
        tv = tvox[(slice(None),) + box]  # [3, bx, by, bz]
        brain, wm = warp.sample(template.brain, tv), warp.sample(template.wm, tv)
        before = truth[box]
        parts: dict = {}
        drawn, alpha = render_lesion(x, before, brain, wm, ph, rng, float(spacing.mean()), params.lesion.oedema_depth,
                                     parts)
        keep = occupied[box]  # earlier lesions are not overdrawn by this one's oedema or satellites
        truth[box] = keep * before + (1 - keep) * drawn
        draw = seqs.add_lesion(box, keep, parts, float(spacing.mean())) if seqs is not None else {}
        if mask_path is not None:
            m = np.zeros(shape, np.uint8)
            m[box] = (alpha * (1 - keep)) >= MASK_THRESHOLD
            volumes[mask_path] = (m, draw)
        occupied[box] = np.maximum(keep, alpha)

    image = acquire(truth, job.site, acq, rng)
    stored, stored_affine = to_storage(image, affine, job.site.orientation)
    save_volume(root / job.images[0], stored, stored_affine, dtype=stored.dtype, compresslevel=params.gzip_level)
    for rel in job.images[1:]:  # a scan with several index lesions: one identical image file per subject row
        shutil.copyfile(root / job.images[0], root / rel)
    if seqs is not None:
        seqs.write(root, affine)
    out = {}
    for rel, (m, draw) in volumes.items():
        m_stored, _ = to_storage(m, affine, job.site.orientation)
        save_volume(root / rel, m_stored, stored_affine, dtype=m_stored.dtype, compresslevel=params.gzip_level)
        out[rel] = {"lesion_volume_ml": float(m.sum() * np.prod(spacing) / 1000.0), **draw}
    return out
