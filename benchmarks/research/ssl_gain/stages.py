"""The benchmark's stages: config builders, one function per stage, the skip-if-done bookkeeping, and the driver."""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, replace
from datetime import datetime
from pathlib import Path

import pandas as pd

from benchmarks.research.ssl_gain.evaluation import evaluate_seed
from benchmarks.research.ssl_gain.label_curve import (baseline_run, evaluate_label_curve, hybrid_run, label_runs,
                                                      make_subset, run_name, subset_paths)
from benchmarks.research.ssl_gain.paired import paired_comparisons
from benchmarks.research.ssl_gain.presets import (BASELINES, BINS, EVAL_SETS, LARGE_DIR, LARGE_PREFIX, LARGE_SEED,
                                                  RING_MM, Preset, Run, finetune_runs, large_manifests)
from benchmarks.research.ssl_gain.report import write_results
from core.atomic import atomic_path, write_json
from core.errors import InputError
from models.tasks import CLASSIFICATION, MULTITASK, SURVIVAL

REPO = Path(__file__).resolve().parents[3]
LAUNCH = REPO / "launch"

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
    from core.config import load_config
    from pretrain.config import PretrainConfig
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
                    splits: Path, manifest: Path | None = None):
    from core.config import load_config
    from finetune.config import FinetuneConfig
    cfg = load_config(FinetuneConfig, LAUNCH / preset.finetune_config)
    cohort = out / "cohort"
    if pretrained and preset.pretrained_encoder_blr:
        cfg = replace(cfg, encoder_blr=preset.pretrained_encoder_blr)
    return replace(cfg, manifest=str(manifest or cohort / "manifest.csv"), external=str(cohort / "external.csv"),
                   pretrained=pretrained, model=replace(cfg.model, task=task, fusion=fusion),
                   output_dir=str(out / f"seed{seed}" / name), cache_dir=str(out / "cache"), splits=str(splits),
                   folds=preset.folds, test_fraction=preset.test_fraction, epochs=preset.epochs,
                   patience=preset.patience, seed=seed, n_boot=preset.finetune_n_boot, explain=0,
                   figures=preset.finetune_figures, hybrid=False,  # the hybrids are stages (hybrid_predict)
                   eval_sets=[f"{name}={csv}" for name, csv in large_manifests(preset, out).items()])


def prep_config(preset: Preset):
    """The preprocessing every stage shares (pretraining's; fine-tuning takes it from the encoder)."""
    from core.config import load_config
    from finetune.config import FinetuneConfig
    from pretrain.config import PretrainConfig
    pre = load_config(PretrainConfig, LAUNCH / preset.pretrain_config).prep
    fin = load_config(FinetuneConfig, LAUNCH / preset.finetune_config).prep
    if pre != fin:  # scratch and radiomics would then see other voxels than the pretrained models
        raise InputError(f"preset {preset.name}: {preset.pretrain_config} and {preset.finetune_config} "
                         f"preprocess differently ({pre} vs {fin})")
    return pre



# ---------------------------------------------------------------- stages

def make_cohort(preset: Preset, out: Path) -> None:
    from data.synth import generate_cohort
    generate_cohort(out / "cohort", preset.n_unlabeled, preset.n_labeled, preset.n_external, seed=preset.cohort_seed,
                    workers=preset.workers, overwrite=(out / "cohort" / "cohort.json").is_file())


def make_large_sets(preset: Preset, out: Path, params=None) -> None:
    """The large evaluation sets: one more draw of the generator (site A and site B), its own seed and
    folder; ids get LARGE_PREFIX, since fine-tuning refuses held-out ids that are also training ids.
    `params`: data.synth CohortParams (default: the generator's defaults)."""
    from data.synth import generate_cohort
    folder = out / LARGE_DIR
    generate_cohort(folder, 0, preset.n_test_large, preset.n_external_large, seed=LARGE_SEED,
                    workers=preset.workers, overwrite=(folder / "cohort.json").is_file(), params=params)
    for target, src in (("test_large.csv", "manifest.csv"), ("external_large.csv", "external.csv"),
                        ("oracle_large.csv", "oracle.csv")):
        df = pd.read_csv(folder / src, dtype=str, keep_default_na=False)  # every cell kept as written
        for col in ("subject_id", "patient_id"):
            df[col] = LARGE_PREFIX + df[col]
        with atomic_path(folder / target) as tmp:  # image paths stay relative to this folder
            df.to_csv(tmp, index=False, lineterminator="\n")


def prepare_all(preset: Preset, out: Path) -> None:
    """Fill the shared cache once, in parallel; every later stage then only hits the cache."""
    from data.manifest import read_any
    from data.prepare import prepare_table
    prep, cohort, cache = prep_config(preset), out / "cohort", out / "cache"
    workers = preset.workers if preset.workers > 1 else 0
    for csv in [cohort / "manifest.csv", cohort / "external.csv", *large_manifests(preset, out).values()]:
        prepare_table(MULTITASK.read_manifest(csv), prep, cache, workers=workers)
    if preset.n_unlabeled:
        table = read_any(cohort / "unlabeled")  # exactly what pretraining reads
        prepare_table(table.drop(columns=[c for c in ("mask",) if c in table.columns]), prep, cache,
                      require_lesion=False, workers=workers)
    write_json(cache / "ssl_gain_prepared.json", {"prep": asdict(prep), "preset": preset.name})


def make_splits(preset: Preset, out: Path, seed: int, stratify: str, path: Path) -> None:
    from data.splits import load_or_make_splits
    df = MULTITASK.read_manifest(out / "cohort" / "manifest.csv")
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
    manifest = None
    if run.splits.startswith("n"):  # a label-efficiency run on an n-patient subset (label_curve.py)
        manifest, splits = subset_paths(out, seed, int(run.splits[1:]))
    else:
        splits = sd / ("splits.json" if run.splits == "cls" else "splits_survival.json")
    return finetune_config(preset, out, seed, run.name, pretrained=pretrained, fusion=run.fusion, task=run.task,
                           splits=splits, manifest=manifest)


def run_finetune(preset: Preset, out: Path, seed: int, run: Run) -> None:
    from finetune.train import run as finetune
    finetune(run_config(preset, out, seed, run))


def radiomics_features(preset: Preset, out: Path) -> None:
    from data.prepare import prepare_table
    from finetune.baselines.radiomics import extract_table
    prep, cohort, cache = prep_config(preset), out / "cohort", out / "cache"
    target = out / "radiomics" / "features.csv"
    target.parent.mkdir(parents=True, exist_ok=True)
    sets = {"internal": cohort / "manifest.csv", "external": cohort / "external.csv"} | large_manifests(preset, out)
    for name, csv in sets.items():
        df, _ = prepare_table(MULTITASK.read_manifest(csv), prep, cache, progress=False)
        extract_table(df, name, RING_MM, BINS, target)
    write_json(target.parent / "done.json", {"ring_mm": RING_MM, "bins": BINS})


def task_splits(preset: Preset, out: Path, seed: int, task: str, n: int | None = None) -> Path:
    """The splits file a model of `task` is fitted on: the n-patient subset's, or the seed's (survival's own
    under a preset with separate survival runs)."""
    if n:
        return subset_paths(out, seed, n)[1]
    separate = task == SURVIVAL.name and preset.survival == "separate"
    return out / f"seed{seed}" / ("splits_survival.json" if separate else "splits.json")


def baseline_predict(preset: Preset, out: Path, seed: int, task: str, model: str, n: int | None = None) -> None:
    """One baseline (presets.BASELINES) on one task: fold models and the all-rows model, as radiomics' CLI fits them.
    n: on the label curve's n-patient subset (its splits name only the subset and the seed's test set)."""
    from data.manifest import clinical_columns
    from finetune.baselines.clinical_models import make_baseline
    from finetune.baselines.radiomics import predict_splits
    feats = pd.read_csv(out / "radiomics" / "features.csv", dtype={"subject_id": str})
    key_cols = [c for c in ("cohort", "subject_id", "cache_image", "extraction") if c in feats.columns]
    manifests = {"internal": out / "cohort" / "manifest.csv", "external": out / "cohort" / "external.csv"}
    manifests |= large_manifests(preset, out)
    tables = {name: MULTITASK.read_manifest(csv) for name, csv in manifests.items()}
    clinical = clinical_columns(tables["internal"], prep_config(preset))
    baseline = BASELINES[model]

    def table(cohort):
        rows = feats[feats["cohort"] == cohort]
        radiomics = rows.drop(columns=key_cols).set_index(pd.Index(rows["subject_id"].astype(str), name="subject_id"))
        df = tables[cohort]
        values = df.set_index(pd.Index(df["subject_id"].astype(str), name="subject_id"))[clinical]
        if baseline == "radiomics":
            return radiomics
        return values if baseline == "clinical_only" else radiomics.join(values, how="left")

    internal = table("internal")
    targets = tables["internal"].set_index(tables["internal"]["subject_id"].astype(str))[["label", "time", "event"]]
    sd = out / f"seed{seed}"
    split_file = task_splits(preset, out, seed, task, n)
    splits = json.loads(split_file.read_text())
    large = {name: table(name) for name in large_manifests(preset, out)}
    folder = sd / baseline_run(model, task, n)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "predictions.csv").unlink(missing_ok=True)  # never a former fit's rows beside this one's done.json
    try:
        pred, params = predict_splits(internal, targets, splits, task, seed, table("external"), eval_sets=large,
                                      make_model=make_baseline(baseline, clinical))
    except InputError as e:
        if not n:  # the whole pool must fit; a small subset's folds may hold too few of a class or event
            raise
        log(f"{folder.name}: not fitted: {e}")
        write_json(folder / "done.json", {"fitted": False, "reason": str(e)})
        return
    write_json(folder / "baseline.json", {"baseline": baseline, "task": task, "seed": seed, "splits": str(split_file),
                                          "clinical_columns": clinical, "n_features": internal.shape[1],
                                          "models": params})
    with atomic_path(folder / "predictions.csv") as tmp:
        pred.to_csv(tmp, index=False)
    if n:
        write_json(folder / "done.json", {"fitted": True})


def hybrid_predict(preset: Preset, out: Path, seed: int, task: str, n: int | None = None) -> None:
    """The hybrid (finetune.baselines.hybrid) over the MiM ViT's image score and the task's first-level
    baselines, all trained on the same n patients; each fold's val rows stacked by a stacker fitted on the
    other folds'. Where the val rows are too few to fit a stacker (the toy size), done.json says why."""
    from benchmarks.research.ssl_gain.evaluation import _outcomes
    from finetune.baselines.hybrid import FIRST_LEVEL, IMAGE, stack_predictions, val_folds
    from finetune.evaluate import read_predictions
    sd = out / f"seed{seed}"
    ours = {baseline: model for model, baseline in BASELINES.items()}  # finetune.baselines name -> ssl_gain model
    separate = task == SURVIVAL.name and preset.survival == "separate"  # survival has its own runs and splits
    split_file = task_splits(preset, out, seed, task, n)
    splits = json.loads(split_file.read_text())
    folder = sd / hybrid_run(task, n)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "predictions.csv").unlink(missing_ok=True)  # never a former fit's rows beside this one's done.json
    image_run = "surv_mim_none" if separate and not n else run_name("mim", n)
    try:
        if separate and n:
            raise InputError(f"the {n}-patient runs are classification-only under a separate survival preset")
        preds = {IMAGE: read_predictions(sd / image_run / "predictions.csv")}
        preds |= {b: read_predictions(sd / baseline_run(ours[b], task, n) / "predictions.csv")
                  for b in FIRST_LEVEL[task]}  # a subset's baseline that could not be fitted has none
        held_out = [s for s in EVAL_SETS if (preds[IMAGE]["split"] == s).any()]
        pred, stacker, per_fold = stack_predictions(preds, _outcomes(preset, out), task, held_out, seed=seed,
                                                    val_folds=val_folds(splits))
    except InputError as e:  # too few out-of-fold rows of a class or with an event, or a first level missing
        log(f"{folder.name}: not fitted: {e}")
        write_json(folder / "done.json", {"fitted": False, "reason": str(e)})
        return
    with atomic_path(folder / "predictions.csv") as tmp:
        pred.to_csv(tmp, index=False)
    stacker.save(folder / "stacker.json")
    write_json(folder / "done.json", {"fitted": True, "image_run": image_run, "splits": str(split_file),
                                      "first_level": list(preds), "folds": per_fold})



# ---------------------------------------------------------------- driver

def run_benchmark(preset: Preset, out: Path, command: str = "") -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages(out)
    log(f"preset {preset.name}: {preset.note}; seeds {list(preset.seeds)}; output {out}")
    check_same_preset(preset, out)

    stages.run("cohort", [out / "cohort" / "cohort.json"], lambda: make_cohort(preset, out))
    if large_manifests(preset, out):
        stages.run("cohort_large", [*large_manifests(preset, out).values(), out / LARGE_DIR / "oracle_large.csv"],
                   lambda: make_large_sets(preset, out))
    stages.run("prepare", [out / "cache" / "ssl_gain_prepared.json"], lambda: prepare_all(preset, out))
    stages.run("radiomics_features", [out / "radiomics" / "done.json"], lambda: radiomics_features(preset, out))
    per_seed = [run_seed(preset, out, seed, stages) for seed in preset.seeds]

    paired = stages.run("paired_bootstrap", [out / "paired.json"], lambda: paired_comparisons(preset, out),
                        force=stages.ran_any())
    if paired is not None:
        write_json(out / "paired.json", paired)
    paired = json.loads((out / "paired.json").read_text())
    if preset.label_sizes:
        curve = stages.run("label_curve", [out / "label_curve.json", out / "label_curve.png"],
                           lambda: evaluate_label_curve(preset, out), force=stages.ran_any())
        if curve is not None:
            write_json(out / "label_curve.json", curve)
    outputs = [out / "results.json", out / "results.md", *(out / f"roc_{s}.png" for s in EVAL_SETS)]
    stages.run("report", outputs,
               lambda: write_results(preset, per_seed, paired, stages.times, stages.cpu, command, out),
               force=stages.ran_any())
    results = json.loads((out / "results.json").read_text())
    results["stage_status"] = dict(stages.status)
    write_json(out / "last_invocation.json", {"stage_status": stages.status, "command": command,
                                              "date": datetime.now().strftime("%Y-%m-%d %H:%M")})
    log(f"results: {out / 'results.md'}, {out / 'results.json'}, {out}/roc_*.png")
    return results


def run_seed(preset: Preset, out: Path, seed: int, stages: Stages) -> dict:
    """Every stage of one seed (splits, both pretrainings, all fine-tuning and radiomics runs), then its evaluation."""
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
    for n in preset.label_sizes:
        stages.run(tag + f"label subset n{n}", list(subset_paths(out, seed, n)),
                   lambda k=n: make_subset(preset, out, seed, k))
    for run in finetune_runs(preset) + label_runs(preset):
        stages.run(tag + f"{run.name} ({run.task})", [sd / run.name / "predictions.csv", sd / run.name / "metrics.json"],
                   lambda r=run: run_finetune(preset, out, seed, r))
    for n in (None, *preset.label_sizes):  # the whole pool, then each label-curve subset
        for model in BASELINES:
            for task in (CLASSIFICATION.name, SURVIVAL.name):
                name = baseline_run(model, task, n)
                stages.run(tag + name, [sd / name / ("done.json" if n else "predictions.csv")],
                           lambda m=model, t=task, k=n: baseline_predict(preset, out, seed, t, m, k),
                           force=bool(n) and stages.status.get(tag + f"label subset n{n}") == "ran")
        for task in (CLASSIFICATION.name, SURVIVAL.name):
            name = hybrid_run(task, n)
            inputs_ran = stages.ran_any(tag + run_name("mim", n)) or stages.ran_any(tag + "surv_mim_none") or any(
                stages.status.get(tag + baseline_run(m, task, n)) == "ran" for m in BASELINES)
            stages.run(tag + name, [sd / name / "done.json"], lambda t=task, k=n: hybrid_predict(preset, out, seed, t, k),
                       force=inputs_ran)
    # Re-evaluate whenever anything it reads was (re)made in this invocation.
    res = stages.run(tag + "evaluate", [sd / "evaluation.json", sd / "scores.csv"],
                     lambda: evaluate_seed(preset, out, seed),
                     force=stages.ran_any(tag) or stages.status.get("radiomics_features") == "ran")
    if res is None:
        return json.loads((sd / "evaluation.json").read_text())
    write_json(sd / "evaluation.json", res)
    return res


# Preset fields a rerun may change in a used folder: more seeds, and whether the fine-tuning runs draw their own
# figures (no number depends on it, and folders written before the field existed lack it).
FREE_FIELDS = ("seeds", "finetune_figures")


def check_same_preset(preset: Preset, out: Path) -> None:
    """A rerun may add seeds, but must not mix stage outputs of different presets in one folder."""
    path = out / "preset.json"
    now = json.loads(json.dumps(asdict(preset)))
    if path.is_file():
        before = json.loads(path.read_text())
        diff = sorted(k for k in set(now) | set(before) if k not in FREE_FIELDS and now.get(k) != before.get(k))
        if diff:
            raise InputError(f"--out {out}: holds a run of another preset (differs in {diff}); "
                             f"use a new --out folder or delete this one")
    write_json(path, now)


def preset_levels(preset: Preset) -> int:
    from core.config import load_config
    from pretrain.config import PretrainConfig
    return load_config(PretrainConfig, LAUNCH / preset.pretrain_config).model.masks.levels

