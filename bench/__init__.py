"""Benchmarks for fluster: convergence, reload safety, storms, scale, footprint.

`python -m bench` runs every row against real etcd, real HAProxy and the real reloader and
sidekick, next to a naive confd-style baseline (bench/baseline.py), prints a markdown
table and writes docs/BENCHMARKS.md. Timing claims live here and only here: the tests
check behaviour, never speed.
"""
