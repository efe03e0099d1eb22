"""benchmarks.research.ssl_gain end to end at the toy size: every model x held-out set is reported (an AUC in [0, 1]
or null with a reason), the large evaluation sets are predicted by every model without clashing ids, every
claim x split is decided from its paired CI (recomputed here with sklearn from the saved scores), the
table and the ROC figures are written, and a rerun skips every finished stage. The numbers themselves
mean nothing at this size and are not checked."""
import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score
from sksurv.metrics import concordance_index_censored

from benchmarks.research import ssl_gain
from benchmarks.research.ssl_gain.paired import BOOT_SEED, CLAIMS, NON_INFERIORITY_MARGIN
from benchmarks.research.ssl_gain.presets import BASELINES, EVAL_SETS, LARGE_DIR, LARGE_SEED, LARGE_SETS, default_model
from finetune.evaluate import bootstrap_counts

MODELS = ("mim", "multimodal", "scratch", "mae", "radiomics", "clinical_only", "clinical_linear", "radiomics_clinical",
          "oracle")


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ssl_gain")
    assert ssl_gain.main(["--preset", "cpu", "--toy", "--out", str(out)]) == 0
    return out


def _check_metric(entry: dict, key: str):
    value = entry.get(key)
    if value is None:
        assert entry.get("reason"), f"{key} is null without a reason: {entry}"
    else:
        assert 0.0 <= value <= 1.0
        ci = entry.get("ci")
        if ci is not None:
            assert 0.0 <= ci[0] <= value <= ci[1] <= 1.0


def test_results_cover_every_model_and_test_set(toy_run):
    results = json.loads((toy_run / "results.json").read_text())
    assert set(MODELS) <= set(results["summary"])
    assert results["seeds"] == [0]
    seed = results["per_seed"][0]
    assert seed["chosen_fusion"] in ssl_gain.TOY.fusions
    assert set(seed["fusion_val_auc"]) == set(ssl_gain.TOY.fusions)
    for model in MODELS:
        for split in EVAL_SETS:
            entry = seed["models"][model][split]
            _check_metric(entry["classification"], "auc")
            _check_metric(entry["survival"], "c_index")
            summary = results["summary"][model][split]
            mean = summary["auc"]["mean"]
            assert (mean is None and summary["auc"].get("reason")) or 0.0 <= mean <= 1.0
            if model != ssl_gain.REFERENCE:  # paired DeLong against the MiM ViT: a p or a reason
                cmp = entry["classification"].get("vs_mim")
                if entry["classification"]["auc"] is not None:
                    assert cmp is not None and (cmp["p"] is None and cmp["reason"] or 0.0 <= cmp["p"] <= 1.0)
    # the fusion runs all share the held-out sets of the image-only run: identical splits
    ids = {m: sorted(seed["curves"]["external"][m]["label"]) for m in seed["curves"]["external"]}
    assert len({len(v) for v in ids.values()}) == 1
    assert "total_stage_seconds" in results and results["ordering"]


def test_table_and_figures_exist(toy_run):
    md = (toy_run / "results.md").read_text()
    for published in ("0.916", "0.764", "0.624", "0.496", "0.807", "0.691", "0.947", "0.821"):
        assert published in md
    assert "| model | test AUC (published) |" in md
    assert "| test_large AUC | external_large AUC |" in md and "| claim | model a | model b | metric | split | a | b | a − b | 95% CI | holds |" in md
    assert f"δ = {NON_INFERIORITY_MARGIN}" in md
    for name in [f"roc_{s}.png" for s in EVAL_SETS]:
        data = (toy_run / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_rerun_skips_finished_stages(toy_run):
    before = {p: p.stat().st_mtime_ns for p in toy_run.rglob("predictions.csv")}
    results = ssl_gain.run_benchmark(ssl_gain.resolve_preset("cpu", toy=True), toy_run)
    status = results["stage_status"]
    assert status and all(v == "skipped" for v in status.values()), status
    assert {p: p.stat().st_mtime_ns for p in toy_run.rglob("predictions.csv")} == before


def test_other_preset_in_same_folder_is_refused(toy_run):
    with pytest.raises(ssl_gain.InputError, match="another preset"):
        ssl_gain.run_benchmark(ssl_gain.resolve_preset("gpu"), toy_run)


@pytest.mark.parametrize("name", sorted(ssl_gain.PRESETS))
def test_presets_resolve(name, tmp_path, capsys):
    """Every preset builds valid pretraining and fine-tuning configs (the gpu one is not run here)."""
    assert ssl_gain.main(["--preset", name, "--out", str(tmp_path / "x"), "--show"]) == 0
    text = capsys.readouterr().out
    preset = ssl_gain.resolve_preset(name)
    from benchmarks.research.ssl_gain.stages import LAUNCH
    from core.config import load_config
    from pretrain.config import PretrainConfig
    levels = load_config(PretrainConfig, LAUNCH / preset.pretrain_config).model.masks.levels
    assert levels > 1 and f"pretrain (levels={levels})" in text and "pretrain (levels=1)" in text
    assert "ft_mim_none" in text
    assert 100 <= preset.n_labeled and 20 <= preset.n_external and preset.test_fraction == 0.2
    assert not (tmp_path / "x").exists()


def test_large_sets_are_held_out_and_predicted_by_every_model(toy_run):
    cohort = pd.read_csv(toy_run / "cohort" / "manifest.csv", dtype=str)
    preset = ssl_gain.resolve_preset("cpu", toy=True)
    for split, n in zip(LARGE_SETS, (preset.n_test_large, preset.n_external_large)):
        large = pd.read_csv(toy_run / LARGE_DIR / f"{split}.csv", dtype=str)
        assert len(large) == n and large["subject_id"].str.startswith("L").all()
        assert not set(large["subject_id"]) & set(cohort["subject_id"])
        assert not set(large["patient_id"]) & set(cohort["patient_id"])
        same_site = cohort if split == "test_large" else pd.read_csv(toy_run / "cohort" / "external.csv", dtype=str)
        assert set(large["site"]) == set(same_site["site"]) and large["site"].nunique() == 1
        ids = set(large["subject_id"])
        pred = pd.read_csv(toy_run / "seed0" / "ft_mim_none" / "predictions.csv", dtype={"subject_id": str})
        rows = pred[pred["split"] == split]
        assert set(rows["subject_id"]) == ids
        assert set(rows["fold"]) == {-1, *range(preset.folds)}  # every fold and the fold ensemble
        for run in [f"{m}_{t}" for m in BASELINES for t in ("classification", "survival")]:
            rad = pd.read_csv(toy_run / "seed0" / run / "predictions.csv", dtype={"subject_id": str})
            assert set(rad.loc[rad["split"] == split, "subject_id"]) == ids
        scores = pd.read_csv(toy_run / "seed0" / "scores.csv", dtype={"subject_id": str})
        for model in MODELS:  # the oracle too, from the large draw's own oracle file
            got = scores[(scores["model"] == model) & (scores["split"] == split) & (scores["task"] == "classification")]
            assert set(got["subject_id"]) == ids, model
        metrics = json.loads((toy_run / "seed0" / "ft_mim_none" / "metrics.json").read_text())
        assert split in json.dumps(metrics)


@pytest.mark.parametrize("name", sorted(ssl_gain.PRESETS))
def test_large_sets_hold_at_least_500_patients(name):
    from data.synth.cohort import sample_tables
    preset = ssl_gain.resolve_preset(name)
    a, b = sample_tables(preset.n_test_large, preset.n_external_large, LARGE_SEED)
    assert a["patient_id"].nunique() >= 500 and b["patient_id"].nunique() >= 500


def test_every_claim_and_split_is_decided_by_its_ci(toy_run):
    results = json.loads((toy_run / "results.json").read_text())
    claims = results["claims"]
    assert [(c["name"], c["split"]) for c in claims] == [(n, s) for n, *_ in CLAIMS for s in EVAL_SETS]
    assert len(claims) == 28 and results["non_inferiority_margin"] == NON_INFERIORITY_MARGIN == 0.02
    for c in claims:
        assert {"name", "split", "holds", "a", "b", "ci", "models", "metric"} <= set(c)
        for model, value in zip(c["models"], (c["a"], c["b"])):  # the seed-mean AUC / C of the main table
            mean = results["summary"][model][c["split"]][c["metric"]]["mean"]
            if c["a"] is None and c["b"] is None:  # a model without scores (the toy's unfitted hybrid): no pair
                assert c["reason"].startswith("no ") and c["holds"] is None
            else:
                assert value == pytest.approx(mean, abs=1e-9) if mean is not None else value is None
        if c["ci"] is None:
            assert c["holds"] is None and c["reason"]
        else:
            lo, hi = c["ci"]
            assert -1.0 <= lo <= hi <= 1.0
            assert c["holds"] == (lo > (-NON_INFERIORITY_MARGIN if ">=" in c["name"] else 0.0))
    vs = results["paired_vs_mim"]
    assert set(vs) >= set(MODELS) - {"mim"}
    assert all(set(vs[m]) == set(EVAL_SETS) and set(vs[m]["test"]) == {"auc", "c_index"} for m in vs)


def _harrell(both: pd.DataFrame, idx: np.ndarray, score: str) -> float:
    event, time = both["event"].to_numpy(bool)[idx], both["time"].to_numpy(float)[idx]
    return concordance_index_censored(event, time, both[score].to_numpy()[idx])[0]


def test_claim_ci_recomputed_with_sklearn_from_the_saved_scores(toy_run):
    """The end-to-end wiring: a claim's CI equals a plain roc_auc_score (AUC claims) or sksurv Harrell's C
    (the survival claim) loop over the same patient resamples."""
    results = json.loads((toy_run / "results.json").read_text())
    n_boot = results["paired_bootstrap"]["n_boot"]
    scores = pd.read_csv(toy_run / "seed0" / "scores.csv", dtype={"subject_id": str, "patient_id": str})
    checked = 0
    for claim in results["claims"]:
        a, b = claim["models"]
        task = "classification" if claim["metric"] == "auc" else "survival"
        rows = scores[(scores["task"] == task) & (scores["split"] == claim["split"])]
        both = rows[rows["model"] == a].merge(rows.loc[rows["model"] == b, ["subject_id", "score"]],
                                              on="subject_id", suffixes=("", "_b")).sort_values("subject_id")
        y, sa, sb = both["label"].to_numpy(int), both["score"].to_numpy(), both["score_b"].to_numpy()
        counts = bootstrap_counts([both["patient_id"]], n_boot, BOOT_SEED)[0]
        diffs = []
        for c in counts:
            idx = np.repeat(np.arange(len(y)), c)
            if task == "survival":
                try:
                    d = _harrell(both, idx, "score") - _harrell(both, idx, "score_b")
                except ValueError:  # sksurv: no event in this resample; undefined, skipped
                    continue
                if np.isfinite(d):  # NaN: no comparable pair; undefined, skipped
                    diffs.append(d)
            elif len(set(y[idx])) == 2:
                diffs.append(roc_auc_score(y[idx], sa[idx]) - roc_auc_score(y[idx], sb[idx]))
        if len(diffs) >= n_boot / 2:
            assert claim["ci"] == pytest.approx(list(np.quantile(diffs, [0.025, 0.975])), abs=1e-9)
            checked += 1
        else:
            assert claim["ci"] is None
    assert checked >= 5  # at least the external sets' claims have a CI even at toy size


def test_label_curve_fine_tunes_nested_subsets_and_compares_with_scratch(toy_run):
    """The toy preset's label size (8 patients): its manifest holds the subset and the seed's test set,
    its folds cover the subset only, the three image models fine-tune on it, and the curve compares each
    with scratch at the same n by the paired bootstrap, recomputed here with sklearn."""
    from benchmarks.research.ssl_gain.label_curve import run_name, subset_paths
    preset = ssl_gain.resolve_preset("cpu", toy=True)
    (n,) = preset.label_sizes
    manifest, split_path = subset_paths(toy_run, 0, n)
    main = json.loads((toy_run / "seed0" / "splits.json").read_text())
    sub = json.loads(split_path.read_text())
    df = pd.read_csv(manifest, dtype={"subject_id": str, "patient_id": str})
    assert sub["test"] == main["test"]
    trained = set(sub["folds"][0]["train"]) | set(sub["folds"][0]["val"])
    assert set(df["subject_id"]) == trained | set(main["test"])
    assert df[df["subject_id"].isin(trained)]["patient_id"].nunique() == n
    assert trained <= set(main["folds"][0]["train"]) | set(main["folds"][0]["val"])  # from the training pool
    for model in ("mim", "mae", "scratch"):
        pred = pd.read_csv(toy_run / "seed0" / run_name(model, n) / "predictions.csv", dtype={"subject_id": str})
        assert set(pred.loc[pred.split == "val", "subject_id"]) == trained
    curve = json.loads((toy_run / "label_curve.json").read_text())
    assert (toy_run / "label_curve.png").is_file() and "Label efficiency" in (toy_run / "results.md").read_text()
    point = next(p for p in curve["points"] if (p["n_key"], p["model"], p["split"], p["metric"])
                 == (f"n{n}", "mim", "external_large", "auc"))
    scores = pd.read_csv(toy_run / "seed0" / run_name("mim", n) / "predictions.csv", dtype={"subject_id": str})
    rows = scores[(scores.split == "external_large") & (scores.fold == -1)]
    truth = pd.read_csv(toy_run / LARGE_DIR / "external_large.csv", dtype={"subject_id": str}).set_index("subject_id")
    want = roc_auc_score(truth.loc[rows.subject_id, "label"], rows["prob"])
    assert point["value"] == pytest.approx(want)
    assert point["vs_scratch"]["diff"] is not None and point["n_patients"] == [n]


def test_which_model_fits_the_baselines_on_each_subset_and_judges_every_model_against_the_best(toy_run):
    """At the toy label size, each baseline is fitted on the subset's folds only (its val rows are the subset,
    its test rows the seed's test set); the best baseline is the one with the highest out-of-fold val AUC
    (recomputed with sklearn), and each model's difference to it on external_large is the difference of
    the two AUCs computed here."""
    from benchmarks.research.ssl_gain.label_curve import baseline_run, subset_paths
    preset = ssl_gain.resolve_preset("cpu", toy=True)
    (n,) = preset.label_sizes
    sub = json.loads(subset_paths(toy_run, 0, n)[1].read_text())
    trained = {s for fold in sub["folds"] for s in fold["val"]}
    truth = pd.concat([pd.read_csv(toy_run / "cohort" / "manifest.csv", dtype={"subject_id": str}),
                       pd.read_csv(toy_run / LARGE_DIR / "external_large.csv", dtype={"subject_id": str})])
    truth = truth.drop_duplicates("subject_id").set_index("subject_id")

    def auc(model, split):
        pred = pd.read_csv(toy_run / "seed0" / baseline_run(model, "classification", n) / "predictions.csv",
                           dtype={"subject_id": str})
        rows = pred[pred.split == split]
        if split == "val":
            assert set(rows.subject_id) == trained, model
        return roc_auc_score(truth.loc[rows.subject_id, "label"], rows["prob"])

    fitted = {}
    for model in BASELINES:  # a baseline whose inner CV the subset cannot feed says why, and has no predictions
        for task in ("classification", "survival"):
            folder = toy_run / "seed0" / baseline_run(model, task, n)
            done = json.loads((folder / "done.json").read_text())
            fitted[model, task] = done["fitted"]
            if done["fitted"]:
                pred = pd.read_csv(folder / "predictions.csv", dtype={"subject_id": str})
                assert set(pred.loc[pred.split == "test", "subject_id"]) == set(sub["test"])
            else:
                assert "training rows" in done["reason"] and not (folder / "predictions.csv").exists()
    val = {m: auc(m, "val") for m in BASELINES if fitted[m, "classification"]}
    curve = json.loads((toy_run / "label_curve.json").read_text())
    best = curve["best_baseline"][f"n{n}/auc"]
    assert best == max(val, key=val.get)
    point = next(p for p in curve["points"] if (p["n_key"], p["model"], p["split"], p["metric"])
                 == (f"n{n}", "mim", "external_large", "auc"))
    assert point["vs_best_baseline"]["diff"] == pytest.approx(point["value"] - auc(best, "external_large"))
    assert {p["model"] for p in curve["points"] if p["n_key"] == "all"} >= {*BASELINES, default_model(), "mim"}
    assert "Which model should I use?" in (toy_run / "results.md").read_text()
    for task in ("classification", "survival"):  # the hybrid: stacked on the subset's out-of-fold rows, or why not
        done = json.loads((toy_run / "seed0" / f"hybrid_{task}_n{n}" / "done.json").read_text())
        if done["fitted"]:
            pred = pd.read_csv(toy_run / "seed0" / f"hybrid_{task}_n{n}" / "predictions.csv", dtype={"subject_id": str})
            assert set(pred.loc[pred.split == "val", "subject_id"]) == trained
            assert set(pred.loc[pred.split == "test", "subject_id"]) == set(sub["test"])
        else:  # too few rows for the stacker's inner CV, or a first-level baseline the subset could not feed
            assert any(why in done["reason"] for why in ("at least 2", "file not found", "no penalty")), done["reason"]


def test_pretrained_runs_take_their_own_encoder_rate_and_scratch_the_yamls(tmp_path):
    from dataclasses import replace

    from benchmarks.research.ssl_gain.presets import finetune_runs
    from benchmarks.research.ssl_gain.stages import run_config
    preset = replace(ssl_gain.resolve_preset("cpu", toy=True), pretrained_encoder_blr=0.05)
    rates = {run.name: run_config(preset, tmp_path, 0, run).encoder_blr for run in finetune_runs(preset)}
    yaml_rate = run_config(replace(preset, pretrained_encoder_blr=0.0), tmp_path, 0,
                           next(r for r in finetune_runs(preset) if r.name == "ft_scratch_none")).encoder_blr
    assert rates["ft_mim_none"] == rates["ft_mae_none"] == 0.05
    assert rates["ft_scratch_none"] == rates["ft_clinical_only"] == yaml_rate != 0.05


def test_default_model_is_judged_against_the_baselines_a_user_fits_first(toy_run):
    """Issue 33's claims: the model a user gets without a flag, the hybrid (python -m finetune fits it by default),
    above radiomics + clinical (AUC) and, in survival, above the clinical-only Cox model (Harrell's C), on both
    large sets; both baselines are rows of the main table and of results.md. At toy size the whole-pool hybrid
    has too few val rows to be fitted, so its claims have no CI and say why (the values: the test below)."""
    from benchmarks.research.ssl_gain.presets import user_default_model
    results = json.loads((toy_run / "results.json").read_text())
    assert user_default_model() == "hybrid" and default_model() == "mim_concat"
    got = {(c["name"], c["split"]): c for c in results["claims"]}
    for split in LARGE_SETS:
        best = got[("best>radiomics+clinical", split)]
        surv = got[("survival>clinical_only", split)]
        assert best["models"] == ["hybrid", "radiomics_clinical"] and best["metric"] == "auc"
        assert surv["models"] == ["hybrid", "clinical_linear"] and surv["metric"] == "c_index"
        for c in (best, surv):
            assert c["holds"] is None and "scores of hybrid" in c["reason"]
    assert not json.loads((toy_run / "seed0" / "hybrid_classification" / "done.json").read_text())["fitted"]
    md = (toy_run / "results.md").read_text()
    assert "| best>radiomics+clinical | hybrid | radiomics_clinical | auc | test_large |" in md
    assert "radiomics + clinical, one penalised linear model" in md
    for model in ("clinical_linear", "radiomics_clinical"):
        assert results["summary"][model]["external_large"]["c_index"]["mean"] is not None


def test_the_default_models_claims_read_the_hybrids_scores(tmp_path):
    """paired_comparisons on a seed's scores.csv with a hybrid row set: the claims' a is the hybrid's AUC /
    Harrell's C by sklearn / sksurv, b the baseline's, and the verdict follows the CI."""
    from benchmarks.research.ssl_gain.paired import paired_comparisons
    from benchmarks.research.ssl_gain.presets import PRESETS
    from models.tasks import LABEL_REPORT, SURVIVAL_REPORT
    rng = np.random.default_rng(0)
    n = 200
    y, time_, event = rng.integers(0, 2, n), rng.exponential(10, n), rng.integers(0, 2, n)
    rows = []
    for model, signal in (("mim", 0.5), ("hybrid", 2.0), ("radiomics_clinical", 0.5), ("clinical_linear", 0.0)):
        for split in EVAL_SETS:
            prob, risk = y * signal + rng.normal(0, 1, n), -time_ * signal + rng.normal(0, 5, n)
            for task, score in ((LABEL_REPORT, prob), (SURVIVAL_REPORT, risk)):
                rows.append(pd.DataFrame({"model": model, "task": task, "split": split, "subject_id": np.arange(n),
                                          "patient_id": np.arange(n), "label": y, "time": time_, "event": event,
                                          "score": score}))
    (tmp_path / "seed0").mkdir()
    pd.concat(rows).to_csv(tmp_path / "seed0" / "scores.csv", index=False)
    preset = replace(PRESETS["cpu"], seeds=(0,), n_boot=200)
    claims = {(c["name"], c["split"]): c for c in paired_comparisons(preset, tmp_path)["claims"]}
    table = pd.concat(rows)
    for split in LARGE_SETS:
        best, surv = claims[("best>radiomics+clinical", split)], claims[("survival>clinical_only", split)]
        pick = lambda m, t: table[(table["model"] == m) & (table["task"] == t) & (table["split"] == split)]  # noqa
        h, rc = pick("hybrid", LABEL_REPORT), pick("radiomics_clinical", LABEL_REPORT)
        assert best["a"] == pytest.approx(roc_auc_score(h["label"], h["score"]))
        assert best["b"] == pytest.approx(roc_auc_score(rc["label"], rc["score"]))
        hs = pick("hybrid", SURVIVAL_REPORT)
        assert surv["a"] == pytest.approx(concordance_index_censored(hs["event"].astype(bool), hs["time"],
                                                                     hs["score"])[0])
        assert best["holds"] and surv["holds"]  # the hybrid's rows carry far more signal than the baselines'
