"""Load tests and benchmarks of geventpop3 (run from the repository root)."""
