"""Does self-supervised pretraining pay off? The whole comparison, end to end, on the synthetic cohort.

    python -m benchmarks.research.ssl_gain --preset cpu|gpu --out DIR [--seeds 0 1 2] [--toy] [--show]

Shaped like the published study (necrosis vs progression after radiosurgery): a large unlabelled
pretraining set; ~109 labelled patients with 20% held out at the same site; ~28 external patients
from a second site with a shifted acquisition. On identical patient-level splits it runs

    1. mim           MiM-pretrained ViT fine-tuned on [image, mask]            (fusion none)
    2. multimodal    the same + clinical fusion, best of concat/film/tokens by pooled OOF val AUC
    3. scratch       the same ViT from random init                               (fusion none)
    4. mae           plain MAE pretraining (MiM with L = 1, same steps), fine-tuned (fusion none)
    5. radiomics     hand-crafted lesion + peritumoral features, penalised linear model
    6. clinical_only clinical variables only (the ViT pipeline's clinical_only fusion)
    7. clinical_linear    the clinical variables in a penalised logistic / Cox model (sklearn / sksurv)
    8. radiomics_clinical radiomics + clinical variables in one penalised linear model
       oracle        the generative model's own true_prob / true_risk (oracle.csv): the ceiling

and reports AUC with a 95% DeLong CI on the same-site and external test sets (fold-ensemble rows),
a paired DeLong p against (1), and Harrell's C with a bootstrap CI, per seed (pretraining seed =
split seed) and as mean / SD over seeds. The same is reported on two large sets from their own draw
of the generator (test_large: site A, external_large: site B; >= 500 patients each in the cpu / gpu
presets), never used to train or select anything, which are what can order the models: every model
gets a paired patient-bootstrap CI of its AUC and C-index difference to (1) on all four held-out sets
(paired.py), and the published claims (mim>scratch, mim>=mae, mim>radiomics, multimodal>=mim,
radiomics>scratch) are decided by those CIs (">": lower bound > 0; ">=": > -0.02), as are the default model's
(the hybrid, which python -m finetune fits by default: here the MiM ViT's score stacked with the baselines)
against the baselines a user fits first: best>radiomics+clinical (AUC) and survival>clinical_only (Harrell's C
against clinical_linear's Cox model).

Survival: presets with `survival = "multitask"` train every ViT / clinical model with the multitask
head (BCE + Cox), so one run gives both scores on the same splits; `survival = "separate"` trains
classification models and, for mim, scratch and clinical_only, survival models on their own
event-stratified splits (the fusion rows, the default model's included, then have no survival score).
Radiomics and the linear clinical baselines fit a logistic model and a Cox model separately in both modes.

Writes DIR/results.json (with `claims`), DIR/results.md (table next to the published numbers, paired
differences, claims), DIR/roc_{test,external,test_large,external_large}.png (first seed), and every
stage's outputs under DIR. A stage whose outputs exist
is skipped, so a crashed run continues where it stopped (pretraining also resumes from its last
checkpoint and fine-tuning from its finished folds).

Layout: presets.py (models, presets, runs), stages.py (configs, stage runs, the driver),
evaluation.py (one seed, through finetune.evaluate / finetune.metrics), paired.py (paired bootstrap
over seeds, claims), report.py (aggregation, results.md, figures); this file is the CLI.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from benchmarks.research.ssl_gain.presets import (FUSIONS, MODELS, PRESETS, REFERENCE, TEST_SETS, TOY, Preset, Run,
                                                  finetune_runs, resolve_preset)
from benchmarks.research.ssl_gain.stages import preset_levels, pretrain_config, run_benchmark, run_config
from core.errors import InputError, cli_entry

# InputError is what a bad preset, seed list or --out raises.
__all__ = ["FUSIONS", "MODELS", "PRESETS", "REFERENCE", "TEST_SETS", "TOY", "InputError", "Preset", "Run",
           "finetune_runs", "main", "resolve_preset", "run_benchmark"]


def show(preset: Preset, out: Path) -> None:
    """Print the resolved preset and the configs every stage would use (builds them, so they are checked)."""
    from core.config import to_dict
    print(json.dumps(asdict(preset), indent=2))
    for levels in (preset_levels(preset), 1):
        cfg = pretrain_config(preset, out, preset.seeds[0], levels)
        print(f"pretrain (levels={levels}):", json.dumps(to_dict(cfg)))
    for run in finetune_runs(preset):
        cfg = run_config(preset, out, preset.seeds[0], run)
        print(f"{run.name}:", json.dumps({k: v for k, v in to_dict(cfg).items() if k not in ("model", "prep", "optim")}))


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(allow_abbrev=False, prog="python -m benchmarks.research.ssl_gain", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", required=True, choices=sorted(PRESETS))
    ap.add_argument("--out", required=True, help="output folder (a rerun skips the stages already done there)")
    ap.add_argument("--seeds", type=int, nargs="+", help="seeds (pretraining + splits); default: the preset's")
    ap.add_argument("--toy", action="store_true", help="tiny cohort and budget: plumbing only (tests)")
    ap.add_argument("--show", action="store_true", help="print the resolved preset and stage configs, then exit")
    return ap.parse_args(argv)


@cli_entry
def main(argv=None) -> int:
    args = parse_args(argv)
    preset = resolve_preset(args.preset, args.toy, args.seeds)
    out = Path(args.out)
    if args.show:
        show(preset, out)
        return 0
    command = "python -m benchmarks.research.ssl_gain " + " ".join(sys.argv[1:] if argv is None else argv)
    run_benchmark(preset, out, command)
    return 0
