"""Patients, clinical variables and outcomes: the tabular half of the generative model.

For each index lesion i of patient j (equations in docs/SYNTHETIC_COHORT.md):
  logit_i = b0 + w * beta_img . z_i + beta_clin . x_ij           label_i ~ Bernoulli(sigmoid(logit_i))
  eta_j   = gamma_clin . x_j + mean_i(gamma_img . z_i + gamma_r log(r_i / r_med) + gamma_label label_i)
  T_j     = scale * (-log U / exp(eta_j)) ** (1 / shape)          (Weibull proportional hazards)
  C_j     = min(Uniform(follow-up), Exponential(dropout))        time = min(T, C), event = T <= C
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.special import expit

from data.synth.lesions import physical, sample_latents
from data.synth.params import CLINICAL_COLUMNS, HISTOLOGIES, LATENTS, CaseMix, LesionParams, OutcomeParams

LESION_COLUMNS = ("dose_gy",)  # the rest belong to the patient


def _patients_layout(rng: np.random.Generator, n_subjects: int, second_fraction: float) -> np.ndarray:
    """Patient index of each subject row; a share of patients contributes two index lesions."""
    owner, patient = [], 0
    while len(owner) < n_subjects:
        two = rng.random() < second_fraction and len(owner) + 2 <= n_subjects
        owner += [patient] * (2 if two else 1)
        patient += 1
    return np.asarray(owner, dtype=int)


def _dose(rng: np.random.Generator, radius_mm: np.ndarray, fractionated: np.ndarray) -> np.ndarray:
    """RTOG 90-05 single-fraction dose by diameter (24/18/15 Gy); hypofractionated totals 27-30 Gy."""
    diameter = 2 * radius_mm
    single = np.where(diameter <= 20, 24.0, np.where(diameter <= 30, 18.0, 15.0))
    hypo = np.where(diameter <= 30, 27.0, 30.0)
    dose = np.where(fractionated, hypo, single) + rng.normal(0, 0.7, len(radius_mm))
    return np.round(dose * 2) / 2


def clinical_design(df: pd.DataFrame) -> dict[str, np.ndarray]:
    """Centred/scaled clinical covariates shared by the logit and the hazard (true, unmissing values)."""
    return {
        "age": (df["age"].to_numpy(float) - 60) / 10,
        "kps": (80 - df["kps"].to_numpy(float)) / 10,  # positive = worse performance status
        "dose": (df["dose_gy"].to_numpy(float) - 20) / 4,
        "months": np.log(df["months_since_srs"].to_numpy(float) / 9),
        "steroid": df["steroid_use"].to_numpy(float),
        "hist": np.stack([(df["histology"] == h).to_numpy(float) for h in HISTOLOGIES], axis=1),  # [n, 5]
    }


def true_logit(df: pd.DataFrame, p: OutcomeParams) -> np.ndarray:
    z = df[[f"z_{k}" for k in LATENTS]].to_numpy(float)  # [n, 7]
    x = clinical_design(df)
    clinical = (x["hist"] @ np.asarray(p.beta_histology) + p.beta_dose * x["dose"] + p.beta_months * x["months"]
                + p.beta_kps * x["kps"] + p.beta_age * x["age"] + p.beta_steroid * x["steroid"])
    return p.intercept + p.image_weight * z @ np.asarray(p.beta_image) + clinical


def true_risk(df: pd.DataFrame, p: OutcomeParams, radius_median: float) -> np.ndarray:
    """Patient-level log-hazard eta, repeated on each of the patient's rows."""
    z = df[[f"z_{k}" for k in LATENTS]].to_numpy(float)
    x = clinical_design(df)
    lesion = (z @ np.asarray(p.gamma_image) + p.gamma_log_radius * np.log(df["radius_mm"].to_numpy(float) / radius_median)
              + p.gamma_label * df["label"].to_numpy(float))
    lesion = pd.Series(lesion).groupby(df["patient_id"].to_numpy()).transform("mean").to_numpy()
    clinical = (x["hist"] @ np.asarray(p.gamma_histology) + p.gamma_kps * x["kps"] + p.gamma_age * x["age"]
                + p.gamma_steroid * x["steroid"])
    return clinical + lesion


def sample_subjects(rng: np.random.Generator, n: int, prefix: str, site: str, mix: CaseMix,
                    lp: LesionParams, op: OutcomeParams) -> pd.DataFrame:
    """One row per index lesion (subject) with true clinical values, latents and outcomes."""
    owner = _patients_layout(rng, n, op.second_lesion_fraction)  # [n]
    n_pat = int(owner.max()) + 1 if n else 0

    histology = rng.choice(len(HISTOLOGIES), n_pat, p=np.asarray(mix.histology_p) / np.sum(mix.histology_p))
    female = np.where(np.asarray(HISTOLOGIES)[histology] == "breast", rng.random(n_pat) < 0.99, rng.random(n_pat) < 0.45)
    age = np.clip(np.round(rng.normal(mix.age_mean, mix.age_sd, n_pat)), 25, 90)
    kps = np.clip(np.round((mix.kps_mean - 0.25 * (age - 61) + rng.normal(0, 10, n_pat)) / 10) * 10, 40, 100)
    months = np.clip(np.round(mix.months_median * np.exp(rng.normal(0, 0.6, n_pat)), 1), 1.5, 60)
    fractionated = rng.random(n_pat) < mix.fractionated_p

    lat = sample_latents(rng, n, lp)
    # Steroids are given for symptomatic oedema: more likely with a swollen index lesion.
    worst_oedema = pd.Series(lat["z_oedema"]).groupby(owner).max().to_numpy() if n else np.zeros(0)
    steroid = (rng.random(n_pat) < expit(-0.9 + 0.9 * worst_oedema)).astype(int)

    df = pd.DataFrame({
        "subject_id": [f"{prefix}{i + 1:04d}" for i in range(n)],
        "patient_id": [f"P{prefix}{j + 1:04d}" for j in owner],
        "site": site,
        "age": age[owner].astype(int),
        "sex": np.where(female[owner], "F", "M"),
        "kps": kps[owner].astype(int),
        "histology": np.asarray(HISTOLOGIES)[histology[owner]],
        "dose_gy": _dose(rng, lat["radius_mm"], fractionated[owner]),
        "months_since_srs": months[owner],
        "steroid_use": steroid[owner],
    })
    for k, v in lat.items():
        df[k] = v
    for k, v in physical(lat, steroid[owner], lp).items():
        df[f"ph_{k}"] = v

    df["true_logit"] = true_logit(df, op)
    df["true_prob"] = expit(df["true_logit"])
    df["label"] = (rng.random(n) < df["true_prob"]).astype(int)
    df["true_risk"] = true_risk(df, op, lp.radius_mm_median)

    eta = df.groupby("patient_id", sort=False)["true_risk"].first()  # one survival draw per patient
    u = rng.random(len(eta))
    t_event = op.weibull_scale_months * (-np.log(u) / np.exp(eta.to_numpy())) ** (1 / op.weibull_shape)
    t_cens = np.minimum(rng.uniform(*op.followup_months, len(eta)),
                        rng.exponential(1 / op.dropout_rate_per_month, len(eta)))
    time = pd.Series(np.maximum(np.round(np.minimum(t_event, t_cens), 1), 0.1), index=eta.index)
    event = pd.Series((t_event <= t_cens).astype(int), index=eta.index)
    df["time"] = df["patient_id"].map(time)
    df["event"] = df["patient_id"].map(event)
    return df


def observed_clinical(df: pd.DataFrame, rng: np.random.Generator, op: OutcomeParams) -> pd.DataFrame:
    """The clinical columns as a study would record them: some cells missing completely at random."""
    out = df[list(CLINICAL_COLUMNS)].copy()
    patients, owner = np.unique(df["patient_id"].to_numpy(), return_inverse=True)
    for col in CLINICAL_COLUMNS:
        rate = op.missing_rate if col in op.missing_columns else 0.0
        # A patient-level item is missing from the patient's record, so from all of their rows.
        hit = rng.random(len(out)) < rate if col in LESION_COLUMNS else (rng.random(len(patients)) < rate)[owner]
        if col in ("kps", "steroid_use", "age"):
            out[col] = out[col].astype("Int64")
        out.loc[hit, col] = pd.NA
    return out
