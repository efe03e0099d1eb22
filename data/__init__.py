"""Volumes in, tensors out: NIfTI I/O and validation, manifests, preprocessing, cache, crops, splits, synthetic cohort."""
