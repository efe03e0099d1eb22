"""The fine-tuning recipe that keeps what pretraining learned: learning rates, LP-FT, and the epoch kept.

- **Rates.** The fusion blocks and task heads train at the head's rate (`optim.lr`). With
  `encoder_blr`, the encoder's peak rate follows MAE's fine-tuning rule, blr x effective batch / 256,
  and is then layer-decayed (timm's param_groups_layer_decay), so a pretrained block moves far less
  than the fresh head on top of it. `encoder_blr auto` (the default) is the measured rate for the
  encoder at hand: a pretrained encoder needs 10x scratch's, because its features have about a third of
  a random encoder's scale (docs/RESULTS.md).
- **Warm-up over epochs** (`warmup_epochs`), so the warm-up means the same on 20 or 2000 subjects.
- **LP-FT** (Kumar et al. 2022): for the first `lp_epochs` the encoder is held (its rate is 0 and its
  gradients are zeroed, so its weights do not move) while the head fits the frozen features; then the
  encoder joins with its own warm-up. A head that already fits does not send random gradients into the
  pretrained blocks.
- **Epoch choice.** `best` keeps the epoch with the best validation score (at or after
  `min_epochs`); `last` keeps the final epoch; `average` keeps the mean of the weights from
  `min_epochs` to the end (stochastic weight averaging over epochs). The latter two do not stop early.
"""
from __future__ import annotations

import copy
import math
from dataclasses import replace

import torch

from engine.steps import WarmupCosine

EPOCH_CHOICES = ("best", "last", "average")
# `encoder_blr auto`, by whether the encoder is pretrained. Chosen on the development cohort
# (benchmarks.research.finetune_recipe, variants base / rate10): at 30 labelled patients a pretrained
# encoder at the scratch rate fell 0.05-0.12 AUC behind scratch and at 10x it is level; on the large sets
# at 20 patients it leads (ssl_gain's cpu preset, pretrained_encoder_blr). Segmentation measured the
# same way round (Dice -0.072 against scratch at the scratch rate, -0.058 at 10x), so the rate does
# not depend on the task. The 10x rate costs scratch 0.02-0.03 AUC, hence two rates.
SCRATCH_ENCODER_BLR = 5e-3
PRETRAINED_ENCODER_BLR = 5e-2
AUTO = "auto"


def tag_param_groups(groups: list[dict], encoder_params) -> list[dict]:
    """Mark each optimizer group "encoder" or "head"; timm's layer-decay groups never mix the two,
    because the heads form their own top layer."""
    enc = {id(p) for p in encoder_params}
    for g in groups:
        roles = {id(p) in enc for p in g["params"]}
        if len(roles) != 1:
            raise RuntimeError("an optimizer group mixes encoder and head parameters")
        g["role"] = "encoder" if roles.pop() else "head"
    return groups


def resolve_encoder_blr(encoder_blr: float | str, pretrained: bool) -> float:
    """A number as given; `auto`: the pretrained rate for a pretrained encoder, else scratch's."""
    if encoder_blr != AUTO:
        return float(encoder_blr)
    return PRETRAINED_ENCODER_BLR if pretrained else SCRATCH_ENCODER_BLR


def encoder_peak_lr(encoder_blr: float, effective_batch: int) -> float | None:
    """MAE's rule: blr x effective batch / 256; None (0 blr): the encoder follows the head's rate."""
    return encoder_blr * effective_batch / 256 if encoder_blr > 0 else None


class FinetuneSchedule:
    """Warm-up then cosine per optimizer step, for the head and (on its own clock) the encoder.

    The encoder's rate is 0 for the first `lp_steps` steps (LP-FT's probe phase), then warms up again.
    Each group's rate is its role's rate x its `lr_scale` (layer decay).
    """

    def __init__(self, optimizer, optim_cfg, total_steps: int, warmup_steps: int, encoder_lr: float | None,
                 lp_steps: int = 0):
        self.optimizer, self.lp_steps = optimizer, lp_steps
        head = replace(optim_cfg, warmup_steps=warmup_steps)
        self.head = WarmupCosine(optimizer, head, total_steps)
        enc_lr = optim_cfg.lr if encoder_lr is None else encoder_lr
        enc = replace(head, lr=enc_lr, min_lr=optim_cfg.min_lr * enc_lr / optim_cfg.lr)
        self.encoder = WarmupCosine(optimizer, enc, max(1, total_steps - lp_steps))

    def rates(self, step: int) -> tuple[float, float]:
        """(head rate, encoder rate) at `step`, before layer decay."""
        enc = 0.0 if step < self.lp_steps else self.encoder.lr_at(step - self.lp_steps)
        return self.head.lr_at(step), enc

    def set_step(self, step: int) -> float:
        head, enc = self.rates(step)
        for g in self.optimizer.param_groups:
            g["lr"] = (enc if g.get("role") == "encoder" else head) * g.get("lr_scale", 1.0)
        return head


class EpochChoice:
    """Which weights a fold keeps; fed once per epoch with the early-stopping key (higher is better)."""

    def __init__(self, how: str, min_epochs: int, patience: int, model: torch.nn.Module, epochs: int):
        if how not in EPOCH_CHOICES:
            raise ValueError(f"epoch_choice {how!r}: expected one of {EPOCH_CHOICES}")
        self.how, self.patience, self.model = how, patience, model
        self.min_epochs = min(min_epochs, epochs - 1)  # at least one epoch is eligible
        self.best_key, self.best_epoch, self.state = -math.inf, 0, None
        self.averaged, self.first_averaged, self.last_epoch = 0, None, -1

    def update(self, epoch: int, key: float) -> None:
        self.last_epoch = epoch
        if epoch < self.min_epochs:
            return
        if self.how == "best" and key > self.best_key:
            self.best_key, self.best_epoch = key, epoch
            self.state = copy.deepcopy(self.model.state_dict())
        elif self.how == "average":
            self._accumulate(epoch)

    def _accumulate(self, epoch: int) -> None:
        """Running mean of the floating-point weights; other buffers are the latest epoch's."""
        now = self.model.state_dict()
        if self.state is None:
            self.state, self.first_averaged = copy.deepcopy(now), epoch
        else:
            n = self.averaged + 1
            for k, v in now.items():
                if v.is_floating_point():
                    self.state[k] += (v.detach() - self.state[k]) / n
                else:
                    self.state[k] = v.detach().clone()
        self.averaged += 1

    def should_stop(self, epoch: int) -> bool:
        return self.how == "best" and epoch >= self.min_epochs and epoch - self.best_epoch >= self.patience

    @property
    def kept_epoch(self) -> int:
        return self.best_epoch if self.how == "best" else self.last_epoch

    def describe(self) -> str:
        if self.how == "best":
            return f"best validation epoch {self.best_epoch} (of epochs >= {self.min_epochs})"
        if self.how == "last":
            return f"last epoch {self.last_epoch}"
        return f"mean of the weights of epochs {self.first_averaged}-{self.last_epoch}"

    def chosen_state(self) -> dict:
        if self.how == "last" or self.state is None:
            return copy.deepcopy(self.model.state_dict())
        return self.state
