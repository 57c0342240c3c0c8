"""Benchmarks of launcher against the leanest hand-written loop and its peers; see bench/RESULTS.md."""
