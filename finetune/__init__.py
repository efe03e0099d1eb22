"""mimfm stage two: fine-tuning, evaluation, prediction, baselines."""
