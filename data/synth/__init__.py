"""The built-in synthetic cohort: brain-metastasis T1-CE MRI after radiosurgery, with a stated
generative model for radiation necrosis (0) vs tumour progression (1) and survival.

    python -m data.synth --out DIR --n_unlabeled N --n_labeled M --n_external K --seed S

See docs/SYNTHETIC_COHORT.md. Not real patients; not validated against real radiology.
"""
from data.synth.cohort import generate_cohort, resolve_params, sample_tables
from data.synth.params import CohortParams, LesionParams, OutcomeParams, SiteParams

__all__ = ["generate_cohort", "sample_tables", "resolve_params", "CohortParams", "SiteParams", "LesionParams",
           "OutcomeParams"]
