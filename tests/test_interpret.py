"""Interpretability: attention rollout, occlusion sensitivity, and the saved NIfTI/PNG explanations."""
import itertools

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from core.errors import InputError
from finetune.interpret import attention_rollout, occlusion_sensitivity, save_explanations
from models.multimodal import MultimodalConfig, MultimodalModel
from models.survival_losses import survival_risk_from_hazards
from models.vit3d import ViT3DConfig

S, P, F = 32, 8, 3
G = S // P  # token grid edge


def make(fusion="none", task="classification", **kw) -> MultimodalModel:
    torch.manual_seed(0)
    enc = ViT3DConfig(in_channels=2, img_size=S, patch_size=P, dim=24, depth=2, heads=2)
    return MultimodalModel(MultimodalConfig(encoder=enc, fusion=fusion, task=task,
                                            clinical_dim=0 if fusion == "none" else F, **kw))


def volume(seed=0):
    x = torch.randn(1, 2, S, S, S, generator=torch.Generator().manual_seed(seed))  # [1, 2, S, S, S]
    x[:, 1] = 0.0
    x[:, 1, 10:18, 12:20, 4:10] = 1.0  # lesion mask
    return x


# ---- attention rollout -----------------------------------------------------------------------------


@pytest.mark.parametrize("fusion, n_extra", [("none", 0), ("tokens", 4)])
def test_uniform_attention_gives_a_uniform_rollout(fusion, n_extra):
    model = make(fusion, n_clinical_tokens=n_extra or 4)
    with torch.no_grad():
        for blk in model.encoder.blocks:  # q = k = 0: every score is 0, so softmax is uniform
            d = blk.attn.qkv.weight.shape[1]
            blk.attn.qkv.weight[: 2 * d] = 0
            blk.attn.qkv.bias[: 2 * d] = 0
    clin = torch.randn(1, F) if fusion != "none" else None
    heat = attention_rollout(model, volume(), clin)
    assert heat.shape == (S, S, S)
    # Uniform and residual mixing are both doubly stochastic, so every token receives 1 / (N + T).
    assert np.allclose(heat, 1.0 / (G**3 + n_extra), rtol=1e-5)


def test_rollout_lights_up_the_attended_patch(monkeypatch):
    model = make("none")
    k = (1, 2, 3)  # grid position of the token every token attends to
    index = k[0] * G * G + k[1] * G + k[2]  # ViT3D's depth-major token order
    attn = torch.zeros(1, 2, G**3, G**3)
    attn[..., index] = 1.0
    monkeypatch.setattr(model.encoder, "attention_maps", lambda x, extra_tokens=None: [attn, attn])
    heat = attention_rollout(model, volume(), None)
    peak = np.unravel_index(heat.argmax(), heat.shape)
    assert all(k[a] * P <= peak[a] < (k[a] + 1) * P for a in range(3))
    patch = np.zeros(heat.shape, bool)
    patch[tuple(slice(c * P, (c + 1) * P) for c in k)] = True
    assert heat[patch].mean() > 10 * heat[~patch].mean()


def test_rollout_needs_an_encoder():
    with pytest.raises(InputError, match="clinical_only"):
        attention_rollout(make("clinical_only"), volume(), torch.zeros(1, F))


# ---- occlusion sensitivity -------------------------------------------------------------------------

CUBE = (slice(8, 16), slice(16, 24), slice(0, 8))


class MeanOfCube(nn.Module):
    """Dict-output stand-in: the score is the mean image intensity in CUBE plus the mean mask value."""

    def forward(self, x, clinical):
        return {"logit": x[:, 0][(slice(None), *CUBE)].mean((1, 2, 3)) + x[:, 1].mean((1, 2, 3))}


def test_occlusion_lights_up_exactly_the_cube():
    x = volume()
    x[(0, 0, *CUBE)] = 3.0
    for baseline in (0.0, 1.0):
        heat = occlusion_sensitivity(MeanOfCube(), x, None, "logit", patch=8, stride=8, baseline=baseline)
        want = np.zeros((S, S, S), np.float32)
        want[CUBE] = 3.0 - baseline  # the mask channel is never occluded, so its term never drops
        assert np.allclose(heat, want, atol=1e-6)


def test_overlapping_occlusion_averages_the_covering_cubes():
    x = volume()
    x[(0, 0, *CUBE)] = 2.0
    heat = occlusion_sensitivity(MeanOfCube(), x, None, "logit", patch=8, stride=4)
    # Independent reference: every 8^3 window on a stride-4 lattice; a voxel gets the mean drop of its windows.
    total, count = np.zeros((S, S, S)), np.zeros((S, S, S))
    starts = range(0, S - 8 + 1, 4)
    for o in itertools.product(starts, starts, starts):
        window = tuple(slice(a, a + 8) for a in o)
        hidden = np.zeros((S, S, S), bool)
        hidden[window] = True
        drop = 2.0 * hidden[CUBE].mean()
        total[window] += drop
        count[window] += 1
    assert np.allclose(heat, total / count, atol=1e-6)


def test_occlusion_on_the_real_model_uses_the_requested_output():
    # the deep head: the default linear-clinical hazard starts with its image term at zero, so an untrained
    # model's risk does not depend on the image and its occlusion map is flat by design
    model = make("concat", "survival", clinical_hidden=8, survival_design="deep")
    heat = occlusion_sensitivity(model, volume(), torch.randn(1, F), "risk", patch=16, stride=16, batch_size=4)
    assert heat.shape == (S, S, S) and np.isfinite(heat).all() and np.abs(heat).max() > 0
    assert len(np.unique(heat)) <= 8  # one value per occluded 16^3 cube
    with pytest.raises(InputError, match="no 'logit'"):
        occlusion_sensitivity(model, volume(), torch.randn(1, F), "logit", patch=16, stride=16)


def test_occlusion_of_discrete_hazards_is_the_drop_in_risk():
    model = make("concat", "survival", clinical_hidden=8, survival_head="discrete", n_time_bins=4,
                 head_dropout=0.5, survival_design="deep").train()
    x, clin = volume(), torch.randn(1, F)
    heat = occlusion_sensitivity(model, x, clin, "hazard_logits", patch=16, stride=16)
    assert model.training  # explained in eval mode, handed back as it came
    model.eval()
    hidden = x.clone()
    hidden[0, 0, 16:, :16, 16:] = 0.0
    with torch.no_grad():
        risk = [survival_risk_from_hazards(model(v, clin)["hazard_logits"]).item() for v in (x, hidden)]
    assert np.allclose(heat[16:, :16, 16:], risk[0] - risk[1], atol=1e-5)


# ---- saving ----------------------------------------------------------------------------------------


def test_save_explanations_writes_aligned_nifti_and_png(tmp_path):
    x = volume()[0]  # [2, S, S, S]
    affine = np.array([[1.5, 0, 0, -20.0], [0, 1.0, 0, 5.0], [0, 0, 2.0, 30.0], [0, 0, 0, 1]])
    rng = np.random.default_rng(0)
    maps = {"rollout": rng.random((S, S, S)).astype(np.float32),
            "occlusion": torch.from_numpy(rng.standard_normal((S, S, S)).astype(np.float32))}
    paths = save_explanations(tmp_path / "explain", "sub-001", x, maps, affine)
    assert sorted(p.name for p in paths) == ["sub-001_occlusion.nii.gz", "sub-001_occlusion.png",
                                             "sub-001_rollout.nii.gz", "sub-001_rollout.png"]
    for name, heat in maps.items():
        img = nib.load(tmp_path / "explain" / f"sub-001_{name}.nii.gz")
        assert img.shape == (S, S, S) and np.allclose(img.affine, affine)
        assert np.array_equal(img.get_fdata(dtype=np.float32), np.asarray(heat))
        with Image.open(tmp_path / "explain" / f"sub-001_{name}.png") as png:
            png.verify()
            assert png.format == "PNG" and png.size[0] > 300
    assert not [p for p in (tmp_path / "explain").iterdir() if p.name.startswith(".")]  # no temp files left


def test_save_explanations_rejects_a_misaligned_map(tmp_path):
    with pytest.raises(InputError, match="'bad' has shape"):
        save_explanations(tmp_path, "s1", volume()[0], {"bad": np.zeros((S, S, S - 1))}, np.eye(4))


def test_orientation_letters_follow_the_affine():
    from finetune.interpret import _axis_ends
    assert _axis_ends(np.diag([1.5, 1.0, 2.0, 1.0])) == [("L", "R"), ("P", "A"), ("I", "S")]
    # LPS storage (DICOM-style): index 0 runs towards the patient's left, index 1 towards posterior.
    assert _axis_ends(np.diag([-1.0, -1.0, 1.0, 1.0])) == [("R", "L"), ("A", "P"), ("I", "S")]
