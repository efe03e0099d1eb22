"""The tasks a fine-tuned model learns, one object each: the registry. Nothing outside it and the CLI
compares task names; code asks the task what it needs.

A task says which targets it predicts (the binary label, time to event, the lesion mask), and from that
follow:
- the manifest columns it needs (`columns`; the mask column is every task's input anyway);
- the heads the model grows (`heads`: "logit" for the label, "risk" or "hazard_logits" for survival; the
  segmentation head, "seg_logits", is grown by the model for this task or for any task's --seg_weight);
- its loss (`loss`: BCE, Cox partial likelihood over the risk set gathered across ranks, or discrete-time NLL,
  plus Dice + cross-entropy and the L2 pull of a linear_clinical hazard's image term, summed);
- the scores it saves and ensembles (`scores`: "prob", "risk"; "dice" per subject for segmentation);
- the validation score that chooses epochs (`validation_score`: AUC, Harrell's C, their mean, or Dice);
- its metrics.json sections and figures (`reports`, `figures`: ROC and calibration for the label,
  Kaplan-Meier for survival, mask overlays for segmentation).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from core.errors import ConfigError

# metrics.json sections: what is reported of a label score, a survival score and a segmentation
LABEL_REPORT, SURVIVAL_REPORT, SEGMENTATION_REPORT = "classification", "survival", "segmentation"
LABEL_COLUMNS, SURVIVAL_COLUMNS = ("label",), ("time", "event")


@dataclass(frozen=True)
class Task:
    name: str
    label: bool       # predicts the binary label (1 = progression)
    survival: bool    # predicts time to event
    segment: bool = False  # predicts the lesion mask (from the image alone)

    @property
    def columns(self) -> tuple[str, ...]:
        """The manifest's target columns this task trains and is evaluated on."""
        return LABEL_COLUMNS * self.label + SURVIVAL_COLUMNS * self.survival

    @property
    def manifest_columns(self) -> tuple[str, ...]:
        """What a manifest must have for this task: image and mask paths, and the targets."""
        from data.manifest import IMAGE_COLUMNS  # data.manifest brings pandas: only when a manifest is read
        return IMAGE_COLUMNS + self.columns

    def read_manifest(self, path, check_files: bool = True, prep=None):
        """data.manifest.read_manifest of the columns this task needs; the image channels are `prep`'s
        (a data.prep_config.PrepConfig; default: the one column `image`)."""
        from data.manifest import read_manifest
        return read_manifest(path, columns=self.manifest_columns, purpose=f"--task {self.name}",
                             check_files=check_files, prep=prep)

    def heads(self, survival_head: str, n_time_bins: int) -> dict[str, int]:
        """Output name -> size of each head: "logit" [1]; "risk" [1] (Cox) or "hazard_logits" [T] (discrete)."""
        out = {"logit": 1} if self.label else {}
        if self.survival:
            out |= {"risk": 1} if survival_head == "cox" else {"hazard_logits": n_time_bins}
        return out

    def explained_output(self, survival_head: str) -> str:
        """The output an explanation (occlusion) follows: the label's logit when there is one."""
        return next(iter(self.heads(survival_head, 1)))

    def seg_weight(self, seg_weight: float) -> float:
        """The weight of the segmentation loss: 1 for the segmentation task, else --seg_weight (0: none)."""
        return 1.0 if self.segment else float(seg_weight)

    def loss(self, out: dict[str, Tensor], batch: dict, pos_weight: Tensor | None = None,
             seg_weight: float = 0.0, hazard_l2: float = 0.0) -> dict[str, Tensor]:
        """The task's loss terms and their sum under "loss". The segmentation term (Dice + cross-entropy
        against the mask channel of batch["x"]) enters with `self.seg_weight(seg_weight)`; the image term of a
        linear_clinical hazard ("image_hazard") is pulled towards 0 by `hazard_l2` x its mean square."""
        from models.survival_losses import cox_efron_loss, discrete_time_nll, gather_risk_set
        terms = {}
        w = self.seg_weight(seg_weight)
        if w > 0:
            from models.segmentation import seg_target, segmentation_loss  # brings MONAI: only when segmenting
            terms["seg"] = w * segmentation_loss()(out["seg_logits"].float(), seg_target(batch["x"]))
        if self.label:
            terms["bce"] = F.binary_cross_entropy_with_logits(out["logit"].float(), batch["label"].float(),
                                                              pos_weight=pos_weight)
        if self.survival:
            if "risk" in out:
                # the risk set is the whole step's batch, gathered over ranks (each rank's loss is the same)
                terms["cox"] = cox_efron_loss(*gather_risk_set(out["risk"].float(), batch["time"], batch["event"]))
            else:
                terms["nll"] = discrete_time_nll(out["hazard_logits"].float(), batch["bin"], batch["event"])
            if hazard_l2 > 0 and "image_hazard" in out:
                terms["image_l2"] = hazard_l2 * out["image_hazard"].float().pow(2).mean()
        terms["loss"] = sum(terms.values())
        return terms

    def validation_score(self, scores: dict[str, np.ndarray], targets) -> float | None:
        """Higher is better: AUC of "prob", Harrell's C of "risk", or their mean; None when undefined
        (a one-class or event-free validation set)."""
        from sklearn.metrics import roc_auc_score
        from sksurv.metrics import concordance_index_censored
        values = []
        if self.segment:
            return float(np.mean(scores["dice"]))
        if self.label:
            if len(np.unique(targets.label)) < 2:
                return None
            values.append(roc_auc_score(targets.label, scores["prob"]))
        if self.survival:
            if targets.event.sum() == 0:
                return None
            values.append(concordance_index_censored(targets.event.astype(bool), targets.time, scores["risk"])[0])
        return float(np.mean(values))

    @property
    def validation_metric(self) -> str:
        return " + ".join(["val AUC"] * self.label + ["val C-index"] * self.survival + ["val Dice"] * self.segment)

    @property
    def reports(self) -> tuple[str, ...]:
        return (LABEL_REPORT,) * self.label + (SURVIVAL_REPORT,) * self.survival + (SEGMENTATION_REPORT,) * self.segment

    @property
    def figures(self) -> tuple[str, ...]:
        return ("roc", "calibration") * self.label + ("km",) * self.survival + ("overlay",) * self.segment


CLASSIFICATION = Task("classification", label=True, survival=False)
SURVIVAL = Task("survival", label=False, survival=True)
MULTITASK = Task("multitask", label=True, survival=True)
SEGMENTATION = Task("segmentation", label=False, survival=False, segment=True)
TASKS = {t.name: t for t in (CLASSIFICATION, SURVIVAL, MULTITASK, SEGMENTATION)}
TASK_NAMES = tuple(TASKS)  # the choices of --task


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ConfigError(f"--task {name!r}: expected one of {list(TASKS)}")
    return TASKS[name]


def task_of_scores(names) -> Task:
    """The task whose saved scores are `names` (e.g. a predictions.csv's "prob" / "risk" columns)."""
    key = ("prob" in names, "risk" in names)
    for task in TASKS.values():
        if (task.label, task.survival) == key and not task.segment:
            return task
    raise ConfigError(f"scores {sorted(names)}: neither 'prob' nor 'risk'")


def output_scores(out: dict[str, Tensor], time_bins=None) -> dict[str, Tensor]:
    """Model outputs -> the scores that are saved, evaluated and ensembled (training and predict alike):
    "prob" [B] = sigmoid(logit), and "risk" [B]: the Cox risk, or minus the restricted mean survival
    time of discrete hazards (over `time_bins` edges, in bins without them). Float32, detached."""
    from models.survival_losses import survival_risk_from_hazards
    scores = {}
    if "logit" in out:
        scores["prob"] = torch.sigmoid(out["logit"].detach().float())
    if "risk" in out:
        scores["risk"] = out["risk"].detach().float()
    elif "hazard_logits" in out:
        scores["risk"] = survival_risk_from_hazards(out["hazard_logits"].detach().float(), time_bins)
    return scores
