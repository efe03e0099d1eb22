"""The segmentation head, its loss and metrics, and --task segmentation / --seg_weight end to end."""
import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from finetune.lesion.seg_metrics import segmentation_metrics, segmentation_report
from models.multimodal import MultimodalConfig, MultimodalModel
from models.segmentation import SegDecoder, skip_blocks, upsample_factors
from models.tasks import CLASSIFICATION, SEGMENTATION
from models.vit3d import ViT3DConfig

TINY = ViT3DConfig(in_channels=2, img_size=24, patch_size=6, dim=24, depth=3, heads=2)


def test_upsample_factors_and_skip_blocks():
    assert upsample_factors(16) == [2, 2, 2, 2] and upsample_factors(12) == [3, 2, 2]
    assert upsample_factors(6) == [3, 2] and upsample_factors(7) == [7]
    assert skip_blocks(12, 4) == [9, 6, 3]  # UNETR's own choice for a 12-block ViT
    assert skip_blocks(4, 3) == [2, 1]


@pytest.mark.parametrize("kind", ["primus", "unetr"])
def test_decoder_maps_tokens_back_to_voxels(kind):
    torch.manual_seed(0)
    model = MultimodalModel(MultimodalConfig(encoder=TINY, task="segmentation", fusion="none", seg_head=kind))
    x = torch.randn(2, 2, 24, 24, 24)
    out = model(x, None)
    assert set(out) == {"seg_logits"} and out["seg_logits"].shape == (2, 1, 24, 24, 24)
    # the given mask never reaches the segmentation: any mask channel gives the same logits
    x2 = x.clone()
    x2[:, 1] = torch.rand_like(x2[:, 1])
    model.eval()
    assert torch.equal(model(x, None)["seg_logits"], model(x2, None)["seg_logits"])
    # the skips are the outputs of the blocks skip_blocks names
    dec = SegDecoder(TINY, kind)
    assert dec.skip_blocks == ([] if kind == "primus" else [1])


def toy_batch(n=6, size=24, seed=0):
    """Bright balls on noise; the ball is the lesion mask."""
    g = torch.Generator().manual_seed(seed)
    zz, yy, xx = torch.meshgrid(*(torch.arange(size, dtype=torch.float32),) * 3, indexing="ij")
    x = torch.zeros(n, 2, size, size, size)
    for i in range(n):
        c = 6 + torch.rand(3, generator=g) * (size - 12)
        r = 3 + 2 * torch.rand(1, generator=g)
        ball = ((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) <= r ** 2
        x[i, 0] = 0.3 * torch.randn(size, size, size, generator=g) + 2.0 * ball
        x[i, 1] = ball.float()
    return x


@pytest.mark.parametrize("kind", ["primus", "unetr"])
def test_segmentation_loss_falls_and_dice_rises(kind):
    torch.manual_seed(0)
    model = MultimodalModel(MultimodalConfig(encoder=TINY, task="segmentation", fusion="none", seg_head=kind))
    x = toy_batch()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss = SEGMENTATION.loss(model(x, None), {"x": x})["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses
    model.eval()
    with torch.no_grad():
        dice = segmentation_metrics(model(x, None)["seg_logits"] > 0, x[:, 1:], 1.0)["dice"]
    assert dice.mean() > 0.5


def test_metrics_of_a_hand_made_pair():
    """Two 4x4x4 cubes offset by one voxel along x, voxels of 2 mm."""
    true = torch.zeros(1, 1, 10, 10, 10)
    pred = torch.zeros(1, 1, 10, 10, 10)
    true[0, 0, 2:6, 2:6, 2:6] = 1
    pred[0, 0, 3:7, 2:6, 2:6] = 1
    m = segmentation_metrics(pred, true, [2.0])
    assert m["dice"][0] == pytest.approx(2 * 48 / 128)  # overlap 3x4x4 of two 64-voxel cubes
    # every surface voxel of one cube lies within one voxel of the other's surface, and the outer faces
    # are exactly one voxel (2 mm) away: the 95th percentile is 2 mm
    assert m["hd95_mm"][0] == pytest.approx(2.0)
    assert m["true_volume_ml"][0] == pytest.approx(64 * 8 / 1000) and m["volume_error_ml"][0] == pytest.approx(0.0)
    # a prediction that misses half the lesion: volume error -32 voxels of 8 mm^3
    half = true.clone()
    half[0, 0, 4:6] = 0
    m = segmentation_metrics(half, true, [2.0])
    assert m["volume_error_ml"][0] == pytest.approx(-32 * 8 / 1000) and m["dice"][0] == pytest.approx(2 * 32 / 96)
    # nothing predicted: Dice 0, HD95 the 10^3 grid's diagonal of 2 mm voxels, counted as missed
    m = segmentation_metrics(torch.zeros_like(true), true, [2.0])
    assert m["dice"][0] == 0 and m["hd95_mm"][0] == pytest.approx(2.0 * np.sqrt(300))
    rows = pd.DataFrame({k: np.concatenate([v, v]) for k, v in m.items()})
    rep = segmentation_report(rows, n_boot=50)
    assert rep["missed"] == rep["hd95_misses"] == rep["hd95_mm"]["n"] == 2 and rep["dice"]["mean"] == 0
    assert rep["hd95_found_mm"]["n"] == 0  # tests/test_seg_metrics.py covers the misses in full


def test_seg_weight_zero_is_the_plain_outcome_model():
    cfg = MultimodalConfig(encoder=TINY, task="classification", fusion="none")
    torch.manual_seed(0)
    plain = MultimodalModel(cfg)
    assert plain.seg_decoder is None and not any(k.startswith("seg_decoder") for k in plain.state_dict())
    x = toy_batch(n=4)
    batch = {"x": x, "label": torch.tensor([0.0, 1.0, 0.0, 1.0])}
    out = plain(x, None)
    terms = CLASSIFICATION.loss(out, batch, seg_weight=0.0)
    assert set(terms) == {"bce", "loss"} and torch.equal(terms["loss"], terms["bce"])
    # with a segmentation head, the outcome path still reads [image, mask] and gives the same logit
    joint = MultimodalModel(replace(cfg, seg_weight=0.5))
    missing = joint.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith("seg_decoder.") for k in missing)
    plain.eval(), joint.eval()
    out_joint = joint(x, None)
    assert torch.equal(out_joint["logit"], plain(x, None)["logit"])
    terms = CLASSIFICATION.loss(out_joint, batch, seg_weight=0.5)
    assert set(terms) == {"bce", "seg", "loss"}
    assert torch.allclose(terms["loss"], terms["bce"] + terms["seg"])


def test_segmentation_run_end_to_end(synth_cohort, tmp_path):
    from finetune.train import run
    from tests.test_finetune_loop import tiny_cfg
    out = tmp_path / "seg"
    cfg = tiny_cfg(synth_cohort, out, task="segmentation", fusion="concat", explain=0)
    cfg.model.seg_head = "primus"  # the run's plumbing is under test here; both decoders are tested above
    metrics = run(cfg)
    saved = json.loads((out / "model" / "fold0" / "config.json").read_text())
    assert saved["multimodal"]["task"] == "segmentation" and saved["multimodal"]["fusion"] == "none"
    table = pd.read_csv(out / "segmentation.csv", dtype={"subject_id": str})
    splits = json.loads((out / "splits.json").read_text())
    assert sorted(table[table.split == "test"].subject_id) == sorted(splits["test"])
    assert set(table.split) == {"val", "test", "external"} and table["dice"].between(0, 1).all()
    for split in ("val", "test", "external"):
        rep = metrics["segmentation"][split]
        assert rep["n"] == (table.split == split).sum() and 0 <= rep["dice"]["mean"] <= 1
    assert list((out / "segmentation").glob("overlay_test_*.png"))
    assert not (out / "predictions.csv").exists()  # no outcome scores to write
    from finetune.predict import load_model
    model, _ = load_model(out / "model" / "fold0")  # the HF folder round-trips the head (strict load)
    assert model.seg_decoder is not None
    card = (out / "model" / "fold0" / "README.md").read_text()
    assert "not into monai.networks.nets.UNETR" in card  # the card says why there is no UNETR export


def test_mask_shape_features_of_a_cube():
    from models.segmentation import mask_shape_features
    logits = torch.full((1, 1, 20, 20, 20), -30.0)
    logits[0, 0, 5:9, 5:9, 5:9] = 30.0  # a 4^3 cube: p = 1 inside, 0 outside
    f = mask_shape_features(logits)[0]
    assert f[0].item() == pytest.approx(np.log(64 / 20 ** 3 + 1e-4), abs=1e-4)
    assert f[1].item() == pytest.approx(6 * 16 / 65, abs=1e-4)  # 96 faces over (64 + 1) voxels
    # each axis: coordinates 5..8, variance 1.25; sqrt(3 x 1.25) over the 20-voxel edge
    assert f[2].item() == pytest.approx(np.sqrt(3 * 1.25) / 20, abs=1e-4)


def test_cascade_and_predicted_outcome_mask():
    cfg = MultimodalConfig(encoder=TINY, task="multitask", fusion="none", seg_weight=0.5, seg_cascade=True,
                           outcome_mask="predicted")
    torch.manual_seed(0)
    model = MultimodalModel(cfg).eval()
    x = toy_batch(n=3)
    out = model(x, None)
    assert out["features"].shape == (3, TINY.dim + 3) and out["logit"].shape == (3,) and out["risk"].shape == (3,)
    # the outcome path reads the predicted mask, so the given one changes nothing
    x2 = x.clone()
    x2[:, 1] = 0
    assert torch.equal(model(x2, None)["logit"], out["logit"])
    # without a segmentation loss there is no head to cascade from
    from core.errors import ConfigError
    with pytest.raises(ConfigError, match="seg_weight"):
        MultimodalConfig(encoder=TINY, task="classification", fusion="none", seg_cascade=True)


def test_overlay_draws_the_mask_channel_with_two_images(monkeypatch, tmp_path):
    """Issue 32, defect 6: with [t1ce, flair, mask] crops the overlay's true mask is the mask (the last channel,
    a 2^3 cube), not the second image (a bright 4^3 block), and its image is the first channel."""
    import finetune.lesion.segmentation as seg
    from models.input_spec import InputSpec
    spec = InputSpec(input_size=8, channels=("t1ce", "flair", "lesion_mask"))
    crops = torch.zeros(1, 3, 8, 8, 8)  # [N, C + 1, S, S, S]
    crops[0, 0] = torch.arange(512.0).reshape(8, 8, 8)  # t1ce
    crops[0, 1, 2:6, 2:6, 2:6] = 3.0  # flair: oedema, brighter than 0.5 over a larger block
    crops[0, 2, 3:5, 3:5, 3:5] = 1.0  # the lesion mask
    prob = crops[:, 2:3].clone()  # a perfect prediction [N, 1, S, S, S]
    held = pd.DataFrame({"subject_id": ["s1"]})
    monkeypatch.setattr(seg.MultimodalModel, "from_pretrained", lambda folder: (torch.nn.Identity(), None))
    monkeypatch.setattr(seg, "lesion_probabilities", lambda models, df, spec: (prob[:len(df)], crops[:len(df)],
                                                                               np.full(len(df), 1.0)))
    drawn = []
    monkeypatch.setattr(seg, "save_overlay", lambda path, image, true_mask, pred_mask, title="":
                        drawn.append((image, true_mask, pred_mask)))
    frame = pd.DataFrame({"subject_id": ["s1"], "split": ["val"]})
    report = seg.segmentation_results(tmp_path, [{"folder": "f0"}], [frame], held, {"external": held}, spec,
                                      n_boot=5, seed=0)
    assert len(drawn) == 1
    image, true_mask, pred_mask = drawn[0]
    assert np.array_equal(image, crops[0, 0].numpy())
    assert np.array_equal(np.asarray(true_mask) > 0.5, crops[0, 2].numpy() > 0.5)
    assert np.array_equal(np.asarray(pred_mask), crops[0, 2].numpy() > 0.5)
    assert report["external"]["dice"]["mean"] == 1.0  # the metrics read the same mask channel
    assert [line.split()[0] for line in seg.format_segmentation(report).splitlines()[2:]] == ["val", "external"]
