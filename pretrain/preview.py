"""Reconstruction previews: orthogonal slices of input, masked input and reconstruction per level."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from data.atomic import atomic_path
from models.mim import reconstruct_volumes


def _masked_input(x: torch.Tensor, mask: torch.Tensor, p: int) -> torch.Tensor:
    """Blank the masked patches of x [B, C, S, S, S] given mask [B, N] (True = masked)."""
    b, c, s = x.shape[0], x.shape[1], x.shape[-1]
    g = s // p
    m = mask.reshape(b, 1, g, g, g).float()
    m = m.repeat_interleave(p, 2).repeat_interleave(p, 3).repeat_interleave(p, 4)  # [B, 1, S, S, S]
    return x * (1 - m) + x.amin(dim=(1, 2, 3, 4), keepdim=True) * m


def save_previews(levels, outputs: dict, patch_size: int, norm_pix: bool, path: Path) -> Path:
    """One row per level (first sample): axial/coronal/sagittal of input | masked | reconstruction."""
    rows = []
    with torch.no_grad():
        for i, level in enumerate(levels):
            pred = outputs[f"pred_l{i + 1}"].detach().float()
            recon = reconstruct_volumes(level, pred, patch_size, norm_pix)        # [B_l, C, S, S, S]
            x = level.x.detach().float()
            masked = _masked_input(x, level.mask, patch_size)
            rows.append([v[0, 0].cpu().numpy() for v in (x, masked, recon)])
    fig, axes = plt.subplots(len(rows), 9, figsize=(18, 2.2 * len(rows)), squeeze=False)
    for r, vols in enumerate(rows):
        lo, hi = np.percentile(vols[0], [1, 99])
        for j, (name, vol) in enumerate(zip(("input", "masked", "recon"), vols)):
            mid = [s // 2 for s in vol.shape]
            for k, sl in enumerate((vol[:, :, mid[2]], vol[:, mid[1], :], vol[mid[0], :, :])):
                ax = axes[r, 3 * j + k]
                ax.imshow(np.rot90(sl), cmap="gray", vmin=lo, vmax=hi)
                ax.set_xticks([]), ax.set_yticks([])
                if k == 0:
                    ax.set_title(f"level {r + 1}: {name}", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
    return path
