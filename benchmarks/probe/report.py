"""The probe's table, verdict lines and probe.md, from the JSON-ready results of `run.run_setup`."""
from __future__ import annotations

import math

from benchmarks.probe.run import VERDICT_GROUP


def _f(x: float, digits: int = 3) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _pm(mean: float, sd: float) -> str:
    return f"{_f(mean)} ± {_f(sd)}"


def table(results: dict) -> list[str]:
    """Markdown rows: every encoder and the random controls per feature group, the baselines, the oracle."""
    latents = [z.removeprefix("z_") for z in results["latents"]]
    head = ["model", "features", "AUC", "mean R²", *[f"R² {z}" for z in latents]]
    rows = [head, ["---"] * len(head)]
    for si, setup in enumerate(results["setups"]):
        tag = f" [setup {si + 1}]" if len(results["setups"]) > 1 else ""
        for enc in setup["encoders"]:
            for g, s in enc["groups"].items():
                rows.append([enc["path"] + tag, g, _f(s["auc"]), _f(s["r2_mean"]), *map(_f, s["r2"])])
        n = len(setup["random"]["seeds"])
        for g, s in setup["random"]["summary"].items():
            rows.append([f"random init (mean ± SD, {n} seeds){tag}", g, _pm(s["auc_mean"], s["auc_sd"]),
                         _pm(s["r2_mean_mean"], s["r2_mean_sd"]), *map(_f, s["r2"])])
        for name, label in (("pixel", "pixels: crop at 8³ + lesion histogram"),
                            ("handmade", "hand-made: finetune.baselines.radiomics features")):
            s = setup["baselines"][name]["groups"]["—"]
            rows.append([label + tag, "—", _f(s["auc"]), _f(s["r2_mean"]), *map(_f, s["r2"])])
    if "latents_auc" in results["oracle"]:  # probe.json files written before this row existed lack it
        rows.append(["oracle: logistic on the true latents (image-only ceiling)", "—",
                     _f(results["oracle"]["latents_auc"]), "1 (by definition)", *["—"] * len(latents)])
    rows.append(["oracle: true_prob of the generator (image + clinical)", "—", _f(results["oracle"]["auc"]),
                 "1 (by definition)", *["—"] * len(latents)])
    return ["| " + " | ".join(r) + " |" for r in rows]


def geometry_table(results: dict) -> list[str]:
    """Markdown rows: the scale and shape of the features fine-tuning's head reads, encoders against random init."""
    from benchmarks.probe.geometry import GEOMETRY_GROUP
    stats = ("median_sd", "mean_norm", "anisotropy", "effective_rank", "top_pc_share")
    rows = [["model", *stats], ["---"] * (len(stats) + 1)]
    for setup in results["setups"]:
        for enc in setup["encoders"]:
            if "geometry" in enc:
                rows.append([enc["path"], *(_f(enc["geometry"][k]) for k in stats)])
        if "geometry" in setup["random"]:
            n = len(setup["random"]["seeds"])
            rows.append([f"random init (mean ± SD, {n} seeds)", *(_pm(*setup["random"]["geometry"][k]) for k in stats)])
    if len(rows) == 2:  # probe.json files written before geometry was measured
        return []
    return [f"Feature geometry of the '{GEOMETRY_GROUP}' features (what fine-tuning's mask-pooled head reads; "
            "benchmarks/probe/geometry.py):", "", *("| " + " | ".join(r) + " |" for r in rows), ""]


def _call(ci: list[float]) -> str:
    return "better" if ci[0] > 0 else "worse" if ci[1] < 0 else "no difference"


def verdict(enc: dict, random_summary: dict) -> str:
    """One line: pretrained − random mean on the concatenated features, in random SDs, with the CI."""
    v, r = enc["vs_random"][VERDICT_GROUP], random_summary[VERDICT_GROUP]
    s = enc["groups"][VERDICT_GROUP]
    calls = (_call(v["auc_ci"]), _call(v["r2_mean_ci"]))
    word = ("GAIN" if "better" in calls and "worse" not in calls else
            "LOSS" if "worse" in calls and "better" not in calls else
            "MIXED" if "better" in calls else "NO GAIN")
    return (f"verdict {enc['path']}: {word} | AUC {_f(s['auc'])} vs random {_pm(r['auc_mean'], r['auc_sd'])}: "
            f"{_f(v['z_auc'], 1)} SD, Δ {v['delta_auc']:+.3f} [95% CI {v['auc_ci'][0]:+.3f}, {v['auc_ci'][1]:+.3f}] "
            f"({calls[0]}) | mean R² {_f(s['r2_mean'])} vs random {_pm(r['r2_mean_mean'], r['r2_mean_sd'])}: "
            f"{_f(v['z_r2_mean'], 1)} SD, Δ {v['delta_r2_mean']:+.3f} "
            f"[95% CI {v['r2_mean_ci'][0]:+.3f}, {v['r2_mean_ci'][1]:+.3f}] ({calls[1]})")


def verdict_lines(results: dict) -> list[str]:
    lines = [verdict(enc, setup["random"]["summary"]) for setup in results["setups"] for enc in setup["encoders"]]
    if not lines:  # --random_only: the level a pretrained encoder has to beat
        for setup in results["setups"]:
            r = setup["random"]["summary"][VERDICT_GROUP]
            lines.append(f"verdict: no pretrained encoder probed (--random_only); random init "
                         f"AUC {_pm(r['auc_mean'], r['auc_sd'])}, mean R² {_pm(r['r2_mean_mean'], r['r2_mean_sd'])}")
    return lines


def markdown(results: dict) -> str:
    p, c = results["protocol"], results["cohort"]
    lines = [
        "# Frozen-feature probe", "",
        f"`{results['command']}`  ", f"{results['date']}, {results['machine']}", "",
        f"Cohort: {c['n_lesions']} lesions of {c['n_patients']} patients (data.synth seed {c['seed']}, "
        f"progression {c['progression_fraction']:.2f}), `{c['dir']}`.", "",
        f"Protocol: patient-grouped stratified {p['folds']}-fold CV × {p['repeats']} repeats (splits in "
        f"`{p['splits']}`); out-of-fold predictions pooled per repeat, scores averaged over repeats. Label: "
        f"{p['label_model']}. Latents: {p['latent_model']}. Features: {p['features']} "
        f"Random controls: seeds {p['random_seeds']}. Δ CIs: paired bootstrap over patients "
        f"({p['n_boot']} resamples) of (encoder − random mean), on the '{VERDICT_GROUP}' features.", "",
        *table(results), "", *verdict_lines(results), "", *geometry_table(results),
        "Seconds per encoder (features + read-outs): "
        + ", ".join(f"{k} {v:.1f}" for k, v in results["seconds"]["per_encoder"].items()) + ".", ""]
    return "\n".join(lines)
