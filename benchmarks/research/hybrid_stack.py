"""Issue 33, item 3, measured before it is built: would a stacked hybrid (deep image score + radiomics +
clinical) beat radiomics + clinical on the large evaluation sets?

Reads the predictions of one `python -m benchmarks.research.ssl_gain` seed and fits, with
finetune.baselines.hybrid (the stacker's one home), on the pooled out-of-fold `val` rows only (each row
predicted by a model that never saw it), a second-level model:

- label: standardised L2 logistic regression over [the image run's logit, radiomics + clinical's logit]
  (variant "+clinical": the clinical columns encoded by finetune.clinical.ClinicalSchema beside them);
- survival: ridge Cox (sksurv CoxPHSurvivalAnalysis) over [the image run's risk, the clinical Cox risk,
  radiomics + clinical's risk] (and the same "+clinical" variant).

The penalty is chosen by patient-grouped inner CV on those val rows. The fitted stacker is applied to each
held-out set (the image run's fold ensemble, the baselines' all-training-rows model) and scored there with
finetune.baselines.compare: its AUC (DeLong CI) / Harrell's C (patient-bootstrap CI) and its paired
patient-bootstrap difference to every first-level model. Held-out sets are for reporting only: nothing
is chosen on them.

    python -m benchmarks.research.hybrid_stack --ssl_gain runs/ssl_gain_cpu_s0 --seed 0 --out runs/hybrid_stack
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
from pathlib import Path

import pandas as pd

from benchmarks.research.ssl_gain.presets import LARGE_DIR, LARGE_SETS
from core.atomic import write_json, write_text
from core.errors import InputError, cli_entry
from data.manifest import clinical_columns
from finetune.baselines.compare import compare_baselines
from finetune.baselines.hybrid import FIT_SPLIT, stack_predictions
from finetune.evaluate import read_predictions
from models.tasks import MULTITASK

IMAGE_RUN = "ft_mim_concat"
# task -> (score column, {input name: run folder, None = the image run}); the first-level models
TASKS = {
    "label": ("prob", {"image": None, "radiomics_clinical": "radiomics_clinical_classification"}),
    "survival": ("risk", {"image": None, "clinical_linear": "clinical_linear_survival",
                          "radiomics_clinical": "radiomics_clinical_survival"}),
}
HYBRID_TASK = {"label": "classification", "survival": "survival"}  # this script's task names -> the registry's
OUTCOME_FILES = ("cohort/manifest.csv", "cohort/external.csv", f"{LARGE_DIR}/test_large.csv",
                 f"{LARGE_DIR}/external_large.csv")


# ---------------------------------------------------------------- inputs

def read_outcomes(root: Path) -> tuple[pd.DataFrame, list[str]]:
    """(subject_id, patient_id, label, time, event and the clinical columns of every cohort file present;
    the clinical columns' names). Image and mask paths are left out: their names are not the stacker's."""
    files = [root / f for f in OUTCOME_FILES if (root / f).is_file()]
    if not files:
        raise InputError(f"--ssl_gain {root}: none of {list(OUTCOME_FILES)} found")
    out = pd.concat([MULTITASK.read_manifest(f, check_files=False) for f in files], ignore_index=True)
    out["subject_id"] = out["subject_id"].astype(str)
    out["patient_id"] = out["patient_id"].astype(str)
    clinical = [c for c in clinical_columns(out) if c != "patient_id"]
    return out[["subject_id", "patient_id", "label", "time", "event"] + clinical], clinical


def read_runs(seed_dir: Path, image_run: str) -> dict[str, pd.DataFrame]:
    """{run folder: predictions} of every first-level model; InputError naming a missing folder or file."""
    runs = {image_run} | {r for _, inputs in TASKS.values() for r in inputs.values() if r}
    out = {}
    for run in sorted(runs):
        folder = seed_dir / run
        if not folder.is_dir():
            raise InputError(f"run folder {folder}: not found (expected the ssl_gain run {run!r})")
        out[run] = read_predictions(folder / "predictions.csv")
    return out


def stack_task(task: str, preds: dict, outcomes: pd.DataFrame, image_run: str, sets: list[str],
               clinical: list[str], n_boot: int, seed: int) -> dict:
    """Fit both stackers of `task` on val rows (finetune.baselines.hybrid), score them and every first-level
    model on each set."""
    score, inputs = TASKS[task]
    inputs = {name: run or image_run for name, run in inputs.items()}
    first = {name: preds[run] for name, run in inputs.items()}
    variants = {"hybrid": []} | ({"hybrid+clinical": clinical} if clinical else {})
    result = {"inputs": inputs, "score": score, "stackers": {}, "sets": {s: {} for s in sets}}
    for v, extra in variants.items():
        rows, stacker, _ = stack_predictions(first, outcomes, HYBRID_TASK[task], sets, extra, seed)
        result["stackers"][v] = stacker.summary()
        for split in sets:
            held = rows[rows["split"] == split]
            joined = held.merge(outcomes[["subject_id", "patient_id", "label", "time", "event"]], on="subject_id")
            scored = {name: p[p["split"] == split][["subject_id", "split", "fold", score]] for name, p in first.items()}
            cmp = compare_baselines({split: joined}, {v: held} | scored, outcomes, n_boot, seed)["splits"][split]
            result["sets"][split][v] = _entries(cmp, v)
    return result


def _entries(cmp: dict, stacker: str) -> dict:
    """compare_baselines' entries as {"value", "ci", "vs": {model: stacker - model}}: the stacker's own
    entry gives its value and CI (its difference to itself is dropped)."""
    metric = next(iter(cmp[stacker]))
    own = cmp[stacker][metric]
    return {"metric": metric, "value": own["value"], "ci": own["ci"],
            "first_level": {m: {"value": e[metric]["value"], "ci": e[metric]["ci"]}
                            for m, e in cmp.items() if m != stacker},
            "vs": {m: e[metric]["model_minus_baseline"] for m, e in cmp.items() if m != stacker}}


# ---------------------------------------------------------------- CLI

def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.research.hybrid_stack", allow_abbrev=False,
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--ssl_gain", required=True, type=Path,
                    help="an ssl_gain --out folder (cohort/, cohort_large/, seed<N>/ with its runs' predictions)")
    ap.add_argument("--seed", type=int, default=0,
                    help="which seed<N> folder to read; also seeds the inner CV and the bootstrap")
    ap.add_argument("--out", required=True, type=Path, help="folder for hybrid_stack.json and hybrid_stack.md")
    ap.add_argument("--image_run", default=IMAGE_RUN,
                    help="the fine-tuning run whose prob (label) and risk (survival) is the image input")
    ap.add_argument("--sets", default=",".join(LARGE_SETS),
                    help="comma-separated held-out splits to score on (never fitted on)")
    ap.add_argument("--n_boot", type=int, default=1000, help="patient resamples of the paired bootstrap")
    ap.add_argument("--clinical", choices=("auto", "none"), default="auto",
                    help="auto: also the +clinical variant over the manifest's clinical columns; none: skip it")
    return ap.parse_args(argv)


def run(args: argparse.Namespace, command: str) -> dict:
    root = Path(args.ssl_gain)
    if not root.is_dir():
        raise InputError(f"--ssl_gain {root}: folder not found")
    seed_dir = root / f"seed{args.seed}"
    if not seed_dir.is_dir():
        raise InputError(f"run folder {seed_dir}: not found (--seed {args.seed})")
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    if not sets or FIT_SPLIT in sets:
        raise InputError(f"--sets {args.sets!r}: name held-out splits, never {FIT_SPLIT!r} (the stackers' fit)")
    outcomes, clinical = read_outcomes(root)
    preds = read_runs(seed_dir, args.image_run)
    clinical = [] if args.clinical == "none" else clinical
    tasks = {t: stack_task(t, preds, outcomes, args.image_run, sets, clinical, args.n_boot, args.seed)
             for t in TASKS}
    return {"command": command, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"node": platform.node(), "platform": platform.platform(), "cpus": os.cpu_count()},
            "ssl_gain": str(root), "seed": args.seed, "image_run": args.image_run, "sets": sets,
            "n_boot": args.n_boot, "clinical_columns": clinical, "tasks": tasks}


def _fmt(v, ci=None, sign="") -> str:
    if v is None:
        return "n/a"
    return f"{v:{sign}.3f}" + (f" [{ci[0]:{sign}.3f}, {ci[1]:{sign}.3f}]" if ci else "")


def format_table(result: dict) -> str:
    """One table: per set and task, each stacker's value and its paired difference to each first-level model."""
    lines = ["| set | task | stacker | stacker AUC / C [95% CI] | first-level model: its value; stacker - it "
             "[paired 95% CI] |", "| --- | --- | --- | --- | --- |"]
    for task, t in result["tasks"].items():
        for split, stackers in t["sets"].items():
            for name, e in stackers.items():
                cells = "; ".join(f"{m}: {_fmt(fl['value'], fl['ci'])}; "
                                  f"{_fmt(e['vs'][m]['diff'], e['vs'][m]['ci'], '+')}"
                                  for m, fl in e["first_level"].items())
                lines.append(f"| {split} | {task} ({e['metric']}) | {name} | {_fmt(e['value'], e['ci'])} | {cells} |")
    head = (f"Stackers fitted on the {FIT_SPLIT} rows only (out-of-fold, n = "
            f"{result['tasks']['label']['stackers']['hybrid']['n_fit']}), seed {result['seed']}, image run "
            f"{result['image_run']}, {result['n_boot']} patient resamples. Command: `{result['command']}`")
    return head + "\n\n" + "\n".join(lines) + "\n"


@cli_entry
def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python -m benchmarks.research.hybrid_stack " + shlex.join(sys.argv[1:] if argv is None else argv)
    result = run(args, command)
    write_json(Path(args.out) / "hybrid_stack.json", result)
    table = format_table(result)
    write_text(Path(args.out) / "hybrid_stack.md", table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
