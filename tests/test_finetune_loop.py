"""Fine-tuning end to end on the built-in synthetic cohort, the clinical-only Cox path against
scikit-survival, and predict on a manifest with bad rows."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from core.config import load_config
from finetune.config import FinetuneConfig
from finetune.train import run

ROOT = Path(__file__).resolve().parents[1]


def tiny_cfg(cohort, out, **over) -> FinetuneConfig:
    cfg = load_config(FinetuneConfig, ROOT / "launch" / "finetune_tiny_cpu.yaml")
    cfg.manifest, cfg.external = str(cohort / "manifest.csv"), str(cohort / "external.csv")
    cfg.output_dir, cfg.cache_dir = str(out), str(out.parent / "cache")
    cfg.mixed_precision, cfg.n_boot, cfg.explain, cfg.epochs, cfg.folds = "no", 20, 1, 2, 2
    cfg.model.encoder.depth = 2
    cfg.hybrid = False  # the hybrid (on by default where it applies) has its own tests: test_hybrid_predict.py
    for k, v in over.items():  # --task and --fusion are stored as model.task and model.fusion
        setattr(cfg.model if k in ("task", "fusion") else cfg, k, v)
    return cfg


@pytest.fixture(scope="module")
def classification_run(synth_cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "cls"
    # a further held-out set: the external cohort again under new ids, so its predictions must match
    copy = pd.read_csv(synth_cohort / "external.csv", dtype={"subject_id": str})
    copy["subject_id"] = "copy_" + copy["subject_id"]
    copy.to_csv(synth_cohort / "external_copy.csv", index=False)  # beside the original: same relative paths
    metrics = run(tiny_cfg(synth_cohort, out, task="classification", fusion="concat",
                           eval_sets=[f"external_copy={synth_cohort / 'external_copy.csv'}"]))
    return out, metrics


def test_classification_run_writes_everything(classification_run, synth_cohort):
    out, metrics = classification_run
    pred = pd.read_csv(out / "predictions.csv", dtype={"subject_id": str})
    manifest = pd.read_csv(synth_cohort / "manifest.csv", dtype={"subject_id": str})
    splits = json.loads((out / "splits.json").read_text())
    # every non-test subject is predicted out-of-fold exactly once; test and external by the ensemble
    val = pred[pred.split == "val"]
    assert sorted(val.subject_id) == sorted(set(manifest.subject_id) - set(splits["test"]))
    assert sorted(pred[(pred.split == "test") & (pred.fold == -1)].subject_id) == sorted(splits["test"])
    assert (pred[pred.split == "external"].fold == -1).any()
    assert pred["prob"].between(0, 1).all()
    for split in ("val", "test", "external"):
        assert split in metrics["splits"]
        assert (out / f"roc_{split}.png").is_file()
    assert len(metrics["folds"]) == 2
    # --eval_sets: predicted by every fold and the ensemble, under its own split name, like external
    ext = pred[pred.split == "external"].set_index(["subject_id", "fold"])["prob"]
    copy = pred[pred.split == "external_copy"]
    copy = copy.set_index([copy.subject_id.str.removeprefix("copy_"), copy.fold])["prob"]
    assert len(copy) == len(ext) and np.allclose(copy.sort_index(), ext.sort_index(), atol=1e-6)
    assert "external_copy" in metrics["splits"] and (out / "roc_external_copy.png").is_file()
    # each fold's HF folder carries its clinical schema and its input contract
    from models.input_spec import load_input_spec
    cfg = json.loads((out / "model" / "fold0" / "config.json").read_text())
    spec = load_input_spec(out / "model" / "fold0")
    assert cfg["clinical_schema"]["numeric"] and spec.prep.spacing == (2.0, 2.0, 2.0)
    assert spec.channels == ("image", "lesion_mask") and spec.view.centre == "lesion"
    assert (spec.view.crop_mm, spec.view.margin_mm) == (40.0, 10.0)  # launch/finetune_tiny_cpu.yaml
    assert list((out / "explain").glob("*.nii.gz")) and list((out / "explain").glob("*.png"))


def test_finished_folds_are_reused(classification_run, synth_cohort):
    out, _ = classification_run
    before = {p: p.stat().st_mtime_ns for p in (out / "model").rglob("model.safetensors")}
    run(tiny_cfg(synth_cohort, out, task="classification", fusion="concat", explain=0))
    after = {p: p.stat().st_mtime_ns for p in (out / "model").rglob("model.safetensors")}
    assert before == after


def test_a_held_out_set_that_changed_under_its_name_is_predicted_afresh(classification_run, synth_cohort):
    out, _ = classification_run
    old = pd.read_csv(synth_cohort / "external_copy.csv", dtype={"subject_id": str})
    new = old.iloc[1:]  # same set name, other rows: the saved folds' predictions of it are stale
    new.to_csv(synth_cohort / "external_copy_v2.csv", index=False)
    before = {p: p.stat().st_mtime_ns for p in (out / "model").rglob("model.safetensors")}
    run(tiny_cfg(synth_cohort, out, task="classification", fusion="concat", explain=0,
                 eval_sets=[f"external_copy={synth_cohort / 'external_copy_v2.csv'}"]))
    after = {p: p.stat().st_mtime_ns for p in (out / "model").rglob("model.safetensors")}
    assert before.keys() == after.keys() and all(before[p] != after[p] for p in before)
    pred = pd.read_csv(out / "predictions.csv", dtype={"subject_id": str})
    for fold in (-1, 0, 1):  # the ensemble and each fold predict exactly the new rows
        got = pred[(pred.split == "external_copy") & (pred.fold == fold)].subject_id
        assert sorted(got) == sorted(new.subject_id)
    # metrics.jsonl holds each retrained fold's epochs once: the first training's rows were dropped
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for fold in (0, 1):
        epochs = [r["epoch"] for r in rows if f"fold{fold}/train_loss" in r]
        assert epochs and len(epochs) == len(set(epochs)), (fold, epochs)


def test_fold_fingerprint_tracks_what_a_fold_depends_on(synth_cohort, tmp_path):
    from dataclasses import replace

    from finetune.train import fold_fingerprint
    cfg = tiny_cfg(synth_cohort, tmp_path / "x")
    splits = {"folds": [{"train": ["a"], "val": ["b"]}]}
    base = fold_fingerprint(cfg, splits)
    assert fold_fingerprint(replace(cfg, n_boot=5, explain=0, output_dir="elsewhere"), splits) == base
    assert fold_fingerprint(replace(cfg, model=replace(cfg.model, fusion="film")), splits) != base
    assert fold_fingerprint(cfg, {"folds": [{"train": ["b"], "val": ["a"]}]}) != base


def test_the_default_seg_arch_leaves_the_fingerprints_of_runs_made_before_it(synth_cohort, tmp_path, monkeypatch):
    """--seg_arch came after runs whose folds a resume reuses: its default ("vit") is not hashed, so those
    folds are not taken for another run's; a CNN arch is."""
    from dataclasses import replace

    import finetune.train as train
    hashed = []
    monkeypatch.setattr(train, "_digest", lambda text: hashed.append(json.loads(text)) or str(len(hashed)))
    cfg = tiny_cfg(synth_cohort, tmp_path / "x", task="segmentation")
    splits = {"folds": [{"train": ["a"], "val": ["b"]}]}
    train.fold_fingerprint(cfg, splits)
    train.fold_fingerprint(replace(cfg, seg_arch="dynunet"), splits)
    assert "seg_arch" not in hashed[0] and hashed[1]["seg_arch"] == "dynunet"


def test_predict_keeps_good_rows_and_lists_bad_ones(classification_run, synth_cohort, tmp_path):
    out, _ = classification_run
    m = pd.read_csv(synth_cohort / "external.csv", dtype={"subject_id": str})
    m["image"] = [str(synth_cohort / p) for p in m["image"]]
    m["mask"] = [str(synth_cohort / p) for p in m["mask"]]
    m = m.drop(columns=["label", "time", "event"])
    m.loc[1, "image"] = str(tmp_path / "missing.nii.gz")
    m["age"] = m["age"].astype(object)
    m.loc[2, "age"] = "abc"
    m.loc[3, "histology"] = "never-seen-before"   # unseen category: handled as in training, kept
    m.to_csv(tmp_path / "new.csv", index=False)
    res = subprocess.run([sys.executable, "-m", "finetune.predict", "--model", str(out / "model"),
                          "--manifest", str(tmp_path / "new.csv"), "--out", str(tmp_path / "pred.csv")],
                         capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr[-2000:]
    pred = pd.read_csv(tmp_path / "pred.csv", dtype={"subject_id": str})
    rejected = pd.read_csv(tmp_path / "pred.rejected.csv", dtype={"subject_id": str})
    bad = {m.loc[1, "subject_id"], m.loc[2, "subject_id"]}
    assert set(rejected.subject_id) == bad
    assert set(pred.subject_id) == set(m.subject_id) - bad
    assert rejected.set_index("subject_id").loc[m.loc[2, "subject_id"], "reason"].count("age") >= 1
    # the ensemble's prediction for a good row equals the mean over the fold models
    assert pred["prob"].between(0, 1).all()
    # the console names the rejected rows, and the unseen category is reported once, plainly
    assert f"rejected 2 row(s): {m.loc[1, 'subject_id']}:" in res.stdout and m.loc[2, "subject_id"] in res.stdout
    warned = [line for line in res.stderr.splitlines() if "unseen in training" in line]
    assert any(m.loc[3, "subject_id"] in line for line in warned)
    assert len(warned) == len(set(warned)), warned  # each message once, not once per fold model
    assert all(line.startswith("warning: clinical column 'histology'") for line in warned), res.stderr[-2000:]


def test_predict_refuses_a_manifest_without_a_trained_clinical_column_before_any_work(classification_run,
                                                                                      synth_cohort, tmp_path):
    out, _ = classification_run
    m = pd.read_csv(synth_cohort / "external.csv", dtype={"subject_id": str}).drop(columns=["kps"])
    m["image"] = [str(synth_cohort / p) for p in m["image"]]
    m["mask"] = [str(synth_cohort / p) for p in m["mask"]]
    m.to_csv(tmp_path / "new.csv", index=False)
    res = subprocess.run([sys.executable, "-m", "finetune.predict", "--model", str(out / "model"),
                          "--manifest", str(tmp_path / "new.csv"), "--out", str(tmp_path / "out" / "pred.csv")],
                         capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 2
    err = res.stderr.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert "new.csv" in err and "'kps'" in err and "cache_image" not in err  # about the manifest, no internals
    assert not (tmp_path / "out").exists()  # no output file, and no cache: nothing was preprocessed


def test_a_refused_run_writes_nothing(synth_cohort, tmp_path):
    from core.errors import InputError
    out = tmp_path / "refused"
    with pytest.raises(InputError, match="clinical column"):
        run(tiny_cfg(synth_cohort, out, clinical_columns=["no_such_column"]))
    assert not out.exists()
    from pretrain.config import PretrainConfig
    from pretrain.train import train
    with pytest.raises(InputError, match="no .nii"):
        empty = tmp_path / "empty"
        empty.mkdir()
        train(PretrainConfig(data=str(empty), output_dir=str(tmp_path / "pt")))
    assert not (tmp_path / "pt").exists()


def test_clinical_only_cox_matches_sksurv_coefficients():
    """The clinical-only survival path is an exact linear Cox model: same coefficients as
    scikit-survival's CoxPHSurvivalAnalysis(ties='efron') on a real bundled dataset."""
    from sksurv.datasets import load_veterans_lung_cancer
    from sksurv.linear_model import CoxPHSurvivalAnalysis

    from finetune.clinical import ClinicalSchema
    from models.multimodal import MultimodalConfig, MultimodalModel
    from models.survival_losses import cox_efron_loss
    from models.vit3d import ViT3DConfig

    X, y = load_veterans_lung_cancer()
    df = X.copy()
    df["Prior_therapy"] = df["Prior_therapy"].astype(str)
    schema = ClinicalSchema.fit(df, ["Age_in_years", "Karnofsky_score", "Months_from_Diagnosis", "Celltype"])
    Z = schema.transform(df)
    keep = [i for i, n in enumerate(schema.feature_names) if not n.endswith("__missing")]
    Z = Z[:, keep]  # no value is missing here, so the indicator columns are all zero
    # one-hot columns are collinear with the (implicit) baseline hazard: drop one category
    names = [schema.feature_names[i] for i in keep]
    drop = names.index("Celltype=adeno")
    Z = np.delete(Z, drop, axis=1)

    cfg = MultimodalConfig(encoder=ViT3DConfig(), task="survival", fusion="clinical_only",
                           clinical_dim=Z.shape[1], clinical_hidden=0, head_dropout=0.0)
    model = MultimodalModel(cfg).double()
    time_ = torch.tensor(np.ascontiguousarray(y["Survival_in_days"]))
    event = torch.tensor(np.ascontiguousarray(y["Status"])).double()
    z = torch.tensor(Z, dtype=torch.float64)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.LBFGS(params, lr=1, max_iter=500, tolerance_grad=1e-10, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = cox_efron_loss(model(None, z)["risk"], time_, event, reduction="sum")
        loss.backward()
        return loss
    opt.step(closure)
    ours = model(None, torch.eye(Z.shape[1], dtype=torch.float64))["risk"] - model(None, torch.zeros(1, Z.shape[1], dtype=torch.float64))["risk"]
    ref = CoxPHSurvivalAnalysis(ties="efron", alpha=0).fit(Z, y).coef_
    np.testing.assert_allclose(ours.detach().numpy(), ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("task, fusion, head", [("survival", "tokens", "discrete"), ("multitask", "film", "cox")])
def test_survival_and_multitask_runs(synth_cohort, tmp_path, task, fusion, head):
    cfg = tiny_cfg(synth_cohort, tmp_path / "run", task=task, fusion=fusion, epochs=1, explain=0)
    cfg.model.survival_head = head
    metrics = run(cfg)
    pred = pd.read_csv(tmp_path / "run" / "predictions.csv")
    assert pred["risk"].notna().all() and np.isfinite(pred["risk"]).all()
    assert ("prob" in pred) == (task == "multitask")
    surv = metrics["splits"]["test"]["survival"]
    assert surv["harrell_c"] is None or 0.0 <= surv["harrell_c"] <= 1.0


def test_zero3_is_refused_with_a_clear_error():
    from types import SimpleNamespace

    from core.errors import ConfigError
    from finetune.train import refuse_zero3
    state = lambda plugin: SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin))  # noqa: E731
    refuse_zero3(state(None))  # DDP / single process
    refuse_zero3(state(SimpleNamespace(zero_stage=2)))
    with pytest.raises(ConfigError, match="ZeRO-3"):
        refuse_zero3(state(SimpleNamespace(zero_stage=3)))


@pytest.mark.parametrize("entry", ["no_equals_sign", "=x.csv", "test=x.csv", "val=x.csv"])
def test_a_malformed_eval_set_names_the_flag(entry):
    from core.errors import ConfigError
    with pytest.raises(ConfigError, match="--eval_sets"):
        FinetuneConfig(eval_sets=[entry])


def test_negative_crop_mm_is_a_config_error():
    from core.errors import ConfigError
    from models.input_spec import ViewSpec
    with pytest.raises(ConfigError, match="crop_mm"):
        FinetuneConfig(crop_mm=-5.0)
    crop = lambda mm: ViewSpec(crop_mm=mm).crop_voxels(2.0)  # noqa: E731
    assert crop(0.0) is None and crop(40.0) == 20 and crop(0.4) == 1


def test_task_and_fusion_are_declared_once_where_the_model_reads_them():
    from core.cli import parse_config
    from core.errors import ConfigError
    from finetune.train import resolve_inputs
    from models.tasks import SURVIVAL
    cfg, _ = parse_config(FinetuneConfig, ["--task", "survival", "--fusion", "film"])
    model_cfg, _ = resolve_inputs(cfg)
    assert (model_cfg.task, model_cfg.fusion) == ("survival", "film") and cfg.task is SURVIVAL
    long, _ = parse_config(FinetuneConfig, ["--model.task", "survival", "--model.fusion", "film"])
    assert long == cfg  # --task is --model.task: one field, two spellings
    with pytest.raises(ConfigError, match="--model.task: 'detection' is not one of"):
        parse_config(FinetuneConfig, ["--task", "detection"])
    with pytest.raises(SystemExit):  # argparse: two spellings of one flag in one command line are refused
        parse_config(FinetuneConfig, ["--fusion", "none", "--model.fusion", "tokens"])


# ---- issue 32: the segmentation head sees lesion-free windows (defect 4) ---------------------------------


def _windows_table(tmp_path, n=4, side=64):
    """n cached subjects: noise volumes of side^3 voxels, each with a 5^3 lesion somewhere inside."""
    rng = np.random.default_rng(0)
    rows = []
    for k in range(n):
        d = tmp_path / f"w{k}"
        d.mkdir(parents=True)
        image = rng.normal(size=(1, side, side, side)).astype(np.float32)
        mask = np.zeros((1, side, side, side), np.uint8)
        lo = rng.integers(8, side - 13, 3)
        mask[0, lo[0]:lo[0] + 5, lo[1]:lo[1] + 5, lo[2]:lo[2] + 5] = 1
        np.save(d / "image.npy", image)
        np.save(d / "mask.npy", mask)
        (d / "meta.json").write_text(json.dumps({"has_mask": True, "pad_value": -5.0}))
        rows.append({"subject_id": f"w{k}", "patient_id": f"w{k}", "label": k % 2,
                     "cache_image": str(d / "image.npy"), "cache_mask": str(d / "mask.npy")})
    return pd.DataFrame(rows)


def _seg_cfg(out, seg_weight: float) -> FinetuneConfig:
    cfg = load_config(FinetuneConfig, ROOT / "launch" / "finetune_tiny_cpu.yaml")
    cfg.output_dir, cfg.mixed_precision, cfg.num_workers, cfg.batch_size = str(out), "no", 0, 2
    cfg.crop_mm, cfg.epochs, cfg.min_epochs, cfg.warmup_epochs = 0.0, 1, 0, 0.0
    cfg.model.task, cfg.model.fusion, cfg.model.seg_weight = "classification", "none", seg_weight
    cfg.model.encoder.img_size, cfg.model.encoder.patch_size, cfg.model.encoder.depth = 16, 8, 1
    return cfg


def test_an_auxiliary_segmentation_head_also_trains_on_lesion_free_windows(tmp_path):
    """--seg_weight > 0 beside an outcome task: the segmentation loss also sees windows at the sliding
    window's scale, most of them lesion-free (whole-head inference shows the head such windows); the
    outcome still sees the same lesion crops as without segmentation; the fold model records it."""
    from accelerate import Accelerator

    from engine.logs import RunLogger
    from finetune.fold import build_fold, train_fold
    from finetune.train import resolve_inputs
    df = _windows_table(tmp_path)
    accelerator = Accelerator(cpu=True)

    def training_items(seg_weight):
        cfg = _seg_cfg(tmp_path / "out", seg_weight)
        model_cfg, spec = resolve_inputs(cfg)
        fold = build_fold(cfg, model_cfg, spec, 0, df, df, [], accelerator)
        items = []
        for epoch in range(6):
            fold.train_ds.set_epoch(epoch)
            items += [fold.train_ds[i] for i in range(len(df))]
        return items

    plain, joint = training_items(0.0), training_items(0.5)
    assert not any("seg_x" in item for item in plain)
    for a, b in zip(plain, joint):  # the outcome's crops do not change with segmentation on
        assert torch.equal(a["x"], b["x"])
    # what the segmentation loss trains on: the lesion crop and, with windows, the window
    seen = [b["x"][-1] for b in joint] + [b["seg_x"][-1] for b in joint if "seg_x" in b]
    lesion_free = np.mean([float(m.sum() == 0) for m in seen])
    assert lesion_free > 0.15, lesion_free
    windows = [b["seg_x"] for b in joint]
    assert all(w.shape == (2, 16, 16, 16) for w in windows)  # the sliding window's input, at native scale
    with_lesion = np.mean([float(w[-1].sum() > 0) for w in windows])
    assert 0.2 < with_lesion < 0.7, with_lesion  # about a third forced onto the lesion, a few more by chance

    cfg = _seg_cfg(tmp_path / "trained", 0.5)
    model_cfg, spec = resolve_inputs(cfg)
    logger = RunLogger(accelerator, tmp_path / "trained")
    train_fold(cfg, model_cfg, spec, 0, df, df, {}, [], accelerator, logger)
    saved = json.loads((tmp_path / "trained" / "model" / "fold0" / "config.json").read_text())
    assert saved["seg_background_windows"] is True
    row = json.loads((tmp_path / "trained" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["fold0/train_seg_windows"] > 0


# ---- issue 32: another run's folds (defect 1) and held-out patients (defect 5) -----------------------------


def test_another_runs_folds_are_refused_before_anything_is_written(classification_run, synth_cohort):
    """The same folder, splits and seed but another fusion: its folds are another run's (their fingerprint
    differs). Retraining over them silently would mix the two runs' folds, models and logs."""
    from core.errors import InputError
    out, _ = classification_run
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    with pytest.raises(InputError) as e:
        run(tiny_cfg(synth_cohort, out, task="classification", fusion="film", explain=0))
    msg = str(e.value)
    assert str(out / "folds") in msg and "--output_dir" in msg and "--reuse_folds false" in msg and "\n" not in msg
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


def test_a_held_out_patient_who_is_also_a_training_patient_is_refused(synth_cohort, tmp_path):
    """A follow-up scan of a training patient in --external (its own subject_id, the same site and patient_id)
    would inflate the external figures: refused by (site, patient_id), in one line, before any training."""
    from core.errors import InputError
    manifest = pd.read_csv(synth_cohort / "manifest.csv", dtype=str)
    external = pd.read_csv(synth_cohort / "external.csv", dtype=str)
    # a follow-up of training patient 5, at its own site (the same id at another site is another person)
    external.loc[2, ["patient_id", "site"]] = manifest.loc[5, ["patient_id", "site"]].to_numpy()
    path = synth_cohort / "external_followup.csv"
    external.to_csv(path, index=False)
    out = tmp_path / "leak"
    cfg = tiny_cfg(synth_cohort, out, task="classification", fusion="concat")
    cfg.external = str(path)
    with pytest.raises(InputError) as e:
        run(cfg)
    msg = str(e.value)
    assert str(path) in msg and manifest.loc[5, "patient_id"] in msg and str(synth_cohort / "manifest.csv") in msg
    assert external.loc[2, "subject_id"] in msg and manifest.loc[5, "subject_id"] in msg and "\n" not in msg
    assert not out.exists()
    # the same through --eval_sets
    cfg = tiny_cfg(synth_cohort, out, task="classification", fusion="concat", eval_sets=[f"followup={path}"])
    cfg.external = ""
    with pytest.raises(InputError, match="patient_id"):
        run(cfg)
    assert not out.exists()


def test_a_survival_fold_starts_from_its_own_clinical_cox_fit(synth_cohort, tmp_path):
    """The linear-clinical hazard's beta is the Cox fit on this fold's training rows, not on all rows."""
    from accelerate import Accelerator

    from finetune.baselines.cox_init import clinical_cox_fit
    from finetune.clinical import ClinicalSchema
    from finetune.fold import build_fold
    from finetune.train import load_cohort, resolve_inputs
    cfg = tiny_cfg(synth_cohort, tmp_path / "run", task="survival", fusion="concat")
    model_cfg, spec = resolve_inputs(cfg)
    df, _, columns = load_cohort(cfg, spec.prep, show_progress=False)
    train_df, val_df = df.iloc[: len(df) // 2].reset_index(drop=True), df.iloc[len(df) // 2:].reset_index(drop=True)
    fold = build_fold(cfg, model_cfg, spec, 0, train_df, val_df, columns, Accelerator(cpu=True))
    beta = fold.model.surv_head.clinical.weight.detach().numpy()[0]
    own = clinical_cox_fit(ClinicalSchema.fit(train_df, columns), train_df).coef_
    np.testing.assert_allclose(beta, own, rtol=1e-5, atol=1e-6)
    other = clinical_cox_fit(ClinicalSchema.fit(train_df, columns), val_df).coef_  # the same encoding, other rows
    assert not np.allclose(beta, other, atol=1e-3)  # so the test can tell whose rows shaped beta
