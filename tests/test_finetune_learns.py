"""Fine-tuning learns lesion appearance from [image, mask]: on a synthetic cohort whose label is set by
how the lesion looks, the tiny CPU preset beats chance clearly on patients it never trained on.

The cohort is the built-in generator with a stronger image effect than its default (see
docs/SYNTHETIC_COHORT.md): the label depends on the rim thickness and the non-enhancing core share,
with the image part of the logit scaled up so the labels follow the image closely. At the default
effect size a 109-patient cohort cannot tell a learned model from chance reliably (docs/RESULTS.md).
"""
import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score
from test_finetune_loop import tiny_cfg

from data.synth import generate_cohort
from finetune.metrics import auc_delong
from finetune.train import run


def test_finetuning_beats_chance_clearly(tmp_path):
    cohort = generate_cohort(tmp_path / "cohort", n_unlabeled=0, n_labeled=150, n_external=0, seed=1, progress=False,
                             outcome={"image_weight": 3.0, "beta_image": (1.5, 0, -1.5, 0, 0, 0, 0)})
    # no figures: the same numbers, a third less CPU time (README: --figures false)
    cfg = tiny_cfg(cohort, tmp_path / "ft", task="classification", fusion="none", folds=3, epochs=20, patience=20,
                   explain=0, n_boot=0, figures=False)
    cfg.external = ""
    cfg.model.encoder.depth = 4  # the preset's encoder, from scratch (no pretrained folder)
    run(cfg)

    labels = pd.read_csv(cohort / "manifest.csv", dtype={"subject_id": str}).set_index("subject_id")["label"]
    preds = pd.read_csv(tmp_path / "ft" / "predictions.csv", dtype={"subject_id": str})
    oof = preds[preds["split"] == "val"]  # out-of-fold: each non-test subject once, by a model that never saw it
    assert oof["subject_id"].is_unique and len(oof) >= 110
    y = labels.loc[oof["subject_id"]].to_numpy()
    res = auc_delong(y, oof["prob"].to_numpy())
    assert np.isclose(res["auc"], roc_auc_score(y, oof["prob"]))
    # Measured here: 0.72 (DeLong 95% CI from 0.63) out of fold; the test-set fold ensemble 0.89 on 28.
    assert res["auc"] >= 0.65 and res["ci_low"] > 0.5, res
    test = preds[(preds["split"] == "test") & (preds["fold"] == -1)]  # the fold ensemble on held-out patients
    assert len(test) >= 25
    assert roc_auc_score(labels.loc[test["subject_id"]], test["prob"]) > 0.6
