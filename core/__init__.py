"""Plumbing with no imaging or ML in it: typed configs and the CLI that fills them, the one-line errors
every CLI prints, and atomic file writes."""
