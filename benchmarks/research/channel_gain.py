"""Do more image channels pay, or a second, peritumoral scale? The ssl_gain cpu models fine-tuned on
T1-CE, T1-CE + FLAIR, T1-CE + FLAIR + FET-PET and T1-CE at two scales, on the same patients, scored on
the large sets with paired CIs.

    python -m benchmarks.research.channel_gain --ssl_gain runs/ssl_gain_cpu --out runs/channel_gain \\
        [--seed 0] [--models mim scratch] [--n_boot 1000]

The labelled, external and large cohorts of an ssl_gain run are drawn again with `--sequences
t1ce,flair,pet` (data.synth keeps every T1-CE volume byte-identical, so the T1-CE-only run repeats the
ssl_gain run's own, and this script checks that it does). Each model (mim: the ssl_gain seed's MiM
encoder; scratch; mim_seq: MiM pretrained the same way on every sequence of the unlabelled cohort drawn
again with FLAIR and PET, each sequence its own sample) is fine-tuned four times with the ssl_gain preset's recipe (multitask head, fusion
none, the seed's splits), --images image / image,flair / image,flair,pet:pet, and T1-CE with
--peritumoral_mm 30 (the lesion crop plus a wide one through the same encoder), and every other run is
compared with its T1-CE-only run on test_large and external_large (benchmarks.research.paired_runs:
AUC and Harrell's C, patient bootstrap), and on the development cohort's out-of-fold validation AUC. The generator writes label signal into FLAIR
(the T1/T2 match sign) and PET (TBR), so a gain shows that the pipeline reads those channels; it is not
evidence about real scans. Writes OUT/results.json and OUT/results.md; finished runs are reused.
"""
from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pandas as pd

from benchmarks.research.paired_runs import compare, ensemble_rows
from benchmarks.research.ssl_gain.presets import PRESETS, large_manifests
from benchmarks.research.ssl_gain.stages import finetune_config, log, make_large_sets, preset_levels, pretrain_config
from core.atomic import write_json, write_text
from core.config import from_dict
from core.errors import InputError, cli_entry
from models.tasks import MULTITASK

# variant -> (--images, --peritumoral_mm)
VARIANTS = {"t1ce": (("image",), 0.0), "t1ce_flair": (("image", "flair"), 0.0),
            "t1ce_flair_pet": (("image", "flair", "pet:pet"), 0.0), "t1ce_two_scales": (("image",), 30.0)}
SPLITS = ("test_large", "external_large")


def _cohort_params(source: Path):
    from data.synth.params import CohortParams
    info = json.loads((source / "cohort" / "cohort.json").read_text())
    return info, replace(from_dict(CohortParams, info["params"], "cohort.json params"), sequences=("t1ce", "flair", "pet"))


def make_cohorts(source: Path, out: Path, preset) -> None:
    """The ssl_gain run's labelled, external and large cohorts again, with FLAIR and PET (no unlabelled scans)."""
    from data.synth import generate_cohort
    info, params = _cohort_params(source)
    if not (out / "cohort" / "cohort.json").is_file():
        log("cohort with flair and pet")
        generate_cohort(out / "cohort", 0, info["counts"]["n_labeled"], info["counts"]["n_external"],
                        seed=info["seed"], workers=preset.workers, params=params)
    if not all(p.is_file() for p in large_manifests(preset, out).values()):
        log("large sets with flair and pet")
        make_large_sets(preset, out, params=params)


def pretrain_on_sequences(preset, source: Path, out: Path, seed: int) -> Path:
    """The ssl_gain seed's MiM pretraining, same steps and recipe, on the unlabelled cohort drawn again
    with FLAIR and PET (T1-CE byte-identical), every sequence of every subject its own sample."""
    from data.synth import generate_cohort
    from pretrain.train import train
    info, params = _cohort_params(source)
    unlabeled = out / "unlabeled"
    if not (unlabeled / "cohort.json").is_file():
        log("unlabelled cohort with flair and pet")
        generate_cohort(unlabeled, info["counts"]["n_unlabeled"], 0, 0, seed=info["seed"], workers=preset.workers,
                        params=params)
    cfg = pretrain_config(preset, out, seed, preset_levels(preset))
    cfg = replace(cfg, data=str(unlabeled / "unlabeled.csv"), cache_dir=str(source / "cache"),
                  output_dir=str(out / f"seed{seed}" / "pretrain_mim_seq"),
                  prep=replace(cfg.prep, images=VARIANTS["t1ce_flair_pet"][0]))
    encoder = Path(cfg.output_dir) / "encoder"
    if not (encoder / "config.json").is_file():
        log("pretrain_mim_seq: pretraining on every sequence")
        train(cfg)
    return encoder


def run_variant(preset, source: Path, out: Path, seed: int, model: str, variant: str) -> Path:
    """One fine-tuning run (skipped when its predictions exist); returns its folder."""
    from finetune.train import run as finetune
    name = f"ft_{model}_{variant}"
    pretrained = {"mim": str(source / f"seed{seed}" / "pretrain_mim" / "encoder"), "scratch": "",
                  "mim_seq": str(out / f"seed{seed}" / "pretrain_mim_seq" / "encoder")}[model]
    cfg = finetune_config(preset, out, seed, name, pretrained=pretrained, fusion="none", task=MULTITASK.name,
                          splits=out / f"seed{seed}" / "splits.json")
    # The ssl_gain run's cache: its T1-CE entries are this cohort's too (the keys are the files' contents).
    images, peritumoral_mm = VARIANTS[variant]
    cfg = replace(cfg, prep=replace(cfg.prep, images=images), cache_dir=str(source / "cache"),
                  peritumoral_mm=peritumoral_mm)
    folder = Path(cfg.output_dir)
    if not (folder / "predictions.csv").is_file():
        prepare(cfg.prep, [Path(cfg.manifest), Path(cfg.external), *large_manifests(preset, out).values()],
                Path(cfg.cache_dir), preset.workers)
        log(f"{name}: fine-tuning")
        finetune(cfg)
    return folder


def prepare(prep, csvs: list[Path], cache: Path, workers: int) -> None:
    """Fill the cache in parallel first (fine-tuning prepares in its own process, one subject at a time)."""
    from data.prepare import prepare_table
    for csv in csvs:
        prepare_table(MULTITASK.read_manifest(csv, prep=prep), prep, cache, workers=workers if workers > 1 else 0)


def repeats_ssl_gain(run: Path, source: Path, seed: int, model: str) -> dict:
    """How far the T1-CE-only run's large-set ensemble scores lie from the ssl_gain run's own."""
    theirs = source / f"seed{seed}" / f"ft_{model}_none"
    out = {}
    for split in SPLITS:
        a, b = ensemble_rows(run, split), ensemble_rows(theirs, split)
        if a is None or b is None:
            return {"compared": False, "reason": f"no predictions in {theirs}"}
        ids = sorted(set(a.index) & set(b.index))
        out[split] = {"n": len(ids), "max_abs_prob_diff": float((a.loc[ids, "prob"] - b.loc[ids, "prob"]).abs().max())}
    return {"compared": True, **out}


def report(results: dict) -> str:
    lines = ["| model | channels | split | AUC | AUC - T1-CE [95% CI] | C | C - T1-CE [95% CI] |",
             "|---|---|---|---|---|---|---|"]
    for model, entry in results["models"].items():
        for variant, cmp in entry["vs_t1ce"].items():
            for split, d in cmp["splits"].items():
                auc, c = d["auc"], d["c_index"]
                lines.append(f"| {model} | {variant} | {split} (n = {d['n']}) | {auc['a']:.3f} | {auc['diff']:+.3f} "
                             f"[{auc['ci'][0]:+.3f}, {auc['ci'][1]:+.3f}] | {c['a']:.3f} | {c['diff']:+.3f} "
                             f"[{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}] |")
    return "\n".join(lines) + "\n"


def save_figure(results: dict, path: Path) -> None:
    """AUC of every model and variant on each large set; whiskers: the paired 95% CI of its difference to
    the same model's T1-CE run, drawn around its own AUC."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(SPLITS), figsize=(5.5 * len(SPLITS), 4), sharey=True)
    variants = list(VARIANTS)
    for ax, split in zip(axes, SPLITS):
        for k, (model, entry) in enumerate(results["models"].items()):
            xs, ys, lo, hi = [], [], [], []
            for i, v in enumerate(variants):
                cmp = entry["vs_t1ce"].get(v, {}).get("splits", {}).get(split) if v != "t1ce" else None
                if v != "t1ce" and cmp is None:  # a variant this run did not include
                    continue
                base = next(iter(entry["vs_t1ce"].values()))["splits"][split]["auc"]["b"]
                auc = cmp["auc"]["a"] if cmp else base
                ci = (cmp["auc"]["ci"][0] - cmp["auc"]["diff"], cmp["auc"]["ci"][1] - cmp["auc"]["diff"]) if cmp else (0, 0)
                xs.append(i + 0.2 * (k - 1))
                ys.append(auc)
                lo.append(-ci[0])
                hi.append(ci[1])
            ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", capsize=3, label=model)
        ax.set_xticks(range(len(variants)), [v.replace("_", "\n") for v in variants])
        ax.set_title(split)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("AUC (progression vs necrosis)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(source: Path, out: Path, seed: int, models: list[str], n_boot: int) -> dict:
    preset = PRESETS["cpu"]
    if not (source / f"seed{seed}" / "splits.json").is_file():
        raise InputError(f"--ssl_gain {source}: no seed{seed}/splits.json; run benchmarks.research.ssl_gain first")
    make_cohorts(source, out, preset)
    (out / f"seed{seed}").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source / f"seed{seed}" / "splits.json", out / f"seed{seed}" / "splits.json")
    csvs = [out / "cohort" / "manifest.csv", *large_manifests(preset, out).values()]
    outcomes = pd.concat([MULTITASK.read_manifest(p, check_files=False) for p in csvs]).set_index("subject_id")
    results = {"ssl_gain": str(source), "seed": seed, "n_boot": n_boot, "models": {}}
    if "mim_seq" in models:
        pretrain_on_sequences(preset, source, out, seed)
    for model in models:
        runs = {v: run_variant(preset, source, out, seed, model, v) for v in VARIANTS}
        results["models"][model] = {
            "repeats_ssl_gain": repeats_ssl_gain(runs["t1ce"], source, seed, model) if model != "mim_seq" else None,
            "vs_t1ce": {v: compare(runs[v], runs["t1ce"], list(SPLITS), outcomes, n_boot, seed)
                        for v in VARIANTS if v != "t1ce"}}
        write_json(out / "results.json", results)
    write_text(out / "results.md", report(results))
    save_figure(results, out / "channel_gain.png")
    return results


@cli_entry
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.research.channel_gain", description=__doc__.splitlines()[0],
                                 allow_abbrev=False)
    ap.add_argument("--ssl_gain", required=True, help="a finished `benchmarks.research.ssl_gain --preset cpu` folder")
    ap.add_argument("--out", required=True, help="output folder (cohorts, runs, results.json, results.md)")
    ap.add_argument("--seed", type=int, default=0, help="the ssl_gain seed whose encoder and splits are used (default 0)")
    ap.add_argument("--models", nargs="+", default=["mim", "scratch", "mim_seq"], choices=["mim", "scratch", "mim_seq"],
                    help="models to fine-tune on every variant (default: all three)")
    ap.add_argument("--n_boot", type=int, default=1000, help="bootstrap replicates of the paired CIs (default 1000)")
    args = ap.parse_args(argv)
    results = run(Path(args.ssl_gain), Path(args.out), args.seed, args.models, args.n_boot)
    print(report(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
