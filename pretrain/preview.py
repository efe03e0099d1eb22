"""Reconstruction previews: orthogonal slices of input, masked input and reconstruction per level.

Per level the sample with the most tissue is shown (a random level-3 sub-volume is often all
background, which would give a black row), each view cut through the most tissue along its axis.
Masked patches are drawn in blue, so a hidden patch is not mistaken for background.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import matplotlib
import numpy as np
import torch

# Figure objects (not pyplot) render with Agg and touch no global backend or figure registry.
from matplotlib.figure import Figure

from core.atomic import write_png
from models.mim import reconstruct_volumes

MASKED_COLOUR = "#3b78c4"
TISSUE_SHARE = 0.05  # a voxel is tissue above background + this share of the (background .. p99) range
# Volumes are [C, D, H, W] in RAS: D = x (R-L), H = y (A-P), W = z (S-I). (name, axis cut across)
VIEWS = (("axial", 2), ("coronal", 1), ("sagittal", 0))


def _masked_input(x: torch.Tensor, mask: torch.Tensor, p: int) -> torch.Tensor:
    """x [B, C, S, S, S] with its masked patches (mask [B, N], True = masked) set to NaN."""
    b, s = x.shape[0], x.shape[-1]
    g = s // p
    m = mask.reshape(b, 1, g, g, g)
    m = m.repeat_interleave(p, 2).repeat_interleave(p, 3).repeat_interleave(p, 4)  # [B, 1, S, S, S]
    return x.masked_fill(m, float("nan"))


def _background_and_range(levels, background: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per level-1 crop: background value (the crop's minimum: prepared volumes are padded and set to
    it outside the head) and its 99th percentile, each [B_1]."""
    x = levels[0].x.detach().float().flatten(1)  # [B_1, C*S^3]
    bg = x.amin(dim=1) if background is None else torch.full((x.shape[0],), float(background))
    return bg, torch.quantile(x, 0.99, dim=1)


def tissue(x: torch.Tensor, bg: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Tissue voxels of x [B, C, S, S, S] (bool, same shape), given per-sample background and p99 [B]."""
    cut = bg + TISSUE_SHARE * (hi - bg).clamp(min=1e-6)  # [B]
    return x > cut.view(-1, *[1] * (x.ndim - 1))


def _pick(level, bg_root, hi_root) -> tuple[int, np.ndarray]:
    """(row with the most tissue, its tissue mask [S, S, S])."""
    root = level.root.cpu()
    t = tissue(level.x.detach().float().cpu(), bg_root[root], hi_root[root])[:, 0]  # [B_l, S, S, S]
    row = int(t.flatten(1).sum(1).argmax())
    return row, t[row].numpy()


def _slices(vol: np.ndarray, tis: np.ndarray):
    """(view, axis, index, 2D slice, whether it holds tissue) per view, cut where the view has most tissue."""
    out = []
    for name, axis in VIEWS:
        other = tuple(a for a in range(3) if a != axis)
        counts = tis.sum(axis=other)
        idx = int(counts.argmax()) if counts.any() else vol.shape[axis] // 2
        out.append((name, axis, idx, np.take(vol, idx, axis=axis), bool(counts[idx])))
    return out


def _rows(levels, preds: Sequence[torch.Tensor], patch_size: int, norm_pix: bool,
          background: float | None) -> list[dict]:
    bg_root, hi_root = _background_and_range(levels, background)
    rows = []
    with torch.no_grad():
        for i, level in enumerate(levels):
            row, tis = _pick(level, bg_root, hi_root)
            pred = preds[i].detach().float()[row:row + 1]  # [1, N, C p^3]
            one = _one_row(level, row)
            recon = reconstruct_volumes(one, pred, patch_size, norm_pix)[0, 0].cpu().numpy()  # [S, S, S]
            x = one.x.detach().float()
            masked = _masked_input(x, one.mask, patch_size)[0, 0].cpu().numpy()
            rows.append({"level": i + 1, "row": row, "root": int(level.root[row]), "tissue": tis,
                         "vols": (x[0, 0].cpu().numpy(), masked, recon), "n_rows": level.x.shape[0]})
    return rows


def _one_row(level, row: int) -> SimpleNamespace:
    """The level's sample `row` as [1, ...] tensors: reconstruct_volumes reads x and mask only."""
    return SimpleNamespace(x=level.x[row:row + 1], mask=level.mask[row:row + 1])


def _label(r: dict, kind: str, view: str, axis: int, idx: int, step, subjects) -> str:
    who = subjects[r["root"]] if subjects is not None else f"crop {r['root']}"
    when = f"step {step}" if step is not None else "step ?"
    return (f"L{r['level']} {kind} · {view} ({'xyz'[axis]}={idx})\n"
            f"{when} · {who} · sample {r['row'] + 1}/{r['n_rows']}")


def _window(vol: np.ndarray, tis: np.ndarray) -> tuple[float, float]:
    """Grey-level window from the tissue (1st..99th percentile), so background does not set the contrast."""
    values = vol[tis] if tis.any() else vol.ravel()
    lo, hi = np.percentile(values, [1, 99])
    lo = min(lo, float(vol.min()))  # keep background at black
    return float(lo), float(hi if hi > lo else lo + 1.0)


def preview_figure(levels, preds: Sequence[torch.Tensor], patch_size: int, norm_pix: bool, *, step: int | None = None,
                   subjects: Sequence[str] | None = None, background: float | None = None) -> Figure:
    """The preview as a Figure (see save_previews)."""
    rows = _rows(levels, preds, patch_size, norm_pix, background)
    cmap = matplotlib.colormaps["gray"].with_extremes(bad=MASKED_COLOUR)
    fig = Figure(figsize=(20, 2.6 * len(rows)), layout="constrained")
    axes = fig.subplots(len(rows), 9, squeeze=False)
    for r, info in enumerate(rows):
        lo, hi = _window(info["vols"][0], info["tissue"])
        for j, (kind, vol) in enumerate(zip(("input", "masked", "recon"), info["vols"])):
            for k, (view, axis, idx, sl, has_tissue) in enumerate(_slices(vol, info["tissue"])):
                ax = axes[r, 3 * j + k]
                image = ax.imshow(np.rot90(sl), cmap=cmap, vmin=lo, vmax=hi)
                ax.set_xticks([]), ax.set_yticks([])
                ax.set_title(_label(info, kind, view, axis, idx, step, subjects), fontsize=7)
                if not has_tissue:
                    ax.text(0.5, 0.5, "background only", transform=ax.transAxes, ha="center",
                            va="center", color="yellow", fontsize=8)
        bar = fig.colorbar(image, ax=list(axes[r]), fraction=0.012, pad=0.005)
        bar.set_label("intensity\n(prepared units)", fontsize=7)
        bar.ax.tick_params(labelsize=7)
    fig.suptitle(f"MiM reconstructions{f' at step {step}' if step is not None else ''}: per level the "
                 f"sample with the most tissue; blue = masked patches", fontsize=9)
    return fig


def save_previews(levels, preds: Sequence[torch.Tensor], patch_size: int, norm_pix: bool, path: Path, *,
                  step: int | None = None, subjects: Sequence[str] | None = None,
                  background: float | None = None) -> Path:
    """One row per level: axial/coronal/sagittal of input | masked | reconstruction, with a colour bar.

    step: training step, shown in every panel title. subjects: a name per level-1 crop row (the rows
    of `crops` given to build_hierarchy), shown for the sample drawn. background: the prepared
    volumes' background value (default: each crop's minimum).
    """
    fig = preview_figure(levels, preds, patch_size, norm_pix, step=step, subjects=subjects,
                         background=background)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(path, fig, dpi=80, tight=False)
    return path
