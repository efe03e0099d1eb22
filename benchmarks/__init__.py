"""Speed and quality benchmarks (not tests); results go to docs/."""
