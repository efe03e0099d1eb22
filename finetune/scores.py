"""Model outputs -> the scores that are saved, evaluated and ensembled; used by training and predict alike."""
from __future__ import annotations

import torch
from torch import Tensor

from finetune.survival_losses import survival_risk_from_hazards


def output_scores(out: dict[str, Tensor], time_bins=None) -> dict[str, Tensor]:
    """"prob" [B] = sigmoid(logit), and "risk" [B]: the Cox risk, or minus the restricted mean survival
    time of discrete hazards (over `time_bins` edges, in bins without them). Float32, detached."""
    scores = {}
    if "logit" in out:
        scores["prob"] = torch.sigmoid(out["logit"].detach().float())
    if "risk" in out:
        scores["risk"] = out["risk"].detach().float()
    elif "hazard_logits" in out:
        scores["risk"] = survival_risk_from_hazards(out["hazard_logits"].detach().float(), time_bins)
    return scores
