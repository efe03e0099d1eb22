"""finetune.evaluate end to end on a small synthetic cohort; values checked against sklearn / sksurv."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score
from sksurv.metrics import concordance_index_censored, concordance_index_ipcw
from sksurv.util import Surv

from finetune.evaluate import bootstrap_counts, evaluate, main, paired_bootstrap_diff
from finetune.metrics import auc_kernel, delong_paired_test

ROOT = Path(__file__).resolve().parents[1]


def make_cohort(tmp_path: Path, seed: int = 0):
    """Manifest (60 subjects) + one-class external manifest (10) + predictions over train/val/test/external."""
    rng = np.random.default_rng(seed)
    n = 60
    ids = [f"s{i:03d}" for i in range(n)]
    label = rng.integers(0, 2, n)
    label[:4] = [0, 1, 0, 1]
    signal = label * 1.2 + rng.normal(size=n)
    time = rng.exponential(np.exp(-0.8 * signal)) * 100 + 1
    event = (rng.uniform(size=n) < 0.7).astype(int)
    manifest = pd.DataFrame({"subject_id": ids, "patient_id": [f"p{i // 2}" for i in range(n)],
                             "image": [f"img/{s}.nii.gz" for s in ids], "mask": [f"img/{s}_mask.nii.gz" for s in ids],
                             "label": label, "time": time.round(2), "event": event, "age": rng.integers(40, 80, n)})
    ext_ids = [f"e{i}" for i in range(10)]
    external = pd.DataFrame({"subject_id": ext_ids, "image": "x.nii.gz", "mask": "m.nii.gz", "label": 0,
                             "time": rng.uniform(5, 50, 10).round(2), "event": [1, 0] * 5})
    manifest.to_csv(tmp_path / "manifest.csv", index=False)
    external.to_csv(tmp_path / "external.csv", index=False)

    prob = lambda s: 1 / (1 + np.exp(-s))  # noqa: E731
    rows = []
    train, val, test = np.arange(0, 24), np.arange(24, 44), np.arange(44, 60)
    for fold in (0, 1):
        fold_val = val[fold::2]
        for split, idx in (("train", train), ("val", fold_val), ("test", test)):
            noise = rng.normal(scale=0.3, size=len(idx))
            for i, e in zip(idx, noise):
                rows.append({"subject_id": ids[i], "split": split, "fold": fold, "prob": prob(signal[i] + e),
                             "risk": signal[i] + e})
    pred = pd.DataFrame(rows)
    ens = pred[pred.split == "test"].groupby("subject_id", as_index=False)[["prob", "risk"]].mean()
    ens["split"], ens["fold"] = "test", -1
    ext = pd.DataFrame({"subject_id": ext_ids, "split": "external", "fold": -1,
                        "prob": rng.uniform(size=10), "risk": rng.normal(size=10)})
    pred = pd.concat([pred, ens, ext], ignore_index=True)
    (tmp_path / "run").mkdir()
    pred.to_csv(tmp_path / "run" / "predictions.csv", index=False)
    return manifest, external, pred


def test_cli_end_to_end(tmp_path, capsys):
    manifest, external, pred = make_cohort(tmp_path)
    out = tmp_path / "eval"
    main(["--predictions", str(tmp_path / "run" / "predictions.csv"), "--manifest", str(tmp_path / "manifest.csv"),
          "--external", str(tmp_path / "external.csv"), "--out", str(out), "--n_boot", "20"])
    printed = capsys.readouterr().out
    assert "split" in printed and "val" in printed and "external" in printed
    result = json.loads((out / "metrics.json").read_text())
    outcomes = pd.concat([manifest, external]).set_index("subject_id")

    val = pred[pred.split == "val"]
    y = outcomes.loc[val.subject_id, "label"].to_numpy()
    entry = result["splits"]["val"]
    assert entry["rows"] == "pooled over folds [0, 1]" and entry["n"] == 20
    assert entry["classification"]["auc"] == pytest.approx(roc_auc_score(y, val.prob))
    assert entry["classification"]["auc_ci_bootstrap"] is not None
    assert set(entry["folds"]) == {"0", "1"}
    fold0 = val[val.fold == 0]
    assert entry["folds"]["0"]["classification"]["auc"] == pytest.approx(
        roc_auc_score(outcomes.loc[fold0.subject_id, "label"], fold0.prob))

    test = pred[(pred.split == "test") & (pred.fold == -1)]
    t, e = outcomes.loc[test.subject_id, "time"].to_numpy(), outcomes.loc[test.subject_id, "event"].to_numpy()
    surv = result["splits"]["test"]["survival"]
    assert result["splits"]["test"]["rows"] == "fold ensemble (fold -1)"
    assert surv["harrell_c"] == pytest.approx(concordance_index_censored(e.astype(bool), t, test.risk.to_numpy())[0])
    # Uno's C uses the training rows (mean over the two fold models) as the censoring reference.
    train = pred[pred.split == "train"].groupby("subject_id")["risk"].mean()
    y_train = Surv.from_arrays(outcomes.loc[train.index, "event"], outcomes.loc[train.index, "time"])
    expected_uno = concordance_index_ipcw(y_train, Surv.from_arrays(e, t), test.risk.to_numpy(),
                                          tau=outcomes.loc[train.index, "time"].max())[0]
    assert surv["reference"] == "training rows" and surv["uno_c"] == pytest.approx(expected_uno)
    assert surv["km"]["cut"] == "median training risk"
    assert surv["km"]["threshold"] == pytest.approx(np.median(train.to_numpy()))

    ext = result["splits"]["external"]["classification"]
    assert ext["auc"] is None and ext["auc_ci"] is None and ext["notes"]["auc"] == "only one class present"
    assert result["splits"]["external"]["survival"]["harrell_c"] is not None

    for split in ("train", "val", "test", "external"):
        for kind in ("roc", "km", "calibration"):
            png = out / f"{kind}_{split}.png"
            assert png.stat().st_size > 5000 and png.read_bytes()[:4] == b"\x89PNG"
    assert len(result["figures"]) == 12


def test_compare_gives_paired_delong(tmp_path, capsys):
    manifest, _, pred = make_cohort(tmp_path)
    other = pred.copy()
    other["prob"] = np.random.default_rng(9).uniform(size=len(other))
    other = other[(other.split != "external") & ~other.subject_id.isin(["s050", "s051"])]  # common subjects only
    result = evaluate(pred[pred.split != "external"], manifest, other, out_dir=None, n_boot=0)
    cmp = result["comparison"]["test"]
    test = pred[(pred.split == "test") & (pred.fold == -1) & ~pred.subject_id.isin(["s050", "s051"])]
    other_test = other[(other.split == "test") & (other.fold == -1)].set_index("subject_id").loc[test.subject_id]
    y = manifest.set_index("subject_id").loc[test.subject_id, "label"]
    expected = delong_paired_test(y, test.prob, other_test.prob)
    assert cmp["n_common"] == 14
    assert cmp["p"] == pytest.approx(expected["p"]) and cmp["diff"] == pytest.approx(expected["diff"])
    assert "figures" not in result


def test_outcomes_dataframe_and_one_class_split(tmp_path):
    manifest, _, pred = make_cohort(tmp_path)
    only_neg = manifest.assign(label=0)
    result = evaluate(pred[pred.split == "val"][["subject_id", "split", "fold", "prob"]], only_neg, n_boot=5)
    c = result["splits"]["val"]["classification"]
    assert c["auc"] is None and c["notes"]["auc"] == "only one class present" and c["brier"] is not None
    assert "survival" not in result["splits"]["val"]


def _run_bad(tmp_path, capsys, pred: pd.DataFrame, extra=()):
    path = tmp_path / "bad.csv"
    pred.to_csv(path, index=False)
    with pytest.raises(SystemExit) as exc:
        main(["--predictions", str(path), "--manifest", str(tmp_path / "manifest.csv"), "--out", str(tmp_path / "o"),
              "--n_boot", "0", *extra])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err.startswith("error:") and "\n" not in err
    return err


def test_bad_predictions_exit_2_with_one_line(tmp_path, capsys):
    _, _, pred = make_cohort(tmp_path)
    pred = pred[pred.split != "external"].reset_index(drop=True)
    assert "'fold'" in _run_bad(tmp_path, capsys, pred.drop(columns="fold"))
    text = pred.astype({"prob": object})
    text.loc[3, "prob"] = "high"
    err = _run_bad(tmp_path, capsys, text)
    assert "'prob'" in err and "row 4" in err
    nan = pred.copy()
    nan.loc[[5, 7], "risk"] = np.nan
    err = _run_bad(tmp_path, capsys, nan)
    assert "'risk'" in err and "row 6" in err and "row 8" in err
    unknown = pd.concat([pred, pd.DataFrame([{"subject_id": "ghost", "split": "test", "fold": 0, "prob": 0.5,
                                              "risk": 0.0}])])
    assert "ghost" in _run_bad(tmp_path, capsys, unknown)
    assert "more than once" in _run_bad(tmp_path, capsys, pd.concat([pred, pred.head(1)]))
    assert "[0, 1]" in _run_bad(tmp_path, capsys, pred.assign(prob=pred.prob + 1))
    assert "not found" in _run_bad(tmp_path, capsys, pred, ["--compare", str(tmp_path / "missing.csv")])


def test_module_entry_point_exit_code(tmp_path):
    make_cohort(tmp_path)
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"subject_id": ["s000"], "split": ["val"], "fold": [0]}).to_csv(bad, index=False)
    proc = subprocess.run([sys.executable, "-m", "finetune.evaluate", "--predictions", str(bad),
                           "--manifest", str(tmp_path / "manifest.csv")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "'prob'" in proc.stderr


def test_same_cis_from_fine_tuning_and_from_the_cli(tmp_path, capsys):
    """Fine-tuning evaluates its in-memory predictions (float32 scores) with its own --n_boot and
    --seed; the CLI, given only the predictions file it wrote, must report the very same numbers."""
    from models.tasks import MULTITASK
    make_cohort(tmp_path)
    run = tmp_path / "run"
    pred = pd.read_csv(run / "predictions.csv", dtype={"subject_id": str}).astype({"prob": "float32",
                                                                                   "risk": "float32"})
    pred.to_csv(run / "predictions.csv", index=False)
    (run / "config.yaml").write_text("seed: 7\nn_boot: 20\ntask: multitask\n")  # as fine-tuning saves it
    outcomes = pd.concat([MULTITASK.read_manifest(tmp_path / f, check_files=False)
                          for f in ("manifest.csv", "external.csv")], ignore_index=True)
    by_function = evaluate(pred, outcomes, n_boot=20, seed=7)  # what finetune.train calls

    def by_cli(*flags):
        out = tmp_path / f"cli{len(list(tmp_path.glob('cli*')))}"
        main(["--predictions", str(run / "predictions.csv"), "--manifest", str(tmp_path / "manifest.csv"),
              "--external", str(tmp_path / "external.csv"), "--out", str(out), *flags])
        return json.loads((out / "metrics.json").read_text())

    from_config = by_cli()
    assert "n_boot 20, seed 7" in capsys.readouterr().out
    assert from_config["splits"] == json.loads(json.dumps(by_function["splits"]))
    test_ci = from_config["splits"]["test"]["classification"]["auc_ci_bootstrap"]
    assert test_ci is not None
    (run / "config.yaml").unlink()
    assert by_cli("--n_boot", "20", "--seed", "7")["splits"] == from_config["splits"]
    assert by_cli("--n_boot", "20")["seed"] == 0  # no run config: the documented default


def test_bootstrap_cis_do_not_depend_on_row_order(tmp_path):
    manifest, _, pred = make_cohort(tmp_path)
    pred, outcomes = pred[pred.split != "external"], manifest.drop(columns="patient_id")
    shuffled = pred.sample(frac=1.0, random_state=3)
    a, b = evaluate(pred, outcomes, n_boot=20, seed=1), evaluate(shuffled, outcomes, n_boot=20, seed=1)
    for split in ("val", "test"):
        assert a["splits"][split]["classification"]["auc_ci_bootstrap"] == \
            b["splits"][split]["classification"]["auc_ci_bootstrap"]
        assert a["splits"][split]["survival"]["harrell_c_ci"] == b["splits"][split]["survival"]["harrell_c_ci"]


def test_km_groups_of_a_held_out_set_are_cut_on_training_data(tmp_path):
    """Without "train" rows (as fine-tuning writes them), a held-out split is cut at the median
    out-of-fold risk of the training subjects, never at its own median."""
    from finetune.evaluate import evaluate, read_outcomes
    manifest, external, pred = make_cohort(tmp_path)
    pred = pred[pred.split != "train"]
    res = evaluate(pred, read_outcomes(tmp_path / "manifest.csv", tmp_path / "external.csv"), n_boot=0)
    oof = pred[pred.split == "val"].groupby("subject_id")["risk"].mean()
    test = pred[(pred.split == "test") & (pred.fold == -1)]
    km = res["splits"]["test"]["survival"]["km"]
    assert km["cut"] == "median out-of-fold risk of the training subjects"
    assert km["threshold"] == pytest.approx(float(np.median(oof)))
    assert km["threshold"] != pytest.approx(float(np.median(test["risk"])))
    assert res["splits"]["val"]["survival"]["km"]["cut"] == "median risk of the evaluated rows"


# ---------------------------------------------------------------- paired bootstrap of an AUC difference

def _two_models(rng, n: int):
    y = rng.integers(0, 2, n)
    shared = rng.normal(size=n)  # both models see it: their errors are correlated, pairing matters
    return y, y * 1.0 + shared + 0.5 * rng.normal(size=n), y * 0.6 + shared + 0.5 * rng.normal(size=n)


def test_bootstrap_counts_resample_patients_and_share_draws_between_equal_sets():
    groups = [np.array(["p2", "p1", "p1", "p3"]), np.array(["p1", "p3", "p2"]), np.array(["q1", "q2"])]
    a, b, c = bootstrap_counts(groups, n_boot=200, seed=0)
    assert a.shape == (200, 4) and b.shape == (200, 3) and c.shape == (200, 2)
    assert (a[:, 1] == a[:, 2]).all()  # both rows of patient p1 are drawn together
    assert (a.sum(1) - a[:, 2] == 3).all() and (c.sum(1) == 2).all()  # each draw holds as many patients
    # the same patients (another seed's rows of them) get the same draw in every replicate
    assert (b[:, 0] == a[:, 1]).all() and (b[:, 1] == a[:, 3]).all() and (b[:, 2] == a[:, 0]).all()


def test_paired_bootstrap_matches_a_plain_sklearn_loop_over_the_same_resamples():
    rng = np.random.default_rng(0)
    # seed 0 and 1 score the same 40 patients (one with two rows); seed 2 its own 30 (a different test split)
    samples = [_two_models(rng, 41), _two_models(rng, 41), _two_models(rng, 30)]
    pid = [f"p{i}" for i in range(40)] + ["p0"]
    groups = [np.array(pid), np.array(pid), np.array([f"q{i}" for i in range(30)])]
    n_boot = 300
    got = paired_bootstrap_diff([auc_kernel(y, a) for y, a, _ in samples], [auc_kernel(y, b) for y, _, b in samples],
                                groups, n_boot=n_boot, seed=5)
    counts = bootstrap_counts(groups, n_boot, seed=5)
    diffs = []
    for r in range(n_boot):
        per_seed = []
        for (y, a, b), c in zip(samples, counts):
            idx = np.repeat(np.arange(len(y)), c[r])
            if len(set(y[idx])) < 2:
                break
            per_seed.append(roc_auc_score(y[idx], a[idx]) - roc_auc_score(y[idx], b[idx]))
        else:
            diffs.append(np.mean(per_seed))
    assert got["n_used"] == len(diffs) > n_boot // 2
    assert got["ci"] == pytest.approx(list(np.quantile(diffs, [0.025, 0.975])), abs=1e-12)
    assert got["a"] == pytest.approx(np.mean([roc_auc_score(y, a) for y, a, _ in samples]), abs=1e-12)
    assert got["diff"] == pytest.approx(got["a"] - got["b"])


def test_paired_bootstrap_ci_agrees_with_delong_on_a_large_sample():
    rng = np.random.default_rng(1)
    y, a, b = _two_models(rng, 600)
    got = paired_bootstrap_diff([auc_kernel(y, a)], [auc_kernel(y, b)], [np.arange(600)], n_boot=1000, seed=0)
    d = delong_paired_test(y, a, b)
    half = 1.959964 * np.sqrt(d["var_diff"])
    assert got["diff"] == pytest.approx(d["diff"], abs=1e-12)
    assert got["ci"][0] == pytest.approx(d["diff"] - half, abs=0.008)
    assert got["ci"][1] == pytest.approx(d["diff"] + half, abs=0.008)
    # unpaired resampling (independent draws per model) would give a far wider interval: pairing is real
    assert got["ci"][1] - got["ci"][0] < 0.8 * 2 * 1.959964 * np.sqrt(
        auc_delong_var(y, a) + auc_delong_var(y, b))


def auc_delong_var(y, s):
    from finetune.metrics import auc_delong
    return auc_delong(y, s)["var"]


def test_re_evaluating_a_run_in_its_folder_keeps_its_fold_record(tmp_path):
    """finetune.evaluate writes metrics.json where fine-tuning wrote it; the metrics are replaced, the
    record of how the folds were trained (the "folds" list) is kept, and nothing stale is carried over."""
    manifest, external, pred = make_cohort(tmp_path)
    run = tmp_path / "run"
    record = [{"fold": 0, "best_epoch": 3, "folder": "model/fold0"}, {"fold": 1, "best_epoch": 5, "folder": "f1"}]
    (run / "metrics.json").write_text(json.dumps({"folds": record, "comparison": {"stale": True},
                                                  "splits": {"old": {}}}))
    main(["--predictions", str(run / "predictions.csv"), "--manifest", str(tmp_path / "manifest.csv"),
          "--external", str(tmp_path / "external.csv"), "--n_boot", "0"])
    result = json.loads((run / "metrics.json").read_text())
    assert result["folds"] == record
    assert "comparison" not in result and "old" not in result["splits"] and "val" in result["splits"]


def _baseline(pred: pd.DataFrame, manifest: pd.DataFrame, seed: int, val_perfect: bool = False) -> pd.DataFrame:
    """A baseline's predictions on val (out-of-fold) and test (fold ensemble): noise, or the truth on val."""
    rng = np.random.default_rng(seed)
    rows = pred[pred.split.isin(["val", "test"]) & ((pred.split == "val") | (pred.fold == -1))].copy()
    truth = manifest.set_index("subject_id").loc[rows.subject_id]
    rows["prob"] = rng.uniform(size=len(rows))
    rows["risk"] = rng.normal(size=len(rows))
    if val_perfect:
        on_val = (rows.split == "val").to_numpy()
        rows.loc[on_val, "prob"] = truth["label"].to_numpy()[on_val] * 0.9 + 0.05
        rows.loc[on_val, "risk"] = -truth["time"].to_numpy()[on_val]
    return rows


def test_baselines_get_paired_bootstrap_cis_and_the_best_is_picked_on_val(tmp_path, capsys):
    """Each baseline's AUC / Harrell's C (sklearn / sksurv), the model's paired difference to it with a CI
    recomputed by a plain roc_auc_score / sksurv loop over the same patient resamples, and the best baseline
    picked on the out-of-fold val rows (B, perfect there), not on test (where A and B are both noise)."""
    manifest, _, pred = make_cohort(tmp_path)
    pred = pred[pred.split != "external"]
    bases = {"A": _baseline(pred, manifest, 1), "B": _baseline(pred, manifest, 2, val_perfect=True)}
    n_boot = 40
    result = evaluate(pred, manifest, n_boot=n_boot, seed=3, baselines=bases)["baselines"]
    assert result["best"] == {"auc": "B", "harrell_c": "B"} and result["chosen_on"] == "val"
    truth = manifest.set_index("subject_id")
    model = pred[(pred.split == "test") & (pred.fold == -1)].sort_values("subject_id")
    base = bases["A"][bases["A"].split == "test"].set_index("subject_id").loc[model.subject_id]
    y, t, e = (truth.loc[model.subject_id, c].to_numpy() for c in ("label", "time", "event"))
    entry = result["splits"]["test"]["A"]
    assert entry["auc"]["value"] == pytest.approx(roc_auc_score(y, base.prob))
    c_base = concordance_index_censored(e.astype(bool), t, base.risk.to_numpy())[0]
    assert entry["harrell_c"]["value"] == pytest.approx(c_base)
    auc_d, c_d = entry["auc"]["model_minus_baseline"], entry["harrell_c"]["model_minus_baseline"]
    assert auc_d["n_common"] == 16
    assert auc_d["diff"] == pytest.approx(roc_auc_score(y, model.prob) - roc_auc_score(y, base.prob))
    assert auc_d["delong_p"] == pytest.approx(delong_paired_test(y, model.prob, base.prob)["p"])
    c_model = concordance_index_censored(e.astype(bool), t, model.risk.to_numpy())[0]
    assert c_d["diff"] == pytest.approx(c_model - c_base)
    groups = truth.loc[model.subject_id, "patient_id"].to_numpy()
    diffs = {"auc": [], "c": []}
    for c in bootstrap_counts([groups], n_boot, 3)[0]:
        i = np.repeat(np.arange(len(y)), c)
        if len(set(y[i])) == 2:
            diffs["auc"].append(roc_auc_score(y[i], model.prob.to_numpy()[i])
                                - roc_auc_score(y[i], base.prob.to_numpy()[i]))
        cc = [concordance_index_censored(e[i].astype(bool), t[i], s[i])[0]
              for s in (model.risk.to_numpy(), base.risk.to_numpy())]
        diffs["c"].append(cc[0] - cc[1])
    assert auc_d["ci"] == pytest.approx(list(np.quantile(diffs["auc"], [0.025, 0.975])))
    assert c_d["ci"] == pytest.approx(list(np.quantile(diffs["c"], [0.025, 0.975])))

    folder = tmp_path / "baselines"
    for name, df in bases.items():
        (folder / name).mkdir(parents=True)
        df.to_csv(folder / name / "predictions.csv", index=False)
    pred.to_csv(tmp_path / "run" / "predictions.csv", index=False)
    main(["--predictions", str(tmp_path / "run" / "predictions.csv"), "--manifest", str(tmp_path / "manifest.csv"),
          "--baselines", str(folder), "--n_boot", "0", "--out", str(tmp_path / "eval")])
    printed = capsys.readouterr().out
    assert "baseline A" in printed and "(best on val)" in printed
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["baselines"]["models"] == ["A", "B"]
    with pytest.raises(SystemExit):
        main(["--predictions", str(tmp_path / "run" / "predictions.csv"), "--manifest", str(tmp_path / "manifest.csv"),
              "--baselines", str(tmp_path / "run"), "--n_boot", "0", "--out", str(tmp_path / "eval2")])
    assert "no <baseline>/predictions.csv" in capsys.readouterr().err
