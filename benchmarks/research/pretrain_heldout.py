"""Held-out pretraining loss: does a run's objective still improve on volumes it never saw, or only on its own?

    python -m benchmarks.research.pretrain_heldout --run runs/pt --heldout DIR [--train_volumes 100]
        [--heldout_volumes 100] [--epochs 1] [--seed 1234] --out DIR

The pretraining loop logs its loss on the views it trains on. On a small cohort trained for long, that loss
can keep falling because the model learns those volumes, not because its features improve: the probe then
plateaus while the training curve does not. This benchmark tells the two apart. For every complete
checkpoint of --run (and the run's own initial weights, step 0), it scores the MiM losses (per-level
reconstruction and cross-level alignment, `MiMModel.forward`, in eval mode, no gradients) on two sets of
views built exactly as the run builds its views:

- train: the first --train_volumes volumes of the run's own --data, which every checkpoint has trained on;
- held-out: the first --heldout_volumes volumes of --heldout (another folder, manifest or datalist drawn
  from the same distribution, e.g. `data.synth` with another seed), which no checkpoint has seen.

Both sets use the run's view sampler, hierarchy and targets (data.views.PretrainCrops,
pretrain.batches.HierarchyCollate), but with --seed in place of the run's seed: the views and masks are
fresh for both, so the only difference between the sets is whether the volumes were trained on. The views
and masks are built once and scored by every checkpoint, so the rows differ by weights only. Each loss
is the mean over micro-batches of the run's batch size, with its standard error over those micro-batches.

A held-out loss that falls with the training loss: the objective still generalises, and more steps pay in
loss at least. A gap (held-out minus train) that grows with steps: the run memorises its volumes, and more
distinct volumes are what it lacks.

Writes DIR/heldout.json (every number, the command, date and machine), DIR/heldout.md and DIR/heldout.png
(each loss term against steps, train and held-out). Nothing is written when the run cannot start.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import command_line, machine, today
from core.atomic import write_json, write_png, write_text
from core.config import load_config, to_dict
from core.errors import InputError, cli_entry


def read_run(run: str):
    """(the run's PretrainConfig, its complete checkpoints by step) of a pretraining output_dir."""
    from engine.checkpoints import Checkpointer
    from pretrain.config import PretrainConfig
    folder = Path(run)
    if not (folder / "config.yaml").is_file():
        raise InputError(f"--run {run}: no config.yaml; expected a pretraining output_dir (python -m pretrain)")
    cfg = load_config(PretrainConfig, folder / "config.yaml")
    ckpts = Checkpointer(folder, keep=1).complete()
    if not ckpts:
        raise InputError(f"--run {run}: no complete checkpoint under {folder / 'checkpoints'}")
    return cfg, ckpts


def checkpoint_weights(ckpt: Path, model_dict: dict) -> dict[str, torch.Tensor]:
    """The full MiM weights of a checkpoint of the loop, after checking it trained the run's model."""
    from models.export import load_checkpoint_weights, unwrap_keys
    saved = json.loads((ckpt / "run_config.json").read_text())["model"]
    if saved != model_dict:  # a resumed run with another model would be scored with the wrong module
        raise InputError(f"{ckpt}: its run_config.json has another model than the run's config.yaml")
    return unwrap_keys(load_checkpoint_weights(ckpt))


def fixed_batches(cfg, data: str, cache_dir: str, n_volumes: int, epochs: int, seed: int, show_progress: bool) -> list:
    """Micro-batches [{"levels": [...]}, ...]: the run's views and hierarchy of the first n_volumes volumes of
    `data` (only those are prepared), `epochs` passes, under `seed` instead of the run's seed."""
    from pretrain.batches import HierarchyCollate
    from pretrain.train import load_training_volumes
    view_cfg = dataclasses.replace(cfg, data=data, cache_dir=cache_dir, seed=seed)
    dataset, _ = load_training_volumes(view_cfg, show_progress, max_volumes=n_volumes)
    collate = HierarchyCollate(cfg.model, seed, rank=0)
    batches, m = [], 0
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        for start in range(0, len(dataset), cfg.batch_size):
            items = [dataset[i] for i in range(start, min(start + cfg.batch_size, len(dataset)))]
            batches.append({"levels": collate(m, items)["levels"]})
            m += 1
    return batches


@torch.no_grad()
def score(model, batches: list) -> dict[str, dict[str, float]]:
    """Per loss term ("loss", "rec_l1", ...): mean over micro-batches and its standard error."""
    model.eval()
    terms: dict[str, list[float]] = {}
    for b in batches:
        for k, v in model(b["levels"]).losses.items():
            terms.setdefault(k, []).append(float(v))
    return {k: {"mean": statistics.fmean(vals),
                "se": statistics.stdev(vals) / len(vals) ** 0.5 if len(vals) > 1 else float("nan")}
            for k, vals in terms.items()}


def initial_model(cfg):
    """The run's model with the weights it started from (pretrain.train.build seeds them the same way)."""
    from engine.steps import reseed_torch
    from models.mim import MiMModel
    reseed_torch(cfg.seed, -1)
    return MiMModel(cfg.model)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.research.pretrain_heldout", allow_abbrev=False,
                                description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    a = p.add_argument
    a("--run", required=True, metavar="DIR", help="a pretraining output_dir: its config.yaml and checkpoints (required)")
    a("--heldout", required=True, metavar="DATA",
      help="volumes the run never trained on, from the same distribution: a folder of NIfTIs, a manifest CSV or "
           "a datalist JSON (required)")
    a("--out", required=True, metavar="DIR", help="where heldout.json, heldout.md and heldout.png go (required)")
    a("--heldout_cache", default="", metavar="DIR",
      help="data.prepare cache of the held-out volumes (default: DIR/cache under --out)")
    a("--train_volumes", type=int, default=100, metavar="N",
      help="how many of the run's own volumes (the first N of its --data) form the train set (default: 100)")
    a("--heldout_volumes", type=int, default=100, metavar="N",
      help="how many held-out volumes (the first N of --heldout) form the held-out set (default: 100)")
    a("--epochs", type=int, default=1, metavar="N",
      help="passes over each set, each with other views and masks (default: 1)")
    a("--seed", type=int, default=1234, metavar="S",
      help="seed of the views and masks of both sets; not the run's, so the train set's views are fresh too "
           "(default: 1234)")
    a("--no_progress", action="store_true", help="hide the progress bars (default: shown)")
    return p


def check_args(args, cfg) -> None:
    """Every flag and both volume lists, before anything is prepared or scored."""
    from data.manifest import read_any
    for flag in ("train_volumes", "heldout_volumes", "epochs"):
        if getattr(args, flag) < 1:
            raise InputError(f"--{flag}: must be positive, got {getattr(args, flag)}")
    for flag, data, n in (("--train_volumes", cfg.data, args.train_volumes),
                          ("--heldout_volumes", args.heldout, args.heldout_volumes)):
        have = len(read_any(data))
        if n > have:
            raise InputError(f"{flag} {n}: {data} has only {have} volumes")


def run(args, argv=None) -> dict:
    from engine.logs import progress
    t0 = time.perf_counter()
    cfg, ckpts = read_run(args.run)
    check_args(args, cfg)
    model_dict = to_dict(cfg)["model"]
    cache = args.heldout_cache or str(Path(args.out) / "cache")
    show = not args.no_progress
    sets = {"train": fixed_batches(cfg, cfg.data, cfg.cache_dir, args.train_volumes, args.epochs, args.seed, show),
            "heldout": fixed_batches(cfg, args.heldout, cache, args.heldout_volumes, args.epochs, args.seed, show)}
    model = initial_model(cfg)
    rows = []
    bar = progress(len(ckpts) + 1, 0, show, "checkpoints")
    steps = [json.loads((c / "trainer_state.json").read_text())["step"] for c in ckpts]  # the loop's own record
    for step, ckpt in [(0, None), *zip(steps, ckpts)]:
        if ckpt is not None:
            model.load_state_dict(checkpoint_weights(ckpt, model_dict), strict=True)
        rows.append({"step": step, "checkpoint": str(ckpt) if ckpt else "initial weights",
                     **{name: score(model, batches) for name, batches in sets.items()}})
        bar.update(1)
    bar.close()
    return {"command": command_line("benchmarks.research.pretrain_heldout", argv), "date": today(), "machine": machine("cpu"),
            "run": args.run, "data": cfg.data, "heldout": args.heldout, "seed": args.seed, "epochs": args.epochs,
            "volumes": {"train": args.train_volumes, "heldout": args.heldout_volumes},
            "micro_batches": {name: len(b) for name, b in sets.items()}, "rows": rows,
            "seconds": round(time.perf_counter() - t0, 1)}


def gap(row: dict, term: str) -> float:
    return row["heldout"][term]["mean"] - row["train"][term]["mean"]


def markdown(res: dict) -> str:
    terms = list(res["rows"][0]["train"])
    lines = [f"# Held-out pretraining loss ({res['date']})", "", f"`{res['command']}`", "",
             f"Run {res['run']} (data {res['data']}); held-out {res['heldout']}; {res['volumes']['train']} train and "
             f"{res['volumes']['heldout']} held-out volumes, {res['epochs']} pass(es), view seed {res['seed']}; "
             f"{res['machine']}; {res['seconds']:.0f} s.", "",
             "Each cell: train / held-out (held-out minus train), mean over micro-batches; ± is the larger "
             "standard error of the two.", "",
             "| step | " + " | ".join(terms) + " |", "| ---: | " + " | ".join("---" for _ in terms) + " |"]
    for r in res["rows"]:
        cells = [f"{r['train'][t]['mean']:.4f} / {r['heldout'][t]['mean']:.4f} ({gap(r, t):+.4f} ± "
                 f"{max(r['train'][t]['se'], r['heldout'][t]['se']):.4f})" for t in terms]
        lines.append(f"| {r['step']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def figure(res: dict, path: Path) -> None:
    from matplotlib.figure import Figure  # Agg through the Figure object: no pyplot state
    terms = list(res["rows"][0]["train"])
    fig = Figure(figsize=(3.2 * len(terms), 3.4))
    axes = fig.subplots(1, len(terms), squeeze=False)[0]
    steps = [r["step"] for r in res["rows"]]
    for ax, term in zip(axes, terms):
        for name, style in (("train", "-o"), ("heldout", "--s")):
            ax.errorbar(steps, [r[name][term]["mean"] for r in res["rows"]],
                        yerr=[r[name][term]["se"] for r in res["rows"]], fmt=style, ms=3, capsize=2,
                        label=f"{name} ({res['volumes'][name]} volumes)")
        ax.set(title=term, xlabel="pretraining step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss (eval mode)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{Path(res['run']).name}: loss on trained-on vs never-seen volumes", fontsize=10)
    fig.tight_layout()
    write_png(path, fig)


@cli_entry
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    res = run(args, argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "heldout.json", res)
    text = markdown(res)
    write_text(out / "heldout.md", text)
    figure(res, out / "heldout.png")
    print(text)
    print(f"wrote {out / 'heldout.json'}, {out / 'heldout.md'}, {out / 'heldout.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
