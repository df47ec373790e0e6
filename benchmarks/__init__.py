"""Benchmarks: speed and memory of this project's HAT against the official computation (see ``bench_*.py``)."""
