"""benchmarks.research.paired_runs: the paired differences of two runs against sklearn / sksurv / numpy."""
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score
from sksurv.metrics import concordance_index_censored

from benchmarks.research.paired_runs import compare


def fake_run(folder, ids, prob, risk, dice):
    folder.mkdir(parents=True)
    pd.DataFrame({"subject_id": ids, "split": "test_large", "fold": -1, "prob": prob, "risk": risk}).to_csv(
        folder / "predictions.csv", index=False)
    pd.DataFrame({"subject_id": ids, "split": "test_large", "fold": -1, "dice": dice}).to_csv(
        folder / "segmentation.csv", index=False)


def test_paired_differences_match_the_references(tmp_path):
    rng = np.random.default_rng(0)
    n = 60
    ids = [f"s{i}" for i in range(n)]
    label = rng.integers(0, 2, n)
    time, event = rng.uniform(1, 30, n), rng.integers(0, 2, n)
    runs = {}
    for name in ("a", "b"):
        prob = np.clip(0.3 * label + rng.uniform(0, 0.7, n), 0, 1)
        risk, dice = -time + rng.normal(0, 10, n), rng.uniform(0.3, 0.9, n)
        fake_run(tmp_path / name, ids, prob, risk, dice)
        runs[name] = (prob, risk, dice)
    outcomes = pd.DataFrame({"subject_id": ids, "label": label, "time": time, "event": event}).set_index("subject_id")
    res = compare(tmp_path / "a", tmp_path / "b", ["test_large"], outcomes, n_boot=200, seed=0)["splits"]["test_large"]
    (pa, ra, da), (pb, rb, db) = runs["a"], runs["b"]
    assert res["auc"]["diff"] == pytest.approx(roc_auc_score(label, pa) - roc_auc_score(label, pb))
    c = lambda r: concordance_index_censored(event.astype(bool), time, r)[0]  # noqa: E731
    assert res["c_index"]["diff"] == pytest.approx(c(ra) - c(rb))
    assert res["dice"]["diff"] == pytest.approx(da.mean() - db.mean())
    for key in ("auc", "c_index", "dice"):
        lo, hi = res[key]["ci"]
        assert lo < res[key]["diff"] < hi
