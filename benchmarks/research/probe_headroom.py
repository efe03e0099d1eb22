"""How much latent R² the probe's AUC needs: the label read out from noisy copies of the true latents.

    python -m benchmarks.research.probe_headroom --probe RUN/probe.json --out DIR [--r2 0.1 0.2 ...] [--draws 5]
        [--margin 0.05]

The probe scores an encoder twice: the R² with which its features carry the generator's latents, and the
AUC of the label read from them. The label depends on the image only through those latents, so the two are
tied. This tool measures the tie on the probe's own cohort, splits and read-outs. Each latent z_k is replaced
by x_k = z_k + e_k, with e_k ~ N(0, var(z_k) (1 − r) / r): alone, x_k carries z_k at R² r. The seven x_k are
then scored exactly as the probe scores features (`evaluate.oof_label`, `oof_latents`), so both axes of the
curve are the probe's own: the mean latent R² its ridge reads out (above r, since the latents share one
factor and each x_k also tells of the others) and the label AUC its logistic reads out. Averaged over
--draws noise draws; at r = 1 the AUC is the probe's image-only ceiling row.

- The curve: one point per noise level in --r2, the same r for every latent.
- Each row of the probe (its encoders on the "all" group, the random-init mean, the pixel and hand-made
  baselines) is placed by its measured mean R² and AUC, beside the AUC the curve gives at that R². A row well
  below the curve carries the latents with more estimation noise than seven clean numbers would (the
  probe's "all" group has hundreds of columns), or carries them unevenly.
- The bar, per setup of the probe: the mean R² at which the curve reaches the curve's AUC at the random
  init's R² plus --margin (the issue's +0.05). That R² minus the random init's is the R² gain the AUC
  margin asks for, under this model.

Writes DIR/headroom.png, DIR/headroom.json (every number, the command, date and machine) and DIR/headroom.md.
Reads only the cohort's manifest.csv, oracle.csv and the probe's saved splits (never redrawn here), so it
takes a minute or two on one core.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from benchmarks.common import command_line, machine, today
from benchmarks.probe import evaluate as ev
from benchmarks.probe.cohort import ProbeCohort, load_labels
from benchmarks.probe.report import _f
from benchmarks.probe.run import VERDICT_GROUP, load_or_make_splits, probe_matrix
from core.atomic import write_json, write_png, write_text
from core.errors import InputError, cli_entry

DEFAULT_R2 = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)
MIN_R2 = 1e-3  # a latent read out at R² <= 0 carries nothing: it enters as (almost) pure noise


def noisy_latents(Z: np.ndarray, r2: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[N, K]: Z [N, K] plus independent Gaussian noise per column, sized so that the linear read-out of
    each z_k from its own noisy copy alone has R² r2[k]."""
    r = np.clip(np.asarray(r2, float), MIN_R2, 1.0)  # [K]
    sd = Z.std(0) * np.sqrt((1.0 - r) / r)  # [K]
    return Z + rng.standard_normal(Z.shape) * sd


def curve_point(cohort: ProbeCohort, splits: ev.Splits, r2: float, draws: int, seed: int, cv_seed: int) -> dict:
    """The probe's out-of-fold label AUC and mean latent R² from noisy latents at noise level r2."""
    Z = cohort.latents.to_numpy(float)  # [N, K]
    auc, r2_mean = [], []
    for d in range(draws):
        # The same standard-normal draws at every noise level (seeded by draw, not by r2): the curve's points
        # differ by the noise's size only, so it is smooth in r2 without many draws.
        X = noisy_latents(Z, np.full(Z.shape[1], r2), np.random.default_rng([seed, d]))  # [N, K]
        s = probe_matrix(X, cohort, splits, cv_seed)["score"]  # scored exactly as the probe scores features
        auc.append(s["auc"])
        r2_mean.append(s["r2_mean"])
    return {"noise_r2": r2, "r2_mean": float(np.mean(r2_mean)), "auc": float(np.mean(auc)),
            "auc_sd": float(np.std(auc))}


def _monotone(curve: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """([P] measured mean R², [P] running-max AUC) of the curve, by R²: noise draws can dip, the need cannot."""
    pts = sorted(curve, key=lambda c: c["r2_mean"])
    return np.array([c["r2_mean"] for c in pts]), np.maximum.accumulate([c["auc"] for c in pts])


def auc_on_curve(curve: list[dict], r2: float) -> float | None:
    """The curve's AUC at mean R² r2 (linear between points); None outside the curve's range."""
    x, y = _monotone(curve)
    return float(np.interp(r2, x, y)) if x[0] <= r2 <= x[-1] else None


def r2_on_curve(curve: list[dict], auc: float) -> float | None:
    """The smallest mean R² at which the curve reaches `auc` (linear between points); None outside its range."""
    x, y = _monotone(curve)
    if not y[0] <= auc <= y[-1]:
        return None
    i = int(np.argmax(y >= auc))  # first point at or above the target
    return float(x[0]) if i == 0 else float(np.interp(auc, y[i - 1:i + 1], x[i - 1:i + 1]))


def probe_rows(results: dict) -> list[dict]:
    """Every row of one probe.json worth placing: setup index, name, kind, measured AUC and mean R²."""
    rows = []
    for si, setup in enumerate(results["setups"]):
        ctl = setup["random"]["summary"][VERDICT_GROUP]
        rows.append({"setup": si, "name": f"random init (mean of {len(setup['random']['seeds'])})", "kind": "random",
                     "auc": ctl["auc_mean"], "r2_mean": ctl["r2_mean_mean"]})
        for name, b in setup["baselines"].items():
            s = b["groups"]["—"]
            rows.append({"setup": si, "name": name, "kind": "baseline", "auc": s["auc"], "r2_mean": s["r2_mean"]})
        for enc in setup["encoders"]:
            s = enc["groups"][VERDICT_GROUP]
            rows.append({"setup": si, "name": enc["path"], "kind": "encoder", "auc": s["auc"], "r2_mean": s["r2_mean"]})
    return rows


def read_probe(path: str) -> tuple[Path, dict, Path, list[dict]]:
    """(cohort dir, protocol, splits file, rows) of a probe.json, whose saved splits must still exist."""
    try:
        r = json.loads(Path(path).read_text())
        cohort_dir, protocol, rows = Path(r["cohort"]["dir"]), r["protocol"], probe_rows(r)
        splits = Path(protocol["splits"])
    except OSError as e:
        raise InputError(f"--probe {path}: cannot read it ({e.strerror or e})") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise InputError(f"--probe {path}: not a benchmarks.probe probe.json ({e!r})") from None
    if not splits.is_file():  # redrawing them here would score the curve on other folds than the rows
        raise InputError(f"--probe {path}: its splits file {splits} is missing; run from the folder the probe ran "
                         "in (its paths are relative to it)")
    return cohort_dir, protocol, splits, rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.research.probe_headroom", allow_abbrev=False,
                                description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    a = p.add_argument
    a("--probe", required=True, metavar="JSON",
      help="a probe.json of benchmarks.probe: its cohort, saved splits and rows (required)")
    a("--out", required=True, metavar="DIR", help="where headroom.png, headroom.json and headroom.md go (required)")
    a("--r2", type=float, nargs="+", default=list(DEFAULT_R2), metavar="R",
      help="noise levels of the curve: the R² each latent's own noisy copy carries it at, each in (0, 1] "
           f"(default: {' '.join(map(str, DEFAULT_R2))})")
    a("--draws", type=int, default=5, metavar="N", help="noise draws per point, averaged (default: 5)")
    a("--margin", type=float, default=0.05, metavar="AUC",
      help="the AUC margin over the random init whose R² cost is reported, in (0, 0.5) (default: 0.05, the "
           "issue's bar)")
    a("--seed", type=int, default=0, metavar="S", help="seed of the noise draws (default: 0)")
    return p


def check_args(args) -> None:
    if any(not 0 < r <= 1 for r in args.r2):
        raise InputError(f"--r2: every value must lie in (0, 1], got {args.r2}")
    if args.draws < 1:
        raise InputError(f"--draws: must be positive, got {args.draws}")
    if not 0 < args.margin < 0.5:  # NaN fails this too
        raise InputError(f"--margin: must lie in (0, 0.5), got {args.margin}")


def run(args, argv) -> dict:
    t0 = time.perf_counter()
    cohort_dir, protocol, split_path, rows = read_probe(args.probe)
    cohort = load_labels(cohort_dir)
    splits = load_or_make_splits(split_path, cohort, protocol["folds"], protocol["repeats"], protocol["cv_seed"])
    curve = [curve_point(cohort, splits, r, args.draws, args.seed, protocol["cv_seed"]) for r in sorted(args.r2)]
    for row in rows:
        row["curve_auc"] = auc_on_curve(curve, row["r2_mean"])
    bars = []
    for random in (r for r in rows if r["kind"] == "random"):
        base = random["curve_auc"]
        need = None if base is None else r2_on_curve(curve, base + args.margin)
        bars.append({"setup": random["setup"], "random_r2_mean": random["r2_mean"], "random_curve_auc": base,
                     "r2_needed": need, "r2_gain_needed": None if need is None else need - random["r2_mean"]})
    return {"command": command_line("benchmarks.research.probe_headroom", argv), "date": today(), "machine": machine("cpu"),
            "probe": args.probe, "cohort_dir": str(cohort_dir), "protocol": protocol, "draws": args.draws,
            "margin": args.margin, "curve": curve, "rows": rows, "bars": bars,
            "seconds": round(time.perf_counter() - t0, 1)}


def markdown(res: dict) -> str:
    lines = [f"# Latent R² against label AUC under the probe's read-outs ({res['date']})", "",
             f"`{res['command']}`", "", f"Probe {res['probe']}, cohort {res['cohort_dir']}; {res['draws']} noise "
             f"draws per point; {res['machine']}; {res['seconds']:.0f} s.", "",
             "| noise level r | mean R² (probe's ridge) | AUC (probe's logistic) | AUC SD over draws |",
             "| --- | --- | --- | --- |"]
    lines += [f"| {c['noise_r2']:.2f} | {c['r2_mean']:.3f} | {c['auc']:.3f} | {c['auc_sd']:.3f} |" for c in res["curve"]]
    lines += ["", "| setup | row | measured mean R² | measured AUC | the curve's AUC at that R² |",
              "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['setup'] + 1} | {r['name']} | {_f(r['r2_mean'])} | {_f(r['auc'])} | {_f(r['curve_auc'])} |"
              for r in res["rows"]]
    lines.append("")
    for b in res["bars"]:
        need = ("is outside the curve's range" if b["r2_needed"] is None else
                f"needs mean R² {b['r2_needed']:.3f}: a gain of {b['r2_gain_needed']:+.3f} over the random init's "
                f"{b['random_r2_mean']:.3f}")
        lines.append(f"Setup {b['setup'] + 1}: AUC {res['margin']:+.3f} over the curve at the random init's R² "
                     f"({_f(b['random_curve_auc'])}) {need}.")
    return "\n".join(lines) + "\n"


def figure(res: dict, path: Path) -> None:
    from matplotlib.figure import Figure  # Agg through the Figure object: no pyplot state
    fig = Figure(figsize=(6.5, 4.8))
    ax = fig.subplots()
    c = sorted(res["curve"], key=lambda p: p["r2_mean"])
    ax.errorbar([p["r2_mean"] for p in c], [p["auc"] for p in c], yerr=[p["auc_sd"] for p in c], color="k",
                marker="o", ms=3, capsize=2, label="the true latents plus noise")
    marks = {"random": ("s", "C0"), "baseline": ("^", "C2"), "encoder": ("o", "C3")}
    for r in res["rows"]:
        m, col = marks[r["kind"]]
        ax.plot(r["r2_mean"], r["auc"], m, color=col, ms=6)
        label = Path(r["name"]).parent.name if r["kind"] == "encoder" else r["name"].split(" (")[0]
        ax.annotate(label, (r["r2_mean"], r["auc"]), fontsize=7, xytext=(4, -10), textcoords="offset points")
    for kind, (m, col) in marks.items():
        ax.plot([], [], m, color=col, label=f"{kind} (measured)")
    for b in res["bars"]:
        if b["random_curve_auc"] is not None:
            ax.axhline(b["random_curve_auc"] + res["margin"], color="grey", ls=":", lw=1,
                       label=f"curve at random's R² + {res['margin']:.2f} AUC")
        if b["r2_needed"] is not None:
            ax.axvline(b["r2_needed"], color="grey", ls="--", lw=1, label=f"R² that needs: {b['r2_needed']:.2f}")
    ax.set(xlabel="mean latent R² (probe's ridge)", ylabel="label AUC (probe's logistic)", xlim=(0, 1.02),
           title="What latent R² buys in label AUC")
    ax.legend(fontsize=7, loc="lower right")
    write_png(path, fig)


@cli_entry
def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    check_args(args)
    res = run(args, argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    figure(res, out / "headroom.png")  # first: the one writer that could fail on content leaves no JSON behind
    write_json(out / "headroom.json", res)
    write_text(out / "headroom.md", markdown(res))
    print(markdown(res), end="")
    print(f"wrote {out / 'headroom.png'}, headroom.json and headroom.md ({res['seconds']:.0f} s)")
    return res


if __name__ == "__main__":
    main()
