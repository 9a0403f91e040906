"""Benchmarks runnable as `mcomp bench ...`; scripts in benchmarks/ call into here."""
