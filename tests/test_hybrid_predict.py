"""The hybrid exports and predicts like every other model: `python -m finetune.baselines --baselines hybrid` writes
OUT/hybrid/export/, and `python -m finetune.predict --hybrid` on the run's test rows gives the hybrid scores the
fit wrote for them; a bad export, manifest or model is refused in one line before any preprocessing."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from core.errors import InputError
from test_finetune_loop import tiny_cfg


@pytest.fixture(scope="module")
def hybrid_run(synth_cohort, tmp_path_factory):
    """A tiny classification run on the synthetic cohort with the default --hybrid auto (python -m finetune's one
    command: RUN/hybrid/ and RUN/model/hybrid/), and the hybrid stacked on it again by the baselines CLI, clinical
    columns too."""
    from finetune.baselines.__main__ import main as baselines_main
    from finetune.train import run
    root = tmp_path_factory.mktemp("hybrid_predict")
    cfg = tiny_cfg(synth_cohort, root / "run", task="classification", fusion="concat", explain=0, figures=False,
                   n_boot=0, hybrid="auto")
    cfg.external = ""
    run(cfg)
    assert baselines_main(["--out", str(root / "baselines"), "--baselines", "hybrid", "--image_run",
                           str(root / "run"), "--hybrid_clinical"]) == 0
    return root


def _test_rows(root, synth_cohort, drop: tuple[str, ...] = ()):
    """The run's test rows as a new manifest: absolute paths, no outcome columns."""
    test = json.loads((root / "run" / "splits.json").read_text())["test"]
    m = pd.read_csv(synth_cohort / "manifest.csv", dtype={"subject_id": str})
    m = m[m["subject_id"].isin(test)].drop(columns=["label", "time", "event", *drop])
    for col in ("image", "mask"):
        m[col] = [str(synth_cohort / p) for p in m[col]]
    return m


def test_the_export_holds_what_the_stacker_reads(hybrid_run):
    from finetune.baselines.hybrid_export import read_export
    export = read_export(hybrid_run / "baselines" / "hybrid" / "export")
    stacker = json.loads((hybrid_run / "baselines" / "hybrid" / "stacker.json").read_text())
    assert export.stacker.to_dict() == stacker
    assert export.image and sorted(export.baselines) == ["radiomics_clinical"]  # the label's first level
    assert export.needs_radiomics() and export.prep.spacing == (2.0, 2.0, 2.0)
    # each exported baseline is the model.json the baseline's own folder holds
    assert export.baselines["radiomics_clinical"].to_dict() == json.loads(
        (hybrid_run / "baselines" / "radiomics_clinical" / "model.json").read_text())


def test_predict_with_the_hybrid_gives_the_fits_test_scores(hybrid_run, synth_cohort, tmp_path):
    from finetune.predict import main as predict_main
    _test_rows(hybrid_run, synth_cohort).to_csv(tmp_path / "new.csv", index=False)
    assert predict_main(["--model", str(hybrid_run / "run" / "model"), "--manifest", str(tmp_path / "new.csv"),
                         "--out", str(tmp_path / "pred.csv"), "--hybrid",
                         str(hybrid_run / "baselines" / "hybrid" / "export")]) == 0
    got = pd.read_csv(tmp_path / "pred.csv", dtype={"subject_id": str}).set_index("subject_id")
    fitted = pd.read_csv(hybrid_run / "baselines" / "hybrid" / "predictions.csv", dtype={"subject_id": str})
    fitted = fitted[fitted.split == "test"].set_index("subject_id")["prob"]
    image = pd.read_csv(hybrid_run / "run" / "predictions.csv", dtype={"subject_id": str})
    image = image[(image.split == "test") & (image.fold == -1)].set_index("subject_id")["prob"]
    assert sorted(got.index) == sorted(fitted.index) and len(got) >= 4
    np.testing.assert_allclose(got.loc[fitted.index, "prob"], image.loc[fitted.index], rtol=0, atol=1e-6)
    np.testing.assert_allclose(got.loc[fitted.index, "hybrid_prob"], fitted, rtol=0, atol=1e-6)
    assert np.ptp(fitted) > 1e-3  # the scores differ by row: the comparison is not of constants


@pytest.mark.parametrize("case", ["file_missing", "not_an_export"])
def test_predict_refuses_a_hybrid_it_cannot_apply_in_one_line_before_any_work(hybrid_run, synth_cohort, tmp_path,
                                                                              capsys, case):
    from finetune.predict import main as predict_main
    export = hybrid_run / "baselines" / "hybrid" / "export"
    if case == "file_missing":
        export = shutil.copytree(export, tmp_path / "export")
        (export / "radiomics_clinical.json").unlink()
        expect = f"baseline model {export / 'radiomics_clinical.json'}: cannot read"
    else:
        export = hybrid_run / "baselines" / "radiomics_clinical"
        expect = f"--hybrid {export}: not a hybrid export folder"
    _test_rows(hybrid_run, synth_cohort).to_csv(tmp_path / "new.csv", index=False)
    with pytest.raises(SystemExit) as e:
        predict_main(["--model", str(hybrid_run / "run" / "model"), "--manifest", str(tmp_path / "new.csv"),
                      "--out", str(tmp_path / "out" / "pred.csv"), "--hybrid", str(export)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and expect in err, err
    assert not (tmp_path / "out").exists()  # no output, no cache: nothing was preprocessed


def test_a_manifest_without_a_clinical_column_the_hybrid_reads_is_refused(hybrid_run, synth_cohort):
    """(Through predict, this fixture's image model reads every clinical column too, and refuses first.)"""
    from finetune.baselines.hybrid_predict import load_hybrid
    export = hybrid_run / "baselines" / "hybrid" / "export"
    column = json.loads((export / "stacker.json").read_text())["clinical_columns"][0]
    rows = _test_rows(hybrid_run, synth_cohort, drop=(column,))
    with pytest.raises(InputError, match=rf"^new.csv: column\(s\) \['{column}'\] missing; the hybrid \(--hybrid "):
        load_hybrid(export, rows, "new.csv", "classification", "m")


def test_a_hybrid_of_another_task_than_the_model_is_refused(hybrid_run, synth_cohort):
    from finetune.baselines.hybrid_predict import load_hybrid
    export = hybrid_run / "baselines" / "hybrid" / "export"
    rows = _test_rows(hybrid_run, synth_cohort)
    with pytest.raises(InputError, match=r"a classification hybrid .*--model m is --task survival, with no 'prob'"):
        load_hybrid(export, rows, "new.csv", "survival", "m")
    model = hybrid_run / "run" / "model"
    assert load_hybrid(export, rows, "new.csv", "multitask", model).task == "classification"  # it predicts both


@pytest.mark.parametrize("inverted", [["image"], ["image", "radiomics_clinical"]])
def test_a_dropped_input_is_not_exported_and_predict_needs_none_of_it(hybrid_run, synth_cohort, tmp_path, inverted):
    """A stacker that dropped the image score (or every score: it predicts the base rate) exports no such input,
    and the hybrid's score does not move with the dropped image score."""
    from data.prep_config import PrepConfig
    from finetune.baselines import hybrid
    from finetune.baselines.hybrid_export import read_export, write_export
    from finetune.baselines.hybrid_predict import hybrid_scores
    from test_hybrid import INPUTS, _rows
    rows = _rows()
    rows[inverted] = 1.0 - rows[inverted]  # ranks the val rows the wrong way: dropped (test_hybrid.py)
    stacker = hybrid.fit_stacker(rows, "classification", INPUTS, [], seed=0)
    fitted = read_export(hybrid_run / "baselines" / "hybrid" / "export").baselines
    write_export(tmp_path / "export", stacker, fitted, 5.0, 32, PrepConfig(), image_model=None)
    export = read_export(tmp_path / "export")
    kept = [n for n in INPUTS if n not in inverted]
    assert not export.image and sorted(export.baselines) == kept
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == sorted(
        ["hybrid.json", "stacker.json", *[f"{n}.json" for n in kept]])
    new = _test_rows(hybrid_run, synth_cohort)
    scores = [hybrid_scores(export, new, pd.DataFrame({"subject_id": new["subject_id"], "prob": p}),
                            str(tmp_path / "cache"))[0]["hybrid_prob"] for p in (0.1, 0.9)]
    np.testing.assert_array_equal(scores[0], scores[1])
    if len(inverted) == 2:
        assert np.ptp(scores[0]) == 0 and scores[0][0] == pytest.approx(rows["label"].mean())
    else:
        assert np.ptp(scores[0]) > 0


def test_a_hybrid_stacked_on_another_model_is_refused_and_the_same_model_moved_is_not(hybrid_run, synth_cohort,
                                                                                       tmp_path, capsys):
    """The stacker's weights fit one model's scores. A copy of the run's model folder (moved: the same weights) is
    accepted; with one fold's weights changed (retrained), its own hybrid/ folder is refused in one line before any
    work, as an explicit --hybrid is, instead of stacking another model's scores."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from finetune.baselines.hybrid_predict import load_hybrid
    from finetune.predict import main as predict_main
    rows = _test_rows(hybrid_run, synth_cohort)
    rows.to_csv(tmp_path / "new.csv", index=False)
    moved = shutil.copytree(hybrid_run / "run" / "model", tmp_path / "moved")
    assert load_hybrid(moved / "hybrid", rows, "new.csv", "classification", moved).image
    weights = sorted(moved.glob("*/model.safetensors"))[-1]
    with safe_open(str(weights), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    name = next(k for k, t in tensors.items() if t.is_floating_point())
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, str(weights), metadata=meta)
    for extra in ([], ["--hybrid", str(hybrid_run / "baselines" / "hybrid" / "export")]):
        with pytest.raises(SystemExit) as e:
            predict_main(["--model", str(moved), "--manifest", str(tmp_path / "new.csv"),
                          "--out", str(tmp_path / "out" / "pred.csv"), *extra])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1, err
        assert f"stacked on the scores of another image model than --model {moved}" in err, err
        assert not (tmp_path / "out").exists()


def test_an_export_from_before_the_image_model_was_recorded_says_how_to_refit(hybrid_run, tmp_path):
    from finetune.baselines.hybrid_export import INDEX, read_export
    old = shutil.copytree(hybrid_run / "run" / "model" / "hybrid", tmp_path / "hybrid")
    index = json.loads((old / INDEX).read_text())
    index["format"] = "mimfm.hybrid_export/1"
    del index["image_model"]
    (old / INDEX).write_text(json.dumps(index))
    with pytest.raises(InputError, match=r"written before exports recorded the image model .* fit it again .* or "
                                         rf"remove {old} to predict without the hybrid$"):
        read_export(old)


def test_predict_help_explains_the_hybrid_flag(capsys):
    from finetune.predict import main as predict_main
    with pytest.raises(SystemExit):
        predict_main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--hybrid HYBRID" in text and "hybrid_prob" in text and "OUT/hybrid/export" in text


def _survival_cfg(synth_cohort, out, manifest: str):
    cfg = tiny_cfg(synth_cohort, out, task="survival", fusion="concat", explain=0, figures=False, n_boot=0)
    cfg.manifest, cfg.external, cfg.hybrid = str(synth_cohort / manifest), "", True
    return cfg


def test_one_command_fits_the_hybrid_and_predict_applies_it_without_a_flag(hybrid_run, synth_cohort, tmp_path):
    """python -m finetune --hybrid (the fixture's run): after the folds, the baselines and the hybrid on the run's
    splits into RUN/hybrid/ and the export into RUN/model/hybrid/; predict --model RUN/model applies it without a
    flag and gives the fit's hybrid_prob of the test rows."""
    out = hybrid_run / "run"
    assert (out / "model" / "hybrid" / "hybrid.json").is_file()
    assert sorted(p.name for p in (out / "hybrid").iterdir()) == ["features.csv", "hybrid", "radiomics_clinical"]
    _predict_gives_the_fits_test_scores(out, hybrid_run, synth_cohort, tmp_path, "prob")


def test_one_command_survival_hybrid_predicts_the_fits_risks(hybrid_run, synth_cohort, tmp_path):
    """The survival path end to end: python -m finetune --task survival --hybrid, then predict --model RUN/model
    gives the fit's hybrid_risk of the test rows (Cox first-level models and a Cox stacker)."""
    from finetune.train import run
    m = pd.read_csv(synth_cohort / "manifest.csv", dtype={"subject_id": str}).set_index("subject_id", drop=False)
    splits = json.loads((hybrid_run / "run" / "splits.json").read_text())
    for fold in splits["folds"]:  # each Cox baseline's training rows get a second censored row (the cohort has 5)
        if (m.loc[fold["train"], "event"] == 0).sum() < 2:
            m.loc[next(s for s in fold["train"] if m.loc[s, "event"] == 1), "event"] = 0
    # no tied times, so each inner-CV fold of the stacker's 12 val rows ranks something
    m["time"] += np.arange(len(m)) * 1e-3
    for col in ("image", "mask"):  # the copy lies elsewhere: absolute paths
        m[col] = [str(synth_cohort / p) for p in m[col]]
    m.to_csv(tmp_path / "manifest_censored.csv", index=False)
    out = hybrid_run / "one_command_survival"  # beside the fixture's run: the same prepared cache
    cfg = _survival_cfg(synth_cohort, out, str(tmp_path / "manifest_censored.csv"))
    cfg.splits = str(hybrid_run / "run" / "splits.json")  # the same subjects: the splits whose folds were counted
    run(cfg)
    assert sorted(p.name for p in (out / "hybrid").iterdir()) == ["clinical_only", "features.csv", "hybrid",
                                                                  "radiomics_clinical"]
    _predict_gives_the_fits_test_scores(out, hybrid_run, synth_cohort, tmp_path, "risk")


def _predict_gives_the_fits_test_scores(out, hybrid_run, synth_cohort, tmp_path, score: str):
    """predict --model RUN/model, with no --hybrid, on the run's test rows gives the hybrid fit's test scores."""
    from finetune.predict import main as predict_main
    _test_rows(hybrid_run, synth_cohort).to_csv(tmp_path / "new.csv", index=False)
    assert predict_main(["--model", str(out / "model"), "--manifest", str(tmp_path / "new.csv"),
                         "--out", str(tmp_path / "pred.csv")]) == 0
    got = pd.read_csv(tmp_path / "pred.csv", dtype={"subject_id": str}).set_index("subject_id")
    fitted = pd.read_csv(out / "hybrid" / "hybrid" / "predictions.csv", dtype={"subject_id": str})
    fitted = fitted[fitted.split == "test"].set_index("subject_id")[score]
    assert sorted(got.index) == sorted(fitted.index) and score in got.columns
    np.testing.assert_allclose(got.loc[fitted.index, f"hybrid_{score}"], fitted, rtol=0, atol=1e-6)
    assert np.ptp(fitted) > 1e-3


def test_a_survival_run_whose_baselines_cannot_be_fitted_is_refused_before_any_fold(hybrid_run, synth_cohort):
    """The synthetic cohort's 30 patients have too few censored rows for a Cox baseline in every fold: the run
    stops before training, not after it, and writes nothing."""
    from finetune.train import run
    out = hybrid_run / "refused"
    with pytest.raises(InputError, match=r"^--hybrid: the baselines fitted on .* need at least 2 events and 2 "
                                         r"censored rows"):
        run(_survival_cfg(synth_cohort, out, "manifest.csv"))
    assert not out.exists()


def test_a_run_the_hybrid_cannot_be_fitted_on_is_refused_before_training(hybrid_run, synth_cohort):
    from core.cli import parse_config
    from core.errors import ConfigError
    from finetune.baselines.run_hybrid import check_run_hybrid
    from finetune.config import FinetuneConfig
    with pytest.raises(ConfigError, match="--hybrid: stacks one outcome score; --task multitask"):
        parse_config(FinetuneConfig, ["--hybrid", "--task", "multitask"])
    cfg = tiny_cfg(synth_cohort, hybrid_run / "never", task="classification")
    splits = json.loads((hybrid_run / "run" / "splits.json").read_text())
    df = pd.read_csv(synth_cohort / "manifest.csv", dtype={"subject_id": str})
    with pytest.raises(InputError, match="--hybrid: .* has no clinical columns"):
        check_run_hybrid(cfg, df, splits, [])
    with pytest.raises(InputError, match=r"the 'large' cohort has no clinical column\(s\) \['age'\]"):
        check_run_hybrid(cfg, df, splits, ["age"], {"large": df.drop(columns="age")})
    with pytest.raises(InputError, match=r"the 'large' cohort has no \['image'\] column; the hybrid's radiomics"):
        check_run_hybrid(cfg, df, splits, ["age"], {"large": df.drop(columns="image")})
    with pytest.raises(InputError, match="fold 0.s train rows need at least 2 rows of each class"):
        check_run_hybrid(cfg, df.assign(label=0), splits, ["age"])
    check_run_hybrid(cfg, df, splits, ["age"])  # the control: the cohort itself can be stacked


def test_the_hybrid_flag_leaves_the_fold_fingerprint_alone():
    """--hybrid changes nothing a fold trains on: a run's finished folds are reused when it is added (and the
    fingerprints of runs made before the flag stay as they were)."""
    from dataclasses import replace

    from finetune.config import FinetuneConfig
    from finetune.train import fold_fingerprint
    splits = {"folds": [{"train": ["a"], "val": ["b"]}]}
    cfg = FinetuneConfig()
    assert fold_fingerprint(replace(cfg, hybrid=True), splits) == fold_fingerprint(cfg, splits)


def test_a_rerun_removes_the_hybrid_export_of_the_models_it_may_replace(hybrid_run, synth_cohort, tmp_path, monkeypatch):
    """An earlier --hybrid run left RUN/model/hybrid/ and RUN/hybrid/; a rerun in the same folder may retrain the
    folds, so both (stacked on the old fold models) go as the run starts, before any fold trains, or predict
    --model RUN/model (or finetune.evaluate --baselines RUN/hybrid) would pair them with the new models without a
    word."""
    import finetune.train as train
    out = tmp_path / "rerun"
    shutil.copytree(hybrid_run / "baselines" / "hybrid" / "export", out / "model" / "hybrid")
    shutil.copytree(hybrid_run / "baselines", out / "hybrid")

    def stop(*args, **kwargs):
        raise RuntimeError("folds would train here")
    monkeypatch.setattr(train, "run_folds", stop)
    cfg = tiny_cfg(synth_cohort, out, task="classification", fusion="concat", explain=0, figures=False, n_boot=0)
    cfg.external = ""
    with pytest.raises(RuntimeError, match="folds would train here"):
        train.run(cfg)
    assert not (out / "model" / "hybrid").exists() and not (out / "hybrid").exists()


def test_the_hybrid_is_on_by_default_where_it_applies_and_a_bare_flag_requires_it(tmp_path, capsys):
    """--hybrid: auto (the default), true (a bare --hybrid), false; the saved config keeps what was given."""
    from core.cli import parse_config
    from core.config import load_config, save_config
    from finetune.baselines.run_hybrid import hybrid_applies
    from finetune.config import FinetuneConfig
    parse = lambda *argv: parse_config(FinetuneConfig, list(argv))[0]  # noqa: E731
    assert FinetuneConfig().hybrid == parse().hybrid == "auto" and hybrid_applies(parse())
    assert parse("--hybrid").hybrid is True and parse("--hybrid", "--task", "survival").hybrid is True
    assert parse("--hybrid", "false").hybrid is False and not hybrid_applies(parse("--hybrid", "false"))
    auto_multitask = parse("--hybrid", "auto", "--task", "multitask")  # no one score to stack: left out, no error
    assert not hybrid_applies(auto_multitask) and not hybrid_applies(parse("--task", "segmentation"))
    for value in ("auto", True, False):
        save_config(FinetuneConfig(hybrid=value), tmp_path / "c.yaml")
        assert load_config(FinetuneConfig, tmp_path / "c.yaml").hybrid == value
    with pytest.raises(SystemExit):
        parse_config(FinetuneConfig, ["--help"])
    assert "{true,false}|auto" in capsys.readouterr().out


def test_auto_goes_on_without_a_hybrid_it_cannot_fit_and_says_why(hybrid_run, synth_cohort, tmp_path, capsys,
                                                                  monkeypatch):
    """The synthetic cohort's survival rows cannot fit the Cox baselines (too few censored rows): --hybrid true
    refuses the run (test above), auto says why in one line and trains the folds without it; a manifest without
    clinical columns is the same."""
    import finetune.train as train
    from finetune.baselines.run_hybrid import resolve_hybrid

    def stop(*args, **kwargs):
        raise RuntimeError("folds would train here")
    monkeypatch.setattr(train, "run_folds", stop)
    cfg = _survival_cfg(synth_cohort, tmp_path / "auto", "manifest.csv")
    cfg.hybrid = "auto"
    with pytest.raises(RuntimeError, match="folds would train here"):
        train.run(cfg)
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("hybrid (--hybrid auto)")]
    assert len(line) == 1 and "not fitted: the baselines fitted on" in line[0] and "censored rows" in line[0]
    cls = tiny_cfg(synth_cohort, tmp_path / "cls", task="classification", hybrid="auto")
    splits = json.loads((hybrid_run / "run" / "splits.json").read_text())
    df = pd.read_csv(synth_cohort / "manifest.csv", dtype={"subject_id": str})
    assert not resolve_hybrid(cls, df, splits, [])
    assert "not fitted: " in capsys.readouterr().out
    assert resolve_hybrid(cls, df, splits, ["age"])  # the control: with a clinical column it is fitted
    cls.hybrid = True
    with pytest.raises(InputError, match="has no clinical columns"):
        resolve_hybrid(cls, df, splits, [])


def test_the_run_reports_the_hybrid_beside_its_model(hybrid_run, synth_cohort):
    """The default run prints and keeps, in metrics.json's "baselines", what finetune.evaluate --baselines
    RUN/hybrid reports: the hybrid's AUC per split (here checked against sklearn on its test predictions) and the
    model's paired difference to it; the run's own record (its splits' metrics, its folds) stays."""
    from sklearn.metrics import roc_auc_score
    metrics = json.loads((hybrid_run / "run" / "metrics.json").read_text())
    assert metrics["splits"]["test"] and len(metrics["folds"]) == 2
    entry = metrics["baselines"]["splits"]["test"]["hybrid"]["auc"]
    pred = pd.read_csv(hybrid_run / "run" / "hybrid" / "hybrid" / "predictions.csv", dtype={"subject_id": str})
    test = pred[pred["split"] == "test"].merge(
        pd.read_csv(synth_cohort / "manifest.csv", dtype={"subject_id": str})[["subject_id", "label"]], on="subject_id")
    assert entry["value"] == pytest.approx(roc_auc_score(test["label"], test["prob"]))
    assert entry["model_minus_baseline"]["diff"] is not None
    assert set(metrics["baselines"]["splits"]["val"]) == {"hybrid", "radiomics_clinical"}


def test_under_auto_a_hybrid_that_fails_after_training_leaves_the_run_its_model(tmp_path, monkeypatch, capsys):
    """What the checks before training cannot foresee (a radiomics or baseline fit failing): under --hybrid auto
    one line, and the run returns with its fine-tuned model; under --hybrid true it is the run's error."""
    import finetune.baselines.run_hybrid as run_hybrid
    from finetune.config import FinetuneConfig

    def fail(*args, **kwargs):
        raise ValueError("Input contains NaN")
    monkeypatch.setattr(run_hybrid, "fit_run_hybrid", fail)
    cfg = FinetuneConfig(output_dir=str(tmp_path), hybrid="auto")  # --task classification, the default
    assert run_hybrid.fit_and_report_hybrid(cfg, ["age"], pd.DataFrame(), {}) is None
    assert "hybrid (--hybrid auto): not fitted: ValueError: Input contains NaN" in capsys.readouterr().out
    cfg.hybrid = True
    with pytest.raises(ValueError, match="Input contains NaN"):
        run_hybrid.fit_and_report_hybrid(cfg, ["age"], pd.DataFrame(), {})
