"""Benchmarks over the public quick-start API, each run as ``python -m benchmarks.<name>``."""
