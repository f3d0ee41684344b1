"""The engine: the only place that runs the model."""
