"""Paired bootstrap over seeds: every model against the MiM ViT on each held-out set (AUC and Harrell's C),
and the published study's claims, and the default model's against the baselines a user fits first, as
verdicts backed by a CI of the difference (AUC, or Harrell's C for the survival claim).

Pairing is by patient: a replicate resamples patients and scores both models on that same resample, so
what the two models share (the same hard cases) cancels out of their difference. With several seeds,
a and b are the seed means of each model's value and the CI is that of the seed-averaged difference;
seeds that score the same patients (external, test_large, external_large) share every draw, seeds with
their own test split are drawn independently (finetune.evaluate.bootstrap_counts).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.research.ssl_gain.presets import EVAL_SETS, REFERENCE, Preset, user_default_model
from finetune.evaluate import bootstrap_counts, paired_diff_summary
from finetune.metrics import auc_kernel, harrell_kernel, kernel_values
from models.tasks import LABEL_REPORT, SURVIVAL_REPORT

# A ">=" claim (non-inferiority) holds when the lower 95% bound of a - b is above -margin: a loses at
# most this much AUC. 0.02 is a common non-inferiority margin for diagnostic AUCs.
NON_INFERIORITY_MARGIN = 0.02
# The model a user gets without a flag ("best" and "survival" in issue 33's claims): the hybrid, which
# python -m finetune fits by default beside the image model (presets.user_default_model).
DEFAULT = user_default_model()
# name, model a, model b, ">" (superiority: lower bound > 0) or ">=" (non-inferiority), metric. The last
# two judge the default model against the baselines a user fits first (finetune.baselines.clinical_models).
CLAIMS = (("mim>scratch", "mim", "scratch", ">", "auc"), ("mim>=mae", "mim", "mae", ">=", "auc"),
          ("mim>radiomics", "mim", "radiomics", ">", "auc"), ("multimodal>=mim", "multimodal", "mim", ">=", "auc"),
          ("radiomics>scratch", "radiomics", "scratch", ">", "auc"),
          ("best>radiomics+clinical", DEFAULT, "radiomics_clinical", ">", "auc"),
          ("survival>clinical_only", DEFAULT, "clinical_linear", ">", "c_index"))
METRICS = {"auc": LABEL_REPORT, "c_index": SURVIVAL_REPORT}  # metric -> the scores.csv rows it reads
BOOT_SEED = 0  # every comparison uses the same draws (common random numbers across model pairs)


class PairedBootstrap:
    """Per-seed score tables -> paired differences; each model's per-resample values are computed once."""

    def __init__(self, scores: list[pd.DataFrame], seeds: list[int], n_boot: int):
        self.scores, self.seeds, self.n_boot = scores, seeds, n_boot
        self._counts: dict = {}
        self._values: dict = {}

    def _rows(self, i: int, model: str, task: str, split: str) -> pd.DataFrame:
        df = self.scores[i]
        return df[(df["model"] == model) & (df["task"] == task) & (df["split"] == split)]

    def _aligned(self, a: str, b: str, task: str, split: str) -> list[pd.DataFrame] | str:
        """Per seed, the subjects both models scored (sorted by id, so the order is canonical); or a reason."""
        frames = []
        for i, seed in enumerate(self.seeds):
            ra, rb = self._rows(i, a, task, split), self._rows(i, b, task, split)
            if ra.empty or rb.empty:
                return f"no {split} {task} scores of {a if ra.empty else b} (seed {seed})"
            both = ra.merge(rb[["subject_id", "score"]], on="subject_id", suffixes=("", "_b"))
            frames.append(both.sort_values("subject_id", kind="stable").reset_index(drop=True))
        return frames

    def _model_values(self, model: str, score: str, metric: str, split: str, frames: list, key) -> tuple:
        """(full-set value per seed, [B] per-resample values per seed) of one model, cached per row set."""
        cache_key = (model, metric, split, key)
        if cache_key not in self._values:
            if key not in self._counts:
                self._counts[key] = bootstrap_counts([f["patient_id"] for f in frames], self.n_boot, BOOT_SEED)
            full, boot = [], []
            for f, counts in zip(frames, self._counts[key]):
                kernel = auc_kernel(f["label"].astype(int), f[score]) if metric == "auc" else \
                    harrell_kernel(f["time"], f["event"].astype(int), f[score])
                full.append(kernel_values(kernel, np.ones(len(f)))[0])
                boot.append(kernel_values(kernel, counts))
            self._values[cache_key] = (full, boot)
        return self._values[cache_key]

    def compare(self, a: str, b: str, split: str, metric: str) -> dict:
        frames = self._aligned(a, b, METRICS[metric], split)
        if isinstance(frames, str):
            return {"a": None, "b": None, "diff": None, "ci": None, "reason": frames}
        key = tuple(tuple(f["subject_id"]) for f in frames)
        # each model is cached under its own name, its score read from "score" (a) or "score_b" (b)
        fa, ba = self._model_values(a, "score", metric, split, frames, key)
        fb, bb = self._model_values(b, "score_b", metric, split, frames, key)
        res = paired_diff_summary(fa, fb, ba, bb, self.n_boot)
        n_draws = len({tuple(sorted(set(f["patient_id"]))) for f in frames})
        return res | {"n": [len(f) for f in frames], "independent_draws": n_draws}


def _claim(name: str, a: str, b: str, op: str, metric: str, split: str, cmp: dict) -> dict:
    threshold = 0.0 if op == ">" else -NON_INFERIORITY_MARGIN
    holds = None if cmp["ci"] is None else bool(cmp["ci"][0] > threshold)
    entry = {"name": name, "split": split, "holds": holds, "a": cmp["a"], "b": cmp["b"], "diff": cmp["diff"],
             "ci": cmp["ci"], "models": [a, b], "metric": metric,
             "kind": "superiority" if op == ">" else "non-inferiority",
             "threshold": threshold, "n_used": cmp.get("n_used"), "n_boot": cmp.get("n_boot")}
    return entry | ({"reason": cmp["reason"]} if holds is None and cmp.get("reason") else {})


def paired_comparisons(preset: Preset, out: Path) -> dict:
    """Every model vs the reference on every held-out set (AUC and C-index), and the claims (each on its metric)."""
    seeds = list(preset.seeds)
    scores = [pd.read_csv(Path(out) / f"seed{s}" / "scores.csv", dtype={"subject_id": str, "patient_id": str})
              for s in seeds]
    boot = PairedBootstrap(scores, seeds, preset.n_boot)
    models = list(dict.fromkeys(scores[0]["model"]))
    vs = {m: {split: {metric: boot.compare(m, REFERENCE, split, metric) for metric in METRICS}
              for split in EVAL_SETS} for m in models if m != REFERENCE}
    claims = [_claim(name, a, b, op, metric, split, boot.compare(a, b, split, metric))
              for name, a, b, op, metric in CLAIMS for split in EVAL_SETS]
    return {"reference": REFERENCE, "n_boot": preset.n_boot, "boot_seed": BOOT_SEED,
            "non_inferiority_margin": NON_INFERIORITY_MARGIN, "diff": "model - " + REFERENCE,
            "vs_" + REFERENCE: vs, "claims": claims}
