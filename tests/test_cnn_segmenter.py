"""Issue 35, part 2: a MONAI CNN segmenter beside the ViT (models/cnn_segmenter.py, --seg_arch): its nnU-Net
plan, that it learns, its HF folder, a --task segmentation run with it, and predict --seg_model with a CNN
folder beside a ViT outcome model."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

from finetune.lesion.seg_metrics import segmentation_metrics
from models.cnn_segmenter import CNN_MODEL_TYPE, CNNSegConfig, CNNSegmenter, dynunet_plan
from models.tasks import SEGMENTATION
from test_auto_mask import SPEC, brain_with_ball
from test_segmentation import toy_batch


def test_dynunet_plan_is_nnunets():
    """By hand, MONAI's DynUNet tutorial rule: halve while the map stays >= 4 voxels (and even); an axis over
    2x coarser than the finest is not halved and gets kernel 1 until the others catch up."""
    assert dynunet_plan([48] * 3, [0.8] * 3) == ([[3] * 3] * 4, [[1] * 3] + [[2] * 3] * 3)  # 48 -> 24 -> 12 -> 6
    assert dynunet_plan([16] * 3, [2.0] * 3)[1] == [[1] * 3, [2] * 3, [2] * 3]  # 16 -> 8 -> 4
    kernels, strides = dynunet_plan([64, 64, 16], [1.0, 1.0, 3.0])
    assert strides == [[1, 1, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2], [2, 2, 1]]  # z at 3 mm waits one stage
    assert kernels == [[3, 3, 1], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]
    assert len(dynunet_plan([512] * 3, [1.0] * 3)[1]) == 1 + 5  # at most five halvings
    net = CNNSegmenter(CNNSegConfig(img_size=48, voxel_mm=0.8, width=4)).net
    assert [list(s) for s in net.strides] == [[1] * 3] + [[2] * 3] * 3 and net.filters == [4, 8, 16, 32]
    from core.errors import ConfigError
    with pytest.raises(ConfigError, match="multiple of 8"):
        CNNSegConfig(arch="segresnet", img_size=20)


@pytest.mark.parametrize("arch", ["dynunet", "segresnet"])
def test_cnn_learns_the_toy_balls_from_the_image_alone(arch):
    torch.manual_seed(0)
    model = CNNSegmenter(CNNSegConfig(arch=arch, img_size=16, width=8))
    x = toy_batch(n=4, size=16)  # [4, 2, 16, 16, 16]: bright balls on noise, the ball as the mask
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(32):
        loss = SEGMENTATION.loss(model(x, None), {"x": x})["loss"]  # DiceCE, as the fold loop computes it
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3]), losses
    model.eval()
    x2 = x.clone()
    x2[:, 1] = torch.rand_like(x2[:, 1])  # another mask channel: the logits cannot change
    with torch.no_grad():
        logits = model.segment(x)  # [4, 1, 16, 16, 16]
        assert torch.equal(logits, model.segment(x2))
    assert segmentation_metrics(logits > 0, x[:, 1:], 1.0)["dice"].min() > 0.8


def save_cnn(folder, spec=SPEC, seed=0, arch="dynunet"):
    from finetune.fold import SEG_WINDOWS_KEY
    torch.manual_seed(seed)
    model = CNNSegmenter(CNNSegConfig(arch=arch, img_size=spec.input_size, width=4)).eval()
    model.save_pretrained(folder, extra_config={"clinical_schema": None, SEG_WINDOWS_KEY: True}, card={},
                          input_spec=spec)
    return model


def test_cnn_folder_reloads_strictly_with_identical_logits(tmp_path):
    from core.errors import InputError
    from models.hf import save_hf_folder
    from models.input_spec import load_input_spec
    model = save_cnn(tmp_path / "cnn")
    saved = json.loads((tmp_path / "cnn" / "config.json").read_text())
    assert saved["model_type"] == CNN_MODEL_TYPE and saved["cnn"]["arch"] == "dynunet"
    assert saved["seg_background_windows"] is True
    assert load_input_spec(tmp_path / "cnn") == SPEC and (tmp_path / "cnn" / "model.safetensors").is_file()
    again, _ = CNNSegmenter.from_pretrained(tmp_path / "cnn")
    x = torch.randn(2, 2, 24, 24, 24)
    with torch.no_grad():
        assert torch.equal(model.segment(x), again.eval().segment(x))
    state = {**model.state_dict(), "net.extra": torch.zeros(1)}  # a key the model does not have
    save_hf_folder(tmp_path / "bad", state, saved, "card", input_spec=SPEC)
    with pytest.raises(InputError, match="unexpected keys: net.extra"):
        CNNSegmenter.from_pretrained(tmp_path / "bad")


def test_pretrained_with_a_cnn_arch_is_refused_in_one_line(tmp_path, capsys):
    from finetune.train import main
    with pytest.raises(SystemExit) as info:
        main(["--task", "segmentation", "--seg_arch", "dynunet", "--pretrained", str(tmp_path / "enc"),
              "--manifest", str(tmp_path / "m.csv"), "--output_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and "\n" not in err and "--pretrained" in err and "--seg_arch dynunet" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("arch,size,patch", [("segresnet", 44, 4), ("dynunet", 6, 2)])
def test_an_input_size_the_cnn_cannot_take_is_refused_naming_the_flag(tmp_path, capsys, arch, size, patch):
    """Refused at parse time, before any volume is prepared, naming --model.encoder.img_size."""
    from finetune.train import main
    with pytest.raises(SystemExit) as info:
        main(["--task", "segmentation", "--seg_arch", arch, "--model.encoder.img_size", str(size),
              "--model.encoder.patch_size", str(patch), "--model.encoder.in_channels", "2", "--manifest", str(tmp_path / "m.csv"), "--output_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and "\n" not in err and f"--model.encoder.img_size {size}" in err
    assert not (tmp_path / "run").exists()


def test_cnn_segmentation_run_trains_reports_and_exports(synth_cohort, tmp_path):
    from finetune.predict import load_model
    from finetune.train import run
    from tests.test_finetune_loop import tiny_cfg
    out = tmp_path / "cnn"
    cfg = tiny_cfg(synth_cohort, out, task="segmentation", explain=0, epochs=1, n_boot=10, seg_arch="dynunet")
    cfg.model.encoder.img_size, cfg.model.encoder.patch_size, cfg.model.seg_width = 16, 8, 4
    cfg.external = ""  # the test split is the held-out set here: 8 fewer heads to prepare
    metrics = run(cfg)
    for k in (0, 1):
        saved = json.loads((out / "model" / f"fold{k}" / "config.json").read_text())
        assert saved["model_type"] == CNN_MODEL_TYPE and saved["seg_background_windows"] is True
        assert saved["cnn"]["img_size"] == 16 and saved["cnn"]["voxel_mm"] == pytest.approx(40.0 / 16)
    model, meta = load_model(out / "model" / "fold0")
    assert isinstance(model, CNNSegmenter) and meta["spec"].input_size == 16
    table = pd.read_csv(out / "segmentation.csv", dtype={"subject_id": str})
    assert set(table.split) == {"val", "test"} and table["dice"].between(0, 1).all()
    assert {"val", "test"} <= set(metrics["segmentation"])
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("fold0/train_seg" in row for row in log)  # the DiceCE term of the segmentation task


def vit_outcome_model(folder):
    """An untrained ViT outcome model with no segmentation head: it cannot search a head itself."""
    from models.multimodal import MultimodalConfig, MultimodalModel
    from models.vit3d import ViT3DConfig
    torch.manual_seed(0)
    cfg = MultimodalConfig(encoder=ViT3DConfig(in_channels=2, img_size=24, patch_size=6, dim=24, depth=2, heads=2),
                           task="classification", fusion="none")
    MultimodalModel(cfg).save_pretrained(folder, extra_config={"clinical_schema": None}, card={}, input_spec=SPEC)
    return folder


@pytest.mark.parametrize("tta", [False, True])
def test_seg_model_cnn_fills_a_missing_mask_beside_a_vit_outcome_model(tmp_path, monkeypatch, tta):
    """--model (a ViT outcome model) and --seg_model (a CNN folder) differ: the CNN's fold models go through the
    real sliding window of the search (with --tta, wrapped in FlipAveraged: the flips themselves are
    tests/test_cnn_segmenter_tta.py's, and 8x the windows here cost 10 s); its untrained output is then replaced by a threshold of the bright ball,
    so the search path's candidates, mask and outcome are what is checked."""
    from finetune import predict
    from finetune.lesion import search
    save_cnn(tmp_path / "cnn")
    path = brain_with_ball(tmp_path, "s0", (28.0, 30.0, 8.0))[0]
    pd.DataFrame({"subject_id": ["s0"], "image": [str(path)]}).to_csv(tmp_path / "m.csv", index=False)
    real, seen = search.lesion_probability, []

    def thresholded(models, image, spec, pad_value, **kw):
        flipped = [isinstance(m, search.FlipAveraged) for m in models]
        seen.append(([type(getattr(m, "model", m)).__name__ for m in models], flipped))
        if not tta:
            real(models, image, spec, pad_value, **kw)  # the CNN runs in the real sliding window
        brain = image[0][image[0] > image.min()]
        return (image[0] > brain.mean() + 5 * brain.std()).astype(float)  # [X, Y, Z]

    monkeypatch.setattr(search, "lesion_probability", thresholded)
    out = tmp_path / "out" / "pred.csv"
    assert predict.main(["--model", str(vit_outcome_model(tmp_path / "vit")), "--seg_model", str(tmp_path / "cnn"),
                         "--manifest", str(tmp_path / "m.csv"), "--out", str(out), *["--tta"] * tta]) == 0
    assert seen == [(["CNNSegmenter"], [tta])]  # the head searched by the CNN (with test-time flips when asked)
    res = pd.read_csv(out, dtype={"subject_id": str})
    assert list(res.lesion_status) == ["found"] and res["prob"].between(0, 1).all()
    assert (res.predicted_volume_ml > 0).all() and (out.parent / "pred_masks" / "s0_pred_mask.nii.gz").is_file()


def test_a_seg_model_of_neither_kind_is_refused_in_one_line(tmp_path, capsys):
    """A pretrained encoder folder (the easy mistake) is no segmenter: one line naming both kinds, no output."""
    from finetune import predict
    from models.vit3d import ViT3D, ViT3DConfig
    ViT3D(ViT3DConfig(in_channels=1, img_size=24, patch_size=6, dim=24, depth=1, heads=2)).save_pretrained(
        tmp_path / "encoder", input_spec=SPEC)
    path = brain_with_ball(tmp_path, "s0", (28.0, 30.0, 8.0))[0]
    pd.DataFrame({"subject_id": ["s0"], "image": [str(path)]}).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(SystemExit) as info:
        predict.main(["--model", str(vit_outcome_model(tmp_path / "vit")), "--seg_model", str(tmp_path / "encoder"),
                      "--manifest", str(tmp_path / "m.csv"), "--out", str(tmp_path / "pred.csv")])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and "\n" not in err and str(tmp_path / "encoder") in err
    assert CNN_MODEL_TYPE in err and "mimfm-multimodal" in err
    assert not (tmp_path / "pred.csv").exists()
