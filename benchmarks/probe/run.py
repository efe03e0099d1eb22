"""One probe run: per setup (an encoder config + input contract + view), the crops, the random-init
controls, the two feature baselines, and every encoder that shares the setup, each scored on the same
saved splits and compared with the controls by a paired bootstrap over patients."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from benchmarks.probe import evaluate as ev
from benchmarks.probe.cohort import ProbeCohort, lesion_crops, lesion_regions, probe_prep, probe_view
from benchmarks.probe.features import encoder_features, handmade_features, pixel_features
from benchmarks.probe.geometry import GEOMETRY_GROUP, geometry
from benchmarks.probe.geometry import summarise as summarise_geometry
from core.atomic import write_json
from core.config import to_dict
from core.errors import InputError
from models.input_spec import InputSpec, ViewSpec, load_input_spec
from models.vit3d import ViT3D, ViT3DConfig

VERDICT_GROUP = "all"  # the four groups side by side: what the verdict line reports


@dataclass
class Setup:
    """Encoders that can share crops and random controls: same architecture, preprocessing, input, view."""
    config: ViT3DConfig
    spec: InputSpec
    view: ViewSpec
    encoders: list[str] = field(default_factory=list)

    def key(self) -> str:
        arch = {k: v for k, v in to_dict(self.config).items() if k not in ("drop_path", "grad_checkpointing")}
        return json.dumps([arch, to_dict(probe_prep(self.spec.prep)), self.spec.input_size, to_dict(self.view)],
                          sort_keys=True)


def load_encoder(folder: str) -> tuple[ViT3D, InputSpec]:
    """A frozen 1-channel image encoder and its input contract; anything else is an InputError."""
    spec = load_input_spec(folder)
    encoder = ViT3D.from_pretrained(folder)
    if encoder.config.in_channels != 1 or len(spec.channels) != 1:
        raise InputError(f"--encoder {folder}: takes {encoder.config.in_channels} channel(s) {list(spec.channels)}; "
                         "the probe feeds the image alone, so it needs a 1-channel pretrained encoder "
                         "(not a fine-tuned [image, mask] one)")
    return encoder.eval(), spec


def group_setups(folders: list[str], crop_mm: float | None, margin_mm: float | None) -> list[Setup]:
    setups: dict[str, Setup] = {}
    for folder in folders:
        encoder, spec = load_encoder(folder)
        setup = Setup(encoder.config, spec, probe_view(spec, crop_mm, margin_mm))
        setups.setdefault(setup.key(), setup).encoders.append(folder)
    return list(setups.values())


def load_or_make_splits(path: Path, cohort: ProbeCohort, folds: int, repeats: int, seed: int) -> ev.Splits:
    """The CV splits, saved beside the cohort on first use, so every later probe (and every pretraining
    change it gates) is scored on the very same folds, whatever sklearn version draws them."""
    index = {s: i for i, s in enumerate(cohort.subjects)}
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
            found = sorted(str(s) for fold in saved[0] for s in fold)
        except (json.JSONDecodeError, IndexError, TypeError) as e:
            raise InputError(f"{path}: not a probe splits file ({e}); delete it to redraw the splits") from None
        if found != sorted(index) or len(saved) != repeats or any(len(rep) != folds for rep in saved):
            raise InputError(f"{path}: not {repeats} x {folds} folds of this cohort's subjects; "
                             "delete it to redraw the splits")
        tests = [[np.array([index[s] for s in fold]) for fold in rep] for rep in saved]
        return [[(np.setdiff1d(np.arange(len(index)), te), te) for te in rep] for rep in tests]
    splits = ev.cv_splits(cohort.label, cohort.patients, folds, repeats, seed)
    write_json(path, [[[cohort.subjects[i] for i in te] for _, te in rep] for rep in splits])
    return splits


def probe_matrix(X: np.ndarray, cohort: ProbeCohort, splits: ev.Splits, seed: int) -> dict:
    """Score one feature matrix [N, F]: {"score": ..., "s_label": [R, N], "p_latents": [R, N, K]}."""
    Z = cohort.latents.to_numpy(float)  # [N, K]
    s_label = ev.oof_label(X, cohort.label, cohort.patients, splits, seed)
    p_latents = ev.oof_latents(X, Z, splits)
    return {"score": ev.score(cohort.label, Z, s_label, p_latents), "s_label": s_label, "p_latents": p_latents}


def probe_encoder(encoder: ViT3D, crops: np.ndarray, cohort: ProbeCohort, splits: ev.Splits, args,
                  desc: str) -> dict:
    """{"groups": {group: probe_matrix}, "seconds": wall time of features + read-outs}."""
    t0 = time.perf_counter()
    feats = encoder_features(encoder.to(args.device), crops, args.batch_size, desc=desc, progress=args.progress,
                             device=args.device)
    groups = {g: probe_matrix(X, cohort, splits, args.cv_seed) for g, X in feats.items()}
    return {"groups": groups, "geometry": geometry(feats[GEOMETRY_GROUP]), "seconds": time.perf_counter() - t0}


def random_encoder(config: ViT3DConfig, seed: int) -> ViT3D:
    torch.manual_seed(seed)  # the whole init comes from this one seed: a control is reproducible
    return ViT3D(config).eval()


def compare(W: np.ndarray, cohort: ProbeCohort, model: dict, controls: list[dict]) -> dict:
    """Per group: pretrained − random mean, in random SDs, and its paired bootstrap CI."""
    Z = cohort.latents.to_numpy(float)
    out = {}
    for g, m in model["groups"].items():
        ctl = [c["groups"][g] for c in controls]
        auc = np.array([c["score"]["auc"] for c in ctl])
        r2 = np.array([c["score"]["r2_mean"] for c in ctl])
        d_auc, d_r2 = m["score"]["auc"] - auc.mean(), m["score"]["r2_mean"] - r2.mean()
        out[g] = {"delta_auc": d_auc, "z_auc": _z(d_auc, auc), "delta_r2_mean": d_r2, "z_r2_mean": _z(d_r2, r2),
                  **ev.paired_delta(W, cohort.label, Z, m, ctl)}
    return out


def _z(delta: float, values: np.ndarray) -> float:
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
    return float(delta / sd) if sd > 0 else float("nan")


def summarise_controls(controls: list[dict]) -> dict:
    """Per group: mean and SD over the random seeds of AUC, mean R² and each latent's R²."""
    out = {}
    for g in controls[0]["groups"]:
        s = [c["groups"][g]["score"] for c in controls]
        auc, r2m, r2 = (np.array([x[k] for x in s]) for k in ("auc", "r2_mean", "r2"))
        ddof = 1 if len(s) > 1 else 0
        out[g] = {"auc_mean": float(auc.mean()), "auc_sd": float(auc.std(ddof=ddof)),
                  "r2_mean_mean": float(r2m.mean()), "r2_mean_sd": float(r2m.std(ddof=ddof)),
                  "r2": r2.mean(0).tolist(), "r2_sd": r2.std(0, ddof=ddof).tolist()}
    return out


def scores_only(result: dict) -> dict:
    """A probe result without its out-of-fold arrays (what probe.json keeps)."""
    geo = {"geometry": result["geometry"]} if "geometry" in result else {}
    return {"groups": {g: m["score"] for g, m in result["groups"].items()}, **geo,
            "seconds": round(result["seconds"], 2)}


def run_setup(setup: Setup, cohort: ProbeCohort, splits: ev.Splits, W: np.ndarray, args) -> dict:
    """Crops, controls, baselines and every encoder of one setup; returns the JSON-ready record."""
    t0 = time.perf_counter()
    crops = lesion_crops(cohort, setup.spec.input_size, setup.view)  # [N, 2, S, S, S]
    crop_s = time.perf_counter() - t0
    print(f"{len(crops)} crops {tuple(crops.shape[1:])}, view {to_dict(setup.view)}, mask share "
          f"{float(crops[:, 1].mean()):.4f} ({crop_s:.1f} s)", flush=True)
    controls = []
    for seed in args.random_seeds:
        res = probe_encoder(random_encoder(setup.config, seed), crops, cohort, splits, args, f"random seed {seed}")
        controls.append(res)
        _say(f"random seed {seed}", res)
    baselines = {}
    for name, X in (("pixel", lambda: pixel_features(crops)),
                    ("handmade", lambda: handmade_features(lesion_regions(cohort), cohort.spacing))):
        t = time.perf_counter()
        baselines[name] = {"groups": {"—": probe_matrix(X(), cohort, splits, args.cv_seed)},
                           "seconds": time.perf_counter() - t}
        _say(name, baselines[name])
    encoders = []
    for folder in ([] if args.random_only else setup.encoders):
        res = probe_encoder(load_encoder(folder)[0], crops, cohort, splits, args, Path(folder).name)
        _say(folder, res)
        encoders.append({"path": folder, **scores_only(res), "vs_random": compare(W, cohort, res, controls)})
    return {"config": to_dict(setup.config), "input_spec": setup.spec.to_dict(), "view": to_dict(setup.view),
            "encoder_dirs": setup.encoders, "crop_seconds": round(crop_s, 2),
            "random": {"seeds": list(args.random_seeds), "per_seed": [scores_only(c) for c in controls],
                       "summary": summarise_controls(controls),
                       "geometry": summarise_geometry([c["geometry"] for c in controls])},
            "baselines": {k: scores_only(v) for k, v in baselines.items()}, "encoders": encoders}


def _say(name: str, res: dict) -> None:
    s = next(iter(res["groups"].values()))["score"] if "—" in res["groups"] else res["groups"][VERDICT_GROUP]["score"]
    print(f"  {name}: AUC {s['auc']:.3f}, mean R² {s['r2_mean']:.3f} ({res['seconds']:.1f} s)", flush=True)
