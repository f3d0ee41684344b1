"""The engine: the only place that runs the model."""

from .threads import tune_openmp

tune_openmp()  # before anything imports torch: libgomp reads its settings once, when torch loads it
