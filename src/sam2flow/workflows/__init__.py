"""Workflow definitions (the Roboflow Workflows JSON format) and the SAM2 step."""
