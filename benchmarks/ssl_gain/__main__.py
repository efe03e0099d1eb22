"""`python -m benchmarks.ssl_gain`: see the package docstring."""
from benchmarks.ssl_gain import main

raise SystemExit(main())
