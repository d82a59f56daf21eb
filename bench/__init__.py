"""Benchmarks of dicomflow: figures are ratios against baselines measured in the same run.

``python -m bench.run [--quick]`` runs them all; each module also runs alone
(``python -m bench.ingest``, ``python -m bench.series_pg``). Results go to ``bench/out/``.
"""
