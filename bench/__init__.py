"""Benchmarks: each ``bench/bench_<name>.py`` has a ``main(argv=None)`` that measures side-by-side ratios in one run
and prints a table. Run all with ``python -m bench`` or some with ``python -m bench io ...``."""
