"""The benchmark's report: seed aggregation, the published study's claims, results.json / results.md, ROC figures."""
from __future__ import annotations

import json
import math
import os
import platform
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

import numpy as np

from benchmarks.research.ssl_gain.presets import (EVAL_SETS, LARGE_SETS, MODELS, PUBLISHED_SOURCE, REFERENCE, TEST_SETS,
                                                  Preset)
from core.atomic import write_json, write_text
from models.tasks import LABEL_REPORT, MULTITASK, SURVIVAL_REPORT

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
        for split in ("val",) + EVAL_SETS:
            cls = [s["models"][model][split][LABEL_REPORT] for s in per_seed]
            sur = [s["models"][model][split][SURVIVAL_REPORT] for s in per_seed]
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
    """The published study's claims as point comparisons of the seed means (None where undefined); they
    carry no uncertainty; the CI-backed verdicts are results["claims"] (paired.py)."""
    checks = {}

    def cmp(name, a, b, split, op=">", margin=0.0):
        va, vb = _mean(summary, a, split), _mean(summary, b, split)
        ok = None if va is None or vb is None else (va > vb + margin if op == ">" else va >= vb - margin)
        checks[f"{name} ({split})"] = {"holds": ok, "a": va, "b": vb, "claim": f"{a} {op} {b}"}

    for split in EVAL_SETS:
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


# ---------------------------------------------------------------- results.json

def write_results(preset: Preset, per_seed: list[dict], paired: dict, stage_seconds: dict, stage_cpu: dict,
                  command: str, out: Path) -> dict:
    """results.json, results.md and the ROC figures (one per held-out set) of the whole benchmark."""
    results = {
        "benchmark": "ssl_gain", "command": command or "benchmarks.research.ssl_gain.run_benchmark",
        "date": datetime.now().strftime("%Y-%m-%d %H:%M"), "machine": _machine(), "preset": asdict(preset),
        "seeds": list(preset.seeds), "models": {m: MODELS[m][0] for m in MODELS},
        "published": {m: {"test": p[0], "external": p[1]} for m, (_, p) in MODELS.items() if p},
        "survival_mode": ("multitask fine-tuning (BCE + Cox) of every ViT / clinical model; radiomics and the "
                          "linear clinical baselines: separate Cox models; all on the classification splits")
        if preset.survival == MULTITASK.name else
        ("classification fine-tuning for every model; separate survival fine-tuning of mim, scratch and "
         "clinical_only (and a radiomics Cox model) on event-stratified splits"),
        "per_seed": per_seed, **aggregate(preset, per_seed),
        "claims": paired["claims"], "non_inferiority_margin": paired["non_inferiority_margin"],
        "paired_vs_" + REFERENCE: paired["vs_" + REFERENCE],
        "paired_bootstrap": {k: paired[k] for k in ("n_boot", "boot_seed", "diff")},
        "stage_seconds": stage_seconds, "total_stage_seconds": round(sum(stage_seconds.values()), 1),
        "stage_cpu_seconds": stage_cpu, "total_stage_cpu_seconds": round(sum(stage_cpu.values()), 1),
    }
    curve = out / "label_curve.json"
    if curve.is_file():
        results["label_curve"] = json.loads(curve.read_text())
    results["figures"] = roc_figures(results, out)
    # the large sets' curves (~550 points per model and seed) stay in each seed's evaluation.json
    results["per_seed"] = [s | {"curves": {k: v for k, v in s["curves"].items() if k not in LARGE_SETS}}
                           for s in per_seed]
    write_json(out / "results.json", _jsonable(results))
    write_text(out / "results.md", results_markdown(results))
    return results


def _machine() -> str:
    try:
        import torch
        dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
        tv = torch.__version__
    except Exception:  # pragma: no cover
        dev, tv = "unknown", "unknown"
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, {dev}, Python {platform.python_version()}, torch {tv}"


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


# ---------------------------------------------------------------- results.md

def _fmt(x, digits=3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _point_ci(value: float, ci) -> str:
    return f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def _cell(seed_entries: list[dict], summary: dict, key: str) -> str:
    s = summary.get(key, {})
    if s.get("mean") is None:
        return f"n/a ({s.get('reason', 'undefined')})"
    if s["n_seeds"] == 1:
        return _point_ci(s["mean"], seed_entries[0].get("ci"))
    return f"{s['mean']:.3f} ± {s['sd']:.3f} ({s['min']:.3f}–{s['max']:.3f})"


def _p_cell(entry: dict) -> str:
    p = entry.get("p_vs_" + REFERENCE)
    if not p:
        return "—"
    return ", ".join("n/a" if v is None else f"{v:.2g}" for v in p["per_seed"])


def _models(results: dict) -> list[str]:
    """The table's rows: the fixed models, then every fusion run, in that order; only those evaluated."""
    summ = results["summary"]
    return [m for m in list(MODELS) + [m for m in summ if m not in MODELS] if m in summ]


def results_markdown(results: dict) -> str:
    lines = _header(results) + _main_table(results) + _fusion_choice(results) + _per_seed_table(results)
    lines += _paired_table(results) + _claims_table(results) + _claims(results)
    if results.get("label_curve"):
        from benchmarks.research.ssl_gain.label_curve import markdown as label_curve_markdown
        lines += label_curve_markdown(results["label_curve"])
    lines += _stage_table(results)
    lines += ["", f"Published numbers: {PUBLISHED_SOURCE}; measured ones come from a synthetic cohort "
              "and a much smaller model and budget, so only the ordering is comparable.", ""]
    return "\n".join(lines)


def _how(results: dict) -> str:
    return "mean ± SD over seeds (min–max)" if len(results["seeds"]) > 1 else "point [95% CI]"


def _header(results: dict) -> list[str]:
    preset, seeds, how = results["preset"], results["seeds"], _how(results)
    return [
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
        f"Large evaluation sets (never trained on or selected on): test_large, {preset['n_test_large']} site-A "
        f"subjects, and external_large, {preset['n_external_large']} site-B subjects, from their own data.synth draw.",
        f"Survival: {results['survival_mode']}.",
        "",
        f"AUC on the fold-ensemble predictions ({how}; single seed: DeLong 95% CI). "
        f"p: paired DeLong against the MiM ViT, per seed. C-index: Harrell's, {how.replace('DeLong', 'bootstrap')}.",
        "",
    ]


def _main_table(results: dict) -> list[str]:
    summ, per_seed = results["summary"], results["per_seed"]
    lines = ["| model | test AUC (published) | test AUC (measured) | p vs MiM | external AUC (published) "
             "| external AUC (measured) | p vs MiM | test_large AUC | external_large AUC "
             "| test C-index | external C-index | test_large C-index | external_large C-index |",
             "| --- " * 13 + "|"]
    for m in _models(results):
        label, pub = MODELS[m] if m in MODELS else \
            (f"MiM ViT + {m.split('_', 1)[-1]} fusion (every fusion run is listed)", None)
        if m == "multimodal":
            label += f" [chosen: {', '.join(s['chosen_fusion'] for s in per_seed)}]"
        cells = [label]
        for i, split in enumerate(TEST_SETS):
            seed_cls = [s["models"][m][split][LABEL_REPORT] for s in per_seed]
            cells += [_fmt(pub[i]) if pub else "—", _cell(seed_cls, summ[m][split], "auc"), _p_cell(summ[m][split])]
        for split in LARGE_SETS:
            cells.append(_cell([s["models"][m][split][LABEL_REPORT] for s in per_seed], summ[m][split], "auc"))
        for split in EVAL_SETS:
            seed_sur = [s["models"][m][split][SURVIVAL_REPORT] for s in per_seed]
            cells.append(_cell(seed_sur, summ[m][split], "c_index"))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _diff_cell(c: dict) -> str:
    if c.get("diff") is None:
        return f"n/a ({c.get('reason', 'undefined')})"
    ci = c.get("ci")
    return f"{c['diff']:+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else f" (no CI: {c.get('reason')})")


def _paired_table(results: dict) -> list[str]:
    vs = results["paired_vs_" + REFERENCE]
    lines = ["", f"Paired differences against the MiM ViT (model − MiM; seed-averaged, 95% percentile CI from "
             f"{results['paired_bootstrap']['n_boot']} patient resamples, both models scored on each):", "",
             "| model | " + " | ".join(f"{s} ΔAUC" for s in EVAL_SETS) + " | "
             + " | ".join(f"{s} ΔC-index" for s in EVAL_SETS) + " |", "| --- " * (1 + 2 * len(EVAL_SETS)) + "|"]
    for m in _models(results):
        if m in vs:
            cells = [_diff_cell(vs[m][s][metric]) for metric in ("auc", "c_index") for s in EVAL_SETS]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def _claims_table(results: dict) -> list[str]:
    margin = results["non_inferiority_margin"]
    lines = ["", f"Claims of the published study, and of the default model (`best`, `survival`: "
             f"{results['claims'][-1]['models'][0]}) against the baselines a user fits first, decided by the "
             f"paired bootstrap CI of the difference a − b in the claim's metric: "
             f"`X>Y` holds when the CI's lower bound is > 0; `X>=Y` (non-inferiority) when it is > −δ, "
             f"δ = {margin} AUC. `n/a`: no CI (too few resamples where both values exist).", "",
             "| claim | model a | model b | metric | split | a | b | a − b | 95% CI | holds |", "| --- " * 10 + "|"]
    for c in results["claims"]:
        verdict = {True: "**yes**", False: "no", None: "n/a"}[c["holds"]]
        ci = "—" if c["ci"] is None else f"[{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}]"
        diff = "—" if c["diff"] is None else f"{c['diff']:+.3f}"
        lines.append(f"| {c['name']} | {c['models'][0]} | {c['models'][1]} | {c.get('metric', 'auc')} | {c['split']} "
                     f"| {_fmt(c['a'])} | {_fmt(c['b'])} | {diff} | {ci} | {verdict} |")
    return lines


def _fusion_choice(results: dict) -> list[str]:
    lines = ["", "Fusion chosen per seed on pooled out-of-fold validation AUC:", ""]
    for s in results["per_seed"]:
        vals = ", ".join(f"{f} {_fmt(v.get('auc'))}" for f, v in s["fusion_val_auc"].items())
        lines.append(f"- seed {s['seed']}: {vals} -> **{s['chosen_fusion']}**")
    return lines


def _per_seed_table(results: dict) -> list[str]:
    lines = ["", "Per-seed AUCs with DeLong 95% CIs:", "",
             "| model | seed | " + " | ".join(f"{s} AUC [95% CI]" for s in EVAL_SETS) + " | val AUC (OOF) |",
             "| --- " * (3 + len(EVAL_SETS)) + "|"]
    for m in _models(results):
        for s in results["per_seed"]:
            cls = [s["models"][m][split][LABEL_REPORT] for split in EVAL_SETS + ("val",)]
            cells = [f"n/a ({c.get('reason')})" if c.get("auc") is None else _point_ci(c["auc"], c.get("ci"))
                     for c in cls]
            lines.append(f"| {m} | {s['seed']} | " + " | ".join(cells) + " |")
    return lines


def _claims(results: dict) -> list[str]:
    lines = ["", "The same claims as point comparisons of the seed means (no uncertainty; not a verdict):", ""]
    for name, c in results["ordering"].items():
        verdict = {True: "holds", False: "does not hold", None: "undefined"}[c["holds"]]
        lines.append(f"- {name}: **{verdict}** ({c['claim']}: {_fmt(c['a'])} vs {_fmt(c['b'])})")
    return lines


def _stage_table(results: dict) -> list[str]:
    lines = ["", "Stage times (wall s / CPU-s, summed over seeds):", "",
             "| stage | wall s | CPU-s |", "| --- | --- | --- |"]
    groups: dict[str, list[float]] = {}
    for name, wall in results["stage_seconds"].items():
        key = name.split(" · ", 1)[-1].split(" (", 1)[0]  # "seed 0 · ft_mim_none (multitask)" -> "ft_mim_none"
        g = groups.setdefault(key, [0.0, 0.0])
        g[0] += wall
        g[1] += results["stage_cpu_seconds"].get(name, 0.0)
    return lines + [f"| {key} | {wall:.0f} | {cpu:.0f} |" for key, (wall, cpu) in groups.items()]


# ---------------------------------------------------------------- figures

SET_TITLES = {"test": "same-site test", "external": "external test", "test_large": "large same-site set",
              "external_large": "large external set"}

def roc_figures(results: dict, out: Path) -> list[str]:
    from finetune.figures import plot_roc, write_message
    first = results["per_seed"][0]
    written = []
    for split in EVAL_SETS:
        curves = {}
        for model, c in first["curves"].get(split, {}).items():
            name = model if model != "multimodal" else f"multimodal ({first['chosen_fusion']})"
            curves[name] = (np.asarray(c["label"], int), np.asarray(c["score"], float))
        path = out / f"roc_{split}.png"
        title = f"ROC, {SET_TITLES[split]} (seed {first['seed']})"
        if curves:
            plot_roc(curves, path, ci_band=results["preset"]["roc_band_boot"] > 0,
                     n_boot=results["preset"]["roc_band_boot"], seed=first["seed"], title=title)
        else:
            write_message(path, title, "no predictions")
        written.append(path.name)
    return written
