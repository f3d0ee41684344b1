"""Side-by-side benchmarks of sam2flow against Meta's reference ``sam2`` package.

Run ``python -m benchmarks.run --quick`` (or without ``--quick`` for the full run); see
``benchmarks/run.py`` for the cases and options. Not part of the installed package.
"""
