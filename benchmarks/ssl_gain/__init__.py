"""Does self-supervised pretraining pay off? The whole comparison, end to end, on the synthetic cohort.

    python -m benchmarks.ssl_gain --preset cpu|gpu --out DIR [--seeds 0 1 2] [--toy] [--show]

Shaped like the published study (necrosis vs progression after radiosurgery): a large unlabelled
pretraining set; ~109 labelled patients with 20% held out at the same site; ~28 external patients
from a second site with a shifted acquisition. On identical patient-level splits it runs

    1. mim           MiM-pretrained ViT fine-tuned on [image, mask]            (fusion none)
    2. multimodal    the same + clinical fusion, best of concat/film/tokens by pooled OOF val AUC
    3. scratch       the same ViT from random init                               (fusion none)
    4. mae           plain MAE pretraining (MiM with L = 1, same steps), fine-tuned (fusion none)
    5. radiomics     hand-crafted lesion + peritumoral features, penalised linear model
    6. clinical_only clinical variables only
       oracle        the generative model's own true_prob / true_risk (oracle.csv): the ceiling

and reports AUC with a 95% DeLong CI on the same-site and external test sets (fold-ensemble rows),
a paired DeLong p against (1), and Harrell's C with a bootstrap CI, per seed (pretraining seed =
split seed) and as mean / SD over seeds. Survival: presets with `survival = "multitask"` train every
ViT / clinical model with the multitask head (BCE + Cox), so one run gives both scores on the same
splits; `survival = "separate"` trains classification models and, for mim, scratch and
clinical_only, survival models on their own event-stratified splits. Radiomics fits a logistic
model and a Cox model separately in both modes.

Writes DIR/results.json, DIR/results.md (table next to the published numbers), DIR/roc_test.png and
DIR/roc_external.png (first seed), and every stage's outputs under DIR. A stage whose outputs exist
is skipped, so a crashed run continues where it stopped (pretraining also resumes from its last
checkpoint and fine-tuning from its finished folds).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

from data.atomic import write_json, write_text
from data.errors import InputError, cli_entry

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"

# ---------------------------------------------------------------- models and published numbers

# key -> (label in tables, published (same-site test AUC, external AUC) or None)
MODELS: dict[str, tuple[str, tuple[float, float] | None]] = {
    "mim": ("MiM-pretrained ViT (image + mask)", (0.916, 0.764)),
    "multimodal": ("MiM ViT + clinical fusion (best on val)", (0.947, 0.821)),
    "scratch": ("ViT from scratch (image + mask)", (0.624, 0.496)),
    "mae": ("plain MAE (L = 1) ViT (image + mask)", None),
    "radiomics": ("radiomics + linear model", (0.807, 0.691)),
    "clinical_only": ("clinical variables only", None),
    "oracle": ("oracle (true generative probability / risk)", None),
}
REFERENCE = "mim"              # paired DeLong tests are against this model
TEST_SETS = ("test", "external")
FUSIONS = ("concat", "film", "tokens")
RING_MM, BINS = 5.0, 32         # radiomics: peritumoral ring width and grey levels (the CLI's defaults)
PUBLISHED_SOURCE = "the published study's Table (SSL ViT, scratch ViT, radiomics, multimodal SSL ViT)"


@dataclass
class Preset:
    name: str
    # cohort (data.synth); the cohort is drawn once (cohort_seed), the seeds vary pretraining + splits
    n_unlabeled: int
    n_labeled: int
    n_external: int
    cohort_seed: int = 0
    workers: int = 2                      # synth / preprocessing processes
    # pretraining (pretrain.train.PretrainConfig loaded from pretrain_config, then these)
    pretrain_config: str = "pretrain_tiny_cpu.yaml"
    pretrain_steps: int = 200
    pretrain_batch_size: int | None = None
    pretrain_crops_per_volume: int | None = None
    # fine-tuning (finetune.train.FinetuneConfig loaded from finetune_config, then these)
    finetune_config: str = "finetune_tiny_cpu.yaml"
    folds: int = 3
    test_fraction: float = 0.2
    epochs: int = 10
    patience: int = 4
    finetune_n_boot: int = 100            # bootstrap inside each fine-tuning run's own metrics.json
    fusions: tuple[str, ...] = FUSIONS
    survival: str = "multitask"           # multitask | separate
    # evaluation
    n_boot: int = 1000                    # bootstrap resamples for the C-index CIs here
    roc_band_boot: int = 0                # bootstrap bands on the summary ROC figures (0: none)
    seeds: tuple[int, ...] = (0, 1)
    note: str = ""

    def __post_init__(self):
        bad = [f for f in self.fusions if f not in FUSIONS]
        if bad or not self.fusions:
            raise InputError(f"preset {self.name}: fusions {self.fusions} must be a non-empty subset of {FUSIONS}")
        if self.survival not in ("multitask", "separate"):
            raise InputError(f"preset {self.name}: survival must be 'multitask' or 'separate', got {self.survival!r}")


PRESETS = {
    # 2 CPU cores, < 60 min end to end: tiny ViT (dim 96, depth 4, 48^3 input, 12^3 patches).
    "cpu": Preset(
        name="cpu", n_unlabeled=300, n_labeled=109, n_external=28, pretrain_steps=1000,
        folds=3, epochs=20, patience=6, finetune_n_boot=50, fusions=FUSIONS, survival="multitask",
        n_boot=500, seeds=(0, 1, 2),
        note="tiny ViT, 1000 MiM / MAE steps of 2 volumes x 2 crops, 40 mm lesion crops, 3 folds x <= 20 epochs, 3 seeds"),
    # One H100: ViT-B (dim 768, depth 12, 96^3 input, 16^3 patches), bf16, a real pretraining budget.
    "gpu": Preset(
        name="gpu", n_unlabeled=3000, n_labeled=109, n_external=28, workers=16,
        pretrain_config="pretrain_base_gpu.yaml", pretrain_steps=20000,
        finetune_config="finetune_base_gpu.yaml", folds=5, epochs=100, patience=20, finetune_n_boot=500,
        fusions=FUSIONS, survival="separate", n_boot=2000, roc_band_boot=200, seeds=(0, 1, 2),
        note="ViT-B, 20k MiM / MAE steps of 8 volumes x 4 crops, 5 folds x <= 100 epochs, 3 seeds"),
}
# --toy: the pipeline's plumbing in a few minutes on 2 cores (tests); numbers mean nothing.
TOY = Preset(
    name="toy", n_unlabeled=4, n_labeled=20, n_external=6, pretrain_steps=2, pretrain_batch_size=1,
    pretrain_crops_per_volume=1, folds=2, epochs=1, patience=1, finetune_n_boot=0, fusions=("concat", "tokens"),
    survival="multitask", n_boot=50, seeds=(0,), note="toy size: plumbing only")


def resolve_preset(name: str, toy: bool = False, seeds=None) -> Preset:
    if name not in PRESETS:
        raise InputError(f"--preset {name!r}: expected one of {sorted(PRESETS)}")
    preset = replace(TOY, name=f"{name}+toy") if toy else PRESETS[name]
    if seeds:
        preset = replace(preset, seeds=tuple(int(s) for s in seeds))
    if len(set(preset.seeds)) != len(preset.seeds):
        raise InputError(f"--seeds {list(preset.seeds)}: repeated seed")
    return preset


# ---------------------------------------------------------------- stage bookkeeping

def log(msg: str) -> None:
    print(f"[ssl_gain {datetime.now():%H:%M:%S}] {msg}", flush=True)


def _cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its finished child processes (synth / prep workers)."""
    import resource
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class Stages:
    """Run a stage unless its outputs exist; remember what ran, what was skipped and how long it took."""

    def __init__(self, out: Path):
        self.out = out
        self.times_path = out / "stage_times.json"
        self.times: dict[str, float] = json.loads(self.times_path.read_text()) if self.times_path.is_file() else {}
        self.cpu_path = out / "stage_cpu_seconds.json"
        self.cpu: dict[str, float] = json.loads(self.cpu_path.read_text()) if self.cpu_path.is_file() else {}
        self.status: dict[str, str] = {}

    def run(self, name: str, outputs: list[Path], fn, *, force: bool = False):
        if not force and outputs and all(p.exists() for p in outputs):
            self.status[name] = "skipped"
            log(f"{name}: skipped (outputs exist)")
            return None
        log(f"{name}: running")
        t0, c0 = time.time(), _cpu_seconds()
        result = fn()
        seconds, cpu = round(time.time() - t0, 1), round(_cpu_seconds() - c0, 1)
        self.status[name] = "ran"
        self.times[name] = seconds
        self.cpu[name] = cpu
        write_json(self.times_path, self.times)
        write_json(self.cpu_path, self.cpu)
        log(f"{name}: done in {seconds:.0f} s ({cpu:.0f} CPU-s)")
        return result

    def ran_any(self, prefix: str = "") -> bool:
        return any(v == "ran" for k, v in self.status.items() if k.startswith(prefix))


# ---------------------------------------------------------------- configs

def pretrain_config(preset: Preset, out: Path, seed: int, levels: int):
    from data.config import load_config
    from pretrain.train import PretrainConfig
    cfg = load_config(PretrainConfig, LAUNCH / preset.pretrain_config)
    cfg.data = str(out / "cohort" / "unlabeled")
    cfg.cache_dir = str(out / "cache")
    cfg.output_dir = str(out / f"seed{seed}" / ("pretrain_mim" if levels > 1 else "pretrain_mae"))
    cfg.max_steps = preset.pretrain_steps
    cfg.seed = seed
    cfg.resume = "auto"
    cfg.preview_every = 0                        # one preview at the end
    cfg.ckpt_every = max(1, min(cfg.ckpt_every, math.ceil(preset.pretrain_steps / 4)))
    cfg.log_every = max(1, min(cfg.log_every, preset.pretrain_steps))
    cfg.optim.warmup_steps = min(cfg.optim.warmup_steps, max(1, preset.pretrain_steps // 10))
    if preset.pretrain_batch_size:
        cfg.batch_size = preset.pretrain_batch_size
    if preset.pretrain_crops_per_volume:
        cfg.crops_per_volume = preset.pretrain_crops_per_volume
    if levels == 1:  # L = 1: exactly a plain MAE (same encoder, decoder, data, steps)
        cfg.model.masks = replace(cfg.model.masks, levels=1, mask_ratio=(cfg.model.masks.mask_ratio[0],))
        cfg.model = replace(cfg.model, level_weights=(1.0,))
    cfg.model = replace(cfg.model)  # re-run the config's own checks after the edits
    return cfg


def finetune_config(preset: Preset, out: Path, seed: int, name: str, *, pretrained: str, fusion: str, task: str,
                    splits: Path):
    from data.config import load_config
    from finetune.train import FinetuneConfig
    cfg = load_config(FinetuneConfig, LAUNCH / preset.finetune_config)
    cohort = out / "cohort"
    return replace(cfg, manifest=str(cohort / "manifest.csv"), external=str(cohort / "external.csv"),
                   pretrained=pretrained, task=task, fusion=fusion, output_dir=str(out / f"seed{seed}" / name),
                   cache_dir=str(out / "cache"), splits=str(splits), folds=preset.folds,
                   test_fraction=preset.test_fraction, epochs=preset.epochs, patience=preset.patience, seed=seed,
                   n_boot=preset.finetune_n_boot, explain=0, resume="auto")


def prep_config(preset: Preset):
    """The preprocessing every stage shares (pretraining's; fine-tuning takes it from the encoder)."""
    from data.config import load_config
    from finetune.train import FinetuneConfig
    from pretrain.train import PretrainConfig
    pre = load_config(PretrainConfig, LAUNCH / preset.pretrain_config).prep
    fin = load_config(FinetuneConfig, LAUNCH / preset.finetune_config).prep
    if pre != fin:  # scratch and radiomics would then see other voxels than the pretrained models
        raise InputError(f"preset {preset.name}: {preset.pretrain_config} and {preset.finetune_config} "
                         f"preprocess differently ({pre} vs {fin})")
    return pre


@dataclass
class Run:
    """One fine-tuning run of one seed."""
    name: str
    pretrained: str    # "mim" | "mae" | "" (scratch / clinical only)
    fusion: str
    task: str
    splits: str        # "cls" | "surv"


def finetune_runs(preset: Preset) -> list[Run]:
    task = "multitask" if preset.survival == "multitask" else "classification"
    runs = [Run("ft_mim_none", "mim", "none", task, "cls")]
    runs += [Run(f"ft_mim_{f}", "mim", f, task, "cls") for f in preset.fusions]
    runs += [Run("ft_scratch_none", "", "none", task, "cls"), Run("ft_mae_none", "mae", "none", task, "cls"),
             Run("ft_clinical_only", "", "clinical_only", task, "cls")]
    if preset.survival == "separate":
        runs += [Run("surv_mim_none", "mim", "none", "survival", "surv"),
                 Run("surv_scratch_none", "", "none", "survival", "surv"),
                 Run("surv_clinical_only", "", "clinical_only", "survival", "surv")]
    return runs


# which run gives each model's classification / survival scores (multimodal: chosen per seed)
CLS_RUN = {"mim": "ft_mim_none", "scratch": "ft_scratch_none", "mae": "ft_mae_none",
           "clinical_only": "ft_clinical_only", "radiomics": "radiomics_classification"}


def surv_run(model: str, preset: Preset, chosen_fusion: str | None) -> str | None:
    if model == "radiomics":
        return "radiomics_survival"
    if preset.survival == "separate":
        return {"mim": "surv_mim_none", "scratch": "surv_scratch_none",
                "clinical_only": "surv_clinical_only"}.get(model)
    if model == "multimodal":
        return f"ft_mim_{chosen_fusion}" if chosen_fusion else None
    return CLS_RUN.get(model)


# ---------------------------------------------------------------- stages

def make_cohort(preset: Preset, out: Path) -> None:
    from data.synth import generate_cohort
    generate_cohort(out / "cohort", preset.n_unlabeled, preset.n_labeled, preset.n_external, seed=preset.cohort_seed,
                    workers=preset.workers, overwrite=(out / "cohort" / "cohort.json").is_file())


def prepare_all(preset: Preset, out: Path) -> None:
    """Fill the shared cache once, in parallel; every later stage then only hits the cache."""
    from data.manifest import read_any, read_manifest
    from data.prepare import prepare_table
    prep, cohort, cache = prep_config(preset), out / "cohort", out / "cache"
    workers = preset.workers if preset.workers > 1 else 0
    for csv in ("manifest.csv", "external.csv"):
        prepare_table(read_manifest(cohort / csv, task="multitask"), prep, cache, workers=workers)
    if preset.n_unlabeled:
        table = read_any(cohort / "unlabeled")  # exactly what pretraining reads
        prepare_table(table.drop(columns=[c for c in ("mask",) if c in table.columns]), prep, cache,
                      require_lesion=False, workers=workers)
    write_json(cache / "ssl_gain_prepared.json", {"prep": asdict(prep), "preset": preset.name})


def make_splits(preset: Preset, out: Path, seed: int, stratify: str, path: Path) -> None:
    from data.manifest import read_manifest
    from data.splits import load_or_make_splits
    df = read_manifest(out / "cohort" / "manifest.csv", task="multitask")
    load_or_make_splits(path, df, test_fraction=preset.test_fraction, folds=preset.folds, stratify=stratify, seed=seed)


def run_pretrain(preset: Preset, out: Path, seed: int, levels: int) -> None:
    from pretrain.train import train
    cfg = pretrain_config(preset, out, seed, levels)
    train(cfg)
    if not (Path(cfg.output_dir) / "encoder" / "config.json").is_file():
        raise RuntimeError(f"pretraining {cfg.output_dir} finished without exporting an encoder")


def run_config(preset: Preset, out: Path, seed: int, run: Run):
    sd = out / f"seed{seed}"
    pretrained = str(sd / f"pretrain_{run.pretrained}" / "encoder") if run.pretrained else ""
    splits = sd / ("splits.json" if run.splits == "cls" else "splits_survival.json")
    return finetune_config(preset, out, seed, run.name, pretrained=pretrained, fusion=run.fusion, task=run.task,
                           splits=splits)


def run_finetune(preset: Preset, out: Path, seed: int, run: Run) -> None:
    from finetune.train import run as finetune
    finetune(run_config(preset, out, seed, run))


def radiomics_features(preset: Preset, out: Path) -> None:
    from data.manifest import read_manifest
    from data.prepare import prepare_table
    from finetune.radiomics import extract_table
    prep, cohort, cache = prep_config(preset), out / "cohort", out / "cache"
    target = out / "radiomics" / "features.csv"
    target.parent.mkdir(parents=True, exist_ok=True)
    for name, csv in (("internal", "manifest.csv"), ("external", "external.csv")):
        df, _ = prepare_table(read_manifest(cohort / csv, task="multitask"), prep, cache, progress=False)
        extract_table(df, name, RING_MM, BINS, target)
    write_json(target.parent / "done.json", {"ring_mm": RING_MM, "bins": BINS})


def radiomics_predict(preset: Preset, out: Path, seed: int, task: str) -> None:
    from data.atomic import atomic_path
    from data.manifest import read_manifest
    from finetune.radiomics import predict_splits
    feats = pd.read_csv(out / "radiomics" / "features.csv", dtype={"subject_id": str})
    key_cols = [c for c in ("cohort", "subject_id", "cache_image", "extraction") if c in feats.columns]

    def table(cohort):
        rows = feats[feats["cohort"] == cohort]
        return rows.drop(columns=key_cols).set_index(pd.Index(rows["subject_id"].astype(str), name="subject_id"))

    internal, external = table("internal"), table("external")
    df = read_manifest(out / "cohort" / "manifest.csv", task="multitask")
    targets = df.set_index(df["subject_id"].astype(str))[["label", "time", "event"]]
    sd = out / f"seed{seed}"
    split_file = sd / ("splits_survival.json" if task == "survival" and preset.survival == "separate" else "splits.json")
    splits = json.loads(split_file.read_text())
    pred, params = predict_splits(internal, targets, splits, task, seed, external)
    folder = sd / f"radiomics_{task}"
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "radiomics.json", {"task": task, "seed": seed, "splits": str(split_file),
                                           "n_features": internal.shape[1], "models": params})
    with atomic_path(folder / "predictions.csv") as tmp:
        pred.to_csv(tmp, index=False)


# ---------------------------------------------------------------- evaluation of one seed

def _outcomes(out: Path) -> pd.DataFrame:
    from data.manifest import read_manifest
    cohort = out / "cohort"
    frames = [read_manifest(cohort / f, task="multitask", check_files=False) for f in ("manifest.csv", "external.csv")]
    outcomes = pd.concat(frames, ignore_index=True)
    outcomes["subject_id"] = outcomes["subject_id"].astype(str)
    oracle = pd.read_csv(cohort / "oracle.csv", dtype={"subject_id": str})[["subject_id", "true_prob", "true_risk"]]
    return outcomes[["subject_id", "patient_id", "label", "time", "event"]].merge(oracle, on="subject_id", how="left")


def _predictions(folder: Path) -> pd.DataFrame | None:
    path = folder / "predictions.csv"
    if not path.is_file():
        return None
    return pd.read_csv(path, dtype={"subject_id": str, "split": str})


def _rows(pred: pd.DataFrame, split: str, score: str, outcomes: pd.DataFrame) -> pd.DataFrame:
    """One row per subject: the fold ensemble (fold -1) on test sets, pooled out-of-fold rows on val."""
    if score not in pred.columns:
        return pd.DataFrame(columns=["subject_id", "score"])
    rows = pred[pred["split"] == split]
    rows = rows[rows["fold"] == -1] if split in TEST_SETS else rows[rows["fold"] >= 0]
    rows = rows.groupby("subject_id", sort=False)[score].mean().rename("score").reset_index()
    return rows.merge(outcomes, on="subject_id", how="left")


def _auc_entry(y, score) -> dict:
    from finetune.metrics import auc_delong, try_metric
    y = np.asarray(y, dtype=int)
    entry = {"n": int(len(y)), "n_pos": int(y.sum())}
    if len(y) == 0:
        return entry | {"auc": None, "reason": "no predictions for this set"}
    res, reason = try_metric(auc_delong, y, np.asarray(score, float))
    if res is None:
        return entry | {"auc": None, "reason": reason}
    entry |= {"auc": res["auc"], "ci": None if res["ci_low"] is None else [res["ci_low"], res["ci_high"]]}
    if res.get("note"):
        entry["ci_reason"] = res["note"]
    return entry


def _cindex_entry(time_, event, risk, groups, n_boot: int, seed: int) -> dict:
    from finetune.metrics import bootstrap_ci, harrell_c, try_metric
    entry = {"n": int(len(time_)), "n_events": int(np.sum(event))}
    if len(time_) == 0:
        return entry | {"c_index": None, "reason": "no predictions for this set"}
    arrays = (np.asarray(time_, float), np.asarray(event).astype(bool), np.asarray(risk, float))
    c, reason = try_metric(harrell_c, *arrays)
    if c is None:
        return entry | {"c_index": None, "reason": reason}
    ci = bootstrap_ci(harrell_c, *arrays, n_boot=n_boot, seed=seed, groups=groups) if n_boot else (None, None)
    entry |= {"c_index": float(c), "ci": None if ci[0] is None else [ci[0], ci[1]]}
    if ci[0] is None:
        entry["ci_reason"] = "bootstrap disabled" if not n_boot else "too few resamples with a defined C-index"
    return entry


def _paired(ref: pd.DataFrame, other: pd.DataFrame) -> dict:
    from finetune.metrics import delong_paired_test, try_metric
    both = ref[["subject_id", "label", "score"]].merge(other[["subject_id", "score"]], on="subject_id",
                                                       suffixes=("_ref", ""))
    if both.empty:
        return {"p": None, "reason": "no common subjects"}
    res, reason = try_metric(delong_paired_test, both["label"].to_numpy(int), both["score_ref"].to_numpy(float),
                             both["score"].to_numpy(float))
    if res is None:
        return {"p": None, "n": int(len(both)), "reason": reason}
    return {"p": res["p"], "diff_vs_ref": -res["diff"], "n": res["n"]}


def evaluate_seed(preset: Preset, out: Path, seed: int) -> dict:
    sd = out / f"seed{seed}"
    outcomes = _outcomes(out)
    preds = {run.name: _predictions(sd / run.name) for run in finetune_runs(preset)}
    preds |= {f"radiomics_{t}": _predictions(sd / f"radiomics_{t}") for t in ("classification", "survival")}

    # The fusion is chosen on validation only: pooled out-of-fold val AUC of each fusion run.
    fusion_val = {}
    for f in preset.fusions:
        p = preds[f"ft_mim_{f}"]
        fusion_val[f] = _auc_entry(*_cols(_rows(p, "val", "prob", outcomes), "label", "score")) if p is not None \
            else {"auc": None, "reason": "run missing"}
    defined = {f: v["auc"] for f, v in fusion_val.items() if v.get("auc") is not None}
    chosen = max(defined, key=defined.get) if defined else preset.fusions[0]
    cls_run = CLS_RUN | {"multimodal": f"ft_mim_{chosen}"}
    cls_run |= {f"mim_{f}": f"ft_mim_{f}" for f in preset.fusions}  # every fusion, for transparency

    result = {"seed": seed, "chosen_fusion": chosen, "fusion_val_auc": fusion_val, "models": {}}
    ref_rows = {}
    for split in TEST_SETS:
        p = preds.get(cls_run[REFERENCE])
        ref_rows[split] = _rows(p, split, "prob", outcomes) if p is not None else None
    for model in list(MODELS) + [f"mim_{f}" for f in preset.fusions]:
        entry = {"run": {}}
        for split in ("val",) + TEST_SETS:
            e = {}
            if model == "oracle":
                ids = _oracle_ids(preds[cls_run[REFERENCE]], split)
                rows = outcomes[outcomes["subject_id"].isin(ids)].assign(score=lambda d: d["true_prob"])
                # survival models may use their own (event-stratified) splits: score the same people
                ids_s = _oracle_ids(preds.get(surv_run(REFERENCE, preset, chosen)), split)
                rows_s = outcomes[outcomes["subject_id"].isin(ids_s)].assign(score=lambda d: d["true_risk"])
                entry["run"] = {"classification": "oracle.csv true_prob", "survival": "oracle.csv true_risk"}
            else:
                run = cls_run.get(model)
                srun = surv_run(model, preset, chosen) if not model.startswith("mim_") else (
                    cls_run[model] if preset.survival == "multitask" else None)
                entry["run"] = {"classification": run, "survival": srun}
                p = preds.get(run)
                rows = _rows(p, split, "prob", outcomes) if p is not None else _rows(pd.DataFrame(), split, "prob", outcomes)
                ps = preds.get(srun) if srun else None
                rows_s = _rows(ps, split, "risk", outcomes) if ps is not None else None
            e["classification"] = _auc_entry(rows["label"], rows["score"]) if len(rows) else \
                {"auc": None, "reason": f"no {split} predictions (run {entry['run'].get('classification')} missing)"}
            if split in TEST_SETS and model != REFERENCE and len(rows) and ref_rows[split] is not None:
                e["classification"]["vs_" + REFERENCE] = _paired(ref_rows[split], rows)
            if rows_s is None or not len(rows_s):
                e["survival"] = {"c_index": None, "reason": "survival not run for this model"
                                 if entry["run"].get("survival") is None else f"no {split} risk predictions"}
            else:
                groups = rows_s["patient_id"].astype(str).to_numpy()
                e["survival"] = _cindex_entry(rows_s["time"], rows_s["event"], rows_s["score"], groups,
                                              preset.n_boot if split in TEST_SETS else 0, seed)
            entry[split] = e
        result["models"][model] = entry
    result["curves"] = _curves(preds, cls_run, outcomes)
    return result


def _cols(df: pd.DataFrame, *names):
    return [df[n].to_numpy() for n in names]


def _oracle_ids(ref_pred: pd.DataFrame | None, split: str) -> list[str]:
    """The subjects of a set, as the reference model saw them (the oracle scores the same people)."""
    if ref_pred is None:
        return []
    rows = ref_pred[ref_pred["split"] == split]
    return sorted(set(rows["subject_id"]))


def _curves(preds: dict, cls_run: dict, outcomes: pd.DataFrame) -> dict:
    """Per test set: {model: {"subject_id", "label", "score"}} for the ROC figures."""
    curves = {}
    for split in TEST_SETS:
        curves[split] = {}
        for model in MODELS:
            if model == "oracle":
                ids = _oracle_ids(preds.get(cls_run[REFERENCE]), split)
                rows = outcomes[outcomes["subject_id"].isin(ids)].assign(score=lambda d: d["true_prob"])
            else:
                p = preds.get(cls_run[model])
                if p is None:
                    continue
                rows = _rows(p, split, "prob", outcomes)
            curves[split][model] = {"label": rows["label"].astype(int).tolist(),
                                    "score": rows["score"].astype(float).tolist()}
    return curves


# ---------------------------------------------------------------- aggregation

def _summary(values: list) -> dict:
    v = np.array([x for x in values if x is not None], dtype=float)
    if len(v) == 0:
        return {"mean": None, "sd": None, "min": None, "max": None, "n_seeds": 0}
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else None,
            "min": float(v.min()), "max": float(v.max()), "n_seeds": int(len(v))}


def aggregate(preset: Preset, per_seed: list[dict]) -> dict:
    models = list(per_seed[0]["models"])
    summary = {}
    for model in models:
        summary[model] = {}
        for split in ("val",) + TEST_SETS:
            cls = [s["models"][model][split]["classification"] for s in per_seed]
            sur = [s["models"][model][split]["survival"] for s in per_seed]
            entry = {"auc": _summary([c.get("auc") for c in cls]), "c_index": _summary([c.get("c_index") for c in sur])}
            reasons = sorted({c["reason"] for c in cls if c.get("auc") is None and c.get("reason")})
            if reasons:
                entry["auc"]["reason"] = "; ".join(reasons)
            reasons = sorted({c["reason"] for c in sur if c.get("c_index") is None and c.get("reason")})
            if reasons:
                entry["c_index"]["reason"] = "; ".join(reasons)
            if any("vs_" + REFERENCE in c for c in cls):
                ps = [c.get("vs_" + REFERENCE, {}).get("p") for c in cls]
                defined = [p for p in ps if p is not None]
                entry["p_vs_" + REFERENCE] = {"per_seed": ps, "median": float(np.median(defined)) if defined else None}
            summary[model][split] = entry
    return {"summary": summary, "ordering": ordering_checks(summary)}


def _mean(summary: dict, model: str, split: str, metric: str = "auc"):
    return summary.get(model, {}).get(split, {}).get(metric, {}).get("mean")


def ordering_checks(summary: dict) -> dict:
    """The published study's qualitative claims, checked on the seed means (None where undefined)."""
    checks = {}

    def cmp(name, a, b, split, op=">", margin=0.0):
        va, vb = _mean(summary, a, split), _mean(summary, b, split)
        ok = None if va is None or vb is None else (va > vb + margin if op == ">" else va >= vb - margin)
        checks[f"{name} ({split})"] = {"holds": ok, "a": va, "b": vb, "claim": f"{a} {op} {b}"}

    for split in TEST_SETS:
        cmp("pretrained > radiomics", "mim", "radiomics", split)
        cmp("radiomics > scratch", "radiomics", "scratch", split)
        cmp("pretrained > scratch", "mim", "scratch", split)
        cmp("multimodal >= image-only", "multimodal", "mim", split, op=">=")
        cmp("MiM >= MAE", "mim", "mae", split, op=">=")
    learned = [m for m in MODELS if m != "oracle"]
    ext = {m: _mean(summary, m, "external") for m in learned if _mean(summary, m, "external") is not None}
    oracle = _mean(summary, "oracle", "external")
    if ext and oracle is not None:
        best = max(ext, key=ext.get)
        checks["best external AUC within 0.05 of the oracle"] = {
            "holds": bool(oracle - ext[best] <= 0.05), "a": ext[best], "b": oracle,
            "claim": f"best model ({best}) >= oracle - 0.05"}
    return checks


# ---------------------------------------------------------------- outputs

def _fmt(x, digits=3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _cell(seed_entries: list[dict], summary: dict, key: str) -> str:
    s = summary.get(key, {})
    if s.get("mean") is None:
        return f"n/a ({s.get('reason', 'undefined')})"
    if s["n_seeds"] == 1:
        e = seed_entries[0]
        ci = e.get("ci")
        return f"{s['mean']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
    return f"{s['mean']:.3f} ± {s['sd']:.3f} ({s['min']:.3f}–{s['max']:.3f})"


def _p_cell(entry: dict) -> str:
    p = entry.get("p_vs_" + REFERENCE)
    if not p:
        return "—"
    vals = ", ".join("n/a" if v is None else f"{v:.2g}" for v in p["per_seed"])
    return vals


def results_markdown(results: dict) -> str:
    preset, seeds, per_seed = results["preset"], results["seeds"], results["per_seed"]
    summ = results["summary"]
    models = [m for m in MODELS] + [m for m in summ if m not in MODELS]
    many = len(seeds) > 1
    how = "mean ± SD over seeds (min–max)" if many else "point [95% CI]"
    lines = [
        f"# SSL gain benchmark ({preset['name']} preset)",
        "",
        f"Command: `{results['command']}`  ",
        f"Machine: {results['machine']}  ",
        f"Date: {results['date']}; total stage time {results['total_stage_seconds'] / 60:.1f} min "
        f"(sum of stage wall times, including earlier runs this one resumed; "
        f"{results['total_stage_cpu_seconds'] / 60:.1f} CPU-min)",
        "",
        f"Cohort (synthetic, data.synth seed {preset['cohort_seed']}): {preset['n_unlabeled']} unlabelled volumes, "
        f"{preset['n_labeled']} labelled (site A, {int(preset['test_fraction'] * 100)}% held out, "
        f"{preset['folds']}-fold CV on the rest), {preset['n_external']} external (site B). Seeds {seeds} "
        f"(pretraining seed = split seed). {preset['note']}.",
        f"Survival: {results['survival_mode']}.",
        "",
        f"AUC on the fold-ensemble predictions ({how}; single seed: DeLong 95% CI). "
        f"p: paired DeLong against the MiM ViT, per seed. C-index: Harrell's, {how.replace('DeLong', 'bootstrap')}.",
        "",
        "| model | test AUC (published) | test AUC (measured) | p vs MiM | external AUC (published) "
        "| external AUC (measured) | p vs MiM | test C-index | external C-index |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m in models:
        if m not in summ:
            continue
        label, pub = MODELS[m] if m in MODELS else (f"MiM ViT + {m.split('_', 1)[-1]} fusion (every fusion run is listed)", None)
        if m == "multimodal":
            label += f" [chosen: {', '.join(s['chosen_fusion'] for s in per_seed)}]"
        cells = [label]
        for i, split in enumerate(TEST_SETS):
            seed_cls = [s["models"][m][split]["classification"] for s in per_seed]
            cells += [_fmt(pub[i]) if pub else "—", _cell(seed_cls, summ[m][split], "auc"), _p_cell(summ[m][split])]
        for split in TEST_SETS:
            seed_sur = [s["models"][m][split]["survival"] for s in per_seed]
            cells.append(_cell(seed_sur, summ[m][split], "c_index"))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Fusion chosen per seed on pooled out-of-fold validation AUC:", ""]
    for s in per_seed:
        vals = ", ".join(f"{f} {_fmt(v.get('auc'))}" for f, v in s["fusion_val_auc"].items())
        lines.append(f"- seed {s['seed']}: {vals} -> **{s['chosen_fusion']}**")
    lines += ["", "Per-seed AUCs with DeLong 95% CIs:", "",
              "| model | seed | test AUC [95% CI] | external AUC [95% CI] | val AUC (OOF) |",
              "| --- | --- | --- | --- | --- |"]
    for m in models:
        if m not in summ:
            continue
        for s in per_seed:
            e = s["models"][m]
            cells = []
            for split in TEST_SETS + ("val",):
                c = e[split]["classification"]
                cells.append(f"n/a ({c.get('reason')})" if c.get("auc") is None else
                             f"{c['auc']:.3f}" + (f" [{c['ci'][0]:.3f}, {c['ci'][1]:.3f}]" if c.get("ci") else ""))
            lines.append(f"| {m} | {s['seed']} | " + " | ".join(cells) + " |")
    lines += ["", "Qualitative claims of the published study, on the seed means:", ""]
    for name, c in results["ordering"].items():
        verdict = {True: "holds", False: "does not hold", None: "undefined"}[c["holds"]]
        lines.append(f"- {name}: **{verdict}** ({c['claim']}: {_fmt(c['a'])} vs {_fmt(c['b'])})")
    lines += ["", "Stage times (wall s / CPU-s, summed over seeds):", "",
              "| stage | wall s | CPU-s |", "| --- | --- | --- |"]
    groups: dict[str, list[float]] = {}
    for name, wall in results["stage_seconds"].items():
        key = name.split(" · ", 1)[-1].split(" (", 1)[0]
        g = groups.setdefault(key, [0.0, 0.0])
        g[0] += wall
        g[1] += results["stage_cpu_seconds"].get(name, 0.0)
    for key, (wall, cpu) in groups.items():
        lines.append(f"| {key} | {wall:.0f} | {cpu:.0f} |")
    lines += ["", f"Published numbers: {PUBLISHED_SOURCE}; measured ones come from a synthetic cohort "
              "and a much smaller model and budget, so only the ordering is comparable.", ""]
    return "\n".join(lines)


def roc_figures(results: dict, out: Path) -> list[str]:
    from finetune.figures import plot_roc
    first = results["per_seed"][0]
    written = []
    for split in TEST_SETS:
        curves = {}
        for model, c in first["curves"][split].items():
            name = model if model != "multimodal" else f"multimodal ({first['chosen_fusion']})"
            curves[name] = (np.asarray(c["label"], int), np.asarray(c["score"], float))
        path = out / f"roc_{split}.png"
        title = f"ROC, {'same-site test' if split == 'test' else 'external test'} (seed {first['seed']})"
        if curves:
            plot_roc(curves, path, ci_band=results["preset"]["roc_band_boot"] > 0,
                     n_boot=results["preset"]["roc_band_boot"], seed=first["seed"], title=title)
        else:
            from finetune.figures import _write_message
            _write_message(path, title, "no predictions")
        written.append(path.name)
    return written


def _machine() -> str:
    try:
        import torch
        dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
        tv = torch.__version__
    except Exception:  # pragma: no cover
        dev, tv = "unknown", "unknown"
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, {dev}, Python {platform.python_version()}, torch {tv}"


# ---------------------------------------------------------------- driver

def run_benchmark(preset: Preset, out: Path, command: str = "") -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages(out)
    log(f"preset {preset.name}: {preset.note}; seeds {list(preset.seeds)}; output {out}")
    check_same_preset(preset, out)

    stages.run("cohort", [out / "cohort" / "cohort.json"], lambda: make_cohort(preset, out))
    stages.run("prepare", [out / "cache" / "ssl_gain_prepared.json"], lambda: prepare_all(preset, out))
    stages.run("radiomics_features", [out / "radiomics" / "done.json"], lambda: radiomics_features(preset, out))

    per_seed = []
    for seed in preset.seeds:
        sd = out / f"seed{seed}"
        sd.mkdir(parents=True, exist_ok=True)
        tag = f"seed {seed} · "
        stages.run(tag + "splits", [sd / "splits.json"], lambda: make_splits(preset, out, seed, "label", sd / "splits.json"))
        if preset.survival == "separate":
            stages.run(tag + "splits_survival", [sd / "splits_survival.json"],
                       lambda: make_splits(preset, out, seed, "event", sd / "splits_survival.json"))
        for levels, name in ((preset_levels(preset), "mim"), (1, "mae")):
            stages.run(tag + f"pretrain_{name} ({preset.pretrain_steps} steps)",
                       [sd / f"pretrain_{name}" / "encoder" / "model.safetensors"],
                       lambda lv=levels: run_pretrain(preset, out, seed, lv))
        for run in finetune_runs(preset):
            stages.run(tag + f"{run.name} ({run.task})", [sd / run.name / "predictions.csv", sd / run.name / "metrics.json"],
                       lambda r=run: run_finetune(preset, out, seed, r))
        for task in ("classification", "survival"):
            stages.run(tag + f"radiomics_{task}", [sd / f"radiomics_{task}" / "predictions.csv"],
                       lambda t=task: radiomics_predict(preset, out, seed, t))
        res = stages.run(tag + "evaluate", [sd / "evaluation.json"], lambda: evaluate_seed(preset, out, seed),
                         force=stages.ran_any(tag) or stages.status.get("radiomics_features") == "ran")
        if res is None:
            res = json.loads((sd / "evaluation.json").read_text())
        else:
            write_json(sd / "evaluation.json", res)
        per_seed.append(res)

    def finish():
        results = {
            "benchmark": "ssl_gain", "command": command or "benchmarks.ssl_gain.run_benchmark",
            "date": datetime.now().strftime("%Y-%m-%d %H:%M"), "machine": _machine(), "preset": asdict(preset),
            "seeds": list(preset.seeds), "models": {m: MODELS[m][0] for m in MODELS},
            "published": {m: {"test": p[0], "external": p[1]} for m, (_, p) in MODELS.items() if p},
            "survival_mode": ("multitask fine-tuning (BCE + Cox) of every ViT / clinical model; radiomics: "
                              "separate Cox model; all on the classification splits")
            if preset.survival == "multitask" else
            ("classification fine-tuning for every model; separate survival fine-tuning of mim, scratch and "
             "clinical_only (and a radiomics Cox model) on event-stratified splits"),
            "per_seed": per_seed, **aggregate(preset, per_seed),
            "stage_seconds": stages.times, "total_stage_seconds": round(sum(stages.times.values()), 1),
            "stage_cpu_seconds": stages.cpu, "total_stage_cpu_seconds": round(sum(stages.cpu.values()), 1),
        }
        results["figures"] = roc_figures(results, out)
        write_json(out / "results.json", _jsonable(results))
        write_text(out / "results.md", results_markdown(results))
        return results

    outputs = [out / "results.json", out / "results.md", out / "roc_test.png", out / "roc_external.png"]
    stages.run("report", outputs, finish, force=stages.ran_any())
    results = json.loads((out / "results.json").read_text())
    results["stage_status"] = dict(stages.status)
    write_json(out / "last_invocation.json", {"stage_status": stages.status, "command": command,
                                              "date": datetime.now().strftime("%Y-%m-%d %H:%M")})
    log(f"results: {out / 'results.md'}, {out / 'results.json'}, {out / 'roc_test.png'}, {out / 'roc_external.png'}")
    return results


def check_same_preset(preset: Preset, out: Path) -> None:
    """A rerun may add seeds, but must not mix stage outputs of different presets in one folder."""
    path = out / "preset.json"
    now = json.loads(json.dumps(asdict(preset)))
    if path.is_file():
        before = json.loads(path.read_text())
        diff = sorted(k for k in set(now) | set(before) if k != "seeds" and now.get(k) != before.get(k))
        if diff:
            raise InputError(f"--out {out}: holds a run of another preset (differs in {diff}); "
                             f"use a new --out folder or delete this one")
    write_json(path, now)


def preset_levels(preset: Preset) -> int:
    from data.config import load_config
    from pretrain.train import PretrainConfig
    return load_config(PretrainConfig, LAUNCH / preset.pretrain_config).model.masks.levels


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def show(preset: Preset, out: Path) -> None:
    """Print the resolved preset and the configs every stage would use (builds them, so they are checked)."""
    from data.config import to_dict
    print(json.dumps(asdict(preset), indent=2))
    for levels in (preset_levels(preset), 1):
        cfg = pretrain_config(preset, out, preset.seeds[0], levels)
        print(f"pretrain (levels={levels}):", json.dumps(to_dict(cfg)))
    for run in finetune_runs(preset):
        cfg = run_config(preset, out, preset.seeds[0], run)
        print(f"{run.name}:", json.dumps({k: v for k, v in to_dict(cfg).items() if k not in ("model", "prep", "optim")}))


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.ssl_gain", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", required=True, choices=sorted(PRESETS))
    ap.add_argument("--out", required=True, help="output folder (a rerun skips the stages already done there)")
    ap.add_argument("--seeds", type=int, nargs="+", help="seeds (pretraining + splits); default: the preset's")
    ap.add_argument("--toy", action="store_true", help="tiny cohort and budget: plumbing only (tests)")
    ap.add_argument("--show", action="store_true", help="print the resolved preset and stage configs, then exit")
    return ap.parse_args(argv)


@cli_entry
def main(argv=None) -> int:
    args = parse_args(argv)
    preset = resolve_preset(args.preset, args.toy, args.seeds)
    out = Path(args.out)
    if args.show:
        show(preset, out)
        return 0
    command = "python -m benchmarks.ssl_gain " + " ".join(sys.argv[1:] if argv is None else argv)
    run_benchmark(preset, out, command)
    return 0

