"""Two images and a mask, end to end: fine-tune, the contract's channel order through predict, the
one-line refusal of a manifest without a channel, and a MONAI export with three input channels."""
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from finetune.train import run
from models.export import export_checkpoint
from test_finetune_loop import tiny_cfg

ROOT = Path(__file__).resolve().parents[1]


def _with_flair(cohort: Path, name: str) -> Path:
    """A copy of a manifest with a second image column, flair: the image with inverted contrast."""
    m = pd.read_csv(cohort / f"{name}.csv", dtype={"subject_id": str})
    flair = []
    for rel in m["image"]:
        src = cohort / rel
        dst = src.with_name(src.name.replace("_image", "_flair"))
        if not dst.exists():
            img = nib.load(src)
            data = np.asanyarray(img.dataobj).astype(np.float32)
            nib.save(nib.Nifti1Image((data.max() - data).astype(np.float32), img.affine), dst)
        flair.append(str(dst.relative_to(cohort)))
    m.insert(m.columns.get_loc("image") + 1, "flair", flair)
    out = cohort / f"{name}_flair.csv"
    m.to_csv(out, index=False)
    return out


@pytest.fixture(scope="module")
def two_image_run(synth_cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft2") / "cls"
    cfg = tiny_cfg(synth_cohort, out, task="classification", fusion="concat", figures=False)  # none is asserted
    cfg.manifest, cfg.external = str(_with_flair(synth_cohort, "manifest")), str(_with_flair(synth_cohort, "external"))
    cfg.prep.images = ("image", "flair")
    return out, run(cfg)


def _predict(model: Path, manifest: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "finetune.predict", "--model", str(model), "--manifest", str(manifest),
                           "--out", str(out)], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_two_images_and_a_mask_train_and_the_contract_names_them(two_image_run):
    out, metrics = two_image_run
    fold = out / "model" / "fold0"
    spec = json.loads((fold / "input_spec.json").read_text())
    assert spec["channels"] == ["image", "flair", "lesion_mask"]
    assert spec["prep"]["images"] == ["image", "flair"]
    config = json.loads((fold / "config.json").read_text())
    assert config["multimodal"]["encoder"]["in_channels"] == 3
    assert "flair" not in config["clinical_columns"]  # an image column is never a clinical feature
    assert set(metrics["splits"]) >= {"val", "test", "external"}
    assert (out / "explain").is_dir()  # attention and occlusion maps of the three-channel input


def test_an_unread_image_column_is_not_a_clinical_column(synth_cohort, tmp_path):
    """A T1-CE-only run on a manifest that also has FLAIR: flair holds image paths, so it is not encoded as a
    clinical variable (each path would be its own category, a per-subject identifier a fusion head memorises),
    and naming it with --clinical_columns is one line, before any preprocessing."""
    from core.errors import InputError
    from data.manifest import STANDARD_COLUMNS
    from finetune.train import load_cohort, resolve_inputs
    cfg = tiny_cfg(synth_cohort, tmp_path / "run", task="classification", fusion="concat")
    cfg.manifest, cfg.external = str(_with_flair(synth_cohort, "manifest")), ""
    _, spec = resolve_inputs(cfg)
    cfg.clinical_columns = ["age", "flair"]
    with pytest.raises(InputError, match=r"^--clinical_columns \(.*\): column\(s\) \['flair'\] hold image paths, "
                                         r"not clinical values; read them as images with --images \(e\.g\. --images "
                                         r"image,flair\)$"):
        load_cohort(cfg, spec.prep, show_progress=False)
    assert not (tmp_path / "cache").exists()  # refused before any preprocessing
    cfg.clinical_columns = []
    _, _, columns = load_cohort(cfg, spec.prep, show_progress=False)
    expected = [c for c in pd.read_csv(synth_cohort / "manifest.csv").columns if c not in STANDARD_COLUMNS]
    assert columns == expected and "age" in columns


def test_predict_reads_channels_by_name_not_by_column_order(two_image_run, synth_cohort, tmp_path):
    out, _ = two_image_run
    m = pd.read_csv(synth_cohort / "external_flair.csv", dtype={"subject_id": str}).head(3)
    for col in ("image", "flair", "mask"):
        m[col] = [str(synth_cohort / p) for p in m[col]]
    m.to_csv(tmp_path / "a.csv", index=False)
    m[["flair", "subject_id", "mask", "image", *[c for c in m.columns if c not in ("flair", "subject_id", "mask", "image")]]
      ].to_csv(tmp_path / "b.csv", index=False)
    swapped = m.rename(columns={"image": "flair", "flair": "image"})  # the files themselves swapped
    swapped.to_csv(tmp_path / "c.csv", index=False)
    preds = {}
    for name in "abc":
        res = _predict(out / "model", tmp_path / f"{name}.csv", tmp_path / f"{name}_pred.csv")
        assert res.returncode == 0, res.stderr[-2000:]
        preds[name] = pd.read_csv(tmp_path / f"{name}_pred.csv", dtype={"subject_id": str})["prob"].to_numpy()
    np.testing.assert_array_equal(preds["a"], preds["b"])
    assert not np.allclose(preds["a"], preds["c"])  # the model does read which file is which


def test_predict_refuses_a_manifest_without_a_channel_in_one_line(two_image_run, synth_cohort, tmp_path):
    out, _ = two_image_run
    m = pd.read_csv(synth_cohort / "external.csv", dtype={"subject_id": str})
    m["image"] = [str(synth_cohort / p) for p in m["image"]]
    m.to_csv(tmp_path / "new.csv", index=False)
    res = _predict(out / "model", tmp_path / "new.csv", tmp_path / "out" / "pred.csv")
    assert res.returncode == 2
    err = res.stderr.strip()
    assert err.count("\n") == 0 and "['flair']" in err and "new.csv" in err, err
    assert not (tmp_path / "out").exists()


def test_monai_export_of_the_fine_tuned_encoder_has_three_channels(two_image_run, tmp_path):
    out, _ = two_image_run
    export_checkpoint(out / "model" / "fold0", tmp_path / "monai", fmt="monai")
    assert json.loads((tmp_path / "monai" / "monai_config.json").read_text())["in_channels"] == 3
    card = (tmp_path / "monai" / "README.md").read_text()
    assert "Channels, in order: 0: image (MRI" in card and "1: flair (MRI" in card and "2: lesion_mask" in card
    # the card's loading recipe runs as written
    snippet = card.split("```python\n")[1].split("```")[0]
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path / "monai")
        exec(snippet, {})
    finally:
        os.chdir(cwd)


def test_pretraining_on_several_sequences_takes_each_as_a_sample(tmp_path, capsys):
    from data.synth import generate_cohort
    from models.input_spec import load_input_spec
    from pretrain.train import train
    from test_pretrain_loop import tiny_cfg as tiny_pretrain_cfg
    cohort = generate_cohort(tmp_path / "c", n_unlabeled=4, n_labeled=0, n_external=0, seed=3, progress=False,
                             sequences=("t1ce", "flair", "pet"))
    table = pd.read_csv(cohort / "unlabeled.csv")
    want = {"image": len(table), "flair": int(table["flair"].notna().sum()), "pet": int(table["pet"].notna().sum())}
    cfg = tiny_pretrain_cfg(cohort, tmp_path / "pt", max_steps=2, ckpt_every=2)
    cfg.data = str(cohort / "unlabeled.csv")
    cfg.prep.images = ("image", "flair", "pet:pet")
    train(cfg)
    shown = capsys.readouterr().out
    assert "pretraining samples per sequence: " + ", ".join(f"{k} {n}" for k, n in want.items()) in shown, shown
    assert want["flair"] < len(table) or want["pet"] < len(table)  # a subject without a sequence has no sample of it
    spec = load_input_spec(tmp_path / "pt" / "encoder")
    assert spec.channels == ("image",) and spec.prep.images == ("image", "flair", "pet:pet")
