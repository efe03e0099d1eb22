"""The probe cohort: a labelled data.synth cohort generated once into a cache folder, prepared with an
encoder's own preprocessing, and cut into deterministic lesion-centred crops at its own view scale.

    cohort_dir/            a data.synth cohort (manifest.csv, oracle.csv, cohort.json, labeled/)
    cohort_dir/cache/      data.prepare cache entries, keyed by source hash + PrepConfig, so one cohort
                           serves encoders with different preprocessing
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from core.errors import InputError
from data.crops import crop_with_pad, lesion_box, lesion_crop
from data.prep_config import PrepConfig
from data.prepare import prepare_table
from models.input_spec import InputSpec, ViewSpec
from models.tasks import CLASSIFICATION


@dataclass
class ProbeCohort:
    """One row per lesion, in manifest order; arrays are aligned with `subjects`."""
    subjects: list[str]
    patients: np.ndarray      # [N] patient_id, the CV grouping
    label: np.ndarray         # [N] int, 1 = progression
    latents: pd.DataFrame     # [N, K] the generator's z_* latents (oracle.csv)
    true_prob: np.ndarray     # [N] the generator's own probability of the label
    images: list[str]         # cached image.npy [1, X, Y, Z] per lesion
    masks: list[str]          # cached mask.npy [1, X, Y, Z] per lesion
    spacing: tuple[float, float, float]


def ensure_cohort(cohort_dir: Path, n_lesions: int, seed: int, workers: int = 1, progress: bool = True,
                  synth_config: str | None = None) -> Path:
    """Generate the cohort unless `cohort_dir` already holds it; a cohort made with another seed or size
    is an error (reusing it silently would compare encoders on different lesions). `synth_config`: a
    data.synth CohortParams YAML (other lesions, another acquisition), e.g. launch/probe_transfer.yaml."""
    meta = cohort_dir / "cohort.json"
    if not meta.is_file():
        from core.config import load_config
        from data.synth.cohort import generate_cohort
        from data.synth.params import CohortParams
        params = load_config(CohortParams, synth_config) if synth_config else None
        print(f"generating the probe cohort ({n_lesions} lesions, seed {seed}"
              f"{', ' + synth_config if synth_config else ''}) into {cohort_dir}", flush=True)
        generate_cohort(cohort_dir, 0, n_lesions, 0, seed, workers, progress=progress, params=params)
        return cohort_dir
    try:
        info = json.loads(meta.read_text())
        found = (int(info["seed"]), int(info["counts"]["n_labeled"]))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise InputError(f"{meta}: not a data.synth cohort.json ({e})") from None
    if found != (seed, n_lesions):
        raise InputError(f"--cohort_dir {cohort_dir}: holds seed {found[0]} with {found[1]} lesions, but "
                         f"--seed {seed} --n_lesions {n_lesions} was asked; pass another --cohort_dir")
    return cohort_dir


def _tables(cohort_dir: Path, check_files: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(manifest, oracle.csv indexed by subject_id), checked: every subject has a row with z_* latents."""
    manifest = CLASSIFICATION.read_manifest(cohort_dir / "manifest.csv", check_files=check_files)
    oracle_path = cohort_dir / "oracle.csv"
    if not oracle_path.is_file():
        raise InputError(f"{oracle_path}: missing; the probe needs the generator's latents (a data.synth cohort)")
    oracle = pd.read_csv(oracle_path, dtype={"subject_id": str}).set_index("subject_id")
    subjects = manifest["subject_id"].astype(str).tolist()
    missing = sorted(set(subjects) - set(oracle.index))
    if missing:
        raise InputError(f"{oracle_path}: no row for subject(s) {missing[:5]}")
    if not any(c.startswith("z_") for c in oracle.columns):
        raise InputError(f"{oracle_path}: no z_* latent columns")
    return manifest, oracle


def _cohort(manifest: pd.DataFrame, oracle: pd.DataFrame, spacing: tuple[float, ...], images=(),
            masks=()) -> ProbeCohort:
    """One ProbeCohort from a (prepared or raw) manifest and the oracle, every array in the manifest's order."""
    subjects = manifest["subject_id"].astype(str).tolist()
    rows = oracle.loc[subjects]  # aligned with the manifest's rows (the prepared table's, when given one)
    zcols = [c for c in oracle.columns if c.startswith("z_")]
    return ProbeCohort(
        subjects=subjects, patients=manifest["patient_id"].astype(str).to_numpy(),
        label=manifest["label"].to_numpy().astype(int), latents=rows[zcols].reset_index(drop=True),
        true_prob=rows["true_prob"].to_numpy(float), images=list(images), masks=list(masks), spacing=spacing)


def load_cohort(cohort_dir: Path, prep: PrepConfig, workers: int = 0, progress: bool = True) -> ProbeCohort:
    """The manifest joined with oracle.csv, every lesion prepared into cohort_dir/cache (built once)."""
    manifest, oracle = _tables(cohort_dir, check_files=True)
    prep = probe_prep(prep)
    df, _ = prepare_table(manifest, prep, cohort_dir / "cache", workers=workers, progress=progress)
    return _cohort(df, oracle, tuple(prep.spacing), df["cache_image"], df["cache_mask"])


def probe_prep(prep: PrepConfig) -> PrepConfig:
    """How the probe prepares its cohort's one `image` column (T1-CE lesions) for an encoder: with the
    encoder's preprocessing. An encoder pretrained on several sequences, one at a time, is probed on
    the first one's kind; its contract then names the same preparation as a T1-CE-only encoder's."""
    column, modality = prep.channels()[0]
    if column == "image" and len(prep.images) == 1:
        return prep
    return replace(prep, images=("image" if modality == prep.modality else f"image:{modality}",))


def load_labels(cohort_dir: Path) -> ProbeCohort:
    """The cohort's subjects, patients, labels and latents without its images (read-outs of the latents
    themselves); `images`, `masks` and `spacing` are empty."""
    manifest, oracle = _tables(cohort_dir, check_files=False)
    return _cohort(manifest, oracle, ())


def probe_view(spec: InputSpec, crop_mm: float | None, margin_mm: float | None) -> ViewSpec:
    """The encoder's own view, as a lesion-centred cube: a "random" view of C mm becomes a lesion-centred
    cube of C mm (the scale the encoder saw), and --crop_mm / --margin_mm override either part."""
    view = spec.view
    return ViewSpec(centre="lesion", crop_mm=view.crop_mm if crop_mm is None else crop_mm,
                    margin_mm=view.margin_mm if margin_mm is None else margin_mm)


def lesion_crops(cohort: ProbeCohort, size: int, view: ViewSpec) -> np.ndarray:
    """[N, 2, S, S, S] float32: (image, mask) lesion-centred crops, the cube of `view` resized to `size`."""
    spacing = float(np.mean(cohort.spacing))
    margin, min_side = view.margin_voxels(spacing), view.crop_voxels(spacing)
    crops = [lesion_crop(np.load(i, mmap_mode="r"), np.load(m, mmap_mode="r"), size, margin, min_size=min_side)
             for i, m in zip(cohort.images, cohort.masks)]
    return np.stack(crops)  # [N, 2, S, S, S]


def lesion_regions(cohort: ProbeCohort, margin_mm: float = 20.0):
    """Yield (image [X, Y, Z], mask [X, Y, Z]) per lesion at the prepared spacing, cut to the lesion box plus
    `margin_mm` so the hand-made features (ring included) never touch the whole head."""
    margin = int(np.ceil(margin_mm / min(cohort.spacing)))
    for i, m in zip(cohort.images, cohort.masks):
        image, mask = np.load(i, mmap_mode="r"), np.load(m, mmap_mode="r")
        start, size = lesion_box(np.asarray(mask[0]), margin, 1)
        pad = float(np.min(image))
        yield crop_with_pad(image, start, size, pad)[0], crop_with_pad(mask, start, size, 0)[0]
