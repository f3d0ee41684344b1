"""The engine's options by name, without torch: the command line offers them before loading anything."""

from __future__ import annotations

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")  # ``precision.resolve_dtype``
QUANTIZE_CHOICES = ("auto", "none", "int8-weights", "int8")  # ``precision.resolve_quantize``
BACKENDS = ("auto", "torch", "openvino")  # ``encoders.resolve_backend``
BACKEND_ENV = "SAM2FLOW_BACKEND"
