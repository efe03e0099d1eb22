"""The whole cohort: tables first (clinical, latents, outcomes), then one render job per scan, then the
CSVs and cohort.json, all inside a temporary directory that replaces DIR at the end."""
from __future__ import annotations

import dataclasses
import json
import os
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from core.atomic import atomic_dir
from core.config import from_dict, to_dict
from core.errors import InputError
from data.synth.anatomy import TEMPLATE_FILES, load_template
from data.synth.clinical_outcomes import observed_clinical, sample_subjects
from data.synth.lesions import physical, sample_latents
from data.synth.params import CLINICAL_COLUMNS, GENERATOR_VERSION, LATENTS, PET_COLUMNS, CohortParams, validate
from data.synth.render import ScanJob, render_scan

MANIFEST_COLUMNS = ("subject_id", "patient_id", "site", "image", "mask", "label", "time", "event") + CLINICAL_COLUMNS
# Per-lesion FLAIR/PET draws that oracle.csv gains when those sequences are requested.
SEQUENCE_ORACLE = {"flair": ("flair_match", "flair_mismatch"), "pet": ("pet_tbr",)}
NEW_SECTIONS = ("sequences", "flair", "pet", "pet_a", "pet_b")  # params that only matter with FLAIR/PET
PHYSICAL = ("radius_mm", "rim_mm", "nodularity", "core_fraction", "oedema_mm", "peritumoral", "irregularity",
            "septation", "enhancement", "necrotic")


def _streams(seed: int) -> dict[str, np.random.SeedSequence]:
    """Independent streams per part, so e.g. more unlabeled scans never change the labeled ones."""
    # Appended names get new children and leave the earlier ones (child i = spawn key (i,)) unchanged.
    names = ("table_a", "table_b", "table_u", "missing", "scans_a", "scans_b", "scans_u", "seq_a", "seq_b", "seq_u")
    return dict(zip(names, np.random.SeedSequence(seed).spawn(len(names))))


def sample_tables(n_labeled: int, n_external: int, seed: int, params: CohortParams | None = None):
    """The tabular part only (no volumes): internal and external subject tables with true values."""
    p = params or CohortParams()
    s = _streams(seed)
    a = sample_subjects(np.random.default_rng(s["table_a"]), n_labeled, "A", p.site_a.name, p.case_mix_a, p.lesion, p.outcome)
    b = sample_subjects(np.random.default_rng(s["table_b"]), n_external, "B", p.site_b.name, p.case_mix_b, p.lesion, p.outcome)
    return a, b


def _lesion_dict(row) -> dict:
    return {k: float(row[f"ph_{k}"]) for k in PHYSICAL}


def columns_with_sequences(columns, sequences) -> list[str]:
    """Manifest columns with the FLAIR/PET paths and PET injection columns right after `image`."""
    new = [k for k in ("flair", "pet") if k in sequences] + (list(PET_COLUMNS) if "pet" in sequences else [])
    i = list(columns).index("image") + 1
    return list(columns[:i]) + new + list(columns[i:])


def _paths(folder: str, subjects, kind: str, wanted: bool) -> list[str]:
    return [f"{folder}/{s}_{kind}.nii.gz" for s in subjects] if wanted else []


def _injections(rng, n: int, p: CohortParams) -> pd.DataFrame:
    """Per patient: injected FET dose, body weight, minutes from injection to scan. Rounded as written
    to the CSVs, and the renderer converts with these same values, so SUV can be recovered exactly."""
    q = p.pet
    dose = rng.uniform(*q.dose_mbq_range, n)
    weight = np.clip(rng.normal(q.weight_kg_mean, q.weight_kg_sd, n), *q.weight_kg_range)
    minutes = rng.uniform(*q.minutes_range, n)
    return pd.DataFrame({"pet_dose_mbq": dose.round(2), "pet_weight_kg": weight.round(1), "pet_minutes": minutes.round(2)})


def _labeled_jobs(df: pd.DataFrame, folder: str, site, seeds, rng, p: CohortParams,
                  inj: pd.DataFrame) -> list[ScanJob]:
    """One job per patient (a scan); `inj` holds the patient's PET injection, indexed by patient_id."""
    jobs = []
    groups = list(df.groupby("patient_id", sort=False))
    for (pid, rows), seed in zip(groups, seeds.spawn(len(groups))):
        n_index = len(rows)
        p_extra = np.asarray(p.lesion.extra_lesions_p[: 4 - n_index], float)  # at most 3 lesions per scan
        subjects = rows["subject_id"]
        jobs.append(ScanJob(
            scan_id=str(pid), site=site, seed=seed,
            images=[f"{folder}/{s}_image.nii.gz" for s in subjects],
            lesions=[_lesion_dict(r) for _, r in rows.iterrows()],
            masks=[f"{folder}/{s}_mask.nii.gz" for s in subjects],
            n_extra=int(rng.choice(len(p_extra), p=p_extra / p_extra.sum())),
            steroid=int(rows["steroid_use"].iloc[0]),
            labels=[int(v) for v in rows["label"]],
            flair=_paths(folder, subjects, "flair", "flair" in p.sequences),
            pet=_paths(folder, subjects, "pet", "pet" in p.sequences), pet_site=p.site_pet(site.name),
            pet_injection=tuple(float(inj.loc[pid, c]) for c in PET_COLUMNS)))
    return jobs


def _patient_injections(df: pd.DataFrame, stream, p: CohortParams) -> pd.DataFrame:
    patients = df["patient_id"].drop_duplicates().tolist()  # groupby(sort=False) order
    return _injections(np.random.default_rng(stream), len(patients), p).set_index(pd.Index(patients, name="patient_id"))


def _unlabeled_jobs(n: int, p: CohortParams, s) -> tuple[list[ScanJob], pd.DataFrame]:
    rng = np.random.default_rng(s["table_u"])
    counts = rng.choice(len(p.lesion.unlabeled_lesions_p), n, p=np.asarray(p.lesion.unlabeled_lesions_p) / np.sum(p.lesion.unlabeled_lesions_p))
    site_b = rng.random(n) < p.unlabeled_site_b_fraction
    steroid = (rng.random(n) < 0.3).astype(int)
    # Pretraining data is incomplete: some subjects lack FLAIR or PET (own stream; T1-CE draws unchanged).
    seq_rng = np.random.default_rng(s["seq_u"])
    has = seq_rng.random((n, 2)) >= [p.flair.unlabeled_missing_p, p.pet.unlabeled_missing_p]  # [n, (flair, pet)]
    inj = _injections(seq_rng, n, p)
    jobs, rows = [], []
    for i, seed in enumerate(s["scans_u"].spawn(n)):
        k = int(counts[i])
        ph = physical(sample_latents(rng, k, p.lesion), np.full(k, steroid[i]), p.lesion)
        site = p.site_b if site_b[i] else p.site_a
        sid = f"U{i + 1:04d}"
        flair = [f"unlabeled/{sid}_flair.nii.gz"] if "flair" in p.sequences and has[i, 0] else []
        pet = [f"unlabeled/{sid}_pet.nii.gz"] if "pet" in p.sequences and has[i, 1] else []
        injection = tuple(float(inj.loc[i, c]) for c in PET_COLUMNS)
        jobs.append(ScanJob(scan_id=sid, site=site, seed=seed, images=[f"unlabeled/{sid}.nii.gz"],
                            lesions=[{key: float(v[j]) for key, v in ph.items()} for j in range(k)], masks=[None] * k,
                            flair=flair, pet=pet, pet_site=p.site_pet(site.name), pet_injection=injection))
        rows.append({"subject_id": sid, "patient_id": f"PU{i + 1:04d}", "site": site.name,
                     "image": f"unlabeled/{sid}.nii.gz", "flair": (flair or [None])[0], "pet": (pet or [None])[0],
                     **{c: (v if pet else None) for c, v in zip(PET_COLUMNS, injection)}, "n_lesions": k})
    columns = columns_with_sequences(["subject_id", "patient_id", "site", "image", "n_lesions"], p.sequences)
    return jobs, pd.DataFrame(rows, columns=columns)


def _package_version() -> str:
    try:
        from importlib.metadata import version
        return version("mimfm")
    except Exception:
        try:
            import tomllib
            return tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]["version"]
        except Exception:
            return "unknown"


def _check_args(out: Path, counts: dict, seed: int, workers: int, overwrite: bool) -> None:
    for name, n in {**counts, "seed": seed}.items():
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0:
            raise InputError(f"--{name.replace('_', '-')}: expected a whole number >= 0, got {n!r}")
    if sum(counts.values()) == 0:
        raise InputError("nothing to generate: --n-unlabeled, --n-labeled and --n-external are all 0")
    if not isinstance(workers, (int, np.integer)) or workers < 1:
        raise InputError(f"--workers: expected a whole number >= 1, got {workers!r}")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise InputError(f"--out {out}: directory exists and is not empty; pass --overwrite to replace it")
        if not (out / "cohort.json").is_file():
            raise InputError(f"--out {out}: refusing to overwrite a directory that is not a synthetic cohort (no cohort.json)")


def resolve_params(params: CohortParams | None = None, **overrides) -> CohortParams:
    """CohortParams from an instance and/or keyword overrides (nested dicts allowed: lesion={...})."""
    base = to_dict(params or CohortParams())
    for k, v in overrides.items():
        v = to_dict(v) if dataclasses.is_dataclass(v) else v
        base[k] = {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    p = from_dict(CohortParams, base, where="synth params")
    validate(p)
    return p


def generate_cohort(out, n_unlabeled: int, n_labeled: int, n_external: int, seed: int = 0, workers: int = 1, *,
                    overwrite: bool = False, progress: bool = True, params: CohortParams | None = None,
                    **overrides) -> Path:
    """Write the synthetic cohort to `out` (see docs/SYNTHETIC_COHORT.md) and return its path."""
    out = Path(out)
    _check_args(out, {"n_unlabeled": n_unlabeled, "n_labeled": n_labeled, "n_external": n_external}, seed, workers,
                overwrite)
    p = resolve_params(params, **overrides)
    s = _streams(seed)

    lab, ext = sample_tables(n_labeled, n_external, seed, p)
    inj_a, inj_b = _patient_injections(lab, s["seq_a"], p), _patient_injections(ext, s["seq_b"], p)
    job_rng = np.random.default_rng(s["missing"])  # extra-lesion counts and missing cells
    jobs = (_labeled_jobs(lab, "labeled", p.site_a, s["scans_a"], job_rng, p, inj_a)
            + _labeled_jobs(ext, "external", p.site_b, s["scans_b"], job_rng, p, inj_b))
    u_jobs, unlabeled = _unlabeled_jobs(n_unlabeled, p, s)
    jobs = u_jobs + jobs

    load_template(p.template_spacing_mm)  # build once here; forked workers inherit it
    volumes: dict[str, dict] = {}  # mask path -> lesion volume and FLAIR/PET draws
    with atomic_dir(out) as tmp:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; a cohort is ordinary shared data
        for sub in ("unlabeled", "labeled", "external"):
            (tmp / sub).mkdir()
        bar = tqdm(total=len(jobs), desc="synth cohort", unit="scan", disable=not progress)
        if workers == 1:
            for job in jobs:
                volumes.update(render_scan(job, tmp, p))
                bar.update()
        else:
            # Forked workers share the parent's template; elsewhere each worker builds its own once.
            ctx = get_context("fork" if "fork" in get_all_start_methods() else None)
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                for v in pool.map(render_scan, jobs, [tmp] * len(jobs), [p] * len(jobs)):
                    volumes.update(v)
                    bar.update()
        bar.close()
        _write_tables(tmp, lab, ext, unlabeled, volumes, job_rng, p, (inj_a, inj_b))
        (tmp / "cohort.json").write_text(json.dumps(_summary(seed, p, lab, ext, unlabeled), indent=2) + "\n")
    return out


def _manifest(df: pd.DataFrame, folder: str, rng, p: CohortParams, inj: pd.DataFrame) -> pd.DataFrame:
    m = pd.DataFrame({
        "subject_id": df["subject_id"], "patient_id": df["patient_id"], "site": df["site"],
        "image": [f"{folder}/{s}_image.nii.gz" for s in df["subject_id"]],
        "flair": [f"{folder}/{s}_flair.nii.gz" for s in df["subject_id"]],
        "pet": [f"{folder}/{s}_pet.nii.gz" for s in df["subject_id"]],
        **{c: inj.loc[df["patient_id"], c].to_numpy() for c in PET_COLUMNS},
        "mask": [f"{folder}/{s}_mask.nii.gz" for s in df["subject_id"]],
        "label": df["label"], "time": df["time"], "event": df["event"]}, index=df.index)
    return pd.concat([m, observed_clinical(df, rng, p.outcome)], axis=1)[columns_with_sequences(MANIFEST_COLUMNS, p.sequences)]


def _write_csv(path: Path, df: pd.DataFrame) -> None:
    # Missing values are empty cells and lines end in "\n" on every OS, so reruns are byte-identical.
    df.to_csv(path, index=False, na_rep="", lineterminator="\n")


def _write_tables(root: Path, lab, ext, unlabeled, volumes, rng, p: CohortParams, injections) -> None:
    _write_csv(root / "manifest.csv", _manifest(lab, "labeled", rng, p, injections[0]))
    _write_csv(root / "external.csv", _manifest(ext, "external", rng, p, injections[1]))
    _write_csv(root / "unlabeled.csv", unlabeled)
    oracle = pd.concat([lab.assign(cohort="internal", mask=[f"labeled/{s}_mask.nii.gz" for s in lab["subject_id"]]),
                        ext.assign(cohort="external", mask=[f"external/{s}_mask.nii.gz" for s in ext["subject_id"]])])
    drawn = [k for seq, keys in SEQUENCE_ORACLE.items() if seq in p.sequences for k in keys]
    for key in ["lesion_volume_ml"] + drawn:
        oracle[key] = [volumes[m][key] for m in oracle["mask"]]
    oracle["lesion_volume_ml"] = oracle["lesion_volume_ml"].round(3)
    cols = (["subject_id", "patient_id", "site", "cohort", "label", "time", "event", "true_logit", "true_prob",
             "true_risk"] + [f"z_{k}" for k in LATENTS] + [f"ph_{k}" for k in PHYSICAL] + ["lesion_volume_ml"] + drawn
            + list(CLINICAL_COLUMNS))
    oracle = oracle[cols].copy()
    floats = oracle.select_dtypes("float").columns.difference(["time", "dose_gy", "months_since_srs", "lesion_volume_ml"])
    oracle[floats] = oracle[floats].round(6)
    _write_csv(root / "oracle.csv", oracle)


def _stats(df: pd.DataFrame) -> dict:
    if df.empty:
        return {"subjects": 0, "patients": 0}
    pat = df.groupby("patient_id").first()
    return {"subjects": len(df), "patients": len(pat),
            "patients_with_two_subjects": int((df["patient_id"].value_counts() == 2).sum()),
            "progression_fraction": round(float(df["label"].mean()), 4),
            "censored_fraction": round(float(1 - pat["event"].mean()), 4),
            "median_time_months": float(pat["time"].median())}


def _summary(seed: int, p: CohortParams, lab, ext, unlabeled) -> dict:
    return {
        "generator": "data.synth", "generator_version": GENERATOR_VERSION, "package_version": _package_version(),
        "seed": int(seed),
        "counts": {"n_unlabeled": len(unlabeled), "n_labeled": len(lab), "n_external": len(ext)},
        "internal": _stats(lab), "external": _stats(ext),
        "unlabeled_lesions": int(unlabeled["n_lesions"].sum()) if len(unlabeled) else 0,
        "template": {"source": "nilearn MNI152 2009 (bundled)", "files": list(TEMPLATE_FILES.values())},
        "files": {"manifest": "manifest.csv", "external": "external.csv", "unlabeled": "unlabeled.csv",
                  "oracle": "oracle.csv"},
        "label_meaning": {"1": "tumour progression", "0": "radiation necrosis"},
        "params": _params_record(p),
    }


def _params_record(p: CohortParams) -> dict:
    """Every parameter; the FLAIR/PET sections only when those sequences are requested, so a T1-CE-only
    cohort.json is the same as before they existed (they have no effect on it)."""
    d = to_dict(p)
    if tuple(p.sequences) == ("t1ce",):
        for key in NEW_SECTIONS:
            d.pop(key, None)
    return d
