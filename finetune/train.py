"""Stage two: fine-tune the pretrained encoder on [image, lesion mask] (+ clinical) per CV fold.

    accelerate launch -m finetune --config launch/finetune_tiny_cpu.yaml --manifest M.csv \
        --pretrained runs/pt/encoder --task classification --fusion concat --output_dir runs/ft

Patient-level splits: a held-out test set plus K folds on the rest. Each fold (finetune.fold) trains
with early stopping on its validation metric; test and external sets are predicted by the fold
ensemble; a held-out patient (by patient_id) that is also a training patient is refused, and so is an
output folder whose folds are another run's (unless --reuse_folds false). Writes predictions.csv,
metrics.json, figures, metrics.jsonl/trackers and one HF-format folder per fold model (clinical schema and
input contract inside) under model/.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import pandas as pd

from core.atomic import atomic_path, write_json
from core.cli import parse_config
from core.config import absolute_paths, save_config, to_dict
from core.errors import ConfigError, InputError, cli_entry
from data.prep_config import PrepConfig
from engine.distributed import make_accelerator, zero_stage
from engine.logs import RunLogger
from finetune.clinical import unseen_categories_reported_once
from finetune.config import PATH_FIELDS, FinetuneConfig, parse_eval_sets
from finetune.fold import SEG_WINDOWS_KEY, train_fold
from models.hf import read_json
from models.input_spec import InputSpec, ViewSpec, load_input_spec
from models.multimodal import MultimodalConfig
from models.vit3d import vit3d_config_from_dict


def resolve_inputs(cfg: FinetuneConfig) -> tuple[MultimodalConfig, InputSpec]:
    """The model config and the input contract of this run. With --pretrained, the encoder sizes and
    preprocessing come from the pretrained folder (so they always agree) and so does the lesion view
    scale unless --crop_mm is given."""
    model_cfg, prep, view_mm = cfg.model, cfg.prep, 0.0
    in_channels = len(cfg.prep.images) + 1  # the image channels, then the lesion mask
    model_cfg = replace(model_cfg, encoder=replace(model_cfg.encoder, in_channels=in_channels))
    if cfg.pretrained:
        folder = Path(cfg.pretrained)
        if not (folder / "config.json").is_file():
            raise InputError(f"{folder}: not a pretrained model folder (no config.json)")
        saved = vit3d_config_from_dict(read_json(folder / "config.json"), where=str(folder / "config.json"))
        enc = replace(saved, in_channels=in_channels, drop_path=cfg.model.encoder.drop_path,
                      grad_checkpointing=cfg.model.encoder.grad_checkpointing)
        model_cfg = replace(model_cfg, encoder=enc)
        pretrained = load_input_spec(folder)
        # Spacing and normalisation are the encoder's; the channels are this cohort's (--images).
        prep = replace(pretrained.prep, images=cfg.prep.images, missing_image=cfg.prep.missing_image, pet=cfg.prep.pet)
        view_mm = pretrained.view.crop_mm if pretrained.view.centre == "lesion" else 0.0
    if cfg.task.segment:  # the segmentation task reads the image alone: no clinical path
        model_cfg = replace(model_cfg, fusion="none")
    crop_mm = cfg.crop_mm if cfg.crop_mm is not None else view_mm
    spec = InputSpec(prep=prep, input_size=model_cfg.encoder.img_size, channels=(*prep.image_columns(), "lesion_mask"),
                     view=ViewSpec(centre="lesion", crop_mm=crop_mm, margin_mm=cfg.margin_mm,
                                   peritumoral_mm=cfg.peritumoral_mm))
    return replace(model_cfg, scales=spec.scales), spec


def load_cohort(cfg: FinetuneConfig, prep: PrepConfig, show_progress: bool, accelerator=None):
    """(training table, held-out tables by split name, clinical columns), prepared into the cache; under an
    `accelerator`, each rank prepares its share of each table and then reads the whole cache (data/shard.py)."""
    from data.manifest import check_not_image_paths, clinical_columns
    from data.shard import Shard, of_run, prepare_shared
    if not cfg.manifest:
        raise InputError("--manifest is required")
    cache = cfg.cache_dir or str(Path(cfg.output_dir).parent / "cache")
    table = cfg.task.read_manifest(cfg.manifest, prep=prep)
    cols = list(cfg.clinical_columns) or clinical_columns(table, prep)
    missing = [c for c in cols if c not in table.columns]
    if missing:  # checked on the manifests, before any preprocessing
        raise InputError(f"{cfg.manifest}: clinical column(s) {missing} not found")
    check_not_image_paths(table, cols, f"--clinical_columns ({cfg.manifest})")
    if cfg.model.uses_clinical and not cols:
        raise InputError(f"{cfg.manifest}: --fusion {cfg.model.fusion} needs clinical columns, found none")
    # the held-out cohorts by split name: the external site and every --eval_sets entry
    paths = ({"external": cfg.external} if cfg.external else {}) | parse_eval_sets(cfg.eval_sets)
    held_tables = {name: cfg.task.read_manifest(path, prep=prep) for name, path in paths.items()}
    owner = dict.fromkeys(table["subject_id"], cfg.manifest)  # subject_id -> the manifest it came from
    for name, other in held_tables.items():
        clash = sorted(set(other["subject_id"]) & set(owner))
        if clash:
            raise InputError(f"{paths[name]}: subject_id(s) {clash[:5]} also appear in {owner[clash[0]]}; "
                             "ids must be unique across the training and held-out cohorts")
        owner |= dict.fromkeys(other["subject_id"], paths[name])
        refuse_training_patients(other, paths[name], table, cfg.manifest, warn=show_progress)
        absent = [c for c in cols if c not in other.columns]
        if absent and cfg.model.uses_clinical:
            raise InputError(f"{paths[name]}: clinical column(s) {absent} not found")
    shard, gather = of_run(accelerator) if accelerator is not None else (Shard(show=show_progress), None)
    share = {"shard": shard, "gather": gather, "workers": cfg.prep_workers, "timeout_s": cfg.dist_timeout_min * 60}
    df, _ = prepare_shared(table, prep, cache, **share)
    held = {name: prepare_shared(t, prep, cache, **share)[0].reset_index(drop=True) for name, t in held_tables.items()}
    return df.reset_index(drop=True), held, cols


def refuse_training_patients(held: pd.DataFrame, where: str, train: pd.DataFrame, manifest: str, *,
                             warn: bool = True) -> None:
    """A held-out patient is never a training patient: a follow-up scan of one (its own subject_id, the
    same patient_id) would inflate the held-out figures. Patients are compared by patient_id as
    data.manifest reads it (subject_id where a manifest has no patient_id column), as the splits are, and
    by (site, patient_id) when both tables name their sites: two sites may give different people one id.
    Site names compare stripped and case-folded ("MGH", "mgh " are one site); a patient_id shared with
    another site is accepted and, with `warn`, said in one line, so that a misspelt site shows."""
    by_site = _names_sites(held) and _names_sites(train)

    def key(df: pd.DataFrame) -> pd.Series:
        pid = df["patient_id"].astype(str)
        return _site_names(df) + "\x00" + pid if by_site else pid
    trained = dict(zip(key(train), train["subject_id"].astype(str)))  # patient -> a subject
    clash = held[key(held).isin(trained)]
    if len(clash):
        pairs = [f"{p}{f' at site {site}' if by_site else ''} (subject {s} here, {trained[k]} there)"
                 for k, p, site, s in zip(key(clash), clash["patient_id"].astype(str), clash["site"].astype(str),
                                          clash["subject_id"].astype(str))]
        raise InputError(f"{where}: {'(site, patient_id)' if by_site else 'patient_id'} "
                         f"{', '.join(pairs[:3])}{' and more' if len(pairs) > 3 else ''} "
                         f"also in the training manifest {manifest}; a held-out patient must not be a training "
                         "patient: drop those rows or hold the patient out of the training manifest")
    if by_site and warn:
        _say_ids_at_other_sites(held, where, train, manifest)


def _site_names(df: pd.DataFrame) -> pd.Series:
    """A table's site names as the (site, patient_id) rule compares them: stripped and case-folded."""
    return df["site"].astype(str).str.strip().str.casefold()


def _say_ids_at_other_sites(held: pd.DataFrame, where: str, train: pd.DataFrame, manifest: str) -> None:
    """One warning line naming the first held-out patient_ids that the training manifest has at another site:
    accepted as other people, but a misspelt site would make them the same patients."""
    site_of = dict(zip(train["patient_id"].astype(str), train["site"].astype(str)))  # patient_id -> a training site
    shared = list(dict.fromkeys((p, s) for p, s in zip(held["patient_id"].astype(str), held["site"].astype(str))
                                if p in site_of))
    if not shared:
        return
    named = ", ".join(f"{p} (site {s} here, {site_of[p]} there)" for p, s in shared[:3])
    more = f" and {len(shared) - 3} more" if len(shared) > 3 else ""
    print(f"warning: {where}: {len(shared)} patient_id(s) also in the training manifest {manifest} at another "
          f"site: {named}{more}; taken as other patients (two sites may give one id): if a site is misspelt, "
          "correct it, or these held-out patients may be training patients", file=sys.stderr)


def _names_sites(df: pd.DataFrame) -> bool:
    """Whether a table names its sites: data.manifest gives every row DEFAULT_SITE when it has no site column,
    and such a table's patient may be any site's, so it is compared by patient_id alone."""
    from data.manifest import DEFAULT_SITE
    return "site" in df.columns and bool((df["site"].astype(str) != DEFAULT_SITE).any())


def load_splits(cfg: FinetuneConfig, df: pd.DataFrame, save: bool = True) -> dict:
    """The run's splits: its --splits file, else <output_dir>/splits.json, made (and, with `save`, written) when
    absent."""
    from data.splits import load_or_make_splits, make_splits, stratify_of
    path = cfg.splits or str(Path(cfg.output_dir) / "splits.json")
    settings = {"test_fraction": cfg.test_fraction, "folds": cfg.folds, "stratify": stratify_of(df), "seed": cfg.seed}
    if not save and not Path(path).exists():
        return make_splits(df, **settings)
    return load_or_make_splits(path, df, **settings)


# --------------------------------------------------------------------------------------------
# whole run


def prediction_rows(name: str, fold: int, df: pd.DataFrame, pred: dict) -> pd.DataFrame:
    rows = pd.DataFrame({"subject_id": df["subject_id"].to_numpy(), "split": name, "fold": fold})
    for k, v in pred.items():
        rows[k] = v
    return rows


def fold_ensemble(frames: list[pd.DataFrame], name: str) -> pd.DataFrame:
    """Mean probability / mean log-risk of the fold models on a held-out set (fold = -1)."""
    sub = pd.concat([f for f in frames if (f["split"] == name).any()])
    sub = sub[sub["split"] == name]
    cols = [c for c in ("prob", "risk") if c in sub.columns]
    ens = sub.groupby("subject_id", sort=False)[cols].mean().reset_index()
    ens.insert(1, "split", name)
    ens.insert(2, "fold", -1)
    return ens


def fold_fingerprint(cfg: FinetuneConfig, splits: dict) -> str:
    """What a finished fold depends on; a fold saved under another fingerprint is retrained, not reused."""
    d = to_dict(cfg)
    for k in ("output_dir", "cache_dir", "n_boot", "explain", "figures", "num_workers", "reuse_folds", "external",
              "eval_sets", "splits", "prep_workers", "dist_timeout_min", "hybrid"):
        d.pop(k, None)
    if d.get("seg_arch") == "vit":  # the default arch leaves the fingerprint of runs made before the flag
        d.pop("seg_arch")
    d["folds_content"] = splits["folds"]
    d["pretrained_weights"] = _folder_stamp(cfg.pretrained)
    if cfg.model.segments:  # a segmentation head trained before it saw lesion-free windows is not reused
        d["seg_windows"] = SEG_WINDOWS_KEY
    return _digest(json.dumps(d, sort_keys=True, default=str))


def held_out_stamp(frame: pd.DataFrame) -> str:
    """What a fold's predictions of one held-out set depend on: its rows, clinical values and image files.
    A cached volume enters by its cache entry's name (a hash of the source file and the preprocessing),
    not its path, so moving --cache_dir alone does not retrain a fold."""
    rows = frame.sort_values("subject_id").astype(str)
    for col in (c for c in rows.columns if c.startswith("cache_")):
        rows[col] = [Path(p).parent.name for p in rows[col]]
    text = rows[sorted(rows.columns)].to_csv(index=False)
    return _digest(text)


STAMPED_COLUMNS = ("subject_id", "patient_id", "site", "label", "time", "event")  # beside clinical and cache_*


def fold_row_stamps(df: pd.DataFrame, splits: dict, columns: list[str]) -> list[str]:
    """Per fold, what its training and validation rows hold of what a fold reads: ids, site, outcomes, the
    clinical columns it encodes and their values, each image and mask by its cache entry (a hash of the files'
    content and the preprocessing, so moving the data or the cache changes nothing). Other manifest columns
    (notes, unread sequences) are left out. The fingerprint holds the subject ids only: a manifest edited under
    the same ids (a corrected label, a new clinical column) gives another stamp, and the fold is another run's."""
    keep = [c for c in df.columns if c in STAMPED_COLUMNS or c in columns or c.startswith("cache_")]
    by_id = df[keep].set_index("subject_id", drop=False)
    rows = [by_id.loc[[str(s) for s in fold["train"] + fold["val"]]].reset_index(drop=True)
            for fold in splits["folds"]]
    return [_digest(held_out_stamp(r) + json.dumps(columns)) for r in rows]


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _folder_stamp(folder: str) -> str:
    if not folder:
        return ""
    files = sorted(Path(folder).glob("*.safetensors"))
    return ",".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


def refuse_zero3(accelerator) -> None:
    """Fine-tuning keeps the best epoch's weights and saves each fold model from full state dicts
    held by one process; ZeRO-3 shards the parameters themselves, so those would be empty."""
    if zero_stage(accelerator) == 3:
        raise ConfigError("fine-tuning does not support DeepSpeed ZeRO-3 (it shards the weights the best-epoch "
                          "snapshot and the fold export read); use launch/accelerate/deepspeed_zero2.yaml or DDP")


def refuse_other_runs_folds(cfg: FinetuneConfig, fingerprint: str, row_stamps: list[str]) -> None:
    """Folds saved under another fingerprint, or trained on other rows (fold_row_stamps), are another run's
    (other settings, splits, pretrained weights or data): with reuse_folds (the default) this run would retrain
    them one by one over that run's models, log and predictions, so the two would mix, or reuse a fold trained
    on what the manifest no longer says. Refused, naming the ways out; --reuse_folds false says to train every
    fold again over them. A fold saved before the row stamp existed has none and is judged by its fingerprint."""
    folds = Path(cfg.output_dir) / "folds"
    if not cfg.reuse_folds or not folds.is_dir():
        return
    saved = {p.stem: _saved_fold(p) for p in sorted(folds.glob("fold*.json"))}
    other = [k for k, d in saved.items() if d.get("fingerprint") != fingerprint]
    if other:
        raise InputError(f"{folds}: {', '.join(other)} are another run's (other settings, splits or pretrained "
                         "weights); start this run in a new --output_dir, or pass --reuse_folds false to train "
                         "every fold again over them")
    mine = {f"fold{k}": stamp for k, stamp in enumerate(row_stamps)}
    edited = [k for k, d in saved.items() if "rows" in d and d["rows"] != mine.get(k)]
    if edited:
        raise InputError(f"{folds}: {', '.join(edited)} were trained on other rows of {cfg.manifest} under the same "
                         "subject ids (outcomes, clinical values or columns, images or their preprocessing changed "
                         "since); start this run in a new --output_dir, or pass --reuse_folds false to train every "
                         "fold again")


def _saved_fold(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}  # unreadable: not this run's


def run_folds(cfg: FinetuneConfig, model_cfg: MultimodalConfig, spec: InputSpec, df: pd.DataFrame,
              splits: dict, eval_sets: dict, columns: list[str], accelerator, logger,
              keys: tuple[str, list[str]]) -> tuple[list, list]:
    """Train every fold, or reuse a finished one whose fingerprint and row stamp still match; (prediction frames,
    fold info). keys: (fold_fingerprint, fold_row_stamps) of this run."""
    out, main = Path(cfg.output_dir), accelerator.is_main_process
    by_id = df.set_index("subject_id", drop=False)
    frames, fold_info = [], []
    fingerprint, row_stamps = keys
    stamps = {name: held_out_stamp(frame) for name, frame in eval_sets.items()}
    for k, fold in enumerate(splits["folds"]):
        done = out / "folds" / f"fold{k}.csv"
        saved = json.loads(done.with_suffix(".json").read_text()) if done.with_suffix(".json").is_file() else {}
        if cfg.reuse_folds and done.is_file() and saved.get("fingerprint") == fingerprint \
                and saved.get("rows", row_stamps[k]) == row_stamps[k]:
            # The held-out sets are not in the fingerprint: keep the rows of this run's sets; a fold that
            # lacks one of them (a set added since) or predicted another version of one (same name, other
            # rows) is retrained rather than reported with stale predictions.
            frame = pd.read_csv(done, dtype={"subject_id": str})
            frame = frame[frame["split"].isin(["val", *eval_sets])]
            if all(saved.get("held_out", {}).get(name) == stamps[name] for name in eval_sets):
                frames.append(frame)
                fold_info.append(saved)
                continue
        # the log keeps one training of each fold: rows of an earlier one (crashed, stale) go
        logger.keep_rows(lambda row, k=k: not any(key.startswith(f"fold{k}/") for key in row))
        res = train_fold(cfg, model_cfg, spec, k, by_id.loc[fold["train"]].reset_index(drop=True),
                         by_id.loc[fold["val"]].reset_index(drop=True), eval_sets, columns, accelerator, logger)
        fr = pd.concat([prediction_rows(name, k, d, p) for name, (d, p) in res["preds"].items()])
        info = {"fold": k, "best_epoch": res["best_epoch"], "kept": res["kept"], "val_score": res["val_score"],
                "folder": res["folder"], "fingerprint": fingerprint, "rows": row_stamps[k], "held_out": stamps}
        if main:
            with atomic_path(done) as tmp:
                fr.to_csv(tmp, index=False)
            write_json(done.with_suffix(".json"), info)
        frames.append(fr)
        fold_info.append(info)
    return frames, fold_info


def run(cfg: FinetuneConfig) -> dict:
    cfg = absolute_paths(cfg, PATH_FIELDS)
    out = Path(cfg.output_dir)
    accelerator = make_accelerator(cfg, out, timeout_min=cfg.dist_timeout_min)
    refuse_zero3(accelerator)
    main = accelerator.is_main_process
    model_cfg, spec = resolve_inputs(cfg)
    # every rank prepares its share of the cohorts, then reads the whole cache
    df, held_out, columns = load_cohort(cfg, spec.prep, show_progress=main, accelerator=accelerator)
    # decided before any file is written or fold trains: --hybrid true refuses what it cannot be fitted on
    from finetune.baselines.run_hybrid import resolve_hybrid
    fit_hybrid = resolve_hybrid(cfg, df, load_splits(cfg, df, save=False), columns, held_out, show=main)
    with accelerator.main_process_first():  # one rank writes a new splits file; the others then read it
        splits = load_splits(cfg, df)
    keys = fold_fingerprint(cfg, splits), fold_row_stamps(df, splits, columns)
    refuse_other_runs_folds(cfg, *keys)
    if main:  # only now that the run can start: nothing is written for a refused one
        out.mkdir(parents=True, exist_ok=True)
        save_config(replace(cfg, model=model_cfg, prep=spec.prep, crop_mm=spec.view.crop_mm), out / "config.yaml")
        # a hybrid export stacks the fold models it was fitted on; the folds may be retrained now, so an earlier
        # run's goes (--hybrid writes this run's after the folds), or predict would apply it to other models
        from finetune.baselines.run_hybrid import BASELINES_DIR, MODEL_DIR
        shutil.rmtree(out / "model" / MODEL_DIR, ignore_errors=True)
        shutil.rmtree(out / BASELINES_DIR, ignore_errors=True)  # its baselines and hybrid, stacked on those folds
    test_df = df.set_index("subject_id", drop=False).loc[splits["test"]].reset_index(drop=True)
    eval_sets = ({"test": test_df} if len(test_df) else {}) | held_out
    logger = RunLogger(accelerator, out)
    metrics = {}
    with unseen_categories_reported_once():  # once for the run, not once per fold model
        try:
            frames, fold_info = run_folds(cfg, model_cfg, spec, df, splits, eval_sets, columns, accelerator, logger,
                                          keys)
        finally:
            logger.close()
        if main:
            metrics = write_results(cfg, frames, fold_info, eval_sets, df, spec, model_cfg)
            if cfg.explain and model_cfg.uses_image and model_cfg.predicts_outcome:
                explain_subjects(cfg, fold_info[0]["folder"], test_df.head(cfg.explain), out / "explain")
    if main:
        print_summary(metrics, out, cfg.figures)
    accelerator.wait_for_everyone()
    if main and fit_hybrid:  # after the barrier: the main process alone, no collective left to time out
        from finetune.baselines.run_hybrid import fit_and_report_hybrid
        outcomes = pd.concat([df, *held_out.values()], ignore_index=True)
        reported = fit_and_report_hybrid(cfg, columns, outcomes, metrics)
        metrics |= {"baselines": reported} if reported else {}
    return metrics


def write_results(cfg: FinetuneConfig, frames: list, fold_info: list, eval_sets: dict, df, spec: InputSpec,
                  model_cfg: MultimodalConfig) -> dict:
    """predictions.csv (folds + fold ensemble), model/ensemble.json, metrics.json and the figures; with a
    segmentation head, segmentation.csv, its overlays and a "segmentation" section (finetune.lesion.segmentation)."""
    out = Path(cfg.output_dir)
    write_json(out / "model" / "ensemble.json", {"folds": [i["folder"] for i in fold_info],
                                                 "combine": "mean of prob / mean of risk / mean of lesion probability"})
    metrics = {"n_boot": cfg.n_boot, "seed": cfg.seed, "splits": {}}
    if model_cfg.predicts_outcome:
        preds = pd.concat(frames + [fold_ensemble(frames, n) for n in eval_sets], ignore_index=True)
        with atomic_path(out / "predictions.csv") as tmp:
            preds.to_csv(tmp, index=False)
        from finetune.evaluate import evaluate
        # test rows come from df; subject ids are unique across the cohorts (checked in load_cohort)
        outcomes = pd.concat([df] + [d for n, d in eval_sets.items() if n != "test"], ignore_index=True)
        metrics = evaluate(preds, outcomes, out_dir=out, n_boot=cfg.n_boot, seed=cfg.seed, figures=cfg.figures)
    if model_cfg.segments:
        from finetune.lesion.segmentation import segmentation_results
        metrics["segmentation"] = segmentation_results(out, fold_info, frames, df, eval_sets, spec,
                                                       cfg.n_boot, cfg.seed, overlays=cfg.figures)
    metrics["folds"] = fold_info
    write_json(out / "metrics.json", metrics)
    return metrics


def print_summary(metrics: dict, out: Path, figures: bool = True) -> None:
    """The headline numbers on the console: per split, AUC and C-index with their 95% CIs."""
    from finetune.evaluate import format_table
    from finetune.lesion.segmentation import format_segmentation
    drawn = f"figures {out}/*.png" if figures else "no figures (--figures false)"
    print(f"fine-tuning done: metrics {out / 'metrics.json'}, {drawn}, models {out / 'model'}")
    if metrics.get("splits"):
        print(format_table(metrics))
    if metrics.get("segmentation"):
        print(f"segmentation (per subject: {out / 'segmentation.csv'}; overlays: {out / 'segmentation'}/):")
        print(format_segmentation(metrics["segmentation"]))


def explain_subjects(cfg: FinetuneConfig, folder: str, rows: pd.DataFrame, out_dir: Path) -> None:
    """Attention rollout and occlusion maps (NIfTI + PNG) for a few test subjects."""
    from finetune.interpret import attention_rollout, occlusion_sensitivity, save_explanations
    from finetune.predict import load_model, subject_inputs
    model, meta = load_model(folder)
    key = cfg.task.explained_output(model.config.survival_head)
    c = model.config.encoder.in_channels
    for _, row in rows.iterrows():
        x, clin, affine = subject_inputs(row, meta)  # [scales (C + 1), S, S, S]: the maps are of the lesion crop
        maps = {"attention_rollout": attention_rollout(model, x[None, :c], clin[None]),
                "occlusion": occlusion_sensitivity(model, x[None], clin[None], output_key=key)}
        save_explanations(out_dir, row["subject_id"], x[:c], maps, affine)


@cli_entry
def main(argv=None) -> int:
    cfg, _ = parse_config(FinetuneConfig, argv, description=__doc__.splitlines()[0])
    run(cfg)
    return 0
