"""Which fine-tuning recipe keeps what pretraining learned? Measured on a development cohort only.

    python -m benchmarks.research.finetune_recipe --out runs/recipe [--seeds 0 1] [--variants base mae_rate ...]
        [--n_labeled 30] [--encoder RUN/encoder]

A development cohort of its own (generator seed 4242, never used by ssl_gain, the probe or any test
set): unlabelled volumes for pretraining, 109 labelled site-A patients for cross-validated
fine-tuning (3 folds), and a 300-patient site-A development set `dev` that no run trains on. One
MiM encoder (launch/pretrain_cpu.yaml at the ssl_gain cpu preset's 1000 steps) is pretrained per
seed; each recipe variant fine-tunes it, and the scratch ViT, on identical splits. The table gives
out-of-fold validation AUC and the fold ensemble's AUC / Harrell's C on `dev`. Choices made here
carry to ssl_gain's presets; ssl_gain's own test sets are never looked at.

Few labels: `--n_labeled N` fine-tunes on N of the 109 labelled patients instead (a nested, stratified
patient subset fixed by the seed, data.splits.nested_patient_subsets), all of them in the 3 CV folds
(no held-out test set: `dev` is the evaluation), so about 2N/3 patients train each fold. `--encoder`
fine-tunes a given pretrained encoder (e.g. launch/pretrain_cpu.yaml's full 5000 steps) in place of
the per-seed 1000-step one; its runs are named after it.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import pandas as pd

from core.atomic import atomic_path, write_json
from models.tasks import LABEL_REPORT, MULTITASK, SURVIVAL_REPORT

ROOT = Path(__file__).resolve().parents[2]
COHORT_SEED, DEV_SEED = 4242, 4243
N_UNLABELED, N_LABELED, N_DEV, STEPS, EPOCHS = 150, 109, 300, 1000, 20

# name -> FinetuneConfig overrides (model.* keys set on the model config)
VARIANTS: dict[str, dict] = {
    "base": {},                                                     # the pre-recipe defaults
    "mae_rate": {"encoder_blr": 5e-3, "warmup_epochs": 2},          # encoder 1.6e-4 at batch 8, head 1e-3
    "lp_ft": {"encoder_blr": 5e-3, "warmup_epochs": 2, "lp_epochs": 5},
    "mask_pool": {"encoder_blr": 5e-3, "warmup_epochs": 2, "model.pool": "mask"},
    "attn_pool": {"encoder_blr": 5e-3, "warmup_epochs": 2, "model.pool": "attention"},
    "average": {"encoder_blr": 5e-3, "warmup_epochs": 2, "epoch_choice": "average", "min_epochs": 5},
    "last": {"encoder_blr": 5e-3, "warmup_epochs": 2, "epoch_choice": "last"},
    # second round, on the first round's clear winner (mask pooling)
    "mask_average": {"encoder_blr": 5e-3, "warmup_epochs": 2, "model.pool": "mask", "epoch_choice": "average",
                     "min_epochs": 5},
    "mask_lp_ft": {"encoder_blr": 5e-3, "warmup_epochs": 2, "model.pool": "mask", "lp_epochs": 5},
    "mask_base_rate": {"model.pool": "mask"},
    # few labels (--n_labeled): "base" is now launch/finetune_tiny_cpu.yaml itself, which holds the recipe
    # (mask pooling, encoder at blr 5e-3, 2 warm-up epochs, mean of the weights from epoch 5); each row
    # below changes only what it names on top of it.
    "bn": {"model.head_norm": "batchnorm"},          # MAE's linear-probe BatchNorm (no affine) before the head
    "ln": {"model.head_norm": "layernorm"},
    "rate10": {"encoder_blr": 5e-2},                 # the encoder at 10x the MAE rule's rate
    "bn_rate10": {"model.head_norm": "batchnorm", "encoder_blr": 5e-2},
    "recipe_lp_ft": {"lp_epochs": 5},
    "bn_lp_ft": {"model.head_norm": "batchnorm", "lp_epochs": 5},
    "mean_pool": {"model.pool": "mean"},
    "bn_mean_pool": {"model.head_norm": "batchnorm", "model.pool": "mean"},
    "frozen": {"freeze_encoder": True},              # a linear read-out of the frozen features
    "bn_frozen": {"model.head_norm": "batchnorm", "freeze_encoder": True},
}


def make_cohorts(out: Path) -> Path:
    """The development cohort and its `dev` set (ids prefixed "D", so they never clash)."""
    from data.synth import generate_cohort
    if not (out / "cohort" / "cohort.json").is_file():
        generate_cohort(out / "cohort", N_UNLABELED, N_LABELED, 0, seed=COHORT_SEED, workers=2)
    dev_csv = out / "dev_cohort" / "dev.csv"
    if not dev_csv.is_file():
        if not (out / "dev_cohort" / "cohort.json").is_file():
            generate_cohort(out / "dev_cohort", 0, N_DEV, 0, seed=DEV_SEED, workers=2)
        df = pd.read_csv(out / "dev_cohort" / "manifest.csv", dtype=str, keep_default_na=False)
        for col in ("subject_id", "patient_id"):
            df[col] = "D" + df[col]
        with atomic_path(dev_csv) as tmp:
            df.to_csv(tmp, index=False, lineterminator="\n")
    return dev_csv


def pretrain(out: Path, seed: int) -> str:
    from core.config import load_config
    from pretrain.config import PretrainConfig
    from pretrain.train import train
    folder = out / f"seed{seed}" / "pretrain_mim"
    if not (folder / "encoder" / "model.safetensors").is_file():
        cfg = load_config(PretrainConfig, ROOT / "launch" / "pretrain_cpu.yaml")
        cfg = replace(cfg, data=str(out / "cohort" / "unlabeled"), cache_dir=str(out / "cache"),
                      output_dir=str(folder), max_steps=STEPS, seed=seed, resume="auto", preview_every=0,
                      ckpt_every=250)
        cfg.optim.warmup_steps = min(cfg.optim.warmup_steps, STEPS // 10)
        train(cfg)
    return str(folder / "encoder")


def labelled_subset(out: Path, seed: int, n_labeled: int) -> Path:
    """A manifest of n_labeled of the cohort's labelled patients (nested across sizes, fixed by the seed),
    beside the full one so its relative image paths still hold."""
    from data.splits import nested_patient_subsets
    path = out / "cohort" / f"manifest_n{n_labeled}_seed{seed}.csv"
    if not path.is_file():
        df = pd.read_csv(out / "cohort" / "manifest.csv", dtype=str, keep_default_na=False)
        keep = set(nested_patient_subsets(df.assign(label=df["label"].astype(int)), [n_labeled], seed=seed)[n_labeled])
        with atomic_path(path) as tmp:
            df[df["subject_id"].isin(keep)].to_csv(tmp, index=False, lineterminator="\n")
    return path


def finetune(out: Path, seed: int, name: str, pretrained: str, dev_csv: Path, overrides: dict,
             n_labeled: int = 0) -> dict:
    from core.config import load_config
    from finetune.config import FinetuneConfig
    from finetune.train import run
    cfg = load_config(FinetuneConfig, ROOT / "launch" / "finetune_tiny_cpu.yaml")
    manifest = labelled_subset(out, seed, n_labeled) if n_labeled else out / "cohort" / "manifest.csv"
    suffix = f"_n{n_labeled}" if n_labeled else ""
    cfg = replace(cfg, manifest=str(manifest), pretrained=pretrained,
                  model=replace(cfg.model, task=MULTITASK.name, fusion="none"),
                  output_dir=str(out / f"seed{seed}" / name), cache_dir=str(out / "cache"),
                  splits=str(out / f"seed{seed}" / f"splits{suffix}.json"), folds=3, epochs=EPOCHS, patience=6,
                  seed=seed, n_boot=0, explain=0, eval_sets=[f"dev={dev_csv}"],
                  test_fraction=0.0 if n_labeled else cfg.test_fraction)
    for key, value in overrides.items():
        target, field_name = (cfg.model, key[6:]) if key.startswith("model.") else (cfg, key)
        setattr(target, field_name, value)
    metrics_path = Path(cfg.output_dir) / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else run(cfg)
    split = metrics["splits"]
    return {"oof_val_auc": split["val"][LABEL_REPORT]["auc"], "dev_auc": split["dev"][LABEL_REPORT]["auc"],
            "dev_c": split["dev"][SURVIVAL_REPORT]["harrell_c"], "kept": sorted({f.get("kept", "") for f in metrics["folds"]})}


def dev_paired(out: Path, seed: int, run_a: str, run_b: str) -> dict | None:
    """Paired DeLong on the dev set, fold ensemble of run_a minus run_b: difference, 95% CI from the DeLong
    variance, p; None when run_b has not run."""
    import math

    from finetune.metrics import delong_paired_test

    def dev(name):
        pred = pd.read_csv(out / f"seed{seed}" / name / "predictions.csv", dtype={"subject_id": str})
        return pred[(pred.split == "dev") & (pred.fold == -1)].set_index("subject_id")["prob"]

    if not (out / f"seed{seed}" / run_b / "predictions.csv").is_file():
        return None
    labels = pd.read_csv(out / "dev_cohort" / "dev.csv", dtype={"subject_id": str}).set_index("subject_id")["label"]
    a, b = dev(run_a), dev(run_b)
    ids = a.index.intersection(b.index)
    t = delong_paired_test(labels.loc[ids].astype(int).to_numpy(), a.loc[ids].to_numpy(), b.loc[ids].to_numpy())
    half = 1.96 * math.sqrt(t["var_diff"])
    return {"diff": t["diff"], "ci": [t["diff"] - half, t["diff"] + half], "p": t["p"]}


def comparisons(out: Path, seed: int, model: str, variant: str, suffix: str = "") -> dict:
    """This run against the same model's `base` run, and (a pretrained model) against scratch's base run
    of the same labelled patients: the question few labels ask."""
    run = f"{model}_{variant}{suffix}"
    res = {}
    if variant != "base" and (vs := dev_paired(out, seed, run, f"{model}_base{suffix}")):
        res |= {"dev_auc_minus_base": vs["diff"], "ci": vs["ci"], "p": vs["p"]}
    if model != "scratch" and (vs := dev_paired(out, seed, run, f"scratch_base{suffix}")):
        res |= {"dev_auc_minus_scratch": vs["diff"], "ci_vs_scratch": vs["ci"], "p_vs_scratch": vs["p"]}
    return res


def merge_rows(path: Path, rows: list[dict], command: str) -> dict:
    """results.json after this invocation: earlier invocations' rows are kept, and a (seed, model, variant)
    run again replaces its old row, so results.json holds every row the RESULTS table cites."""
    def key(r: dict) -> tuple:
        return r["seed"], r["model"], r["variant"], r.get("n_labeled", 0)

    old = json.loads(path.read_text()) if path.is_file() else {}
    fresh = {key(r) for r in rows}
    kept = [r for r in old.get("rows", []) if key(r) not in fresh]
    earlier = old.get("commands") or ([old["command"]] if "command" in old else [])  # older files: one "command"
    commands = [c for c in earlier if c != command]
    return {"rows": kept + rows, "variants": VARIANTS, "commands": commands + [command]}


def encoder_tag(folder: str) -> str:
    """A short name for an encoder folder: its run folder's name for RUN/encoder, else its own name."""
    path = Path(folder).resolve()
    return path.parent.name if path.name == "encoder" else path.name


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.research.finetune_recipe", allow_abbrev=False,
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output folder (a rerun reuses finished runs; results.json "
                    "gathers the rows of every invocation)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="pretraining + split seeds")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                    help="recipe variants to run (each for MiM and for scratch)")
    ap.add_argument("--n_labeled", type=int, default=0,
                    help="fine-tune on this many of the 109 labelled patients (nested subsets fixed by the seed; "
                         "all in the 3 CV folds); 0: all of them, 20%% held out as before")
    ap.add_argument("--encoder", default="", help="a pretrained encoder folder to fine-tune in place of the per-seed "
                    "1000-step MiM one; its rows are named after its run folder")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    dev_csv = make_cohorts(out)
    suffix = f"_n{args.n_labeled}" if args.n_labeled else ""
    mim = f"mim@{encoder_tag(args.encoder)}" if args.encoder else "mim"
    rows = []
    for seed in args.seeds:
        encoder = str(Path(args.encoder).resolve()) if args.encoder else pretrain(out, seed)
        for variant in args.variants:
            for model, pre in (("scratch", ""), (mim, encoder)):  # scratch first: MiM rows compare with it
                res = finetune(out, seed, f"{model}_{variant}{suffix}", pre, dev_csv, VARIANTS[variant],
                               args.n_labeled)
                rows.append({"seed": seed, "model": model, "variant": variant, "n_labeled": args.n_labeled or N_LABELED,
                             **res, **comparisons(out, seed, model, variant, suffix)})
                print(json.dumps(rows[-1]), flush=True)
    table = pd.DataFrame(rows)
    write_json(out / "results.json", merge_rows(out / "results.json", rows, " ".join(sys.argv)))
    print(table.drop(columns=["kept", "ci"], errors="ignore").round(3).to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
