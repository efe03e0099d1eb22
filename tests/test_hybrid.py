"""finetune.baselines.hybrid and `python -m finetune.baselines --baselines hybrid`: the stacker is sklearn's /
sksurv's model fitted on the out-of-fold rows, its JSON reloads to the same predictions, no fold's val rows are
predicted by a stacker that saw them, and the CLI refuses a bad run in one line before writing anything.
(The leaked-column test is in tests/test_hybrid_stack.py, through the research caller.)"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy.special import expit, logit
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sksurv.linear_model import CoxPHSurvivalAnalysis
from sksurv.util import Surv

from finetune.baselines import hybrid

INPUTS = ["image", "radiomics_clinical"]


def _rows(n: int = 60, seed: int = 0) -> pd.DataFrame:
    """Out-of-fold rows: two first-level probabilities and risks that carry the outcome with noise, patients of
    two lesions each, a numeric and a categorical clinical column."""
    rng = np.random.default_rng(seed)
    label = np.tile([0, 1], n // 2)
    signal = 1.5 * (2 * label - 1)
    image, rc = signal + rng.normal(0, 2, n), 0.5 * signal + rng.normal(0, 1, n)
    return pd.DataFrame({"subject_id": [f"s{i:03d}" for i in range(n)], "patient_id": [f"p{i // 2:03d}" for i in range(n)],
                         "image": expit(image), "radiomics_clinical": expit(rc), "label": label,
                         "time": np.exp(-0.5 * (image + rc)) * 10, "event": (rng.random(n) < 0.7).astype(int),
                         "age": rng.normal(60, 10, n).round(1), "sex": rng.choice(["F", "M"], n)})


def _by_hand_cv(rows: pd.DataFrame, strata) -> list:
    return list(StratifiedGroupKFold(5, shuffle=True, random_state=0).split(rows, strata, rows["patient_id"]))


def test_label_stacker_is_sklearns_logistic_regression_by_hand():
    rows = _rows()
    ours = hybrid.fit_stacker(rows, "classification", INPUTS, [], seed=0)
    X = StandardScaler().fit_transform(logit(rows[INPUTS].to_numpy()))
    y = rows["label"].to_numpy()
    search = GridSearchCV(LogisticRegression(solver="lbfgs", max_iter=2000), {"C": list(hybrid.C_GRID)},
                          cv=_by_hand_cv(rows, y), scoring="neg_log_loss").fit(X, y)
    assert ours.penalty == {"C": pytest.approx(search.best_params_["C"])}
    hand = LogisticRegression(C=search.best_params_["C"], solver="lbfgs", max_iter=2000).fit(X, y)
    np.testing.assert_allclose(ours.coef, hand.coef_[0], rtol=1e-6)
    assert ours.intercept == pytest.approx(hand.intercept_[0], abs=1e-6)
    np.testing.assert_allclose(ours.predict(rows), hand.predict_proba(X)[:, 1], atol=1e-8)


def test_survival_stacker_is_sksurvs_ridge_cox_by_hand():
    """The penalty too is chosen by hand (sksurv's ridge Cox in sklearn's GridSearchCV over a grid written here,
    Harrell's C on the same patient-grouped, event-stratified folds), not read back from the fit under test."""
    rows = _rows()
    ours = hybrid.fit_stacker(rows, "survival", INPUTS, [], seed=0)
    X = rows[INPUTS].to_numpy()  # risks enter as they are, no logit
    y = Surv.from_arrays(rows["event"].astype(bool), rows["time"])
    search = GridSearchCV(Pipeline([("scale", StandardScaler()), ("cox", CoxPHSurvivalAnalysis())]),
                          {"cox__alpha": list(np.logspace(-2, 3, 11))}, cv=_by_hand_cv(rows, rows["event"])).fit(X, y)
    assert ours.penalty == {"alpha": pytest.approx(search.best_params_["cox__alpha"])}
    hand = search.best_estimator_
    np.testing.assert_allclose(ours.coef, hand.named_steps["cox"].coef_, rtol=1e-6)
    np.testing.assert_allclose(ours.predict(rows), hand.predict(X), atol=1e-8)


@pytest.mark.parametrize("task", ["classification", "survival"])
def test_the_saved_json_reloads_to_identical_predictions(tmp_path, task):
    rows, held = _rows(60, 0), _rows(40, 1)
    ours = hybrid.fit_stacker(rows, task, INPUTS, ["age", "sex"], seed=0)
    ours.first_level = {"image": "run/predictions.csv"}
    ours.save(tmp_path / "stacker.json")
    back = hybrid.Stacker.load(tmp_path / "stacker.json")
    assert back.to_dict() == ours.to_dict() and back.feature_names[:2] == INPUTS
    np.testing.assert_array_equal(back.predict(held), ours.predict(held))
    # and both are the sklearn pipeline the search fitted, applied to the same rows
    X = pd.concat([pd.DataFrame(logit(held[INPUTS].to_numpy()) if task == "classification" else held[INPUTS].to_numpy(),
                                columns=INPUTS), held[["age", "sex"]]], axis=1)
    pipe = ours.pipeline.predict_proba(X)[:, 1] if task == "classification" else ours.pipeline.predict(X)
    np.testing.assert_allclose(back.predict(held), pipe, atol=1e-12)
    with pytest.raises(hybrid.InputError, match="not a mimfm.hybrid_stacker/1 file"):
        (tmp_path / "other.json").write_text("{}")
        hybrid.Stacker.load(tmp_path / "other.json")


@pytest.fixture(scope="module")
def fitted_with_clinical() -> dict:
    return hybrid.fit_stacker(_rows(60, 0), "classification", INPUTS, ["age", "sex"], seed=0).to_dict()


@pytest.mark.parametrize("edit,names", [
    (lambda d: d.update(coef=d["coef"][:-1]), "lengths"),           # truncated: numpy would fail on the dot product
    (lambda d: d.update(mean=d["mean"][:1]), "lengths"),            # one mean broadcasts: it would predict silently
    (lambda d: d.update(inputs=d["inputs"][:1]), "feature_names"),  # an input dropped, its coefficient kept
    (lambda d: d.update(clinical_columns=["age"]), "clinical_schema encodes"),
    (lambda d: d.update(scale=[0.0] * len(d["scale"])), "scale must be positive"),
])
def test_a_hand_edited_stacker_is_refused_in_one_line_naming_the_file(tmp_path, fitted_with_clinical, edit, names):
    saved = json.loads(json.dumps(fitted_with_clinical))  # a deep copy for this case's edit
    edit(saved)
    (tmp_path / "stacker.json").write_text(json.dumps(saved))
    with pytest.raises(hybrid.InputError) as e:
        hybrid.Stacker.load(tmp_path / "stacker.json")
    assert str(e.value).startswith(f"stacker {tmp_path / 'stacker.json'}: ") and names in str(e.value)
    assert "\n" not in str(e.value)


def _preds(rows: pd.DataFrame, folds: np.ndarray) -> dict:
    return {name: pd.DataFrame({"subject_id": rows["subject_id"], "split": "val", "fold": folds,
                                "prob": rows[name]}) for name in INPUTS}


def test_no_fold_is_predicted_by_a_stacker_that_saw_it():
    """Each fold's val rows come from a stacker fitted on the other folds: changing fold 0's outcomes leaves
    fold 0's hybrid predictions as they were and moves the others' (the control that would catch a leak)."""
    rows = _rows(90, 2)
    folds = np.arange(len(rows)) % 3
    val_folds = pd.Series(folds, index=rows["subject_id"])
    outcomes = rows.drop(columns=INPUTS)
    before, _, per_fold = hybrid.stack_predictions(_preds(rows, folds), outcomes, "classification", [], seed=0,
                                                   val_folds=val_folds)
    assert [p["fold"] for p in per_fold] == [0, 1, 2, -1] and all(p["n_fit"] == 60 for p in per_fold[:3])
    flipped = outcomes.assign(label=np.where(folds == 0, 1 - outcomes["label"], outcomes["label"]))
    after, _, _ = hybrid.stack_predictions(_preds(rows, folds), flipped, "classification", [], seed=0,
                                           val_folds=val_folds)
    before, after = before.set_index("subject_id")["prob"], after.set_index("subject_id")["prob"]
    own = rows["subject_id"][folds == 0]
    np.testing.assert_array_equal(before[own], after[own])
    others = rows["subject_id"][folds != 0]
    assert np.max(np.abs(before[others] - after[others])) > 1e-3


# ---------------------------------------------------------------- the CLI

def _fake_run(folder, splits: dict, labels: pd.Series, task: str = "classification", held: dict | None = None,
              config: dict | None = None):
    """What python -m finetune leaves in its folder, as far as the hybrid reads it: config.yaml (model.task and
    `config`), splits.json, and predictions.csv with each fold's val rows and the held-out rows (test and `held`:
    split -> subjects) by fold and fold ensemble."""
    import yaml
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"model": {"task": task}, "splits": ""} | (config or {})))
    (folder / "splits.json").write_text(json.dumps(splits))

    def rows(ids, split, fold):
        y = labels.loc[list(ids)].to_numpy()
        return pd.DataFrame({"subject_id": list(ids), "split": split, "fold": fold,
                             "prob": expit(1.5 * (2 * y - 1) + rng.normal(0, 1, len(y)))})
    parts = [rows(f["val"], "val", k) for k, f in enumerate(splits["folds"])]
    for split, ids in ({"test": splits["test"]} | (held or {})).items():
        parts += [rows(ids, split, k) for k in range(len(splits["folds"]))] + [rows(ids, split, -1)]
    pd.concat(parts).to_csv(folder / "predictions.csv", index=False)
    return folder


def test_cli_stacks_the_runs_image_score_and_evaluate_reads_it(tmp_path, capsys):
    from finetune.baselines.__main__ import main
    from finetune.evaluate import main as evaluate_main
    from tests.test_radiomics import _write_cohort

    manifest = _write_cohort(tmp_path, 24, np.random.default_rng(7))
    table = pd.read_csv(manifest, dtype={"subject_id": str})
    table.assign(age=np.random.default_rng(1).normal(60, 10, len(table)).round(1)).to_csv(manifest, index=False)
    (tmp_path / "large").mkdir()
    large_csv = _write_cohort(tmp_path / "large", 8, np.random.default_rng(8))  # an --eval_sets cohort
    large = pd.read_csv(large_csv, dtype={"subject_id": str})
    large = large.assign(subject_id="L" + large["subject_id"], age=np.random.default_rng(2).normal(60, 10, len(large)))
    large.to_csv(large_csv, index=False)
    out, splits_path = tmp_path / "baselines", tmp_path / "splits.json"
    given = {"manifest": str(manifest), "cache_dir": str(tmp_path / "cache"), "splits": str(splits_path), "folds": 2,
             "test_fraction": 0.25}  # what the fine-tuning run was given
    held = ["--out", str(out), "--clinical_columns", "age", "--eval_sets", f"large={large_csv}",
            "--external", str(manifest)]  # a cohort given twice: each copy is read from its own table
    assert main(held + ["--manifest", str(manifest), "--cache", str(tmp_path / "cache"), "--folds", "2",
                        "--splits", str(splits_path), "--task", "classification", "--test_fraction", "0.25",
                        "--baselines", "radiomics_clinical"]) == 0
    splits = json.loads(splits_path.read_text())
    labels = pd.concat([table, large]).set_index("subject_id")["label"]
    run = _fake_run(tmp_path / "run", splits, labels, config=given,
                    held={"large": list(large["subject_id"]), "external": list(table["subject_id"])})
    capsys.readouterr()
    # --manifest, --cache, --splits, --task, --folds, --test_fraction: the run's own
    assert main(held + ["--baselines", "hybrid", "--image_run", str(run)]) == 0
    assert "reused" in capsys.readouterr().out  # radiomics + clinical was fitted there on these splits
    pred = pd.read_csv(out / "hybrid" / "predictions.csv", dtype={"subject_id": str})
    assert list(pred.columns) == ["subject_id", "split", "fold", "prob"]
    val = pred[pred.split == "val"]
    assert set(zip(val.subject_id, val.fold)) == {(s, k) for k, f in enumerate(splits["folds"]) for s in f["val"]}
    test = pred[pred.split == "test"]
    assert sorted(test.subject_id) == sorted(splits["test"]) and set(test.fold) == {-1}
    assert sorted(pred[pred.split == "large"].subject_id) == sorted(large["subject_id"])
    # the saved stacker, applied to the held-out first-level predictions it names, gives the written test rows
    stacker = hybrid.Stacker.load(out / "hybrid" / "stacker.json")
    firsts = {name: pd.read_csv(path, dtype={"subject_id": str}) for name, path in stacker.first_level.items()}
    assert list(firsts) == ["image", "radiomics_clinical"]
    held = hybrid.stack_inputs(firsts, "prob", "test")
    np.testing.assert_allclose(stacker.predict(held), test.set_index("subject_id").loc[held.subject_id, "prob"],
                               atol=1e-12)
    capsys.readouterr()
    # finetune.evaluate has no --eval_sets: the large cohort's outcomes come in through --external
    assert evaluate_main(["--predictions", str(run / "predictions.csv"), "--manifest", str(manifest),
                          "--external", str(large_csv), "--baselines", str(out), "--n_boot", "0", "--out", str(tmp_path / "eval")]) == 0
    report = capsys.readouterr().out
    hybrid_lines = [line.split()[2] for line in report.splitlines() if line.startswith("baseline hybrid ")]
    assert {"val", "test", "large"} <= set(hybrid_lines)


def test_each_cohort_is_stacked_from_its_own_clinical_values_by_subject_id(tmp_path):
    """--hybrid_clinical: an --eval_sets cohort whose subject ids are also the development cohort's (as in the
    synthetic data) is predicted from its own CSV's clinical values, not from the development manifest's."""
    import argparse

    from finetune.baselines.__main__ import _fit_hybrid
    from models.tasks import get_task
    dev, large = _rows(60, 0), _rows(6, 5)  # both s000...: the same ids, other patients and ages
    assert set(large["subject_id"]) <= set(dev["subject_id"]) and not np.allclose(large["age"], dev["age"][:6])
    folds = np.arange(len(dev)) // 2 % 2  # a patient's two lesions in one fold, both classes in each
    splits = {"folds": [{"train": list(dev["subject_id"][folds != k]), "val": list(dev["subject_id"][folds == k])}
                        for k in (0, 1)], "test": []}

    def preds(name: str) -> pd.DataFrame:
        return pd.concat([pd.DataFrame({"subject_id": dev["subject_id"], "split": "val", "fold": folds, "prob": dev[name]}),
                          pd.DataFrame({"subject_id": large["subject_id"], "split": "large", "fold": -1,
                                        "prob": large[name]})], ignore_index=True)
    d = {"task": get_task("classification"), "df": dev, "ext_df": None, "eval_dfs": {"large": large},
         "splits": splits, "out": tmp_path}
    args = argparse.Namespace(hybrid_clinical=True, seed=0)
    _fit_hybrid(args, d, {"predictions": preds("image"), "path": tmp_path / "run"},
                {"radiomics_clinical": preds("radiomics_clinical")}, ["age", "sex"], ["large"])
    written = pd.read_csv(tmp_path / "hybrid" / "predictions.csv", dtype={"subject_id": str})
    written = written[written.split == "large"].set_index("subject_id").loc[large["subject_id"], "prob"].to_numpy()
    stacker = hybrid.Stacker.load(tmp_path / "hybrid" / "stacker.json")
    np.testing.assert_allclose(written, stacker.predict(large), atol=1e-12)
    with_dev_values = large[INPUTS + ["subject_id"]].merge(dev[["subject_id", "age", "sex"]], on="subject_id")
    assert np.max(np.abs(stacker.predict(with_dev_values) - written)) > 1e-3  # the control: the values matter


def _refusal_case(tmp_path, case: str) -> tuple[list[str], str]:
    """A fine-tuning run and baseline flags that differ from it in one way: (argv, what the one line names)."""
    ids = [f"s{i:02d}" for i in range(12)]
    splits = {"folds": [{"train": ids[4:8], "val": ids[:4]}, {"train": ids[:4], "val": ids[4:8]}], "test": ids[8:]}
    ours = tmp_path / "splits.json"
    ours.write_text(json.dumps(splits))
    run = _fake_run(tmp_path / "run", splits, pd.Series(np.arange(12) % 2, index=ids))
    task, expect = "classification", ""
    if case == "not_a_run":
        run, expect = tmp_path / "cohort", f"--image_run {tmp_path / 'cohort'}: not a fine-tuning run"
        run.mkdir()
    elif case == "task":
        task, expect = "survival", "--task survival: the fine-tuning run"
    elif case == "splits":
        other = {**splits, "folds": splits["folds"][::-1]}
        ours.write_text(json.dumps(other))
        expect = f"--splits {ours}: differ from the fine-tuning run's {run / 'splits.json'}"
    elif case == "in_fold":
        pred = pd.read_csv(run / "predictions.csv")
        pred.loc[(pred.split == "val") & (pred.subject_id == "s01"), "fold"] = 1  # scored by the model it trained
        pred.to_csv(run / "predictions.csv", index=False)
        expect = f"--image_run {run / 'predictions.csv'}: val rows are not the splits' out-of-fold predictions"
    argv = ["--manifest", str(tmp_path / "manifest.csv"), "--cache", str(tmp_path / "cache"), "--splits", str(ours),
            "--task", task, "--out", str(tmp_path / "out"), "--baselines", "hybrid", "--image_run", str(run)]
    return argv, expect


@pytest.mark.parametrize("case", ["not_a_run", "task", "splits", "in_fold"])
def test_cli_refuses_a_run_it_cannot_stack_in_one_line_writing_nothing(tmp_path, capsys, case):
    _refused_in_one_line_writing_nothing(tmp_path, capsys, *_refusal_case(tmp_path, case))


def _refused_in_one_line_writing_nothing(tmp_path, capsys, argv: list[str], expect: str) -> None:
    from finetune.baselines.__main__ import main
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert expect in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def _cohort_case(tmp_path, case: str) -> tuple[list[str], str]:
    """A real (tiny) cohort, its splits, a run on them, and one input the hybrid cannot stack that only the
    cohort's manifests show: (argv, what the one line names)."""
    from data.splits import make_splits, stratify_of
    from tests.test_radiomics import _write_cohort
    manifest = _write_cohort(tmp_path, 12, np.random.default_rng(3))
    table = pd.read_csv(manifest, dtype={"subject_id": str}).assign(age=np.linspace(40, 80, 12).round(1))
    if case == "clinical_named_as_input":  # a clinical column with a first-level input's name
        table["radiomics_clinical"] = np.arange(len(table), dtype=float)
    splits = make_splits(table, test_fraction=0.25, folds=2, stratify=stratify_of(table), seed=0)
    (tmp_path / "splits.json").write_text(json.dumps(splits))
    large = table.assign(subject_id="L" + table["subject_id"])  # an --eval_sets cohort
    large.drop(columns="age" if case == "clinical_missing" else []).to_csv(tmp_path / "large.csv", index=False)
    extra, expect = [], ""
    if case == "clinical_missing":
        expect = f"{tmp_path / 'large.csv'}: clinical column(s) ['age'] not found"
    elif case == "one_class":  # fold 1's val rows all of one class: fold 0's stacker, fitted on them, cannot be
        table.loc[table["subject_id"].isin(splits["folds"][1]["val"]), "label"] = 0
        expect = "hybrid classification stacker of fold 0 (the other folds' val rows): needs at least 2 rows of each"
    elif case == "splits_vs_manifest":  # the run's splits, but a subject has left the manifest since
        expect = f"splits {tmp_path / 'splits.json'}: made for a different set of subjects"
    elif case == "clinical_named_as_input":  # a clinical column with a first-level input's name
        extra, expect = ["--hybrid_clinical"], "input(s) ['radiomics_clinical'] are also clinical columns"
    elif case == "clinical_is_an_image":  # the manifest's image paths named as a clinical column
        expect = "column(s) ['image'] hold image paths, not clinical values; read them as images with --images"
    left = (table["subject_id"] == splits["folds"][0]["train"][0]) & (case == "splits_vs_manifest")
    table[~left].to_csv(manifest, index=False)
    labels = pd.concat([table, large]).set_index("subject_id")["label"]
    run = _fake_run(tmp_path / "run", splits, labels, held={"large": list(large["subject_id"])})
    named = {"clinical_named_as_input": "age,radiomics_clinical", "clinical_is_an_image": "age,image"}
    clinical = named.get(case, "age")
    argv = ["--manifest", str(manifest), "--cache", str(tmp_path / "cache"), "--splits", str(tmp_path / "splits.json"),
            "--task", "classification", "--out", str(tmp_path / "out"), "--folds", "2", "--test_fraction", "0.25",
            "--clinical_columns", clinical, "--eval_sets", f"large={tmp_path / 'large.csv'}",
            "--baselines", "hybrid", "--image_run", str(run), *extra]
    return argv, expect


@pytest.mark.parametrize("case", ["clinical_missing", "one_class", "splits_vs_manifest", "clinical_named_as_input",
                                  "clinical_is_an_image"])
def test_cli_refuses_an_input_the_manifests_show_it_cannot_stack_before_any_work(tmp_path, capsys, case):
    """Checked on the manifests before the first volume is prepared: no cache, no --out, no first-level baseline
    written and then a refusal (or, for a held-out cohort without a clinical column, a traceback)."""
    _refused_in_one_line_writing_nothing(tmp_path, capsys, *_cohort_case(tmp_path, case))


def test_cli_help_explains_the_hybrid_options(capsys):
    from finetune.baselines.__main__ import main
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "hybrid" in text and "--image_run" in text and "--hybrid_clinical" in text
    with pytest.raises(SystemExit):
        main(["--manifest", "m", "--cache", "c", "--splits", "s", "--task", "survival", "--out", "o",
              "--image_run", "run"])
    assert "--image_run / --hybrid_clinical: read by --baselines hybrid only" in capsys.readouterr().err


def test_the_flags_default_to_the_image_runs_own_and_a_given_one_wins(tmp_path):
    """--image_run RUN: --manifest, --cache, --splits, --task, --folds, --test_fraction and --seed from the run's
    config.yaml (its cache and splits where fine-tuning puts them when given none); a flag given is kept (and
    checked against the run later, as before); what neither gives is refused in one line naming the flag."""
    from finetune.baselines.__main__ import _parser, _with_run_defaults
    from finetune.baselines.radiomics import split_defaults
    ids = [f"s{i:02d}" for i in range(6)]
    splits = {"folds": [{"train": ids[2:4], "val": ids[:2]}, {"train": ids[:2], "val": ids[2:4]}], "test": ids[4:]}
    labels = pd.Series(np.arange(6) % 2, index=ids)
    run = _fake_run(tmp_path / "runs" / "a", splits, labels, "survival",
                    config={"manifest": "/data/m.csv", "output_dir": str(tmp_path / "runs" / "a"), "seed": 3, "folds": 2})

    def resolved(*flags):
        return vars(_with_run_defaults(_parser().parse_args(["--out", "o", "--image_run", str(run), *flags])))
    got = resolved()
    assert (got["manifest"], got["task"], got["seed"], got["folds"]) == ("/data/m.csv", "survival", 3, 2)
    assert got["splits"] == str(run / "splits.json") and got["cache"] == str(tmp_path / "runs" / "cache")
    assert got["test_fraction"] == split_defaults()["test_fraction"]  # the run's config has none
    got = resolved("--manifest", "mine.csv", "--seed", "0", "--task", "classification")
    assert (got["manifest"], got["seed"], got["task"]) == ("mine.csv", 0, "classification")
    multitask = _fake_run(tmp_path / "runs" / "b", splits, labels, "multitask", config={"manifest": "/data/m.csv"})
    with pytest.raises(hybrid.InputError, match=r"^--task: required; .*\(a multitask run: pass --task"):
        _with_run_defaults(_parser().parse_args(["--out", "o", "--image_run", str(multitask)]))
    with pytest.raises(hybrid.InputError, match=r"^--manifest, --cache, --splits, --task: required, or --image_run"):
        _with_run_defaults(_parser().parse_args(["--out", "o"]))


def test_a_moved_runs_cache_default_is_the_cache_beside_it_now(tmp_path):
    """config.yaml records the run's output folder where it was trained (/old/place/runs/a, gone): its default
    cache is then the cache/ beside the run's folder now, not /old/place/runs/cache; a recorded cache that still
    exists is kept."""
    from finetune.baselines.image_run import run_inputs
    ids = [f"s{i:02d}" for i in range(6)]
    splits = {"folds": [{"train": ids[2:4], "val": ids[:2]}, {"train": ids[:2], "val": ids[2:4]}], "test": ids[4:]}
    run = _fake_run(tmp_path / "moved" / "a", splits, pd.Series(np.arange(6) % 2, index=ids),
                    config={"output_dir": "/old/place/runs/a"})
    assert run_inputs(run)["cache"] == str((tmp_path / "moved" / "cache").resolve())
    kept = tmp_path / "there" / "a"
    (kept.parent / "cache").mkdir(parents=True)
    run2 = _fake_run(tmp_path / "moved2" / "a", splits, pd.Series(np.arange(6) % 2, index=ids),
                     config={"output_dir": str(kept)})
    assert run_inputs(run2)["cache"] == str(kept.parent / "cache")


def test_the_hybrid_is_reported_but_never_the_reference_baseline():
    """finetune.evaluate --baselines OUT reads OUT/hybrid too; it stacks the judged model's own score, so it is
    reported beside the baselines but the best baseline (picked on val) is chosen among the others only."""
    from finetune.baselines.compare import compare_baselines
    rng = np.random.default_rng(0)
    n = 40
    ids = [f"s{i}" for i in range(n)]
    label = rng.integers(0, 2, n)
    outcomes = pd.DataFrame({"subject_id": ids, "patient_id": ids, "label": label})
    model = pd.DataFrame({"subject_id": ids, "prob": rng.random(n), "label": label, "patient_id": ids})

    def pred(prob):
        return pd.DataFrame({"subject_id": ids, "split": "val", "fold": np.arange(n) % 2, "prob": prob})
    baselines = {"radiomics": pred(np.clip(label * 0.3 + rng.random(n) * 0.7, 0, 1)),
                 "hybrid": pred(label * 0.9 + 0.05)}  # the better score on val
    res = compare_baselines({"val": model}, baselines, outcomes, n_boot=0, seed=0)
    assert res["splits"]["val"]["hybrid"]["auc"]["value"] == pytest.approx(1.0)
    assert res["best"]["auc"] == "radiomics"


@pytest.mark.parametrize("task", ["classification", "survival"])
def test_a_score_that_ranks_the_val_rows_the_wrong_way_is_dropped_not_inverted(task, tmp_path):
    """On these val rows the image's score runs against the outcome (as a useful score can on a few dozen rows
    by chance): the old stacker gave it a negative weight and so inverted it for every new patient. Now it is
    dropped, and the stacker is the by-hand fit on the other input alone (sklearn / sksurv, same folds)."""
    rows = _rows()
    rows["image"] = 1.0 - rows["image"]  # p -> 1 - p: logit and risk change sign, the ranking inverts
    ours = hybrid.fit_stacker(rows, task, INPUTS, [], seed=0)
    assert ours.inputs == ["radiomics_clinical"] and list(ours.dropped) == ["image"] and ours.dropped["image"] < 0
    rc = rows[["radiomics_clinical"]].to_numpy()
    if task == "classification":
        X, y = StandardScaler().fit_transform(logit(rc)), rows["label"].to_numpy()
        hand = GridSearchCV(LogisticRegression(solver="lbfgs", max_iter=2000), {"C": list(hybrid.C_GRID)},
                            cv=_by_hand_cv(rows, y), scoring="neg_log_loss").fit(X, y).best_estimator_
        np.testing.assert_allclose(ours.predict(rows), hand.predict_proba(X)[:, 1], atol=1e-8)
    else:
        y = Surv.from_arrays(rows["event"].astype(bool), rows["time"])
        hand = GridSearchCV(Pipeline([("scale", StandardScaler()), ("cox", CoxPHSurvivalAnalysis())]),
                            {"cox__alpha": list(np.logspace(-2, 3, 11))}, cv=_by_hand_cv(rows, rows["event"])).fit(rc, y)
        np.testing.assert_allclose(ours.predict(rows), hand.best_estimator_.predict(rc), atol=1e-8)
    ours.save(tmp_path / "stacker.json")
    assert hybrid.Stacker.load(tmp_path / "stacker.json").dropped == ours.dropped


def test_a_stacker_json_written_before_dropped_existed_still_loads(tmp_path):
    fitted = hybrid.fit_stacker(_rows(), "classification", INPUTS, [], seed=0)
    d = fitted.to_dict()
    del d["dropped"]
    (tmp_path / "old.json").write_text(json.dumps(d))
    old = hybrid.Stacker.load(tmp_path / "old.json")
    assert old.dropped == {} and np.array_equal(old.predict(_rows()), fitted.predict(_rows()))


@pytest.mark.parametrize("task", ["classification", "survival"])
def test_when_every_score_ranks_the_val_rows_the_wrong_way_the_stacker_predicts_one_value(task):
    """Both inputs inverted: dropping the first leaves the second negative too, and a one-input stacker with a
    negative weight would still invert it; so every weight is 0 and every patient gets the base rate (label:
    the val rows' share of label 1, by hand) or one risk (survival)."""
    rows = _rows()
    rows[INPUTS] = 1.0 - rows[INPUTS]
    ours = hybrid.fit_stacker(rows, task, INPUTS, [], seed=0)
    assert set(ours.dropped) == set(INPUTS) and all(w < 0 for w in ours.dropped.values())
    assert ours.coef == [0.0] * len(ours.coef)
    pred = ours.predict(_rows(seed=5))
    assert np.ptp(pred) == 0.0
    if task == "classification":
        assert pred[0] == pytest.approx(rows["label"].mean())


def test_an_inner_fold_without_a_comparable_pair_scores_chance_not_nan():
    """Harrell's C of the Cox stacker's inner folds: sksurv's concordance where a fold has comparable pairs; 0.5
    where it has none (two events tied at the last time, the censored rows before them), which before voided
    every penalty and refused the stacker ("no penalty could be fitted")."""
    from sksurv.metrics import concordance_index_censored

    class Fixed:  # an "estimator" whose risk is its input's first column
        def predict(self, X):
            return np.asarray(X)[:, 0]
    X = np.array([[3.0], [1.0], [2.0], [0.5]])
    y = Surv.from_arrays([True, True, False, False], [2.0, 5.0, 3.0, 9.0])
    want = concordance_index_censored(y["event"], y["time"], X[:, 0])[0]
    assert hybrid.harrell_c_or_chance(Fixed(), X, y) == pytest.approx(want)
    tied = Surv.from_arrays([True, True, False, False], [7.2, 7.2, 1.0, 2.0])
    assert hybrid.harrell_c_or_chance(Fixed(), X, tied) == 0.5
    rows = _rows(20)
    rows["event"] = np.tile([1, 0, 0, 0, 0], 4)
    rows["time"] = np.where(rows["event"] == 1, 7.2, rows.index * 0.1 + 0.1)  # every pair tied or censored before
    stacker = hybrid.fit_stacker(rows, "survival", INPUTS, [], seed=0)
    assert stacker.inner_cv["score"] == 0.5 and stacker.penalty == {"alpha": pytest.approx(hybrid.ALPHA_GRID[0])}


def test_a_noise_level_negative_weight_does_not_drop_the_better_score(monkeypatch):
    """ssl_gain seed 2, 40 patients: under the strongest penalty the fit over both scores gave radiomics + clinical
    -0.002 and the image +0.003; dropping the most negative weight kept the image alone, a worse stacker. The
    stacker is now the subset with non-negative weights and the best inner-CV score: radiomics + clinical alone
    (by hand from the fits below), with the image listed as dropped at its weight in the fit over both."""
    fits = {("image", "radiomics_clinical"): ([0.003, -0.002], -0.685), ("image",): ([0.002], -0.690),
            ("radiomics_clinical",): ([0.3], -0.600)}

    def fake(train, task, inputs, clinical, seed, inner_folds):
        coef, score = fits[tuple(inputs)]
        return hybrid.Stacker(task="classification", inputs=list(inputs), clinical_columns=[], clinical_schema=None,
                              feature_names=list(inputs), mean=[0.0] * len(inputs), scale=[1.0] * len(inputs),
                              coef=list(coef), intercept=0.0, penalty={"C": 0.001}, inner_cv={"score": score},
                              n_fit=40)
    monkeypatch.setattr(hybrid, "_fit_penalised", fake)
    ours = hybrid.fit_stacker(_rows(), "classification", INPUTS, [], seed=0)
    assert INPUTS == ["image", "radiomics_clinical"]
    assert ours.inputs == ["radiomics_clinical"] and ours.coef == [0.3] and ours.dropped == {"image": 0.003}


@pytest.mark.parametrize("task", ["classification", "survival"])
def test_a_single_inverted_input_gives_one_value_not_a_crash(task):
    """One first-level score, inverted: no subset is left to fall back on, so the stacker predicts one value
    (before the fix, the subset search found no candidate and raised)."""
    rows = _rows()
    rows["image"] = 1.0 - rows["image"]
    ours = hybrid.fit_stacker(rows, task, ["image"], [], seed=0)
    assert ours.inputs == ["image"] and ours.coef == [0.0] and ours.dropped["image"] < 0
    assert np.ptp(ours.predict(_rows(seed=5))) == 0.0
