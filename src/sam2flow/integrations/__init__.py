"""Adapters that let other tools call sam2flow in their own protocols (CVAT's serverless functions, ...)."""
