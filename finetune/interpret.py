"""Where does the fine-tuned model look? Attention rollout, occlusion sensitivity, and saving both.

Maps are voxel-aligned with the model input crop [S, S, S], so they are saved as NIfTI with the
crop's affine (open them over the crop in any viewer) and as PNG overlays through the lesion.
"""
from __future__ import annotations

import re
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import patheffects
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from monai.visualize import OcclusionSensitivity
from nibabel.orientations import io_orientation
from torch import Tensor, nn

from core.atomic import write_png
from core.errors import InputError
from data.nifti import save_volume
from models.multimodal import MultimodalModel
from models.survival_losses import survival_risk_from_hazards


@contextmanager
def _eval(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _check_single(x: Tensor) -> None:
    if x.ndim != 5 or x.shape[0] != 1:
        raise InputError(f"explanations take one subject: expected x [1, C, D, H, W], got {tuple(x.shape)}")


# ---- attention rollout ---------------------------------------------------------------------------


def attention_rollout(model: MultimodalModel, x: Tensor, clinical: Tensor | None) -> np.ndarray:
    """Attention rollout (Abnar & Zuidema 2020) over the encoder, as a [D, H, W] map of the input crop.

    Each block's attention is averaged over heads, mixed with the identity for the residual path
    (0.5 A + 0.5 I, rows renormalised), and the blocks are multiplied: R = A_L ... A_1.
    ViT3D has no CLS token, and the heads read the mean of the image tokens, so a token's importance
    is the mean over all rows of its column of R: the attention flow it sends, on average, to every
    output token (clinical tokens included for fusion 'tokens'). Over all tokens these values sum to 1.
    The image tokens' values are reshaped to the patch grid and upsampled trilinearly to the input size.
    FiLM and concat fusion act after the encoder, so they do not change this map.
    """
    _check_single(x)
    if model.encoder is None:
        raise InputError("attention rollout needs an image encoder; fusion='clinical_only' has none")
    p = model.config.encoder.patch_size
    grid = [s // p for s in x.shape[2:]]
    with _eval(model):
        extra = model.extra_tokens(clinical)  # [1, T, D] or None
        maps = model.encoder.attention_maps(x, extra_tokens=extra)  # per block [1, heads, M, M]
    m = maps[0].shape[-1]
    eye = torch.eye(m, dtype=torch.float64)  # [M, M]
    rollout = eye.clone()
    for attn in maps:
        a = 0.5 * attn[0].mean(0).double() + 0.5 * eye  # [M, M]
        a = a / a.sum(-1, keepdim=True)
        rollout = a @ rollout  # [M, M]
    n = grid[0] * grid[1] * grid[2]
    received = rollout.mean(0)[:n]  # [N] image tokens only, in ViT3D's depth-major order
    vol = received.float().reshape(1, 1, *grid)  # [1, 1, gd, gh, gw]
    vol = F.interpolate(vol, size=tuple(x.shape[2:]), mode="trilinear", align_corners=False)  # [1, 1, D, H, W]
    return vol[0, 0].numpy()


# ---- occlusion sensitivity -----------------------------------------------------------------------


class _ScoreOfImage(nn.Module):
    """Adapts the dict-output model to MONAI's `module(image) -> [n, 1]`.

    MONAI occludes every channel; only the image channels should be occluded (a region hidden in every
    sequence at once), so the lesion mask, the last channel, is put back from the original input before
    the model sees the batch.
    """

    def __init__(self, model: nn.Module, x: Tensor, clinical: Tensor | None, key: str):
        super().__init__()
        self.model, self.key = model, key
        # the mask, and with two scales the whole wide crop: [1, C_x - C_img, D, H, W] ([1, 0, ...] without a mask)
        n_img = model.config.encoder.in_channels - 1 if hasattr(model, "config") else x.shape[1] - 1
        self.context = x[:, max(n_img, 1):]
        self.clinical = clinical

    def forward(self, images: Tensor) -> Tensor:  # [n, C, D, H, W] -> [n, 1]
        n = images.shape[0]
        keep = images.shape[1] - self.context.shape[1]  # the image channels
        images = torch.cat([images[:, :keep], self.context.expand(n, *self.context.shape[1:])], dim=1)
        clinical = None if self.clinical is None else self.clinical.expand(n, -1)  # [n, F]
        out = self.model(images, clinical)
        if self.key not in out:
            raise InputError(f"model output has no {self.key!r}; it has {sorted(out)}")
        score = out[self.key]
        if self.key == "hazard_logits":  # [n, T] -> [n]: the risk score predict reports (minus mean survival)
            score = survival_risk_from_hazards(score)
        if score.ndim != 1:
            raise InputError(f"occlusion needs a scalar score per subject; {self.key!r} has shape {tuple(score.shape)}")
        return score[:, None]  # [n, 1]


def occlusion_sensitivity(model: nn.Module, x: Tensor, clinical: Tensor | None, output_key: str = "logit",
                          patch: int = 8, stride: int = 8, baseline: float = 0.0,
                          batch_size: int = 8) -> np.ndarray:
    """Drop in `output_key` when a patch^3 cube of the image channels is set to `baseline`, as [D, H, W].

    output_key: "logit", "risk", or "hazard_logits" (reduced to the discrete-time risk score,
    models.survival_losses.survival_risk_from_hazards, as predictions report it).
    Positive values: hiding that region lowers the score (it supported the prediction). With
    stride < patch each voxel gets the mean drop over all cubes that cover it. Built on MONAI's
    OcclusionSensitivity (its sliding-window sweep); its callable occlusion mode is broken in MONAI
    1.6 (it raises), so a constant mode is used and the wrapper restores the mask channel.
    """
    _check_single(x)
    if not 1 <= stride <= patch or patch > min(x.shape[2:]):
        raise InputError(f"occlusion needs 1 <= stride ({stride}) <= patch ({patch}) <= input size {tuple(x.shape[2:])}")
    # MONAI steps int(patch * (1 - overlap)); the small slack keeps float rounding from landing on stride - 1.
    overlap = max(0.0, 1.0 - (stride + 1e-3) / patch)
    with _eval(model), warnings.catch_warnings():
        # The wrapper is made in eval mode: MONAI puts modules it found training back in train mode,
        # which would leave the caller's model training.
        scorer = _ScoreOfImage(model, x, clinical, output_key).eval()
        base = scorer(x)[0, 0]
        occ = OcclusionSensitivity(scorer, mask_size=patch, n_batch=batch_size, verbose=False,
                                   mode=float(baseline), overlap=overlap, activate=False)
        warnings.filterwarnings("ignore", message="Using a non-tuple sequence for multidimensional indexing")
        occluded, _ = occ(x)  # [1, 1, D, H, W]: the score with the covering cubes hidden
    occluded = torch.as_tensor(occluded)  # MetaTensor -> Tensor
    return (base - occluded[0, 0]).float().numpy()


# ---- saving --------------------------------------------------------------------------------------

_SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
_VIEWS = (("axial", 2), ("coronal", 1), ("sagittal", 0))  # name, axis held fixed (RAS array axes)
# What the colour means, by map name (finetune.train writes "attention_rollout" and "occlusion").
_COLOUR_MEANING = {
    "attention_rollout": "attention received (share of total)",
    "rollout": "attention received (share of total)",
    "occlusion": "score drop when hidden (> 0: region raised it)",
}
_WORLD_ENDS = (("L", "R"), ("P", "A"), ("I", "S"))  # nibabel's RAS+ world axes: (negative end, positive end)
_EDGE_TEXT = dict(color="white", fontsize=11, fontweight="bold",
                  path_effects=[patheffects.withStroke(linewidth=2.5, foreground="black")])


def _numpy(a) -> np.ndarray:
    return a.detach().cpu().float().numpy() if isinstance(a, Tensor) else np.asarray(a, dtype=np.float32)


def _centre(mask: np.ndarray | None, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Lesion centre of mass (voxel), or the volume centre when there is no lesion."""
    if mask is None or not mask.any():
        return tuple(s // 2 for s in shape)
    return tuple(int(round(c)) for c in np.argwhere(mask).mean(0))


def _slice(vol: np.ndarray, axis: int, index: int) -> np.ndarray:
    # Transposed so the lower remaining axis runs left-right and the higher one bottom-up (origin="lower").
    return np.take(vol, index, axis=axis).T


def _axis_ends(affine: np.ndarray) -> list[tuple[str, str]]:
    """Anatomical letter at the (low-index, high-index) end of each array axis: ('L', 'R') for RAS axis 0."""
    ends = []
    for world, direction in io_orientation(affine):  # per array axis: nearest world axis and its sign
        ends.append(("", "") if np.isnan(world) else _WORLD_ENDS[int(world)][:: int(direction)])
    return ends


def _mark_orientation(ax, horizontal: tuple[str, str], vertical: tuple[str, str]) -> None:
    # Letters on the panel edges (radiologists read orientation there); origin="lower", so low index is left/bottom.
    for (x, y, ha, va), letter in zip(((0.02, 0.5, "left", "center"), (0.98, 0.5, "right", "center"),
                                       (0.5, 0.02, "center", "bottom"), (0.5, 0.98, "center", "top")),
                                      horizontal + vertical):
        ax.text(x, y, letter, transform=ax.transAxes, ha=ha, va=va, **_EDGE_TEXT)


def _save_overlay(path: Path, title: str, image: np.ndarray, mask: np.ndarray | None, heat: np.ndarray,
                  centre: tuple[int, ...], affine: np.ndarray, meaning: str) -> None:
    if heat.min() < 0 < heat.max():  # signed (occlusion: helped vs hurt): diverging, centred on 0
        cmap, vmax = "RdBu_r", float(np.abs(heat).max())
        vmin = -vmax
    else:
        cmap, vmin, vmax = "inferno", float(heat.min()), float(heat.max())
        vmax = vmax if vmax > vmin else vmin + 1.0
    lo, hi = np.percentile(image, [1, 99])
    spacing = np.linalg.norm(affine[:3, :3], axis=0)  # voxel size along each array axis
    ends = _axis_ends(affine)
    fig = Figure(figsize=(12, 4.4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    shown = None
    for ax, (view, axis) in zip(axes, _VIEWS):
        rest = [a for a in range(3) if a != axis]
        aspect = spacing[rest[1]] / spacing[rest[0]]
        ax.imshow(_slice(image, axis, centre[axis]), cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1,
                  origin="lower", aspect=aspect)
        shown = ax.imshow(_slice(heat, axis, centre[axis]), cmap=cmap, vmin=vmin, vmax=vmax, alpha=0.45,
                          origin="lower", aspect=aspect)
        if mask is not None:
            m = _slice(mask, axis, centre[axis]).astype(np.float32)
            if 0 < m.sum() < m.size:
                ax.contour(m, levels=[0.5], colors="lime", linewidths=1.0)
        ax.set_title(f"{view} {'xyz'[axis]}={centre[axis]}")
        ax.set_axis_off()
        _mark_orientation(ax, ends[rest[0]], ends[rest[1]])
    fig.colorbar(shown, ax=list(axes), shrink=0.8, label=meaning)
    fig.suptitle(title)
    write_png(path, fig, dpi=100, tight=False)


def save_explanations(out_dir: str | Path, subject_id: str, x, maps: dict, affine: np.ndarray) -> list[Path]:
    """Write each map as `<subject>_<name>.nii.gz` (the crop's grid and affine) and `<subject>_<name>.png`.

    x: [C, D, H, W] model input (channel 0 the first image, the last the lesion mask when C > 1); maps: name ->
    [D, H, W]; affine: the crop's 4x4 voxel-to-world matrix. The PNG shows the three orthogonal slices
    through the lesion centre of mass: image in grey, map as a semi-transparent heatmap, mask contour,
    a colour bar saying what the map's values mean, and anatomical letters (R/L, A/P, S/I, from the
    affine) on each panel's edges. For a RAS crop the patient's right is on the right (neurological view).
    """
    out_dir = Path(out_dir)
    x = _numpy(x)
    affine = np.asarray(affine, dtype=np.float64)
    if x.ndim != 4:
        raise InputError(f"{subject_id}: expected the input crop as [C, D, H, W], got shape {x.shape}")
    if affine.shape != (4, 4):
        raise InputError(f"{subject_id}: affine must be 4x4, got {affine.shape}")
    if not _SAFE_NAME.match(subject_id):
        raise InputError(f"subject id {subject_id!r} cannot be used in a file name")
    image = x[0]
    mask = x[-1] > 0.5 if x.shape[0] > 1 else None
    centre = _centre(mask, image.shape)
    written = []
    for name, heat in maps.items():
        heat = _numpy(heat)
        if not _SAFE_NAME.match(name):
            raise InputError(f"{subject_id}: map name {name!r} cannot be used in a file name")
        if heat.shape != image.shape:
            raise InputError(f"{subject_id}: map {name!r} has shape {heat.shape}, the input crop {image.shape}")
        nii = out_dir / f"{subject_id}_{name}.nii.gz"
        png = out_dir / f"{subject_id}_{name}.png"
        save_volume(nii, heat, affine)
        _save_overlay(png, f"{subject_id}: {name}", image, mask, heat, centre, affine,
                      _COLOUR_MEANING.get(name, f"{name} (map value)"))
        written += [nii, png]
    return written
