"""`python -m benchmarks.probe`: see the package docstring."""
from benchmarks.probe import main

main()
