"""Model registry, weight discovery and checkpoint conversion."""
