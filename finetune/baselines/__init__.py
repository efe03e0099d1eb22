"""The baselines a user fits first, in one room: radiomics, clinical-only and radiomics + clinical
(clinical_models.py), and what the other models borrow from them. Imported by module, so that loading one
baseline does not load the others' libraries."""
