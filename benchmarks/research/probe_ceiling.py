"""The supervised ceiling of an encoder architecture under the probe: how much its frozen features can carry.

    python -m benchmarks.research.probe_ceiling --like runs/E1/encoder --out runs/probe_supervised
    python -m benchmarks.probe --encoder runs/probe_supervised/encoder --out runs/probe_supervised_probe

A random init of --like's encoder config is trained *with labels*, on a labelled data.synth cohort of its
own (seed 7007 by default: never the probe's 9001, nor a pretraining, ssl_gain or development cohort), to
predict the generator's z_* latents and the label through one linear layer on the probe's own read-out
(the mask-weighted mean token of the last block). Its crops are cut as the probe cuts them (--like's input
contract): the image channel goes in, the mask only weights the pooling. It is saved with --like's input
contract, so the probe reads it like any pretrained encoder.

What it tells (issue "Pretraining that pays"): if even this encoder gains little over random init on the
probe, the token grid and the read-out are the limit, and no self-supervised objective of this size can
pass the gate; if it gains far more, the objective and its budget are what limit pretraining.
It is a measurement, not a product path: nothing else imports it.

For an architecture nobody has pretrained yet, a 2-step pretraining writes a folder to copy: e.g.
`python -m pretrain --config launch/pretrain_cpu.yaml --data DIR --max_steps 2 --model.encoder.patch_size 8
--model.masks.child_patches 3 --output_dir runs/like_p8`, then `--like runs/like_p8/encoder`. Only its config
and input contract are read; its weights are not.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from benchmarks.common import command_line, machine, today
from benchmarks.probe.cohort import ensure_cohort, lesion_crops, load_cohort, probe_view
from benchmarks.probe.features import lesion_weights
from benchmarks.probe.run import load_encoder, random_encoder
from core.atomic import write_json
from core.errors import InputError, cli_entry
from engine.config import OptimConfig
from engine.steps import WarmupCosine
from models.vit3d import ViT3D

PROBE_SEED = 9001  # the probe cohort's seed: refused here, so the ceiling never trains on what it is scored on


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.research.probe_ceiling", allow_abbrev=False,
                                description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--like", required=True, metavar="DIR", help="encoder folder whose config and input contract are copied")
    a("--out", required=True, metavar="DIR", help="writes DIR/encoder (HF folder) and DIR/supervised.json")
    a("--seed", type=int, default=7007, help="data.synth seed of the training cohort (default: 7007)")
    a("--n_lesions", type=int, default=300, help="labelled lesions to train on (default: 300)")
    a("--cohort_dir", default="", metavar="DIR",
      help="where the training cohort is generated once (default: runs/supervised_cohort_s<seed>_n<n>)")
    a("--epochs", type=int, default=60, help="passes over the training lesions (default: 60)")
    a("--batch_size", type=int, default=16, help="lesions per step (default: 16)")
    a("--lr", type=float, default=1e-3, help="AdamW peak learning rate, cosine to 1%% (default: 1e-3)")
    a("--weight_decay", type=float, default=0.05, help="AdamW weight decay (default: 0.05)")
    a("--torch_seed", type=int, default=0, help="seed of the init, the batch order and the flips (default: 0)")
    a("--workers", type=int, default=1, help="processes generating the cohort (default: 1)")
    a("--no_progress", action="store_true", help="hide the progress bars (default: shown)")
    return p


class LatentHead(nn.Module):
    """The encoder and one linear layer on its mask-weighted last-block token: [B, 2, S^3] -> [B, K + 1]."""

    def __init__(self, encoder: ViT3D, n_latents: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.dim, n_latents + 1)  # the K latents, then the label's logit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = lesion_weights(x[:, 1:], self.encoder.config.patch_size)  # [B, N]
        tokens = self.encoder(x[:, :1])  # [B, N, D], after encoder.norm: the probe's "last" block
        return self.head((weight[..., None] * tokens).sum(1))  # [B, K + 1]


def random_flips(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Each lesion flipped along each axis with probability 1/2 (image and mask alike): [B, 2, S, S, S]."""
    for axis in (2, 3, 4):
        flip = torch.rand(len(x), generator=g) < 0.5  # [B]
        x = torch.where(flip[:, None, None, None, None], x.flip(axis), x)
    return x


def train(model: LatentHead, crops: np.ndarray, Z: np.ndarray, label: np.ndarray, args) -> list[dict]:
    """AdamW with warm-up and cosine decay; loss = MSE of the latents + BCE of the label. Returns the log."""
    g = torch.Generator().manual_seed(args.torch_seed)
    x_all = torch.from_numpy(crops)  # [N, 2, S, S, S]
    target = torch.from_numpy(np.concatenate([Z, label[:, None]], axis=1)).float()  # [N, K + 1]
    steps_per_epoch = int(np.ceil(len(x_all) / args.batch_size))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = WarmupCosine(opt, OptimConfig(lr=args.lr, min_lr=args.lr / 100, warmup_steps=steps_per_epoch),
                         max_steps=args.epochs * steps_per_epoch)
    log, step = [], 0
    for epoch in tqdm(range(args.epochs), desc="supervised", unit="epoch", disable=not args.progress):
        model.train()
        order, total = torch.randperm(len(x_all), generator=g), {"latents": 0.0, "label": 0.0}
        for i in range(0, len(order), args.batch_size):
            idx = order[i:i + args.batch_size]
            out = model(random_flips(x_all[idx], g))  # [B, K + 1]
            mse = F.mse_loss(out[:, :-1], target[idx, :-1])
            bce = F.binary_cross_entropy_with_logits(out[:, -1], target[idx, -1])
            sched.set_step(step)
            opt.zero_grad(set_to_none=True)
            (mse + bce).backward()
            opt.step()
            step += 1
            total["latents"] += mse.item() * len(idx) / len(order)
            total["label"] += bce.item() * len(idx) / len(order)
        log.append({"epoch": epoch + 1, **{f"loss_{k}": round(v, 5) for k, v in total.items()}})
    return log


def check_args(args) -> None:
    if args.seed == PROBE_SEED:
        raise InputError(f"--seed {PROBE_SEED} is the probe cohort's: the ceiling must not train on the lesions "
                         "it is scored on")
    for name in ("n_lesions", "epochs", "batch_size", "workers"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name}: must be positive, got {getattr(args, name)}")


@cli_entry
def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    args.progress = not args.no_progress
    check_args(args)
    like, spec = load_encoder(args.like)  # the InputError for a missing or 2-channel folder comes first
    t0 = time.perf_counter()
    cohort_dir = Path(args.cohort_dir or f"runs/supervised_cohort_s{args.seed}_n{args.n_lesions}")
    ensure_cohort(cohort_dir, args.n_lesions, args.seed, args.workers, args.progress)
    cohort = load_cohort(cohort_dir, spec.prep, progress=args.progress)
    crops = lesion_crops(cohort, spec.input_size, probe_view(spec, None, None))  # [N, 2, S, S, S]
    torch.manual_seed(args.torch_seed)
    model = LatentHead(random_encoder(like.config, args.torch_seed), cohort.latents.shape[1])
    log = train(model, crops, cohort.latents.to_numpy(np.float32), cohort.label.astype(np.float32), args)
    out = Path(args.out)
    model.encoder.save_pretrained(out / "encoder", input_spec=spec, card={
        "title": "mimfm ViT3D encoder, supervised ceiling (benchmarks.research.probe_ceiling)",
        "training": {"objective": "supervised: MSE of the z_* latents + BCE of the label (a measurement, "
                                  "not a pretrained model)", "data": f"data.synth seed {args.seed}, "
                     f"{len(crops)} lesions", "epochs": args.epochs, "lr": args.lr}})
    record = {"command": command_line("benchmarks.research.probe_ceiling", argv), "date": today(),
              "machine": machine("cpu"), "like": args.like, "cohort": {"dir": str(cohort_dir), "seed": args.seed,
              "n_lesions": len(crops)}, "latents": list(cohort.latents.columns), "log": log,
              "seconds": round(time.perf_counter() - t0, 1)}
    write_json(out / "supervised.json", record)
    print(f"trained {args.epochs} epochs on {len(crops)} lesions in {record['seconds']:.0f} s; final losses "
          f"{log[-1]}; wrote {out / 'encoder'}")
    return record


if __name__ == "__main__":
    main()
