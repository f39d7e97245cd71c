"""Benchmarks run by `make bench`; each module exposes run() -> dict(title, markdown, data)."""
