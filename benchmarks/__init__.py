"""Benchmarks of cachepass against full compute and the cache tools users pick instead.

Run ``python benchmarks/compare.py --help`` (or ``python -m benchmarks.compare``). Not installed with
the package: the comparison tools are an optional dependency group (``pip install -e ".[bench]"``).
"""
