"""Research instruments: the measurements behind docs/RESULTS.md, not tools a user needs to run a model.

- ssl_gain/: the published study's table in miniature, on the synthetic cohort, with label-efficiency curves;
- finetune_recipe.py: which fine-tuning recipe keeps what pretraining learned (development cohort only);
- probe_ceiling.py: the supervised ceiling of an encoder architecture under the probe;
- probe_headroom.py: what latent R² buys in label AUC under the probe's read-out;
- pretrain_heldout.py: MiM's losses on trained-on vs never-seen volumes, per checkpoint;
- crop_scale_probe.py, radiomics_selection.py: one-off choices (crop scale, radiomics feature selection).
"""
