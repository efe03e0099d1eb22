"""The clinical Cox fit that a linear_clinical survival hazard starts from (models.fusion.LinearClinicalHazard).

Fitted on the training fold's rows only, on exactly the clinical encoding the model reads (the fold's
ClinicalSchema: z-scored numbers, one-hot categories, missing indicators), so its coefficients can be copied
into the model's beta unchanged: MultimodalModel.set_clinical_hazard(clinical_cox_fit(schema, train_df).coef_).
The untrained model then ranks patients exactly as this Cox model does.
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from core.errors import InputError

# sksurv's ridge: 0.5 * alpha * |beta|^2 beside the summed negative log partial likelihood. One unit is small
# beside the information of tens of events on z-scored columns, yet keeps beta finite where the encoding is
# collinear (one-hot columns beside their missing indicator, an all-zero indicator) or a small fold separates.
COX_ALPHA = 1.0


def clinical_cox_fit(schema, train_df: pd.DataFrame, alpha: float = COX_ALPHA):
    """sksurv CoxPHSurvivalAnalysis(ties="efron", alpha) of (time, event) on schema.transform(train_df) [N, F].

    `schema` is the fold's finetune.clinical.ClinicalSchema; `train_df` its training rows, with time and event.
    """
    from sksurv.linear_model import CoxPHSurvivalAnalysis
    from sksurv.util import Surv
    for col in ("time", "event"):
        if col not in train_df.columns:
            raise InputError(f"clinical Cox fit: column {col!r} missing from the training table")
    event = train_df["event"].to_numpy().astype(bool)
    if not event.any():
        raise InputError("clinical Cox fit: the training rows have no events")
    z = schema.transform(train_df).astype(np.float64)  # [N, F]
    y = Surv.from_arrays(event=event, time=train_df["time"].to_numpy(dtype=float))
    with warnings.catch_warnings():
        # Ties are handled (Efron); a collinear encoding is what the ridge is for.
        warnings.filterwarnings("ignore", message=".*(ties|singular|converge).*")
        return CoxPHSurvivalAnalysis(alpha=alpha, ties="efron").fit(z, y)
