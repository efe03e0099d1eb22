"""`python -m benchmarks.research.ssl_gain`: see the package docstring."""
from benchmarks.research.ssl_gain import main

raise SystemExit(main())
