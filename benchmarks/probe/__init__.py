"""Frozen-feature probe, the gate for every pretraining change: do an encoder's features beat random inits'?

    python -m benchmarks.probe --encoder DIR [--encoder DIR2 ...] --out DIR [--random_only]
        [--seed 9001] [--n_lesions 300] [--cohort_dir DIR] [--crop_mm MM] [--margin_mm MM]

Cohort: 300 labelled lesions from data.synth, seed 9001 (never a pretraining seed: the demo and the
tests use 0-3), generated once into --cohort_dir with its data.prepare cache and reused by every later
call, as are the CV splits (saved there as JSON).

Input: deterministic lesion-centred crops at the encoder's own view scale (its input_spec.json: the
preprocessing, input size, and view; a "random" view of C mm becomes a lesion-centred cube of C mm).
Only the image channel enters the frozen encoder (eval mode, no grad); the mask enters only the pooling.

Features: the mean token and the mask-weighted mean token (patch weight = lesion share of the patch) of
a middle block (depth // 2, the raw residual stream) and of the last block (after encoder.norm): four
groups, each probed alone and side by side ("all").

Targets and read-outs: the label with L2 logistic regression (AUC), every z_* latent of the generator
(oracle.csv) with ridge regression (R² per latent, and their mean); features standardised inside the
pipeline; the penalty chosen on the training folds only (inner grouped CV / leave-one-out).
Protocol: patient-grouped stratified 5-fold CV repeated 3 times, out-of-fold predictions pooled per repeat.

Controls, on the same splits: random inits of the same config (torch seeds 0 1 2: mean and SD); pixels
(the crop average-pooled to 8^3 + the intensity histogram inside the lesion); hand-made features
(finetune.baselines.radiomics: shape, first-order and GLCM of the lesion and a 5 mm ring); the oracle (AUC of the
generator's true_prob).

Verdict: encoder minus the random mean on "all", in random SDs, for AUC and mean R², with a 95% paired
bootstrap CI over patients of (encoder − random mean) from the out-of-fold predictions: GAIN when a CI
lies above 0 and none below. Writes DIR/probe.json (every number, the command, date and machine) and
DIR/probe.md. Layout: cohort.py (cohort, crops), features.py, evaluate.py (CV, bootstrap), run.py (one
setup: controls, baselines, encoders), report.py (table, verdict), cli.py.
"""
from benchmarks.probe.cli import main

__all__ = ["main"]
