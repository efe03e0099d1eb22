"""How much latent R² the probe's AUC needs: the label read out from noisy copies of the true latents.

    python -m benchmarks.probe.headroom --probe RUN/probe.json [--probe RUN2/probe.json ...] --out DIR
        [--r2 0.1 0.2 ...] [--draws 5] [--margin 0.05]

The probe scores an encoder twice: the R² with which its features carry the generator's latents, and the
AUC of the label read from them. The label depends on the image only through those latents, so the two are
tied. This tool measures the tie on the probe's own cohort, splits and logistic read-out. Each latent
z_k is replaced by x_k = z_k + e_k, with e_k ~ N(0, var(z_k) (1 − r) / r). The best linear read-out of z_k
from x_k then has R² r. The label is read from the seven x_k exactly as the probe reads it from features
(`evaluate.oof_label`), averaged over --draws noise draws. At r = 1 this is the probe's image-only ceiling
row.

- The curve: the AUC bought by each mean R² in --r2, with the same r for every latent.
- Each row of every --probe file (its encoders on the "all" group, the random-init mean, the pixel and
  hand-made baselines) is placed with its own per-latent R²: its predicted AUC sits beside its measured
  one. A prediction well above the measured AUC means the row's features carry the latents with more
  estimation noise than seven clean numbers would (the probe's "all" group has hundreds of columns).
- The bar: the mean R² at which the curve reaches the random init's predicted AUC plus --margin (the
  issue's +0.05). That R² minus the random init's is the R² gain the AUC margin asks for, under this
  model.

Writes DIR/headroom.json (every number, the command, date and machine), DIR/headroom.md and DIR/headroom.png.
Reads only the cohort's manifest.csv, oracle.csv and the saved splits, so it takes about a minute on one core.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from benchmarks.common import command_line, machine, today
from benchmarks.probe import evaluate as ev
from benchmarks.probe.cohort import ProbeCohort, load_labels
from benchmarks.probe.run import VERDICT_GROUP, load_or_make_splits
from data.atomic import atomic_path, write_json, write_text
from data.errors import InputError, cli_entry

DEFAULT_R2 = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.7, 1.0)
MIN_R2 = 1e-3  # a latent read out at R² <= 0 carries nothing: it enters as (almost) pure noise


def noisy_latents(Z: np.ndarray, r2: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[N, K]: Z [N, K] plus independent Gaussian noise per column, sized so that the linear read-out of
    each z_k from its noisy copy has R² r2[k]."""
    r = np.clip(np.asarray(r2, float), MIN_R2, 1.0)  # [K]
    sd = Z.std(0) * np.sqrt((1.0 - r) / r)  # [K]
    return Z + rng.standard_normal(Z.shape) * sd


def auc_at(cohort: ProbeCohort, splits: ev.Splits, r2, draws: int, seed: int, cv_seed: int) -> list[float]:
    """The probe's out-of-fold AUC of the label from noisy latents at per-latent R² `r2`, one per draw."""
    Z = cohort.latents.to_numpy(float)  # [N, K]
    r2 = np.broadcast_to(np.asarray(r2, float), (Z.shape[1],))
    aucs = []
    for d in range(draws):
        X = noisy_latents(Z, r2, np.random.default_rng([seed, d]))
        s_label = ev.oof_label(X, cohort.label, cohort.patients, splits, cv_seed)  # [R, N]
        aucs.append(float(np.mean([roc_auc_score(cohort.label, s) for s in s_label])))
    return aucs


def probe_rows(results: dict) -> list[dict]:
    """(name, measured AUC, measured mean R², per-latent R²) of every row of one probe.json worth placing."""
    rows = []
    for setup in results["setups"]:
        ctl = setup["random"]["summary"][VERDICT_GROUP]
        rows.append({"name": f"random init (mean of {len(setup['random']['seeds'])})", "auc": ctl["auc_mean"],
                     "r2_mean": ctl["r2_mean_mean"], "r2": ctl["r2"], "kind": "random"})
        for name, b in setup["baselines"].items():
            s = b["groups"]["—"]
            rows.append({"name": name, "auc": s["auc"], "r2_mean": s["r2_mean"], "r2": s["r2"], "kind": "baseline"})
        for enc in setup["encoders"]:
            s = enc["groups"][VERDICT_GROUP]
            rows.append({"name": enc["path"], "auc": s["auc"], "r2_mean": s["r2_mean"], "r2": s["r2"],
                         "kind": "encoder"})
    return rows


def read_probes(paths: list[str]) -> tuple[Path, dict, list[dict]]:
    """(cohort dir, protocol, rows) of the --probe files, which must share one cohort and one protocol."""
    loaded = []
    for p in paths:
        try:
            r = json.loads(Path(p).read_text())
            loaded.append((p, Path(r["cohort"]["dir"]), r["protocol"], probe_rows(r)))
        except FileNotFoundError:
            raise InputError(f"--probe {p}: no such file") from None
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise InputError(f"--probe {p}: not a benchmarks.probe probe.json ({e!r})") from None
    keys = {(str(c), pr["splits"]) for _, c, pr, _ in loaded}
    if len(keys) > 1:
        raise InputError(f"--probe: the files were scored on different cohorts or splits {sorted(keys)}; "
                         "give probes of one cohort")
    _, cohort_dir, protocol, _ = loaded[0]
    return cohort_dir, protocol, [row | {"probe": p} for p, _, _, rows in loaded for row in rows]


def bar_r2(curve: list[dict], target_auc: float) -> float | None:
    """The smallest mean R² at which the (running-max) curve reaches target_auc, interpolated; None if never."""
    r = np.array([c["r2"] for c in curve])
    auc = np.maximum.accumulate(np.array([c["auc"] for c in curve]))  # noise draws can dip; the need cannot
    if target_auc > auc[-1]:
        return None
    if target_auc <= auc[0]:
        return float(r[0])
    i = int(np.argmax(auc >= target_auc))
    return float(np.interp(target_auc, auc[i - 1:i + 1], r[i - 1:i + 1]))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.probe.headroom", allow_abbrev=False,
                                description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    a = p.add_argument
    a("--probe", action="append", default=[], required=True, metavar="JSON",
      help="a probe.json of benchmarks.probe; give it several times to place several probes' rows (one cohort; "
           "required)")
    a("--out", required=True, metavar="DIR", help="where headroom.json, headroom.md and headroom.png go (required)")
    a("--r2", type=float, nargs="+", default=list(DEFAULT_R2), metavar="R",
      help=f"mean R² values of the curve, each in (0, 1] (default: {' '.join(map(str, DEFAULT_R2))})")
    a("--draws", type=int, default=5, metavar="N", help="noise draws per point, averaged (default: 5)")
    a("--margin", type=float, default=0.05, metavar="AUC",
      help="the AUC margin over the random init whose R² cost is reported (default: 0.05, the issue's bar)")
    a("--seed", type=int, default=0, metavar="S", help="seed of the noise draws (default: 0)")
    return p


def run(args, argv) -> dict:
    t0 = time.perf_counter()
    cohort_dir, protocol, rows = read_probes(args.probe)
    cohort = load_labels(cohort_dir)
    splits = load_or_make_splits(Path(protocol["splits"]), cohort, protocol["folds"], protocol["repeats"],
                                 protocol["cv_seed"])

    def aucs(r2) -> np.ndarray:
        return np.array(auc_at(cohort, splits, r2, args.draws, args.seed, protocol["cv_seed"]))

    curve = []
    for r in sorted(args.r2):
        a = aucs(r)
        curve.append({"r2": r, "auc": float(a.mean()), "auc_sd": float(a.std())})
    for row in rows:
        row["predicted_auc"] = float(aucs(row["r2"]).mean())
    random = next(r for r in rows if r["kind"] == "random")
    uniform_random = float(aucs(random["r2_mean"]).mean())
    needed = bar_r2(curve, uniform_random + args.margin)
    return {"command": command_line("benchmarks.probe.headroom", argv), "date": today(), "machine": machine("cpu"),
            "cohort_dir": str(cohort_dir), "protocol": protocol, "draws": args.draws, "curve": curve, "rows": rows,
            "bar": {"margin": args.margin, "random_r2_mean": random["r2_mean"],
                    "random_auc_uniform": uniform_random, "r2_needed": needed,
                    "r2_gain_needed": None if needed is None else needed - random["r2_mean"]},
            "seconds": round(time.perf_counter() - t0, 1)}


def markdown(res: dict) -> str:
    lines = [f"# Latent R² against label AUC under the probe's read-out ({res['date']})", "",
             f"`{res['command']}`", "", f"Cohort {res['cohort_dir']}; {res['draws']} noise draws per point; "
             f"{res['machine']}; {res['seconds']:.0f} s.", "", "| mean R² (every latent) | AUC | SD over draws |",
             "| --- | --- | --- |"]
    lines += [f"| {c['r2']:.2f} | {c['auc']:.3f} | {c['auc_sd']:.3f} |" for c in res["curve"]]
    lines += ["", "| row | measured AUC | measured mean R² | AUC predicted from its per-latent R² |",
              "| --- | --- | --- | --- |"]
    lines += [f"| {r['name']} | {r['auc']:.3f} | {r['r2_mean']:.3f} | {r['predicted_auc']:.3f} |" for r in res["rows"]]
    b = res["bar"]
    need = ("beyond the curve's last point" if b["r2_needed"] is None else
            f"mean R² {b['r2_needed']:.3f}, a gain of {b['r2_gain_needed']:+.3f} over the random init's {b['random_r2_mean']:.3f}")
    lines += ["", f"AUC margin {b['margin']:+.3f} over the random init (predicted {b['random_auc_uniform']:.3f} at its "
              f"mean R², every latent alike) needs {need}."]
    return "\n".join(lines) + "\n"


def figure(res: dict, path: Path) -> None:
    from matplotlib.figure import Figure  # Agg through the Figure object: no pyplot state
    fig = Figure(figsize=(6, 4.5))
    ax = fig.subplots()
    c = res["curve"]
    ax.errorbar([p["r2"] for p in c], [p["auc"] for p in c], yerr=[p["auc_sd"] for p in c], color="k",
                marker="o", ms=3, capsize=2, label="noisy true latents (the model)")
    marks = {"random": ("s", "C0"), "baseline": ("^", "C2"), "encoder": ("o", "C3")}
    for r in res["rows"]:
        m, col = marks[r["kind"]]
        ax.plot(r["r2_mean"], r["auc"], m, color=col, ms=6)
        ax.annotate(Path(r["name"]).parent.name or r["name"], (r["r2_mean"], r["auc"]), fontsize=7,
                    xytext=(3, -9), textcoords="offset points")
    for kind, (m, col) in marks.items():
        ax.plot([], [], m, color=col, label=f"{kind} (measured)")
    b = res["bar"]
    ax.axhline(b["random_auc_uniform"] + b["margin"], color="grey", ls=":", lw=1,
               label=f"random + {b['margin']:.2f} AUC (model)")
    ax.set(xlabel="mean latent R²", ylabel="label AUC (probe read-out)", xlim=(0, 1.02),
           title="What latent R² buys in label AUC")
    ax.legend(fontsize=7, loc="lower right")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def check_args(args) -> None:
    if any(not 0 < r <= 1 for r in args.r2):
        raise InputError(f"--r2: every value must lie in (0, 1], got {args.r2}")
    if args.draws < 1:
        raise InputError(f"--draws: must be positive, got {args.draws}")


@cli_entry
def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    check_args(args)
    res = run(args, argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "headroom.json", res)
    write_text(out / "headroom.md", markdown(res))
    figure(res, out / "headroom.png")
    print(markdown(res), end="")
    print(f"wrote {out / 'headroom.json'}, headroom.md and headroom.png ({res['seconds']:.0f} s)")
    return res


if __name__ == "__main__":
    main()
