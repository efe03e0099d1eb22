"""Benchmarks (not tests); results go to docs/.

- speed/: speed and memory, what a user runs to size a machine;
- probe/: the frozen-feature probe, the gate for every pretraining change;
- research/: the instruments behind docs/RESULTS.md;
- common.py: what they share (machine line, tables, the docs writer); gpu_check.sh: every GPU check in one call.
"""
