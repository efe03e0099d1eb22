"""Treated brain metastases on T1-CE: latent features -> physical parameters -> voxels.

Tumour progression and radiation necrosis are not told apart by one global intensity but by
morphology, driven by continuous latents (so the classes overlap):
- progression: thick, nodular enhancing rim and solid enhancing parts, lobulated margin that fades
  into the surrounding tissue (infiltrative), speckled nodular enhancement around it;
- necrosis: thin rim, large necrotic core split by thin enhancing septa ("soap bubble" / "Swiss
  cheese"), smooth sharp margin, relatively more T1-hypointense peritumoral oedema.
Lesion size, enhancement strength and fluid intensity are nuisances independent of the class.
"""
from __future__ import annotations

import numpy as np
from scipy.special import ndtr, ndtri

from data.synth.fields import WaveNoise
from data.synth.params import LATENTS, LesionParams


def sample_latents(rng: np.random.Generator, n: int, p: LesionParams) -> dict[str, np.ndarray]:
    """Standardised latents z_<name> [n] sharing one factor g, plus size and nuisance draws."""
    g = rng.standard_normal(n)
    out = {}
    for name, lam in zip(LATENTS, p.loadings):
        out[f"z_{name}"] = lam * g + np.sqrt(1 - lam ** 2) * rng.standard_normal(n)
    lo, hi = p.radius_mm_range
    out["radius_mm"] = np.clip(p.radius_mm_median * np.exp(p.radius_log_sd * rng.standard_normal(n)), lo, hi)
    out["enhancement"] = rng.uniform(*p.enhancement_range, n)
    out["necrotic"] = rng.uniform(*p.necrotic_range, n)
    return out


def _span(z: np.ndarray, lo_hi) -> np.ndarray:
    lo, hi = lo_hi
    return lo + (hi - lo) * ndtr(z)


def physical(lat: dict[str, np.ndarray], steroid: np.ndarray, p: LesionParams) -> dict[str, np.ndarray]:
    """Latents (and steroid use, which shrinks oedema) -> mm and fractions the renderer draws."""
    r = lat["radius_mm"]
    oedema_ratio = _span(lat["z_oedema"], p.oedema_ratio_range)
    return {
        "radius_mm": r,
        "rim_mm": np.minimum(_span(lat["z_rim"], p.rim_mm_range), 0.75 * r),
        "nodularity": ndtr(lat["z_nodularity"]),
        "core_fraction": _span(lat["z_core"], p.core_fraction_range),
        "oedema_mm": np.minimum(oedema_ratio * r * np.where(steroid > 0, p.steroid_oedema_factor, 1.0), 30.0),
        "peritumoral": ndtr(lat["z_peritumoral"]),
        "irregularity": _span(lat["z_irregularity"], p.irregularity_range),
        "septation": ndtr(lat["z_septation"]),
        "enhancement": lat["enhancement"],
        "necrotic": lat["necrotic"],
    }


def reach_mm(ph: dict) -> float:
    """How far from the centre a lesion changes the image (margin, oedema, satellites)."""
    return float(ph["radius_mm"] * (1 + 2 * ph["irregularity"]) + ph["oedema_mm"] + 6.0)


def _sigmoid(x):
    return 0.5 * (1 + np.tanh(0.5 * x))


def render_lesion(x: np.ndarray, tissue: np.ndarray, brain: np.ndarray, wm: np.ndarray, ph: dict,
                  rng: np.random.Generator, voxel_mm: float, oedema_depth: float,
                  parts: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Draw one lesion into a box of the image.

    x: [..., 3] mm from the lesion centre; tissue, brain, wm: [...] image (WM = 1) and tissue
    probabilities on the same box. Returns (new tissue [...], lesion occupancy alpha [...] in [0, 1]).
    `parts`, if given, is filled with the maps other sequences redraw the same lesion from (FLAIR, PET):
    r and Ru (mm), edge (mm), enhancing fraction `frac`, texture `hetero`, `oedema` and `alpha` [...].
    """
    R = float(ph["radius_mm"])
    r = np.sqrt((x ** 2).sum(-1)) + 1e-3  # [...]
    u = x / r[..., None]  # unit direction

    # Margin: low-order lobulation plus finer spiculation, both scaled by irregularity.
    irr = float(ph["irregularity"])
    lobes = 0.8 * WaveNoise(rng, 2.5, n_waves=8)(u * 2.0) + 0.6 * WaveNoise(rng, 1.0, n_waves=8)(u * 2.0)
    Ru = R * np.clip(1 + irr * lobes, 0.5, None)
    ptex = float(ph["peritumoral"])
    edge = 0.3 * voxel_mm + 0.3 + 1.5 * ptex  # infiltrative margin fades, necrosis' margin is sharp
    alpha = _sigmoid((Ru - r) / edge * 2.0)

    # Enhancing rim, thickened into nodules where a noise field is high.
    nod = float(ph["nodularity"])
    t = float(ph["rim_mm"]) * (1 + 1.5 * nod * np.maximum(WaveNoise(rng, max(0.8 * R, 5.0))(x), 0))
    inner = Ru - np.minimum(t, 0.95 * Ru)
    rim = _sigmoid((r - inner) / (0.3 * voxel_mm + 0.2) * 2.0)

    # Solid enhancing parts inside: the noise exceeds the core-fraction quantile.
    q = ndtri(np.clip(float(ph["core_fraction"]), 0.01, 0.99))
    solid = _sigmoid((WaveNoise(rng, max(0.9 * R, 6.0))(x) - q) / 0.12)

    # Soap-bubble septa: thin walls where the two nearest of a few cyst centres are equidistant.
    n_cells = 3 + int(round(5 * float(ph["septation"])))
    c = rng.standard_normal((n_cells, 3))
    c *= (0.75 * R * rng.uniform(0, 1, n_cells) ** (1 / 3) / np.linalg.norm(c, axis=1))[:, None]
    d = np.sqrt(((x[..., None, :] - c.astype(np.float32)) ** 2).sum(-1))  # [..., cells]
    d.sort(axis=-1)
    septa = float(ph["septation"]) * np.exp(-0.5 * ((d[..., 1] - d[..., 0]) / 0.6) ** 2) * (r < inner)

    enh, fluid = float(ph["enhancement"]), float(ph["necrotic"])
    frac = np.maximum(np.maximum(rim, 0.9 * solid), 0.85 * septa)
    hetero = 1 + 0.08 * WaveNoise(rng, 3.0)(x)
    lesion = fluid + (enh - fluid) * frac * hetero

    # Peritumoral oedema: T1-hypointense, follows white matter, finger-like extent.
    dist = r - Ru  # mm outside the margin
    extent = float(ph["oedema_mm"]) * (1 + 0.35 * WaveNoise(rng, 2.0, n_waves=8)(u * 2.0))
    oedema = _sigmoid((extent - dist) / (0.2 * float(ph["oedema_mm"]) + 1.5) * 2.0) * brain * (0.3 + 0.7 * wm)
    around = tissue * (1 - oedema_depth * oedema)

    # Nodular / speckled enhancement in a shell outside the margin (infiltration, satellites).
    speck = _sigmoid((WaveNoise(rng, 5.0)(x) - 1.0) / 0.15) * np.exp(-np.maximum(dist, 0) / 4.0) * (dist > -1.0)
    around = around + ptex * speck * brain * np.maximum(0.8 * enh - around, 0)

    out = (1 - alpha) * around + alpha * lesion
    if parts is not None:
        parts.update(r=r, Ru=Ru, edge=edge, frac=frac, hetero=hetero, oedema=oedema, alpha=alpha)
    return out.astype(np.float32), alpha.astype(np.float32)
